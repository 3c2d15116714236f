//! End-to-end tests of the pipeline against a real nats-server, with Weir running in-process.
//!
//! Each test has its own nats-server (fresh store, own port) and its own config; they synchronise
//! on events (counts, readiness) with deadlines, never on fixed sleeps.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use async_nats::header::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;

use common::*;

const RELEASED: &str = "WEIR_RELEASED";
const JOBS: &str = "WEIR_JOBS";
const PARK: &str = "WEIR_PARK";
const DEAD: &str = "WEIR_DEAD";

/// Keys under their limit go straight through; the released job is the producer's job plus
/// Weir's headers, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_keeps_payload_and_headers() {
    let env = Env::start().await;
    let _weir = InProc::start(
        &env,
        r#"
partitions = 4
[limits.default]
rate = "1000/s"
burst = 200
"#,
    )
    .await;
    let collector = Collector::start(&env.client, "released.>").await;

    // 40 jobs over 4 keys and 2 destinations; every other job carries its own Nats-Msg-Id (kept as
    // Weir-Producer-Msg-Id);
    // payloads are binary (all byte values), one is empty; each carries a trace header, and a
    // multi-valued header, to be kept as sent.
    let mut jobs = Vec::new();
    for i in 0..40usize {
        let key = format!("k{}", i % 4);
        let dest = if i % 3 == 0 { "email" } else { "sms" };
        let mut h = HeaderMap::new();
        h.insert("X-Trace", format!("t{i}").as_str());
        h.append("X-Multi", "one");
        h.append("X-Multi", "two");
        if i % 2 == 0 {
            h.insert("Nats-Msg-Id", format!("producer-{i}").as_str());
        }
        let payload = if i == 7 {
            Bytes::new()
        } else {
            let mut p: Vec<u8> = (0..=255u8).collect();
            p.extend_from_slice(format!("#{i}").as_bytes());
            Bytes::from(p)
        };
        jobs.push((
            i,
            key,
            dest,
            Job {
                subject: format!("jobs.{dest}.k{}", i % 4),
                headers: Some(h),
                payload,
            },
        ));
    }
    let before_ms = unix_ms();
    let started = Instant::now();
    let seqs = env
        .publish_all(jobs.iter().map(|(_, _, _, j)| j.clone()), 64)
        .await;
    let after_ms = unix_ms();

    let seen = collector.wait_for(40, Duration::from_secs(10)).await;
    let last_arrival = seen.iter().map(|s| s.at).max().expect("some");
    assert!(
        last_arrival - started < Duration::from_secs(2),
        "40 jobs under their limit took {:?} to be released",
        last_arrival - started
    );

    env.wait_stream_len(RELEASED, 40, Duration::from_secs(10))
        .await;
    let stored = env.read_stream(RELEASED).await;
    let by_trace: HashMap<String, &Stored> = stored
        .iter()
        .map(|m| (m.header("X-Trace").expect("X-Trace kept").to_string(), m))
        .collect();
    assert_eq!(by_trace.len(), 40, "each job released once");
    for ((i, key, dest, job), seq) in jobs.iter().zip(&seqs) {
        let m = by_trace[&format!("t{i}")];
        assert_eq!(m.subject, format!("released.{dest}.{key}"), "job {i}");
        assert_eq!(m.payload, job.payload, "job {i}: payload byte-identical");
        let multi: Vec<&str> = m.headers.get_all("X-Multi").map(|v| v.as_str()).collect();
        assert_eq!(multi, ["one", "two"], "job {i}: multi-valued header kept");
        // Always the derived id; a producer's own is kept aside, not used downstream.
        let want_id = format!("WEIR_JOBS:{seq}");
        assert_eq!(m.header("Nats-Msg-Id"), Some(want_id.as_str()), "job {i}");
        let producer_id = (i % 2 == 0).then(|| format!("producer-{i}"));
        assert_eq!(
            m.header("Weir-Producer-Msg-Id"),
            producer_id.as_deref(),
            "job {i}"
        );
        assert_eq!(m.header("Weir-Key"), Some(key.as_str()), "job {i}");
        assert_eq!(m.header("Weir-Destination"), Some(*dest), "job {i}");
        let enq: u64 = m
            .header("Weir-Enqueued-At")
            .expect("enqueued")
            .parse()
            .expect("ms");
        let rel: u64 = m
            .header("Weir-Released-At")
            .expect("released")
            .parse()
            .expect("ms");
        // Same machine, same clock: the enqueue stamp is the stream's store time.
        assert!(
            enq + 5 >= before_ms && enq <= after_ms + 5,
            "job {i}: Weir-Enqueued-At {enq} outside the publish interval [{before_ms}, {after_ms}]"
        );
        assert!(
            rel >= enq && rel <= unix_ms(),
            "job {i}: Weir-Released-At {rel} not between enqueue {enq} and now"
        );
        assert!(
            rel - enq < 2000,
            "job {i}: held {} ms under its limit",
            rel - enq
        );
    }
    // Acked jobs leave the work queue; nothing was parked or dead-lettered.
    env.wait_stream_len(JOBS, 0, Duration::from_secs(10)).await;
    assert_eq!(env.stream_len(PARK).await, 0);
    assert_eq!(env.stream_len(DEAD).await, 0);
}

