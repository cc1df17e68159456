//! The serve gate: which chunk requests this node uploads now, which wait, and which get `Busy`.
//!
//! Goal: the peer server's side of [`shoal_protocol::serve::ServeScheduler`] (the decisions:
//! a few uploads at once, a bounded queue, first copies first, `Busy` after a bounded wait),
//! driven with the runtime's clock and a oneshot per waiting request. Non-goal: tables and
//! `Have` bitfields (small answers, bounded by the server's serve semaphore).
//!
//! Invariants:
//! - Every request the scheduler admits is either handed an [`Upload`] or, if its requester is
//!   gone, withdrawn at once (its slot goes to the next).
//! - An [`Upload`] releases its slot when dropped: as a copy served if it was marked
//!   [`Upload::sent`], else as withdrawn (a reset stream does not count as a copy).
//! - A waiting request whose future is dropped (its stream reset, the connection closed) is
//!   withdrawn from the queue.
//! - The lock is a std mutex held for the scheduler's bookkeeping only, never across an
//!   `.await`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shoal_protocol::serve::{Offer, ServeConfig, ServeScheduler};
use shoal_protocol::Digest;
use tokio::sync::oneshot;

/// Slack added to the scheduler's wait before a waiting request polls the time-outs itself.
const WAKE_SLACK: Duration = Duration::from_millis(20);

/// The chunk uploads of one endpoint; see the [module docs](self).
pub(crate) struct ServeGate {
    state: Mutex<State>,
    max_wait: Duration,
    epoch: Instant,
}

struct State {
    sched: ServeScheduler<u64, Digest>,
    /// Waiting requests: told `true` when admitted, `false` when answered `Busy`.
    waiters: HashMap<u64, oneshot::Sender<bool>>,
    next: u64,
}

/// A slot to upload one chunk; released when dropped.
pub(crate) struct Upload {
    gate: Arc<ServeGate>,
    id: u64,
    sent: bool,
}

impl Upload {
    /// The whole chunk went out: it counts as a copy served.
    pub(crate) fn sent(&mut self) {
        self.sent = true;
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.gate.release(self.id, !self.sent);
    }
}

/// Withdraws a waiting request if its future is dropped before it is settled.
struct Withdraw<'a> {
    gate: &'a ServeGate,
    id: u64,
    armed: bool,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.gate.release(self.id, true);
        }
    }
}

