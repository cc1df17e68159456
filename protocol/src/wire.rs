//! The peer-to-peer chunk-exchange messages, version 1.
//!
//! Goal: a versioned, size-capped, hand-rolled binary codec for the requests and responses peers
//! exchange on QUIC bidirectional streams (one request per stream), whose decoders are total (no
//! input panics them) and canonical (`encode(decode(b)) == b` for every accepted `b`). Non-goal:
//! any I/O, authentication (the node computes and checks the [`Request::Auth`] proof; this module
//! only carries it) or the check of a table or chunk against a digest ([`crate::chunk`] does that).
//!
//! # Framing
//!
//! Every message is an 8-byte header followed by its payload, all integers big-endian:
//!
//! ```text
//! u16  magic   0x5348 ("SH")
//! u8   version 1
//! u8   kind    requests 0x01..=0x05, responses 0x81..=0x88
//! u32  len     payload length; each kind has its own bounds (checked with the header alone)
//! ```
//!
//! A reader takes the header first ([`Request::decode_header`], [`Response::decode_header`]),
//! which refuses a bad magic, version or kind and a length outside the kind's bounds, so it never
//! has to buffer more than the kind allows; then it reads exactly `len` payload bytes and calls
//! [`Request::decode_payload`] or [`Response::decode_payload`]. [`Request::decode`] and
//! [`Response::decode`] do both on a buffer and report how many bytes the message used.
//!
//! A [`Response::ChunkHeader`] is followed on the stream by exactly `len` raw chunk bytes that are
//! **not** part of the framed message: the codec never buffers a chunk.
//!
//! A [`Request::Watch`] is the one request answered by more than one message: a
//! [`Response::Have`] at once, then another each time the peer's holding changes (coalesced:
//! each is the whole current bitfield, sent when the previous one has been written), until the
//! peer holds every chunk (its last message is the full bitfield, then it finishes the stream)
//! or no longer has the blob ([`Response::NotFound`]). The asker ends it early by resetting its
//! end of the stream.
//!
//! # Payloads
//!
//! ```text
//! Request::Auth        0x01  proof [u8;32]
//! Request::Table       0x02  digest [u8;32], max_chunk_size u32, authz_len u16, authz
//! Request::Chunk       0x03  digest [u8;32], chunk_size u32, index u32, authz_len u16, authz
//! Request::Have        0x04  digest [u8;32], chunk_size u32
//! Request::Watch       0x05  digest [u8;32], chunk_size u32
//! Response::AuthOk     0x81  the answering node's site: 0 to MAX_SITE_LEN bytes of
//!                            [A-Za-z0-9._-] (empty: none; before sites, always empty)
//! Response::Table      0x82  an encoded midstate table (chunk::MidstateTable::encode), 13 bytes to
//!                            chunk::MAX_ENCODED_TABLE_LEN
//! Response::ChunkHeader 0x83 index u32, len u32 (1 to chunk::MAX_CHUNK_SIZE); `len` raw bytes follow
//! Response::Have       0x84  chunk count u32 (at most chunk::MAX_CHUNKS), bitfield bytes
//!                            (ceil(count / 8), most significant bit first, unused bits zero)
//! Response::NotFound   0x85  (empty)
//! Response::Busy       0x86  retry_after_ms u32
//! Response::Denied     0x87  (empty)
//! Response::Error      0x88  UTF-8 message, at most 256 bytes
//! ```
//!
//! An empty `authz` means "no authorization token". A chunk size must be a valid
//! [`crate::chunk::ChunkLayout`] chunk size (a multiple of 64 from 64 bytes to 64 MiB). A
//! `Table` request names the asker's configured chunk size, the largest it uses: the table
//! answered is cut at [`crate::chunk::chunk_size_for`] of the blob's size and that, and every
//! other request names the chunk size of that layout. (The nodes of a cluster share that
//! setting; the daemon answers a `Table` request naming another with a [`Response::Error`]
//! that says so.) Every byte
//! of a payload belongs to a field: extra bytes are refused.

use crate::chunk::{
    ChunkLayout, MAX_CHUNKS, MAX_CHUNK_SIZE, MAX_ENCODED_TABLE_LEN, TABLE_HEADER_LEN,
};

/// The first two bytes of every message: "SH".
pub const MAGIC: u16 = 0x5348;
/// The protocol version this module speaks.
pub const VERSION: u8 = 1;
/// The length of a message header.
pub const HEADER_LEN: usize = 8;
/// The longest authorization token a request may carry.
pub const MAX_AUTHZ_LEN: usize = 8 << 10;
/// The longest message of a [`Response::Error`], in bytes of UTF-8.
pub const MAX_ERROR_LEN: usize = 256;

/// The longest site name ([`Response::AuthOk`]).
pub const MAX_SITE_LEN: usize = 64;

