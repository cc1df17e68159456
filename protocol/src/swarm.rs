//! The swarm's decision core: which chunk to ask which peer for, when to give up on a peer, when
//! to go to the upstream registry, and which nodes seed a blob nobody holds yet.
//!
//! Goal: sans-IO state machines that the daemon drives with real events and that a simulator
//! drives with the same code at 100,000 nodes, so every decision is deterministic (seeded
//! randomness, ordered maps only) and costs O(log n) in chunks and peers per chunk-level event.
//! Non-goal: any I/O or clock: time is a `now: u64` of milliseconds, passed in, from any fixed
//! origin; the caller keeps it monotonic.
//!
//! * [`Download`]: one node fetching one blob from peers and, as a fallback, from the upstream.
//! * [`designated_seeders`] and [`SeedPlan`]: herd control for a blob that no peer holds yet.
//! * [`InFlightBudget`]: one node's chunk requests in flight, shared among its downloads.
//! * [`PeerId`]: a peer's identity as bytes (a libp2p peer id's bytes); [`PeerKey`]: what a
//!   [`Download`] needs of an identity (the daemon's `PeerId`, the simulator's `u32` node numbers,
//!   which order and hash as the `PeerId`s of the same numbers).
//!
//! # The download policy
//!
//! * **Rarest first.** Wanted chunks are ordered by how many usable peers hold them (peers that
//!   hold everything count for every chunk alike, so only partial holders are counted), then by
//!   `index / in_order_bias` (a window: a lone downloader walks the blob roughly in order, which
//!   suits a client streaming it; 0 turns the bias off), then by a seeded random key (so that many
//!   nodes starting at once from one seeder ask for different chunks), then by index.
//! * **Pipelining.** Each peer has up to `clamp(1 + rate * pipeline_target_ms / chunk_size,
//!   min_pipeline, max_pipeline)` requests in flight, `rate` being the EWMA of its measured
//!   throughput: faster peers get more. Ready peers are served fastest first.
//! * **Timeouts.** A request times out after `max(timeout_floor_ms, timeout_factor * time to
//!   send this chunk and the ones queued before it at the peer's rate)`. A timed-out request is
//!   cancelled and re-issued, and counts against the peer: its rate is halved (a peer that never
//!   delivered keeps none: a failure is no measurement) and it gets no new request for a
//!   cooldown that doubles with each consecutive failure; after `max_strikes`
//!   consecutive failures it is benched (not used, not counted as a holder) for `bench_ms`,
//!   doubled for each further bench before it delivers again.
//! * **Busy peers.** A peer at its serving limit answers `Busy` ([`FailReason::Busy`]): the
//!   chunk is wanted again and the peer gets no new request for `busy_backoff_ms`, doubled for
//!   each further `Busy` in a row (at most 16 times), but it is not struck, slowed or benched: a
//!   seeder every node asks at once is popular, not failing. A `Busy` answer also counts as the
//!   swarm's progress (see **Upstream**): the peer is serving others.
//! * **Poisoned peers.** A chunk that fails verification between trusted ends
//!   ([`FailReason::Corrupt`]) bans its sender for `ban_ms`: its other requests are cancelled and
//!   re-issued elsewhere, so a liar costs at most the chunks it had in flight. A chunk that
//!   disagrees with the table ([`FailReason::Ambiguous`]) blames nobody yet: the download asks
//!   for the table to be fetched again from another provider ([`Action::RefetchTable`]), and the
//!   node reports what it found with [`Download::ban_peer`], [`Download::chunk_invalidated`] and
//!   [`Download::table_refetched`].
//! * **Endgame.** Once every missing chunk is in flight, idle peers are sent duplicates of the
//!   in-flight requests (at most `endgame_max_requests` peers per chunk, fewest requesters
//!   first); when one copy arrives the others are cancelled. Per-peer caps still hold. Off by
//!   default (`endgame_max_requests == 1`): in a swarm every duplicate takes a sender's upload
//!   from a chunk someone else still needs, and the measured tail was shorter without them
//!   (simulations/: cold-start at 1,000 nodes, p99 16.6 s with 3, 15.3 s with 1; a request that
//!   stalls is still re-issued at its timeout).
//! * **Upstream.** A wanted chunk that no usable peer holds (none has it, or all that have it are
//!   banned or benched) for `upstream_grace_ms` is fetched upstream, as is the lowest wanted chunk
//!   (up to `upstream_max_in_flight` at a time) while the peers' aggregate rate is below
//!   `slow_swarm_percent` of `upstream_rate`, once the download is `upstream_grace_ms` old. A node
//!   that is not a designated seeder (`upstream_allowed == false`) waits `takeover_after_ms`
//!   instead of `upstream_grace_ms` in both rules. The wait for chunks nobody holds restarts
//!   whenever the swarm makes progress (a peer joins, announces a chunk it did not hold, or
//!   answers `Busy`): the followers of a seeder that is still streaming the blob from the
//!   upstream keep waiting for it, and take over only once it stalls or dies. For the same
//!   reason a follower judges the peers' speed only once no progress was made for
//!   `takeover_after_ms`. While the peers are too slow and nothing wanted is left, a chunk in
//!   flight only at peers that all failed since their last delivery (a stalled provider given a
//!   request again after its cooldown), or that report bytes ([`Download::chunk_progress`]) at a
//!   rate finishing it later than the upstream would while the upstream is idle and its last
//!   fetch did not fail, is cancelled there and fetched upstream.
//!
//! # Driving a [`Download`]
//!
//! Feed every event (peer joined or left, a peer announced a chunk, a chunk arrived verified or
//! failed, a slow chunk's bytes are still arriving ([`Download::chunk_progress`]), an upstream
//! chunk arrived), then call [`Download::poll_action`] until it returns
//! `None`, carry out the actions, and wake up at [`Download::next_wakeup`] (calling
//! [`Download::tick`] or simply `poll_action` again). Inputs about unknown peers, indices out of
//! range or requests no longer in flight are ignored, so the caller need not filter races.

use core::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use sha2::{Digest as _, Sha256};

use crate::chunk::ChunkLayout;
use crate::wire::Bitfield;

/// The longest peer id: room for any libp2p peer id (at most 44 bytes: an identity multihash of a
/// 42-byte key, or a 34-byte sha256 multihash).
pub const MAX_PEER_ID_LEN: usize = 48;

/// A peer's identity: up to [`MAX_PEER_ID_LEN`] bytes, stored inline (so it is `Copy`), ordered as
/// byte strings.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerId {
    len: u8,
    /// Bytes past `len` are always zero, so the derived equality and hash match the bytes.
    bytes: [u8; MAX_PEER_ID_LEN],
}

impl PeerId {
    /// A peer id from its bytes (a libp2p `PeerId::to_bytes()`, say); `None` if longer than
    /// [`MAX_PEER_ID_LEN`].
    pub fn from_bytes(id: &[u8]) -> Option<PeerId> {
        if id.len() > MAX_PEER_ID_LEN {
            return None;
        }
        let mut bytes = [0u8; MAX_PEER_ID_LEN];
        bytes[..id.len()].copy_from_slice(id);
        Some(PeerId {
            len: id.len() as u8,
            bytes,
        })
    }

    /// The 8-byte big-endian id of a simulated node: ordered like the numbers.
    pub const fn from_u64(n: u64) -> PeerId {
        let be = n.to_be_bytes();
        let mut bytes = [0u8; MAX_PEER_ID_LEN];
        let mut i = 0;
        while i < 8 {
            bytes[i] = be[i];
            i += 1;
        }
        PeerId { len: 8, bytes }
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The peer's position in the Kademlia key space: `sha256(bytes)`.
    pub fn kad_key(&self) -> [u8; 32] {
        Sha256::digest(self.as_bytes()).into()
    }
}

impl Ord for PeerId {
    /// Byte-string order. The bytes past `len` are zero, so comparing the padded arrays word by
    /// word (big-endian), then the lengths, gives exactly the order of the byte strings (a
    /// proper prefix pads with zeros and is shorter); eight bytes per step instead of a call to
    /// `memcmp`: every `Download` map is keyed by peer ids.
    fn cmp(&self, other: &Self) -> core::cmp::Ordering {
        let word = |b: &[u8; MAX_PEER_ID_LEN], i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_be_bytes(w)
        };
        for i in 0..MAX_PEER_ID_LEN / 8 {
            match word(&self.bytes, i).cmp(&word(&other.bytes, i)) {
                core::cmp::Ordering::Equal => {}
                unequal => return unequal,
            }
        }
        self.len.cmp(&other.len)
    }
}

impl PartialOrd for PeerId {
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl core::fmt::Debug for PeerId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "PeerId({})", hex::encode(self.as_bytes()))
    }
}

/// FNV-1a over bytes: a peer id's hash for its seeded tie-breakers.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// What a [`Download`] needs of a peer's identity: cheap copies, a total order (its maps are
/// ordered, so ties fall the same way on every run) and a hash for its seeded tie-breakers.
/// The daemon's is [`PeerId`]; the simulator numbers its nodes with `u32`, which orders and
/// hashes exactly as the `PeerId::from_u64` of the same number, so either gives the same
/// decisions, and the small key keeps the download's maps compact at 100,000 nodes.
pub trait PeerKey: Copy + Ord + core::fmt::Debug {
    /// FNV-1a over the id's bytes.
    fn id_hash(&self) -> u64;
}

impl PeerKey for PeerId {
    fn id_hash(&self) -> u64 {
        fnv1a(self.as_bytes())
    }
}

/// A simulated node's number: the same order and hash as [`PeerId::from_u64`] of it.
impl PeerKey for u32 {
    fn id_hash(&self) -> u64 {
        fnv1a(&u64::from(*self).to_be_bytes())
    }
}

/// The XOR distance (Kademlia metric) between a key and a peer's position `sha256(peer id)`.
pub fn xor_distance(key: &[u8; 32], peer: &PeerId) -> [u8; 32] {
    xor_keys(key, &peer.kad_key())
}

/// The XOR distance between two positions in the key space.
fn xor_keys(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut d = *b;
    for (d, k) in d.iter_mut().zip(a) {
        *d ^= k;
    }
    d
}

/// The (at most) `k` candidates nearest to `digest` by XOR distance to `sha256(peer id bytes)`,
/// nearest first; duplicates count once. Deterministic: the same set of candidates, in any order,
/// gives the same answer. O(n log k).
///
/// Every node computing this over the same candidate set agrees on who seeds a blob.
pub fn designated_seeders(
    digest: &[u8; 32],
    candidates: impl IntoIterator<Item = PeerId>,
    k: usize,
) -> Vec<PeerId> {
    let mut nearest: BTreeSet<([u8; 32], PeerId)> = BTreeSet::new();
    if k == 0 {
        return Vec::new();
    }
    for peer in candidates {
        let entry = (xor_distance(digest, &peer), peer);
        if nearest.len() == k {
            match nearest.last() {
                Some(last) if entry < *last => {
                    nearest.insert(entry);
                    if nearest.len() > k {
                        nearest.pop_last();
                    }
                }
                _ => {}
            }
        } else {
            nearest.insert(entry);
        }
    }
    nearest.into_iter().map(|(_, p)| p).collect()
}

/// The seeding order of `digest` when it is one of several blobs pulled together (the layers of
/// one image manifest, `siblings`; `digest` itself may be among them): every candidate, the
/// first `seeders` of them the designated upstream fetchers, the rest in takeover order.
///
/// [`designated_seeders`] alone lets one node be the nearest to two layers of the same image
/// (with 8 nodes and 4 layers, more often than not): that node then imports both at half its
/// downlink while others import nothing, and the swarm waits on it. Here the blobs are taken in
/// digest order, each giving its `seeders` nearest candidates not taken by a blob before it;
/// `digest` gets the candidates still free, nearest first, then the taken ones, nearest first.
/// When every candidate is taken, they are all free again (more blobs than nodes).
///
/// Deterministic: the same candidates and siblings, in any order and with duplicates, give the
/// same answer, so every node pulling the same image agrees. Without siblings, the order of
/// [`designated_seeders`]. O(b · c log c) for b siblings and c candidates.
pub fn seeder_order(
    digest: &[u8; 32],
    siblings: &[[u8; 32]],
    candidates: impl IntoIterator<Item = PeerId>,
    seeders: usize,
) -> Vec<PeerId> {
    let mut cands: Vec<([u8; 32], PeerId)> =
        candidates.into_iter().map(|p| (p.kad_key(), p)).collect();
    cands.sort_unstable();
    cands.dedup();
    let by_distance = |key: &[u8; 32]| -> Vec<usize> {
        let mut order: Vec<([u8; 32], usize)> = cands
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (xor_keys(key, k), i))
            .collect();
        order.sort_unstable();
        order.into_iter().map(|(_, i)| i).collect()
    };
    let mut before: Vec<&[u8; 32]> = siblings.iter().filter(|s| *s < digest).collect();
    before.sort_unstable();
    before.dedup();
    let mut taken = vec![false; cands.len()];
    let mut free = cands.len();
    if free > 0 {
        for blob in before {
            let order = by_distance(blob);
            for _ in 0..seeders {
                if free == 0 {
                    taken.iter_mut().for_each(|t| *t = false);
                    free = cands.len();
                }
                if let Some(&i) = order.iter().find(|&&i| !taken[i]) {
                    taken[i] = true;
                    free -= 1;
                }
            }
        }
    }
    let order = by_distance(digest);
    let free_first = order.iter().filter(|&&i| !taken[i]);
    let then_taken = order.iter().filter(|&&i| taken[i]);
    free_first.chain(then_taken).map(|&i| cands[i].1).collect()
}

