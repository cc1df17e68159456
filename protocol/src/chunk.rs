//! Digest-rooted chunk verification with SHA-256 midstates.
//!
//! Goal: a receiver that knows only a blob's OCI digest (and size, from the descriptor) can check
//! each chunk of the blob the moment it arrives from an untrusted peer, with no CRC and no trusted
//! tracker. Non-goal: any I/O, and any choice of which peer to ask next (the daemon decides that).
//!
//! # How it works
//!
//! SHA-256 runs its compression function over 64-byte blocks in a chain; the 32-byte chaining
//! value after a block is the *midstate*. A blob is cut into chunks of [`ChunkLayout::chunk_size`]
//! bytes (a multiple of 64, so chunk boundaries are block boundaries); only the last chunk may be
//! shorter. A [`MidstateTable`] holds the midstate after every chunk but the last, serialized as
//! eight big-endian words (the same serialization as a digest). Chunk `i` checks as:
//!
//! * start from the SHA-256 IV for `i == 0`, else from `states[i - 1]`;
//! * compress the chunk's blocks;
//! * for any chunk but the last, the result must equal `states[i]`;
//! * for the last chunk, append SHA-256 padding for the *whole blob's* length (0x80, zeros, the
//!   64-bit big-endian bit length) and compress that too: the result must equal the blob digest.
//!
//! The empty blob has no chunks and an empty table: its digest must be [`EMPTY_SHA256`].
//!
//! # What a table proves, and what it does not
//!
//! A table comes from a peer and is not authenticated by itself: a midstate is the output of a
//! one-way compression, so without the chunks nothing relates a midstate to the digest. What a
//! receiver can check cheaply, without the data, is [`MidstateTable::verify_against_digest`]: the
//! table's layout describes a blob of the expected size, its entry count matches that layout, and
//! an empty blob's digest is the digest of nothing. Everything else is checked chunk by chunk:
//!
//! * a chunk that chains `states[i - 1] -> states[i]` is *consistent with the table*;
//! * the last chunk that chains `states[n - 2] -> digest` is genuine, and so is `states[n - 2]`
//!   (forging either means finding a SHA-256 (free-start) preimage);
//! * hence a chunk is *final* (proven genuine) once it and every chunk after it have checked:
//!   anchoring runs backwards from the digest. [`ChunkVerifier`] tracks this.
//! * once every chunk has checked, the concatenation hashes to the digest: exactly what plain
//!   SHA-256 verification of the whole blob would have established.
//!
//! A lying table is caught the moment one of its forged entries meets a genuine chunk, and at the
//! latest at the last chunk: a forged `states[j]` can only be matched by forged chunks `j` and
//! `j + 1`, and so on up to the last chunk, which must hit the digest.
//!
//! When a chunk and the table disagree ([`ChunkError::Mismatch`]), the receiver **cannot tell
//! which of the two is wrong**. It must not blame the peer that sent the chunk before it has
//! fetched the table again from another provider and re-checked; chunks that were only consistent
//! with a discredited table must be checked again. Only when both ends of a chunk are trusted (the
//! IV, the digest, or a midstate already anchored to the digest) is a failure the chunk's fault,
//! reported as [`ChunkError::Corrupt`].
//!
//! # Wire format of a table (version 1)
//!
//! ```text
//! u8      version (1)
//! u64 BE  blob_size
//! u32 BE  chunk_size
//! [u8;32] states, exactly max(chunk_count - 1, 0) of them
//! ```
//!
//! Nothing may follow the last state; a layout with more than [`MAX_CHUNKS`] chunks is refused, so
//! an encoded table never exceeds [`MAX_ENCODED_TABLE_LEN`] bytes. The encoding is canonical:
//! `encode(decode(b)) == b` for every accepted `b`.

use core::ops::Range;

mod prefix;
pub use prefix::{fuzz_decode_prefix, TablePrefix, PREFIX_VERSION};

use sha2::compress256;
use sha2::digest::block_buffer::{BlockBuffer, Eager};
use sha2::digest::consts::U64;

/// A block buffer that hands the compression function whole blocks straight from the input,
/// without copying them.
type Blocks = BlockBuffer<U64, Eager>;

/// The SHA-256 block size: chunk sizes are multiples of it.
pub const BLOCK_SIZE: u32 = 64;
/// The smallest chunk size: one block.
pub const MIN_CHUNK_SIZE: u32 = BLOCK_SIZE;
/// The largest chunk size.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// The chunk size Shoal uses unless told otherwise: the size of every chunk of a blob of at
/// least [`MIN_CHUNKS_PER_BLOB`] times it (see [`chunk_size_for`]).
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// A blob is cut into at least this many chunks where [`chunk_size_for`] can make them small
/// enough: a chunk is relayed only once verified whole, so each hop of a fresh chunk through
/// the swarm costs one chunk's transfer time, and a blob of few chunks spreads no faster than
/// hop by hop.
pub const MIN_CHUNKS_PER_BLOB: u64 = 32;
/// The smallest chunk size [`chunk_size_for`] halves down to (below it, a request's fixed cost
/// and the table's 32 bytes a chunk start to count).
pub const MIN_ADAPTIVE_CHUNK_SIZE: u32 = 256 << 10;
/// The most entries a table may hold.
pub const MAX_TABLE_ENTRIES: u32 = 1 << 20;
/// The most chunks a layout may have: one more than there are table entries.
pub const MAX_CHUNKS: u32 = MAX_TABLE_ENTRIES + 1;
/// The table encoding's version byte.
pub const TABLE_VERSION: u8 = 1;
/// The length of an encoded table's header: version, blob size, chunk size.
pub const TABLE_HEADER_LEN: usize = 1 + 8 + 4;
/// The longest encoded table [`MidstateTable::decode`] accepts.
pub const MAX_ENCODED_TABLE_LEN: usize = TABLE_HEADER_LEN + 32 * MAX_TABLE_ENTRIES as usize;
/// The SHA-256 digest of the empty blob.
pub const EMPTY_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// The SHA-256 initial chaining value (FIPS 180-4, 5.3.3).
const IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// Serializes a chaining value as eight big-endian words, as SHA-256 serializes its output.
fn state_to_bytes(state: &[u32; 8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (dst, word) in out.chunks_exact_mut(4).zip(state) {
        dst.copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// The inverse of [`state_to_bytes`].
fn state_from_bytes(bytes: &[u8; 32]) -> [u32; 8] {
    let mut out = [0u32; 8];
    for (word, src) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *word = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
    }
    out
}

/// Runs the compression function over `data`, whose length must be a multiple of 64.
fn compress_aligned(state: &mut [u32; 8], data: &[u8]) {
    debug_assert_eq!(data.len() % BLOCK_SIZE as usize, 0);
    let mut blocks = Blocks::default();
    blocks.digest_blocks(data, |b| compress256(state, b));
}

/// The chunk size of a blob of `blob_size` bytes for a node configured with chunks of at most
/// `max_chunk` bytes: `max_chunk`, halved while the blob would have fewer than
/// [`MIN_CHUNKS_PER_BLOB`] chunks, the half is still a multiple of 64 and at least
/// [`MIN_ADAPTIVE_CHUNK_SIZE`]. A 1 GiB layer keeps 4 MiB chunks; a 32 MiB layer gets 32 of
/// 1 MiB; a small blob gets 256 KiB chunks (a `max_chunk` below 512 KiB is never halved).
///
/// Every node computes the same size from the same two numbers, so the nodes of a cluster (which
/// share the chunk-size setting) agree on every blob's layout without telling each other.
/// Monotone: a bigger blob never gets smaller chunks. A `max_chunk` that is no valid chunk size
/// comes back unchanged (and [`ChunkLayout::new`] refuses it).
pub const fn chunk_size_for(blob_size: u64, max_chunk: u32) -> u32 {
    let mut chunk = max_chunk;
    while blob_size.div_ceil(chunk as u64) < MIN_CHUNKS_PER_BLOB
        && chunk.is_multiple_of(2 * BLOCK_SIZE)
        && chunk / 2 >= MIN_ADAPTIVE_CHUNK_SIZE
    {
        chunk /= 2;
    }
    chunk
}

/// Why a chunk layout is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The chunk size is not a multiple of 64 within `MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE`.
    #[error("chunk size {chunk_size} is not a multiple of 64 between 64 and 64 MiB")]
    BadChunkSize {
        /// The refused chunk size.
        chunk_size: u32,
    },
    /// The blob would have more than [`MAX_CHUNKS`] chunks of this size.
    #[error("a blob of {blob_size} bytes in chunks of {chunk_size} bytes has too many chunks")]
    TooManyChunks {
        /// The blob's size.
        blob_size: u64,
        /// The chunk size.
        chunk_size: u32,
    },
}

/// How a blob of a given size is cut into chunks: every chunk holds `chunk_size` bytes except the
/// last, which holds the rest (1 to `chunk_size` bytes). The empty blob has no chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkLayout {
    blob_size: u64,
    chunk_size: u32,
}

