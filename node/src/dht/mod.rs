//! Peer discovery over a libp2p Kademlia DHT: which nodes hold a blob.
//!
//! A [`Dht`] owns a libp2p `Swarm` in one spawned task (the actor); the rest of the node talks
//! to it through a cloneable [`DhtHandle`] (commands over a bounded channel, each answered on
//! a oneshot, each call bounded by a timeout).
//!
//! # Network
//! - **Transport:** TCP → **pnet** (pre-shared key = the 32-byte cluster key) → noise → yamux.
//!   pnet encrypts every byte with XSalsa20 under the cluster key before anything else is
//!   exchanged, so a node without the key (or with another key) cannot even complete the
//!   noise handshake: only cluster members can join. Without a cluster key the DHT runs
//!   **without pnet (open cluster)**: anyone who can reach the port can join, read which
//!   digests are provided, and announce itself as a provider (the chunk exchange still
//!   verifies every byte against its digest).
//! - **Ports:** the DHT listens on `--p2p-listen HOST:PORT` over **TCP**; the chunk exchange
//!   uses the same port number over **UDP** (QUIC), so a provider listening on
//!   `/ip4/A/tcp/P` has its chunk endpoint at `A:P` ([`Provider::chunk_addr`]).
//! - **Bootstrap:** `--peer` entries are `HOST:PORT` (IP or DNS name) or multiaddrs
//!   (`/ip4|ip6|dns|dns4|dns6/.../tcp/P[/p2p/<id>]`). No peer id is needed: the address is
//!   dialed, identify tells the id and listen addresses, they go into Kademlia, and Kademlia
//!   bootstraps. A DNS name is resolved to all its addresses (a Kubernetes headless service)
//!   and each is dialed; names are re-resolved and unknown addresses redialed every
//!   [`DhtConfig::redial_interval`] (30 s), so a node that started first finds later ones.
//!   With [`DhtConfig::mdns`], peers on the LAN are found by mDNS too (edge sites).
//! - **Kademlia:** protocol [`KAD_PROTOCOL`] (`/shoal/kad/1.0.0`, so Shoal never mixes with
//!   another libp2p DHT), always in server mode (loopback and private addresses are never
//!   "confirmed external", so automatic mode would leave every node a client), replication
//!   factor [`DhtConfig::replication_factor`] (5). Provider records are keyed by the raw 32
//!   bytes of the blob's sha256 digest; [`DhtHandle::closest_peers`] uses the same key, so
//!   the nodes nearest a digest are also the ones holding its provider records. α
//!   ([`PARALLELISM`]) is 2.
//!
//! # Provider records: lifetime
//! - [`DhtHandle::provide`] stores a local record and announces it to the closest peers;
//!   Kademlia re-announces every provided digest every [`DhtConfig::provider_republish`]
//!   (default 10 min). Remote copies expire [`DhtConfig::provider_ttl`] (default 30 min)
//!   after the last announcement, so one missed republish is tolerated.
//! - A node that provides digests before it knows its peers (re-providing its cache at
//!   start-up) would otherwise keep the records to itself until the next republish: after
//!   each bootstrap, if the routing table has grown by half since the last time, every
//!   provided digest is announced again (16 announcements at a time).
//! - [`DhtHandle::withdraw`] removes the local record, which stops the republishing at once.
//!   Kademlia has no "remove" message: copies already held by other nodes stay until they
//!   expire (at most `provider_ttl`). Until then lookups may still name the node; the chunk
//!   fetcher then gets "not found" from it and moves to the next provider. Same for a node
//!   that crashed.
//! - Each node keeps at most [`MAX_PROVIDERS_PER_KEY`] provider records per digest (first
//!   come; expired ones are dropped when read) and records for at most [`MAX_STORED_KEYS`]
//!   digests. Value records (`PUT_VALUE`) are not used and not stored.
//!
//! # Bounds
//! Command channel [`COMMAND_QUEUE`]; address book [`MAX_ADDRESS_BOOK`] peers with at most 16
//! addresses each; [`MAX_MDNS_PEERS`] peers found by mDNS; record store as above; connections
//! idle for [`IDLE_CONNECTION_TIMEOUT`] are closed.

