//! The node's side of the swarm: the DHT (who holds a blob), the QUIC endpoint (chunks), and
//! the download driver that feeds the sans-IO [`shoal_protocol::swarm::Download`] with what
//! happens on the network and carries out what it decides.
//!
//! Invariants:
//! - A chunk from a peer is written to the partial file only after
//!   [`peer::PeerConn::chunk_prefix`] verified it against the table (whole, or the prefix known
//!   of a blob still arriving); an upstream chunk is verified when the table covers it. At the
//!   end every chunk has chained against the whole table (those that were not checked on
//!   arrival are read back and checked), or the whole blob is hashed again: nothing is stored,
//!   nor its last byte served, unless it matches its digest.
//! - A node announces a blob as soon as it starts fetching it (from the upstream or from peers)
//!   and serves each chunk it holds verified while the rest arrives ([`crate::arriving`]); a
//!   failed download withdraws the announcement. A chunk is served only once the node's table
//!   covers it.
//! - Followers go to the upstream only when the providers stall (no new chunk anywhere for the
//!   takeover time, staggered by their order among the fetching nodes), not while a seeder is
//!   still streaming the blob.
//! - A private blob leaves a node through the swarm only to a request with a grant its
//!   registry accepts ([`crate::grants`]); a node shows a grant only after the registry has
//!   accepted its own client's credentials for the blob, and keeps its copy private.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_protocol::chunk::{ChunkError, TablePrefix};
use shoal_protocol::swarm::{
    designated_seeders, next_lookup_after_ms, provider_poll_after_ms, relookup_after_ms,
    seeder_order, site_gateway, Action, Download, DownloadConfig, FailReason, Have, InFlightBudget,
    PeerId, SiteRole, FAR_PEER_LIMIT, HAVE_POLL_MS, PROVIDER_LIMIT,
};
use shoal_protocol::wire::Bitfield;
use shoal_protocol::Digest;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::arriving::{Arriving, Registration};
use crate::config::P2pConfig;
use crate::dht::{self, ClosestPeers, Dht, DhtConfig, DhtHandle, Provider};
use crate::mirror::{Mirror, Progress};
use crate::peer::{self, Authorizer, ClusterKey, Endpoint, PeerConfig, PeerConn, PeerError};
use crate::store::{BlobWriter, Store};
use crate::upstream::{ClientAuth, Registry};

/// Blobs up to this size are fetched from the upstream at once when nobody provides them yet.
const SMALL_BLOB_DIRECT: u64 = 1 << 20;
/// The most takeover periods a follower waits for stalled providers (see `swarm_fetch`).
const MAX_TAKEOVER_STAGGER: u64 = 4;
/// Candidates among which the designated seeders are chosen.
const SEEDER_CANDIDATES: usize = 20;
/// A download that makes no progress for this long fails (and the client's response aborts).
const STALL_LIMIT: Duration = Duration::from_secs(60);
/// A follower's download that has received no chunk for this long may go to the upstream like
/// a designated seeder's (`Download::allow_upstream`), even while its peers look alive.
const STARVED_UPSTREAM: Duration = Duration::from_secs(40);

