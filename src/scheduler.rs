//! The per-partition scheduler: which held jobs may leave now, which must be parked, when to look
//! again, and when a key may be forgotten.
//!
//! Pure logic, no I/O, so it is tested with `tokio::time::pause`: the partition task feeds it
//! events ([`Scheduler::offer`], [`Scheduler::release_done`], [`Scheduler::parked`],
//! [`Scheduler::loaded`], [`Scheduler::fire`]) and carries out the [`Action`]s it queues.
//!
//! # Ordering
//! A key's jobs leave in `WEIR_JOBS` sequence order (`src_seq`). In memory a key's queue is kept
//! sorted by it. Jobs beyond the in-memory horizon are parked; parking preserves order (one task
//! publishes a key's parked jobs in sequence order), so `WEIR_PARK` holds a key's surplus in
//! order, read back from a cursor. The front of the queue may leave only if nothing older can
//! still be in the park: either the key has no unread parked jobs, or a job loaded from the park
//! that is newer than the front is already in memory. After a restart, redelivered jobs (older
//! than anything parked after them, but perhaps newer than some parked before) are merged by
//! this rule without ever being re-parked.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use hashbrown::HashMap;
use std::sync::Arc;
use std::time::Duration;

use compact_str::CompactString;
use governor::nanos::Nanos;

use crate::config::Limit;
use crate::limiter::Bucket;
use crate::limits::Limits;

/// A key's name. Inline up to 24 bytes: no allocation per key, and cloning one into a timer or
/// an action copies 24 bytes.
pub type Key = CompactString;

/// What the scheduler needs to know of a job: where it goes (for destination caps).
pub trait Routed {
    fn dest(&self) -> &str;
}

/// Test and benchmark jobs without a destination.
impl Routed for u64 {
    fn dest(&self) -> &str {
        ""
    }
}

impl Routed for () {
    fn dest(&self) -> &str {
        ""
    }
}

/// What the partition task must do next.
#[derive(Debug)]
pub enum Action<J> {
    /// Publish `job` to `released.<dest>.<key>`; report with [`Scheduler::release_done`].
    Release { key: Key, job: Held<J> },
    /// Read the key's next parked job at or after park sequence `from`; report with
    /// [`Scheduler::loaded`].
    Load { key: Key, from: u64 },
    /// Delete the key's parked jobs below park sequence `below`; report with
    /// [`Scheduler::purged`].
    Purge { key: Key, below: u64 },
}

/// What became of an offered job.
#[derive(Debug)]
pub enum Offer<J> {
    /// Held in memory (and perhaps already released through an action).
    Held,
    /// Beyond the horizon: publish it to the park, then report with [`Scheduler::parked`].
    Park(Key, J),
}

/// A job in memory.
#[derive(Debug)]
pub struct Held<J> {
    /// Sequence in `WEIR_JOBS`: the key's FIFO order.
    pub src_seq: u64,
    /// Sequence in `WEIR_PARK`, for a job read back from the park.
    pub park_seq: Option<u64>,
    pub job: J,
}

/// Per-key state: 40 bytes (plus a 24-byte inline name), because most tracked keys have no
/// backlog, and a key with none costs only its bucket.
#[derive(Debug)]
struct KeyState<J> {
    bucket: Bucket,
    /// Present only while the key has a backlog.
    busy: Option<Box<Busy<J>>>,
}

impl<J> KeyState<J> {
    /// No backlog and a full bucket: forgetting the key changes no future decision. (A release
    /// still in flight does not matter: its completion for a forgotten key is ignored, and the
    /// partition settles its source job either way.)
    fn evictable(&self) -> bool {
        self.busy.is_none() && self.bucket.is_full()
    }
}

