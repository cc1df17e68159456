//! The serving side: accept, authenticate, answer `Table`, `Chunk` and `Have` from the store.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::{self, BoxFuture};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use shoal_protocol::chunk::{ChunkLayout, TablePrefix};
use shoal_protocol::swarm::WATCH_BATCH_MS;
use shoal_protocol::wire::{Bitfield, Request, Response};
use shoal_protocol::Digest;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::auth::{exporter, ClusterKey, Role};
use super::frame::{self, FrameError};
use super::metrics::PeerLabels;
use super::{close, Shared, SERVE_PIECE};
use crate::store::BlobMeta;

/// Most `Watch` subscriptions one connection may hold open; more get `Busy` (the asker polls
/// with `Have` instead). A node watches a peer once per blob it downloads from it.
pub(crate) const MAX_WATCHES_PER_CONNECTION: usize = 8;

/// What an [`Authorizer`] is asked: may this private blob go to this request?
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    /// The private blob.
    pub digest: &'a Digest,
    /// The registry key this node fetched the blob from: a grant is only good for that one.
    pub origin: &'a str,
    /// The request's token (empty: none; `Have` requests carry none).
    pub authz: &'a [u8],
    /// The authenticated peer asking.
    pub peer: SocketAddr,
}

/// Decides whether a private blob may be served to a peer's request. Public blobs are served
/// to every authenticated peer without asking. An answer that takes longer than the endpoint's
/// timeout counts as a refusal.
pub trait Authorizer: Send + Sync + 'static {
    /// True to serve the blob to this request.
    fn authorize<'a>(&'a self, request: AuthzRequest<'a>) -> BoxFuture<'a, bool>;
}

/// An [`Authorizer`] that serves private blobs to no peer (for endpoints with no registry to ask).
#[derive(Debug, Clone, Copy, Default)]
pub struct DenyPrivate;

impl Authorizer for DenyPrivate {
    fn authorize<'a>(&'a self, _request: AuthzRequest<'a>) -> BoxFuture<'a, bool> {
        Box::pin(future::ready(false))
    }
}

/// An [`Authorizer`] from a synchronous predicate.
pub struct AllowIf<F>(pub F);

impl<F> Authorizer for AllowIf<F>
where
    F: Fn(&AuthzRequest<'_>) -> bool + Send + Sync + 'static,
{
    fn authorize<'a>(&'a self, request: AuthzRequest<'a>) -> BoxFuture<'a, bool> {
        Box::pin(future::ready((self.0)(&request)))
    }
}

/// Accepts connections until cancelled, refusing those over the cap.
pub(crate) async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        while conns.try_join_next().is_some() {}
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            shared.metrics.refused_connections.inc();
            debug!(peer = %incoming.remote_address(), "peer connection refused: at the cap");
            incoming.refuse();
            continue;
        };
        let shared = shared.clone();
        let cancel = cancel.clone();
        conns.spawn(async move {
            let connecting = match incoming.accept() {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "peer connection failed before its handshake");
                    return;
                }
            };
            let conn = match timeout(shared.config.timeout, connecting).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    debug!(error = %e, "peer handshake failed");
                    return;
                }
                Err(_) => {
                    debug!("peer handshake timed out");
                    return;
                }
            };
            serve_connection(conn, shared, cancel, permit).await;
        });
    }
    conns.abort_all();
}

/// Why the server refused a connection's authentication.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AcceptAuthError {
    /// The first stream did not carry a well-formed `Auth` in time.
    #[error("no valid auth message: {0}")]
    Frame(#[from] FrameError),
    /// The first stream's message was another request.
    #[error("first request is not Auth")]
    NotAuth,
    /// The connection cannot export keying material.
    #[error("no TLS exporter")]
    NoExporter,
    /// The proof does not verify: the peer does not hold the cluster key.
    #[error("wrong proof")]
    BadProof,
    /// The first stream was not opened in time, or the connection failed.
    #[error("no auth stream: {0}")]
    NoStream(String),
}

