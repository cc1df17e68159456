//! The fetching side: connect, authenticate, ask for tables, chunks and bitfields.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{Connection, ConnectionError, RecvStream, SendStream, TransportErrorCode, VarInt};
use shoal_protocol::chunk::{
    chunk_size_for, ChunkError, ChunkLayout, ChunkStreamVerifier, MidstateTable, TablePrefix,
};
use shoal_protocol::wire::{Bitfield, Request, Response, MAX_AUTHZ_LEN};
use shoal_protocol::Digest;
use tokio::time::timeout;

use super::auth::{exporter, ClusterKey, Role};
use super::frame::{self, FrameError};
use super::metrics::Metrics;
use super::{close, PeerConfig, SERVER_NAME};

/// Why a peer operation failed. Each variant says what the scheduler should make of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// A wait (handshake, opening a stream, a read or a write) exceeded the timeout: the peer is
    /// slow or gone. Try another peer; not proof of misbehaviour.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The peer declined the work for now: at its connection cap, or `Busy` over its serving
    /// budget. Ask again after `retry_after` (when given) or ask another peer.
    #[error("refused by the peer (retry after {retry_after:?})")]
    Refused {
        /// How long the peer asked us to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// Mutual authentication failed: the peer rejected our proof, or its proof did not verify
    /// (it does not hold the cluster key). Do not use this peer.
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    /// The peer does not have the blob (or no table for it at this chunk size).
    #[error("the peer does not have it")]
    NotFound,
    /// The blob is private and the peer's authorizer did not approve this request's token.
    #[error("denied by the peer")]
    Denied,
    /// The chunk is proven wrong: it fails between two trusted ends (the IV, the digest), or it
    /// has the wrong length. The peer sent bad bytes: blame it.
    #[error("chunk {index} is corrupt")]
    Corrupt {
        /// The chunk.
        index: u32,
    },
    /// The chunk does not chain with the midstate table: the chunk or the table is wrong, and
    /// which cannot be told. Re-fetch the table from another peer and re-check before blaming
    /// this one.
    #[error("chunk {index} does not chain with the table")]
    Ambiguous {
        /// The chunk.
        index: u32,
    },
    /// The table the peer sent is unusable: undecodable, for another chunk size, for a blob of
    /// another size than expected, or an impossible empty-blob table. Blame the peer.
    #[error("bad midstate table: {0}")]
    BadTable(String),
    /// The peer broke the protocol: a malformed message, an unexpected answer, a chunk stream
    /// that ended early. Blame the peer.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The peer answered with an error message (for the logs).
    #[error("peer error: {0}")]
    Remote(String),
    /// The request itself is invalid (a bad chunk size, an index past the table's layout, an
    /// oversized token); nothing was sent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The connection or the stream failed (unreachable, closed, reset).
    #[error("connection: {0}")]
    Connection(String),
}

impl PeerError {
    /// True when the failure is proof that the peer misbehaved (as opposed to being slow, busy,
    /// not having the blob, or an ambiguity that may be the table's fault).
    pub fn blames_peer(&self) -> bool {
        matches!(
            self,
            PeerError::Corrupt { .. }
                | PeerError::BadTable(_)
                | PeerError::Protocol(_)
                | PeerError::AuthFailed(_)
        )
    }
}

/// A [`PeerError`] from a failed connection.
fn from_connection(e: &ConnectionError) -> PeerError {
    match e {
        ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(close::AUTH_FAILED) =>
        {
            PeerError::AuthFailed("the peer rejected our proof".into())
        }
        ConnectionError::ConnectionClosed(c)
            if c.error_code == TransportErrorCode::CONNECTION_REFUSED =>
        {
            PeerError::Refused { retry_after: None }
        }
        ConnectionError::TimedOut => PeerError::Timeout("the connection (idle timeout)"),
        other => PeerError::Connection(other.to_string()),
    }
}

/// A [`PeerError`] from a failed read or write while waiting for `what`.
fn from_frame(e: FrameError, what: &'static str) -> PeerError {
    if let Some(c) = e.connection_error() {
        return from_connection(c);
    }
    match e {
        FrameError::Timeout => PeerError::Timeout(what),
        FrameError::Finished => PeerError::Protocol(format!("stream ended inside {what}")),
        FrameError::Wire(w) => PeerError::Protocol(format!("{what}: {w}")),
        other => PeerError::Connection(format!("{what}: {other}")),
    }
}