/// True for a valid site name: at most [`MAX_SITE_LEN`] ASCII letters, digits, `.`, `_` and
/// `-` (empty: no site).
pub fn valid_site(site: &str) -> bool {
    site.len() <= MAX_SITE_LEN
        && site
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
/// The longest payload of a [`Response::Have`]: the count and a bitfield of [`MAX_CHUNKS`] bits.
pub const MAX_HAVE_PAYLOAD_LEN: usize = 4 + MAX_CHUNKS.div_ceil(8) as usize;
/// The longest framed request.
pub const MAX_REQUEST_LEN: usize = HEADER_LEN + CHUNK_REQUEST_FIXED + MAX_AUTHZ_LEN;
/// The longest framed response (a [`Response::Table`] of the largest table; the raw bytes after a
/// [`Response::ChunkHeader`] are not part of the message).
pub const MAX_RESPONSE_LEN: usize = HEADER_LEN + MAX_ENCODED_TABLE_LEN;
/// The longest framed message of either direction.
pub const MAX_MESSAGE_LEN: usize = if MAX_REQUEST_LEN > MAX_RESPONSE_LEN {
    MAX_REQUEST_LEN
} else {
    MAX_RESPONSE_LEN
};

/// Fixed part of a table request: digest, chunk size, authz length.
const TABLE_REQUEST_FIXED: usize = 32 + 4 + 2;
/// Fixed part of a chunk request: digest, chunk size, index, authz length.
const CHUNK_REQUEST_FIXED: usize = 32 + 4 + 4 + 2;
/// A have request: digest, chunk size.
const HAVE_REQUEST_LEN: usize = 32 + 4;

/// Message kind bytes.
mod kind {
    pub const AUTH: u8 = 0x01;
    pub const TABLE: u8 = 0x02;
    pub const CHUNK: u8 = 0x03;
    pub const HAVE: u8 = 0x04;
    pub const WATCH: u8 = 0x05;
    pub const AUTH_OK: u8 = 0x81;
    pub const TABLE_DATA: u8 = 0x82;
    pub const CHUNK_HEADER: u8 = 0x83;
    pub const HAVE_DATA: u8 = 0x84;
    pub const NOT_FOUND: u8 = 0x85;
    pub const BUSY: u8 = 0x86;
    pub const DENIED: u8 = 0x87;
    pub const ERROR: u8 = 0x88;
}

/// Why bytes are not a valid message (or a valid [`Bitfield`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The input ends before the header or the payload does; `needed` more bytes are required.
    #[error("message truncated: {needed} more bytes needed")]
    Truncated {
        /// How many more bytes the message needs.
        needed: usize,
    },
    /// The first two bytes are not [`MAGIC`].
    #[error("bad magic 0x{found:04x}")]
    BadMagic {
        /// The bytes found.
        found: u16,
    },
    /// The version byte is not [`VERSION`].
    #[error("unsupported protocol version {found}")]
    UnsupportedVersion {
        /// The version found.
        found: u8,
    },
    /// The kind byte names no message of the expected direction.
    #[error("unknown message kind 0x{kind:02x}")]
    UnknownKind {
        /// The kind found.
        kind: u8,
    },
    /// The header's payload length exceeds what the kind allows.
    #[error("payload of {len} bytes exceeds the {max}-byte cap of kind 0x{kind:02x}")]
    TooLarge {
        /// The message kind.
        kind: u8,
        /// The declared payload length.
        len: u32,
        /// The kind's cap.
        max: usize,
    },
    /// The header's payload length is below what the kind needs.
    #[error("payload of {len} bytes is too short for kind 0x{kind:02x}")]
    TooShort {
        /// The message kind.
        kind: u8,
        /// The declared payload length.
        len: u32,
    },
    /// A field inside the payload (a length-prefixed token) runs past the payload's end.
    #[error("a payload field runs past the end of the payload")]
    FieldOverrun,
    /// Bytes follow the payload's last field.
    #[error("{extra} bytes follow the payload's last field")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// An authorization token is longer than [`MAX_AUTHZ_LEN`].
    #[error("authorization token of {len} bytes exceeds the cap")]
    AuthzTooLarge {
        /// The token's length.
        len: usize,
    },
    /// A chunk size is not a multiple of 64 between 64 bytes and 64 MiB.
    #[error("invalid chunk size {chunk_size}")]
    BadChunkSize {
        /// The refused size.
        chunk_size: u32,
    },
    /// A chunk header announces 0 bytes or more than [`MAX_CHUNK_SIZE`].
    #[error("invalid chunk length {len}")]
    BadChunkLength {
        /// The announced length.
        len: u32,
    },
    /// A bitfield counts more than [`MAX_CHUNKS`] chunks.
    #[error("bitfield of {count} chunks exceeds the cap")]
    TooManyChunks {
        /// The announced count.
        count: u32,
    },
    /// A bitfield's byte length is not `ceil(count / 8)`.
    #[error("bitfield of {count} bits has {len} bytes")]
    BitfieldLength {
        /// The bit count.
        count: u32,
        /// The byte length found.
        len: usize,
    },
    /// A bitfield has a bit set past its count.
    #[error("bitfield has bits set past its count")]
    BitfieldTrailingBits,
    /// An error message is not valid UTF-8.
    #[error("error message is not UTF-8")]
    InvalidUtf8,
    /// A site name is not one [`valid_site`] accepts.
    #[error("invalid site name")]
    BadSite,
}

/// A message header: the kind and the payload length, already checked against the kind's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The kind byte.
    pub kind: u8,
    /// The payload length.
    pub payload_len: u32,
}

impl Header {
    /// The length of the whole framed message: header and payload.
    pub fn message_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }
}

/// A request, sent by the peer that wants something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The first message on a connection: a proof (an HMAC the node computes) that the sender
    /// belongs to the cluster.
    Auth {
        /// The proof.
        proof: [u8; 32],
    },
    /// Asks for the midstate table of a blob cut into the chunks
    /// [`crate::chunk::chunk_size_for`] gives its size and `max_chunk_size` (the asker need not
    /// know the size: the table tells it).
    Table {
        /// The blob's sha256 digest.
        digest: [u8; 32],
        /// The asker's configured (largest) chunk size.
        max_chunk_size: u32,
        /// An opaque authorization token for a private blob (empty: none), at most
        /// [`MAX_AUTHZ_LEN`] bytes.
        authz: Vec<u8>,
    },
    /// Asks for one chunk.
    Chunk {
        /// The blob's sha256 digest.
        digest: [u8; 32],
        /// The chunk size.
        chunk_size: u32,
        /// The chunk's index.
        index: u32,
        /// An opaque authorization token for a private blob (empty: none), at most
        /// [`MAX_AUTHZ_LEN`] bytes.
        authz: Vec<u8>,
    },
    /// Asks which chunks of a blob the peer holds verified.
    Have {
        /// The blob's sha256 digest.
        digest: [u8; 32],
        /// The chunk size.
        chunk_size: u32,
    },
    /// Asks which chunks of a blob the peer holds verified, and to be told again whenever that
    /// changes (a subscription: see the module documentation). Replaces polling with
    /// [`Request::Have`]: a chunk a provider verifies reaches its followers one trip later.
    Watch {
        /// The blob's sha256 digest.
        digest: [u8; 32],
        /// The chunk size.
        chunk_size: u32,
    },
}

/// A response, the answer on the request's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The [`Request::Auth`] proof is accepted.
    AuthOk {
        /// The answering node's site (`--site`; empty: none), see [`valid_site`]. Downloads
        /// treat peers of another site as far (`swarm::Download::set_peer_far`).
        site: String,
    },
    /// The encoded midstate table ([`crate::chunk::MidstateTable::encode`]); the receiver decodes
    /// and checks it.
    Table {
        /// The encoded table.
        table: Vec<u8>,
    },
    /// Chunk `index` follows: exactly `len` raw bytes after this message on the stream.
    ChunkHeader {
        /// The chunk's index.
        index: u32,
        /// The number of raw bytes that follow.
        len: u32,
    },
    /// The chunks the peer holds verified.
    Have {
        /// One bit per chunk of the blob.
        bitfield: Bitfield,
    },
    /// The peer does not have what was asked for.
    NotFound,
    /// The peer is overloaded: ask again after `retry_after_ms`, or elsewhere.
    Busy {
        /// How long to wait before asking this peer again, in milliseconds.
        retry_after_ms: u32,
    },
    /// The peer refuses: the connection is not authenticated, or the authorization token does not
    /// grant access to the blob.
    Denied,
    /// The request failed; the message is for logs only.
    Error {
        /// What went wrong, at most [`MAX_ERROR_LEN`] bytes ([`Response::encode`] truncates longer
        /// messages at a character boundary).
        message: String,
    },
}

/// Reads big-endian fields off the front of a payload.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(WireError::FieldOverrun);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        self.array().map(u32::from_be_bytes)
    }

    fn chunk_size(&mut self) -> Result<u32, WireError> {
        let chunk_size = self.u32()?;
        ChunkLayout::new(0, chunk_size).map_err(|_| WireError::BadChunkSize { chunk_size })?;
        Ok(chunk_size)
    }

    fn authz(&mut self) -> Result<Vec<u8>, WireError> {
        let len = usize::from(self.u16()?);
        if len > MAX_AUTHZ_LEN {
            return Err(WireError::AuthzTooLarge { len });
        }
        Ok(self.take(len)?.to_vec())
    }

    fn finish(self) -> Result<(), WireError> {
        match self.rest.len() {
            0 => Ok(()),
            extra => Err(WireError::TrailingBytes { extra }),
        }
    }
}

