//! `--only scale`: Weir spread over several `weir run` processes (the group) on one server.
//!
//! (9) **Throughput with 1, 2 and 3 processes.** The processes start on empty streams, join and
//! balance first. Then the bench pauses the partitions' consumers (JetStream consumer pause),
//! preloads the jobs, resumes the consumers and times from the resume to the last release
//! stored. So every process drains its share from the first job, as in (2), and no process
//! drains alone while the others are still joining. The CPU time of the Weir processes and of
//! nats-server over the drain, from `/proc/<pid>/stat`, is divided by the jobs: on a machine
//! where the broker is the bottleneck, throughput cannot rise with processes, but the cost per
//! job should not rise either.
//!
//! (10) **Hand-over time.** Three processes under a steady load (two keys on every partition,
//! each offered half its limit). Each sample stops a member (`kill -9`, then SIGTERM), times
//! until every partition is owned by a live member and every live member answers `/readyz`
//! 200 with as many partitions running as it owns (polled every 20 ms), then starts a
//! replacement under a new name and waits for balance again. Finally every published job must
//! be in `WEIR_RELEASED` exactly once.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, Context};
use futures::StreamExt;

use super::{fresh, median, preload, wait_count, BenchArgs, BoxError};
use crate::job::{JOBS_STREAM, PARK_STREAM, RELEASED_STREAM};
use crate::streams::partition_consumer;

use crate::members::{
    clock_ticks, config_file, cpu_ticks, get, is_nats_server, wait_settled, Member, POLL,
};

/// One drain with `k` processes: msgs/s, and µs of CPU per job for Weir and for nats-server.
struct Drain {
    rate: f64,
    weir_us: f64,
    nats_us: Option<f64>,
}

pub async fn run(a: &BenchArgs) -> Result<(), BoxError> {
    let ks = [1usize, 2, 3];
    let mut runs: Vec<Vec<Drain>> = ks.iter().map(|_| Vec::new()).collect();
    for run in 0..a.runs {
        for (i, &k) in ks.iter().enumerate() {
            let d = drain(a, k).await?;
            let nats = d.nats_us.map_or("n/a".into(), |u| format!("{u:.1}"));
            println!(
                "  run {}, {k} process(es): {:.0} msgs/s, CPU per job: weir {:.1} µs, nats-server {nats} µs",
                run + 1, d.rate, d.weir_us
            );
            runs[i].push(d);
        }
    }
    if a.runs == 0 {
        return handover(a).await;
    }
    println!(
        "(9) scale-out: {} jobs over {} keys, {} partitions, preloaded with the consumers paused; medians of {} runs",
        a.jobs, a.keys, a.partitions, a.runs
    );
    println!("    processes  msgs/s   vs 1   weir CPU/job  nats-server CPU/job  runs (msgs/s)");
    let mut base = 0.0;
    for (k, r) in ks.iter().zip(&runs) {
        let m = |f: fn(&Drain) -> Option<f64>| {
            let mut v: Vec<f64> = r.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| median(&mut v))
        };
        let rate = m(|d| Some(d.rate)).unwrap_or(0.0);
        if *k == 1 {
            base = rate;
        }
        let nats = m(|d| d.nats_us).map_or("n/a".into(), |u| format!("{u:.1} µs"));
        let each: Vec<String> = r
            .iter()
            .map(|d| format!("{:.1}k", d.rate / 1000.0))
            .collect();
        println!(
            "    {k:<9}  {rate:<7.0}  {:<5.2}  {:<12}  {nats:<19}  {}",
            rate / base,
            format!("{:.1} µs", m(|d| Some(d.weir_us)).unwrap_or(0.0)),
            each.join(", ")
        );
    }
    handover(a).await
}

