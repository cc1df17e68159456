//! The content-addressed blob store: files on disk, metadata in RocksDB.
//!
//! Layout under the data directory:
//! - `blobs/sha256/<2 hex>/<64 hex>`: complete blobs, each verified against its digest before it
//!   was renamed into place, and never written again.
//! - `partial/<64 hex>.<n>`: blobs being written. Dropped on start-up: nothing in here is served
//!   after a restart, because nothing in here was verified.
//! - `meta/`: RocksDB, column families `blobs` (digest -> [`BlobMeta`]), `tables` (digest -> the
//!   blob's encoded [`MidstateTable`], for serving chunks to peers) and `tags`
//!   (registry, repository, tag -> [`TagMeta`]).
//!
//! Invariants:
//! - A file exists under `blobs/` only if its sha256 equals its name (fsync before rename).
//! - A blob with readers (a pin) is never evicted.
//! - Bytes of complete blobs never exceed the cap, except by blobs that are pinned or that
//!   alone exceed it.
//! - A blob's midstate table is computed in the same pass that verifies the blob (the table
//!   builder produces the digest), written in the same RocksDB batch as the blob's record, and
//!   deleted with it. A stored table always describes its blob's bytes: it is only ever derived
//!   from bytes that hashed to the digest.
//!
//! Non-goals: deduplicating partial downloads across restarts (they are dropped, not resumed).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, DB};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use shoal_protocol::chunk::{
    chunk_size_for, LayoutError, MidstateTable, TableBuilder, DEFAULT_CHUNK_SIZE,
};
use shoal_protocol::Digest;

const CF_BLOBS: &str = "blobs";
const CF_TABLES: &str = "tables";
const CF_TAGS: &str = "tags";
/// Private blobs: the registry key they were fetched from (peers are handed one only with a
/// grant that registry accepts).
const CF_ORIGINS: &str = "origins";

/// What the store keeps about a complete blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMeta {
    /// Size in bytes.
    pub size: u64,
    /// Media type, for manifests (served as `Content-Type`).
    pub media_type: Option<String>,
    /// Seconds since the epoch of the last time it was served.
    pub last_access: u64,
    /// True when the upstream served it only with credentials.
    pub private: bool,
}

/// What the store keeps about a tag: the last digest the upstream gave for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagMeta {
    /// The manifest digest.
    pub digest: [u8; 32],
    /// Seconds since the epoch when the upstream last confirmed it.
    pub resolved_at: u64,
}

/// Errors opening the store.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A directory could not be created or read.
    #[error("store directory {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// RocksDB refused to open.
    #[error("metadata database: {0}")]
    Db(#[from] rocksdb::Error),
    /// The chunk size for midstate tables is not a valid chunk size.
    #[error("chunk size: {0}")]
    ChunkSize(#[from] LayoutError),
}

/// Errors committing a written blob.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The bytes do not hash to the expected digest; they were discarded.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was asked for.
        expected: Digest,
        /// What arrived.
        actual: Digest,
    },
    /// Fewer or more bytes than announced; they were discarded.
    #[error("size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// What was announced.
        expected: u64,
        /// What arrived.
        actual: u64,
    },
    /// A checked blob's table is of another chunk size than the store cuts that blob in.
    #[error(
        "table of {chunk_size}-byte chunks where the store cuts this blob in {store}-byte chunks"
    )]
    TableMismatch {
        /// The table's chunk size.
        chunk_size: u32,
        /// The store's for a blob of that size.
        store: u32,
    },
    /// The disk failed.
    #[error("store i/o: {0}")]
    Io(#[from] io::Error),
    /// The metadata database failed.
    #[error("metadata database: {0}")]
    Db(#[from] rocksdb::Error),
}

/// A cheap handle to the store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    db: DB,
    cap: u64,
    next_partial: AtomicU64,
    /// Accounting and LRU order. A std mutex: held only for map updates, never across I/O
    /// waits or an `.await`.
    lru: Mutex<Lru>,
    evictions: AtomicU64,
    /// Called with each evicted digest (the swarm withdraws its announcement). A std mutex:
    /// set once, read on eviction; the callback must not block.
    on_evict: Mutex<Option<EvictHook>>,
    /// A fresh builder for the store's chunk size, cloned for every writer (its chunk size was
    /// validated at open, so cloning cannot fail where building could).
    table_builder: TableBuilder,
    /// The configured chunk size: the largest, see [`Store::chunk_size_for`].
    max_chunk_size: u32,
    /// Blobs still arriving, served to peers while they arrive.
    arriving: crate::arriving::ArrivingSet,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<Digest, Entry>,
    order: BTreeMap<u64, Digest>,
    tick: u64,
    total: u64,
}

struct Entry {
    size: u64,
    tick: u64,
    pins: u32,
}