impl ServeGate {
    pub(crate) fn new(config: ServeConfig) -> ServeGate {
        let max_wait = Duration::from_millis(config.max_wait_ms);
        ServeGate {
            state: Mutex::new(State {
                sched: ServeScheduler::new(config),
                waiters: HashMap::new(),
                next: 0,
            }),
            max_wait,
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update below leaves the scheduler and the waiters consistent between calls,
        // so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests uploading now and waiting.
    #[cfg(test)]
    pub(crate) fn load(&self) -> (usize, usize) {
        let st = self.lock();
        (st.sched.active(), st.sched.queued())
    }

    /// A slot to upload chunk `index` of `digest`, at once or after a wait; `None`: answer
    /// `Busy`.
    pub(crate) async fn admit(self: &Arc<Self>, digest: Digest, index: u32) -> Option<Upload> {
        let upload = |id| Upload {
            gate: self.clone(),
            id,
            sent: false,
        };
        let (id, mut rx) = {
            let mut st = self.lock();
            let id = st.next;
            st.next += 1;
            match st.sched.offer(id, digest, index, self.now()) {
                Offer::Admit => return Some(upload(id)),
                Offer::Busy => return None,
                Offer::Queued => {
                    let (tx, rx) = oneshot::channel();
                    st.waiters.insert(id, tx);
                    (id, rx)
                }
            }
        };
        let mut withdraw = Withdraw {
            gate: self,
            id,
            armed: true,
        };
        let admitted = match tokio::time::timeout(self.max_wait + WAKE_SLACK, &mut rx).await {
            Ok(answer) => answer.unwrap_or(false),
            Err(_) => {
                // Waited the scheduler's longest: answer the expired requests (this one among
                // them, unless it was admitted meanwhile).
                self.expire();
                rx.try_recv().unwrap_or(false)
            }
        };
        if admitted {
            withdraw.armed = false;
            Some(upload(id))
        } else {
            // Busy: already out of the scheduler, or withdrawn now by `withdraw`.
            None
        }
    }

    /// Answers `Busy` to every waiting request whose wait is over.
    fn expire(&self) {
        let mut st = self.lock();
        let now = self.now();
        for id in st.sched.poll_timeouts(now) {
            if let Some(tx) = st.waiters.remove(&id) {
                let _ = tx.send(false);
            }
        }
    }

    /// Ends request `id` (an upload, or a request withdrawn while waiting or just admitted)
    /// and hands the freed slots to the requests the scheduler admits in its place.
    fn release(&self, id: u64, withdrawn: bool) {
        let mut st = self.lock();
        let now = self.now();
        st.waiters.remove(&id);
        let mut admitted = if withdrawn {
            st.sched.cancelled(id, now)
        } else {
            st.sched.finished(id, now)
        };
        while let Some(next) = admitted.pop() {
            let delivered = st
                .waiters
                .remove(&next)
                .is_some_and(|tx| tx.send(true).is_ok());
            if !delivered {
                // Its requester is gone: the slot goes on.
                admitted.extend(st.sched.cancelled(next, now));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request for chunk `index` of `d` waiting on `g` in a task of its own: whether it got
    /// a slot (the slot is given back at once).
    fn waiter(g: &Arc<ServeGate>, d: Digest, index: u32) -> tokio::task::JoinHandle<bool> {
        let g = g.clone();
        tokio::spawn(async move { g.admit(d, index).await.is_some() })
    }

    /// Yields until `g` holds `load` (uploading, waiting).
    async fn until_load(g: &ServeGate, load: (usize, usize)) {
        while g.load() != load {
            tokio::task::yield_now().await;
        }
    }

    fn gate(active: u32, queued: u32, wait_ms: u64) -> Arc<ServeGate> {
        Arc::new(ServeGate::new(ServeConfig {
            max_active: active,
            max_queued: queued,
            max_wait_ms: wait_ms,
            ..ServeConfig::default()
        }))
    }

    #[tokio::test]
    async fn waiting_requests_get_freed_slots_fewest_copies_first() {
        let g = gate(1, 4, 10_000);
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let mut first = g.admit(a, 0).await.expect("a free slot");
        // Chunk a/0 goes out once; then a request for it again and, after it, one for b/0 wait.
        let order = Arc::new(Mutex::new(Vec::new()));
        let ask = |d: Digest, label: &'static str| {
            let (g, order) = (g.clone(), order.clone());
            tokio::spawn(async move {
                let slot = g.admit(d, 0).await;
                order.lock().unwrap().push(label);
                slot.is_some()
            })
        };
        let again = ask(a, "a0");
        until_load(&g, (1, 1)).await;
        let fresh = ask(b, "b0");
        until_load(&g, (1, 2)).await;
        first.sent();
        drop(first);
        assert!(fresh.await.unwrap() && again.await.unwrap());
        // The chunk never served goes first, although it was asked for later.
        assert_eq!(*order.lock().unwrap(), ["b0", "a0"]);
        assert_eq!(g.load(), (0, 0));
    }

    #[tokio::test]
    async fn a_full_queue_or_a_long_wait_answers_busy() {
        let g = gate(1, 1, 50);
        let d = Digest::of(b"x");
        let held = g.admit(d, 0).await.expect("a free slot");
        let waiter = waiter(&g, d, 1);
        until_load(&g, (1, 1)).await;
        // The queue is full: at once.
        assert!(g.admit(d, 2).await.is_none());
        // The waiter gives up after the scheduler's wait.
        assert!(!waiter.await.unwrap());
        assert_eq!(g.load(), (1, 0));
        drop(held);
        assert_eq!(g.load(), (0, 0));
    }

    #[tokio::test]
    async fn a_dropped_waiter_leaves_the_queue_and_an_unsent_upload_frees_its_slot() {
        let g = gate(1, 4, 10_000);
        let d = Digest::of(b"y");
        let held = g.admit(d, 0).await.expect("a free slot");
        let waiter = waiter(&g, d, 1);
        until_load(&g, (1, 1)).await;
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(g.load(), (1, 0));
        // Not marked sent: withdrawn, and the slot is free again.
        drop(held);
        assert_eq!(g.load(), (0, 0));
        assert!(g.admit(d, 0).await.is_some());
    }
}
