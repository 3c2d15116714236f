//! Enqueue, one job or up to [`MAX_BULK`] at once, and the pipelined publishing behind both
//! (also behind the admin API's `POST /v1/jobs:batch`).
//!
//! A job is answered only once JetStream has acknowledged storing it in `WEIR_JOBS`. Its
//! `Nats-Msg-Id` is derived from `queue_type`, `queue_id` and `job_id`, so enqueueing the same
//! job twice within the stream's duplicate window (2 min) stores it once; the second answer is
//! the same `queued` (SHARQ would keep a phantom second entry).
//!
//! A job enqueued again after a purge of its key took it is stored again: JetStream answers it
//! as a duplicate of the purged job, and the key's purge mark ([`crate::purges`]) shows that the
//! job it duplicates is gone. It is published once more, under a message id that names the
//! purge. So a purge ends the duplicate window of every job of the key stored before it.
//!
//! A bulk request is published pipelined: every publish is sent without waiting, at most
//! [`WINDOW`] acks outstanding per request, and the acks are collected in order, so 10,000 jobs
//! cost about one round trip per window rather than one per job. Each job is answered on its own.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use async_nats::header::{HeaderMap, HeaderName};
use async_nats::jetstream::{self, Context};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};

use super::{check_id, failure, parse_body, JobEvent, JobState, SharqState, StatusHook, MAX_BULK};
use crate::job::header;
use crate::purges::{Mark, Purges};

/// Publishes awaiting their ack, per request.
pub const WINDOW: usize = 1024;

pub const JOB_ID: HeaderName = HeaderName::from_static(header::JOB_ID);
pub const REQUEUE_LIMIT: HeaderName = HeaderName::from_static(header::REQUEUE_LIMIT);
const MSG_ID: HeaderName = HeaderName::from_static(header::MSG_ID);

/// One job to publish.
#[derive(Debug, Clone)]
pub struct Job {
    pub queue_type: String,
    pub queue_id: String,
    pub job_id: String,
    /// -1: requeue forever.
    pub requeue_limit: i64,
    /// The payload's JSON.
    pub payload: Bytes,
}

/// `Nats-Msg-Id` of an enqueued job: one per (type, queue, job), so a repeat is deduplicated.
pub fn msg_id(queue_type: &str, queue_id: &str, job_id: &str) -> String {
    format!("job:{queue_type}:{queue_id}:{job_id}")
}

/// Purge marks by key, read once per call: a bulk request sent again whole is all duplicates.
type Marks = HashMap<String, Option<Mark>>;

/// Publishes jobs to `WEIR_JOBS`. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    js: Context,
    status: Arc<dyn StatusHook>,
    purges: Purges,
}

impl Publisher {
    /// Its own JetStream context: room for many concurrent bulk requests' windows, waiting (not
    /// failing) when it is full; each request holds at most [`WINDOW`] permits while it waits
    /// for its own acks, so requests cannot starve each other into a deadlock.
    pub fn new(
        client: async_nats::Client,
        status: Arc<dyn StatusHook>,
        purges: Purges,
    ) -> Publisher {
        let js = jetstream::ContextBuilder::new()
            .max_ack_inflight(WINDOW * 64)
            .backpressure_on_inflight(true)
            .build(client);
        Publisher { js, status, purges }
    }

    /// Publishes `jobs` pipelined and answers each, in order: `Ok(duplicate)` once stored,
    /// `Err(reason)` if NATS refused or did not answer.
    pub async fn publish_all(&self, jobs: &[Job]) -> Vec<Result<bool, String>> {
        let mut out = Vec::with_capacity(jobs.len());
        let mut pending = VecDeque::with_capacity(WINDOW.min(jobs.len()));
        // The purge marks of the keys of this call's duplicates, each read once.
        let mut marks = Marks::new();
        for job in jobs {
            if pending.len() >= WINDOW {
                let (ack, job) = pending.pop_front().expect("a full window");
                out.push(self.settle(ack, job, &mut marks).await);
            }
            let id = msg_id(&job.queue_type, &job.queue_id, &job.job_id);
            let sent = self.send(job, id).await;
            pending.push_back((sent, job));
        }
        while let Some((ack, job)) = pending.pop_front() {
            out.push(self.settle(ack, job, &mut marks).await);
        }
        out
    }

