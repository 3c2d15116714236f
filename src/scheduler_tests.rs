//! Scheduler unit tests: time is tokio's paused clock, jobs are plain numbers.

use super::*;
use crate::config::{Config, Overrides};
use crate::limiter::now;

fn sched<J: Routed>(toml: &str, horizon_ms: u64) -> Scheduler<J> {
    let c = Config::from_toml(toml, "t", &Overrides::default()).unwrap();
    Scheduler::new(
        Arc::new(Limits::from_config(&c)),
        Duration::from_millis(horizon_ms),
        10_000,
    )
}

type Releases = Vec<(String, u64, Option<u64>)>;
type KeyAndSeq = Vec<(String, u64)>;

/// Releases queued so far, as (key, src_seq, park_seq); loads and purges are returned apart.
fn take(s: &mut Scheduler<u64>) -> (Releases, KeyAndSeq, KeyAndSeq) {
    let mut acts = Vec::new();
    s.take_actions(&mut acts);
    let (mut rel, mut loads, mut purges) = (Vec::new(), Vec::new(), Vec::new());
    for a in acts {
        match a {
            Action::Release { key, job } => rel.push((key.to_string(), job.src_seq, job.park_seq)),
            Action::Load { key, from } => loads.push((key.to_string(), from)),
            Action::Purge { key, below } => purges.push((key.to_string(), below)),
        }
    }
    (rel, loads, purges)
}

const TEN_PER_SEC: &str = "[limits.default]\nrate = \"10/s\"\nburst = 2";

#[tokio::test(start_paused = true)]
async fn burst_leaves_at_once_then_one_per_period() {
    let mut s = sched(TEN_PER_SEC, 5_000);
    for seq in 1..=5 {
        assert!(matches!(
            s.offer("acme", seq, false, seq, now()),
            Offer::Held
        ));
    }
    let (rel, _, _) = take(&mut s);
    assert_eq!(rel.iter().map(|r| r.1).collect::<Vec<_>>(), vec![1, 2]);
    for expect in 3..=5 {
        let wake = s.next_wake().expect("a timer for the backlog");
        tokio::time::advance(Duration::from_nanos(wake.as_u64() - now().as_u64())).await;
        s.fire(now());
        let (rel, _, _) = take(&mut s);
        assert_eq!(rel.iter().map(|r| r.1).collect::<Vec<_>>(), vec![expect]);
    }
    assert_eq!(s.stats().held, 0);
}

#[tokio::test(start_paused = true)]
async fn keys_do_not_wait_for_each_other() {
    let mut s = sched(TEN_PER_SEC, 5_000);
    for seq in 1..=50 {
        s.offer("hot", seq, false, seq, now());
    }
    s.offer("cold", 51, false, 51, now());
    let (rel, _, _) = take(&mut s);
    assert!(
        rel.iter().any(|r| r.0 == "cold" && r.1 == 51),
        "the cold key leaves at once"
    );
}

#[tokio::test(start_paused = true)]
async fn surplus_beyond_the_horizon_is_parked_and_read_back_in_order() {
    // 10/s, burst 2, horizon 500 ms: the burst leaves, then 7 jobs in memory at most.
    let mut s = sched(TEN_PER_SEC, 500);
    let mut parked = Vec::new();
    for seq in 1..=20 {
        if let Offer::Park(_, j) = s.offer("acme", seq, false, seq, now()) {
            parked.push(j);
        }
    }
    assert_eq!(
        parked,
        (10..=20).collect::<Vec<_>>(),
        "parked in order, after the cap"
    );
    for _ in &parked {
        s.parked("acme", true, now());
    }
    let mut released = Vec::new();
    while released.len() < 20 {
        let (rel, loads, _) = take(&mut s);
        for (_, src, ps) in rel {
            released.push(src);
            s.release_done("acme", ps, true, now());
        }
        for (_, from) in loads {
            // Park sequences 101.. hold jobs 10.. in order.
            let ps = from.max(101);
            let res = parked.get((ps - 101) as usize).map(|&src| (ps, src, src));
            s.loaded("acme", Ok(res), now());
        }
        if let Some(w) = s.next_wake() {
            tokio::time::advance(Duration::from_nanos(
                w.as_u64().saturating_sub(now().as_u64()),
            ))
            .await;
            s.fire(now());
        }
    }
    assert_eq!(released, (1..=20).collect::<Vec<_>>());
}

