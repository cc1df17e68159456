//! Blobs still arriving, shared with peers while they arrive.
//!
//! Goal: a node serves every chunk it holds verified while its own download goes on, so the
//! followers of a seeder that streams a blob from the upstream fetch from it at once instead of
//! waiting for the whole blob (or going upstream themselves). Non-goal: surviving a restart: an
//! arriving blob lives in memory and in its partial file, and is dropped with them.
//!
//! Invariants:
//! - A chunk's bit is set only after its bytes are in the partial file and the chunk checked
//!   against the prefix (or hashed into it, by the node that streams from the upstream). Bits
//!   are cleared, and the prefix cut back, only when two providers' tables disagree (the
//!   chunks checked against the disputed part are fetched again); otherwise the prefix only
//!   grows.
//! - The entry is removed when the download ends (committed: the store serves the blob; failed:
//!   nothing more is served) — by dropping the [`Registration`].
//! - Every change of the marked chunks, and the end of the download, wakes the
//!   [`Arriving::subscribe`] receivers (peers watching the blob's holding).
//! - A private blob is registered with the registry it comes from ([`Arriving::private`]):
//!   peers are handed its table and chunks only with a grant that registry accepts, as for a
//!   stored private blob.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use shoal_protocol::chunk::{ChunkError, ChunkLayout, TablePrefix};
use shoal_protocol::wire::Bitfield;
use shoal_protocol::Digest;

/// One blob arriving: what is known of its table and which chunks are on disk and checked.
pub struct Arriving {
    digest: Digest,
    layout: ChunkLayout,
    file: File,
    /// For a private blob, the registry key it comes from; `None` for a public one.
    origin: Option<String>,
    /// A std mutex: held for copies of a few KiB, never across I/O or an `.await`.
    state: Mutex<State>,
    /// Touched on every change of `have`; `true` once the download has ended (the
    /// [`Registration`] dropped).
    changes: watch::Sender<bool>,
}

struct State {
    prefix: TablePrefix,
    have: Bitfield,
    /// Chunks `0..first` are all marked.
    first: u32,
}

impl std::fmt::Debug for Arriving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arriving")
            .field("digest", &self.digest)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl Arriving {
    /// A blob of `layout` arriving into `file` (a reader on the partial file).
    pub fn new(digest: Digest, layout: ChunkLayout, file: File) -> Arriving {
        Arriving {
            digest,
            layout,
            file,
            origin: None,
            state: Mutex::new(State {
                prefix: TablePrefix::empty(layout),
                have: Bitfield::new(layout.count()),
                first: 0,
            }),
            changes: watch::channel(false).0,
        }
    }

    /// Marks the blob private, fetched from the registry `registry` (its key).
    pub fn private(mut self, registry: String) -> Arriving {
        self.origin = Some(registry);
        self
    }

    /// For a private blob, the registry key it comes from; `None` for a public one.
    pub fn origin(&self) -> Option<&str> {
        self.origin.as_deref()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated (each update is a
        // single assignment or a bit set), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The blob's digest.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The blob's layout.
    pub fn layout(&self) -> ChunkLayout {
        self.layout
    }

    /// What is known of the table.
    pub fn prefix(&self) -> TablePrefix {
        self.state().prefix.clone()
    }

    /// How many chunks the known prefix covers.
    pub fn covered(&self) -> u32 {
        self.state().prefix.covered()
    }

    /// Merges a longer prefix in (see [`TablePrefix::merge`]).
    pub fn merge_prefix(&self, other: &TablePrefix) -> Result<bool, ChunkError> {
        self.state().prefix.merge(other)
    }

    /// Marks chunk `index` as on disk and checked.
    pub fn mark(&self, index: u32) {
        self.state().have.set(index);
        self.changed();
    }

    fn changed(&self) {
        self.changes.send_modify(|_| {});
    }

    /// Woken on every change of [`Arriving::have`]; its value turns `true` when the download
    /// has ended (committed or failed: the store tells which).
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.changes.subscribe()
    }

    /// Withdraws chunk `index`: it was checked against a part of the table since found disputed
    /// (a peer that fetched it meanwhile checks the whole blob against the digest at the end).
    pub fn unmark(&self, index: u32) {
        let mut s = self.state();
        s.have.clear(index);
        s.first = s.first.min(index);
        drop(s);
        self.changed();
    }

    /// Replaces the known prefix by `prefix` (cut back after a dispute, see [`Arriving::unmark`]).
    pub fn replace_prefix(&self, prefix: &TablePrefix) {
        self.state().prefix = prefix.clone();
    }

    /// Marks chunks `0..n` as on disk and checked (a blob written in order).
    pub fn mark_first(&self, n: u32) {
        let mut s = self.state();
        let n = n.min(self.layout.count());
        if n <= s.first {
            return;
        }
        for i in s.first..n {
            s.have.set(i);
        }
        s.first = n;
        drop(s);
        self.changed();
    }

    /// Which chunks are on disk and checked.
    pub fn have(&self) -> Bitfield {
        self.state().have.clone()
    }

    /// True when chunk `index` is on disk and checked.
    pub fn has(&self, index: u32) -> bool {
        self.state().have.get(index)
    }

    /// `len` bytes of the partial file at `offset` (blocking). The caller checks that they lie
    /// in chunks it found marked.
    pub fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// The blobs arriving on this node, by digest. Cheap to clone.
#[derive(Clone, Default)]
pub struct ArrivingSet {
    /// A std mutex: map lookups and inserts only.
    map: Arc<Mutex<HashMap<Digest, Arc<Arriving>>>>,
}

impl std::fmt::Debug for ArrivingSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArrivingSet").finish_non_exhaustive()
    }
}

