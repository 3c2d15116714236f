//! Live limits against a real nats-server: changes in `WEIR_LIMITS` apply to running processes
//! (held jobs included) within a second, patterns resolve by precedence, a paused key holds its
//! jobs, and a destination cap bounds the sum over keys and over processes.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use weir::limits::store::{Store, BUCKET};
use weir::limits::{Entry, LimitJson};

use common::*;

fn limit(rate: &str, burst: i64) -> LimitJson {
    LimitJson {
        pattern: None,
        rate: rate.into(),
        burst: Some(burst),
    }
}

/// The bucket as `weir run` creates it (tests that seed limits before Weir starts use this).
async fn store(env: &Env, toml: &str) -> Store {
    let c = config(toml, &env.url(), free_addr());
    Store::open(&env.js, &c).await.expect("open WEIR_LIMITS")
}

/// A key that lands in `partition` of `partitions`.
fn key_in(prefix: &str, partition: u16, partitions: u16) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|k| predicted_partition(k, partitions) == partition)
        .expect("some key hashes there")
}

fn released_of<'a>(seen: &'a [Seen], key: &str) -> Vec<&'a Seen> {
    seen.iter()
        .filter(|s| s.header("Weir-Key") == Some(key))
        .collect()
}

/// Two Weir processes with `base`'s config, one running partition 0, the other partition 1.
async fn two_processes(env: &Env, base: &str) -> (InProc, InProc) {
    let a = InProc::start(env, &format!("owned_partitions = [0]\n{base}")).await;
    let b = InProc::start(env, &format!("owned_partitions = [1]\n{base}")).await;
    (a, b)
}

/// Two processes (keys at 100/s burst 5) sharing a cap on destination `carrier`.
async fn capped_pair(env: &Env, rate: &str, burst: i64) -> (InProc, InProc) {
    let base = "partitions = 2\n[limits.default]\nrate = \"100/s\"\nburst = 5\n";
    store(env, base)
        .await
        .put(&Entry::Destination("carrier".into()), &limit(rate, burst))
        .await
        .unwrap();
    two_processes(env, base).await
}

/// When the release pace changed: the first release after `after` that follows its predecessor
/// within `gap`.
fn sped_up_at(seen: &[&Seen], after: Instant, gap: Duration) -> Option<Instant> {
    seen.windows(2)
        .find(|w| w[1].at > after && w[1].at - w[0].at < gap)
        .map(|w| w[1].at)
}

/// A limit raised in the bucket speeds up a held backlog within a second, in each of two
/// processes (each runs one of the two partitions), with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_limit_applies_within_a_second_in_every_process() {
    let env = Env::start().await;
    let base = "partitions = 2\n[limits.default]\nrate = \"2/s\"\nburst = 1\n";
    let (a, b) = two_processes(&env, base).await;
    let (ka, kb) = (key_in("a", 0, 2), key_in("b", 1, 2));
    let collector = Collector::start(&env.client, "released.>").await;
    let jobs = (0..300).flat_map(|i| [Job::seq("sms", &ka, i), Job::seq("sms", &kb, i)]);
    env.publish_all(jobs, 256).await;
    // Both keys are crawling at 2/s.
    collector.wait_for(4, Duration::from_secs(10)).await;

    let store = Store::get(&env.js).await.unwrap();
    let put_at = Instant::now();
    for k in [&ka, &kb] {
        store
            .put(&Entry::Key(k.clone()), &limit("200/s", 1))
            .await
            .unwrap();
    }
    let seen = collector.wait_for(600, Duration::from_secs(20)).await;
    let order = by_key(seen.iter().map(|s| &s.payload));
    assert_fifo_complete(
        &order,
        &BTreeMap::from([(ka.clone(), 300), (kb.clone(), 300)]),
    );
    for k in [&ka, &kb] {
        let rel = released_of(&seen, k);
        let at = sped_up_at(&rel, put_at, Duration::from_millis(100))
            .unwrap_or_else(|| panic!("key {k} never sped up"));
        assert!(
            at - put_at < Duration::from_secs(1),
            "key {k}: the new limit applied {:?} after the write",
            at - put_at
        );
    }
    drop((a, b));
}

