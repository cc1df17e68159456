//! The node's side of the swarm: the DHT (who holds a blob), the QUIC endpoint (chunks), and
//! the download driver that feeds the sans-IO [`shoal_protocol::swarm::Download`] with what
//! happens on the network and carries out what it decides.
//!
//! Invariants:
//! - A chunk is written to the partial file only after [`peer::PeerConn::chunk`] (or the
//!   upstream fallback) verified it against the midstate table; the whole blob is hashed again
//!   at commit, so nothing is stored unless it matches its digest.
//! - A node provides (announces) a blob only once it holds it complete and verified.
//! - Private blobs never leave a node through the swarm (peers answer `Denied`); a node that
//!   needs one fetches it from the upstream with its client's credentials.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_protocol::chunk::{ChunkVerifier, MidstateTable};
use shoal_protocol::swarm::{
    designated_seeders, Action, Download, DownloadConfig, FailReason, Have, PeerId,
};
use shoal_protocol::Digest;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::config::P2pConfig;
use crate::dht::{self, Dht, DhtConfig, DhtHandle, Provider};
use crate::mirror::{Mirror, Progress};
use crate::peer::{self, ClusterKey, DenyPrivate, Endpoint, PeerConfig, PeerConn, PeerError};
use crate::store::{BlobWriter, Store};
use crate::upstream::{ClientAuth, Registry};

