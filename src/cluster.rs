//! The group: which process runs which partition, with leases in a JetStream KV bucket.
//!
//! Every partition is run by exactly one process at a time; processes join and leave freely.
//! The state lives in the `WEIR_CLUSTER` bucket, whose `max_age` is the lease time (`lease_ms`,
//! 6 s by default) and which leaves a marker when an entry ages out (nats-server 2.11+):
//!
//! - `members.<name>`: each process's heartbeat (its name, incarnation, admin address and
//!   backlog), written every `lease / 6`. A process whose entry is gone is not a member.
//! - `partitions.<p>`: the lease of partition `p`, naming its holder. Claimed with
//!   create-if-absent, renewed every `lease / 6` with compare-and-set on its revision, handed
//!   back by deleting it (again compare-and-set). Unrenewed, it ages out after `lease`.
//!
//! Each member computes the same balanced quotas from the member list ([`assign`]) and claims
//! free partitions or hands back extra ones; the compare-and-set makes every claim exclusive.
//!
//! # Never two owners
//! A holder stops releasing a partition (fences itself) when its last successful renewal was
//! *sent* more than `2/3 lease` ago. The server expires the lease no earlier than `lease` after
//! it *stored* that renewal, which is later than the send. So a holder that cannot renew (a
//! stall, a network split, NATS away) has stopped at least `lease / 3` (2 s) before anyone
//! else can claim the partition. Only monotonic durations are compared, never two clocks.
//!
//! # Hand-over
//! - **Leaving (SIGTERM):** the member deletes its heartbeat first (the others' quotas grow
//!   at once), then stops each partition (no new release; publishes in flight are settled;
//!   held jobs are NAKed) and deletes its lease; a member with room claims it within
//!   milliseconds.
//! - **Dying (kill -9):** its leases age out after `lease`, and members under quota claim them.
//!   Its jobs were unacked; the new holder resets the consumer to its ack floor so JetStream
//!   delivers them again at once, in order ([`crate::recover`]).
//! - **Restarting under the same name** (a container restarted in its pod): the new run sees
//!   its predecessor's heartbeat; if it is not renewed within `lease / 4`, the predecessor is
//!   dead and its leases are taken over at once. If it is renewed, another live process uses
//!   the name and start fails.
//!
//! A new holder starts from JetStream's state: the jobs not yet acked and the park, with each
//! key's order kept ([`crate::recover`], [`crate::park`]). Its rate buckets start full, so at a
//! hand-over a key may release at most one extra burst.

pub mod assign;
pub mod view;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_nats::jetstream::Context;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::shards::Shards;
use view::{Backlog, Holder, MemberInfo, View, LEASES, MEMBERS};

/// The bucket that holds membership and leases.
pub const BUCKET: &str = "WEIR_CLUSTER";

/// Why the group could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("NATS refused the {op} on {BUCKET}: {message}")]
    Nats { op: &'static str, message: String },
    #[error("member name {0:?} is in use by a running process; give each process a unique `member` (WEIR_MEMBER), e.g. its pod name")]
    NameInUse(String),
}

fn nats(op: &'static str) -> impl FnOnce(String) -> ClusterError {
    move |message| ClusterError::Nats { op, message }
}

/// A joined member: run it with [`Group::run`].
pub struct Group {
    kv: kv::Store,
    me: Holder,
    info: MemberInfo,
    lease: Duration,
    partitions: u16,
    shards: Shards,
    view: View,
    /// Partitions whose lease this member holds.
    held: BTreeMap<u16, Held>,
    stopping: FuturesUnordered<BoxFuture<'static, u16>>,
    ready: Arc<AtomicBool>,
    published: watch::Sender<Arc<View>>,
}

/// A lease this member holds.
struct Held {
    revision: u64,
    /// When the last successful renewal (or the claim) was sent.
    renewed: Instant,
    /// Its partition is being stopped, to hand the lease back.
    stopping: bool,
}

/// Opens `WEIR_CLUSTER`, creating it with `max_age = config.lease` if missing. Returns the
/// bucket and the lease time it actually has (the bucket's, if it existed).
pub async fn open(js: &Context, config: &Config) -> Result<(kv::Store, Duration), ClusterError> {
    let kv = match js.get_key_value(BUCKET).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: BUCKET.into(),
                description: "Weir: group members and partition leases".into(),
                history: 1,
                max_age: config.lease,
                // Aged-out entries leave a marker, so watchers see a lease expire.
                limit_markers: Some(config.lease),
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                nats("bucket creation")(format!("{e} (the group needs nats-server 2.11 or newer)"))
            })?,
    };
    let lease = kv
        .status()
        .await
        .map_err(|e| nats("status")(e.to_string()))?
        .max_age();
    if lease != config.lease {
        tracing::warn!(bucket = ?lease, config = ?config.lease, "{BUCKET} exists with another lease time; using the bucket's");
    }
    Ok((kv, lease))
}

