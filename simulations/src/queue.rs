//! The event queue: a radix heap over event times, first in first out among equal times.
//!
//! Goal: the order of a binary heap of `(time, sequence number)` (so a run's event log is the
//! same) at less cost at 100,000 nodes: the simulator never schedules an event before the one it
//! is processing, so times only grow, and a radix heap moves each entry between at most 65
//! buckets over its life instead of sifting it through a heap of millions on every pop.
//!
//! Equal times pop in push order without a sequence number: every bucket holds its entries in
//! push order (a push appends the newest entry, and emptying a bucket into the lower ones, all
//! empty then, keeps the entries' relative order), and the entries at the current time wait in a
//! first-in-first-out queue.

use std::collections::VecDeque;

/// A min-queue of `(time, value)` for monotone times: every pushed time is at least the last
/// popped one (checked in debug builds); equal times pop first in, first out.
pub struct RadixQueue<T> {
    last: u64,
    len: usize,
    /// The entries at `last`, in push order.
    current: VecDeque<T>,
    /// Bit `b` set: `buckets[b]` is not empty.
    nonempty: u128,
    /// `buckets[b]` (b ≥ 1): the entries whose highest bit differing from `last` is bit `b - 1`.
    buckets: Vec<Vec<(u64, T)>>,
}

impl<T> Default for RadixQueue<T> {
    fn default() -> Self {
        RadixQueue {
            last: 0,
            len: 0,
            current: VecDeque::new(),
            nonempty: 0,
            buckets: (0..=64).map(|_| Vec::new()).collect(),
        }
    }
}

impl<T> RadixQueue<T> {
    /// The bucket of `time`: one more than the position of the highest bit in which it differs
    /// from `last` (0: equal).
    fn bucket(last: u64, time: u64) -> usize {
        (64 - (time ^ last).leading_zeros()) as usize
    }

    /// Entries queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues `value` at `time` (not before the last popped time), after every entry already
    /// queued at that time.
    pub fn push(&mut self, time: u64, value: T) {
        debug_assert!(
            time >= self.last,
            "radix queue: time before the last popped"
        );
        self.len += 1;
        let b = Self::bucket(self.last, time.max(self.last));
        if b == 0 {
            self.current.push_back(value);
        } else {
            self.buckets[b].push((time, value));
            self.nonempty |= 1 << b;
        }
    }

    /// The entry with the least time (the first pushed among equals).
    pub fn pop(&mut self) -> Option<(u64, T)> {
        if self.len == 0 {
            return None;
        }
        if self.current.is_empty() {
            // The first non-empty bucket: its least time becomes `last`, and its entries all move
            // to lower buckets (they share every bit above the bucket's with the new `last`), in
            // order.
            let b = self.nonempty.trailing_zeros() as usize;
            let mut entries = core::mem::take(&mut self.buckets[b]);
            self.nonempty &= !(1 << b);
            let min = entries.iter().map(|e| e.0).min()?;
            self.last = min;
            for (time, value) in entries.drain(..) {
                let nb = Self::bucket(min, time);
                if nb == 0 {
                    self.current.push_back(value);
                } else {
                    self.buckets[nb].push((time, value));
                    self.nonempty |= 1 << nb;
                }
            }
            // Keep the emptied bucket's memory for its next entries.
            self.buckets[b] = entries;
        }
        self.len -= 1;
        self.current.pop_front().map(|v| (self.last, v))
    }
}
