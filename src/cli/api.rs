//! The admin API's answers as the commands read them, and how they print.
//!
//! Only the fields the commands show are read (serde ignores the rest), so a newer Weir that
//! adds fields still works with an older CLI.

use serde::Deserialize;

/// `GET /readyz`.
#[derive(Debug, Clone, Deserialize)]
pub struct Ready {
    pub ready: bool,
    pub nats_connected: bool,
    pub partitions_bound: u64,
    pub partitions: u64,
}

/// A limit and where it came from (`key`, `pattern:<name>`, `default`).
#[derive(Debug, Clone, Deserialize)]
pub struct Limit {
    pub rate: String,
    pub burst: u64,
    pub source: String,
}

impl Limit {
    /// `40/s burst 10`.
    pub fn short(&self) -> String {
        format!("{} burst {}", self.rate, self.burst)
    }
}

/// One key of `GET /v1/keys`.
#[derive(Debug, Clone, Deserialize)]
pub struct TopKey {
    pub key: String,
    pub held: u64,
    pub parked: u64,
    pub backlog: u64,
    pub next_release_in_ms: Option<u64>,
    pub paused: bool,
    pub offered: u64,
    pub released: u64,
    pub limit: Limit,
}

/// `GET /v1/keys`.
#[derive(Debug, Clone, Deserialize)]
pub struct Top {
    pub keys: Vec<TopKey>,
}

/// `GET /v1/keys/{key}`.
#[derive(Debug, Clone, Deserialize)]
pub struct KeyStatus {
    pub key: String,
    pub partition: u64,
    pub held: u64,
    pub parked: u64,
    pub backlog: u64,
    pub next_release_in_ms: Option<u64>,
    pub next_release_at: Option<u64>,
    pub paused: bool,
    pub offered: u64,
    pub released: u64,
    pub limit: Limit,
    pub released_stored: u64,
    pub dead: u64,
}

/// When the next job leaves: `in 25 ms`, `paused`, or `-` with no backlog.
pub fn next_release(in_ms: Option<u64>, paused: bool, backlog: u64) -> String {
    match in_ms {
        _ if paused => "paused".into(),
        Some(ms) if ms < 10_000 => format!("in {ms} ms"),
        Some(ms) => format!("in {:.1} s", ms as f64 / 1000.0),
        None if backlog > 0 => "now".into(),
        None => "-".into(),
    }
}
