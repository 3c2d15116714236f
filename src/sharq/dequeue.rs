//! Dequeue, finish, and requeue by redelivery.
//!
//! Each `queue_type` has one durable pull consumer on `WEIR_RELEASED` (`sharq-<queue_type>`,
//! filter `released.<queue_type>.>`, `ack_wait` = `sharq_job_expire_interval`), created at the
//! type's first dequeue. A feeder task (module `feed`) keeps up to [`BUFFER`] of its jobs prefetched, so a
//! dequeue takes one from memory with no NATS round trip; `?wait_ms=` waits for one. Buffered
//! jobs get a progress ack (`+WPI`) before a third of `ack_wait` passes, so waiting in the buffer
//! neither expires them nor spends their requeues, and a job handed out late gets one too, so a
//! worker always has close to the whole `job_expire_interval`.
//!
//! A dequeued job stays in flight (job id → its ack handle, at most [`MAX_IN_FLIGHT`]) until it
//! is finished (acked) or its time is up; then JetStream redelivers it: that is SHARQ's requeue.
//! A redelivered job whose requeues are used up (deliveries > `Weir-Requeue-Limit` + 1) is
//! dead-lettered to `dead.<queue_type>.<queue_id>` with reason `requeue-limit` and acked (SHARQ
//! dropped it). In flight is per process; a finish that reaches a process not holding the job is
//! forwarded to the others (module [`forward`](super::forward)), so several Weir processes can
//! serve one address.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::Acker;
use async_nats::jetstream::stream::Stream;
use async_nats::jetstream::{AckKind, Context};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{check_id, failure, not_found, JobEvent, JobState, SharqState, StatusHook};
use crate::config::SharqSettings;

/// Jobs prefetched per queue type.
pub const BUFFER: usize = 256;
/// Jobs handed out and not yet finished, per process.
pub const MAX_IN_FLIGHT: usize = 100_000;
/// Longest `?wait_ms=`.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// The dead-letter reason of a job past its requeue limit.
pub const REQUEUE_LIMIT_REASON: &str = "requeue-limit";
/// Room kept before a delivery's `ack_wait` runs out.
pub(super) const MARGIN: Duration = Duration::from_millis(200);
use super::feed::{Feed, Feeder, Ready};
use super::forward::Finished;

/// A job handed out.
pub(super) struct Held {
    acker: Acker,
    deadline: Instant,
    requeues: u32,
    enqueued_at: Option<u64>,
    released_at: Option<u64>,
}

/// The dequeue side: consumers, their feeders and the jobs in flight.
pub struct Dequeue {
    released: Stream,
    js: Context,
    settings: SharqSettings,
    feeders: tokio::sync::Mutex<HashMap<String, Arc<Feeder>>>,
    /// The same feeders, for the request path's lookup without an async lock (and for the
    /// queue lengths, which count what they hold).
    ready: Feeders,
    inflight: Arc<Mutex<HashMap<String, Held>>>,
    status: Arc<dyn StatusHook>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// Each queue type's prefetch buffer, shared with [`QueueLengths`](super::lengths::QueueLengths).
#[derive(Clone, Default)]
pub struct Feeders(Arc<std::sync::RwLock<HashMap<String, Arc<Feeder>>>>);

impl Feeders {
    fn get(&self, queue_type: &str) -> Option<Arc<Feeder>> {
        self.0.read().expect("lock").get(queue_type).cloned()
    }

    fn insert(&self, queue_type: &str, f: Arc<Feeder>) {
        self.0
            .write()
            .expect("lock")
            .insert(queue_type.to_string(), f);
    }

    /// Jobs of the queue this process holds prefetched, delivered at or before `WEIR_RELEASED`
    /// sequence `upto`.
    pub fn count(&self, queue_type: &str, queue_id: &str, upto: u64) -> u64 {
        self.get(queue_type).map_or(0, |f| f.count(queue_id, upto))
    }

    /// The `WEIR_RELEASED` sequences of the queue's jobs this process holds prefetched: its
    /// part of another process's count.
    pub fn seqs(&self, queue_type: &str, queue_id: &str) -> Vec<u64> {
        self.get(queue_type)
            .map_or(Vec::new(), |f| f.seqs(queue_id))
    }
}

/// The durable consumer of a queue type: `sharq-<queue_type>`, with bytes a consumer name
/// cannot hold written `=XX`.
pub fn consumer_name(queue_type: &str) -> String {
    std::iter::once("sharq-".to_string())
        .chain(queue_type.bytes().map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("={b:02X}"),
        }))
        .collect()
}

fn flight_key(t: &str, q: &str, j: &str) -> String {
    // '\n' is in no token.
    format!("{t}\n{q}\n{j}")
}