mod actor;
mod addr;
mod identity;
mod metrics;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::futures::StreamExt;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, kad, mdns, noise, tcp, yamux, Multiaddr, StreamProtocol, Swarm, Transport};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

pub use addr::{chunk_addr, multiaddr_to_socket, socket_to_multiaddr, PeerSpec};
pub use identity::load_or_create as load_or_create_identity;
pub use libp2p::PeerId;
pub use metrics::Metrics;

/// The Kademlia protocol name: Shoal nodes only talk Kademlia to Shoal nodes.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/kad/1.0.0");
/// The identify `protocol_version`; peers announcing anything else are not added to Kademlia.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/shoal/1.0.0";
/// Peers whose site (from identify) is remembered.
pub const MAX_SITE_BOOK: usize = 8192;
/// The identity file's name under the data dir.
pub const IDENTITY_FILE: &str = "p2p-identity.key";
/// Capacity of the command channel between handles and the actor.
pub const COMMAND_QUEUE: usize = 1024;
/// How often a node with `--mdns` asks its LAN for peers (after its first probes): a node
/// missed at start-up (its first queries lost, or every answer) finds the others within this.
/// A query and its answers are a few hundred bytes; edge LANs are small.
pub const MDNS_QUERY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// Peers found by mDNS kept for redialing (each dialed again every [`MDNS_QUERY_INTERVAL`]
/// while not connected, until mDNS sees it expire).
pub const MAX_MDNS_PEERS: usize = 1024;
/// Peers remembered in the address book.
pub const MAX_ADDRESS_BOOK: usize = 8192;
/// Provider records kept per digest.
pub const MAX_PROVIDERS_PER_KEY: usize = 20;
/// Digests for which provider records (ours and others') are kept.
pub const MAX_STORED_KEYS: usize = 200_000;
/// Open connections without traffic are closed after this.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Kademlia's α: requests in flight per query step. 2 rather than libp2p's 3: in a cluster
/// the first answers already come from nodes holding the record, and each request costs the
/// answering node a scan of its routing table (measured with `examples/dht_lookup.rs`: a
/// third less CPU per lookup than α = 3); one unresponsive peer still does not stall a query.
pub const PARALLELISM: NonZeroUsize = NonZeroUsize::new(2).unwrap();
/// Kademlia's own per-query timeout (bootstrap, provide, republish).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(20);
/// Kademlia's periodic bootstrap (routing-table refresh) interval.
pub const BOOTSTRAP_INTERVAL: Duration = Duration::from_secs(2 * 60);
/// TCP + pnet + noise + yamux set-up limit.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit on calls that do not wait for the network (`withdraw`, `connected_peers`, ...).
pub const LOCAL_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// DHT settings.
#[derive(Debug, Clone)]
pub struct DhtConfig {
    /// `--p2p-listen`: TCP address of the DHT (the chunk exchange uses the same UDP port).
    /// Port 0 picks one ([`Dht::listen_addr`] tells which). `0.0.0.0` listens on every IPv4
    /// interface; an IPv6 address (`[::]`) listens on IPv6 only.
    pub listen: SocketAddr,
    /// `--peer` entries: `HOST:PORT` or multiaddrs; see [`PeerSpec::parse`].
    pub peers: Vec<String>,
    /// `--cluster-key-file`: the 32-byte pre-shared key; `None` runs an open cluster.
    pub cluster_key: Option<[u8; 32]>,
    /// `--mdns`: also discover peers on the LAN by multicast DNS.
    pub mdns: bool,
    /// The persisted ed25519 identity (created on first start); normally
    /// `<data-dir>/p2p-identity.key`.
    pub identity_file: PathBuf,
    /// Nodes each provider record is stored on (besides the provider). Default 5.
    pub replication_factor: usize,
    /// Lifetime of a provider record on other nodes after its last announcement. Default
    /// 30 min.
    pub provider_ttl: Duration,
    /// How often this node re-announces the digests it provides. Must be below
    /// `provider_ttl`. Default 10 min.
    pub provider_republish: Duration,
    /// Longest a `providers()` or `closest_peers()` lookup runs; it then answers with what it
    /// has found. Default 5 s.
    pub lookup_timeout: Duration,
    /// How often DNS names in `peers` are re-resolved and unknown addresses redialed.
    /// Default 30 s.
    pub redial_interval: Duration,
    /// This node's site (`--site`; empty: none), told to peers in identify's agent version
    /// ([`agent_version`]) so that [`DhtHandle::closest_peers`] can tell which of the nodes
    /// nearest a key share it.
    pub site: String,
}

