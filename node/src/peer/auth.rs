//! Mutual authentication by the cluster key, bound to the TLS session.
//!
//! Each side proves it holds the cluster key with an HMAC-SHA256, keyed by the cluster key, over
//! a role label and 32 bytes of TLS keying material exported from *this* connection
//! ([`EXPORTER_LABEL`], RFC 5705 / RFC 8446 section 7.5). A man in the middle terminates two TLS
//! sessions with different exporters, so a proof it relays verifies on neither; without the key
//! it cannot compute one. Proofs are checked in constant time (`Mac::verify_slice`).

use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};

/// The exporter label both sides use.
pub const EXPORTER_LABEL: &[u8] = b"shoal cluster auth";
/// What the client's proof covers before the exporter.
const CLIENT_LABEL: &[u8] = b"shoal-auth-v1 client";
/// What the server's proof covers before the exporter.
const SERVER_LABEL: &[u8] = b"shoal-auth-v1 server";

/// The secret every node of a cluster shares: 32 bytes. Its `Debug` output never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; 32]);

impl ClusterKey {
    /// A key from its 32 bytes.
    pub const fn new(bytes: [u8; 32]) -> ClusterKey {
        ClusterKey(bytes)
    }

    /// The key a node derives from its `--cluster-key-file`: the SHA-256 of the file's contents.
    pub fn from_file_contents(contents: &[u8]) -> ClusterKey {
        ClusterKey(Sha256::digest(contents).into())
    }

    fn mac(&self, role: Role, exporter: &[u8; 32]) -> Hmac<Sha256> {
        // HMAC takes keys of any length: `new_from_slice` cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(match role {
            Role::Client => CLIENT_LABEL,
            Role::Server => SERVER_LABEL,
        });
        mac.update(exporter);
        mac
    }

    /// The proof `role` sends on a connection with this exporter.
    pub(crate) fn proof(&self, role: Role, exporter: &[u8; 32]) -> [u8; 32] {
        self.mac(role, exporter).finalize().into_bytes().into()
    }

    /// Whether `proof` is `role`'s proof on this connection (constant time).
    pub(crate) fn verify(&self, role: Role, exporter: &[u8; 32], proof: &[u8; 32]) -> bool {
        self.mac(role, exporter).verify_slice(proof).is_ok()
    }
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// Which end of a connection a proof is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The side that opened the connection.
    Client,
    /// The side that accepted it.
    Server,
}

/// The connection's exporter value, or `None` if the TLS session cannot export (it always can
/// once the handshake is complete).
pub(crate) fn exporter(conn: &quinn::Connection) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_depend_on_key_role_and_exporter() {
        let k = ClusterKey::new([7; 32]);
        let e = [1; 32];
        let p = k.proof(Role::Client, &e);
        assert!(k.verify(Role::Client, &e, &p));
        assert!(
            !k.verify(Role::Server, &e, &p),
            "a client proof is not a server proof"
        );
        assert!(
            !k.verify(Role::Client, &[2; 32], &p),
            "bound to the exporter"
        );
        assert!(!ClusterKey::new([8; 32]).verify(Role::Client, &e, &p));
        let mut bad = p;
        bad[31] ^= 1;
        assert!(!k.verify(Role::Client, &e, &bad));
        // RFC 4231-style sanity: HMAC-SHA256 of the label and exporter.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&[7; 32]).unwrap();
        mac.update(b"shoal-auth-v1 client");
        mac.update(&e);
        assert_eq!(p, <[u8; 32]>::from(mac.finalize().into_bytes()));
    }

    #[test]
    fn file_keys_and_debug() {
        let k = ClusterKey::from_file_contents(b"secret\n");
        assert_eq!(k, ClusterKey::new(Sha256::digest(b"secret\n").into()));
        assert_eq!(format!("{k:?}"), "ClusterKey(..)");
    }
}
