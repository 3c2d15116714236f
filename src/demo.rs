//! `weir demo`: throttling, live, on one machine.
//!
//! Unless `--nats-url` is given it starts a local nats-server ([`LocalNats`]: temporary store,
//! free port, killed at the end). It runs Weir in-process with three keys of different limits,
//! floods each key at `--factor` (10) times its limit for `--seconds` (20) with [`load::publish`],
//! and redraws a table twice a second: per key, the limit, the offered rate (jobs stored in
//! `WEIR_JOBS` over the last second), the released rate (jobs seen on `released.>` over the last
//! second, by a core NATS subscription), the backlog (offered − released so far) and the total
//! released. After the flood it keeps going until every backlog has drained (or Ctrl-C, or
//! `--drain-timeout`), shuts Weir down, and prints a summary: per key, offered, released, the
//! observed release rate against the limit, and how many releases came out of order.
//!
//! When stdout is not a terminal it prints one line per refresh instead of redrawing.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::ContextBuilder;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Overrides};
use crate::load::{self, LoadSpec, Progress};
use crate::natsd::LocalNats;

mod view;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `weir demo` flags.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Use this NATS server (JetStream enabled) instead of starting a local nats-server. No other
    /// Weir may be running on it: the demo runs its own, with 4 partitions.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// How long to flood, in seconds. At 10x, each key then needs 9x as long to drain: the
    /// default makes the whole demo about a minute.
    #[arg(long, default_value_t = 6.0)]
    pub seconds: f64,
    /// Offer each key this many times its limit.
    #[arg(long, default_value_t = 10.0)]
    pub factor: f64,
    /// Fail if the backlog has not drained this many seconds after the flood (default: wait).
    #[arg(long)]
    pub drain_timeout: Option<f64>,
}

/// The demo's keys: name, jobs per second, burst.
const KEYS: [(&str, u32, u32); 3] = [("acme", 50, 10), ("globex", 20, 5), ("initech", 5, 1)];
const REFRESH: Duration = Duration::from_millis(500);
const DESTINATION: &str = "sms";

