//! Tables of blobs still arriving: the midstates known so far.
//!
//! A node that streams a blob from the upstream learns the midstate at each chunk boundary as it
//! hashes, long before the blob (and so its full [`MidstateTable`]) is complete. A
//! [`TablePrefix`] holds the first `k` midstates of a layout: it *covers* chunks `0..k` (chunk
//! `i` needs `states[i - 1]` or the IV, and `states[i]`), and once it holds all of them it is the
//! whole table and covers the last chunk too (checked against the digest).
//!
//! Trust is the same as a whole table's (see the parent module): a chunk that chains between two
//! prefix entries is *consistent* with the prefix, and proven genuine only when the chain reaches
//! the digest. A node that receives chunks against a prefix stores them in its partial file only;
//! before the blob is committed or its last byte served, every chunk must have chained against
//! the whole table (the last one to the digest), or the whole blob is hashed again.
//!
//! # Wire format (version 2)
//!
//! ```text
//! u8      version (2)
//! u64 BE  blob_size
//! u32 BE  chunk_size
//! [u8;32] states, fewer than the layout's table length
//! ```
//!
//! A prefix holding every state is encoded as a version-1 table, so the encoding stays canonical
//! and a complete prefix is readable by [`MidstateTable::decode`].

use super::{
    compress_aligned, state_from_bytes, state_to_bytes, ChunkError, ChunkLayout,
    ChunkStreamVerifier, DecodeError, MidstateTable, EMPTY_SHA256, IV, TABLE_HEADER_LEN,
    TABLE_VERSION,
};

/// The version byte of an encoded incomplete prefix.
pub const PREFIX_VERSION: u8 = 2;

/// The first midstates of a blob's table (all of them once the blob is complete).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePrefix {
    layout: ChunkLayout,
    states: Vec<[u8; 32]>,
}

impl From<MidstateTable> for TablePrefix {
    fn from(table: MidstateTable) -> Self {
        TablePrefix {
            layout: table.layout,
            states: table.states,
        }
    }
}

impl TablePrefix {
    /// A prefix that knows nothing yet.
    pub fn empty(layout: ChunkLayout) -> Self {
        TablePrefix {
            layout,
            states: Vec::new(),
        }
    }

    /// A prefix from its layout and first states, if there are at most `layout.table_len()`.
    pub fn from_parts(layout: ChunkLayout, states: Vec<[u8; 32]>) -> Result<Self, ChunkError> {
        if states.len() > layout.table_len() {
            return Err(ChunkError::TableInconsistent {
                expected: layout.table_len(),
                actual: states.len(),
            });
        }
        Ok(TablePrefix { layout, states })
    }

    /// The layout.
    pub const fn layout(&self) -> ChunkLayout {
        self.layout
    }

    /// The states known, `states[i]` being the chaining value after chunk `i`.
    pub fn states(&self) -> &[[u8; 32]] {
        &self.states
    }

    /// True once every state is known: the prefix is the whole table.
    pub fn is_complete(&self) -> bool {
        self.states.len() == self.layout.table_len()
    }

    /// The whole table, once complete.
    pub fn to_table(&self) -> Option<MidstateTable> {
        self.is_complete().then(|| MidstateTable {
            layout: self.layout,
            states: self.states.clone(),
        })
    }

    /// How many chunks, from the first, can be checked: every chunk once complete, else one per
    /// known state.
    pub fn covered(&self) -> u32 {
        if self.is_complete() {
            self.layout.count()
        } else {
            // Fewer states than the table length, which is below MAX_CHUNKS: fits in u32.
            self.states.len() as u32
        }
    }

    /// True when chunk `index` can be checked against this prefix.
    pub fn covers(&self, index: u32) -> bool {
        index < self.covered()
    }

