//! `weir chaos`: a long run under injected faults, checked job by job.
//!
//! It starts its own nats-server with a file store (or uses `--nats-url`, then without NATS
//! faults) and `--members` `weir run` processes of this executable, publishes a run of jobs
//! exactly once ([`plan`]), injects faults while Weir works through them ([`faults`]), waits
//! until every accepted job is released or dead, and prints the job ledger ([`report`]):
//! published, released, dead by reason, lost, duplicated, reordered within a key, and each
//! key's rate overshoot over its GCRA bound. It exits non-zero if anything was lost,
//! duplicated or reordered, or the jobs were not all accounted for by the deadline.
//!
//! A run that lost jobs traces each ([`trace`]): its `WEIR_JOBS` sequence from its publish ack,
//! which stored job carries the release id derived from it, its neighbours in its key, and
//! what `WEIR_JOBS` and `WEIR_PARK` still hold. With `WEIR_CHAOS_KEEP_STORE` set, a run that is
//! not clean keeps nats-server's store directory and log (`nats-server.log` in it) and says
//! where on stderr.
//!
//! `--flood` is the memory scenario: 1,000,000 jobs for 100,000 keys at ten times their rate,
//! with each Weir process's VmRSS and VmHWM sampled throughout.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, Context};

use crate::bench::BoxError;
use crate::job::{DEAD_STREAM, JOBS_STREAM, PARK_STREAM, RELEASED_STREAM};
use crate::limits::{store::Store, Entry, LimitJson};
use crate::natsd::LocalNats;

pub mod faults;
pub mod plan;
pub mod report;
pub mod trace;

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// Jobs to publish [default: 100000, 1000000 with --flood].
    #[arg(long)]
    pub jobs: Option<u64>,
    /// `weir run` processes in the group.
    #[arg(long, default_value_t = 2)]
    pub members: usize,
    #[arg(long, default_value_t = 12)]
    pub partitions: u16,
    /// Hot keys (half `hot-fast-*` at 400/s, half `hot-slow-*` at 100/s, both set as patterns).
    #[arg(long, default_value_t = 20)]
    pub hot_keys: u64,
    /// Share of the jobs on the hot keys.
    #[arg(long, default_value_t = 0.8)]
    pub hot_share: f64,
    /// Cold keys, at the default 50/s [default: 5000, 100000 with --flood].
    #[arg(long)]
    pub cold_keys: Option<u64>,
    /// Jobs sent to invalid subjects (`jobs.chaos.bad-<i>.x`): they must end dead.
    #[arg(long, default_value_t = 10)]
    pub invalid: u64,
    /// kill -9 a random Weir process every this many seconds, restarting it at once under
    /// the same member name (0: never).
    #[arg(long, default_value_t = 3.0)]
    pub kill_every: f64,
    /// nats-server kill -9 and restarts (not with --nats-url).
    #[arg(long, default_value_t = 1)]
    pub nats_restarts: u32,
    /// Seconds from the start to the first NATS fault, and between NATS faults.
    #[arg(long, default_value_t = 15.0)]
    pub nats_every: f64,
    /// Seconds nats-server stays down in a restart.
    #[arg(long, default_value_t = 5.0)]
    pub nats_down: f64,
    /// After the restarts, SIGSTOP nats-server for this many seconds, then SIGCONT (longer
    /// than the 5 s publish ack timeout, e.g. 7; 0: never).
    #[arg(long, default_value_t = 0.0)]
    pub nats_pause: f64,
    /// The group's lease_ms.
    #[arg(long, default_value_t = 6000)]
    pub lease_ms: u64,
    /// The members' publish_window_per_key: more than 1 shows the reorder a NATS crash causes
    /// when a key's releases are pipelined.
    #[arg(long, default_value_t = 1)]
    pub publish_window_per_key: u32,
    /// Seconds to wait for every job to be released or dead.
    #[arg(long, default_value_t = 900)]
    pub deadline: u64,
    /// The memory flood: 1,000,000 jobs for 100,000 keys (10 each, at 10x their 2/s rate).
    #[arg(long)]
    pub flood: bool,
    /// An external NATS server (no NATS faults; Weir's streams there must be empty).
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Print the ledger as JSON.
    #[arg(long)]
    pub json: bool,
    /// Serial publish lanes.
    #[arg(long, default_value_t = 128, hide = true)]
    pub lanes: usize,
}

