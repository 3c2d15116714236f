//! Destination caps inside a partition: a carrier's cap is shared by every key sent to it.
//!
//! A capped destination has one GCRA bucket for the whole process (an `Arc`'d governor limiter:
//! an atomic, so partitions share it without a lock; [`crate::caps`] builds it and splits a cap
//! between processes). A job to a capped destination needs two tokens: its key's and its
//! destination's.
//!
//! The key's token is taken first. If the destination has none left, the key joins the
//! destination's queue in this partition holding its token, and the destination's timer serves
//! queued keys one job at a time, in arrival order: a key with a million jobs gets one turn
//! per round like every other waiting key, so it cannot take the whole cap. A served key then
//! takes its next key token as usual, and queues again at the back.
//!
//! The destination's bucket is shared by the process's partitions. A partition that finds it
//! empty claims the next token at once ([`Bucket::claim`]) and sets its timer for it, so
//! partitions get the destination's tokens in the order they asked for them. Taking the token
//! only when the timer fires would give it to whichever partition's task happened to run first,
//! and with the timers of every partition due at the same moment that is the same partition
//! every time: under load, 332 of a hot key's jobs left before the 20 of cold keys in other
//! partitions (`tests/limits.rs`). A claim not spent within [`MAX_LAG`] of its time (the
//! task ran late) is dropped and a fresh token taken, so that a late release is never bunched
//! with the on-time ones of other partitions; the token is lost, which only slows the
//! destination.
//!
//! A key token held while queued is spent later than governor granted it. Spending it late
//! could bunch this release with the key's next ones, so when it is spent the key's bucket is
//! emptied: its own bound `burst + floor(t / T)` then holds from that release on.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;

use governor::nanos::Nanos;
use hashbrown::HashMap;

use super::{release, schedule, Key, Routed, Scheduler};
use crate::limiter::{decision_time, Bucket, MAX_LAG};

/// A capped destination, as one partition sees it.
#[derive(Debug)]
pub(super) struct Dest {
    name: Key,
    bucket: Arc<Bucket>,
    /// Keys holding their own token, waiting for one of the destination's, first come first served.
    waiting: VecDeque<Key>,
    /// Timer due time in nanos (0: none).
    wake_at: u64,
    /// Jobs released to the destination by this partition, for lending shares between
    /// processes ([`crate::caps`]).
    released: u64,
    /// Due time in nanos of the token this partition claimed (0: none).
    claimed: u64,
}

/// The process-wide buckets of the capped destinations.
pub type Caps = HashMap<Key, Arc<Bucket>>;

impl Dest {
    /// Whether key `k`, holding its own token, may leave now. If not, it is queued and the
    /// destination's timer set. Keys already queued go first.
    pub(super) fn admit(&mut self, k: &Key, timers: &mut BinaryHeap<Reverse<(u64, Key)>>) -> bool {
        if self.waiting.is_empty() && self.take(timers) {
            self.released += 1;
            return true;
        }
        self.waiting.push_back(k.clone());
        false
    }

    /// Takes a token for the key at the front: the one claimed once it is due, or a free one.
    /// Without one, claims the next and sets the timer for it.
    fn take(&mut self, timers: &mut BinaryHeap<Reverse<(u64, Key)>>) -> bool {
        if self.claimed != 0 {
            let now = decision_time().as_u64();
            if now < self.claimed {
                schedule(timers, &mut self.wake_at, &self.name, self.claimed);
                return false;
            }
            let late = now - self.claimed > MAX_LAG.as_nanos() as u64;
            self.claimed = 0;
            if !late {
                return true;
            }
        }
        let mut at = match self.bucket.try_take() {
            Ok(()) => return true,
            Err(at) => at,
        };
        // Another partition may claim the same token first: then the one after it.
        for _ in 0..4 {
            match self.bucket.claim(at) {
                Ok(()) => {
                    self.claimed = at.as_u64().max(1);
                    break;
                }
                Err(next) => at = next,
            }
        }
        schedule(timers, &mut self.wake_at, &self.name, at.as_u64());
        false
    }
}

