//! Weir: a rate-limited queueing pipeline on NATS JetStream.
//!
//! Producers publish jobs to `jobs.<destination>.<key>`; Weir releases each key's jobs at that
//! key's rate (GCRA: rate plus burst) to `released.<destination>.<key>`, keeps every job, and acks
//! a source job only after its release is durably stored.
//!
//! Embedding it: parse a config, connect, and run until a shutdown future completes (the
//! binary passes SIGTERM/SIGINT; tests pass their own).
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = weir::config::Config::from_toml(
//!     "partitions = 4\n[limits.default]\nrate = \"40/s\"\nburst = 10",
//!     "inline",
//!     &Default::default(),
//! )?;
//! let client = weir::connect("nats://127.0.0.1:4222").await?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! # drop(stop);
//! weir::run(config, client, async { let _ = stopped.await; }).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! The modules, in the order a job meets them:
//! - [`config`]: the configuration, parsed and validated once at start; [`config::nats`]: NATS
//!   authentication and TLS.
//! - [`streams`]: the JetStream topology (`WEIR_JOBS`, `WEIR_RELEASED`, `WEIR_PARK`, `WEIR_DEAD`).
//! - [`job`]: subjects, headers and the naming contract.
//! - [`cluster`]: which process runs which partition: members and leases in `WEIR_CLUSTER`.
//! - [`shards`]: starts and stops this process's partition tasks as it gains and loses them.
//! - [`partition`]: one task per partition: ingest from its consumer, carry out the scheduler's decisions.
//!   Its `stall` watch rebinds a consumer stream that stopped pulling after a reconnect.
//! - [`scheduler`]: per-key queues and timers: release, hold or park (pure logic).
//! - [`limits`]: which limit applies to a key; the `WEIR_LIMITS` bucket and its watcher.
//! - [`limiter`]: per-key GCRA buckets (governor) on a monotonic clock.
//! - [`caps`]: destination caps, one bucket per capped destination shared by the partitions.
//! - [`inspect`]: operators' questions to the partitions (a key's state, the busiest keys, purge).
//! - [`purges`]: each key's last purge in the `WEIR_PURGES` bucket, so purged jobs can be
//!   enqueued again and read as purged.
//! - [`park`]: the durable overflow for keys beyond their in-memory horizon.
//! - [`recover`]: what a partition's previous run left unacked, so order survives a restart.
//! - [`release`]: pipelined publishing and the released job's headers.
//! - [`dead`]: dead letters for jobs Weir cannot handle.
//! - [`status`]: job status by `Weir-Job-Id` in the `WEIR_JOB_STATUS` bucket, written without
//!   waiting.
//! - [`poison`]: stored jobs the NATS client cannot read (bad header bytes), found after a
//!   reconnect and dead-lettered; [`stranded`]: stored jobs no consumer delivers (nats-server
//!   skips subjects with the byte 0x7f), found by a periodic sweep and dead-lettered.
//! - [`admin`]: the admin HTTP API: health, readiness, limits, keys, job status and the native
//!   job batch (`POST /v1/jobs:batch`), and its OpenAPI document.
//! - [`sharq`]: the SHARQ-compatible HTTP API on a listener of its own (`sharq_listen`): enqueue
//!   (single and bulk) to `jobs.>`, dequeue and finish from `WEIR_RELEASED`, intervals as limits.
//! - [`tls`]: PEM files and the admin API's HTTPS listener.
//! - [`metrics`]: OpenTelemetry metrics, per-partition recorders cheap enough per job, `GET /metrics`.
//! - [`trace`]: W3C trace context: a "weir hold" span per traced job, its `traceparent` rewritten.
//! - [`signal`]: the shutdown signal.
//! - [`cli`]: the operator's commands: `weir limits` (NATS), `weir status` and `weir top` (admin API).
//! - [`natsd`], [`load`], [`demo`], [`bench`](mod@bench): a local nats-server, the load generator, the demo and
//!   the end-to-end benchmark.
//! - [`chaos`]: long runs under injected faults (kill -9, NATS restarts), checked by the job
//!   [`ledger`]; [`members`] drives the `weir run` subprocesses of `bench` and `chaos`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod bench;
pub mod caps;
pub mod chaos;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod dead;
pub mod demo;
pub mod inspect;
pub mod job;
pub mod ledger;
pub mod limiter;
pub mod limits;
pub mod load;
pub mod members;
pub mod metrics;
pub mod natsd;
pub mod park;
pub mod partition;
pub mod poison;
pub mod purges;
pub mod recover;
pub mod release;
pub mod scheduler;
pub mod shards;
pub mod sharq;
pub mod signal;
pub mod status;
pub mod stranded;
pub mod streams;
pub mod tls;
pub mod trace;

mod server;
pub use server::{connect, connect_with, context, run, RunError};
