//! The group: which process runs which partition, with leases in a JetStream KV bucket.
//!
//! Every partition is run by exactly one process at a time; processes join and leave freely.
//! The state lives in the `WEIR_CLUSTER` bucket, whose `max_age` is the lease time (`lease_ms`,
//! 6 s by default) and which leaves a marker when an entry ages out (nats-server 2.11+):
//!
//! - `members.<name>`: each process's heartbeat (its name, incarnation, admin address and
//!   backlog), written every `lease / 6`. A process whose entry is gone is not a member.
//! - `partitions.<p>`: the lease of partition `p`, naming its holder. Claimed by
//!   compare-and-set on the entry just read (a delete or age-out marker, or nothing), renewed
//!   every `lease / 6` with compare-and-set on its revision, handed back by deleting it (again
//!   compare-and-set). Unrenewed, it ages out after `lease`.
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
mod join;
mod lease;
pub mod view;

pub use join::{member_count, open};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use crate::shards::Shards;
use view::{Backlog, Change, Holder, MemberInfo, View, LEASES, MEMBERS};

/// The bucket that holds membership and leases.
pub const BUCKET: &str = "WEIR_CLUSTER";

/// Why the group could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("NATS refused the {op} on {BUCKET}: {message}")]
    Nats { op: &'static str, message: String },
    #[error("{BUCKET} exists but does not age leases out with markers ({0}); delete it (`nats kv del {BUCKET}`) while no Weir runs, and Weir recreates it")]
    Bucket(String),
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
    /// The NATS client's counters, and its connect count when the watch began: after a
    /// reconnect the bucket is watched afresh (see [`Group::run`]).
    nats: Arc<async_nats::Statistics>,
    connects: u64,
}

/// A lease this member holds.
struct Held {
    revision: u64,
    /// When the last successful renewal (or the claim) was sent.
    renewed: Instant,
    /// Its partition is being stopped, to hand the lease back.
    stopping: bool,
}

impl Group {
    /// True once the first assignment has been made (for `/readyz`).
    pub fn ready(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    /// The group as this member sees it, refreshed on every change and heartbeat.
    pub fn view(&self) -> watch::Receiver<Arc<View>> {
        self.published.subscribe()
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
                        let change = self.view.apply(&e);
                        if let Change::Lease(p) = change {
                            self.check_lost(p);
                        }
                        let was = settled;
                        // `seen_current` is not used: it is set from the consumer's info at creation, which
                        // can say "nothing pending" before the snapshot has been delivered.
                        settled |= e.delta == 0 || Instant::now() >= settle_by;
                        if settled && (change != Change::Nothing || !was) {
                            self.rebalance().await;
                            self.ready.store(true, Relaxed);
                            self.publish();
                        }
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
                    // After a NATS restart the watcher's consumer may be gone with the server,
                    // and the client notices only when its heartbeats stop: measured in `weir
                    // chaos`, one process's view stayed stale for 12 s and it reported not
                    // ready that long. A fresh watch replays the bucket (a few dozen entries).
                    let connects = self.nats.connects.load(Relaxed);
                    if connects != self.connects {
                        self.connects = connects;
                        if watch.is_some() {
                            tracing::debug!("reconnected to NATS; watching {BUCKET} afresh");
                            self.view = View::default();
                            watch = None;
                        }
                    }
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

    /// Watches the whole bucket: first the newest entry of every key (the snapshot that
    /// planning waits for, complete with the members and leases already there; async-nats'
    /// `watch_all` would deliver only entries written after it starts), then every change.
    async fn watch(kv: &kv::Store) -> Option<kv::Watch> {
        match kv.watch_with_history(">").await {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch {BUCKET}; retrying");
                None
            }
        }
    }

    pub(super) fn holder_value(&self) -> Bytes {
        serde_json::to_vec(&self.me).expect("serialisable").into()
    }

    pub(super) fn lease_key(p: u16) -> String {
        format!("{LEASES}{p}")
    }

    /// Writes this member's heartbeat, with the backlog of each partition it runs.
    pub(super) async fn heartbeat(&mut self) -> Result<(), ClusterError> {
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
