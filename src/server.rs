//! Wiring: topology, limits, the group (or a static partition list), triage, admin listener,
//! and a bounded shutdown.

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::{self, Group};
use crate::config::{Config, NatsSettings};
use crate::limits::{store::Store, Limits};
use crate::metrics::Metrics;
use crate::partition::PartitionStats;
use crate::shards::{Deps, Shards};
use crate::trace::Tracing;
use crate::{admin, dead, inspect, sharq, streams};

/// Why Weir stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    /// NATS refused Weir's credentials or the TLS handshake failed: retrying will not help.
    #[error("NATS at {url} refused the connection: {source}; {fix}")]
    Refused {
        url: String,
        source: async_nats::ConnectError,
        fix: &'static str,
    },
    #[error("cannot use nats.creds_file: {0}")]
    Credentials(std::io::Error),
    #[error(transparent)]
    Topology(#[from] streams::TopologyError),
    #[error(transparent)]
    Limits(#[from] crate::limits::store::StoreError),
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("cannot set up tracing: {0}")]
    Trace(#[from] crate::trace::TraceError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error(transparent)]
    Purges(#[from] crate::purges::PurgesError),
    #[error("cannot set up job status: {0}; check that the NATS account allows another KV bucket, or set job_status_retention = \"0\"")]
    Status(#[from] crate::status::StatusError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Connects to NATS with settings fit for a long-running service (retry forever on reconnect),
/// without credentials or TLS settings (those in the URL still apply).
pub async fn connect(url: &str) -> Result<async_nats::Client, RunError> {
    connect_with(url, &NatsSettings::default()).await
}

/// Connects to NATS with the `[nats]` settings (authentication, TLS).
///
/// The first attempt is made once: if NATS refuses the credentials or the TLS handshake fails,
/// this returns [`RunError::Refused`] at once, since waiting will not mend a wrong password or
/// CA. If NATS is not reachable yet, the client keeps trying in the background (a service may
/// start before its NATS), as it does after any later disconnect.
pub async fn connect_with(url: &str, nats: &NatsSettings) -> Result<async_nats::Client, RunError> {
    let shown = crate::config::nats::redact_url(url);
    let options = || async {
        nats.options("weir")
            .await
            .map(|o| {
                o.max_reconnects(None)
                    .reconnect_delay_callback(reconnect_delay)
            })
            .map_err(RunError::Credentials)
    };
    match options().await?.connect(url).await {
        Ok(client) => return Ok(client),
        Err(source) => {
            use async_nats::ConnectErrorKind as K;
            let fix = match source.kind() {
                K::Authentication | K::AuthorizationViolation => {
                    "check nats.creds_file, nats.nkey_file or nats.user and WEIR_NATS_PASSWORD against the server's users"
                }
                K::Tls => TLS_FIX,
                // TLS failures after the TCP connect arrive as I/O errors carrying rustls' error.
                K::Io => match tls_failure(&source) {
                    Some(TlsFailure::ClientCertificate) => {
                        "the server wants a client certificate its CA signed: set nats.tls_cert_file and nats.tls_key_file"
                    }
                    Some(TlsFailure::Other) => TLS_FIX,
                    None => "",
                },
                K::ServerParse => return Err(RunError::Connect { url: shown, source }),
                _ => "",
            };
            if fix.is_empty() {
                tracing::warn!(url = %shown, error = %source, "NATS is not reachable yet; retrying until it is");
            }
            if !fix.is_empty() {
                return Err(RunError::Refused {
                    url: shown,
                    source,
                    fix,
                });
            }
        }
    }
    options()
        .await?
        .retry_on_initial_connect()
        .connect(url)
        .await
        .map_err(|source| RunError::Connect { url: shown, source })
}

/// The wait before reconnect attempt `attempts` (1-based): none for the first, then 50 ms
/// doubling to at most 500 ms, plus up to 100 ms of jitter so that many processes do not knock
/// in step.
///
/// async-nats' default doubles to 4 s: after a NATS restart of a few seconds a client could wait
/// up to 2-4 s more before it even tried, and with renewals missing that long Weir's leases fence
/// their partitions (`lease * 2 / 3`, 4 s by default) and a partition stays stopped until its
/// lease ages out. Measured in `weir chaos` with NATS away 2.2 s: the reconnect came 1.9 s after
/// the server was back and every process was ready again only after 8.2 s. A connect attempt to
/// a server that is down costs one refused TCP connect, so twice a second per process is cheap.
pub fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = (attempts - 2).min(4) as u32;
    let base = Duration::from_millis(50 * 2u64.pow(exp)).min(Duration::from_millis(500));
    base + Duration::from_millis(rand::random_range(0..100))
}

const TLS_FIX: &str = "check nats.tls_ca_file (the CA that signed the server's certificate), that the URL's host is named in that certificate, and nats.tls_required against the server's TLS settings";

enum TlsFailure {
    /// The server refused Weir's client certificate, or wanted one.
    ClientCertificate,
    Other,
}

/// The TLS failure inside an I/O connect error, if it is one (not "connection refused").
fn tls_failure(e: &async_nats::ConnectError) -> Option<TlsFailure> {
    use tokio_rustls::rustls::{AlertDescription as A, Error as E};
    let io = std::error::Error::source(e)?.downcast_ref::<std::io::Error>()?;
    let tls = io.get_ref()?.downcast_ref::<E>()?;
    Some(match tls {
        E::AlertReceived(A::CertificateRequired | A::BadCertificate | A::UnknownCA)
        | E::NoCertificatesPresented => TlsFailure::ClientCertificate,
        _ => TlsFailure::Other,
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
    // Bound first: a taken port fails the start before anything is spawned or joined.
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map_err(|source| RunError::Listen {
            addr: config.http_addr,
            source,
        })?;
    let sharq_listener = match config.sharq.listen {
        None => None,
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Listen { addr, source })?,
        ),
    };
    let cancel = CancellationToken::new();
    // A start that fails half-way stops what it has spawned (and leaves the group).
    let _stop_on_error = cancel.clone().drop_guard();
    let tracker = TaskTracker::new();
    let metrics = Metrics::install("weir")?;
    let traces = Tracing::install("weir")?;
    let store = Store::open(&js, &config).await?;
    let purges = crate::purges::Purges::open(&js, &config).await?;
    let (status, status_task) = crate::status::StatusStore::open(
        &js,
        &config,
        purges.clone(),
        metrics.job_status_dropped(),
    )
    .await?;
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

    let triage = streams::consumer(
        &topo.jobs,
        streams::TRIAGE_CONSUMER,
        streams::triage_filters(),
        &config,
    )
    .await?;
    let stats: Vec<Arc<PartitionStats>> = (0..config.partitions).map(|_| Arc::default()).collect();
    // The group's bucket first: the caps' starting share depends on how many members there are.
    let group_kv = match config.owned_partitions {
        None => Some(cluster::open(&js, &config).await?),
        Some(_) => None,
    };
    let static_share = match (&config.owned_partitions, &group_kv) {
        (Some(owned), _) => owned.len() as f64 / f64::from(config.partitions),
        (None, Some((kv, _))) => 1.0 / (cluster::member_count(kv).await + 1) as f64,
        (None, None) => 1.0,
    };
    let (caps, caps_task) = crate::caps::follow(
        limits.clone(),
        stats.clone(),
        static_share,
        client.clone(),
        cancel.clone(),
    );
    let registry = Arc::new(inspect::Registry::new(config.partitions));
    tracker.spawn(inspect::forward(
        limits.clone(),
        caps.clone(),
        registry.clone(),
        cancel.clone(),
    ));
    let shards = Shards::new(
        Deps {
            js: js.clone(),
            topo: topo.clone(),
            config: config.clone(),
            limits: limits.clone(),
            caps: caps.clone(),
            metrics: metrics.clone(),
            tracing: traces.clone(),
            registry: registry.clone(),
            status: status.clone(),
            tracker: tracker.clone(),
            cancel: cancel.clone(),
        },
        stats,
    );
    let (view, ready, lease) = own(&config, &shards, group_kv, &tracker, &cancel).await?;
    let owner_of: Option<inspect::OwnerOf> = view.clone().map(|v| {
        let f: inspect::OwnerOf = Arc::new(move |p| v.borrow().owner_of(p));
        f
    });
    let inspect = inspect::Partitions::new(
        registry,
        owner_of,
        topo.jobs.clone(),
        topo.released.clone(),
        topo.dead.clone(),
        limits.clone(),
        purges.clone(),
    );
    // The SHARQ API records queued, dequeued, finished, requeued and dead in the same store.
    let status_hook: Arc<dyn sharq::StatusHook> = Arc::new(status.clone());
    let publisher = sharq::Publisher::new(client.clone(), status_hook.clone(), purges);
    if let Some(listener) = sharq_listener {
        let dequeue = sharq::dequeue::Dequeue::new(
            topo.released.clone(),
            js.clone(),
            config.sharq.clone(),
            status_hook.clone(),
            tracker.clone(),
            cancel.clone(),
        );
        let shared = Arc::new(sharq::Shared {
            settings: config.sharq.clone(),
            client: client.clone(),
            publisher: publisher.clone(),
            intervals: sharq::queues::Intervals::new(store.clone(), limits.clone()),
            counters: sharq::queues::Counters::default(),
            lengths: Arc::new(sharq::lengths::QueueLengths::new(
                client.clone(),
                &topo,
                config.partitions,
                dequeue.feeders(),
            )),
            dequeue,
            inspect: inspect.clone(),
            released: topo.released.clone(),
            status: status_hook.clone(),
            store: status.clone(),
            forward: sharq::forward::Forward {
                client: client.clone(),
                me: config.member.clone(),
                view: view.clone(),
            },
        });
        tracker.spawn(sharq::forward::answer(shared.clone(), cancel.clone()));
        tracker.spawn(sharq::gather::answer(shared.clone(), cancel.clone()));
        tracker.spawn(sharq::deleted::answer(shared.clone(), cancel.clone()));
        tracker.spawn(sharq::serve(listener, shared, cancel.clone()));
    }
    let state = admin::AdminState {
        client: client.clone(),
        ownership: admin::cluster::Ownership {
            view,
            me: config.member.clone(),
            http: config.http_addr.to_string(),
            lease_ms: lease.as_millis() as u64,
            shards,
            ready,
            jobs: topo.jobs.clone(),
        },
        inspect,
        limits: store.clone(),
        status: status.clone(),
        admin_token: config.admin_token.clone(),
        jobs: publisher.clone(),
        default_requeue_limit: config.sharq.default_requeue_limit,
    };
    let http_cancel = cancel.clone();
    let http_metrics = metrics.clone();
    let admin_tls = config.admin_tls.clone();
    tracker.spawn(async move {
        let router = admin::router(state).merge(crate::metrics::router(http_metrics));
        let stop = http_cancel.cancelled_owned();
        let served = match admin_tls {
            None => {
                axum::serve(listener, router)
                    .with_graceful_shutdown(stop)
                    .await
            }
            Some(tls) => {
                axum::serve(tls.listener(listener), router)
                    .with_graceful_shutdown(stop)
                    .await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "admin listener failed");
        }
    });

    tracker.spawn(dead::triage(
        js.clone(),
        triage,
        metrics.unpartitioned(),
        status.clone(),
        cancel.clone(),
    ));
    tracker.spawn(crate::stranded::run(
        js.clone(),
        topo.jobs.clone(),
        config.partitions,
        metrics.unpartitioned(),
        cancel.clone(),
    ));
    tracing::info!(
        partitions = config.partitions,
        http = %config.http_addr,
        https = config.admin_tls.is_some(),
        sharq = ?config.sharq.listen,
        "weir is running"
    );

    shutdown.await;
    tracing::info!(grace = ?config.shutdown_grace, "shutting down");
    cancel.cancel();
    tracker.close();
    let started = tokio::time::Instant::now();
    if tokio::time::timeout(config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; unacked jobs will be redelivered");
    }
    // The status publisher ends once the last clone of the store is gone (the tasks above held
    // the others): the records it still holds go out before the connection is drained, within
    // what is left of the grace period.
    drop((status, status_hook, publisher));
    if let Some(t) = status_task {
        let left = config.shutdown_grace.saturating_sub(started.elapsed());
        let _ = tokio::time::timeout(left, t).await;
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

/// Takes this process's partitions: the static list, or a share from the group. Returns the
/// group's view (none when static), the readiness flag and the lease time.
async fn own(
    config: &Config,
    shards: &Shards,
    group_kv: Option<(async_nats::jetstream::kv::Store, Duration)>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<
    (
        Option<tokio::sync::watch::Receiver<Arc<cluster::view::View>>>,
        Arc<AtomicBool>,
        Duration,
    ),
    RunError,
> {
    match (&config.owned_partitions, group_kv) {
        (Some(owned), _) => {
            for &p in owned {
                // The previous run of a static split is over: its unacked jobs come back now.
                shards.start(p, true);
            }
            Ok((None, Arc::new(AtomicBool::new(true)), Duration::ZERO))
        }
        (None, Some((kv, lease))) => {
            let group = Group::join(kv, lease, config, shards.clone()).await?;
            let (view, ready) = (group.view(), group.ready());
            tracker.spawn(group.run(cancel.clone()));
            Ok((Some(view), ready, lease))
        }
        (None, None) => unreachable!("the bucket is opened for the group"),
    }
}