impl Lru {
    fn touch(&mut self, d: &Digest) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(d) {
            self.order.remove(&e.tick);
            e.tick = tick;
            self.order.insert(tick, *d);
        }
    }

    fn insert(&mut self, d: Digest, size: u64) {
        if self.entries.contains_key(&d) {
            self.touch(&d);
            return;
        }
        self.tick += 1;
        self.entries.insert(
            d,
            Entry {
                size,
                tick: self.tick,
                pins: 0,
            },
        );
        self.order.insert(self.tick, d);
        self.total += size;
    }

    fn remove(&mut self, d: &Digest) -> Option<u64> {
        let e = self.entries.remove(d)?;
        self.order.remove(&e.tick);
        self.total -= e.size;
        Some(e.size)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Encoding plain structs into a Vec cannot fail.
    bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Option<T> {
    bincode::serde::decode_from_slice(b, bincode::config::standard())
        .ok()
        .map(|(v, _)| v)
}

fn tag_key(registry: &str, name: &str, tag: &str) -> Vec<u8> {
    format!("{registry}\n{name}\n{tag}").into_bytes()
}

/// What the store calls with each evicted digest.
pub type EvictHook = Box<dyn Fn(Digest) + Send + Sync>;

/// Keeps a blob from eviction while it is alive.
pub struct Pin {
    store: Store,
    digest: Digest,
}

impl Pin {
    /// The pinned blob.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut lru = self
            .store
            .inner
            .lru
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(e) = lru.entries.get_mut(&self.digest) {
            e.pins = e.pins.saturating_sub(1);
        }
    }
}

/// A complete blob opened for reading.
pub struct OpenBlob {
    /// The file, positioned anywhere: read it with positional reads.
    pub file: File,
    /// Its metadata.
    pub meta: BlobMeta,
    /// Keeps it from eviction until dropped.
    pub pin: Pin,
}

/// A blob being written. Dropped without [`BlobWriter::commit`], its bytes are discarded.
pub struct BlobWriter {
    file: File,
    path: PathBuf,
    /// Hashes the blob and records its midstate table in the same pass.
    builder: Option<TableBuilder>,
    written: u64,
    digest: Digest,
    committed: bool,
    /// Written with [`BlobWriter::write_at`]: hashed from the file at commit.
    out_of_order: bool,
}

