//! What comes back to a scheduler once the partition has acted: a park, a read from the park, a
//! release or a purge finished; and the fences that keep a key's order across a restart and a
//! refused publish.

use governor::nanos::Nanos;

use super::*;

impl<J: Routed> Scheduler<J> {
    /// A park publish finished; `ok == false` means it failed (the caller naks the job).
    ///
    /// A failed park may still have been stored: a publish whose ack timed out (NATS stalled,
    /// or the connection broke) often was. So it counts as unread either way; a read of the park
    /// tells (nothing there sets `unread` back to 0; a copy there is released, and WEIR_RELEASED's
    /// duplicate window drops it if the nak'ed job was released first). Counting only acked parks
    /// left such copies in `WEIR_PARK` for good once the key had nothing newer to park (163 of
    /// them in one run of tests/faults.rs' SIGSTOP test).
    pub fn parked(&mut self, key: &str, _ok: bool, now: Nanos) {
        let Some(b) = self.keys.get_mut(key).and_then(|s| s.busy.as_deref_mut()) else {
            return;
        };
        b.parking = b.parking.saturating_sub(1);
        b.unread += 1;
        let k = self.key_arc(key);
        self.pump(&k, now);
    }

    /// A read from the park finished: `Ok(Some((park_seq, src_seq, job)))`, `Ok(None)` when the
    /// park holds nothing more for the key, `Err(())` on a transient failure (retried shortly).
    pub fn loaded(&mut self, key: &str, result: Result<Option<(u64, u64, J)>, ()>, now: Nanos) {
        let Some(k) = self.key_arc_opt(key) else {
            return;
        };
        let st = self.keys.get_mut(key).expect("present");
        let Some(b) = st.busy.as_deref_mut() else {
            return;
        };
        b.loading = false;
        if std::mem::take(&mut b.stale_load) {
            // Begun before the key was purged: what it read went with the park.
            self.pump(&k, now);
            return;
        }
        match result {
            Ok(Some((park_seq, src_seq, job))) => {
                if let Ok(i) = b.fence.binary_search(&src_seq) {
                    b.fence.remove(i); // parked and then redelivered: this copy will do
                }
                b.cursor = park_seq + 1;
                b.unread = b.unread.saturating_sub(1);
                b.max_loaded_src = b.max_loaded_src.max(src_seq);
                b.park_floor = b.park_floor.max(src_seq);
                // Queued even when a fresh copy of the same job is held, and purged only once its
                // own release is acked: the fresh copy's source may already be acked (a second
                // delivery of the job, parked, acked it), so this parked copy can be the job's
                // only durable one. Purged on the strength of the fresh copy, the job was lost
                // when its process died before releasing it (`weir chaos` with a NATS restart,
                // three runs at once on two cores: 1 to 192 jobs in 11 of 165 runs).
                // WEIR_RELEASED's duplicate window drops the second release.
                insert_sorted(
                    &mut b.queue,
                    Held {
                        src_seq,
                        park_seq: Some(park_seq),
                        job,
                    },
                );
                self.held += 1;
                self.loaded += 1;
            }
            Ok(None) => {
                if b.parking == 0 {
                    b.unread = 0;
                }
            }
            Err(()) => {
                let at = now.as_u64() + 100_000_000;
                schedule(&mut self.timers, &mut b.wake_at, &k, at);
                return;
            }
        }
        self.pump(&k, now);
    }

    /// A release publish finished. On failure the caller naks a fresh job (it comes back as a
    /// redelivery); a job from the park is read again.
    pub fn release_done(&mut self, key: &str, park_seq: Option<u64>, ok: bool, now: Nanos) {
        self.in_flight.done(key);
        if park_seq.is_some() {
            self.loaded = self.loaded.saturating_sub(1);
            if let Some(s) = self.starved.pop_front() {
                self.pump(&s, now);
            }
        }
        // The pass-through case (a fresh job of a key with no backlog) needs nothing more: one
        // lookup per completion.
        let Some((k, st)) = self.keys.get_key_value_mut(key) else {
            return;
        };
        let Some(b) = st.busy.as_deref_mut() else {
            return;
        };
        if let Some(ps) = park_seq {
            if let Some(i) = b.inflight_parked.iter().position(|&p| p == ps) {
                b.inflight_parked.remove(i);
            }
            if ok {
                b.purge_below = b.purge_below.max(ps + 1);
            } else {
                b.cursor = b.cursor.min(ps);
                b.unread += 1;
            }
        }
        let k = k.clone();
        self.pump(&k, now);
    }

    /// A purge finished (or failed: it is retried on the next release).
    pub fn purged(&mut self, key: &str, below: u64, ok: bool, now: Nanos) {
        let Some(b) = self.keys.get_mut(key).and_then(|s| s.busy.as_deref_mut()) else {
            return;
        };
        b.purging = false;
        if ok {
            b.purged_below = b.purged_below.max(below);
        }
        let k = self.key_arc(key);
        self.pump(&k, now);
    }

    /// Jobs of `key` the previous run held unacked (their `WEIR_JOBS` sequences): newer jobs of
    /// the key wait until these are redelivered, or until `until`.
    pub fn fence(&mut self, key: &str, mut seqs: Vec<u64>, until: Nanos) {
        let (_, st) = entry(&mut self.keys, &self.limits, self.horizon, key);
        let b = st
            .busy
            .get_or_insert_with(|| new_busy(&self.limits.for_key(key), self.horizon));
        seqs.sort_unstable();
        b.fence = seqs;
        b.fence_until = until.as_u64();
    }

    /// One job of `key` went back to JetStream (its publish was refused): nothing newer of the
    /// key leaves before it is delivered again, or until `until`.
    pub fn fence_one(&mut self, key: &str, seq: u64, until: Nanos) {
        let (_, st) = entry(&mut self.keys, &self.limits, self.horizon, key);
        let b = st
            .busy
            .get_or_insert_with(|| new_busy(&self.limits.for_key(key), self.horizon));
        if let Err(i) = b.fence.binary_search(&seq) {
            b.fence.insert(i, seq);
        }
        b.fence_until = b.fence_until.max(until.as_u64());
    }

    /// Whether a job of `key` (fresh: `src_seq`; read back from the park: `park_seq`) was
    /// decided before an older job of the key was refused and handed back: it must not overtake
    /// that job, so the caller hands it back too.
    pub fn behind_refused(&self, key: &str, src_seq: u64, park_seq: Option<u64>) -> bool {
        let Some(b) = self.keys.get(key).and_then(|s| s.busy.as_deref()) else {
            return false;
        };
        match park_seq {
            None => b.fence.first().is_some_and(|&f| f < src_seq),
            // A refused read-back moves the cursor back to it.
            Some(ps) => b.cursor <= ps,
        }
    }

    /// Keys found in the park at start: their jobs are read back before newer ones leave.
    /// `delivered`: the consumer's delivered sequence at start, which bounds every source
    /// sequence an earlier run can have parked; no job up to it is parked again.
    pub fn restore_parked(&mut self, key: &str, count: u64, delivered: u64, now: Nanos) {
        let (k, st) = entry(&mut self.keys, &self.limits, self.horizon, key);
        let b = st
            .busy
            .get_or_insert_with(|| new_busy(&self.limits.for_key(key), self.horizon));
        b.unread += count;
        b.park_floor = b.park_floor.max(delivered);
        self.pump(&k, now);
    }
}
