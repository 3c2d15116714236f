//! What a partition's previous run left unacked, so that order survives a restart.
//!
//! Jobs a run held in memory are unacked in `WEIR_JOBS`. After a crash they come back only after
//! `ack_wait`; after a shutdown's NAK they come back at once but not always in order (nats-server
//! #6114). Meanwhile newer jobs of the same key (fresh, or parked) would overtake them. So before
//! a partition binds its consumer it lists the jobs still in the stream at or below the
//! consumer's delivered sequence (in a work queue, acked jobs are gone, so these are exactly the
//! unacked ones) and fences each key until they are back.
//!
//! The listing uses batched direct gets (nats-server 2.11+), a few requests per thousand jobs.
//!
//! When the previous owner died (a crash, or a lease that expired), its jobs would come back
//! only after `ack_wait`, and the fenced keys would wait that long. [`redeliver_now`] resets the
//! consumer to its ack floor (ADR-60, nats-server 2.14+): on a work queue every job still
//! stored there is unacked, and JetStream delivers them again at once, in stream order. Not
//! after a clean hand-over: the previous owner's last acks may still be queued at the server,
//! and a reset would discard them (the jobs would then be released twice, and de-duplicated).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::StatusCode;
use futures::StreamExt;

use crate::job;

/// Why the listing failed (the partition then starts without fences, and logs it).
pub type RecoverError = Box<dyn std::error::Error + Send + Sync>;

/// The unacked jobs of `partition`, by key: their `WEIR_JOBS` sequences.
pub async fn unacked(
    client: &async_nats::Client,
    consumer: &mut PullConsumer,
    partition: u16,
) -> Result<HashMap<String, Vec<u64>>, RecoverError> {
    let info = consumer.info().await?;
    let (upto, pending) = (info.delivered.stream_sequence, info.num_ack_pending);
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    if pending == 0 {
        return Ok(out);
    }
    let filter = job::partition_filter(partition);
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await?;
    let mut seq = 1;
    'batches: loop {
        let req = serde_json::json!({ "seq": seq, "next_by_subj": filter, "batch": 1000 });
        client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{}", job::JOBS_STREAM),
                inbox.clone(),
                req.to_string().into(),
            )
            .await?;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await?
                .ok_or("subscription closed")?;
            match m.status {
                // 204: end of this batch, ask for the next one.
                Some(code) if code.as_u16() == 204 => continue 'batches,
                Some(StatusCode::NOT_FOUND) => break 'batches,
                Some(code) if code != StatusCode::OK => {
                    return Err(format!("direct get answered {code}: {:?}", m.description).into())
                }
                _ => {}
            }
            let h = m
                .headers
                .as_ref()
                .ok_or("direct get reply without headers")?;
            let s: u64 = h
                .get("Nats-Sequence")
                .ok_or("no Nats-Sequence")?
                .as_str()
                .parse()?;
            if s > upto {
                break 'batches;
            }
            seq = s + 1;
            let subject = h.get("Nats-Subject").ok_or("no Nats-Subject")?.as_str();
            if let Ok(route) = job::parse_stored(subject) {
                out.entry(route.key.to_string()).or_default().push(s);
            }
        }
    }
    Ok(out)
}

/// Has JetStream deliver the partition's unacked jobs again now (consumer reset to its ack
/// floor). On failure (a server before 2.14) they come back after `ack_wait` instead.
pub async fn redeliver_now(consumer: &mut PullConsumer, partition: u16) {
    match consumer.reset(None).await {
        Ok(_) => tracing::info!(
            partition,
            "the previous owner's unacked jobs are redelivered now"
        ),
        Err(e) => tracing::warn!(
            partition,
            error = %e,
            "resetting the consumer failed; the previous owner's jobs come back after ack_wait"
        ),
    }
}
