//! The group as one member sees it, built from the `WEIR_CLUSTER` bucket's watcher: who is a
//! member and who holds each partition's lease.

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

/// What a watcher entry changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A heartbeat or a renewal: same members, same holders.
    Nothing,
    /// A member came or went.
    Members,
    /// Partition `p`'s lease changed hands (claimed, handed back, expired).
    Lease(u16),
}

/// The group, from the watcher.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub members: BTreeMap<String, MemberInfo>,
    pub leases: BTreeMap<u16, Lease>,
}

impl View {
    /// Applies one watcher entry, and says what it changed: heartbeats and renewals change
    /// nothing the plan depends on.
    pub fn apply(&mut self, e: &Entry) -> Change {
        if let Some(name) = e.key.strip_prefix(MEMBERS) {
            let known = self.members.contains_key(name);
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
            return if known == self.members.contains_key(name) {
                Change::Nothing
            } else {
                Change::Members
            };
        }
        let Some(p) = e
            .key
            .strip_prefix(LEASES)
            .and_then(|p| p.parse::<u16>().ok())
        else {
            return Change::Nothing;
        };
        let before = self.leases.get(&p).map(|l| l.holder.clone());
        match e.operation {
            Operation::Put => match serde_json::from_slice::<Holder>(&e.value) {
                Ok(holder) => {
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
            Operation::Delete | Operation::Purge => {
                self.leases.remove(&p);
            }
        }
        if before.as_ref() == self.leases.get(&p).map(|l| &l.holder) {
            Change::Nothing
        } else {
            Change::Lease(p)
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: &str, revision: u64, operation: Operation) -> Entry {
        Entry {
            bucket: "WEIR_CLUSTER".into(),
            key: key.into(),
            value: value.as_bytes().to_vec().into(),
            revision,
            delta: 0,
            created: time::OffsetDateTime::UNIX_EPOCH,
            operation,
            seen_current: true,
        }
    }

    #[test]
    fn renewals_and_heartbeats_change_nothing_the_plan_reads() {
        let mut v = View::default();
        let holder = r#"{"member":"a","incarnation":"1"}"#;
        let member = r#"{"name":"a","incarnation":"1","http":"h","joined_ms":0}"#;
        assert_eq!(
            v.apply(&entry("members.a", member, 1, Operation::Put)),
            Change::Members
        );
        assert_eq!(
            v.apply(&entry("members.a", member, 2, Operation::Put)),
            Change::Nothing
        );
        let lease = |rev, op| entry("partitions.3", holder, rev, op);
        assert_eq!(v.apply(&lease(3, Operation::Put)), Change::Lease(3));
        assert_eq!(v.apply(&lease(4, Operation::Put)), Change::Nothing);
        assert_eq!(v.leases[&3].revision, 4);
        assert_eq!(v.owner_of(3).as_deref(), Some("member a at h"));
        assert!(!v.free(4).contains(&3));

        // Aged out (a marker): free, and not handed over cleanly.
        assert_eq!(v.apply(&lease(5, Operation::Purge)), Change::Lease(3));
        assert!(v.free(4).contains(&3));
        v.apply(&lease(6, Operation::Put));
        assert_eq!(v.apply(&lease(7, Operation::Delete)), Change::Lease(3));

        assert_eq!(
            v.apply(&entry("members.a", "", 8, Operation::Purge)),
            Change::Members
        );
        assert_eq!(
            v.apply(&entry("partitions.x", holder, 9, Operation::Put)),
            Change::Nothing
        );
    }
}
