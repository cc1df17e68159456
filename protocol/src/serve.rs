//! The sender's side of the swarm: which of the chunk requests reaching a node it uploads now,
//! which wait, and which it turns away.
//!
//! Goal: a sans-IO state machine ([`ServeScheduler`]) that the daemon's peer server and the
//! simulator drive alike, so that a seeder spends its uplink on the chunks the swarm lacks most.
//! Non-goal: sending bytes, measuring the uplink or reading a clock (`now` is the caller's
//! milliseconds, kept monotonic).
//!
//! # The policy
//!
//! * **One chunk is not split many ways.** At most `max_active_per_chunk` uploads of the same
//!   chunk run at once, and (`first_copy_alone`) only one until a first upload of it has
//!   completed; further requests for it wait while requests for other chunks take the free
//!   slots. With the old model (up to 32 uploads sharing the uplink, whatever they were for) a
//!   seeder asked by every follower for the chunk only it holds sent that chunk to all of them
//!   at once, and the first copy landed only after as many chunk times. Below `min_active`
//!   uploads these caps are waived, so the uplink is not left idle for them.
//! * **A bounded number of uploads.** At most `max_active` at a time (sharing the uplink); a
//!   slot is taken only by a request allowed by the rule above.
//! * **A bounded queue.** Further requests wait, up to `max_queued` of them; beyond that the
//!   request is answered `Busy` at once. A request that has waited `max_wait_ms` is answered
//!   `Busy` (see [`ServeScheduler::poll_timeouts`]), so its requester can go elsewhere well
//!   before its own request timeout. Waiting is cheaper than `Busy`, which makes the requester
//!   back off from this node altogether for a while.
//! * **First copies first** (super-seeding). When a slot frees, the waiting request (among those
//!   allowed to start) for the chunk this node has started serving the fewest times goes first;
//!   ties go to the request that waited longest. A seeder that every follower asks at once thus
//!   sends each fresh chunk before it sends any chunk again, and the followers spread the
//!   copies among themselves.
//! * **Bounded memory.** Per-chunk counts are kept for at most `max_blobs` blobs and
//!   `max_counters` chunks in all; the least recently served blob is forgotten first (its
//!   chunks then count as never served). Requests held: at most `max_active + max_queued`.
//!
//! The defaults are measured with `shoal-sim` (see [`ServeConfig::default`]).
//!
//! # Driving a [`ServeScheduler`]
//!
//! `R` identifies a request (a stream id, say), `K` a blob (its digest). For every chunk request
//! that passed the caller's own checks (the blob and chunk exist and may be served), call
//! [`ServeScheduler::offer`]: [`Offer::Admit`] → start sending; [`Offer::Queued`] → hold the
//! request; [`Offer::Busy`] → answer `Busy`. When an upload ends (sent, failed or reset by the
//! requester) call [`ServeScheduler::finished`]; when a queued request's stream is reset, call
//! [`ServeScheduler::cancelled`]. Both return the queued requests admitted in its place: start
//! sending each. Wake up at [`ServeScheduler::next_wakeup`] and answer every request
//! [`ServeScheduler::poll_timeouts`] returns with `Busy`. Unknown requests are ignored, so the
//! caller need not filter races.

use std::collections::{BTreeMap, BTreeSet};

/// The knobs of a [`ServeScheduler`]. Times in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// The most requests uploading at once (at least 1).
    pub max_active: u32,
    /// The most requests waiting for a slot; further ones are answered `Busy` at once.
    pub max_queued: u32,
    /// A request that waited this long is answered `Busy` (it should be well below the
    /// requester's own request timeout, `DownloadConfig::timeout_floor_ms`).
    pub max_wait_ms: u64,
    /// The most uploads of one chunk at once (0: no limit): further requests for it wait even
    /// while slots are free, so that a chunk many ask for at once is not split many ways.
    pub max_active_per_chunk: u32,
    /// Until one upload of a chunk has completed, at most one upload of it at a time (the first
    /// copy goes out at full speed); `max_active_per_chunk` applies after.
    pub first_copy_alone: bool,
    /// While fewer uploads than this run, the two rules above are waived (the uplink is not
    /// left idle for them; the fewest-copies order still holds).
    pub min_active: u32,
    /// Blobs whose per-chunk serve counts are kept.
    pub max_blobs: usize,
    /// Per-chunk serve counts kept in all.
    pub max_counters: usize,
}

