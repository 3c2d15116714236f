//! Several `weir run` processes on one nats-server share the partitions: balanced, moved on
//! `kill -9`, on a join and on SIGTERM, with every job released once, in order, within its
//! key's rate bound (one extra burst per move of its partition).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const RELEASED: &str = "WEIR_RELEASED";
const PARTITIONS: u16 = 16;
const KEYS: usize = 48;
const RATE: u64 = 10;
const BURST: u64 = 4;

fn toml() -> String {
    format!(
        "partitions = {PARTITIONS}\nhorizon_ms = 2000\nack_wait_ms = 10000\nshutdown_grace_ms = 5000\n\
         [limits.default]\nrate = \"{RATE}/s\"\nburst = {BURST}\n"
    )
}

/// Who owns each partition, as `/v1/cluster` on `addr` says: `None` while unreachable.
async fn owners(addr: SocketAddr) -> Option<Vec<Option<String>>> {
    let (code, body) = http_get(addr, "/v1/cluster").await.ok()?;
    if code != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    Some(
        v["assignment"]
            .as_array()?
            .iter()
            .map(|a| a["owner"].as_str().map(str::to_string))
            .collect(),
    )
}

/// Partitions per member, from an ownership list.
fn counts(owners: &[Option<String>]) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for o in owners.iter().flatten() {
        *c.entry(o.clone()).or_default() += 1;
    }
    c
}

/// Waits until every partition is owned by one of `members`, `want` each (sorted counts), and
/// every member is ready (all its partitions bound); returns the ownership and how long it took.
async fn wait_balanced(
    ask: SocketAddr,
    members: &[(&str, SocketAddr)],
    want: &[usize],
    timeout: Duration,
) -> (Vec<Option<String>>, Duration) {
    let start = Instant::now();
    let names: HashSet<&str> = members.iter().map(|(n, _)| *n).collect();
    let owned = eventually("the partitions to be balanced", timeout, || async {
        let o = owners(ask).await.ok_or("no /v1/cluster answer")?;
        let c = counts(&o);
        let mut got: Vec<usize> = c.values().copied().collect();
        got.sort_unstable();
        let all_live = o
            .iter()
            .all(|x| x.as_deref().is_some_and(|n| names.contains(n)));
        if !all_live || got != want {
            return Err(format!("ownership {c:?}"));
        }
        for (n, addr) in members {
            match http_get(*addr, "/readyz").await {
                Ok((200, _)) => {}
                other => return Err(format!("{n} not ready: {other:?}")),
            }
        }
        Ok(o)
    })
    .await;
    (owned, start.elapsed())
}

