//! The atomics the per-partition recorders share with the observable instruments.
//!
//! Counts live in [`DestCells`], one per (partition, destination), written only by that
//! partition's recorder; the observable instruments' callbacks sum them across partitions at
//! collection time. Locks are taken only the first time a recorder meets a destination and when
//! the metrics are collected.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use hashbrown::HashMap;
use opentelemetry::metrics::{AsyncInstrument, Meter};
use opentelemetry::KeyValue;

use super::{lock, MAX_DESTINATIONS, OTHER_DESTINATION, UNKNOWN_DESTINATION};

fn system() -> KeyValue {
    KeyValue::new("messaging.system", "nats")
}

/// Destination names to global indexes, and each index's attributes. Index 0 is `_other`.
pub(super) struct DestTable {
    index: HashMap<Box<str>, u32>,
    attrs: Vec<Arc<[KeyValue]>>,
}

impl Default for DestTable {
    fn default() -> Self {
        DestTable {
            index: HashMap::new(),
            attrs: vec![dest_attrs(OTHER_DESTINATION)],
        }
    }
}

fn dest_attrs(name: &str) -> Arc<[KeyValue]> {
    Arc::new([
        system(),
        KeyValue::new("messaging.destination.name", name.to_string()),
    ])
}

impl DestTable {
    pub(super) fn resolve(&mut self, name: &str) -> (u32, Arc<[KeyValue]>) {
        let name = if name.is_empty() {
            UNKNOWN_DESTINATION
        } else {
            name
        };
        let i = match self.index.get(name) {
            Some(&i) => i,
            None if name == OTHER_DESTINATION || self.index.len() >= MAX_DESTINATIONS => 0,
            None => {
                let i = self.attrs.len() as u32;
                self.attrs.push(dest_attrs(name));
                self.index.insert(name.into(), i);
                i
            }
        };
        (i, self.attrs[i as usize].clone())
    }
}

/// One partition's counts for one destination. Aligned so that partitions on different cores
/// don't share cache lines.
#[derive(Default)]
#[repr(align(64))]
pub(super) struct DestCells {
    pub(super) received: AtomicU64,
    pub(super) released: AtomicU64,
    pub(super) parked: AtomicU64,
}

pub(super) struct DeadCell {
    pub(super) dest: u32,
    pub(super) reason: &'static str,
    pub(super) count: AtomicU64,
}

#[repr(align(64))]
pub(super) struct PartitionCells {
    /// `None` for the unpartitioned recorder, which has no partition gauges.
    pub(super) id: Option<u16>,
    attrs: [KeyValue; 2],
    pub(super) held: AtomicU64,
    pub(super) parked: AtomicU64,
    pub(super) lag: AtomicU64,
    pub(super) throttled: AtomicU64,
    /// Release publishes JetStream acked as duplicates (a re-release after a crash or a
    /// hand-over, absorbed by the duplicate window).
    pub(super) duplicates: AtomicU64,
    /// Publishes JetStream refused (stream full, no leader, ack timed out): each job went back
    /// unacked and was retried after a backoff.
    pub(super) refused: AtomicU64,
    /// Indexed by global destination index.
    pub(super) dests: Mutex<Vec<Option<Arc<DestCells>>>>,
    pub(super) dead: Mutex<Vec<Arc<DeadCell>>>,
}

/// `(key, backlog)` pairs.
type KeyList = Vec<(String, u64)>;

/// What recorders and observable callbacks share.
#[derive(Default)]
pub(super) struct Shared {
    pub(super) dests: Mutex<DestTable>,
    partitions: Mutex<Vec<Arc<PartitionCells>>>,
    pub(super) top_n: AtomicUsize,
    /// Top-key lists: the process-wide one under `None`, each partition's under its id.
    top_keys: Mutex<HashMap<Option<u16>, KeyList>>,
    /// Job status records dropped on a full queue ([`crate::status`]).
    pub(super) status_dropped: Arc<AtomicU64>,
}

impl Shared {
    pub(super) fn partition(&self, id: Option<u16>) -> Arc<PartitionCells> {
        let mut parts = lock(&self.partitions);
        if let Some(p) = parts.iter().find(|p| p.id == id) {
            return p.clone();
        }
        let p = Arc::new(PartitionCells {
            id,
            attrs: [
                system(),
                KeyValue::new("weir.partition", id.map_or(-1, i64::from)),
            ],
            held: AtomicU64::new(0),
            parked: AtomicU64::new(0),
            lag: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            dests: Mutex::new(Vec::new()),
            dead: Mutex::new(Vec::new()),
        });
        parts.push(p.clone());
        p
    }

    pub(super) fn set_top_keys(&self, from: Option<u16>, mut keys: KeyList) {
        let n = self.top_n.load(Relaxed);
        if n == 0 {
            return;
        }
        keys.sort_unstable_by_key(|k| std::cmp::Reverse(k.1));
        keys.truncate(n);
        lock(&self.top_keys).insert(from, keys);
    }

    /// Sums one counter of every partition's cells by destination; calls `f` for each
    /// destination some partition has met.
    fn by_dest(&self, field: fn(&DestCells) -> &AtomicU64, f: impl Fn(u64, &[KeyValue])) {
        let attrs = lock(&self.dests).attrs.clone();
        let mut sums: Vec<Option<u64>> = vec![None; attrs.len()];
        for p in lock(&self.partitions).iter() {
            for (i, c) in lock(&p.dests).iter().enumerate() {
                if let (Some(c), Some(s)) = (c, sums.get_mut(i)) {
                    *s = Some(s.unwrap_or(0) + field(c).load(Relaxed));
                }
            }
        }
        for (s, a) in sums.iter().zip(&attrs) {
            if let Some(s) = s {
                f(*s, a);
            }
        }
    }