impl DhtConfig {
    /// Defaults, listening on `listen`, identity at `<data_dir>/p2p-identity.key`, no peers,
    /// no cluster key (open cluster), no mDNS.
    pub fn new(listen: SocketAddr, data_dir: &Path) -> DhtConfig {
        DhtConfig {
            listen,
            peers: Vec::new(),
            cluster_key: None,
            mdns: false,
            identity_file: data_dir.join(IDENTITY_FILE),
            replication_factor: 5,
            provider_ttl: Duration::from_secs(30 * 60),
            provider_republish: Duration::from_secs(10 * 60),
            lookup_timeout: Duration::from_secs(5),
            redial_interval: Duration::from_secs(30),
            site: String::new(),
        }
    }
}

/// A node holding a blob, and where to fetch its chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Provider {
    /// The provider's libp2p identity.
    pub peer_id: PeerId,
    /// Its QUIC chunk endpoint: the IP and port of its TCP listen address, over UDP.
    pub chunk_addr: SocketAddr,
}

/// The nodes nearest a key (XOR distance of the sha256 of the key and of the peer ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosestPeers {
    /// Nearest first, at most `k`; includes this node if it is among them.
    pub peers: Vec<PeerId>,
    /// Whether this node is among `peers`.
    pub includes_self: bool,
    /// Each of `peers`' site, as its identify told (`None`: unknown or none; this node's own
    /// from its configuration).
    pub sites: Vec<Option<String>>,
}

/// DHT errors.
#[derive(Debug, thiserror::Error)]
pub enum DhtError {
    /// A `--peer` entry is malformed.
    #[error("invalid peer {spec:?}: {reason}")]
    InvalidPeer {
        /// The entry.
        spec: String,
        /// Why.
        reason: String,
    },
    /// The identity file cannot be read, written or decoded.
    #[error("p2p identity {}: {reason}", path.display())]
    Identity {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The listener could not be bound.
    #[error("cannot listen on {addr} (tcp): {reason}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// A setting is out of range.
    #[error("invalid DHT setting: {0}")]
    Config(String),
    /// The record store refused (too many digests stored).
    #[error("DHT record store: {0}")]
    Store(String),
    /// The DHT did not answer in time.
    #[error("DHT request timed out")]
    Timeout,
    /// The DHT has shut down.
    #[error("DHT is shut down")]
    Closed,
}

pub(crate) enum Command {
    Provide {
        key: [u8; 32],
        reply: oneshot::Sender<Result<(), DhtError>>,
    },
    Withdraw {
        key: [u8; 32],
        reply: oneshot::Sender<()>,
    },
    Providers {
        key: [u8; 32],
        limit: usize,
        reply: oneshot::Sender<Vec<Provider>>,
    },
    ClosestPeers {
        key: [u8; 32],
        k: usize,
        reply: oneshot::Sender<ClosestPeers>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    KnownPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
}

/// A cloneable handle to the DHT actor.
#[derive(Clone, Debug)]
pub struct DhtHandle {
    tx: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    lookup_timeout: Duration,
}

impl DhtHandle {
    /// This node's peer id (stable across restarts: it comes from the identity file).
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    async fn call<T>(
        &self,
        timeout: Duration,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, DhtError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (tx, rx) = oneshot::channel();
        tokio::time::timeout_at(deadline, self.tx.send(make(tx)))
            .await
            .map_err(|_| DhtError::Timeout)?
            .map_err(|_| DhtError::Closed)?;
        tokio::time::timeout_at(deadline, rx)
            .await
            .map_err(|_| DhtError::Timeout)?
            .map_err(|_| DhtError::Closed)
    }