/// Parses and checks a header against the per-kind bounds given by `bounds`.
fn decode_header(
    bytes: &[u8],
    bounds: fn(u8) -> Option<(usize, usize)>,
) -> Result<Header, WireError> {
    let Some(head) = bytes.get(..HEADER_LEN) else {
        return Err(WireError::Truncated {
            needed: HEADER_LEN - bytes.len(),
        });
    };
    let magic = u16::from_be_bytes([head[0], head[1]]);
    if magic != MAGIC {
        return Err(WireError::BadMagic { found: magic });
    }
    if head[2] != VERSION {
        return Err(WireError::UnsupportedVersion { found: head[2] });
    }
    let kind = head[3];
    let payload_len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    let (min, max) = bounds(kind).ok_or(WireError::UnknownKind { kind })?;
    if payload_len as usize > max {
        return Err(WireError::TooLarge {
            kind,
            len: payload_len,
            max,
        });
    }
    if (payload_len as usize) < min {
        return Err(WireError::TooShort {
            kind,
            len: payload_len,
        });
    }
    Ok(Header { kind, payload_len })
}

/// Splits a buffer into a checked header and exactly its payload.
fn split_message(
    bytes: &[u8],
    bounds: fn(u8) -> Option<(usize, usize)>,
) -> Result<(Header, &[u8]), WireError> {
    let header = decode_header(bytes, bounds)?;
    let end = header.message_len();
    let Some(payload) = bytes.get(HEADER_LEN..end) else {
        return Err(WireError::Truncated {
            needed: end - bytes.len(),
        });
    };
    Ok((header, payload))
}

/// Checks that a payload has the length its header declared, within its kind's `bounds`.
fn check_payload_len(
    header: Header,
    payload: &[u8],
    bounds: fn(u8) -> Option<(usize, usize)>,
) -> Result<(), WireError> {
    let (min, max) = bounds(header.kind).ok_or(WireError::UnknownKind { kind: header.kind })?;
    let declared = header.payload_len as usize;
    match payload.len().cmp(&declared) {
        core::cmp::Ordering::Less => {
            return Err(WireError::Truncated {
                needed: declared - payload.len(),
            })
        }
        core::cmp::Ordering::Greater => {
            return Err(WireError::TrailingBytes {
                extra: payload.len() - declared,
            })
        }
        core::cmp::Ordering::Equal => {}
    }
    if payload.len() > max {
        return Err(WireError::TooLarge {
            kind: header.kind,
            len: header.payload_len,
            max,
        });
    }
    if payload.len() < min {
        return Err(WireError::TooShort {
            kind: header.kind,
            len: header.payload_len,
        });
    }
    Ok(())
}

/// Writes a header and reserves room for the payload.
fn start_message(kind: u8, payload_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload_len);
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.push(VERSION);
    out.push(kind);
    // Every payload the encoders write is capped far below 4 GiB (see `validate`); saturate rather
    // than wrap so that an oversized one is refused by the peer rather than misread.
    out.extend_from_slice(&u32::try_from(payload_len).unwrap_or(u32::MAX).to_be_bytes());
    out
}

/// Appends a u16 length prefix and the token (a token above `u16::MAX` bytes is cut there; such a
/// token fails [`Request::validate`] anyway).
fn put_authz(out: &mut Vec<u8>, authz: &[u8]) {
    let len = u16::try_from(authz.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&authz[..usize::from(len)]);
}

/// The longest prefix of `message` of at most [`MAX_ERROR_LEN`] bytes that ends on a character
/// boundary.
fn truncate_error(message: &str) -> &str {
    let mut end = message.len().min(MAX_ERROR_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

impl Request {
    /// The payload bounds (inclusive) of a request kind, or `None` for a kind that is not a
    /// request.
    fn bounds(kind: u8) -> Option<(usize, usize)> {
        Some(match kind {
            kind::AUTH => (32, 32),
            kind::TABLE => (TABLE_REQUEST_FIXED, TABLE_REQUEST_FIXED + MAX_AUTHZ_LEN),
            kind::CHUNK => (CHUNK_REQUEST_FIXED, CHUNK_REQUEST_FIXED + MAX_AUTHZ_LEN),
            kind::HAVE | kind::WATCH => (HAVE_REQUEST_LEN, HAVE_REQUEST_LEN),
            _ => return None,
        })
    }

    /// The message's kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Request::Auth { .. } => kind::AUTH,
            Request::Table { .. } => kind::TABLE,
            Request::Chunk { .. } => kind::CHUNK,
            Request::Have { .. } => kind::HAVE,
            Request::Watch { .. } => kind::WATCH,
        }
    }

    /// Checks the caps a decoder enforces: a chunk size valid for a [`ChunkLayout`] and an
    /// authorization token of at most [`MAX_AUTHZ_LEN`] bytes. [`Request::encode`] of a request
    /// that fails this produces bytes the peer refuses.
    pub fn validate(&self) -> Result<(), WireError> {
        let (chunk_size, authz) = match self {
            Request::Auth { .. } => return Ok(()),
            Request::Table {
                max_chunk_size: chunk_size,
                authz,
                ..
            }
            | Request::Chunk {
                chunk_size, authz, ..
            } => (*chunk_size, &authz[..]),
            Request::Have { chunk_size, .. } | Request::Watch { chunk_size, .. } => {
                (*chunk_size, &[][..])
            }
        };
        if ChunkLayout::new(0, chunk_size).is_err() {
            return Err(WireError::BadChunkSize { chunk_size });
        }
        if authz.len() > MAX_AUTHZ_LEN {
            return Err(WireError::AuthzTooLarge { len: authz.len() });
        }
        Ok(())
    }

    /// The framed message: header and payload.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Auth { proof } => {
                let mut out = start_message(kind::AUTH, 32);
                out.extend_from_slice(proof);
                out
            }
            Request::Table {
                digest,
                max_chunk_size: chunk_size,
                authz,
            } => {
                let authz = &authz[..authz.len().min(usize::from(u16::MAX))];
                let mut out = start_message(kind::TABLE, TABLE_REQUEST_FIXED + authz.len());
                out.extend_from_slice(digest);
                out.extend_from_slice(&chunk_size.to_be_bytes());
                put_authz(&mut out, authz);
                out
            }
            Request::Chunk {
                digest,
                chunk_size,
                index,
                authz,
            } => {
                let authz = &authz[..authz.len().min(usize::from(u16::MAX))];
                let mut out = start_message(kind::CHUNK, CHUNK_REQUEST_FIXED + authz.len());
                out.extend_from_slice(digest);
                out.extend_from_slice(&chunk_size.to_be_bytes());
                out.extend_from_slice(&index.to_be_bytes());
                put_authz(&mut out, authz);
                out
            }
            Request::Have { digest, chunk_size } | Request::Watch { digest, chunk_size } => {
                let mut out = start_message(self.kind(), HAVE_REQUEST_LEN);
                out.extend_from_slice(digest);
                out.extend_from_slice(&chunk_size.to_be_bytes());
                out
            }
        }
    }

    /// Parses and checks a request header: magic, version, a request kind, and a payload length
    /// within that kind's bounds. Reads only the first [`HEADER_LEN`] bytes of `bytes`.
    pub fn decode_header(bytes: &[u8]) -> Result<Header, WireError> {
        decode_header(bytes, Request::bounds)
    }

    /// Parses the payload of a request whose header was checked by [`Request::decode_header`];
    /// `payload` must be exactly the declared length.
    pub fn decode_payload(header: Header, payload: &[u8]) -> Result<Request, WireError> {
        check_payload_len(header, payload, Request::bounds)?;
        let mut r = Reader { rest: payload };
        let request = match header.kind {
            kind::AUTH => Request::Auth { proof: r.array()? },
            kind::TABLE => Request::Table {
                digest: r.array()?,
                max_chunk_size: r.chunk_size()?,
                authz: r.authz()?,
            },
            kind::CHUNK => Request::Chunk {
                digest: r.array()?,
                chunk_size: r.chunk_size()?,
                index: r.u32()?,
                authz: r.authz()?,
            },
            kind::HAVE => Request::Have {
                digest: r.array()?,
                chunk_size: r.chunk_size()?,
            },
            _ => Request::Watch {
                digest: r.array()?,
                chunk_size: r.chunk_size()?,
            },
        };
        r.finish()?;
        Ok(request)
    }

    /// Parses one request from the front of `bytes`: the request and the number of bytes it used
    /// (whatever follows is left alone). Never panics.
    pub fn decode(bytes: &[u8]) -> Result<(Request, usize), WireError> {
        let (header, payload) = split_message(bytes, Request::bounds)?;
        Ok((
            Request::decode_payload(header, payload)?,
            header.message_len(),
        ))
    }
}