async fn drain(a: &BenchArgs, k: usize) -> Result<Drain, BoxError> {
    let (nats, client) = fresh().await?;
    let js = jetstream::new(client.clone());
    let toml = format!(
        "partitions = {}\n[limits.default]\nrate = \"1000000000/s\"\nburst = 1000000\n",
        a.partitions
    );
    let file = config_file(&toml)?;
    let mut members = Vec::new();
    for i in 0..k {
        members.push(Member::start(file.path(), &nats.url(), &format!("bench-{i}")).await?);
    }
    wait_settled(&members, a.partitions, true, Instant::now()).await?;
    let jobs = js.get_stream(JOBS_STREAM).await?;
    let until = time::OffsetDateTime::now_utc() + time::Duration::minutes(30);
    for p in 0..a.partitions {
        jobs.pause_consumer(&partition_consumer(p), until).await?;
    }
    // One job per partition is kept back: published after the resume, it wakes the partition's
    // consumer (nats-server does not serve pull requests left waiting by a pause on resume; a
    // new message on the consumer's subjects does).
    let kicks = kick_keys(a.keys, a.partitions);
    if a.jobs < kicks.len() as u64 {
        return Err(format!("--jobs {} is fewer than the partitions", a.jobs).into());
    }
    preload(&js, "jobs", a.jobs - kicks.len() as u64, a.keys, a.payload).await?;
    let early = stream_len(&js, RELEASED_STREAM).await?;
    if early > 0 {
        return Err(format!("{early} jobs were released while the consumers were paused").into());
    }
    // CPU ticks of the Weir processes together, and of nats-server (if it is the process
    // started, not a wrapper that forked it).
    let nats_pid = nats.pid().filter(|p| is_nats_server(*p));
    let cpu = || -> Result<(u64, Option<u64>), BoxError> {
        let weir = members
            .iter()
            .map(|m| cpu_ticks(m.pid))
            .sum::<Result<_, _>>()?;
        Ok((weir, nats_pid.map(cpu_ticks).transpose()?))
    };
    let (weir0, nats0) = cpu()?;
    let start = Instant::now();
    let resumes = (0..a.partitions).map(|p| {
        let jobs = jobs.clone();
        async move { jobs.resume_consumer(&partition_consumer(p)).await }
    });
    for r in futures::future::join_all(resumes).await {
        r?;
    }
    let body = bytes::Bytes::from(vec![b'x'; a.payload]);
    let mut acks = Vec::with_capacity(kicks.len());
    for k in &kicks {
        acks.push(js.publish(format!("jobs.sms.{k}"), body.clone()).await?);
    }
    for ack in acks {
        ack.await?;
    }
    let done = wait_count(&js, RELEASED_STREAM, a.jobs, Duration::from_secs(600)).await?;
    let (weir1, nats1) = cpu()?;
    let per_job = |ticks: u64| ticks as f64 / clock_ticks() * 1e6 / a.jobs as f64;
    Ok(Drain {
        rate: a.jobs as f64 / (done - start).as_secs_f64(),
        weir_us: per_job(weir1 - weir0),
        nats_us: nats0.zip(nats1).map(|(b, e)| per_job(e - b)),
    })
}

/// A key on each partition, from the preload's keys (`key-<i>`) where it has one.
fn kick_keys(keys: u64, partitions: u16) -> Vec<String> {
    (0..partitions)
        .map(|p| {
            let of = |k: &String| crate::job::partition_of(k, partitions) == p;
            let mut names = (0..keys).map(|i| format!("key-{i}"));
            names
                .find(of)
                .or_else(|| (0..).map(|i| format!("kick-{i}")).find(of))
                .expect("some name hashes to every partition")
        })
        .collect()
}

/// Offered per key during the hand-overs; the keys' limit is twice this, so a moved
/// partition's backlog drains again within seconds.
const HANDOVER_RATE: u32 = 50;