    async fn settle(
        &self,
        sent: Result<async_nats::jetstream::context::PublishAckFuture, String>,
        job: &Job,
        marks: &mut Marks,
    ) -> Result<bool, String> {
        let ack = match sent {
            Ok(f) => f.await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match ack {
            Ok(ack) if ack.duplicate => self.duplicate(job, ack.sequence, marks).await,
            Ok(ack) => {
                self.queued(job, ack.sequence, false);
                Ok(false)
            }
            Err(e) => Err(format!("NATS did not store the job ({e}); retry it")),
        }
    }

    /// Publishes `job` to its subject under message id `id`, without waiting for the ack.
    async fn send(
        &self,
        job: &Job,
        id: String,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, String> {
        let mut h = HeaderMap::new();
        h.insert(JOB_ID, job.job_id.as_str());
        h.insert(REQUEUE_LIMIT, job.requeue_limit.to_string());
        h.insert(MSG_ID, id);
        let subject = format!("jobs.{}.{}", job.queue_type, job.queue_id);
        self.js
            .publish_with_headers(subject, h, job.payload.clone())
            .await
            .map_err(|e| e.to_string())
    }

    /// JetStream already had a job under this message id, at sequence `seq`. The same job,
    /// unless a purge of its key has taken it since: then it is published again under a message
    /// id naming that purge, and stored. `Ok(true)` for a duplicate.
    async fn duplicate(&self, job: &Job, seq: u64, marks: &mut Marks) -> Result<bool, String> {
        let mark = match marks.get(&job.queue_id) {
            Some(m) => *m,
            None => {
                let m = self.purges.get(&job.queue_id).await.map_err(|e| {
                    format!(
                        "cannot tell whether a purge took the job this one repeats ({e}); retry it"
                    )
                })?;
                *marks.entry(job.queue_id.clone()).or_insert(m)
            }
        };
        let Some(mark) = mark.filter(|m| m.covers(seq)) else {
            // Already recorded, maybe further along.
            return Ok(true);
        };
        let id = format!(
            "{}:{}",
            msg_id(&job.queue_type, &job.queue_id, &job.job_id),
            mark.below
        );
        let ack = match self.send(job, id).await {
            Ok(f) => f.await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match ack {
            // Enqueued again since this purge already.
            Ok(ack) if ack.duplicate => Ok(true),
            Ok(ack) => {
                self.queued(job, ack.sequence, true);
                Ok(false)
            }
            Err(e) => Err(format!("NATS did not store the job ({e}); retry it")),
        }
    }

    /// Records `job` queued, stored at `seq`.
    fn queued(&self, job: &Job, seq: u64, after_purge: bool) {
        self.status.record(&JobEvent {
            job_id: &job.job_id,
            queue_type: &job.queue_type,
            queue_id: &job.queue_id,
            state: JobState::Queued,
            requeues: 0,
            reason: None,
            at_ms: super::now_ms(),
            enqueued_at: None,
            released_at: None,
            sequence: Some(seq),
            after_purge,
        });
    }
}

/// A job as a request names it, checked. `path_queue_id` is the path's, for a single enqueue.
struct Parsed {
    job: Job,
    interval: u64,
    max_queued_length: Option<u64>,
}

fn parse_job(
    v: &Value,
    queue_type: &str,
    path_queue_id: Option<&str>,
    default_limit: i64,
) -> Result<Parsed, String> {
    let obj = v
        .as_object()
        .ok_or("a job must be a JSON object with job_id, payload and interval")?;
    let queue_id = match path_queue_id {
        Some(q) => q.to_string(),
        None => match obj.get("queue_id") {
            Some(Value::String(q)) => q.clone(),
            _ => return Err("`queue_id` is missing: give each job its queue_id".into()),
        },
    };
    check_id("queue_id", &queue_id)?;
    let job_id = match obj.get("job_id") {
        Some(Value::String(j)) => j.clone(),
        _ => return Err("`job_id` has an invalid value: give a string, e.g. a UUID".into()),
    };
    check_id("job_id", &job_id)?;
    let payload = obj
        .get("payload")
        .ok_or("`payload` is missing: give the job's data as JSON")?;
    let interval = obj
        .get("interval")
        .and_then(Value::as_u64)
        .ok_or("`interval` has an invalid value: give the milliseconds between this queue's jobs, a whole number >= 0")?;
    let requeue_limit = match obj.get("requeue_limit") {
        None | Some(Value::Null) => default_limit,
        Some(l) => l.as_i64().filter(|l| *l >= -1).ok_or(
            "`requeue_limit` has an invalid value: give -1 (forever) or a whole number >= 0",
        )?,
    };
    let max_queued_length = payload.get("max_queued_length").and_then(Value::as_u64);
    Ok(Parsed {
        job: Job {
            queue_type: queue_type.to_string(),
            queue_id,
            job_id,
            requeue_limit,
            payload: Bytes::from(serde_json::to_vec(payload).expect("a JSON value")),
        },
        interval,
        max_queued_length,
    })
}

/// `POST /enqueue/<queue_type>/<queue_id>/` with `job_id`, `payload`, `interval` and an
/// optional `requeue_limit`: 201 `{"status": "queued"}`; 429 when the payload's
/// `max_queued_length` is reached (with `current_queue_length`, as is the 201 then).
pub async fn single(
    State(s): State<SharqState>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Bytes,
) -> Response {
    let Ok(Path((queue_type, queue_id))) = path else {
        return failure(
            StatusCode::BAD_REQUEST,
            "the path is not /enqueue/<queue_type>/<queue_id>/",
        );
    };
    if let Err(m) = check_id("queue_type", &queue_type) {
        return failure(StatusCode::BAD_REQUEST, m);
    }
    let v = match parse_body(&body) {
        Ok(v) => v,
        Err(m) => return failure(StatusCode::BAD_REQUEST, m),
    };
    let p = match parse_job(
        &v,
        &queue_type,
        Some(&queue_id),
        s.settings.default_requeue_limit,
    ) {
        Ok(p) => p,
        Err(m) => return failure(StatusCode::BAD_REQUEST, m),
    };
    let mut current = None;
    if let Some(max) = p.max_queued_length {
        let n = s.lengths.get(&queue_type, &queue_id).await.unwrap_or(0);
        if n >= max {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({"status": "failure", "message": "Max queue length reached", "current_queue_length": n})),
            )
                .into_response();
        }
        current = Some(n);
    }
    if let Err(e) = s.intervals.ensure(&p.job.queue_id, p.interval).await {
        return failure(StatusCode::SERVICE_UNAVAILABLE, format!("{e}"));
    }
    match s
        .publisher
        .publish_all(std::slice::from_ref(&p.job))
        .await
        .pop()
    {
        Some(Ok(_)) => {
            s.counters.enqueued(&queue_type, &p.job.queue_id, 1);
            let mut body = json!({"status": "queued"});
            if let Some(n) = current {
                body["current_queue_length"] = json!(n);
            }
            (StatusCode::CREATED, Json(body)).into_response()
        }
        Some(Err(m)) => failure(StatusCode::SERVICE_UNAVAILABLE, m),
        None => unreachable!("one job, one answer"),
    }
}

/// `POST /enqueue/<queue_type>/bulk/` with `{"jobs": [{"queue_id", "job_id", "payload",
/// "interval", "requeue_limit"?}, ...]}` (at most [`MAX_BULK`]): 200 with `results`, one per job
/// in order, `{"job_id", "status": "queued"}` or `{"job_id", "status": "failure", "message"}`.
/// A request with more jobs is refused whole with 413.
pub async fn bulk(
    State(s): State<SharqState>,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Response {
    let Ok(Path(queue_type)) = path else {
        return failure(
            StatusCode::BAD_REQUEST,
            "the path is not /enqueue/<queue_type>/bulk/",
        );
    };
    if let Err(m) = check_id("queue_type", &queue_type) {
        return failure(StatusCode::BAD_REQUEST, m);
    }
    let v = match parse_body(&body) {
        Ok(v) => v,
        Err(m) => return failure(StatusCode::BAD_REQUEST, m),
    };
    let Some(items) = v.get("jobs").and_then(Value::as_array) else {
        return failure(
            StatusCode::BAD_REQUEST,
            "give {\"jobs\": [{\"queue_id\", \"job_id\", \"payload\", \"interval\"}, ...]}",
        );
    };
    if items.len() > MAX_BULK {
        return failure(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} jobs in one request; send at most {MAX_BULK} per request",
                items.len()
            ),
        );
    }
    let default_limit = s.settings.default_requeue_limit;
    let parsed: Vec<Result<Parsed, String>> = items
        .iter()
        .map(|v| parse_job(v, &queue_type, None, default_limit))
        .collect();
    // Each queue's interval once, the last one given winning, as if sent one by one.
    let mut intervals: HashMap<&str, u64> = HashMap::new();
    for p in parsed.iter().flatten() {
        intervals.insert(&p.job.queue_id, p.interval);
    }
    let mut refused_queues: HashMap<&str, String> = HashMap::new();
    for (q, i) in &intervals {
        if let Err(e) = s.intervals.ensure(q, *i).await {
            refused_queues.insert(q, e.to_string());
        }
    }
    let mut to_send = Vec::with_capacity(parsed.len());
    let mut answers: Vec<Option<Result<bool, String>>> = Vec::with_capacity(parsed.len());
    for p in &parsed {
        match p {
            Ok(p) => match refused_queues.get(p.job.queue_id.as_str()) {
                Some(e) => answers.push(Some(Err(e.clone()))),
                None => {
                    to_send.push(p.job.clone());
                    answers.push(None);
                }
            },
            Err(e) => answers.push(Some(Err(e.clone()))),
        }
    }
    let mut sent = s.publisher.publish_all(&to_send).await.into_iter();
    let mut queued = 0usize;
    let results: Vec<Value> = parsed
        .iter()
        .zip(answers)
        .zip(items)
        .map(|((p, a), item)| {
            let outcome = a.unwrap_or_else(|| sent.next().expect("one answer per sent job"));
            let job_id = match p {
                Ok(p) => json!(p.job.job_id),
                Err(_) => item.get("job_id").cloned().unwrap_or(Value::Null),
            };
            match outcome {
                Ok(_) => {
                    queued += 1;
                    if let Ok(p) = p {
                        s.counters.enqueued(&queue_type, &p.job.queue_id, 1);
                    }
                    json!({"job_id": job_id, "status": "queued"})
                }
                Err(m) => json!({"job_id": job_id, "status": "failure", "message": m}),
            }
        })
        .collect();
    let failed = results.len() - queued;
    let status = if failed == 0 { "queued" } else { "partial" };
    Json(json!({"status": status, "queued": queued, "failed": failed, "results": results}))
        .into_response()
}