/// The server's half of the mutual authentication, on the connection's first stream: checks
/// the client's proof, then answers `AuthOk` (with this node's `site`) and its own proof. On
/// failure the caller closes the connection.
pub(crate) async fn accept_auth(
    conn: &Connection,
    key: &ClusterKey,
    site: &str,
    limit: std::time::Duration,
) -> Result<(), AcceptAuthError> {
    let (mut send, mut recv) = match timeout(limit, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(AcceptAuthError::NoStream(e.to_string())),
        Err(_) => return Err(AcceptAuthError::NoStream("timed out".into())),
    };
    let Request::Auth { proof } = frame::read_request(&mut recv, limit).await? else {
        return Err(AcceptAuthError::NotAuth);
    };
    let exporter = exporter(conn).ok_or(AcceptAuthError::NoExporter)?;
    if !key.verify(Role::Client, &exporter, &proof) {
        return Err(AcceptAuthError::BadProof);
    }
    let mut answer = Response::AuthOk {
        site: site.to_owned(),
    }
    .encode();
    answer.extend_from_slice(
        &Request::Auth {
            proof: key.proof(Role::Server, &exporter),
        }
        .encode(),
    );
    frame::write(&mut send, Bytes::from(answer), limit).await?;
    let _ = send.finish();
    Ok(())
}

/// Authenticates a connection, then serves its streams until it closes.
async fn serve_connection(
    conn: Connection,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let remote = conn.remote_address();
    let config = &shared.config;
    if let Err(e) = accept_auth(&conn, &config.cluster_key, &config.site, config.timeout).await {
        shared.metrics.auth_failed("inbound");
        info!(peer = %remote, error = %e, "peer failed authentication; connection closed");
        conn.close(
            VarInt::from_u32(close::AUTH_FAILED),
            b"authentication failed",
        );
        return;
    }
    debug!(peer = %remote, "peer authenticated");
    shared.metrics.connections.inc();
    // Decrements the gauge however this task ends (it may be aborted at shutdown).
    struct Open<'a>(&'a Shared);
    impl Drop for Open<'_> {
        fn drop(&mut self) {
            self.0.metrics.connections.dec();
        }
    }
    let _open = Open(&shared);
    let label = PeerLabels {
        peer: remote.ip().to_string(),
    };
    let mut streams = JoinSet::new();
    // Watches are long-lived: a few per connection, so chunk requests keep streams to use.
    let watches = Arc::new(Semaphore::new(MAX_WATCHES_PER_CONNECTION));
    loop {
        let (send, recv) = tokio::select! {
            _ = cancel.cancelled() => break,
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => {
                    debug!(peer = %remote, error = %e, "peer connection ended");
                    break;
                }
            },
        };
        while streams.try_join_next().is_some() {}
        // At most `max_streams_per_connection` are open: the peer cannot open more.
        streams.spawn(serve_stream(
            shared.clone(),
            send,
            recv,
            remote,
            label.clone(),
            watches.clone(),
        ));
    }
    streams.abort_all();
}

/// How a request ended, for the log.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("reading the blob: {0}")]
    Io(#[from] std::io::Error),
}

/// Answers the one request a stream carries.
async fn serve_stream(
    shared: Arc<Shared>,
    mut send: SendStream,
    mut recv: RecvStream,
    remote: SocketAddr,
    label: PeerLabels,
    watches: Arc<Semaphore>,
) {
    let limit = shared.config.timeout;
    let request = match frame::read_request(&mut recv, limit).await {
        Ok(r) => r,
        Err(e) => {
            debug!(peer = %remote, error = %e, "bad peer request");
            let _ = frame::write_response(&mut send, &Response::error(&e.to_string()), limit).await;
            let _ = send.finish();
            return;
        }
    };
    // Nothing more is read from this stream.
    let _ = recv.stop(VarInt::from_u32(close::DONE));
    let result = match request {
        Request::Auth { .. } => {
            respond(&mut send, Response::error("already authenticated"), limit).await
        }
        Request::Table {
            digest,
            max_chunk_size,
            authz,
        } => {
            let digest = Digest::from_bytes(digest);
            serve_table(&shared, &mut send, &digest, max_chunk_size, &authz, remote).await
        }
        Request::Chunk {
            digest,
            chunk_size,
            index,
            authz,
        } => {
            let digest = Digest::from_bytes(digest);
            let r = serve_chunk(
                &shared, &mut send, &digest, chunk_size, index, &authz, remote, &label,
            )
            .await;
            if r.is_err() {
                // Mid-chunk: the header promised bytes that will not come. Reset, so the peer
                // sees an error rather than a short stream.
                let _ = send.reset(VarInt::from_u32(close::STREAM_ABORTED));
            }
            r
        }
        Request::Have { digest, chunk_size } => {
            let digest = Digest::from_bytes(digest);
            serve_have(&shared, &mut send, &digest, chunk_size).await
        }
        Request::Watch { digest, chunk_size } => {
            let digest = Digest::from_bytes(digest);
            match watches.try_acquire_owned() {
                Ok(_permit) => serve_watch(&shared, &mut send, &digest, chunk_size).await,
                Err(_) => {
                    let busy = Response::Busy {
                        retry_after_ms: shared.config.busy_retry_after.as_millis() as u32,
                    };
                    respond(&mut send, busy, limit).await
                }
            }
        }
    };
    match result {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(e) => debug!(peer = %remote, error = %e, "peer request failed"),
    }
}

