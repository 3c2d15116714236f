//! `weir bench`: the end-to-end benchmark, on one nats-server, in one run.
//!
//! 1. The raw JetStream ceiling: the same partitioned work-queue stream, the same number of
//!    consumers, batch size and publish-ack window as Weir, and per message: consume, republish
//!    with headers, ack after the publish ack. No throttling.
//! 2. Weir's pass-through with every key under its limit, on the same preloaded jobs.
//! 3. Their ratio (medians over `--runs` alternating runs).
//! 4. Rate error: `--rate-keys` keys with rates spread from 1 to `--max-rate`/s, each with a
//!    standing backlog, measured over `--rate-seconds`.
//! 5. A cold key's added latency while a hot key holds a `--hot-backlog` job backlog on the
//!    same partition.
//! 6. Resident memory per tracked key, with `--memory-keys` keys holding limiter state.
//! 7. (`limits`) A limit write's time to effect; 8. (`caps`) a destination cap over two processes.
//! 9. and 10. (`scale`, not run by default: it takes minutes) throughput with 1, 2 and 3 `weir
//!    run` processes in a group, and the time a hand-over takes on `kill -9` and on SIGTERM
//!    (`bench/scale.rs`).
//! 11. (`sharq`) the SHARQ-compatible HTTP API under a concurrent load generator: enqueue,
//!     bulk enqueue, dequeue + finish; requests/s and p99 (`bench/sharq.rs`).
//! 12. (`sweep`) the sweep for unreadable jobs a reconnect starts, with `--sweep-held` unacked
//!     jobs in each partition (`bench/sweep.rs`).
//! 13. (`lengths`) a full SHARQ queue length as workers lag, with `--lengths-released` jobs in
//!     `WEIR_RELEASED` (`bench/lengths.rs`).
//!
//! Each NATS measure gets a fresh local nats-server (or, with `--nats-url`, fresh streams).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, Context};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Overrides};
use crate::natsd::LocalNats;

mod http;
mod lengths;
mod limits;
mod raw;
mod scale;
mod sharq;
mod sweep;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Jobs per throughput run.
    #[arg(long, default_value_t = 200_000)]
    pub jobs: u64,
    /// Alternating raw/Weir runs; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Distinct keys in the throughput runs.
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    #[arg(long, default_value_t = 16)]
    pub partitions: u16,
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    #[arg(long, default_value_t = 1000)]
    pub rate_keys: u32,
    #[arg(long, default_value_t = 100)]
    pub max_rate: u32,
    #[arg(long, default_value_t = 30)]
    pub rate_seconds: u64,
    #[arg(long, default_value_t = 1_000_000)]
    pub hot_backlog: u64,
    #[arg(long, default_value_t = 300)]
    pub cold_samples: usize,
    #[arg(long, default_value_t = 1_000_000)]
    pub memory_keys: u64,
    /// Samples of the time from a limit write to its effect.
    #[arg(long, default_value_t = 200)]
    pub apply_samples: usize,
    /// Lease time (`lease_ms`) of the group in the hand-over samples of `scale`: a `kill -9`
    /// hand-over waits it out, so it is shorter than Weir's default 6000.
    #[arg(long, default_value_t = 2000)]
    pub lease_ms: u64,
    /// Hand-over samples of `scale`, of each kind (kill -9, SIGTERM).
    #[arg(long, default_value_t = 10)]
    pub handover_runs: usize,
    /// Concurrent keep-alive connections of the HTTP load generator (`sharq`).
    #[arg(long, default_value_t = 64)]
    pub http_concurrency: usize,
    /// Requests of each single-job kind in `sharq` (enqueue; dequeue + finish).
    #[arg(long, default_value_t = 50_000)]
    pub http_requests: u64,
    /// Jobs per bulk enqueue request in `sharq`.
    #[arg(long, default_value_t = 1000)]
    pub bulk_size: u64,
    /// Throughput runs with a `Weir-Job-Id` header on every job (the raw ceiling's jobs carry it
    /// too), so Weir records each job's status: its cost is the ratio's change.
    #[arg(long)]
    pub job_ids: bool,
    /// Throughput runs also run Weir with this `publish_window_per_key` (the default is 1, a
    /// key's order kept across a NATS crash), beside the default: the cost of that order. The
    /// rate measure runs with it instead of the default.
    #[arg(long)]
    pub publish_window_per_key: Option<u32>,
    /// Unacked jobs in each partition for `sweep` (Weir's default `max_held_per_partition`).
    #[arg(long, default_value_t = 20_000)]
    pub sweep_held: u64,
    /// Released jobs in `WEIR_RELEASED` for `lengths`.
    #[arg(long, default_value_t = 500_000)]
    pub lengths_released: u64,
    /// Which measures to run, comma-separated: throughput, rate, latency, memory, limits, caps,
    /// sharq, sweep, lengths, and scale (not in the default: it runs for several minutes).
    #[arg(
        long,
        default_value = "throughput,rate,latency,memory,limits,caps,sharq,sweep,lengths"
    )]
    pub only: String,
}

