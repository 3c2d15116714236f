//! The park: where a key's jobs beyond its in-memory horizon wait, durably, in order.
//!
//! Why a park at all: jobs held unacked in `WEIR_JOBS` count against the partition consumer's
//! `max_ack_pending`, and so do jobs NAKed with a delay (nats-server #6093). A hot key's backlog
//! held either way would stall every other key of its partition. So a partition holds in memory
//! only what a key releases within the horizon, publishes the surplus to `park.<partition>.<key>`
//! in `WEIR_PARK` and acks it from `WEIR_JOBS`. A key's parked jobs are read back one at a time
//! with direct get (next message for the key's subject at or after a cursor), no consumer per
//! key, and purged once released. On start a partition lists the keys with parked jobs from the
//! stream's per-subject counts.

use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use futures::TryStreamExt;

use crate::job::{self, header};
use crate::partition::Job;

/// Reads the key's next parked job at or after park sequence `from`:
/// `Ok(Some((park_seq, src_seq, job)))`, `Ok(None)` when none is left.
pub async fn load(
    park: Stream,
    partition: u16,
    key: &str,
    from: u64,
) -> Result<Option<(u64, u64, Job)>, ()> {
    let subject = job::park_subject(partition, key);
    match park
        .direct_get_next_for_subject(subject, Some(from.max(1)))
        .await
    {
        Ok(m) => {
            let src_seq = m
                .headers
                .get(header::SOURCE_SEQ)
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(0);
            Ok(Some((m.sequence, src_seq, Job::from_park(m))))
        }
        Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(None),
        Err(e) => {
            tracing::warn!(partition, key, error = %e, "reading from the park failed; retrying");
            Err(())
        }
    }
}

/// Deletes the key's parked jobs below park sequence `below` (they have been released).
pub async fn purge(park: Stream, partition: u16, key: &str, below: u64) -> bool {
    let subject = job::park_subject(partition, key);
    match park.purge().filter(subject).sequence(below).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(partition, key, error = %e, "purging released parked jobs failed; will retry");
            false
        }
    }
}

/// Deletes every parked job of the key (an operator's purge); returns how many.
pub async fn purge_all(park: &Stream, partition: u16, key: &str) -> u64 {
    let subject = job::park_subject(partition, key);
    match park.purge().filter(subject).await {
        Ok(r) => r.purged,
        Err(e) => {
            tracing::warn!(partition, key, error = %e, "purging a key's parked jobs failed");
            0
        }
    }
}

/// The keys of `partition` with parked jobs, and how many each has.
pub async fn parked_keys(
    park: &Stream,
    partition: u16,
) -> Result<Vec<(String, u64)>, async_nats::Error> {
    let prefix = format!("park.{partition}.");
    let mut info = park.info_with_subjects(format!("{prefix}>")).await?;
    let mut out = Vec::new();
    while let Some((subject, count)) = info.try_next().await? {
        if let Some(key) = subject.strip_prefix(&prefix) {
            out.push((key.to_string(), count as u64));
        }
    }
    Ok(out)
}
