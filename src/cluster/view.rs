//! The group as one member sees it, built from the `WEIR_CLUSTER` bucket's watcher: who is a
//! member, who holds each partition's lease, and how each free partition's last lease ended.

use std::collections::{BTreeMap, BTreeSet};

use async_nats::jetstream::kv::{Entry, Operation};
use serde::{Deserialize, Serialize};

/// Key prefix of member heartbeats: `members.<name>`.
pub const MEMBERS: &str = "members.";
/// Key prefix of partition leases: `partitions.<p>`.
pub const LEASES: &str = "partitions.";

/// One run of a process: its name and a random incarnation, so a restarted process under the
/// same name is told apart from its predecessor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub member: String,
    pub incarnation: String,
}

/// What a member says about itself on every heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemberInfo {
    pub name: String,
    pub incarnation: String,
    /// Its admin API address, as configured.
    pub http: String,
    /// When it joined (Unix ms), for operators.
    pub joined_ms: u64,
    /// Per partition it runs: jobs held, parked, and not yet read from `WEIR_JOBS`.
    #[serde(default)]
    pub backlog: BTreeMap<u16, Backlog>,
}

/// One partition's backlog, as its owner last reported it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Backlog {
    pub held: u64,
    pub parked: u64,
    pub lag: u64,
}

/// A lease as seen in the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: Holder,
    pub revision: u64,
}

/// The group, from the watcher.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub members: BTreeMap<String, MemberInfo>,
    pub leases: BTreeMap<u16, Lease>,
    /// For partitions without a lease: `true` if the last one was deleted by its holder (a clean
    /// hand-over), `false` if it expired (the holder died or lost NATS).
    pub ended_cleanly: BTreeMap<u16, bool>,
}

impl View {
    /// Applies one watcher entry; `Some(p)` when it changed partition `p`'s lease.
    pub fn apply(&mut self, e: &Entry) -> Option<u16> {
        if let Some(name) = e.key.strip_prefix(MEMBERS) {
            match e.operation {
                Operation::Put => match serde_json::from_slice::<MemberInfo>(&e.value) {
                    Ok(info) => {
                        self.members.insert(name.to_string(), info);
                    }
                    Err(err) => {
                        tracing::warn!(key = e.key, error = %err, "ignoring a malformed member entry")
                    }
                },
                Operation::Delete | Operation::Purge => {
                    self.members.remove(name);
                }
            }
            return None;
        }
        let p: u16 = e.key.strip_prefix(LEASES)?.parse().ok()?;
        match e.operation {
            Operation::Put => match serde_json::from_slice::<Holder>(&e.value) {
                Ok(holder) => {
                    self.ended_cleanly.remove(&p);
                    self.leases.insert(
                        p,
                        Lease {
                            holder,
                            revision: e.revision,
                        },
                    );
                }
                Err(err) => {
                    tracing::warn!(key = e.key, error = %err, "ignoring a malformed lease entry")
                }
            },
            op => {
                self.leases.remove(&p);
                self.ended_cleanly.insert(p, op == Operation::Delete);
            }
        }
        Some(p)
    }

    /// Partitions below `partitions` with no lease.
    pub fn free(&self, partitions: u16) -> BTreeSet<u16> {
        (0..partitions)
            .filter(|p| !self.leases.contains_key(p))
            .collect()
    }

    /// Who holds `p`'s lease, for error messages: `member <name> at <admin address>`.
    pub fn owner_of(&self, p: u16) -> Option<String> {
        let lease = self.leases.get(&p)?;
        let http = self
            .members
            .get(&lease.holder.member)
            .map(|m| format!(" at {}", m.http))
            .unwrap_or_default();
        Some(format!("member {}{http}", lease.holder.member))
    }
}

/// What `GET /v1/cluster` answers.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// `group` (dynamic ownership) or `static` (`owned_partitions`).
    pub mode: &'static str,
    /// The member answering.
    #[serde(rename = "self")]
    pub me: String,
    pub partitions: u16,
    pub lease_ms: u64,
    pub members: Vec<MemberStatus>,
    pub assignment: Vec<PartitionStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    pub name: String,
    pub incarnation: String,
    pub http: String,
    pub joined_ms: u64,
    pub partitions: Vec<u16>,
}

/// One partition: its owner, the backlog it reported, and the consumer's figures from JetStream.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub partition: u16,
    pub owner: Option<String>,
    pub held: u64,
    pub parked: u64,
    /// Jobs in `WEIR_JOBS` not yet delivered to Weir (`null` when JetStream did not answer).
    pub lag: Option<u64>,
    /// Jobs delivered and not yet acked (held, or in flight).
    pub ack_pending: Option<u64>,
}

impl Status {
    /// The status from a view; consumer figures are filled in by the caller.
    pub fn from_view(view: &View, me: &str, partitions: u16, lease_ms: u64) -> Status {
        let members = view
            .members
            .values()
            .map(|m| MemberStatus {
                name: m.name.clone(),
                incarnation: m.incarnation.clone(),
                http: m.http.clone(),
                joined_ms: m.joined_ms,
                partitions: view
                    .leases
                    .iter()
                    .filter(|(_, l)| l.holder.member == m.name)
                    .map(|(p, _)| *p)
                    .collect(),
            })
            .collect();
        let assignment = (0..partitions)
            .map(|p| {
                let owner = view.leases.get(&p).map(|l| l.holder.member.clone());
                let b = owner
                    .as_ref()
                    .and_then(|o| view.members.get(o))
                    .and_then(|m| m.backlog.get(&p).copied())
                    .unwrap_or_default();
                PartitionStatus {
                    partition: p,
                    owner,
                    held: b.held,
                    parked: b.parked,
                    lag: None,
                    ack_pending: None,
                }
            })
            .collect();
        Status {
            mode: "group",
            me: me.to_string(),
            partitions,
            lease_ms,
            members,
            assignment,
        }
    }
}