/// A read from the park in flight when its key is purged brings back a job the purge deleted:
/// it is dropped, and the key goes on with its new jobs.
#[tokio::test(start_paused = true)]
async fn a_park_read_in_flight_when_its_key_is_purged_brings_nothing_back() {
    let mut s = sched(TEN_PER_SEC, 500);
    for seq in 1..=20 {
        if let Offer::Park(..) = s.offer("acme", seq, false, seq, now()) {
            s.parked("acme", true, now());
        }
    }
    // Release until the key reads from the park.
    let from = loop {
        let (rel, loads, _) = take(&mut s);
        for (_, _, ps) in rel {
            s.release_done("acme", ps, true, now());
        }
        if let Some((_, from)) = loads.into_iter().next() {
            break from;
        }
        let w = s.next_wake().expect("a timer for the backlog");
        tokio::time::advance(Duration::from_nanos(
            w.as_u64().saturating_sub(now().as_u64()),
        ))
        .await;
        s.fire(now());
    };
    let _ = s.purge_key("acme");
    s.loaded("acme", Ok(Some((from.max(101), 10, 10))), now());
    assert_eq!(s.stats().held, 0, "the purged job is not held");
    s.offer("acme", 30, false, 30, now());
    let mut released = Vec::new();
    for _ in 0..20 {
        let (rel, loads, _) = take(&mut s);
        assert!(loads.is_empty(), "nothing left to read: {loads:?}");
        released.extend(rel.iter().map(|r| r.1));
        if released.contains(&30) {
            break;
        }
        let w = s.next_wake().expect("a timer for job 30");
        tokio::time::advance(Duration::from_nanos(
            w.as_u64().saturating_sub(now().as_u64()),
        ))
        .await;
        s.fire(now());
    }
    assert_eq!(released, [30], "only the new job leaves");
}

/// A job older than one already parked is never parked behind it, even when JetStream does not
/// flag it as redelivered (a consumer whose state nats-server lost in a crash delivers jobs
/// again as first deliveries; `weir chaos` with a NATS restart released 200-300 jobs of a
/// parked key out of order before this).
#[tokio::test(start_paused = true)]
async fn a_job_older_than_the_park_is_held_not_parked() {
    let mut s = sched(TEN_PER_SEC, 500);
    // A previous run parked jobs; the consumer had delivered up to 200 when this run began.
    s.restore_parked("acme", 3, 200, now());
    assert!(
        matches!(s.offer("acme", 150, false, 150, now()), Offer::Held),
        "150 may be older than a parked job: held, not parked behind them"
    );
    assert!(
        matches!(s.offer("acme", 201, false, 201, now()), Offer::Park(..)),
        "newer than anything parked: parked as usual"
    );
    s.parked("acme", true, now());
    assert!(
        matches!(s.offer("acme", 180, false, 180, now()), Offer::Held),
        "delivered again (first delivery by the count): held"
    );
    assert!(matches!(
        s.offer("acme", 202, false, 202, now()),
        Offer::Park(..)
    ));
}

#[tokio::test(start_paused = true)]
async fn after_a_restart_redelivered_jobs_merge_with_the_park_by_sequence() {
    let mut s = sched(TEN_PER_SEC, 500);
    // The park holds jobs 90 and 120; job 100 was held in memory (unacked) at the crash.
    s.restore_parked("acme", 2, 0, now());
    let (_, loads, _) = take(&mut s);
    assert_eq!(loads.len(), 1, "reads the park before anything else leaves");
    assert!(
        matches!(s.offer("acme", 100, true, 100, now()), Offer::Held),
        "redelivered: never re-parked"
    );
    s.loaded("acme", Ok(Some((1, 90, 90))), now());
    let (rel, loads, _) = take(&mut s);
    assert_eq!(rel.iter().map(|r| r.1).collect::<Vec<_>>(), vec![90]);
    assert_eq!(
        loads,
        vec![("acme".to_string(), 2)],
        "100 may not leave before the park is read past it"
    );
    s.loaded("acme", Ok(Some((2, 120, 120))), now());
    let (rel, _, _) = take(&mut s);
    assert_eq!(rel.iter().map(|r| r.1).collect::<Vec<_>>(), vec![100]);
}