/// Why a [`SeedPlan`] goes to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedReason {
    /// This node is a designated seeder of the blob.
    Designated,
    /// No provider appeared within the takeover timeout.
    NoProvider,
    /// Providers appeared but made no progress within the takeover timeout.
    NoProgress,
}

/// What a [`SeedPlan`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedState {
    /// Wait for a provider; take over at `deadline` unless one appears or makes progress first.
    Waiting {
        /// When to take over.
        deadline: u64,
    },
    /// Fetch the blob from the upstream (and announce it as a provider).
    Upstream {
        /// Why.
        reason: SeedReason,
    },
}

/// The default takeover timeout of [`SeedPlan`] and of [`DownloadConfig::takeover_after_ms`].
pub const DEFAULT_TAKEOVER_AFTER_MS: u64 = 5_000;

/// Discovery policy shared by the daemon and the simulator: how many providers a node asks the
/// DHT for per lookup (complete and arriving ones alike).
pub const PROVIDER_LIMIT: usize = 16;
/// How often a downloading node looks the blob's providers up again, to find more of them.
/// 1 s rather than 2 s: a node that starts with the seeder alone finds the other downloaders
/// (and their chunks) sooner (simulations/: cold-start at 1,000 nodes, p99 13.1 s → 12.7 s;
/// Kraken's test at 500 nodes, 14.7 s → 13.8 s), at twice the DHT lookups.
pub const LOOKUP_INTERVAL_MS: u64 = 1_000;
/// The first pause between lookups of a node that knows fewer than [`PROVIDER_LIMIT`] peers of
/// a blob it is downloading; see [`relookup_after_ms`].
pub const LOOKUP_SHORT_MS: u64 = 100;

/// When a downloading node should look a blob's providers up again: after
/// [`LOOKUP_INTERVAL_MS`] once it follows `limit` peers, and sooner while it follows fewer —
/// [`LOOKUP_SHORT_MS`], doubled for each lookup in a row that found nobody new (`fruitless`),
/// up to the interval. At a cold start every node's first lookup finds the seeders alone, and
/// the nodes that get the first chunks from them announce themselves a moment later; a node
/// that waits a whole interval to find them idles for it.
pub fn relookup_after_ms(known: usize, limit: usize, fruitless: u32) -> u64 {
    if known >= limit {
        return LOOKUP_INTERVAL_MS;
    }
    doubled_ms(LOOKUP_SHORT_MS, fruitless, LOOKUP_INTERVAL_MS)
}

/// `first` doubled `times` times, at most `max`: the pauses between lookups that find nothing.
fn doubled_ms(first: u64, times: u32, max: u64) -> u64 {
    first.saturating_mul(1u64 << times.min(16)).min(max)
}

/// The first pause of a node that waits for a blob's first provider (it is not a designated
/// seeder and nobody provides the blob yet) before it looks again; see
/// [`provider_poll_after_ms`].
pub const PROVIDER_POLL_FIRST_MS: u64 = 25;
/// The longest pause between those looks.
pub const PROVIDER_POLL_MAX_MS: u64 = 250;

/// How long a node waiting for a blob's first provider pauses before its look number
/// `attempt + 1` (`attempt` 0 after the first, empty, look): [`PROVIDER_POLL_FIRST_MS`],
/// doubled after each empty look, at most [`PROVIDER_POLL_MAX_MS`]. At a cold start every
/// follower's first look comes before the designated seeder's provider record is visible, and
/// the seeder holds its first chunk a round trip to the upstream and a chunk time later (53 ms
/// at 1 Gbit/s with 4 MiB chunks and a 20 ms upstream): a fixed 250 ms pause left every
/// follower idle for a quarter of a second (simulated: the 8-host harness case, mean p99 of
/// seeds 1–10, 12.72 → 12.60 s).
pub fn provider_poll_after_ms(attempt: u32) -> u64 {
    doubled_ms(PROVIDER_POLL_FIRST_MS, attempt, PROVIDER_POLL_MAX_MS)
}

/// How many milliseconds of a node's downlink its chunk requests in flight may carry, all its
/// downloads together ([`InFlightBudget`]).
pub const IN_FLIGHT_BUDGET_MS: u64 = 3_000;
/// The smallest budget, in chunks, whatever the measured rate (a node that has measured
/// nothing yet, or a slow one).
pub const IN_FLIGHT_MIN_CHUNKS: u64 = 8;
/// The receive rate is measured over windows this long ...
pub const RATE_WINDOW_MS: u64 = 2_000;
/// ... and the budget follows the best of the last this many windows.
pub const RATE_WINDOWS: usize = 5;

/// One in-flight budget for all of a node's downloads: at most [`IN_FLIGHT_BUDGET_MS`] of its
/// measured receive rate (the best [`RATE_WINDOW_MS`] window of the last [`RATE_WINDOWS`]), at
/// least [`IN_FLIGHT_MIN_CHUNKS`] chunks, shared evenly among the downloads running
/// ([`InFlightBudget::apply`]).
///
/// Why: flows that share a link share its rate, and a chunk is worth nothing to the swarm until
/// it is whole. A node pulling four layers from seven peers at once had up to 28 chunks in
/// flight, each arriving at a 28th of its downlink: none was whole (servable) for seconds, and
/// it fell behind the others (shoal-sim, the 8-host case: one node 24 s where the rest took
/// 13 s). With 3 s of downlink in flight a chunk arrives within about 3 s, and a fast node still
/// keeps enough in flight to fill its link.
#[derive(Debug, Clone, Default)]
pub struct InFlightBudget {
    /// Bytes received in each of the last windows, the current one last: (window start, bytes);
    /// the first `len` entries are used. Inline, not on the heap: every drive of a download
    /// reads it (the simulator's 400,000 of them missed the cache on it).
    windows: [(u64, u64); RATE_WINDOWS],
    len: usize,
}

impl InFlightBudget {
    /// A budget with nothing measured yet.
    pub fn new() -> InFlightBudget {
        InFlightBudget::default()
    }

    /// `bytes` arrived (a verified chunk from a peer, or a piece of an upstream import).
    pub fn received(&mut self, bytes: u64, now: u64) {
        let start = now - now % RATE_WINDOW_MS;
        match self.windows[..self.len].last_mut() {
            Some((s, b)) if *s == start => *b = b.saturating_add(bytes),
            _ => {
                if self.len == RATE_WINDOWS {
                    self.windows.copy_within(1.., 0);
                    self.len -= 1;
                }
                self.windows[self.len] = (start, bytes);
                self.len += 1;
            }
        }
    }

    /// The receive rate the budget follows, in bytes per second: the best window among those
    /// of the last [`RATE_WINDOWS`] windows' time (0 when nothing arrived in that time).
    pub fn rate(&self, now: u64) -> u64 {
        let horizon = RATE_WINDOW_MS * RATE_WINDOWS as u64;
        self.windows[..self.len]
            .iter()
            .filter(|(s, _)| s.saturating_add(horizon) > now)
            .map(|&(_, b)| b.saturating_mul(1_000) / RATE_WINDOW_MS)
            .max()
            .unwrap_or(0)
    }

    /// The whole budget, in bytes.
    fn total(&self, chunk_size: u32, now: u64) -> u64 {
        let chunk = u64::from(chunk_size.max(1));
        (self.rate(now).saturating_mul(IN_FLIGHT_BUDGET_MS) / 1_000)
            .max(IN_FLIGHT_MIN_CHUNKS.saturating_mul(chunk))
    }

    /// The bytes each of `downloads` downloads may have in flight.
    pub fn per_download(&self, chunk_size: u32, downloads: usize, now: u64) -> u64 {
        let chunk = u64::from(chunk_size.max(1));
        (self.total(chunk_size, now) / downloads.max(1) as u64).max(chunk)
    }

    /// The request timeout floor that goes with the budget (for [`Download::set_budget`]): three times the time the measured rate takes to
    /// carry the whole budget, at least `min_ms` (also while nothing is measured). On a slow
    /// link the budget's floor of [`IN_FLIGHT_MIN_CHUNKS`] chunks is more than 3 s of it, and
    /// every chunk in flight takes about that long: a fixed 5 s floor timed out chunks that
    /// were arriving as fast as the link allowed, and fetched them again (shoal-sim, the 8-host
    /// case at 50 Mbit/s, mean of seeds 1–10: 143 MB of 940 wasted, p99 29.1 s; twice the
    /// budget's time: 23 MB, 25.6 s; three times: none, 24.4 s; unchanged at 100 and
    /// 200 Mbit/s).
    pub fn timeout_floor_ms(&self, chunk_size: u32, now: u64, min_ms: u64) -> u64 {
        match self.rate(now) {
            0 => min_ms,
            rate => (self.total(chunk_size, now).saturating_mul(3_000) / rate).max(min_ms),
        }
    }

    /// Gives `dl`, one of `downloads` downloads sharing this budget, its part
    /// ([`Download::set_budget`]): [`InFlightBudget::per_download`] in flight and the timeout
    /// floor that goes with it; the download keeps its own caps and floors.
    pub fn apply<P: PeerKey>(&self, dl: &mut Download<P>, downloads: usize, now: u64) {
        let chunk_size = dl.layout().chunk_size();
        dl.set_budget(
            self.per_download(chunk_size, downloads, now),
            self.timeout_floor_ms(chunk_size, now, 0),
        );
    }
}

/// How long a download that already follows every peer its node knows of waits between
/// lookups ([`next_lookup_after_ms`]).
pub const LOOKUP_IDLE_MS: u64 = 5_000;

/// [`relookup_after_ms`], unless the download already follows every peer its node knows of
/// (`everyone`: a small cluster, all of it followed): then a lookup can only find a node that
/// joins later, and the next one waits [`LOOKUP_IDLE_MS`]. In the cluster harness (8 hosts)
/// each node looked its four layers up every second to the end, each lookup a query to every
/// other node: a tenth of a node's CPU went to the DHT's connections.
pub fn next_lookup_after_ms(known: usize, limit: usize, fruitless: u32, everyone: bool) -> u64 {
    if everyone {
        return LOOKUP_IDLE_MS.max(relookup_after_ms(known, limit, fruitless));
    }
    relookup_after_ms(known, limit, fruitless)
}

/// How long a wanted chunk may have no usable holder among the peers a download follows, with
/// no progress of the swarm, before a newly found provider may replace one of them
/// ([`Download::replaceable_peer`]).
pub const PEER_SWAP_AFTER_MS: u64 = 1_000;

/// How much of a blob a node imports from the upstream (percent of its bytes) before its other
/// downloads, held meanwhile ([`Download::hold_peer_requests`]), go on. The first copies of the
/// import are what the whole swarm waits for; after that the node's own downloads share its
/// downlink again (simulations/, fourth session, with seeders spread over an image's layers
/// ([`seeder_order`]): the 8-host case (100 Mbit/s, 128 MiB in 4 layers), mean p99 of seeds
/// 1–10: half 13.88 s, three quarters 13.07 s, whole 15.65 s (a node left with too many
/// requests in flight at once: 24 s on seed 8); cold-start at 1,000 nodes: half 10.58 s,
/// three quarters 10.49 s, whole 10.19 s; Kraken's test p99 / p99.9: half 11.90 / 12.05 s,
/// three quarters 11.85 / 12.10 s, whole 11.84 / 12.08 s).
pub const IMPORT_HOLD_PERCENT: u64 = 75;
/// The longest an import holds the node's other downloads, whatever its progress: a slow
/// registry must not keep the node's own pulls waiting (10 s: the half of a Kraken layer
/// imports in 2.5 s, of a cold-start layer in 1 s).
pub const IMPORT_HOLD_MAX_MS: u64 = 10_000;