/// Maps the answers every request may get instead of the one it wants.
fn unexpected(response: Response, what: &str) -> PeerError {
    match response {
        Response::NotFound => PeerError::NotFound,
        Response::Denied => PeerError::Denied,
        Response::Busy { retry_after_ms } => PeerError::Refused {
            retry_after: Some(Duration::from_millis(u64::from(retry_after_ms))),
        },
        Response::Error { message } => PeerError::Remote(message),
        other => PeerError::Protocol(format!(
            "unexpected answer (kind 0x{:02x}) to {what}",
            other.kind()
        )),
    }
}

async fn open_bi(
    conn: &Connection,
    limit: Duration,
) -> Result<(SendStream, RecvStream), PeerError> {
    match timeout(limit, conn.open_bi()).await {
        Err(_) => Err(PeerError::Timeout("a stream (the peer's stream limit)")),
        Ok(Err(e)) => Err(from_connection(&e)),
        Ok(Ok(s)) => Ok(s),
    }
}

/// Connects to `addr` and runs the client's half of the mutual authentication.
pub(crate) async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    config: &PeerConfig,
    metrics: Arc<Metrics>,
) -> Result<PeerConn, PeerError> {
    let limit = config.timeout;
    let connecting = endpoint
        .connect(addr, SERVER_NAME)
        .map_err(|e| PeerError::Connection(e.to_string()))?;
    let conn = match timeout(limit, connecting).await {
        Err(_) => return Err(PeerError::Timeout("the handshake")),
        Ok(Err(e)) => return Err(from_connection(&e)),
        Ok(Ok(c)) => c,
    };
    match authenticate(&conn, &config.cluster_key, limit).await {
        Ok(site) => Ok(PeerConn {
            conn,
            limit,
            metrics,
            site,
        }),
        Err(e) => {
            let code = if matches!(e, PeerError::AuthFailed(_)) {
                metrics.auth_failed("outbound");
                close::AUTH_FAILED
            } else {
                close::PROTOCOL
            };
            conn.close(VarInt::from_u32(code), b"authentication failed");
            Err(e)
        }
    }
}

/// The client's half: send our proof, expect `AuthOk` and the server's proof, check it. Returns
/// the server's site (empty: none).
pub(crate) async fn authenticate(
    conn: &Connection,
    key: &ClusterKey,
    limit: Duration,
) -> Result<String, PeerError> {
    let exporter = exporter(conn).ok_or_else(|| PeerError::AuthFailed("no TLS exporter".into()))?;
    let (mut send, mut recv) = open_bi(conn, limit).await?;
    let proof = key.proof(Role::Client, &exporter);
    frame::write_request(&mut send, &Request::Auth { proof }, limit)
        .await
        .map_err(|e| from_frame(e, "the auth request"))?;
    let _ = send.finish();
    let site = match frame::read_response(&mut recv, limit).await {
        Ok(Response::AuthOk { site }) => site,
        Ok(Response::Denied) => {
            return Err(PeerError::AuthFailed("the peer rejected our proof".into()))
        }
        Ok(other) => return Err(unexpected(other, "Auth")),
        Err(e) => return Err(from_frame(e, "the auth answer")),
    };
    let server_proof = match frame::read_request(&mut recv, limit).await {
        Ok(Request::Auth { proof }) => proof,
        Ok(_) => return Err(PeerError::Protocol("no server proof after AuthOk".into())),
        Err(e) => return Err(from_frame(e, "the server's proof")),
    };
    if !key.verify(Role::Server, &exporter, &server_proof) {
        return Err(PeerError::AuthFailed(
            "the peer's proof does not verify: it does not hold the cluster key".into(),
        ));
    }
    Ok(site)
}

/// An authenticated connection to a peer. Cheap to clone; requests on clones run concurrently
/// (one QUIC stream each, up to the peer's per-connection stream limit).
#[derive(Clone)]
pub struct PeerConn {
    conn: Connection,
    limit: Duration,
    metrics: Arc<Metrics>,
    /// The peer's site, as it said when it authenticated (empty: none).
    site: String,
}

