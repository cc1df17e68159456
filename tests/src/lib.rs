//! Shared harness of the integration tests in `tests/tests/`: an in-process origin registry
//! and a node in front of it, or the real `shoal` binary as a child process.

use std::path::PathBuf;
use std::time::Duration;

use shoal_node::origin::Origin;
use shoal_node::{Config, Node};

/// An origin and a node mirroring it.
pub struct Pair {
    /// The upstream.
    pub origin: Origin,
    /// The mirror.
    pub node: Node,
    /// Its data directory.
    pub dir: tempfile::TempDir,
    /// An HTTP client.
    pub http: reqwest::Client,
}

impl Pair {
    /// Starts an origin and a node with default settings, adjusted by `tune`.
    pub async fn start(tune: impl FnOnce(&mut Config)) -> Pair {
        let origin = Origin::start().await.expect("origin starts");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(
            "127.0.0.1:0".parse().expect("addr"),
            dir.path(),
            &origin.url(),
        );
        config.upstream_timeout = Duration::from_secs(5);
        tune(&mut config);
        let node = Node::start(config).await.expect("node starts");
        Pair {
            origin,
            node,
            dir,
            http: reqwest::Client::new(),
        }
    }

    /// A URL on the node.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.node.addr(), path)
    }
}

/// The `shoal` binary built alongside the tests.
pub fn shoal_bin() -> PathBuf {
    let mut p = std::env::current_exe().expect("test executable path");
    p.pop();
    if p.ends_with("deps") {
        p.pop();
    }
    p.join("shoal")
}

/// Deterministic pseudo-random bytes (xorshift), for blob contents.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
