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

/// `GET /v1/cluster`.
#[derive(Debug, Clone, Deserialize)]
pub struct Cluster {
    pub mode: String,
    #[serde(rename = "self")]
    pub me: String,
    pub members: Vec<Member>,
    pub assignment: Vec<PartitionOwner>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Member {
    pub name: String,
    pub http: String,
    pub partitions: Vec<u16>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PartitionOwner {
    pub partition: u16,
    pub owner: Option<String>,
    pub held: u64,
    pub parked: u64,
    pub lag: Option<u64>,
    pub ack_pending: Option<u64>,
}

/// Partition numbers as ranges: `0-3,8,10-11`.
pub fn ranges(ps: &[u16]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ps.len() {
        let mut j = i;
        while j + 1 < ps.len() && ps[j + 1] == ps[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            ps[i].to_string()
        } else {
            format!("{}-{}", ps[i], ps[j])
        });
        i = j + 1;
    }
    out.join(",")
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

#[cfg(test)]
mod tests {
    #[test]
    fn partition_lists_read_as_ranges() {
        assert_eq!(super::ranges(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(super::ranges(&[5]), "5");
        assert_eq!(super::ranges(&[]), "");
    }
}