impl PeerConn {
    /// The peer's site, as it stated it when it authenticated (empty: none).
    pub fn site(&self) -> &str {
        &self.site
    }
}

impl std::fmt::Debug for PeerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConn")
            .field("remote", &self.conn.remote_address())
            .finish_non_exhaustive()
    }
}

/// Chunk bytes that must arrive within each timeout.
const PROGRESS_STEP: u32 = 1 << 20;

/// How many received segments one read takes at most.
const READ_BATCH: usize = 32;

/// A chunk verified against its table, held as the segments QUIC delivered it in: verifying it
/// as it arrived needed no contiguous copy. [`Chunk::into_bytes`] makes one when needed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chunk {
    segments: Vec<Bytes>,
    len: usize,
}

impl Chunk {
    /// The chunk's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a chunk of no bytes (no real chunk is empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk's bytes, in order, as received (none of them empty).
    pub fn segments(&self) -> &[Bytes] {
        &self.segments
    }

    /// The chunk as one contiguous buffer: the segment itself when there is only one (as
    /// [`PeerConn::chunk`] and [`PeerConn::chunk_prefix`] receive it), else a copy.
    pub fn into_bytes(mut self) -> Bytes {
        if self.segments.len() <= 1 {
            return self.segments.pop().unwrap_or_default();
        }
        let mut out = BytesMut::with_capacity(self.len);
        for s in &self.segments {
            out.extend_from_slice(s);
        }
        out.freeze()
    }
}

/// Why reading a chunk's bytes stopped early.
enum ReadFailure {
    /// The stream failed.
    Read(quinn::ReadError),
    /// The peer sent more bytes than the chunk holds.
    Overrun,
}

/// Where the bytes of an arriving chunk go.
enum Sink {
    /// Kept as received: no copy.
    Segments(Chunk),
    /// Copied into one buffer as each arrives (while in cache, as it is hashed), for callers
    /// that need contiguous bytes, rather than read back from memory to join them afterwards.
    Contiguous(BytesMut),
}

impl Sink {
    fn push(&mut self, segment: Bytes) {
        match self {
            Sink::Segments(chunk) => {
                chunk.len += segment.len();
                chunk.segments.push(segment);
            }
            Sink::Contiguous(buf) => buf.extend_from_slice(&segment),
        }
    }

    fn into_chunk(self) -> Chunk {
        match self {
            Sink::Segments(chunk) => chunk,
            Sink::Contiguous(buf) => Chunk {
                len: buf.len(),
                segments: vec![buf.freeze()],
            },
        }
    }
}

/// Reads segments from `recv`, hashing each into `verifier` as it arrives and handing it to
/// `sink`, until `verifier` has at least `until` bytes (true) or the stream ends (false).
async fn read_verifying(
    recv: &mut RecvStream,
    verifier: &mut ChunkStreamVerifier,
    sink: &mut Sink,
    until: u32,
    progress: Option<&AtomicU64>,
) -> Result<bool, ReadFailure> {
    let mut batch: [Bytes; READ_BATCH] = Default::default();
    while verifier.received() < until {
        let Some(n) = recv
            .read_chunks(&mut batch)
            .await
            .map_err(ReadFailure::Read)?
        else {
            return Ok(false);
        };
        for s in &mut batch[..n] {
            let s = std::mem::take(s);
            if s.is_empty() {
                continue;
            }
            verifier.update(&s).map_err(|_| ReadFailure::Overrun)?;
            sink.push(s);
        }
        if let Some(p) = progress {
            p.store(u64::from(verifier.received()), Ordering::Relaxed);
        }
    }
    Ok(true)
}

fn check_authz(authz: &[u8]) -> Result<(), PeerError> {
    if authz.len() > MAX_AUTHZ_LEN {
        return Err(PeerError::InvalidRequest(format!(
            "authorization token of {} bytes exceeds {MAX_AUTHZ_LEN}",
            authz.len()
        )));
    }
    Ok(())
}

/// The streaming check of chunk `index` against a whole table, and the table's chunk size.
fn whole_table_verifier(
    digest: &Digest,
    table: &MidstateTable,
    index: u32,
    authz: &[u8],
) -> Result<(ChunkStreamVerifier, u32), PeerError> {
    check_authz(authz)?;
    let layout = table.layout();
    let verifier = ChunkStreamVerifier::new(table, digest.as_bytes(), index).map_err(|_| {
        PeerError::InvalidRequest(format!(
            "chunk {index} is past the blob's {} chunks",
            layout.count()
        ))
    })?;
    Ok((verifier, layout.chunk_size()))
}

