//! Per-key GCRA buckets, by [`governor`].
//!
//! Why one governor *direct* limiter per key rather than governor's keyed limiter: a keyed
//! `RateLimiter` has a single quota for every key, while each Weir key has its own rate and burst
//! (and, later, limits that change at runtime). The partition task already owns a map of per-key
//! state, so the bucket lives inside it: one hash lookup per job, no lock (governor's state is a
//! single `AtomicU64` touched by one task), 32 bytes per key.
//!
//! Why a quota is built with [`Quota::with_period`] + `allow_burst`: `Quota::per_second(n)` silently
//! sets the burst to `n`, and Weir's contract is "at most `burst + floor(t / T)` releases in any
//! window of length `t`", with `burst` configured on its own.
//!
//! Time is monotonic and injectable: [`MonoClock`] reads `tokio::time::Instant`, so tests drive it
//! with `tokio::time::pause`/`advance`, and a wall-clock step never moves a rate.

use std::cell::Cell;
use std::num::NonZeroU32;
use std::sync::OnceLock;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::Limit;

/// A monotonic clock on tokio's time source, as nanoseconds since the first reading in this
/// process. Zero-sized, so it costs nothing per key.
#[derive(Debug, Clone, Copy, Default)]
pub struct MonoClock;

/// Nanoseconds on the monotonic clock shared by every bucket and timer in the process.
pub fn now() -> Nanos {
    static ORIGIN: OnceLock<tokio::time::Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(tokio::time::Instant::now);
    Nanos::new(
        tokio::time::Instant::now()
            .saturating_duration_since(origin)
            .as_nanos() as u64,
    )
}

/// The tokio instant matching a reading of [`now`], for timers.
pub fn instant_at(at: Nanos) -> tokio::time::Instant {
    let n = now();
    let base = tokio::time::Instant::now();
    if at > n {
        base + Duration::from_nanos(at.as_u64() - n.as_u64())
    } else {
        base
    }
}

/// How far back a decision may be dated: a little over one timer tick.
pub const MAX_LAG: Duration = Duration::from_micros(2_000);

thread_local! {
    /// While set (non-zero), the moment bucket decisions are taken as of.
    static DECIDE_AT: Cell<u64> = const { Cell::new(0) };
}

/// Runs `f` with bucket decisions taken as of `at` (a timer's due time) instead of now, as long
/// as `at` is at most [`MAX_LAG`] in the past; otherwise as of `now - MAX_LAG`.
///
/// Why: tokio's timers fire on whole-millisecond ticks, so a key with a backlog is woken up to a
/// millisecond after its token is due. GCRA would then date the release (and so every later one)
/// from that late moment, and a burst-1 key at 100/s would run about 10% slow. Deciding as of the
/// due time keeps the decisions exactly `T` apart; the publish itself still happens when the task
/// runs, at most a tick later.
pub fn decide_at<R>(at: Nanos, f: impl FnOnce() -> R) -> R {
    let n = now().as_u64();
    let floor = n.saturating_sub(MAX_LAG.as_nanos() as u64);
    let at = at.as_u64().clamp(floor, n).max(1);
    DECIDE_AT.with(|c| c.set(at));
    let r = f();
    DECIDE_AT.with(|c| c.set(0));
    r
}

impl Clock for MonoClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        match DECIDE_AT.with(Cell::get) {
            0 => now(),
            at => Nanos::new(at),
        }
    }
}

/// The governor quota for a Weir limit: one job every `T = per / count`, `burst` back to back.
pub fn quota(limit: &Limit) -> Quota {
    let period = limit.rate.period().max(Duration::from_nanos(1));
    Quota::with_period(period)
        .expect("period is non-zero")
        .allow_burst(NonZeroU32::new(limit.burst.max(1)).expect("burst >= 1"))
}

/// One key's GCRA state: 32 bytes (governor's atomic state, its `t` and `tau`, its start).
#[derive(Debug)]
pub struct Bucket<C: Clock<Instant = Nanos> = MonoClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<Nanos>>,
}

impl Bucket<MonoClock> {
    pub fn new(limit: &Limit) -> Self {
        Bucket::with_clock(limit, MonoClock)
    }
}

impl Bucket<MonoClock> {
    /// A bucket for a `share` (0 < share <= 1) of `limit`: the rate times the share, and the
    /// burst times the share, rounded down but at least one.
    pub fn share_of(limit: &Limit, share: f64) -> Self {
        let share = share.clamp(1e-6, 1.0);
        let period = limit
            .rate
            .period()
            .div_f64(share)
            .max(Duration::from_nanos(1));
        let burst = ((f64::from(limit.burst) * share).floor() as u32).max(1);
        let quota = Quota::with_period(period)
            .expect("period is non-zero")
            .allow_burst(NonZeroU32::new(burst).expect("burst >= 1"));
        Bucket {
            limiter: RateLimiter::direct_with_clock(quota, MonoClock),
        }
    }
}

impl Bucket<MonoClock> {
    /// Takes the token due at `at` (from a failed [`Bucket::try_take`]) already now, so that no
    /// one else sharing the bucket can take it: as if it were taken at `at`, which the caller
    /// then waits for. Fails (with the next due time) when someone else was first.
    pub fn claim(&self, at: Nanos) -> Result<(), Nanos> {
        let before = DECIDE_AT.with(|c| c.replace(at.as_u64().max(1)));
        let r = self.try_take();
        DECIDE_AT.with(|c| c.set(before));
        r
    }
}

