//! Queues: intervals (a key's limit), queue lengths, and the interval, metrics, deletequeue and
//! deepstatus endpoints.
//!
//! An interval of `i` ms is the key's limit: `1000/i` per second with burst 1, SHARQ's strict
//! spacing. Weir's rates are whole counts per second, minute or hour, so an interval dividing
//! neither 1 s nor 1 min is rounded to the nearest count per hour (an interval of 7 ms becomes
//! 514286/h, 1.0000003 × the asked spacing); intervals over an hour become 1/h; 0 is
//! 1,000,000/s: unlimited in practice. Limits are per key, so two queue types sharing a
//! `queue_id` share its interval.
//!
//! Queue lengths (`queue_length` here, `current_queue_length` on enqueue and dequeue) are
//! counted in [`lengths`](super::lengths).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::json;
use tokio::sync::watch;

use super::{check_id, failure, not_found, parse_body, SharqState};
use crate::config::{Limit, Rate};
use crate::limits::store::{Store, StoreError};
use crate::limits::{Entry, LimitJson, Limits, Source};

pub use super::counters::Counters;
use super::counters::Scope;
use super::gather;

/// How long an enqueue waits for a changed interval to be in force.
const APPLY_WAIT: Duration = Duration::from_secs(2);

/// Jobs per second for an interval of 0: far beyond any worker pool, and a period (1 µs) a GCRA
/// bucket can still be drained in.
pub const UNLIMITED: u32 = 1_000_000;

/// The limit an interval stands for.
pub fn limit_of(interval_ms: u64) -> Limit {
    let (count, per) = match interval_ms {
        0 => (UNLIMITED, 1),
        i if 1000 % i == 0 => ((1000 / i) as u32, 1),
        i if 60_000 % i == 0 => ((60_000 / i) as u32, 60),
        i => ((((3_600_000 + i / 2) / i) as u32).max(1), 3600),
    };
    Limit {
        rate: Rate {
            count,
            per: Duration::from_secs(per),
        },
        burst: 1,
    }
}

/// Writes queues' intervals to `WEIR_LIMITS`, only when they change.
pub struct Intervals {
    store: Store,
    limits: watch::Receiver<Arc<Limits>>,
    /// What this process wrote, with the revision: in force once the table reaches it.
    written: Mutex<HashMap<String, (Limit, u64)>>,
}

impl Intervals {
    pub fn new(store: Store, limits: watch::Receiver<Arc<Limits>>) -> Self {
        Intervals {
            store,
            limits,
            written: Mutex::default(),
        }
    }

    /// Makes `interval_ms` the limit of key `queue_id`, writing only if another is in force:
    /// no NATS request on the enqueue path once a queue's interval is set.
    pub async fn ensure(&self, queue_id: &str, interval_ms: u64) -> Result<(), StoreError> {
        let want = limit_of(interval_ms);
        let revision = {
            let table = self.limits.borrow();
            if table.resolve(queue_id) == (want, Source::Key) {
                return Ok(());
            }
            table.revision
        };
        if let Some((l, rev)) = self.written.lock().expect("lock").get(queue_id) {
            // Written, and the watcher has not caught up yet.
            if *l == want && revision < *rev {
                return Ok(());
            }
        }
        let rev = self
            .store
            .put(
                &Entry::Key(queue_id.to_string()),
                &LimitJson::of(&want, None),
            )
            .await?;
        self.written
            .lock()
            .expect("lock")
            .insert(queue_id.to_string(), (want, rev));
        // Until the partitions have the new limit, a job published now could leave under the
        // old one: wait (briefly; only when an interval changes) for the watcher to apply it.
        let mut seen = self.limits.clone();
        let applied = seen.wait_for(|t| t.revision >= rev);
        if tokio::time::timeout(APPLY_WAIT, applied).await.is_err() {
            tracing::warn!(
                queue_id,
                "a new interval was not applied within 2 s; enqueueing anyway"
            );
        }
        Ok(())
    }

    /// Whether the key has an interval (a limit of its own).
    pub fn known(&self, queue_id: &str) -> bool {
        self.limits.borrow().resolve(queue_id).1 == Source::Key
            || self.written.lock().expect("lock").contains_key(queue_id)
    }

    /// Deletes the key's limit.
    pub async fn forget(&self, queue_id: &str) -> Result<bool, StoreError> {
        self.written.lock().expect("lock").remove(queue_id);
        self.store.delete(&Entry::Key(queue_id.to_string())).await
    }
}

fn ids(path: Result<Path<(String, String)>, PathRejection>) -> Result<(String, String), String> {
    let Ok(Path((t, q))) = path else {
        return Err("bad path".into());
    };
    check_id("queue_type", &t).and_then(|()| check_id("queue_id", &q))?;
    Ok((t, q))
}

