//! One partition's task: pull jobs from its durable consumer, let the scheduler decide, carry out
//! its actions (release, park, read back, purge), and ack each source job only once the publish
//! that carries it on is acknowledged.
//!
//! A partition owns its keys outright (the stream's partition transform sends all of a key's
//! jobs here), so its state needs no lock: one task, one map.
//!
//! Here: the task's loop, taking in jobs, and carrying out the scheduler's actions. Beside it,
//! `publish` (a released job's publish, then its source's ack), `ops` (operators' commands and
//! the background operations the task starts) and `stall` (a consumer that stopped pulling).

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::{Acker, StreamMessage};
use async_nats::jetstream::stream::Stream;
use async_nats::jetstream::{AckKind, Context};
use async_nats::Subject;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::inspect::{Command, Purged};
use crate::job::{self, header, DeadReason};
use crate::limiter::{instant_at, now};
use crate::limits::Limits;
use crate::metrics::PartitionMetrics;
use crate::release::{self, Pipeline};
use crate::scheduler::{Action, Caps, Held, Offer, Routed, Scheduler};
use crate::status::{self, JobRecord, JobState, StatusStore};
use crate::trace::Tracing;
use crate::{dead, park};
use governor::nanos::Nanos;

mod fences;
mod ops;
mod publish;
mod stall;

/// A job in memory: what it takes to publish it on, and to ack its source.
pub struct Job {
    /// Fresh: the stored subject `weir.in.<p>.<dest>.<key>`; parked: `park.<p>.<key>`.
    subject: Subject,
    headers: Option<HeaderMap>,
    payload: Bytes,
    /// The source message's ack handle, for a job from `WEIR_JOBS`.
    acker: Option<Acker>,
    enqueued_ms: u64,
}

impl Job {
    pub fn from_park(m: StreamMessage) -> Job {
        Job {
            subject: m.subject,
            headers: Some(m.headers),
            payload: m.payload,
            acker: None,
            enqueued_ms: 0,
        }
    }
}

impl Routed for Job {
    /// Asked only when some destination is capped.
    fn dest(&self) -> &str {
        if self.acker.is_some() {
            // Fresh: the stored subject, validated when offered.
            job::parse_stored(&self.subject).map_or("", |r| r.dest)
        } else {
            self.headers
                .as_ref()
                .and_then(|h| h.get(header::DESTINATION))
                .map_or("", |v| v.as_str())
        }
    }
}

/// What a publish in flight was for.
enum Tag {
    Release {
        key: crate::scheduler::Key,
        /// The job's sequence in `WEIR_JOBS`: a refused release fences its key on it.
        src_seq: u64,
        park_seq: Option<u64>,
        acker: Option<Acker>,
    },
    Park {
        key: crate::scheduler::Key,
        src_seq: u64,
        acker: Acker,
        status: Status,
    },
    Dead {
        src_seq: u64,
        acker: Acker,
        status: Status,
    },
}

impl Tag {
    /// The source job this publish settles, if it is unacked in `WEIR_JOBS`.
    fn unacked_seq(&self) -> Option<u64> {
        match self {
            Tag::Release {
                src_seq,
                acker: Some(_),
                ..
            }
            | Tag::Park { src_seq, .. }
            | Tag::Dead { src_seq, .. } => Some(*src_seq),
            Tag::Release { acker: None, .. } => None,
        }
    }
}

/// The status to record once the publish is acked: only for jobs with a `Weir-Job-Id` (boxed:
/// `None` for the others keeps the tag small and allocates nothing).
type Status = Option<Box<JobRecord>>;

/// A read from the park: `(park_seq, src_seq, job)`. Boxed: a job is large, and most ops in
/// flight are purges.
type LoadResult = Result<Option<Box<(u64, u64, Job)>>, ()>;