    /// The cheap checks of [`MidstateTable::verify_against_digest`]: the layout describes a blob
    /// of `blob_size` bytes, and an empty blob's digest is the digest of nothing.
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
        if blob_size == 0 && *digest != EMPTY_SHA256 {
            return Err(ChunkError::EmptyDigestMismatch);
        }
        Ok(())
    }

    /// Checks chunk `index` against the prefix (and the digest, for the last chunk). A chunk the
    /// prefix does not cover is [`ChunkError::TableInconsistent`]; otherwise as
    /// [`super::ChunkVerifier::verify_chunk`]. Total; one SHA-256 pass over `data`.
    pub fn verify_chunk(
        &self,
        digest: &[u8; 32],
        index: u32,
        data: &[u8],
    ) -> Result<(), ChunkError> {
        let count = self.layout.count();
        if index >= count {
            return Err(ChunkError::IndexOutOfRange { index, count });
        }
        if !self.covers(index) {
            return Err(ChunkError::TableInconsistent {
                expected: self.layout.table_len(),
                actual: self.states.len(),
            });
        }
        super::verify_chunk_states(self.layout, &self.states, digest, index, data)
    }

    /// A streaming check of chunk `index` against the prefix (and the digest, for the last
    /// chunk): the same verdicts as [`TablePrefix::verify_chunk`], for a chunk whose bytes
    /// arrive in pieces. Fails at once for an index past the layout or a chunk the prefix does
    /// not cover.
    pub fn stream_verifier(
        &self,
        digest: &[u8; 32],
        index: u32,
    ) -> Result<ChunkStreamVerifier, ChunkError> {
        let count = self.layout.count();
        if index >= count {
            return Err(ChunkError::IndexOutOfRange { index, count });
        }
        if !self.covers(index) {
            return Err(ChunkError::TableInconsistent {
                expected: self.layout.table_len(),
                actual: self.states.len(),
            });
        }
        ChunkStreamVerifier::from_states(self.layout, &self.states, digest, index)
    }

    /// Merges another prefix of the same layout into this one. `Ok(true)` if this one grew.
    /// Where both know a state they must agree: otherwise one of the two sources lies and nothing
    /// changes ([`ChunkError::Mismatch`] at the first chunk whose end state differs).
    pub fn merge(&mut self, other: &TablePrefix) -> Result<bool, ChunkError> {
        if other.layout != self.layout {
            return Err(ChunkError::BlobSizeMismatch {
                expected: self.layout.blob_size,
                actual: other.layout.blob_size,
            });
        }
        let common = self.states.len().min(other.states.len());
        if let Some(i) = (0..common).find(|&i| self.states[i] != other.states[i]) {
            return Err(ChunkError::Mismatch { index: i as u32 });
        }
        if other.states.len() > self.states.len() {
            self.states
                .extend_from_slice(&other.states[self.states.len()..]);
            return Ok(true);
        }
        Ok(false)
    }

    /// Extends the prefix with chunk `index`'s end state, computed from `data`, when `index` is
    /// the next chunk whose end state is missing. For a node that holds the chunk from a trusted
    /// source (the upstream): what it computes is what it would have got from a table. Returns
    /// whether the prefix grew; a chunk of the wrong length does not extend it.
    pub fn extend_with_chunk(&mut self, index: u32, data: &[u8]) -> bool {
        if self.is_complete() || index as usize != self.states.len() {
            return false;
        }
        if data.len() != self.layout.chunk_size() as usize {
            return false;
        }
        let mut state = match self.states.last() {
            Some(s) => state_from_bytes(s),
            None => IV,
        };
        compress_aligned(&mut state, data);
        self.states.push(state_to_bytes(&state));
        true
    }

    /// The length of [`TablePrefix::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        TABLE_HEADER_LEN + 32 * self.states.len()
    }

    /// Version 1 (a whole table) when complete, else version 2 (see the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(if self.is_complete() {
            TABLE_VERSION
        } else {
            PREFIX_VERSION
        });
        out.extend_from_slice(&self.layout.blob_size.to_be_bytes());
        out.extend_from_slice(&self.layout.chunk_size.to_be_bytes());
        for state in &self.states {
            out.extend_from_slice(state);
        }
        out
    }

    /// Parses a version-1 table or a version-2 prefix (which must be incomplete: a complete one
    /// is encoded as version 1). Refuses oversized input, invalid layouts, too many entries and
    /// partial entries. Never panics; canonical.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        match bytes.first() {
            Some(&TABLE_VERSION) => return MidstateTable::decode(bytes).map(TablePrefix::from),
            Some(&PREFIX_VERSION) => {}
            Some(&v) => return Err(DecodeError::UnsupportedVersion(v)),
            None => return Err(DecodeError::Truncated),
        }
        let (layout, body) = super::decode_header(bytes, PREFIX_VERSION)?;
        if !body.len().is_multiple_of(32) {
            return Err(DecodeError::Truncated);
        }
        let n = body.len() / 32;
        if n >= layout.table_len() {
            // A complete prefix must be a version-1 table; more entries than the table has are
            // trailing bytes.
            return Err(if n == layout.table_len() {
                DecodeError::UnsupportedVersion(PREFIX_VERSION)
            } else {
                DecodeError::TrailingBytes {
                    extra: body.len() - 32 * layout.table_len(),
                }
            });
        }
        Ok(TablePrefix {
            layout,
            states: super::decode_states(body),
        })
    }
}