#[derive(Debug)]
struct Busy<J> {
    queue: VecDeque<Held<J>>,
    /// Most jobs held in memory: burst plus what the key releases within the horizon.
    cap: u32,
    /// Timer due time in nanos (0: none).
    wake_at: u64,
    /// After a restart: sequences of this key's jobs that were held unacked by the previous
    /// run and are still to be redelivered (sorted). Nothing newer leaves before they arrive:
    /// redelivery comes after `ack_wait`, or in any order after a NAK (nats-server #6114).
    fence: Vec<u64>,
    /// When the fence is dropped even if some never came back (purged by an operator, say).
    fence_until: u64,
    /// Park publishes in flight.
    parking: u32,
    /// Parked jobs not yet read back.
    unread: u64,
    /// Park sequences of releases read back from the park and in flight, oldest first: on
    /// failure they are read again, so the park is never purged at or past the oldest.
    inflight_parked: std::collections::VecDeque<u64>,
    /// Next park sequence to read from.
    cursor: u64,
    loading: bool,
    /// The read from the park in flight began before the key was purged: what it brings back
    /// was deleted with the park, and is dropped.
    stale_load: bool,
    /// Source sequence of the newest job read back from the park.
    max_loaded_src: u64,
    /// No job older than this may be parked: the newest source sequence parked (or known to be
    /// in the park from a previous run, or read back from it). A job parked behind a newer one
    /// would leave after it. Normally every job older than that is a redelivery and never
    /// parked anyway; this also catches redeliveries JetStream does not flag: a consumer whose
    /// state nats-server lost in a crash delivers jobs again as first deliveries (measured in
    /// `weir chaos` with a NATS restart: 200-300 jobs of a parked key released out of order in
    /// 4 of 9 runs before this bound).
    park_floor: u64,
    /// Park sequences below this were released and may be purged.
    purge_below: u64,
    purged_below: u64,
    purging: bool,
    /// The key's rate is zero: hold everything. A paused key keeps this state even with no
    /// backlog, so no job of it takes the no-backlog fast path.
    paused: bool,
    /// Jobs offered and released since the key's backlog began: for operators (`weir top`).
    offered: u64,
    released: u64,
    /// Queued for its front job's capped destination, holding a token of its own ("banked").
    waiting: bool,
}

impl<J> Default for Busy<J> {
    fn default() -> Self {
        Busy {
            queue: VecDeque::new(),
            cap: 1,
            wake_at: 0,
            fence: Vec::new(),
            fence_until: 0,
            parking: 0,
            unread: 0,
            inflight_parked: std::collections::VecDeque::new(),
            cursor: 0,
            loading: false,
            stale_load: false,
            max_loaded_src: 0,
            park_floor: 0,
            purge_below: 0,
            purged_below: 0,
            purging: false,
            paused: false,
            offered: 0,
            released: 0,
            waiting: false,
        }
    }
}

impl<J> Busy<J> {
    fn is_idle(&self) -> bool {
        !self.paused
            && !self.waiting
            && self.queue.is_empty()
            && self.parking == 0
            && self.unread == 0
            && self.inflight_parked.is_empty()
            && !self.loading
            && !self.purging
            && self.purged_below >= self.purge_below
            && self.fence.is_empty()
    }
}

/// Counters a partition reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub keys: usize,
    pub held: usize,
    pub loaded: usize,
}

pub struct Scheduler<J> {
    keys: HashMap<Key, KeyState<J>>,
    timers: BinaryHeap<Reverse<(u64, Key)>>,
    /// Keys that want to read from the park but the partition's read-back budget is spent.
    starved: VecDeque<Key>,
    limits: Arc<Limits>,
    horizon: Duration,
    /// Most jobs read back from the park held in memory at once, over all keys.
    load_budget: usize,
    /// Most fresh (unacked) jobs held in memory at once, over all keys.
    hold_budget: usize,
    held: usize,
    loaded: usize,
    actions: Vec<Action<J>>,
    /// Capped destinations (see [`dest`]); empty when none is capped, which keeps the
    /// per-job cost of caps to one `is_empty` check.
    caps: HashMap<Key, dest::Dest>,
    dest_timers: BinaryHeap<Reverse<(u64, Key)>>,
    in_flight: InFlight,
}