    /// Starts providing `digest` (the raw sha256): stores the record locally and announces it
    /// to the nodes closest to the digest; Kademlia re-announces it every
    /// `provider_republish` until [`DhtHandle::withdraw`]. Returns when the first
    /// announcement has finished. `Err(Timeout)` means it did not finish in time; the node
    /// still provides the digest (the local record stays and is republished).
    pub async fn provide(&self, digest: [u8; 32]) -> Result<(), DhtError> {
        self.call(QUERY_TIMEOUT + Duration::from_secs(2), |reply| {
            Command::Provide { key: digest, reply }
        })
        .await?
    }

    /// Stops providing `digest` (call it when the blob is evicted). Local and immediate;
    /// copies of the record on other nodes expire within `provider_ttl` (see the module
    /// docs).
    pub async fn withdraw(&self, digest: [u8; 32]) -> Result<(), DhtError> {
        self.call(LOCAL_CALL_TIMEOUT, |reply| Command::Withdraw {
            key: digest,
            reply,
        })
        .await
    }

    /// Up to `limit` other nodes that provide `digest`, with their chunk addresses: first the
    /// provider records this node holds itself, then those found by a Kademlia
    /// `GET_PROVIDERS` query. Answers as soon as `limit` providers with a usable address are
    /// known, when the query finishes, or after `lookup_timeout` with what was found. This
    /// node is never in the list.
    pub async fn providers(
        &self,
        digest: [u8; 32],
        limit: usize,
    ) -> Result<Vec<Provider>, DhtError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.call(self.lookup_timeout + Duration::from_secs(2), |reply| {
            Command::Providers {
                key: digest,
                limit,
                reply,
            }
        })
        .await
    }

    /// The `k` nodes (at most 20) nearest `key` in the DHT, this node included if it is one
    /// of them: herd control (only the nodes nearest a digest fetch it from the upstream).
    /// Every node that knows the same membership gets the same answer.
    pub async fn closest_peers(&self, key: [u8; 32], k: usize) -> Result<ClosestPeers, DhtError> {
        self.call(self.lookup_timeout + Duration::from_secs(2), |reply| {
            Command::ClosestPeers { key, k, reply }
        })
        .await
    }

    /// Peers with an open connection.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, DhtError> {
        self.call(LOCAL_CALL_TIMEOUT, |reply| Command::ConnectedPeers {
            reply,
        })
        .await
    }

    /// Peers in the Kademlia routing table.
    pub async fn known_peers(&self) -> Result<Vec<PeerId>, DhtError> {
        self.call(LOCAL_CALL_TIMEOUT, |reply| Command::KnownPeers { reply })
            .await
    }

    /// The addresses the DHT listens on (one per interface for a wildcard listen address).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, DhtError> {
        self.call(LOCAL_CALL_TIMEOUT, |reply| Command::ListenAddrs { reply })
            .await
    }
}

/// The running DHT. Dropping it without [`Dht::shutdown`] stops the actor too (without
/// waiting for it).
#[must_use = "the DHT stops when dropped"]
pub struct Dht {
    handle: DhtHandle,
    listen_addr: SocketAddr,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) kad: kad::Behaviour<MemoryStore>,
    pub(crate) identify: identify::Behaviour,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
}

