//! The discrete-event engine: nodes, flows, the DHT, the upstream, and one real
//! [`Download`] per node and blob.

use std::time::Instant;

use serde::Serialize;
use sha2::{Digest as _, Sha256};
use shoal_protocol::chunk::ChunkLayout;
use shoal_protocol::serve::{Offer, ServeScheduler};
use shoal_protocol::swarm::{
    designated_seeders, next_lookup_after_ms, provider_poll_after_ms, seeder_order, site_gateway,
    Action, Download, DownloadConfig, FailReason, Have, InFlightBudget, PeerId, SeedPlan, SiteRole,
    FAR_PEER_LIMIT, IMPORT_HOLD_MAX_MS,
};
use shoal_protocol::wire::Bitfield;

use crate::queue::RadixQueue;
use crate::rng::Rng;
use crate::scenario::Params;

/// The nodes nearest a blob's key that a node knows when it judges whether it is one of its
/// site's gateways (the daemon's `SEEDER_CANDIDATES`: one DHT answer, Kademlia's k).
const GATEWAY_CANDIDATES: usize = 20;
/// A node with more flows than this in one direction has their rates recomputed at most every
/// [`REBALANCE_US`] instead of at every flow start and end.
const REBALANCE_OVER: usize = 128;
const REBALANCE_US: u64 = 5_000;
/// See [`Sim::schedule_step`].
const STEP_SLACK_US: u64 = 500;
/// See [`Sim::schedule_step`].
const STEP_SLACK_DIV: u64 = 32;
/// Sites: the upstream outside every site.
const OUTSIDE: u16 = u16::MAX;

#[derive(Debug, Clone, Copy)]
enum Ev {
    /// A node starts pulling the image: every blob at once.
    Start { node: u32 },
    /// A provider lookup's answer arrives.
    Lookup { task: u32 },
    /// Time to look the providers up again (the answer follows after the lookup latency).
    Relookup { task: u32 },
    /// The task's `Download::next_wakeup`.
    Wake { task: u32 },
    /// Time to ask the partial providers what they hold now.
    HavePoll { task: u32 },
    /// A request reached its sender and the first byte is back (one round trip after it left).
    Arrive { flow: u32, gen: u32 },
    /// A flow may have reached its next chunk boundary.
    Step { flow: u32, gen: u32 },
    /// A request failed (busy, or the peer is dead).
    Fail {
        task: u32,
        peer: u32,
        index: u32,
        corrupt: bool,
    },
    /// A node dies.
    Die { node: u32 },
    /// Recompute the rates of a busy node's flows.
    Rebalance { node: u32 },
    /// The node's `ServeScheduler::next_wakeup`: requests that waited too long get `Busy`.
    ServeWake { node: u32 },
    /// Print a progress line to stderr (`SHOAL_SIM_TRACE=1`; not part of the log).
    Trace,
    /// Pushed Haves reach the task: a provider it follows gained chunks (or died).
    Notify { task: u32 },
}

impl Ev {
    fn log_fields(&self) -> (u8, u32, u32) {
        match *self {
            Ev::Start { node } => (0, node, 0),
            Ev::Lookup { task } => (1, task, 0),
            Ev::Relookup { task } => (2, task, 0),
            Ev::Wake { task } => (3, task, 0),
            Ev::HavePoll { task } => (4, task, 0),
            Ev::Arrive { flow, gen } => (5, flow, gen),
            Ev::Step { flow, gen } => (6, flow, gen),
            Ev::Fail {
                task, peer, index, ..
            } => (7, task, peer ^ index.rotate_left(16)),
            Ev::Die { node } => (8, node, 0),
            Ev::Rebalance { node } => (9, node, 0),
            Ev::Trace => (10, 0, 0),
            Ev::ServeWake { node } => (11, node, 0),
            Ev::Notify { task } => (12, task, 0),
        }
    }
}

/// The names of the event kinds, by `Ev::log_fields`'s kind number.
const KIND_NAMES: [&str; 13] = [
    "Start",
    "Lookup",
    "Relookup",
    "Wake",
    "HavePoll",
    "Arrive",
    "Step",
    "Fail",
    "Die",
    "Rebalance",
    "Trace",
    "ServeWake",
    "Notify",
];

/// A popped event and its time.
struct Entry {
    time: u64,
    ev: Ev,
}

#[derive(Debug)]
enum State {
    Idle,
    Lookup,
    Waiting(SeedPlan),
    Downloading,
    Streaming,
    Done,
    Dead,
}

/// A provider this task's `Download` knows, and what it was last seen to hold.
struct Known {
    id: u32,
    /// How many chunks it held when last seen: the first `last_count` of its
    /// [`Sim::gained`].
    last_count: u32,
    complete: bool,
    /// In another site (marked far in the `Download`).
    far: bool,
}

/// One node wanting one blob.
struct Task {
    state: State,
    dl: Option<Box<Download<u32>>>,
    /// Verified chunks: what the node serves.
    have: Bitfield,
    peers: Vec<Known>,
    banned: Vec<u32>,
    /// Requests out: (peer or the upstream, chunk, flow).
    inflight: Vec<(u32, u32, u32)>,
    wake_at: u64,
    designated: bool,
    /// What the node is to its site for this blob (`swarm::site_gateway`).
    site_role: SiteRole,
    /// Lookups in a row that found no new peer (paces the next one, see
    /// `swarm::relookup_after_ms`).
    fruitless: u32,
    /// Empty looks for the blob's first provider so far (paces the next one, see
    /// `swarm::provider_poll_after_ms`).
    polls: u32,
}

struct Node {
    up: u64,
    down: u64,
    site: u16,
    alive: bool,
    died_at: u64,
    poisoned: bool,
    /// Active flows out of (into) this node, each with the node at its other end (so a level
    /// is computed from [`Sim::lvl`] without reading the flows).
    up_flows: Vec<(u32, u32)>,
    down_flows: Vec<(u32, u32)>,
    /// Which chunk requests reaching this node it uploads, queues or refuses (by flow id,
    /// blob index).
    serve: ServeScheduler<u32, u32>,
    /// The pending `ServeWake` event's time (`u64::MAX`: none).
    serve_wake_at: u64,
    start: u64,
    done_blobs: u32,
    done_at: Option<u64>,
    rebalance_pending: bool,
    /// The node's in-flight budget, shared by its downloads (`Params::in_flight_budget`).
    budget: InFlightBudget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A chunk from a peer.
    Chunk,
    /// A chunk fetched from the upstream by a `Download` (`Action::FetchUpstream`).
    UpChunk,
    /// A whole blob streamed from the upstream, in order (a seeder).
    Stream,
}