/// A lowered limit: from the moment it applies (within a second of the write), releases keep
/// to the new bound; a garbage value written afterwards changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_limit_is_never_exceeded_after_it_applies() {
    let env = Env::start().await;
    let _weir = InProc::start(
        &env,
        "partitions = 2\n[limits.default]\nrate = \"200/s\"\nburst = 5\n",
    )
    .await;
    let collector = Collector::start(&env.client, "released.>").await;
    env.publish_all((0..3000).map(|i| Job::seq("sms", "slow", i)), 256)
        .await;
    collector.wait_for(100, Duration::from_secs(10)).await;
    let store = Store::get(&env.js).await.unwrap();
    let put_ms = unix_ms();
    store
        .put(&Entry::Key("slow".into()), &limit("10/s", 1))
        .await
        .unwrap();
    // Garbage written by hand: refused, the 10/s limit stays.
    let kv = env.js.get_key_value(BUCKET).await.unwrap();
    kv.put("keys.slow", Bytes::from_static(b"{\"rate\": \"1e99/s\""))
        .await
        .unwrap();
    let from = put_ms + 1000;
    let seen = eventually(
        "3 s of releases after the change applied",
        Duration::from_secs(20),
        || async {
            let s = collector.snapshot();
            match s.last() {
                Some(l) if l.released_ms() >= from + 3000 => Ok(s),
                _ => Err(format!("{} released", s.len())),
            }
        },
    )
    .await;
    let after: Vec<u64> = seen
        .iter()
        .map(Seen::released_ms)
        .filter(|&t| t >= from && t < from + 3000)
        .collect();
    assert_gcra_bound(&after, 1, 100, "key slow after lowering to 10/s");
    assert!(
        after.len() >= 20,
        "{} releases in 3 s at 10/s: the garbage value must not have stopped the key",
        after.len()
    );
}

/// Exact key > longest pattern > default, through the bucket; a paused key holds its jobs
/// (kept, not dropped) and releases all of them, in order, once raised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_resolve_by_precedence_and_a_paused_key_resumes() {
    let env = Env::start().await;
    let toml = "partitions = 2\n[limits.default]\nrate = \"1/s\"\nburst = 1\n";
    let store = store(&env, toml).await;
    let gold = LimitJson {
        pattern: Some("gold-*".into()),
        rate: "1000/s".into(),
        burst: Some(100),
    };
    store
        .put(&Entry::Pattern("gold".into()), &gold)
        .await
        .unwrap();
    let gold_eu = LimitJson {
        pattern: Some("gold-eu-*".into()),
        rate: "1/s".into(),
        burst: Some(1),
    };
    store
        .put(&Entry::Pattern("gold-eu".into()), &gold_eu)
        .await
        .unwrap();
    store
        .put(&Entry::Key("gold-vip".into()), &limit("1/s", 1))
        .await
        .unwrap();
    store
        .put(&Entry::Key("paused".into()), &limit("0/s", 1))
        .await
        .unwrap();
    let _weir = InProc::start(&env, toml).await;
    let collector = Collector::start(&env.client, "released.>").await;
    let keys = ["paused", "gold-1", "gold-vip", "gold-eu-1", "silver"];
    env.publish_all(
        keys.iter()
            .flat_map(|k| (0..50).map(move |i| Job::seq("sms", k, i))),
        256,
    )
    .await;
    let seen = eventually("gold-1 released", Duration::from_secs(10), || async {
        let s = collector.snapshot();
        let n = released_of(&s, "gold-1").len();
        if n == 50 {
            Ok(s)
        } else {
            Err(format!("{n} of gold-1"))
        }
    })
    .await;
    for slow in ["gold-vip", "gold-eu-1", "silver"] {
        let n = released_of(&seen, slow).len();
        assert!(n <= 5, "{slow} runs at 1/s, yet {n} left with gold-1's 50");
    }
    assert_eq!(released_of(&seen, "paused").len(), 0, "a paused key");

    // Raise the paused key: all 50 leave, once each, in order.
    store
        .put(&Entry::Key("paused".into()), &limit("1000/s", 50))
        .await
        .unwrap();
    let seen = eventually("the paused key's jobs", Duration::from_secs(10), || async {
        let s = collector.snapshot();
        let n = released_of(&s, "paused").len();
        if n == 50 {
            Ok(s)
        } else {
            Err(format!("{n} of paused"))
        }
    })
    .await;
    let paused: Vec<&Seen> = released_of(&seen, "paused");
    let order = by_key(paused.iter().map(|s| &s.payload));
    assert_fifo_complete(&order, &BTreeMap::from([("paused".to_string(), 50)]));
}