impl Dht {
    /// Loads (or creates) the identity, binds the TCP listener and starts the actor. Errors
    /// are start-up errors: a bad `--peer`, an unreadable identity, a port in use.
    pub async fn start(config: DhtConfig, metrics: Metrics) -> Result<Dht, DhtError> {
        let specs = config
            .peers
            .iter()
            .map(|s| PeerSpec::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let replication = NonZeroUsize::new(config.replication_factor)
            .filter(|r| r.get() <= MAX_PROVIDERS_PER_KEY)
            .ok_or_else(|| DhtError::Config("replication_factor must be 1..=20".into()))?;
        if config.provider_republish.is_zero() || config.provider_republish >= config.provider_ttl {
            return Err(DhtError::Config(
                "provider_republish must be > 0 and < provider_ttl".into(),
            ));
        }
        if config.lookup_timeout.is_zero() || config.redial_interval.is_zero() {
            return Err(DhtError::Config(
                "lookup_timeout and redial_interval must be > 0".into(),
            ));
        }

        let identity_file = config.identity_file.clone();
        let keypair = tokio::task::spawn_blocking(move || identity::load_or_create(&identity_file))
            .await
            .map_err(|e| DhtError::Identity {
                path: config.identity_file.clone(),
                reason: e.to_string(),
            })??;
        let local_peer_id = keypair.public().to_peer_id();
        let psk = config.cluster_key.map(PreSharedKey::new);
        match &psk {
            Some(k) => info!(fingerprint = %k.fingerprint(), "DHT: private cluster (pnet)"),
            None => {
                warn!("DHT: no cluster key: open cluster, any host that reaches the port can join")
            }
        }
        let transport = build_transport(&keypair, psk)?;
        let behaviour = build_behaviour(&keypair, &config, replication)?;
        // Every stream we open proposes exactly one protocol to a Shoal peer, so "lazy"
        // multistream-select (send the request right after the protocol name instead of
        // waiting for its echo) is safe, and saves a round trip per Kademlia request.
        let swarm_config = libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT)
            .with_substream_upgrade_protocol_override(Version::V1Lazy);
        let mut swarm = Swarm::new(transport, behaviour, local_peer_id, swarm_config);
        swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Server));

        let listen_err = |reason: String| DhtError::Listen {
            addr: config.listen,
            reason,
        };
        // libp2p-tcp listens with SO_REUSEPORT, so a second process (same user) could bind the
        // same port and silently receive half the connections. A plain bind first turns a
        // port in use into a start-up error.
        if config.listen.port() != 0 {
            std::net::TcpListener::bind(config.listen).map_err(|e| listen_err(e.to_string()))?;
        }
        swarm
            .listen_on(socket_to_multiaddr(config.listen))
            .map_err(|e| listen_err(e.to_string()))?;
        // Wait for the listener so the bound port is known (port 0) and a bind failure is a
        // start-up error. Events seen meanwhile are handed to the actor.
        let mut early = Vec::new();
        let first_addr = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::NewListenAddr {
                        listener_id,
                        address,
                    } => {
                        early.push(SwarmEvent::NewListenAddr {
                            listener_id,
                            address: address.clone(),
                        });
                        return Ok(address);
                    }
                    SwarmEvent::ListenerClosed { reason: Err(e), .. } => {
                        return Err(listen_err(e.to_string()))
                    }
                    SwarmEvent::ListenerError { error, .. } => {
                        return Err(listen_err(error.to_string()))
                    }
                    other => early.push(other),
                }
            }
        })
        .await
        .map_err(|_| listen_err("listener did not start".into()))??;
        let port = multiaddr_to_socket(&first_addr)
            .map(|sa| sa.port())
            .ok_or_else(|| listen_err(format!("unexpected listen address {first_addr}")))?;
        let listen_addr = SocketAddr::new(config.listen.ip(), port);

        let cancel = CancellationToken::new();
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let (resolved_tx, resolved_rx) = mpsc::channel(4);
        if !specs.is_empty() {
            tokio::spawn(
                actor::resolve_peers(specs, config.redial_interval, resolved_tx, cancel.clone())
                    .instrument(tracing::info_span!("dht-resolver", peer_id = %local_peer_id)),
            );
        }
        let actor = actor::Actor::new(
            swarm,
            rx,
            resolved_rx,
            cancel.clone(),
            metrics,
            config.lookup_timeout,
            config.site.clone(),
        );
        let task = tokio::spawn(
            actor
                .run(early)
                .instrument(tracing::info_span!("dht", peer_id = %local_peer_id)),
        );
        info!(%listen_addr, %local_peer_id, peers = config.peers.len(), mdns = config.mdns, "DHT listening");
        Ok(Dht {
            handle: DhtHandle {
                tx,
                local_peer_id,
                lookup_timeout: config.lookup_timeout,
            },
            listen_addr,
            cancel,
            task: Some(task),
        })
    }

    /// A handle for making requests.
    pub fn handle(&self) -> DhtHandle {
        self.handle.clone()
    }

    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.handle.local_peer_id
    }

    /// The bound TCP address (the configured one, with the chosen port if it was 0). The
    /// chunk exchange should bind the same port over UDP.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// Stops the actor: pending calls fail with [`DhtError::Closed`], connections are closed,
    /// then this returns. Later calls on handles fail with `Closed`.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Dht {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn build_transport(
    keypair: &libp2p::identity::Keypair,
    psk: Option<PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, DhtError> {
    let noise = noise::Config::new(keypair).map_err(|e| DhtError::Identity {
        path: PathBuf::new(),
        reason: format!("noise: {e}"),
    })?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::new().nodelay(true));
    // Two explicit chains rather than an `Either`: the same upgrades, with or without pnet
    // underneath.
    Ok(match psk {
        Some(psk) => tcp
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(HANDSHAKE_TIMEOUT)
            .boxed(),
        None => tcp
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(HANDSHAKE_TIMEOUT)
            .boxed(),
    })
}

