//! Chunk exchange between nodes over QUIC.
//!
//! Goal: a node fetches the midstate table and the chunks of a blob from other nodes of its
//! cluster, and serves its own complete blobs to them, over one UDP port (`--p2p-listen`), with
//! every received chunk verified against the blob's digest before it leaves this module.
//! Non-goals: choosing peers or chunks (the scheduler does), finding peers (`crate::dht`).
//!
//! # Protocol
//!
//! One [`Endpoint`] per node both accepts and opens connections. The messages are
//! [`shoal_protocol::wire`]'s, one request per bidirectional stream, opened by the client:
//!
//! 1. **Authentication**, on the connection's first stream. The client sends
//!    `Request::Auth { proof }` with proof = HMAC-SHA256(cluster key, `"shoal-auth-v1 client"`
//!    ‖ exporter), where the exporter is 32 bytes of this connection's TLS keying material
//!    (label [`auth::EXPORTER_LABEL`]). The server checks it in constant time; on success it
//!    answers `Response::AuthOk { site }` (its `--site`, empty for none: the client learns
//!    whether the peer is far, [`PeerConn::site`]) **followed by its own
//!    `Request::Auth { proof }`** message over
//!    `"shoal-auth-v1 server"` ‖ exporter, which the client checks in turn. Any failure closes
//!    the connection with [`close::AUTH_FAILED`] and nothing is served on it. Certificates are
//!    self-signed and not checked: the exporter binds both proofs to this TLS session, so a man
//!    in the middle without the key can neither relay nor forge them.
//! 2. **Requests**, one per further stream: `Table`, `Chunk` and `Have`, answered from the
//!    store's complete (verified) blobs. A chunk is a `ChunkHeader { index, len }` followed by
//!    `len` raw bytes: the chunk's range of the blob file, memory-mapped and handed to QUIC in
//!    pieces of [`SERVE_PIECE`] bytes without a copy.
//!
//! # Limits
//!
//! Every wait has a timeout ([`PeerConfig::timeout`]). Inbound connections are capped
//! ([`PeerConfig::max_connections`]: further ones are refused during the handshake), so are
//! concurrent streams per connection (a QUIC transport parameter, so a peer cannot even open
//! more), concurrent table serves across all connections
//! ([`PeerConfig::max_concurrent_serves`]: further requests are answered `Busy`), and chunk
//! uploads ([`PeerConfig::serve`], the sans-IO [`shoal_protocol::serve::ServeScheduler`]: a few
//! at once, a bounded queue served first copies first, `Busy` when it is full or after a
//! bounded wait). A server holds at most one chunk mapping per upload, and QUIC keeps at most
//! [`PeerConfig::send_window`] unacknowledged bytes per connection.
//!
//! # Private blobs
//!
//! A blob the upstream served only with credentials ([`crate::store::BlobMeta::private`]) is
//! served to a peer only if the node's [`Authorizer`] approves the request's `authz` token for
//! the registry the blob came from ([`crate::store::Store::origin`]); the daemon's is
//! [`crate::grants::RegistryAuthorizer`], [`DenyPrivate`] answers `Denied` to all.

mod auth;
mod client;
mod frame;
mod gate;
mod metrics;
mod server;
mod tls;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_protocol::serve::ServeConfig;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

pub use auth::{ClusterKey, EXPORTER_LABEL};
pub use client::{Chunk, HaveWatch, PeerConn, PeerError};
pub use metrics::{DirectionLabels, Metrics, PeerLabels, RejectionLabels};
pub use server::{AllowIf, Authorizer, AuthzRequest, DenyPrivate};

/// The ALPN protocol name peers negotiate.
pub const ALPN: &[u8] = b"shoal/1";
/// The TLS server name clients send (certificates are not checked against it).
pub const SERVER_NAME: &str = "shoal";
/// The largest piece of a chunk handed to QUIC at once.
pub const SERVE_PIECE: usize = 1 << 20;

/// QUIC application error codes this module closes connections and streams with.
pub mod close {
    /// Normal close: the endpoint shut down or the connection is no longer needed.
    pub const DONE: u32 = 0;
    /// Authentication failed: bad or missing proof, or no exporter.
    pub const AUTH_FAILED: u32 = 1;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 2;
    /// A stream was reset because a wait on it timed out or the server failed mid-chunk.
    pub const STREAM_ABORTED: u32 = 3;
}

/// How an [`Endpoint`] binds, authenticates and bounds its work.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The UDP address to bind (`--p2p-listen`).
    pub listen: SocketAddr,
    /// The cluster's shared key (`--cluster-key-file`, see [`ClusterKey::from_file_contents`]).
    pub cluster_key: ClusterKey,
    /// The longest any single wait may take: a handshake, opening a stream, each read or write.
    pub timeout: Duration,
    /// A connection with no traffic for this long is closed (clients send keep-alives).
    pub idle_timeout: Duration,
    /// Most authenticated-or-authenticating inbound connections; more are refused.
    pub max_connections: usize,
    /// Most concurrent requests (streams) a peer may have open on one connection.
    pub max_streams_per_connection: u32,
    /// Most table requests served at once across all connections; more get `Busy`.
    pub max_concurrent_serves: usize,
    /// How chunk uploads are scheduled: how many at once, how many wait and how long.
    pub serve: ServeConfig,
    /// The `retry_after_ms` a `Busy` answer carries.
    pub busy_retry_after: Duration,
    /// Per-stream receive window of outgoing connections (bytes a server may send on one
    /// stream ahead of our reads): at least a chunk, for one round trip per chunk at most.
    pub stream_receive_window: u32,
    /// Per-connection receive window of outgoing connections.
    pub receive_window: u32,
    /// Bytes of unacknowledged data a connection may hold (the server's send buffer).
    pub send_window: u64,
    /// This node's site (`--site`; empty: none), told to every peer that connects: downloads
    /// treat peers of another site as far (`shoal_protocol::swarm::Download::set_peer_far`).
    pub site: String,
    /// Fault injection for tests: flip a byte in every chunk served (a poisoned peer).
    pub fault_corrupt_chunks: bool,
    /// Fault injection for tests: send a chunk's header and none of its bytes, and wait for the
    /// requester to stop the stream (a stalled peer).
    pub fault_stall_chunks: bool,
    /// Fault injection for tests: send chunk bytes at this many bytes a second (0: as fast as
    /// the connection goes; a peer behind a thin link).
    pub fault_chunk_rate: u64,
    /// Fault injection for tests: serve every midstate table (whole, or the prefix of a blob
    /// still arriving) with one midstate in the middle replaced by garbage (a lying table; see
    /// `server::lying_table`). Chunks are served genuine.
    pub fault_lie_tables: bool,
}