impl ChunkLayout {
    /// A layout, if `chunk_size` is a multiple of 64 in `64..=64 MiB` and the blob has at most
    /// [`MAX_CHUNKS`] chunks.
    pub fn new(blob_size: u64, chunk_size: u32) -> Result<ChunkLayout, LayoutError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
            || !chunk_size.is_multiple_of(BLOCK_SIZE)
        {
            return Err(LayoutError::BadChunkSize { chunk_size });
        }
        if blob_size.div_ceil(u64::from(chunk_size)) > u64::from(MAX_CHUNKS) {
            return Err(LayoutError::TooManyChunks {
                blob_size,
                chunk_size,
            });
        }
        Ok(ChunkLayout {
            blob_size,
            chunk_size,
        })
    }

    /// The blob's size in bytes.
    pub const fn blob_size(&self) -> u64 {
        self.blob_size
    }

    /// The size of every chunk but the last.
    pub const fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The number of chunks: 0 for the empty blob.
    pub const fn count(&self) -> u32 {
        // At most MAX_CHUNKS, checked by `new`.
        self.blob_size.div_ceil(self.chunk_size as u64) as u32
    }

    /// The number of midstates a table for this layout holds: one per chunk but the last.
    pub const fn table_len(&self) -> usize {
        self.count().saturating_sub(1) as usize
    }

    /// Chunk `index`'s offset in the blob and length, or `None` past the last chunk.
    pub fn range(&self, index: u32) -> Option<(u64, u32)> {
        if index >= self.count() {
            return None;
        }
        let start = u64::from(index) * u64::from(self.chunk_size);
        let len = (self.blob_size - start).min(u64::from(self.chunk_size));
        Some((start, len as u32))
    }

    /// The index of the chunk holding byte `offset`, or `None` past the end of the blob.
    pub fn index_of(&self, offset: u64) -> Option<u32> {
        (offset < self.blob_size).then(|| (offset / u64::from(self.chunk_size)) as u32)
    }
}

/// Why a chunk, or a table, does not check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The index is not below the layout's chunk count (the empty blob has no chunk at all).
    #[error("chunk {index} out of range: the blob has {count} chunks")]
    IndexOutOfRange {
        /// The requested chunk.
        index: u32,
        /// The layout's chunk count.
        count: u32,
    },
    /// The chunk's length is not the one the layout gives chunk `index`: the sender is at fault.
    #[error("chunk {index} has {actual} bytes, expected {expected}")]
    WrongLength {
        /// The chunk.
        index: u32,
        /// The layout's length for it.
        expected: u32,
        /// The length received.
        actual: usize,
    },
    /// The chunk does not chain between the table's entries (or to the digest): the chunk or the
    /// table is wrong, and which cannot be told: re-fetch the table elsewhere before blaming.
    #[error("chunk {index} does not chain with the midstate table")]
    Mismatch {
        /// The chunk.
        index: u32,
    },
    /// The chunk fails between two trusted ends (IV, digest, anchored midstate): it is corrupt.
    #[error("chunk {index} is corrupt")]
    Corrupt {
        /// The chunk.
        index: u32,
    },
    /// The table's entry count does not match its layout.
    #[error("midstate table has {actual} entries, its layout needs {expected}")]
    TableInconsistent {
        /// The count the layout needs.
        expected: usize,
        /// The count present.
        actual: usize,
    },
    /// The table (or the data) describes a blob of another size than expected.
    #[error("blob size {actual} differs from the expected {expected}")]
    BlobSizeMismatch {
        /// The size the caller expects (from the descriptor).
        expected: u64,
        /// The size found.
        actual: u64,
    },
    /// The blob is empty but the digest is not the SHA-256 of nothing.
    #[error("an empty blob cannot have this digest")]
    EmptyDigestMismatch,
}

impl ChunkError {
    /// True when the failure may be the table's rather than the chunk's ([`ChunkError::Mismatch`]):
    /// the peer that sent the chunk must not be blamed before the table is re-checked.
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, ChunkError::Mismatch { .. })
    }
}

/// Why bytes are not an encoded [`MidstateTable`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input is longer than [`MAX_ENCODED_TABLE_LEN`].
    #[error("encoded table of {len} bytes exceeds the cap")]
    TooLarge {
        /// The input's length.
        len: usize,
    },
    /// The input ends inside the header or inside a midstate.
    #[error("encoded table is truncated")]
    Truncated,
    /// The version byte is not [`TABLE_VERSION`].
    #[error("unsupported table version {0}")]
    UnsupportedVersion(u8),
    /// The header's blob and chunk sizes do not form a valid layout.
    #[error("invalid layout: {0}")]
    Layout(#[from] LayoutError),
    /// Whole midstates are present, but not as many as the layout needs.
    #[error("table has {actual} entries, its layout needs {expected}")]
    WrongEntryCount {
        /// The count the layout needs.
        expected: usize,
        /// The count present.
        actual: usize,
    },
    /// Bytes follow the last midstate the layout needs.
    #[error("{extra} trailing bytes after the table")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
}

/// The midstates of a blob at every chunk boundary but the last (the last chunk ends in the
/// digest itself). Its entry count always matches its layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MidstateTable {
    layout: ChunkLayout,
    states: Vec<[u8; 32]>,
}

impl MidstateTable {
    /// A table from a layout and its midstates, if there are exactly `layout.table_len()` of them.
    pub fn from_parts(layout: ChunkLayout, states: Vec<[u8; 32]>) -> Result<Self, ChunkError> {
        if states.len() != layout.table_len() {
            return Err(ChunkError::TableInconsistent {
                expected: layout.table_len(),
                actual: states.len(),
            });
        }
        Ok(MidstateTable { layout, states })
    }

    /// The table of a whole blob held in memory (by whoever has it and has verified it).
    ///
    /// The last chunk does not contribute a midstate, so it is not hashed.
    pub fn compute(data: &[u8], chunk_size: u32) -> Result<Self, LayoutError> {
        let layout = ChunkLayout::new(data.len() as u64, chunk_size)?;
        let mut states = Vec::with_capacity(layout.table_len());
        let mut state = IV;
        for chunk in data
            .chunks_exact(chunk_size as usize)
            .take(layout.table_len())
        {
            compress_aligned(&mut state, chunk);
            states.push(state_to_bytes(&state));
        }
        Ok(MidstateTable { layout, states })
    }

    /// The layout the table describes.
    pub const fn layout(&self) -> ChunkLayout {
        self.layout
    }

    /// The midstates: entry `i` is the chaining value after chunk `i`.
    pub fn states(&self) -> &[[u8; 32]] {
        &self.states
    }

    /// Everything a receiver can check about a table without the data.
    ///
    /// Checks that the table describes a blob of `blob_size` bytes (the descriptor's size), that its
    /// entry count matches its layout, and that an empty blob's `digest` is [`EMPTY_SHA256`]. It
    /// cannot check the midstates themselves: each is checked by [`ChunkVerifier::verify_chunk`]
    /// as the chunks on either side of it arrive, and a forged one fails there at the latest when
    /// the last chunk is checked against `digest`.
    pub fn verify_against_digest(
        &self,
        digest: &[u8; 32],
        blob_size: u64,
    ) -> Result<(), ChunkError> {
        if self.layout.blob_size != blob_size {
            return Err(ChunkError::BlobSizeMismatch {
                expected: blob_size,
                actual: self.layout.blob_size,
            });
        }
        if self.states.len() != self.layout.table_len() {
            return Err(ChunkError::TableInconsistent {
                expected: self.layout.table_len(),
                actual: self.states.len(),
            });
        }
        if blob_size == 0 && *digest != EMPTY_SHA256 {
            return Err(ChunkError::EmptyDigestMismatch);
        }
        Ok(())
    }

    /// The full check, for whoever holds the whole blob: every chunk of `data` against the table,
    /// the last one against `digest`. Costs one SHA-256 pass over `data`.
    ///
    /// If `data` is known to hash to `digest`, any [`ChunkError::Mismatch`] means the table is
    /// wrong at that chunk.
    pub fn verify_full(&self, digest: &[u8; 32], data: &[u8]) -> Result<(), ChunkError> {
        self.verify_against_digest(digest, data.len() as u64)?;
        let chunk_size = self.layout.chunk_size as usize;
        for (index, chunk) in (0..).zip(data.chunks(chunk_size)) {
            ChunkVerifier::verify_chunk(self, digest, index, chunk)?;
        }
        Ok(())
    }

    /// The length of [`MidstateTable::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        TABLE_HEADER_LEN + 32 * self.states.len()
    }

    /// The version-1 wire encoding (see the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(TABLE_VERSION);
        out.extend_from_slice(&self.layout.blob_size.to_be_bytes());
        out.extend_from_slice(&self.layout.chunk_size.to_be_bytes());
        for state in &self.states {
            out.extend_from_slice(state);
        }
        out
    }

    /// Parses a version-1 encoding, refusing oversized input, invalid layouts, missing or extra
    /// entries and trailing bytes. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (layout, body) = decode_header(bytes, TABLE_VERSION)?;
        let expected = layout.table_len();
        let needed = 32 * expected;
        if body.len() != needed {
            return Err(if body.len() % 32 == 0 {
                DecodeError::WrongEntryCount {
                    expected,
                    actual: body.len() / 32,
                }
            } else if body.len() > needed {
                DecodeError::TrailingBytes {
                    extra: body.len() - needed,
                }
            } else {
                DecodeError::Truncated
            });
        }
        Ok(MidstateTable {
            layout,
            states: decode_states(body),
        })
    }
}