struct Flow {
    src: u32,
    dst: u32,
    task: u32,
    /// The chunk (for a stream: the next chunk to complete).
    index: u32,
    kind: Kind,
    gen: u32,
    live: bool,
    active: bool,
    total: u64,
    done: u64,
    rate: u64,
    last: u64,
    due: u64,
    up_pos: u32,
    down_pos: u32,
    wan: bool,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Nodes simulated.
    pub nodes: usize,
    /// The seed.
    pub seed: u64,
    /// Nodes alive at the end.
    pub alive: usize,
    /// Alive nodes holding the whole image at the end.
    pub completed: usize,
    /// Alive nodes that did not finish within the time limit.
    pub incomplete: usize,
    /// Median pull time over alive nodes (an incomplete node counts as the time limit).
    pub p50_s: f64,
    /// 99th percentile.
    pub p99_s: f64,
    /// 99.9th percentile.
    pub p999_s: f64,
    /// Slowest.
    pub max_s: f64,
    /// Mean.
    pub mean_s: f64,
    /// Image size over per-node download rate.
    pub ideal_s: f64,
    /// p99 / ideal.
    pub p99_over_ideal: f64,
    /// Upstream egress in copies of the image (bytes sent / image bytes).
    pub upstream_copies: f64,
    /// Upstream bytes sent.
    pub upstream_bytes: u64,
    /// Of which by whole-blob streams (seeders and takeovers).
    pub upstream_stream_bytes: u64,
    /// Of which by per-chunk fallback fetches of a `Download`.
    pub upstream_chunk_bytes: u64,
    /// Whole-blob streams started by designated seeders.
    pub seeder_streams: u64,
    /// Whole-blob streams started by takeovers (no provider in time).
    pub takeover_streams: u64,
    /// Chunks fetched upstream by downloads.
    pub upstream_chunk_fetches: u64,
    /// Verified chunk bytes received from peers.
    pub peer_bytes: u64,
    /// Of those, the bytes that crossed WAN links (from a peer in another site).
    pub wan_bytes: u64,
    /// Corrupt chunk bytes received from poisoned peers.
    pub corrupt_bytes: u64,
    /// Bytes of transfers cancelled mid-way (endgame duplicates, bans, deaths).
    pub wasted_bytes: u64,
    /// `Action::Ban`s emitted (a node banning a peer).
    pub bans: u64,
    /// Peers let go for a newly found provider (`Download::replaceable_peer`).
    pub peer_swaps: u64,
    /// Chunk requests answered `Busy` (sender's serve queue full, or waited too long).
    pub busy: u64,
    /// Of which after waiting in the sender's queue for `max_wait_ms`.
    pub busy_after_wait: u64,
    /// Chunk requests that waited in a sender's queue before their upload started.
    pub queued: u64,
    /// Chunk requests to dead nodes.
    pub dead_requests: u64,
    /// Nodes that died.
    pub deaths: usize,
    /// Poisoned nodes.
    pub poisoned: usize,
    /// Image size.
    pub image_bytes: u64,
    /// Layers.
    pub blobs: usize,
    /// Chunk size: that of every blob, or with `adaptive_chunks` the largest.
    pub chunk_size: u32,
    /// Whether each blob's chunk size followed its size (`Params::adaptive_chunks`).
    pub adaptive_chunks: bool,
    /// Events processed.
    pub events: u64,
    /// Of which, by kind (the event names, as `Notify` or `Step`): where a run's time goes.
    pub events_by_kind: std::collections::BTreeMap<&'static str, u64>,
    /// Simulated time at the end.
    pub sim_s: f64,
    /// Wall-clock time of the run.
    pub wall_s: f64,
    /// sha256 over the event log (time, kind, ids of every event).
    pub log_hash: String,
}

/// One run of a scenario.
pub struct Sim {
    p: Params,
    layouts: Vec<ChunkLayout>,
    nb: u32,
    up_node: u32,
    now: u64,
    heap: RadixQueue<Ev>,
    nodes: Vec<Node>,
    tasks: Vec<Task>,
    flows: Vec<Flow>,
    free: Vec<u32>,
    /// Per blob: (visible from, provider), in announcement order.
    providers: Vec<Vec<(u64, u32)>>,
    designated: Vec<Vec<u32>>,
    wan_out: Vec<u32>,
    wan_in: Vec<u32>,
    lookup_us: u64,
    rng: Rng,
    log: Sha256,
    logbuf: Vec<u8>,
    unfinished: usize,
    /// Per node: when it died (`u64::MAX`: alive); a compact copy of `Node::died_at` for the
    /// loops over many nodes (lookups, Have polls).
    died: Vec<u64>,
    /// Per node: its water levels, upload and download: the most any one upload (download)
    /// flow of the node may get; see [`Sim::level`]. Apart from the nodes for the loops over
    /// many flows.
    lvl: Vec<[u64; 2]>,
    /// Per task: `have.count_ones()`, so a Have poll sees an unchanged provider without
    /// touching its bitfield.
    have_count: Vec<u32>,
    /// Per task: its verified chunks in the order it got them (a Have poll reads what a
    /// provider gained since the last one from the tail).
    gained: Vec<Vec<u32>>,
    /// A Have poll's new chunks of one provider (reused).
    new_chunks: Vec<u32>,
    /// Per task: the tasks that added it as a provider (stale entries are harmless), so a
    /// chunk it gains marks their next Have poll as having something to read.
    watchers: Vec<Vec<u32>>,
    /// Per task: a provider it added gained a chunk since its last Have poll.
    poll_dirty: Vec<bool>,
    /// Per task: a `Notify` is on its way (pushed Haves; later gains ride along with it).
    notify_pending: Vec<bool>,
    /// Per task: when it started streaming from the upstream (see `held_import`).
    stream_start: Vec<u64>,
    scratch: Vec<u64>,
    /// A lookup's answer (reused).
    found: Vec<u32>,
    /// When the run was set up (for the trace).
    started: Instant,
    kinds: [u64; KIND_NAMES.len()],
    r: Report,
}

fn pid(n: u32) -> PeerId {
    PeerId::from_u64(u64::from(n))
}

fn pidx(p: &PeerId) -> u32 {
    let b = p.as_bytes();
    let mut be = [0u8; 8];
    be.copy_from_slice(&b[..8]);
    u64::from_be_bytes(be) as u32
}

/// `a * b / c` rounded down, in 64 bits when the product fits (it does for any chunk or blob
/// size and time span the simulator sees), else in 128.
fn mul_div(a: u64, b: u64, c: u64) -> u64 {
    match a.checked_mul(b) {
        Some(p) => p / c,
        None => (u128::from(a) * u128::from(b) / u128::from(c)) as u64,
    }
}

/// `a * b / c` rounded up; see [`mul_div`].
fn mul_div_ceil(a: u64, b: u64, c: u64) -> u64 {
    match a.checked_mul(b) {
        Some(p) => p.div_ceil(c),
        None => (u128::from(a) * u128::from(b)).div_ceil(u128::from(c)) as u64,
    }
}

/// The flows of a node's flow list.
fn flow_ids(list: &[(u32, u32)]) -> Vec<u32> {
    list.iter().map(|e| e.0).collect()
}

fn ms(us: u64) -> u64 {
    us / 1000
}