/// How many members the bucket lists now (before this process joins).
pub async fn member_count(kv: &kv::Store) -> usize {
    match kv.keys().await {
        Ok(keys) => {
            keys.filter(|k| {
                futures::future::ready(k.as_ref().is_ok_and(|k| k.starts_with(MEMBERS)))
            })
            .count()
            .await
        }
        Err(_) => 0,
    }
}

impl Group {
    /// Joins the group as `config.member`. If the name's previous run left a heartbeat that is
    /// not renewed within `lease / 4`, its leases are taken over at once.
    pub async fn join(
        kv: kv::Store,
        lease: Duration,
        config: &Config,
        shards: Shards,
    ) -> Result<Group, ClusterError> {
        let me = Holder {
            member: config.member.clone(),
            incarnation: format!("{:012x}", rand::random::<u64>() >> 16),
        };
        let key = format!("{MEMBERS}{}", me.member);
        let before = kv
            .entry(&key)
            .await
            .map_err(|e| nats("read")(e.to_string()))?;
        let predecessor = match before {
            Some(e) if e.operation == Operation::Put => {
                tokio::time::sleep(lease / 4).await;
                let now = kv
                    .entry(&key)
                    .await
                    .map_err(|e| nats("read")(e.to_string()))?;
                if now.is_some_and(|n| n.revision != e.revision && n.operation == Operation::Put) {
                    return Err(ClusterError::NameInUse(me.member));
                }
                serde_json::from_slice::<MemberInfo>(&e.value).ok()
            }
            _ => None,
        };
        let info = MemberInfo {
            name: me.member.clone(),
            incarnation: me.incarnation.clone(),
            http: config.http_addr.to_string(),
            joined_ms: crate::release::unix_ms(),
            backlog: BTreeMap::new(),
        };
        let mut group = Group {
            kv,
            me,
            info,
            lease,
            partitions: config.partitions,
            shards,
            view: View::default(),
            held: BTreeMap::new(),
            stopping: FuturesUnordered::new(),
            ready: Arc::new(AtomicBool::new(false)),
            published: watch::channel(Arc::new(View::default())).0,
        };
        group.heartbeat().await?;
        if let Some(old) = predecessor {
            group.adopt(&old.incarnation).await;
        }
        tracing::info!(member = group.me.member, incarnation = group.me.incarnation, lease = ?lease, "joined the group");
        Ok(group)
    }