impl Dequeue {
    /// Also starts the sweeper that forgets jobs whose time is up.
    pub fn new(
        released: Stream,
        js: Context,
        settings: SharqSettings,
        status: Arc<dyn StatusHook>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Dequeue {
        let inflight: Arc<Mutex<HashMap<String, Held>>> = Arc::default();
        let (map, stop) = (inflight.clone(), cancel.clone());
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        let now = Instant::now();
                        map.lock().expect("lock").retain(|_, h| h.deadline > now);
                    }
                }
            }
        });
        Dequeue {
            released,
            js,
            settings,
            feeders: Default::default(),
            ready: Default::default(),
            inflight,
            status,
            tracker,
            cancel,
        }
    }

    /// Drops the jobs of deleted queue `queue_id` of type `queue_type` that this process holds
    /// prefetched, under `WEIR_RELEASED` sequence `below`, and those still on their way
    /// ([`super::feed::FENCE`]), acking them; answers how many it dropped.
    pub async fn drop_queue(&self, queue_type: &str, queue_id: &str, below: u64) -> u64 {
        let Some(f) = self.ready.get(queue_type) else {
            return 0;
        };
        let dropped = f.drop_queue(queue_id, below);
        let n = dropped.len() as u64;
        for m in dropped {
            // Deleted from the stream already; the ack clears it from the consumer.
            let _ = m.ack().await;
        }
        n
    }

    /// The prefetch buffers, for the queue lengths.
    pub fn feeders(&self) -> Feeders {
        self.ready.clone()
    }

    /// The type's feeder, with its consumer made (once) and its task started.
    async fn feeder(&self, queue_type: &str) -> Result<Arc<Feeder>, String> {
        if let Some(f) = self.ready.get(queue_type) {
            return Ok(f);
        }
        // The type's first dequeue: one request makes the consumer, the others wait for it.
        let mut feeders = self.feeders.lock().await;
        if let Some(f) = feeders.get(queue_type) {
            return Ok(f.clone());
        }
        let consumer = self.consumer(queue_type).await?;
        let f = Arc::new(Feeder::new());
        feeders.insert(queue_type.to_string(), f.clone());
        self.ready.insert(queue_type, f.clone());
        let feed = Feed {
            feeder: f.clone(),
            consumer,
            queue_type: queue_type.to_string(),
            js: self.js.clone(),
            ack_wait: self.settings.job_expire_interval,
            default_limit: self.settings.default_requeue_limit,
            status: self.status.clone(),
        };
        self.tracker.spawn(feed.run(self.cancel.clone()));
        Ok(f)
    }

    async fn consumer(&self, queue_type: &str) -> Result<PullConsumer, String> {
        let name = consumer_name(queue_type);
        let cfg = PullConfig {
            durable_name: Some(name.clone()),
            filter_subject: format!("released.{queue_type}.>"),
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.settings.job_expire_interval,
            deliver_policy: DeliverPolicy::All,
            max_ack_pending: (MAX_IN_FLIGHT + BUFFER) as i64,
            ..Default::default()
        };
        let err = |e: &dyn std::fmt::Display| format!("cannot make consumer {name}: {e}");
        let c: PullConsumer = self
            .released
            .get_or_create_consumer(&name, cfg.clone())
            .await
            .map_err(|e| err(&e))?;
        if c.cached_info().config.ack_wait != cfg.ack_wait {
            return self
                .released
                .update_consumer(cfg)
                .await
                .map_err(|e| err(&e));
        }
        Ok(c)
    }
}

/// `GET /dequeue/`: SHARQ's default queue type, `default`.
pub async fn dequeue_default(s: State<SharqState>, q: Query<HashMap<String, String>>) -> Response {
    take(s.0, "default".to_string(), q.0).await
}

/// `GET /dequeue/<queue_type>/[?wait_ms=N]`: 200 with the job, or 404 `{"status": "failure"}`
/// when none is ready (within `wait_ms`).
pub async fn dequeue(
    State(s): State<SharqState>,
    path: Result<Path<String>, PathRejection>,
    q: Query<HashMap<String, String>>,
) -> Response {
    let Ok(Path(t)) = path else {
        return failure(StatusCode::BAD_REQUEST, "bad path");
    };
    take(s, t, q.0).await
}

