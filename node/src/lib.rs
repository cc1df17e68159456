//! The shoal daemon as a library: the binary in `main.rs` only parses flags and calls in here.
//!
//! [`Node::start`] opens the store, binds the listener and serves until
//! [`Node::shutdown`]: the listener stops accepting, open connections finish their current
//! response (bounded by a grace period), then the store is closed.

pub mod arriving;
pub mod body;
pub mod config;
pub mod demo;
pub mod dht;
pub mod flight;
pub mod grants;
pub mod imagegen;
pub mod metrics;
pub mod mirror;
pub mod origin;
pub mod peer;
pub mod pulls;
pub mod server;
pub mod store;
pub mod swarm;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;
use metrics::Metrics;
use mirror::Mirror;
use store::Store;
use upstream::Upstreams;

/// Most concurrent client connections; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 4096;
/// Largest request head accepted (oversized headers get `431`).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How long open connections get to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::OpenError),
    /// The credentials file is bad.
    #[error(transparent)]
    Auth(#[from] upstream::AuthFileError),
    /// The swarm could not start.
    #[error("swarm: {0}")]
    Swarm(#[from] swarm::SwarmError),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// A running node. Dropping it without [`Node::shutdown`] aborts it.
#[must_use = "a node stops when its handle is shut down"]
pub struct Node {
    addr: SocketAddr,
    mirror: Arc<Mirror>,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Opens the store, binds the listener and starts serving.
    pub async fn start(config: Config) -> Result<Node, StartError> {
        let data_dir = config.data_dir.clone();
        let cap = config.cache_size;
        let chunk_size = config
            .p2p
            .as_ref()
            .map_or(config::DEFAULT_CHUNK_SIZE, |p| p.chunk_size);
        let store = tokio::task::spawn_blocking(move || {
            Store::open_with_chunk_size(&data_dir, cap, chunk_size)
        })
        .await
        .map_err(|e| store::OpenError::Io {
            path: config.data_dir.clone(),
            source: std::io::Error::other(e),
        })??;
        let upstreams = Arc::new(Upstreams::new(&config)?);
        let peer_metrics = Arc::new(peer::Metrics::new());
        let dht_metrics = dht::Metrics::new();
        let metrics = Arc::new(Metrics::new_with(|r| {
            peer_metrics.register(r);
            dht_metrics.register(r);
        }));
        let swarm = match &config.p2p {
            Some(p2p) => Some(Arc::new(
                swarm::Swarm::start(
                    p2p,
                    &config.data_dir,
                    store.clone(),
                    dht_metrics,
                    peer_metrics,
                    Arc::new(grants::RegistryAuthorizer::new(upstreams.clone())),
                )
                .await?,
            )),
            None => None,
        };
        let mirror = Arc::new(Mirror::new(
            store,
            upstreams,
            metrics,
            config.tag_ttl,
            swarm,
        ));
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let cancel = CancellationToken::new();
        let task = Some(tokio::spawn(serve(
            listener,
            mirror.clone(),
            cancel.clone(),
        )));
        info!(%addr, data_dir = %config.data_dir.display(), upstream = %config.upstream, "shoal listening");
        Ok(Node {
            addr,
            mirror,
            cancel,
            task,
        })
    }

    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node's mirror (store, upstreams, metrics).
    pub fn mirror(&self) -> &Arc<Mirror> {
        &self.mirror
    }

    /// Stops accepting, lets open responses finish (within [`SHUTDOWN_GRACE`]), and returns.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        if let Some(sw) = &self.mirror.swarm {
            sw.shutdown().await;
        }
        info!("shoal stopped");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn serve(listener: TcpListener, mirror: Arc<Mirror>, cancel: CancellationToken) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let mirror = mirror.clone();
        let cancel = cancel.clone();
        while conns.try_join_next().is_some() {}
        conns.spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| server::handle(mirror.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .max_buf_size(MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { tracing::debug!(%peer, error = %e, "connection ended") },
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
                }
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}
