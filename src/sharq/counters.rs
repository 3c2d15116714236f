//! SHARQ's metrics: enqueues and dequeues per minute over the last 10 minutes, globally and per
//! queue, and the queue types and ids seen.
//!
//! Each process counts the requests it serves (SHARQ kept its counts in Redis, shared by every
//! server); a `GET /metrics/...` adds up every process's [`Part`] ([`gather`](super::gather)).
//! The queue types and ids are those enqueued to or dequeued from since the processes started
//! (SHARQ listed only queues holding jobs at that moment).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

const MINUTE_MS: u64 = 60_000;
const MINUTES: usize = 10;

/// Ten one-minute slots, reused as the clock moves.
#[derive(Default, Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Window {
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

    /// Adds another process's counts: slots of the same minute add up, a newer minute wins.
    fn add(&mut self, other: &Window) {
        for (s, o) in self.slots.iter_mut().zip(other.slots.iter()) {
            if o.0 == s.0 {
                s.1 += o.1;
                s.2 += o.2;
            } else if o.0 > s.0 {
                *s = *o;
            }
        }
    }
}

/// What one `GET /metrics/...` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `/metrics/`: the global counts and the queue types.
    All,
    /// `/metrics/<queue_type>/`: the type's queue ids.
    Type(String),
    /// `/metrics/<queue_type>/<queue_id>/`: the queue's counts.
    Queue(String, String),
}

impl Scope {
    /// As sent to the other processes: `all`, `type\n<t>`, `queue\n<t>\n<q>` ('\n' is in no
    /// token).
    pub fn encode(&self) -> String {
        match self {
            Scope::All => "all".into(),
            Scope::Type(t) => format!("type\n{t}"),
            Scope::Queue(t, q) => format!("queue\n{t}\n{q}"),
        }
    }

    pub fn decode(s: &str) -> Option<Scope> {
        let mut it = s.split('\n');
        let scope = match (it.next()?, it.next(), it.next()) {
            ("all", None, None) => Scope::All,
            ("type", Some(t), None) => Scope::Type(t.into()),
            ("queue", Some(t), Some(q)) => Scope::Queue(t.into(), q.into()),
            _ => return None,
        };
        it.next().is_none().then_some(scope)
    }
}

/// One process's answer for a [`Scope`]: counts, names, or both; parts add up.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Part {
    #[serde(default)]
    pub window: Window,
    #[serde(default)]
    pub names: BTreeSet<String>,
    /// For a queue: the `WEIR_RELEASED` sequences of its jobs the answering process holds
    /// prefetched, which the asking process's length cannot see. (A process that does not send
    /// it adds none.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefetched: Vec<u64>,
}

impl Part {
    pub fn add(&mut self, other: Part) {
        self.window.add(&other.window);
        self.names.extend(other.names);
        self.prefetched.extend(other.prefetched);
    }

    /// SHARQ's shape: `{"<minute ms>": count}` for the current minute and the nine before it,
    /// enqueues then dequeues.
    pub fn counts(&self, now_ms: u64) -> (Value, Value) {
        self.window.counts(now_ms)
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

    /// This process's part of `scope`.
    pub fn part(&self, scope: &Scope) -> Part {
        match scope {
            Scope::All => {
                let i = self.inner.lock().expect("counters lock");
                Part {
                    window: i.global,
                    names: i.queues.keys().cloned().collect(),
                    ..Part::default()
                }
            }
            Scope::Type(t) => Part {
                names: self.queue_ids(t).into_iter().collect(),
                ..Part::default()
            },
            Scope::Queue(t, q) => Part {
                window: self
                    .inner
                    .lock()
                    .expect("counters lock")
                    .queues
                    .get(t)
                    .and_then(|ids| ids.get(q))
                    .copied()
                    .unwrap_or_default(),
                ..Part::default()
            },
        }
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
        let (e, d) = c.part(&Scope::All).counts(t0 + MINUTE_MS);
        let m0 = (t0 / MINUTE_MS * MINUTE_MS).to_string();
        let m1 = ((t0 / MINUTE_MS + 1) * MINUTE_MS).to_string();
        assert_eq!(e.as_object().unwrap().len(), 10);
        assert_eq!((e[&m0].as_u64(), e[&m1].as_u64()), (Some(2), Some(1)));
        assert_eq!(d[&m0].as_u64(), Some(1));
        // Ten minutes later the first slot is reused, not added to.
        c.bump("sms", "a", 5, 0, t0 + 10 * MINUTE_MS);
        let q = Scope::Queue("sms".into(), "a".into());
        let (e, _) = c.part(&q).counts(t0 + 10 * MINUTE_MS);
        let m10 = ((t0 / MINUTE_MS + 10) * MINUTE_MS).to_string();
        assert_eq!(e[&m10].as_u64(), Some(5));
        assert!(e.get(&m0).is_none());
        assert_eq!(
            c.part(&Scope::All).names,
            BTreeSet::from(["sms".to_string()])
        );
        assert_eq!(c.queue_ids("sms"), vec!["a".to_string()]);
    }

    #[test]
    fn parts_of_several_processes_add_up() {
        let t0 = 1_700_000_040_000;
        let (a, b) = (Counters::default(), Counters::default());
        let c = Counters::default();
        a.bump("sms", "x", 2, 1, t0);
        b.bump("sms", "y", 3, 0, t0);
        // Ten minutes back: the same slot, an older minute; left out, never added.
        c.bump("mail", "z", 1, 0, t0 - 10 * MINUTE_MS);
        let mut all = a.part(&Scope::All);
        all.add(c.part(&Scope::All));
        all.add(b.part(&Scope::All));
        let (e, d) = all.counts(t0);
        let m0 = (t0 / MINUTE_MS * MINUTE_MS).to_string();
        assert_eq!((e[&m0].as_u64(), d[&m0].as_u64()), (Some(5), Some(1)));
        assert_eq!(all.names.into_iter().collect::<Vec<_>>(), ["mail", "sms"]);
        let mut ids = a.part(&Scope::Type("sms".into()));
        ids.add(b.part(&Scope::Type("sms".into())));
        assert_eq!(ids.names.into_iter().collect::<Vec<_>>(), ["x", "y"]);
        for scope in [
            Scope::All,
            Scope::Type("sms".into()),
            Scope::Queue("sms".into(), "x".into()),
        ] {
            assert_eq!(Scope::decode(&scope.encode()), Some(scope));
        }
        assert_eq!(Scope::decode("queue\nsms"), None);
        assert_eq!(Scope::decode("type\na\nb"), None);
    }
}