/// The header of an encoded table or prefix of `version`: the layout, and the bytes after the
/// header. Refuses oversized input, another version, a short header and an invalid layout.
fn decode_header(bytes: &[u8], version: u8) -> Result<(ChunkLayout, &[u8]), DecodeError> {
    if bytes.len() > MAX_ENCODED_TABLE_LEN {
        return Err(DecodeError::TooLarge { len: bytes.len() });
    }
    let Some((&found, rest)) = bytes.split_first() else {
        return Err(DecodeError::Truncated);
    };
    if found != version {
        return Err(DecodeError::UnsupportedVersion(found));
    }
    let (Some(size), Some(chunk)) = (rest.get(..8), rest.get(8..12)) else {
        return Err(DecodeError::Truncated);
    };
    let mut size_be = [0u8; 8];
    size_be.copy_from_slice(size);
    let mut chunk_be = [0u8; 4];
    chunk_be.copy_from_slice(chunk);
    let layout = ChunkLayout::new(u64::from_be_bytes(size_be), u32::from_be_bytes(chunk_be))?;
    Ok((layout, &rest[12..]))
}

/// The 32-byte states of a body whose length is a multiple of 32.
fn decode_states(body: &[u8]) -> Vec<[u8; 32]> {
    body.chunks_exact(32)
        .map(|s| {
            let mut state = [0u8; 32];
            state.copy_from_slice(s);
            state
        })
        .collect()
}

/// Builds a [`MidstateTable`] and the digest in one pass over a blob that arrives in pieces of
/// any size (from the upstream registry, say), at the chunk size [`chunk_size_for`] gives the
/// blob's size, which the builder need not know in advance.
///
/// It records the midstate at every boundary of the finest chunk size the rule can pick (the
/// *granule*); a table or prefix takes every `chunk / granule`-th of them. Once the bytes fed
/// are enough for the largest chunk size, the finer states are dropped: at most
/// [`MIN_CHUNKS_PER_BLOB`] times `max_chunk / granule` states are ever held beyond the table.
#[derive(Clone)]
pub struct TableBuilder {
    max_chunk: u32,
    /// The chunk size whose boundaries `states` records: the finest the rule can pick, then
    /// `max_chunk` once the blob is known to be big enough for it.
    granule: u32,
    state: [u32; 8],
    blocks: Blocks,
    total: u64,
    /// Bytes of the current granule seen so far, always below `granule`.
    in_chunk: u32,
    /// The midstate at every granule boundary passed so far, capped at `MAX_CHUNKS` entries.
    states: Vec<[u8; 32]>,
}

impl TableBuilder {
    /// A builder for chunks of at most `max_chunk` bytes (see [`chunk_size_for`]).
    pub fn new(max_chunk: u32) -> Result<Self, LayoutError> {
        ChunkLayout::new(0, max_chunk)?;
        Ok(TableBuilder {
            max_chunk,
            // The size the rule gives the smallest blobs is the finest it ever gives.
            granule: chunk_size_for(0, max_chunk),
            state: IV,
            blocks: Blocks::default(),
            total: 0,
            in_chunk: 0,
            states: Vec::new(),
        })
    }

    /// Feeds the next bytes of the blob.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = (self.granule - self.in_chunk) as usize;
            let (head, rest) = data.split_at(room.min(data.len()));
            let state = &mut self.state;
            self.blocks.digest_blocks(head, |b| compress256(state, b));
            // `head` fits in the granule, so below `granule` and thus in u32.
            self.in_chunk += head.len() as u32;
            self.total = self.total.wrapping_add(head.len() as u64);
            if self.in_chunk == self.granule {
                // A chunk boundary is a block boundary: the buffer is empty, `state` is the
                // midstate. Past MAX_CHUNKS the layout is refused anyway: stop storing.
                self.in_chunk = 0;
                if self.states.len() < MAX_CHUNKS as usize {
                    self.states.push(state_to_bytes(&self.state));
                }
                if self.granule < self.max_chunk
                    && chunk_size_for(self.total, self.max_chunk) == self.max_chunk
                {
                    self.coarsen();
                }
            }
            data = rest;
        }
    }

    /// Keeps only the states at `max_chunk` boundaries: the blob, at least `total` bytes, will
    /// be cut in chunks of `max_chunk` (the rule is monotone).
    fn coarsen(&mut self) {
        let stride = (self.max_chunk / self.granule) as usize;
        self.states = self
            .states
            .iter()
            .skip(stride - 1)
            .step_by(stride)
            .copied()
            .collect();
        self.granule = self.max_chunk;
        // At a granule boundary, so a multiple of the old granule, below `max_chunk`.
        self.in_chunk = (self.total % u64::from(self.max_chunk)) as u32;
    }

    /// The layout of a blob of `blob_size` bytes, and how many recorded states make one of its
    /// chunks: its states are every `stride`-th, from the `stride`-th on. `usize::MAX` only if
    /// the states were coarsened for a blob bigger than `blob_size`: the bytes fed are not that
    /// blob, and no state of theirs is its.
    fn layout_and_stride(&self, blob_size: u64) -> Result<(ChunkLayout, usize), LayoutError> {
        let layout = ChunkLayout::new(blob_size, chunk_size_for(blob_size, self.max_chunk))?;
        let stride = match layout.chunk_size() % self.granule {
            0 => (layout.chunk_size() / self.granule) as usize,
            _ => usize::MAX,
        };
        Ok((layout, stride))
    }

    /// The layout of a blob of `blob_size` bytes, and the recorded states at its chunk
    /// boundaries (all of them passed so far, possibly more than the table holds).
    fn states_for(
        &self,
        blob_size: u64,
    ) -> Result<(ChunkLayout, impl Iterator<Item = &[u8; 32]>), LayoutError> {
        let (layout, stride) = self.layout_and_stride(blob_size)?;
        let states = self.states.iter().skip(stride - 1).step_by(stride);
        Ok((layout, states))
    }

    /// The number of bytes fed so far.
    pub fn bytes_hashed(&self) -> u64 {
        self.total
    }

    /// What is known so far of the table of a blob of `blob_size` bytes (the descriptor's size):
    /// the midstates at the chunk boundaries passed. An error if `blob_size` and the chunk size
    /// the rule gives it form no valid layout.
    pub fn prefix(&self, blob_size: u64) -> Result<TablePrefix, LayoutError> {
        let (layout, states) = self.states_for(blob_size)?;
        let states: Vec<[u8; 32]> = states.take(layout.table_len()).copied().collect();
        Ok(TablePrefix::from_parts(layout, states).unwrap_or_else(|_| TablePrefix::empty(layout)))
    }

    /// The number of midstates of a blob of `blob_size` bytes known so far (its chunk
    /// boundaries passed); 0 if `blob_size` forms no layout. Constant time: a node asks after
    /// every piece of an upstream stream.
    pub fn states_known(&self, blob_size: u64) -> usize {
        // What `states_for` yields, counted: floor(len / stride).
        self.layout_and_stride(blob_size)
            .map_or(0, |(layout, stride)| {
                (self.states.len() / stride).min(layout.table_len())
            })
    }

    /// The table and the SHA-256 digest of everything fed; an error only if the blob has more
    /// than [`MAX_CHUNKS`] chunks of the size the rule gives it.
    pub fn finish(self) -> Result<(MidstateTable, [u8; 32]), LayoutError> {
        let (layout, states) = self.states_for(self.total)?;
        // A blob ending on a chunk boundary recorded a midstate after its last chunk: that one
        // is not in the table (the digest stands in for it).
        let states = states.take(layout.table_len()).copied().collect();
        let mut state = self.state;
        let mut blocks = self.blocks;
        blocks.len64_padding_be(self.total.wrapping_mul(8), |b| {
            compress256(&mut state, core::slice::from_ref(b))
        });
        Ok((MidstateTable { layout, states }, state_to_bytes(&state)))
    }
}

/// What accepting a chunk established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The accepted chunk.
    pub index: u32,
    /// Chunks that this acceptance proved genuine (anchored to the digest); empty while the chunk
    /// is only consistent with the table. Only final chunks are safe to serve to other peers
    /// before the whole blob is complete.
    pub newly_final: Range<u32>,
}

/// Checks the chunks of one blob against its midstate table and digest, and tracks which accepted
/// chunks are final (proven genuine: the chunk and every later one checked, so their chain ends
/// in the digest).
#[derive(Debug, Clone)]
pub struct ChunkVerifier {
    table: MidstateTable,
    digest: [u8; 32],
    accepted: Vec<bool>,
    /// Chunks `final_from..count` are final.
    final_from: u32,
}