/// The moment bucket decisions are taken as of now: [`now`], or inside [`decide_at`] its time.
pub fn decision_time() -> Nanos {
    MonoClock.now()
}

impl<C: Clock<Instant = Nanos>> Bucket<C> {
    pub fn with_clock(limit: &Limit, clock: C) -> Self {
        Bucket {
            limiter: RateLimiter::direct_with_clock(quota(limit), clock),
        }
    }

    /// Whether the bucket is full again (its theoretical arrival time has passed), so the key
    /// behaves exactly like a new one. Spends the bucket when it is: ask only about a key about
    /// to be forgotten.
    ///
    /// governor has no read-only look at the state, but its all-or-nothing `check_n` gives one:
    /// asking for more than any burst reports the burst without touching the state, and asking
    /// for the whole burst succeeds exactly when the bucket is full.
    pub fn is_full(&self) -> bool {
        // Config caps burst at 1,000,000; this never overflows t * (n - 1) for any rate.
        const MORE_THAN_ANY_BURST: NonZeroU32 = NonZeroU32::new(1_000_001).expect("non-zero");
        let burst = match self.limiter.check_n(MORE_THAN_ANY_BURST) {
            Err(governor::InsufficientCapacity(b)) => b,
            Ok(r) => return r.is_ok(),
        };
        NonZeroU32::new(burst).is_some_and(|b| matches!(self.limiter.check_n(b), Ok(Ok(_))))
    }

    /// Takes every token there is: the bucket is empty, as if the key had just used its burst.
    pub fn drain(&self) {
        // Bounded by the largest burst: at a rate whose period is shorter than one `check` (10^9/s
        // is 1 ns) tokens come back faster than they are taken, and an unbounded loop never ends.
        for _ in 0..=1_000_000 {
            if self.limiter.check().is_err() {
                break;
            }
        }
    }

    /// Takes one token if there is one; otherwise says when the next one is due.
    #[inline]
    pub fn try_take(&self) -> Result<(), Nanos> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.earliest_possible())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rate;
    use governor::clock::FakeRelativeClock;
    use proptest::prelude::*;

    fn limit(count: u32, per_ms: u64, burst: u32) -> Limit {
        Limit {
            rate: Rate {
                count,
                per: Duration::from_millis(per_ms),
            },
            burst,
        }
    }

    #[test]
    fn burst_then_one_per_period() {
        let clock = FakeRelativeClock::default();
        let b = Bucket::with_clock(&limit(10, 1000, 3), clock.clone());
        for _ in 0..3 {
            assert!(b.try_take().is_ok());
        }
        let due = b.try_take().unwrap_err();
        assert_eq!(due.as_u64(), 100_000_000);
        clock.advance(Duration::from_millis(100));
        assert!(b.try_take().is_ok());
        assert!(b.try_take().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn late_timers_do_not_slow_a_burst_one_key() {
        let b = Bucket::new(&limit(100, 1000, 1));
        let start = now().as_u64();
        assert!(b.try_take().is_ok());
        let mut released = 1;
        for _ in 0..99 {
            let due = b.try_take().unwrap_err();
            // The timer fires 1 ms after the token is due.
            let late =
                Duration::from_nanos(due.as_u64() - now().as_u64()) + Duration::from_millis(1);
            tokio::time::advance(late).await;
            assert!(decide_at(due, || b.try_take()).is_ok());
            released += 1;
        }
        // 100 releases decided exactly 10 ms apart: 0.99 s of decisions, 1 ms of lag at the end
        // (deciding late would have taken 99 x 11 ms).
        assert_eq!(released, 100);
        let elapsed_ms = (now().as_u64() - start) / 1_000_000;
        assert!((990..=992).contains(&elapsed_ms), "{elapsed_ms} ms");
    }

    #[test]
    fn full_means_a_whole_burst_is_available() {
        let clock = FakeRelativeClock::default();
        let b = Bucket::with_clock(&limit(10, 1000, 3), clock.clone());
        assert!(b.try_take().is_ok());
        // One taken at t=0: full again at T = 100 ms.
        clock.advance(Duration::from_millis(99));
        assert!(!b.is_full());
        clock.advance(Duration::from_millis(1));
        assert!(b.is_full());
    }

    #[test]
    fn a_bucket_is_32_bytes() {
        assert_eq!(std::mem::size_of::<Bucket>(), 32);
    }

    proptest! {
        /// The contract: in any window of length t, at most burst + floor(t / T) releases; and a
        /// key asking at every due time gets exactly its rate.
        #[test]
        fn gcra_window_bound(count in 1u32..300, burst in 1u32..20, steps in prop::collection::vec(0u64..5_000_000, 1..200)) {
            let clock = FakeRelativeClock::default();
            let l = limit(count, 1000, burst);
            let t = l.rate.period().as_nanos() as u64;
            let b = Bucket::with_clock(&l, clock.clone());
            let mut now = 0u64;
            let mut granted = Vec::new();
            for step in steps {
                clock.advance(Duration::from_nanos(step));
                now += step;
                while b.try_take().is_ok() {
                    granted.push(now);
                }
            }
            // Check every window that starts at a grant.
            for (i, &start) in granted.iter().enumerate() {
                for (j, &end) in granted.iter().enumerate().skip(i) {
                    let n = (j - i + 1) as u64;
                    let bound = u64::from(burst) + (end - start) / t;
                    prop_assert!(n <= bound, "{n} grants in {}ns, bound {bound}", end - start);
                }
            }
        }
    }
}
