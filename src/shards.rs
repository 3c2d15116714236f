//! The partitions this process runs now: starting a partition's task when the process gains it,
//! stopping it (and waiting until it has handed back what it held) when it loses it.
//!
//! Who decides is [`crate::cluster`] (or the static `owned_partitions` list); this module only
//! carries it out. A stopped partition's channel, stats and gauges are cleared, so nothing
//! this process reports double-counts a partition another process now runs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::inspect::{self, Registry};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::partition::{Links, Partition, PartitionStats};
use crate::scheduler::Caps;
use crate::streams::{self, Topology};
use crate::trace::Tracing;

/// What a partition task needs, shared by all of them.
pub struct Deps {
    pub js: async_nats::jetstream::Context,
    pub topo: Topology,
    pub config: Config,
    pub limits: watch::Receiver<Arc<Limits>>,
    pub caps: watch::Receiver<Arc<Caps>>,
    pub metrics: Metrics,
    pub tracing: Tracing,
    pub registry: Arc<Registry>,
    /// Job status ([`crate::status`]).
    pub status: crate::status::StatusStore,
    pub tracker: TaskTracker,
    /// The process's shutdown: every partition's token is a child of it.
    pub cancel: CancellationToken,
}

/// A running partition task: its stop token and handle.
type Running = Option<(CancellationToken, JoinHandle<()>)>;

/// Starts and stops partition tasks. Cheap to clone.
#[derive(Clone)]
pub struct Shards {
    inner: Arc<Inner>,
}

struct Inner {
    deps: Deps,
    stats: Vec<Arc<PartitionStats>>,
    /// By partition: the running task's token and handle.
    running: Mutex<Vec<Running>>,
}

impl Shards {
    /// `stats`: one per partition, shared with [`crate::caps`].
    pub fn new(deps: Deps, stats: Vec<Arc<PartitionStats>>) -> Self {
        let n = deps.config.partitions as usize;
        assert_eq!(stats.len(), n, "one stats cell per partition");
        Shards {
            inner: Arc::new(Inner {
                stats,
                running: Mutex::new((0..n).map(|_| None).collect()),
                deps,
            }),
        }
    }

    /// Every partition's stats, by partition number (zeros for partitions not running here).
    /// The NATS client's counters (the group watches its connect count).
    pub fn nats_statistics(&self) -> Arc<async_nats::Statistics> {
        self.inner.deps.js.client().statistics()
    }

    pub fn stats(&self) -> &[Arc<PartitionStats>] {
        &self.inner.stats
    }

    /// The partitions running here.
    pub fn running(&self) -> Vec<u16> {
        let r = self.lock();
        (0..r.len() as u16)
            .filter(|&p| r[p as usize].is_some())
            .collect()
    }

    /// Starts partition `p`'s task (no-op if it runs already). `reset`: its previous owner
    /// died holding jobs; have them delivered again now.
    pub fn start(&self, p: u16, reset: bool) {
        let mut running = self.lock();
        if running[p as usize].is_some() {
            return;
        }
        let d = &self.inner.deps;
        let (tx, rx) = inspect::channel();
        // Registered before the task reads its first limits: a change in between is forwarded.
        d.registry.set(p, Some(tx));
        let token = d.cancel.child_token();
        let (js, jobs, park) = (d.js.clone(), d.topo.jobs.clone(), d.topo.park.clone());
        let (config, limits, caps) = (d.config.clone(), d.limits.clone(), d.caps.clone());
        let (metrics, tracing) = (d.metrics.partition(p), d.tracing.clone());
        let status = d.status.clone();
        let stats = self.inner.stats[p as usize].clone();
        let cancel = token.clone();
        let handle = d.tracker.spawn(async move {
            let name = streams::partition_consumer(p);
            let filter = vec![crate::job::partition_filter(p)];
            let consumer = loop {
                match streams::consumer(&jobs, &name, filter.clone(), &config).await {
                    Ok(c) => break c,
                    Err(e) => {
                        tracing::warn!(partition = p, error = %e, "cannot get the partition's consumer; retrying");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            };
            let links = Links {
                js,
                park,
                limits: limits.borrow().clone(),
                caps: caps.borrow().clone(),
                commands: rx,
                stats,
                metrics,
                tracing,
                status,
            };
            Partition::new(p, links, &config)
                .run(consumer, cancel, reset)
                .await;
        });
        running[p as usize] = Some((token, handle));
        tracing::info!(partition = p, reset, "partition started");
    }

    /// Stops partition `p`: from now on it releases nothing new; the future completes (with
    /// `p`) once its publishes in flight are settled and its held jobs handed back.
    pub fn stop(&self, p: u16) -> BoxFuture<'static, u16> {
        let run = self.lock()[p as usize].take();
        let this = self.clone();
        Box::pin(async move {
            if let Some((token, handle)) = run {
                token.cancel();
                if let Err(e) = handle.await {
                    tracing::error!(partition = p, error = %e, "partition task failed");
                }
                let running = this.lock();
                if running[p as usize].is_none() {
                    this.inner.deps.registry.set(p, None);
                }
                tracing::info!(partition = p, "partition stopped");
            }
            p
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Running>> {
        self.inner.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}