impl Sim {
    /// Sets a run up (validated parameters).
    pub fn new(p: Params) -> Sim {
        let n = p.nodes as u32;
        let nb = p.blobs.len() as u32;
        let layouts: Vec<ChunkLayout> = p
            .blobs
            .iter()
            .map(|&size| ChunkLayout::new(size, p.chunk_size_of(size)).expect("validated layout"))
            .collect();
        let mut rng = Rng::new(p.seed);
        let sites = p.sites.max(1);
        let mut nodes: Vec<Node> = (0..=n)
            .map(|i| Node {
                up: if i == n { p.upstream_egress } else { p.up },
                down: p.down,
                site: if i == n {
                    p.upstream_site.map_or(OUTSIDE, |s| s as u16)
                } else {
                    (i as usize % sites) as u16
                },
                alive: true,
                died_at: u64::MAX,
                poisoned: false,
                up_flows: Vec::new(),
                down_flows: Vec::new(),
                serve: ServeScheduler::new(p.serve.clone()),
                serve_wake_at: u64::MAX,
                start: 0,
                done_blobs: 0,
                done_at: None,
                rebalance_pending: false,
                budget: InFlightBudget::new(),
            })
            .collect();
        let poisoned = rng.pick(
            p.nodes,
            (p.nodes as f64 * p.poisoned_fraction).round() as usize,
        );
        for &i in &poisoned {
            nodes[i].poisoned = true;
        }
        // Each blob's digest: a hash of the seed and the layer number.
        let digests: Vec<[u8; 32]> = (0..nb)
            .map(|b| {
                let mut h = Sha256::new();
                h.update(b"shoal-sim blob");
                h.update(p.seed.to_le_bytes());
                h.update(b.to_le_bytes());
                h.finalize().into()
            })
            .collect();
        // The layers of one image: each node knows them all from the manifest
        // (`swarm::seeder_order`), unless `spread_seeders` is off.
        let designated: Vec<Vec<u32>> = digests
            .iter()
            .map(|digest| {
                let seeders = if p.spread_seeders {
                    let mut order = seeder_order(digest, &digests, (0..n).map(pid), p.seeders);
                    order.truncate(p.seeders);
                    order
                } else {
                    designated_seeders(digest, (0..n).map(pid), p.seeders)
                };
                seeders.iter().map(pidx).collect()
            })
            .collect();
        // Each node's role in its site per blob (`swarm::site_gateway`): every node judges from the 20
        // nodes nearest the blob's key, whatever their site, as the daemon judges from its
        // DHT's answer.
        let site_roles: Vec<Vec<SiteRole>> = digests
            .iter()
            .map(|digest| {
                if p.sites < 2 || !p.locality || p.site_gateways == 0 {
                    return vec![SiteRole::Unjudged; n as usize];
                }
                let key: [u8; 32] = Sha256::digest(digest).into();
                let nearest = designated_seeders(&key, (0..n).map(pid), GATEWAY_CANDIDATES);
                (0..n)
                    .map(|i| {
                        let site = nodes[i as usize].site;
                        site_gateway(
                            &key,
                            &pid(i),
                            nearest
                                .iter()
                                .map(|q| (*q, nodes[pidx(q) as usize].site == site)),
                            p.site_gateways,
                        )
                    })
                    .collect()
            })
            .collect();
        let mut tasks = Vec::with_capacity((n * nb) as usize);
        for node in 0..n {
            for (b, layout) in layouts.iter().enumerate() {
                tasks.push(Task {
                    state: State::Idle,
                    dl: None,
                    have: Bitfield::new(layout.count()),
                    peers: Vec::new(),
                    banned: Vec::new(),
                    inflight: Vec::new(),
                    wake_at: u64::MAX,
                    designated: designated[b].contains(&node),
                    site_role: site_roles[b][node as usize],
                    fruitless: 0,
                    polls: 0,
                });
            }
        }
        // A Kademlia lookup: about log2(N) hops of one round trip each.
        let hops = u64::from(usize::BITS - p.nodes.max(2).leading_zeros());
        let lookup_us = hops * p.rtt_us;
        let r = Report {
            scenario: p.scenario.clone(),
            nodes: p.nodes,
            seed: p.seed,
            alive: 0,
            completed: 0,
            incomplete: 0,
            p50_s: 0.0,
            p99_s: 0.0,
            p999_s: 0.0,
            max_s: 0.0,
            mean_s: 0.0,
            ideal_s: p.ideal_s(),
            p99_over_ideal: 0.0,
            upstream_copies: 0.0,
            upstream_bytes: 0,
            upstream_stream_bytes: 0,
            upstream_chunk_bytes: 0,
            seeder_streams: 0,
            takeover_streams: 0,
            upstream_chunk_fetches: 0,
            peer_bytes: 0,
            wan_bytes: 0,
            corrupt_bytes: 0,
            wasted_bytes: 0,
            bans: 0,
            peer_swaps: 0,
            busy: 0,
            busy_after_wait: 0,
            queued: 0,
            dead_requests: 0,
            deaths: 0,
            poisoned: poisoned.len(),
            image_bytes: p.image_bytes(),
            blobs: p.blobs.len(),
            chunk_size: p.chunk_size,
            adaptive_chunks: p.adaptive_chunks,
            events: 0,
            events_by_kind: Default::default(),
            sim_s: 0.0,
            wall_s: 0.0,
            log_hash: String::new(),
        };
        let mut sim = Sim {
            layouts,
            nb,
            up_node: n,
            now: 0,
            heap: RadixQueue::default(),
            nodes,
            tasks,
            flows: Vec::new(),
            free: Vec::new(),
            providers: vec![Vec::new(); nb as usize],
            designated,
            wan_out: vec![0; sites],
            wan_in: vec![0; sites],
            lookup_us,
            rng,
            log: Sha256::new(),
            logbuf: Vec::with_capacity(1 << 16),
            unfinished: p.nodes,
            died: vec![u64::MAX; p.nodes + 1],
            lvl: (0..=n)
                .map(|i| [if i == n { p.upstream_egress } else { p.up }, p.down])
                .collect(),
            have_count: vec![0; (n * nb) as usize],
            gained: vec![Vec::new(); (n * nb) as usize],
            new_chunks: Vec::new(),
            watchers: vec![Vec::new(); (n * nb) as usize],
            poll_dirty: vec![false; (n * nb) as usize],
            notify_pending: vec![false; (n * nb) as usize],
            stream_start: vec![0; (n * nb) as usize],
            scratch: Vec::new(),
            found: Vec::new(),
            started: Instant::now(),
            kinds: [0; KIND_NAMES.len()],
            r,
            p,
        };
        if std::env::var_os("SHOAL_SIM_TRACE").is_some() {
            sim.push(0, Ev::Trace);
        }
        for node in 0..n {
            let start = if sim.p.start_spread_us > 0 {
                sim.rng.below(sim.p.start_spread_us)
            } else {
                0
            };
            sim.nodes[node as usize].start = start;
            sim.push(start, Ev::Start { node });
        }
        let dying = (sim.p.nodes as f64 * sim.p.churn_fraction).round() as usize;
        let (lo, hi) = sim.p.churn_window_us;
        for node in sim.rng.pick(sim.p.nodes, dying) {
            let at = lo + sim.rng.below(hi.saturating_sub(lo).max(1));
            sim.push(at, Ev::Die { node: node as u32 });
        }
        sim
    }

    /// The designated seeders of each blob.
    pub fn designated(&self) -> &[Vec<u32>] {
        &self.designated
    }

    fn push(&mut self, time: u64, ev: Ev) {
        self.heap.push(time, ev);
    }

    fn log_event(&mut self, ev: &Ev) {
        let (kind, a, b) = ev.log_fields();
        self.logbuf.extend_from_slice(&self.now.to_le_bytes());
        self.logbuf.push(kind);
        self.logbuf.extend_from_slice(&a.to_le_bytes());
        self.logbuf.extend_from_slice(&b.to_le_bytes());
        if self.logbuf.len() >= (1 << 16) - 32 {
            self.log.update(&self.logbuf);
            self.logbuf.clear();
        }
    }

    /// Runs to the end: every alive node complete, or the time limit.
    pub fn run(mut self) -> Report {
        let wall = Instant::now();
        while self.unfinished > 0 {
            let Some((time, ev)) = self.heap.pop() else {
                break;
            };
            let e = Entry { time, ev };
            if e.time > self.p.time_limit_us {
                break;
            }
            self.now = e.time;
            if matches!(e.ev, Ev::Trace) {
                self.trace();
                continue;
            }
            self.r.events += 1;
            self.kinds[e.ev.log_fields().0 as usize] += 1;
            self.log_event(&e.ev);
            self.dispatch(e.ev);
        }
        self.finish(wall)
    }