/// The streaming check of chunk `index` against a table prefix that must cover it, and the
/// table's chunk size.
fn prefix_verifier(
    digest: &Digest,
    table: &TablePrefix,
    index: u32,
    authz: &[u8],
) -> Result<(ChunkStreamVerifier, u32), PeerError> {
    check_authz(authz)?;
    let layout = table.layout();
    if !table.covers(index) {
        return Err(PeerError::InvalidRequest(format!(
            "chunk {index} is past the {} chunks the table covers",
            table.covered()
        )));
    }
    let verifier = table
        .stream_verifier(digest.as_bytes(), index)
        .map_err(|_| {
            PeerError::InvalidRequest(format!(
                "chunk {index} is past the blob's {} chunks",
                layout.count()
            ))
        })?;
    Ok((verifier, layout.chunk_size()))
}

fn check_chunk_size(chunk_size: u32) -> Result<(), PeerError> {
    ChunkLayout::new(0, chunk_size)
        .map(|_| ())
        .map_err(|e| PeerError::InvalidRequest(e.to_string()))
}

impl PeerConn {
    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// The connection's current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Closes the connection (requests in flight fail with [`PeerError::Connection`]).
    pub fn close(&self) {
        self.conn.close(VarInt::from_u32(close::DONE), b"done");
    }

    /// Sends one request on a new stream and reads the head of its answer.
    async fn request(
        &self,
        request: &Request,
        what: &'static str,
    ) -> Result<(RecvStream, Response), PeerError> {
        let (mut send, mut recv) = open_bi(&self.conn, self.limit).await?;
        frame::write_request(&mut send, request, self.limit)
            .await
            .map_err(|e| from_frame(e, what))?;
        let _ = send.finish();
        let response = frame::read_response(&mut recv, self.limit)
            .await
            .map_err(|e| from_frame(e, what))?;
        Ok((recv, response))
    }

    /// What the peer knows of the midstate table of blob `digest` in chunks of at most
    /// `max_chunk_size` (the size [`chunk_size_for`] gives the blob): the whole table for a blob
    /// it holds, a prefix for one still arriving. Checked for everything a table can be checked
    /// for without the data: it decodes, its chunk size is the rule's for its blob size, it
    /// describes a blob of `expected_size` bytes when given (the descriptor's size), and an
    /// empty blob's digest is the digest of nothing. Its midstates are checked chunk by chunk.
    pub async fn table_prefix(
        &self,
        digest: &Digest,
        max_chunk_size: u32,
        expected_size: Option<u64>,
        authz: &[u8],
    ) -> Result<TablePrefix, PeerError> {
        check_chunk_size(max_chunk_size)?;
        check_authz(authz)?;
        let request = Request::Table {
            digest: *digest.as_bytes(),
            max_chunk_size,
            authz: authz.to_vec(),
        };
        let (_recv, response) = self.request(&request, "a table").await?;
        let Response::Table { table } = response else {
            return Err(unexpected(response, "Table"));
        };
        let table = TablePrefix::decode(&table).map_err(|e| PeerError::BadTable(e.to_string()))?;
        let layout = table.layout();
        let chunk_size = chunk_size_for(layout.blob_size(), max_chunk_size);
        if layout.chunk_size() != chunk_size {
            return Err(PeerError::BadTable(format!(
                "chunk size {} instead of {chunk_size}",
                layout.chunk_size()
            )));
        }
        table
            .verify_against_digest(
                digest.as_bytes(),
                expected_size.unwrap_or(layout.blob_size()),
            )
            .map_err(|e| PeerError::BadTable(e.to_string()))?;
        Ok(table)
    }

    /// The whole midstate table of blob `digest` (see [`PeerConn::table_prefix`]); a peer that
    /// knows only a prefix yet answers [`PeerError::NotFound`].
    pub async fn table(
        &self,
        digest: &Digest,
        max_chunk_size: u32,
        expected_size: Option<u64>,
        authz: &[u8],
    ) -> Result<MidstateTable, PeerError> {
        self.table_prefix(digest, max_chunk_size, expected_size, authz)
            .await?
            .to_table()
            .ok_or(PeerError::NotFound)
    }

