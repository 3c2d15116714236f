//! Holding leases: renewing them, fencing a partition whose lease may lapse, handing one back,
//! and claiming free ones as the quotas say.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use bytes::Bytes;
use tokio::time::{timeout, Instant};

use super::{assign, Group, Held};

impl Group {
    /// Renews every lease held, concurrently; a lease someone else now holds is fenced at once.
    pub(super) async fn renew(&mut self) {
        let value = self.holder_value();
        let limit = self.lease / 6;
        let renewals = self.held.iter().map(|(&p, h)| {
            let (kv, value, rev) = (self.kv.clone(), value.clone(), h.revision);
            async move {
                let sent = Instant::now();
                let r = timeout(limit, kv.update(Self::lease_key(p), value, rev)).await;
                (p, sent, r)
            }
        });
        for (p, sent, r) in futures::future::join_all(renewals).await {
            match r {
                Ok(Ok(rev)) => {
                    if let Some(h) = self.held.get_mut(&p) {
                        h.revision = rev;
                        h.renewed = sent;
                    }
                }
                Ok(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    if let Some(rev) = self.still_mine(p).await {
                        // A renewal that timed out (NATS away) was stored after all, once the
                        // client had reconnected: the lease is ours at a newer revision. The
                        // fence clock keeps counting from the last renewal known to be stored in
                        // time; the next tick renews on this revision.
                        tracing::debug!(
                            partition = p,
                            revision = rev,
                            "a late renewal was stored; lease kept"
                        );
                        if let Some(h) = self.held.get_mut(&p) {
                            h.revision = rev;
                        }
                        continue;
                    }
                    tracing::warn!(
                        partition = p,
                        "lost the lease (it expired); stopping the partition"
                    );
                    self.fence(p);
                }
                Ok(Err(e)) => tracing::debug!(partition = p, error = %e, "lease renewal failed"),
                Err(_) => tracing::debug!(partition = p, "lease renewal timed out"),
            }
        }
    }

    /// When the earliest held lease must be fenced.
    pub(super) fn next_fence(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let oldest = self
            .held
            .values()
            .filter(|h| !h.stopping)
            .map(|h| h.renewed)
            .min();
        oldest.map_or(far, |r| r + self.lease * 2 / 3)
    }

    pub(super) fn fence_overdue(&mut self) {
        let overdue: Vec<u16> = self
            .held
            .iter()
            .filter(|(_, h)| !h.stopping && h.renewed.elapsed() >= self.lease * 2 / 3)
            .map(|(p, _)| *p)
            .collect();
        for p in overdue {
            tracing::warn!(partition = p, "lease not renewed in time; stopping the partition so no one else's release overlaps");
            self.fence(p);
        }
    }

    /// A lease we hold now names someone else (should not happen while we renew in time).
    pub(super) fn check_lost(&mut self, p: u16) {
        // An entry older than our own claim or renewal is the view catching up, not a loss.
        let Some(h) = self.held.get(&p).filter(|h| !h.stopping) else {
            return;
        };
        let theirs = self
            .view
            .leases
            .get(&p)
            .is_some_and(|l| l.holder != self.me && l.revision > h.revision);
        if theirs {
            tracing::warn!(
                partition = p,
                "another member holds this partition's lease; stopping it"
            );
            self.fence(p);
        }
    }

    /// Stops partition `p` now; its lease is deleted (if still ours) once it has stopped.
    pub(super) fn fence(&mut self, p: u16) {
        if let Some(h) = self.held.get_mut(&p) {
            if !h.stopping {
                h.stopping = true;
                self.stopping.push(self.shards.stop(p));
            }
        }
    }

    /// The revision of partition `p`'s lease if it still names this very process (member and
    /// incarnation), read now; `None` if it names another, is gone, or cannot be read.
    /// (Returns an owned future: `&self` held across an await would need `Group: Sync`.)
    fn still_mine(&self, p: u16) -> impl std::future::Future<Output = Option<u64>> + Send {
        let (kv, mine, limit) = (self.kv.clone(), self.holder_value(), self.lease / 6);
        async move {
            let entry = timeout(limit, kv.entry(Self::lease_key(p)))
                .await
                .ok()?
                .ok()??;
            (entry.operation == Operation::Put && entry.value == mine).then_some(entry.revision)
        }
    }