impl PeerConfig {
    /// Defaults for `listen` and `cluster_key`: 10 s waits, 256 connections, 32 streams per
    /// connection (up to 8 of them long-lived `Watch`es), 32 concurrent table serves, the
    /// scheduler's default chunk uploads, and windows sized for GB/s on a LAN.
    pub fn new(listen: SocketAddr, cluster_key: ClusterKey) -> PeerConfig {
        PeerConfig {
            listen,
            cluster_key,
            timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 256,
            max_streams_per_connection: 32,
            max_concurrent_serves: 32,
            serve: ServeConfig::default(),
            busy_retry_after: Duration::from_millis(250),
            stream_receive_window: 8 << 20,
            receive_window: 32 << 20,
            send_window: 16 << 20,
            site: String::new(),
            fault_corrupt_chunks: false,
            fault_stall_chunks: false,
            fault_chunk_rate: 0,
            fault_lie_tables: false,
        }
    }
}

/// Why an endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The UDP socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The certificate or TLS configuration could not be built.
    #[error("peer TLS setup: {0}")]
    Tls(String),
}

/// What the accept loop and the connection handlers share.
pub(crate) struct Shared {
    pub(crate) config: PeerConfig,
    pub(crate) store: Store,
    pub(crate) authorizer: Arc<dyn Authorizer>,
    pub(crate) metrics: Arc<Metrics>,
    /// One permit per table serve in progress.
    pub(crate) serves: Arc<Semaphore>,
    /// Chunk uploads.
    pub(crate) uploads: Arc<gate::ServeGate>,
    /// One permit per inbound connection.
    pub(crate) connections: Arc<Semaphore>,
}

/// A node's QUIC endpoint: serves its store to authenticated peers and connects to them.
///
/// Dropping it without [`Endpoint::shutdown`] stops accepting and closes its connections.
pub struct Endpoint {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Endpoint {
    /// Binds `config.listen` and starts serving `store`'s complete blobs. Must be called within
    /// a Tokio runtime.
    pub fn bind(
        config: PeerConfig,
        store: Store,
        authorizer: Arc<dyn Authorizer>,
        metrics: Arc<Metrics>,
    ) -> Result<Endpoint, BindError> {
        let (server_config, client_config) = tls::configs(&config)?;
        let mut endpoint =
            quinn::Endpoint::server(server_config, config.listen).map_err(|source| {
                BindError::Bind {
                    addr: config.listen,
                    source,
                }
            })?;
        endpoint.set_default_client_config(client_config);
        let shared = Arc::new(Shared {
            serves: Arc::new(Semaphore::new(config.max_concurrent_serves)),
            uploads: Arc::new(gate::ServeGate::new(config.serve.clone())),
            connections: Arc::new(Semaphore::new(config.max_connections)),
            config,
            store,
            authorizer,
            metrics,
        });
        let cancel = CancellationToken::new();
        let task = Some(tokio::spawn(server::accept_loop(
            endpoint.clone(),
            shared.clone(),
            cancel.clone(),
        )));
        Ok(Endpoint {
            endpoint,
            shared,
            cancel,
            task,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .unwrap_or(self.shared.config.listen)
    }

    /// The metrics this endpoint updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Connects to the peer at `addr` and authenticates both ways.
    ///
    /// Fails with [`PeerError::AuthFailed`] if either side's proof does not verify, with
    /// [`PeerError::Refused`] if the peer is at its connection cap, [`PeerError::Timeout`] if
    /// it does not answer in time.
    pub async fn connect(&self, addr: SocketAddr) -> Result<PeerConn, PeerError> {
        client::connect(
            &self.endpoint,
            addr,
            &self.shared.config,
            self.shared.metrics.clone(),
        )
        .await
    }

    /// Stops accepting, closes every connection and waits (up to the timeout) for the peers to
    /// be told.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.endpoint
            .close(quinn::VarInt::from_u32(close::DONE), b"shutdown");
        let _ = tokio::time::timeout(self.shared.config.timeout, self.endpoint.wait_idle()).await;
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.endpoint
            .close(quinn::VarInt::from_u32(close::DONE), b"shutdown");
    }
}

/// The QUIC configurations an [`Endpoint`] uses (a fresh self-signed certificate, the tuned
/// transport), for benchmarks that compare raw QUIC against the chunk exchange.
#[doc(hidden)]
pub fn quic_configs(
    config: &PeerConfig,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), BindError> {
    tls::configs(config)
}