    /// True once the first assignment has been made (for `/readyz`).
    pub fn ready(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    /// The group as this member sees it, refreshed on every change and heartbeat.
    pub fn view(&self) -> watch::Receiver<Arc<View>> {
        self.published.subscribe()
    }

    /// Takes over the leases a dead predecessor of the same name held.
    async fn adopt(&mut self, incarnation: &str) {
        let Ok(keys) = self.kv.keys().await else {
            return;
        };
        let keys: Vec<String> = keys.filter_map(|k| async { k.ok() }).collect().await;
        for k in keys.iter().filter(|k| k.starts_with(LEASES)) {
            let Some(p) = k[LEASES.len()..].parse::<u16>().ok() else {
                continue;
            };
            let Ok(Some(e)) = self.kv.entry(k).await else {
                continue;
            };
            let ours = serde_json::from_slice::<Holder>(&e.value)
                .is_ok_and(|h| h.member == self.me.member && h.incarnation == incarnation);
            if e.operation == Operation::Put && ours {
                let sent = Instant::now();
                if let Ok(rev) = self.kv.update(k, self.holder_value(), e.revision).await {
                    tracing::info!(
                        partition = p,
                        "took over a partition from this member's previous run"
                    );
                    self.held.insert(
                        p,
                        Held {
                            revision: rev,
                            renewed: sent,
                            stopping: false,
                        },
                    );
                    self.shards.start(p, true);
                }
            }
        }
    }

    /// Runs until `cancel`, then leaves: hands every partition back before returning.
    pub async fn run(mut self, cancel: CancellationToken) {
        let period = self.lease / 6;
        // Planning waits for the watcher's first snapshot of the bucket (or one period at most).
        let mut settled = false;
        let settle_by = Instant::now() + period;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch = Self::watch(&self.kv).await;
        loop {
            let fence_at = self.next_fence();
            tokio::select! {
                _ = cancel.cancelled() => break,
                e = async { match watch.as_mut() { Some(w) => w.next().await, None => std::future::pending().await } } => match e {
                    Some(Ok(e)) => {
                        if let Some(p) = self.view.apply(&e) {
                            self.check_lost(p);
                        }
                        settled |= e.delta == 0 || e.seen_current || Instant::now() >= settle_by;
                        if settled {
                            self.rebalance().await;
                            self.ready.store(true, Relaxed);
                        }
                        self.publish();
                    }
                    _ => {
                        tracing::warn!("the {BUCKET} watcher ended; watching again");
                        self.view = View::default();
                        watch = None;
                    }
                },
                Some(p) = self.stopping.next(), if !self.stopping.is_empty() => {
                    self.give_back(p).await;
                    self.rebalance().await;
                }
                _ = tokio::time::sleep_until(fence_at), if !self.held.is_empty() => self.fence_overdue(),
                _ = tick.tick() => {
                    if watch.is_none() {
                        watch = Self::watch(&self.kv).await;
                    }
                    self.renew().await;
                    let _ = self.heartbeat().await;
                    settled |= Instant::now() >= settle_by;
                    if settled {
                        self.rebalance().await;
                        self.ready.store(true, Relaxed);
                    }
                    self.publish();
                }
            }
        }
        self.leave().await;
    }

    async fn watch(kv: &kv::Store) -> Option<kv::Watch> {
        match kv.watch_all().await {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch {BUCKET}; retrying");
                None
            }
        }
    }

    fn holder_value(&self) -> Bytes {
        serde_json::to_vec(&self.me).expect("serialisable").into()
    }

    fn lease_key(p: u16) -> String {
        format!("{LEASES}{p}")
    }

    /// Writes this member's heartbeat, with the backlog of each partition it runs.
    async fn heartbeat(&mut self) -> Result<(), ClusterError> {
        let stats = self.shards.stats();
        self.info.backlog = self
            .held
            .keys()
            .map(|&p| {
                let s = &stats[p as usize];
                let b = Backlog {
                    held: s.held.load(Relaxed),
                    parked: s.parked.load(Relaxed),
                    lag: s.lag.load(Relaxed),
                };
                (p, b)
            })
            .collect();
        let body: Bytes = serde_json::to_vec(&self.info).expect("serialisable").into();
        let key = format!("{MEMBERS}{}", self.me.member);
        match timeout(self.lease / 6, self.kv.put(key, body)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(nats("heartbeat")(e.to_string())),
            Err(_) => Err(nats("heartbeat")("timed out".into())),
        }
    }

    /// Renews every lease held, concurrently; a lease someone else now holds is fenced at once.
    async fn renew(&mut self) {
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
    fn next_fence(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let oldest = self
            .held
            .values()
            .filter(|h| !h.stopping)
            .map(|h| h.renewed)
            .min();
        oldest.map_or(far, |r| r + self.lease * 2 / 3)
    }

    fn fence_overdue(&mut self) {
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
    fn check_lost(&mut self, p: u16) {
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
    fn fence(&mut self, p: u16) {
        if let Some(h) = self.held.get_mut(&p) {
            if !h.stopping {
                h.stopping = true;
                self.stopping.push(self.shards.stop(p));
            }
        }
    }

    /// The partition has stopped: delete its lease so a member with room claims it at once.
    async fn give_back(&mut self, p: u16) {
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
    async fn rebalance(&mut self) {
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

    fn publish(&self) {
        self.published.send_replace(Arc::new(self.view.clone()));
    }

    /// Leaves: heartbeat deleted first, then every partition stopped and its lease deleted,
    /// leases renewed meanwhile.
    async fn leave(mut self) {
        self.ready.store(false, Relaxed);
        let key = format!("{MEMBERS}{}", self.me.member);
        let _ = timeout(self.lease / 6, self.kv.delete(key)).await;
        let all: Vec<u16> = self.held.keys().copied().collect();
        for p in all {
            self.fence(p);
        }
        let mut tick = tokio::time::interval(self.lease / 6);
        while !self.held.is_empty() {
            tokio::select! {
                Some(p) = self.stopping.next() => self.give_back(p).await,
                _ = tick.tick() => self.renew().await,
            }
        }
        tracing::info!(member = self.me.member, "left the group");
    }
}