/// `POST /interval/<queue_type>/<queue_id>/` with `{"interval": ms}`: 200 success, or 404
/// failure for a queue without an interval.
pub async fn interval(
    State(s): State<SharqState>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Bytes,
) -> Response {
    let (_, queue_id) = match ids(path) {
        Ok(p) => p,
        Err(m) => return failure(StatusCode::BAD_REQUEST, m),
    };
    let v = match parse_body(&body) {
        Ok(v) => v,
        Err(m) => return failure(StatusCode::BAD_REQUEST, m),
    };
    let Some(interval) = v.get("interval").and_then(|i| i.as_u64()) else {
        return failure(
            StatusCode::BAD_REQUEST,
            "`interval` has an invalid value: give the milliseconds between this queue's jobs, a whole number >= 0",
        );
    };
    if !s.intervals.known(&queue_id) {
        return not_found();
    }
    match s.intervals.ensure(&queue_id, interval).await {
        Ok(()) => Json(json!({"status": "success"})).into_response(),
        Err(e) => failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `GET /metrics/`: queue types and the global counts.
pub async fn metrics_all(State(s): State<SharqState>) -> Response {
    let part = gather::part(&s, &Scope::All).await;
    let (enq, deq) = part.counts(super::now_ms());
    Json(json!({
        "status": "success",
        "queue_types": part.names,
        "enqueue_counts": enq,
        "dequeue_counts": deq,
    }))
    .into_response()
}

/// `GET /metrics/<queue_type>/`: the type's queue ids.
pub async fn metrics_type(
    State(s): State<SharqState>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let Ok(Path(t)) = path else {
        return failure(StatusCode::BAD_REQUEST, "bad path");
    };
    if let Err(m) = check_id("queue_type", &t) {
        return failure(StatusCode::BAD_REQUEST, m);
    }
    let part = gather::part(&s, &Scope::Type(t)).await;
    Json(json!({"status": "success", "queue_ids": part.names})).into_response()
}

/// `GET /metrics/<queue_type>/<queue_id>/`: the queue's length and counts.
pub async fn metrics_queue(
    State(s): State<SharqState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let (t, q) = match ids(path) {
        Ok(p) => p,
        Err(m) => return failure(StatusCode::BAD_REQUEST, m),
    };
    // The other processes' counts and prefetched jobs, asked for while this one counts.
    let scope = Scope::Queue(t.clone(), q.clone());
    let (counted, part) = tokio::join!(s.lengths.get_upto(&t, &q), gather::part(&s, &scope));
    let len = match counted {
        Ok((n, upto)) => n + part.prefetched.iter().filter(|&&seq| seq <= upto).count() as u64,
        Err(e) => return failure(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    let (enq, deq) = part.counts(super::now_ms());
    Json(json!({
        "status": "success",
        "queue_length": len,
        "enqueue_counts": enq,
        "dequeue_counts": deq,
    }))
    .into_response()
}

/// `DELETE /deletequeue/<queue_type>/<queue_id>/` with `{"purge_all": bool}`: deletes the
/// queue's pending jobs (the key's held, parked and queued jobs, and its released jobs not yet
/// dequeued, prefetched ones included: [`super::deleted`]); `purge_all` also deletes its
/// interval. Answers as SHARQ does, 200 with
/// `{"status": "Success"|"Failure", "message"}` (capitalised, as SHARQ writes them).
pub async fn delete_queue(
    State(s): State<SharqState>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Bytes,
) -> Response {
    let (t, q) = match ids(path) {
        Ok(p) => p,
        Err(m) => return failure(StatusCode::BAD_REQUEST, m),
    };
    let v = match parse_body(&body) {
        Ok(v) => v,
        Err(m) => return failure(StatusCode::BAD_REQUEST, m),
    };
    let purge_all = v
        .get("purge_all")
        .and_then(|p| p.as_bool())
        .unwrap_or(false);
    // The key's pending jobs, by the process running its partition.
    let purged = match super::deleted::purge_key(&s, &q).await {
        Ok(n) => n,
        Err(e) => return failure(StatusCode::SERVICE_UNAVAILABLE, format!("{e}; retry")),
    };
    // Its released jobs not yet dequeued: in the stream, and prefetched by any process.
    let released = match super::deleted::purge_released(&s, &t, &q).await {
        Ok(n) => n,
        Err(e) => return failure(StatusCode::SERVICE_UNAVAILABLE, format!("{e}; retry")),
    };
    if purge_all {
        if let Err(e) = s.intervals.forget(&q).await {
            return failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
        }
        s.counters.forget(&t, &q);
    }
    let body = match (purged + released > 0, purge_all) {
        (false, _) => json!({"status": "Failure", "message": "No queued calls found"}),
        (true, false) => {
            json!({"status": "Success", "message": "Successfully removed all queued calls"})
        }
        (true, true) => {
            json!({"status": "Success", "message": "Successfully removed all queued calls and purged related resources"})
        }
    };
    Json(body).into_response()
}

/// `GET /deepstatus/`: 200 when JetStream answers within 2 s, else 500.
pub async fn deep_status(State(s): State<SharqState>) -> Response {
    let js = async_nats::jetstream::new(s.client.clone());
    match tokio::time::timeout(Duration::from_secs(2), js.query_account()).await {
        Ok(Ok(_)) => Json(json!({"status": "success"})).into_response(),
        Ok(Err(e)) => failure(StatusCode::INTERNAL_SERVER_ERROR, format!("JetStream: {e}")),
        Err(_) => failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "JetStream did not answer within 2 s",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_become_limits_with_burst_1() {
        let r = |i| {
            let l = limit_of(i);
            assert_eq!(l.burst, 1);
            l.rate.to_string()
        };
        assert_eq!(r(1000), "1/s");
        assert_eq!(r(100), "10/s");
        assert_eq!(r(5000), "12/m");
        assert_eq!(r(7), "514286/h");
        assert_eq!(r(0), "1000000/s");
        assert_eq!(r(10_000_000), "1/h");
        assert_eq!(limit_of(250).rate.period(), Duration::from_millis(250));
    }
}