enum OpDone {
    Loaded {
        key: crate::scheduler::Key,
        res: LoadResult,
    },
    Purged {
        key: crate::scheduler::Key,
        below: u64,
        ok: bool,
    },
    /// The consumer's unacked range, asked to start a sweep for unreadable jobs.
    SweepRange(Result<crate::poison::Unacked, String>),
    /// A sweep for unreadable jobs ([`crate::poison`]) finished.
    Swept(Result<crate::poison::Swept, String>),
    /// The consumer's pull requests waiting and jobs pending, asked after a quiet reconnect
    /// ([`stall`]).
    PullChecked(Result<(usize, u64), String>),
}

/// What one partition shows the admin listener: whether its consumer is bound (for `/readyz`),
/// and the newest `WEIR_LIMITS` revision it has applied.
#[derive(Debug, Default)]
pub struct PartitionStats {
    pub bound: AtomicBool,
    pub limits_revision: AtomicU64,
    /// Jobs held in memory and parked (refreshed every 2 s), and jobs not yet read from
    /// `WEIR_JOBS` (per job): what the group's heartbeat reports for `/v1/cluster`.
    pub held: AtomicU64,
    pub parked: AtomicU64,
    pub lag: AtomicU64,
    /// Per capped destination: (name, keys queued, jobs released so far); refreshed every
    /// sweep (250 ms), read by [`crate::caps`].
    dest_usage: std::sync::Mutex<Vec<(String, u64, u64)>>,
}

impl PartitionStats {
    /// Back to "not running here", when the partition moves to another process.
    fn clear(&self) {
        self.bound.store(false, Relaxed);
        self.held.store(0, Relaxed);
        self.parked.store(0, Relaxed);
        self.lag.store(0, Relaxed);
        self.dest_usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn dest_usage(&self) -> std::collections::HashMap<String, (u64, u64)> {
        let u = self.dest_usage.lock().unwrap_or_else(|e| e.into_inner());
        u.iter().map(|(d, w, r)| (d.clone(), (*w, *r))).collect()
    }
}

pub struct Partition {
    id: u16,
    sched: Scheduler<Job>,
    pubs: Pipeline<Tag>,
    ops: FuturesUnordered<BoxFuture<'static, OpDone>>,
    park: Stream,
    actions: Vec<Action<Job>>,
    stats: Arc<PartitionStats>,
    closing: bool,
    /// Set while JetStream refuses publishes: the partition neither publishes nor reads.
    backoff: release::Backoff,
    /// The connection dropped while publishes were in flight: some may be lost while later ones,
    /// queued in the client, land after the reconnect. Nothing new is published until every
    /// publish in flight is settled (acked, or refused and handed back with its key fenced).
    in_doubt: bool,
    /// The publishes in doubt have been given [`release::RECONNECT_ACK_GRACE`] since the
    /// connection came back.
    graced: bool,
    client: async_nats::Client,
    /// How long a restart's fence waits for the previous run's unacked jobs: two `ack_wait`s.
    fence_for: Duration,
    /// Operators' questions ([`crate::inspect`]), and new limits and caps: one channel, so
    /// the loop polls one cheap receiver per turn (a `watch` receiver's `changed()` would
    /// register a waiter under a lock on every turn).
    commands: mpsc::Receiver<Command>,
    metrics: PartitionMetrics,
    tracing: Tracing,
    js: Context,
    /// The client's connect count, read on the sweep tick: a reconnect may mean a job the
    /// client cannot read broke the connection ([`crate::poison`]).
    nats: Arc<async_nats::Statistics>,
    connects: u64,
    /// A sweep is in flight; `Some(true)`: another reconnect came meanwhile, sweep again.
    sweeping: Option<bool>,
    /// A handle on the consumer for sweeps (its info is all they read).
    sweeper: Option<PullConsumer>,
    /// Whether the consumer stream still pulls after a reconnect; `rebind` is its verdict.
    stall: stall::StallWatch,
    rebind: bool,
    status: StatusStore,
    /// Purged keys' jobs still on their way in, to drop ([`fences`]).
    purges: fences::Fences,
}

/// What a partition task is connected to.
pub struct Links {
    pub js: Context,
    pub park: Stream,
    /// The limits in force at start; changes arrive as [`Command::Limits`].
    pub limits: Arc<Limits>,
    /// The process's destination buckets at start ([`crate::caps`]); changes arrive as
    /// [`Command::Caps`].
    pub caps: Arc<Caps>,
    pub commands: mpsc::Receiver<Command>,
    pub stats: Arc<PartitionStats>,
    pub metrics: PartitionMetrics,
    pub tracing: Tracing,
    /// Job status ([`crate::status`]); off when `job_status_retention` is 0.
    pub status: StatusStore,
}

impl Partition {
    pub fn new(id: u16, links: Links, c: &crate::config::Config) -> Self {
        let Links {
            js,
            park,
            limits,
            caps,
            commands,
            stats,
            metrics,
            tracing,
            status,
        } = links;
        stats.limits_revision.store(limits.revision, Relaxed);
        let nats = js.client().statistics();
        let mut sched = Scheduler::new(limits, c.horizon, c.max_held_per_partition as usize);
        // A per-key window as wide as the partition's bounds nothing: skip the bookkeeping.
        if c.publish_window_per_key < c.publish_window {
            sched = sched.with_key_window(c.publish_window_per_key);
        }
        sched.set_caps(&caps, now());
        Partition {
            id,
            sched,
            pubs: Pipeline::new(js.clone(), c.publish_window as usize),
            ops: FuturesUnordered::new(),
            park,
            actions: Vec::with_capacity(64),
            stats,
            closing: false,
            backoff: release::Backoff::default(),
            in_doubt: false,
            graced: false,
            client: js.client(),
            fence_for: c.ack_wait * 2,
            commands,
            metrics,
            tracing,
            connects: nats.connects.load(Relaxed),
            nats,
            js,
            sweeping: None,
            sweeper: None,
            stall: stall::StallWatch::default(),
            rebind: false,
            status,
            purges: fences::Fences::default(),
        }
    }