impl BlobWriter {
    /// Appends bytes (blocking: a write into the page cache).
    pub fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf)?;
        if let Some(b) = self.builder.as_mut() {
            b.update(buf);
        }
        self.written += buf.len() as u64;
        Ok(())
    }

    /// Writes bytes at an offset, for blobs assembled from chunks in any order (blocking).
    /// The blob is then hashed from the file at [`BlobWriter::commit`]: nothing written here
    /// is trusted before that. Bytes written again (a chunk fetched anew after a table was
    /// cut back) count once: what is written is the file's extent.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.out_of_order = true;
        self.builder = None;
        self.file.write_all_at(buf, offset)?;
        self.written = self.written.max(offset.saturating_add(buf.len() as u64));
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// What is known of the blob's midstate table so far, for a blob of `size` bytes written in
    /// order with [`BlobWriter::write`]; `None` once written out of order, or if `size` and the
    /// chunk size the store gives it form no layout.
    pub fn prefix(&self, size: u64) -> Option<shoal_protocol::chunk::TablePrefix> {
        self.builder.as_ref()?.prefix(size).ok()
    }

    /// How many chunk boundaries of a blob of `size` bytes the in-order hash has passed (0 once
    /// written out of order).
    pub fn states_known(&self, size: u64) -> usize {
        self.builder.as_ref().map_or(0, |b| b.states_known(size))
    }

    /// A second handle on the partial file, for readers that stream it while it is written.
    pub fn reader(&self) -> io::Result<File> {
        File::open(&self.path)
    }

    /// Moves a blob assembled from chunks into the store with `table`, without hashing it again:
    /// for a caller that checked every chunk written against `table` (blocking: fsync). The
    /// proof is the chain: `table` is complete, its first chunk starts from SHA-256's initial
    /// state, each chunk leads from its start state to its end state, and the last one, padded,
    /// to the digest. A table of another chunk size than the store's, or a size other than the
    /// table's, is [`CommitError::TableMismatch`] / [`CommitError::SizeMismatch`].
    pub fn commit_checked(
        mut self,
        store: &Store,
        table: &MidstateTable,
        private: bool,
    ) -> Result<BlobMeta, CommitError> {
        let layout = table.layout();
        let expected = store.chunk_size_for(layout.blob_size());
        if layout.chunk_size() != expected {
            return Err(CommitError::TableMismatch {
                chunk_size: layout.chunk_size(),
                store: expected,
            });
        }
        if layout.blob_size() != self.written {
            return Err(CommitError::SizeMismatch {
                expected: layout.blob_size(),
                actual: self.written,
            });
        }
        self.builder = None;
        self.file.sync_all()?;
        let meta = BlobMeta {
            size: self.written,
            media_type: None,
            last_access: now_secs(),
            private,
        };
        store.install(&self.digest, &self.path, &meta, Some(table))?;
        self.committed = true;
        Ok(meta)
    }

    /// Verifies the digest and, if it matches, moves the blob into the store with its midstate
    /// table (blocking: fsync).
    pub fn commit(
        mut self,
        store: &Store,
        expected_size: Option<u64>,
        media_type: Option<String>,
        private: bool,
    ) -> Result<BlobMeta, CommitError> {
        let finished = self.builder.take().map(TableBuilder::finish);
        let (actual, table) = match finished {
            None if self.out_of_order => store.hash_with_table(&self.path)?,
            Some(Ok((table, digest))) => (Digest::from_bytes(digest), Some(table)),
            // More chunks than a table may hold (over 4 TiB at the default chunk size): the
            // builder cannot give the digest, so hash the file again, and keep no table.
            Some(Err(_)) | None => (hash_file(&self.path)?, None),
        };
        if let Some(expected) = expected_size {
            if expected != self.written {
                return Err(CommitError::SizeMismatch {
                    expected,
                    actual: self.written,
                });
            }
        }
        if actual != self.digest {
            return Err(CommitError::DigestMismatch {
                expected: self.digest,
                actual,
            });
        }
        self.file.sync_all()?;
        let meta = BlobMeta {
            size: self.written,
            media_type,
            last_access: now_secs(),
            private,
        };
        store.install(&self.digest, &self.path, &meta, table.as_ref())?;
        self.committed = true;
        Ok(meta)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store under `root`, recovering from any crash: partial
    /// blobs are dropped, records without files are removed, files without records are
    /// re-verified and indexed. Midstate tables use [`DEFAULT_CHUNK_SIZE`].
    pub fn open(root: &Path, cap: u64) -> Result<Store, OpenError> {
        Store::open_with_chunk_size(root, cap, DEFAULT_CHUNK_SIZE)
    }

    /// [`Store::open`] with midstate tables of at most `chunk_size` bytes per chunk (a multiple
    /// of 64 from 64 bytes to 64 MiB; [`Store::chunk_size_for`] gives each blob's). Tables
    /// stored under another chunk size by an earlier run are not served; [`Store::build_table`]
    /// replaces them on demand.
    pub fn open_with_chunk_size(
        root: &Path,
        cap: u64,
        chunk_size: u32,
    ) -> Result<Store, OpenError> {
        let table_builder = TableBuilder::new(chunk_size)?;
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OpenError::Io { path, source }
        };
        let blobs_dir = root.join("blobs").join("sha256");
        let partial = root.join("partial");
        fs::create_dir_all(&blobs_dir).map_err(io_err(&blobs_dir))?;
        // Nothing partial survives a restart: it was never verified.
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
        }
        fs::create_dir_all(&partial).map_err(io_err(&partial))?;

        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Metadata is small: keep RocksDB's own memory modest.
        opts.set_write_buffer_size(4 << 20);
        opts.set_max_write_buffer_number(2);
        opts.set_keep_log_file_num(2);
        let cfs = [CF_BLOBS, CF_TABLES, CF_TAGS, CF_ORIGINS]
            .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, root.join("meta"), cfs)?;

        let store = Store {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                db,
                cap,
                next_partial: AtomicU64::new(0),
                lru: Mutex::new(Lru::default()),
                evictions: AtomicU64::new(0),
                on_evict: Mutex::new(None),
                table_builder,
                max_chunk_size: chunk_size,
                arriving: crate::arriving::ArrivingSet::default(),
            }),
        };
        store.recover().map_err(io_err(root))?;
        Ok(store)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // Every column family is created by `open`.
        self.inner
            .db
            .cf_handle(name)
            .expect("column family created at open")
    }

    fn recover(&self) -> io::Result<()> {
        let mut known: Vec<(u64, Digest, u64)> = Vec::new();
        let mut stale = Vec::new();
        for item in self
            .inner
            .db
            .iterator_cf(self.cf(CF_BLOBS), IteratorMode::Start)
        {
            let (k, v) = item.map_err(io::Error::other)?;
            let digest = <[u8; 32]>::try_from(&k[..]).ok().map(Digest::from_bytes);
            let meta: Option<BlobMeta> = decode(&v);
            match (digest, meta) {
                (Some(d), Some(m)) => match fs::metadata(self.blob_path(&d)) {
                    Ok(md) if md.len() == m.size => known.push((m.last_access, d, m.size)),
                    _ => stale.push(k.to_vec()),
                },
                _ => stale.push(k.to_vec()),
            }
        }
        for k in stale {
            let mut batch = WriteBatch::default();
            batch.delete_cf(self.cf(CF_BLOBS), &k);
            batch.delete_cf(self.cf(CF_TABLES), &k);
            batch.delete_cf(self.cf(CF_ORIGINS), &k);
            self.inner.db.write(batch).map_err(io::Error::other)?;
        }
        let indexed: std::collections::HashSet<Digest> = known.iter().map(|(_, d, _)| *d).collect();
        // Files without a record: a crash between the rename and the metadata write. The rename
        // came after verification, but re-verify anyway: it is rare and cheap next to serving
        // a wrong byte.
        let blobs_dir = self.inner.root.join("blobs").join("sha256");
        for shard in fs::read_dir(&blobs_dir)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(shard.path())? {
                let f = f?;
                let name = f.file_name();
                let parsed = name
                    .to_str()
                    .and_then(|n| Digest::parse(&format!("sha256:{n}")).ok());
                let hashed = match parsed {
                    Some(d) if indexed.contains(&d) => continue,
                    Some(d) => Some((d, self.hash_with_table(&f.path())?)),
                    None => None,
                };
                match hashed {
                    Some((d, (actual, table))) if actual == d => {
                        let size = f.metadata()?.len();
                        let meta = BlobMeta {
                            size,
                            media_type: None,
                            last_access: now_secs(),
                            // Whether it was private died with its record: assume it was, so
                            // clients must show access upstream and peers are never sent it.
                            private: true,
                        };
                        self.write_records(&d, &meta, table.as_ref())
                            .map_err(io::Error::other)?;
                        known.push((meta.last_access, d, size));
                    }
                    _ => fs::remove_file(f.path())?,
                }
            }
        }
        // Tables and origins whose blob record is gone (deletes share a batch, but an origin is
        // written just after its blob's commit, and records written by a newer or buggy run
        // might linger).
        let live: std::collections::HashSet<Digest> = known.iter().map(|(_, d, _)| *d).collect();
        for cf in [CF_TABLES, CF_ORIGINS] {
            let mut orphans = Vec::new();
            for item in self.inner.db.iterator_cf(self.cf(cf), IteratorMode::Start) {
                let (k, _) = item.map_err(io::Error::other)?;
                let digest = <[u8; 32]>::try_from(&k[..]).ok().map(Digest::from_bytes);
                if !digest.is_some_and(|d| live.contains(&d)) {
                    orphans.push(k);
                }
            }
            for k in orphans {
                self.inner
                    .db
                    .delete_cf(self.cf(cf), k)
                    .map_err(io::Error::other)?;
            }
        }
        known.sort();
        let mut lru = self.lock();
        for (_, d, size) in known {
            lru.insert(d, size);
        }
        drop(lru);
        self.evict()?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.inner.lru.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.inner
            .root
            .join("blobs")
            .join("sha256")
            .join(&hex[..2])
            .join(hex)
    }

    /// Metadata of a complete blob, if present.
    pub fn meta(&self, d: &Digest) -> Option<BlobMeta> {
        if !self.lock().entries.contains_key(d) {
            return None;
        }
        let v = self
            .inner
            .db
            .get_cf(self.cf(CF_BLOBS), d.as_bytes())
            .ok()??;
        decode(&v)
    }

    /// Whether a complete blob is present.
    pub fn contains(&self, d: &Digest) -> bool {
        self.lock().entries.contains_key(d)
    }

    /// Opens a complete blob for reading, pinning it and marking it recently used.
    pub fn open_blob(&self, d: &Digest) -> Option<OpenBlob> {
        {
            let mut lru = self.lock();
            let e = lru.entries.get_mut(d)?;
            e.pins += 1;
            lru.touch(d);
        }
        let pin = Pin {
            store: self.clone(),
            digest: *d,
        };
        let meta = self.meta_unchecked(d)?;
        let file = File::open(self.blob_path(d)).ok()?;
        let mut updated = meta.clone();
        updated.last_access = now_secs();
        if updated.last_access > meta.last_access + 60 {
            // Access times are persisted coarsely: they only order eviction after a restart.
            let _ = self
                .inner
                .db
                .put_cf(self.cf(CF_BLOBS), d.as_bytes(), encode(&updated));
        }
        Some(OpenBlob { file, meta, pin })
    }

    fn meta_unchecked(&self, d: &Digest) -> Option<BlobMeta> {
        let v = self
            .inner
            .db
            .get_cf(self.cf(CF_BLOBS), d.as_bytes())
            .ok()??;
        decode(&v)
    }

    /// Reads a whole small blob (a manifest) into memory.
    pub fn read_small(&self, d: &Digest, limit: usize) -> Option<(Vec<u8>, BlobMeta)> {
        let mut blob = self.open_blob(d)?;
        if blob.meta.size > limit as u64 {
            return None;
        }
        let mut buf = Vec::with_capacity(blob.meta.size as usize);
        blob.file.read_to_end(&mut buf).ok()?;
        Some((buf, blob.meta))
    }

    /// Starts writing a blob expected to hash to `digest`.
    /// The blobs arriving on this node (see [`crate::arriving`]).
    pub fn arriving(&self) -> &crate::arriving::ArrivingSet {
        &self.inner.arriving
    }

    pub fn writer(&self, digest: &Digest) -> io::Result<BlobWriter> {
        let n = self.inner.next_partial.fetch_add(1, Ordering::Relaxed);
        let path = self
            .inner
            .root
            .join("partial")
            .join(format!("{}.{n}", digest.hex()));
        let file = fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)?;
        Ok(BlobWriter {
            file,
            path,
            builder: Some(self.inner.table_builder.clone()),
            written: 0,
            digest: *digest,
            committed: false,
            out_of_order: false,
        })
    }

    /// Stores a small blob (a manifest) held in memory, after verifying it.
    pub fn put_small(
        &self,
        digest: &Digest,
        data: &[u8],
        media_type: Option<String>,
        private: bool,
    ) -> Result<BlobMeta, CommitError> {
        let mut w = self.writer(digest)?;
        w.write(data)?;
        w.commit(self, Some(data.len() as u64), media_type, private)
    }

    fn install(
        &self,
        d: &Digest,
        from: &Path,
        meta: &BlobMeta,
        table: Option<&MidstateTable>,
    ) -> Result<(), CommitError> {
        let to = self.blob_path(d);
        let dir = to.parent().expect("blob path has a parent");
        fs::create_dir_all(dir)?;
        fs::rename(from, &to)?;
        File::open(dir)?.sync_all()?;
        self.write_records(d, meta, table)?;
        self.lock().insert(*d, meta.size);
        self.evict()?;
        Ok(())
    }

    /// Writes a blob's record and its table (or removes a stale table) in one batch.
    fn write_records(
        &self,
        d: &Digest,
        meta: &BlobMeta,
        table: Option<&MidstateTable>,
    ) -> Result<(), rocksdb::Error> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_BLOBS), d.as_bytes(), encode(meta));
        match table {
            Some(t) => batch.put_cf(self.cf(CF_TABLES), d.as_bytes(), t.encode()),
            None => batch.delete_cf(self.cf(CF_TABLES), d.as_bytes()),
        }
        self.inner.db.write(batch)
    }

    /// One pass over a file: its digest and, unless it has too many chunks, its midstate table
    /// at the store's chunk size (blocking).
    fn hash_with_table(&self, path: &Path) -> io::Result<(Digest, Option<MidstateTable>)> {
        let mut f = File::open(path)?;
        let mut builder = self.inner.table_builder.clone();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            builder.update(&buf[..n]);
        }
        match builder.finish() {
            Ok((table, digest)) => Ok((Digest::from_bytes(digest), Some(table))),
            Err(_) => Ok((hash_file(path)?, None)),
        }
    }

    /// The configured chunk size: the chunk size of big blobs, the most any blob gets.
    pub fn max_chunk_size(&self) -> u32 {
        self.inner.max_chunk_size
    }

    /// The chunk size of the midstate tables this store builds for a blob of `blob_size` bytes
    /// ([`shoal_protocol::chunk::chunk_size_for`] of it and the configured size).
    pub fn chunk_size_for(&self, blob_size: u64) -> u32 {
        chunk_size_for(blob_size, self.inner.max_chunk_size)
    }

    /// Records the registry a private blob comes from (see [`Store::origin`]); written before
    /// the blob's commit, so that a committed private blob is never without it. A record left
    /// by a failed commit is dropped at the next start.
    pub fn set_origin(&self, d: &Digest, registry: &str) -> Result<(), rocksdb::Error> {
        self.inner
            .db
            .put_cf(self.cf(CF_ORIGINS), d.as_bytes(), registry.as_bytes())
    }

    /// The registry key a stored private blob was fetched from; `None` when unknown (a peer is
    /// then never handed the blob).
    pub fn origin(&self, d: &Digest) -> Option<String> {
        let v = self
            .inner
            .db
            .get_cf(self.cf(CF_ORIGINS), d.as_bytes())
            .ok()??;
        String::from_utf8(v).ok()
    }

    /// The stored midstate table of a complete blob at the store's chunk size, if any.
    ///
    /// `None` when the blob is absent, or when it has no table at this chunk size (stored by a
    /// run with another chunk size or before tables existed, or a blob of too many chunks): see
    /// [`Store::build_table`].
    pub fn table(&self, d: &Digest) -> Option<MidstateTable> {
        let size = self.lock().entries.get(d)?.size;
        let v = self
            .inner
            .db
            .get_cf(self.cf(CF_TABLES), d.as_bytes())
            .ok()??;
        let table = MidstateTable::decode(&v).ok()?;
        let layout = table.layout();
        (layout.blob_size() == size && layout.chunk_size() == self.chunk_size_for(size))
            .then_some(table)
    }

    /// The blob's table, computed from its file and stored if it was missing (blocking: one
    /// SHA-256 pass over the blob). `Ok(None)` when the blob is absent or has too many chunks.
    ///
    /// The file is re-verified in the same pass: if it no longer hashes to its digest (the disk
    /// went bad), the blob is dropped from the store and an error is returned.
    pub fn build_table(&self, d: &Digest) -> io::Result<Option<MidstateTable>> {
        if let Some(t) = self.table(d) {
            return Ok(Some(t));
        }
        let Some(blob) = self.open_blob(d) else {
            return Ok(None);
        };
        let (actual, table) = self.hash_with_table(&self.blob_path(d))?;
        if actual != *d {
            drop(blob);
            self.remove_corrupt(d)?;
            return Err(io::Error::other(format!(
                "stored blob {d} no longer matches its digest; dropped"
            )));
        }
        if let Some(t) = &table {
            self.inner
                .db
                .put_cf(self.cf(CF_TABLES), d.as_bytes(), t.encode())
                .map_err(io::Error::other)?;
        }
        drop(blob);
        Ok(table)
    }

    /// Drops a blob whose file no longer matches its digest.
    fn remove_corrupt(&self, d: &Digest) -> io::Result<()> {
        if self.lock().remove(d).is_none() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_BLOBS), d.as_bytes());
        batch.delete_cf(self.cf(CF_TABLES), d.as_bytes());
        batch.delete_cf(self.cf(CF_ORIGINS), d.as_bytes());
        self.inner.db.write(batch).map_err(io::Error::other)?;
        tracing::error!(digest = %d, "stored blob is corrupt on disk; dropped");
        match fs::remove_file(self.blob_path(d)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Evicts least recently used, unpinned blobs until the total fits the cap.
    fn evict(&self) -> io::Result<()> {
        loop {
            let victim = {
                let mut lru = self.lock();
                if lru.total <= self.inner.cap {
                    return Ok(());
                }
                let victim = lru
                    .order
                    .values()
                    .find(|d| lru.entries.get(d).is_some_and(|e| e.pins == 0))
                    .copied();
                match victim {
                    Some(d) => {
                        lru.remove(&d);
                        d
                    }
                    None => return Ok(()),
                }
            };
            let mut batch = WriteBatch::default();
            batch.delete_cf(self.cf(CF_BLOBS), victim.as_bytes());
            batch.delete_cf(self.cf(CF_TABLES), victim.as_bytes());
            batch.delete_cf(self.cf(CF_ORIGINS), victim.as_bytes());
            self.inner.db.write(batch).map_err(io::Error::other)?;
            match fs::remove_file(self.blob_path(&victim)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.inner.evictions.fetch_add(1, Ordering::Relaxed);
            if let Some(hook) = self
                .inner
                .on_evict
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                hook(victim);
            }
            tracing::info!(digest = %victim, "evicted");
        }
    }

    /// Sets the function called with each evicted digest.
    pub fn set_on_evict(&self, hook: EvictHook) {
        *self
            .inner
            .on_evict
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Digests of the complete blobs a peer may be handed (what a node announces): public ones,
    /// and private ones whose registry is known (handed only with a grant it accepts).
    pub fn shareable_digests(&self) -> Vec<Digest> {
        let all: Vec<Digest> = self.lock().entries.keys().copied().collect();
        all.into_iter()
            .filter(|d| {
                self.meta_unchecked(d)
                    .is_some_and(|m| !m.private || self.origin(d).is_some())
            })
            .collect()
    }

    /// Bytes of complete blobs held.
    pub fn total_bytes(&self) -> u64 {
        self.lock().total
    }

    /// Number of complete blobs held.
    pub fn blob_count(&self) -> usize {
        self.lock().entries.len()
    }

    /// Blobs evicted since start.
    pub fn evictions(&self) -> u64 {
        self.inner.evictions.load(Ordering::Relaxed)
    }

    /// The last known digest of a tag, and when the upstream last confirmed it.
    pub fn tag(&self, registry: &str, name: &str, tag: &str) -> Option<(Digest, u64)> {
        let v = self
            .inner
            .db
            .get_cf(self.cf(CF_TAGS), tag_key(registry, name, tag))
            .ok()??;
        let m: TagMeta = decode(&v)?;
        Some((Digest::from_bytes(m.digest), m.resolved_at))
    }

    /// Records what the upstream said a tag points at.
    pub fn set_tag(
        &self,
        registry: &str,
        name: &str,
        tag: &str,
        digest: &Digest,
    ) -> Result<(), rocksdb::Error> {
        let m = TagMeta {
            digest: *digest.as_bytes(),
            resolved_at: now_secs(),
        };
        self.inner
            .db
            .put_cf(self.cf(CF_TAGS), tag_key(registry, name, tag), encode(&m))
    }

    /// Forgets a tag (the upstream says it no longer exists).
    pub fn remove_tag(&self, registry: &str, name: &str, tag: &str) -> Result<(), rocksdb::Error> {
        self.inner
            .db
            .delete_cf(self.cf(CF_TAGS), tag_key(registry, name, tag))
    }
}

fn hash_file(path: &Path) -> io::Result<Digest> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Digest::from_bytes(h.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(s: &Store, data: &[u8]) -> Digest {
        let d = Digest::of(data);
        s.put_small(&d, data, None, false).unwrap();
        d
    }

    #[test]
    fn put_get_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 30).unwrap();
        let d = put(&s, b"hello");
        assert_eq!(s.read_small(&d, 100).unwrap().0, b"hello");
        drop(s);
        let s = Store::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.read_small(&d, 100).unwrap().0, b"hello");
        assert_eq!(s.total_bytes(), 5);
    }

    #[test]
    fn mismatch_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 30).unwrap();
        let d = Digest::of(b"right");
        let err = s.put_small(&d, b"wrong", None, false).unwrap_err();
        assert!(matches!(err, CommitError::DigestMismatch { .. }));
        assert!(!s.contains(&d));
        assert_eq!(fs::read_dir(dir.path().join("partial")).unwrap().count(), 0);
    }

    #[test]
    fn lru_eviction_spares_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 10).unwrap();
        let a = put(&s, b"aaaa");
        let b = put(&s, b"bbbb");
        let pinned = s.open_blob(&a).unwrap(); // a is pinned and now most recent
        let c = put(&s, b"cccc");
        assert!(s.contains(&a), "pinned blob evicted");
        assert!(!s.contains(&b), "LRU blob kept");
        assert!(s.contains(&c));
        assert_eq!(s.evictions(), 1);
        drop(pinned);
        let d = put(&s, b"dddd");
        assert!(!s.contains(&a) && s.contains(&c) && s.contains(&d));
        assert!(s.total_bytes() <= 10);
    }

    #[test]
    fn recovery_drops_partials_and_reindexes_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 30).unwrap();
        let d = put(&s, b"orphan");
        let mut w = s.writer(&Digest::of(b"partial data")).unwrap();
        w.write(b"partial").unwrap();
        std::mem::forget(w); // as if killed mid-write
                             // A record without its file, and a file under a wrong name.
        let gone = put(&s, b"gone");
        fs::remove_file(s.blob_path(&gone)).unwrap();
        let liar = Digest::of(b"liar");
        let liar_path = s.blob_path(&liar);
        fs::create_dir_all(liar_path.parent().unwrap()).unwrap();
        fs::write(&liar_path, b"not liar").unwrap();
        s.inner.db.delete_cf(s.cf(CF_BLOBS), d.as_bytes()).unwrap();
        drop(s);
        let s = Store::open(dir.path(), 1 << 30).unwrap();
        assert!(s.contains(&d), "verified orphan not re-indexed");
        assert!(!s.contains(&gone));
        assert!(
            !s.contains(&liar) && !liar_path.exists(),
            "unverified file kept"
        );
        assert_eq!(fs::read_dir(dir.path().join("partial")).unwrap().count(), 0);
    }

    fn raw_table(s: &Store, d: &Digest) -> Option<Vec<u8>> {
        s.inner
            .db
            .get_cf(s.cf(CF_TABLES), d.as_bytes())
            .unwrap()
            .map(|v| v.to_vec())
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn tables_are_built_on_commit_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_with_chunk_size(dir.path(), 1 << 30, 128).unwrap();
        assert_eq!(s.max_chunk_size(), 128);
        let blob = data(1000);
        let d = Digest::of(&blob);
        // Written in odd pieces, as the mirror does.
        let mut w = s.writer(&d).unwrap();
        for piece in blob.chunks(100) {
            w.write(piece).unwrap();
        }
        w.commit(&s, Some(1000), None, false).unwrap();
        let expected = MidstateTable::compute(&blob, 128).unwrap();
        assert_eq!(s.table(&d).unwrap(), expected);
        expected.verify_full(d.as_bytes(), &blob).unwrap();
        // Single- and zero-chunk blobs have (empty) tables too.
        let small = put(&s, b"tiny");
        assert_eq!(s.table(&small).unwrap().states().len(), 0);
        let empty = put(&s, b"");
        assert_eq!(s.table(&empty).unwrap().layout().count(), 0);
        drop(s);
        let s = Store::open_with_chunk_size(dir.path(), 1 << 30, 128).unwrap();
        assert_eq!(s.table(&d).unwrap(), expected);
        assert!(s.table(&Digest::of(b"absent")).is_none());
    }

    #[test]
    fn a_checked_blob_is_stored_with_its_table_without_hashing_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_with_chunk_size(dir.path(), 1 << 30, 128).unwrap();
        let blob = data(1000);
        let d = Digest::of(&blob);
        let table = MidstateTable::compute(&blob, 128).unwrap();
        // Chunks in any order, as the swarm writes them.
        let mut w = s.writer(&d).unwrap();
        for i in (0..table.layout().count()).rev() {
            let (start, len) = table.layout().range(i).unwrap();
            w.write_at(start, &blob[start as usize..start as usize + len as usize])
                .unwrap();
        }
        w.commit_checked(&s, &table, true).unwrap();
        assert_eq!(s.table(&d).unwrap(), table);
        let b = s.open_blob(&d).unwrap();
        assert!(b.meta.private);
        assert_eq!(b.meta.size, 1000);
        // Nothing is hashed: what the caller vouches for is stored as is (the caller's checks
        // are the proof; `swarm::check_on_disk` covers the chunks it did not check).
        let other = Digest::of(b"other");
        let mut w = s.writer(&other).unwrap();
        w.write_at(0, &blob).unwrap();
        w.commit_checked(&s, &table, false).unwrap();
        assert!(s.contains(&other));
        // A table of another chunk size, or of another blob size, is refused.
        let d3 = Digest::of(b"third");
        let mut w = s.writer(&d3).unwrap();
        w.write_at(0, &blob).unwrap();
        let wide = MidstateTable::compute(&blob, 256).unwrap();
        assert!(matches!(
            w.commit_checked(&s, &wide, false),
            Err(CommitError::TableMismatch {
                chunk_size: 256,
                store: 128
            })
        ));
        let mut w = s.writer(&d3).unwrap();
        w.write_at(0, &blob[..900]).unwrap();
        assert!(matches!(
            w.commit_checked(&s, &table, false),
            Err(CommitError::SizeMismatch {
                expected: 1000,
                actual: 900
            })
        ));
        assert!(!s.contains(&d3));
        assert_eq!(fs::read_dir(dir.path().join("partial")).unwrap().count(), 0);
    }

    #[test]
    fn the_default_chunk_size_and_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.max_chunk_size(), DEFAULT_CHUNK_SIZE);
        drop(s);
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Store::open_with_chunk_size(dir.path(), 1 << 30, 100),
            Err(OpenError::ChunkSize(_))
        ));
    }

    #[test]
    fn eviction_drops_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_with_chunk_size(dir.path(), 300, 64).unwrap();
        let a = put(&s, &data(200));
        assert!(raw_table(&s, &a).is_some());
        let b = put(&s, &data(201));
        assert!(!s.contains(&a));
        assert!(s.table(&a).is_none() && raw_table(&s, &a).is_none());
        assert!(s.table(&b).is_some());
    }

    #[test]
    fn recovery_rebuilds_tables_of_orphans_and_drops_stray_tables() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_with_chunk_size(dir.path(), 1 << 30, 64).unwrap();
        let blob = data(777);
        let d = put(&s, &blob);
        let gone = put(&s, &data(300));
        // A crash after the rename, before the records: a file without records.
        s.inner.db.delete_cf(s.cf(CF_BLOBS), d.as_bytes()).unwrap();
        s.inner.db.delete_cf(s.cf(CF_TABLES), d.as_bytes()).unwrap();
        // A table without a blob record.
        s.inner
            .db
            .delete_cf(s.cf(CF_BLOBS), gone.as_bytes())
            .unwrap();
        fs::remove_file(s.blob_path(&gone)).unwrap();
        drop(s);
        let s = Store::open_with_chunk_size(dir.path(), 1 << 30, 64).unwrap();
        assert_eq!(
            s.table(&d).unwrap(),
            MidstateTable::compute(&blob, 64).unwrap()
        );
        assert!(raw_table(&s, &gone).is_none());
    }

    #[test]
    fn missing_or_other_size_tables_are_built_on_demand() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_with_chunk_size(dir.path(), 1 << 30, 64).unwrap();
        let blob = data(1000);
        let d = put(&s, &blob);
        // As if stored before tables existed.
        s.inner.db.delete_cf(s.cf(CF_TABLES), d.as_bytes()).unwrap();
        assert!(s.table(&d).is_none());
        let built = s.build_table(&d).unwrap().unwrap();
        assert_eq!(built, MidstateTable::compute(&blob, 64).unwrap());
        assert_eq!(s.table(&d).unwrap(), built);
        drop(s);
        // Another chunk size: the old table is not served, a new one replaces it.
        let s = Store::open_with_chunk_size(dir.path(), 1 << 30, 256).unwrap();
        assert!(s.table(&d).is_none());
        let built = s.build_table(&d).unwrap().unwrap();
        assert_eq!(built.layout().chunk_size(), 256);
        assert_eq!(s.table(&d).unwrap(), built);
        assert!(s.build_table(&Digest::of(b"absent")).unwrap().is_none());
    }

    #[test]
    fn a_small_blob_gets_chunks_small_enough_for_32() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 30).unwrap();
        // 16 MiB at 4 MiB at most: 32 chunks of 512 KiB.
        let blob = data(16 << 20);
        let d = put(&s, &blob);
        assert_eq!(s.chunk_size_for(blob.len() as u64), 512 << 10);
        let table = s.table(&d).unwrap();
        assert_eq!(table, MidstateTable::compute(&blob, 512 << 10).unwrap());
        // Written in order, the prefix is cut the same way from the first bytes on.
        let d2 = Digest::of(b"again");
        let mut w = s.writer(&d2).unwrap();
        w.write(&blob[..3 << 20]).unwrap();
        assert_eq!(w.states_known(blob.len() as u64), 6);
        let prefix = w.prefix(blob.len() as u64).unwrap();
        assert_eq!(prefix.states(), &table.states()[..6]);
        // Assembled from chunks, only the rule's chunk size is accepted.
        let mut w = s.writer(&d).unwrap();
        w.write_at(0, &blob).unwrap();
        let default = MidstateTable::compute(&blob, DEFAULT_CHUNK_SIZE).unwrap();
        assert!(matches!(
            w.commit_checked(&s, &default, false),
            Err(CommitError::TableMismatch {
                chunk_size: DEFAULT_CHUNK_SIZE,
                store: 524_288
            })
        ));
    }

    #[test]
    fn building_a_table_drops_a_blob_that_went_bad_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_with_chunk_size(dir.path(), 1 << 30, 64).unwrap();
        let d = put(&s, &data(500));
        s.inner.db.delete_cf(s.cf(CF_TABLES), d.as_bytes()).unwrap();
        fs::write(s.blob_path(&d), data(499)).unwrap();
        assert!(s.build_table(&d).is_err());
        assert!(!s.contains(&d) && !s.blob_path(&d).exists());
        assert_eq!(s.total_bytes(), 0);
    }

    #[test]
    fn tags_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 30).unwrap();
        let d = Digest::of(b"m");
        s.set_tag("docker.io", "library/alpine", "latest", &d)
            .unwrap();
        assert_eq!(s.tag("docker.io", "library/alpine", "latest").unwrap().0, d);
        assert!(s.tag("docker.io", "library/alpine", "edge").is_none());
        s.remove_tag("docker.io", "library/alpine", "latest")
            .unwrap();
        assert!(s.tag("docker.io", "library/alpine", "latest").is_none());
    }
}