    fn finish(mut self, wall: Instant) -> Report {
        // Settle the upstream's bytes in flight at the end (only if the run was cut short).
        let ups: Vec<u32> = flow_ids(&self.nodes[self.up_node as usize].up_flows);
        for f in ups {
            self.settle(f);
        }
        self.log.update(&self.logbuf);
        let limit = self.p.time_limit_us;
        let mut times: Vec<u64> = Vec::new();
        for n in &self.nodes[..self.p.nodes] {
            if !n.alive {
                continue;
            }
            match n.done_at {
                Some(t) => {
                    self.r.completed += 1;
                    times.push(t - n.start);
                }
                None => {
                    self.r.incomplete += 1;
                    times.push(limit);
                }
            }
        }
        times.sort_unstable();
        let r = &mut self.r;
        r.alive = times.len();
        let pct = |q: f64| -> f64 {
            if times.is_empty() {
                return 0.0;
            }
            let i = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1;
            times[i] as f64 / 1e6
        };
        r.p50_s = pct(0.50);
        r.p99_s = pct(0.99);
        r.p999_s = pct(0.999);
        r.max_s = times.last().map_or(0.0, |&t| t as f64 / 1e6);
        r.mean_s = if times.is_empty() {
            0.0
        } else {
            times.iter().map(|&t| t as f64).sum::<f64>() / times.len() as f64 / 1e6
        };
        r.p99_over_ideal = r.p99_s / r.ideal_s;
        r.upstream_bytes = r.upstream_stream_bytes + r.upstream_chunk_bytes;
        r.upstream_copies = r.upstream_bytes as f64 / r.image_bytes.max(1) as f64;
        r.events_by_kind = KIND_NAMES
            .iter()
            .zip(self.kinds)
            .filter(|&(_, n)| n > 0)
            .map(|(&k, n)| (k, n))
            .collect();
        r.sim_s = self.now as f64 / 1e6;
        r.wall_s = wall.elapsed().as_secs_f64();
        r.log_hash = hex::encode(self.log.finalize());
        self.r
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Start { node } => {
                for b in 0..self.nb {
                    let t = node * self.nb + b;
                    self.tasks[t as usize].state = State::Lookup;
                    self.push(self.now + self.lookup_us, Ev::Lookup { task: t });
                }
            }
            Ev::Lookup { task } => self.on_lookup(task),
            Ev::Relookup { task } => {
                if matches!(
                    self.tasks[task as usize].state,
                    State::Waiting(_) | State::Downloading
                ) {
                    self.push(self.now + self.lookup_us, Ev::Lookup { task });
                }
            }
            Ev::Wake { task } => {
                if self.tasks[task as usize].wake_at == self.now {
                    self.tasks[task as usize].wake_at = u64::MAX;
                    self.drive(task);
                }
            }
            Ev::HavePoll { task } => self.on_have_poll(task),
            Ev::Arrive { flow, gen } => self.on_arrive(flow, gen),
            Ev::Step { flow, gen } => self.on_step(flow, gen),
            Ev::Fail {
                task,
                peer,
                index,
                corrupt,
            } => {
                let reason = if corrupt {
                    FailReason::Corrupt
                } else {
                    FailReason::Refused
                };
                self.on_fail(task, peer, index, reason);
            }
            Ev::Die { node } => self.on_die(node),
            Ev::Trace => {}
            Ev::ServeWake { node } => self.on_serve_wake(node),
            Ev::Notify { task } => {
                self.notify_pending[task as usize] = false;
                self.poll_dirty[task as usize] = true;
                self.on_have_poll(task);
            }
            Ev::Rebalance { node } => {
                self.nodes[node as usize].rebalance_pending = false;
                self.level(node, true);
                self.level(node, false);
                let n = &self.nodes[node as usize];
                let all: Vec<u32> = n
                    .up_flows
                    .iter()
                    .chain(&n.down_flows)
                    .map(|e| e.0)
                    .collect();
                for f in all {
                    self.update_rate(f);
                }
            }
        }
    }

    fn trace(&mut self) {
        let mut states = [0usize; 7];
        let (mut inflight, mut peers) = (0usize, 0usize);
        let (mut excluded, mut useful, mut known_useful, mut held) = (0usize, 0usize, 0usize, 0u64);
        for (ti, t) in self.tasks.iter().enumerate() {
            if let Some(dl) = &t.dl {
                let b = ti as u32 % self.nb;
                held += u64::from(t.have.count_ones());
                for k in &t.peers {
                    excluded += usize::from(dl.is_excluded(&k.id));
                    let cur = &self.tasks[(k.id * self.nb + b) as usize].have;
                    let u = cur
                        .as_bytes()
                        .iter()
                        .zip(t.have.as_bytes())
                        .any(|(c, m)| c & !m != 0);
                    useful += usize::from(u);
                    let ku = self.gained[(k.id * self.nb + b) as usize][..k.last_count as usize]
                        .iter()
                        .any(|&i| !t.have.get(i));
                    known_useful += usize::from(ku);
                }
            }
            let i = match t.state {
                State::Idle => 0,
                State::Lookup => 1,
                State::Waiting(_) => 2,
                State::Downloading => 3,
                State::Streaming => 4,
                State::Done => 5,
                State::Dead => 6,
            };
            states[i] += 1;
            let _ = ti;
            inflight += t.inflight.len();
            peers += t.peers.len();
        }
        let (mut flows, mut rate, mut ups, mut downs, mut maxup) =
            (0usize, 0u64, 0usize, 0usize, 0);
        for n in &self.nodes[..self.p.nodes] {
            ups += usize::from(!n.up_flows.is_empty());
            downs += usize::from(!n.down_flows.is_empty());
            maxup = maxup.max(n.up_flows.len());
        }
        for f in &self.flows {
            if f.active {
                flows += 1;
                rate += f.rate;
            }
        }
        let dl = states[3].max(1);
        eprintln!(
            "t={:.1}s wall={:.1}s states(idle,lookup,wait,dl,stream,done,dead)={states:?} flows={flows} \
             rate={:.1}GB/s/{:.1}GB/s ({:.0}%) mean_rate={:.1}MB/s uploaders={ups} downloaders={downs} max_up={maxup} \
             heap={} kinds={:?} inflight/dl={:.1} peers/dl={:.1} excl/dl={:.1} useful/dl={:.1} known_useful/dl={:.1} held/dl={:.1} busy={} up_copies={:.2}",
            self.now as f64 / 1e6,
            self.started.elapsed().as_secs_f64(),
            rate as f64 / 1e9,
            (self.p.up * self.p.nodes as u64) as f64 / 1e9,
            100.0 * rate as f64 / (self.p.down * self.p.nodes as u64) as f64,
            rate as f64 / flows.max(1) as f64 / 1e6,
            self.heap.len(),
            self.kinds,
            inflight as f64 / dl as f64,
            peers as f64 / dl as f64,
            excluded as f64 / dl as f64,
            useful as f64 / dl as f64,
            known_useful as f64 / dl as f64,
            held as f64 / dl as f64,
            self.r.busy,
            (self.r.upstream_stream_bytes + self.r.upstream_chunk_bytes) as f64
                / self.p.image_bytes() as f64,
        );
        // `SHOAL_SIM_TASKS=1` (with the trace): every task's state too, for small runs.
        if std::env::var_os("SHOAL_SIM_TASKS").is_some() {
            for (ti, t) in self.tasks.iter().enumerate() {
                eprintln!(
                    "  task {ti} node {} {:?} have {} inflight(peer,chunk,flow) {:?} peers {}",
                    ti as u32 / self.nb,
                    t.state,
                    t.have.count_ones(),
                    t.inflight,
                    t.peers.len(),
                );
            }
        }
        // `SHOAL_SIM_TRACE=MS`: every MS milliseconds of simulated time (1 s if not a number).
        let every_ms = std::env::var("SHOAL_SIM_TRACE")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&v| v > 1)
            .unwrap_or(1000);
        self.push(self.now + every_ms * 1000, Ev::Trace);
    }

    fn split(&self, task: u32) -> (u32, u32) {
        (task / self.nb, task % self.nb)
    }

    fn node_alive(&self, task: u32) -> bool {
        self.nodes[(task / self.nb) as usize].alive
    }

    // ----- discovery -----

    /// A provider lookup's answer: up to `self.p.provider_limit` visible providers, a seeded sample.
    fn sample(&mut self, task: u32) -> Vec<u32> {
        let (node, b) = self.split(task);
        let list = &self.providers[b as usize];
        let visible = list.partition_point(|&(v, _)| v <= self.now);
        let mut out = std::mem::take(&mut self.found);
        out.clear();
        if visible <= self.p.provider_limit {
            out.extend(list[..visible].iter().map(|&(_, p)| p));
        } else {
            let mut tries = 0;
            while out.len() < self.p.provider_limit && tries < 4 * self.p.provider_limit {
                let p = list[self.rng.below(visible as u64) as usize].1;
                if !out.contains(&p) {
                    out.push(p);
                }
                tries += 1;
            }
        }
        out.retain(|&p| p != node && self.died[p as usize] == u64::MAX);
        out
    }

    fn announce(&mut self, task: u32) {
        let (node, b) = self.split(task);
        // A DHT provide: about as long as a lookup before others can see it.
        let visible = self.now + self.lookup_us;
        self.providers[b as usize].push((visible, node));
    }

    fn on_lookup(&mut self, task: u32) {
        if !self.node_alive(task) {
            return;
        }
        let now_ms = ms(self.now);
        let downloading = match &self.tasks[task as usize].state {
            State::Lookup | State::Waiting(_) => false,
            State::Downloading => true,
            _ => return,
        };
        match downloading {
            false => {
                let found = self.sample(task);
                let t = &mut self.tasks[task as usize];
                if !found.is_empty() {
                    if let State::Waiting(plan) = &mut t.state {
                        plan.provider_appeared(now_ms);
                    }
                    self.start_download(task, &found);
                    self.found = found;
                    return;
                }
                self.found = found;
                if matches!(t.state, State::Lookup) {
                    if t.designated {
                        self.r.seeder_streams += 1;
                        self.start_stream(task);
                        return;
                    }
                    t.state = State::Waiting(SeedPlan::new(
                        false,
                        self.p.download.takeover_after_ms,
                        now_ms,
                    ));
                }
                let State::Waiting(plan) = &mut t.state else {
                    return;
                };
                if plan.poll(now_ms).is_some() {
                    self.r.takeover_streams += 1;
                    self.start_stream(task);
                    return;
                }
                let after = provider_poll_after_ms(t.polls) * 1000;
                t.polls += 1;
                self.push(self.now + after, Ev::Relookup { task });
            }
            true => {
                let found = self.sample(task);
                let before = self.tasks[task as usize].peers.len();
                self.add_peers(task, &found);
                self.found = found;
                self.drive(task);
                let t = &mut self.tasks[task as usize];
                t.fruitless = if t.peers.len() > before {
                    0
                } else {
                    t.fruitless + 1
                };
                self.push(
                    self.now + self.relookup_after_us(task),
                    Ev::Relookup { task },
                );
            }
        }
    }

    fn start_download(&mut self, task: u32, found: &[u32]) {
        let (_, b) = self.split(task);
        let t = &mut self.tasks[task as usize];
        let mut config = DownloadConfig {
            seed: if self.p.shared_seed {
                self.p.seed ^ u64::from(b).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            } else {
                self.p.seed ^ u64::from(task).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            },
            upstream_allowed: t.designated,
            ..self.p.download.clone()
        };
        config.site_role = t.site_role;
        t.dl = Some(Box::new(Download::new(
            self.layouts[b as usize],
            config,
            ms(self.now),
        )));
        t.state = State::Downloading;
        self.announce(task);
        self.add_peers(task, found);
        if !self.p.have_push {
            self.push(self.now + self.p.have_poll_ms * 1000, Ev::HavePoll { task });
        }
        self.push(
            self.now + self.relookup_after_us(task),
            Ev::Relookup { task },
        );
        self.drive(task);
    }

    /// When a downloading task looks its providers up again (from its peers and its
    /// fruitless lookups in a row), in microseconds.
    fn relookup_after_us(&self, task: u32) -> u64 {
        let t = &self.tasks[task as usize];
        let ms = if self.p.adaptive_lookup {
            // Every node knows every other (the simulated routing table is the whole swarm).
            let everyone = t.peers.len() + 1 >= self.p.nodes;
            next_lookup_after_ms(t.peers.len(), self.p.provider_limit, t.fruitless, everyone)
        } else {
            self.p.lookup_interval_ms
        };
        ms * 1000
    }

    /// Adds newly found providers, up to `self.p.provider_limit` peers in all.
    fn add_peers(&mut self, task: u32, found: &[u32]) {
        let (node, b) = self.split(task);
        let now_ms = ms(self.now);
        let Some(mut dl) = self.tasks[task as usize].dl.take() else {
            return;
        };
        let site = self.nodes[node as usize].site;
        for &p in found {
            let t = &self.tasks[task as usize];
            let far = self.p.locality && self.p.sites > 1 && self.nodes[p as usize].site != site;
            if t.peers.iter().any(|k| k.id == p)
                || t.banned.contains(&p)
                || (far && t.peers.iter().filter(|k| k.far).count() >= FAR_PEER_LIMIT)
            {
                continue;
            }
            if t.peers.len() >= self.p.provider_limit {
                // Full: a new provider replaces a peer only when the ones followed cannot
                // finish the blob (`Download::replaceable_peer`).
                let Some(old) = dl.replaceable_peer(now_ms).filter(|_| self.p.peer_swap) else {
                    continue;
                };
                dl.remove_peer(old, now_ms);
                self.tasks[task as usize].peers.retain(|k| k.id != old);
                self.watchers[(old * self.nb + b) as usize].retain(|&w| w != task);
                self.r.peer_swaps += 1;
            }
            let have = &self.tasks[(p * self.nb + b) as usize].have;
            let complete = have.is_full();
            let h = if complete {
                Have::All
            } else {
                Have::Bits(have.clone())
            };
            dl.add_peer(p, h, now_ms);
            if far {
                dl.set_peer_far(p, true, now_ms);
            }
            self.watchers[(p * self.nb + b) as usize].push(task);
            self.tasks[task as usize].peers.push(Known {
                id: p,
                last_count: self.have_count[(p * self.nb + b) as usize],
                complete,
                far,
            });
        }
        self.tasks[task as usize].dl = Some(dl);
    }

    fn on_have_poll(&mut self, task: u32) {
        if !self.node_alive(task) || !matches!(self.tasks[task as usize].state, State::Downloading)
        {
            return;
        }
        let (_, b) = self.split(task);
        let now_ms = ms(self.now);
        let detect = self.p.detect_us;
        // Nothing to learn from the providers (none gained a chunk since the last poll, and no
        // node died): straight to driving the download, as the full pass would.
        if !self.poll_dirty[task as usize] && self.r.deaths == 0 {
            self.drive(task);
            if !self.p.have_push {
                self.push(self.now + self.p.have_poll_ms * 1000, Ev::HavePoll { task });
            }
            return;
        }
        self.poll_dirty[task as usize] = false;
        let Some(mut dl) = self.tasks[task as usize].dl.take() else {
            return;
        };
        let mut peers = std::mem::take(&mut self.tasks[task as usize].peers);
        let mut new = std::mem::take(&mut self.new_chunks);
        let full = self.layouts[b as usize].count();
        // Nobody died yet (the common case): no need to read each peer's death time.
        let deaths = self.r.deaths > 0;
        peers.retain_mut(|k| {
            let died = if deaths {
                self.died[k.id as usize]
            } else {
                u64::MAX
            };
            if died != u64::MAX {
                if self.now >= died.saturating_add(detect) {
                    dl.remove_peer(k.id, now_ms);
                    return false;
                }
                return true;
            }
            if k.complete {
                return true;
            }
            let count = self.have_count[(k.id * self.nb + b) as usize];
            if count == k.last_count {
                return true;
            }
            // Chunks are only ever gained: the new ones are the log's tail, reported in index
            // order (as a pass over the bitfield would).
            new.clear();
            new.extend_from_slice(
                &self.gained[(k.id * self.nb + b) as usize][k.last_count as usize..count as usize],
            );
            new.sort_unstable();
            dl.peer_has_many(k.id, &new, now_ms);
            k.last_count = count;
            k.complete = count == full;
            true
        });
        self.new_chunks = new;
        // Pushed Haves come often: when they leave the download nothing to do (every peer
        // with room has nothing new to give), polling it is skipped; its deadlines stay armed.
        let idle = self.p.have_push && dl.is_idle(now_ms);
        self.tasks[task as usize].peers = peers;
        self.tasks[task as usize].dl = Some(dl);
        if idle {
            self.arm_wake(task);
        } else {
            self.drive(task);
        }
        if !self.p.have_push {
            self.push(self.now + self.p.have_poll_ms * 1000, Ev::HavePoll { task });
        }
    }

    // ----- driving a Download -----

    fn drive(&mut self, task: u32) {
        let importing = self.p.import_first && self.importing(task);
        let Some(mut dl) = self.tasks[task as usize].dl.take() else {
            return;
        };
        let now_ms = ms(self.now);
        dl.hold_peer_requests(importing, now_ms);
        if self.p.in_flight_budget {
            let (node, _) = self.split(task);
            // This download (taken out of its task) and the node's others still running.
            let others = (0..self.nb)
                .filter(|&o| self.tasks[(node * self.nb + o) as usize].dl.is_some())
                .count();
            self.nodes[node as usize]
                .budget
                .apply(&mut dl, others + 1, now_ms);
        }
        let mut done = false;
        while let Some(action) = dl.poll_action(now_ms) {
            match action {
                Action::Request { peer, index } => self.request(task, peer, index),
                Action::Cancel { peer, index } => self.cancel(task, peer, index),
                Action::FetchUpstream { index } => {
                    self.r.upstream_chunk_fetches += 1;
                    let up = self.up_node;
                    self.new_flow(task, up, index, Kind::UpChunk, self.p.upstream_rtt_us);
                }
                Action::RefetchTable { exclude } => {
                    // As the daemon does: the chunk's sender is the likelier liar.
                    dl.ban_peer(exclude, now_ms);
                    dl.table_refetched(now_ms);
                }
                Action::Ban { peer, .. } => {
                    self.r.bans += 1;
                    let t = &mut self.tasks[task as usize];
                    t.peers.retain(|k| k.id != peer);
                    if !t.banned.contains(&peer) {
                        t.banned.push(peer);
                    }
                }
                Action::Done => done = true,
            }
        }
        if done {
            self.finish_task(task);
            return;
        }
        self.tasks[task as usize].dl = Some(dl);
        self.arm_wake(task);
    }

    /// Drives every download of `task`'s node (its import held them).
    fn drive_node(&mut self, task: u32) {
        let (node, _) = self.split(task);
        for b in 0..self.nb {
            self.drive(node * self.nb + b);
        }
    }

    /// True while an import (`task` streaming its blob from the upstream, `have` chunks in)
    /// holds the node's other downloads: until `import_hold_percent` of it is in.
    fn held_import(&self, task: u32, have: u32) -> bool {
        let (_, b) = self.split(task);
        let count = u64::from(self.layouts[b as usize].count());
        u64::from(have) * 100 < count * self.p.import_hold_percent
            && self.now < self.stream_start[task as usize] + IMPORT_HOLD_MAX_MS * 1000
    }

    /// True while another task of the task's node streams its blob from the upstream.
    fn importing(&self, task: u32) -> bool {
        let (node, b) = self.split(task);
        (0..self.nb).any(|o| {
            let t = (node * self.nb + o) as usize;
            o != b
                && matches!(self.tasks[t].state, State::Streaming)
                && self.held_import(t as u32, self.have_count[t])
        })
    }

    /// A `Wake` at the task's `Download::next_wakeup` (if earlier than the one pending).
    fn arm_wake(&mut self, task: u32) {
        let now_ms = ms(self.now);
        let Some(w) = self.tasks[task as usize]
            .dl
            .as_ref()
            .and_then(|dl| dl.next_wakeup())
        else {
            return;
        };
        let at = if w > now_ms {
            w * 1000
        } else {
            (now_ms + 1) * 1000
        };
        let t = &mut self.tasks[task as usize];
        if at < t.wake_at {
            t.wake_at = at;
            self.push(at, Ev::Wake { task });
        }
    }

    fn finish_task(&mut self, task: u32) {
        let (node, _) = self.split(task);
        let t = &mut self.tasks[task as usize];
        t.state = State::Done;
        t.dl = None;
        t.peers = Vec::new();
        t.banned = Vec::new();
        let inflight = std::mem::take(&mut t.inflight);
        for (_, _, f) in inflight {
            self.kill_flow(f);
        }
        let n = &mut self.nodes[node as usize];
        n.done_blobs += 1;
        if n.done_blobs == self.nb && n.alive {
            n.done_at = Some(self.now);
            self.unfinished -= 1;
        }
    }

    fn request(&mut self, task: u32, peer: u32, index: u32) {
        let jitter = self.p.rtt_us * self.p.rtt_jitter_percent / 100;
        let rtt = if jitter > 0 {
            self.p.rtt_us - jitter + self.rng.below(2 * jitter)
        } else {
            self.p.rtt_us
        };
        self.new_flow(task, peer, index, Kind::Chunk, rtt);
    }

    fn cancel(&mut self, task: u32, peer: u32, index: u32) {
        let t = &mut self.tasks[task as usize];
        if let Some(i) = t
            .inflight
            .iter()
            .position(|&(p, x, _)| p == peer && x == index)
        {
            let (_, _, f) = t.inflight.swap_remove(i);
            self.kill_flow(f);
        }
    }

    fn start_stream(&mut self, task: u32) {
        self.tasks[task as usize].state = State::Streaming;
        self.stream_start[task as usize] = self.now;
        self.announce(task);
        let up = self.up_node;
        self.new_flow(task, up, 0, Kind::Stream, self.p.upstream_rtt_us);
    }

    // ----- flows -----

    fn new_flow(&mut self, task: u32, src: u32, index: u32, kind: Kind, delay: u64) {
        let (node, b) = self.split(task);
        let layout = self.layouts[b as usize];
        let total = match kind {
            Kind::Stream => layout.blob_size(),
            _ => u64::from(layout.range(index).map_or(0, |(_, len)| len)),
        };
        let flow = Flow {
            src,
            dst: node,
            task,
            index,
            kind,
            gen: 0,
            live: true,
            active: false,
            total,
            done: 0,
            rate: 0,
            last: 0,
            due: u64::MAX,
            up_pos: 0,
            down_pos: 0,
            wan: false,
        };
        let id = match self.free.pop() {
            Some(id) => {
                let gen = self.flows[id as usize].gen;
                self.flows[id as usize] = Flow { gen, ..flow };
                id
            }
            None => {
                self.flows.push(flow);
                (self.flows.len() - 1) as u32
            }
        };
        if kind != Kind::Stream {
            self.tasks[task as usize].inflight.push((src, index, id));
        }
        let gen = self.flows[id as usize].gen;
        self.push(self.now + delay, Ev::Arrive { flow: id, gen });
    }

    fn take_inflight(&mut self, task: u32, flow: u32) {
        let t = &mut self.tasks[task as usize];
        if let Some(i) = t.inflight.iter().position(|&(_, _, f)| f == flow) {
            t.inflight.swap_remove(i);
        }
    }

    fn on_arrive(&mut self, flow: u32, gen: u32) {
        let f = &self.flows[flow as usize];
        if !f.live || f.gen != gen {
            return;
        }
        let (src, dst, task, index, kind) = (f.src, f.dst, f.task, f.index, f.kind);
        if !self.nodes[dst as usize].alive {
            self.kill_flow(flow);
            return;
        }
        if kind == Kind::Chunk {
            let s = &self.nodes[src as usize];
            if !s.alive {
                // The connection fails once the peer's death is noticed.
                self.r.dead_requests += 1;
                let at = self.now.max(s.died_at.saturating_add(self.p.detect_us));
                self.take_inflight(task, flow);
                self.kill_flow(flow);
                self.push(
                    at,
                    Ev::Fail {
                        task,
                        peer: src,
                        index,
                        corrupt: false,
                    },
                );
                return;
            }
            let b = task % self.nb;
            match self.nodes[src as usize]
                .serve
                .offer(flow, b, index, ms(self.now))
            {
                Offer::Admit => {}
                Offer::Queued => {
                    self.r.queued += 1;
                    self.serve_wake(src);
                    return;
                }
                Offer::Busy => {
                    self.r.busy += 1;
                    self.take_inflight(task, flow);
                    self.kill_flow(flow);
                    self.on_fail(task, src, index, FailReason::Busy);
                    return;
                }
            }
        }
        self.activate(flow);
    }

    /// Arms the sender's `ServeWake` for its scheduler's next deadline (if earlier than the one
    /// pending).
    fn serve_wake(&mut self, node: u32) {
        let n = &self.nodes[node as usize];
        let Some(w) = n.serve.next_wakeup() else {
            return;
        };
        let at = (w * 1000).max(self.now);
        if at < n.serve_wake_at {
            self.nodes[node as usize].serve_wake_at = at;
            self.push(at, Ev::ServeWake { node });
        }
    }

    /// A sender's queued requests that waited too long are answered `Busy`.
    fn on_serve_wake(&mut self, node: u32) {
        if self.nodes[node as usize].serve_wake_at != self.now {
            return;
        }
        self.nodes[node as usize].serve_wake_at = u64::MAX;
        if !self.nodes[node as usize].alive {
            return;
        }
        let expired = self.nodes[node as usize].serve.poll_timeouts(ms(self.now));
        for flow in expired {
            let f = &self.flows[flow as usize];
            if !f.live {
                continue;
            }
            let (task, index) = (f.task, f.index);
            self.r.busy += 1;
            self.r.busy_after_wait += 1;
            self.take_inflight(task, flow);
            self.kill_flow(flow);
            self.on_fail(task, node, index, FailReason::Busy);
        }
        self.serve_wake(node);
    }

    fn activate(&mut self, flow: u32) {
        let now = self.now;
        let (src, dst) = {
            let f = &mut self.flows[flow as usize];
            f.active = true;
            f.last = now;
            (f.src, f.dst)
        };
        let up_pos = self.nodes[src as usize].up_flows.len() as u32;
        self.nodes[src as usize].up_flows.push((flow, dst));
        let down_pos = self.nodes[dst as usize].down_flows.len() as u32;
        self.nodes[dst as usize].down_flows.push((flow, src));
        let (ss, ds) = (self.nodes[src as usize].site, self.nodes[dst as usize].site);
        let wan = self.p.sites > 1 && ss != ds;
        if wan {
            if ss != OUTSIDE {
                self.wan_out[ss as usize] += 1;
            }
            if ds != OUTSIDE {
                self.wan_in[ds as usize] += 1;
            }
        }
        {
            let f = &mut self.flows[flow as usize];
            f.up_pos = up_pos;
            f.down_pos = down_pos;
            f.wan = wan;
        }
        self.update_rate(flow);
        self.recompute(src, true);
        self.recompute(dst, false);
    }

    fn deactivate(&mut self, flow: u32) {
        let f = &self.flows[flow as usize];
        if !f.active {
            return;
        }
        let (src, dst, up_pos, down_pos, wan) = (f.src, f.dst, f.up_pos, f.down_pos, f.wan);
        let list = &mut self.nodes[src as usize].up_flows;
        list.swap_remove(up_pos as usize);
        if let Some(&(moved, _)) = list.get(up_pos as usize) {
            self.flows[moved as usize].up_pos = up_pos;
        }
        let list = &mut self.nodes[dst as usize].down_flows;
        list.swap_remove(down_pos as usize);
        if let Some(&(moved, _)) = list.get(down_pos as usize) {
            self.flows[moved as usize].down_pos = down_pos;
        }
        if wan {
            let (ss, ds) = (self.nodes[src as usize].site, self.nodes[dst as usize].site);
            if ss != OUTSIDE {
                self.wan_out[ss as usize] -= 1;
            }
            if ds != OUTSIDE {
                self.wan_in[ds as usize] -= 1;
            }
        }
        self.flows[flow as usize].active = false;
        self.recompute(src, true);
        self.recompute(dst, false);
    }

    /// Ends a flow early (cancelled, or an endpoint died): its partial bytes are wasted.
    fn kill_flow(&mut self, flow: u32) {
        if !self.flows[flow as usize].live {
            return;
        }
        if self.flows[flow as usize].active {
            self.settle(flow);
            self.r.wasted_bytes += self.flows[flow as usize].done;
            self.deactivate(flow);
        }
        self.release_flow(flow);
    }

    fn release_flow(&mut self, flow: u32) {
        let f = &mut self.flows[flow as usize];
        f.live = false;
        f.active = false;
        f.gen = f.gen.wrapping_add(1);
        let (src, kind, sent) = (f.src, f.kind, f.done >= f.total);
        self.free.push(flow);
        // A chunk request the sender had admitted or queued frees its place: the sender's
        // scheduler admits queued requests in its stead.
        if kind == Kind::Chunk && self.nodes[src as usize].alive {
            let now = ms(self.now);
            let s = &mut self.nodes[src as usize].serve;
            let admitted = if sent {
                s.finished(flow, now)
            } else {
                s.cancelled(flow, now)
            };
            for a in admitted {
                self.activate(a);
            }
        }
    }

    /// After a node's flow count changed: recompute the rates of its flows in that direction
    /// (at once if few, else within `REBALANCE_US`).
    fn recompute(&mut self, node: u32, up: bool) {
        let n = &self.nodes[node as usize];
        let len = if up {
            n.up_flows.len()
        } else {
            n.down_flows.len()
        };
        if len > REBALANCE_OVER {
            if !n.rebalance_pending {
                self.nodes[node as usize].rebalance_pending = true;
                self.push(self.now + REBALANCE_US, Ev::Rebalance { node });
            }
            return;
        }
        self.level(node, up);
        for i in 0..len {
            let n = &self.nodes[node as usize];
            let f = if up {
                n.up_flows[i].0
            } else {
                n.down_flows[i].0
            };
            self.update_rate(f);
        }
    }

    /// Recomputes a node's water level in one direction: its capacity shared max-min fairly
    /// among its flows, each capped by what the other end currently grants it (the other end's
    /// level, and the WAN share). The level is what an uncapped flow gets.
    fn level(&mut self, node: u32, up: bool) {
        let mut caps = std::mem::take(&mut self.scratch);
        caps.clear();
        let n = &self.nodes[node as usize];
        let list = if up { &n.up_flows } else { &n.down_flows };
        // The other end's level in the other direction.
        let od = usize::from(up);
        if self.p.sites > 1 {
            for &(f, other) in list {
                let wan = self.wan_share(&self.flows[f as usize]);
                caps.push(self.lvl[other as usize][od].min(wan));
            }
        } else {
            caps.extend(list.iter().map(|&(_, other)| self.lvl[other as usize][od]));
        }
        caps.sort_unstable();
        let cap = if up { n.up } else { n.down };
        let mut left = cap;
        let mut level = cap;
        let count = caps.len() as u64;
        for (i, &c) in caps.iter().enumerate() {
            let share = left / (count - i as u64);
            if c >= share {
                level = share;
                break;
            }
            left -= c;
        }
        self.lvl[node as usize][usize::from(!up)] = level.max(1);
        self.scratch = caps;
    }

    /// Across sites: the least of the two WAN links' equal shares.
    fn wan_share(&self, f: &Flow) -> u64 {
        if !f.wan {
            return u64::MAX;
        }
        let s = &self.nodes[f.src as usize];
        let d = &self.nodes[f.dst as usize];
        let mut rate = u64::MAX;
        if s.site != OUTSIDE {
            rate = rate.min(self.p.wan / u64::from(self.wan_out[s.site as usize].max(1)));
        }
        if d.site != OUTSIDE {
            rate = rate.min(self.p.wan / u64::from(self.wan_in[d.site as usize].max(1)));
        }
        rate
    }

    /// The flow's rate: the least of its sender's upload level, its receiver's download level
    /// and its WAN share.
    fn fair_rate(&self, flow: u32) -> u64 {
        let f = &self.flows[flow as usize];
        let mut rate = self.lvl[f.src as usize][0].min(self.lvl[f.dst as usize][1]);
        if f.wan {
            let s = &self.nodes[f.src as usize];
            let d = &self.nodes[f.dst as usize];
            if s.site != OUTSIDE {
                rate = rate.min(self.p.wan / u64::from(self.wan_out[s.site as usize].max(1)));
            }
            if d.site != OUTSIDE {
                rate = rate.min(self.p.wan / u64::from(self.wan_in[d.site as usize].max(1)));
            }
        }
        rate.max(1)
    }

    fn settle(&mut self, flow: u32) {
        let now = self.now;
        let f = &mut self.flows[flow as usize];
        if !f.active || now <= f.last {
            return;
        }
        let add = mul_div(f.rate, now - f.last, 1_000_000);
        let add = add.min(f.total - f.done);
        f.done += add;
        f.last = now;
        if f.src == self.up_node {
            match f.kind {
                Kind::Stream => self.r.upstream_stream_bytes += add,
                _ => self.r.upstream_chunk_bytes += add,
            }
        }
    }

    fn boundary(&self, f: &Flow) -> u64 {
        match f.kind {
            Kind::Stream => {
                let (_, b) = self.split(f.task);
                let chunk = self.layouts[b as usize].chunk_size();
                (u64::from(f.index + 1) * u64::from(chunk)).min(f.total)
            }
            _ => f.total,
        }
    }

    fn update_rate(&mut self, flow: u32) {
        if !self.flows[flow as usize].active {
            return;
        }
        self.settle(flow);
        let rate = self.fair_rate(flow);
        if rate != self.flows[flow as usize].rate {
            self.flows[flow as usize].rate = rate;
            self.schedule_step(flow, false);
        }
    }

    /// Schedules the flow's next boundary; a later time than the pending step is left to that
    /// step to re-schedule (unless `force`).
    fn schedule_step(&mut self, flow: u32, force: bool) {
        let f = &self.flows[flow as usize];
        let target = self.boundary(f);
        let left = target.saturating_sub(f.done);
        let dt = mul_div_ceil(left, 1_000_000, f.rate.max(1));
        let due = self.now + dt;
        // A finish less than STEP_SLACK_US, or 1/STEP_SLACK_DIV of the time left, earlier than
        // the pending step is left to that step: fewer queue entries, a chunk completing at most
        // that much late (its bytes are counted at the true rate all along).
        let slack = STEP_SLACK_US.max(f.due.saturating_sub(self.now) / STEP_SLACK_DIV);
        if force || due.saturating_add(slack) < f.due {
            let gen = f.gen;
            self.flows[flow as usize].due = due;
            self.push(due, Ev::Step { flow, gen });
        }
    }

    fn on_step(&mut self, flow: u32, gen: u32) {
        let f = &self.flows[flow as usize];
        if !f.live || f.gen != gen || !f.active || self.now < f.due {
            return;
        }
        self.settle(flow);
        let f = &self.flows[flow as usize];
        if f.done < self.boundary(f) {
            self.schedule_step(flow, true);
            return;
        }
        let (src, task, index, kind, total) = (f.src, f.task, f.index, f.kind, f.total);
        let now_ms = ms(self.now);
        match kind {
            Kind::Stream => {
                let held = self.held_import(task, self.have_count[task as usize]);
                self.mark_have(task, index);
                let released = held && !self.held_import(task, self.have_count[task as usize]);
                let count = self.tasks[task as usize].have.len();
                if released && index + 1 < count && self.p.import_first {
                    self.drive_node(task);
                }
                if index + 1 >= count {
                    self.deactivate(flow);
                    self.release_flow(flow);
                    self.finish_task(task);
                    if self.p.import_first {
                        self.drive_node(task);
                    }
                } else {
                    self.flows[flow as usize].index += 1;
                    self.schedule_step(flow, true);
                }
            }
            Kind::Chunk => {
                self.take_inflight(task, flow);
                self.deactivate(flow);
                self.release_flow(flow);
                if !matches!(self.tasks[task as usize].state, State::Downloading) {
                    return;
                }
                let Some(mut dl) = self.tasks[task as usize].dl.take() else {
                    return;
                };
                if self.nodes[src as usize].poisoned {
                    self.r.corrupt_bytes += total;
                    dl.chunk_failed(src, index, FailReason::Corrupt, now_ms);
                } else {
                    self.r.peer_bytes += total;
                    let (dst, _) = self.split(task);
                    if self.nodes[src as usize].site != self.nodes[dst as usize].site {
                        self.r.wan_bytes += total;
                    }
                    self.mark_have(task, index);
                    dl.chunk_received(src, index, total, now_ms);
                }
                self.tasks[task as usize].dl = Some(dl);
                self.drive(task);
            }
            Kind::UpChunk => {
                self.take_inflight(task, flow);
                self.deactivate(flow);
                self.release_flow(flow);
                if !matches!(self.tasks[task as usize].state, State::Downloading) {
                    return;
                }
                self.mark_have(task, index);
                if let Some(dl) = self.tasks[task as usize].dl.as_mut() {
                    dl.upstream_received(index, now_ms);
                }
                self.drive(task);
            }
        }
    }

    /// The task now holds chunk `index` verified (and serves it).
    fn mark_have(&mut self, task: u32, index: u32) {
        if self.tasks[task as usize].have.set(index) {
            self.have_count[task as usize] += 1;
            let (node, b) = self.split(task);
            let len = self.layouts[b as usize].range(index).map_or(0, |(_, l)| l);
            let now_ms = ms(self.now);
            self.nodes[node as usize]
                .budget
                .received(u64::from(len), now_ms);
            self.gained[task as usize].push(index);
            for &w in &self.watchers[task as usize] {
                self.poll_dirty[w as usize] = true;
            }
            if self.p.have_push {
                // Delivered half a round trip later, rounded up to the notify quantum (so the
                // updates of a busy node's providers reach it in fewer, fuller batches).
                let q = self.p.notify_quantum_us.max(1);
                let at = (self.now + self.p.rtt_us / 2).div_ceil(q) * q;
                self.notify_watchers(task, at);
            }
        }
    }

    /// Pushed Haves: every watcher still downloading gets one `Notify` at `at` (a watcher with
    /// one already on its way reads this change with it, as a subscription stream would
    /// deliver queued updates in one read).
    ///
    /// Every watcher, even one that holds the gained chunk already: any news of a provider is
    /// progress to its `Download` (a follower that hears none for the takeover time judges the
    /// swarm stalled and goes upstream).
    fn notify_watchers(&mut self, task: u32, at: u64) {
        let ws = std::mem::take(&mut self.watchers[task as usize]);
        for &w in &ws {
            if !self.notify_pending[w as usize]
                && matches!(self.tasks[w as usize].state, State::Downloading)
            {
                self.notify_pending[w as usize] = true;
                self.push(at, Ev::Notify { task: w });
            }
        }
        self.watchers[task as usize] = ws;
    }

    fn on_fail(&mut self, task: u32, peer: u32, index: u32, reason: FailReason) {
        if !self.node_alive(task) || !matches!(self.tasks[task as usize].state, State::Downloading)
        {
            return;
        }
        let now_ms = ms(self.now);
        let dead = !self.nodes[peer as usize].alive;
        let Some(dl) = self.tasks[task as usize].dl.as_mut() else {
            return;
        };
        dl.chunk_failed(peer, index, reason, now_ms);
        if dead {
            dl.remove_peer(peer, now_ms);
            self.tasks[task as usize].peers.retain(|k| k.id != peer);
        }
        self.drive(task);
    }

    fn on_die(&mut self, node: u32) {
        if !self.nodes[node as usize].alive {
            return;
        }
        self.r.deaths += 1;
        let n = &mut self.nodes[node as usize];
        n.alive = false;
        n.died_at = self.now;
        self.died[node as usize] = self.now;
        if n.done_at.is_none() {
            self.unfinished -= 1;
        }
        // Its uploads stop; their receivers notice after the detection delay, as do those of
        // the requests it had queued.
        let mut ups = flow_ids(&self.nodes[node as usize].up_flows);
        ups.extend(self.nodes[node as usize].serve.drain());
        let at = self.now + self.p.detect_us;
        for f in ups {
            let fl = &self.flows[f as usize];
            let (task, index, kind) = (fl.task, fl.index, fl.kind);
            self.take_inflight(task, f);
            self.kill_flow(f);
            if kind == Kind::Chunk {
                self.push(
                    at,
                    Ev::Fail {
                        task,
                        peer: node,
                        index,
                        corrupt: false,
                    },
                );
            }
        }
        // Subscribers to its Haves see their streams break after the detection delay.
        if self.p.have_push {
            for b in 0..self.nb {
                self.notify_watchers(node * self.nb + b, at);
            }
        }
        // Its own downloads stop.
        for b in 0..self.nb {
            let task = node * self.nb + b;
            let t = &mut self.tasks[task as usize];
            t.state = State::Dead;
            t.dl = None;
            t.peers = Vec::new();
            let inflight = std::mem::take(&mut t.inflight);
            for (_, _, f) in inflight {
                self.kill_flow(f);
            }
        }
        let downs = flow_ids(&self.nodes[node as usize].down_flows);
        for f in downs {
            self.kill_flow(f);
        }
    }
}