impl<J: Routed> Scheduler<J> {
    /// Swaps in the process's destination buckets: new caps apply to the next release, and the
    /// keys queued for a cap that is gone leave at once (they hold their own tokens).
    pub fn set_caps(&mut self, caps: &Caps, now: Nanos) {
        let gone: Vec<Key> = self
            .caps
            .keys()
            .filter(|d| !caps.contains_key(*d))
            .cloned()
            .collect();
        for d in gone {
            let ds = self.caps.remove(&d).expect("listed");
            for k in ds.waiting {
                self.serve(&k, now);
            }
        }
        for (d, bucket) in caps {
            match self.caps.get_mut(d) {
                Some(ds) if Arc::ptr_eq(&ds.bucket, bucket) => {}
                Some(ds) => {
                    ds.bucket = bucket.clone();
                    // A token claimed from the old bucket is not the new one's to give.
                    ds.claimed = 0;
                    if !ds.waiting.is_empty() {
                        ds.wake_at = 0;
                        schedule(&mut self.dest_timers, &mut ds.wake_at, d, now.as_u64());
                    }
                }
                None => {
                    self.caps.insert(
                        d.clone(),
                        Dest {
                            name: d.clone(),
                            bucket: bucket.clone(),
                            waiting: VecDeque::new(),
                            wake_at: 0,
                            released: 0,
                            claimed: 0,
                        },
                    );
                }
            }
        }
    }

    /// Serves the destinations whose timers are due.
    pub(super) fn fire_dests(&mut self, now: Nanos) {
        while let Some(Reverse((t, _))) = self.dest_timers.peek() {
            if *t > now.as_u64() {
                break;
            }
            let Reverse((t, d)) = self.dest_timers.pop().expect("peeked");
            match self.caps.get_mut(&d) {
                Some(ds) if ds.wake_at == t => ds.wake_at = 0,
                _ => continue,
            }
            // As of the due time, like key timers (see `Scheduler::fire`).
            crate::limiter::decide_at(Nanos::new(t), || self.serve_dest(&d, now));
        }
    }

    /// Lets queued keys leave, one job each, while the destination has tokens.
    fn serve_dest(&mut self, d: &Key, now: Nanos) {
        loop {
            let Some(ds) = self.caps.get_mut(d) else {
                return;
            };
            let Some(k) = ds.waiting.front().cloned() else {
                // Nobody left to spend a claimed token: let it go rather than spend it late.
                ds.claimed = 0;
                return;
            };
            let still_waiting = self
                .keys
                .get(&k)
                .and_then(|st| st.busy.as_deref())
                .is_some_and(|b| b.waiting);
            if !still_waiting {
                ds.waiting.pop_front();
                continue;
            }
            if !ds.take(&mut self.dest_timers) {
                return;
            }
            ds.waiting.pop_front();
            ds.released += 1;
            self.serve(&k, now);
        }
    }

    /// Releases the front job of a key that was waiting for its destination.
    fn serve(&mut self, k: &Key, now: Nanos) {
        let Some(st) = self.keys.get_mut(k) else {
            return;
        };
        let Some(b) = st.busy.as_deref_mut() else {
            return;
        };
        if !b.waiting {
            return;
        }
        b.waiting = false;
        if let Some(job) = b.queue.pop_front() {
            // Free: it passed the in-flight check before it queued, and released nothing since.
            self.in_flight.add(k);
            release(b, job, k, &mut self.held, &mut self.actions);
        }
        // The key's token was granted when it queued and is spent only now: empty its bucket,
        // so the key's own bound holds from this release on.
        st.bucket.drain();
        self.pump(k, now);
    }

    /// Per capped destination: keys queued for it, and jobs released to it so far.
    pub fn dest_usage(&self) -> Vec<(String, u64, u64)> {
        self.caps
            .iter()
            .map(|(d, ds)| (d.to_string(), ds.waiting.len() as u64, ds.released))
            .collect()
    }
}