impl Response {
    /// The payload bounds (inclusive) of a response kind, or `None` for a kind that is not a
    /// response.
    fn bounds(kind: u8) -> Option<(usize, usize)> {
        Some(match kind {
            kind::AUTH_OK => (0, MAX_SITE_LEN),
            kind::NOT_FOUND | kind::DENIED => (0, 0),
            kind::TABLE_DATA => (TABLE_HEADER_LEN, MAX_ENCODED_TABLE_LEN),
            kind::CHUNK_HEADER => (8, 8),
            kind::HAVE_DATA => (4, MAX_HAVE_PAYLOAD_LEN),
            kind::BUSY => (4, 4),
            kind::ERROR => (0, MAX_ERROR_LEN),
            _ => return None,
        })
    }

    /// A [`Response::Error`] carrying `message`, truncated to [`MAX_ERROR_LEN`] bytes at a
    /// character boundary.
    pub fn error(message: &str) -> Response {
        Response::Error {
            message: truncate_error(message).to_owned(),
        }
    }

    /// The message's kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Response::AuthOk { .. } => kind::AUTH_OK,
            Response::Table { .. } => kind::TABLE_DATA,
            Response::ChunkHeader { .. } => kind::CHUNK_HEADER,
            Response::Have { .. } => kind::HAVE_DATA,
            Response::NotFound => kind::NOT_FOUND,
            Response::Busy { .. } => kind::BUSY,
            Response::Denied => kind::DENIED,
            Response::Error { .. } => kind::ERROR,
        }
    }

    /// Checks the caps a decoder enforces: a table of [`TABLE_HEADER_LEN`] to
    /// [`MAX_ENCODED_TABLE_LEN`] bytes, a chunk length of 1 to [`MAX_CHUNK_SIZE`], a bitfield of
    /// at most [`MAX_CHUNKS`] bits. [`Response::encode`] of a response that fails this produces
    /// bytes the peer refuses. (A long error message is truncated, not refused.)
    pub fn validate(&self) -> Result<(), WireError> {
        match self {
            Response::Table { table } => {
                let len = u32::try_from(table.len()).unwrap_or(u32::MAX);
                if table.len() > MAX_ENCODED_TABLE_LEN {
                    return Err(WireError::TooLarge {
                        kind: kind::TABLE_DATA,
                        len,
                        max: MAX_ENCODED_TABLE_LEN,
                    });
                }
                if table.len() < TABLE_HEADER_LEN {
                    return Err(WireError::TooShort {
                        kind: kind::TABLE_DATA,
                        len,
                    });
                }
            }
            Response::ChunkHeader { len, .. } if *len == 0 || *len > MAX_CHUNK_SIZE => {
                return Err(WireError::BadChunkLength { len: *len });
            }
            Response::Have { bitfield } if bitfield.len() > MAX_CHUNKS => {
                return Err(WireError::TooManyChunks {
                    count: bitfield.len(),
                });
            }
            Response::AuthOk { site } if !valid_site(site) => return Err(WireError::BadSite),
            _ => {}
        }
        Ok(())
    }

    /// The framed message: header and payload. For a [`Response::ChunkHeader`], the caller then
    /// writes the `len` raw chunk bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Response::NotFound | Response::Denied => start_message(self.kind(), 0),
            Response::AuthOk { site } => {
                let mut out = start_message(kind::AUTH_OK, site.len());
                out.extend_from_slice(site.as_bytes());
                out
            }
            Response::Table { table } => {
                let mut out = start_message(kind::TABLE_DATA, table.len());
                out.extend_from_slice(table);
                out
            }
            Response::ChunkHeader { index, len } => {
                let mut out = start_message(kind::CHUNK_HEADER, 8);
                out.extend_from_slice(&index.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
                out
            }
            Response::Have { bitfield } => {
                let bytes = bitfield.as_bytes();
                let mut out = start_message(kind::HAVE_DATA, 4 + bytes.len());
                out.extend_from_slice(&bitfield.len().to_be_bytes());
                out.extend_from_slice(bytes);
                out
            }
            Response::Busy { retry_after_ms } => {
                let mut out = start_message(kind::BUSY, 4);
                out.extend_from_slice(&retry_after_ms.to_be_bytes());
                out
            }
            Response::Error { message } => {
                let message = truncate_error(message);
                let mut out = start_message(kind::ERROR, message.len());
                out.extend_from_slice(message.as_bytes());
                out
            }
        }
    }

    /// Parses and checks a response header: magic, version, a response kind, and a payload length
    /// within that kind's bounds. Reads only the first [`HEADER_LEN`] bytes of `bytes`.
    pub fn decode_header(bytes: &[u8]) -> Result<Header, WireError> {
        decode_header(bytes, Response::bounds)
    }

    /// Parses the payload of a response whose header was checked by [`Response::decode_header`];
    /// `payload` must be exactly the declared length.
    pub fn decode_payload(header: Header, payload: &[u8]) -> Result<Response, WireError> {
        check_payload_len(header, payload, Response::bounds)?;
        let mut r = Reader { rest: payload };
        let response = match header.kind {
            kind::AUTH_OK => {
                let site =
                    std::str::from_utf8(r.take(payload.len())?).map_err(|_| WireError::BadSite)?;
                if !valid_site(site) {
                    return Err(WireError::BadSite);
                }
                Response::AuthOk {
                    site: site.to_owned(),
                }
            }
            kind::NOT_FOUND => Response::NotFound,
            kind::DENIED => Response::Denied,
            kind::TABLE_DATA => Response::Table {
                table: r.take(payload.len())?.to_vec(),
            },
            kind::CHUNK_HEADER => {
                let index = r.u32()?;
                let len = r.u32()?;
                if len == 0 || len > MAX_CHUNK_SIZE {
                    return Err(WireError::BadChunkLength { len });
                }
                Response::ChunkHeader { index, len }
            }
            kind::HAVE_DATA => {
                let count = r.u32()?;
                if count > MAX_CHUNKS {
                    return Err(WireError::TooManyChunks { count });
                }
                let bytes = r.take(r.rest.len())?;
                Response::Have {
                    bitfield: Bitfield::from_bytes(count, bytes.to_vec())?,
                }
            }
            kind::BUSY => Response::Busy {
                retry_after_ms: r.u32()?,
            },
            _ => {
                let bytes = r.take(payload.len())?;
                let message = core::str::from_utf8(bytes).map_err(|_| WireError::InvalidUtf8)?;
                Response::Error {
                    message: message.to_owned(),
                }
            }
        };
        r.finish()?;
        Ok(response)
    }

    /// Parses one response from the front of `bytes`: the response and the number of bytes it used.
    /// After a [`Response::ChunkHeader`], the raw chunk bytes start at that offset. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<(Response, usize), WireError> {
        let (header, payload) = split_message(bytes, Response::bounds)?;
        Ok((
            Response::decode_payload(header, payload)?,
            header.message_len(),
        ))
    }
}