/// Release publishes in flight per key, for keys that have any, and how many a key may have.
///
/// One (the partition's default, `publish_window_per_key`) keeps a key's order even when NATS
/// dies with publishes in flight: a publish lost with the connection is retried after later
/// ones of its key that the client had queued and sent after the reconnect, so with two of a
/// key in flight the second can be stored first (`weir chaos` with a NATS restart: up to 14
/// jobs of 4 keys overtaken by their own). Keys under their rate are unaffected (their releases
/// are further apart than a publish's round trip); a key releasing faster than one per round
/// trip waits for its previous ack. The map holds only keys with a publish in flight, so at most
/// the partition's publish window, and costs nothing per tracked key.
#[derive(Debug)]
struct InFlight {
    keys: HashMap<Key, u32>,
    /// `u32::MAX`: unbounded (nothing tracked).
    window: u32,
}

impl InFlight {
    fn is_free(&self, k: &str) -> bool {
        self.window == u32::MAX || self.keys.get(k).is_none_or(|&n| n < self.window)
    }

    fn add(&mut self, k: &Key) {
        if self.window != u32::MAX {
            *self.keys.entry_ref(k.as_str()).or_insert(0) += 1;
        }
    }

    fn done(&mut self, k: &str) {
        if self.window == u32::MAX {
            return;
        }
        if let Some(n) = self.keys.get_mut(k) {
            *n -= 1;
            if *n == 0 {
                self.keys.remove(k);
            }
        }
    }
}

impl<J: Routed> Scheduler<J> {
    /// `max_held`: the consumer's `max_ack_pending`. Three quarters of it may be held fresh
    /// (the rest is room for publishes in flight); as many again may be read back from the park.
    pub fn new(limits: Arc<Limits>, horizon: Duration, max_held: usize) -> Self {
        Scheduler {
            keys: HashMap::new(),
            timers: BinaryHeap::new(),
            starved: VecDeque::new(),
            limits,
            horizon,
            load_budget: max_held.max(1),
            hold_budget: (max_held * 3 / 4).max(1),
            held: 0,
            loaded: 0,
            actions: Vec::new(),
            caps: HashMap::new(),
            dest_timers: BinaryHeap::new(),
            in_flight: InFlight {
                keys: HashMap::new(),
                window: u32::MAX,
            },
        }
    }

    /// At most `n` release publishes of a key in flight at once (counted in a map that holds only
    /// the keys with releases in flight); unbounded until set. Every release must then be
    /// reported with [`Scheduler::release_done`].
    pub fn with_key_window(mut self, n: u32) -> Self {
        self.in_flight.window = n.max(1);
        self
    }

    pub fn stats(&self) -> Stats {
        Stats {
            keys: self.keys.len(),
            held: self.held,
            loaded: self.loaded,
        }
    }

    /// Moves the actions queued so far into `into` (a buffer the caller reuses).
    pub fn take_actions(&mut self, into: &mut Vec<Action<J>>) {
        into.append(&mut self.actions);
    }

    /// Takes every job held in memory, for shutdown: the caller hands fresh ones back.
    pub fn take_all(&mut self) -> Vec<Held<J>> {
        let mut out = Vec::with_capacity(self.held);
        for st in self.keys.values_mut() {
            if let Some(b) = st.busy.as_deref_mut() {
                out.extend(b.queue.drain(..));
            }
        }
        self.held = 0;
        self.loaded = 0;
        out
    }

    /// Appends the source sequences of the fresh jobs held in memory (unacked in `WEIR_JOBS`)
    /// and of those handed back and expected again (fences): the unacked jobs the partition
    /// knows of, for the sweep after a reconnect ([`crate::poison::Unacked::unknown`]).
    /// Unsorted; O(jobs held), asked once per reconnect.
    pub fn unacked_seqs(&self, out: &mut Vec<u64>) {
        for b in self.keys.values().filter_map(|st| st.busy.as_deref()) {
            let fresh = b.queue.iter().filter(|h| h.park_seq.is_none());
            out.extend(fresh.map(|h| h.src_seq));
            out.extend(&b.fence);
        }
    }