async fn respond(
    send: &mut SendStream,
    response: Response,
    limit: std::time::Duration,
) -> Result<(), ServeError> {
    Ok(frame::write_response(send, &response, limit).await?)
}

/// Who may be handed a blob.
enum Access {
    /// Every authenticated peer.
    Public,
    /// Requests the authorizer approves for the blob's origin registry (`None`: unknown, so
    /// nobody).
    Private(Option<String>),
}

impl Access {
    fn stored(shared: &Shared, meta: &BlobMeta, digest: &Digest) -> Access {
        if meta.private {
            Access::Private(shared.store.origin(digest))
        } else {
            Access::Public
        }
    }

    fn arriving(a: &crate::arriving::Arriving) -> Access {
        match a.origin() {
            Some(o) => Access::Private(Some(o.to_owned())),
            None => Access::Public,
        }
    }
}

/// `Some(response)` when the request may not be served: `Denied` for a private blob the
/// authorizer does not approve.
async fn check_private(
    shared: &Shared,
    access: Access,
    digest: &Digest,
    authz: &[u8],
    peer: SocketAddr,
) -> Option<Response> {
    let origin = match access {
        Access::Public => return None,
        Access::Private(origin) => origin,
    };
    let allowed = match origin {
        Some(origin) if !authz.is_empty() => {
            let request = AuthzRequest {
                digest,
                origin: &origin,
                authz,
                peer,
            };
            timeout(shared.config.timeout, shared.authorizer.authorize(request))
                .await
                .unwrap_or(false)
        }
        _ => false,
    };
    if allowed {
        None
    } else {
        shared.metrics.denied.inc();
        Some(Response::Denied)
    }
}

/// A table serving permit, or the `Busy` answer.
fn serve_permit(shared: &Shared) -> Result<OwnedSemaphorePermit, Response> {
    shared
        .serves
        .clone()
        .try_acquire_owned()
        .map_err(|_| busy(shared))
}

/// The `Busy` answer (counted).
fn busy(shared: &Shared) -> Response {
    shared.metrics.busy.inc();
    Response::Busy {
        retry_after_ms: u32::try_from(shared.config.busy_retry_after.as_millis())
            .unwrap_or(u32::MAX),
    }
}

