//! The SHARQ-compatible HTTP API: sharq-server's paths, methods, status codes and JSON, served on
//! Weir's pipeline, so SHARQ's producers and workers switch by changing a URL.
//!
//! | SHARQ | Weir |
//! |---|---|
//! | `queue_type` | the destination: jobs go to `jobs.<queue_type>.<queue_id>` |
//! | `queue_id` | the key |
//! | `interval` (ms between a queue's jobs) | the key's limit in `WEIR_LIMITS`: `1000/interval` per second, burst 1 (0: unlimited) |
//! | `job_id`, `requeue_limit` | headers `Weir-Job-Id`, `Weir-Requeue-Limit` (and a `Nats-Msg-Id` derived from type, id and job) |
//! | dequeue | a durable pull consumer per `queue_type` on `WEIR_RELEASED` (`released.<queue_type>.>`) |
//! | `job_expire_interval` | that consumer's `ack_wait` (`sharq_job_expire_interval`) |
//! | finish | the ack of the released job |
//! | requeue | JetStream's redelivery after `ack_wait`; past `requeue_limit`, a dead letter (`requeue-limit`) |
//!
//! Where SHARQ's code and its documentation disagree, Weir does what the documentation
//! promises: bad input is a 400 with `{"status": "failure", "message": ...}` (sharq-server on
//! Python 3 answers 500 with an HTML page, `e.message` no longer existing); a job enqueued twice
//! with one `job_id` within the dedup window (2 min) is stored once (SHARQ keeps two list
//! entries and one payload, leaving a phantom job in flight); a queue's interval stays when the
//! queue drains (SHARQ deletes it at the last finish, so `POST /interval/` then answers 404).
//! Other differences are listed in the README's "SHARQ compatibility".
//!
//! Modules: [`enqueue`] (single and bulk, and the pipelined publishing also behind the admin
//! API's `POST /v1/jobs:batch`), [`dequeue`] (dequeue, finish, requeue), [`forward`] (a finish
//! that reaches a process not holding the job), [`queues`] (interval, metrics, deletequeue,
//! deepstatus), [`lengths`] (how many of a queue's jobs wait), [`gather`] (metrics added up
//! over every process), [`deleted`] (a deleted queue's prefetched jobs dropped on every process).

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::config::SharqSettings;

pub mod counters;
pub mod deleted;
pub mod dequeue;
pub mod enqueue;
mod feed;
pub mod forward;
pub mod gather;
pub mod lengths;
pub mod queues;
pub mod status;

pub use enqueue::Publisher;

/// Most jobs in one bulk request (`POST /enqueue/<queue_type>/bulk/`, `POST /v1/jobs:batch`).
pub const MAX_BULK: usize = 10_000;

/// Largest request body: a full bulk request of modest payloads.
pub const MAX_BODY: usize = 64 << 20;

/// What happened to a job, for the job status store ([`StatusHook`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Dequeued,
    Finished,
    Requeued,
    Dead,
}

/// One event of a job's life seen by this API.
#[derive(Debug, Clone)]
pub struct JobEvent<'a> {
    pub job_id: &'a str,
    pub queue_type: &'a str,
    pub queue_id: &'a str,
    pub state: JobState,
    /// Redeliveries so far.
    pub requeues: u32,
    pub reason: Option<&'a str>,
    /// Unix ms of this event.
    pub at_ms: u64,
    /// From the released job's `Weir-Enqueued-At` and `Weir-Released-At`, when known.
    pub enqueued_at: Option<u64>,
    pub released_at: Option<u64>,
    /// The job's sequence in `WEIR_JOBS`, when enqueued.
    pub sequence: Option<u64>,
    /// Enqueued again after a purge took the job that had its id ([`crate::purges`]).
    pub after_purge: bool,
}

/// Where job events go: the job status store ([`crate::status::StatusStore`]), or [`NoStatus`]
/// in tests of this API alone. Implementations must not block.
pub trait StatusHook: Send + Sync + 'static {
    fn record(&self, event: &JobEvent<'_>);
}