pub async fn main(a: BenchArgs) -> Result<(), BoxError> {
    let want = |m: &str| a.only.split(',').any(|x| x.trim() == m);
    println!(
        "weir bench: nats-server {}, {} cores",
        crate::natsd::binary(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if want("throughput") {
        throughput(&a).await?;
    }
    if want("rate") {
        rate_error(&a).await?;
    }
    if want("latency") {
        cold_latency(&a).await?;
    }
    if want("memory") {
        memory_per_key(a.memory_keys);
    }
    if want("limits") {
        limits::apply_latency(a.apply_samples, a.partitions).await?;
    }
    if want("caps") {
        limits::cap_lending(10).await?;
    }
    if want("sharq") {
        sharq::run(&a).await?;
    }
    if want("sweep") {
        sweep::run(&a).await?;
    }
    if want("lengths") {
        lengths::run(&a).await?;
    }
    if want("scale") {
        scale::run(&a).await?;
    }
    Ok(())
}

/// A fresh server and a client on it.
async fn fresh() -> Result<(LocalNats, async_nats::Client), BoxError> {
    let n = LocalNats::start()?;
    let c = async_nats::connect(n.url()).await?;
    Ok((n, c))
}

fn config(partitions: u16, extra: &str) -> Result<Config, BoxError> {
    let text = format!("partitions = {partitions}\nhttp_addr = \"127.0.0.1:0\"\n{extra}");
    Ok(Config::from_toml(&text, "bench", &Overrides::default())?)
}

/// Starts Weir in-process; cancel the token to stop it.
fn start_weir(
    c: Config,
    client: async_nats::Client,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let s = stop.clone();
    let h = tokio::spawn(async move {
        if let Err(e) = crate::run(c, client, s.cancelled_owned()).await {
            eprintln!("weir failed: {e}");
        }
    });
    (stop, h)
}

/// Publishes `n` jobs round-robin over `keys` keys with a window of acks in flight.
pub async fn preload(
    js: &Context,
    prefix: &str,
    n: u64,
    keys: u64,
    payload: usize,
) -> Result<(), BoxError> {
    preload_ids(js, prefix, n, keys, payload, false).await
}

/// [`preload`], with a `Weir-Job-Id` header (`job-<i>`) on every job when `ids`.
pub async fn preload_ids(
    js: &Context,
    prefix: &str,
    n: u64,
    keys: u64,
    payload: usize,
    ids: bool,
) -> Result<(), BoxError> {
    let body = bytes::Bytes::from(vec![b'x'; payload]);
    let mut inflight = std::collections::VecDeque::with_capacity(1024);
    for i in 0..n {
        let subject = format!("{prefix}.sms.key-{}", i % keys.max(1));
        let ack = if ids {
            let mut h = async_nats::HeaderMap::new();
            h.insert(crate::job::header::JOB_ID, format!("job-{i}"));
            js.publish_with_headers(subject, h, body.clone()).await?
        } else {
            js.publish(subject, body.clone()).await?
        };
        inflight.push_back(ack);
        if inflight.len() >= 1024 {
            inflight.pop_front().expect("non-empty").await?;
        }
    }
    for f in inflight {
        f.await?;
    }
    Ok(())
}

/// Waits until `stream` holds `n` messages; returns when it did.
async fn wait_count(
    js: &Context,
    stream: &str,
    n: u64,
    deadline: Duration,
) -> Result<Instant, BoxError> {
    let start = Instant::now();
    let mut s = js.get_stream(stream).await?;
    loop {
        if s.info().await?.state.messages >= n {
            return Ok(Instant::now());
        }
        if start.elapsed() > deadline {
            return Err(format!("{stream} did not reach {n} messages in {deadline:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn throughput(a: &BenchArgs) -> Result<(), BoxError> {
    let (mut raws, mut weirs, mut wides) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..a.runs {
        let (_n, client) = fresh().await?;
        // The same context settings as Weir's (ack semaphore sized to the windows).
        let js = crate::context(&client, a.partitions, raw::WINDOW);
        let t = raw::run(&js, a.jobs, a.keys, a.partitions, a.payload, a.job_ids).await?;
        raws.push(a.jobs as f64 / t.as_secs_f64());
        weirs.push(pass_through(a, "").await?);
        print!(
            "  run {}: raw {:.0} msgs/s, weir {:.0} msgs/s",
            run + 1,
            raws[run],
            weirs[run]
        );
        if let Some(n) = a.publish_window_per_key {
            wides.push(pass_through(a, &format!("publish_window_per_key = {n}\n")).await?);
            print!(", weir with {n} per key {:.0} msgs/s", wides[run]);
        }
        println!();
    }
    let (r, w) = (median(&mut raws), median(&mut weirs));
    println!(
        "(1) raw JetStream ceiling (consume, republish, ack; {} partitions): median {r:.0} msgs/s",
        a.partitions
    );
    println!("(2) weir pass-through, all keys under limit:                   median {w:.0} msgs/s");
    if a.job_ids {
        println!("    (every job with a Weir-Job-Id: its status recorded in WEIR_JOB_STATUS)");
    }
    println!("(3) ratio weir/raw: {:.3}", w / r);
    if let Some(n) = a.publish_window_per_key {
        let wide = median(&mut wides);
        println!(
            "(3k) with publish_window_per_key = {n}: median {wide:.0} msgs/s, ratio {:.3}",
            wide / r
        );
    }
    Ok(())
}

/// One Weir pass-through run on a fresh server: jobs/s from start until all are released.
async fn pass_through(a: &BenchArgs, extra: &str) -> Result<f64, BoxError> {
    let (_n, client) = fresh().await?;
    let js = jetstream::new(client.clone());
    let c = config(
        a.partitions,
        &format!("{extra}[limits.default]\nrate = \"1000000000/s\"\nburst = 1000000"),
    )?;
    crate::streams::ensure(&js, &c).await?;
    preload_ids(&js, "jobs", a.jobs, a.keys, a.payload, a.job_ids).await?;
    let start = Instant::now();
    let (stop, h) = start_weir(c, client.clone());
    let done = wait_count(
        &js,
        crate::job::RELEASED_STREAM,
        a.jobs,
        Duration::from_secs(600),
    )
    .await?;
    stop.cancel();
    h.await?;
    Ok(a.jobs as f64 / (done - start).as_secs_f64())
}

async fn rate_error(a: &BenchArgs) -> Result<(), BoxError> {
    let (_n, client) = fresh().await?;
    let js = jetstream::new(client.clone());
    let rates: Vec<u32> = (0..a.rate_keys)
        .map(|i| {
            1 + (u64::from(i) * u64::from(a.max_rate - 1) / u64::from(a.rate_keys.max(2) - 1))
                as u32
        })
        .collect();
    let mut extra = match a.publish_window_per_key {
        Some(n) => format!("publish_window_per_key = {n}\n"),
        None => String::new(),
    };
    for (i, r) in rates.iter().enumerate() {
        extra.push_str(&format!(
            "[limits.keys.rk-{i}]\nrate = \"{r}/s\"\nburst = 1\n"
        ));
    }
    let c = config(a.partitions, &extra)?;
    crate::streams::ensure(&js, &c).await?;
    let mut sub = client.subscribe("released.>").await?;
    let (stop, h) = start_weir(c, client.clone());
    // Each key starts with 2 s of backlog and is then offered 1.05x its rate, so it always has
    // a backlog that stays within its in-memory horizon (nothing parks): what is measured is
    // the release rate itself. Releases are counted by their Weir-Released-At stamp.
    let producer = tokio::spawn(offer_paced(js.clone(), rates.clone(), a.rate_seconds + 5));
    let w0 = crate::release::unix_ms() + 3_000;
    let w1 = w0 + a.rate_seconds * 1_000;
    let end = Instant::now() + Duration::from_millis(3_000 + a.rate_seconds * 1_000 + 1_000);
    let mut counts: HashMap<String, u64> = HashMap::new();
    while let Ok(Some(m)) = tokio::time::timeout_at(end.into(), sub.next()).await {
        let at: u64 = m
            .headers
            .as_ref()
            .and_then(|h| h.get(crate::job::header::RELEASED_AT))
            .and_then(|v| v.as_str().parse().ok())
            .unwrap_or(0);
        if (w0..w1).contains(&at) {
            let key = m.subject.rsplit('.').next().unwrap_or("").to_string();
            *counts.entry(key).or_default() += 1;
        }
    }
    producer.abort();
    stop.cancel();
    h.await?;
    let mut errs: Vec<f64> = rates
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let want = f64::from(*r) * a.rate_seconds as f64;
            let got = counts.get(&format!("rk-{i}")).copied().unwrap_or(0) as f64;
            (got - want).abs() / want
        })
        .collect();
    let mean = errs.iter().sum::<f64>() / errs.len() as f64;
    let p50 = median(&mut errs);
    let max = errs.iter().cloned().fold(0.0, f64::max);
    let total: u64 = counts.values().sum();
    let want: f64 = rates
        .iter()
        .map(|r| f64::from(*r) * a.rate_seconds as f64)
        .sum();
    let aggregate = (total as f64 - want).abs() / want;
    println!(
        "(4) rate error, {} keys at 1..{}/s over {} s ({} released, {:.0} expected): all keys together {:.3}%; per key mean {:.3}%, median {:.3}%, max {:.3}% (one job is 1/(rate x {} s) of a key's count)",
        a.rate_keys, a.max_rate, a.rate_seconds, total, want, aggregate * 100.0, mean * 100.0, p50 * 100.0, max * 100.0, a.rate_seconds
    );
    Ok(())
}

/// Offers key `rk-i` its 2 s backlog, then 1.05 x `rates[i]` jobs per second, for `seconds`.
async fn offer_paced(js: Context, rates: Vec<u32>, seconds: u64) -> Result<(), BoxError> {
    let body = bytes::Bytes::from(vec![b'x'; 16]);
    let subjects: Vec<String> = (0..rates.len())
        .map(|i| format!("jobs.sms.rk-{i}"))
        .collect();
    let mut sent = vec![0u64; rates.len()];
    let mut inflight = std::collections::VecDeque::with_capacity(1024);
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while start.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        let t = start.elapsed().as_secs_f64();
        for (i, r) in rates.iter().enumerate() {
            let due = (f64::from(*r) * (2.0 + 1.05 * t)) as u64;
            while sent[i] < due {
                inflight.push_back(js.publish(subjects[i].clone(), body.clone()).await?);
                sent[i] += 1;
                if inflight.len() >= 1024 {
                    inflight.pop_front().expect("non-empty").await?;
                }
            }
        }
    }
    Ok(())
}

async fn cold_latency(a: &BenchArgs) -> Result<(), BoxError> {
    let (_n, client) = fresh().await?;
    let js = jetstream::new(client.clone());
    // The hot key is preload's `key-0`, at 100/s; the cold key shares its partition.
    let c = config(a.partitions, "[limits.keys.key-0]\nrate = \"100/s\"\nburst = 1\n[limits.default]\nrate = \"1000/s\"\nburst = 10")?;
    crate::streams::ensure(&js, &c).await?;
    let hot_p = crate::job::partition_of("key-0", a.partitions);
    let cold = (0..)
        .map(|i| format!("cold-{i}"))
        .find(|k| crate::job::partition_of(k, a.partitions) == hot_p)
        .expect("some key");
    let (stop, h) = start_weir(c, client.clone());
    preload(&js, "jobs", a.hot_backlog, 1, a.payload).await?;
    // Wait until the backlog is absorbed (parked), then time cold jobs one at a time.
    let park = wait_parked(&js, a.hot_backlog).await?;
    let mut sub = client.subscribe(format!("released.sms.{cold}")).await?;
    let mut lat = Vec::with_capacity(a.cold_samples);
    for _ in 0..a.cold_samples {
        let t = Instant::now();
        js.publish(format!("jobs.sms.{cold}"), "c".into())
            .await?
            .await?;
        sub.next().await.ok_or("subscription ended")?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    h.await?;
    lat.sort_by(f64::total_cmp);
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize];
    println!(
        "(5) cold key {cold} with hot key-0 holding {park} parked: added latency p50 {:.2} ms, p99 {:.2} ms (publish ack included)",
        p(0.5),
        p(0.99)
    );
    Ok(())
}

async fn wait_parked(js: &Context, backlog: u64) -> Result<u64, BoxError> {
    let mut park = js.get_stream(crate::job::PARK_STREAM).await?;
    let mut jobs = js.get_stream(crate::job::JOBS_STREAM).await?;
    let start = Instant::now();
    loop {
        let parked = park.info().await?.state.messages;
        let waiting = jobs.info().await?.state.messages;
        if parked >= backlog / 2 && waiting < 1000 || start.elapsed() > Duration::from_secs(600) {
            return Ok(parked);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resident bytes per key with `n` keys tracked by one scheduler at once (before eviction).
fn memory_per_key(n: u64) {
    use crate::scheduler::{Action, Scheduler};
    let c = Config::from_toml(
        "[limits.default]\nrate = \"1/h\"\nburst = 1",
        "bench",
        &Overrides::default(),
    )
    .expect("static");
    let limits = std::sync::Arc::new(crate::limits::Limits::from_config(&c));
    let before = rss();
    let mut s: Scheduler<()> = Scheduler::new(limits, Duration::from_secs(5), 1);
    let mut acts = Vec::new();
    for i in 0..n {
        let key = format!("customer-{i:07}");
        s.offer(&key, i, false, (), crate::limiter::now());
        s.take_actions(&mut acts);
        for a in acts.drain(..) {
            if let Action::Release { key, .. } = a {
                s.release_done(&key, None, true, crate::limiter::now());
            }
        }
    }
    let after = rss();
    let keys = s.stats().keys;
    println!(
        "(6) memory: {keys} keys tracked (16-byte names): {:.0} bytes per key resident",
        (after.saturating_sub(before)) as f64 / keys as f64
    );
    drop(s);
}

/// Resident set size in bytes (Linux), 0 elsewhere.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}