impl ChunkVerifier {
    /// Checks chunk `index` of the blob described by `table` and `digest` (stateless).
    ///
    /// Total: any table, digest, index and data give `Ok` or an error, never a panic. Costs one
    /// SHA-256 pass over `data`.
    pub fn verify_chunk(
        table: &MidstateTable,
        digest: &[u8; 32],
        index: u32,
        data: &[u8],
    ) -> Result<(), ChunkError> {
        if table.states.len() != table.layout.table_len() {
            return Err(ChunkError::TableInconsistent {
                expected: table.layout.table_len(),
                actual: table.states.len(),
            });
        }
        verify_chunk_states(table.layout, &table.states, digest, index, data)
    }

    /// A verifier for a blob of `blob_size` bytes (the descriptor's) with this digest, after the
    /// cheap table checks of [`MidstateTable::verify_against_digest`].
    pub fn new(table: MidstateTable, digest: [u8; 32], blob_size: u64) -> Result<Self, ChunkError> {
        table.verify_against_digest(&digest, blob_size)?;
        let count = table.layout.count();
        Ok(ChunkVerifier {
            accepted: vec![false; count as usize],
            final_from: count,
            table,
            digest,
        })
    }

    /// The table in use.
    pub fn table(&self) -> &MidstateTable {
        &self.table
    }

    /// Checks chunk `index` and records it as accepted.
    ///
    /// A failure is [`ChunkError::Corrupt`] rather than [`ChunkError::Mismatch`] when both ends of
    /// the chunk are trusted: the first chunk once chunk 1 is final, or the only chunk.
    pub fn accept(&mut self, index: u32, data: &[u8]) -> Result<Accepted, ChunkError> {
        match Self::verify_chunk(&self.table, &self.digest, index, data) {
            Ok(()) => {}
            Err(ChunkError::Mismatch { index }) if index == 0 && self.final_from <= 1 => {
                return Err(ChunkError::Corrupt { index });
            }
            Err(e) => return Err(e),
        }
        if let Some(slot) = self.accepted.get_mut(index as usize) {
            *slot = true;
        }
        let before = self.final_from;
        while let Some(prev) = self.final_from.checked_sub(1) {
            if !self.accepted.get(prev as usize).copied().unwrap_or(false) {
                break;
            }
            self.final_from = prev;
        }
        Ok(Accepted {
            index,
            newly_final: self.final_from..before,
        })
    }

    /// True once chunk `index` is proven genuine.
    pub fn is_final(&self, index: u32) -> bool {
        index >= self.final_from && index < self.table.layout.count()
    }

    /// True once chunk `index` has been accepted (consistent with the table, maybe not final).
    pub fn is_accepted(&self, index: u32) -> bool {
        self.accepted.get(index as usize).copied().unwrap_or(false)
    }

    /// True when every chunk is accepted, hence final: the blob hashes to the digest.
    pub fn is_complete(&self) -> bool {
        self.final_from == 0
    }
}

/// Checks one chunk whose bytes arrive in pieces of any size, without holding them: the
/// streaming form of [`ChunkVerifier::verify_chunk`] (and [`TablePrefix::verify_chunk`]).
///
/// Made by [`ChunkStreamVerifier::new`] or [`TablePrefix::stream_verifier`], which check the
/// index and the table before any byte; then [`ChunkStreamVerifier::update`] hashes each piece
/// as it arrives and [`ChunkStreamVerifier::finish`] compares the result with the chunk's end
/// state (or, for the last chunk, finishes the blob's padding and compares with the digest).
/// Feeding a chunk's bytes in any split and finishing gives exactly what
/// [`ChunkVerifier::verify_chunk`] gives for the whole chunk, errors included.
///
/// A piece that would take the chunk past its length is refused
/// ([`ChunkError::WrongLength`]) and not hashed, and the verifier stays failed: `finish` then
/// reports the wrong length too. Nothing fed is trusted before `finish` returns `Ok`.
#[derive(Clone)]
pub struct ChunkStreamVerifier {
    index: u32,
    /// The layout's chunk count: a single-chunk blob fails as corrupt, not ambiguous.
    count: u32,
    /// The chunk's length.
    len: u32,
    /// `Some(blob_size)` for the last chunk, which ends with the blob's padding.
    last_of: Option<u64>,
    /// The state the chunk must end in: the next midstate, or the digest.
    end: [u8; 32],
    state: [u32; 8],
    blocks: Blocks,
    /// Bytes offered so far, refused ones included (saturating).
    offered: usize,
}

impl core::fmt::Debug for ChunkStreamVerifier {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ChunkStreamVerifier")
            .field("index", &self.index)
            .field("len", &self.len)
            .field("offered", &self.offered)
            .finish_non_exhaustive()
    }
}

impl ChunkStreamVerifier {
    /// A verifier for chunk `index` of the blob described by `table` and `digest`. Fails as
    /// [`ChunkVerifier::verify_chunk`] would before hashing: an index past the layout
    /// ([`ChunkError::IndexOutOfRange`]) or a table whose entry count does not match its layout.
    pub fn new(table: &MidstateTable, digest: &[u8; 32], index: u32) -> Result<Self, ChunkError> {
        let count = table.layout.count();
        if index >= count {
            return Err(ChunkError::IndexOutOfRange { index, count });
        }
        if table.states.len() != table.layout.table_len() {
            return Err(ChunkError::TableInconsistent {
                expected: table.layout.table_len(),
                actual: table.states.len(),
            });
        }
        Self::from_states(table.layout, &table.states, digest, index)
    }

    /// A verifier for chunk `index` against the first `states` of `layout`'s table and, for the
    /// last chunk, `digest`: the start of [`verify_chunk_states`].
    fn from_states(
        layout: ChunkLayout,
        states: &[[u8; 32]],
        digest: &[u8; 32],
        index: u32,
    ) -> Result<Self, ChunkError> {
        let count = layout.count();
        let Some((_, len)) = layout.range(index) else {
            return Err(ChunkError::IndexOutOfRange { index, count });
        };
        let inconsistent = || ChunkError::TableInconsistent {
            expected: layout.table_len(),
            actual: states.len(),
        };
        let i = index as usize;
        let state = match i.checked_sub(1) {
            None => IV,
            Some(prev) => state_from_bytes(states.get(prev).ok_or_else(inconsistent)?),
        };
        let (end, last_of) = if index + 1 == count {
            (*digest, Some(layout.blob_size))
        } else {
            (*states.get(i).ok_or_else(inconsistent)?, None)
        };
        Ok(ChunkStreamVerifier {
            index,
            count,
            len,
            last_of,
            end,
            state,
            blocks: Blocks::default(),
            offered: 0,
        })
    }

    /// The chunk being checked.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The chunk's length, as the layout gives it.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Always false: a chunk holds at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes accepted so far (at most [`ChunkStreamVerifier::len`]).
    pub fn received(&self) -> u32 {
        // At most `len`, a u32.
        self.offered.min(self.len as usize) as u32
    }

    /// Bytes still expected.
    pub fn remaining(&self) -> u32 {
        self.len - self.received()
    }

    /// Hashes the next piece of the chunk. A piece that would take the chunk past its length
    /// is refused and not hashed ([`ChunkError::WrongLength`] with the bytes offered so far),
    /// and the verifier stays failed.
    pub fn update(&mut self, data: &[u8]) -> Result<(), ChunkError> {
        let len = self.len as usize;
        let offered = self.offered.saturating_add(data.len());
        if offered > len {
            self.offered = offered;
            return Err(ChunkError::WrongLength {
                index: self.index,
                expected: self.len,
                actual: offered,
            });
        }
        self.offered = offered;
        let state = &mut self.state;
        self.blocks.digest_blocks(data, |b| compress256(state, b));
        Ok(())
    }

    /// The verdict, as [`ChunkVerifier::verify_chunk`] on the concatenation of every piece
    /// offered: [`ChunkError::WrongLength`] unless exactly the chunk's length arrived, then
    /// [`ChunkError::Mismatch`] (or [`ChunkError::Corrupt`] for a single-chunk blob) unless the
    /// chunk chains to its end state.
    pub fn finish(mut self) -> Result<(), ChunkError> {
        if self.offered != self.len as usize {
            return Err(ChunkError::WrongLength {
                index: self.index,
                expected: self.len,
                actual: self.offered,
            });
        }
        if let Some(blob_size) = self.last_of {
            let state = &mut self.state;
            self.blocks
                .len64_padding_be(blob_size.wrapping_mul(8), |b| {
                    compress256(state, core::slice::from_ref(b))
                });
        }
        // Not the last chunk: a whole chunk, a multiple of the block size, so nothing is left
        // in the buffer.
        if state_to_bytes(&self.state) == self.end {
            Ok(())
        } else if self.count == 1 {
            // IV to digest: the table played no part.
            Err(ChunkError::Corrupt { index: self.index })
        } else {
            Err(ChunkError::Mismatch { index: self.index })
        }
    }
}

