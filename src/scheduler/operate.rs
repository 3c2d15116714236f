//! What operators and limit changes do to a scheduler: look at a key, list the busiest, purge a
//! key's backlog, swap in a new limits table.

use std::sync::Arc;

use governor::nanos::Nanos;

use super::{Busy, Held, Key, Routed, Scheduler};
use crate::config::Limit;
use crate::inspect::KeyView;
use crate::limiter::Bucket;
use crate::limits::Limits;

impl<J: Routed> Scheduler<J> {
    /// What the partition knows of `key`, if it tracks it.
    pub fn view(&self, key: &str, now: Nanos) -> Option<KeyView> {
        let st = self.keys.get(key)?;
        Some(view(key, st.busy.as_deref(), now))
    }

    /// The `n` keys with the largest backlog.
    pub fn top(&self, n: usize, now: Nanos) -> Vec<KeyView> {
        let mut busy: Vec<(u64, &Key, &Busy<J>)> = self
            .keys
            .iter()
            .filter_map(|(k, st)| {
                st.busy
                    .as_deref()
                    .map(|b| (b.queue.len() as u64 + b.unread, k, b))
            })
            .collect();
        let n = n.min(busy.len());
        if n == 0 {
            return Vec::new();
        }
        busy.select_nth_unstable_by(n - 1, |a, b| b.0.cmp(&a.0));
        busy.truncate(n);
        busy.into_iter()
            .map(|(_, k, b)| view(k, Some(b), now))
            .collect()
    }

    /// Drops a key's backlog: returns the jobs held in memory (the caller acks fresh ones, so
    /// they are gone) and forgets its parked ones (the caller purges them from the park).
    /// A read from the park in flight is marked stale: the job it brings back is dropped.
    pub fn purge_key(&mut self, key: &str) -> Vec<Held<J>> {
        let Some(b) = self.keys.get_mut(key).and_then(|st| st.busy.as_deref_mut()) else {
            return Vec::new();
        };
        let jobs: Vec<Held<J>> = b.queue.drain(..).collect();
        let loaded = jobs.iter().filter(|h| h.park_seq.is_some()).count();
        self.held -= jobs.len();
        self.loaded -= loaded;
        b.unread = 0;
        b.stale_load = b.loading;
        b.fence.clear();
        b.purge_below = 0;
        b.purged_below = 0;
        if b.is_idle() {
            self.keys.get_mut(key).expect("present").busy = None;
        }
        jobs
    }

    /// Swaps in a new limits table and re-limits the tracked keys it changes. A key whose
    /// limit changed gets a new bucket at once: full if the old one was (an idle key behaves as
    /// a new one), otherwise empty, so the new bound holds from this moment (no extra burst),
    /// and a key with a backlog is looked at again now, not when its old timer was due.
    ///
    /// A change of the default or a pattern resolves every tracked key again (one pass over the
    /// map); a change of one key's entry touches only that key.
    pub fn set_limits(&mut self, new: Arc<Limits>, now: Nanos) {
        let old = std::mem::replace(&mut self.limits, new);
        let new = self.limits.clone();
        let changed: Vec<Key> = if new.moves_unnamed_keys(&old) {
            self.keys
                .keys()
                .filter(|k| old.for_key(k) != new.for_key(k))
                .cloned()
                .collect()
        } else {
            new.changed_keys(&old)
                .filter_map(|k| self.keys.get_key_value(k).map(|(k, _)| k.clone()))
                .collect()
        };
        for k in changed {
            self.relimit(&k, &new.for_key(&k), now);
        }
    }

    fn relimit(&mut self, k: &Key, limit: &Limit, now: Nanos) {
        let Some(st) = self.keys.get_mut(k) else {
            return;
        };
        let full = st.bucket.is_full();
        st.bucket = Bucket::new(limit);
        if !full {
            st.bucket.drain();
        }
        if limit.rate.is_paused() && st.busy.is_none() {
            st.busy = Some(Box::default());
        }
        if let Some(b) = st.busy.as_deref_mut() {
            b.set_limit(limit, self.horizon);
            b.wake_at = 0; // the old timer, if any, is stale: pump sets a new one
        }
        self.pump(k, now);
    }
}

fn view<J>(key: &str, b: Option<&Busy<J>>, now: Nanos) -> KeyView {
    let Some(b) = b else {
        return KeyView {
            key: key.to_string(),
            ..KeyView::default()
        };
    };
    KeyView {
        key: key.to_string(),
        held: b.queue.len() as u64,
        parked: b.unread + u64::from(b.parking),
        next_release_in_ms: (b.wake_at != 0 && !b.paused)
            .then(|| b.wake_at.saturating_sub(now.as_u64()) / 1_000_000),
        paused: b.paused,
        offered: b.offered,
        released: b.released,
    }
}
