//! `/v1/keys`: what the partitions know about keys, and purging a key's pending jobs.
//!
//! The answers come from the partition tasks ([`crate::inspect`]) and the streams' per-subject
//! counts. Times until the next release are also given as Unix milliseconds
//! (`next_release_at`), the clock of the `Weir-*-At` headers, so they can be compared with them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

use super::error::{bounded, NATS_TIMEOUT};
use super::limits::check_name;
use super::{AdminState, ApiError};
use crate::inspect::{KeyStatus, KeyView, LimitView};

/// Most keys `GET /v1/keys` returns: each partition sends its own top list, so the cost grows
/// with `limit` times the partition count.
pub const MAX_TOP: usize = 1000;
/// Keys `GET /v1/keys` returns without `limit`.
pub const DEFAULT_TOP: usize = 50;

/// A purge deletes from two streams and may meet a large park: it gets longer than a read.
const PURGE_TIMEOUT: Duration = Duration::from_secs(30);

/// `GET /v1/keys/{key}`.
#[derive(Debug, Serialize)]
pub struct KeyStatusBody {
    #[serde(flatten)]
    pub status: KeyStatus,
    /// Held plus parked.
    pub backlog: u64,
    /// When the next job may leave, in Unix ms.
    pub next_release_at: Option<u64>,
}

/// One key of `GET /v1/keys`.
#[derive(Debug, Serialize)]
pub struct TopKey {
    #[serde(flatten)]
    pub view: KeyView,
    pub backlog: u64,
    pub next_release_at: Option<u64>,
    /// The key's effective limit and where it came from.
    pub limit: LimitView,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `GET /v1/keys/{key}`: a key's limit, backlog and counts; 404 for a key Weir has no trace of.
pub async fn status(
    State(s): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<KeyStatusBody>, ApiError> {
    let Path(key) = path?;
    check_name("key", &key)?;
    let Some(status) = bounded(
        "reading the key's counts",
        NATS_TIMEOUT,
        s.inspect.key(&key),
    )
    .await?
    else {
        return Err(ApiError::not_found(format!(
            "Weir has no trace of key {key:?}: nothing held, parked, released or dead-lettered for it; GET /v1/keys lists the busiest keys"
        )));
    };
    Ok(Json(KeyStatusBody {
        backlog: status.view.backlog(),
        next_release_at: status.view.next_release_in_ms.map(|ms| unix_ms() + ms),
        status,
    }))
}

/// `GET /v1/keys?sort=backlog&limit=50`: the busiest keys, largest backlog first.
pub async fn top(
    State(s): State<AdminState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) = query?;
    let mut limit = DEFAULT_TOP;
    for (name, value) in params {
        match name.as_str() {
            "sort" if value == "backlog" => {}
            "sort" => {
                return Err(ApiError::bad_request(format!(
                    "sort={value:?} is not supported: use sort=backlog (the only order for now)"
                )))
            }
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_TOP).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "limit={value:?} is invalid: use a whole number from 1 to {MAX_TOP}"
                        ))
                    })?;
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {name:?}: use sort=backlog and limit=1..{MAX_TOP}"
                )))
            }
        }
    }
    let views = bounded("asking the partitions", NATS_TIMEOUT, s.inspect.top(limit)).await?;
    let limits = s.inspect.limits();
    let now = unix_ms();
    let keys: Vec<TopKey> = views
        .into_iter()
        .map(|view| {
            let (l, source) = limits.resolve(&view.key);
            TopKey {
                backlog: view.backlog(),
                next_release_at: view.next_release_in_ms.map(|ms| now + ms),
                limit: LimitView::new(&l, source),
                view,
            }
        })
        .collect();
    Ok(Json(
        json!({ "sort": "backlog", "limit": limit, "keys": keys }),
    ))
}

/// `DELETE /v1/keys/{key}/jobs`: deletes the key's pending jobs (held, parked and queued) and
/// says how many went from each place.
pub async fn purge(
    State(s): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(key) = path?;
    check_name("key", &key)?;
    let p = bounded("purging", PURGE_TIMEOUT, s.inspect.purge(&key)).await?;
    tracing::info!(
        key,
        held = p.held,
        parked = p.parked,
        queued = p.queued,
        "purged a key's pending jobs through the admin API"
    );
    Ok(Json(json!({
        "key": key,
        "held": p.held,
        "parked": p.parked,
        "queued": p.queued,
        "total": p.total(),
    })))
}