async fn handover(a: &BenchArgs) -> Result<(), BoxError> {
    if !(1_000..=300_000).contains(&a.lease_ms) {
        return Err("--lease-ms must be from 1000 to 300000, as Weir's lease_ms".into());
    }
    let (nats, client) = fresh().await?;
    let js = crate::context(&client, a.partitions, 512);
    let toml = format!(
        "partitions = {}\nlease_ms = {}\n[limits.default]\nrate = \"{}/s\"\nburst = 10\n",
        a.partitions,
        a.lease_ms,
        2 * HANDOVER_RATE
    );
    let file = config_file(&toml)?;
    let (url, path) = (nats.url(), file.path().to_path_buf());
    let mut live = Vec::new();
    for i in 0..3 {
        live.push(Member::start(&path, &url, &format!("bench-{i}")).await?);
    }
    wait_settled(&live, a.partitions, true, Instant::now()).await?;
    let (_, c) = get(&live[0].admin, "/v1/cluster").await?;
    let lease_ms = c["lease_ms"].as_u64().unwrap_or(0);

    // Two keys on every partition, so every hand-over moves live traffic.
    let mut keys: Vec<String> = Vec::new();
    let mut per = vec![0; usize::from(a.partitions)];
    for i in 0.. {
        let key = format!("h-{i}");
        let p = usize::from(crate::job::partition_of(&key, a.partitions));
        if per[p] < 2 {
            per[p] += 1;
            keys.push(key);
        }
        if keys.len() == 2 * per.len() {
            break;
        }
    }
    let seen = Arc::new(AtomicU64::new(0));
    let mut sub = client.subscribe("released.>").await?;
    let counter = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while sub.next().await.is_some() {
                seen.fetch_add(1, Relaxed);
            }
        })
    };
    let progress = Arc::new(crate::load::Progress::default());
    let spec = crate::load::LoadSpec {
        destination: "sms".into(),
        keys: keys.clone(),
        rate: f64::from(HANDOVER_RATE),
        count: 0,
        duration: None,
        payload: 16,
        window: 256,
    };
    let load = {
        let (js, p) = (js.clone(), progress.clone());
        tokio::spawn(async move { crate::load::publish(&js, &spec, Some(&p)).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut next = 3;
    let (mut kills, mut terms, mut joins) = (Vec::new(), Vec::new(), Vec::new());
    for sigterm in [false, true] {
        for _ in 0..a.handover_runs {
            let mut victim = live.remove(0);
            let t0 = Instant::now();
            if sigterm {
                victim.sigterm().await?;
            } else {
                victim.kill9().await?;
            }
            let took = wait_settled(&live, a.partitions, false, t0).await?;
            if sigterm {
                terms.push(took);
                let grace = Duration::from_secs(30);
                match tokio::time::timeout(grace, victim.child.wait()).await {
                    Ok(Ok(s)) if s.success() => {}
                    other => return Err(format!("{} after SIGTERM: {other:?}", victim.name).into()),
                }
            } else {
                kills.push(took);
            }
            drop(victim);
            let t1 = Instant::now();
            live.push(Member::start(&path, &url, &format!("bench-{next}")).await?);
            next += 1;
            joins.push(wait_settled(&live, a.partitions, true, t1).await?);
            // Let the moved partitions run a moment before the next stop.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    progress.stop();
    let sent = load.await??;
    let published = sent.acked;
    let released = wait_drained(&js, published).await?;
    // Re-releases reach the core subscription at once; give the last ones a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    counter.abort();
    let check = crate::ledger::read(&js, RELEASED_STREAM).await?;

    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let row = |what: &str, v: &[Duration], minus: f64| {
        if v.is_empty() {
            return;
        }
        let mut v: Vec<f64> = v.iter().map(|d| ms(d) - minus).collect();
        v.sort_by(f64::total_cmp);
        let q = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
        println!(
            "    {what:<30} {:>8.0} {:>8.0} {:>8.0} {:>8.0}",
            v[0],
            q(0.5),
            q(0.9),
            v[v.len() - 1]
        );
    };
    println!(
        "(10) hand-over, 3 processes, {} keys at {HANDOVER_RATE}/s (limit {}/s), lease {lease_ms} ms, {} stops of each kind, polled every {} ms:",
        keys.len(), 2 * HANDOVER_RATE, a.handover_runs, POLL.as_millis()
    );
    println!(
        "    {:<30} {:>8} {:>8} {:>8} {:>8}",
        "ms", "min", "p50", "p90", "max"
    );
    row("kill -9 -> owned and ready", &kills, 0.0);
    row("  the same minus the lease", &kills, lease_ms as f64);
    row("SIGTERM -> owned and ready", &terms, 0.0);
    row("join -> balanced and ready", &joins, 0.0);
    println!(
        "     jobs: {published} published ({} failed), {released} in {RELEASED_STREAM}: {} distinct, {} duplicates, {} missing, {} out of key order; the core subscription saw {} re-releases (absorbed by Nats-Msg-Id)",
        sent.failed, check.distinct(), check.duplicates, published.saturating_sub(check.distinct()),
        check.out_of_order, seen.load(Relaxed).saturating_sub(released)
    );
    if check.duplicates > 0 || check.distinct() != published || released != published {
        return Err("jobs were lost or released twice (see above)".into());
    }
    Ok(())
}

/// Waits until `WEIR_RELEASED` holds `n` jobs and `WEIR_JOBS` and `WEIR_PARK` are empty.
async fn wait_drained(js: &Context, n: u64) -> Result<u64, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let mut len = [0; 3];
        for (l, s) in len
            .iter_mut()
            .zip([RELEASED_STREAM, JOBS_STREAM, PARK_STREAM])
        {
            *l = stream_len(js, s).await?;
        }
        if len[0] >= n && len[1] == 0 && len[2] == 0 {
            return Ok(len[0]);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not drained in 180 s: released {} of {n}, WEIR_JOBS {}, WEIR_PARK {}",
                len[0], len[1], len[2]
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stream_len(js: &Context, stream: &str) -> Result<u64, BoxError> {
    Ok(js.get_stream(stream).await?.info().await?.state.messages)
}