/// A fuzz target body for the prefix decoder: never panics, canonical, and verification against
/// whatever decodes is total. Panics only if an invariant is broken.
#[doc(hidden)]
pub fn fuzz_decode_prefix(bytes: &[u8]) {
    let Ok(prefix) = TablePrefix::decode(bytes) else {
        return;
    };
    assert_eq!(prefix.encode(), bytes, "decoding is not canonical");
    assert!(prefix.states.len() <= prefix.layout.table_len());
    let digest = prefix.states.first().copied().unwrap_or(EMPTY_SHA256);
    let count = prefix.layout.count();
    for index in [
        0,
        1,
        prefix.covered(),
        count.saturating_sub(1),
        count,
        u32::MAX,
    ] {
        for data in [&[][..], bytes, &bytes[bytes.len().min(64)..]] {
            let _ = prefix.verify_chunk(&digest, index, data);
        }
    }
    let mut copy = prefix.clone();
    assert_eq!(copy.merge(&prefix), Ok(false));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{TableBuilder, MAX_ENCODED_TABLE_LEN};
    use proptest::prelude::*;

    fn blob(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + 7) as u8).collect()
    }

    fn sha256(data: &[u8]) -> [u8; 32] {
        use sha2::Digest as _;
        sha2::Sha256::digest(data).into()
    }

    #[test]
    fn prefixes_of_a_builder_check_the_chunks_they_cover() {
        let data = blob(64 * 10 + 17);
        let digest = sha256(&data);
        let full = MidstateTable::compute(&data, 128).unwrap();
        let layout = full.layout();
        let mut b = TableBuilder::new(128).unwrap();
        for (k, piece) in data.chunks(100).enumerate() {
            b.update(piece);
            let prefix = b.prefix(layout.blob_size()).unwrap();
            assert!(prefix.states().len() <= layout.table_len(), "step {k}");
            for i in 0..layout.count() {
                let (s, l) = layout.range(i).unwrap();
                let chunk = &data[s as usize..(s + u64::from(l)) as usize];
                if prefix.covers(i) {
                    prefix.verify_chunk(&digest, i, chunk).unwrap();
                    assert!(s + u64::from(l) <= b.bytes_hashed());
                } else {
                    assert!(prefix.verify_chunk(&digest, i, chunk).is_err());
                }
            }
        }
        let done = b.prefix(layout.blob_size()).unwrap();
        assert!(done.is_complete());
        assert_eq!(done.to_table(), Some(full));
    }

    #[test]
    fn extend_merge_and_conflicts() {
        let data = blob(128 * 5);
        let layout = ChunkLayout::new(data.len() as u64, 128).unwrap();
        let full = TablePrefix::from(MidstateTable::compute(&data, 128).unwrap());
        let mut grown = TablePrefix::empty(layout);
        assert!(
            !grown.extend_with_chunk(1, &data[128..256]),
            "not the next chunk"
        );
        for i in 0..4u32 {
            let s = i as usize * 128;
            assert!(grown.extend_with_chunk(i, &data[s..s + 128]));
        }
        assert!(!grown.extend_with_chunk(4, &data[512..]), "complete");
        assert_eq!(grown, full);

        let mut short = TablePrefix::from_parts(layout, full.states()[..2].to_vec()).unwrap();
        assert_eq!(short.merge(&full), Ok(true));
        assert_eq!(short, full);
        assert_eq!(short.merge(&full), Ok(false));

        let mut forged = full.states()[..3].to_vec();
        forged[1][0] ^= 1;
        let forged = TablePrefix::from_parts(layout, forged).unwrap();
        let mut mine = TablePrefix::from_parts(layout, full.states()[..2].to_vec()).unwrap();
        assert_eq!(mine.merge(&forged), Err(ChunkError::Mismatch { index: 1 }));
        assert_eq!(mine.states().len(), 2, "unchanged after a conflict");
        let other = TablePrefix::empty(ChunkLayout::new(999, 128).unwrap());
        assert!(mine.merge(&other).is_err());
    }

    #[test]
    fn golden_prefix_encoding() {
        let data: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        let table = MidstateTable::compute(&data, 64).unwrap();
        let prefix = TablePrefix::from_parts(table.layout(), table.states()[..1].to_vec()).unwrap();
        assert_eq!(
            hex::encode(prefix.encode()),
            concat!(
                "02",
                "00000000000000c8",
                "00000040",
                "fc99a2df88f42a7a7bb9d18033cdc6a20256755f9d5b9a5044a9cc315abe84a7",
            )
        );
        // Complete: the version-1 table, byte for byte.
        assert_eq!(TablePrefix::from(table.clone()).encode(), table.encode());
        assert_eq!(
            hex::encode(TablePrefix::empty(table.layout()).encode()),
            "0200000000000000c800000040"
        );
    }

    #[test]
    fn decode_refusals() {
        let data = blob(64 * 4);
        let table = MidstateTable::compute(&data, 64).unwrap();
        let mut complete_v2 = table.encode();
        complete_v2[0] = PREFIX_VERSION;
        assert!(
            TablePrefix::decode(&complete_v2).is_err(),
            "complete prefix as v2"
        );
        let mut longer = complete_v2.clone();
        longer.extend_from_slice(&[0; 32]);
        assert!(TablePrefix::decode(&longer).is_err());
        let mut partial = TablePrefix::empty(table.layout()).encode();
        partial.push(1);
        assert_eq!(TablePrefix::decode(&partial), Err(DecodeError::Truncated));
        assert_eq!(TablePrefix::decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(
            TablePrefix::decode(&[3]),
            Err(DecodeError::UnsupportedVersion(3))
        );
        assert_eq!(TablePrefix::decode(&[2, 0, 0]), Err(DecodeError::Truncated));
        let huge = vec![2u8; MAX_ENCODED_TABLE_LEN + 1];
        assert!(matches!(
            TablePrefix::decode(&huge),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn round_trip(len in 0usize..2000, cs in 1u32..5, keep in 0usize..40) {
            let data = blob(len);
            let table = MidstateTable::compute(&data, cs * 64).unwrap();
            let n = keep.min(table.states().len());
            let prefix = TablePrefix::from_parts(table.layout(), table.states()[..n].to_vec()).unwrap();
            let bytes = prefix.encode();
            prop_assert_eq!(bytes.len(), prefix.encoded_len());
            prop_assert_eq!(TablePrefix::decode(&bytes).unwrap(), prefix);
        }

        #[test]
        fn streamed_chunks_verify_as_verify_chunk_says(
            len in 0usize..2000,
            cs in 1u32..5,
            keep in 0usize..40,
            index in 0u32..40,
            flip in proptest::option::of(any::<usize>()),
            cut in any::<usize>(),
        ) {
            let data = blob(len);
            let digest = sha256(&data);
            let table = MidstateTable::compute(&data, cs * 64).unwrap();
            let n = keep.min(table.states().len());
            let prefix = TablePrefix::from_parts(table.layout(), table.states()[..n].to_vec()).unwrap();
            let (start, chunk_len) = table.layout().range(index).unwrap_or((0, 0));
            let mut chunk = data[start as usize..(start + u64::from(chunk_len)) as usize].to_vec();
            if let (Some(at), false) = (flip, chunk.is_empty()) {
                let at = at % chunk.len();
                chunk[at] ^= 0x80;
            }
            let whole = prefix.verify_chunk(&digest, index, &chunk);
            let streamed = prefix.stream_verifier(&digest, index).and_then(|mut v| {
                let (a, b) = chunk.split_at(cut % (chunk.len() + 1));
                v.update(a)?;
                v.update(b)?;
                v.finish()
            });
            prop_assert_eq!(&streamed, &whole);
            if prefix.covers(index) && flip.is_none() {
                prop_assert_eq!(streamed, Ok(()));
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            fuzz_decode_prefix(&bytes);
            let mut v2 = bytes.clone();
            if !v2.is_empty() { v2[0] = PREFIX_VERSION; }
            fuzz_decode_prefix(&v2);
        }
    }
}