/// 100 jobs at once for a key at 20/s burst 5: every window of releases obeys the GCRA bound,
/// and the whole takes about (100 - burst) * T.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcra_bounds_release_rate() {
    let env = Env::start().await;
    let _weir = InProc::start(
        &env,
        r#"
partitions = 4
[limits.keys.gcra]
rate = "20/s"
burst = 5
"#,
    )
    .await;
    let collector = Collector::start(&env.client, "released.>").await;
    env.publish_all((0..100).map(|i| Job::seq("sms", "gcra", i)), 100)
        .await;
    let seen = collector.wait_for(100, Duration::from_secs(20)).await;
    assert_eq!(seen.len(), 100);
    let order = by_key(seen.iter().map(|s| &s.payload));
    assert_fifo_complete(&order, &BTreeMap::from([("gcra".to_string(), 100)]));

    let stamps: Vec<u64> = seen.iter().map(Seen::released_ms).collect();
    assert_gcra_bound(&stamps, 5, 50, "key gcra at 20/s burst 5");
    let span = stamps[99] - stamps[0];
    let ideal = 95 * 50;
    assert!(
        span as f64 >= ideal as f64 * 0.9,
        "100 jobs at 20/s burst 5 released in {span} ms, faster than (100 - 5) * 50 ms * 0.9"
    );
    assert!(
        span as f64 <= ideal as f64 * 1.5 + 2000.0,
        "100 jobs at 20/s burst 5 took {span} ms, ideal is {ideal} ms"
    );
    // Arrival instants at the subscriber tell the same story (looser: delivery adds jitter).
    let arrival_span = seen[99].at - seen[0].at;
    assert!(
        arrival_span >= Duration::from_millis(ideal * 9 / 10),
        "arrivals spanned only {arrival_span:?}"
    );
}

