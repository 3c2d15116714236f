//! The JetStream topology Weir needs, created idempotently at start.
//!
//! An existing stream is used as it is if it fits; if it does not (say `WEIR_JOBS` was created
//! with another partition count, which would re-map every key), start fails with an error saying
//! what differs, rather than silently changing a stream other processes depend on. The one
//! exception is `WEIR_JOBS`' `max_msg_size`, which only ever tightens (see [`HEADER_ROOM`]).

use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::{
    Config as StreamConfig, RetentionPolicy, StorageType, Stream, SubjectTransform,
};
use async_nats::jetstream::{Context, ErrorCode};

use crate::config::Config;
use crate::job;

/// Why the topology could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("JetStream request for {what} failed: {source}")]
    Request {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("stream {stream} exists but {field} is {found}, weir needs {wanted}; {fix}")]
    Mismatch {
        stream: &'static str,
        field: &'static str,
        found: String,
        wanted: String,
        fix: &'static str,
    },
}

fn req<E: std::error::Error + Send + Sync + 'static>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> TopologyError {
    let what = what.into();
    move |e| TopologyError::Request {
        what,
        source: Box::new(e),
    }
}

/// Room left in every message of `WEIR_JOBS` for the headers Weir adds when it releases, parks
/// or dead-letters a job, in bytes. A release is the job plus `Nats-Msg-Id` (derived, ≤ 45 B
/// on the wire), `Weir-Producer-Msg-Id` (the producer's id moved, +9 B), `Weir-Key` and
/// `Weir-Destination` (≤ 256 B values each), `Weir-Enqueued-At`, `Weir-Released-At` and
/// `Weir-Source-Seq` (≤ 20 B values), a rewritten `traceparent` and `tracestate` (≤ 70 B more) and
/// the header preamble when the producer sent none: under 900 B. A dead letter adds
/// `Weir-Dead-Reason` (≤ 130 B) and `Weir-Subject` (cut to [`crate::dead::MAX_SUBJECT_HEADER`]):
/// under 1,400 B. So `WEIR_JOBS` refuses, at publish, any job larger than the server's
/// `max_payload` less this room: everything it accepts can be carried on. Without it a job near
/// `max_payload` would be stored, then fail every release with "max payload exceeded" (not
/// transient) and stay in `WEIR_JOBS`, blocking its key, forever.
pub const HEADER_ROOM: usize = 2048;

/// The `max_msg_size` of `WEIR_JOBS` for a server whose `max_payload` is `max_payload`.
pub fn jobs_max_msg_size(max_payload: usize) -> i32 {
    i32::try_from(max_payload.saturating_sub(HEADER_ROOM).max(1)).unwrap_or(i32::MAX)
}

/// Durable name of a partition's consumer.
pub fn partition_consumer(p: u16) -> String {
    format!("weir-p{p}")
}

/// Durable name of the consumer that dead-letters subjects the partition transform did not match.
pub const TRIAGE_CONSUMER: &str = "weir-triage";

/// What the triage consumer sees: `jobs.` subjects that the partition transform did not rewrite
/// to `weir.in.…`: those of any length but 3 tokens, and 3-token ones the transform skips (a
/// producer may publish `jobs.sms.*` or `jobs.sms.>`: nats-server answers "Invalid Publish
/// Subject" yet stores it, untransformed). Not `jobs.>`: on a work-queue stream nats-server 2.15
/// then counts the triage consumer as interested in every job (the transform's source matches)
/// and never deletes acked jobs; `jobs.*.*` does not have that effect (tests/hostile.rs checks
/// that acked jobs still leave the stream).
pub fn triage_filters() -> Vec<String> {
    vec!["jobs.*".into(), "jobs.*.*".into(), "jobs.*.*.>".into()]
}

/// How long `WEIR_JOBS` remembers a `Nats-Msg-Id`: a job published again within it is stored
/// once.
pub const JOBS_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Handles on the streams Weir uses.
#[derive(Clone)]
pub struct Topology {
    pub jobs: Stream,
    pub released: Stream,
    pub park: Stream,
    pub dead: Stream,
}

/// Creates (or checks) `WEIR_JOBS`, `WEIR_RELEASED`, `WEIR_PARK` and `WEIR_DEAD`.
pub async fn ensure(js: &Context, c: &Config) -> Result<Topology, TopologyError> {
    let (src, dest) = job::partition_transform(c.partitions);
    let jobs_cfg = StreamConfig {
        name: job::JOBS_STREAM.into(),
        subjects: vec!["jobs.>".into()],
        subject_transform: Some(SubjectTransform {
            source: src,
            destination: dest,
        }),
        // Acked jobs are done: a work queue deletes them, so the stream holds only what waits.
        retention: RetentionPolicy::WorkQueue,
        // A restarting partition lists what its previous run left unacked with direct gets.
        allow_direct: true,
        storage: StorageType::File,
        num_replicas: c.replicas,
        duplicate_window: JOBS_DUPLICATE_WINDOW,
        // The client knows the server's max_payload once connected (ensure runs after a
        // JetStream round trip); 0 would mean unknown: then no limit is set, as before.
        max_message_size: match js.client().max_payload() {
            0 => -1,
            m => jobs_max_msg_size(m),
        },
        ..Default::default()
    };
    let jobs = ensure_stream(js, jobs_cfg).await?;
    let mut released_cfg = plain(job::RELEASED_STREAM, "released.>", c.replicas);
    // The SHARQ API counts a queue's released jobs not yet dequeued with a batched direct get.
    released_cfg.allow_direct = true;
    let released = ensure_stream(js, released_cfg).await?;
    let dead = ensure_stream(js, plain(job::DEAD_STREAM, "dead.>", c.replicas)).await?;
    let mut park_cfg = plain(job::PARK_STREAM, "park.>", c.replicas);
    // Parked jobs are read back per key with direct get (next message for a subject after a
    // sequence), which needs no consumer per key.
    park_cfg.allow_direct = true;
    let park = ensure_stream(js, park_cfg).await?;
    Ok(Topology {
        jobs,
        released,
        park,
        dead,
    })
}