/// A provider answering a `Watch` ([`crate::wire::Request::Watch`]) sends its next update at
/// least this long after the previous one: the changes in between go out together. Batches
/// help the followers as well as the network (simulations/: cold-start at 1,000 nodes p99
/// 10.37 s with 5 ms batches, 10.24 s with 20 ms, 10.32 s with 50 ms; a third fewer events).
pub const WATCH_BATCH_MS: u64 = 20;

/// The most chunk requests a download has in flight to far peers (other sites, see
/// [`Download::set_peer_far`]) at once: each node of a site fetches a few of the chunks its
/// site lacks across the WAN, the site's nodes together about one copy, and the rest
/// inside the site.
pub const FAR_MAX_IN_FLIGHT: u32 = 1;

/// A download asks a far peer only when its own site has nothing to give it and has been
/// quiet for at least this long: no request in flight to a near peer, no near peer holding a
/// chunk it wants, and no near peer announcing a new chunk for this long plus the download's
/// own share of [`FAR_QUIET_JITTER_MS`]. Before, a node kept a far request in flight whenever a
/// far peer held a chunk that none of the near peers it follows did; with 250 nodes to a site
/// each follows a few per cent of its site, so most chunks that had reached the site looked
/// absent and crossed the WAN again. Measured with `shoal-sim run sites` (1,000 nodes in four
/// sites behind 10 Gbit/s WAN links; seeds 1 / 2 / 3): p99 36.3 / 27.6 / 31.4 s and 108 / 89 /
/// 98 GB over the WANs before; 15.1 / 20.5 / 15.9 s and 30 / 45 / 28 GB with 400 ms and no
/// jitter (for the 1,000 GB pulled); 800 ms 18.3 / 17.9 / 18.7 s and 31–33 GB; 200 ms (seed 1)
/// 25.4 s and 67 GB. Counting every peer's announcements (far ones too) as progress does
/// better in the model (200 ms: 14.9 / 14.3 / 15.1 s, 14 GB) but can hold a site's far requests
/// for as long as the other sites keep announcing: in the cluster harness (two sites of four
/// hosts) a node then went to the upstream for a layer (1.44 copies).
pub const FAR_QUIET_MS: u64 = 400;

/// The most a download adds to [`FAR_QUIET_MS`], drawn once from its seed: the nodes of a site
/// that wait for the same chunks do not all reach across the WAN at the same moment, and the
/// first to do so is seen by the others before their own wait ends (the nodes with the
/// shortest waits become the site's gateways for the blob). `shoal-sim run sites`, seeds 1 / 2
/// / 3, with 400 ms: p99 15.1 / 20.5 / 15.9 s and 30 / 45 / 28 GB over the WANs without it;
/// 17.1 / 16.2 / 15.8 s and 14.0 / 13.1 / 13.0 GB with 1,200 ms; 16.2 / 17.4 / 16.3 s and
/// 8.4 / 8.7 / 8.5 GB (two copies a site) with 2,800 ms. In the cluster harness's small sites
/// (four hosts each, every host following its whole site) a longer wait only delays the far
/// fetches the site needs, so the shorter of the two.
pub const FAR_QUIET_JITTER_MS: u64 = 1_200;

/// The most peers of other sites a download follows (of its [`PROVIDER_LIMIT`]): the other
/// places go to peers of its own site, found by later lookups.
pub const FAR_PEER_LIMIT: usize = 4;

/// What a node is to its site for one blob ([`site_gateway`]), which sets how long its
/// download waits for the site to be quiet before it asks a far peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteRole {
    /// Not judged (no sites, or too little known): [`FAR_QUIET_MS`] and its jitter.
    Unjudged,
    /// One of the site's few gateways for the blob: [`SITE_GATEWAY_QUIET_MS`], no jitter.
    /// `rank`: its place among them (0: the nearest the blob's key), counted or estimated. A
    /// gateway of rank 1 or more whose far chunks arrive much slower than its near ones (a
    /// WAN thinner than a host's own link) waits as a member from then on
    /// ([`THIN_WAN_FACTOR`]).
    Gateway {
        /// Its place among the site's gateways for the blob.
        rank: u32,
    },
    /// Any other node of the site: [`SITE_FALLBACK_MS`] more than an unjudged node.
    Member,
}

/// How long a site's gateway for a blob waits for its site to be quiet before it asks a far
/// peer (see [`SiteRole::Gateway`]): not at all. It still asks a far peer only when no near
/// request is in flight and no near peer holds a chunk it wants. `shoal-sim run sites` (1,000
/// nodes in four sites; seeds 1 / 2 / 3) with [`SITE_GATEWAYS`] 8: p99 14.6 / 14.9 / 14.3 s
/// and 5.7 / 5.7 / 6.3 GB over the WANs with 0 ms; 17.6 / 17.4 / 15.8 s and about 5 GB with
/// 50 ms; 19.8 / 16.8 / 17.1 s with 100 ms; 33.4 / 26.8 / 24.2 s and 4 GB with the unjudged
/// wait (400 ms and up to 1,200 ms of jitter). Every wait leaves a gateway's downlink idle
/// while its site has nothing for it.
pub const SITE_GATEWAY_QUIET_MS: u64 = 0;

/// How many nodes of a site reach across the WAN for a blob without waiting (see
/// [`site_gateway`]): the site's gateways for it. The rest of the site waits
/// [`SITE_FALLBACK_MS`] longer, and by then normally finds the blob's chunks at the gateways
/// or at the nodes they served. `shoal-sim run sites` (seeds 1 / 2 / 3, gateways not waiting
/// for quiet): p99 14.5 / 14.9 / 15.0 s and 4.6–4.8 GB over the WANs with 4; 14.6 / 14.9 /
/// 14.3 s and 5.7–6.3 GB with 8; 13.0 / 14.0 / 13.5 s and 6.7–8.0 GB with 16 (about one
/// copy of the 1 GB image a site is the least possible). Behind a WAN slower than one host's
/// own link fewer do better (all of a site's gateways then ask across for the same first
/// chunks): the daemon's `--site-gateways` (BENCHMARKS.md, sixth session).
pub const SITE_GATEWAYS: usize = 8;

/// A far chunk that arrives at less than the best near peer's rate divided by this marks the
/// WAN thin for a download (see [`SiteRole::Gateway`]): its gateways other than the first then
/// wait as members, so that they stop fetching across, in duplicate, the first chunks the
/// site lacks. The simulator's model of the harness's two sites of four hosts behind 50 Mbit/s
/// WANs (`SHOAL_SIM_TUNE=rate=12500000,upstream_egress=125000000,image_bytes=134217728,
/// layers=4,sites=2,wan=6250000 shoal-sim run sites --nodes 8`, mean p99 of seeds 1–10):
/// 36.9 s without the rule, 28.0 s with 3, 28.1 with 6, 27.9 with 8, 29.1 with 12, 33.6 with
/// 16 (one gateway a site: 25.0); `sites` at 1,000 nodes (10 Gbit/s WANs, seeds 1 / 2 / 3):
/// 14.6 / 14.9 / 14.3 s without, 15.4 / 17.1 / 33.6 s with 3, 14.6 / 15.3 / 14.8 s with 8,
/// 14.7 / 14.8 / 15.2 s with 12.
pub const THIN_WAN_FACTOR: u64 = 8;

/// How much longer than [`FAR_QUIET_MS`] a node that is not one of its site's gateways for a
/// blob ([`site_gateway`]) waits before it asks a far peer: the far fallback of a site whose
/// gateways failed, stalled or were misjudged.
pub const SITE_FALLBACK_MS: u64 = 5_000;

/// Whether this node (`me`) is one of its site's `gateways` nodes nearest `key` (the blob's
/// position in the DHT's key space), which ask far peers for the blob's chunks as soon as the
/// site is quiet ([`SiteRole::Gateway`]), or one of the others, which wait longer
/// ([`SiteRole::Member`]).
///
/// `nearest` is what the node knows: the DHT's nodes nearest `key` (normally its 20 nearest),
/// each with whether it is in this node's site (a node whose site is not known counts as of
/// another site). No node knows its whole site, so the rule judges from these:
/// - when this node is no farther from `key` than the farthest of them, it counts the nodes of
///   its site nearer than itself: a gateway when fewer than `gateways`;
/// - otherwise the `m` nodes of its site among them, within distance `r` of the key, tell the
///   site's density: it is a gateway when `(m + 1) · d / r`, about the number of its site
///   nearer than itself at distance `d`, is below `gateways` (`m + 1`, not `m`: with `m` a
///   site that happens to have few nodes near the key would get several times too many
///   gateways). With none of its site among them (or nobody known) it cannot judge:
///   [`SiteRole::Unjudged`].
///
/// Every node of a site applies the same rule, so about `gateways` of them are a blob's
/// gateways whatever the site's size. Before it, in a site of 1,000 nodes each node saw the
/// progress of the few peers it follows, and a blob's chunks crossed the WAN about 60 times
/// into each site (`shoal-sim run sites --nodes 4000`).
pub fn site_gateway(
    key: &[u8; 32],
    me: &PeerId,
    nearest: impl IntoIterator<Item = (PeerId, bool)>,
    gateways: usize,
) -> SiteRole {
    let gateway = |rank: usize| SiteRole::Gateway {
        rank: u32::try_from(rank).unwrap_or(u32::MAX),
    };
    let mine = xor_distance(key, me);
    let mut others: Vec<([u8; 32], bool)> = Vec::new();
    let mut seen = BTreeSet::new();
    for (peer, same_site) in nearest {
        if peer != *me && seen.insert(peer) {
            others.push((xor_distance(key, &peer), same_site));
        }
    }
    let closer = others.iter().filter(|(d, same)| *same && *d < mine).count();
    if closer >= gateways {
        return SiteRole::Member;
    }
    let m = others.iter().filter(|(_, same)| *same).count();
    let Some(radius) = others.iter().map(|(d, _)| *d).max() else {
        return SiteRole::Unjudged;
    };
    if mine <= radius {
        return if m == 0 {
            SiteRole::Unjudged
        } else {
            gateway(closer)
        };
    }
    if m == 0 {
        return SiteRole::Unjudged;
    }
    // The distances' leading 64 bits carry all the precision the estimate needs.
    let top = |d: &[u8; 32]| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[..8]);
        u64::from_be_bytes(b) as f64 + 1.0
    };
    let nearer = ((m + 1) as f64) * top(&mine) / top(&radius);
    if nearer < gateways as f64 {
        gateway(nearer as usize)
    } else {
        SiteRole::Member
    }
}

/// How often a downloading node asks a partial provider that refused a `Watch`
/// ([`crate::wire::Request::Watch`]: providers push their holdings instead) which chunks it
/// holds now
/// (reported to [`Download::peer_has`], and to [`SeedPlan::provider_progress`] when it grew).
/// 250 ms. A fresh chunk spreads one hop per poll at best, so 100 ms helps a little
/// (simulations/, with the serve scheduler of `serve`: Kraken's test at 1,000 nodes p99
/// 13.43 → 13.02 s, cold-start at 1,000 nodes 11.97 → 11.66 s, the 8-host calibration case
/// 16.25 → 15.49 s), but at 2.5 times the Have requests of every downloading node (at most
/// `PROVIDER_LIMIT` a poll), which made a 100,000-node simulation twice as long (no longer
/// within 10 minutes): not worth ~3%.
pub const HAVE_POLL_MS: u64 = 250;

/// Herd control for a node that wants a blob no peer holds: only the designated seeders (see
/// [`designated_seeders`]) go to the upstream at once; every other node waits for providers and
/// takes over only if none appears, or the ones that appear make no progress, within
/// `takeover_after_ms`. Each appearance or progress report restarts the wait.
#[derive(Debug, Clone)]
pub struct SeedPlan {
    state: SeedState,
    takeover_after_ms: u64,
    providers_seen: bool,
    announced: bool,
}

impl SeedPlan {
    /// A plan started at `now`.
    pub fn new(designated: bool, takeover_after_ms: u64, now: u64) -> SeedPlan {
        let state = if designated {
            SeedState::Upstream {
                reason: SeedReason::Designated,
            }
        } else {
            SeedState::Waiting {
                deadline: now.saturating_add(takeover_after_ms),
            }
        };
        SeedPlan {
            state,
            takeover_after_ms,
            providers_seen: false,
            announced: false,
        }
    }

    /// A provider of the blob appeared (in the DHT, say): restarts the wait.
    pub fn provider_appeared(&mut self, now: u64) {
        self.providers_seen = true;
        self.restart(now);
    }

