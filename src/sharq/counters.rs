//! SHARQ's metrics: enqueues and dequeues per minute over the last 10 minutes, globally and per
//! queue, and the queue types and ids seen.
//!
//! The counts are this process's (SHARQ kept them in Redis, shared by every server): with
//! several Weir processes behind one address, each answers for the requests it served. The
//! queue types and ids are those this process has enqueued to or dequeued from since it
//! started (SHARQ listed only queues holding jobs at that moment).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use serde_json::{Map, Value};

const MINUTE_MS: u64 = 60_000;
const MINUTES: usize = 10;

/// Ten one-minute slots, reused as the clock moves.
#[derive(Default, Clone, Copy)]
struct Window {
    /// (minute start in Unix ms, enqueues, dequeues)
    slots: [(u64, u64, u64); MINUTES],
}

impl Window {
    fn slot(&mut self, now_ms: u64) -> &mut (u64, u64, u64) {
        let minute = now_ms / MINUTE_MS * MINUTE_MS;
        let s = &mut self.slots[(minute / MINUTE_MS) as usize % MINUTES];
        if s.0 != minute {
            *s = (minute, 0, 0);
        }
        s
    }

    /// SHARQ's shape: `{"<minute ms>": count}` for the current minute and the nine before it.
    fn counts(&self, now_ms: u64) -> (Value, Value) {
        let mut enq = Map::new();
        let mut deq = Map::new();
        let mut minute = now_ms / MINUTE_MS * MINUTE_MS;
        for _ in 0..MINUTES {
            let s = self.slots[(minute / MINUTE_MS) as usize % MINUTES];
            let (e, d) = if s.0 == minute { (s.1, s.2) } else { (0, 0) };
            enq.insert(minute.to_string(), e.into());
            deq.insert(minute.to_string(), d.into());
            minute = minute.saturating_sub(MINUTE_MS);
        }
        (Value::Object(enq), Value::Object(deq))
    }
}

#[derive(Default)]
struct Inner {
    global: Window,
    queues: HashMap<String, BTreeMap<String, Window>>,
}

/// The counters, behind one short lock per request.
#[derive(Default)]
pub struct Counters {
    inner: Mutex<Inner>,
}

impl Counters {
    fn bump(&self, queue_type: &str, queue_id: &str, enq: u64, deq: u64, now_ms: u64) {
        let mut i = self.inner.lock().expect("counters lock");
        let g = i.global.slot(now_ms);
        g.1 += enq;
        g.2 += deq;
        let ids = match i.queues.get_mut(queue_type) {
            Some(ids) => ids,
            None => i.queues.entry(queue_type.to_string()).or_default(),
        };
        let w = match ids.get_mut(queue_id) {
            Some(w) => w,
            None => ids.entry(queue_id.to_string()).or_default(),
        };
        let s = w.slot(now_ms);
        s.1 += enq;
        s.2 += deq;
    }

    pub fn enqueued(&self, queue_type: &str, queue_id: &str, n: u64) {
        self.bump(queue_type, queue_id, n, 0, super::now_ms());
    }

    pub fn dequeued(&self, queue_type: &str, queue_id: &str) {
        self.bump(queue_type, queue_id, 0, 1, super::now_ms());
    }

    /// The global counts.
    pub fn global(&self, now_ms: u64) -> (Value, Value) {
        self.inner
            .lock()
            .expect("counters lock")
            .global
            .counts(now_ms)
    }

    /// One queue's counts (zeros for a queue never seen).
    pub fn queue(&self, queue_type: &str, queue_id: &str, now_ms: u64) -> (Value, Value) {
        let i = self.inner.lock().expect("counters lock");
        i.queues
            .get(queue_type)
            .and_then(|ids| ids.get(queue_id))
            .copied()
            .unwrap_or_default()
            .counts(now_ms)
    }

    pub fn queue_types(&self) -> Vec<String> {
        let i = self.inner.lock().expect("counters lock");
        i.queues
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    pub fn queue_ids(&self, queue_type: &str) -> Vec<String> {
        let i = self.inner.lock().expect("counters lock");
        i.queues
            .get(queue_type)
            .map(|ids| ids.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets a queue (`DELETE /deletequeue/` with `purge_all`).
    pub fn forget(&self, queue_type: &str, queue_id: &str) {
        let mut i = self.inner.lock().expect("counters lock");
        if let Some(ids) = i.queues.get_mut(queue_type) {
            ids.remove(queue_id);
            if ids.is_empty() {
                i.queues.remove(queue_type);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_minutes_keyed_by_minute_and_old_slots_reused() {
        let c = Counters::default();
        let t0 = 1_700_000_040_000; // 40 s into a minute
        c.bump("sms", "a", 2, 1, t0);
        c.bump("sms", "a", 1, 0, t0 + MINUTE_MS);
        let (e, d) = c.global(t0 + MINUTE_MS);
        let m0 = (t0 / MINUTE_MS * MINUTE_MS).to_string();
        let m1 = ((t0 / MINUTE_MS + 1) * MINUTE_MS).to_string();
        assert_eq!(e.as_object().unwrap().len(), 10);
        assert_eq!((e[&m0].as_u64(), e[&m1].as_u64()), (Some(2), Some(1)));
        assert_eq!(d[&m0].as_u64(), Some(1));
        // Ten minutes later the first slot is reused, not added to.
        c.bump("sms", "a", 5, 0, t0 + 10 * MINUTE_MS);
        let (e, _) = c.queue("sms", "a", t0 + 10 * MINUTE_MS);
        let m10 = ((t0 / MINUTE_MS + 10) * MINUTE_MS).to_string();
        assert_eq!(e[&m10].as_u64(), Some(5));
        assert!(e.get(&m0).is_none());
        assert_eq!(c.queue_types(), vec!["sms".to_string()]);
        assert_eq!(c.queue_ids("sms"), vec!["a".to_string()]);
    }
}