/// identify's agent version: `shoal/VERSION`, and ` site=SITE` when this node names a site.
pub fn agent_version(site: &str) -> String {
    let mut v = format!("shoal/{}", env!("CARGO_PKG_VERSION"));
    if !site.is_empty() {
        v.push_str(" site=");
        v.push_str(site);
    }
    v
}

/// The site a peer's identify agent version names (see [`agent_version`]): `None` when it
/// names none or an invalid one.
pub fn site_of_agent(agent: &str) -> Option<String> {
    agent
        .split(' ')
        .find_map(|w| w.strip_prefix("site="))
        .filter(|s| shoal_protocol::wire::valid_site(s))
        .map(str::to_string)
}

fn build_behaviour(
    keypair: &libp2p::identity::Keypair,
    config: &DhtConfig,
    replication: NonZeroUsize,
) -> Result<Behaviour, DhtError> {
    let local_peer_id = keypair.public().to_peer_id();
    let mut kcfg = kad::Config::new(KAD_PROTOCOL);
    kcfg.set_replication_factor(replication)
        .set_parallelism(PARALLELISM)
        .set_query_timeout(QUERY_TIMEOUT)
        .set_provider_record_ttl(Some(config.provider_ttl))
        .set_provider_publication_interval(Some(config.provider_republish))
        // Value records are not used (and the store accepts none); set anyway so nothing is
        // left at a default that matters.
        .set_record_ttl(Some(config.provider_ttl))
        .set_publication_interval(None)
        .set_replication_interval(None)
        .set_caching(kad::Caching::Disabled)
        .set_periodic_bootstrap_interval(Some(BOOTSTRAP_INTERVAL));
    let store = MemoryStore::with_config(
        local_peer_id,
        MemoryStoreConfig {
            max_records: 0,
            max_value_bytes: 0,
            max_providers_per_key: MAX_PROVIDERS_PER_KEY,
            max_provided_keys: MAX_STORED_KEYS,
        },
    );
    let kad = kad::Behaviour::with_config(local_peer_id, store, kcfg);
    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_string(), keypair.public())
            .with_agent_version(agent_version(&config.site))
            .with_push_listen_addr_updates(true),
    );
    let mdns = if config.mdns {
        Some(
            mdns::tokio::Behaviour::new(
                mdns::Config {
                    // libp2p's default is 5 minutes once a first answer came (or the probes
                    // ended): a node whose first queries went unanswered stayed alone that long.
                    query_interval: MDNS_QUERY_INTERVAL,
                    ..mdns::Config::default()
                },
                local_peer_id,
            )
            .map_err(|e| DhtError::Config(format!("mDNS: {e}")))?,
        )
    } else {
        None
    };
    Ok(Behaviour {
        kad,
        identify,
        mdns: Toggle::from(mdns),
    })
}
