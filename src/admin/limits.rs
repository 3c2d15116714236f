//! `/v1/limits`: read and change the `WEIR_LIMITS` bucket.
//!
//! Each named kind (keys, destinations, patterns) has `GET`, `PUT` and `DELETE` on
//! `/v1/limits/<kind>/<name>`; the default has `GET` and `PUT` (deleting it would leave the
//! config file's default in force, which `PUT` expresses as well). A `PUT` answers with the
//! limit as stored and its bucket revision. Every Weir process watching the bucket applies it
//! within moments; `GET /v1/limits` reports `applied_revision`, the newest revision this
//! process has applied, so a script can wait until its change is in force here.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::{bounded, NATS_TIMEOUT};
use super::{AdminState, ApiError};
use crate::job;
use crate::limits::store::Stored;
use crate::limits::{Entry, LimitJson};

/// A stored limit as the API and `weir limits` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitEntry {
    /// `default`, `key`, `pattern` or `destination`.
    pub kind: String,
    /// The key, destination or pattern name; none for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The glob, for a pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    pub rate: String,
    pub burst: u32,
    /// A rate of zero: the jobs are kept, none leaves.
    pub paused: bool,
    /// The bucket revision of this value.
    pub revision: u64,
}

impl LimitEntry {
    pub fn of(s: &Stored) -> Self {
        LimitEntry {
            kind: s.entry.kind().to_string(),
            name: entry_name(&s.entry).map(str::to_string),
            pattern: s.pattern.clone(),
            rate: s.limit.rate.to_string(),
            burst: s.limit.burst,
            paused: s.limit.rate.is_paused(),
            revision: s.revision,
        }
    }
}

/// The name in an entry; `None` for the default.
pub fn entry_name(e: &Entry) -> Option<&str> {
    match e {
        Entry::Default => None,
        Entry::Key(n) | Entry::Pattern(n) | Entry::Destination(n) => Some(n),
    }
}

/// A kind of named limit; the handlers are generic over it so each route is a plain function.
pub trait Named: Send + Sync + 'static {
    /// How the API names one: `key`, `destination`, `pattern`.
    const WHAT: &'static str;
    fn entry(name: String) -> Entry;
}

pub struct Keys;
pub struct Destinations;
pub struct Patterns;

impl Named for Keys {
    const WHAT: &'static str = "key";
    fn entry(name: String) -> Entry {
        Entry::Key(name)
    }
}

impl Named for Destinations {
    const WHAT: &'static str = "destination";
    fn entry(name: String) -> Entry {
        Entry::Destination(name)
    }
}

impl Named for Patterns {
    const WHAT: &'static str = "pattern";
    fn entry(name: String) -> Entry {
        Entry::Pattern(name)
    }
}

/// Checks a name from the path: keys and destinations are subject tokens, and pattern names
/// obey the same rule (they are bucket keys).
fn named<N: Named>(path: Result<Path<String>, PathRejection>) -> Result<Entry, ApiError> {
    let Path(name) = path?;
    check_name(N::WHAT, &name)?;
    Ok(N::entry(name))
}

/// A 400 for a name that cannot be a key, destination or pattern name.
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    job::check_token(name).map_err(|e| {
        ApiError::bad_request(format!(
            "{what} {name:?} {e}: use 1 to 256 bytes without '.', '*', '>', whitespace or control characters"
        ))
    })
}

/// `GET /v1/limits`: every stored limit, in bucket-key order.
pub async fn list(State(s): State<AdminState>) -> Result<Json<Value>, ApiError> {
    let stored = bounded("listing WEIR_LIMITS", NATS_TIMEOUT, s.limits.list()).await?;
    let limits: Vec<LimitEntry> = stored.iter().map(LimitEntry::of).collect();
    Ok(Json(json!({
        "limits": limits,
        "applied_revision": s.inspect.limits().revision,
    })))
}

pub async fn get<N: Named>(
    State(s): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<LimitEntry>, ApiError> {
    read(&s, named::<N>(path)?).await
}

pub async fn put<N: Named>(
    State(s): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<LimitJson>, JsonRejection>,
) -> Result<Json<LimitEntry>, ApiError> {
    let entry = named::<N>(path)?;
    write(&s, entry, body?.0).await
}

pub async fn delete<N: Named>(
    State(s): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let entry = named::<N>(path)?;
    if !bounded("deleting a limit", NATS_TIMEOUT, s.limits.delete(&entry)).await? {
        return Err(ApiError::not_found(missing(&s, &entry)));
    }
    Ok(Json(json!({
        "deleted": true,
        "kind": entry.kind(),
        "name": entry_name(&entry),
    })))
}

pub async fn get_default(State(s): State<AdminState>) -> Result<Json<LimitEntry>, ApiError> {
    read(&s, Entry::Default).await
}

pub async fn put_default(
    State(s): State<AdminState>,
    body: Result<Json<LimitJson>, JsonRejection>,
) -> Result<Json<LimitEntry>, ApiError> {
    write(&s, Entry::Default, body?.0).await
}

async fn read(s: &AdminState, entry: Entry) -> Result<Json<LimitEntry>, ApiError> {
    match bounded("reading a limit", NATS_TIMEOUT, s.limits.get_entry(&entry)).await? {
        Some(stored) => Ok(Json(LimitEntry::of(&stored))),
        None => Err(ApiError::not_found(missing(s, &entry))),
    }
}

/// Validates and stores; answers with the limit as Weir reads it (rate normalised, the burst's
/// default filled in) and its revision.
async fn write(
    s: &AdminState,
    entry: Entry,
    json: LimitJson,
) -> Result<Json<LimitEntry>, ApiError> {
    let (limit, pattern) = json
        .check()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    // `put` checks what `check` cannot: a pattern needs a glob, and only a pattern may have one.
    let revision = bounded("storing a limit", NATS_TIMEOUT, s.limits.put(&entry, &json)).await?;
    tracing::info!(entry = %entry.kv_key(), rate = %limit.rate, burst = limit.burst, revision, "limit set through the admin API");
    Ok(Json(LimitEntry::of(&Stored {
        entry,
        limit,
        pattern,
        revision,
    })))
}

/// Why there is nothing at `entry`, and what is in force instead.
fn missing(s: &AdminState, entry: &Entry) -> String {
    let limits = s.inspect.limits();
    match entry {
        Entry::Key(k) => {
            let (l, source) = limits.resolve(k);
            format!(
                "no limit stored for key {k:?}: it gets {} burst {} from {source}; set one with PUT /v1/limits/keys/{k}",
                l.rate, l.burst
            )
        }
        Entry::Destination(d) => format!(
            "no limit stored for destination {d:?}: its keys share no cap; set one with PUT /v1/limits/destinations/{d}"
        ),
        Entry::Pattern(n) => {
            format!("no pattern named {n:?}; GET /v1/limits lists the stored ones")
        }
        Entry::Default => {
            let l = limits.default_limit();
            format!(
                "no default stored in WEIR_LIMITS: the config file's {} burst {} is in force; set one with PUT /v1/limits/default",
                l.rate, l.burst
            )
        }
    }
}