/// Checks chunk `index` against the first `states` of `layout`'s table (all of them, or a prefix
/// that covers the chunk) and, for the last chunk, the digest.
fn verify_chunk_states(
    layout: ChunkLayout,
    states: &[[u8; 32]],
    digest: &[u8; 32],
    index: u32,
    data: &[u8],
) -> Result<(), ChunkError> {
    let count = layout.count();
    let inconsistent = || ChunkError::TableInconsistent {
        expected: layout.table_len(),
        actual: states.len(),
    };
    let Some((_, len)) = layout.range(index) else {
        return Err(ChunkError::IndexOutOfRange { index, count });
    };
    if data.len() != len as usize {
        return Err(ChunkError::WrongLength {
            index,
            expected: len,
            actual: data.len(),
        });
    }
    let i = index as usize;
    let mut state = match i.checked_sub(1) {
        None => IV,
        Some(prev) => state_from_bytes(states.get(prev).ok_or_else(inconsistent)?),
    };
    let mut blocks = Blocks::default();
    blocks.digest_blocks(data, |b| compress256(&mut state, b));
    let expected = if index + 1 == count {
        blocks.len64_padding_be(layout.blob_size.wrapping_mul(8), |b| {
            compress256(&mut state, core::slice::from_ref(b))
        });
        digest
    } else {
        // Not the last chunk: a whole chunk, so no bytes are left in the buffer.
        states.get(i).ok_or_else(inconsistent)?
    };
    if state_to_bytes(&state) == *expected {
        Ok(())
    } else if count == 1 {
        // IV to digest: the table played no part.
        Err(ChunkError::Corrupt { index })
    } else {
        Err(ChunkError::Mismatch { index })
    }
}

