//! The per-partition recorder and the atomics it shares with the observable instruments.
//!
//! Counts live in [`DestCells`], one per (partition, destination), written only by that
//! partition's recorder; the observable instruments' callbacks sum them across partitions at
//! collection time. Locks are taken only the first time a recorder meets a destination and when
//! the metrics are collected.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use hashbrown::HashMap;
use opentelemetry::metrics::{AsyncInstrument, BoundHistogram, Histogram, Meter};
use opentelemetry::KeyValue;

use super::{lock, MAX_DESTINATIONS, OTHER_DESTINATION, UNKNOWN_DESTINATION};

fn system() -> KeyValue {
    KeyValue::new("messaging.system", "nats")
}
/// A recorder forgets the names it has cached beyond this many (the counts stay in the cells).
const LOCAL_CACHE: usize = 4 * MAX_DESTINATIONS;

/// Destination names to global indexes, and each index's attributes. Index 0 is `_other`.
struct DestTable {
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
    fn resolve(&mut self, name: &str) -> (u32, Arc<[KeyValue]>) {
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
    received: AtomicU64,
    released: AtomicU64,
    parked: AtomicU64,
}

struct DeadCell {
    dest: u32,
    reason: &'static str,
    count: AtomicU64,
}

#[repr(align(64))]
struct PartitionCells {
    /// `None` for the unpartitioned recorder, which has no partition gauges.
    id: Option<u16>,
    attrs: [KeyValue; 2],
    held: AtomicU64,
    parked: AtomicU64,
    lag: AtomicU64,
    throttled: AtomicU64,
    /// Indexed by global destination index.
    dests: Mutex<Vec<Option<Arc<DestCells>>>>,
    dead: Mutex<Vec<Arc<DeadCell>>>,
}

/// `(key, backlog)` pairs.
type KeyList = Vec<(String, u64)>;

/// What recorders and observable callbacks share.
#[derive(Default)]
pub(super) struct Shared {
    dests: Mutex<DestTable>,
    partitions: Mutex<Vec<Arc<PartitionCells>>>,
    pub(super) top_n: AtomicUsize,
    /// Top-key lists: the process-wide one under `None`, each partition's under its id.
    top_keys: Mutex<HashMap<Option<u16>, KeyList>>,
}

impl Shared {
    fn partition(&self, id: Option<u16>) -> Arc<PartitionCells> {
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
    let s = shared.clone();
    meter
        .u64_observable_counter("weir.decisions.throttled")
        .with_unit("{decision}")
        .with_description("Release decisions that had to wait for the key's limit")
        .with_callback(move |o: &dyn AsyncInstrument<u64>| {
            s.by_partition(|p| &p.throttled, |v, a| o.observe(v, a))
        })
        .build();
    type PartField = fn(&PartitionCells) -> &AtomicU64;
    let gauges: [(&'static str, &'static str, &'static str, PartField); 3] = [
        (
            "weir.backlog.held",
            "{job}",
            "Jobs held in memory, waiting for release",
            |p| &p.held,
        ),
        (
            "weir.backlog.parked",
            "{job}",
            "Jobs waiting in the durable park",
            |p| &p.parked,
        ),
        (
            "weir.consumer.lag",
            "{message}",
            "Messages pending on the partition consumer",
            |p| &p.lag,
        ),
    ];
    for (name, unit, help, field) in gauges {
        let s = shared.clone();
        meter
            .u64_observable_gauge(name)
            .with_unit(unit)
            .with_description(help)
            .with_callback(move |o: &dyn AsyncInstrument<u64>| {
                s.by_partition(field, |v, a| o.observe(v, a))
            })
            .build();
    }
    let s = shared.clone();
    meter
        .u64_observable_gauge("weir.key.backlog")
        .with_unit("{job}")
        .with_description("Backlog of the keys with the largest backlog (opt-in)")
        .with_callback(move |o: &dyn AsyncInstrument<u64>| s.top_keys(|v, a| o.observe(v, a)))
        .build();
}

/// A destination as a recorder caches it: its cells and its histogram stream, bound to the
/// destination's attributes (recording then skips the SDK's lookup by attributes, which hashes
/// them: about 50 ns a record instead of about 250 on the bench machine).
struct Slot {
    name: Box<str>,
    dest: u32,
    cells: Arc<DestCells>,
    attrs: Arc<[KeyValue]>,
    /// Bound at the first release, so a destination that never releases has no histogram.
    delay: Option<BoundHistogram<u64>>,
}

/// One partition's recorder, owned by its task: every method is cheap enough for the per-job
/// path (after the first call for a destination: no lock, no allocation).
pub struct PartitionMetrics {
    shared: Arc<Shared>,
    cells: Arc<PartitionCells>,
    delay: Histogram<u64>,
    slots: Vec<Slot>,
    by_name: HashMap<Box<str>, usize>,
    /// The slot of the previous call: consecutive jobs mostly share a destination.
    last: usize,
    dead: HashMap<(u32, &'static str), Arc<DeadCell>>,
}

impl PartitionMetrics {
    pub(super) fn new(shared: Arc<Shared>, id: Option<u16>, delay: Histogram<u64>) -> Self {
        PartitionMetrics {
            cells: shared.partition(id),
            shared,
            delay,
            slots: Vec::new(),
            by_name: HashMap::new(),
            last: 0,
            dead: HashMap::new(),
        }
    }

    /// The partition this recorder belongs to (`None`: the unpartitioned recorder).
    pub fn partition_id(&self) -> Option<u16> {
        self.cells.id
    }

    #[inline]
    fn slot(&mut self, dest: &str) -> usize {
        if let Some(s) = self.slots.get(self.last) {
            if &*s.name == dest {
                return self.last;
            }
        }
        let i = match self.by_name.get(dest) {
            Some(&i) => i,
            None => self.new_slot(dest),
        };
        self.last = i;
        i
    }

    #[cold]
    fn new_slot(&mut self, dest: &str) -> usize {
        if self.slots.len() >= LOCAL_CACHE {
            self.slots.clear();
            self.by_name.clear();
        }
        let (i, attrs) = lock(&self.shared.dests).resolve(dest);
        let cells = {
            let mut v = lock(&self.cells.dests);
            if v.len() <= i as usize {
                v.resize(i as usize + 1, None);
            }
            v[i as usize].get_or_insert_with(Default::default).clone()
        };
        self.slots.push(Slot {
            name: dest.into(),
            dest: i,
            cells,
            attrs,
            delay: None,
        });
        self.by_name.insert(dest.into(), self.slots.len() - 1);
        self.slots.len() - 1
    }

    /// A job came in from the partition's consumer.
    #[inline]
    pub fn received(&mut self, dest: &str) {
        let i = self.slot(dest);
        self.slots[i].cells.received.fetch_add(1, Relaxed);
    }

    /// A job was released; `delay_ms` is from its enqueue to now.
    #[inline]
    pub fn released(&mut self, dest: &str, delay_ms: u64) {
        let i = self.slot(dest);
        let histogram = &self.delay;
        let s = &mut self.slots[i];
        s.cells.released.fetch_add(1, Relaxed);
        s.delay
            .get_or_insert_with(|| histogram.bind(&s.attrs))
            .record(delay_ms);
    }

    /// A job went to the durable park.
    #[inline]
    pub fn parked(&mut self, dest: &str) {
        let i = self.slot(dest);
        self.slots[i].cells.parked.fetch_add(1, Relaxed);
    }

    /// A job was dead-lettered. `dest` may be empty (recorded as `_unknown`); `reason` is a short
    /// fixed kind such as `bad_subject`, `bad_token` or `publish_refused`.
    pub fn dead(&mut self, dest: &str, reason: &'static str) {
        let i = self.slot(dest);
        let d = self.slots[i].dest;
        let cell = self.dead.entry((d, reason)).or_insert_with(|| {
            let mut list = lock(&self.cells.dead);
            match list.iter().find(|c| c.dest == d && c.reason == reason) {
                Some(c) => c.clone(),
                None => {
                    let c = Arc::new(DeadCell {
                        dest: d,
                        reason,
                        count: AtomicU64::new(0),
                    });
                    list.push(c.clone());
                    c
                }
            }
        });
        cell.count.fetch_add(1, Relaxed);
    }

    /// A release decision had to wait for the key's limit.
    #[inline]
    pub fn throttled(&mut self) {
        self.cells.throttled.fetch_add(1, Relaxed);
    }

    /// Jobs this partition holds in memory and has parked.
    #[inline]
    pub fn set_backlog(&self, held: u64, parked: u64) {
        self.cells.held.store(held, Relaxed);
        self.cells.parked.store(parked, Relaxed);
    }

    /// Messages pending on this partition's consumer (`num_pending` of its info).
    #[inline]
    pub fn set_consumer_lag(&self, pending: u64) {
        self.cells.lag.store(pending, Relaxed);
    }

    /// How many top keys to report (0: top keys are off; skip computing them).
    pub fn top_keys_wanted(&self) -> usize {
        self.shared.top_n.load(Relaxed)
    }

    /// Replaces this partition's top-key list (`(key, backlog)`); the largest N over all
    /// partitions are exported as `weir_key_backlog`.
    pub fn set_top_keys(&self, keys: Vec<(String, u64)>) {
        self.shared.set_top_keys(self.cells.id, keys);
    }
}
