//! The actor: the only code touching the `Swarm`. One task, one loop over commands, swarm
//! events, resolved bootstrap addresses and lookup deadlines.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use libp2p::futures::StreamExt;
use libp2p::kad::{self, store::RecordStore, QueryId, QueryResult};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{identify, mdns, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace};

use super::addr::{multiaddr_to_socket, usable_addrs, AddressBook, PeerSpec};
use super::{
    site_of_agent, Behaviour, BehaviourEvent, ClosestPeers, Command, DhtError, Metrics, Provider,
    IDENTIFY_PROTOCOL_VERSION, KAD_PROTOCOL, MAX_ADDRESS_BOOK, MAX_MDNS_PEERS, MAX_SITE_BOOK,
    MDNS_QUERY_INTERVAL,
};

/// Re-announcements of provided digests run at once (see `on_bootstrapped`).
const REANNOUNCE_CONCURRENCY: usize = 16;

/// Addresses to dial, from the bootstrap resolver.
pub(crate) type Resolved = Vec<(Multiaddr, Option<PeerId>)>;

/// Resolves the `--peer` specs now and every `interval`, sending all addresses to the actor.
pub(crate) async fn resolve_peers(
    specs: Vec<PeerSpec>,
    interval: Duration,
    tx: mpsc::Sender<Resolved>,
    cancel: CancellationToken,
) {
    let mut failing: HashSet<usize> = HashSet::new();
    loop {
        let mut out: Resolved = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let resolved = tokio::select! {
                _ = cancel.cancelled() => return,
                r = spec.resolve() => r,
            };
            match resolved {
                Ok(addrs) => {
                    if failing.remove(&i) {
                        info!(peer = ?spec, "bootstrap peer resolves again");
                    }
                    out.extend(addrs.into_iter().map(|a| (a, spec.peer_id())));
                }
                Err(e) => {
                    // Normal while the other nodes are not up yet: say it once.
                    if failing.insert(i) {
                        info!(peer = ?spec, error = %e, "cannot resolve bootstrap peer (will retry)");
                    }
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = tx.send(out) => if r.is_err() { return },
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// A `providers()` call in progress.
struct Lookup {
    limit: usize,
    started: Instant,
    /// Providers with a chunk address, in the order found (local records first).
    found: Vec<Provider>,
    /// Every provider seen (resolved or not), this node included.
    seen: HashSet<PeerId>,
    /// Providers found whose addresses are being looked up.
    unresolved: HashSet<PeerId>,
    /// Whether the Kademlia query has finished.
    query_done: bool,
    reply: oneshot::Sender<Vec<Provider>>,
}

impl Lookup {
    fn complete(&self) -> bool {
        self.found.len() >= self.limit || (self.query_done && self.unresolved.is_empty())
    }
}

struct ClosestReq {
    key: [u8; 32],
    k: usize,
    reply: oneshot::Sender<ClosestPeers>,
}

pub(crate) struct Actor {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    resolved: mpsc::Receiver<Resolved>,
    cancel: CancellationToken,
    metrics: Metrics,
    lookup_timeout: Duration,
    local_peer_id: PeerId,
    book: AddressBook,
    /// Our own listen sockets (never dialed).
    own_addrs: HashSet<SocketAddr>,
    /// Bootstrap dials in flight, by address.
    dialing: HashMap<ConnectionId, Multiaddr>,
    lookups: HashMap<QueryId, Lookup>,
    /// `GET_CLOSEST_PEERS` queries run to find a provider's addresses.
    resolving: HashMap<QueryId, PeerId>,
    resolving_peers: HashSet<PeerId>,
    closest: HashMap<QueryId, ClosestReq>,
    provides: HashMap<QueryId, oneshot::Sender<Result<(), DhtError>>>,
    /// Provided digests waiting to be re-announced, and the announcements running.
    reannounce: VecDeque<kad::RecordKey>,
    reannouncing: HashSet<QueryId>,
    /// Routing-table size at the last re-announcement.
    announced_at_size: usize,
    /// Lookup and closest-peers deadlines; every one is `lookup_timeout` after its start, so
    /// insertion order is deadline order.
    deadlines: VecDeque<(Instant, QueryId)>,
    /// This node's site (empty: none).
    site: String,
    /// Peers' sites, from identify; at most `MAX_SITE_BOOK`.
    sites: HashMap<PeerId, String>,
    /// Peers mDNS found on the LAN and has not seen expire, with their usable addresses; at
    /// most `MAX_MDNS_PEERS`. libp2p's mDNS reports a peer once, so a first dial that fails
    /// (the peer not listening yet, a lost handshake) is retried from here every
    /// `MDNS_QUERY_INTERVAL` while the peer is not connected.
    mdns_peers: HashMap<PeerId, Vec<Multiaddr>>,
}

impl Actor {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        resolved: mpsc::Receiver<Resolved>,
        cancel: CancellationToken,
        metrics: Metrics,
        lookup_timeout: Duration,
        site: String,
    ) -> Actor {
        let local_peer_id = *swarm.local_peer_id();
        Actor {
            swarm,
            commands,
            resolved,
            cancel,
            metrics,
            lookup_timeout,
            local_peer_id,
            book: AddressBook::new(MAX_ADDRESS_BOOK),
            own_addrs: HashSet::new(),
            dialing: HashMap::new(),
            lookups: HashMap::new(),
            resolving: HashMap::new(),
            resolving_peers: HashSet::new(),
            closest: HashMap::new(),
            provides: HashMap::new(),
            reannounce: VecDeque::new(),
            reannouncing: HashSet::new(),
            announced_at_size: 0,
            deadlines: VecDeque::new(),
            site,
            sites: HashMap::new(),
            mdns_peers: HashMap::new(),
        }
    }

    pub(crate) async fn run(mut self, early: Vec<SwarmEvent<BehaviourEvent>>) {
        for ev in early {
            self.on_swarm_event(ev);
        }
        let mut mdns_redial =
            tokio::time::interval_at(Instant::now() + MDNS_QUERY_INTERVAL, MDNS_QUERY_INTERVAL);
        mdns_redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mdns_on = self.swarm.behaviour().mdns.is_enabled();
        loop {
            let next_deadline = self.deadlines.front().map(|(t, _)| *t);
            // Unbiased: a stream of commands must not starve swarm events or the reverse.
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                Some(addrs) = self.resolved.recv() => self.dial_bootstrap(addrs),
                _ = sleep_until(next_deadline) => self.on_deadlines(),
                _ = mdns_redial.tick(), if mdns_on => self.redial_mdns_peers(),
            }
        }
        // Pending calls see their reply channel dropped: `DhtError::Closed`.
        self.lookups.clear();
        self.closest.clear();
        self.provides.clear();
        debug!("DHT stopped");
    }

    fn kad(&mut self) -> &mut kad::Behaviour<kad::store::MemoryStore> {
        &mut self.swarm.behaviour_mut().kad
    }

    // ---- commands ----------------------------------------------------------------------

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Provide { key, reply } => {
                match self.kad().start_providing(kad::RecordKey::new(&key)) {
                    Ok(qid) => {
                        self.provides.insert(qid, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(DhtError::Store(e.to_string())));
                    }
                }
            }
            Command::Withdraw { key, reply } => {
                self.kad().stop_providing(&kad::RecordKey::new(&key));
                let _ = reply.send(());
            }
            Command::Providers { key, limit, reply } => self.start_lookup(key, limit, reply),
            Command::ClosestPeers { key, k, reply } => {
                if k == 0 {
                    let _ = reply.send(ClosestPeers {
                        peers: Vec::new(),
                        includes_self: false,
                        sites: Vec::new(),
                    });
                    return;
                }
                let n = NonZeroUsize::new(k.min(kad::K_VALUE.get())).unwrap_or(kad::K_VALUE);
                let qid = self.kad().get_n_closest_peers(key.to_vec(), n);
                self.closest.insert(qid, ClosestReq { key, k, reply });
                self.deadlines
                    .push_back((Instant::now() + self.lookup_timeout, qid));
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::KnownPeers { reply } => {
                let peers = self
                    .kad()
                    .kbuckets()
                    .flat_map(|b| b.iter().map(|e| *e.node.key.preimage()).collect::<Vec<_>>())
                    .collect();
                let _ = reply.send(peers);
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
        }
    }

    fn start_lookup(&mut self, key: [u8; 32], limit: usize, reply: oneshot::Sender<Vec<Provider>>) {
        let rkey = kad::RecordKey::new(&key);
        let mut lookup = Lookup {
            limit,
            started: Instant::now(),
            found: Vec::new(),
            seen: HashSet::new(),
            unresolved: HashSet::new(),
            query_done: false,
            reply,
        };
        // Local records first: no network round trip when this node holds enough of them.
        let now = std::time::Instant::now();
        let local = self.kad().store_mut().providers(&rkey);
        for rec in local {
            if rec.is_expired(now) {
                continue;
            }
            if !rec.addresses.is_empty() && rec.provider != self.local_peer_id {
                self.book.add(rec.provider, &rec.addresses);
            }
            self.offer(&mut lookup, rec.provider);
        }
        if lookup.found.len() >= limit {
            self.answer(lookup);
            return;
        }
        let qid = self.kad().get_providers(rkey);
        for peer in lookup.unresolved.clone() {
            self.resolve(peer);
        }
        self.lookups.insert(qid, lookup);
        self.deadlines
            .push_back((Instant::now() + self.lookup_timeout, qid));
    }

    /// Adds a provider to a lookup: to `found` if its chunk address is known, else to
    /// `unresolved` (the caller starts the resolution).
    fn offer(&self, lookup: &mut Lookup, peer: PeerId) {
        if !lookup.seen.insert(peer) || peer == self.local_peer_id {
            return;
        }
        match self.book.chunk_addr(&peer) {
            Some(chunk_addr) => lookup.found.push(Provider {
                peer_id: peer,
                chunk_addr,
            }),
            None => {
                lookup.unresolved.insert(peer);
            }
        }
    }

    /// Looks up a provider's addresses: a `GET_CLOSEST_PEERS` query for its peer id returns
    /// it, with addresses, from the routing tables of the nodes near it.
    fn resolve(&mut self, peer: PeerId) {
        if self.resolving_peers.insert(peer) {
            let qid = self.kad().get_closest_peers(peer);
            self.resolving.insert(qid, peer);
            trace!(%peer, "resolving provider addresses");
        }
    }

    fn answer(&mut self, mut lookup: Lookup) {
        lookup.found.truncate(lookup.limit);
        self.metrics.provider_lookups.inc();
        self.metrics
            .provider_lookup_seconds
            .observe(lookup.started.elapsed().as_secs_f64());
        self.metrics
            .providers_found
            .inc_by(lookup.found.len() as u64);
        let _ = lookup.reply.send(lookup.found);
    }

    /// Answers the lookup if it is complete, finishing its Kademlia query if still running.
    fn maybe_answer(&mut self, qid: QueryId) {
        let Some(lookup) = self.lookups.get(&qid) else {
            return;
        };
        if !lookup.complete() && !lookup.reply.is_closed() {
            return;
        }
        let Some(lookup) = self.lookups.remove(&qid) else {
            return;
        };
        if !lookup.query_done {
            if let Some(mut q) = self.kad().query_mut(&qid) {
                q.finish();
            }
        }
        self.answer(lookup);
    }

    /// A peer's chunk address may now be known: move it to `found` in the lookups waiting.
    fn on_addresses(&mut self, peer: PeerId) {
        let Some(chunk_addr) = self.book.chunk_addr(&peer) else {
            return;
        };
        let waiting: Vec<QueryId> = self
            .lookups
            .iter_mut()
            .filter_map(|(qid, l)| {
                l.unresolved.remove(&peer).then(|| {
                    l.found.push(Provider {
                        peer_id: peer,
                        chunk_addr,
                    });
                    *qid
                })
            })
            .collect();
        for qid in waiting {
            self.maybe_answer(qid);
        }
    }

    fn on_deadlines(&mut self) {
        let now = Instant::now();
        while let Some(&(t, qid)) = self.deadlines.front() {
            if t > now {
                break;
            }
            self.deadlines.pop_front();
            if let Some(lookup) = self.lookups.remove(&qid) {
                debug!(found = lookup.found.len(), "provider lookup timed out");
                if let Some(mut q) = self.kad().query_mut(&qid) {
                    q.finish();
                }
                self.answer(lookup);
            } else if self.closest.contains_key(&qid) {
                // Finishing makes Kademlia report the closest peers found so far.
                if let Some(mut q) = self.kad().query_mut(&qid) {
                    q.finish();
                }
            }
        }
    }

    // ---- bootstrap ---------------------------------------------------------------------

    fn is_own(&self, addr: &Multiaddr) -> bool {
        multiaddr_to_socket(addr).is_some_and(|sa| self.own_addrs.contains(&sa))
    }

    fn in_routing_table(&mut self, peer: &PeerId) -> bool {
        self.kad()
            .kbucket(*peer)
            .is_some_and(|b| b.iter().any(|e| e.node.key.preimage() == peer))
    }

    /// Dials bootstrap addresses that do not belong to a peer we already know (connected or
    /// in the routing table); everything when we know nobody.
    fn dial_bootstrap(&mut self, addrs: Resolved) {
        let isolated = self.swarm.connected_peers().next().is_none();
        for (addr, peer_id) in addrs {
            if self.is_own(&addr) || self.dialing.values().any(|a| a == &addr) {
                continue;
            }
            let known = peer_id.or_else(|| self.book.owner(&addr));
            if let Some(peer) = known {
                if peer == self.local_peer_id {
                    continue;
                }
                if !isolated && (self.swarm.is_connected(&peer) || self.in_routing_table(&peer)) {
                    continue;
                }
            }
            let opts = match peer_id {
                Some(peer) => {
                    self.kad().add_address(&peer, addr.clone());
                    DialOpts::peer_id(peer)
                        .addresses(vec![addr.clone()])
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build()
                }
                None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
            };
            let cid = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    debug!(%addr, "dialing bootstrap peer");
                    self.dialing.insert(cid, addr);
                }
                Err(e) => debug!(%addr, error = %e, "bootstrap dial refused"),
            }
        }
    }

    // ---- swarm events ------------------------------------------------------------------

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(ev)) => self.on_kad_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => self.on_identify(peer_id, info),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(_)) => {}
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in list {
                    if peer != self.local_peer_id {
                        by_peer.entry(peer).or_default().push(addr);
                    }
                }
                for (peer, addrs) in by_peer {
                    let addrs = usable_addrs(&addrs);
                    if addrs.is_empty() {
                        continue;
                    }
                    debug!(%peer, "mDNS discovered peer");
                    let room = self.mdns_peers.len() < MAX_MDNS_PEERS;
                    match self.mdns_peers.get_mut(&peer) {
                        Some(list) => *list = usable_addrs(list.iter().chain(&addrs)),
                        None if room => {
                            self.mdns_peers.insert(peer, addrs);
                        }
                        None => {}
                    }
                    self.dial_mdns_peer(peer);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(list))) => {
                for (peer, _) in list {
                    self.mdns_peers.remove(&peer);
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "DHT listening on");
                if let Some(sa) = multiaddr_to_socket(&address) {
                    self.own_addrs.insert(sa);
                }
                // Our listen addresses are the addresses peers reach us on (a cluster
                // network): make them external so provider records carry them.
                self.swarm.add_external_address(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                if let Some(sa) = multiaddr_to_socket(&address) {
                    self.own_addrs.remove(&sa);
                }
                self.swarm.remove_external_address(&address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                self.dialing.remove(&connection_id);
                if let Some(sa) = multiaddr_to_socket(endpoint.get_remote_address()) {
                    self.book.saw(peer_id, sa.ip());
                }
                if num_established.get() == 1 {
                    debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "peer connected");
                }
                self.update_connected();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => {
                if num_established == 0 {
                    debug!(peer = %peer_id, "peer disconnected");
                }
                self.update_connected();
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                let addr = self.dialing.remove(&connection_id);
                debug!(peer = ?peer_id, addr = ?addr, error = %error, "dial failed");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                // A node without the cluster key ends up here (pnet garbles its handshake).
                debug!(from = %send_back_addr, error = %error, "inbound connection failed");
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(error = %error, "DHT listener error");
            }
            _ => {}
        }
    }

    /// Dials a peer mDNS found unless it is connected (or being dialed).
    fn dial_mdns_peer(&mut self, peer: PeerId) {
        let Some(addrs) = self.mdns_peers.get(&peer) else {
            return;
        };
        if self.swarm.is_connected(&peer) {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs.clone())
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            trace!(%peer, error = %e, "mDNS dial not started");
        }
    }

    /// Dials again every peer mDNS found that is not connected.
    fn redial_mdns_peers(&mut self) {
        let peers: Vec<PeerId> = self
            .mdns_peers
            .keys()
            .filter(|p| !self.swarm.is_connected(p))
            .copied()
            .collect();
        for peer in peers {
            debug!(%peer, "dialing a peer mDNS found, not connected");
            self.dial_mdns_peer(peer);
        }
    }

    fn update_connected(&mut self) {
        let n = self.swarm.connected_peers().count();
        self.metrics.peers_connected.set(n as i64);
    }

    fn on_identify(&mut self, peer: PeerId, info: identify::Info) {
        if info.protocol_version != IDENTIFY_PROTOCOL_VERSION
            || !info.protocols.contains(&KAD_PROTOCOL)
        {
            debug!(%peer, version = %info.protocol_version, "not a shoal peer; ignored");
            return;
        }
        let addrs = usable_addrs(&info.listen_addrs);
        trace!(%peer, ?addrs, agent = %info.agent_version, "identified");
        match site_of_agent(&info.agent_version) {
            Some(site) => {
                if self.sites.len() >= MAX_SITE_BOOK && !self.sites.contains_key(&peer) {
                    // Bounded: forget an arbitrary peer (re-learned on its next identify).
                    if let Some(old) = self.sites.keys().next().copied() {
                        self.sites.remove(&old);
                    }
                }
                self.sites.insert(peer, site);
            }
            None => {
                self.sites.remove(&peer);
            }
        }
        if self.book.set(peer, &addrs) {
            for a in addrs {
                self.kad().add_address(&peer, a);
            }
            self.on_addresses(peer);
        }
    }

    fn on_kad_event(&mut self, ev: kad::Event) {
        match ev {
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => self.on_query_progress(id, result, step.last),
            kad::Event::RoutingUpdated {
                peer, addresses, ..
            } => self.on_routing_updated(peer, &addresses),
            _ => {}
        }
    }

    /// Kademlia's addresses for a peer are a fallback: identify's are authoritative.
    fn on_routing_updated(&mut self, peer: PeerId, addresses: &kad::Addresses) {
        if self.book.get(&peer).is_empty() && self.book.add(peer, addresses.iter()) {
            self.on_addresses(peer);
        }
    }

    fn on_query_progress(&mut self, qid: QueryId, result: QueryResult, last: bool) {
        match result {
            QueryResult::GetProviders(r) => {
                if !self.lookups.contains_key(&qid) {
                    return;
                }
                let mut new_unresolved = Vec::new();
                if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = r {
                    if let Some(mut lookup) = self.lookups.remove(&qid) {
                        for p in providers {
                            self.offer(&mut lookup, p);
                            if lookup.unresolved.contains(&p) {
                                new_unresolved.push(p);
                            }
                        }
                        self.lookups.insert(qid, lookup);
                    }
                }
                if last {
                    if let Some(l) = self.lookups.get_mut(&qid) {
                        l.query_done = true;
                    }
                }
                for p in new_unresolved {
                    self.resolve(p);
                }
                self.maybe_answer(qid);
            }
            QueryResult::GetClosestPeers(r) => {
                let peers = match r {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                if let Some(req) = self.closest.remove(&qid) {
                    self.answer_closest(req, peers.iter().map(|p| p.peer_id));
                } else if let Some(target) = self.resolving.get(&qid).copied() {
                    for p in &peers {
                        if p.peer_id != self.local_peer_id && !p.addrs.is_empty() {
                            self.book.add(p.peer_id, &p.addrs);
                        }
                    }
                    self.on_addresses(target);
                    if last {
                        self.resolving.remove(&qid);
                        self.resolving_peers.remove(&target);
                        self.give_up_on(target);
                    }
                }
            }
            QueryResult::StartProviding(r) => {
                if !last {
                    return;
                }
                if let Some(reply) = self.provides.remove(&qid) {
                    if let Err(e) = &r {
                        debug!(error = %e, "provider announcement incomplete (record kept, will republish)");
                    }
                    let _ = reply.send(Ok(()));
                } else if self.reannouncing.remove(&qid) {
                    self.pump_reannounce();
                }
            }
            QueryResult::RepublishProvider(Err(e)) => {
                debug!(error = %e, "provider republish incomplete");
            }
            QueryResult::Bootstrap(r) => {
                if let Err(e) = &r {
                    debug!(error = %e, "bootstrap incomplete");
                }
                if last {
                    self.on_bootstrapped();
                }
            }
            _ => {}
        }
    }

    /// After a bootstrap: if the routing table has grown by half since the digests were
    /// last announced (first of all: from empty, a node re-providing its cache at start-up
    /// before it knew anyone), announce every provided digest again, so the records reach
    /// the nodes now closest to them instead of waiting for the periodic republish.
    ///
    /// Why growth by half: a lookup misses a record only when every one of the
    /// `replication_factor` nodes nearest the digest joined after the announcement. With at
    /// most a third of the table new, that is rare ((1/3)^5 for a digest in the worst case);
    /// and a cluster forming from 1 to N nodes costs log1.5(N) rounds of announcements.
    fn on_bootstrapped(&mut self) {
        let size: usize = self.kad().kbuckets().map(|b| b.num_entries()).sum();
        if size == 0 || 2 * size < 3 * self.announced_at_size {
            return;
        }
        let keys: Vec<kad::RecordKey> = self
            .kad()
            .store_mut()
            .provided()
            .map(|r| r.key.clone())
            .collect();
        debug!(
            routing_table = size,
            before = self.announced_at_size,
            digests = keys.len(),
            "re-announcing provided digests"
        );
        self.announced_at_size = size;
        self.reannounce = keys.into();
        self.pump_reannounce();
    }

    /// Starts queued re-announcements, at most [`REANNOUNCE_CONCURRENCY`] at a time.
    fn pump_reannounce(&mut self) {
        while self.reannouncing.len() < REANNOUNCE_CONCURRENCY {
            let Some(key) = self.reannounce.pop_front() else {
                return;
            };
            // Skip digests withdrawn since they were queued (start_providing would re-add).
            let me = self.local_peer_id;
            let still = self
                .kad()
                .store_mut()
                .providers(&key)
                .iter()
                .any(|r| r.provider == me);
            if still {
                if let Ok(qid) = self.kad().start_providing(key) {
                    self.reannouncing.insert(qid);
                }
            }
        }
    }

    /// A provider whose addresses could not be found is dropped from the lookups waiting.
    fn give_up_on(&mut self, peer: PeerId) {
        if self.book.chunk_addr(&peer).is_some() {
            return;
        }
        let waiting: Vec<QueryId> = self
            .lookups
            .iter_mut()
            .filter_map(|(qid, l)| l.unresolved.remove(&peer).then_some(*qid))
            .collect();
        if !waiting.is_empty() {
            debug!(%peer, "provider has no known address; skipped");
        }
        for qid in waiting {
            self.maybe_answer(qid);
        }
    }

    fn answer_closest(&mut self, req: ClosestReq, found: impl Iterator<Item = PeerId>) {
        let target = kad::KBucketKey::new(req.key.to_vec());
        let mut peers: Vec<PeerId> = found.filter(|p| *p != self.local_peer_id).collect();
        peers.push(self.local_peer_id);
        peers.sort_by_key(|p| kad::KBucketKey::from(*p).distance(&target));
        peers.dedup();
        peers.truncate(req.k);
        let includes_self = peers.contains(&self.local_peer_id);
        let sites = peers
            .iter()
            .map(|p| {
                if *p == self.local_peer_id {
                    Some(self.site.clone()).filter(|s| !s.is_empty())
                } else {
                    self.sites.get(p).cloned()
                }
            })
            .collect();
        let _ = req.reply.send(ClosestPeers {
            peers,
            includes_self,
            sites,
        });
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