/// A fuzz target body for the table decoder: decodes arbitrary bytes and, when they decode,
/// checks the canonical round trip and runs chunk verification on pieces of the input. Panics only
/// if an invariant is broken.
#[doc(hidden)]
pub fn fuzz_decode_table(bytes: &[u8]) {
    let Ok(table) = MidstateTable::decode(bytes) else {
        return;
    };
    assert_eq!(table.encode(), bytes, "decoding is not canonical");
    assert_eq!(table.states.len(), table.layout.table_len());
    let digest = table.states.first().copied().unwrap_or(EMPTY_SHA256);
    let count = table.layout.count();
    for index in [0, 1, count.saturating_sub(1), count, u32::MAX] {
        for data in [&[][..], bytes, &bytes[bytes.len().min(64)..]] {
            let _ = ChunkVerifier::verify_chunk(&table, &digest, index, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::{Digest as _, Sha256};

    /// Deterministic test bytes (splitmix64), so that failures reproduce.
    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn sha256(data: &[u8]) -> [u8; 32] {
        Sha256::digest(data).into()
    }

    fn sizes_for(cs: usize) -> Vec<usize> {
        let mut sizes = vec![
            0,
            1,
            63,
            64,
            65,
            127,
            128,
            129,
            cs - 1,
            cs,
            cs + 1,
            2 * cs,
            3 * cs + 17,
            4 * cs,
            5 * cs - 1,
            5 * cs + 1,
            7 * cs + cs / 2,
        ];
        sizes.sort_unstable();
        sizes.dedup();
        sizes
    }

    fn chunks_of(data: &[u8], layout: ChunkLayout) -> Vec<&[u8]> {
        (0..layout.count())
            .map(|i| {
                let (start, len) = layout.range(i).unwrap();
                &data[start as usize..start as usize + len as usize]
            })
            .collect()
    }

    /// Which chunks of `data` fail against `table`.
    fn failing(table: &MidstateTable, digest: &[u8; 32], data: &[u8]) -> Vec<u32> {
        chunks_of(data, table.layout())
            .into_iter()
            .zip(0..)
            .filter(|(chunk, i)| ChunkVerifier::verify_chunk(table, digest, *i, chunk).is_err())
            .map(|(_, i)| i)
            .collect()
    }

    #[test]
    fn layout_validation() {
        for bad in [0, 1, 32, 63, 65, 100, 4095, MAX_CHUNK_SIZE + 64, u32::MAX] {
            assert_eq!(
                ChunkLayout::new(10, bad),
                Err(LayoutError::BadChunkSize { chunk_size: bad })
            );
        }
        for good in [64, 128, 4096, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE] {
            assert!(ChunkLayout::new(10, good).is_ok());
        }
        let cap = u64::from(MAX_CHUNKS) * 64;
        assert_eq!(ChunkLayout::new(cap, 64).unwrap().count(), MAX_CHUNKS);
        assert_eq!(
            ChunkLayout::new(cap, 64).unwrap().table_len(),
            MAX_TABLE_ENTRIES as usize
        );
        assert!(matches!(
            ChunkLayout::new(cap + 1, 64),
            Err(LayoutError::TooManyChunks { .. })
        ));
        assert!(ChunkLayout::new(u64::MAX, MAX_CHUNK_SIZE).is_err());
    }

    #[test]
    fn layout_ranges_tile_the_blob() {
        for cs in [64u32, 128, 4096] {
            for size in sizes_for(cs as usize) {
                let layout = ChunkLayout::new(size as u64, cs).unwrap();
                assert_eq!(layout.count() as usize, size.div_ceil(cs as usize));
                let mut next = 0u64;
                for i in 0..layout.count() {
                    let (start, len) = layout.range(i).unwrap();
                    assert_eq!(start, next);
                    assert!(len >= 1 && len <= cs);
                    if i + 1 < layout.count() {
                        assert_eq!(len, cs);
                    }
                    assert_eq!(layout.index_of(start), Some(i));
                    assert_eq!(layout.index_of(start + u64::from(len) - 1), Some(i));
                    next = start + u64::from(len);
                }
                assert_eq!(next, size as u64);
                assert_eq!(layout.range(layout.count()), None);
                assert_eq!(layout.range(u32::MAX), None);
                assert_eq!(layout.index_of(size as u64), None);
            }
        }
    }

    #[test]
    fn every_chunk_verifies_and_chains_to_the_digest() {
        for cs in [64u32, 128, 4096] {
            for size in sizes_for(cs as usize) {
                let data = pseudo_random(size, size as u64 ^ u64::from(cs));
                let digest = sha256(&data);
                let table = MidstateTable::compute(&data, cs).unwrap();
                let layout = table.layout();
                assert_eq!(table.states().len(), layout.table_len());

                let mut builder = TableBuilder::new(cs).unwrap();
                builder.update(&data);
                assert_eq!(builder.bytes_hashed(), size as u64);
                let (built, built_digest) = builder.finish().unwrap();
                assert_eq!(built_digest, digest, "size {size} cs {cs}");
                assert_eq!(built, table, "size {size} cs {cs}");

                table.verify_against_digest(&digest, size as u64).unwrap();
                table.verify_full(&digest, &data).unwrap();
                assert_eq!(failing(&table, &digest, &data), Vec::<u32>::new());
                assert_eq!(MidstateTable::decode(&table.encode()).unwrap(), table);
            }
        }
    }

    #[test]
    fn a_flipped_byte_fails_exactly_its_chunk() {
        for cs in [64u32, 128, 4096] {
            for size in sizes_for(cs as usize).into_iter().filter(|&s| s > 0) {
                let data = pseudo_random(size, 7 + size as u64);
                let digest = sha256(&data);
                let table = MidstateTable::compute(&data, cs).unwrap();
                let layout = table.layout();
                for i in 0..layout.count() {
                    let (start, len) = layout.range(i).unwrap();
                    // First, middle and last byte of the chunk.
                    for at in [0, len / 2, len - 1] {
                        let mut bad = data.clone();
                        bad[(start + u64::from(at)) as usize] ^= 0x01;
                        assert_eq!(
                            failing(&table, &digest, &bad),
                            vec![i],
                            "size {size} cs {cs}"
                        );
                        let chunk = &bad[start as usize..(start + u64::from(len)) as usize];
                        let err = ChunkVerifier::verify_chunk(&table, &digest, i, chunk);
                        if layout.count() == 1 {
                            assert_eq!(err, Err(ChunkError::Corrupt { index: i }));
                        } else {
                            assert_eq!(err, Err(ChunkError::Mismatch { index: i }));
                        }
                        assert!(table.verify_full(&digest, &bad).is_err());
                    }
                }
            }
        }
    }

    #[test]
    fn a_corrupted_entry_fails_the_adjacent_chunks() {
        for cs in [64u32, 128, 4096] {
            for size in sizes_for(cs as usize) {
                let data = pseudo_random(size, 99 + size as u64);
                let digest = sha256(&data);
                let table = MidstateTable::compute(&data, cs).unwrap();
                for j in 0..table.states().len() {
                    let mut states = table.states().to_vec();
                    states[j][31 - j % 32] ^= 0x80;
                    let bad = MidstateTable::from_parts(table.layout(), states).unwrap();
                    let j = j as u32;
                    assert_eq!(failing(&bad, &digest, &data), vec![j, j + 1]);
                    // The cheap checks cannot see it.
                    bad.verify_against_digest(&digest, size as u64).unwrap();
                    assert_eq!(
                        bad.verify_full(&digest, &data),
                        Err(ChunkError::Mismatch { index: j })
                    );
                }
            }
        }
    }

    #[test]
    fn wrong_digest_fails_only_the_last_chunk() {
        let data = pseudo_random(1000, 3);
        let table = MidstateTable::compute(&data, 128).unwrap();
        let mut digest = sha256(&data);
        digest[0] ^= 1;
        assert_eq!(failing(&table, &digest, &data), vec![7]);
    }

    #[test]
    fn the_default_chunk_size_works() {
        let cs = DEFAULT_CHUNK_SIZE as usize;
        let data = pseudo_random(2 * cs + 12_345, 11);
        let digest = sha256(&data);
        let table = MidstateTable::compute(&data, DEFAULT_CHUNK_SIZE).unwrap();
        assert_eq!(table.layout().count(), 3);
        table.verify_full(&digest, &data).unwrap();
        // Streamed, an 8 MiB blob is cut in 256 KiB chunks: 33 of them.
        let mut builder = TableBuilder::new(DEFAULT_CHUNK_SIZE).unwrap();
        for piece in data.chunks(1_000_003) {
            builder.update(piece);
        }
        let (built, built_digest) = builder.finish().unwrap();
        assert_eq!(built_digest, digest);
        assert_eq!(built.layout().chunk_size(), MIN_ADAPTIVE_CHUNK_SIZE);
        assert_eq!(built.layout().count(), 33);
        built.verify_full(&digest, &data).unwrap();
    }

    #[test]
    fn the_chunk_size_follows_the_blob_size() {
        const MIB: u64 = 1 << 20;
        let max = DEFAULT_CHUNK_SIZE;
        for (size, expected) in [
            (0, 256 << 10),
            (1, 256 << 10),
            (MIB, 256 << 10),
            (8 * MIB, 256 << 10),
            (31 * (MIB / 2), 256 << 10),
            (31 * (MIB / 2) + 1, 512 << 10),
            (32 * MIB, 1 << 20),
            (62 * MIB + 1, 2 << 20),
            (124 * MIB, 2 << 20),
            (124 * MIB + 1, 4 << 20),
            (1 << 30, 4 << 20),
            (u64::MAX, 4 << 20),
        ] {
            assert_eq!(chunk_size_for(size, max), expected, "size {size}");
        }
        // Below twice the smallest adaptive size, or not halvable into multiples of 64: as set.
        for max in [64, 128, 4096, 511 << 10, (4 << 20) + 64] {
            assert_eq!(chunk_size_for(1, max), max);
        }
        // Halved while it stays a multiple of 64.
        assert_eq!(chunk_size_for(1, 3 << 20), 384 << 10);
        assert_eq!(chunk_size_for(1, 100), 100);
    }

    #[test]
    fn streaming_picks_the_chunk_size_of_the_size_fed() {
        // 512 KiB at most: 256 KiB granules until the blob passes 31 * 512 KiB, then 512 KiB.
        let max = 512 << 10;
        let k = 256 << 10;
        for size in [
            0,
            1,
            k - 1,
            k,
            k + 1,
            5 * k + 64,
            32 * k,
            32 * k + 1,
            62 * k,
            62 * k + 1,
            62 * k + 64,
            64 * k,
            70 * k + 100,
        ] {
            let data = pseudo_random(size, size as u64);
            let chunk = chunk_size_for(size as u64, max);
            let table = MidstateTable::compute(&data, chunk).unwrap();
            let mut builder = TableBuilder::new(max).unwrap();
            for (n, piece) in data.chunks(100_003).enumerate() {
                builder.update(piece);
                // What is known mid-stream agrees with the table.
                let prefix = builder.prefix(size as u64).unwrap();
                assert_eq!(prefix.layout(), table.layout(), "size {size}");
                let known = prefix.states().len();
                assert_eq!(builder.states_known(size as u64), known);
                let fed = (n * 100_003 + piece.len()) as u64;
                let passed = (fed / u64::from(chunk)) as usize;
                assert_eq!(known, passed.min(table.layout().table_len()), "size {size}");
                assert_eq!(prefix.states(), &table.states()[..known], "size {size}");
            }
            assert_eq!(
                builder.finish().unwrap(),
                (table, sha256(&data)),
                "size {size}"
            );
        }
    }

    #[test]
    fn a_prefix_for_a_smaller_blob_than_fed_knows_nothing() {
        let max = 512 << 10;
        let data = pseudo_random(70 << 18, 3);
        let mut builder = TableBuilder::new(max).unwrap();
        builder.update(&data);
        // Coarsened to 512 KiB: a 1 MiB blob (256 KiB chunks) has no state here.
        let prefix = builder.prefix(1 << 20).unwrap();
        assert_eq!(prefix.layout().chunk_size(), 256 << 10);
        assert!(prefix.states().is_empty());
        assert_eq!(builder.states_known(1 << 20), 0);
    }

    #[test]
    fn the_empty_blob() {
        assert_eq!(sha256(b""), EMPTY_SHA256);
        let table = MidstateTable::compute(&[], 64).unwrap();
        assert_eq!(table.layout().count(), 0);
        assert!(table.states().is_empty());
        let (built, digest) = TableBuilder::new(64).unwrap().finish().unwrap();
        assert_eq!(built, table);
        assert_eq!(digest, EMPTY_SHA256);
        table.verify_against_digest(&EMPTY_SHA256, 0).unwrap();
        table.verify_full(&EMPTY_SHA256, &[]).unwrap();
        assert_eq!(
            table.verify_against_digest(&[0; 32], 0),
            Err(ChunkError::EmptyDigestMismatch)
        );
        assert_eq!(
            ChunkVerifier::verify_chunk(&table, &EMPTY_SHA256, 0, &[]),
            Err(ChunkError::IndexOutOfRange { index: 0, count: 0 })
        );
        let verifier = ChunkVerifier::new(table, EMPTY_SHA256, 0).unwrap();
        assert!(verifier.is_complete());
        assert_eq!(
            hex::encode(verifier.table().encode()),
            "01000000000000000000000040"
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let data = pseudo_random(300, 5);
        let digest = sha256(&data);
        let table = MidstateTable::compute(&data, 128).unwrap();
        let v = |i, d: &[u8]| ChunkVerifier::verify_chunk(&table, &digest, i, d);
        assert_eq!(
            v(3, &[]),
            Err(ChunkError::IndexOutOfRange { index: 3, count: 3 })
        );
        assert_eq!(
            v(0, &data[..127]),
            Err(ChunkError::WrongLength {
                index: 0,
                expected: 128,
                actual: 127
            })
        );
        assert_eq!(
            v(2, &data[256..]),
            Ok(()),
            "the last chunk holds the remaining 44 bytes"
        );
        assert!(matches!(
            v(2, &data[255..]),
            Err(ChunkError::WrongLength { .. })
        ));
        assert!(matches!(v(1, &[]), Err(ChunkError::WrongLength { .. })));
        // A chunk sent under the wrong index does not chain.
        assert_eq!(v(1, &data[..128]), Err(ChunkError::Mismatch { index: 1 }));
        assert_eq!(
            table.verify_against_digest(&digest, 301),
            Err(ChunkError::BlobSizeMismatch {
                expected: 301,
                actual: 300
            })
        );
        assert_eq!(
            table.verify_full(&digest, &data[..299]),
            Err(ChunkError::BlobSizeMismatch {
                expected: 299,
                actual: 300
            })
        );
        assert_eq!(
            MidstateTable::from_parts(table.layout(), vec![[0; 32]]),
            Err(ChunkError::TableInconsistent {
                expected: 2,
                actual: 1
            })
        );
        assert!(TableBuilder::new(100).is_err());
        assert!(MidstateTable::compute(&data, 0).is_err());
    }

    #[test]
    fn streaming_matches_compute_for_random_splits() {
        for (n, cs) in [64u32, 128, 4096].into_iter().enumerate() {
            for size in sizes_for(cs as usize) {
                let data = pseudo_random(size, 1234 + size as u64);
                let expected = (MidstateTable::compute(&data, cs).unwrap(), sha256(&data));
                for seed in 0..8u64 {
                    let cuts = pseudo_random(64, seed * 31 + n as u64);
                    let mut builder = TableBuilder::new(cs).unwrap();
                    let mut rest = &data[..];
                    let mut k = 0;
                    while !rest.is_empty() {
                        // Piece sizes from 0 to about 2.5 chunks, zero-length pieces included.
                        let max = (cs as usize * 5 / 2).max(1);
                        let len = (usize::from(cuts[k % 64]) * 257 + k) % (max + 1);
                        let (piece, tail) = rest.split_at(len.min(rest.len()));
                        builder.update(piece);
                        rest = tail;
                        k += 1;
                    }
                    builder.update(&[]);
                    assert_eq!(builder.finish().unwrap(), expected, "size {size} cs {cs}");
                }
            }
        }
    }

    #[test]
    fn golden_encoding() {
        // Cross-checked with an independent SHA-256 compression written from FIPS 180-4.
        let data: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        let table = MidstateTable::compute(&data, 64).unwrap();
        assert_eq!(
            hex::encode(table.encode()),
            concat!(
                "01",
                "00000000000000c8",
                "00000040",
                "fc99a2df88f42a7a7bb9d18033cdc6a20256755f9d5b9a5044a9cc315abe84a7",
                "593253adfb4cc018be611395485e47c15a5b271dfb8da14fe8f77fb4d05eacbc",
                "2bed68b99987cae48183b2b049d393d0050868e4e8ba3730e9112b08765929b7",
            )
        );
        assert_eq!(
            hex::encode(sha256(&data)),
            "1901da1c9f699b48f6b2636e65cbf73abf99d0441ef67f5c540a42f7051dec6f"
        );
        assert_eq!(table.encoded_len(), 13 + 3 * 32);
    }

    #[test]
    fn decode_refusals() {
        let data = pseudo_random(200, 1);
        let good = MidstateTable::compute(&data, 64).unwrap().encode();
        assert_eq!(MidstateTable::decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(
            MidstateTable::decode(&good[..12]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            MidstateTable::decode(&good[..good.len() - 1]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            MidstateTable::decode(&good[..good.len() - 32]),
            Err(DecodeError::WrongEntryCount {
                expected: 3,
                actual: 2
            })
        );
        let mut more = good.clone();
        more.extend_from_slice(&[0; 32]);
        assert_eq!(
            MidstateTable::decode(&more),
            Err(DecodeError::WrongEntryCount {
                expected: 3,
                actual: 4
            })
        );
        more.truncate(good.len() + 5);
        assert_eq!(
            MidstateTable::decode(&more),
            Err(DecodeError::TrailingBytes { extra: 5 })
        );
        let mut version = good.clone();
        version[0] = 2;
        assert_eq!(
            MidstateTable::decode(&version),
            Err(DecodeError::UnsupportedVersion(2))
        );
        let mut chunk = good.clone();
        chunk[12] = 65;
        assert_eq!(
            MidstateTable::decode(&chunk),
            Err(DecodeError::Layout(LayoutError::BadChunkSize {
                chunk_size: 65
            }))
        );
        // A header claiming 2^40 chunks of 64 bytes.
        let mut huge = vec![TABLE_VERSION];
        huge.extend_from_slice(&(1u64 << 46).to_be_bytes());
        huge.extend_from_slice(&64u32.to_be_bytes());
        assert!(matches!(
            MidstateTable::decode(&huge),
            Err(DecodeError::Layout(LayoutError::TooManyChunks { .. }))
        ));
        assert_eq!(
            MidstateTable::decode(&vec![1; MAX_ENCODED_TABLE_LEN + 1]),
            Err(DecodeError::TooLarge {
                len: MAX_ENCODED_TABLE_LEN + 1
            })
        );
    }

    #[test]
    fn the_largest_table_round_trips() {
        let layout = ChunkLayout::new(u64::from(MAX_CHUNKS) * 64, 64).unwrap();
        let table = MidstateTable::from_parts(layout, vec![[7; 32]; layout.table_len()]).unwrap();
        let bytes = table.encode();
        assert_eq!(bytes.len(), MAX_ENCODED_TABLE_LEN);
        assert_eq!(MidstateTable::decode(&bytes).unwrap(), table);
        fuzz_decode_table(&bytes[..1000]);
    }

    #[test]
    fn chunks_become_final_from_the_tail() {
        let data = pseudo_random(5 * 128 + 10, 77);
        let digest = sha256(&data);
        let table = MidstateTable::compute(&data, 128).unwrap();
        let chunks = chunks_of(&data, table.layout());

        // In order: everything provisional until the last chunk anchors the whole chain.
        let mut v = ChunkVerifier::new(table.clone(), digest, data.len() as u64).unwrap();
        for i in 0..5 {
            assert!(v
                .accept(i, chunks[i as usize])
                .unwrap()
                .newly_final
                .is_empty());
            assert!(v.is_accepted(i) && !v.is_final(i));
        }
        assert_eq!(v.accept(5, chunks[5]).unwrap().newly_final, 0..6);
        assert!(v.is_complete() && (0..6).all(|i| v.is_final(i)));
        // Accepting again changes nothing.
        assert!(v.accept(2, chunks[2]).unwrap().newly_final.is_empty());

        // Backwards: each chunk is final at once.
        let mut v = ChunkVerifier::new(table.clone(), digest, data.len() as u64).unwrap();
        for i in (0..6).rev() {
            assert_eq!(
                v.accept(i, chunks[i as usize]).unwrap().newly_final,
                i..i + 1
            );
        }
        assert!(v.is_complete());

        // Once chunk 1 is final, a bad chunk 0 is the sender's fault for certain.
        let mut v = ChunkVerifier::new(table, digest, data.len() as u64).unwrap();
        let mut bad0 = chunks[0].to_vec();
        bad0[5] ^= 4;
        assert_eq!(v.accept(0, &bad0), Err(ChunkError::Mismatch { index: 0 }));
        for i in (1..6).rev() {
            v.accept(i, chunks[i as usize]).unwrap();
        }
        assert_eq!(v.accept(0, &bad0), Err(ChunkError::Corrupt { index: 0 }));
        assert!(!v.is_accepted(0) && !v.is_complete());
        assert!(!v.is_final(6) && !v.is_final(u32::MAX));
    }

    #[test]
    fn a_lying_table_is_caught_when_it_meets_a_genuine_chunk() {
        let cs = 128;
        let data = pseudo_random(4 * cs + 1, 8);
        let digest = sha256(&data);
        let genuine = MidstateTable::compute(&data, cs as u32).unwrap();
        // A liar forges chunk 0 and the table entry after it.
        let mut forged = data.clone();
        forged[..cs].fill(0xAA);
        let mut states = genuine.states().to_vec();
        states[0] = MidstateTable::compute(&forged, cs as u32).unwrap().states()[0];
        assert_ne!(states[0], genuine.states()[0]);
        let lying = MidstateTable::from_parts(genuine.layout(), states).unwrap();

        let mut v = ChunkVerifier::new(lying, digest, data.len() as u64).unwrap();
        // The forged chunk is consistent with the forged table, but not final.
        let ok = v.accept(0, &forged[..cs]).unwrap();
        assert!(ok.newly_final.is_empty() && !v.is_final(0));
        // The genuine chunk 1 does not chain from the forged entry; nobody can tell which is wrong.
        let err = v.accept(1, &data[cs..2 * cs]).unwrap_err();
        assert_eq!(err, ChunkError::Mismatch { index: 1 });
        assert!(err.is_ambiguous());
        // The genuine table rejects the forged chunk 0.
        assert_eq!(
            ChunkVerifier::verify_chunk(&genuine, &digest, 0, &forged[..cs]),
            Err(ChunkError::Mismatch { index: 0 })
        );
    }

    #[test]
    fn single_chunk_failures_are_not_ambiguous() {
        let data = pseudo_random(100, 2);
        let digest = sha256(&data);
        let table = MidstateTable::compute(&data, 128).unwrap();
        let mut v = ChunkVerifier::new(table, digest, 100).unwrap();
        let mut bad = data.clone();
        bad[99] ^= 0x40;
        let err = v.accept(0, &bad).unwrap_err();
        assert_eq!(err, ChunkError::Corrupt { index: 0 });
        assert!(!err.is_ambiguous());
        assert_eq!(v.accept(0, &data).unwrap().newly_final, 0..1);
    }

    /// Streams `pieces` through a [`ChunkStreamVerifier`] (ignoring `update`'s refusals, which
    /// `finish` reports again) and returns the verdict.
    fn stream_verify(
        table: &MidstateTable,
        digest: &[u8; 32],
        index: u32,
        pieces: &[&[u8]],
    ) -> Result<(), ChunkError> {
        let mut v = ChunkStreamVerifier::new(table, digest, index)?;
        for piece in pieces {
            let _ = v.update(piece);
        }
        v.finish()
    }

    /// `data` cut at pseudo-random places (zero-length pieces included).
    fn split(data: &[u8], seed: u64, max: usize) -> Vec<&[u8]> {
        let cuts = pseudo_random(64, seed);
        let mut pieces = Vec::new();
        let mut rest = data;
        let mut k = 0;
        while !rest.is_empty() {
            let len = (usize::from(cuts[k % 64]) * 257 + k) % (max + 1);
            let (piece, tail) = rest.split_at(len.min(rest.len()));
            pieces.push(piece);
            rest = tail;
            k += 1;
        }
        pieces
    }

    #[test]
    fn streamed_chunks_verify_like_whole_ones() {
        for cs in [64u32, 128, 4096] {
            for size in sizes_for(cs as usize).into_iter().filter(|&s| s > 0) {
                let data = pseudo_random(size, 5 + size as u64);
                let digest = sha256(&data);
                let table = MidstateTable::compute(&data, cs).unwrap();
                let chunks = chunks_of(&data, table.layout());
                for (i, chunk) in (0..).zip(&chunks) {
                    for seed in 0..4 {
                        let pieces = split(chunk, seed + u64::from(i), cs as usize * 3 / 2);
                        assert_eq!(stream_verify(&table, &digest, i, &pieces), Ok(()));
                        // A flipped byte, anywhere: the same verdict as the whole-chunk check.
                        let mut bad = chunk.to_vec();
                        bad[(seed as usize * 97) % chunk.len()] ^= 0x10;
                        let pieces = split(&bad, seed, 100);
                        let whole = ChunkVerifier::verify_chunk(&table, &digest, i, &bad);
                        assert!(whole.is_err());
                        assert_eq!(stream_verify(&table, &digest, i, &pieces), whole);
                    }
                    // Another chunk's bytes under this index, when the lengths agree.
                    if let Some(other) = chunks.get(i as usize + 1) {
                        assert_eq!(
                            stream_verify(&table, &digest, i, &[other]),
                            ChunkVerifier::verify_chunk(&table, &digest, i, other)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn streamed_chunks_of_the_wrong_length_fail() {
        let data = pseudo_random(300, 5);
        let digest = sha256(&data);
        let table = MidstateTable::compute(&data, 128).unwrap();
        // Short: finish says how many bytes came.
        let mut v = ChunkStreamVerifier::new(&table, &digest, 0).unwrap();
        assert_eq!((v.index(), v.len(), v.remaining()), (0, 128, 128));
        assert!(!v.is_empty());
        v.update(&data[..100]).unwrap();
        assert_eq!((v.received(), v.remaining()), (100, 28));
        assert_eq!(
            v.finish(),
            Err(ChunkError::WrongLength {
                index: 0,
                expected: 128,
                actual: 100
            })
        );
        // Long: the piece that overruns is refused, and the verifier stays failed even if the
        // caller goes on.
        let mut v = ChunkStreamVerifier::new(&table, &digest, 2).unwrap();
        assert_eq!(v.len(), 44);
        v.update(&data[256..290]).unwrap();
        v.update(&data[290..]).unwrap();
        assert_eq!(v.remaining(), 0);
        assert_eq!(
            v.update(&[0; 11]),
            Err(ChunkError::WrongLength {
                index: 2,
                expected: 44,
                actual: 55
            })
        );
        assert_eq!(v.received(), 44);
        assert_eq!(
            v.clone().update(&[]).map_err(|e| e.is_ambiguous()),
            Err(false)
        );
        assert_eq!(
            v.finish(),
            Err(ChunkError::WrongLength {
                index: 2,
                expected: 44,
                actual: 55
            })
        );
        // Refused before any byte: an index past the layout, an inconsistent table.
        assert_eq!(
            ChunkStreamVerifier::new(&table, &digest, 3).map(|_| ()),
            Err(ChunkError::IndexOutOfRange { index: 3, count: 3 })
        );
        let empty = MidstateTable::compute(&[], 64).unwrap();
        assert_eq!(
            ChunkStreamVerifier::new(&empty, &EMPTY_SHA256, 0).map(|_| ()),
            Err(ChunkError::IndexOutOfRange { index: 0, count: 0 })
        );
        let broken = MidstateTable {
            layout: table.layout(),
            states: vec![[0; 32]],
        };
        assert_eq!(
            ChunkStreamVerifier::new(&broken, &digest, 0).map(|_| ()),
            Err(ChunkError::TableInconsistent {
                expected: 2,
                actual: 1
            })
        );
        // A single-chunk blob's bad chunk is corrupt, not ambiguous.
        let small = &data[..100];
        let small_digest = sha256(small);
        let t = MidstateTable::compute(small, 128).unwrap();
        let mut bad = small.to_vec();
        bad[0] ^= 1;
        assert_eq!(
            stream_verify(&t, &small_digest, 0, &[&bad[..50], &bad[50..]]),
            Err(ChunkError::Corrupt { index: 0 })
        );
        assert_eq!(
            stream_verify(&t, &small_digest, 0, &[&small[..63], &small[63..]]),
            Ok(())
        );
    }

    fn arb_table() -> impl Strategy<Value = MidstateTable> {
        (1u32..=64, 0u64..=(20 * 64 * 64)).prop_flat_map(|(blocks, size)| {
            let layout = ChunkLayout::new(size, blocks * 64).unwrap();
            proptest::collection::vec(any::<[u8; 32]>(), layout.table_len())
                .prop_map(move |states| MidstateTable::from_parts(layout, states).unwrap())
        })
    }

    proptest! {
        #[test]
        fn streaming_verification_equals_whole_chunk_verification(
            table in arb_table(),
            digest in any::<[u8; 32]>(),
            index in prop_oneof![0u32..30, any::<u32>()],
            data in proptest::collection::vec(any::<u8>(), 0..5000),
            seed in any::<u64>(),
        ) {
            let pieces = split(&data, seed, 300);
            prop_assert_eq!(
                stream_verify(&table, &digest, index, &pieces),
                ChunkVerifier::verify_chunk(&table, &digest, index, &data)
            );
        }

        #[test]
        fn streamed_genuine_chunks_verify_and_flipped_ones_fail_alike(
            data in proptest::collection::vec(any::<u8>(), 1..3000),
            blocks in 1u32..8,
            seed in any::<u64>(),
            flip in any::<usize>(),
        ) {
            let cs = blocks * 64;
            let digest = sha256(&data);
            let table = MidstateTable::compute(&data, cs).unwrap();
            let chunks = chunks_of(&data, table.layout());
            for (i, chunk) in (0..).zip(&chunks) {
                let pieces = split(chunk, seed ^ u64::from(i), 200);
                prop_assert_eq!(stream_verify(&table, &digest, i, &pieces), Ok(()));
            }
            let mut bad = data.clone();
            let at = flip % bad.len();
            bad[at] ^= 0x01;
            let i = table.layout().index_of(at as u64).unwrap();
            let chunk = chunks_of(&bad, table.layout())[i as usize].to_vec();
            let pieces = split(&chunk, seed, 150);
            let verdict = stream_verify(&table, &digest, i, &pieces);
            prop_assert!(verdict.is_err());
            prop_assert_eq!(verdict, ChunkVerifier::verify_chunk(&table, &digest, i, &chunk));
        }

        #[test]
        fn encode_decode_round_trip(table in arb_table()) {
            let bytes = table.encode();
            prop_assert_eq!(bytes.len(), table.encoded_len());
            prop_assert_eq!(MidstateTable::decode(&bytes).unwrap(), table);
            fuzz_decode_table(&bytes);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            fuzz_decode_table(&bytes);
        }

        #[test]
        fn decode_never_panics_past_a_valid_header(
            size in 0u64..2000,
            chunk_size in prop_oneof![Just(64u32), Just(128), any::<u32>()],
            body in proptest::collection::vec(any::<u8>(), 0..1200),
        ) {
            let mut bytes = vec![TABLE_VERSION];
            bytes.extend_from_slice(&size.to_be_bytes());
            bytes.extend_from_slice(&chunk_size.to_be_bytes());
            bytes.extend_from_slice(&body);
            fuzz_decode_table(&bytes);
        }

        #[test]
        fn verification_never_panics(
            table in arb_table(),
            digest in any::<[u8; 32]>(),
            index in prop_oneof![0u32..30, any::<u32>()],
            data in proptest::collection::vec(any::<u8>(), 0..5000),
        ) {
            let _ = ChunkVerifier::verify_chunk(&table, &digest, index, &data);
            let _ = table.verify_full(&digest, &data);
            let size = table.layout().blob_size();
            if let Ok(mut v) = ChunkVerifier::new(table, digest, size) {
                let _ = v.accept(index, &data);
            }
        }

        #[test]
        fn verification_of_right_length_chunks_never_panics(
            table in arb_table(),
            digest in any::<[u8; 32]>(),
            pick in any::<u32>(),
            fill in any::<u8>(),
        ) {
            let layout = table.layout();
            let index = if layout.count() == 0 { pick } else { pick % layout.count() };
            let len = layout.range(index).map_or(0, |(_, len)| len as usize);
            let result = ChunkVerifier::verify_chunk(&table, &digest, index, &vec![fill; len]);
            // Random midstates and digests chain with negligible probability.
            prop_assert!(result.is_err());
        }

        #[test]
        fn the_chunk_size_rule_is_monotone_and_cuts_enough_chunks(
            a in any::<u64>(),
            b in any::<u64>(),
            blocks in 1u32..=(MAX_CHUNK_SIZE / 64),
        ) {
            let max = blocks * 64;
            let (small, big) = (a.min(b), a.max(b));
            let (cs, cb) = (chunk_size_for(small, max), chunk_size_for(big, max));
            prop_assert!(cs <= cb);
            for (size, c) in [(small, cs), (big, cb)] {
                prop_assert!(ChunkLayout::new(0, c).is_ok());
                prop_assert_eq!(max % c, 0);
                // Either enough chunks, or as small as the rule goes.
                prop_assert!(
                    size.div_ceil(u64::from(c)) >= MIN_CHUNKS_PER_BLOB
                        || c == chunk_size_for(0, max)
                );
                // Never halved further than needed.
                prop_assert!(c == max || size.div_ceil(u64::from(c) * 2) < MIN_CHUNKS_PER_BLOB);
            }
        }

        #[test]
        fn random_blobs_verify(
            data in proptest::collection::vec(any::<u8>(), 0..3000),
            blocks in 1u32..8,
            split in any::<usize>(),
        ) {
            let cs = blocks * 64;
            let digest = sha256(&data);
            let table = MidstateTable::compute(&data, cs).unwrap();
            table.verify_full(&digest, &data).unwrap();
            let cut = if data.is_empty() { 0 } else { split % data.len() };
            let mut builder = TableBuilder::new(cs).unwrap();
            builder.update(&data[..cut]);
            builder.update(&data[cut..]);
            prop_assert_eq!(builder.finish().unwrap(), (table, digest));
        }
    }
}
