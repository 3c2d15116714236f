//! `GET /v1/cluster`: the group's members, which partitions each runs, and each partition's
//! backlog (held and parked, as its owner last reported) and lag (from JetStream).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use async_nats::jetstream::stream::Stream;
use axum::extract::State;
use axum::Json;
use tokio::sync::watch;

use super::error::{bounded, ApiError, NATS_TIMEOUT};
use super::AdminState;
use crate::cluster::view::{MemberStatus, PartitionStatus, Status, View};
use crate::shards::Shards;
use crate::streams;

/// What `/v1/cluster` and `/readyz` need to know about ownership.
#[derive(Clone)]
pub struct Ownership {
    /// The group's view; `None` with a static `owned_partitions` list.
    pub view: Option<watch::Receiver<Arc<View>>>,
    pub me: String,
    pub http: String,
    pub lease_ms: u64,
    pub shards: Shards,
    /// The group has made its first assignment (always true when static).
    pub ready: Arc<AtomicBool>,
    pub jobs: Stream,
}

impl Ownership {
    /// Joined, and every partition this process runs has its consumer bound.
    pub fn ready(&self) -> (bool, usize, usize) {
        let running = self.shards.running();
        let stats = self.shards.stats();
        let bound = running
            .iter()
            .filter(|&&p| stats[p as usize].bound.load(Relaxed))
            .count();
        let ready = self.ready.load(Relaxed) && bound == running.len();
        (ready, bound, running.len())
    }

    /// The answer of `/v1/cluster`, with each partition's consumer figures.
    pub async fn status(&self) -> Result<Status, ApiError> {
        let partitions = self.shards.stats().len() as u16;
        let mut status = match &self.view {
            Some(v) => Status::from_view(&v.borrow(), &self.me, partitions, self.lease_ms),
            None => self.static_status(partitions),
        };
        let infos = futures::future::join_all(status.assignment.iter().map(|a| {
            let jobs = self.jobs.clone();
            async move {
                let name = streams::partition_consumer(a.partition);
                let mut c = jobs
                    .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&name)
                    .await
                    .ok()?;
                let i = c.info().await.ok()?;
                Some((i.num_pending, i.num_ack_pending as u64))
            }
        }));
        let infos = bounded("reading the partitions' consumers", NATS_TIMEOUT, async {
            Ok::<_, ApiError>(infos.await)
        })
        .await?;
        for (a, i) in status.assignment.iter_mut().zip(infos) {
            a.lag = i.map(|i| i.0);
            a.ack_pending = i.map(|i| i.1);
        }
        Ok(status)
    }

    fn static_status(&self, partitions: u16) -> Status {
        let running = self.shards.running();
        let stats = self.shards.stats();
        Status {
            mode: "static",
            me: self.me.clone(),
            partitions,
            lease_ms: 0,
            members: vec![MemberStatus {
                name: self.me.clone(),
                incarnation: String::new(),
                http: self.http.clone(),
                joined_ms: 0,
                partitions: running.clone(),
            }],
            assignment: (0..partitions)
                .map(|p| {
                    let s = &stats[p as usize];
                    PartitionStatus {
                        partition: p,
                        owner: running.contains(&p).then(|| self.me.clone()),
                        held: s.held.load(Relaxed),
                        parked: s.parked.load(Relaxed),
                        lag: None,
                        ack_pending: None,
                    }
                })
                .collect(),
        }
    }
}

/// `GET /v1/cluster`.
pub async fn get(State(s): State<AdminState>) -> Result<Json<Status>, ApiError> {
    Ok(Json(s.ownership.status().await?))
}