/// One bit per chunk of a blob, most significant bit first: chunk `i` is bit `7 - i % 8` of byte
/// `i / 8`. Bits past the count are always zero.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bitfield {
    bytes: Vec<u8>,
    len: u32,
    ones: u32,
}

impl Bitfield {
    /// A bitfield of `len` bits, all clear.
    pub fn new(len: u32) -> Bitfield {
        Bitfield {
            bytes: vec![0; len.div_ceil(8) as usize],
            len,
            ones: 0,
        }
    }

    /// A bitfield of `len` bits, all set.
    pub fn full(len: u32) -> Bitfield {
        let mut bytes = vec![0xff; len.div_ceil(8) as usize];
        let used = len % 8;
        if let (Some(last), 1..) = (bytes.last_mut(), used) {
            *last = 0xff << (8 - used);
        }
        Bitfield {
            bytes,
            len,
            ones: len,
        }
    }

    /// A bitfield of `len` bits from its bytes, which must number `ceil(len / 8)` with every bit
    /// past `len` clear.
    pub fn from_bytes(len: u32, bytes: Vec<u8>) -> Result<Bitfield, WireError> {
        if bytes.len() != len.div_ceil(8) as usize {
            return Err(WireError::BitfieldLength {
                count: len,
                len: bytes.len(),
            });
        }
        let used = len % 8;
        if let (Some(last), 1..) = (bytes.last(), used) {
            if last & (0xff >> used) != 0 {
                return Err(WireError::BitfieldTrailingBits);
            }
        }
        let ones = bytes.iter().map(|b| b.count_ones()).sum();
        Ok(Bitfield { bytes, len, ones })
    }

    /// The number of bits (chunks).
    pub fn len(&self) -> u32 {
        self.len
    }

    /// True for a bitfield of no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of set bits.
    pub fn count_ones(&self) -> u32 {
        self.ones
    }

    /// True when every bit is set (vacuously for no bits).
    pub fn is_full(&self) -> bool {
        self.ones == self.len
    }

    /// Bit `index`; false past the end.
    pub fn get(&self, index: u32) -> bool {
        index < self.len && self.bytes[(index / 8) as usize] & (0x80 >> (index % 8)) != 0
    }

    /// Sets bit `index`: true if it was clear. Past the end nothing changes and the result is
    /// false.
    pub fn set(&mut self, index: u32) -> bool {
        if index >= self.len || self.get(index) {
            return false;
        }
        self.bytes[(index / 8) as usize] |= 0x80 >> (index % 8);
        self.ones += 1;
        true
    }

    /// Clears bit `index`: true if it was set.
    pub fn clear(&mut self, index: u32) -> bool {
        if !self.get(index) {
            return false;
        }
        self.bytes[(index / 8) as usize] &= !(0x80 >> (index % 8));
        self.ones -= 1;
        true
    }

    /// The indices of the set bits, in increasing order (skips zero bytes whole).
    pub fn iter_ones(&self) -> impl Iterator<Item = u32> + '_ {
        (0u32..)
            .zip(&self.bytes)
            .filter(|(_, &b)| b != 0)
            .flat_map(|(i, &b)| {
                (0..8u32)
                    .filter(move |bit| b & (0x80 >> bit) != 0)
                    .map(move |bit| i * 8 + bit)
            })
    }

    /// The wire bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// A fuzz target body for the request decoder: decodes arbitrary bytes and, when they decode,
/// checks the canonical round trip and that the incremental path agrees. Panics only if an
/// invariant is broken.
#[doc(hidden)]
pub fn fuzz_decode_request(bytes: &[u8]) {
    let whole = Request::decode(bytes);
    if let Ok(header) = Request::decode_header(bytes) {
        assert!(header.message_len() <= MAX_REQUEST_LEN);
        if let Some(payload) = bytes.get(HEADER_LEN..header.message_len()) {
            let parts = Request::decode_payload(header, payload);
            assert_eq!(parts, whole.clone().map(|(r, _)| r));
        }
    }
    if let Ok((request, used)) = whole {
        assert_eq!(
            request.encode(),
            &bytes[..used],
            "decoding is not canonical"
        );
        assert_eq!(request.validate(), Ok(()));
    }
}

