//! Stranded jobs: stored in `WEIR_JOBS` where no consumer will ever deliver them, found and
//! dead-lettered.
//!
//! Every stored job matches exactly one of Weir's consumers: a partition's
//! (`weir.in.<p>.*.*`) or the triage's (`jobs.*`, `jobs.*.*`, `jobs.*.*.>`). Yet nats-server
//! (2.10 to 2.15 at least) can fail to deliver a job whose subject contains the byte 0x7f
//! (DEL): its subject tree uses that byte as a "no pivot" sentinel, so a filtered read can step
//! over such a subject, and the consumer's floor moves past a job it never delivered. Measured:
//! 10 runs in 12 of a test publishing `jobs.sms.del\x7f` left the job in `WEIR_JOBS`, pending on
//! no consumer, for good. A job stuck like that is not lost yet, but nobody will ever release
//! it; a work-queue stream keeps it until someone acts.
//!
//! The sweep: a job is stranded when its sequence is at or below every consumer's floor (each
//! has acked everything of its own up to there: a work queue deletes what is acked) and it is
//! still stored. The first stored sequence is checked against the lowest floor; when it is
//! below, the job is read by sequence through the JSON message get (no subject filter, so the
//! subject tree is not involved; the subject and headers cannot trip the client's parser),
//! dead-lettered with the reason its subject fails ([`job::parse_stored`]) or "stranded", and
//! then deleted. A job is acted on only when two sweeps in a row find it stranded, so that an
//! ack still on its way (a floor that moved before the deletion showed) never causes a dead
//! letter. Every process sweeps; two sweeping at once are harmless: the dead letter's
//! `Nats-Msg-Id` is derived from the job's sequence, and a second delete finds nothing.
//!
//! Cost: one stream info and one consumer list request per period, nothing per job.

use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use async_nats::jetstream::Context;
use futures::TryStreamExt;
use tokio_util::sync::CancellationToken;

use crate::job;
use crate::poison::sweep::{self, SweepError};
use crate::streams;

/// How often each process looks for stranded jobs: a stranded job is dead-lettered within
/// about two periods.
pub const PERIOD: Duration = Duration::from_secs(5);

/// Most jobs dead-lettered in one sweep: a backlog of them is worked off over several periods.
const MAX_PER_SWEEP: usize = 100;

/// The reason for a stranded job whose subject is otherwise valid.
pub const STRANDED: &str =
    "stranded: stored in WEIR_JOBS but delivered by no consumer (nats-server skipped its subject)";

/// Sweeps every [`PERIOD`] until `cancel`.
pub async fn run(
    js: Context,
    jobs: Stream,
    partitions: u16,
    mut metrics: crate::metrics::PartitionMetrics,
    cancel: CancellationToken,
) {
    let mut suspect = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(PERIOD) => {}
        }
        match sweep_once(&js, &jobs, partitions, &mut suspect).await {
            Ok(dead) => {
                for (dest, kind) in dead {
                    metrics.dead(&dest, kind);
                }
            }
            Err(e) => tracing::debug!(error = %e, "looking for stranded jobs failed; trying again"),
        }
    }
}

/// One sweep. `suspect` carries the first stranded sequence seen by the previous sweep: only a
/// job found stranded twice is dead-lettered. Returns each dead-lettered job's destination and
/// `weir.dead_reason` kind.
pub async fn sweep_once(
    js: &Context,
    jobs: &Stream,
    partitions: u16,
    suspect: &mut Option<u64>,
) -> Result<Vec<(String, &'static str)>, SweepError> {
    let mut out = Vec::new();
    let client = js.client();
    while out.len() < MAX_PER_SWEEP {
        let state = jobs.get_info().await?.state;
        let Some(floor) = lowest_floor(jobs, partitions, state.last_sequence).await? else {
            break;
        };
        if state.messages == 0 || state.first_sequence > floor {
            *suspect = None;
            break;
        }
        let seq = state.first_sequence;
        if *suspect != Some(seq) {
            // First sighting: wait for the next sweep to be sure.
            *suspect = Some(seq);
            break;
        }
        let Some(m) = sweep::get_seq(&client, seq).await? else {
            continue;
        };
        let hdrs = m.raw_headers()?;
        let route = job::parse_stored(&m.subject);
        let (reason, kind) = match &route {
            Err(reason) => (reason.to_string(), crate::metrics::dead_reason_kind(reason)),
            Ok(_) => (STRANDED.to_string(), "stranded"),
        };
        tracing::warn!(seq, subject = %m.subject.escape_debug(), %reason, "dead-lettering a stranded job");
        out.push((
            sweep::dead_letter(js, &m, hdrs.as_deref(), &reason).await?,
            kind,
        ));
        *suspect = None;
    }
    Ok(out)
}

/// The lowest sequence below which every consumer of `WEIR_JOBS` has acked all its jobs, or
/// `None` while one of Weir's consumers is missing (nothing can be concluded then). A consumer
/// with nothing pending and nothing unacked has acked everything up to `last` (the stream's
/// last sequence, read before the consumers).
async fn lowest_floor(
    jobs: &Stream,
    partitions: u16,
    last: u64,
) -> Result<Option<u64>, SweepError> {
    let infos: Vec<_> = jobs.consumers().try_collect().await?;
    let ours = |name: &str| {
        name == streams::TRIAGE_CONSUMER
            || (0..partitions).any(|p| name == streams::partition_consumer(p))
    };
    if infos.iter().filter(|i| ours(&i.name)).count() != usize::from(partitions) + 1 {
        return Ok(None);
    }
    Ok(infos
        .iter()
        .map(|i| match (i.num_pending, i.num_ack_pending) {
            (0, 0) => i.ack_floor.stream_sequence.max(last),
            _ => i.ack_floor.stream_sequence,
        })
        .min())
}
