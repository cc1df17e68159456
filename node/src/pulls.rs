//! Where each recent blob's bytes came from: served from the cache, fetched from the upstream,
//! fetched from which peers. Kept for the most recent [`MAX_RECORDS`] blobs and served as JSON
//! at `GET /_shoal/pulls`, so that every pull can be explained afterwards.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use shoal_protocol::Digest;

/// Blobs remembered.
pub const MAX_RECORDS: usize = 512;

/// One blob's account.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record {
    /// The blob.
    pub digest: String,
    /// Its size, when known.
    pub size: Option<u64>,
    /// Milliseconds since the epoch of the first request.
    pub first_seen_ms: u64,
    /// Bytes sent to clients from the verified store.
    pub served_from_cache: u64,
    /// Bytes sent to clients while the blob was arriving.
    pub served_while_arriving: u64,
    /// Bytes fetched from the upstream.
    pub fetched_from_upstream: u64,
    /// Bytes fetched from each peer (by peer id).
    pub fetched_from_peers: BTreeMap<String, u64>,
    /// The peers banned while fetching it (corrupt chunks, lying tables), by peer id.
    pub banned_peers: BTreeSet<String>,
    /// For a node that names a site and fetched the blob from peers: `gateway` (one of the
    /// site's few nodes that ask other sites at once), `member` (asks them only after the
    /// site's fallback time) or `unjudged` (too little known: the plain quiet rule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site_role: Option<&'static str>,
    /// `fetching`, `verified`, or `failed: ...`.
    pub state: String,
}

/// The bounded log. A std mutex: map updates only, never held across an `.await`.
#[derive(Default)]
pub struct Pulls {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    records: BTreeMap<Digest, Record>,
    order: VecDeque<Digest>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Pulls {
    fn with(&self, d: &Digest, f: impl FnOnce(&mut Record)) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !inner.records.contains_key(d) {
            if inner.order.len() >= MAX_RECORDS {
                if let Some(old) = inner.order.pop_front() {
                    inner.records.remove(&old);
                }
            }
            inner.order.push_back(*d);
            let rec = Record {
                digest: d.to_string(),
                first_seen_ms: now_ms(),
                state: "cached".into(),
                ..Default::default()
            };
            inner.records.insert(*d, rec);
        }
        if let Some(r) = inner.records.get_mut(d) {
            f(r);
        }
    }

    /// Bytes served to a client from the store.
    pub fn served_cache(&self, d: &Digest, n: u64) {
        self.with(d, |r| r.served_from_cache += n);
    }

    /// Bytes served to a client while the blob was arriving.
    pub fn served_arriving(&self, d: &Digest, n: u64) {
        self.with(d, |r| r.served_while_arriving += n);
    }

    /// A fetch started.
    pub fn fetching(&self, d: &Digest, size: Option<u64>) {
        self.with(d, |r| {
            r.size = size.or(r.size);
            r.state = "fetching".into();
        });
    }

    /// This node's role in its site for the blob (see [`Record::site_role`]).
    pub fn site_role(&self, d: &Digest, role: &'static str) {
        self.with(d, |r| r.site_role = Some(role));
    }

    /// Bytes fetched from the upstream.
    pub fn from_upstream(&self, d: &Digest, n: u64) {
        self.with(d, |r| r.fetched_from_upstream += n);
    }

    /// Bytes fetched from a peer.
    pub fn from_peer(&self, d: &Digest, peer: &str, n: u64) {
        self.with(d, |r| {
            *r.fetched_from_peers.entry(peer.to_owned()).or_default() += n
        });
    }

    /// A peer was banned while fetching it.
    pub fn banned(&self, d: &Digest, peer: &str) {
        self.with(d, |r| {
            r.banned_peers.insert(peer.to_owned());
        });
    }

    /// The fetch ended.
    pub fn finished(&self, d: &Digest, outcome: &Result<(), String>) {
        self.with(d, |r| {
            r.state = match outcome {
                Ok(()) => "verified".into(),
                Err(e) => format!("failed: {e}"),
            }
        });
    }

    /// A copy of one record.
    pub fn get(&self, d: &Digest) -> Option<Record> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .records
            .get(d)
            .cloned()
    }

    /// All records, most recent first, as JSON.
    pub fn to_json(&self) -> String {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let list: Vec<&Record> = inner
            .order
            .iter()
            .rev()
            .filter_map(|d| inner.records.get(d))
            .collect();
        serde_json::to_string_pretty(&serde_json::json!({ "pulls": list }))
            .unwrap_or_else(|_| "{}".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_accounted() {
        let p = Pulls::default();
        let d = Digest::of(b"a");
        p.fetching(&d, Some(10));
        p.from_upstream(&d, 6);
        p.from_peer(&d, "peer1", 4);
        p.finished(&d, &Ok(()));
        p.served_cache(&d, 10);
        let r = p.get(&d).unwrap();
        assert_eq!(
            (
                r.fetched_from_upstream,
                r.fetched_from_peers["peer1"],
                r.served_from_cache
            ),
            (6, 4, 10)
        );
        assert_eq!(r.state, "verified");
        for i in 0..(MAX_RECORDS as u32 + 10) {
            p.served_cache(&Digest::of(&i.to_le_bytes()), 1);
        }
        assert!(p.get(&d).is_none(), "oldest record dropped");
        assert!(p.to_json().contains("\"pulls\""));
    }
}