    /// When [`Scheduler::fire`] should next be called.
    pub fn next_wake(&self) -> Option<Nanos> {
        let key = self.timers.peek().map(|Reverse((t, _))| *t);
        let dest = self.dest_timers.peek().map(|Reverse((t, _))| *t);
        key.into_iter().chain(dest).min().map(Nanos::new)
    }

    /// A job arrived from `WEIR_JOBS`. `redelivered` jobs are never parked (they are older than
    /// anything parked after them) but merged into memory by sequence.
    pub fn offer(
        &mut self,
        key: &str,
        src_seq: u64,
        redelivered: bool,
        job: J,
        now: Nanos,
    ) -> Offer<J> {
        // Fresh jobs in memory are unacked and count against the consumer's max_ack_pending:
        // past the budget, even keys within their horizon park, so the consumer keeps flowing.
        let over_budget = self.held.saturating_sub(self.loaded) >= self.hold_budget;
        let (k, st) = entry(&mut self.keys, &self.limits, self.horizon, key);
        // A job the previous run held counts as redelivered even when JetStream delivers it
        // for the first time again (after a consumer reset its delivery count starts over).
        // So does one older than something already parked: parked, it would leave after that.
        // And so does a job already held here: a consumer whose state nats-server lost in a
        // crash delivers held jobs again as first deliveries, and parking the second delivery
        // would ack the source of the first (see `loaded`).
        let redelivered = redelivered
            || st.busy.as_deref().is_some_and(|b| {
                src_seq <= b.park_floor
                    || b.fence.binary_search(&src_seq).is_ok()
                    || (b.queue.back().is_some_and(|h| h.src_seq >= src_seq)
                        && b.queue
                            .binary_search_by_key(&src_seq, |h| h.src_seq)
                            .is_ok())
            });
        if let Some(b) = st.busy.as_deref_mut() {
            let full = b.queue.len() >= b.cap as usize || over_budget;
            if !redelivered && (b.unread > 0 || b.parking > 0 || full) {
                b.offered += 1;
                b.parking += 1;
                b.park_floor = src_seq;
                return Offer::Park(k, job);
            }
        }
        let held = Held {
            src_seq,
            park_seq: None,
            job,
        };
        // Fast path: nothing waiting, a token free, no destination cap: leave now without
        // touching the queue.
        let capped = !self.caps.is_empty() && self.caps.contains_key(held.job.dest());
        if st.busy.is_none()
            && !capped
            && self.in_flight.is_free(&k)
            && st.bucket.try_take().is_ok()
        {
            self.in_flight.add(&k);
            self.actions.push(Action::Release { key: k, job: held });
            return Offer::Held;
        }
        if st.busy.is_none() {
            st.busy = Some(new_busy(&self.limits.for_key(key), self.horizon));
        }
        let b = st.busy.as_deref_mut().expect("busy");
        // Delivered again while held (held past ack_wait: after a restart every unacked job of
        // the key comes back and is held, however long its backlog): one copy, with the newer
        // delivery's ack handle. Each copy queued took a token of its own, so a key held past
        // ack_wait gained a copy of every held job per ack_wait: 2 to 11 copies of 600 jobs of
        // tests/process.rs' hot key after a kill -9, releasing it at a tenth of its rate.
        if redelivered {
            if let Some(h) = fresh_copy(&mut b.queue, src_seq) {
                h.job = held.job;
                return Offer::Held;
            }
        }
        b.offered += 1;
        if let Ok(i) = b.fence.binary_search(&src_seq) {
            b.fence.remove(i);
        }
        if over_budget && !redelivered {
            b.parking += 1;
            b.park_floor = src_seq;
            return Offer::Park(k, held.job);
        }
        insert_sorted(&mut b.queue, held);
        self.held += 1;
        self.pump(&k, now);
        Offer::Held
    }