/// The first `burst` jobs leave back to back; the next waits one period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_leaves_back_to_back() {
    let env = Env::start().await;
    let _weir = InProc::start(
        &env,
        r#"
partitions = 4
[limits.keys.bursty]
rate = "2/s"
burst = 5
"#,
    )
    .await;
    let collector = Collector::start(&env.client, "released.>").await;
    env.publish_all((0..7).map(|i| Job::seq("sms", "bursty", i)), 7)
        .await;
    let seen = collector.wait_for(7, Duration::from_secs(10)).await;
    let order = by_key(seen.iter().map(|s| &s.payload));
    assert_fifo_complete(&order, &BTreeMap::from([("bursty".to_string(), 7)]));
    let t: Vec<u64> = seen.iter().map(Seen::released_ms).collect();
    assert!(
        t[4] - t[0] <= 50,
        "the burst of 5 was spread over {} ms: {t:?}",
        t[4] - t[0]
    );
    let burst_arrivals = seen[4].at - seen[0].at;
    assert!(
        burst_arrivals <= Duration::from_millis(100),
        "the burst of 5 arrived over {burst_arrivals:?}"
    );
    // 2/s: one more every 500 ms after the burst (stamps are whole ms, hence 499).
    assert!(
        t[5] >= t[0] + 499,
        "6th job only {} ms after the first: {t:?}",
        t[5] - t[0]
    );
    assert!(
        t[6] >= t[0] + 999,
        "7th job only {} ms after the first: {t:?}",
        t[6] - t[0]
    );
    assert!(
        t[6] - t[0] <= 2000,
        "7 jobs at 2/s burst 5 took {} ms",
        t[6] - t[0]
    );
}

/// Interleaved keys keep their own FIFO, including keys whose backlog goes past the in-memory
/// horizon and is parked; the park is emptied once everything is released; and parked keys still
/// obey their rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_fifo_through_the_park() {
    let env = Env::start().await;
    // horizon 500 ms at 50/s: a slow key holds burst + 25 jobs in memory, the rest is parked.
    let _weir = InProc::start(
        &env,
        r#"
partitions = 4
horizon_ms = 500
[limits.default]
rate = "50/s"
burst = 1
[limits.keys.fast]
rate = "10000/s"
burst = 1000
"#,
    )
    .await;
    let collector = Collector::start(&env.client, "released.>").await;
    let keys = ["a", "b", "c", "fast"];
    let per_key = 150;
    let jobs = (0..per_key).flat_map(|i| keys.map(|k| Job::seq("sms", k, i)));
    env.publish_all(jobs, 200).await;
    // The slow keys' surplus is parked (3 * (150 - 26) at most).
    let parked = env
        .wait_stream_at_least(PARK, 100, Duration::from_secs(10))
        .await;
    let total = keys.len() * per_key;
    collector.wait_for(total, Duration::from_secs(25)).await;
    env.wait_stream_len(RELEASED, total as u64, Duration::from_secs(10))
        .await;

    let want: BTreeMap<String, usize> = keys.iter().map(|k| (k.to_string(), per_key)).collect();
    let stored = env.read_stream(RELEASED).await;
    assert_fifo_complete(&by_key(stored.iter().map(|m| &m.payload)), &want);
    let seen = collector.snapshot();
    assert_eq!(seen.len(), total, "a core subscriber saw re-releases");
    assert_fifo_complete(&by_key(seen.iter().map(|s| &s.payload)), &want);

    for k in ["a", "b", "c"] {
        let stamps: Vec<u64> = seen
            .iter()
            .filter(|s| s.header("Weir-Key") == Some(k))
            .map(Seen::released_ms)
            .collect();
        assert_gcra_bound(&stamps, 1, 20, &format!("parked key {k} at 50/s burst 1"));
        let span = stamps[per_key - 1] - stamps[0];
        assert!(
            span >= (per_key as u64 - 1) * 20 * 9 / 10,
            "key {k}: {per_key} jobs at 50/s in {span} ms"
        );
    }
    // Purges happen as each key's queue empties: the park ends empty; so does the work queue.
    env.wait_stream_len(PARK, 0, Duration::from_secs(10)).await;
    env.wait_stream_len(JOBS, 0, Duration::from_secs(10)).await;
    eprintln!("parked at peak >= {parked}");
}