#[tokio::test(start_paused = true)]
async fn idle_keys_are_evicted_once_their_bucket_is_full() {
    let mut s = sched(TEN_PER_SEC, 5_000);
    s.offer("acme", 1, false, 1, now());
    let (rel, _, _) = take(&mut s);
    assert_eq!(rel.len(), 1);
    s.release_done("acme", None, true, now());
    s.evict_idle(now());
    assert_eq!(s.stats().keys, 1, "bucket not yet full");
    // 10/s with burst 2, one taken: full again 100 ms after.
    tokio::time::advance(Duration::from_millis(99)).await;
    s.evict_idle(now());
    assert_eq!(s.stats().keys, 1, "bucket not yet full");
    tokio::time::advance(Duration::from_millis(1)).await;
    s.evict_idle(now());
    assert_eq!(s.stats().keys, 0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_release_of_a_parked_job_reads_it_again() {
    let mut s = sched(TEN_PER_SEC, 500);
    s.restore_parked("acme", 1, 0, now());
    take(&mut s);
    s.loaded("acme", Ok(Some((7, 5, 5))), now());
    let (rel, _, _) = take(&mut s);
    assert_eq!(rel, vec![("acme".to_string(), 5, Some(7))]);
    s.release_done("acme", Some(7), false, now());
    let (_, loads, _) = take(&mut s);
    assert_eq!(loads, vec![("acme".to_string(), 7)]);
}

/// After a crash: parked jobs 100 and 200 (sources 10 and 11) are read back, and 11 was also
/// redelivered fresh. Reading 200 finds the duplicate, but the park may be purged only below the
/// lowest parked job still queued: 100 has not left yet, and would be lost with a purge below
/// 201.
#[tokio::test(start_paused = true)]
async fn a_duplicate_parked_copy_never_purges_parked_jobs_not_yet_released() {
    let mut s = sched("[limits.default]\nrate = \"1/s\"\nburst = 1", 5_000);
    s.restore_parked("acme", 2, 0, now());
    take(&mut s);
    s.offer("acme", 11, true, 11, now());
    // The bucket's one token goes to nothing yet: 11 waits behind the parked jobs.
    s.loaded("acme", Ok(Some((100, 10, 10))), now());
    s.loaded("acme", Ok(Some((200, 11, 11))), now());
    let (rel, _, purges) = take(&mut s);
    assert!(
        purges.iter().all(|(_, below)| *below <= 100),
        "purged {purges:?} while parked job 100 is queued (released {rel:?})"
    );
    // 100 leaves; then the park may be purged below 201.
    let released: Vec<_> = rel.iter().map(|r| (r.1, r.2)).collect();
    let mut done = released.clone();
    while !done.iter().any(|&(src, _)| src == 10) {
        let wake = s.next_wake().expect("a timer");
        tokio::time::advance(Duration::from_nanos(
            wake.as_u64().saturating_sub(now().as_u64()),
        ))
        .await;
        s.fire(now());
        done.extend(take(&mut s).0.iter().map(|r| (r.1, r.2)));
    }
    s.release_done("acme", Some(100), true, now());
    let (_, _, purges) = take(&mut s);
    assert!(purges.iter().all(|(_, below)| *below <= 201), "{purges:?}");
}

/// After a NATS crash that lost the consumer's state, job 7, held fresh in memory, is delivered
/// again as a first delivery. Parked, that second delivery would ack the job's source; its
/// parked copy, read back, was then taken for a redundant duplicate of the fresh one and purged,
/// leaving the job only in memory (`weir chaos` with a NATS restart lost it at the next kill).
/// The second delivery is held, not parked; and a parked copy read back beside a fresh one stays
/// in the park until its own release is acked.
#[tokio::test(start_paused = true)]
async fn a_job_delivered_twice_is_never_left_only_in_memory() {
    // 1/s, burst 1, 5 s horizon: at most 6 held.
    let mut s = sched("[limits.default]\nrate = \"1/s\"\nburst = 1", 5_000);
    for seq in 1..=7 {
        assert!(matches!(
            s.offer("acme", seq, false, seq, now()),
            Offer::Held
        ));
    }
    assert!(
        matches!(s.offer("acme", 7, false, 7, now()), Offer::Held),
        "7 is held already: its second delivery is held too, not parked"
    );
    assert!(matches!(
        s.offer("acme", 8, false, 8, now()),
        Offer::Park(..)
    ));

    // A parked copy of a job held fresh is read back (as after a crash): it is queued, and the
    // park is purged past it only once its own release is acked.
    let mut s = sched("[limits.default]\nrate = \"1/s\"\nburst = 1", 5_000);
    s.restore_parked("acme", 1, 0, now());
    take(&mut s);
    s.offer("acme", 11, true, 11, now());
    s.loaded("acme", Ok(Some((100, 11, 11))), now());
    let (rel, _, purges) = take(&mut s);
    assert!(
        purges.is_empty(),
        "purged {purges:?} before 11 was released"
    );
    assert_eq!(rel, vec![("acme".to_string(), 11, Some(100))]);
    s.release_done("acme", Some(100), true, now());
    let mut purges = take(&mut s).2;
    while purges.is_empty() {
        let wake = s
            .next_wake()
            .expect("the fresh copy still waits for a token");
        tokio::time::advance(Duration::from_nanos(
            wake.as_u64().saturating_sub(now().as_u64()),
        ))
        .await;
        s.fire(now());
        let (rel, _, p) = take(&mut s);
        assert!(rel.iter().all(|r| r.1 == 11), "{rel:?}");
        purges = p;
    }
    assert_eq!(purges, vec![("acme".to_string(), 101)]);
}

/// A job held past `ack_wait` is delivered again (after a restart every unacked job of a key is
/// held, however long its backlog). Each delivery queued a copy, and each copy took a token:
/// a kill -9 left 600 jobs of a hot key in 2 to 11 copies, released at a tenth of its rate. A
/// job is held once, with its newest delivery's ack handle.
#[tokio::test(start_paused = true)]
async fn a_job_delivered_again_while_held_is_released_once_with_its_newest_delivery() {
    let mut s = sched("[limits.default]\nrate = \"10/s\"\nburst = 1", 5_000);
    for seq in 1..=5 {
        s.offer("acme", seq, true, seq, now());
    }
    for round in 1..=2 {
        for seq in 2..=5 {
            assert!(matches!(
                s.offer("acme", seq, true, 100 * round + seq, now()),
                Offer::Held
            ));
        }
    }
    assert_eq!(s.stats().held, 4, "one copy each of 2..=5 held");
    let mut released = Vec::new();
    loop {
        let mut acts = Vec::new();
        s.take_actions(&mut acts);
        for a in acts {
            if let Action::Release { key, job } = a {
                released.push(job.job);
                s.release_done(&key, None, true, now());
            }
        }
        let Some(wake) = s.next_wake() else { break };
        tokio::time::advance(Duration::from_nanos(
            wake.as_u64().saturating_sub(now().as_u64()),
        ))
        .await;
        s.fire(now());
    }
    assert_eq!(released, vec![1, 202, 203, 204, 205]);
}

#[tokio::test(start_paused = true)]
async fn past_the_partition_budget_keys_park_even_within_their_horizon() {
    let c = Config::from_toml(
        "[limits.default]\nrate = \"10/s\"\nburst = 1",
        "t",
        &Overrides::default(),
    )
    .unwrap();
    // max_held 8: at most 6 fresh jobs held, although each key's horizon would hold 51.
    let mut s: Scheduler<u64> =
        Scheduler::new(Arc::new(Limits::from_config(&c)), Duration::from_secs(5), 8);
    let mut parked = 0;
    for seq in 1..=10 {
        if let Offer::Park(..) = s.offer("acme", seq, false, seq, now()) {
            parked += 1;
        }
    }
    assert_eq!(
        (s.stats().held, parked),
        (6, 3),
        "1 released, 6 held, 3 parked"
    );
    assert!(
        matches!(s.offer("acme", 11, true, 11, now()), Offer::Held),
        "redeliveries are never parked"
    );
}

#[tokio::test(start_paused = true)]
async fn after_a_restart_newer_jobs_wait_for_the_previous_runs_unacked_ones() {
    let mut s = sched(TEN_PER_SEC, 5_000);
    let until = Nanos::new(now().as_u64() + 60_000_000_000);
    s.fence("acme", vec![8, 7], until);
    // Redelivered out of order after a NAK: 8, then a newer fresh 9, then 7.
    s.offer("acme", 8, true, 8, now());
    s.offer("acme", 9, false, 9, now());
    assert!(take(&mut s).0.is_empty(), "7 is still to come back");
    s.offer("acme", 7, true, 7, now());
    let (rel, _, _) = take(&mut s);
    assert_eq!(
        rel.iter().map(|r| r.1).collect::<Vec<_>>(),
        vec![7, 8],
        "burst 2, in order"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fence_whose_jobs_never_come_back_lifts_at_its_deadline() {
    let mut s = sched(TEN_PER_SEC, 5_000);
    s.fence("acme", vec![3], Nanos::new(now().as_u64() + 1_000_000_000));
    s.offer("acme", 4, false, 4, now());
    assert!(take(&mut s).0.is_empty());
    tokio::time::advance(Duration::from_secs(1)).await;
    s.fire(now());
    assert_eq!(take(&mut s).0.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_refused_release_holds_back_newer_jobs_of_its_key_until_it_returns() {
    let mut s = sched(TEN_PER_SEC, 5_000);
    // 1 and 2 leave (burst 2); 1's publish is refused and it goes back to JetStream.
    s.offer("acme", 1, false, 1, now());
    s.offer("acme", 2, false, 2, now());
    assert_eq!(take(&mut s).0.len(), 2);
    let until = Nanos::new(now().as_u64() + 60_000_000_000);
    s.fence_one("acme", 1, until);
    assert!(
        s.behind_refused("acme", 2, None),
        "2 was decided before 1 was refused"
    );
    assert!(!s.behind_refused("acme", 1, None));
    assert!(!s.behind_refused("other", 9, None));
    s.fence_one("acme", 2, until);
    s.release_done("acme", None, false, now());
    s.release_done("acme", None, false, now());
    // A fresh 3 waits for both; they come back out of order and leave in order.
    s.offer("acme", 3, false, 3, now());
    s.offer("acme", 2, true, 2, now());
    assert!(take(&mut s).0.is_empty(), "1 is still to come back");
    s.offer("acme", 1, true, 1, now());
    let mut order: Vec<u64> = take(&mut s).0.iter().map(|r| r.1).collect();
    while let Some(wake) = s.next_wake() {
        let wait = wake.as_u64().saturating_sub(now().as_u64());
        tokio::time::advance(Duration::from_nanos(wait)).await;
        s.fire(now());
        order.extend(take(&mut s).0.iter().map(|r| r.1));
    }
    assert_eq!(order, vec![1, 2, 3]);
}

/// Advances to the next timer and fires it; returns how many releases it produced.
async fn step(s: &mut Scheduler<u64>) -> Option<usize> {
    let wake = s.next_wake()?;
    tokio::time::advance(Duration::from_nanos(
        wake.as_u64().saturating_sub(now().as_u64()),
    ))
    .await;
    s.fire(now());
    Some(take(s).0.len())
}

fn with_key(s: &Scheduler<u64>, key: &str, json: &str) -> Arc<Limits> {
    let mut l = (*s.limits).clone();
    l.apply(
        &format!("keys.{key}"),
        Some(json.as_bytes()),
        l.revision + 1,
    )
    .unwrap();
    Arc::new(l)
}

#[tokio::test(start_paused = true)]
async fn a_raised_limit_speeds_up_a_backlog_at_once() {
    // A horizon long enough that nothing is parked (this test does not play the park).
    let mut s = sched("[limits.default]\nrate = \"1/s\"", 200_000);
    for seq in 1..=150 {
        s.offer("acme", seq, false, seq, now());
    }
    assert_eq!(take(&mut s).0.len(), 1);
    // The old timer was a second away; the new limit applies now.
    let l = with_key(&s, "acme", r#"{"rate": "100/s", "burst": 1}"#);
    s.set_limits(l, now());
    let start = now();
    let mut released = 0;
    while released < 100 {
        released += step(&mut s).await.expect("a timer");
    }
    let took = now().as_u64() - start.as_u64();
    assert!(took <= 1_010_000_000, "100 jobs took {took} ns at 100/s");
}

#[tokio::test(start_paused = true)]
async fn a_lowered_limit_never_exceeds_the_new_bound_after_it_applies() {
    let mut s = sched("[limits.default]\nrate = \"100/s\"\nburst = 10", 60_000);
    for seq in 1..=1000 {
        s.offer("acme", seq, false, seq, now());
    }
    assert_eq!(take(&mut s).0.len(), 10);
    step(&mut s).await;
    let l = with_key(&s, "acme", r#"{"rate": "2/s", "burst": 1}"#);
    s.set_limits(l, now());
    let applied = now().as_u64();
    let mut times = Vec::new();
    while now().as_u64() - applied < 10_000_000_000 {
        let n = step(&mut s).await.expect("a timer");
        times.extend(std::iter::repeat_n(now().as_u64() - applied, n));
    }
    // burst + floor(t / T) for every window from the moment it applied.
    for (n, &t) in (1u64..).zip(times.iter()) {
        assert!(n <= 1 + t / 500_000_000, "{} releases by {t} ns", n);
    }
    assert!(times.len() >= 18, "{} releases in 10 s at 2/s", times.len());
}

#[tokio::test(start_paused = true)]
async fn a_paused_key_holds_everything_until_raised() {
    let mut s = sched(
        "[limits.default]\nrate = \"10/s\"\n[limits.keys.acme]\nrate = \"0/s\"\nburst = 5",
        5_000,
    );
    for seq in 1..=5 {
        s.offer("acme", seq, false, seq, now());
    }
    assert!(take(&mut s).0.is_empty(), "a paused key releases nothing");
    tokio::time::advance(Duration::from_secs(3600)).await;
    s.fire(now());
    s.evict_idle(now());
    assert!(take(&mut s).0.is_empty(), "not after an hour either");
    let l = with_key(&s, "acme", r#"{"rate": "10/s", "burst": 5}"#);
    s.set_limits(l, now());
    let mut released = take(&mut s).0.len();
    while released < 5 {
        released += step(&mut s).await.expect("a timer");
    }
    // Paused again: nothing new leaves, even for a key with no backlog.
    let l = with_key(&s, "acme", r#"{"rate": "0/s"}"#);
    s.set_limits(l, now());
    s.offer("acme", 6, false, 6, now());
    tokio::time::advance(Duration::from_secs(10)).await;
    s.fire(now());
    assert!(take(&mut s).0.is_empty());
    assert_eq!(s.stats().held, 1);
}

#[tokio::test(start_paused = true)]
async fn a_default_change_moves_keys_without_a_limit_of_their_own() {
    let mut s = sched(
        "[limits.default]\nrate = \"1/s\"\n[limits.keys.vip]\nrate = \"1/s\"",
        60_000,
    );
    for seq in 1..=100 {
        s.offer("plain", seq, false, seq, now());
        s.offer("vip", 1000 + seq, false, seq, now());
    }
    take(&mut s);
    let mut l = (*s.limits).clone();
    l.apply("default", Some(br#"{"rate": "50/s"}"#), 1).unwrap();
    s.set_limits(Arc::new(l), now());
    tokio::time::advance(Duration::from_millis(500)).await;
    s.fire(now());
    let mut plain = 0;
    let mut vip = 0;
    let start = now();
    while now().as_u64() - start.as_u64() < 1_000_000_000 {
        let Some(w) = s.next_wake() else { break };
        tokio::time::advance(Duration::from_nanos(
            w.as_u64().saturating_sub(now().as_u64()),
        ))
        .await;
        s.fire(now());
        for (k, _, _) in take(&mut s).0 {
            if k == "plain" {
                plain += 1
            } else {
                vip += 1
            }
        }
    }
    assert!(plain >= 45, "the default moved plain: {plain}");
    assert!(vip <= 2, "vip keeps its own limit: {vip}");
}

impl Routed for (u64, &'static str) {
    fn dest(&self) -> &str {
        self.1
    }
}

/// Runs timers for `secs` seconds; returns each release as (ms since start, key, dest).
async fn run_for(
    s: &mut Scheduler<(u64, &'static str)>,
    secs: u64,
) -> Vec<(u64, String, &'static str)> {
    let start = now().as_u64();
    let mut out = Vec::new();
    loop {
        let mut acts = Vec::new();
        s.take_actions(&mut acts);
        for a in acts {
            if let Action::Release { key, job } = a {
                out.push((
                    (now().as_u64() - start) / 1_000_000,
                    key.to_string(),
                    job.job.1,
                ));
                s.release_done(&key, None, true, now());
            }
        }
        let Some(w) = s.next_wake() else { break };
        if w.as_u64() > start + secs * 1_000_000_000 {
            break;
        }
        tokio::time::advance(Duration::from_nanos(
            w.as_u64().saturating_sub(now().as_u64()),
        ))
        .await;
        s.fire(now());
    }
    out
}

/// The GCRA bound on release times (ms, sorted): at most `burst + floor(t / T)` in any window.
fn assert_bound(times_ms: &[u64], burst: u64, period_ms: u64) {
    for (i, &a) in times_ms.iter().enumerate() {
        for (j, &b) in times_ms.iter().enumerate().skip(i) {
            assert!(
                (j - i + 1) as u64 <= burst + (b - a) / period_ms,
                "{} releases in {} ms",
                j - i + 1,
                b - a
            );
        }
    }
}

fn capped(dest: &str, rate: &str, burst: u32) -> Caps {
    let limit = crate::config::Limit {
        rate: rate.parse().unwrap(),
        burst,
    };
    let mut caps = Caps::new();
    caps.insert(Key::from(dest), Arc::new(Bucket::new(&limit)));
    caps
}

#[tokio::test(start_paused = true)]
async fn a_destination_cap_bounds_the_sum_over_keys_and_shares_it_fairly() {
    let mut s = sched("[limits.default]\nrate = \"100/s\"\nburst = 5", 60_000);
    s.set_caps(&capped("sms", "20/s", 2), now());
    let mut seq = 0;
    // One hot key with a huge backlog, four cold ones with a few jobs each, and a key sending
    // elsewhere (uncapped).
    for _ in 0..3000 {
        seq += 1;
        s.offer("hot", seq, false, (seq, "sms"), now());
    }
    for k in ["c1", "c2", "c3", "c4"] {
        for _ in 0..10 {
            seq += 1;
            s.offer(k, seq, false, (seq, "sms"), now());
        }
    }
    for _ in 0..50 {
        seq += 1;
        s.offer("other", seq, false, (seq, "email"), now());
    }
    let rel = run_for(&mut s, 5).await;
    let sms: Vec<u64> = rel.iter().filter(|r| r.2 == "sms").map(|r| r.0).collect();
    assert_bound(&sms, 2, 50);
    assert!(
        sms.len() >= 95,
        "the cap is used: {} in 5 s at 20/s",
        sms.len()
    );
    // The cold keys are not starved by the hot one: all 40 of their jobs leave within the
    // first 5 s, while the hot key gets the rest.
    let cold = rel.iter().filter(|r| r.1.starts_with('c')).count();
    assert_eq!(cold, 40, "cold keys' jobs released");
    let hot = rel.iter().filter(|r| r.1 == "hot").count();
    assert!(hot >= 50, "the hot key still flows: {hot}");
    // An uncapped destination is not held back by the cap.
    let other = rel.iter().filter(|r| r.1 == "other").count();
    assert_eq!(other, 50);
}

/// Two partitions share a destination's bucket, and their timers for it fall due at the same
/// moment. The one whose task runs first must not take every token: a partition that finds the
/// bucket empty claims the next token, so they take turns.
#[tokio::test(start_paused = true)]
async fn partitions_sharing_a_cap_take_turns() {
    let caps = capped("sms", "20/s", 2);
    let config = "[limits.default]\nrate = \"100/s\"\nburst = 5";
    let (mut a, mut b) = (sched(config, 60_000), sched(config, 60_000));
    a.set_caps(&caps, now());
    b.set_caps(&caps, now());
    for seq in 1..=400 {
        a.offer("hot", seq, false, (seq, "sms"), now());
    }
    for seq in 401..=410 {
        b.offer("cold", seq, false, (seq, "sms"), now());
    }
    let start = now().as_u64();
    let mut rel: Vec<(u64, String)> = Vec::new();
    loop {
        for s in [&mut a, &mut b] {
            let mut acts = Vec::new();
            s.take_actions(&mut acts);
            for act in acts {
                if let Action::Release { key, .. } = act {
                    rel.push(((now().as_u64() - start) / 1_000_000, key.to_string()));
                    s.release_done(&key, None, true, now());
                }
            }
        }
        let Some(w) = a.next_wake().into_iter().chain(b.next_wake()).min() else {
            break;
        };
        if w.as_u64() > start + 3_000_000_000 {
            break;
        }
        tokio::time::advance(Duration::from_nanos(
            w.as_u64().saturating_sub(now().as_u64()),
        ))
        .await;
        // Always in this order: `a` runs first every time.
        a.fire(now());
        b.fire(now());
    }
    let cold: Vec<u64> = rel.iter().filter(|r| r.1 == "cold").map(|r| r.0).collect();
    assert_eq!(cold.len(), 10, "the cold key's jobs all left within 3 s");
    // Turns: one token in two for each, so the cold key's 10 jobs leave within about 1 s.
    assert!(cold[9] <= 1_200, "cold jobs at {cold:?} ms");
    let times: Vec<u64> = rel.iter().map(|r| r.0).collect();
    assert_bound(&times, 2, 50);
    assert!(times.len() >= 55, "the cap is used: {} in 3 s", times.len());
}

#[tokio::test(start_paused = true)]
async fn a_destination_cap_removed_releases_its_queue_at_the_keys_rates() {
    let mut s = sched("[limits.default]\nrate = \"100/s\"", 60_000);
    s.set_caps(&capped("sms", "1/s", 1), now());
    for seq in 1..=100 {
        s.offer("a", seq, false, (seq, "sms"), now());
    }
    assert_eq!(run_for(&mut s, 1).await.len(), 2);
    s.set_caps(&Caps::new(), now());
    let rel = run_for(&mut s, 2).await;
    assert_eq!(rel.len(), 98, "the rest leave at the key's own 100/s");
}

#[tokio::test(start_paused = true)]
async fn with_a_key_window_of_one_a_key_waits_for_its_previous_release() {
    // Unlimited rate: without the window all five would leave at once.
    let mut s: Scheduler<u64> = sched(
        "[limits.default]\nrate = \"1000000/s\"\nburst = 1000",
        5_000,
    )
    .with_key_window(1);
    for seq in 1..=5 {
        s.offer("hot", seq, false, seq, now());
    }
    s.offer("cold", 6, false, 6, now());
    let (rel, _, _) = take(&mut s);
    assert_eq!(
        rel.iter().map(|r| (r.0.as_str(), r.1)).collect::<Vec<_>>(),
        vec![("hot", 1), ("cold", 6)],
        "one release of a key in flight; other keys do not wait"
    );
    // Each completion lets the next one go, in order, whether the publish was acked or not.
    let mut order = vec![1];
    for ok in [true, true, true, true] {
        let last = *order.last().unwrap();
        s.release_done("hot", None, ok, now());
        let (rel, _, _) = take(&mut s);
        assert_eq!(rel.len(), 1, "after {last}");
        order.push(rel[0].1);
    }
    assert_eq!(order, vec![1, 2, 3, 4, 5]);
    s.release_done("hot", None, true, now());
    assert!(take(&mut s).0.is_empty());
    // Nothing in flight any more: the fast path again.
    s.offer("hot", 7, false, 7, now());
    assert_eq!(take(&mut s).0.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_refused_release_with_a_key_window_of_one_is_not_overtaken() {
    let mut s: Scheduler<u64> = sched(TEN_PER_SEC, 5_000).with_key_window(1);
    s.offer("acme", 1, false, 1, now());
    s.offer("acme", 2, false, 2, now());
    assert_eq!(
        take(&mut s).0.len(),
        1,
        "2 waits for 1's ack although the burst allows it"
    );
    // 1's publish is refused (connection lost): it goes back to JetStream, fenced.
    s.fence_one("acme", 1, Nanos::new(now().as_u64() + 60_000_000_000));
    s.release_done("acme", None, false, now());
    assert!(take(&mut s).0.is_empty(), "2 waits for 1 to come back");
    s.offer("acme", 1, true, 1, now());
    assert_eq!(complete_all(&mut s, "acme").await, vec![1, 2]);
}

/// Acks every release as it comes and advances to each timer until the key has nothing left;
/// returns the source sequences in release order.
async fn complete_all(s: &mut Scheduler<u64>, key: &str) -> Vec<u64> {
    let mut order = Vec::new();
    loop {
        let rel = take(s).0;
        if rel.is_empty() {
            let Some(wake) = s.next_wake() else {
                return order;
            };
            let wait = wake.as_u64().saturating_sub(now().as_u64());
            tokio::time::advance(Duration::from_nanos(wait)).await;
            s.fire(now());
            continue;
        }
        for r in rel {
            order.push(r.1);
            s.release_done(key, None, true, now());
        }
    }
}