    /// Wakes the keys and destinations whose timers are due.
    pub fn fire(&mut self, now: Nanos) {
        if !self.dest_timers.is_empty() {
            self.fire_dests(now);
        }
        while let Some(Reverse((t, _))) = self.timers.peek() {
            if *t > now.as_u64() {
                break;
            }
            let Reverse((t, k)) = self.timers.pop().expect("peeked");
            if let Some(b) = self.keys.get_mut(&k).and_then(|st| st.busy.as_deref_mut()) {
                if b.wake_at == t {
                    b.wake_at = 0;
                    // Decide as of the due time, not the (later) moment the timer fired: timers
                    // tick in whole milliseconds, and deciding late would push every later
                    // release back too (a burst-1 key at 100/s would run about 10% slow).
                    crate::limiter::decide_at(Nanos::new(t), || self.pump(&k, now));
                }
            }
        }
    }

    /// Forgets keys that have been idle long enough for their bucket to be full again: such a key
    /// behaves exactly like a new one, so its state is pure cost. Returns the jobs parked over
    /// the keys that remain (for the backlog gauge). One pass over the map (a few
    /// nanoseconds a key), so the caller runs it every second or so rather than keeping a
    /// per-key eviction timer, which would cost memory on every tracked key.
    pub fn evict_idle(&mut self, now: Nanos) -> u64 {
        // One clock reading for the whole pass; the same pass counts the parked jobs.
        let mut parked = 0u64;
        crate::limiter::decide_at(now, || {
            self.keys.retain(|_, st| {
                if let Some(b) = st.busy.as_deref() {
                    parked += b.unread + u64::from(b.parking);
                }
                !st.evictable()
            })
        });
        if self.keys.capacity() > 4 * self.keys.len() + 1024 {
            self.keys.shrink_to_fit();
        }
        parked
    }

    /// Releases what the key may release now, asks for reads from the park, schedules the next
    /// look, and drops the backlog state of a key that has none left.
    fn pump(&mut self, k: &Key, now: Nanos) {
        let Some(st) = self.keys.get_mut(k) else {
            return;
        };
        let Some(b) = st.busy.as_deref_mut() else {
            return;
        };
        let mut want_load = false;
        if !b.fence.is_empty() && b.fence_until <= now.as_u64() {
            tracing::warn!(key = %k, missing = b.fence.len(), "jobs held before a restart did not come back; releasing newer ones");
            b.fence.clear();
        }
        while let Some(front) = b.queue.front() {
            // Older jobs held by the previous run are still to be redelivered.
            if b.fence.first().is_some_and(|&f| f < front.src_seq) {
                schedule(&mut self.timers, &mut b.wake_at, k, b.fence_until);
                break;
            }
            // A fresh job may leave only if nothing older can still be unread in the park; a job
            // read back from the park is older than everything still unread there.
            if front.park_seq.is_none() && b.unread > 0 && b.max_loaded_src <= front.src_seq {
                want_load = true;
                break;
            }
            // Queued for a destination: the destination's timer releases it.
            if b.paused || b.waiting {
                break;
            }
            // Its previous release is still in flight: `release_done` pumps the key again.
            if !self.in_flight.is_free(k) {
                break;
            }
            if let Err(at) = st.bucket.try_take() {
                schedule(&mut self.timers, &mut b.wake_at, k, at.as_u64());
                break;
            }
            if !self.caps.is_empty() {
                if let Some(d) = self.caps.get_mut(front.job.dest()) {
                    if !d.admit(k, &mut self.dest_timers) {
                        b.waiting = true;
                        break;
                    }
                }
            }
            let job = b.queue.pop_front().expect("front");
            self.in_flight.add(k);
            release(b, job, k, &mut self.held, &mut self.actions);
        }
        let b = st.busy.as_deref_mut().expect("busy");
        if b.unread > 0 && (b.queue.len() < (b.cap as usize).div_ceil(2) || want_load) && !b.loading
        {
            if self.loaded < self.load_budget {
                b.loading = true;
                self.actions.push(Action::Load {
                    key: k.clone(),
                    from: b.cursor,
                });
            } else {
                self.starved.push_back(k.clone());
            }
        }
        if b.purge_below > b.purged_below
            && !b.purging
            && (b.queue.is_empty() || b.purge_below - b.purged_below >= 64)
        {
            // Never past a parked job not yet released: the lowest one still queued or in
            // flight, or the cursor (moved back to a refused one). `purge_below` only says what
            // the acked releases allow; purging a parked job still queued would lose it if this
            // process died before releasing it.
            let bound = b
                .queue
                .iter()
                .filter_map(|h| h.park_seq)
                .chain(b.inflight_parked.front().copied())
                .min()
                .map_or(b.cursor, |p| p.min(b.cursor));
            let below = b.purge_below.min(bound);
            if below > b.purged_below {
                b.purging = true;
                self.actions.push(Action::Purge {
                    key: k.clone(),
                    below,
                });
            }
        }
        if b.is_idle() {
            st.busy = None;
        }
    }