/// The native batch (`POST /v1/jobs:batch`): `{"jobs": [{"destination", "key", "job_id",
/// "payload", "requeue_limit"?}]}`, checked like SHARQ jobs but without an interval (limits are
/// the admin API's business). Returns each job's outcome in order; `Err` is the whole request's.
pub async fn native_batch(
    publisher: &Publisher,
    body: &[u8],
    default_limit: i64,
) -> Result<Vec<Result<bool, String>>, (StatusCode, String)> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let items = v.get("jobs").and_then(Value::as_array).ok_or((
        StatusCode::BAD_REQUEST,
        "give {\"jobs\": [{\"destination\", \"key\", \"job_id\", \"payload\"}, ...]}".to_string(),
    ))?;
    if items.len() > MAX_BULK {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} jobs in one request; send at most {MAX_BULK} per request",
                items.len()
            ),
        ));
    }
    let parsed: Vec<Result<Job, String>> = items
        .iter()
        .map(|item| {
            let dest = item
                .get("destination")
                .and_then(Value::as_str)
                .unwrap_or("");
            check_id("destination", dest)?;
            let mut with = item.clone();
            if let Some(o) = with.as_object_mut() {
                o.insert("interval".into(), json!(0));
                if let Some(k) = o.remove("key") {
                    o.insert("queue_id".into(), k);
                }
            }
            parse_job(&with, dest, None, default_limit)
                .map(|p| p.job)
                .map_err(|e| e.replace("queue_id", "key"))
        })
        .collect();
    let to_send: Vec<Job> = parsed.iter().flatten().cloned().collect();
    let mut sent = publisher.publish_all(&to_send).await.into_iter();
    Ok(parsed
        .into_iter()
        .map(|p| match p {
            Ok(_) => sent.next().expect("one answer per sent job"),
            Err(e) => Err(e),
        })
        .collect())
}