/// Turns `allow_direct` on for a stream made without it; without permission to, logs what is
/// lost and goes on. Returns the configuration in force.
async fn allow_direct(js: &Context, have: StreamConfig) -> StreamConfig {
    let name = have.name.clone();
    let want = StreamConfig {
        allow_direct: true,
        ..have.clone()
    };
    match js.update_stream(want).await {
        Ok(info) => {
            tracing::info!(stream = %name, "allow_direct turned on");
            info.config
        }
        Err(e) => {
            tracing::warn!(stream = %name, error = %e, "cannot turn allow_direct on (give Weir $JS.API.STREAM.UPDATE.{name} once, or update the stream): SHARQ queue lengths leave out released jobs not yet dequeued");
            have
        }
    }
}

fn plain(name: &str, subject: &str, replicas: usize) -> StreamConfig {
    StreamConfig {
        name: name.into(),
        subjects: vec![subject.into()],
        storage: StorageType::File,
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

async fn ensure_stream(js: &Context, want: StreamConfig) -> Result<Stream, TopologyError> {
    let name: &'static str = match want.name.as_str() {
        job::JOBS_STREAM => job::JOBS_STREAM,
        job::RELEASED_STREAM => job::RELEASED_STREAM,
        job::PARK_STREAM => job::PARK_STREAM,
        _ => job::DEAD_STREAM,
    };
    match js.get_stream(name).await {
        Ok(mut s) => {
            let mut have = s
                .info()
                .await
                .map_err(req(format!("info of {name}")))?
                .config
                .clone();
            check(
                name,
                "subjects",
                &have.subjects,
                &want.subjects,
                "delete the stream or use another NATS account",
            )?;
            check(
                name,
                "retention",
                &have.retention,
                &want.retention,
                "delete the stream or use another NATS account",
            )?;
            let t = |c: &StreamConfig| c.subject_transform.as_ref().map(|t| t.destination.clone());
            check(
                name,
                "subject transform (partition count)",
                &t(&have),
                &t(&want),
                "set `partitions` to the count the stream was made with, or drain and delete WEIR_JOBS",
            )?;
            if want.allow_direct && !have.allow_direct && name == job::RELEASED_STREAM {
                // Made before Weir counted released jobs; only that count needs it.
                have = allow_direct(js, have).await;
            }
            if want.allow_direct && !have.allow_direct && name != job::RELEASED_STREAM {
                return Err(TopologyError::Mismatch {
                    stream: name,
                    field: "allow_direct",
                    found: "false".into(),
                    wanted: "true".into(),
                    fix: "update the stream with allow_direct = true",
                });
            }
            let limit = |m: i32| if m <= 0 { i32::MAX } else { m };
            if want.max_message_size > 0 && limit(have.max_message_size) > want.max_message_size {
                // Tightening only refuses new jobs that could not be released anyway.
                tracing::info!(
                    stream = name,
                    from = have.max_message_size,
                    to = want.max_message_size,
                    "lowering max_msg_size to leave room for Weir's headers"
                );
                let cfg = StreamConfig {
                    max_message_size: want.max_message_size,
                    ..have
                };
                js.update_stream(cfg)
                    .await
                    .map_err(req(format!("update max_msg_size of {name}")))?;
            }
            Ok(s)
        }
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) => {
            js.create_stream(want)
                .await
                .map_err(req(format!("create {name}")))
        }
        Err(e) => Err(req(format!("get {name}"))(e)),
    }
}

fn check<T: PartialEq + std::fmt::Debug>(
    stream: &'static str,
    field: &'static str,
    found: &T,
    wanted: &T,
    fix: &'static str,
) -> Result<(), TopologyError> {
    if found == wanted {
        Ok(())
    } else {
        Err(TopologyError::Mismatch {
            stream,
            field,
            found: format!("{found:?}"),
            wanted: format!("{wanted:?}"),
            fix,
        })
    }
}

/// The durable pull consumer of one partition (or of the triage filter).
pub async fn consumer(
    jobs: &Stream,
    name: &str,
    mut filters: Vec<String>,
    c: &Config,
) -> Result<PullConsumer, TopologyError> {
    let (filter_subject, filter_subjects) = match filters.len() {
        1 => (filters.pop().expect("one"), Vec::new()),
        _ => (String::new(), filters),
    };
    let cfg = PullConfig {
        durable_name: Some(name.to_string()),
        filter_subject,
        filter_subjects,
        ack_policy: AckPolicy::Explicit,
        ack_wait: c.ack_wait,
        // Held jobs are unacked and count here; parking keeps a hot key from filling it.
        max_ack_pending: i64::from(c.max_held_per_partition),
        ..Default::default()
    };
    let consumer: PullConsumer = jobs
        .get_or_create_consumer(name, cfg.clone())
        .await
        .map_err(req(format!("consumer {name}")))?;
    // A consumer made by an older Weir may have fewer filters (the triage's gained `jobs.*.*`):
    // filters can be changed in place.
    let have = &consumer.cached_info().config;
    if have.filter_subject != cfg.filter_subject || have.filter_subjects != cfg.filter_subjects {
        tracing::info!(consumer = name, "updating the consumer's filter subjects");
        return jobs
            .update_consumer(cfg)
            .await
            .map_err(req(format!("update consumer {name}")));
    }
    Ok(consumer)
}