/// Answers a table request of a peer configured with chunks of at most `max_chunk_size`.
async fn serve_table(
    shared: &Shared,
    send: &mut SendStream,
    digest: &Digest,
    max_chunk_size: u32,
    authz: &[u8],
    remote: SocketAddr,
) -> Result<(), ServeError> {
    let limit = shared.config.timeout;
    let mine = shared.store.max_chunk_size();
    if max_chunk_size != mine {
        // Only tables at the store's chunk sizes are kept (computing others on request would
        // let a peer make this node hash whole blobs at will), and the two nodes would cut
        // blobs differently anyway: say so, rather than answer `NotFound` for everything.
        let message = format!(
            "--chunk-size differs: {max_chunk_size} here, {mine} at the peer; a cluster's nodes must agree"
        );
        return respond(send, Response::error(&message), limit).await;
    }
    let _permit = match serve_permit(shared) {
        Ok(p) => p,
        Err(busy) => return respond(send, busy, limit).await,
    };
    let Some(meta) = shared.store.meta(digest) else {
        // Still arriving: what is known of its table so far.
        let answer = match shared.store.arriving().get(digest) {
            Some(a) => {
                match check_private(shared, Access::arriving(&a), digest, authz, remote).await {
                    Some(denied) => denied,
                    None => Response::Table {
                        table: served_table(shared, a.prefix()),
                    },
                }
            }
            _ => Response::NotFound,
        };
        return respond(send, answer, limit).await;
    };
    let access = Access::stored(shared, &meta, digest);
    if let Some(denied) = check_private(shared, access, digest, authz, remote).await {
        return respond(send, denied, limit).await;
    }
    let table = match shared.store.table(digest) {
        Some(t) => Some(t),
        None => {
            // Stored before tables existed: build it once (one pass over the blob).
            let store = shared.store.clone();
            let d = *digest;
            match tokio::task::spawn_blocking(move || store.build_table(&d)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    warn!(digest = %digest, error = %e, "cannot build midstate table");
                    None
                }
                Err(e) => return Err(std::io::Error::other(e).into()),
            }
        }
    };
    let Some(table) = table else {
        return respond(send, Response::NotFound, limit).await;
    };
    respond(
        send,
        Response::Table {
            table: served_table(shared, table.into()),
        },
        limit,
    )
    .await?;
    shared.metrics.tables_served.inc();
    Ok(())
}

/// The encoding of `table` as this node serves it: as it is, or lying under the test-only
/// fault injection ([`PeerConfig::fault_lie_tables`](super::PeerConfig::fault_lie_tables)).
fn served_table(shared: &Shared, table: TablePrefix) -> Vec<u8> {
    if shared.config.fault_lie_tables {
        lying_table(&table).encode()
    } else {
        table.encode()
    }
}

/// A lying version of `table` (test-only fault injection): the midstate in the middle,
/// `states[len / 2]`, is replaced by garbage; every other state, the last one included, is kept.
/// Nothing but chunks can tell (a table is not checked against the digest until the chunks on
/// either side of a state arrive): chunks `len / 2` and `len / 2 + 1` do not chain with it
/// (ambiguous, [`shoal_protocol::chunk::ChunkError::Mismatch`]), and it disagrees with an honest
/// table from that state on. A table with no state (one chunk, or nothing known yet) is kept.
pub(crate) fn lying_table(table: &TablePrefix) -> TablePrefix {
    let mut states = table.states().to_vec();
    let middle = states.len() / 2;
    if let Some(s) = states.get_mut(middle) {
        for b in s.iter_mut() {
            *b ^= 0x5a;
        }
    }
    TablePrefix::from_parts(table.layout(), states).unwrap_or_else(|_| table.clone())
}

#[allow(clippy::too_many_arguments)]
async fn serve_chunk(
    shared: &Shared,
    send: &mut SendStream,
    digest: &Digest,
    chunk_size: u32,
    index: u32,
    authz: &[u8],
    remote: SocketAddr,
    label: &PeerLabels,
) -> Result<(), ServeError> {
    let limit = shared.config.timeout;
    // Pinned until dropped: not evicted while it waits or is being sent.
    let Some(blob) = shared.store.open_blob(digest) else {
        return serve_arriving_chunk(
            shared, send, digest, chunk_size, index, authz, remote, label,
        )
        .await;
    };
    let access = Access::stored(shared, &blob.meta, digest);
    if let Some(denied) = check_private(shared, access, digest, authz, remote).await {
        return respond(send, denied, limit).await;
    }
    let Ok(layout) = ChunkLayout::new(blob.meta.size, chunk_size) else {
        return respond(
            send,
            Response::error("invalid chunk size for this blob"),
            limit,
        )
        .await;
    };
    let Some((start, len)) = layout.range(index) else {
        return respond(send, Response::error("chunk index out of range"), limit).await;
    };
    let Some(mut upload) = shared.uploads.admit(*digest, index).await else {
        return respond(send, busy(shared), limit).await;
    };
    // The whole chunk, mapped (and paged in) off the async threads; its bytes then go from the
    // page cache into QUIC packets without an intermediate copy.
    let file = blob.file;
    let mapped =
        match tokio::task::spawn_blocking(move || map_range(&file, start, len as usize)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                warn!(digest = %digest, error = %e, "cannot read a stored blob for a peer");
                return respond(send, Response::error("cannot read the blob"), limit).await;
            }
            Err(e) => return Err(std::io::Error::other(e).into()),
        };
    send_chunk(shared, send, index, ChunkBytes::Mapped(mapped), label).await?;
    upload.sent();
    drop(blob.pin);
    Ok(())
}