/// Each event becomes the job's whole record, from what the event knows (the store never
/// reads before it writes).
impl StatusHook for crate::status::StatusStore {
    fn record(&self, e: &JobEvent<'_>) {
        use crate::status::{JobRecord, JobState as S};
        let at = Some(e.at_ms);
        let mut rec = JobRecord {
            job_id: e.job_id.to_string(),
            queue_type: e.queue_type.to_string(),
            queue_id: e.queue_id.to_string(),
            state: S::Queued,
            requeues: e.requeues,
            reason: e.reason.map(str::to_string),
            queued_at: e.enqueued_at,
            parked_at: None,
            released_at: e.released_at,
            dequeued_at: None,
            finished_at: None,
            dead_at: None,
            sequence: e.sequence,
        };
        match e.state {
            JobState::Queued => {
                // The pipeline may have parked or released the job before its enqueue's ack
                // came back: only a job with no record yet gets this one, or, for a job enqueued
                // again after a purge, one whose record is the purged job's.
                rec.queued_at = rec.queued_at.or(at);
                return match e.after_purge {
                    true => self.record_over_purged(&rec),
                    false => self.record_first(&rec),
                };
            }
            JobState::Dequeued => (rec.state, rec.dequeued_at) = (S::Dequeued, at),
            JobState::Finished => (rec.state, rec.finished_at) = (S::Finished, at),
            JobState::Requeued => rec.state = S::Requeued,
            JobState::Dead => (rec.state, rec.dead_at) = (S::Dead, at),
        }
        self.record(&rec);
    }
}

/// Drops every event.
pub struct NoStatus;

impl StatusHook for NoStatus {
    fn record(&self, _: &JobEvent<'_>) {}
}

/// What the handlers share.
pub struct Shared {
    pub settings: SharqSettings,
    pub client: async_nats::Client,
    pub publisher: Publisher,
    pub intervals: queues::Intervals,
    pub counters: queues::Counters,
    pub lengths: Arc<lengths::QueueLengths>,
    pub dequeue: dequeue::Dequeue,
    pub inspect: crate::inspect::Partitions,
    pub released: async_nats::jetstream::stream::Stream,
    pub status: Arc<dyn StatusHook>,
    /// Where `GET /status/...` reads job records.
    pub store: crate::status::StatusStore,
    /// Finishes of jobs another process handed out.
    pub forward: forward::Forward,
}

pub type SharqState = Arc<Shared>;

/// The API's routes: exactly sharq-server's, plus bulk enqueue and job status.
pub fn router(state: SharqState) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { Json(json!({"message": "Hello, SharQ!"})) }),
        )
        .route("/enqueue/{queue_type}/bulk/", post(enqueue::bulk))
        .route("/enqueue/{queue_type}/{queue_id}/", post(enqueue::single))
        .route("/dequeue/", get(dequeue::dequeue_default))
        .route("/dequeue/{queue_type}/", get(dequeue::dequeue))
        .route(
            "/finish/{queue_type}/{queue_id}/{job_id}/",
            post(dequeue::finish),
        )
        .route("/interval/{queue_type}/{queue_id}/", post(queues::interval))
        .route("/metrics/", get(queues::metrics_all))
        .route("/metrics/{queue_type}/", get(queues::metrics_type))
        .route(
            "/metrics/{queue_type}/{queue_id}/",
            get(queues::metrics_queue),
        )
        .route(
            "/deletequeue/{queue_type}/{queue_id}/",
            delete(queues::delete_queue),
        )
        .route("/deepstatus/", get(queues::deep_status))
        .route(
            "/status/{queue_type}/{queue_id}/{job_id}/",
            get(status::job_status),
        )
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            failure(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {}", uri.path()),
            )
        })
        .fallback(|uri: Uri| async move {
            failure(
                StatusCode::NOT_FOUND,
                format!(
                    "no such path {}; SHARQ's paths end with a slash, e.g. /dequeue/sms/",
                    uri.path()
                ),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Serves the API on `listener` until `cancel`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: SharqState,
    cancel: CancellationToken,
) {
    let router = router(state);
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "SHARQ listener failed");
    }
}

/// SHARQ's error shape: `{"status": "failure", "message": ...}`.
pub fn failure(code: StatusCode, message: impl Into<String>) -> Response {
    (
        code,
        Json(json!({"status": "failure", "message": message.into()})),
    )
        .into_response()
}

/// `{"status": "failure"}` alone, as SHARQ answers "no job" and "not in flight".
pub fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"status": "failure"}))).into_response()
}

/// Checks a `queue_type`, `queue_id` or `job_id`: it becomes a subject token or a header, so
/// Weir's token rule applies (SHARQ's own is stricter: `[A-Za-z0-9_-]{1,100}`, a subset).
pub fn check_id(which: &str, value: &str) -> Result<(), String> {
    crate::job::check_token(value).map_err(|e| format!("`{which}` has an invalid value: it {e}"))
}

/// A JSON body, or why not (for SHARQ's 400).
pub fn parse_body(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("the body is not valid JSON: {e}"))
}

/// Wall-clock Unix ms.
pub fn now_ms() -> u64 {
    crate::release::unix_ms()
}