async fn take(s: SharqState, queue_type: String, query: HashMap<String, String>) -> Response {
    if let Err(m) = check_id("queue_type", &queue_type) {
        return failure(StatusCode::BAD_REQUEST, m);
    }
    let wait = match query.get("wait_ms").map(|w| w.parse::<u64>()) {
        None => Duration::ZERO,
        Some(Ok(ms)) => Duration::from_millis(ms).min(MAX_WAIT),
        Some(Err(_)) => {
            return failure(
                StatusCode::BAD_REQUEST,
                "`wait_ms` must be a whole number of milliseconds",
            )
        }
    };
    let d = &s.dequeue;
    if d.inflight.lock().expect("lock").len() >= MAX_IN_FLIGHT {
        return failure(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{MAX_IN_FLIGHT} jobs are in flight: finish some first"),
        );
    }
    let feeder = match d.feeder(&queue_type).await {
        Ok(f) => f,
        Err(e) => return failure(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    let ack_wait = d.settings.job_expire_interval;
    let deadline = tokio::time::Instant::now() + wait;
    let r = loop {
        let arrived = feeder.arrived.notified();
        if let Some(r) = feeder.pop(ack_wait) {
            break r;
        }
        if tokio::time::timeout_at(deadline, arrived).await.is_err() {
            return not_found();
        }
    };
    let mut expires = r.got + ack_wait - MARGIN;
    if r.got.elapsed() > MARGIN {
        let _ = r.msg.ack_with(AckKind::Progress).await;
        expires = Instant::now() + ack_wait - MARGIN;
    }
    let Ready {
        msg,
        queue_id,
        job_id,
        requeues,
        requeues_remaining,
        enqueued_at,
        released_at,
        ..
    } = r;
    let (msg, acker) = msg.split();
    d.inflight.lock().expect("lock").insert(
        flight_key(&queue_type, &queue_id, &job_id),
        Held {
            acker,
            deadline: expires,
            requeues,
            enqueued_at,
            released_at,
        },
    );
    s.counters.dequeued(&queue_type, &queue_id);
    d.status.record(&JobEvent {
        job_id: &job_id,
        queue_type: &queue_type,
        queue_id: &queue_id,
        state: JobState::Dequeued,
        requeues,
        reason: None,
        at_ms: super::now_ms(),
        enqueued_at,
        released_at,
        sequence: None,
        after_purge: false,
    });
    let length = s.lengths.peek(&queue_type, &queue_id);
    // The payload is spliced in as it is stored (it is the JSON the producer gave).
    let payload = &msg.payload[..];
    let mut out = Vec::with_capacity(payload.len() + 160);
    out.extend_from_slice(br#"{"status":"success","queue_id":"#);
    serde_json::to_writer(&mut out, &queue_id).expect("a string");
    out.extend_from_slice(br#","job_id":"#);
    serde_json::to_writer(&mut out, &job_id).expect("a string");
    out.extend_from_slice(br#","payload":"#);
    if serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok() {
        out.extend_from_slice(payload);
    } else {
        serde_json::to_writer(&mut out, &String::from_utf8_lossy(payload)).expect("a string");
    }
    out.extend_from_slice(
        format!(",\"requeues_remaining\":{requeues_remaining},\"current_queue_length\":{length}}}")
            .as_bytes(),
    );
    ([(header::CONTENT_TYPE, "application/json")], out).into_response()
}

/// `POST /finish/<queue_type>/<queue_id>/<job_id>/`: acks a job in flight: 200 success, or 404
/// failure for a job not in flight (never dequeued, finished already, or its time is up).
pub async fn finish(
    State(s): State<SharqState>,
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> Response {
    let Ok(Path((t, q, j))) = path else {
        return failure(StatusCode::BAD_REQUEST, "bad path");
    };
    for (which, v) in [("queue_type", &t), ("queue_id", &q), ("job_id", &j)] {
        if let Err(m) = check_id(which, v) {
            return failure(StatusCode::BAD_REQUEST, m);
        }
    }
    let mut done = s.dequeue.finish_here(&t, &q, &j).await;
    if done == Finished::NotHeld {
        done = s.forward.ask(&t, &q, &j).await;
    }
    match done {
        Finished::Done => Json(json!({"status": "success"})).into_response(),
        Finished::NotHeld => not_found(),
        Finished::Failed(e) => failure(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the ack did not reach NATS ({e}); the job will be redelivered"),
        ),
    }
}

impl Dequeue {
    /// Takes a job out of flight, if this process holds it and its time is not up.
    pub(super) fn take(&self, t: &str, q: &str, j: &str) -> Option<Held> {
        let held = self
            .inflight
            .lock()
            .expect("lock")
            .remove(&flight_key(t, q, j));
        held.filter(|h| h.deadline > Instant::now())
    }

    /// Acks a job taken out of flight, and records it finished.
    pub(super) async fn ack(&self, held: Held, t: &str, q: &str, j: &str) -> Finished {
        if let Err(e) = held.acker.ack().await {
            return Finished::Failed(e.to_string());
        }
        self.status.record(&JobEvent {
            job_id: j,
            queue_type: t,
            queue_id: q,
            state: JobState::Finished,
            requeues: held.requeues,
            reason: None,
            at_ms: super::now_ms(),
            enqueued_at: held.enqueued_at,
            released_at: held.released_at,
            sequence: None,
            after_purge: false,
        });
        Finished::Done
    }

    /// Finishes a job if this process holds it.
    pub(super) async fn finish_here(&self, t: &str, q: &str, j: &str) -> Finished {
        match self.take(t, q, j) {
            Some(held) => self.ack(held, t, q, j).await,
            None => Finished::NotHeld,
        }
    }
}