/// Invalid subjects end up in WEIR_DEAD with a reason, payload intact, and are never released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_subjects_are_dead_lettered() {
    let env = Env::start().await;
    let _weir = InProc::start(&env, "partitions = 4").await;
    let long_key = "k".repeat(300);
    let long_dest = "d".repeat(257);
    let cases = [
        ("jobs.onlyone".to_string(), "dead.invalid", "got 2 token(s)"),
        ("jobs.a.b.c".to_string(), "dead.invalid", "got 4 token(s)"),
        (
            format!("jobs.sms.{long_key}"),
            "dead.invalid",
            "key is 300 bytes, longer than 256",
        ),
        (
            format!("jobs.{long_dest}.acme"),
            "dead.invalid",
            "destination is 257 bytes, longer than 256",
        ),
    ];
    let mut h = HeaderMap::new();
    h.insert("X-Trace", "kept");
    let jobs = cases.iter().enumerate().map(|(i, (subject, _, _))| Job {
        subject: subject.clone(),
        headers: Some(h.clone()),
        payload: Bytes::from(format!("dead payload {i}\0\u{1}")),
    });
    let seqs = env.publish_all(jobs, 10).await;
    // A valid job after them, as a marker that the partitions have moved on.
    env.publish_all([Job::seq("sms", "ok", 0)], 1).await;

    env.wait_stream_len(DEAD, cases.len() as u64, Duration::from_secs(10))
        .await;
    env.wait_stream_len(RELEASED, 1, Duration::from_secs(10))
        .await;
    env.wait_stream_len(JOBS, 0, Duration::from_secs(10)).await;
    let dead = env.read_stream(DEAD).await;
    for (i, (subject, dead_subject, reason)) in cases.iter().enumerate() {
        let payload = Bytes::from(format!("dead payload {i}\0\u{1}"));
        let m = dead
            .iter()
            .find(|m| m.payload == payload)
            .unwrap_or_else(|| panic!("{subject:.40} not dead-lettered: {dead:?}"));
        assert_eq!(m.subject, *dead_subject, "{subject:.40}");
        let got = m.header("Weir-Dead-Reason").expect("Weir-Dead-Reason");
        assert!(got.contains(reason), "{subject:.40}: reason {got:?}");
        assert_eq!(m.header("X-Trace"), Some("kept"), "{subject:.40}");
        assert_eq!(
            m.header("Nats-Msg-Id"),
            Some(format!("WEIR_JOBS:{}", seqs[i]).as_str()),
            "{subject:.40}"
        );
        // The subject the job arrived on (as stored: a 3-token subject was partitioned).
        let arrived = m.header("Weir-Subject").expect("Weir-Subject");
        assert!(
            arrived.ends_with(&subject[subject.find('.').unwrap()..]),
            "{subject:.40}: Weir-Subject {arrived:.60}"
        );
    }
    let released = env.read_stream(RELEASED).await;
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].payload, Bytes::from("ok#0"));
}