    /// The record of a job with a `Weir-Job-Id` in `state`; `None` (one header lookup, no
    /// allocation) for a job without one or when status is off.
    fn status_of(
        &self,
        headers: Option<&HeaderMap>,
        state: JobState,
        dest: &str,
        key: &str,
    ) -> Status {
        if !self.status.is_on() {
            return None;
        }
        let id = status::job_id(headers)?;
        Some(Box::new(JobRecord::new(id, dest, key, state)))
    }

    /// Runs until `cancel`, then hands back what it holds; the caller bounds the whole by the
    /// grace period. `reset`: the previous owner died holding jobs, so have JetStream deliver
    /// them again now rather than after `ack_wait` ([`crate::recover::redeliver_now`]).
    pub async fn run(mut self, mut consumer: PullConsumer, cancel: CancellationToken, reset: bool) {
        self.serve(&mut consumer, &cancel, reset).await;
        self.stats.clear();
        self.metrics.set_backlog(0, 0);
        self.metrics.set_consumer_lag(0);
    }

    async fn serve(
        &mut self,
        consumer: &mut PullConsumer,
        cancel: &CancellationToken,
        reset: bool,
    ) {
        self.sweeper = Some(consumer.clone());
        // Read before the reset below, which moves it back to the ack floor.
        let delivered = consumer.cached_info().delivered.stream_sequence;
        // Jobs the previous run held unacked come back later (after ack_wait) or out of order:
        // fence their keys so nothing newer overtakes them.
        match self.unacked(consumer).await {
            Ok(keys) => {
                if reset && !keys.is_empty() {
                    crate::recover::redeliver_now(consumer, self.id).await;
                }
                let until = Nanos::new(now().as_u64() + self.fence_for.as_nanos() as u64);
                for (k, seqs) in keys {
                    self.sched.fence(&k, seqs, until);
                }
            }
            Err(e) => {
                tracing::warn!(partition = self.id, error = %e, "listing unacked jobs failed; order after this restart is not guaranteed");
                if reset {
                    crate::recover::redeliver_now(consumer, self.id).await;
                }
            }
        }
        // Keys with parked jobs from an earlier run go first, before newer jobs of theirs.
        loop {
            match park::parked_keys(&self.park, self.id).await {
                Ok(keys) => {
                    for (k, n) in keys {
                        self.sched.restore_parked(&k, n, delivered, now());
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(partition = self.id, error = %e, "listing parked keys failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        self.run_actions().await;
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        let mut armed = None;
        let hold = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(hold);
        let mut hold_armed = None;
        let mut sweep = tokio::time::interval(Duration::from_millis(250));
        let mut ticks = 0u64;
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One waiter for the whole run: `cancel.cancelled()` per loop turn would register a new
        // waiter (under a lock) for every job.
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        'bind: while !cancel.is_cancelled() {
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(256)
                .heartbeat(Duration::from_secs(5))
                .messages()
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(partition = self.id, error = %e, "binding the consumer failed; retrying");
                    self.stats.bound.store(false, Relaxed);
                    tokio::select! {
                        _ = &mut cancelled => break 'bind,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'bind,
                    }
                }
            };
            self.stats.bound.store(true, Relaxed);
            loop {
                let wake = self.sched.next_wake();
                if wake != armed {
                    if let Some(w) = wake {
                        sleep.as_mut().reset(instant_at(w));
                    }
                    armed = wake;
                }
                let holding = self.backoff.until();
                if holding != hold_armed {
                    if let Some(u) = holding {
                        hold.as_mut().reset(u);
                    }
                    hold_armed = holding;
                }
                tokio::select! {
                    biased;
                    _ = &mut cancelled => break 'bind,
                    Some(cmd) = self.commands.recv() => self.on_command(cmd).await,
                    Some((res, tag)) = self.pubs.next_ack(), if !self.pubs.is_empty() => self.on_published(res, tag).await,
                    Some(done) = self.ops.next(), if !self.ops.is_empty() => self.on_op(done),
                    // No release is decided while publishing is held (a refusal's backoff, a
                    // broken connection, publishes in doubt): decisions taken then would all go
                    // out together when it ends, a burst far over the key's. Held, a key's bucket
                    // simply fills; it resumes with at most its burst.
                    _ = &mut sleep, if armed.is_some() && holding.is_none() && !self.in_doubt => { armed = None; self.sched.fire(now()); }
                    _ = &mut hold, if hold_armed.is_some() => { hold_armed = None; self.backoff.expired(); }
                    _ = sweep.tick() => {
                        let connects = self.nats.connects.load(Relaxed);
                        if connects != self.connects {
                            self.connects = connects;
                            // A reconnect this task did not see as a disconnect: what was in
                            // flight may still be lost, as above.
                            if !self.pubs.is_empty() && !self.in_doubt {
                                self.in_doubt = true;
                                self.graced = false;
                            }
                            self.sweep_unreadable();
                            self.stall.reconnected(tokio::time::Instant::now());
                        }
                        if self.stall.tick(tokio::time::Instant::now(), self.reading()) {
                            self.check_pull();
                        }
                        // Eviction checks every idle key: every 2 s is plenty.
                        ticks += 1;
                        let usage = self.sched.dest_usage();
                        if !usage.is_empty() || ticks % 8 == 0 {
                            *self.stats.dest_usage.lock().unwrap_or_else(|e| e.into_inner()) = usage;
                        }
                        if ticks % 8 == 0 {
                            let parked = self.sched.evict_idle(now());
                            let held = self.sched.stats().held as u64;
                            self.metrics.set_backlog(held, parked);
                            self.stats.held.store(held, Relaxed);
                            self.stats.parked.store(parked, Relaxed);
                            let n = self.metrics.top_keys_wanted();
                            if n > 0 {
                                let top = self.sched.top(n, now());
                                self.metrics.set_top_keys(top.into_iter().map(|v| { let b = v.backlog(); (v.key, b) }).collect());
                            }
                        }
                    }
                    m = messages.next(), if self.reading() => match m {
                        Some(Ok(m)) => {
                            self.stall.heard();
                            self.on_message(m).await
                        }
                        Some(Err(e)) => tracing::debug!(partition = self.id, error = %e, "consumer stream error"),
                        None => {
                            tracing::warn!(partition = self.id, "consumer stream ended; rebinding");
                            self.stats.bound.store(false, Relaxed);
                            continue 'bind;
                        }
                    },
                }
                self.run_actions().await;
                if self.rebind {
                    self.rebind = false;
                    continue 'bind;
                }
            }
        }
        self.stats.bound.store(false, Relaxed);
        self.shutdown().await;
    }

    /// Stop releasing: wait for publishes in flight (acking what they carried), hand back held jobs.
    async fn shutdown(&mut self) {
        self.closing = true;
        while let Some((res, tag)) = self.pubs.next_ack().await {
            self.on_published(res, tag).await;
        }
        for h in self.sched.take_all() {
            if let Some(a) = h.job.acker {
                nak(a, None).await;
            }
        }
        self.run_actions().await;
    }

    async fn on_message(&mut self, m: async_nats::jetstream::Message) {
        let (seq, redelivered, enqueued_ms) = match m.info() {
            Ok(i) => {
                self.metrics.set_consumer_lag(i.pending);
                self.stats.lag.store(i.pending, Relaxed);
                (
                    i.stream_sequence,
                    i.delivered > 1,
                    (i.published.unix_timestamp_nanos() / 1_000_000) as u64,
                )
            }
            Err(e) => {
                // Without its stream sequence a job has no order and no derived message id:
                // hand it back rather than guess.
                tracing::warn!(partition = self.id, error = %e, "a job without JetStream metadata; handing it back");
                if let Err(e) = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await {
                    tracing::debug!(error = %e, "nak failed; the job will be redelivered after ack_wait");
                }
                return;
            }
        };
        let (msg, acker) = m.split();
        let subject = msg.subject.clone();
        let job = Job {
            subject: msg.subject,
            headers: msg.headers,
            payload: msg.payload,
            acker: Some(acker),
            enqueued_ms,
        };
        match job::parse_stored(&subject) {
            Err(reason) => self.dead(job, seq, None, reason).await,
            Ok(route)
                if self
                    .purges
                    .purged(route.key, seq, tokio::time::Instant::now()) =>
            {
                tracing::debug!(
                    partition = self.id,
                    key = route.key,
                    seq,
                    "dropped a job of a purged key"
                );
                if let Some(a) = job.acker {
                    ack(a).await;
                }
            }
            Ok(route) => {
                self.metrics.received(route.dest);
                let held = self.sched.stats().held;
                match self.sched.offer(route.key, seq, redelivered, job, now()) {
                    // Queued rather than released at once: the decision had to wait.
                    Offer::Held if self.sched.stats().held > held => self.metrics.throttled(),
                    Offer::Held => {}
                    Offer::Park(key, job) => {
                        self.metrics.throttled();
                        self.metrics.parked(route.dest);
                        self.park(key, route.dest, seq, job).await
                    }
                }
            }
        }
    }

    async fn park(&mut self, key: crate::scheduler::Key, dest: &str, seq: u64, mut job: Job) {
        let mut h = job.headers.take().unwrap_or_default();
        let mut status = self.status_of(Some(&h), JobState::Parked, dest, &key);
        if let Some(rec) = status.as_mut() {
            let at = release::unix_ms();
            rec.queued_at = Some(job.enqueued_ms);
            rec.parked_at = Some(at);
            // A purge of the key beginning after `seq` was stored deletes it from the park.
            rec.sequence = Some(seq);
            // Carried on, so that the records written at release and after can show it.
            h.insert(header::PARKED_AT, at.to_string());
        }
        release::stamp(&mut h, &key, dest, job.enqueued_ms, || {
            job::derived_msg_id(seq)
        });
        h.insert(header::SOURCE_SEQ, seq.to_string());
        let acker = job.acker.take().expect("fresh job");
        let subject = job::park_subject(self.id, &key);
        let tag = Tag::Park {
            key,
            src_seq: seq,
            acker,
            status,
        };
        if let Err((e, tag)) = self.pubs.publish(subject, h, job.payload, tag).await {
            self.on_published(Err(e), tag).await;
        }
    }

    async fn dead(
        &mut self,
        mut job: Job,
        seq: u64,
        route: Option<(&str, &str)>,
        reason: DeadReason,
    ) {
        let subject = job::dead_subject(route);
        let dest = route.map_or("", |(d, _)| d);
        self.metrics
            .dead(dest, crate::metrics::dead_reason_kind(&reason));
        let status = self
            .status_of(job.headers.as_ref(), JobState::Dead, "", "")
            .map(|mut rec| {
                let (d, k) = route.unwrap_or_else(|| status::guess_route(&job.subject));
                (rec.queue_type, rec.queue_id) = (d.to_string(), k.to_string());
                rec.reason = Some(reason.to_string());
                rec.queued_at = Some(job.enqueued_ms);
                rec.dead_at = Some(release::unix_ms());
                rec
            });
        let h = dead::headers(job.headers.take(), &job.subject, &reason, seq);
        let acker = job.acker.take().expect("fresh job");
        if let Err((e, tag)) = self
            .pubs
            .publish(
                subject,
                h,
                job.payload,
                Tag::Dead {
                    src_seq: seq,
                    acker,
                    status,
                },
            )
            .await
        {
            self.on_published(Err(e), tag).await;
        }
    }

    async fn run_actions(&mut self) {
        // While JetStream refuses publishes or the connection is down, decisions wait in the
        // scheduler (late, never early).
        if !self.closing && !self.may_publish() {
            return;
        }
        self.sched.take_actions(&mut self.actions);
        let mut actions = std::mem::take(&mut self.actions);
        for a in actions.drain(..) {
            match a {
                Action::Release { key, job } if self.closing => {
                    if let Some(a) = job.job.acker {
                        nak(a, None).await;
                    }
                    self.sched.release_done(&key, job.park_seq, false, now());
                }
                Action::Release { key, job } => self.release(key, job).await,
                Action::Load { .. } | Action::Purge { .. } if self.closing => {}
                Action::Load { key, from } => {
                    let (park, p) = (self.park.clone(), self.id);
                    self.ops.push(Box::pin(async move {
                        let res = park::load(park, p, &key, from)
                            .await
                            .map(|o| o.map(Box::new));
                        OpDone::Loaded { key, res }
                    }));
                }
                Action::Purge { key, below } => {
                    let (park, p) = (self.park.clone(), self.id);
                    self.ops.push(Box::pin(async move {
                        let ok = park::purge(park, p, &key, below).await;
                        OpDone::Purged { key, below, ok }
                    }));
                }
            }
        }
        self.actions = actions;
    }
}

async fn ack(a: Acker) {
    if let Err(e) = a.ack().await {
        tracing::debug!(error = %e, "ack failed; the job will be redelivered and deduplicated");
    }
}

async fn nak(a: Acker, delay: Option<Duration>) {
    if let Err(e) = a.ack_with(AckKind::Nak(delay)).await {
        tracing::debug!(error = %e, "nak failed; the job will be redelivered after ack_wait");
    }
}