impl ArrivingSet {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Arriving>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The arriving blob `digest`, if one is registered.
    pub fn get(&self, digest: &Digest) -> Option<Arc<Arriving>> {
        self.map().get(digest).cloned()
    }

    /// Registers an arriving blob until the returned [`Registration`] is dropped. A blob already
    /// registered (two downloads of one digest do not happen: single-flight) is replaced.
    pub fn register(&self, arriving: Arc<Arriving>) -> Registration {
        let digest = arriving.digest;
        self.map().insert(digest, arriving.clone());
        Registration {
            set: self.clone(),
            arriving,
        }
    }

    /// How many blobs are arriving.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// True when nothing is arriving.
    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }
}

/// Keeps an [`Arriving`] registered; removes it when dropped.
pub struct Registration {
    set: ArrivingSet,
    arriving: Arc<Arriving>,
}

impl Registration {
    /// The registered blob.
    pub fn arriving(&self) -> &Arc<Arriving> {
        &self.arriving
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.set.map();
        if map
            .get(&self.arriving.digest)
            .is_some_and(|a| Arc::ptr_eq(a, &self.arriving))
        {
            map.remove(&self.arriving.digest);
        }
        drop(map);
        self.arriving.changes.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_protocol::chunk::MidstateTable;
    use std::io::Write;

    #[test]
    fn registered_chunks_are_read_back_and_dropped_with_the_registration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..640u32).map(|i| (i * 7) as u8).collect();
        let mut f = File::create(&path).unwrap();
        f.write_all(&data[..256]).unwrap();
        let digest = Digest::from_bytes([1; 32]);
        let layout = ChunkLayout::new(640, 128).unwrap();
        let a = Arc::new(Arriving::new(digest, layout, File::open(&path).unwrap()));
        let set = ArrivingSet::default();
        let reg = set.register(a.clone());
        assert!(set.get(&digest).is_some());
        assert!(!a.has(0), "not marked yet");
        a.mark_first(2);
        assert!(a.has(1));
        assert_eq!(a.read_at(128, 128).unwrap(), data[128..256].to_vec());
        assert_eq!(a.have().count_ones(), 2);
        let full = TablePrefix::from(MidstateTable::compute(&data, 128).unwrap());
        let first = TablePrefix::from_parts(layout, full.states()[..2].to_vec()).unwrap();
        assert_eq!(a.merge_prefix(&first), Ok(true));
        assert_eq!(a.covered(), 2);
        assert_eq!(a.merge_prefix(&full), Ok(true));
        assert_eq!(a.covered(), 5);
        drop(reg);
        assert!(set.get(&digest).is_none());
        assert!(set.is_empty());
    }
}
