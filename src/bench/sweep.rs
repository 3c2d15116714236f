//! (12) What the sweep for unreadable jobs costs ([`crate::poison`]).
//!
//! After every reconnect each partition reads each of its unacked jobs through the JSON message
//! get (one request per job: nothing in that reply can break the connection) to find jobs the
//! NATS client cannot read. Its cost grows with the jobs a partition holds unacked, at most
//! `max_held_per_partition` (20,000 by default). This measure delivers `held` jobs to each of
//! `partitions` consumers without acking them, then times the sweeps: one partition alone, and
//! every partition at once (what a reconnect starts). Nothing is dead-lettered: every job is
//! readable, so the sweep only reads and repeats the same work on each run.

use std::time::Instant;

use futures::StreamExt;

use super::{config, fresh, median, preload, BenchArgs, BoxError};
use crate::{job, poison, streams};

pub async fn run(a: &BenchArgs) -> Result<(), BoxError> {
    let partitions = a.partitions;
    let held = a.sweep_held;
    println!(
        "(12) sweep for unreadable jobs after a reconnect: {partitions} partitions, {held} unacked jobs each"
    );
    let (_n, client) = fresh().await?;
    let c = config(
        partitions,
        &format!("ack_wait_ms = 600000\nmax_held_per_partition = {held}"),
    )?;
    let js = crate::context(&client, partitions, 512);
    let topo = streams::ensure(&js, &c).await?;
    // Keys spread over the partitions by the transform's hash; a partition's deliveries stop at
    // its `max_ack_pending`, which is `held`.
    let total = held * u64::from(partitions);
    preload(&js, "jobs", total, u64::from(partitions) * 64, a.payload).await?;
    let mut consumers = Vec::new();
    let mut delivered = 0u64;
    for p in 0..partitions {
        let consumer = streams::consumer(
            &topo.jobs,
            &streams::partition_consumer(p),
            vec![job::partition_filter(p)],
            &c,
        )
        .await?;
        // Deliver everything it may hold, and keep none of it acked.
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(1000)
                .expires(std::time::Duration::from_millis(300))
                .messages()
                .await?;
            let mut got = 0u64;
            while let Some(m) = batch.next().await {
                m?;
                got += 1;
            }
            delivered += got;
            if got == 0 {
                break;
            }
        }
        consumers.push(consumer);
    }
    println!("  {delivered} jobs delivered, none acked");

    let mut one = Vec::new();
    let mut all = Vec::new();
    let mut checked_all = 0;
    for _ in 0..a.runs.max(1) {
        let start = Instant::now();
        let s = poison::sweep(&js, consumers[0].clone(), 0).await?;
        one.push((start.elapsed().as_secs_f64(), s.checked));

        let start = Instant::now();
        let sweeps = consumers
            .iter()
            .enumerate()
            .map(|(p, cons)| poison::sweep(&js, cons.clone(), p as u16));
        let mut checked = 0;
        for s in futures::future::join_all(sweeps).await {
            checked += s?.checked;
        }
        all.push(start.elapsed().as_secs_f64());
        checked_all = checked;
    }
    let checked_one = one[0].1;
    let mut one: Vec<f64> = one.into_iter().map(|(t, _)| t).collect();
    let (t1, ta) = (median(&mut one), median(&mut all));
    println!(
        "  one partition: {checked_one} jobs checked in {:.0} ms median ({:.0} jobs/s)",
        t1 * 1000.0,
        checked_one as f64 / t1
    );
    println!(
        "  all {partitions} at once: {checked_all} jobs checked in {:.0} ms median ({:.0} jobs/s)",
        ta * 1000.0,
        checked_all as f64 / ta
    );
    Ok(())
}
