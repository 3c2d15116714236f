//! The raw JetStream ceiling Weir is measured against: what one client can move through one
//! server with the same shape of work and none of Weir's decisions.
//!
//! Same as Weir: a work-queue stream partitioned by the same `partition()` transform, one durable
//! pull consumer per partition, batches of 256, [`Pipeline`] with the same window, and per
//! message: republish (producer headers kept, plus a `Nats-Msg-Id`), ack the source after the
//! publish ack.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::AckPolicy;
use async_nats::jetstream::stream::{Config as StreamConfig, RetentionPolicy, SubjectTransform};
use async_nats::jetstream::Context;
use futures::StreamExt;

use super::{preload_ids, wait_count, BoxError};
use crate::release::Pipeline;

/// Publish acks in flight per partition: Weir's default `publish_window`.
pub const WINDOW: usize = 512;
const BATCH: usize = 256;

/// Moves `n` preloaded messages through; returns the time from start to the last one stored.
pub async fn run(
    js: &Context,
    n: u64,
    keys: u64,
    partitions: u16,
    payload: usize,
    ids: bool,
) -> Result<Duration, BoxError> {
    let input = js
        .create_stream(StreamConfig {
            name: "RAW_IN".into(),
            subjects: vec!["raw.>".into()],
            subject_transform: Some(SubjectTransform {
                source: "raw.*.*".into(),
                destination: format!("rawp.{{{{partition({partitions},2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"),
            }),
            retention: RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await?;
    js.create_stream(StreamConfig {
        name: "RAW_OUT".into(),
        subjects: vec!["rawout.>".into()],
        ..Default::default()
    })
    .await?;
    preload_ids(js, "raw", n, keys, payload, ids).await?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..partitions {
        let consumer = input
            .get_or_create_consumer(
                &format!("raw-p{p}"),
                PullConfig {
                    durable_name: Some(format!("raw-p{p}")),
                    filter_subject: format!("rawp.{p}.*.*"),
                    ack_policy: AckPolicy::Explicit,
                    max_ack_pending: 20_000,
                    ..Default::default()
                },
            )
            .await?;
        let js = js.clone();
        tasks.push(tokio::spawn(
            async move { pass_through(js, consumer).await },
        ));
    }
    let done = wait_count(js, "RAW_OUT", n, Duration::from_secs(600)).await?;
    for t in tasks {
        t.abort();
    }
    Ok(done - start)
}

async fn pass_through(
    js: Context,
    consumer: async_nats::jetstream::consumer::PullConsumer,
) -> Result<(), BoxError> {
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(BATCH)
        .messages()
        .await?;
    let mut pubs: Pipeline<async_nats::jetstream::message::Acker> = Pipeline::new(js, WINDOW);
    loop {
        tokio::select! {
            biased;
            Some((res, acker)) = pubs.next_ack(), if !pubs.is_empty() => {
                if res.is_ok() { acker.ack().await?; }
            }
            m = messages.next(), if !pubs.is_full() => {
                let Some(m) = m else { return Ok(()) };
                let m = m?;
                let seq = m.info()?.stream_sequence;
                let (msg, acker) = m.split();
                let mut h = msg.headers.unwrap_or_default();
                h.insert("Nats-Msg-Id", crate::job::derived_msg_id(seq));
                let mut parts = msg.subject.splitn(4, '.').skip(2);
                let (dest, key) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let subject = format!("rawout.{dest}.{key}");
                if let Err((e, _)) = pubs.publish(subject, h, msg.payload, acker).await {
                    return Err(e.into());
                }
            }
        }
    }
}
