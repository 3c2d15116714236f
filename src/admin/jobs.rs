//! `GET /v1/jobs/{job_id}`: a job's status, for jobs published with a `Weir-Job-Id` header
//! ([`crate::status`]).
//!
//! 404 covers both "never seen" and "seen longer ago than the retention": the bucket expires
//! records, so the two cannot be told apart, and the message says so.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::Json;

use super::error::{bounded, NATS_TIMEOUT};
use super::{AdminState, ApiError};
use crate::status::{JobRecord, StatusError};

impl From<StatusError> for ApiError {
    fn from(e: StatusError) -> Self {
        match e {
            StatusError::Off => ApiError::unavailable(e.to_string()),
            StatusError::BadId { .. } => ApiError::bad_request(e.to_string()),
            StatusError::Nats { .. } | StatusError::Purges(_) | StatusError::Corrupt { .. } => {
                ApiError::unavailable(format!("{e}; retry in a moment"))
            }
        }
    }
}

/// `GET /v1/jobs/{job_id}`.
pub async fn get(
    State(s): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<JobRecord>, ApiError> {
    let Path(job_id) = path?;
    let Some(retention) = s.status.retention() else {
        return Err(StatusError::Off.into());
    };
    match bounded("reading the job's status", NATS_TIMEOUT, s.status.get(&job_id)).await? {
        Some(rec) => Ok(Json(rec)),
        None => Err(ApiError::not_found(format!(
            "no status for job {job_id:?}: Weir has not seen a job with this Weir-Job-Id, or saw it more than job_status_retention ({}) ago and its record has expired",
            humantime(retention)
        ))),
    }
}

/// `1h`, `30m`, `90s`, `1500ms`: the way `job_status_retention` is written.
fn humantime(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    for (unit, n) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms % n == 0 {
            return format!("{}{unit}", ms / n);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    #[test]
    fn retention_reads_as_configured() {
        use std::time::Duration;
        assert_eq!(super::humantime(Duration::from_secs(3600)), "1h");
        assert_eq!(super::humantime(Duration::from_secs(90)), "90s");
        assert_eq!(super::humantime(Duration::from_millis(1500)), "1500ms");
    }
}