/// Sum of the releases to a capped destination over all keys stays within the cap's GCRA
/// bound, the cap is shared between keys (a hot key does not starve cold ones), and other
/// destinations are not slowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_cap_bounds_the_sum_over_keys() {
    let env = Env::start().await;
    let toml = "partitions = 4\n[limits.default]\nrate = \"100/s\"\nburst = 5\n";
    let store = store(&env, toml).await;
    store
        .put(&Entry::Destination("carrier".into()), &limit("20/s", 2))
        .await
        .unwrap();
    let _weir = InProc::start(&env, toml).await;
    let collector = Collector::start(&env.client, "released.>").await;
    let mut jobs: Vec<Job> = (0..400).map(|i| Job::seq("carrier", "hot", i)).collect();
    for k in ["c1", "c2", "c3", "c4"] {
        jobs.extend((0..5).map(|i| Job::seq("carrier", k, i)));
    }
    jobs.extend((0..100).map(|i| Job::seq("email", "other", i)));
    env.publish_all(jobs, 256).await;
    let seen = eventually("the cold keys' jobs", Duration::from_secs(20), || async {
        let s = collector.snapshot();
        let cold: usize = ["c1", "c2", "c3", "c4"]
            .iter()
            .map(|k| released_of(&s, k).len())
            .sum();
        if cold == 20 {
            Ok(s)
        } else {
            Err(format!("{cold} of 20 cold jobs"))
        }
    })
    .await;
    let carrier: Vec<u64> = seen
        .iter()
        .filter(|s| s.subject.starts_with("released.carrier."))
        .map(Seen::released_ms)
        .collect();
    assert_gcra_bound(&carrier, 2, 50, "destination carrier at 20/s burst 2");
    // 20 cold jobs at 20/s shared with one hot key: served in turn, within ~2-3 s, not
    // after the hot key's 400 (20 s).
    let hot = released_of(&seen, "hot").len();
    assert!(hot < 100, "cold keys waited for {hot} hot jobs");
    assert_eq!(
        released_of(&seen, "other").len(),
        100,
        "email is not capped"
    );
}

/// Two processes, each running half the partitions, together keep a destination's cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_cap_holds_over_two_processes() {
    let env = Env::start().await;
    let (a, b) = capped_pair(&env, "20/s", 2).await;
    let collector = Collector::start(&env.client, "released.>").await;
    let keys: Vec<String> = (0..2)
        .flat_map(|p| [key_in("x", p, 2), key_in("y", p, 2)])
        .collect();
    env.publish_all(
        keys.iter()
            .flat_map(|k| (0..15).map(move |i| Job::seq("carrier", k, i))),
        256,
    )
    .await;
    let seen = collector.wait_for(60, Duration::from_secs(30)).await;
    let stamps: Vec<u64> = seen.iter().map(Seen::released_ms).collect();
    let mut sorted = stamps.clone();
    sorted.sort_unstable();
    assert_gcra_bound(&sorted, 2, 50, "carrier at 20/s over two processes");
    drop((a, b));
}

/// Traffic skewed to one of two processes: the idle one lends its share of the cap, so the
/// busy one gets nearly all of it (at most 10% lost), and the sum still keeps the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_process_lends_its_share_of_a_cap() {
    let env = Env::start().await;
    let (a, b) = capped_pair(&env, "40/s", 4).await;
    let collector = Collector::start(&env.client, "released.>").await;
    // Every key in partition 0: all the traffic is on process a.
    let keys: Vec<String> = (0..4).map(|i| key_in(&format!("k{i}-"), 0, 2)).collect();
    env.publish_all(
        (0..80).flat_map(|i| keys.iter().map(move |k| Job::seq("carrier", k, i))),
        256,
    )
    .await;
    let seen = collector.wait_for(320, Duration::from_secs(30)).await;
    let mut stamps: Vec<u64> = seen.iter().map(Seen::released_ms).collect();
    stamps.sort_unstable();
    assert_gcra_bound(&stamps, 4, 25, "carrier at 40/s, skewed to one process");
    // After the shares settle (2 s), the busy process runs at nearly the whole cap.
    let from = stamps[0] + 2000;
    let n = stamps
        .iter()
        .filter(|&&t| t >= from && t < from + 4000)
        .count();
    assert!(
        n as f64 >= 40.0 * 4.0 * 0.85,
        "{n} releases in 4 s: the busy process should get ~98% of 40/s"
    );
    drop((a, b));
}

