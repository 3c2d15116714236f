//! Opening `WEIR_CLUSTER` and joining the group: a name clash is refused, and a dead
//! predecessor's leases (same name, older incarnation) are taken over at once.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::Context;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::view::{Holder, MemberInfo, View, LEASES, MEMBERS};
use super::{nats, ClusterError, Group, Held, BUCKET};
use crate::config::Config;
use crate::shards::Shards;

/// Opens `WEIR_CLUSTER`, creating it with `max_age = config.lease` if missing. Returns the
/// bucket and the lease time it actually has (the bucket's, if it existed).
pub async fn open(js: &Context, config: &Config) -> Result<(kv::Store, Duration), ClusterError> {
    let kv = match js.get_key_value(BUCKET).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: BUCKET.into(),
                description: "Weir: group members and partition leases".into(),
                history: 1,
                max_age: config.lease,
                // Aged-out entries leave a marker, so watchers see a lease expire.
                limit_markers: Some(config.lease),
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                nats("bucket creation")(format!("{e} (the group needs nats-server 2.11 or newer)"))
            })?,
    };
    let status = kv
        .status()
        .await
        .map_err(|e| nats("status")(e.to_string()))?;
    let lease = status.max_age();
    // Without markers a lease that ages out is never seen by the watchers: a dead member's
    // partitions would wait forever.
    if lease.is_zero() || status.info.config.subject_delete_marker_ttl.is_none() {
        return Err(ClusterError::Bucket(format!(
            "max_age {lease:?}, markers {:?}",
            status.info.config.subject_delete_marker_ttl
        )));
    }
    if lease != config.lease {
        tracing::warn!(bucket = ?lease, config = ?config.lease, "{BUCKET} exists with another lease time; using the bucket's");
    }
    Ok((kv, lease))
}

/// How many members the bucket lists now (before this process joins).
pub async fn member_count(kv: &kv::Store) -> usize {
    match kv.keys().await {
        Ok(keys) => {
            keys.filter(|k| {
                futures::future::ready(k.as_ref().is_ok_and(|k| k.starts_with(MEMBERS)))
            })
            .count()
            .await
        }
        Err(_) => 0,
    }
}

impl Group {
    /// Joins the group as `config.member`. If the name's previous run left a heartbeat that is
    /// not renewed within `lease / 4`, its leases are taken over at once.
    pub async fn join(
        kv: kv::Store,
        lease: Duration,
        config: &Config,
        shards: Shards,
    ) -> Result<Group, ClusterError> {
        let me = Holder {
            member: config.member.clone(),
            incarnation: format!("{:012x}", rand::random::<u64>() >> 16),
        };
        let key = format!("{MEMBERS}{}", me.member);
        let before = kv
            .entry(&key)
            .await
            .map_err(|e| nats("read")(e.to_string()))?;
        let predecessor = match before {
            Some(e) if e.operation == Operation::Put => {
                tokio::time::sleep(lease / 4).await;
                let now = kv
                    .entry(&key)
                    .await
                    .map_err(|e| nats("read")(e.to_string()))?;
                if now.is_some_and(|n| n.revision != e.revision && n.operation == Operation::Put) {
                    return Err(ClusterError::NameInUse(me.member));
                }
                serde_json::from_slice::<MemberInfo>(&e.value).ok()
            }
            _ => None,
        };
        let info = MemberInfo {
            name: me.member.clone(),
            incarnation: me.incarnation.clone(),
            http: config.http_addr.to_string(),
            joined_ms: crate::release::unix_ms(),
            backlog: BTreeMap::new(),
        };
        let nats = shards.nats_statistics();
        let mut group = Group {
            kv,
            me,
            info,
            lease,
            partitions: config.partitions,
            shards,
            view: View::default(),
            held: BTreeMap::new(),
            stopping: FuturesUnordered::new(),
            ready: Arc::new(AtomicBool::new(false)),
            published: watch::channel(Arc::new(View::default())).0,
            connects: nats.connects.load(std::sync::atomic::Ordering::Relaxed),
            nats,
        };
        group.heartbeat().await?;
        if let Some(old) = predecessor {
            group.adopt(&old.incarnation).await;
        }
        tracing::info!(member = group.me.member, incarnation = group.me.incarnation, lease = ?lease, "joined the group");
        Ok(group)
    }

    /// Takes over the leases a dead predecessor of the same name held.
    pub(super) async fn adopt(&mut self, incarnation: &str) {
        let Ok(keys) = self.kv.keys().await else {
            return;
        };
        let keys: Vec<String> = keys.filter_map(|k| async { k.ok() }).collect().await;
        for k in keys.iter().filter(|k| k.starts_with(LEASES)) {
            let Some(p) = k[LEASES.len()..].parse::<u16>().ok() else {
                continue;
            };
            let Ok(Some(e)) = self.kv.entry(k).await else {
                continue;
            };
            let ours = serde_json::from_slice::<Holder>(&e.value)
                .is_ok_and(|h| h.member == self.me.member && h.incarnation == incarnation);
            if e.operation == Operation::Put && ours {
                let sent = Instant::now();
                if let Ok(rev) = self.kv.update(k, self.holder_value(), e.revision).await {
                    tracing::info!(
                        partition = p,
                        "took over a partition from this member's previous run"
                    );
                    self.held.insert(
                        p,
                        Held {
                            revision: rev,
                            renewed: sent,
                            stopping: false,
                        },
                    );
                    self.shards.start(p, true);
                }
            }
        }
    }
}