    fn by_partition(&self, field: fn(&PartitionCells) -> &AtomicU64, f: impl Fn(u64, &[KeyValue])) {
        for p in lock(&self.partitions).iter().filter(|p| p.id.is_some()) {
            f(field(p).load(Relaxed), &p.attrs);
        }
    }

    fn dead(&self, f: impl Fn(u64, &[KeyValue])) {
        let attrs = lock(&self.dests).attrs.clone();
        let mut sums: HashMap<(u32, &'static str), u64> = HashMap::new();
        for p in lock(&self.partitions).iter() {
            for c in lock(&p.dead).iter() {
                *sums.entry((c.dest, c.reason)).or_default() += c.count.load(Relaxed);
            }
        }
        for ((dest, reason), n) in sums {
            let mut kv = attrs[dest as usize].to_vec();
            kv.push(KeyValue::new("weir.dead_reason", reason));
            f(n, &kv);
        }
    }

    fn top_keys(&self, f: impl Fn(u64, &[KeyValue])) {
        let n = self.top_n.load(Relaxed);
        if n == 0 {
            return;
        }
        let lists = lock(&self.top_keys);
        let mut all: Vec<&(String, u64)> = lists.values().flatten().collect();
        all.sort_unstable_by_key(|k| std::cmp::Reverse(k.1));
        for (key, backlog) in all.into_iter().take(n) {
            f(*backlog, &[KeyValue::new("weir.key", key.clone())]);
        }
    }
}

/// Registers the observable instruments; their callbacks hold `shared`.
pub(super) fn register_observables(meter: &Meter, shared: &Arc<Shared>) {
    type DestField = fn(&DestCells) -> &AtomicU64;
    let counters: [(&'static str, &'static str, DestField); 3] = [
        (
            "weir.jobs.received",
            "Jobs taken from the partition consumers",
            |c| &c.received,
        ),
        (
            "weir.jobs.released",
            "Jobs released to their destination",
            |c| &c.released,
        ),
        ("weir.jobs.parked", "Jobs moved to the durable park", |c| {
            &c.parked
        }),
    ];
    for (name, help, field) in counters {
        let s = shared.clone();
        meter
            .u64_observable_counter(name)
            .with_unit("{job}")
            .with_description(help)
            .with_callback(move |o: &dyn AsyncInstrument<u64>| {
                s.by_dest(field, |v, a| o.observe(v, a))
            })
            .build();
    }
    let s = shared.clone();
    meter
        .u64_observable_counter(super::DEAD)
        .with_unit("{job}")
        .with_description("Jobs dead-lettered, by reason")
        .with_callback(move |o: &dyn AsyncInstrument<u64>| s.dead(|v, a| o.observe(v, a)))
        .build();
    let dropped = shared.status_dropped.clone();
    meter
        .u64_observable_counter("weir.job_status.dropped")
        .with_unit("{record}")
        .with_description("Job status records dropped because the queue to NATS was full (NATS slow or away); the jobs themselves were not affected")
        .with_callback(move |o: &dyn AsyncInstrument<u64>| o.observe(dropped.load(Relaxed), &[]))
        .build();
    type PartField = fn(&PartitionCells) -> &AtomicU64;
    // Per-partition instruments: (name, is a counter (else a gauge), unit, help, cell).
    let per_partition: [(&'static str, bool, &'static str, &'static str, PartField); 6] = [
        (
            "weir.decisions.throttled",
            true,
            "{decision}",
            "Release decisions that had to wait for the key's limit",
            |p| &p.throttled,
        ),
        (
            "weir.jobs.duplicates",
            true,
            "{job}",
            "Releases JetStream dropped as duplicates: a job released again after a crash or hand-over, absorbed by WEIR_RELEASED's duplicate window",
            |p| &p.duplicates,
        ),
        (
            "weir.publish.refused",
            true,
            "{publish}",
            "Publishes JetStream refused (stream at its limits, no leader, ack timeout): the job was handed back unacked and retried after a backoff",
            |p| &p.refused,
        ),
        (
            "weir.backlog.held",
            false,
            "{job}",
            "Jobs held in memory, waiting for release",
            |p| &p.held,
        ),
        (
            "weir.backlog.parked",
            false,
            "{job}",
            "Jobs waiting in the durable park",
            |p| &p.parked,
        ),
        (
            "weir.consumer.lag",
            false,
            "{message}",
            "Messages pending on the partition consumer",
            |p| &p.lag,
        ),
    ];
    for (name, counter, unit, help, field) in per_partition {
        let s = shared.clone();
        let callback =
            move |o: &dyn AsyncInstrument<u64>| s.by_partition(field, |v, a| o.observe(v, a));
        if counter {
            meter
                .u64_observable_counter(name)
                .with_unit(unit)
                .with_description(help)
                .with_callback(callback)
                .build();
        } else {
            meter
                .u64_observable_gauge(name)
                .with_unit(unit)
                .with_description(help)
                .with_callback(callback)
                .build();
        }
    }
    let s = shared.clone();
    meter
        .u64_observable_gauge("weir.key.backlog")
        .with_unit("{job}")
        .with_description("Backlog of the keys with the largest backlog (opt-in)")
        .with_callback(move |o: &dyn AsyncInstrument<u64>| s.top_keys(|v, a| o.observe(v, a)))
        .build();
}