/// Limits written into the bucket by hand, bypassing validation: garbage JSON, negative, huge
/// and non-numeric rates, bad bursts, a pattern on a key entry. Each reaches every process
/// through the KV watcher, is refused (counted in `weir_limits_rejected_total`, logged with
/// its reason), and the last good limit stays in force; a good value afterwards still applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_written_garbage_limits_are_refused_and_the_last_good_stays() {
    let env = Env::start().await;
    let weir = InProc::start(
        &env,
        "partitions = 2\n[limits.default]\nrate = \"200/s\"\nburst = 5\n",
    )
    .await;
    let store = Store::get(&env.js).await.unwrap();
    store
        .put(&Entry::Key("held".into()), &limit("7/s", 3))
        .await
        .unwrap();
    env.publish_all([Job::seq("sms", "held", 0)], 1).await;
    let limit_of = |key: &'static str| async move {
        let (code, body) = http_get(weir.http, &format!("/v1/keys/{key}"))
            .await
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        match code {
            200 => Ok(v["limit"].clone()),
            _ => Err(format!("{code} {body}")),
        }
    };
    let in_force = |key: &'static str, rate: &'static str| async move {
        let l = limit_of(key).await?;
        if l["rate"] == rate {
            Ok(l)
        } else {
            Err(l.to_string())
        }
    };
    eventually("keys.held at 7/s", Duration::from_secs(10), || {
        in_force("held", "7/s")
    })
    .await;

    let kv = env.js.get_key_value(BUCKET).await.unwrap();
    let garbage: [(&str, &[u8]); 9] = [
        ("keys.held", b"{not json"),
        ("keys.held", br#"{"rate": "-1/s"}"#),
        ("keys.held", br#"{"rate": "1e99/s"}"#),
        ("keys.held", br#"{"rate": "NaN/s"}"#),
        ("keys.held", br#"{"rate": "5/s", "burst": -3}"#),
        (
            "keys.held",
            br#"{"rate": "5/s", "burst": 99999999999999999999}"#,
        ),
        ("keys.held", br#"{"rate": "5/s", "pattern": "h*"}"#),
        ("default", b"\xff\xfe garbage"),
        ("keys.a=ZZ", br#"{"rate": "5/s"}"#),
    ];
    for (k, v) in garbage {
        kv.put(k, Bytes::copy_from_slice(v)).await.unwrap();
    }
    eventually(
        "every garbage value refused",
        Duration::from_secs(10),
        || async {
            let (_, m) = http_get(weir.http, "/metrics")
                .await
                .map_err(|e| e.to_string())?;
            let n = m
                .lines()
                .find(|l| l.starts_with("weir_limits_rejected_total"))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            if n >= garbage.len() as u64 {
                Ok(())
            } else {
                Err(format!("{n} refused"))
            }
        },
    )
    .await;
    let l = limit_of("held").await.unwrap();
    assert_eq!(
        (&l["rate"], &l["burst"], &l["source"]),
        (&"7/s".into(), &3.into(), &"key".into())
    );
    // The default is still the config file's.
    env.publish_all([Job::seq("sms", "other", 0)], 1).await;
    let d = eventually("key other visible", Duration::from_secs(10), || {
        limit_of("other")
    })
    .await;
    assert_eq!(
        (&d["rate"], &d["source"]),
        (&"200/s".into(), &"default".into())
    );

    // The watcher survived: a good value still applies.
    kv.put(
        "keys.held",
        Bytes::from_static(br#"{"rate": "9/s", "burst": 2}"#),
    )
    .await
    .unwrap();
    eventually("keys.held at 9/s", Duration::from_secs(10), || {
        in_force("held", "9/s")
    })
    .await;
}
