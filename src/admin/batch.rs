//! `POST /v1/jobs:batch`: enqueue up to 10,000 jobs in one request, each answered on its own.
//!
//! The native form of the SHARQ API's bulk enqueue ([`crate::sharq::enqueue`]), sharing its
//! pipelined publishing: `{"jobs": [{"destination", "key", "job_id", "payload",
//! "requeue_limit"?}]}`. Each job goes to `jobs.<destination>.<key>` with `Weir-Job-Id` and
//! `Weir-Requeue-Limit`, and a `Nats-Msg-Id` derived from destination, key and job id (a repeat
//! within two minutes is stored once). 200 with `results` in request order; a request that is
//! not a batch (bad JSON, no `jobs`) is a 400, more than 10,000 jobs a 413.

use axum::extract::State;
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};

use super::{AdminState, ApiError};
use crate::sharq::enqueue::native_batch;

pub async fn batch(State(s): State<AdminState>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let outcomes = native_batch(&s.jobs, &body, s.default_requeue_limit)
        .await
        .map_err(|(status, m)| ApiError::new(status, m))?;
    let mut accepted = 0;
    let results: Vec<Value> = outcomes
        .into_iter()
        .map(|o| match o {
            Ok(duplicate) => {
                accepted += 1;
                json!({"accepted": true, "duplicate": duplicate})
            }
            Err(reason) => json!({"accepted": false, "reason": reason}),
        })
        .collect();
    let refused = results.len() - accepted;
    Ok(Json(
        json!({"accepted": accepted, "refused": refused, "results": results}),
    ))
}