    /// A provider made progress (announced more chunks, or served some): restarts the wait.
    pub fn provider_progress(&mut self, now: u64) {
        self.providers_seen = true;
        self.restart(now);
    }

    fn restart(&mut self, now: u64) {
        if let SeedState::Waiting { deadline } = &mut self.state {
            *deadline = (*deadline).max(now.saturating_add(self.takeover_after_ms));
        }
    }

    /// The decision at `now`: `Some(reason)` once, when the node should go to the upstream.
    pub fn poll(&mut self, now: u64) -> Option<SeedReason> {
        if let SeedState::Waiting { deadline } = self.state {
            if now >= deadline {
                self.state = SeedState::Upstream {
                    reason: if self.providers_seen {
                        SeedReason::NoProgress
                    } else {
                        SeedReason::NoProvider
                    },
                };
            }
        }
        match self.state {
            SeedState::Upstream { reason } if !self.announced => {
                self.announced = true;
                Some(reason)
            }
            _ => None,
        }
    }

    /// The current state.
    pub fn state(&self) -> SeedState {
        self.state
    }

    /// When to call [`SeedPlan::poll`] next: the takeover deadline while waiting, 0 while a
    /// decision is ready to be polled, `None` once it has been.
    pub fn next_wakeup(&self) -> Option<u64> {
        match self.state {
            SeedState::Waiting { deadline } => Some(deadline),
            SeedState::Upstream { .. } if !self.announced => Some(0),
            SeedState::Upstream { .. } => None,
        }
    }
}

/// Which chunks a peer holds verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Have {
    /// Every chunk (the peer holds the whole blob).
    All,
    /// The chunks whose bit is set; the bitfield has one bit per chunk.
    Bits(Bitfield),
}

/// Why a chunk request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// The chunk failed verification between trusted ends: the sender lied. Bans it.
    Corrupt,
    /// The node's own deadline for the request passed (the download also times requests out by
    /// itself; see [`Download::next_wakeup`]).
    Timeout,
    /// The peer answered `NotFound`, `Denied` or `Error`, or the stream failed.
    Refused,
    /// The chunk disagreed with the midstate table: the chunk or the table is wrong, and which is
    /// not known yet. Blames nobody; asks for the table again.
    Ambiguous,
    /// The peer answered `Busy` (it is at its serving limit). Not held against it: it gets no
    /// new request for `busy_backoff_ms`, doubled for each further `Busy` in a row (at most 16
    /// times), and keeps its rate and its standing. A peer that is merely popular (a seeder
    /// every node asks at once) must not be benched as if it had failed.
    Busy,
}

/// What the driver of a [`Download`] must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<P = PeerId> {
    /// Ask `peer` for chunk `index`.
    Request {
        /// The peer.
        peer: P,
        /// The chunk.
        index: u32,
    },
    /// Abandon the request for chunk `index` to `peer` (reset the stream); a late answer is
    /// harmless but no longer expected.
    Cancel {
        /// The peer.
        peer: P,
        /// The chunk.
        index: u32,
    },
    /// Fetch chunk `index` from the upstream registry; consecutive indices may be merged into one
    /// `Range` request. Report with [`Download::upstream_received`] or
    /// [`Download::upstream_failed`].
    FetchUpstream {
        /// The chunk.
        index: u32,
    },
    /// A chunk disagreed with the midstate table: fetch the table again from a provider other
    /// than `exclude` (and other than the current table's source), compare, and report (see
    /// [`Download::table_refetched`]).
    RefetchTable {
        /// The peer whose chunk disagreed.
        exclude: P,
    },
    /// The peer sent corrupt data: drop it (every request to it is void) and refuse it until
    /// `until`.
    Ban {
        /// The peer.
        peer: P,
        /// The end of the ban, in the caller's milliseconds.
        until: u64,
    },
    /// Every chunk has arrived. Emitted exactly once.
    Done,
}

/// The knobs of a [`Download`]. Times in milliseconds, rates in bytes per second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadConfig {
    /// Seeds the tie-breaking between equally rare chunks and between peers of equal rate.
    /// **Must differ between the nodes downloading a blob** (mix in the node's own id): with one
    /// seed per blob every node prefers the same chunks among equally rare ones, their holdings
    /// overlap and peers have little to give each other (simulations/: cold-start at 1,000
    /// nodes, p99 13.1 s with per-node seeds, 103 s with `SHOAL_SIM_TUNE=shared_seed=1`).
    pub seed: u64,
    /// The fewest requests a usable peer may have in flight.
    pub min_pipeline: u32,
    /// The most requests any peer has in flight.
    pub max_pipeline: u32,
    /// How much transfer time, at a peer's measured rate, its pipeline should cover.
    pub pipeline_target_ms: u64,
    /// The in-order window in chunks: among equally rare chunks, lower windows first (0: no bias,
    /// 1: strictly in order).
    pub in_order_bias: u32,
    /// The rate assumed for a peer before its first delivery.
    pub initial_peer_rate: u64,
    /// The shortest request timeout.
    pub timeout_floor_ms: u64,
    /// A request times out after this many times its expected transfer time (floored).
    pub timeout_factor: u64,
    /// After a failed request, the peer gets no new request for this long, doubled for each
    /// further consecutive failure.
    pub stall_cooldown_ms: u64,
    /// Consecutive failures (timeouts, refusals) after which a peer is benched.
    pub max_strikes: u32,
    /// How long a benched peer is left unused and not counted as a holder; doubled for each
    /// further bench before it delivers again (after a bench, one failure benches it again).
    pub bench_ms: u64,
    /// How long a peer that sent a corrupt chunk is banned.
    pub ban_ms: u64,
    /// After a `Busy` answer, how long the peer gets no new request; doubled for each further
    /// `Busy` in a row (at most 16 times), reset by a delivery.
    pub busy_backoff_ms: u64,
    /// In the endgame, the most peers asked for the same chunk at once (1: no duplicates).
    pub endgame_max_requests: u32,
    /// The most chunk bytes requested from peers at once (each request may hold a whole chunk
    /// in the caller's memory): `max_in_flight_bytes / chunk_size` requests, at least
    /// `min_pipeline`.
    pub max_in_flight_bytes: u64,
    /// True for a designated seeder: go upstream after `upstream_grace_ms`; otherwise only after
    /// `takeover_after_ms`.
    pub upstream_allowed: bool,
    /// How long a chunk may stay wanted with no usable holder before a designated seeder fetches
    /// it upstream; also how long the peers get before their rate is judged.
    pub upstream_grace_ms: u64,
    /// The same for a node that is not a designated seeder (`u64::MAX`: never go upstream).
    pub takeover_after_ms: u64,
    /// The upstream's assumed rate.
    pub upstream_rate: u64,
    /// The peers are too slow when their aggregate rate is below this percentage of
    /// `upstream_rate`: the upstream then takes chunks too.
    pub slow_swarm_percent: u32,
    /// The same for a follower (`upstream_allowed == false`), lower: every follower that
    /// supplements a merely slow swarm from the upstream adds to the upstream's egress, so a
    /// follower does so only when its peers are very slow (shoal-sim, 8 nodes on 100 Mbit/s
    /// links: 4.06 upstream copies with 10%, 1.00 with 1%).
    pub follower_slow_swarm_percent: u32,
    /// The most chunks in flight upstream at once (for chunks no peer holds and because of
    /// slow peers alike).
    pub upstream_max_in_flight: u32,
    /// After an upstream failure, how long to wait before the next upstream fetch.
    pub upstream_retry_ms: u64,
    /// The most requests in flight to far peers at once (see [`Download::set_peer_far`]).
    pub far_max_in_flight: u32,
    /// How long no near peer may have announced a new chunk before a far peer is asked
    /// ([`FAR_QUIET_MS`]).
    pub far_quiet_ms: u64,
    /// The most a download adds to `far_quiet_ms`, drawn once from `seed`
    /// ([`FAR_QUIET_JITTER_MS`]).
    pub far_quiet_jitter_ms: u64,
    /// What this node is to its site for the blob ([`site_gateway`]).
    pub site_role: SiteRole,
    /// A gateway's wait for a quiet site ([`SITE_GATEWAY_QUIET_MS`]).
    pub site_gateway_quiet_ms: u64,
    /// A member's wait beyond an unjudged node's ([`SITE_FALLBACK_MS`]).
    pub site_fallback_ms: u64,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            seed: 0,
            // One request per peer at a time. Fewer requests in flight finish each chunk
            // sooner, so it can be served onward sooner (simulations/: cold-start at 1,000
            // nodes, p99 16.6 s with 2 and 1,000 ms, 13.1 s with 1 and 250 ms and no endgame
            // duplicates). A second request to the same peer shares that peer's uplink and this
            // node's downlink with the first, so it adds no bandwidth and delays both chunks;
            // it only covers the round trip between two chunks, which the other peers' transfers
            // cover in a swarm (Kraken's test, p99 / p99.9: 12.21 / 12.31 s with up to 4 per peer
            // by rate over 250 ms, 11.90 / 12.05 s with 1; at 1,000 nodes, seeds 1-3: 12.11,
            // 12.29, 12.22 → 11.82, 12.02, 11.96 s; cold-start at 1,000 nodes 10.64 → 10.58 s).
            // A single peer over a long round trip is served below its rate: raise this for a
            // node that fetches from one distant peer.
            min_pipeline: 1,
            max_pipeline: 1,
            pipeline_target_ms: 250,
            // 0: pure rarest first. A window of 8 made every node of a swarm prefer the same low
            // chunks, so their holdings overlapped and peers had little to give each other
            // (simulations/: Kraken's test at 200 nodes, p99 42 s with 8, 18 s with 0).
            in_order_bias: 0,
            initial_peer_rate: 8 << 20,
            timeout_floor_ms: 5_000,
            timeout_factor: 4,
            stall_cooldown_ms: 1_000,
            max_strikes: 3,
            bench_ms: 30_000,
            ban_ms: 600_000,
            busy_backoff_ms: 250,
            endgame_max_requests: 1,
            max_in_flight_bytes: 128 << 20,
            upstream_allowed: true,
            upstream_grace_ms: 2_000,
            takeover_after_ms: DEFAULT_TAKEOVER_AFTER_MS,
            upstream_rate: 50 << 20,
            slow_swarm_percent: 10,
            follower_slow_swarm_percent: 1,
            upstream_max_in_flight: 16,
            upstream_retry_ms: 1_000,
            far_max_in_flight: FAR_MAX_IN_FLIGHT,
            far_quiet_ms: FAR_QUIET_MS,
            far_quiet_jitter_ms: FAR_QUIET_JITTER_MS,
            site_role: SiteRole::Unjudged,
            site_gateway_quiet_ms: SITE_GATEWAY_QUIET_MS,
            site_fallback_ms: SITE_FALLBACK_MS,
        }
    }
}

/// splitmix64: a tiny seeded generator (deterministic, no thread RNG).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A per-peer tie-breaker that depends only on the seed and the id, not on arrival order.
fn peer_tiebreak(seed: u64, peer: &impl PeerKey) -> u64 {
    let mut state = peer.id_hash() ^ seed;
    splitmix64(&mut state)
}

/// Where a chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Missing and not requested.
    Wanted,
    /// Requested from one or more peers.
    Peers,
    /// Being fetched upstream.
    Upstream,
    /// Arrived.
    Done,
}

#[derive(Debug, Clone)]
struct Chunk<P> {
    slot: Slot,
    /// Usable partial holders (peers holding everything are counted in `complete_holders`).
    avail: u32,
    tiebreak: u64,
    /// Peers with a request in flight for this chunk.
    requesters: Vec<P>,
    /// While wanted with no usable holder: since when (the entry in `unavailable`).
    unavailable_since: Option<u64>,
}

/// How many of the best wanted chunks are probed for a partial peer before its own holdings are
/// searched instead.
const PROBES: usize = 64;

/// A ready peer's rank: fastest first, then by a seeded tie-breaker.
type ReadyKey<P> = (Reverse<u64>, u64, P);

#[derive(Debug, Clone)]
struct Peer<P> {
    have: Have,
    /// True while the peer's holdings count as availability (present and not excluded).
    counted: bool,
    in_flight: u32,
    /// EWMA of measured throughput in bytes per second; 0 until the first sample.
    rate: u64,
    last_delivery: u64,
    strikes: u32,
    /// `Busy` answers since the last delivery.
    busy_streak: u32,
    /// Benches since the last delivery.
    benches: u32,
    cooldown_until: u64,
    tiebreak: u64,
    ready_key: Option<ReadyKey<P>>,
    starved: bool,
    /// In another site: asked only for chunks no near peer holds (see
    /// [`Download::set_peer_far`]).
    far: bool,
}

