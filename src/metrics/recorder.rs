//! The per-partition recorder: a cache from destination names to the cells in
//! [`super::shared`] it counts into.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use hashbrown::HashMap;
use opentelemetry::metrics::{BoundHistogram, Histogram};
use opentelemetry::KeyValue;

use super::shared::{DeadCell, DestCells, PartitionCells, Shared};
use super::{lock, MAX_DESTINATIONS};

/// A recorder forgets the names it has cached beyond this many (the counts stay in the cells).
const LOCAL_CACHE: usize = 4 * MAX_DESTINATIONS;

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

    /// A release JetStream acked as a duplicate (already stored: released before).
    #[inline]
    pub fn duplicate(&self) {
        self.cells.duplicates.fetch_add(1, Relaxed);
    }

    /// JetStream refused a publish; the job was handed back unacked.
    #[inline]
    pub fn refused(&self) {
        self.cells.refused.fetch_add(1, Relaxed);
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