    fn key_arc(&self, key: &str) -> Key {
        self.key_arc_opt(key).expect("key present")
    }

    fn key_arc_opt(&self, key: &str) -> Option<Key> {
        self.keys.get_key_value(key).map(|(k, _)| k.clone())
    }
}

/// The key's state, created with its limit if it is new.
fn entry<'a, J>(
    keys: &'a mut HashMap<Key, KeyState<J>>,
    limits: &Limits,
    horizon: Duration,
    key: &str,
) -> (Key, &'a mut KeyState<J>) {
    if !keys.contains_key(key) {
        let limit = limits.for_key(key);
        let st = KeyState {
            bucket: Bucket::new(&limit),
            busy: limit.rate.is_paused().then(|| new_busy(&limit, horizon)),
        };
        keys.insert(Key::from(key), st);
    }
    let (k, st) = keys.get_key_value_mut(key).expect("inserted above");
    (k.clone(), st)
}

/// A fresh `Busy` for a key with `limit`.
fn new_busy<J>(limit: &Limit, horizon: Duration) -> Box<Busy<J>> {
    let mut b = Box::new(Busy::default());
    b.set_limit(limit, horizon);
    b
}

impl<J> Busy<J> {
    /// The in-memory cap (burst plus what the key releases within the horizon) and the pause
    /// flag come from the limit.
    fn set_limit(&mut self, limit: &Limit, horizon: Duration) {
        let ahead = limit.rate.per_second() * horizon.as_secs_f64();
        self.cap = (f64::from(limit.burst) + ahead).clamp(1.0, 100_000.0) as u32;
        self.paused = limit.rate.is_paused();
    }
}

/// Queues the release of a key's front job.
fn release<J>(
    b: &mut Busy<J>,
    job: Held<J>,
    k: &Key,
    held: &mut usize,
    actions: &mut Vec<Action<J>>,
) {
    b.released += 1;
    if let Some(ps) = job.park_seq {
        b.inflight_parked.push_back(ps);
    }
    *held -= 1;
    actions.push(Action::Release {
        key: k.clone(),
        job,
    });
}

/// Sets a key's timer to `at` unless an earlier one is already set.
fn schedule(timers: &mut BinaryHeap<Reverse<(u64, Key)>>, w: &mut u64, k: &Key, at: u64) {
    let at = at.max(1);
    if *w == 0 || at < *w {
        *w = at;
        timers.push(Reverse((at, k.clone())));
    }
}

/// The held fresh copy (not one read back from the park) of the job with `src_seq`, if any.
fn fresh_copy<J>(q: &mut VecDeque<Held<J>>, src_seq: u64) -> Option<&mut Held<J>> {
    if q.back().is_none_or(|b| b.src_seq < src_seq) {
        return None;
    }
    let from = q.partition_point(|x| x.src_seq < src_seq);
    q.range_mut(from..)
        .take_while(|h| h.src_seq == src_seq)
        .find(|h| h.park_seq.is_none())
}

/// Inserts by source sequence; almost always at the back.
fn insert_sorted<J>(q: &mut VecDeque<Held<J>>, h: Held<J>) {
    match q.back() {
        None => q.push_back(h),
        Some(b) if b.src_seq < h.src_seq => q.push_back(h),
        _ => {
            let i = q.partition_point(|x| x.src_seq < h.src_seq);
            q.insert(i, h);
        }
    }
}

mod dest;
mod operate;
mod outcome;
pub use dest::Caps;

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
