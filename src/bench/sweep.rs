//! (12) What the sweep for unreadable jobs costs ([`crate::poison`]).
//!
//! A sweep reads unacked jobs through the JSON message get (one request per job: nothing in that
//! reply can break the connection) to find jobs the NATS client cannot read. At start a
//! partition has read none of its unacked jobs and checks them all; after a reconnect it skips
//! the ones it holds (it read them), so its cost is one info request when it can account for
//! every unacked job, and one get per gap between held jobs when it cannot. The cost grows with
//! the jobs a partition holds unacked, at most `max_held_per_partition` (20,000 by default).
//! This measure delivers `held` jobs to each of `partitions` consumers without acking them, then
//! times three sweeps, for one partition alone and for every partition at once (what a reconnect
//! starts): all unread (at start), all held (a reconnect with nothing lost), and all held but one
//! (a reconnect that lost a job in flight, or a poison). Nothing is dead-lettered: every job is
//! readable, so each run repeats the same work.

use std::time::Instant;

use futures::StreamExt;

use super::{config, fresh, median, preload, BenchArgs, BoxError};
use crate::poison::{self, Unacked};
use crate::{job, streams};

/// What a partition knows of its unacked jobs, given them all (sorted).
type Known = fn(&[u64]) -> Vec<u64>;

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
        let mut seqs = Vec::new();
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(1000)
                .expires(std::time::Duration::from_millis(300))
                .messages()
                .await?;
            let before = seqs.len();
            while let Some(m) = batch.next().await {
                seqs.push(m?.info()?.stream_sequence);
            }
            if seqs.len() == before {
                break;
            }
        }
        seqs.sort_unstable();
        delivered += seqs.len() as u64;
        consumers.push((consumer, seqs));
    }
    println!("  {delivered} jobs delivered, none acked");

    // What a partition knows: nothing, every job, or every job but the middle one.
    let cases: [(&str, Known); 3] = [
        ("none held (at start)", |_| Vec::new()),
        ("all held (reconnect)", |s| s.to_vec()),
        ("all held but one (reconnect)", |s| {
            let mut k = s.to_vec();
            if !k.is_empty() {
                k.remove(k.len() / 2);
            }
            k
        }),
    ];
    for (name, known_of) in cases {
        let known: Vec<Vec<u64>> = consumers.iter().map(|(_, s)| known_of(s)).collect();
        let mut one = Vec::new();
        let mut all = Vec::new();
        let (mut checked_one, mut gets_one, mut checked_all) = (0, 0, 0);
        for _ in 0..a.runs.max(1) {
            let start = Instant::now();
            let s = sweep_one(&js, &consumers[0].0, 0, &known[0]).await?;
            one.push(start.elapsed().as_secs_f64());
            (checked_one, gets_one) = (s.checked, s.gets);

            let start = Instant::now();
            let sweeps = consumers
                .iter()
                .zip(&known)
                .enumerate()
                .map(|(p, ((cons, _), k))| sweep_one(&js, cons, p as u16, k));
            let mut checked = 0;
            for s in futures::future::join_all(sweeps).await {
                checked += s?.checked;
            }
            all.push(start.elapsed().as_secs_f64());
            checked_all = checked;
        }
        let (t1, ta) = (median(&mut one), median(&mut all));
        println!(
            "  {name}: one partition {checked_one} jobs checked, {gets_one} gets, in {:.1} ms median; all {partitions} at once {checked_all} checked in {:.1} ms median",
            t1 * 1000.0,
            ta * 1000.0,
        );
    }
    Ok(())
}

/// A partition's sweep as it runs: its consumer's info, then a walk of what `known` leaves out.
async fn sweep_one(
    js: &async_nats::jetstream::Context,
    consumer: &async_nats::jetstream::consumer::PullConsumer,
    partition: u16,
    known: &[u64],
) -> Result<poison::Swept, BoxError> {
    let range = Unacked::of(&mut consumer.clone()).await?;
    poison::sweep(js, partition, range, known).await
}