impl Report {
    /// A readable summary.
    pub fn summary(&self) -> String {
        format!(
            "scenario {} — {} nodes (seed {}), image {:.2} GB in {} layers, chunk {}{} KiB\n\
             pull time: p50 {:.2} s, p99 {:.2} s, p99.9 {:.2} s, max {:.2} s (ideal {:.2} s; p99 = {:.2} x ideal)\n\
             completed {}/{} alive nodes ({} died, {} incomplete)\n\
             upstream egress: {:.3} copies ({} seeder streams, {} takeovers, {} fallback chunks)\n\
             bytes: {:.1} GB from peers, {:.1} GB upstream, {:.2} GB wasted, {:.2} GB corrupt\n\
             poisoned nodes {}, bans {}, busy answers {}, requests to dead nodes {}\n\
             {} events, {:.1} s simulated in {:.1} s wall; log hash {}",
            self.scenario,
            self.nodes,
            self.seed,
            self.image_bytes as f64 / 1e9,
            self.blobs,
            if self.adaptive_chunks { "at most " } else { "" },
            self.chunk_size >> 10,
            self.p50_s,
            self.p99_s,
            self.p999_s,
            self.max_s,
            self.ideal_s,
            self.p99_over_ideal,
            self.completed,
            self.alive,
            self.deaths,
            self.incomplete,
            self.upstream_copies,
            self.seeder_streams,
            self.takeover_streams,
            self.upstream_chunk_fetches,
            self.peer_bytes as f64 / 1e9,
            self.upstream_bytes as f64 / 1e9,
            self.wasted_bytes as f64 / 1e9,
            self.corrupt_bytes as f64 / 1e9,
            self.poisoned,
            self.bans,
            self.busy,
            self.dead_requests,
            self.events,
            self.sim_s,
            self.wall_s,
            self.log_hash,
        )
    }
}