/// A hot key flooding its partition with 200,000 jobs does not delay a cold key of the same
/// partition: the hot backlog is parked, and the cold key's jobs leave as they come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_key_flood_does_not_delay_a_cold_key() {
    const HOT: &str = "hot";
    const FLOOD: usize = 200_000;
    const PARTITIONS: u16 = 4;
    let env = Env::start().await;

    // Create the topology first and find a cold key on the hot key's partition by asking the
    // stream where it puts probe jobs (the subject transform is the authority), then remove them.
    let base = format!("partitions = {PARTITIONS}");
    let cfg = config(&base, &env.url(), free_addr());
    weir::streams::ensure(&env.js, &cfg)
        .await
        .expect("topology");
    let candidates: Vec<String> = (0..32).map(|i| format!("cold{i}")).collect();
    let probes = std::iter::once(HOT.to_string())
        .chain(candidates.iter().cloned())
        .map(|k| Job {
            subject: format!("jobs.probe.{k}"),
            headers: None,
            payload: Bytes::new(),
        });
    env.publish_all(probes, 64).await;
    let mut placed: HashMap<String, u16> = HashMap::new();
    let jobs_stream = env.js.get_stream(JOBS).await.expect("WEIR_JOBS");
    let mut subjects = jobs_stream
        .info_with_subjects("weir.in.*.probe.*")
        .await
        .expect("subjects");
    while let Some(s) = subjects.next().await {
        let (subject, _) = s.expect("subject");
        let mut t = subject.split('.').skip(2);
        let p: u16 = t.next().unwrap().parse().unwrap();
        let key = t.nth(1).unwrap().to_string();
        assert_eq!(
            p,
            predicted_partition(&key, PARTITIONS),
            "{key}: nats-server's partition() is FNV-1a 32 of the key token"
        );
        placed.insert(key, p);
    }
    assert_eq!(placed.len(), 33, "every probe stored: {placed:?}");
    jobs_stream
        .purge()
        .filter("weir.in.*.probe.*")
        .await
        .expect("purge probes");
    let hot_p = placed[HOT];
    let cold = candidates
        .iter()
        .find(|c| placed[c.as_str()] == hot_p)
        .expect("a candidate on the hot partition")
        .clone();

    let toml = format!(
        r#"
{base}
horizon_ms = 1000
[limits.keys.{HOT}]
rate = "100/s"
burst = 1
[limits.keys.{cold}]
rate = "1000/s"
burst = 50
"#
    );
    let _weir = InProc::start(&env, &toml).await;
    let cold_seen = Collector::start(&env.client, &format!("released.*.{cold}")).await;

    let t0 = Instant::now();
    env.publish_all((0..FLOOD).map(|i| Job::seq("sms", HOT, i)), 1000)
        .await;
    let published_in = t0.elapsed();
    // Absorbed: the partition's consumer has nothing left to deliver, the surplus is parked.
    let consumer = format!("weir-p{hot_p}");
    let parked = eventually(
        "the flood to be parked",
        Duration::from_secs(60),
        || async {
            let s = env.js.get_stream(JOBS).await.map_err(|e| e.to_string())?;
            let info = s
                .consumer_info(&consumer)
                .await
                .map_err(|e| e.to_string())?;
            let parked = env.stream_len(PARK).await;
            if info.num_pending == 0 && parked as usize >= FLOOD - 10_000 {
                Ok(parked)
            } else {
                Err(format!(
                    "pending {}, ack pending {}, parked {parked}",
                    info.num_pending, info.num_ack_pending
                ))
            }
        },
    )
    .await;
    let absorbed_in = t0.elapsed();

    let mut latencies = Vec::new();
    for i in 0..20 {
        let before = cold_seen.len();
        let t = Instant::now();
        env.publish_all([Job::seq("sms", &cold, i)], 1).await;
        let seen = cold_seen.wait_for(before + 1, Duration::from_secs(5)).await;
        let got = &seen[before];
        assert_eq!(
            got.payload,
            Bytes::from(format!("{cold}#{i}")),
            "cold key order"
        );
        latencies.push(got.at - t);
    }
    let worst = *latencies.iter().max().unwrap();
    let mut sorted = latencies.clone();
    sorted.sort();
    eprintln!(
        "published {FLOOD} in {published_in:?}, absorbed in {absorbed_in:?} ({parked} parked); \
         cold latencies: median {:?}, worst {worst:?}",
        sorted[sorted.len() / 2]
    );
    assert!(
        sorted[sorted.len() / 2] <= Duration::from_millis(50),
        "cold key median latency {:?} > 50 ms: {latencies:?}",
        sorted[sorted.len() / 2]
    );
    assert!(
        worst <= Duration::from_millis(250),
        "a cold job took {worst:?} (> 250 ms) behind the flood: {latencies:?}"
    );

    // The flood was still there during the check, and the hot key's releases so far are its
    // first jobs, in order.
    assert!(env.stream_len(PARK).await as usize > FLOOD / 2);
    let hot = read_stream(&env.js, RELEASED, &format!("released.sms.{HOT}")).await;
    assert!(!hot.is_empty());
    for (i, m) in hot.iter().enumerate() {
        assert_eq!(
            m.payload,
            Bytes::from(format!("{HOT}#{i}")),
            "hot key order"
        );
    }
}