impl Default for ServeConfig {
    /// 16 uploads, 32 waiting for at most 500 ms, 2 uploads per chunk once its first copy is
    /// out, the per-chunk rules waived below 4 uploads. Measured with `shoal-sim` (seed 1, with
    /// `HAVE_POLL_MS` = 100) against the old fixed 32 uploads without a queue
    /// (`SHOAL_SIM_TUNE=serve_limit=32`): the 8-host calibration case (100 Mbit/s, 128 MiB in 4
    /// layers) p99 29.7 → 16.4 s, 16 hosts 33.1 s and 8.5 upstream copies → 18.7 s and 1.00;
    /// cold-start at 1,000 nodes 11.74 → 11.35 s; Kraken's test at 1,000 nodes 12.51 → 12.98 s
    /// (the one case the old model wins). Fewer uploads (4) suit 8 nodes but cost 1,000 nodes
    /// (13.6 s: receivers limited by their own downlink leave the sender's uplink idle); one
    /// upload per chunk suits 8–16 nodes and costs Kraken's test; `Busy` instead of waiting for
    /// a chunk at its cap, or a 2 s wait, made every case slower; without `min_active` a sender
    /// asked only for chunks at their cap leaves its uplink idle (Kraken at 1,000: 13.02 s).
    ///
    /// The wait was 1 s until the seventh session: a request waiting at a busy sender holds its
    /// chunk (a download asks one peer for a chunk at a time), so while the first holders of a
    /// fresh chunk appeared all around, the requesters of it sat in the seeders' queues for up
    /// to a second. Measured with `shoal-sim` (`SHOAL_SIM_TUNE=serve_wait_ms=W`, W = 1000 /
    /// 500 / 300): cold-start at 1,000 nodes, seeds 1–3, p99 10.59 / 10.53 / 10.75 → 10.47 /
    /// 10.36 / 10.26 → 10.13 / 10.19 / 10.10 s; 10,000 nodes 10.78 → 10.60 → 10.45 s; churn
    /// 10.95 → 10.66 → 10.63 s; Kraken's test 11.70 → 11.64 → 11.65 s; the 8-host harness
    /// case (mean of seeds 1–10) 12.60 → 12.36 → 12.38 s. 300 ms answers twice as many
    /// requests `Busy` after their wait, whose retries made the 100,000-node simulation 34 %
    /// longer (11 min 42 s, over its 10-minute budget); 500 ms keeps most of the gain.
    fn default() -> Self {
        ServeConfig {
            max_active: 16,
            max_queued: 32,
            max_wait_ms: 500,
            max_active_per_chunk: 2,
            first_copy_alone: true,
            min_active: 4,
            max_blobs: 64,
            max_counters: 1 << 16,
        }
    }
}

/// The answer to [`ServeScheduler::offer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Start sending now.
    Admit,
    /// Hold the request: it is admitted later by [`ServeScheduler::finished`] or
    /// [`ServeScheduler::cancelled`], or answered `Busy` by [`ServeScheduler::poll_timeouts`].
    Queued,
    /// Answer `Busy` now.
    Busy,
}

#[derive(Debug, Clone)]
struct Waiting<R, K> {
    req: R,
    key: K,
    index: u32,
    deadline: u64,
}

#[derive(Debug, Default, Clone)]
struct Counts {
    /// Chunk index → uploads started (and not cancelled).
    served: BTreeMap<u32, u32>,
    /// The scheduler's serial number of the latest upload of this blob (for eviction).
    used: u64,
}