impl<P> Peer<P> {
    fn has(&self, index: u32) -> bool {
        match &self.have {
            Have::All => true,
            Have::Bits(bits) => bits.get(index),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    sent: u64,
    deadline: u64,
    /// Bytes reported received so far ([`Download::chunk_progress`]).
    received: u64,
}

/// One node downloading one blob from peers and, as a fallback, from the upstream. See the module
/// documentation for the policy and how to drive it.
#[derive(Debug, Clone)]
pub struct Download<P: PeerKey = PeerId> {
    layout: ChunkLayout,
    config: DownloadConfig,
    start: u64,
    /// The latest `now` seen.
    now: u64,
    chunks: Vec<Chunk<P>>,
    remaining: u32,
    done_emitted: bool,
    /// New requests held (see [`Download::hold_peer_requests`]).
    held: bool,
    /// When the last hold ended: the swarm is judged (slow or not) only from then on.
    released_at: u64,
    peers: BTreeMap<P, Peer<P>>,
    /// Bans and benches: their end, and whether it is a ban. Kept across `remove_peer`.
    excluded: BTreeMap<P, (u64, bool)>,
    /// Counted peers holding every chunk.
    complete_holders: u32,
    /// Sum of the rates of counted peers.
    aggregate_rate: u64,
    /// Wanted chunks by priority: (partial holders, window, tiebreak, index).
    wanted: BTreeSet<(u32, u32, u64, u32)>,
    wanted_by_index: BTreeSet<u32>,
    /// Wanted chunks with no usable holder: (since, index).
    unavailable: BTreeSet<(u64, u32)>,
    /// Chunks requested from peers: (requesters, index).
    endgame: BTreeSet<(u32, u32)>,
    upstream: BTreeSet<u32>,
    upstream_retry_at: u64,
    /// The last upstream fetch failed (none succeeded since): a slow peer's transfer is not
    /// taken back for an upstream that may be down.
    upstream_faltering: bool,
    requests: BTreeMap<(P, u32), InFlight>,
    deadlines: BTreeSet<(u64, P, u32)>,
    /// Cooldown and exclusion ends.
    peer_timers: BTreeSet<(u64, P)>,
    /// No request deadline or peer timer falls before this (a lower bound, exact after each
    /// [`Download::tick`]): a tick before it has nothing to do. Every input ticks.
    timers_from: u64,
    /// This download's part of its node's [`InFlightBudget`] (see [`Download::set_budget`]):
    /// bytes in flight at most (`u64::MAX`: none set) and a request timeout floor (0: none),
    /// within its own `max_in_flight_bytes` and above its own `timeout_floor_ms`.
    budget_bytes: u64,
    budget_timeout_floor_ms: u64,
    ready: BTreeSet<ReadyKey<P>>,
    starved: BTreeSet<P>,
    /// Requests in flight to far peers.
    far_requests: u32,
    /// Set by [`Download::allow_upstream`] until a peer delivers: the swarm counts as slow.
    starving: bool,
    table_refetch_pending: bool,
    queue: VecDeque<Action<P>>,
    /// The last time a peer joined or announced a chunk it did not hold before: while the swarm
    /// makes progress, chunks nobody holds yet are not taken from the upstream.
    last_progress: u64,
    /// The last time a near peer announced a chunk it did not hold before (see
    /// [`FAR_QUIET_MS`]).
    near_progress: u64,
    /// How long the site must have been quiet before a far peer is asked: `far_quiet_ms` and
    /// this download's share of `far_quiet_jitter_ms`, or less or more by its `site_role`.
    far_quiet: u64,
    /// A member's `far_quiet` (for a gateway that finds the WAN thin).
    member_quiet: u64,
}

impl<P: PeerKey> Download<P> {
    /// A download of a blob of this layout, started at `now`, with every chunk wanted.
    pub fn new(layout: ChunkLayout, config: DownloadConfig, now: u64) -> Download<P> {
        let mut rng = config.seed;
        let count = layout.count();
        // Its own stream, so that the chunks' tiebreaks stay those of the seed.
        let mut jitter_rng = config.seed ^ 0xfa12_9e37_79b9_7f4a;
        let jittered = config
            .far_quiet_ms
            .saturating_add(match config.far_quiet_jitter_ms {
                0 => 0,
                j => splitmix64(&mut jitter_rng) % j,
            });
        let member_quiet = jittered.saturating_add(config.site_fallback_ms);
        let far_quiet = match config.site_role {
            SiteRole::Unjudged => jittered,
            SiteRole::Gateway { .. } => config.site_gateway_quiet_ms,
            SiteRole::Member => member_quiet,
        };
        let mut download = Download {
            layout,
            start: now,
            now,
            chunks: Vec::with_capacity(count as usize),
            remaining: count,
            done_emitted: false,
            held: false,
            released_at: 0,
            peers: BTreeMap::new(),
            excluded: BTreeMap::new(),
            complete_holders: 0,
            aggregate_rate: 0,
            wanted: BTreeSet::new(),
            wanted_by_index: BTreeSet::new(),
            unavailable: BTreeSet::new(),
            endgame: BTreeSet::new(),
            upstream: BTreeSet::new(),
            upstream_retry_at: 0,
            upstream_faltering: false,
            requests: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            peer_timers: BTreeSet::new(),
            timers_from: u64::MAX,
            budget_bytes: u64::MAX,
            budget_timeout_floor_ms: 0,
            ready: BTreeSet::new(),
            starved: BTreeSet::new(),
            far_requests: 0,
            starving: false,
            table_refetch_pending: false,
            last_progress: now,
            near_progress: now,
            far_quiet,
            member_quiet,
            queue: VecDeque::new(),
            config,
        };
        for _ in 0..count {
            download.chunks.push(Chunk {
                // Moved to `Wanted` below, which files it in every index.
                slot: Slot::Upstream,
                avail: 0,
                tiebreak: splitmix64(&mut rng),
                requesters: Vec::new(),
                unavailable_since: None,
            });
        }
        for index in 0..count {
            download.set_slot(index, Slot::Wanted, now);
        }
        download
    }

    /// The blob's layout.
    pub fn layout(&self) -> ChunkLayout {
        self.layout
    }

    /// This download's part of its node's in-flight budget ([`InFlightBudget::apply`]): at
    /// most `max_in_flight_bytes` in flight (and never more than its own
    /// [`DownloadConfig::max_in_flight_bytes`]), and requests issued from now on time out no
    /// sooner than `timeout_floor_ms` (nor than its own [`DownloadConfig::timeout_floor_ms`]).
    /// Requests already in flight stay; new ones wait until the download is under the cap.
    pub fn set_budget(&mut self, max_in_flight_bytes: u64, timeout_floor_ms: u64) {
        self.budget_bytes = max_in_flight_bytes;
        self.budget_timeout_floor_ms = timeout_floor_ms;
    }

    /// The configuration.
    pub fn config(&self) -> &DownloadConfig {
        &self.config
    }

    /// True once every chunk has arrived.
    pub fn is_complete(&self) -> bool {
        self.remaining == 0
    }

    /// How many chunks have not arrived.
    pub fn remaining(&self) -> u32 {
        self.remaining
    }

    /// True once chunk `index` has arrived.
    pub fn has_chunk(&self, index: u32) -> bool {
        self.chunk(index).is_some_and(|c| c.slot == Slot::Done)
    }

    /// The number of requests in flight to `peer`.
    pub fn in_flight(&self, peer: &P) -> u32 {
        self.peers.get(peer).map_or(0, |p| p.in_flight)
    }

    /// The chunks being fetched upstream.
    pub fn upstream_in_flight(&self) -> usize {
        self.upstream.len()
    }

    /// A peer's measured rate in bytes per second, once it has delivered something.
    pub fn peer_rate(&self, peer: &P) -> Option<u64> {
        self.peers
            .get(peer)
            .and_then(|p| (p.rate > 0).then_some(p.rate))
    }

    /// The most requests `peer` may have in flight now.
    pub fn peer_capacity(&self, peer: &P) -> u32 {
        self.peers.get(peer).map_or(0, |p| self.capacity(p))
    }

    /// True while `peer` is banned or benched.
    pub fn is_excluded(&self, peer: &P) -> bool {
        self.excluded.contains_key(peer)
    }

    /// True while `peer` is banned (for corrupt data, or by [`Download::ban_peer`]).
    pub fn is_banned(&self, peer: &P) -> bool {
        self.excluded.get(peer).is_some_and(|&(_, ban)| ban)
    }

    fn chunk(&self, index: u32) -> Option<&Chunk<P>> {
        self.chunks.get(index as usize)
    }

    fn window(&self, index: u32) -> u32 {
        match self.config.in_order_bias {
            0 => 0,
            w => index / w,
        }
    }

    fn wanted_key(&self, index: u32) -> (u32, u32, u64, u32) {
        let c = &self.chunks[index as usize];
        (c.avail, self.window(index), c.tiebreak, index)
    }

    fn usable_holders(&self, index: u32) -> u32 {
        self.chunks[index as usize].avail + self.complete_holders
    }

    /// From when the peers' speed is judged: the start for a designated seeder; for a follower,
    /// also the last progress (a follower does not judge a swarm that is still growing).
    fn judged_from(&self) -> u64 {
        let from = self.start.max(self.released_at);
        if self.config.upstream_allowed {
            from
        } else {
            from.max(self.last_progress)
        }
    }

    fn upstream_delay(&self) -> u64 {
        if self.config.upstream_allowed {
            self.config.upstream_grace_ms
        } else {
            self.config.takeover_after_ms
        }
    }

    // ----- chunk bookkeeping -----

    /// Moves chunk `index` to `slot`, keeping every index consistent.
    fn set_slot(&mut self, index: u32, slot: Slot, now: u64) {
        let old = self.chunks[index as usize].slot;
        if old == slot {
            return;
        }
        match old {
            Slot::Wanted => {
                let key = self.wanted_key(index);
                self.wanted.remove(&key);
                self.wanted_by_index.remove(&index);
            }
            Slot::Peers => {
                let n = self.chunks[index as usize].requesters.len() as u32;
                self.endgame.remove(&(n, index));
            }
            Slot::Upstream => {
                self.upstream.remove(&index);
            }
            Slot::Done => {
                self.remaining += 1;
            }
        }
        self.chunks[index as usize].slot = slot;
        match slot {
            Slot::Wanted => {
                let key = self.wanted_key(index);
                self.wanted.insert(key);
                self.wanted_by_index.insert(index);
                // Starved peers may hold it.
                self.unstarve_all(now);
            }
            Slot::Peers => {
                let n = self.chunks[index as usize].requesters.len() as u32;
                self.endgame.insert((n, index));
                if self.wanted.is_empty() {
                    // The endgame begins: idle peers may duplicate requests.
                    self.unstarve_all(now);
                }
            }
            Slot::Upstream => {
                self.upstream.insert(index);
            }
            Slot::Done => {
                self.remaining -= 1;
            }
        }
        self.update_unavailable(index, now);
    }

    /// Keeps `unavailable` in step with chunk `index`'s slot and holders.
    fn update_unavailable(&mut self, index: u32, now: u64) {
        let should =
            self.chunks[index as usize].slot == Slot::Wanted && self.usable_holders(index) == 0;
        let c = &mut self.chunks[index as usize];
        match (should, c.unavailable_since) {
            (true, None) => {
                c.unavailable_since = Some(now);
                self.unavailable.insert((now, index));
            }
            (false, Some(since)) => {
                c.unavailable_since = None;
                self.unavailable.remove(&(since, index));
            }
            _ => {}
        }
    }

    /// Adds `delta` (±1) to chunk `index`'s partial holders.
    fn change_avail(&mut self, index: u32, up: bool, now: u64) {
        let wanted = self.chunks[index as usize].slot == Slot::Wanted;
        if wanted {
            let key = self.wanted_key(index);
            self.wanted.remove(&key);
        }
        let c = &mut self.chunks[index as usize];
        c.avail = if up {
            c.avail + 1
        } else {
            c.avail.saturating_sub(1)
        };
        if wanted {
            let key = self.wanted_key(index);
            self.wanted.insert(key);
        }
        self.update_unavailable(index, now);
    }

    fn change_complete_holders(&mut self, up: bool, now: u64) {
        let before = self.complete_holders;
        self.complete_holders = if up {
            before + 1
        } else {
            before.saturating_sub(1)
        };
        if (before == 0) != (self.complete_holders == 0) {
            // Availability of every wanted chunk without partial holders flips.
            let wanted: Vec<u32> = self.wanted_by_index.iter().copied().collect();
            for index in wanted {
                self.update_unavailable(index, now);
            }
        }
    }

    // ----- peer bookkeeping -----

    /// Starts or stops counting a peer's holdings and rate.
    fn set_counted(&mut self, peer: P, counted: bool, now: u64) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.counted == counted {
            return;
        }
        p.counted = counted;
        let near_leaves = !counted && !p.far;
        let rate = p.rate;
        if counted {
            self.aggregate_rate = self.aggregate_rate.saturating_add(rate);
        } else {
            self.aggregate_rate = self.aggregate_rate.saturating_sub(rate);
        }
        match &p.have {
            Have::All => self.change_complete_holders(counted, now),
            Have::Bits(bits) => {
                let ones: Vec<u32> = bits.iter_ones().collect();
                for index in ones {
                    self.change_avail(index, counted, now);
                }
            }
        }
        if near_leaves {
            // Far peers may now be the only holders of its chunks.
            self.unstarve_far(now);
        }
    }

    /// Lets starved far peers look again.
    fn unstarve_far(&mut self, now: u64) {
        let far: Vec<P> = self
            .starved
            .iter()
            .copied()
            .filter(|p| self.peers.get(p).is_some_and(|q| q.far))
            .collect();
        for peer in far {
            self.unstarve(peer, now);
        }
    }

    /// True when a usable near peer holds chunk `index`: a far peer is not asked for it.
    fn near_holds(&self, index: u32) -> bool {
        self.peers
            .values()
            .any(|q| !q.far && q.counted && q.has(index))
    }

    fn capacity(&self, p: &Peer<P>) -> u32 {
        let rate = if p.rate == 0 {
            self.config.initial_peer_rate
        } else {
            p.rate
        };
        let per_target = u128::from(rate) * u128::from(self.config.pipeline_target_ms)
            / 1000
            / u128::from(self.layout.chunk_size());
        let depth = u32::try_from(per_target.saturating_add(1)).unwrap_or(u32::MAX);
        let max = self.config.max_pipeline.max(1);
        depth.clamp(self.config.min_pipeline.clamp(1, max), max)
    }

    /// A cooldown, ban or bench of `peer` ends at `at`.
    fn add_peer_timer(&mut self, at: u64, peer: P) {
        self.peer_timers.insert((at, peer));
        self.timers_from = self.timers_from.min(at);
    }

    /// Recomputes whether a peer is in the ready set, and its rank there.
    fn refresh(&mut self, peer: P, now: u64) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        let should = p.counted
            && !p.starved
            && now >= p.cooldown_until
            && p.in_flight < self.capacity(p)
            && self.remaining > 0;
        let rank = if p.rate == 0 {
            self.config.initial_peer_rate
        } else {
            p.rate
        };
        let key = (Reverse(rank), p.tiebreak, peer);
        let old = p.ready_key;
        if old == Some(key) && should {
            return;
        }
        if let Some(old) = old {
            self.ready.remove(&old);
        }
        let new = should.then_some(key);
        if let Some(key) = new {
            self.ready.insert(key);
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.ready_key = new;
        }
    }

