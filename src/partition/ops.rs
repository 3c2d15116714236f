//! A partition's other work: the operator's commands (limits, caps, inspect, purge) and the
//! background operations it started (park reads and purges, the poison sweep, pull checks).

use super::*;

impl Partition {
    pub(super) async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Limits(table) => {
                let revision = table.revision;
                self.sched.set_limits(table, now());
                self.stats.limits_revision.store(revision, Relaxed);
            }
            Command::Caps(caps) => self.sched.set_caps(&caps, now()),
            Command::Key { key, reply } => {
                let _ = reply.send(self.sched.view(&key, now()));
            }
            Command::Top { limit, reply } => {
                let _ = reply.send(self.sched.top(limit, now()));
            }
            Command::Purge { key, below, reply } => {
                // Jobs on their way to the park land there before the park is purged, and
                // jobs still on their way in are dropped when they come.
                while let Some((res, tag)) = self.pubs.next_ack().await {
                    self.on_published(res, tag).await;
                }
                let until = tokio::time::Instant::now() + self.fence_for;
                self.purges.set(&key, below, until);
                let mut purged = Purged::default();
                // Jobs read back from the park are counted with the park's purge below.
                let mut last = None;
                let at = crate::release::unix_ms();
                for h in self.sched.purge_key(&key) {
                    self.record_purged(&h.job, &key, at);
                    if let Some(a) = h.job.acker {
                        if let Some(before) = last.replace(a) {
                            ack(before).await;
                        }
                        purged.held += 1;
                    }
                }
                // The last ack confirmed: a consumer takes acks in order, so the caller's purge
                // of WEIR_JOBS, next, no longer finds the held jobs and counts them again.
                if let Some(a) = last {
                    if let Err(e) = a.double_ack().await {
                        tracing::debug!(error = %e, "ack of a purged job failed; the purge of WEIR_JOBS deletes it");
                    }
                }
                purged.parked = park::purge_all(&self.park, self.id, &key).await;
                tracing::info!(
                    partition = self.id,
                    key,
                    ?purged,
                    "purged a key's pending jobs"
                );
                let _ = reply.send(purged);
            }
        }
    }

    /// Records a held job the purge took as `dead`, reason `purged`: its record may say
    /// `queued` or `parked` at a sequence the purge's mark does not cover (stored while the
    /// purge was on its way).
    fn record_purged(&self, job: &Job, key: &str, at: u64) {
        let h = job.headers.as_ref();
        let get = |name| h.and_then(|h| h.get(name)).map(|v| v.as_str());
        let time = |name| get(name).and_then(|v| v.parse().ok());
        // A fresh job's route is its subject; one read back from the park carries it in headers.
        let (dest, queued_at) = match job::parse_stored(&job.subject) {
            Ok(route) => (route.dest, Some(job.enqueued_ms)),
            Err(_) => (
                get(header::DESTINATION).unwrap_or_default(),
                time(header::ENQUEUED_AT),
            ),
        };
        if let Some(mut rec) = self.status_of(h, JobState::Dead, dest, key) {
            rec.reason = Some(status::PURGED.into());
            rec.queued_at = queued_at;
            rec.parked_at = time(header::PARKED_AT);
            rec.dead_at = Some(at);
            self.status.record(&rec);
        }
    }

    pub(super) fn on_op(&mut self, done: OpDone) {
        match done {
            OpDone::Loaded { key, res } => {
                self.sched.loaded(&key, res.map(|o| o.map(|b| *b)), now())
            }
            OpDone::Purged { key, below, ok } => self.sched.purged(&key, below, ok, now()),
            OpDone::SweepRange(Ok(range)) => {
                // Taken now, after the server answered (see `Unacked::unknown`).
                let known = self.unacked_seqs();
                let (js, id) = (self.js.clone(), self.id);
                self.ops.push(Box::pin(async move {
                    let res = crate::poison::sweep(&js, id, range, &known)
                        .await
                        .map_err(|e| e.to_string());
                    OpDone::Swept(res)
                }));
            }
            OpDone::SweepRange(Err(e)) => self.swept(Err(e)),
            OpDone::Swept(res) => self.swept(res),
            OpDone::PullChecked(Ok((waiting, pending))) => {
                if self.stall.answered(waiting, pending) {
                    tracing::info!(
                        partition = self.id,
                        pending,
                        "no pull request waiting a second after a reconnect; rebinding the consumer"
                    );
                    self.rebind = true;
                }
            }
            OpDone::PullChecked(Err(e)) => {
                self.stall.failed();
                tracing::debug!(partition = self.id, error = %e, "asking for the consumer's info failed");
            }
        }
    }

    /// A sweep for unreadable jobs ended; another starts if a reconnect came meanwhile.
    pub(super) fn swept(&mut self, res: Result<crate::poison::Swept, String>) {
        match res {
            Ok(swept) => {
                for dest in &swept.dests {
                    self.metrics.dead(dest, crate::poison::UNREADABLE);
                }
                tracing::debug!(
                    partition = self.id,
                    checked = swept.checked,
                    gets = swept.gets,
                    dead = swept.dests.len(),
                    "swept for unreadable jobs"
                );
            }
            Err(e) => {
                tracing::warn!(partition = self.id, error = %e, "sweeping for unreadable jobs failed; sweeping again after the next reconnect")
            }
        }
        if self.sweeping.take() == Some(true) {
            self.sweep_unreadable();
        }
    }

    /// The source sequences of every job this partition holds unacked (in memory, handed back
    /// and expected again, or in a publish in flight), sorted: jobs it read, so readable.
    pub(super) fn unacked_seqs(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.sched.stats().held + self.pubs.len());
        self.sched.unacked_seqs(&mut out);
        out.extend(self.pubs.tags().filter_map(Tag::unacked_seq));
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether the partition reads its consumer stream now: not while its publish window is
    /// full, a refusal's backoff holds it, or publishes are in doubt after a broken connection.
    pub(super) fn reading(&self) -> bool {
        !self.pubs.is_full() && self.backoff.until().is_none() && !self.in_doubt
    }

    /// Asks the server whether the consumer stream still has a pull request waiting
    /// ([`stall`]).
    pub(super) fn check_pull(&mut self) {
        let Some(consumer) = self.sweeper.clone() else {
            self.stall.failed();
            return;
        };
        self.ops.push(Box::pin(async move {
            let res = consumer
                .get_info()
                .await
                .map(|i| (i.num_waiting, i.num_pending))
                .map_err(|e| e.to_string());
            OpDone::PullChecked(res)
        }));
    }

    /// Starts a sweep for jobs the client cannot read ([`crate::poison`]), one at a time.
    pub(super) fn sweep_unreadable(&mut self) {
        if let Some(again) = self.sweeping.as_mut() {
            *again = true;
            return;
        }
        let Some(mut consumer) = self.sweeper.clone() else {
            return;
        };
        self.sweeping = Some(false);
        self.ops.push(Box::pin(async move {
            let res = crate::poison::Unacked::of(&mut consumer)
                .await
                .map_err(|e| e.to_string());
            OpDone::SweepRange(res)
        }));
    }

    /// [`crate::recover::unacked`]; when it failed because the connection broke (a job the
    /// client cannot read, see [`crate::poison`]), sweeps and tries again, twice at most.
    pub(super) async fn unacked(
        &mut self,
        consumer: &mut PullConsumer,
    ) -> Result<std::collections::HashMap<String, Vec<u64>>, crate::recover::RecoverError> {
        let mut tries = 0;
        loop {
            let before = self.nats.connects.load(Relaxed);
            let res = crate::recover::unacked(&self.client, consumer, self.id).await;
            let after = self.nats.connects.load(Relaxed);
            if res.is_ok() || before == after || tries == 2 {
                return res;
            }
            tries += 1;
            self.connects = after;
            match crate::poison::sweep_all(&self.js, consumer.clone(), self.id).await {
                Ok(swept) => {
                    for dest in &swept.dests {
                        self.metrics.dead(dest, crate::poison::UNREADABLE);
                    }
                }
                Err(e) => {
                    tracing::warn!(partition = self.id, error = %e, "sweeping for unreadable jobs failed")
                }
            }
        }
    }
}