/// The sender-side serve scheduler; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ServeScheduler<R, K> {
    config: ServeConfig,
    /// Uploading: request → (blob, chunk).
    active: BTreeMap<R, (K, u32)>,
    /// Waiting, by arrival serial (FIFO order).
    queue: BTreeMap<u64, Waiting<R, K>>,
    /// Waiting request → its arrival serial.
    queued: BTreeMap<R, u64>,
    /// (deadline, arrival serial) of every waiting request.
    deadlines: BTreeSet<(u64, u64)>,
    counts: BTreeMap<K, Counts>,
    /// (last use, blob): the eviction order of `counts`.
    lru: BTreeSet<(u64, K)>,
    counters: usize,
    serial: u64,
}

impl<R: Ord + Copy, K: Ord + Clone> ServeScheduler<R, K> {
    /// An idle scheduler. `max_active` below 1 counts as 1.
    pub fn new(mut config: ServeConfig) -> ServeScheduler<R, K> {
        config.max_active = config.max_active.max(1);
        ServeScheduler {
            config,
            active: BTreeMap::new(),
            queue: BTreeMap::new(),
            queued: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            counts: BTreeMap::new(),
            lru: BTreeSet::new(),
            counters: 0,
            serial: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ServeConfig {
        &self.config
    }

    /// Requests uploading now.
    pub fn active(&self) -> usize {
        self.active.len()
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Whether `req` is uploading.
    pub fn is_active(&self, req: &R) -> bool {
        self.active.contains_key(req)
    }

    /// Whether `req` is waiting.
    pub fn is_queued(&self, req: &R) -> bool {
        self.queued.contains_key(req)
    }

    /// Uploads of chunk `index` of `key` started (and not cancelled) as far as this scheduler
    /// remembers.
    pub fn served(&self, key: &K, index: u32) -> u32 {
        self.counts
            .get(key)
            .and_then(|c| c.served.get(&index))
            .copied()
            .unwrap_or(0)
    }

    /// Per-chunk counts held (bounded by `max_counters`).
    pub fn counters(&self) -> usize {
        self.counters
    }

    /// A new request `req` for chunk `index` of blob `key`. A request already known (uploading
    /// or waiting) is answered as it stands (`Admit` or `Queued`) and not counted again.
    pub fn offer(&mut self, req: R, key: K, index: u32, now: u64) -> Offer {
        if self.active.contains_key(&req) {
            return Offer::Admit;
        }
        if self.queued.contains_key(&req) {
            return Offer::Queued;
        }
        if self.active.len() < self.config.max_active as usize && self.startable(&key, index) {
            self.start(req, key, index);
            return Offer::Admit;
        }
        if self.queue.len() >= self.config.max_queued as usize {
            return Offer::Busy;
        }
        self.serial += 1;
        let s = self.serial;
        let deadline = now.saturating_add(self.config.max_wait_ms);
        self.queue.insert(
            s,
            Waiting {
                req,
                key,
                index,
                deadline,
            },
        );
        self.queued.insert(req, s);
        self.deadlines.insert((deadline, s));
        Offer::Queued
    }

    /// The upload of `req` ended (sent, failed or reset): its slot goes to the waiting requests.
    /// Returns the requests admitted now (start sending each). A waiting `req` is treated as
    /// [`ServeScheduler::cancelled`].
    pub fn finished(&mut self, req: R, now: u64) -> Vec<R> {
        let _ = now;
        if self.active.remove(&req).is_none() {
            self.unqueue(&req);
        }
        self.fill()
    }

    /// The requester gave `req` up before it was sent (its stream was reset): forgotten, and
    /// an upload that had started does not count as a copy served. Returns the requests
    /// admitted in its place.
    pub fn cancelled(&mut self, req: R, now: u64) -> Vec<R> {
        let _ = now;
        if let Some((key, index)) = self.active.remove(&req) {
            if let Some(c) = self.counts.get_mut(&key) {
                if let Some(n) = c.served.get_mut(&index) {
                    *n = n.saturating_sub(1);
                }
            }
        } else {
            self.unqueue(&req);
        }
        self.fill()
    }

    /// Removes and returns the waiting requests whose wait reached `max_wait_ms` by `now`,
    /// oldest first: answer each `Busy`.
    pub fn poll_timeouts(&mut self, now: u64) -> Vec<R> {
        let mut out = Vec::new();
        while let Some(&(deadline, s)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(w) = self.queue.remove(&s) {
                self.queued.remove(&w.req);
                out.push(w.req);
            }
        }
        out
    }

    /// When [`ServeScheduler::poll_timeouts`] next has something to do, if ever.
    pub fn next_wakeup(&self) -> Option<u64> {
        self.deadlines.first().map(|&(d, _)| d)
    }

    /// Forgets every request (the node is shutting down): returns the waiting ones, to be
    /// answered `Busy`. The serve counts are kept.
    pub fn drain(&mut self) -> Vec<R> {
        self.active.clear();
        self.deadlines.clear();
        self.queued.clear();
        std::mem::take(&mut self.queue)
            .into_values()
            .map(|w| w.req)
            .collect()
    }

    fn unqueue(&mut self, req: &R) {
        if let Some(s) = self.queued.remove(req) {
            if let Some(w) = self.queue.remove(&s) {
                self.deadlines.remove(&(w.deadline, s));
            }
        }
    }

    /// Admits waiting requests while slots are free: fewest copies served first, then FIFO.
    fn fill(&mut self) -> Vec<R> {
        let mut out = Vec::new();
        while self.active.len() < self.config.max_active as usize {
            let mut best: Option<(u32, u64)> = None;
            for (&s, w) in &self.queue {
                // Only fewer copies than the best so far can win: the count is cheaper to look
                // up than whether the request may start.
                let n = self.served(&w.key, w.index);
                if best.is_some_and(|(bn, _)| n >= bn) || !self.startable_with(&w.key, w.index, n) {
                    continue;
                }
                best = Some((n, s));
                if n == 0 {
                    break;
                }
            }
            let Some((_, s)) = best else {
                break;
            };
            let Some(w) = self.queue.remove(&s) else {
                break;
            };
            self.queued.remove(&w.req);
            self.deadlines.remove(&(w.deadline, s));
            out.push(w.req);
            self.start(w.req, w.key, w.index);
        }
        out
    }

    /// Whether another upload of chunk `index` of `key` may start (`max_active_per_chunk`).
    fn startable(&self, key: &K, index: u32) -> bool {
        self.startable_with(key, index, self.served(key, index))
    }

    /// [`ServeScheduler::startable`], given the chunk's `served` count.
    fn startable_with(&self, key: &K, index: u32, served: u32) -> bool {
        let cap = self.config.max_active_per_chunk;
        if (cap == 0 && !self.config.first_copy_alone)
            || self.active.len() < self.config.min_active as usize
        {
            return true;
        }
        let active = self
            .active
            .values()
            .filter(|(k, i)| *i == index && k == key)
            .count() as u32;
        if self.config.first_copy_alone && active > 0 && served <= active {
            return false;
        }
        cap == 0 || active < cap
    }

    fn start(&mut self, req: R, key: K, index: u32) {
        self.serial += 1;
        let serial = self.serial;
        match self.counts.get_mut(&key) {
            Some(c) => {
                self.lru.remove(&(c.used, key.clone()));
                c.used = serial;
            }
            None => {
                self.counts.insert(
                    key.clone(),
                    Counts {
                        served: BTreeMap::new(),
                        used: serial,
                    },
                );
            }
        }
        self.lru.insert((serial, key.clone()));
        let c = self.counts.get_mut(&key).expect("inserted above");
        match c.served.get_mut(&index) {
            Some(n) => *n = n.saturating_add(1),
            None => {
                c.served.insert(index, 1);
                self.counters += 1;
            }
        }
        self.active.insert(req, (key.clone(), index));
        self.evict(&key);
    }

    /// Forgets the least recently served blobs (never `keep`) beyond the bounds; if `keep` alone
    /// is over `max_counters`, its counts start over.
    fn evict(&mut self, keep: &K) {
        while self.counts.len() > self.config.max_blobs.max(1)
            || self.counters > self.config.max_counters.max(1)
        {
            let victim = self
                .lru
                .iter()
                .find(|(_, k)| k != keep)
                .map(|(u, k)| (*u, k.clone()));
            match victim {
                Some((u, k)) => {
                    self.lru.remove(&(u, k.clone()));
                    if let Some(c) = self.counts.remove(&k) {
                        self.counters -= c.served.len();
                    }
                }
                None => {
                    if let Some(c) = self.counts.get_mut(keep) {
                        self.counters -= c.served.len();
                        c.served.clear();
                    }
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sched(active: u32, queued: u32) -> ServeScheduler<u32, u8> {
        ServeScheduler::new(ServeConfig {
            max_active: active,
            max_queued: queued,
            max_wait_ms: 1_000,
            max_active_per_chunk: 0,
            first_copy_alone: false,
            min_active: 0,
            max_blobs: 4,
            max_counters: 64,
        })
    }

    fn per_chunk(active: u32, queued: u32, cap: u32, alone: bool) -> ServeScheduler<u32, u8> {
        let mut s = sched(active, queued);
        s.config.max_active_per_chunk = cap;
        s.config.first_copy_alone = alone;
        s
    }

    #[test]
    fn below_min_active_the_per_chunk_rules_are_waived() {
        let mut s = per_chunk(4, 8, 1, true);
        s.config.min_active = 2;
        assert_eq!(s.offer(1, 0, 0, 0), Offer::Admit);
        // One upload runs, fewer than 2: a second copy of chunk 0 may start.
        assert_eq!(s.offer(2, 0, 0, 0), Offer::Admit);
        // Two run: the cap holds again.
        assert_eq!(s.offer(3, 0, 0, 0), Offer::Queued);
        assert_eq!(s.offer(4, 0, 1, 0), Offer::Admit);
        assert_eq!(s.finished(4, 1), Vec::<u32>::new());
        assert_eq!(s.finished(1, 2), vec![3]);
    }

    #[test]
    fn one_chunk_is_not_split_many_ways() {
        let mut s = per_chunk(4, 8, 2, true);
        // The first copy of chunk 0 goes out alone; a request for chunk 1 passes the waiting one.
        assert_eq!(s.offer(1, 0, 0, 0), Offer::Admit);
        assert_eq!(s.offer(2, 0, 0, 0), Offer::Queued);
        assert_eq!(s.offer(3, 0, 1, 0), Offer::Admit);
        assert_eq!((s.active(), s.queued()), (2, 1));
        // Once one copy of chunk 0 is out, two may go at once.
        assert_eq!(s.finished(1, 5), vec![2]);
        assert_eq!(s.offer(4, 0, 0, 6), Offer::Admit);
        assert_eq!(s.offer(5, 0, 0, 6), Offer::Queued);
        assert_eq!(s.finished(3, 7), Vec::<u32>::new());
        assert_eq!(s.finished(4, 8), vec![5]);
        // Without `first_copy_alone`, the cap holds from the start.
        let mut s = per_chunk(4, 8, 1, false);
        assert_eq!(s.offer(1, 0, 0, 0), Offer::Admit);
        assert_eq!(s.offer(2, 0, 0, 0), Offer::Queued);
        assert_eq!(s.offer(3, 1, 0, 0), Offer::Admit);
        assert_eq!(s.cancelled(1, 1), vec![2]);
    }

    #[test]
    fn admits_up_to_the_limit_then_queues_then_busy() {
        let mut s = sched(2, 2);
        assert_eq!(s.offer(1, 0, 0, 0), Offer::Admit);
        assert_eq!(s.offer(2, 0, 1, 0), Offer::Admit);
        assert_eq!(s.offer(3, 0, 2, 0), Offer::Queued);
        assert_eq!(s.offer(4, 0, 3, 0), Offer::Queued);
        assert_eq!(s.offer(5, 0, 4, 0), Offer::Busy);
        assert_eq!((s.active(), s.queued()), (2, 2));
        // Repeated offers are idempotent.
        assert_eq!(s.offer(1, 0, 0, 0), Offer::Admit);
        assert_eq!(s.offer(3, 0, 2, 0), Offer::Queued);
        assert_eq!(s.finished(1, 10), vec![3]);
        assert_eq!(s.finished(2, 10), vec![4]);
        assert_eq!(s.finished(3, 10), Vec::<u32>::new());
        assert_eq!((s.active(), s.queued()), (1, 0));
    }

    #[test]
    fn first_copies_first_then_fifo() {
        let mut s = sched(1, 8);
        assert_eq!(s.offer(1, 0, 7, 0), Offer::Admit);
        // Chunk 7 has been served once; 8 and 9 never.
        assert_eq!(s.offer(2, 0, 7, 0), Offer::Queued);
        assert_eq!(s.offer(3, 0, 8, 0), Offer::Queued);
        assert_eq!(s.offer(4, 0, 9, 0), Offer::Queued);
        assert_eq!(s.offer(5, 0, 8, 0), Offer::Queued);
        assert_eq!(s.finished(1, 1), vec![3]);
        assert_eq!(s.finished(3, 2), vec![4]);
        // 7 and 8 both served once now: FIFO picks 2 (chunk 7) before 5.
        assert_eq!(s.finished(4, 3), vec![2]);
        assert_eq!(s.finished(2, 4), vec![5]);
        assert_eq!(s.served(&0, 7), 2);
        assert_eq!(s.served(&0, 8), 2);
        assert_eq!(s.served(&0, 9), 1);
    }

    #[test]
    fn a_cancelled_upload_is_not_a_copy() {
        let mut s = sched(1, 8);
        assert_eq!(s.offer(1, 0, 0, 0), Offer::Admit);
        assert_eq!(s.offer(2, 0, 1, 0), Offer::Queued);
        assert_eq!(s.offer(3, 0, 0, 0), Offer::Queued);
        // Chunk 0's only upload is reset: chunk 0 counts as never served, FIFO picks 2.
        assert_eq!(s.cancelled(1, 1), vec![2]);
        assert_eq!(s.served(&0, 0), 0);
        // A waiting request cancelled frees nothing.
        assert_eq!(s.cancelled(3, 2), Vec::<u32>::new());
        assert_eq!((s.active(), s.queued()), (1, 0));
        assert_eq!(s.next_wakeup(), None);
    }

    #[test]
    fn waiting_too_long_is_busy() {
        let mut s = sched(1, 8);
        assert_eq!(s.offer(1, 0, 0, 0), Offer::Admit);
        assert_eq!(s.offer(2, 0, 1, 100), Offer::Queued);
        assert_eq!(s.offer(3, 0, 2, 500), Offer::Queued);
        assert_eq!(s.next_wakeup(), Some(1_100));
        assert_eq!(s.poll_timeouts(1_099), Vec::<u32>::new());
        assert_eq!(s.poll_timeouts(1_100), vec![2]);
        assert_eq!(s.next_wakeup(), Some(1_500));
        assert_eq!(s.finished(1, 1_200), vec![3]);
        assert_eq!(s.next_wakeup(), None);
        assert_eq!(s.poll_timeouts(5_000), Vec::<u32>::new());
    }

    #[test]
    fn counts_are_bounded_by_blob_and_in_all() {
        let mut s = sched(1_000, 0);
        for blob in 0..10u8 {
            for i in 0..10 {
                let req = u32::from(blob) * 100 + i;
                assert_eq!(s.offer(req, blob, i, 0), Offer::Admit);
                s.finished(req, 0);
            }
        }
        assert!(s.counts.len() <= 4);
        assert!(s.counters() <= 64);
        // The latest blob is remembered.
        assert_eq!(s.served(&9, 9), 1);
        // One blob bigger than every bound starts over rather than grow.
        for i in 0..200 {
            s.offer(10_000 + i, 42, i, 0);
        }
        assert!(s.counters() <= 64);
    }

    #[test]
    fn drain_returns_the_waiting() {
        let mut s = sched(1, 8);
        s.offer(1, 0, 0, 0);
        s.offer(2, 0, 1, 0);
        s.offer(3, 0, 2, 0);
        assert_eq!(s.drain(), vec![2, 3]);
        assert_eq!((s.active(), s.queued(), s.next_wakeup()), (0, 0, None));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Offer(u32, u8, u32),
        Finish(u32),
        Cancel(u32),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..64u32, 0..6u8, 0..40u32).prop_map(|(r, k, i)| Op::Offer(r, k, i)),
            2 => (0..64u32).prop_map(Op::Finish),
            1 => (0..64u32).prop_map(Op::Cancel),
            1 => (0..800u64).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Never more than `max_active` uploading or `max_queued` waiting; every waiting request
        /// is admitted or answered `Busy` within `max_wait_ms`; a free slot never sits beside a
        /// waiting request; the counts stay within their bounds.
        #[test]
        fn invariants(
            active in 1..5u32,
            queued in 0..6u32,
            cap in 0..3u32,
            alone in any::<bool>(),
            min_active in 0..3u32,
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let mut s = per_chunk(active, queued, cap, alone);
            s.config.min_active = min_active;
            let mut now = 0u64;
            // Our model: request → (state, since).
            let mut waiting: BTreeMap<u32, u64> = BTreeMap::new();
            let mut uploading: BTreeSet<u32> = BTreeSet::new();
            let admit = |uploading: &mut BTreeSet<u32>, waiting: &mut BTreeMap<u32, u64>, got: Vec<u32>| {
                for r in got {
                    prop_assert!(waiting.remove(&r).is_some(), "admitted a request not waiting");
                    uploading.insert(r);
                }
                Ok(())
            };
            for op in ops {
                match op {
                    Op::Offer(r, k, i) => match s.offer(r, k, i, now) {
                        Offer::Admit => { prop_assert!(!waiting.contains_key(&r)); uploading.insert(r); }
                        Offer::Queued => { prop_assert!(!uploading.contains(&r)); waiting.entry(r).or_insert(now); }
                        Offer::Busy => prop_assert!(!uploading.contains(&r) && !waiting.contains_key(&r)),
                    },
                    Op::Finish(r) => {
                        uploading.remove(&r);
                        waiting.remove(&r);
                        let got = s.finished(r, now);
                        admit(&mut uploading, &mut waiting, got)?;
                    }
                    Op::Cancel(r) => {
                        uploading.remove(&r);
                        waiting.remove(&r);
                        let got = s.cancelled(r, now);
                        admit(&mut uploading, &mut waiting, got)?;
                    }
                    Op::Advance(dt) => {
                        now += dt;
                        while let Some(w) = s.next_wakeup().filter(|&w| w <= now) {
                            for r in s.poll_timeouts(w) {
                                let since = waiting.remove(&r);
                                prop_assert_eq!(since.map(|t| t + 1_000), Some(w));
                            }
                        }
                    }
                }
                prop_assert!(s.active() <= active as usize);
                prop_assert!(s.queued() <= queued as usize);
                prop_assert_eq!(s.active(), uploading.len());
                prop_assert_eq!(s.queued(), waiting.len());
                // A free slot never sits beside a waiting request it could take.
                prop_assert!(
                    s.active() == active as usize
                        || s.queue.values().all(|w| !s.startable(&w.key, w.index))
                );
                for (k, i) in s.active.values() {
                    let n = s.active.values().filter(|(k2, i2)| k2 == k && i2 == i).count() as u32;
                    prop_assert!(cap == 0 || min_active > 0 || n <= cap);
                }
                for (&r, &since) in &waiting {
                    prop_assert!(s.is_queued(&r));
                    prop_assert!(since + 1_000 > now || s.next_wakeup().is_some_and(|w| w <= now));
                }
                prop_assert!(s.counts.len() <= 4 && s.counters() <= 64);
                prop_assert_eq!(s.counters(), s.counts.values().map(|c| c.served.len()).sum::<usize>());
                prop_assert_eq!(s.deadlines.len(), s.queue.len());
            }
        }
    }
}