/// Where the bytes of a chunk being sent come from.
enum ChunkBytes {
    /// A complete blob's range, memory-mapped.
    Mapped(Bytes),
    /// A range of a blob still arriving, read from its partial file one piece at a time, so
    /// that an upload holds at most one piece in memory.
    Arriving {
        blob: Arc<crate::arriving::Arriving>,
        start: u64,
        len: u32,
    },
}

/// Sends a chunk's header and bytes in pieces of [`SERVE_PIECE`] (one byte corrupted under the
/// test-only fault injection).
async fn send_chunk(
    shared: &Shared,
    send: &mut SendStream,
    index: u32,
    bytes: ChunkBytes,
    label: &PeerLabels,
) -> Result<(), ServeError> {
    let limit = shared.config.timeout;
    let len = match &bytes {
        ChunkBytes::Mapped(b) => u32::try_from(b.len()).map_err(std::io::Error::other)?,
        ChunkBytes::Arriving { len, .. } => *len,
    };
    let total = len as usize;
    let corrupt_at = (shared.config.fault_corrupt_chunks && total > 0).then_some(total / 2);
    respond(send, Response::ChunkHeader { index, len }, limit).await?;
    if shared.config.fault_stall_chunks {
        // Nothing more until the requester gives up on the chunk (bounded by the timeout).
        if let Ok(Ok(Some(_))) = tokio::time::timeout(limit, send.stopped()).await {
            shared.metrics.chunk_sends_stopped.inc();
        }
        return Ok(());
    }
    let counter = shared.metrics.served_bytes.get_or_create(label).clone();
    // Test-only pacing (a peer behind a thin link): small pieces, each after its time.
    let rate = shared.config.fault_chunk_rate;
    let piece_size = if rate > 0 { 16 << 10 } else { SERVE_PIECE };
    let mut offset = 0;
    while offset < total {
        let n = piece_size.min(total - offset);
        if rate > 0 {
            tokio::time::sleep(std::time::Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
        let mut piece = match &bytes {
            ChunkBytes::Mapped(b) => b.slice(offset..offset + n),
            ChunkBytes::Arriving { blob, start, .. } => {
                let (blob, at) = (blob.clone(), start + offset as u64);
                let read = tokio::task::spawn_blocking(move || blob.read_at(at, n))
                    .await
                    .map_err(std::io::Error::other)?;
                Bytes::from(read?)
            }
        };
        if let Some(at) = corrupt_at.filter(|at| (offset..offset + n).contains(at)) {
            let mut v = piece.to_vec();
            v[at - offset] ^= 0xff;
            piece = Bytes::from(v);
        }
        if let Err(e) = frame::write(send, piece, limit).await {
            if matches!(e, FrameError::Write(quinn::WriteError::Stopped(_))) {
                shared.metrics.chunk_sends_stopped.inc();
            }
            return Err(e.into());
        }
        counter.inc_by(n as u64);
        offset += n;
    }
    shared.metrics.chunks_served.inc();
    Ok(())
}

/// A chunk of a blob still arriving, if it is on disk and checked (see [`crate::arriving`]).
#[allow(clippy::too_many_arguments)]
async fn serve_arriving_chunk(
    shared: &Shared,
    send: &mut SendStream,
    digest: &Digest,
    chunk_size: u32,
    index: u32,
    authz: &[u8],
    remote: SocketAddr,
    label: &PeerLabels,
) -> Result<(), ServeError> {
    let limit = shared.config.timeout;
    let arriving = match shared.store.arriving().get(digest) {
        Some(a) if a.layout().chunk_size() == chunk_size && a.has(index) => a,
        _ => return respond(send, Response::NotFound, limit).await,
    };
    let access = Access::arriving(&arriving);
    if let Some(denied) = check_private(shared, access, digest, authz, remote).await {
        return respond(send, denied, limit).await;
    }
    let Some(mut upload) = shared.uploads.admit(*digest, index).await else {
        return respond(send, busy(shared), limit).await;
    };
    // Marked when asked; after the wait it still must be (a disputed chunk is unmarked), and
    // a piece that cannot be read then resets the stream (the header has gone out).
    let range = arriving.layout().range(index);
    let (Some((start, len)), true) = (range, arriving.has(index)) else {
        return respond(send, Response::NotFound, limit).await;
    };
    let bytes = ChunkBytes::Arriving {
        blob: arriving,
        start,
        len,
    };
    send_chunk(shared, send, index, bytes, label).await?;
    upload.sent();
    Ok(())
}

/// Maps `len` bytes of a complete blob's file at `offset` (any alignment), paged in.
#[allow(unsafe_code)]
fn map_range(file: &std::fs::File, offset: u64, len: usize) -> std::io::Result<Bytes> {
    const PAGE: u64 = 4096;
    let aligned = offset - offset % PAGE;
    let skip = (offset - aligned) as usize;
    // A file shorter than its record (damaged behind the store's back) would fault on access.
    if file.metadata()?.len() < offset + len as u64 {
        return Err(std::io::Error::other("blob file shorter than its record"));
    }
    // SAFETY: the file is a complete blob under the store's `blobs/`: verified, renamed into
    // place and never written or truncated again (eviction only unlinks it, which leaves the
    // mapping valid). So the mapped bytes cannot change underneath the `Bytes` (the same
    // argument as `crate::body`'s windows).
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(aligned)
            .len(skip + len)
            .populate()
            .map(file)?
    };
    Ok(Bytes::from_owner(map).slice(skip..))
}

async fn serve_have(
    shared: &Shared,
    send: &mut SendStream,
    digest: &Digest,
    chunk_size: u32,
) -> Result<(), ServeError> {
    let limit = shared.config.timeout;
    let Some(meta) = shared.store.meta(digest) else {
        let answer = match shared.store.arriving().get(digest) {
            Some(a) if a.layout().chunk_size() == chunk_size => {
                Response::Have { bitfield: a.have() }
            }
            _ => Response::NotFound,
        };
        return respond(send, answer, limit).await;
    };
    // A private blob's bitfield is answered too: it tells only that this node holds the digest,
    // which its provider record in the DHT tells already; its table and chunks need a grant.
    let Ok(layout) = ChunkLayout::new(meta.size, chunk_size) else {
        return respond(
            send,
            Response::error("invalid chunk size for this blob"),
            limit,
        )
        .await;
    };
    // The store holds only complete, verified blobs: every chunk.
    let bitfield = Bitfield::full(layout.count());
    respond(send, Response::Have { bitfield }, limit).await
}

/// Answers a `Watch`: the bitfield now, then again after every change (at most one update per
/// `WATCH_BATCH_MS`), until this node holds every chunk (the last answer is full) or no longer
/// has the blob (`NotFound`), or the asker goes away. Changes that come faster than the asker
/// reads are coalesced: each answer is the whole current bitfield.
async fn serve_watch(
    shared: &Shared,
    send: &mut SendStream,
    digest: &Digest,
    chunk_size: u32,
) -> Result<(), ServeError> {
    let limit = shared.config.timeout;
    let arriving = match shared.store.arriving().get(digest) {
        Some(a) if a.layout().chunk_size() == chunk_size => a,
        // Held whole (every chunk: nothing will change), not held, or another chunk size.
        _ => return serve_have(shared, send, digest, chunk_size).await,
    };
    let mut changes = arriving.subscribe();
    let gone = send.stopped();
    tokio::pin!(gone);
    let mut sent: Option<Bitfield> = None;
    loop {
        if *changes.borrow_and_update() {
            break;
        }
        let bitfield = arriving.have();
        if sent.as_ref() != Some(&bitfield) {
            respond(
                send,
                Response::Have {
                    bitfield: bitfield.clone(),
                },
                limit,
            )
            .await?;
            if bitfield.is_full() {
                return Ok(());
            }
            sent = Some(bitfield);
            // The changes of the next few milliseconds go out together.
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(WATCH_BATCH_MS)) => {}
                _ = &mut gone => return Ok(()),
            }
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            _ = &mut gone => return Ok(()),
        }
    }
    // The download ended: committed (the store answers with every chunk) or failed.
    drop(arriving);
    serve_have(shared, send, digest, chunk_size).await
}