/// Errors starting the swarm.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    /// The DHT could not start.
    #[error("DHT: {0}")]
    Dht(#[from] dht::DhtError),
    /// The QUIC endpoint could not start.
    #[error("chunk endpoint: {0}")]
    Bind(#[from] peer::BindError),
}

/// A running swarm membership.
pub struct Swarm {
    dht: tokio::sync::Mutex<Option<Dht>>,
    handle: DhtHandle,
    endpoint: tokio::sync::Mutex<Option<Endpoint>>,
    config: P2pConfig,
    listen: SocketAddr,
    /// Open connections by chunk address. A tokio mutex: connecting happens under it, so two
    /// downloads never open two connections to one peer.
    conns: tokio::sync::Mutex<HashMap<SocketAddr, PeerConn>>,
    /// How long a node that is not a designated seeder waits for a provider.
    pub takeover_after: Duration,
    /// Blobs this node is importing from the upstream right now (see [`Swarm::import`]).
    imports: Arc<AtomicUsize>,
    /// The other layers of the image manifests this node served (see [`Siblings`]).
    siblings: std::sync::Mutex<Siblings>,
    /// One in-flight budget for all of this node's swarm downloads (`InFlightBudget`), on the
    /// clock of `epoch`, and the downloads sharing it.
    budget: std::sync::Mutex<InFlightBudget>,
    epoch: Instant,
    downloads: Arc<AtomicUsize>,
}

/// Layer digests most recently seen, each with the layers of its image manifest: the blobs
/// pulled together, whose designated seeders `seeder_order` spreads over distinct nodes.
/// Bounded: the oldest manifest's entries go first.
#[derive(Default)]
struct Siblings {
    by_layer: HashMap<Digest, Arc<[[u8; 32]]>>,
    order: VecDeque<Digest>,
}

/// Layers remembered at most ([`Siblings`]): 64 bytes and a few pointers each.
const MAX_SIBLING_LAYERS: usize = 4096;

/// The large layers of an image manifest (`layers[]`, as Docker's schema 2 and OCI image
/// manifests list them): those that go through seeding (above [`SMALL_BLOB_DIRECT`]). Anything
/// else (an index, a malformed body) has none.
fn manifest_layers(body: &[u8]) -> Vec<Digest> {
    #[derive(serde::Deserialize)]
    struct Layer {
        digest: String,
        #[serde(default)]
        size: u64,
    }
    #[derive(serde::Deserialize)]
    struct Layers {
        #[serde(default)]
        layers: Vec<Layer>,
    }
    let Ok(m) = serde_json::from_slice::<Layers>(body) else {
        return Vec::new();
    };
    let mut out: Vec<Digest> = m
        .layers
        .iter()
        .filter(|l| l.size > SMALL_BLOB_DIRECT)
        .filter_map(|l| Digest::parse(&l.digest).ok())
        .collect();
    out.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    out.dedup();
    out
}

impl Siblings {
    fn note(&mut self, layers: &[Digest]) {
        if layers.len() < 2 {
            return;
        }
        let all: Arc<[[u8; 32]]> = layers.iter().map(|d| *d.as_bytes()).collect();
        for d in layers {
            if self.by_layer.insert(*d, all.clone()).is_none() {
                self.order.push_back(*d);
            }
        }
        while self.order.len() > MAX_SIBLING_LAYERS {
            if let Some(old) = self.order.pop_front() {
                self.by_layer.remove(&old);
            }
        }
    }

    fn of(&self, digest: &Digest) -> Option<Arc<[[u8; 32]]>> {
        self.by_layer.get(digest).cloned()
    }
}

/// Counts one import from the upstream ([`Swarm::import`]) or one swarm download while alive.
pub(crate) struct CountGuard(Arc<AtomicUsize>);

impl CountGuard {
    fn new(count: &Arc<AtomicUsize>) -> CountGuard {
        count.fetch_add(1, Ordering::Relaxed);
        CountGuard(count.clone())
    }
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn swarm_id(p: &libp2p::PeerId) -> PeerId {
    PeerId::from_bytes(&p.to_bytes()).unwrap_or_else(|| PeerId::from_u64(0))
}

impl Swarm {
    /// Starts the DHT on `config.listen` (TCP) and the chunk endpoint on the same port (UDP).
    pub async fn start(
        config: &P2pConfig,
        data_dir: &Path,
        store: Store,
        dht_metrics: dht::Metrics,
        peer_metrics: Arc<peer::Metrics>,
        authorizer: Arc<dyn Authorizer>,
    ) -> Result<Swarm, SwarmError> {
        let mut dcfg = DhtConfig::new(config.listen, data_dir);
        dcfg.peers = config.peers.clone();
        dcfg.cluster_key = config.cluster_key;
        dcfg.mdns = config.mdns;
        dcfg.site = config.site.clone();
        dcfg.lookup_timeout = Duration::from_secs(2);
        let dht = Dht::start(dcfg, dht_metrics).await?;
        let listen = dht.listen_addr();
        // An open cluster (no key file) still authenticates with a well-known key: anyone may
        // join, as documented.
        let key = ClusterKey::new(config.cluster_key.unwrap_or([0u8; 32]));
        let peer_config = PeerConfig {
            site: config.site.clone(),
            fault_corrupt_chunks: config.fault_corrupt_chunks,
            fault_lie_tables: config.fault_lie_tables,
            fault_stall_chunks: config.fault_stall_chunks,
            fault_chunk_rate: config.fault_chunk_rate,
            serve: config.serve.clone(),
            ..PeerConfig::new(listen, key)
        };
        let endpoint = Endpoint::bind(peer_config, store.clone(), authorizer, peer_metrics)?;
        // Announce what the cache already holds, and withdraw what it evicts.
        let handle = dht.handle();
        let held = store.shareable_digests();
        if !held.is_empty() {
            let h = handle.clone();
            tokio::spawn(async move {
                for d in held {
                    let _ = h.provide(*d.as_bytes()).await;
                }
            });
        }
        let h = handle.clone();
        let rt = tokio::runtime::Handle::current();
        store.set_on_evict(Box::new(move |d: Digest| {
            let h = h.clone();
            rt.spawn(async move {
                let _ = h.withdraw(*d.as_bytes()).await;
            });
        }));
        info!(%listen, peer_id = %dht.local_peer_id(), "swarm started");
        Ok(Swarm {
            handle: dht.handle(),
            dht: tokio::sync::Mutex::new(Some(dht)),
            endpoint: tokio::sync::Mutex::new(Some(endpoint)),
            config: config.clone(),
            listen,
            conns: tokio::sync::Mutex::new(HashMap::new()),
            takeover_after: Duration::from_millis(shoal_protocol::swarm::DEFAULT_TAKEOVER_AFTER_MS),
            imports: Arc::new(AtomicUsize::new(0)),
            siblings: std::sync::Mutex::new(Siblings::default()),
            budget: std::sync::Mutex::new(InFlightBudget::new()),
            epoch: Instant::now(),
            downloads: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Marks a blob import from the upstream (a seeder's stream) as in progress until the guard
    /// is dropped (the caller drops it once `IMPORT_HOLD_PERCENT` of the blob is in). Meanwhile
    /// this node's swarm downloads make no new peer requests (`Download::hold_peer_requests`):
    /// its downlink carries the import, which the rest of the swarm waits for, at full speed.
    pub(crate) fn import(&self) -> CountGuard {
        CountGuard::new(&self.imports)
    }

    /// True while this node imports a blob from the upstream.
    pub(crate) fn importing(&self) -> bool {
        self.imports.load(Ordering::Relaxed) > 0
    }

    /// The TCP and UDP address in use.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> libp2p::PeerId {
        self.handle.local_peer_id()
    }

    /// Announces a complete, verified blob.
    pub fn provide(&self, digest: Digest) {
        let handle = self.handle.clone();
        tokio::spawn(async move {
            if let Err(e) = handle.provide(*digest.as_bytes()).await {
                debug!(digest = %digest, error = %e, "provide did not finish (the record stays and is republished)");
            }
        });
    }

    /// Stops announcing a blob (evicted).
    pub fn withdraw(&self, digest: Digest) {
        let handle = self.handle.clone();
        tokio::spawn(async move {
            let _ = handle.withdraw(*digest.as_bytes()).await;
        });
    }

    /// Up to `limit` providers of `digest` (the lookup answers as soon as it has found that
    /// many, else when the query ends).
    async fn providers(&self, digest: &Digest, limit: usize) -> Vec<Provider> {
        match self.handle.providers(*digest.as_bytes(), limit).await {
            Ok(p) => p,
            Err(e) => {
                debug!(digest = %digest, error = %e, "provider lookup failed");
                Vec::new()
            }
        }
    }

    /// `bytes` of blob content arrived at this node (a verified chunk from a peer or the
    /// upstream, or a piece of an import): the in-flight budget follows the receive rate.
    pub(crate) fn received(&self, bytes: u64) {
        let now = self.epoch.elapsed().as_millis() as u64;
        if let Ok(mut b) = self.budget.lock() {
            b.received(bytes, now);
        }
    }

    /// Sets a swarm download's part of the node's in-flight budget and the request timeout
    /// floor that goes with it (`InFlightBudget::apply`).
    fn apply_budget(&self, dl: &mut Download) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let downloads = self.downloads.load(Ordering::Relaxed).max(1);
        if let Ok(b) = self.budget.lock() {
            b.apply(dl, downloads, now);
        }
    }

    /// Remembers the layers of an image manifest this node serves: its blobs' seeders are
    /// spread over distinct nodes ([`seeder_order`]).
    pub fn note_manifest(&self, body: &[u8]) {
        let layers = manifest_layers(body);
        if let Ok(mut s) = self.siblings.lock() {
            s.note(&layers);
        }
    }

    /// This node's place for `digest` among the nodes nearest it: its rank (0: the nearest;
    /// the first `seeders` ranks are the designated upstream fetchers, the others take over in
    /// rank order) and, when it names a site, its role in the site (`site_gateway`: one of the
    /// few that reach across the WAN for the blob at once). A layer of an image manifest this
    /// node served is ranked with its sibling layers (`seeder_order`), so that one node is not
    /// the designated seeder of two of them.
    async fn placement(&self, digest: &Digest) -> (usize, SiteRole) {
        let me = swarm_id(&self.peer_id());
        match self
            .handle
            .closest_peers(*digest.as_bytes(), SEEDER_CANDIDATES)
            .await
        {
            Ok(c) => {
                let role = self.site_role(digest, &c);
                let mut candidates: Vec<PeerId> = c.peers.iter().map(swarm_id).collect();
                if !candidates.contains(&me) {
                    candidates.push(me);
                }
                let siblings = self.siblings.lock().ok().and_then(|s| s.of(digest));
                let order = seeder_order(
                    digest.as_bytes(),
                    siblings.as_deref().unwrap_or(&[]),
                    candidates,
                    self.config.seeders,
                );
                (order.iter().position(|p| *p == me).unwrap_or(0), role)
            }
            // Alone or the DHT failing: this node is its own seeder.
            Err(_) => (0, SiteRole::Unjudged),
        }
    }

    /// This node's role in its site for `digest`, judged from the DHT's nodes nearest the
    /// digest's key (`sha256` of the digest, as Kademlia places it) and the sites their
    /// identify told.
    fn site_role(&self, digest: &Digest, nearest: &ClosestPeers) -> SiteRole {
        let site = &self.config.site;
        if site.is_empty() {
            return SiteRole::Unjudged;
        }
        let key: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(digest.as_bytes()).into();
        site_gateway(
            &key,
            &swarm_id(&self.peer_id()),
            nearest
                .peers
                .iter()
                .zip(&nearest.sites)
                .map(|(p, s)| (swarm_id(p), s.as_deref() == Some(site.as_str()))),
            self.config.site_gateways,
        )
    }

    async fn conn(&self, addr: SocketAddr) -> Result<PeerConn, PeerError> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&addr) {
            return Ok(c.clone());
        }
        // Held across the handshake (bounded by the endpoint's timeout): shutdown waits for it.
        let ep = self.endpoint.lock().await;
        let ep = ep
            .as_ref()
            .ok_or_else(|| PeerError::Connection("shutting down".into()))?;
        let c = ep.connect(addr).await?;
        conns.insert(addr, c.clone());
        Ok(c)
    }

    /// A small blob (a manifest) from the first provider that gives all of it, each chunk
    /// verified against the table.
    pub async fn fetch_small(&self, digest: &Digest, limit: usize) -> Option<Vec<u8>> {
        for p in self.providers(digest, PROVIDER_LIMIT).await {
            let Ok(c) = self.conn(p.chunk_addr).await else {
                continue;
            };
            let Ok(table) = c.table(digest, self.config.chunk_size, None, &[]).await else {
                continue;
            };
            if table.layout().blob_size() > limit as u64 {
                return None;
            }
            let mut out = Vec::with_capacity(table.layout().blob_size() as usize);
            let mut ok = true;
            for i in 0..table.layout().count() {
                match c.chunk(digest, &table, i, &[]).await {
                    Ok(b) => out.extend_from_slice(&b),
                    Err(e) => {
                        debug!(digest = %digest, peer = %p.peer_id, error = %e, "small blob chunk failed");
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                return Some(out);
            }
        }
        None
    }

    async fn drop_conn(&self, addr: SocketAddr) {
        if let Some(c) = self.conns.lock().await.remove(&addr) {
            c.close();
        }
    }

    /// Stops the endpoint and the DHT.
    pub async fn shutdown(&self) {
        for (_, c) in self.conns.lock().await.drain() {
            c.close();
        }
        if let Some(e) = self.endpoint.lock().await.take() {
            e.shutdown().await;
        }
        if let Some(d) = self.dht.lock().await.take() {
            d.shutdown().await;
        }
    }
}

/// How old a chunk request must be before the bytes it received are reported to its download
/// (`Download::chunk_progress`): a fast transfer finishes before, and costs nothing.
const PROGRESS_REPORT_AFTER: Duration = Duration::from_secs(1);

/// A chunk request in flight to a peer, as the driver tracks it.
struct InFlightRequest {
    /// Its task, aborted on `Action::Cancel` (dropping its streams resets them).
    task: tokio::task::AbortHandle,
    /// Bytes of the chunk received so far (counted as they arrive, not yet verified).
    received: Arc<AtomicU64>,
    sent: Instant,
}

/// What the driver's helper tasks report.
enum Event {
    /// A chunk fetch finished.
    Chunk {
        /// `None`: fetched from the upstream.
        peer: Option<PeerId>,
        index: u32,
        /// The table epoch it was checked under (see `drive`).
        epoch: u32,
        /// Checked against the table (always, from a peer; from the upstream, when the table
        /// covered it when it was asked for).
        checked: bool,
        result: Result<Bytes, FailReason>,
    },
    /// A peer answered (or failed) a `Have`, or its watch brought a new bitfield.
    Have {
        peer: PeerId,
        /// It is in another site (see [`is_far`]).
        far: bool,
        result: Result<Bitfield, PeerError>,
    },
    /// A peer's watch ended: `None` after its full bitfield, else why (then it is polled).
    WatchEnded {
        peer: PeerId,
        error: Option<PeerError>,
    },
    /// A peer answered (or failed) a `Table`.
    Table {
        peer: PeerId,
        result: Result<TablePrefix, PeerError>,
    },
    /// A provider lookup finished, and how many peers the node knows of at all (its routing
    /// table; `usize::MAX` when the DHT did not say).
    Providers(Vec<Provider>, usize),
    /// The table asked for by [`Action::RefetchTable`] (or after a table conflict) from
    /// `arbiter`, a provider other than `exclude` and other than the sources of the table in use.
    Refetched {
        exclude: PeerId,
        arbiter: PeerId,
        result: Result<TablePrefix, PeerError>,
    },
}

fn fail_reason(e: &PeerError) -> FailReason {
    match e {
        PeerError::Corrupt { .. }
        | PeerError::BadTable(_)
        | PeerError::Protocol(_)
        | PeerError::AuthFailed(_) => FailReason::Corrupt,
        PeerError::Ambiguous { .. } => FailReason::Ambiguous,
        PeerError::Timeout(_) => FailReason::Timeout,
        // `Busy`: at its serving limit, popular rather than failing.
        PeerError::Refused {
            retry_after: Some(_),
        } => FailReason::Busy,
        _ => FailReason::Refused,
    }
}

/// What the driver knows of one provider.
struct PeerInfo {
    addr: SocketAddr,
    /// The libp2p peer id, for logs and metrics.
    name: String,
    /// Its last `Have`; `None` until the first answer.
    bits: Option<Bitfield>,
    /// Whether it has been added to the [`Download`].
    added: bool,
    have_pending: bool,
    table_pending: bool,
    /// Its `Watch` while one is live (the peer pushes its bitfield; it is not polled). Aborted
    /// when the entry is dropped.
    watch: Option<AbortOnDrop>,
    /// In another site (set when it is added to the [`Download`]).
    far: bool,
}

/// A peer is far when both it and this node name a site and the sites differ: a node or peer
/// without a site treats every peer as near (as before sites).
fn is_far(mine: &str, theirs: &str) -> bool {
    !mine.is_empty() && !theirs.is_empty() && mine != theirs
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PeerInfo {
    fn complete(&self) -> bool {
        self.bits.as_ref().is_some_and(Bitfield::is_full)
    }
}

/// The provider to ask for the table when `suspect`'s chunk or table disagrees with the one in
/// use: another, not banned, and not one of `sources` (the providers the table in use came
/// from: asked again, a liar would only repeat its table, and the honest suspect would be
/// banned), holding the whole blob if possible, else the most of it.
fn arbiter(
    peers: &HashMap<PeerId, PeerInfo>,
    dl: &Download,
    suspect: PeerId,
    sources: &HashSet<PeerId>,
) -> Option<(PeerId, SocketAddr)> {
    peers
        .iter()
        .filter(|(id, _)| **id != suspect && !sources.contains(id) && !dl.is_banned(id))
        .max_by_key(|(id, p)| {
            (
                p.complete(),
                p.bits.as_ref().map_or(0, Bitfield::count_ones),
                **id,
            )
        })
        .map(|(id, p)| (*id, p.addr))
}

/// Who settles a dispute between the table in use and a suspect (a chunk that does not chain
/// with it, or a provider's table that disagrees with it).
enum Judge {
    /// A third provider ([`arbiter`]): its table decides.
    Third(PeerId, SocketAddr),
    /// Nobody else, but the table in use came (in part) from a provider since banned: it no
    /// longer outranks the suspect, whose own table decides (agreeing with ours: the suspect
    /// lies; disagreeing: ours is cut back and nobody is blamed).
    Suspect,
    /// Nobody: the table in use came from providers trusted no less than the suspect, so the
    /// suspect is the likelier liar.
    Nobody,
}

fn judge(
    peers: &HashMap<PeerId, PeerInfo>,
    dl: &Download,
    suspect: PeerId,
    sources: &HashSet<PeerId>,
) -> Judge {
    match arbiter(peers, dl, suspect, sources) {
        Some((id, addr)) => Judge::Third(id, addr),
        None if sources.iter().any(|s| dl.is_banned(s)) => Judge::Suspect,
        None => Judge::Nobody,
    }
}

impl Mirror {
    /// Tries to get a blob from the swarm. `Ok(None)`: go to the upstream (this node is a
    /// designated seeder, nobody provides it within the takeover time, or no provider gives a
    /// usable table).
    pub(crate) async fn swarm_fetch(
        self: &Arc<Self>,
        sw: &Arc<Swarm>,
        reg: &Registry,
        name: &shoal_protocol::Name,
        digest: Digest,
        auth: &ClientAuth,
    ) -> Option<Arc<crate::mirror::Transfer>> {
        let started = Instant::now();
        let me = sw.peer_id();
        let mut providers = sw.providers(&digest, PROVIDER_LIMIT).await;
        providers.retain(|p| p.peer_id != me);
        let (rank, site_role) = sw.placement(&digest).await;
        let designated = rank < sw.config.seeders;
        let takeover = sw.takeover_after;
        if providers.is_empty() {
            if designated {
                info!(digest = %digest, "no provider: this node is a designated seeder, fetching upstream");
                return None;
            }
            // A small blob (an image config, say) costs the upstream next to nothing: waiting
            // up to the takeover time for its seeder (whose client may ask for it last) would
            // cost every puller far more than it saves.
            if let Ok(head) = self.blob_head(reg, name, &digest, auth).await {
                if head.size.is_some_and(|s| s <= SMALL_BLOB_DIRECT) {
                    debug!(digest = %digest, size = head.size, "small blob: fetched upstream without waiting for a seeder");
                    return None;
                }
            }
            // Looked again soon after the first (empty) look, then less often
            // (`provider_poll_after_ms`: 25 ms doubling to 250 ms).
            let mut polls = 0;
            while providers.is_empty() && started.elapsed() < takeover {
                tokio::time::sleep(Duration::from_millis(provider_poll_after_ms(polls))).await;
                polls += 1;
                // The first provider is enough to start: a lookup for more waits for the whole
                // query (every queried node's answer, slow over loaded links: 2.5 s seen in
                // the cluster harness), and the download looks up more of them 100 ms later.
                providers = sw.providers(&digest, 1).await;
                providers.retain(|p| p.peer_id != me);
            }
            if providers.is_empty() {
                info!(digest = %digest, waited_ms = started.elapsed().as_millis() as u64, "no provider appeared: taking over the upstream fetch");
                return None;
            }
        }
        let max_chunk_size = sw.config.chunk_size;
        // The longest table known among the providers (a whole one ends the search).
        let mut table: Option<TablePrefix> = None;
        // The provider it came from.
        let mut table_from: Option<PeerId> = None;
        // Empty while the blob looks public; the grant for this client once a provider says
        // it is private (`Denied`).
        let mut authz: Vec<u8> = Vec::new();
        for p in &providers {
            let mut got = match sw.conn(p.chunk_addr).await {
                Ok(c) => c.table_prefix(&digest, max_chunk_size, None, &authz).await,
                Err(e) => Err(e),
            };
            if matches!(got, Err(PeerError::Denied)) && authz.is_empty() {
                let Some(grant) = self.peer_grant(reg, name, &digest, auth).await else {
                    info!(digest = %digest, "private blob and no grant to show for this client: not fetched from peers");
                    return None;
                };
                authz = grant;
                got = match sw.conn(p.chunk_addr).await {
                    Ok(c) => c.table_prefix(&digest, max_chunk_size, None, &authz).await,
                    Err(e) => Err(e),
                };
            }
            match got {
                Ok(t) => {
                    let better = table.as_ref().is_none_or(|b| {
                        b.layout() == t.layout() && t.states().len() > b.states().len()
                    });
                    if better {
                        table = Some(t);
                        table_from = Some(swarm_id(&p.peer_id));
                    }
                    if table.as_ref().is_some_and(TablePrefix::is_complete) {
                        break;
                    }
                }
                Err(PeerError::Remote(message)) => {
                    // The peer refused with a reason (a misconfiguration, such as another
                    // `--chunk-size`): loud, not one more quiet fallback to the upstream.
                    warn!(digest = %digest, peer = %p.peer_id, error = %message, "a provider refused to give its table");
                }
                Err(e) => {
                    info!(digest = %digest, peer = %p.peer_id, error = %e, "no table from provider");
                    if matches!(e, PeerError::Connection(_) | PeerError::Timeout(_)) {
                        sw.drop_conn(p.chunk_addr).await;
                    }
                }
            }
        }
        let table = table?;
        let layout = table.layout();
        let size = layout.blob_size();
        let writer = self.store.writer(&digest).ok()?;
        let file = writer.reader().ok()?;
        let shared_file = writer.reader().ok()?;
        let private = !authz.is_empty();
        let mut arriving = Arriving::new(digest, layout, shared_file);
        if private {
            arriving = arriving.private(reg.key.clone());
        }
        let arriving = Arc::new(arriving);
        let _ = arriving.merge_prefix(&table);
        let registration = self.store.arriving().register(arriving);
        sw.provide(digest);
        let (tx, rx) = watch::channel(Progress::default());
        let transfer = Arc::new(crate::mirror::Transfer {
            digest,
            size: Some(size),
            file,
            progress: rx,
            private,
            source: "peer",
        });
        self.insert_arriving(digest, transfer.clone());
        self.pulls.fetching(&digest, Some(size));
        if !sw.config.site.is_empty() {
            let role = match site_role {
                SiteRole::Gateway { .. } => "gateway",
                SiteRole::Member => "member",
                SiteRole::Unjudged => "unjudged",
            };
            self.pulls.site_role(&digest, role);
        }
        info!(digest = %digest, size, providers = providers.len(), table_covers = table.covered(), lookup_ms = started.elapsed().as_millis() as u64, ?site_role, "fetching blob from peers");
        let (this, sw, reg, name, auth) = (
            self.clone(),
            sw.clone(),
            reg.clone(),
            name.clone(),
            auth.clone(),
        );
        // Once the providers stall or die, followers take over one after another, in their
        // order by distance to the digest among the nodes fetching it (the providers and this
        // node): the first re-seeds the rest while the others fetch it from that one.
        let me_id = swarm_id(&me);
        let order = designated_seeders(
            digest.as_bytes(),
            providers
                .iter()
                .map(|p| swarm_id(&p.peer_id))
                .chain([me_id]),
            providers.len() + 1,
        );
        let place = order.iter().position(|p| *p == me_id).unwrap_or(0);
        let stagger = (place as u64 + 1).min(MAX_TAKEOVER_STAGGER);
        // Seeded by the blob and by this node: nodes seeded alike would all prefer the same
        // chunks among equally rare ones, and have little to give one another (shoal-sim with
        // one seed for all: cold start at 1,000 nodes p99 103 s instead of 13 s).
        let mut seed = [0u8; 8];
        seed.copy_from_slice(
            &<sha2::Sha256 as sha2::Digest>::digest(
                [digest.as_bytes().as_slice(), &me.to_bytes()].concat(),
            )[..8],
        );
        let config = DownloadConfig {
            seed: u64::from_le_bytes(seed),
            upstream_allowed: designated,
            takeover_after_ms: (takeover.as_millis() as u64).saturating_mul(stagger),
            site_role,
            ..DownloadConfig::default()
        };
        let job = Job {
            table_from,
            sw,
            reg,
            name,
            auth,
            authz: authz.into(),
            digest,
            config,
        };
        tokio::spawn(async move {
            this.drive(job, table, providers, writer, registration, tx)
                .await
        });
        Some(transfer)
    }

    async fn drive(
        self: Arc<Self>,
        job: Job,
        table: TablePrefix,
        providers: Vec<Provider>,
        mut writer: BlobWriter,
        registration: Registration,
        tx: watch::Sender<Progress>,
    ) {
        let Job {
            table_from,
            sw,
            reg,
            name,
            auth,
            authz,
            digest,
            config,
        } = job;
        let arriving = registration.arriving().clone();
        let mut view = Arc::new(table);
        // The providers whose tables the one in use was built from: never its arbiters.
        let mut sources: HashSet<PeerId> = table_from.into_iter().collect();
        // Events the driver gives itself (a dispute settled without asking anyone).
        let mut again: VecDeque<Event> = VecDeque::new();
        let layout = view.layout();
        // Counted among the downloads that share the node's in-flight budget.
        let _counted = CountGuard::new(&sw.downloads);
        let count = layout.count();
        let chunk_size = layout.chunk_size();
        let t0 = Instant::now();
        let now = || t0.elapsed().as_millis() as u64;
        let mut dl = Download::new(layout, config, now());
        let (etx, mut erx) = mpsc::channel::<Event>(256);
        let me = sw.peer_id();
        let mut peers: HashMap<PeerId, PeerInfo> = HashMap::new();
        // Each chunk request in flight to a peer: its task (aborted on `Action::Cancel`) and
        // the bytes it has received, reported to the download while it is slow.
        let mut requests: HashMap<(PeerId, u32), InFlightRequest> = HashMap::new();
        // Subscribes to `peer`'s holding: every bitfield it pushes becomes an `Event::Have`.
        let watch_have = |peer: PeerId, addr: SocketAddr| {
            let (sw, etx) = (sw.clone(), etx.clone());
            let task = tokio::spawn(async move {
                let (watch, far) = match sw.conn(addr).await {
                    Ok(c) => (
                        c.watch(&digest, chunk_size).await,
                        is_far(&sw.config.site, c.site()),
                    ),
                    Err(e) => (Err(e), false),
                };
                let error = match watch {
                    Ok(mut w) => loop {
                        match w.next().await {
                            Ok(Some(bits)) => {
                                let have = Event::Have {
                                    peer,
                                    far,
                                    result: Ok(bits),
                                };
                                if etx.send(have).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break None,
                            Err(e) => break Some(e),
                        }
                    },
                    Err(e) => Some(e),
                };
                let _ = etx.send(Event::WatchEnded { peer, error }).await;
            });
            AbortOnDrop(task.abort_handle())
        };
        let ask_have = |peer: PeerId, addr: SocketAddr| {
            let (sw, etx) = (sw.clone(), etx.clone());
            tokio::spawn(async move {
                let (result, far) = match sw.conn(addr).await {
                    Ok(c) => (
                        c.have(&digest, chunk_size).await,
                        is_far(&sw.config.site, c.site()),
                    ),
                    Err(e) => (Err(e), false),
                };
                let _ = etx.send(Event::Have { peer, far, result }).await;
            });
        };
        // Asks `addr` for its table; `event` wraps the answer for the driver.
        let ask_table = |addr: SocketAddr, event: TableEvent| {
            let (sw, etx, authz) = (sw.clone(), etx.clone(), authz.clone());
            tokio::spawn(async move {
                let result = match sw.conn(addr).await {
                    Ok(c) => {
                        // The configured size: the peer cuts the blob by the same rule.
                        let max = sw.config.chunk_size;
                        c.table_prefix(&digest, max, Some(layout.blob_size()), &authz)
                            .await
                    }
                    Err(e) => Err(e),
                };
                let _ = etx.send(event(result)).await;
            });
        };
        let add_providers = |list: Vec<Provider>, peers: &mut HashMap<PeerId, PeerInfo>| {
            for p in list {
                if p.peer_id == me || peers.len() >= 4 * PROVIDER_LIMIT {
                    continue;
                }
                let id = swarm_id(&p.peer_id);
                if peers.contains_key(&id) {
                    continue;
                }
                peers.insert(
                    id,
                    PeerInfo {
                        addr: p.chunk_addr,
                        name: p.peer_id.to_string(),
                        bits: None,
                        added: false,
                        have_pending: true,
                        table_pending: false,
                        watch: Some(watch_have(id, p.chunk_addr)),
                        far: false,
                    },
                );
            }
        };
        add_providers(providers, &mut peers);
        let mut got = vec![false; count as usize];
        // Chunks on disk that are proven consistent with the table in use: checked against it
        // on arrival, or used to extend it (their end state was computed from them). At the
        // end, only the others are read back and checked (see `commit_assembled`).
        let mut checked = vec![false; count as usize];
        let mut prefix = 0u32;
        let mut last_progress = Instant::now();
        let mut next_have_poll = Instant::now() + Duration::from_millis(HAVE_POLL_MS);
        // Sooner while few providers are known (see `relookup_after_ms`).
        let mut fruitless = 0u32;
        let mut next_lookup = Instant::now()
            + Duration::from_millis(relookup_after_ms(peers.len(), PROVIDER_LIMIT, fruitless));
        let mut lookup_pending = false;
        // Bumped when the table is cut back after a dispute: chunks checked under an earlier
        // epoch are dropped on arrival.
        let mut epoch = 0u32;
        let mut failure: Option<String> = None;
        // `Download::allow_upstream` was called (see `STARVED_UPSTREAM`).
        let mut upstream_opened = false;
        'run: loop {
            // A request older than `PROGRESS_REPORT_AFTER` whose bytes still arrive is not
            // timed out (a peer behind a thin link; the download ignores a report without new
            // bytes).
            for ((peer, index), r) in &requests {
                if r.sent.elapsed() >= PROGRESS_REPORT_AFTER {
                    dl.chunk_progress(*peer, *index, r.received.load(Ordering::Relaxed), now());
                }
            }
            // Another blob is being imported from the upstream by this node: it goes first. A
            // held download is waiting by choice, not stalled.
            let held = sw.importing();
            dl.hold_peer_requests(held, now());
            sw.apply_budget(&mut dl);
            if held {
                last_progress = Instant::now();
            }
            while let Some(action) = dl.poll_action(now()) {
                match action {
                    Action::Request { peer, index } => {
                        let Some(addr) = peers.get(&peer).map(|p| p.addr) else {
                            dl.chunk_failed(peer, index, FailReason::Refused, now());
                            continue;
                        };
                        let (sw, view, etx) = (sw.clone(), view.clone(), etx.clone());
                        let authz = authz.clone();
                        let received = Arc::new(AtomicU64::new(0));
                        let counted = received.clone();
                        let task = tokio::spawn(async move {
                            let result = match sw.conn(addr).await {
                                Ok(c) => {
                                    c.chunk_prefix(&digest, &view, index, &authz, Some(&counted))
                                        .await
                                }
                                Err(e) => Err(e),
                            };
                            if matches!(result, Err(PeerError::Connection(_))) {
                                sw.drop_conn(addr).await;
                            }
                            let result = result.map_err(|e| {
                                debug!(digest = %digest, index, %addr, error = %e, "chunk fetch failed");
                                fail_reason(&e)
                            });
                            let _ = etx
                                .send(Event::Chunk {
                                    peer: Some(peer),
                                    index,
                                    epoch,
                                    checked: true,
                                    result,
                                })
                                .await;
                        });
                        requests.insert(
                            (peer, index),
                            InFlightRequest {
                                task: task.abort_handle(),
                                received,
                                sent: Instant::now(),
                            },
                        );
                    }
                    Action::FetchUpstream { index } => {
                        let (this, reg, name, auth, view, etx) = (
                            self.clone(),
                            reg.clone(),
                            name.clone(),
                            auth.clone(),
                            view.clone(),
                            etx.clone(),
                        );
                        tokio::spawn(async move {
                            // (`upstream_chunk` checks it when the table covers it)
                            let checked = view.covers(index);
                            let result = this
                                .upstream_chunk(&reg, &name, &auth, digest, &view, index)
                                .await;
                            let _ = etx
                                .send(Event::Chunk {
                                    peer: None,
                                    index,
                                    epoch,
                                    checked,
                                    result: result.map_err(|_| FailReason::Refused),
                                })
                                .await;
                        });
                    }
                    Action::Cancel { peer, index } => {
                        // Dropping the request's streams resets them: the sender stops
                        // sending a chunk nobody waits for any more.
                        if let Some(InFlightRequest { task, .. }) = requests.remove(&(peer, index))
                        {
                            if !task.is_finished() {
                                task.abort();
                                self.metrics.chunk_requests_cancelled.inc();
                            }
                        }
                    }
                    Action::RefetchTable { exclude } => {
                        // A chunk from `exclude` does not chain with the table in use: ask
                        // another provider (one holding the whole blob if possible) for the
                        // table before blaming anyone.
                        match judge(&peers, &dl, exclude, &sources) {
                            Judge::Third(arbiter, addr) => ask_table(
                                addr,
                                Box::new(move |result| Event::Refetched {
                                    exclude,
                                    arbiter,
                                    result,
                                }),
                            ),
                            Judge::Suspect => {
                                // Its table, asked for now.
                                match peers.get(&exclude) {
                                    Some(p) if !dl.is_banned(&exclude) => ask_table(
                                        p.addr,
                                        Box::new(move |result| Event::Refetched {
                                            exclude,
                                            arbiter: exclude,
                                            result,
                                        }),
                                    ),
                                    _ => dl.table_refetched(now()),
                                }
                            }
                            Judge::Nobody => {
                                dl.ban_peer(exclude, now());
                                dl.table_refetched(now());
                            }
                        }
                    }
                    Action::Ban { peer, .. } => {
                        self.metrics.peers_banned.inc();
                        if let Some(p) = peers.get_mut(&peer) {
                            // Nothing more is wanted from it: not even its holding.
                            p.watch = None;
                            warn!(digest = %digest, peer = %p.name, "peer sent a corrupt chunk or a lying table: banned");
                            self.pulls.banned(&digest, &p.name);
                            sw.drop_conn(p.addr).await;
                        }
                    }
                    Action::Done => break 'run,
                }
            }
            if last_progress.elapsed() > STALL_LIMIT {
                failure = Some("swarm download stalled".into());
                break;
            }
            if !upstream_opened && last_progress.elapsed() > STARVED_UPSTREAM {
                // The peers announce chunks (the download sees a live swarm) but none arrives
                // here: a congested WAN link, peers timing out in turn. Better one more upstream
                // copy than a failed pull.
                upstream_opened = true;
                warn!(digest = %digest, secs = STARVED_UPSTREAM.as_secs(), "no chunk from the swarm for a while: the upstream may fill in");
                dl.allow_upstream(now());
            }
            // Partial providers are asked what they hold now; the DHT for more providers.
            if Instant::now() >= next_have_poll {
                next_have_poll = Instant::now() + Duration::from_millis(HAVE_POLL_MS);
                for (id, p) in peers.iter_mut() {
                    if !p.have_pending && p.watch.is_none() && !p.complete() && !dl.is_banned(id) {
                        p.have_pending = true;
                        ask_have(*id, p.addr);
                    }
                }
            }
            if Instant::now() >= next_lookup && !lookup_pending {
                lookup_pending = true;
                let (sw, etx) = (sw.clone(), etx.clone());
                tokio::spawn(async move {
                    let list = sw.providers(&digest, PROVIDER_LIMIT).await;
                    // How many peers this node knows of at all (`usize::MAX`: unknown).
                    let known = match sw.handle.known_peers().await {
                        Ok(p) => p.len(),
                        Err(_) => usize::MAX,
                    };
                    let _ = etx.send(Event::Providers(list, known)).await;
                });
            }
            // Wake for the download's own deadlines, the next Have poll and the next lookup.
            let mut until_timer = next_have_poll.saturating_duration_since(Instant::now());
            if !lookup_pending {
                until_timer =
                    until_timer.min(next_lookup.saturating_duration_since(Instant::now()));
            }
            let wait = dl
                .next_wakeup()
                .map_or(HAVE_POLL_MS, |w| w.saturating_sub(now()))
                .clamp(1, (until_timer.as_millis() as u64).clamp(1, HAVE_POLL_MS));
            let event = if let Some(e) = again.pop_front() {
                e
            } else {
                tokio::select! {
                    e = erx.recv() => match e {
                        Some(e) => e,
                        None => break,
                    },
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {
                        dl.tick(now());
                        continue;
                    }
                }
            };
            if let Event::Chunk {
                peer: Some(p),
                index,
                ..
            } = &event
            {
                requests.remove(&(*p, *index));
            }
            match event {
                Event::Chunk {
                    peer,
                    index,
                    epoch: e,
                    result: Ok(_) | Err(FailReason::Ambiguous),
                    ..
                } if e != epoch => {
                    // Checked against a table since cut back: not trusted if it chained, and
                    // no dispute with the table in use if it did not (the sender of a genuine
                    // chunk would be banned when nobody is left to arbitrate).
                    match peer {
                        Some(p) => dl.chunk_failed(p, index, FailReason::Refused, now()),
                        None => dl.upstream_failed(index, now()),
                    }
                }
                Event::Chunk {
                    peer,
                    index,
                    checked: checked_on_arrival,
                    result: Ok(bytes),
                    ..
                } => {
                    let i = index as usize;
                    if !got[i] {
                        let (start, _) = layout.range(index).unwrap_or((0, 0));
                        if let Err(e) = writer.write_at(start, &bytes) {
                            failure = Some(format!("store write failed: {e}"));
                            break;
                        }
                        got[i] = true;
                        if view.covers(index) {
                            // Checked against the table on arrival (peers), or against it by
                            // `upstream_chunk` if it covered the chunk when asked for: serve it
                            // on (peers check it in any case; an unchecked one is checked at
                            // the end, see `commit_assembled`).
                            arriving.mark(index);
                            checked[i] = checked_on_arrival;
                        } else if let Some(grown) = extend_view(&view, index, &bytes, &got, &writer)
                        {
                            // An upstream chunk right after the known prefix: this node now
                            // knows the next midstates itself.
                            let newly =
                                adopt_view(&mut view, grown, &arriving, &mut dl, &peers, now());
                            for j in newly {
                                if got[j as usize] {
                                    arriving.mark(j);
                                    // Their end states were computed from them; not the last
                                    // chunk's, which only the digest checks.
                                    checked[j as usize] = j + 1 < count;
                                }
                            }
                        }
                        while prefix < count && got[prefix as usize] {
                            prefix += 1;
                        }
                        let contiguous =
                            layout.range(prefix).map_or(layout.blob_size(), |(s, _)| s);
                        tx.send_modify(|p| p.written = contiguous);
                        last_progress = Instant::now();
                        sw.received(bytes.len() as u64);
                        match peer.and_then(|p| peers.get(&p)) {
                            Some(p) => {
                                self.pulls.from_peer(&digest, &p.name, bytes.len() as u64);
                                self.metrics
                                    .peer_bytes
                                    .get_or_create(&crate::metrics::PeerLabels {
                                        peer: p.name.clone(),
                                    })
                                    .inc_by(bytes.len() as u64);
                            }
                            None => {
                                self.pulls.from_upstream(&digest, bytes.len() as u64);
                                self.count_upstream(&reg, bytes.len() as u64);
                            }
                        }
                    }
                    match peer {
                        Some(p) => dl.chunk_received(p, index, bytes.len() as u64, now()),
                        None => dl.upstream_received(index, now()),
                    }
                }
                Event::Chunk {
                    peer,
                    index,
                    result: Err(reason),
                    ..
                } => {
                    if matches!(reason, FailReason::Corrupt | FailReason::Ambiguous) {
                        self.metrics.chunks_rejected.inc();
                    }
                    match peer {
                        Some(p) => dl.chunk_failed(p, index, reason, now()),
                        None => dl.upstream_failed(index, now()),
                    }
                }
                Event::Have { peer, far, result } => {
                    // Far peers beyond `FAR_PEER_LIMIT` are followed but not used.
                    let far_used = peers.values().filter(|p| p.added && p.far).count();
                    let Some(p) = peers.get_mut(&peer) else {
                        continue;
                    };
                    p.have_pending = false;
                    let bits = match result {
                        Ok(b) if b.len() == count => b,
                        Ok(_) => {
                            debug!(digest = %digest, peer = %p.name, "bitfield of the wrong length: dropped");
                            dl.remove_peer(peer, now());
                            peers.remove(&peer);
                            continue;
                        }
                        Err(e) => {
                            debug!(digest = %digest, peer = %p.name, error = %e, "no bitfield from provider");
                            if matches!(e, PeerError::NotFound | PeerError::Denied)
                                || e.blames_peer()
                            {
                                // It no longer has the blob (failed download, evicted).
                                dl.remove_peer(peer, now());
                                peers.remove(&peer);
                            }
                            continue;
                        }
                    };
                    let covered = view.covered();
                    if !p.added && far && far_used >= FAR_PEER_LIMIT {
                        p.bits = Some(bits);
                        continue;
                    }
                    if !p.added {
                        p.added = true;
                        p.far = far;
                        let have = if bits.is_full() && view.is_complete() {
                            Have::All
                        } else {
                            let mut usable = Bitfield::new(count);
                            for i in 0..covered {
                                if bits.get(i) {
                                    usable.set(i);
                                }
                            }
                            Have::Bits(usable)
                        };
                        dl.add_peer(peer, have, now());
                        if far {
                            dl.set_peer_far(peer, true, now());
                        }
                    } else {
                        let new: Vec<u32> = (0..covered)
                            .filter(|&i| {
                                bits.get(i) && !p.bits.as_ref().is_some_and(|old| old.get(i))
                            })
                            .collect();
                        if !new.is_empty() {
                            dl.peer_has_many(peer, &new, now());
                        }
                    }
                    // It holds chunks beyond what this node's table covers: it knows more of
                    // the table.
                    let beyond = (covered..count).any(|i| bits.get(i));
                    p.bits = Some(bits);
                    if beyond && !p.table_pending {
                        p.table_pending = true;
                        ask_table(
                            p.addr,
                            Box::new(move |result| Event::Table { peer, result }),
                        );
                    }
                }
                Event::Table { peer, result } => {
                    if let Some(p) = peers.get_mut(&peer) {
                        p.table_pending = false;
                    }
                    if dl.is_banned(&peer) {
                        // A proven liar's table is not merged again (after a cut back, say).
                        continue;
                    }
                    let longer = match result {
                        Ok(t) => t,
                        Err(e) => {
                            debug!(digest = %digest, error = %e, "no table from provider");
                            continue;
                        }
                    };
                    let mut merged = (*view).clone();
                    match merged.merge(&longer) {
                        Ok(true) => {
                            sources.insert(peer);
                            adopt_view(&mut view, merged, &arriving, &mut dl, &peers, now());
                        }
                        Ok(false) => {}
                        Err(e) => {
                            // Two providers disagree on the table: one of them lies, and the
                            // table in use is no more trusted than this one. A third provider
                            // decides, as for a chunk that does not chain (`Refetched`): if it
                            // agrees with ours, this one is banned; if not, the table is cut
                            // back to the agreed part and nobody is blamed yet.
                            match judge(&peers, &dl, peer, &sources) {
                                Judge::Third(arbiter, addr) => {
                                    warn!(digest = %digest, error = %e, "a provider's table disagrees with the one in use: asking a third provider");
                                    if let Some(p) = peers.get_mut(&peer) {
                                        // Not asked again until the dispute is settled.
                                        p.table_pending = true;
                                    }
                                    ask_table(
                                        addr,
                                        Box::new(move |result| Event::Refetched {
                                            exclude: peer,
                                            arbiter,
                                            result,
                                        }),
                                    );
                                }
                                Judge::Suspect => {
                                    // Its table is in hand: settled as if it had arbitrated.
                                    again.push_back(Event::Refetched {
                                        exclude: peer,
                                        arbiter: peer,
                                        result: Ok(longer),
                                    });
                                }
                                Judge::Nobody => {
                                    // Keep the table in use (the whole blob is checked at the
                                    // end) and stop using this one.
                                    warn!(digest = %digest, error = %e, "a provider's table disagrees with the one in use and nobody else can decide: banned");
                                    dl.ban_peer(peer, now());
                                }
                            }
                        }
                    }
                }
                Event::WatchEnded { peer, error } => {
                    let Some(p) = peers.get_mut(&peer) else {
                        continue;
                    };
                    p.watch = None;
                    let Some(e) = error else {
                        // Its last bitfield was full: nothing more to learn.
                        continue;
                    };
                    debug!(digest = %digest, peer = %p.name, error = %e, "watch ended; polling the provider");
                    if matches!(e, PeerError::NotFound | PeerError::Denied) || e.blames_peer() {
                        dl.remove_peer(peer, now());
                        peers.remove(&peer);
                    } else {
                        // Polled from now on (a peer without watches, or at its watch limit).
                        p.have_pending = false;
                    }
                }
                Event::Providers(list, known) => {
                    lookup_pending = false;
                    let before = peers.len();
                    add_providers(list, &mut peers);
                    fruitless = if peers.len() > before {
                        0
                    } else {
                        fruitless + 1
                    };
                    next_lookup = Instant::now()
                        + Duration::from_millis(next_lookup_after_ms(
                            peers.len(),
                            PROVIDER_LIMIT,
                            fruitless,
                            peers.len() >= known,
                        ));
                }
                Event::Refetched {
                    exclude,
                    arbiter,
                    result,
                } => {
                    if let Some(p) = peers.get_mut(&exclude) {
                        p.table_pending = false;
                    }
                    let mut merged = (*view).clone();
                    match result.map(|t| (merged.merge(&t), t)) {
                        Ok((Ok(grew), _)) => {
                            // Another provider's table agrees with ours: the chunk (or table)
                            // that disagreed with it was wrong.
                            warn!(digest = %digest, "a chunk or table disagreed with a table another provider confirms: its sender is banned");
                            dl.ban_peer(exclude, now());
                            if grew {
                                sources.insert(arbiter);
                                adopt_view(&mut view, merged, &arriving, &mut dl, &peers, now());
                            }
                        }
                        Ok((Err(ChunkError::Mismatch { index: k }), theirs)) => {
                            // The tables disagree from state k on: ours is as suspect as the
                            // chunk. Keep the agreed states, drop ours after them, and fetch
                            // again every chunk checked against a dropped state (chunk j uses
                            // states j - 1 and j). Nobody is blamed yet; the whole blob is
                            // checked against its digest at the end in any case. The
                            // arbiter's table, which sided with the suspect, is taken for the
                            // rest (it agrees with the kept states): otherwise whichever table
                            // came first would be taken, the one just cut back included.
                            warn!(digest = %digest, state = k, "two providers' tables disagree: the table is cut back and the chunks checked against the disputed part are fetched again");
                            let kept = view.states()[..k as usize].to_vec();
                            if let Ok(mut cut) = TablePrefix::from_parts(layout, kept) {
                                if cut.merge(&theirs).is_ok() {
                                    sources.insert(arbiter);
                                }
                                epoch += 1;
                                view = Arc::new(cut);
                                arriving.replace_prefix(&view);
                                for j in k..count {
                                    if got[j as usize] {
                                        got[j as usize] = false;
                                        checked[j as usize] = false;
                                        arriving.unmark(j);
                                        dl.chunk_invalidated(j, now());
                                    }
                                }
                                prefix = prefix.min(k);
                                // The peers' holdings past the cut are not usable until the
                                // table covers them again.
                                // Banned peers are not asked again.
                                for (id, p) in peers.iter_mut() {
                                    if p.added {
                                        p.added = false;
                                        dl.remove_peer(*id, now());
                                        if !dl.is_banned(id) {
                                            p.have_pending = true;
                                            ask_have(*id, p.addr);
                                        }
                                    }
                                }
                            }
                        }
                        Ok((Err(e), _)) => {
                            debug!(digest = %digest, error = %e, "refetched table unusable")
                        }
                        Err(e) => {
                            debug!(digest = %digest, error = %e, "no table to compare with; the disagreeing provider is banned");
                            dl.ban_peer(exclude, now());
                        }
                    }
                    dl.table_refetched(now());
                }
            }
        }
        let outcome = match failure {
            Some(e) => Err(e),
            None => {
                let origin = (!authz.is_empty()).then(|| reg.key.clone());
                self.commit_assembled(writer, &view, &checked, digest, origin, &tx)
                    .await
            }
        };
        match &outcome {
            Ok(()) => {
                info!(digest = %digest, ms = t0.elapsed().as_millis() as u64, "blob assembled from the swarm and verified");
                sw.provide(digest);
            }
            Err(e) => {
                warn!(digest = %digest, error = %e, "swarm download failed; partial data discarded");
                sw.withdraw(digest);
            }
        }
        drop(registration);
        self.finish_arriving(&digest, outcome, &tx);
    }

    /// Stores a blob assembled from chunks. With a whole table of the store's chunk size, the
    /// chunks' own checks prove the blob (see [`BlobWriter::commit_checked`]): the chunks never
    /// checked against the table (an upstream chunk that arrived past its known part) are read
    /// back and checked, the readers get the last byte at once, and the blob is stored without
    /// hashing it again. Otherwise the blob is hashed from disk, as a blob from the upstream.
    async fn commit_assembled(
        &self,
        writer: BlobWriter,
        view: &TablePrefix,
        checked: &[bool],
        digest: Digest,
        origin: Option<String>,
        tx: &watch::Sender<Progress>,
    ) -> Result<(), String> {
        let store = self.store.clone();
        let size = view.layout().blob_size();
        let table = view
            .to_table()
            .filter(|t| t.layout().chunk_size() == store.chunk_size_for(size));
        if let Some(table) = &table {
            let unchecked: Vec<u32> = (0..table.layout().count())
                .filter(|&j| !checked[j as usize])
                .collect();
            let (file, view) = (writer.reader(), view.clone());
            let proven = tokio::task::spawn_blocking(move || {
                let file = file.map_err(|e| format!("store read failed: {e}"))?;
                check_on_disk(&file, &view, &digest, &unchecked)
            })
            .await
            .map_err(|e| format!("check task failed: {e}"))?;
            if proven.is_err() {
                self.metrics.digest_mismatches.inc();
            }
            proven?;
            tx.send_modify(|p| {
                p.written = size;
                p.verified = true;
            });
        }
        match tokio::task::spawn_blocking(move || {
            // The origin first: once committed, the blob may be asked for at once.
            if let Some(o) = &origin {
                store
                    .set_origin(&digest, o)
                    .map_err(std::io::Error::other)?;
            }
            match &table {
                Some(table) => writer.commit_checked(&store, table, origin.is_some()),
                None => writer.commit(&store, Some(size), None, origin.is_some()),
            }
        })
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                self.metrics.digest_mismatches.inc();
                Err(e.to_string())
            }
            Err(e) => Err(format!("commit task failed: {e}")),
        }
    }

    /// The grant to show providers of a private blob for this client: only once the registry
    /// has accepted the client's own credentials for it ([`Mirror::blob_head`]'s HEAD, which
    /// also leaves the registry's token for them in the cache). `None`: no grant can be shown
    /// (refused, or no token: an anonymous client has none).
    async fn peer_grant(
        &self,
        reg: &Registry,
        name: &shoal_protocol::Name,
        digest: &Digest,
        auth: &ClientAuth,
    ) -> Option<Vec<u8>> {
        self.blob_head(reg, name, digest, auth).await.ok()?;
        self.record_access(reg, name, digest, auth);
        crate::grants::grant_for(&self.upstreams, reg, name, auth)
    }

    /// One chunk from the upstream with a `Range` request, verified against the table when it
    /// covers the chunk.
    async fn upstream_chunk(
        &self,
        reg: &Registry,
        name: &shoal_protocol::Name,
        auth: &ClientAuth,
        digest: Digest,
        table: &TablePrefix,
        index: u32,
    ) -> Result<Bytes, String> {
        let (start, len) = table.layout().range(index).ok_or("chunk out of range")?;
        let end = start + u64::from(len) - 1;
        let req = crate::upstream::Request {
            method: http::Method::GET,
            repo: name.as_str(),
            path: format!("/v2/{name}/blobs/{digest}"),
            accept: None,
            range: Some(format!("bytes={start}-{end}")),
        };
        let resp = self
            .upstreams
            .send(reg, &req, auth)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.inner.status();
        let body = crate::upstream::read_limited(
            resp.inner,
            shoal_protocol::chunk::MAX_CHUNK_SIZE as usize + (64 << 20),
            self.upstreams.timeout(),
        )
        .await?;
        let data = match status.as_u16() {
            206 => body,
            // The upstream ignored the range: cut the chunk out of the whole blob.
            200 if body.len() as u64 > end => body[start as usize..=end as usize].to_vec(),
            s => return Err(format!("upstream answered {s} to a range request")),
        };
        // A chunk past the known table comes from the upstream unchecked: it is checked with
        // the whole blob at commit, and shared only once the table covers it.
        if table.covers(index) {
            table
                .verify_chunk(digest.as_bytes(), index, &data)
                .map_err(|e| e.to_string())?;
        }
        Ok(Bytes::from(data))
    }
}

/// What a download needs besides its table and peers.
struct Job {
    /// The provider the first table came from.
    table_from: Option<PeerId>,
    sw: Arc<Swarm>,
    reg: Registry,
    name: shoal_protocol::Name,
    auth: ClientAuth,
    /// The grant shown to providers of a private blob (empty: public).
    authz: Arc<[u8]>,
    digest: Digest,
    config: DownloadConfig,
}

/// Reads chunks `indices` of a partial blob back from `file` and checks each against `view`
/// (and the digest, for the last chunk).
fn check_on_disk(
    file: &std::fs::File,
    view: &TablePrefix,
    digest: &Digest,
    indices: &[u32],
) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    for &j in indices {
        let (start, len) = view.layout().range(j).ok_or("chunk out of range")?;
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, start)
            .map_err(|e| format!("store read failed: {e}"))?;
        view.verify_chunk(digest.as_bytes(), j, &buf)
            .map_err(|e| format!("chunk {j} on disk does not chain: {e}"))?;
    }
    Ok(())
}

/// Grows `view` with upstream chunk `index` when it is the next one whose end state is missing,
/// then with the chunks after it already on disk. `None` when it does not grow.
fn extend_view(
    view: &TablePrefix,
    index: u32,
    data: &[u8],
    got: &[bool],
    writer: &BlobWriter,
) -> Option<TablePrefix> {
    use std::os::unix::fs::FileExt;
    let mut grown = view.clone();
    if !grown.extend_with_chunk(index, data) {
        return None;
    }
    let layout = grown.layout();
    let file = writer.reader().ok();
    while let (false, Some(f)) = (grown.is_complete(), &file) {
        let next = grown.states().len() as u32;
        if !got.get(next as usize).copied().unwrap_or(false) {
            break;
        }
        let Some((start, len)) = layout.range(next) else {
            break;
        };
        let mut buf = vec![0u8; len as usize];
        if f.read_exact_at(&mut buf, start).is_err() || !grown.extend_with_chunk(next, &buf) {
            break;
        }
    }
    Some(grown)
}

/// How a table answer becomes a driver event (`Table` or `Refetched`).
type TableEvent = Box<dyn FnOnce(Result<TablePrefix, PeerError>) -> Event + Send>;

/// Adopts a longer table: shares it through `arriving` and tells the download about the chunks
/// it newly covers for every provider known to hold them. Returns those chunks.
fn adopt_view(
    view: &mut Arc<TablePrefix>,
    grown: TablePrefix,
    arriving: &Arriving,
    dl: &mut Download,
    peers: &HashMap<PeerId, PeerInfo>,
    now: u64,
) -> std::ops::Range<u32> {
    let (from, to) = (view.covered(), grown.covered());
    *view = Arc::new(grown);
    let _ = arriving.merge_prefix(view);
    report_covered(dl, peers, from, to, now);
    from..to
}

/// Tells the download about chunks `from..to` that the table newly covers, for every provider
/// known to hold them.
fn report_covered(
    dl: &mut Download,
    peers: &HashMap<PeerId, PeerInfo>,
    from: u32,
    to: u32,
    now: u64,
) {
    for (id, p) in peers {
        let (true, Some(bits)) = (p.added, &p.bits) else {
            continue;
        };
        for i in from..to {
            if bits.get(i) {
                dl.peer_has(*id, i, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_protocol::chunk::{ChunkLayout, MidstateTable};

    /// An image manifest's large layers are remembered with one another (the config and small
    /// layers are not seeded, so they are left out); an index or a malformed body gives none,
    /// and the memory is bounded, oldest first.
    #[test]
    fn manifest_layers_are_remembered_as_siblings() {
        let d = |i: u8| Digest::of(&[i]);
        let body = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}","size":900}},
               "layers":[{{"digest":"{}","size":5000000}},{{"digest":"{}","size":100}},
                         {{"digest":"{}","size":3000000}},{{"digest":"not a digest","size":9000000}}]}}"#,
            d(0),
            d(1),
            d(2),
            d(3)
        );
        let layers = manifest_layers(body.as_bytes());
        let mut expected = vec![d(1), d(3)];
        expected.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        assert_eq!(layers, expected);
        assert!(manifest_layers(b"{\"manifests\":[]}").is_empty());
        assert!(manifest_layers(b"not json").is_empty());
        let mut s = Siblings::default();
        s.note(&layers);
        let of1 = s.of(&d(1)).unwrap();
        assert_eq!(of1.len(), 2);
        assert_eq!(s.of(&d(3)).unwrap(), of1);
        assert!(s.of(&d(0)).is_none());
        // A single layer has nobody to be spread from.
        s.note(&[d(9)]);
        assert!(s.of(&d(9)).is_none());
        // Bounded: the oldest layers go first.
        for i in 0..MAX_SIBLING_LAYERS as u32 {
            s.note(&[
                Digest::of(&i.to_le_bytes()),
                Digest::of(&((i + 1) << 20).to_le_bytes()),
            ]);
        }
        assert!(s.order.len() <= MAX_SIBLING_LAYERS);
        assert_eq!(s.by_layer.len(), s.order.len());
        assert!(s.of(&d(1)).is_none());
    }

    /// The chunks never checked on arrival are read back and checked before a blob is proven:
    /// a bad one (a corrupt upstream chunk that arrived past the known table) fails the commit,
    /// the last chunk against the digest itself.
    #[test]
    fn unchecked_chunks_are_checked_on_disk() {
        use std::io::Write;
        let blob: Vec<u8> = (0..1000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let digest = Digest::of(&blob);
        let view = TablePrefix::from(MidstateTable::compute(&blob, 128).unwrap());
        let count = view.layout().count();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&blob).unwrap();
        let all: Vec<u32> = (0..count).collect();
        check_on_disk(&file, &view, &digest, &all).unwrap();
        for bad in [0, 3, count - 1] {
            let mut corrupt = blob.clone();
            let (start, _) = view.layout().range(bad).unwrap();
            corrupt[start as usize] ^= 1;
            let mut file = tempfile::tempfile().unwrap();
            file.write_all(&corrupt).unwrap();
            let err = check_on_disk(&file, &view, &digest, &all).unwrap_err();
            assert!(err.contains(&format!("chunk {bad} ")), "{err}");
            // Only the chunks named are read: the others were checked on arrival.
            let others: Vec<u32> = (0..count).filter(|&j| j != bad).collect();
            check_on_disk(&file, &view, &digest, &others).unwrap();
        }
        // A short file cannot be read back.
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&blob[..900]).unwrap();
        assert!(check_on_disk(&file, &view, &digest, &[count - 1])
            .unwrap_err()
            .contains("store read failed"));
    }

    fn info(port: u16, bits: Option<Bitfield>) -> PeerInfo {
        PeerInfo {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            name: port.to_string(),
            bits,
            added: true,
            have_pending: false,
            table_pending: false,
            watch: None,
            far: false,
        }
    }

    #[test]
    fn far_only_between_two_named_sites() {
        assert!(is_far("a", "b"));
        assert!(!is_far("a", "a"));
        assert!(
            !is_far("", "b"),
            "a node without a site treats every peer as near"
        );
        assert!(!is_far("a", ""), "a peer without a site is near");
        assert!(!is_far("", ""));
    }

    /// Who settles a dispute: never the suspect, never a banned peer, never a source of the
    /// table in use (a liar asked again only repeats its table, and the honest suspect would be
    /// banned for disagreeing with it); a complete holder first.
    #[test]
    fn the_arbiter_is_neither_the_suspect_nor_a_source_of_the_table_in_use() {
        let layout = ChunkLayout::new(8 << 10, 1 << 10).unwrap();
        let count = layout.count();
        let mut dl = Download::new(layout, DownloadConfig::default(), 0);
        let (liar, suspect, honest, partial) = (
            PeerId::from_u64(9),
            PeerId::from_u64(1),
            PeerId::from_u64(2),
            PeerId::from_u64(3),
        );
        let mut half = Bitfield::new(count);
        half.set(0);
        let mut peers = HashMap::new();
        // The liar has the highest id and the whole blob: the tie-break's favourite.
        peers.insert(liar, info(9, Some(Bitfield::full(count))));
        peers.insert(suspect, info(1, Some(Bitfield::full(count))));
        peers.insert(honest, info(2, Some(Bitfield::full(count))));
        peers.insert(partial, info(3, Some(half)));
        let none = HashSet::new();
        let from_liar: HashSet<PeerId> = [liar].into();

        assert_eq!(
            arbiter(&peers, &dl, suspect, &none).map(|a| a.0),
            Some(liar)
        );
        assert_eq!(
            arbiter(&peers, &dl, suspect, &from_liar).map(|a| a.0),
            Some(honest),
            "the table's own source must not judge it"
        );
        // The same when the dispute is the liar's own chunk or table: someone else judges.
        assert_eq!(
            arbiter(&peers, &dl, liar, &from_liar).map(|a| a.0),
            Some(honest)
        );
        // A partial holder when nobody better is left; nobody when only parties remain.
        dl.ban_peer(honest, 0);
        assert_eq!(
            arbiter(&peers, &dl, suspect, &from_liar).map(|a| a.0),
            Some(partial)
        );
        peers.remove(&partial);
        assert_eq!(arbiter(&peers, &dl, suspect, &from_liar), None);
        assert!(matches!(
            judge(&peers, &dl, suspect, &from_liar),
            Judge::Nobody
        ));
        // With the table's source banned, the suspect's own table decides.
        dl.ban_peer(liar, 0);
        assert!(matches!(
            judge(&peers, &dl, suspect, &from_liar),
            Judge::Suspect
        ));
        assert!(matches!(judge(&peers, &dl, suspect, &none), Judge::Nobody));
    }
}