/// Providers asked for per blob.
const PROVIDER_LIMIT: usize = 8;
/// Candidates among which the designated seeders are chosen.
const SEEDER_CANDIDATES: usize = 20;
/// How often a waiting node looks for providers again.
const PROVIDER_POLL: Duration = Duration::from_millis(250);
/// A download that makes no progress for this long fails (and the client's response aborts).
const STALL_LIMIT: Duration = Duration::from_secs(60);

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
    ) -> Result<Swarm, SwarmError> {
        let mut dcfg = DhtConfig::new(config.listen, data_dir);
        dcfg.peers = config.peers.clone();
        dcfg.cluster_key = config.cluster_key;
        dcfg.mdns = config.mdns;
        dcfg.lookup_timeout = Duration::from_secs(2);
        let dht = Dht::start(dcfg, dht_metrics).await?;
        let listen = dht.listen_addr();
        // An open cluster (no key file) still authenticates with a well-known key: anyone may
        // join, as documented.
        let key = ClusterKey::new(config.cluster_key.unwrap_or([0u8; 32]));
        let peer_config = PeerConfig {
            fault_corrupt_chunks: config.fault_corrupt_chunks,
            ..PeerConfig::new(listen, key)
        };
        let endpoint = Endpoint::bind(
            peer_config,
            store.clone(),
            Arc::new(DenyPrivate),
            peer_metrics,
        )?;
        // Announce what the cache already holds, and withdraw what it evicts.
        let handle = dht.handle();
        let held = store.public_digests();
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
        })
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

    async fn providers(&self, digest: &Digest) -> Vec<Provider> {
        match self
            .handle
            .providers(*digest.as_bytes(), PROVIDER_LIMIT)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                debug!(digest = %digest, error = %e, "provider lookup failed");
                Vec::new()
            }
        }
    }

    /// Whether this node is one of the designated upstream fetchers of `digest`.
    async fn is_designated(&self, digest: &Digest) -> bool {
        let me = swarm_id(&self.peer_id());
        match self
            .handle
            .closest_peers(*digest.as_bytes(), SEEDER_CANDIDATES)
            .await
        {
            Ok(c) => {
                let mut candidates: Vec<PeerId> = c.peers.iter().map(swarm_id).collect();
                if !candidates.contains(&me) {
                    candidates.push(me);
                }
                designated_seeders(digest.as_bytes(), candidates, self.config.seeders).contains(&me)
            }
            // Alone or the DHT failing: this node is its own seeder.
            Err(_) => true,
        }
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
        for p in self.providers(digest).await {
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

/// What a finished chunk fetch reports to the driver.
struct ChunkResult {
    /// `None`: fetched from the upstream.
    peer: Option<PeerId>,
    index: u32,
    result: Result<Bytes, FailReason>,
}

fn fail_reason(e: &PeerError) -> FailReason {
    match e {
        PeerError::Corrupt { .. }
        | PeerError::BadTable(_)
        | PeerError::Protocol(_)
        | PeerError::AuthFailed(_) => FailReason::Corrupt,
        PeerError::Ambiguous { .. } => FailReason::Ambiguous,
        PeerError::Timeout(_) => FailReason::Timeout,
        _ => FailReason::Refused,
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
        let mut providers = sw.providers(&digest).await;
        if providers.is_empty() {
            if sw.is_designated(&digest).await {
                info!(digest = %digest, "no provider: this node is a designated seeder, fetching upstream");
                return None;
            }
            while providers.is_empty() && started.elapsed() < sw.takeover_after {
                tokio::time::sleep(PROVIDER_POLL).await;
                providers = sw.providers(&digest).await;
            }
            if providers.is_empty() {
                info!(digest = %digest, waited_ms = started.elapsed().as_millis() as u64, "no provider appeared: taking over the upstream fetch");
                return None;
            }
        }
        let chunk_size = sw.config.chunk_size;
        let mut table = None;
        for p in &providers {
            let got = match sw.conn(p.chunk_addr).await {
                Ok(c) => c.table(&digest, chunk_size, None, &[]).await,
                Err(e) => Err(e),
            };
            match got {
                Ok(t) => {
                    table = Some(t);
                    break;
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
        let size = table.layout().blob_size();
        let writer = self.store.writer(&digest).ok()?;
        let file = writer.reader().ok()?;
        let (tx, rx) = watch::channel(Progress::default());
        let transfer = Arc::new(crate::mirror::Transfer {
            digest,
            size: Some(size),
            file,
            progress: rx,
            private: false,
            source: "peer",
        });
        self.insert_arriving(digest, transfer.clone());
        self.pulls.fetching(&digest, Some(size));
        info!(digest = %digest, size, providers = providers.len(), lookup_ms = started.elapsed().as_millis() as u64, "fetching blob from peers");
        let (this, sw, reg, name, auth) = (
            self.clone(),
            sw.clone(),
            reg.clone(),
            name.clone(),
            auth.clone(),
        );
        tokio::spawn(async move {
            this.drive(sw, reg, name, auth, digest, table, providers, writer, tx)
                .await
        });
        Some(transfer)
    }

    #[allow(clippy::too_many_arguments)]
    async fn drive(
        self: Arc<Self>,
        sw: Arc<Swarm>,
        reg: Registry,
        name: shoal_protocol::Name,
        auth: ClientAuth,
        digest: Digest,
        table: MidstateTable,
        providers: Vec<Provider>,
        mut writer: BlobWriter,
        tx: watch::Sender<Progress>,
    ) {
        let table = Arc::new(table);
        let layout = table.layout();
        let count = layout.count();
        let t0 = Instant::now();
        let now = || t0.elapsed().as_millis() as u64;
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&digest.as_bytes()[..8]);
        let config = DownloadConfig {
            seed: u64::from_le_bytes(seed),
            ..DownloadConfig::default()
        };
        let mut dl = Download::new(layout, config, now());
        let mut addrs: HashMap<PeerId, (SocketAddr, String)> = HashMap::new();
        for p in &providers {
            let id = swarm_id(&p.peer_id);
            addrs.insert(id, (p.chunk_addr, p.peer_id.to_string()));
            dl.add_peer(id, Have::All, now());
        }
        let (rtx, mut rrx) = mpsc::channel::<ChunkResult>(64);
        let mut got = vec![false; count as usize];
        let mut prefix = 0u32;
        let mut last_progress = Instant::now();
        let mut failure: Option<String> = None;
        'run: loop {
            while let Some(action) = dl.poll_action(now()) {
                match action {
                    Action::Request { peer, index } => {
                        let Some((addr, _)) = addrs.get(&peer).cloned() else {
                            dl.chunk_failed(peer, index, FailReason::Refused, now());
                            continue;
                        };
                        let (sw, table, rtx) = (sw.clone(), table.clone(), rtx.clone());
                        tokio::spawn(async move {
                            let result = match sw.conn(addr).await {
                                Ok(c) => c.chunk(&digest, &table, index, &[]).await,
                                Err(e) => Err(e),
                            };
                            if matches!(result, Err(PeerError::Connection(_))) {
                                sw.drop_conn(addr).await;
                            }
                            let result = result.map_err(|e| {
                                debug!(digest = %digest, index, %addr, error = %e, "chunk fetch failed");
                                fail_reason(&e)
                            });
                            let _ = rtx
                                .send(ChunkResult {
                                    peer: Some(peer),
                                    index,
                                    result,
                                })
                                .await;
                        });
                    }
                    Action::FetchUpstream { index } => {
                        let (this, reg, name, auth, table, rtx) = (
                            self.clone(),
                            reg.clone(),
                            name.clone(),
                            auth.clone(),
                            table.clone(),
                            rtx.clone(),
                        );
                        tokio::spawn(async move {
                            let result = this
                                .upstream_chunk(&reg, &name, &auth, digest, &table, index)
                                .await;
                            let _ = rtx
                                .send(ChunkResult {
                                    peer: None,
                                    index,
                                    result: result.map_err(|_| FailReason::Refused),
                                })
                                .await;
                        });
                    }
                    Action::Cancel { .. } => {}
                    Action::RefetchTable { exclude } => {
                        // The table came from a provider we trust no less than this one: the
                        // chunk's sender is the likelier liar. Ban it and carry on.
                        dl.ban_peer(exclude, now());
                        dl.table_refetched(now());
                    }
                    Action::Ban { peer, .. } => {
                        self.metrics.peers_banned.inc();
                        if let Some((addr, id)) = addrs.get(&peer) {
                            warn!(digest = %digest, peer = %id, "peer sent a corrupt chunk: banned");
                            sw.drop_conn(*addr).await;
                        }
                    }
                    Action::Done => break 'run,
                }
            }
            if last_progress.elapsed() > STALL_LIMIT {
                failure = Some("swarm download stalled".into());
                break;
            }
            let wait = dl
                .next_wakeup()
                .map_or(500, |w| w.saturating_sub(now()).clamp(1, 500));
            tokio::select! {
                r = rrx.recv() => {
                    let Some(r) = r else { break };
                    match r.result {
                        Ok(bytes) => {
                            let i = r.index as usize;
                            if !got[i] {
                                let (start, _) = layout.range(r.index).unwrap_or((0, 0));
                                if let Err(e) = writer.write_at(start, &bytes) {
                                    failure = Some(format!("store write failed: {e}"));
                                    break;
                                }
                                got[i] = true;
                                while prefix < count && got[prefix as usize] {
                                    prefix += 1;
                                }
                                let contiguous = layout.range(prefix).map_or(layout.blob_size(), |(s, _)| s);
                                tx.send_modify(|p| p.written = contiguous);
                                last_progress = Instant::now();
                                match r.peer {
                                    Some(p) => {
                                        let id = addrs.get(&p).map(|(_, id)| id.clone()).unwrap_or_default();
                                        self.pulls.from_peer(&digest, &id, bytes.len() as u64);
                                        self.metrics.peer_bytes.get_or_create(&crate::metrics::PeerLabels { peer: id }).inc_by(bytes.len() as u64);
                                    }
                                    None => {
                                        self.pulls.from_upstream(&digest, bytes.len() as u64);
                                        self.count_upstream(&reg, bytes.len() as u64);
                                    }
                                }
                            }
                            match r.peer {
                                Some(p) => dl.chunk_received(p, r.index, bytes.len() as u64, now()),
                                None => dl.upstream_received(r.index, now()),
                            }
                        }
                        Err(reason) => {
                            if matches!(reason, FailReason::Corrupt | FailReason::Ambiguous) {
                                self.metrics.chunks_rejected.inc();
                            }
                            match r.peer {
                                Some(p) => dl.chunk_failed(p, r.index, reason, now()),
                                None => dl.upstream_failed(r.index, now()),
                            }
                        }
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(wait)) => dl.tick(now()),
            }
        }
        let outcome = match failure {
            Some(e) => Err(e),
            None => {
                let store = self.store.clone();
                match tokio::task::spawn_blocking(move || {
                    writer.commit(&store, Some(layout.blob_size()), None, false)
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
        };
        match &outcome {
            Ok(()) => {
                info!(digest = %digest, ms = t0.elapsed().as_millis() as u64, "blob assembled from the swarm and verified");
                sw.provide(digest);
            }
            Err(e) => {
                warn!(digest = %digest, error = %e, "swarm download failed; partial data discarded")
            }
        }
        self.finish_arriving(&digest, outcome, &tx);
    }

    /// One chunk from the upstream with a `Range` request, verified against the table.
    async fn upstream_chunk(
        &self,
        reg: &Registry,
        name: &shoal_protocol::Name,
        auth: &ClientAuth,
        digest: Digest,
        table: &MidstateTable,
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
        ChunkVerifier::verify_chunk(table, digest.as_bytes(), index, &data)
            .map_err(|e| e.to_string())?;
        Ok(Bytes::from(data))
    }
}