/// Runs the scenario; `Ok(false)` when the ledger is not clean.
pub async fn main(a: ChaosArgs) -> Result<bool, BoxError> {
    let start = Instant::now();
    let t0_ms = crate::release::unix_ms();
    let deadline = start + Duration::from_secs(a.deadline);
    let plan = Arc::new(if a.flood {
        plan::flood(
            a.cold_keys.unwrap_or(100_000),
            a.jobs.unwrap_or(1_000_000) / a.cold_keys.unwrap_or(100_000).max(1),
        )
    } else {
        plan::mixed(
            a.jobs.unwrap_or(100_000),
            a.hot_keys,
            a.hot_share,
            a.cold_keys.unwrap_or(5_000),
            a.invalid,
        )
    });
    let mut nats = match &a.nats_url {
        Some(_) => None,
        None => Some(LocalNats::start()?),
    };
    let url = a
        .nats_url
        .clone()
        .unwrap_or_else(|| nats.as_ref().expect("started").url());
    let client = crate::connect(&url).await?;
    let js = jetstream::new(client.clone());
    let toml = setup(&js, &a).await?;
    let file = crate::members::config_file(&toml)?;
    let mut group = faults::Group::start(
        file.path().to_path_buf(),
        url.clone(),
        a.members.max(1),
        a.partitions,
    )
    .await?;
    group.wait_ready(Duration::from_secs(60)).await?;

    let stats = Arc::new(plan::Published::default());
    let run = format!("{:08x}", rand::random::<u32>());
    let t_pub = Instant::now();
    let mut publisher = {
        let (js, plan, stats) = (js.clone(), plan.clone(), stats.clone());
        let lanes = a.lanes;
        tokio::spawn(async move {
            let acks = plan::publish(&js, plan, run, lanes, stats, (start, deadline)).await;
            (acks, t_pub.elapsed())
        })
    };

    // The fault loop, until every accepted job is accounted for or the deadline passes.
    let mut nats_due: Vec<bool> = Vec::new(); // true: a pause
    if nats.is_some() {
        nats_due.extend((0..a.nats_restarts).map(|_| false));
        if a.nats_pause > 0.0 {
            nats_due.push(true);
        }
    }
    let mut nats_faults = Vec::new();
    let kill_every = Duration::from_secs_f64(a.kill_every.max(0.0));
    let nats_every = Duration::from_secs_f64(a.nats_every.max(0.0));
    let mut next_kill = start + kill_every;
    let mut next_nats = start + nats_every;
    let mut published: Option<(Vec<Vec<plan::Acked>>, Duration)> = None;
    let mut last_check = Instant::now();
    let mut idle: Option<(u64, Instant)> = None;
    let drained = loop {
        group.sample_memory();
        if publisher.is_finished() && published.is_none() {
            published = Some(
                (&mut publisher)
                    .await
                    .map_err(|e| format!("the publisher failed: {e}"))?,
            );
            continue;
        }
        if let Some((acks, _)) = &published {
            if last_check.elapsed() > Duration::from_millis(200) {
                last_check = Instant::now();
                let accepted: usize = acks.iter().map(Vec::len).sum();
                match streams(&js).await {
                    Some(s) if s.done >= accepted as u64 && s.waiting == 0 => break true,
                    // Nothing waits, yet jobs are missing: once that has held for 10 s,
                    // nothing more will come (the ledger says which jobs are missing).
                    Some(s) if s.waiting == 0 => match idle {
                        Some((done, since)) if done == s.done => {
                            if since.elapsed() > Duration::from_secs(10) {
                                break false;
                            }
                        }
                        _ => idle = Some((s.done, Instant::now())),
                    },
                    _ => idle = None,
                }
            }
        }
        if Instant::now() > deadline {
            break false;
        }
        let now = Instant::now();
        if !nats_due.is_empty() && now >= next_nats {
            let pause = nats_due.remove(0);
            let down = Duration::from_secs_f64(if pause { a.nats_pause } else { a.nats_down });
            let n = nats.as_mut().expect("faults only on a local server");
            nats_faults.push(group.nats_fault(n, pause, down, start).await?);
            next_nats = Instant::now() + nats_every;
            next_kill = next_kill.max(Instant::now() + kill_every);
        } else if !kill_every.is_zero() && now >= next_kill {
            group.kill_one().await?;
            next_kill = now + kill_every;
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (acks, publish_time) = match published {
        Some(p) => p,
        None => {
            publisher.abort();
            (vec![Vec::new(); plan.keys.len()], start.elapsed())
        }
    };
    let accepted: Vec<u64> = acks.iter().map(|a| a.len() as u64).collect();

    let released = crate::ledger::read(&js, RELEASED_STREAM).await?;
    let dead = crate::ledger::read(&js, DEAD_STREAM).await?;
    let t = report::build(
        &plan,
        &accepted,
        &released,
        &dead,
        &group.moves,
        a.partitions,
    );
    let duplicated = released.duplicates + dead.duplicates + t.both;
    let clean = drained && t.lost == 0 && duplicated == 0 && released.out_of_order == 0;
    let lost_trace = if t.lost > 0 {
        trace::lost(&js, &plan, &acks, &t.lost_jobs, a.partitions, t0_ms).await
    } else {
        Vec::new()
    };
    let memory: Vec<report::MemoryRow> = (group.memory.iter())
        .map(|(m, rss, hwm)| report::MemoryRow {
            member: m.clone(),
            peak_rss_bytes: *rss,
            peak_hwm_bytes: *hwm,
        })
        .collect();
    let r = report::Report {
        scenario: if a.flood { "flood" } else { "mixed" },
        members: group.members.len(),
        partitions: a.partitions,
        keys: plan.keys.len(),
        planned: plan.order.len() as u64,
        published: accepted.iter().sum(),
        publish_retries: stats.retries.load(Relaxed),
        publish_duplicate_acks: stats.duplicate_acks.load(Relaxed),
        released: released.distinct(),
        dead: dead.distinct(),
        dead_by_reason: dead.reasons.clone(),
        lost: t.lost,
        lost_jobs: t.lost_jobs,
        lost_trace,
        duplicated,
        reordered: released.out_of_order,
        reorders: released.reorders.clone(),
        unexpected: t.unexpected,
        rate: t.rate,
        kills: group.kills,
        nats_faults,
        peak_rss_bytes: memory.iter().map(|m| m.peak_rss_bytes).max().unwrap_or(0),
        peak_hwm_bytes: memory.iter().map(|m| m.peak_hwm_bytes).max().unwrap_or(0),
        memory,
        publish_s: publish_time.as_secs_f64(),
        wall_s: start.elapsed().as_secs_f64(),
        drained,
        clean,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        r.print();
    }
    drop(group);
    if let Some(n) = nats.take() {
        if !clean && std::env::var_os("WEIR_CHAOS_KEEP_STORE").is_some() {
            let dir = n.keep();
            eprintln!(
                "weir chaos: kept the nats-server store and log in {}",
                dir.display()
            );
        }
    }
    Ok(clean)
}

/// Creates the streams and the limits (the default from the config file, the hot tiers as
/// patterns in `WEIR_LIMITS`); returns the members' config.
async fn setup(js: &Context, a: &ChaosArgs) -> Result<String, BoxError> {
    let (default, tiers) = plan::tiers(a.flood);
    let toml = format!(
        "partitions = {}\nlease_ms = {}\npublish_window_per_key = {}\n[limits.default]\nrate = \"{}\"\nburst = {}\n",
        a.partitions, a.lease_ms, a.publish_window_per_key, default.rate, default.burst
    );
    let config = crate::config::Config::from_toml(&toml, "chaos", &Default::default())?;
    crate::streams::ensure(js, &config).await?;
    for s in [JOBS_STREAM, RELEASED_STREAM, PARK_STREAM, DEAD_STREAM] {
        let n = js.get_stream(s).await?.info().await?.state.messages;
        if n > 0 {
            return Err(format!("{s} already holds {n} messages: weir chaos needs empty streams (purge them, or run without --nats-url)").into());
        }
    }
    let store = Store::open(js, &config).await?;
    for (prefix, limit) in tiers {
        let json = LimitJson::of(&limit, Some(&format!("{prefix}-*")));
        store.put(&Entry::Pattern(prefix.into()), &json).await?;
    }
    Ok(toml)
}

/// What the streams hold: jobs done (in `WEIR_RELEASED` or `WEIR_DEAD`) and jobs waiting (in
/// `WEIR_JOBS` or `WEIR_PARK`); `None` if NATS did not answer.
struct Streams {
    done: u64,
    waiting: u64,
}

async fn streams(js: &Context) -> Option<Streams> {
    let mut len = [0u64; 4];
    for (l, s) in len
        .iter_mut()
        .zip([RELEASED_STREAM, DEAD_STREAM, JOBS_STREAM, PARK_STREAM])
    {
        *l = js
            .get_stream(s)
            .await
            .ok()?
            .info()
            .await
            .ok()?
            .state
            .messages;
    }
    Some(Streams {
        done: len[0] + len[1],
        waiting: len[2] + len[3],
    })
}