    /// The partition has stopped: delete its lease so a member with room claims it at once.
    pub(super) async fn give_back(&mut self, p: u16) {
        if let Some(h) = self.held.remove(&p) {
            // A renewal stored late (after a reconnect) moved the revision on: delete that one,
            // or the lease would block the partition until it ages out.
            let revision = match self.still_mine(p).await {
                Some(rev) => rev,
                None => h.revision,
            };
            let del = self
                .kv
                .delete_expect_revision(Self::lease_key(p), Some(revision));
            match timeout(self.lease / 6, del).await {
                Ok(Ok(())) => tracing::info!(partition = p, "handed the partition back"),
                _ => tracing::debug!(
                    partition = p,
                    "lease not deleted (expired or taken); it ages out"
                ),
            }
        }
    }

    /// Claims free partitions or hands back extra ones, as the quotas say.
    pub(super) async fn rebalance(&mut self) {
        let mut members: BTreeSet<String> = self.view.members.keys().cloned().collect();
        members.insert(self.me.member.clone());
        let mine: BTreeSet<u16> = self
            .held
            .iter()
            .filter(|(_, h)| !h.stopping)
            .map(|(p, _)| *p)
            .collect();
        let mut free = self.view.free(self.partitions);
        free.retain(|p| !self.held.contains_key(p));
        let plan = assign::plan(self.partitions, &members, &self.me.member, &mine, &free);
        for p in plan.give_back {
            tracing::info!(
                partition = p,
                members = members.len(),
                "handing a partition to a newer member"
            );
            self.fence(p);
        }
        for p in plan.claim {
            let value = self.holder_value();
            if let Some((revision, sent, reset)) =
                Self::claim(&self.kv, p, value, self.lease / 6).await
            {
                self.held.insert(
                    p,
                    Held {
                        revision,
                        renewed: sent,
                        stopping: false,
                    },
                );
                self.shards.start(p, reset);
            }
        }
    }

    /// Claims partition `p` if its lease is free: `(revision, when the write was sent, reset)`.
    /// The claim is a compare-and-set on the entry read just before, so the claimer knows how
    /// the last lease ended, whatever its (possibly lagging) view says: deleted by its holder
    /// (a clean hand-over: no consumer reset, see `recover::redeliver_now`), aged out (the
    /// holder died: reset), or gone entirely (long ago, or never held: reset, harmless).
    async fn claim(
        kv: &kv::Store,
        p: u16,
        value: Bytes,
        limit: Duration,
    ) -> Option<(u64, Instant, bool)> {
        let key = Self::lease_key(p);
        let current = match timeout(limit, kv.entry(&key)).await {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                tracing::debug!(partition = p, error = %e, "reading a lease failed");
                return None;
            }
            Err(_) => return None,
        };
        let sent = Instant::now();
        let (written, reset) = match current {
            // Held: the view had not caught up yet.
            Some(e) if e.operation == Operation::Put => return None,
            Some(e) => {
                let update = kv.update(&key, value, e.revision);
                let r = timeout(limit, update)
                    .await
                    .map(|r| r.map_err(|e| e.to_string()));
                (r, e.operation == Operation::Purge)
            }
            None => {
                let create = kv.create(&key, value);
                let r = timeout(limit, create)
                    .await
                    .map(|r| r.map_err(|e| e.to_string()));
                (r, true)
            }
        };
        match written {
            Ok(Ok(revision)) => Some((revision, sent, reset)),
            // Someone else claimed it first, or NATS failed: the next plan looks again.
            Ok(Err(e)) => {
                tracing::debug!(partition = p, error = %e, "claiming failed");
                None
            }
            Err(_) => None,
        }
    }
}