/// What the `released.>` subscription has seen of one key.
#[derive(Debug, Default, Clone)]
struct Seen {
    released: u64,
    /// Releases whose sequence was not above every earlier one (repeats or reordering).
    out_of_order: u64,
    max_seq: Option<u64>,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Seen {
    fn distinct(&self) -> u64 {
        self.released - self.out_of_order
    }
}

pub async fn main(args: DemoArgs) -> Result<(), BoxError> {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(args.seconds) || !positive(args.factor) {
        return Err("--seconds and --factor must be > 0".into());
    }
    // Kept until the end: dropping it stops the local server.
    let (_nats, url) = match args.nats_url.clone() {
        Some(u) => (None, u),
        None => {
            let n = tokio::task::spawn_blocking(LocalNats::start).await??;
            let url = n.url();
            (Some(n), url)
        }
    };
    let config = config(&url)?;

    // The demo's own connection (it fails fast, unlike Weir's) publishes and observes.
    let client = async_nats::ConnectOptions::new()
        .name("weir-demo")
        .connect(&url)
        .await
        .map_err(|e| format!("cannot connect to NATS at {url}: {e}"))?;
    let js = ContextBuilder::new()
        .max_ack_inflight(1024)
        .backpressure_on_inflight(true)
        .build(client.clone());
    // The streams exist before the flood starts, so no early job is refused.
    crate::streams::ensure(&js, &config).await?;
    let seen = Arc::new(Mutex::new(vec![Seen::default(); KEYS.len()]));
    let sub = client.subscribe("released.>").await?;
    client.flush().await?;
    let observer = tokio::spawn(observe(sub, seen.clone()));

    let shutdown = CancellationToken::new();
    let weir_client = crate::connect(&url).await?;
    let mut weir = tokio::spawn(crate::run(
        config,
        weir_client,
        shutdown.clone().cancelled_owned(),
    ));

    let progress: Vec<Arc<Progress>> = KEYS.iter().map(|_| Arc::default()).collect();
    let mut loads = Vec::new();
    for ((key, rate, _), p) in KEYS.iter().zip(&progress) {
        let spec = LoadSpec {
            destination: DESTINATION.into(),
            keys: vec![key.to_string()],
            rate: f64::from(*rate) * args.factor,
            count: 0,
            duration: Some(Duration::from_secs_f64(args.seconds)),
            payload: 16,
            window: 256,
        };
        let (js, p) = (js.clone(), p.clone());
        loads.push(tokio::spawn(async move {
            load::publish(&js, &spec, Some(&p)).await
        }));
    }

    let mut screen = view::Screen::new(&url);
    let start = Instant::now();
    let mut flood_end = None;
    let mut tick = tokio::time::interval(REFRESH);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut outcome = Ok(());
    loop {
        let interrupted = tokio::select! {
            _ = tick.tick() => false,
            _ = &mut ctrl_c => true,
            r = &mut weir => return Err(match r? {
                Ok(()) => "weir stopped by itself".into(),
                Err(e) => format!("weir stopped: {e}").into(),
            }),
        };
        let now = Instant::now();
        if flood_end.is_none() && loads.iter().all(|l| l.is_finished()) {
            flood_end = Some(now);
        }
        let counts: view::Counts = {
            let seen = seen.lock().expect("observer");
            (progress.iter().zip(seen.iter()))
                .map(|(p, s)| (p.acked.load(Relaxed), s.distinct()))
                .collect()
        };
        let drained = counts.iter().all(|(o, r)| r >= o);
        let since_flood = flood_end.map(|end| (now - end).as_secs_f64());
        let elapsed = (now - start).as_secs_f64();
        let status = view::status(args.factor, args.seconds, elapsed, since_flood, &counts);
        screen.refresh(now, &status, counts);
        if interrupted || (since_flood.is_some() && drained) {
            break;
        }
        if let (Some(ago), Some(limit)) = (since_flood, args.drain_timeout) {
            if ago > limit {
                outcome = Err(format!("the backlog did not drain within {limit} s").into());
                break;
            }
        }
    }

    for p in &progress {
        p.stop();
    }
    let mut failed = 0;
    for l in loads {
        failed += l.await??.failed;
    }
    shutdown.cancel();
    weir.await??;
    observer.abort();
    let offered: Vec<u64> = progress.iter().map(|p| p.acked.load(Relaxed)).collect();
    view::summary(&offered, &seen.lock().expect("observer"), failed);
    outcome
}

/// Weir's configuration for the demo: 4 partitions, the three keys' limits, a short grace.
fn config(url: &str) -> Result<Config, BoxError> {
    let mut toml =
        String::from("partitions = 4\nhttp_addr = \"127.0.0.1:0\"\nshutdown_grace_ms = 5000\n");
    for (k, rate, burst) in KEYS {
        writeln!(
            toml,
            "[limits.keys.{k}]\nrate = \"{rate}/s\"\nburst = {burst}"
        )?;
    }
    let overrides = Overrides {
        nats_url: Some(url.to_string()),
        ..Overrides::default()
    };
    Ok(Config::from_toml(&toml, "demo", &overrides)?)
}

/// Counts releases per key (from the subject `released.<destination>.<key>`) and checks order.
async fn observe(mut sub: async_nats::Subscriber, seen: Arc<Mutex<Vec<Seen>>>) {
    while let Some(m) = sub.next().await {
        let key = m.subject.rsplit('.').next().unwrap_or_default();
        let Some(i) = KEYS.iter().position(|(k, _, _)| *k == key) else {
            continue;
        };
        let now = Instant::now();
        let mut all = seen.lock().expect("observer");
        let s = &mut all[i];
        s.released += 1;
        match (load::seq_of(&m.payload), s.max_seq) {
            (Some(q), Some(max)) if q <= max => s.out_of_order += 1,
            (Some(q), _) => s.max_seq = Some(q),
            _ => {}
        }
        s.first.get_or_insert(now);
        s.last = Some(now);
    }
}