    /// Chunk `index` of blob `digest`, verified against the whole `table`, in one buffer (see
    /// [`PeerConn::chunk_prefix_segments`]).
    pub async fn chunk(
        &self,
        digest: &Digest,
        table: &MidstateTable,
        index: u32,
        authz: &[u8],
    ) -> Result<Bytes, PeerError> {
        let verifier = whole_table_verifier(digest, table, index, authz)?;
        self.receive_chunk(digest, verifier, authz, true, None)
            .await
            .map(Chunk::into_bytes)
    }

    /// Chunk `index` of blob `digest`, verified against the whole `table`, as received (see
    /// [`PeerConn::chunk_prefix_segments`]).
    pub async fn chunk_segments(
        &self,
        digest: &Digest,
        table: &MidstateTable,
        index: u32,
        authz: &[u8],
    ) -> Result<Chunk, PeerError> {
        let verifier = whole_table_verifier(digest, table, index, authz)?;
        self.receive_chunk(digest, verifier, authz, false, None)
            .await
    }

    /// Chunk `index` of blob `digest` in one buffer: as [`PeerConn::chunk_prefix_segments`],
    /// with each segment also copied into the buffer as it arrives, and the chunk's bytes
    /// received so far (unverified: a count, for the caller's timeouts) stored in `progress`.
    pub async fn chunk_prefix(
        &self,
        digest: &Digest,
        table: &Arc<TablePrefix>,
        index: u32,
        authz: &[u8],
        progress: Option<&AtomicU64>,
    ) -> Result<Bytes, PeerError> {
        let verifier = prefix_verifier(digest, table, index, authz)?;
        self.receive_chunk(digest, verifier, authz, true, progress)
            .await
            .map(Chunk::into_bytes)
    }

    /// Chunk `index` of blob `digest`, cut as `table` says, verified against `table` (which must
    /// cover it) and `digest` before it is returned: an unverified byte never leaves this
    /// function. Each segment is hashed as it arrives and kept as received (no contiguous copy).
    ///
    /// A single-chunk blob's chunk is checked from the IV to the digest, so a bad one is
    /// [`PeerError::Corrupt`]; any other chunk that does not chain is
    /// [`PeerError::Ambiguous`]. To know when a chunk is *final* (anchored to the digest), feed
    /// the returned bytes to a [`shoal_protocol::chunk::ChunkVerifier`] as well.
    pub async fn chunk_prefix_segments(
        &self,
        digest: &Digest,
        table: &TablePrefix,
        index: u32,
        authz: &[u8],
    ) -> Result<Chunk, PeerError> {
        let verifier = prefix_verifier(digest, table, index, authz)?;
        self.receive_chunk(digest, verifier, authz, false, None)
            .await
    }

