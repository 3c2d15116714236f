//! Wiring: topology, partition tasks, triage, admin listener, and a bounded shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::limits::{store::Store, Limits};
use crate::metrics::Metrics;
use crate::partition::{Links, Partition, PartitionStats};
use crate::trace::Tracing;
use crate::{admin, dead, inspect, streams};

/// Why Weir stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error(transparent)]
    Topology(#[from] streams::TopologyError),
    #[error(transparent)]
    Limits(#[from] crate::limits::store::StoreError),
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("cannot set up tracing: {0}")]
    Trace(#[from] crate::trace::TraceError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Connects to NATS with settings fit for a long-running service (retry forever on reconnect).
pub async fn connect(url: &str) -> Result<async_nats::Client, RunError> {
    async_nats::ConnectOptions::new()
        .name("weir")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(url)
        .await
        .map_err(|source| RunError::Connect {
            url: url.to_string(),
            source,
        })
}

/// The JetStream context Weir publishes with: room for every partition's publish window (plus
/// the triage's) in async-nats' ack semaphore, and waiting, not failing, when it is full.
pub fn context(client: &async_nats::Client, partitions: u16, window: usize) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .max_ack_inflight(window * (partitions as usize + 1) + 1024)
        .backpressure_on_inflight(true)
        .build(client.clone())
}

/// Runs Weir until `shutdown` completes, then drains within `config.shutdown_grace`.
pub async fn run(
    config: Config,
    client: async_nats::Client,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let js = context(&client, config.partitions, config.publish_window as usize);
    let topo = streams::ensure(&js, &config).await?;
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let metrics = Metrics::install("weir")?;
    let traces = Tracing::install("weir")?;
    let store = Store::open(&js, &config).await?;
    let m = metrics.clone();
    let (limits, watcher) = store
        .clone()
        .watch(
            Limits::base(&config),
            Duration::from_secs(5),
            move |change| match change {
                Ok(entry) => m.limit_update_applied(entry.kind()),
                Err(_) => m.limit_update_rejected(),
            },
            cancel.clone(),
        )
        .await;

    let owned = &config.owned_partitions;
    let stats: Vec<Arc<PartitionStats>> = owned.iter().map(|_| Arc::default()).collect();
    let (caps, caps_task) = crate::caps::follow(
        limits.clone(),
        stats.clone(),
        config.owned_partitions.len() as f64 / f64::from(config.partitions),
        client.clone(),
        cancel.clone(),
    );
    let mut senders = vec![None; config.partitions as usize];
    let mut receivers = Vec::with_capacity(owned.len());
    for &p in owned {
        let (tx, rx) = inspect::channel();
        senders[p as usize] = Some(tx);
        receivers.push(rx);
    }
    // Before the partitions read their initial limits: a change in between is then forwarded
    // (applying a table twice is harmless).
    tracker.spawn(inspect::forward(
        limits.clone(),
        caps.clone(),
        senders.iter().flatten().cloned().collect(),
        cancel.clone(),
    ));
    let inspect = inspect::Partitions::new(
        senders,
        topo.jobs.clone(),
        topo.released.clone(),
        topo.dead.clone(),
        limits.clone(),
    );
    let state = admin::AdminState {
        client: client.clone(),
        partitions: Arc::new(stats.clone()),
        inspect,
        limits: store.clone(),
        admin_token: config.admin_token.clone(),
    };
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map_err(|source| RunError::Listen {
            addr: config.http_addr,
            source,
        })?;
    let http_cancel = cancel.clone();
    let http_metrics = metrics.clone();
    tracker.spawn(async move {
        let router = admin::router(state).merge(crate::metrics::router(http_metrics));
        let serve =
            axum::serve(listener, router).with_graceful_shutdown(http_cancel.cancelled_owned());
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "admin listener failed");
        }
    });

    for (i, (&p, commands)) in owned.iter().zip(receivers).enumerate() {
        let name = streams::partition_consumer(p);
        let consumer = streams::consumer(
            &topo.jobs,
            &name,
            vec![crate::job::partition_filter(p)],
            &config,
        )
        .await?;
        let links = Links {
            js: js.clone(),
            park: topo.park.clone(),
            limits: limits.borrow().clone(),
            caps: caps.borrow().clone(),
            commands,
            stats: stats[i].clone(),
            metrics: metrics.partition(p),
            tracing: traces.clone(),
        };
        let part = Partition::new(p, links, &config);
        tracker.spawn(part.run(consumer, cancel.clone()));
    }
    let triage = streams::consumer(
        &topo.jobs,
        streams::TRIAGE_CONSUMER,
        streams::triage_filters(),
        &config,
    )
    .await?;
    tracker.spawn(dead::triage(
        js.clone(),
        triage,
        metrics.unpartitioned(),
        cancel.clone(),
    ));
    tracing::info!(partitions = config.partitions, http = %config.http_addr, "weir is running");

    shutdown.await;
    tracing::info!(grace = ?config.shutdown_grace, "shutting down");
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; unacked jobs will be redelivered");
    }
    metrics.shutdown();
    traces.shutdown();
    watcher.abort();
    caps_task.abort();
    if let Err(e) = client.drain().await {
        tracing::warn!(error = %e, "draining the NATS connection failed");
    }
    Ok(())
}
