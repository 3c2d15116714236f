//! Hot-path micro-benchmarks: what Weir spends per job outside NATS.
//!
//! `cargo bench` runs them; `weir bench` is the end-to-end benchmark against a real nats-server.

use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use weir::config::{Config, Overrides};
use weir::limiter::now;
use weir::limits::Limits;
use weir::scheduler::{Action, Scheduler};

fn limits(toml: &str) -> Arc<Limits> {
    let c = Config::from_toml(toml, "bench", &Overrides::default()).expect("config");
    Arc::new(Limits::from_config(&c))
}

/// A runtime for the scheduler's timers (the clock is tokio's).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

/// Offers job `i` of `key`, then completes the release it leads to: one decision.
fn decide(s: &mut Scheduler<u64>, key: &str, i: u64, acts: &mut Vec<Action<u64>>) {
    black_box(s.offer(key, i, false, i, now()));
    s.take_actions(acts);
    for a in acts.drain(..) {
        if let Action::Release { key, job } = a {
            s.release_done(&key, job.park_seq, true, now());
        }
    }
}

/// One scheduling decision for a job of a key under its limit (the pass-through path): key
/// lookup, GCRA check, release action, and the release's completion.
fn decision(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("scheduler/decision");
    g.throughput(Throughput::Elements(1));
    for keys in [1_000u64, 1_000_000] {
        let mut s: Scheduler<u64> = Scheduler::new(
            limits("[limits.default]\nrate = \"1000000000/s\"\nburst = 1000000"),
            Duration::from_secs(5),
            1000,
        )
        // As a partition runs it by default (`publish_window_per_key = 1`).
        .with_key_window(1);
        let names: Vec<String> = (0..keys).map(|i| format!("customer-{i:07}")).collect();
        let mut acts = Vec::with_capacity(16);
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::from_parameter(keys), &keys, |b, _| {
            b.iter(|| {
                let key = &names[i % names.len()];
                i += 1;
                decide(&mut s, key, i as u64, &mut acts);
            })
        });
    }
    g.finish();
}

/// The same decision with 1M keys while limit changes keep arriving: one key's limit changes
/// every 1,000 decisions, among 1,000 keys with limits of their own (the watcher's copy of the
/// table, the partition's diff and the re-limited key), so the figure includes the amortised
/// cost of applying updates.
fn decision_with_updates(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("scheduler/decision_with_updates");
    g.throughput(Throughput::Elements(1));
    let keys = 1_000_000u64;
    let base = limits("[limits.default]\nrate = \"1000000000/s\"\nburst = 1000000");
    let mut s: Scheduler<u64> =
        Scheduler::new(base.clone(), Duration::from_secs(5), 1000).with_key_window(1);
    let names: Vec<String> = (0..keys).map(|i| format!("customer-{i:07}")).collect();
    let mut acts = Vec::with_capacity(16);
    let mut table = (*base).clone();
    let mut i = 0usize;
    g.bench_with_input(BenchmarkId::from_parameter(keys), &keys, |b, _| {
        b.iter(|| {
            let key = &names[i % names.len()];
            i += 1;
            if i % 1000 == 0 {
                let rev = table.revision + 1;
                let value = format!("{{\"rate\": \"{}/s\", \"burst\": 1000}}", 1_000_000 + i);
                table
                    .apply(
                        &format!("keys.{}", names[(i / 1000) % 1000 * 997]),
                        Some(value.as_bytes()),
                        rev,
                    )
                    .expect("valid");
                s.set_limits(Arc::new(table.clone()), now());
            }
            decide(&mut s, key, i as u64, &mut acts);
        })
    });
    g.finish();
}

/// A GCRA check on one governor bucket.
fn bucket(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let limit = Config::from_toml(
        "[limits.default]\nrate = \"1000000000/s\"\nburst = 1000000",
        "b",
        &Overrides::default(),
    )
    .expect("config")
    .default_limit;
    let b = weir::limiter::Bucket::new(&limit);
    let mut g = c.benchmark_group("limiter");
    g.throughput(Throughput::Elements(1));
    g.bench_function("try_take", |bn| bn.iter(|| black_box(b.try_take())));
    g.finish();
}

/// Subject parsing and the released job's headers.
fn release_headers(c: &mut Criterion) {
    let mut g = c.benchmark_group("release");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_stored", |b| {
        b.iter(|| {
            black_box(weir::job::parse_stored(black_box(
                "weir.in.3.sms.customer-0000042",
            )))
        })
    });
    g.bench_function("stamp_headers", |b| {
        b.iter(|| {
            let mut h = async_nats::HeaderMap::new();
            weir::release::stamp(&mut h, "customer-0000042", "sms", 1_795_800_000_000, || {
                weir::job::derived_msg_id(123_456)
            });
            weir::release::stamp_released(&mut h, 1_795_800_000_123);
            black_box(h)
        })
    });
    g.finish();
}

/// The per-job metrics: `PartitionMetrics::released` (a counter and the release-delay histogram),
/// for one destination (the last-destination cache) and rotating over eight (a map lookup).
fn metrics_released(c: &mut Criterion) {
    let m = weir::metrics::Metrics::prometheus_only("bench").expect("metrics");
    let mut g = c.benchmark_group("metrics/released");
    g.throughput(Throughput::Elements(1));
    for dests in [1usize, 8] {
        let mut p = m.partition(0);
        let names: Vec<String> = (0..dests).map(|i| format!("dest-{i}")).collect();
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::from_parameter(dests), &dests, |b, _| {
            b.iter(|| {
                i += 1;
                p.released(
                    black_box(&names[i % names.len()]),
                    black_box(i as u64 & 0xffff),
                );
            })
        });
    }
    g.finish();
    black_box(m.render());
}

criterion_group!(
    benches,
    decision,
    decision_with_updates,
    bucket,
    release_headers,
    metrics_released
);
criterion_main!(benches);
