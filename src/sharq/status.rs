//! `GET /status/<queue_type>/<queue_id>/<job_id>/`: a job's status in SHARQ's style, the
//! feature SHARQ's authors promised and never shipped.
//!
//! The record is the one `GET /v1/jobs/{job_id}` answers ([`crate::status`]), wrapped as SHARQ
//! wraps its answers: 200 `{"status": "success", "job": {...}}`. 404 `{"status": "failure"}`
//! when Weir has no record of that job in that queue (never seen, or older than
//! `job_status_retention`), 503 when job status is off or NATS does not answer.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{check_id, failure, not_found, SharqState};
use crate::status::StatusError;

/// How long a status read may take before the answer is a 503.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn job_status(
    State(s): State<SharqState>,
    Path((queue_type, queue_id, job_id)): Path<(String, String, String)>,
) -> Response {
    for (which, v) in [
        ("queue_type", &queue_type),
        ("queue_id", &queue_id),
        ("job_id", &job_id),
    ] {
        if let Err(m) = check_id(which, v) {
            return failure(StatusCode::BAD_REQUEST, m);
        }
    }
    let read = tokio::time::timeout(READ_TIMEOUT, s.store.get(&job_id)).await;
    match read {
        Ok(Ok(Some(rec))) if rec.queue_type == queue_type && rec.queue_id == queue_id => {
            Json(json!({"status": "success", "job": rec})).into_response()
        }
        Ok(Ok(_)) => not_found(),
        Ok(Err(StatusError::BadId { .. })) => {
            failure(StatusCode::BAD_REQUEST, "job_id is longer than 256 bytes")
        }
        Ok(Err(e @ StatusError::Off)) => failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Ok(Err(e)) => failure(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{e}; retry in a moment"),
        ),
        Err(_) => failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "NATS did not answer within 2 s; retry in a moment",
        ),
    }
}
