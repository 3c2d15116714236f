//! Faults under load, against a real nats-server: a full `WEIR_RELEASED`, a NATS restart, publish
//! acks that time out. Each ends with a ledger check: every job published is in `WEIR_RELEASED`
//! exactly once, each key in order.
//!
//! Static partitions (`owned_partitions`) keep the group's leases out of these tests: a NATS
//! outage longer than 2/3 of a lease fences every partition, which `tests/cluster.rs` covers.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::{Config as StreamConfig, DiscardPolicy, StorageType};

use common::*;

const RELEASED: &str = "WEIR_RELEASED";
const JOBS: &str = "WEIR_JOBS";

/// Static ownership of all four partitions: no group, no leases.
const FOUR: &str = "partitions = 4\nowned_partitions = [0, 1, 2, 3]\n";

fn ledger_check(stored: &[Stored], keys: &[&str], per_key: usize) {
    let want: BTreeMap<String, usize> = keys.iter().map(|k| (k.to_string(), per_key)).collect();
    assert_eq!(stored.len(), keys.len() * per_key, "released count");
    assert_fifo_complete(&by_key(stored.iter().map(|m| &m.payload)), &want);
}

/// Downstream stopped: an operator's `WEIR_RELEASED` is at its message limit with
/// `discard: new`. Weir holds every job it cannot release (none is acked), backs off, and
/// releases them all, in order, once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_released_stream_holds_jobs_unacked_until_there_is_room() {
    let env = Env::start().await;
    let room = 40;
    env.js
        .create_stream(StreamConfig {
            name: RELEASED.into(),
            subjects: vec!["released.>".into()],
            storage: StorageType::File,
            max_messages: room,
            discard: DiscardPolicy::New,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .expect("create a small WEIR_RELEASED");
    let weir = InProc::start(
        &env,
        &format!("{FOUR}[limits.default]\nrate = \"1000/s\"\nburst = 100\n"),
    )
    .await;
    let keys = ["a", "b", "c", "d"];
    let per_key = 50;
    let total = (keys.len() * per_key) as u64;
    env.publish_all(
        (0..per_key).flat_map(|i| keys.map(|k| Job::seq("sms", k, i))),
        100,
    )
    .await;
    env.wait_stream_len(RELEASED, room as u64, Duration::from_secs(10))
        .await;
    // Several rounds of refusals and retries (the backoff doubles from 50 ms)...
    let refused = eventually("repeated refusals", Duration::from_secs(20), || async {
        let n = metric_total(&scrape(weir.http).await, "weir_publish_refused_total");
        if n >= 20.0 {
            Ok(n)
        } else {
            Err(format!("{n} refusals"))
        }
    })
    .await;
    // ...and not one refused job was acked: everything not released is still in WEIR_JOBS.
    for _ in 0..3 {
        let (jobs, rel) = (env.stream_len(JOBS).await, env.stream_len(RELEASED).await);
        assert_eq!(rel, room as u64);
        assert_eq!(jobs + rel, total, "jobs acked without a stored release");
    }
    // Downstream catches up: room again.
    let mut cfg = env
        .js
        .get_stream(RELEASED)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    cfg.max_messages = -1;
    env.js.update_stream(cfg).await.expect("raise the limit");
    let opened = Instant::now();
    env.wait_all_released(total, Duration::from_secs(30)).await;
    ledger_check(&env.read_stream(RELEASED).await, &keys, per_key);
    eprintln!(
        "{refused} refusals while full; all {total} released {} ms after room was made",
        opened.elapsed().as_millis()
    );
}

/// nats-server killed (`kill -9`, file store) and restarted mid-run: `/healthz` keeps
/// answering, `/readyz` fails while NATS is away, Weir is ready again within 5 s of the
/// restart, and every job is released exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_loses_nothing_and_weir_resumes_within_5s() {
    let mut env = Env::start().await;
    let weir = InProc::start(
        &env,
        &format!("{FOUR}[limits.default]\nrate = \"200/s\"\nburst = 10\n"),
    )
    .await;
    let keys = ["k1", "k2", "k3", "k4", "k5", "k6"];
    let per_key = 300; // 1.5 s of each key's rate: the restart lands mid-run
    let total = (keys.len() * per_key) as u64;
    env.publish_all(
        (0..per_key).flat_map(|i| keys.map(|k| Job::seq("sms", k, i))),
        256,
    )
    .await;
    env.wait_stream_at_least(RELEASED, total / 4, Duration::from_secs(10))
        .await;

    env.nats.kill();
    let readyz_fails = eventually("/readyz to fail", Duration::from_secs(10), || async {
        match http_get(weir.http, "/readyz").await {
            Ok((503, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let () = readyz_fails;
    let (code, _) = http_get(weir.http, "/healthz").await.expect("GET /healthz");
    assert_eq!(code, 200, "/healthz must answer while NATS is away");

    env.nats.restart().expect("restart nats-server");
    let restarted = Instant::now();
    eventually(
        "/readyz after the restart",
        Duration::from_secs(5),
        || async {
            match http_get(weir.http, "/readyz").await {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let ready_after = restarted.elapsed();
    // Releases resume: the stream grows again within the same 5 s.
    let before = env.stream_len(RELEASED).await;
    if before < total {
        env.wait_stream_at_least(RELEASED, before + 1, Duration::from_secs(5))
            .await;
    }
    let resumed_after = restarted.elapsed();
    env.wait_all_released(total, Duration::from_secs(30)).await;
    ledger_check(&env.read_stream(RELEASED).await, &keys, per_key);
    eprintln!(
        "ready {} ms and releasing {} ms after nats-server restarted",
        ready_after.as_millis(),
        resumed_after.as_millis()
    );
}

/// nats-server stopped (SIGSTOP) for longer than the publish ack timeout (5 s), then resumed:
/// the releases sent meanwhile were stored but their acks came too late. Weir treats them as
/// refused and releases them again; `WEIR_RELEASED`'s duplicate window keeps one copy each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_publish_acks_are_retried_without_duplicates() {
    let env = Env::start().await;
    let weir = InProc::start(
        &env,
        &format!("{FOUR}[limits.default]\nrate = \"100/s\"\nburst = 5\n"),
    )
    .await;
    let keys = ["t1", "t2", "t3", "t4"];
    let per_key = 800; // 8 s of each key's rate: releases are due throughout the stall
    let total = (keys.len() * per_key) as u64;
    env.publish_all(
        (0..per_key).flat_map(|i| keys.map(|k| Job::seq("sms", k, i))),
        256,
    )
    .await;
    env.wait_stream_at_least(RELEASED, 100, Duration::from_secs(10))
        .await;
    let pid = env.nats.pid().expect("nats-server runs");
    signal(pid, "-STOP");
    // Longer than async-nats' 5 s publish ack timeout. Sleeping is the fault itself here,
    // not a synchronisation: nothing observable marks "the client timed out".
    tokio::time::sleep(Duration::from_millis(6500)).await;
    signal(pid, "-CONT");
    env.wait_all_released(total, Duration::from_secs(60)).await;
    ledger_check(&env.read_stream(RELEASED).await, &keys, per_key);
    let s = scrape(weir.http).await;
    let (refused, dups) = (
        metric_total(&s, "weir_publish_refused_total"),
        metric_total(&s, "weir_jobs_duplicates_total"),
    );
    assert!(refused > 0.0, "no publish ack timed out during the stall");
    assert!(
        dups > 0.0,
        "a timed-out release was stored, so its retry must be a duplicate"
    );
    eprintln!("{refused} publishes timed out; {dups} re-releases absorbed as duplicates");
}

/// libfaketime, which steps the wall clock of the process it is preloaded into (Debian's
/// `faketime` package; `scripts/setup.sh` installs it).
fn libfaketime() -> Option<String> {
    if let Ok(p) = std::env::var("WEIR_LIBFAKETIME") {
        return Some(p);
    }
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    candidates
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        .map(|p| p.to_string())
}

/// The wall clock of a running Weir steps an hour forward, then two hours back: its key keeps
/// its rate (decisions read the monotonic clock only), while the `Weir-Released-At` stamps,
/// which are wall-clock by design, show the steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_steps_do_not_change_rates() {
    let lib = libfaketime().expect(
        "libfaketime is needed to step Weir's wall clock: run `source scripts/setup.sh` \
         (it installs Debian's faketime package) or set WEIR_LIBFAKETIME",
    );
    let env = Env::start().await;
    let offset = tempfile::NamedTempFile::new().expect("offset file");
    std::fs::write(offset.path(), "+0\n").unwrap();
    let offset_path = offset.path().to_str().unwrap().to_string();
    let weir = Proc::start_with(
        &env.url(),
        &format!("{FOUR}[limits.default]\nrate = \"100/s\"\nburst = 5\n"),
        &[
            ("LD_PRELOAD", lib.as_str()),
            ("FAKETIME_TIMESTAMP_FILE", offset_path.as_str()),
            // Step CLOCK_REALTIME only; CLOCK_MONOTONIC stays true.
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ("FAKETIME_CACHE_DURATION", "1"),
        ],
        None,
    )
    .await;
    let collector = Collector::start(&env.client, "released.>").await;
    let n = 800; // 8 s at 100/s: releases keep flowing through both steps
    env.publish_all((0..n).map(|i| Job::seq("sms", "steady", i)), 256)
        .await;
    let hour: i64 = 3_600_000;
    let stamp_offset = |s: &Seen| s.released_ms() as i64 - unix_ms() as i64;
    collector.wait_for(50, Duration::from_secs(10)).await;
    std::fs::write(offset.path(), "+1h\n").unwrap();
    eventually(
        "Weir's wall clock an hour ahead",
        Duration::from_secs(8),
        || async {
            let last = collector.snapshot().last().map(stamp_offset).unwrap_or(0);
            (last > hour - 60_000)
                .then_some(())
                .ok_or(format!("stamp offset {last} ms"))
        },
    )
    .await;
    std::fs::write(offset.path(), "-1h\n").unwrap();
    eventually(
        "Weir's wall clock an hour behind",
        Duration::from_secs(8),
        || async {
            let last = collector.snapshot().last().map(stamp_offset).unwrap_or(0);
            (last < -hour + 60_000)
                .then_some(())
                .ok_or(format!("stamp offset {last} ms"))
        },
    )
    .await;
    let seen = collector.wait_for(n, Duration::from_secs(20)).await;
    drop(weir);

    // Arrival instants in this (unfaked) process. A bucket refilled by a forward step would
    // show as a burst of hundreds; network jitter of a few ms costs at most a couple of jobs.
    let t0 = seen[0].at;
    let at: Vec<u64> = seen
        .iter()
        .map(|s| (s.at - t0).as_millis() as u64)
        .collect();
    let (burst, period) = (5u64, 10u64);
    for i in 0..at.len() {
        for j in i..at.len() {
            let bound = burst + (at[j] - at[i]) / period + 3;
            assert!(
                (j - i + 1) as u64 <= bound,
                "{} releases in {} ms across the clock steps (bound {bound})",
                j - i + 1,
                at[j] - at[i]
            );
        }
    }
    let span = at[at.len() - 1];
    let floor = (n as u64 - burst) * period * 9 / 10;
    assert!(
        span >= floor,
        "{n} jobs at 100/s left in {span} ms (< {floor})"
    );
    let want = BTreeMap::from([("steady".to_string(), n)]);
    assert_fifo_complete(&by_key(seen.iter().map(|s| &s.payload)), &want);
    eprintln!("{n} jobs across +1h and -1h steps: {span} ms, bound held");
}
