//! The node's persistent libp2p identity: an ed25519 keypair in a file under the data dir,
//! created on first start so the peer id survives restarts.

use std::fs;
use std::io::Write;
use std::path::Path;

use libp2p::identity::Keypair;

use super::DhtError;

/// Loads the keypair at `path`, or creates one (mode 0600, written atomically) if the file
/// does not exist. A file that exists but does not hold a valid key is an error: silently
/// replacing it would change the node's peer id.
///
/// File format: the libp2p protobuf encoding of the keypair (`Keypair::to_protobuf_encoding`,
/// as used by go-libp2p and rust-libp2p).
pub fn load_or_create(path: &Path) -> Result<Keypair, DhtError> {
    let io_err = |source: std::io::Error| DhtError::Identity {
        path: path.to_path_buf(),
        reason: source.to_string(),
    };
    match fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| DhtError::Identity {
            path: path.to_path_buf(),
            reason: format!("not a libp2p keypair: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| DhtError::Identity {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(dir).map_err(io_err)?;
            }
            let tmp = path.with_extension("key.tmp");
            let mut opts = fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&tmp).map_err(io_err)?;
            f.write_all(&bytes).map_err(io_err)?;
            f.sync_all().map_err(io_err)?;
            drop(f);
            fs::rename(&tmp, path).map_err(io_err)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                if let Ok(d) = fs::File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            tracing::info!(path = %path.display(), peer_id = %key.public().to_peer_id(), "created p2p identity");
            Ok(key)
        }
        Err(e) => Err(io_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("p2p-identity.key");
        let a = load_or_create(&path).unwrap();
        let b = load_or_create(&path).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o077,
                0,
                "identity file readable by others: {mode:o}"
            );
        }
        fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(DhtError::Identity { .. })
        ));
    }
}
