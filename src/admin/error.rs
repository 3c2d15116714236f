//! The API's one error shape: `{"error": "<what was wrong and how to fix it>"}` with a status.
//!
//! axum's extractors answer a bad body, path or query in plain text; the handlers take their
//! extractors as `Result`s and turn each rejection into this shape, so a client never has to
//! parse two kinds of error. 4xx is the request's fault; 503 means NATS failed and a retry may
//! succeed.

use std::future::Future;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::inspect::InspectError;
use crate::limits::store::StoreError;

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(e) => ApiError::bad_request(e.to_string()),
            // Weir creates the bucket at start, so a missing one means someone deleted it.
            StoreError::Missing | StoreError::Nats { .. } => {
                ApiError::unavailable(format!("{e}; retry once NATS is back"))
            }
        }
    }
}

impl From<InspectError> for ApiError {
    fn from(e: InspectError) -> Self {
        match e {
            // 421 Misdirected Request: ask the process that runs the key's partition.
            InspectError::NotOwned { .. } => ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                format!("{e}; ask that process's admin API (GET /v1/cluster lists who runs what)"),
            ),
            _ => ApiError::unavailable(format!("{e}; retry in a moment")),
        }
    }
}

/// How long a handler waits on NATS (or a partition) before answering 503. Weir's client
/// reconnects forever, so while NATS is away a request would otherwise hang.
pub const NATS_TIMEOUT: Duration = Duration::from_secs(5);

/// Awaits `fut` for at most `limit`; too long is a 503 saying what was being done.
pub async fn bounded<T, E: Into<ApiError>>(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(ApiError::unavailable(format!(
            "NATS did not answer within {} s while {what}; retry once NATS is back",
            limit.as_secs()
        ))),
    }
}

/// The example every body error points to.
const LIMIT_EXAMPLE: &str =
    r#"write {"rate": "40/s", "burst": 10} (patterns also need "pattern": "gold-*")"#;

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON: send `Content-Type: application/json`",
            ),
            JsonRejection::JsonSyntaxError(e) => ApiError::bad_request(format!(
                "the body is not valid JSON ({}); {LIMIT_EXAMPLE}",
                source_text(&e)
            )),
            JsonRejection::JsonDataError(e) => ApiError::bad_request(format!(
                "the body is not a limit ({}); {LIMIT_EXAMPLE}",
                source_text(&e)
            )),
            other => ApiError::new(
                other.status(),
                format!("cannot read the body: {}", other.body_text()),
            ),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::bad_request(format!(
            "the path is malformed ({}): percent-encode the name as UTF-8",
            r.body_text()
        ))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request(format!(
            "the query string is malformed ({}); e.g. ?sort=backlog&limit=50",
            r.body_text()
        ))
    }
}

/// serde's own words ("missing field `rate`", "unknown field `colour`, expected ..."), without
/// axum's "Failed to deserialize the JSON body into the target type" preamble.
fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        last = s.to_string();
        cur = s.source();
    }
    last
}
