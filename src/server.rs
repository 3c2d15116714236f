//! Wiring: topology, partition tasks, triage, admin listener, and a bounded shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::limits::{store::Store, Limits};
use crate::partition::{Partition, PartitionStats};
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
    let store = Store::open(&js, &config).await?;
    let (limits, watcher) = store
        .clone()
        .watch(
            Limits::base(&config),
            Duration::from_secs(5),
            |_| {},
            cancel.clone(),
        )
        .await;

    let stats: Vec<Arc<PartitionStats>> = (0..config.partitions).map(|_| Arc::default()).collect();
    let (senders, mut receivers): (Vec<_>, Vec<_>) =
        (0..config.partitions).map(|_| inspect::channel()).unzip();
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
    tracker.spawn(async move {
        let serve = axum::serve(listener, admin::router(state))
            .with_graceful_shutdown(http_cancel.cancelled_owned());
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "admin listener failed");
        }
    });

    for p in 0..config.partitions {
        let name = streams::partition_consumer(p);
        let consumer = streams::consumer(
            &topo.jobs,
            &name,
            vec![crate::job::partition_filter(p)],
            &config,
        )
        .await?;
        let part = Partition::new(
            p,
            js.clone(),
            topo.park.clone(),
            limits.clone(),
            receivers.remove(0),
            &config,
            stats[p as usize].clone(),
        );
        tracker.spawn(part.run(consumer, cancel.clone()));
    }
    let triage = streams::consumer(
        &topo.jobs,
        streams::TRIAGE_CONSUMER,
        streams::triage_filters(),
        &config,
    )
    .await?;
    tracker.spawn(dead::triage(js.clone(), triage, cancel.clone()));
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
    watcher.abort();
    if let Err(e) = client.drain().await {
        tracing::warn!(error = %e, "draining the NATS connection failed");
    }
    Ok(())
}
