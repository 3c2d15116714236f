//! Holding leases: renewing them, fencing a partition whose lease may lapse, handing one back,
//! and claiming free ones as the quotas say.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::kv::{CreateErrorKind, UpdateErrorKind};
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
        let theirs = self
            .view
            .leases
            .get(&p)
            .is_some_and(|l| l.holder != self.me);
        if theirs && self.held.get(&p).is_some_and(|h| !h.stopping) {
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

    /// The partition has stopped: delete its lease so a member with room claims it at once.
    pub(super) async fn give_back(&mut self, p: u16) {
        if let Some(h) = self.held.remove(&p) {
            let del = self
                .kv
                .delete_expect_revision(Self::lease_key(p), Some(h.revision));
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
            let sent = Instant::now();
            let create = self.kv.create(Self::lease_key(p), self.holder_value());
            match timeout(self.lease / 6, create).await {
                Ok(Ok(revision)) => {
                    // Not after a clean hand-over (see `recover::redeliver_now`).
                    let reset = !self.view.ended_cleanly.get(&p).copied().unwrap_or(false);
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
                Ok(Err(e)) if e.kind() == CreateErrorKind::AlreadyExists => {}
                Ok(Err(e)) => tracing::debug!(partition = p, error = %e, "claiming failed"),
                Err(_) => tracing::debug!(partition = p, "claiming timed out"),
            }
        }
    }
}