    /// Asks for the chunk `verifier` checks and reads it, hashing each segment as it arrives;
    /// returns it only once the whole chunk verified.
    async fn receive_chunk(
        &self,
        digest: &Digest,
        (mut verifier, chunk_size): (ChunkStreamVerifier, u32),
        authz: &[u8],
        contiguous: bool,
        progress: Option<&AtomicU64>,
    ) -> Result<Chunk, PeerError> {
        let (index, len) = (verifier.index(), verifier.len());
        let request = Request::Chunk {
            digest: *digest.as_bytes(),
            chunk_size,
            index,
            authz: authz.to_vec(),
        };
        let (mut recv, response) = self.request(&request, "a chunk").await?;
        let announced = match response {
            Response::ChunkHeader { index: i, len } if i == index => len,
            Response::ChunkHeader { index: i, .. } => {
                return Err(PeerError::Protocol(format!(
                    "chunk {i} sent for chunk {index}"
                )))
            }
            other => return Err(unexpected(other, "Chunk")),
        };
        if announced != len {
            // Refused before reading: the peer cannot make us hold more than the layout says.
            self.metrics.rejected("corrupt");
            return Err(PeerError::Corrupt { index });
        }
        let mut sink = if contiguous {
            Sink::Contiguous(BytesMut::with_capacity(len as usize))
        } else {
            Sink::Segments(Chunk {
                // About one segment per datagram.
                segments: Vec::with_capacity(len as usize / 1200 + 1),
                len: 0,
            })
        };
        while verifier.received() < len {
            // One timer per [`PROGRESS_STEP`] bytes rather than per packet: the wait that times
            // out is "the next step of the chunk", and only if no byte came in it (a thin link
            // may take longer than the limit for a step; a stalled peer sends nothing).
            let before = verifier.received();
            let step = before.saturating_add(PROGRESS_STEP).min(len);
            let read = read_verifying(&mut recv, &mut verifier, &mut sink, step, progress);
            match timeout(self.limit, read).await {
                // (`read_chunks` is cancel-safe: what the reader took is in the verifier.)
                Err(_) if verifier.received() > before => {}
                Err(_) => return Err(PeerError::Timeout("chunk data")),
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    return Err(PeerError::Protocol(format!(
                        "chunk {index} ended after {} of {len} bytes",
                        verifier.received()
                    )))
                }
                Ok(Err(ReadFailure::Overrun)) => {
                    return Err(PeerError::Protocol(format!(
                        "chunk {index} runs past its announced {len} bytes"
                    )))
                }
                Ok(Err(ReadFailure::Read(e))) => {
                    return Err(from_frame(FrameError::Read(e), "chunk data"))
                }
            }
        }
        match verifier.finish() {
            Ok(()) => {
                let chunk = sink.into_chunk();
                self.metrics.fetched_bytes.inc_by(chunk.len as u64);
                Ok(chunk)
            }
            Err(ChunkError::Mismatch { index }) => {
                self.metrics.rejected("ambiguous");
                Err(PeerError::Ambiguous { index })
            }
            Err(ChunkError::Corrupt { index } | ChunkError::WrongLength { index, .. }) => {
                self.metrics.rejected("corrupt");
                Err(PeerError::Corrupt { index })
            }
            Err(e) => Err(PeerError::BadTable(e.to_string())),
        }
    }

    /// Subscribes to the peer's holding of blob `digest`: the first bitfield now, then one
    /// after each change (see [`HaveWatch::next`]). A peer that does not take watches answers
    /// `Busy` or an error: poll it with [`PeerConn::have`] instead.
    pub async fn watch(&self, digest: &Digest, chunk_size: u32) -> Result<HaveWatch, PeerError> {
        check_chunk_size(chunk_size)?;
        let request = Request::Watch {
            digest: *digest.as_bytes(),
            chunk_size,
        };
        let (recv, response) = self.request(&request, "a watch").await?;
        let first = match response {
            Response::Have { bitfield } => bitfield,
            other => return Err(unexpected(other, "Watch")),
        };
        Ok(HaveWatch {
            recv,
            first: Some(first),
            limit: self.limit,
        })
    }

    /// Which chunks of blob `digest`, cut in chunks of `chunk_size`, the peer holds verified.
    pub async fn have(&self, digest: &Digest, chunk_size: u32) -> Result<Bitfield, PeerError> {
        check_chunk_size(chunk_size)?;
        let request = Request::Have {
            digest: *digest.as_bytes(),
            chunk_size,
        };
        let (_recv, response) = self.request(&request, "a bitfield").await?;
        match response {
            Response::Have { bitfield } => Ok(bitfield),
            other => Err(unexpected(other, "Have")),
        }
    }
}

/// A peer's holding of one blob, as it changes ([`PeerConn::watch`]). Dropping it ends the
/// subscription.
#[derive(Debug)]
pub struct HaveWatch {
    recv: RecvStream,
    first: Option<Bitfield>,
    limit: Duration,
}

impl HaveWatch {
    /// The peer's next bitfield: the first at once, then each after a change, as long as that
    /// takes. `Ok(None)`: the watch is over, the last bitfield was full (the peer finishes the
    /// stream when it holds every chunk). `Err(NotFound)`: the peer no longer has the blob.
    pub async fn next(&mut self) -> Result<Option<Bitfield>, PeerError> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        match frame::read_next_response(&mut self.recv, self.limit).await {
            Ok(None) => Ok(None),
            Ok(Some(Response::Have { bitfield })) => Ok(Some(bitfield)),
            Ok(Some(other)) => Err(unexpected(other, "Watch")),
            Err(e) => Err(from_frame(e, "a watch update")),
        }
    }
}