fn moved(before: &[Option<String>], after: &[Option<String>], moves: &mut [u64]) {
    for p in 0..before.len() {
        if before[p] != after[p] {
            moves[p] += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_on_kill_join_and_sigterm_without_loss() {
    let env = Env::start().await;
    let toml = toml();
    let names = ["a", "b", "c", "d"];
    let named = |n: &str| format!("member = \"{n}\"\n{toml}");
    let mut a = Proc::start(&env.url(), &named("a")).await;
    let mut b = Proc::start(&env.url(), &named("b")).await;
    let mut c = Proc::start(&env.url(), &named("c")).await;
    let (mut owned, _) = wait_balanced(
        a.http,
        &[("a", a.http), ("b", b.http), ("c", c.http)],
        &[5, 5, 6],
        Duration::from_secs(20),
    )
    .await;
    eprintln!("three members: {:?}", counts(&owned));
    let mut moves = vec![0u64; PARTITIONS as usize];

    // Every key gets 150 jobs: 15 s at 10/s, so releases flow through every move below.
    let jobs_per_key = 150;
    let mut jobs = Vec::new();
    for i in 0..jobs_per_key {
        for k in 0..KEYS {
            jobs.push(Job::seq("sms", &format!("k{k}"), i));
        }
    }
    let total = jobs.len() as u64;
    let seen = Collector::start(&env.client, "released.>").await;
    env.publish_all(jobs, 512).await;
    env.wait_stream_at_least(RELEASED, 500, Duration::from_secs(10))
        .await;

    // kill -9 c: its partitions move to a and b once their leases expire (6 s).
    c.kill9().await;
    let (after, took) = wait_balanced(
        a.http,
        &[("a", a.http), ("b", b.http)],
        &[8, 8],
        Duration::from_secs(15),
    )
    .await;
    eprintln!(
        "kill -9: partitions moved in {took:?}: {:?}",
        counts(&after)
    );
    assert!(
        took <= Duration::from_secs(10),
        "kill -9 takeover took {took:?}"
    );
    moved(&owned, &after, &mut moves);
    owned = after;

    // A fourth member (under c's name: its predecessor is dead) takes a share: 4 each.
    let d = Proc::start(&env.url(), &named("c")).await;
    let (after, took) = wait_balanced(
        a.http,
        &[("a", a.http), ("b", b.http), ("c", d.http)],
        &[5, 5, 6],
        Duration::from_secs(10),
    )
    .await;
    eprintln!("c back: rebalanced in {took:?}: {:?}", counts(&after));
    moved(&owned, &after, &mut moves);
    owned = after;
    let e = Proc::start(&env.url(), &named(names[3])).await;
    let (after, took) = wait_balanced(
        a.http,
        &[("a", a.http), ("b", b.http), ("c", d.http), ("d", e.http)],
        &[4, 4, 4, 4],
        Duration::from_secs(10),
    )
    .await;
    eprintln!("d joined: rebalanced in {took:?}: {:?}", counts(&after));
    moved(&owned, &after, &mut moves);
    owned = after;

    // SIGTERM b: it hands its partitions over within the drain bound (2 s).
    b.sigterm();
    let (after, took) = wait_balanced(
        a.http,
        &[("a", a.http), ("c", d.http), ("d", e.http)],
        &[5, 5, 6],
        Duration::from_secs(10),
    )
    .await;
    eprintln!(
        "SIGTERM: partitions moved in {took:?}: {:?}",
        counts(&after)
    );
    assert!(
        took <= Duration::from_secs(2),
        "SIGTERM hand-over took {took:?}"
    );
    assert!(b
        .wait_exit(Duration::from_secs(10))
        .await
        .is_some_and(|s| s.success()));
    moved(&owned, &after, &mut moves);

    // Everything released exactly once, each key in order.
    env.wait_all_released(total, Duration::from_secs(60)).await;
    let stored = env.read_stream(RELEASED).await;
    let got = by_key(stored.iter().map(|s| &s.payload));
    let want: BTreeMap<String, usize> =
        (0..KEYS).map(|k| (format!("k{k}"), jobs_per_key)).collect();
    assert_fifo_complete(&got, &want);
    eprintln!(
        "{total} jobs released once each; {} re-releases absorbed by the duplicate window",
        seen.len() as u64 - total
    );

    // Rate: a key whose partition never moved keeps the plain bound; a moved one may get one
    // extra burst per move (its new owner's bucket starts full).
    let mut times: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for s in &stored {
        let key = s.subject.rsplit('.').next().expect("key").to_string();
        let at = s
            .header("Weir-Released-At")
            .expect("stamp")
            .parse()
            .expect("ms");
        times.entry(key).or_default().push(at);
    }
    for (key, t) in &mut times {
        t.sort_unstable();
        let p = predicted_partition(key, PARTITIONS) as usize;
        let burst = BURST * (1 + moves[p]);
        assert_gcra_bound(
            t,
            burst,
            1000 / RATE,
            &format!("{key} (partition {p}, moved {} times)", moves[p]),
        );
    }
    let _ = (a.kill9().await, d, e);
}

/// Two processes started at once under the default (host) name collide: the second one sees
/// the first's heartbeat renewed and refuses to start, naming the setting to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_name_in_use_is_refused() {
    let env = Env::start().await;
    let toml = format!("member = \"same\"\n{}", toml());
    let _first = Proc::start(&env.url(), &toml).await;
    let file = config_file(&toml);
    let out = weir_command(
        file.path(),
        &["--nats-url", &env.url(), "--http-addr", "127.0.0.1:0"],
    )
    .output()
    .await
    .expect("run weir");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second process started: {err}");
    assert!(err.contains("member") && err.contains("in use"), "{err}");
}

/// A process restarted under its predecessor's name (a container restarted in its pod) takes
/// the partitions over without waiting for their leases to expire, and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_the_same_name_takes_over_at_once() {
    let env = Env::start().await;
    let toml = format!("member = \"solo\"\n{}", toml());
    let mut first = Proc::start(&env.url(), &toml).await;
    let mut jobs = Vec::new();
    for i in 0..40 {
        for k in 0..8 {
            jobs.push(Job::seq("sms", &format!("k{k}"), i));
        }
    }
    let total = jobs.len() as u64;
    env.publish_all(jobs, 256).await;
    env.wait_stream_at_least(RELEASED, 40, Duration::from_secs(10))
        .await;
    first.kill9().await;
    let killed = Instant::now();
    let second = Proc::start(&env.url(), &toml).await;
    let (_, _) = wait_balanced(
        second.http,
        &[("solo", second.http)],
        &[PARTITIONS as usize],
        Duration::from_secs(10),
    )
    .await;
    let took = killed.elapsed();
    eprintln!("restart under the same name: partitions back in {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "took {took:?}: the leases were waited out"
    );
    env.wait_all_released(total, Duration::from_secs(30)).await;
    let stored = env.read_stream(RELEASED).await;
    let got = by_key(stored.iter().map(|s| &s.payload));
    let want: BTreeMap<String, usize> = (0..8).map(|k| (format!("k{k}"), 40)).collect();
    assert_fifo_complete(&got, &want);
}
