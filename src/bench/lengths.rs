//! (13) What a full SHARQ queue length costs ([`crate::sharq::lengths`]), as workers lag.
//!
//! A full count asks for a queue's jobs in `WEIR_JOBS`, in `WEIR_PARK` and, the costly part,
//! in `WEIR_RELEASED` past the type's consumer: nats-server counts that subject from the
//! nearer end of the stream, block by block. This measure fills `WEIR_RELEASED` with
//! `--lengths-released` jobs over 100 queues of type `sms`, moves the type's consumer
//! (`sharq-sms`) to a point of the stream, and times full counts of queues not counted before
//! (so none is cached), at each point.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use futures::StreamExt;

use super::{config, fresh, median, preload, BenchArgs, BoxError};
use crate::sharq::dequeue::{consumer_name, Feeders};
use crate::sharq::lengths::QueueLengths;
use crate::streams;

/// Queues the jobs are spread over (`key-0` ..).
const QUEUES: u64 = 100;
/// Counts timed at each point.
const SAMPLES: u64 = 30;

pub async fn run(a: &BenchArgs) -> Result<(), BoxError> {
    let n = a.lengths_released;
    println!("(13) SHARQ queue length, full count: {n} released jobs over {QUEUES} queues");
    let (_nats, client) = fresh().await?;
    let c = config(a.partitions, "")?;
    let js = crate::context(&client, a.partitions, 512);
    let topo = streams::ensure(&js, &c).await?;
    preload(&js, "released", n, QUEUES, a.payload).await?;
    let consumer = topo
        .released
        .create_consumer(PullConfig {
            durable_name: Some(consumer_name("sms")),
            filter_subject: "released.sms.>".into(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let lengths = QueueLengths::new(client.clone(), &topo, a.partitions, Feeders::default());
    let mut delivered = 0u64;
    for (i, share) in [0.0, 0.01, 0.25, 0.5, 0.75, 0.99].into_iter().enumerate() {
        // The consumer's delivered sequence at `share` of the stream: what workers have taken.
        let target = (n as f64 * share) as u64;
        while delivered < target {
            let want = (target - delivered).min(1000) as usize;
            let mut batch = consumer
                .fetch()
                .max_messages(want)
                .expires(Duration::from_millis(500))
                .messages()
                .await?;
            while let Some(m) = batch.next().await {
                m?;
                delivered += 1;
            }
        }
        // Counts are reused (the consumer's position 250 ms, a queue's released part 1 s): let
        // the new point show.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let mut times = Vec::new();
        let mut last = 0;
        for s in 0..SAMPLES {
            // A queue not counted before: nothing cached.
            let q = format!("key-{}", (i as u64 * SAMPLES + s) % QUEUES);
            let start = Instant::now();
            last = lengths.get("sms", &q).await?;
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        println!(
            "  workers at {:>3.0}% of the stream: {:.2} ms median, {:.2} ms max; a queue's length {last} (expected {})",
            share * 100.0,
            median(&mut times),
            times.iter().copied().fold(0.0, f64::max),
            (n - delivered) / QUEUES,
        );
    }
    Ok(())
}
