//! Dead letters: jobs Weir cannot handle go to `WEIR_DEAD` with a `Weir-Dead-Reason` header,
//! never silently away.
//!
//! Subjects that are not `jobs.<destination>.<key>` are not rewritten by the partition transform,
//! so they stay under `jobs.>` in `WEIR_JOBS`; the triage consumer (filters `jobs.*` and
//! `jobs.*.*.>`) sees exactly those, and moves each to `dead.invalid`, acking it only once the dead letter is stored.

use async_nats::header::HeaderMap;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Context};
use futures::StreamExt;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::job::{self, header, DeadReason};
use crate::release::Pipeline;
use crate::status::{JobRecord, JobState, StatusStore};
use async_nats::jetstream::message::Acker;

/// Longest `Weir-Subject` header written, in bytes: a subject can be as long as the server's
/// `max_control_line` (4 KiB by default, more if raised), and the dead letter must still fit in
/// the room `WEIR_JOBS` leaves for Weir's headers ([`crate::streams::HEADER_ROOM`]). A longer
/// subject is cut at a character boundary and marked with how long it was.
pub const MAX_SUBJECT_HEADER: usize = 1024;

/// A dead letter's headers: the producer's, plus the reason and the subject the job came on.
/// The `Nats-Msg-Id` is derived from the job's `WEIR_JOBS` sequence, as for releases, with a
/// producer's own kept in `Weir-Producer-Msg-Id` ([`crate::release::set_msg_id`]).
pub fn headers(
    producer: Option<HeaderMap>,
    subject: &str,
    reason: &DeadReason,
    seq: u64,
) -> HeaderMap {
    headers_with(
        producer,
        subject,
        &reason.to_string(),
        job::derived_msg_id(seq),
    )
}

/// [`headers`] with any reason and message id: a dead letter from another stream than
/// `WEIR_JOBS` (a SHARQ job past its requeue limit, from `WEIR_RELEASED`) derives its id from
/// that stream's sequence, so it cannot clash with a `WEIR_JOBS` one.
pub fn headers_with(
    producer: Option<HeaderMap>,
    subject: &str,
    reason: &str,
    msg_id: String,
) -> HeaderMap {
    let mut h = producer.unwrap_or_default();
    crate::release::set_msg_id(&mut h, msg_id);
    h.insert(header::DEAD_REASON, reason);
    h.insert(header::SUBJECT, subject_header(subject));
    h
}

/// The subject for the `Weir-Subject` header, cut to [`MAX_SUBJECT_HEADER`] bytes.
pub fn subject_header(subject: &str) -> String {
    if subject.len() <= MAX_SUBJECT_HEADER {
        return subject.to_string();
    }
    let mut end = MAX_SUBJECT_HEADER - 32;
    while !subject.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &subject[..end], subject.len())
}

/// Dead-letters every message of the triage consumer until `cancel`.
pub async fn triage(
    js: Context,
    consumer: PullConsumer,
    mut metrics: crate::metrics::PartitionMetrics,
    status: StatusStore,
    cancel: CancellationToken,
) {
    // Each dead letter's acker, and its job's status when it has a `Weir-Job-Id`.
    let mut pubs: Pipeline<(Acker, Option<Box<JobRecord>>)> = Pipeline::new(js, 64);
    // One waiter for the whole run, not one per job.
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    'bind: while !cancel.is_cancelled() {
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "binding the triage consumer failed; retrying");
                tokio::select! {
                    _ = &mut cancelled => break 'bind,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'bind,
                }
            }
        };
        loop {
            tokio::select! {
                biased;
                _ = &mut cancelled => break 'bind,
                Some((res, (acker, rec))) = pubs.next_ack(), if !pubs.is_empty() => {
                    if let (true, Some(rec)) = (res.is_ok(), rec) {
                        status.record(&rec);
                    }
                    settle(res.is_ok(), acker).await
                }
                m = messages.next(), if !pubs.is_full() => match m {
                    Some(Ok(m)) => {
                        let Ok((seq, queued_ms)) = m.info().map(|i| (i.stream_sequence, (i.published.unix_timestamp_nanos() / 1_000_000) as u64)) else {
                            // No sequence, no unique message id: hand it back.
                            let (_, acker) = m.split();
                            settle(false, acker).await;
                            continue;
                        };
                        let (msg, acker) = m.split();
                        let reason = job::triage(&msg.subject);
                        metrics.dead("", crate::metrics::dead_reason_kind(&reason));
                        tracing::info!(subject = %msg.subject, %reason, "dead-lettering a job");
                        let rec = dead_record(&status, msg.headers.as_ref(), &msg.subject, &reason, queued_ms);
                        let h = headers(msg.headers, &msg.subject, &reason, seq);
                        if let Err((_, (acker, _))) = pubs.publish(job::dead_subject(None), h, msg.payload, (acker, rec)).await {
                            settle(false, acker).await;
                        }
                    }
                    Some(Err(e)) => tracing::debug!(error = %e, "triage stream error"),
                    None => continue 'bind,
                },
            }
        }
    }
    while let Some((res, (acker, rec))) = pubs.next_ack().await {
        if let (true, Some(rec)) = (res.is_ok(), rec) {
            status.record(&rec);
        }
        settle(res.is_ok(), acker).await;
    }
}

/// The `dead` record of a triaged job with a `Weir-Job-Id` (status on), else `None`.
fn dead_record(
    status: &StatusStore,
    h: Option<&HeaderMap>,
    subject: &str,
    reason: &DeadReason,
    queued_ms: u64,
) -> Option<Box<JobRecord>> {
    if !status.is_on() {
        return None;
    }
    let id = crate::status::job_id(h)?;
    let (dest, key) = crate::status::guess_route(subject);
    let mut rec = JobRecord::new(id, dest, key, JobState::Dead);
    rec.reason = Some(reason.to_string());
    rec.queued_at = Some(queued_ms);
    rec.dead_at = Some(crate::release::unix_ms());
    Some(Box::new(rec))
}

async fn settle(ok: bool, acker: async_nats::jetstream::message::Acker) {
    let kind = if ok {
        AckKind::Ack
    } else {
        AckKind::Nak(Some(Duration::from_secs(1)))
    };
    if let Err(e) = acker.ack_with(kind).await {
        tracing::debug!(error = %e, "settling a triaged job failed; it will be redelivered");
    }
}