/// A fuzz target body for the response decoder: decodes arbitrary bytes and, when they decode,
/// checks the canonical round trip and that the incremental path agrees. Panics only if an
/// invariant is broken.
#[doc(hidden)]
pub fn fuzz_decode_response(bytes: &[u8]) {
    let whole = Response::decode(bytes);
    if let Ok(header) = Response::decode_header(bytes) {
        assert!(header.message_len() <= MAX_RESPONSE_LEN);
        if let Some(payload) = bytes.get(HEADER_LEN..header.message_len()) {
            let parts = Response::decode_payload(header, payload);
            assert_eq!(parts, whole.clone().map(|(r, _)| r));
        }
    }
    if let Ok((response, used)) = whole {
        assert_eq!(
            response.encode(),
            &bytes[..used],
            "decoding is not canonical"
        );
        assert_eq!(response.validate(), Ok(()));
        if let Response::Have { bitfield } = &response {
            let ones: Vec<u32> = bitfield.iter_ones().collect();
            assert_eq!(ones.len(), bitfield.count_ones() as usize);
            assert!(ones.iter().all(|&i| bitfield.get(i)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::MidstateTable;
    use proptest::prelude::*;

    const D: [u8; 32] = [0xab; 32];

    fn request_hex(r: &Request) -> String {
        hex::encode(r.encode())
    }

    fn response_hex(r: &Response) -> String {
        hex::encode(r.encode())
    }

    #[test]
    fn golden_requests() {
        let cases: [(Request, &str); 7] = [
            (
                Request::Auth { proof: [0x11; 32] },
                concat!(
                    "5348",
                    "01",
                    "01",
                    "00000020",
                    "1111111111111111111111111111111111111111111111111111111111111111"
                ),
            ),
            (
                Request::Table {
                    digest: D,
                    max_chunk_size: 4 << 20,
                    authz: vec![],
                },
                concat!(
                    "5348",
                    "01",
                    "02",
                    "00000026",
                    "abababababababababababababababababababababababababababababababab",
                    "00400000",
                    "0000"
                ),
            ),
            (
                Request::Table {
                    digest: D,
                    max_chunk_size: 64,
                    authz: b"tok".to_vec(),
                },
                concat!(
                    "5348",
                    "01",
                    "02",
                    "00000029",
                    "abababababababababababababababababababababababababababababababab",
                    "00000040",
                    "0003",
                    "746f6b"
                ),
            ),
            (
                Request::Chunk {
                    digest: D,
                    chunk_size: 4 << 20,
                    index: 0x0102_0304,
                    authz: vec![],
                },
                concat!(
                    "5348",
                    "01",
                    "03",
                    "0000002a",
                    "abababababababababababababababababababababababababababababababab",
                    "00400000",
                    "01020304",
                    "0000"
                ),
            ),
            (
                Request::Chunk {
                    digest: D,
                    chunk_size: 128,
                    index: 7,
                    authz: vec![0xff, 0x00],
                },
                concat!(
                    "5348",
                    "01",
                    "03",
                    "0000002c",
                    "abababababababababababababababababababababababababababababababab",
                    "00000080",
                    "00000007",
                    "0002",
                    "ff00"
                ),
            ),
            (
                Request::Have {
                    digest: D,
                    chunk_size: 4 << 20,
                },
                concat!(
                    "5348",
                    "01",
                    "04",
                    "00000024",
                    "abababababababababababababababababababababababababababababababab",
                    "00400000"
                ),
            ),
            (
                Request::Watch {
                    digest: D,
                    chunk_size: 4 << 20,
                },
                concat!(
                    "5348",
                    "01",
                    "05",
                    "00000024",
                    "abababababababababababababababababababababababababababababababab",
                    "00400000"
                ),
            ),
        ];
        for (request, expected) in cases {
            assert_eq!(request_hex(&request), expected, "{request:?}");
            let bytes = hex::decode(expected).unwrap();
            assert_eq!(Request::decode(&bytes), Ok((request, bytes.len())));
        }
    }

    #[test]
    fn golden_responses() {
        let mut bits = Bitfield::new(10);
        bits.set(0);
        bits.set(2);
        bits.set(9);
        // The table of chunk.rs's golden test: bytes 0..200 in chunks of 64.
        let data: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        let table = MidstateTable::compute(&data, 64).unwrap().encode();
        let cases: [(Response, String); 11] = [
            // No site: the bytes of the time before sites.
            (
                Response::AuthOk {
                    site: String::new(),
                },
                "5348018100000000".into(),
            ),
            (
                Response::AuthOk {
                    site: "edge-7".into(),
                },
                concat!("5348", "01", "81", "00000006", "656467652d37").into(),
            ),
            (
                Response::Table {
                    table: table.clone(),
                },
                concat!(
                    "53480182",
                    "0000006d",
                    "01",
                    "00000000000000c8",
                    "00000040",
                    "fc99a2df88f42a7a7bb9d18033cdc6a20256755f9d5b9a5044a9cc315abe84a7",
                    "593253adfb4cc018be611395485e47c15a5b271dfb8da14fe8f77fb4d05eacbc",
                    "2bed68b99987cae48183b2b049d393d0050868e4e8ba3730e9112b08765929b7",
                )
                .into(),
            ),
            (
                Response::ChunkHeader {
                    index: 3,
                    len: 4 << 20,
                },
                "53480183000000080000000300400000".into(),
            ),
            (
                Response::Have { bitfield: bits },
                // count 10; bits 0, 2 -> 1010_0000; bit 9 -> 0100_0000.
                "53480184000000060000000aa040".into(),
            ),
            (
                Response::Have {
                    bitfield: Bitfield::new(0),
                },
                "534801840000000400000000".into(),
            ),
            (Response::NotFound, "5348018500000000".into()),
            (
                Response::Busy {
                    retry_after_ms: 1500,
                },
                "5348018600000004000005dc".into(),
            ),
            (Response::Denied, "5348018700000000".into()),
            (
                Response::error("no"),
                "5348018800000002".to_owned() + "6e6f",
            ),
            (Response::error(""), "5348018800000000".into()),
        ];
        for (response, expected) in cases {
            assert_eq!(response_hex(&response), expected, "{response:?}");
            let bytes = hex::decode(&expected).unwrap();
            assert_eq!(Response::decode(&bytes), Ok((response, bytes.len())));
        }
    }

    #[test]
    fn header_refusals() {
        let good = Request::Have {
            digest: D,
            chunk_size: 64,
        }
        .encode();
        let mut bad = good.clone();
        bad[0] = 0x48;
        assert_eq!(
            Request::decode(&bad),
            Err(WireError::BadMagic { found: 0x4848 })
        );
        let mut bad = good.clone();
        bad[2] = 2;
        assert_eq!(
            Request::decode(&bad),
            Err(WireError::UnsupportedVersion { found: 2 })
        );
        assert_eq!(
            Request::decode_header(&bad[..8]),
            Err(WireError::UnsupportedVersion { found: 2 })
        );
        // A response kind is not a request, and the other way round.
        assert_eq!(
            Request::decode(
                &Response::AuthOk {
                    site: String::new()
                }
                .encode()
            ),
            Err(WireError::UnknownKind { kind: 0x81 })
        );
        assert_eq!(
            Response::decode(&good),
            Err(WireError::UnknownKind { kind: 0x04 })
        );
        assert_eq!(
            Request::decode(&good[..5]),
            Err(WireError::Truncated { needed: 3 })
        );
        assert_eq!(
            Request::decode(&good[..good.len() - 1]),
            Err(WireError::Truncated { needed: 1 })
        );
        assert_eq!(
            Request::decode(&[]),
            Err(WireError::Truncated { needed: 8 })
        );
    }

    #[test]
    fn oversize_refusals() {
        // Oversize for the kind is refused from the header alone, before any payload is read.
        let header = |kind: u8, len: u32| {
            let mut h = vec![0x53, 0x48, 1, kind];
            h.extend_from_slice(&len.to_be_bytes());
            h
        };
        assert_eq!(
            Request::decode_header(&header(0x04, 37)),
            Err(WireError::TooLarge {
                kind: 4,
                len: 37,
                max: 36
            })
        );
        assert_eq!(
            Request::decode_header(&header(0x02, u32::MAX)),
            Err(WireError::TooLarge {
                kind: 2,
                len: u32::MAX,
                max: 38 + MAX_AUTHZ_LEN
            })
        );
        assert_eq!(
            Response::decode_header(&header(0x82, MAX_ENCODED_TABLE_LEN as u32 + 1)),
            Err(WireError::TooLarge {
                kind: 0x82,
                len: MAX_ENCODED_TABLE_LEN as u32 + 1,
                max: MAX_ENCODED_TABLE_LEN
            })
        );
        assert_eq!(
            Response::decode_header(&header(0x88, 257)),
            Err(WireError::TooLarge {
                kind: 0x88,
                len: 257,
                max: 256
            })
        );
        assert_eq!(
            Response::decode_header(&header(0x85, 1)),
            Err(WireError::TooLarge {
                kind: 0x85,
                len: 1,
                max: 0
            })
        );
        assert_eq!(
            Response::decode_header(&header(0x86, 3)),
            Err(WireError::TooShort { kind: 0x86, len: 3 })
        );
        assert!(Response::decode_header(&header(0x82, MAX_ENCODED_TABLE_LEN as u32)).is_ok());
        // An authz length prefix above the cap, inside a payload that fits the kind.
        let mut chunk = Request::Chunk {
            digest: D,
            chunk_size: 64,
            index: 0,
            authz: vec![],
        }
        .encode();
        chunk[48..50].copy_from_slice(&0x2001u16.to_be_bytes());
        assert_eq!(
            Request::decode(&chunk),
            Err(WireError::AuthzTooLarge { len: 0x2001 })
        );
        let too_long = Request::Table {
            digest: D,
            max_chunk_size: 64,
            authz: vec![1; MAX_AUTHZ_LEN + 1],
        };
        assert_eq!(
            too_long.validate(),
            Err(WireError::AuthzTooLarge {
                len: MAX_AUTHZ_LEN + 1
            })
        );
        assert!(matches!(
            Request::decode(&too_long.encode()),
            Err(WireError::TooLarge { .. })
        ));
        let max = Request::Chunk {
            digest: D,
            chunk_size: 64,
            index: 0,
            authz: vec![1; MAX_AUTHZ_LEN],
        };
        assert_eq!(max.encode().len(), MAX_REQUEST_LEN);
        assert_eq!(Request::decode(&max.encode()).unwrap().0, max);
        // Long error messages are cut at a character boundary.
        let long = "é".repeat(200);
        let Response::Error { message } = Response::error(&long) else {
            unreachable!()
        };
        assert_eq!(message.len(), 256);
        let (decoded, _) = Response::decode(&Response::error(&long).encode()).unwrap();
        assert_eq!(
            decoded,
            Response::Error {
                message: "é".repeat(128)
            }
        );
        let odd = format!("x{long}");
        assert_eq!(
            Response::decode(
                &Response::Error {
                    message: odd.clone()
                }
                .encode()
            )
            .unwrap()
            .0,
            Response::Error {
                message: odd[..255].to_owned()
            }
        );
    }

    #[test]
    fn payload_refusals() {
        // Trailing bytes inside a payload: an authz length shorter than the rest.
        let mut table = Request::Table {
            digest: D,
            max_chunk_size: 64,
            authz: b"abcd".to_vec(),
        }
        .encode();
        table[44..46].copy_from_slice(&2u16.to_be_bytes());
        assert_eq!(
            Request::decode(&table),
            Err(WireError::TrailingBytes { extra: 2 })
        );
        // ... and longer than the rest.
        table[44..46].copy_from_slice(&9u16.to_be_bytes());
        assert_eq!(Request::decode(&table), Err(WireError::FieldOverrun));
        // Bytes after the message are not the message's: `decode` reports what it used.
        let mut two = Response::NotFound.encode();
        two.extend_from_slice(&Response::Denied.encode());
        assert_eq!(Response::decode(&two), Ok((Response::NotFound, 8)));
        assert_eq!(Response::decode(&two[8..]), Ok((Response::Denied, 8)));
        // The raw bytes after a chunk header are left for the caller.
        let mut chunk = Response::ChunkHeader { index: 1, len: 3 }.encode();
        chunk.extend_from_slice(b"xyz");
        let (_, used) = Response::decode(&chunk).unwrap();
        assert_eq!(&chunk[used..], b"xyz");
        // The incremental path refuses a payload of the wrong length.
        let busy = Response::Busy { retry_after_ms: 1 }.encode();
        let header = Response::decode_header(&busy).unwrap();
        assert_eq!(
            Response::decode_payload(header, &busy[8..11]),
            Err(WireError::Truncated { needed: 1 })
        );
        assert_eq!(
            Response::decode_payload(header, &[0; 5]),
            Err(WireError::TrailingBytes { extra: 1 })
        );
        assert_eq!(
            Response::decode_payload(header, &busy[8..]),
            Ok(Response::Busy { retry_after_ms: 1 })
        );
        // Field checks.
        let mut bad_size = Request::Have {
            digest: D,
            chunk_size: 64,
        }
        .encode();
        bad_size[40..44].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(
            Request::decode(&bad_size),
            Err(WireError::BadChunkSize { chunk_size: 100 })
        );
        for len in [0, MAX_CHUNK_SIZE + 1] {
            let bytes = Response::ChunkHeader { index: 0, len }.encode();
            assert_eq!(
                Response::decode(&bytes),
                Err(WireError::BadChunkLength { len })
            );
        }
        let have = |count: u32, bits: &[u8]| {
            let mut payload = count.to_be_bytes().to_vec();
            payload.extend_from_slice(bits);
            let mut out = vec![0x53, 0x48, 1, 0x84];
            out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            out.extend_from_slice(&payload);
            out
        };
        assert_eq!(
            Response::decode(&have(10, &[0xff, 0xc0])).unwrap().0,
            Response::Have {
                bitfield: Bitfield::full(10)
            }
        );
        assert_eq!(
            Response::decode(&have(10, &[0xff, 0xe0])),
            Err(WireError::BitfieldTrailingBits)
        );
        assert_eq!(
            Response::decode(&have(10, &[0xff])),
            Err(WireError::BitfieldLength { count: 10, len: 1 })
        );
        assert_eq!(
            Response::decode(&have(10, &[0xff, 0, 0])),
            Err(WireError::BitfieldLength { count: 10, len: 3 })
        );
        assert_eq!(
            Response::decode(&have(MAX_CHUNKS + 1, &[])),
            Err(WireError::TooManyChunks {
                count: MAX_CHUNKS + 1
            })
        );
        let full = Response::Have {
            bitfield: Bitfield::full(MAX_CHUNKS),
        };
        assert_eq!(full.encode().len(), HEADER_LEN + MAX_HAVE_PAYLOAD_LEN);
        assert_eq!(Response::decode(&full.encode()).unwrap().0, full);
        let mut utf8 = Response::error("ab").encode();
        utf8[9] = 0xff;
        assert_eq!(Response::decode(&utf8), Err(WireError::InvalidUtf8));
        // Site names: the charset and the cap.
        for bad in ["a b", "zone/1", "é"] {
            let r = Response::AuthOk { site: bad.into() };
            assert_eq!(r.validate(), Err(WireError::BadSite), "{bad}");
            assert_eq!(
                Response::decode(&r.encode()),
                Err(WireError::BadSite),
                "{bad}"
            );
        }
        let mut bad_utf8 = Response::AuthOk { site: "ab".into() }.encode();
        bad_utf8[9] = 0xff;
        assert_eq!(Response::decode(&bad_utf8), Err(WireError::BadSite));
        let longest = Response::AuthOk {
            site: "s".repeat(MAX_SITE_LEN),
        };
        assert_eq!(Response::decode(&longest.encode()).unwrap().0, longest);
        assert_eq!(
            Response::decode(
                &Response::AuthOk {
                    site: "s".repeat(MAX_SITE_LEN + 1)
                }
                .encode()
            ),
            Err(WireError::TooLarge {
                kind: 0x81,
                len: MAX_SITE_LEN as u32 + 1,
                max: MAX_SITE_LEN
            })
        );
        let short_table = {
            let mut out = vec![0x53, 0x48, 1, 0x82, 0, 0, 0, 12];
            out.extend_from_slice(&[0; 12]);
            out
        };
        assert_eq!(
            Response::decode(&short_table),
            Err(WireError::TooShort {
                kind: 0x82,
                len: 12
            })
        );
    }

    #[test]
    fn bitfield_basics() {
        let mut b = Bitfield::new(13);
        assert_eq!(b.as_bytes(), &[0, 0]);
        assert!(b.set(0) && b.set(12) && !b.set(12) && !b.set(13));
        assert_eq!(b.as_bytes(), &[0x80, 0x08]);
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 12]);
        assert_eq!(b.count_ones(), 2);
        assert!(b.get(12) && !b.get(11) && !b.get(13) && !b.get(u32::MAX));
        assert!(b.clear(0) && !b.clear(0) && !b.clear(99));
        assert_eq!(b.count_ones(), 1);
        assert!(!b.is_full());
        let f = Bitfield::full(13);
        assert_eq!(f.as_bytes(), &[0xff, 0xf8]);
        assert!(f.is_full());
        assert_eq!(f.iter_ones().count(), 13);
        assert_eq!(Bitfield::full(16).as_bytes(), &[0xff, 0xff]);
        assert!(Bitfield::full(0).is_full() && Bitfield::new(0).is_empty());
        assert_eq!(Bitfield::from_bytes(13, vec![0xff, 0xf8]), Ok(f));
        assert_eq!(
            Bitfield::from_bytes(13, vec![0xff, 0xfc]),
            Err(WireError::BitfieldTrailingBits)
        );
    }

    fn arb_digest() -> impl Strategy<Value = [u8; 32]> {
        any::<[u8; 32]>()
    }

    fn arb_chunk_size() -> impl Strategy<Value = u32> {
        (1u32..=(MAX_CHUNK_SIZE / 64)).prop_map(|b| b * 64)
    }

    fn arb_authz() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(vec![]),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(any::<u8>(), MAX_AUTHZ_LEN - 2..=MAX_AUTHZ_LEN),
        ]
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            any::<[u8; 32]>().prop_map(|proof| Request::Auth { proof }),
            (arb_digest(), arb_chunk_size(), arb_authz()).prop_map(
                |(digest, max_chunk_size, authz)| Request::Table {
                    digest,
                    max_chunk_size,
                    authz
                }
            ),
            (arb_digest(), arb_chunk_size(), any::<u32>(), arb_authz()).prop_map(
                |(digest, chunk_size, index, authz)| Request::Chunk {
                    digest,
                    chunk_size,
                    index,
                    authz
                }
            ),
            (arb_digest(), arb_chunk_size())
                .prop_map(|(digest, chunk_size)| Request::Have { digest, chunk_size }),
            (arb_digest(), arb_chunk_size())
                .prop_map(|(digest, chunk_size)| Request::Watch { digest, chunk_size }),
        ]
    }

    fn arb_bitfield() -> impl Strategy<Value = Bitfield> {
        (0u32..300, any::<u64>()).prop_map(|(len, seed)| {
            let mut b = Bitfield::new(len);
            let mut x = seed | 1;
            for i in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x & 1 == 1 {
                    b.set(i);
                }
            }
            b
        })
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        prop_oneof![
            "[A-Za-z0-9._-]{0,64}".prop_map(|site| Response::AuthOk { site }),
            proptest::collection::vec(any::<u8>(), TABLE_HEADER_LEN..200)
                .prop_map(|table| Response::Table { table }),
            (any::<u32>(), 1..=MAX_CHUNK_SIZE)
                .prop_map(|(index, len)| Response::ChunkHeader { index, len }),
            arb_bitfield().prop_map(|bitfield| Response::Have { bitfield }),
            Just(Response::NotFound),
            any::<u32>().prop_map(|retry_after_ms| Response::Busy { retry_after_ms }),
            Just(Response::Denied),
            "\\PC{0,64}".prop_map(|m| Response::error(&m)),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(request in arb_request(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            prop_assert_eq!(request.validate(), Ok(()));
            let mut bytes = request.encode();
            let len = bytes.len();
            prop_assert!(len <= MAX_REQUEST_LEN);
            let header = Request::decode_header(&bytes).unwrap();
            prop_assert_eq!(header.message_len(), len);
            prop_assert_eq!(header.kind, request.kind());
            prop_assert_eq!(Request::decode_payload(header, &bytes[HEADER_LEN..]), Ok(request.clone()));
            bytes.extend_from_slice(&tail);
            prop_assert_eq!(Request::decode(&bytes), Ok((request, len)));
            fuzz_decode_request(&bytes);
            for cut in [0, 1, 7, 8, len - 1] {
                let truncated = matches!(
                    Request::decode(&bytes[..cut.min(len - 1)]),
                    Err(WireError::Truncated { .. })
                );
                prop_assert!(truncated, "a cut at {} is not truncated", cut);
            }
        }

        #[test]
        fn responses_round_trip(response in arb_response(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            prop_assert_eq!(response.validate(), Ok(()));
            let mut bytes = response.encode();
            let len = bytes.len();
            let header = Response::decode_header(&bytes).unwrap();
            prop_assert_eq!(header.message_len(), len);
            prop_assert_eq!(header.kind, response.kind());
            prop_assert_eq!(Response::decode_payload(header, &bytes[HEADER_LEN..]), Ok(response.clone()));
            bytes.extend_from_slice(&tail);
            prop_assert_eq!(Response::decode(&bytes), Ok((response, len)));
            fuzz_decode_response(&bytes);
        }

        #[test]
        fn bitfields_round_trip(b in arb_bitfield()) {
            let again = Bitfield::from_bytes(b.len(), b.as_bytes().to_vec()).unwrap();
            prop_assert_eq!(&again, &b);
            let ones: Vec<u32> = b.iter_ones().collect();
            prop_assert_eq!(ones.len() as u32, b.count_ones());
            prop_assert!((0..b.len()).all(|i| b.get(i) == ones.binary_search(&i).is_ok()));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            fuzz_decode_request(&bytes);
            fuzz_decode_response(&bytes);
        }

        #[test]
        fn decode_never_panics_past_a_valid_header(
            kind in prop_oneof![1u8..=4, 0x81u8..=0x88, any::<u8>()],
            len in prop_oneof![0u32..80, any::<u32>()],
            body in proptest::collection::vec(any::<u8>(), 0..120),
        ) {
            let mut bytes = vec![0x53, 0x48, 1, kind];
            bytes.extend_from_slice(&len.to_be_bytes());
            bytes.extend_from_slice(&body);
            fuzz_decode_request(&bytes);
            fuzz_decode_response(&bytes);
        }
    }
}