    fn starve(&mut self, peer: P, now: u64) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.starved = true;
            self.starved.insert(peer);
        }
        self.refresh(peer, now);
    }

    fn unstarve(&mut self, peer: P, now: u64) {
        if self.starved.remove(&peer) {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.starved = false;
            }
            self.refresh(peer, now);
        }
    }

    fn unstarve_all(&mut self, now: u64) {
        for peer in core::mem::take(&mut self.starved) {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.starved = false;
            }
            self.refresh(peer, now);
        }
    }

    fn set_rate(&mut self, peer: P, rate: u64) {
        if let Some(p) = self.peers.get_mut(&peer) {
            if p.counted {
                self.aggregate_rate = self
                    .aggregate_rate
                    .saturating_sub(p.rate)
                    .saturating_add(rate);
            }
            p.rate = rate;
        }
    }

    /// A failed request (timeout or refusal) counts against the peer: halves its rate, cools it
    /// down, and benches it after `max_strikes` in a row.
    ///
    /// A peer that never delivered has no rate to halve, and keeps none: the failure is no
    /// measurement, and a rate made up from `initial_peer_rate` would count in the swarm's
    /// aggregate rate, so a follower whose only provider stalled from the start judged the
    /// swarm fast enough and waited out every strike (about 18 s) before it went upstream.
    fn strike(&mut self, peer: P, now: u64) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.strikes += 1;
        let strikes = p.strikes;
        let rate = p.rate;
        let halved = (rate / 2).max(u64::from(rate > 0));
        if strikes >= self.config.max_strikes {
            // Each bench since the last delivery lasts twice as long as the one before, so peers
            // that never deliver cannot keep a chunk from the upstream by taking turns.
            let benches = p.benches;
            p.benches += 1;
            let until =
                now.saturating_add(self.config.bench_ms.saturating_mul(1 << benches.min(16)));
            self.set_rate(peer, halved);
            self.exclude(peer, until, false, now);
        } else {
            self.set_rate(peer, halved);
            let shift = (strikes - 1).min(16);
            let until =
                now.saturating_add(self.config.stall_cooldown_ms.saturating_mul(1 << shift));
            if let Some(p) = self.peers.get_mut(&peer) {
                p.cooldown_until = until;
            }
            self.add_peer_timer(until, peer);
        }
        self.refresh(peer, now);
    }

    /// Bans or benches a peer until `until`: cancels its requests (re-wanting their chunks) and
    /// stops counting its holdings.
    fn exclude(&mut self, peer: P, until: u64, ban: bool, now: u64) {
        let entry = self.excluded.entry(peer).or_insert((until, ban));
        *entry = (entry.0.max(until), entry.1 || ban);
        let end = entry.0;
        self.add_peer_timer(end, peer);
        let indices: Vec<u32> = self
            .requests
            .range((peer, 0)..=(peer, u32::MAX))
            .map(|(&(_, i), _)| i)
            .collect();
        for index in indices {
            self.remove_request(peer, index);
            self.queue.push_back(Action::Cancel { peer, index });
            self.release(index, now);
        }
        self.set_counted(peer, false, now);
        self.refresh(peer, now);
    }

    // ----- requests -----

    /// How long `bytes` may take at `rate` bytes a second before their request times out:
    /// `timeout_factor` times that, at least the timeout floor.
    fn timeout_for(&self, bytes: u128, rate: u64) -> u64 {
        let expected_ms = (bytes * 1000).div_ceil(u128::from(rate.max(1)));
        let timeout = expected_ms
            .saturating_mul(u128::from(self.config.timeout_factor))
            .max(u128::from(
                self.config
                    .timeout_floor_ms
                    .max(self.budget_timeout_floor_ms),
            ));
        u64::try_from(timeout).unwrap_or(u64::MAX)
    }

    fn issue(&mut self, peer: P, index: u32, now: u64) {
        let len = self.layout.range(index).map_or(0, |(_, len)| len);
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.in_flight += 1;
        if p.far {
            self.far_requests += 1;
        }
        let queued = u128::from(p.in_flight);
        let rate = if p.rate == 0 {
            self.config.initial_peer_rate
        } else {
            p.rate
        };
        let deadline = now.saturating_add(self.timeout_for(u128::from(len) * queued, rate));
        self.requests.insert(
            (peer, index),
            InFlight {
                sent: now,
                deadline,
                received: 0,
            },
        );
        self.deadlines.insert((deadline, peer, index));
        self.timers_from = self.timers_from.min(deadline);
        let slot = self.chunks[index as usize].slot;
        if slot == Slot::Peers {
            let n = self.chunks[index as usize].requesters.len() as u32;
            self.endgame.remove(&(n, index));
            self.endgame.insert((n + 1, index));
            self.chunks[index as usize].requesters.push(peer);
        } else {
            self.chunks[index as usize].requesters.push(peer);
            self.set_slot(index, Slot::Peers, now);
        }
        self.refresh(peer, now);
    }

    /// Forgets the request for `index` to `peer`, if any; the chunk's slot is left alone.
    fn remove_request(&mut self, peer: P, index: u32) -> Option<InFlight> {
        let req = self.requests.remove(&(peer, index))?;
        self.deadlines.remove(&(req.deadline, peer, index));
        let in_peers = self.chunks[index as usize].slot == Slot::Peers;
        let c = &mut self.chunks[index as usize];
        let n = c.requesters.len() as u32;
        c.requesters.retain(|&r| r != peer);
        if in_peers {
            self.endgame.remove(&(n, index));
            self.endgame.insert((n.saturating_sub(1), index));
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.in_flight = p.in_flight.saturating_sub(1);
            if p.far {
                self.far_requests = self.far_requests.saturating_sub(1);
            }
        }
        Some(req)
    }

    /// A request for `index` went away without the chunk: want it again if nobody else is
    /// fetching it, and let starved peers look again (endgame duplicates may now be possible).
    fn release(&mut self, index: u32, now: u64) {
        if self.chunks[index as usize].slot == Slot::Peers
            && self.chunks[index as usize].requesters.is_empty()
        {
            self.set_slot(index, Slot::Wanted, now);
        } else {
            self.unstarve_all(now);
        }
    }

    /// The answer to a request arrived: a `Cancel` for it still queued (not yet polled) is moot.
    fn forget_cancel(&mut self, peer: P, index: u32) {
        if !self.queue.is_empty() {
            self.queue.retain(|a| *a != Action::Cancel { peer, index });
        }
    }

    /// Cancels every request for chunk `index` except `keep`'s (emitting `Cancel`s).
    fn cancel_requests(&mut self, index: u32, keep: Option<P>, now: u64) {
        let requesters: Vec<P> = self.chunks[index as usize].requesters.clone();
        for peer in requesters {
            if Some(peer) == keep {
                continue;
            }
            self.remove_request(peer, index);
            self.queue.push_back(Action::Cancel { peer, index });
            self.refresh(peer, now);
        }
    }

    /// Chunk `index` arrived (from anywhere): cancel the other requests for it.
    fn complete(&mut self, index: u32, from: Option<P>, now: u64) {
        if self.chunks[index as usize].slot == Slot::Done {
            return;
        }
        self.cancel_requests(index, from, now);
        self.set_slot(index, Slot::Done, now);
        if self.remaining == 0 {
            // Nothing more to ask anyone.
            let ready: Vec<P> = self.ready.iter().map(|k| k.2).collect();
            for peer in ready {
                self.refresh(peer, now);
            }
        }
    }

    // ----- time -----

    /// Processes everything due at `now`: request timeouts (cancelled, re-wanted, counted against
    /// the peer), ends of cooldowns, bans and benches. [`Download::poll_action`] does this too.
    pub fn tick(&mut self, now: u64) {
        self.now = self.now.max(now);
        if now < self.timers_from {
            return;
        }
        while let Some(&(deadline, peer, index)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.remove_request(peer, index);
            self.queue.push_back(Action::Cancel { peer, index });
            self.release(index, now);
            self.strike(peer, now);
        }
        while let Some(&(at, peer)) = self.peer_timers.first() {
            if at > now {
                break;
            }
            self.peer_timers.pop_first();
            if self.excluded.get(&peer).is_some_and(|&(end, _)| end <= now) {
                self.excluded.remove(&peer);
                if let Some(p) = self.peers.get_mut(&peer) {
                    // On probation: the next failure benches it again.
                    p.strikes = self.config.max_strikes.saturating_sub(1);
                    p.cooldown_until = 0;
                }
                self.set_counted(peer, true, now);
                self.unstarve(peer, now);
            }
            self.refresh(peer, now);
        }
        self.timers_from = match (self.deadlines.first(), self.peer_timers.first()) {
            (Some(&(d, _, _)), Some(&(t, _))) => d.min(t),
            (Some(&(d, _, _)), None) => d,
            (None, Some(&(t, _))) => t,
            (None, None) => u64::MAX,
        };
    }

    /// The earliest time at which something is due (a request deadline, the end of a cooldown,
    /// ban or bench, an upstream fallback), if any: call [`Download::poll_action`] then. `None`
    /// once [`Action::Done`] has been emitted.
    pub fn next_wakeup(&self) -> Option<u64> {
        if self.done_emitted {
            return None;
        }
        let mut next: Option<u64> = None;
        let mut consider = |t: u64| next = Some(next.map_or(t, |n: u64| n.min(t)));
        if let Some(&(t, _, _)) = self.deadlines.first() {
            consider(t);
        }
        if let Some(&(t, _)) = self.peer_timers.first() {
            consider(t);
        }
        // A far peer waiting only for the site to be quiet long enough.
        let quiet = self.far_quiet_until();
        if quiet > self.now
            && !self.held
            && self.far_open()
            && self
                .ready
                .first()
                .is_some_and(|&(_, _, p)| self.peers.get(&p).is_some_and(|q| q.far))
            && !self.near_can_give()
        {
            consider(quiet);
        }
        let upstream_room =
            (self.upstream.len() as u64) < u64::from(self.config.upstream_max_in_flight);
        if self.remaining > 0 && upstream_room {
            let delay = self.upstream_delay();
            if let Some(&(since, _)) = self.unavailable.first() {
                consider(
                    self.unavailable_due(since)
                        .saturating_add(delay)
                        .max(self.upstream_retry_at),
                );
            }
            let judge = self
                .judged_from()
                .saturating_add(delay)
                .max(self.upstream_retry_at);
            if judge > self.now && !self.wanted.is_empty() && self.swarm_is_slow() {
                consider(judge);
            }
        }
        next.filter(|&t| t != u64::MAX)
    }

    // ----- inputs -----

    /// A peer joined with these holdings (or announced them again: the new set replaces the old,
    /// requests in flight stay). A bitfield of the wrong length is refused (returns false).
    pub fn add_peer(&mut self, peer: P, have: Have, now: u64) -> bool {
        self.tick(now);
        let have = match have {
            Have::Bits(bits) if bits.len() != self.layout.count() => return false,
            Have::Bits(bits) if bits.is_full() => Have::All,
            other => other,
        };
        if self.peers.contains_key(&peer) {
            self.set_counted(peer, false, now);
            if let Some(p) = self.peers.get_mut(&peer) {
                p.have = have;
            }
        } else {
            self.last_progress = self.last_progress.max(now);
            self.peers.insert(
                peer,
                Peer {
                    have,
                    counted: false,
                    in_flight: 0,
                    rate: 0,
                    last_delivery: 0,
                    strikes: 0,
                    busy_streak: 0,
                    benches: 0,
                    cooldown_until: 0,
                    tiebreak: peer_tiebreak(self.config.seed, &peer),
                    ready_key: None,
                    starved: false,
                    far: false,
                },
            );
        }
        if !self.excluded.contains_key(&peer) {
            self.set_counted(peer, true, now);
        }
        self.unstarve(peer, now);
        self.refresh(peer, now);
        true
    }

    /// Lets a follower's download (`upstream_allowed == false`) go to the upstream as a
    /// designated seeder's does, from `now` on: for a driver whose download has received
    /// nothing for a long while although the swarm looks alive (peers announce chunks, none
    /// arrives: a congested WAN link, peers that time out in turn). Better one more upstream
    /// copy than a failed pull.
    pub fn allow_upstream(&mut self, now: u64) {
        self.tick(now);
        if self.config.upstream_allowed {
            return;
        }
        self.config.upstream_allowed = true;
        // Judged afresh: the grace runs from now, and the peers count as too slow (their rates
        // are those of their last deliveries, long ago) until one of them delivers again.
        self.released_at = self.released_at.max(now);
        self.starving = true;
    }

    /// Marks a known peer as far (in another site, behind a WAN link) or near again. A far peer
    /// is asked only for chunks that no usable near peer holds, and at most
    /// [`DownloadConfig::far_max_in_flight`] far requests are in flight at once: a site's
    /// nodes then fetch each chunk across the WAN about once between them (each asks for the
    /// chunks that have not reached its site yet, rarest first with its own tie-breaks), and
    /// share it inside the site. Peers are near until marked.
    pub fn set_peer_far(&mut self, peer: P, far: bool, now: u64) {
        self.tick(now);
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.far == far {
            return;
        }
        p.far = far;
        // Its requests in flight now count on the other side.
        let n = p.in_flight;
        if far {
            self.far_requests += n;
        } else {
            self.far_requests = self.far_requests.saturating_sub(n);
        }
        if far && p.counted {
            // One near holder fewer for its chunks.
            self.unstarve_far(now);
        }
        self.unstarve(peer, now);
        self.refresh(peer, now);
    }

    /// A peer announced that it now holds chunk `index` verified.
    pub fn peer_has(&mut self, peer: P, index: u32, now: u64) {
        self.peer_has_many(peer, &[index], now);
    }

    /// A peer announced that it now holds the chunks `indices` verified (a watch update carries
    /// many): the same as [`Download::peer_has`] for each in turn, with one look-up of the peer.
    pub fn peer_has_many(&mut self, peer: P, indices: &[u32], now: u64) {
        self.tick(now);
        let count = self.layout.count();
        let mut gained = false;
        for &index in indices {
            if index >= count {
                continue;
            }
            let Some(p) = self.peers.get_mut(&peer) else {
                return;
            };
            let Have::Bits(bits) = &mut p.have else {
                break;
            };
            if !bits.set(index) {
                continue;
            }
            gained = true;
            self.last_progress = self.last_progress.max(now);
            if !p.far {
                self.near_progress = self.near_progress.max(now);
            }
            let full = bits.is_full();
            let counted = p.counted;
            if counted {
                self.change_avail(index, true, now);
            }
            if full {
                // Now a complete holder: count it as one, on the fast path.
                self.set_counted(peer, false, now);
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.have = Have::All;
                }
                if counted {
                    self.set_counted(peer, true, now);
                }
            }
        }
        if gained {
            self.unstarve(peer, now);
        }
    }

    /// A peer left: its requests are void (no `Cancel` is emitted; the connection is gone) and
    /// their chunks are wanted again. A ban outlives the peer's departure.
    pub fn remove_peer(&mut self, peer: P, now: u64) {
        self.tick(now);
        if !self.peers.contains_key(&peer) {
            return;
        }
        let indices: Vec<u32> = self
            .requests
            .range((peer, 0)..=(peer, u32::MAX))
            .map(|(&(_, i), _)| i)
            .collect();
        for index in indices {
            self.remove_request(peer, index);
            self.release(index, now);
        }
        // The connection is gone: cancels still queued for it are moot.
        self.queue
            .retain(|a| !matches!(*a, Action::Cancel { peer: q, .. } if q == peer));
        self.set_counted(peer, false, now);
        if let Some(p) = self.peers.remove(&peer) {
            if let Some(key) = p.ready_key {
                self.ready.remove(&key);
            }
        }
        self.starved.remove(&peer);
    }

    /// `received` bytes of chunk `index` have arrived from `peer` so far (counted, not yet
    /// verified): a transfer that moves is not timed out. The request's deadline becomes at
    /// least `now` plus the time the rest takes at the rate seen since it was sent (times
    /// `timeout_factor`, at least the timeout floor), and a peer with no measured rate gets
    /// that one. A peer behind a link too thin for a chunk within the floor (an edge site's
    /// WAN) thus still delivers, while one that stops sending times out as before. Not
    /// progress of the swarm (a slow peer must not keep a follower from judging it slow);
    /// ignored for a request not in flight, or without more bytes than its last report.
    pub fn chunk_progress(&mut self, peer: P, index: u32, received: u64, now: u64) {
        let Some(&req) = self.requests.get(&(peer, index)) else {
            return;
        };
        let len = self
            .layout
            .range(index)
            .map_or(0, |(_, len)| u64::from(len));
        if received <= req.received || received >= len {
            return;
        }
        self.now = self.now.max(now);
        let elapsed = now.saturating_sub(req.sent).max(1);
        let seen = u64::try_from(u128::from(received) * 1000 / u128::from(elapsed))
            .unwrap_or(u64::MAX)
            .max(1);
        if self.peers.get(&peer).is_some_and(|p| p.rate == 0) {
            self.set_rate(peer, seen);
        }
        let deadline = now.saturating_add(self.timeout_for(u128::from(len - received), seen));
        let deadline = deadline.max(req.deadline);
        if deadline > req.deadline {
            self.deadlines.remove(&(req.deadline, peer, index));
            self.deadlines.insert((deadline, peer, index));
        }
        if let Some(r) = self.requests.get_mut(&(peer, index)) {
            r.deadline = deadline;
            r.received = received;
        }
    }

    /// Chunk `index` arrived from `peer` with `bytes_len` bytes and verified. Completes the chunk
    /// even if the request had timed out or been cancelled; updates the peer's rate.
    pub fn chunk_received(&mut self, peer: P, index: u32, bytes_len: u64, now: u64) {
        if index >= self.layout.count() {
            self.tick(now);
            return;
        }
        // Settle this request before timing others out: an answer at its deadline is in time.
        let req = self.remove_request(peer, index);
        self.starving = false;
        self.forget_cancel(peer, index);
        self.tick(now);
        if let Some(p) = self.peers.get_mut(&peer) {
            p.strikes = 0;
            p.busy_streak = 0;
            p.benches = 0;
            if let Some(req) = req {
                let start = req.sent.max(p.last_delivery);
                let elapsed = now.saturating_sub(start).max(1);
                let sample = u64::try_from(u128::from(bytes_len) * 1000 / u128::from(elapsed))
                    .unwrap_or(u64::MAX)
                    .max(1);
                let rate = if p.rate == 0 {
                    sample
                } else {
                    p.rate - p.rate / 4 + sample / 4
                };
                p.last_delivery = now;
                let far = p.far;
                self.set_rate(peer, rate);
                if far {
                    self.judge_wan(sample);
                }
            }
        }
        self.complete(index, Some(peer), now);
        self.refresh(peer, now);
    }

    /// A request for chunk `index` to `peer` failed (see [`FailReason`]).
    pub fn chunk_failed(&mut self, peer: P, index: u32, reason: FailReason, now: u64) {
        if index >= self.layout.count() {
            self.tick(now);
            return;
        }
        let had = self.remove_request(peer, index).is_some();
        self.forget_cancel(peer, index);
        self.tick(now);
        match reason {
            FailReason::Corrupt => {
                self.release(index, now);
                self.ban(peer, now);
            }
            FailReason::Timeout | FailReason::Refused => {
                self.release(index, now);
                if had {
                    self.strike(peer, now);
                }
            }
            FailReason::Busy => {
                self.release(index, now);
                // A busy peer is serving others: the swarm is moving, not stalled. Without this,
                // at 100,000 nodes every follower whose few useful peers were all busy for the
                // takeover time judged the swarm slow and went upstream (30 image copies).
                self.last_progress = self.last_progress.max(now);
                if had {
                    if let Some(p) = self.peers.get_mut(&peer) {
                        let shift = p.busy_streak.min(4);
                        p.busy_streak += 1;
                        let until = now
                            .saturating_add(self.config.busy_backoff_ms.saturating_mul(1 << shift));
                        if until > p.cooldown_until {
                            p.cooldown_until = until;
                            self.add_peer_timer(until, peer);
                        }
                    }
                }
            }
            FailReason::Ambiguous => {
                self.release(index, now);
                if !self.table_refetch_pending {
                    self.table_refetch_pending = true;
                    self.queue.push_back(Action::RefetchTable { exclude: peer });
                }
            }
        }
        self.refresh(peer, now);
    }

    fn ban(&mut self, peer: P, now: u64) {
        let until = now.saturating_add(self.config.ban_ms);
        if self
            .excluded
            .get(&peer)
            .is_some_and(|&(end, ban)| ban && end >= until)
        {
            return;
        }
        self.exclude(peer, until, true, now);
        self.queue.push_back(Action::Ban { peer, until });
    }

    /// The node proved `peer` dishonest by other means (its table lied, say): ban it as for a
    /// corrupt chunk.
    pub fn ban_peer(&mut self, peer: P, now: u64) {
        self.tick(now);
        self.ban(peer, now);
    }

    /// A chunk counted as arrived turned out not to be trustworthy (it was only consistent with a
    /// table since discredited): want it again. Ignored once [`Action::Done`] has been emitted
    /// (by then every chunk is proven genuine).
    pub fn chunk_invalidated(&mut self, index: u32, now: u64) {
        self.tick(now);
        if self.done_emitted || !self.has_chunk(index) {
            return;
        }
        let was_complete = self.remaining == 0;
        self.set_slot(index, Slot::Wanted, now);
        if was_complete {
            // Peers left the ready set when nothing remained.
            let peers: Vec<P> = self.peers.keys().copied().collect();
            for peer in peers {
                self.refresh(peer, now);
            }
        }
    }

    /// The table re-fetch asked for by [`Action::RefetchTable`] is settled: a later ambiguous
    /// chunk asks for another.
    pub fn table_refetched(&mut self, now: u64) {
        self.tick(now);
        self.table_refetch_pending = false;
    }

    /// Chunk `index` arrived from the upstream, verified.
    pub fn upstream_received(&mut self, index: u32, now: u64) {
        self.tick(now);
        if index >= self.layout.count() {
            return;
        }
        self.upstream_faltering = false;
        self.complete(index, None, now);
    }

    /// Fetching chunk `index` from the upstream failed: want it again, and wait
    /// `upstream_retry_ms` before the next upstream fetch.
    pub fn upstream_failed(&mut self, index: u32, now: u64) {
        self.tick(now);
        if self.chunk(index).is_some_and(|c| c.slot == Slot::Upstream) {
            self.upstream_faltering = true;
            self.upstream_retry_at = now.saturating_add(self.config.upstream_retry_ms);
            self.set_slot(index, Slot::Wanted, now);
        }
    }

    // ----- decisions -----

    /// The next thing to do at `now`, or `None` when there is nothing to do until the next input
    /// or [`Download::next_wakeup`].
    pub fn poll_action(&mut self, now: u64) -> Option<Action<P>> {
        self.tick(now);
        if let Some(action) = self.queue.pop_front() {
            return Some(action);
        }
        if self.done_emitted {
            return None;
        }
        if self.remaining == 0 {
            self.done_emitted = true;
            return Some(Action::Done);
        }
        if let Some(action) = self.assign_peer(now) {
            return Some(action);
        }
        self.assign_upstream(now)
    }

    /// Holds new requests, to peers and to the upstream alike (requests in flight go on,
    /// timeouts and everything else as usual) until called again with `false`. A node that
    /// imports another blob from the upstream holds its other downloads for the first part of
    /// the import ([`IMPORT_HOLD_PERCENT`]): its downlink then carries the import at full
    /// speed, and the whole swarm, waiting for that blob's first copies, gets them sooner.
    ///
    /// A held download measures no peer rates, so the swarm is judged (too slow: go upstream)
    /// only from the release on, after the usual grace.
    pub fn hold_peer_requests(&mut self, hold: bool, now: u64) {
        if self.held && !hold {
            self.released_at = self.released_at.max(now);
        }
        self.held = hold;
    }

    /// A peer to let go for a newly found provider when the download already follows as many
    /// as it may (`PROVIDER_LIMIT`): once a wanted chunk has had no usable holder among them
    /// for [`PEER_SWAP_AFTER_MS`] without the swarm making progress, the peers followed cannot
    /// finish the blob and are not getting there. Returns the peer with no request in flight
    /// that delivered least recently; `None`: keep them all. Without this a follower kept the
    /// same peers to the end and, when none of them got the chunks it lacked, fetched those
    /// from the upstream at the takeover time.
    pub fn replaceable_peer(&self, now: u64) -> Option<P> {
        let &(since, _) = self.unavailable.first()?;
        if self
            .unavailable_due(since)
            .saturating_add(PEER_SWAP_AFTER_MS)
            > now
        {
            return None;
        }
        self.peers
            .iter()
            .filter(|(_, p)| p.in_flight == 0)
            .min_by_key(|(id, p)| (p.last_delivery, p.tiebreak, **id))
            .map(|(id, _)| *id)
    }

    /// True when [`Download::poll_action`] at `now` would return `None` with no input since
    /// (nothing queued, no peer with room and something to give, nothing due): a driver that
    /// reported new holdings may skip polling. Upstream fallbacks are not covered: they fall
    /// due at [`Download::next_wakeup`].
    pub fn is_idle(&self, now: u64) -> bool {
        self.queue.is_empty()
            && (self.done_emitted || self.remaining > 0)
            && (self.held
                || self.ready.is_empty()
                || self.requests.len() as u64 >= self.request_cap())
            && self.deadlines.first().is_none_or(|&(t, _, _)| t > now)
            && self.peer_timers.first().is_none_or(|&(t, _)| t > now)
    }

    /// The best chunk to ask `peer` for, if any: for a far peer, the best no near peer holds.
    fn pick_for(&self, peer: &P) -> Option<u32> {
        let p = self.peers.get(peer)?;
        if p.far {
            return self.pick_far(p);
        }
        if !self.wanted.is_empty() {
            let bits = match &p.have {
                Have::All => return self.wanted.first().map(|k| k.3),
                Have::Bits(bits) => bits,
            };
            // Every chunk a counted partial peer holds has a partial holder (itself): skip the
            // chunks nobody partial holds, then probe in priority order.
            let mut candidates = self.wanted.range((1, 0, 0, 0)..).map(|k| k.3);
            for index in candidates.by_ref().take(PROBES) {
                if bits.get(index) {
                    return Some(index);
                }
            }
            // Not among the first few: the peer holds few of the wanted chunks. Take the best of
            // its own when it holds fewer chunks than are wanted, else keep probing.
            return if (bits.count_ones() as usize) < self.wanted.len() {
                bits.iter_ones()
                    .filter(|&i| self.chunks[i as usize].slot == Slot::Wanted)
                    .map(|i| self.wanted_key(i))
                    .min()
                    .map(|k| k.3)
            } else {
                candidates.find(|&i| bits.get(i))
            };
        }
        // Endgame: duplicate the least-duplicated request this peer can serve.
        self.endgame
            .iter()
            .take_while(|&&(n, _)| n < self.config.endgame_max_requests)
            .map(|&(_, i)| i)
            .find(|&i| p.has(i) && !self.chunks[i as usize].requesters.contains(peer))
    }

    /// [`Download::pick_for`] for a far peer: the first wanted chunk in priority order that it
    /// holds and no near peer does; in the endgame, the same among the requests to duplicate.
    fn pick_far(&self, p: &Peer<P>) -> Option<u32> {
        if !self.wanted.is_empty() {
            return self
                .wanted
                .iter()
                .map(|k| k.3)
                .find(|&i| p.has(i) && !self.near_holds(i));
        }
        self.endgame
            .iter()
            .take_while(|&&(n, _)| n < self.config.endgame_max_requests)
            .map(|&(_, i)| i)
            .find(|&i| {
                p.has(i)
                    && !self.near_holds(i)
                    && !self.chunks[i as usize]
                        .requesters
                        .iter()
                        .any(|r| self.peers.get(r).is_some_and(|q| q.far))
            })
    }

    /// The most requests in flight: the memory budget (every request in flight may hold a whole
    /// chunk in the caller) and the node's in-flight budget, at least one pipeline.
    fn request_cap(&self) -> u64 {
        (self.config.max_in_flight_bytes.min(self.budget_bytes)
            / u64::from(self.layout.chunk_size().max(1)))
        .max(u64::from(self.config.min_pipeline.max(1)))
    }

    /// When a chunk unavailable since `since` starts its wait for the upstream: not before the
    /// last progress of the swarm, nor before the end of the last hold.
    fn unavailable_due(&self, since: u64) -> u64 {
        since.max(self.last_progress).max(self.released_at)
    }

    fn assign_peer(&mut self, now: u64) -> Option<Action<P>> {
        if self.held {
            return None;
        }
        if self.requests.len() as u64 >= self.request_cap() {
            return None;
        }
        loop {
            // The best ready near peer; a far one (then the best ready peer left) only when the
            // site has nothing to give.
            let near = self
                .ready
                .iter()
                .map(|&(_, _, p)| p)
                .find(|p| self.peers.get(p).is_some_and(|q| !q.far));
            let peer = match near {
                Some(p) => p,
                None => {
                    let far = self.ready.first().map(|&(_, _, p)| p)?;
                    if !self.far_open() || now < self.far_quiet_until() || self.near_can_give() {
                        return None;
                    }
                    far
                }
            };
            match self.pick_for(&peer) {
                Some(index) => {
                    self.issue(peer, index, now);
                    return Some(Action::Request { peer, index });
                }
                None => self.starve(peer, now),
            }
        }
    }

    /// A far chunk arrived at `rate`: a gateway other than the first whose far chunks come much
    /// slower than its near peers send waits as a member from now on (see
    /// [`THIN_WAN_FACTOR`]).
    fn judge_wan(&mut self, rate: u64) {
        let SiteRole::Gateway { rank } = self.config.site_role else {
            return;
        };
        if rank == 0 {
            return;
        }
        let near = self
            .peers
            .values()
            .filter(|q| !q.far)
            .map(|q| q.rate)
            .max()
            .filter(|&r| r > 0)
            .unwrap_or(self.config.initial_peer_rate);
        if rate.saturating_mul(THIN_WAN_FACTOR) < near {
            self.far_quiet = self.member_quiet;
        }
    }

    /// Far requests have room, and no near request is in flight (see [`FAR_QUIET_MS`]).
    fn far_open(&self) -> bool {
        self.far_requests < self.config.far_max_in_flight
            && self.requests.len() as u64 == u64::from(self.far_requests)
    }

    /// When the site has been quiet long enough for a far request ([`FAR_QUIET_MS`]).
    fn far_quiet_until(&self) -> u64 {
        self.near_progress.saturating_add(self.far_quiet)
    }

    /// Whether a usable near peer holds a chunk this download still wants (then the site can
    /// give it something, and no far peer is asked).
    fn near_can_give(&self) -> bool {
        self.wanted.iter().any(|k| self.near_holds(k.3))
    }

    /// True while the peers' aggregate rate is below `slow_swarm_percent` of the upstream's.
    fn swarm_is_slow(&self) -> bool {
        if self.starving {
            return true;
        }
        let percent = if self.config.upstream_allowed {
            self.config.slow_swarm_percent
        } else {
            self.config.follower_slow_swarm_percent
        };
        u128::from(self.aggregate_rate) * 100
            < u128::from(self.config.upstream_rate) * u128::from(percent)
    }

    fn assign_upstream(&mut self, now: u64) -> Option<Action<P>> {
        if self.held || now < self.upstream_retry_at {
            return None;
        }
        let delay = self.upstream_delay();
        // At most `upstream_max_in_flight` chunks upstream at once, whatever the reason: each
        // holds a chunk in the caller's memory and a request at the registry.
        if (self.upstream.len() as u64) >= u64::from(self.config.upstream_max_in_flight) {
            return None;
        }
        // Chunks no usable peer holds, once they have waited long enough.
        if let Some(&(since, index)) = self.unavailable.first() {
            if self.unavailable_due(since).saturating_add(delay) <= now {
                self.set_slot(index, Slot::Upstream, now);
                return Some(Action::FetchUpstream { index });
            }
        }
        // Peers too slow: the upstream takes the lowest wanted chunks too.
        let judged = self.judged_from().saturating_add(delay) <= now;
        if judged
            && self.swarm_is_slow()
            && (self.upstream.len() as u64) < u64::from(self.config.upstream_max_in_flight)
        {
            if let Some(&index) = self.wanted_by_index.first() {
                self.set_slot(index, Slot::Upstream, now);
                return Some(Action::FetchUpstream { index });
            }
            // Nothing wanted is left, but a chunk may wait on peers that all failed since they
            // last delivered (a stalled provider given a request again after its cooldown), or
            // that send it slower than the upstream would (a transfer kept alive by
            // `chunk_progress`, while the upstream answers): taken from them.
            if let Some(index) = self.chunk_held_by_laggards(now) {
                self.cancel_requests(index, None, now);
                self.set_slot(index, Slot::Upstream, now);
                return Some(Action::FetchUpstream { index });
            }
        }
        None
    }

    /// The lowest chunk in flight whose every requester has failed since its last delivery or,
    /// while the upstream is idle and its last fetch did not fail, reported bytes at a rate that
    /// would finish the chunk later than the upstream would fetch it whole.
    fn chunk_held_by_laggards(&self, now: u64) -> Option<u32> {
        let lagging = |peer: &P, index: u32| {
            if self.peers.get(peer).is_none_or(|p| p.strikes > 0) {
                return true;
            }
            let Some(req) = self.requests.get(&(*peer, index)) else {
                return true;
            };
            // Only for an upstream that is idle and did not fail last: one in doubt may be down
            // (the slow transfer would be lost for nothing), and one that fails is.
            if self.upstream_faltering || !self.upstream.is_empty() || req.received == 0 {
                return false;
            }
            let len = self
                .layout
                .range(index)
                .map_or(0, |(_, len)| u128::from(len));
            let elapsed = u128::from(now.saturating_sub(req.sent).max(1));
            let rest_ms =
                len.saturating_sub(u128::from(req.received)) * elapsed / u128::from(req.received);
            let upstream_ms = len * 1000 / u128::from(self.config.upstream_rate.max(1));
            rest_ms > upstream_ms
        };
        self.endgame
            .iter()
            .map(|&(_, index)| index)
            .filter(|&index| {
                let requesters = &self.chunks[index as usize].requesters;
                !requesters.is_empty() && requesters.iter().all(|q| lagging(q, index))
            })
            .min()
    }
}

#[cfg(test)]
mod tests;
