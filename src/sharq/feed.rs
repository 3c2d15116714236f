//! A queue type's feeder: the task that keeps released jobs prefetched for dequeues, refreshes
//! their `ack_wait` while they wait, and dead-letters jobs whose requeues are used up.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::Message;
use async_nats::jetstream::{AckKind, Context};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::dequeue::{BUFFER, MARGIN, REQUEUE_LIMIT_REASON};
use super::{JobEvent, JobState, StatusHook};
use crate::job::header as h;

/// A released job ready to hand out.
pub(super) struct Ready {
    pub(super) msg: Message,
    /// Its `WEIR_RELEASED` sequence.
    pub(super) seq: u64,
    /// When its `ack_wait` (last) started, as far as Weir knows.
    pub(super) got: Instant,
    pub(super) queue_id: String,
    pub(super) job_id: String,
    pub(super) requeues: u32,
    pub(super) requeues_remaining: i64,
    pub(super) enqueued_at: Option<u64>,
    pub(super) released_at: Option<u64>,
}

/// One queue type's prefetched jobs.
pub(super) struct Feeder {
    pub(super) buf: Mutex<VecDeque<Ready>>,
    /// Deleted queues whose jobs are dropped as they arrive: `(queue_id, below, until)`, jobs
    /// under `WEIR_RELEASED` sequence `below`, for deliveries already on their way when the
    /// queue was deleted. Locked only inside `buf`'s lock, so a drop and an arrival never cross.
    pub(super) fences: Mutex<Vec<(String, u64, Instant)>>,
    /// Whether `fences` has any: an arriving job costs no lock and no clock read without one.
    /// Written only inside `buf`'s lock.
    pub(super) fencing: AtomicBool,
    pub(super) arrived: Notify,
    pub(super) room: Notify,
}

/// How long a deleted queue's prefetched jobs are dropped as they arrive: deliveries the
/// server sent before the queue's jobs were purged are on their way for milliseconds.
pub(super) const FENCE: Duration = Duration::from_secs(10);

/// A feeder's task and what it needs.
pub(super) struct Feed {
    pub(super) feeder: Arc<Feeder>,
    pub(super) consumer: PullConsumer,
    pub(super) queue_type: String,
    pub(super) js: Context,
    pub(super) ack_wait: Duration,
    pub(super) default_limit: i64,
    pub(super) status: Arc<dyn StatusHook>,
}

impl Feed {
    pub(super) async fn run(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.ack_wait / 6);
        loop {
            let room = BUFFER - self.feeder.buf.lock().expect("lock").len();
            if room < BUFFER / 2 {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = self.feeder.room.notified() => {}
                    _ = tick.tick() => self.refresh().await,
                }
                continue;
            }
            let batch = self
                .consumer
                .batch()
                .max_messages(room)
                .expires(Duration::from_secs(2))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(queue_type = %self.queue_type, error = %e, "cannot pull released jobs; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => self.refresh().await,
                    m = batch.next() => match m {
                        Some(Ok(m)) => self.accept(m).await,
                        Some(Err(e)) => {
                            // A broken pull (NATS away): pull again shortly, never spin.
                            tracing::debug!(error = %e, "pull error");
                            tokio::select! {
                                _ = cancel.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_millis(100)) => break,
                            }
                        }
                        None => break,
                    },
                }
            }
        }
    }

    /// Progress acks for buffered jobs a third of the way to their `ack_wait`.
    async fn refresh(&self) {
        let due: Vec<Message> = {
            let mut b = self.feeder.buf.lock().expect("lock");
            let now = Instant::now();
            b.iter_mut()
                .filter(|r| now - r.got > self.ack_wait / 3)
                .map(|r| {
                    r.got = now;
                    r.msg.clone()
                })
                .collect()
        };
        for m in due {
            let _ = m.ack_with(AckKind::Progress).await;
        }
    }

    /// Buffers a delivered job, or dead-letters it when its requeues are used up.
    async fn accept(&self, m: Message) {
        let got = Instant::now();
        let Ok((delivered, seq)) = m.info().map(|i| (i.delivered.max(1), i.stream_sequence)) else {
            return;
        };
        let hdr = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|hm| hm.get(name))
                .map(|v| v.as_str().to_string())
        };
        let limit = hdr(crate::job::header::REQUEUE_LIMIT)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(self.default_limit);
        let job_id = hdr(crate::job::header::JOB_ID).unwrap_or_else(|| seq.to_string());
        let queue_id = m
            .subject
            .strip_prefix("released.")
            .and_then(|r| r.split_once('.'))
            .map_or(String::new(), |(_, q)| q.to_string());
        let requeues = (delivered - 1) as u32;
        let time = |name| hdr(name).and_then(|v| v.parse().ok());
        let event = |state, reason| JobEvent {
            job_id: &job_id,
            queue_type: &self.queue_type,
            queue_id: &queue_id,
            state,
            requeues,
            reason,
            at_ms: super::now_ms(),
            enqueued_at: time(h::ENQUEUED_AT),
            released_at: time(h::RELEASED_AT),
            sequence: None,
            after_purge: false,
        };
        if limit >= 0 && i64::from(requeues) > limit {
            let reason = format!("{REQUEUE_LIMIT_REASON}: not finished after {delivered} deliveries (requeue_limit {limit})");
            let headers = crate::dead::headers_with(
                m.headers.clone(),
                &m.subject,
                &reason,
                format!("{}:{seq}", crate::job::RELEASED_STREAM),
            );
            let subject = crate::job::dead_subject(Some((&self.queue_type, &queue_id)));
            let stored = match self
                .js
                .publish_with_headers(subject, headers, m.payload.clone())
                .await
            {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            };
            if stored {
                let _ = m.ack().await;
                tracing::info!(%job_id, queue_type = %self.queue_type, %queue_id, "requeue limit reached: dead-lettered");
                self.status
                    .record(&event(JobState::Dead, Some(REQUEUE_LIMIT_REASON)));
            } else {
                let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
            }
            return;
        }
        if requeues > 0 {
            self.status.record(&event(JobState::Requeued, None));
        }
        let ready = Ready {
            got,
            requeues_remaining: if limit < 0 {
                -1
            } else {
                limit - i64::from(requeues)
            },
            requeues,
            enqueued_at: time(h::ENQUEUED_AT),
            released_at: time(h::RELEASED_AT),
            queue_id,
            job_id,
            seq,
            msg: m,
        };
        let dropped = {
            let mut b = self.feeder.buf.lock().expect("lock");
            if self.feeder.fenced(&ready.queue_id, seq) {
                Some(ready.msg)
            } else {
                b.push_back(ready);
                None
            }
        };
        match dropped {
            // Its queue was deleted: the stream no longer has it.
            Some(m) => {
                let _ = m.ack().await;
            }
            None => self.feeder.arrived.notify_one(),
        }
    }
}

impl Feeder {
    pub(super) fn new() -> Feeder {
        Feeder {
            buf: Mutex::new(VecDeque::with_capacity(BUFFER)),
            fences: Mutex::new(Vec::new()),
            fencing: AtomicBool::new(false),
            arrived: Notify::new(),
            room: Notify::new(),
        }
    }

    /// Takes the buffered jobs of deleted queue `queue_id` under `WEIR_RELEASED` sequence
    /// `below` out of the buffer, and drops those that arrive for [`FENCE`]. The caller acks
    /// them.
    pub(super) fn drop_queue(&self, queue_id: &str, below: u64) -> Vec<Message> {
        let mut b = self.buf.lock().expect("lock");
        {
            let mut f = self.fences.lock().expect("lock");
            let now = Instant::now();
            f.retain(|(_, _, until)| *until > now);
            f.push((queue_id.to_string(), below, now + FENCE));
            self.fencing.store(true, Relaxed);
        }
        let mut dropped = Vec::new();
        b.retain(|r| {
            let take = r.queue_id == queue_id && r.seq < below;
            if take {
                dropped.push(r.msg.clone());
            }
            !take
        });
        dropped
    }

    /// Whether a job of `queue_id` at `seq` belongs to a queue deleted meanwhile. Called with
    /// `buf` locked.
    fn fenced(&self, queue_id: &str, seq: u64) -> bool {
        if !self.fencing.load(Relaxed) {
            return false;
        }
        let mut f = self.fences.lock().expect("lock");
        let now = Instant::now();
        f.retain(|(_, _, until)| *until > now);
        self.fencing.store(!f.is_empty(), Relaxed);
        f.iter().any(|(q, below, _)| q == queue_id && seq < *below)
    }

    /// The `WEIR_RELEASED` sequences of the buffered jobs of `queue_id`.
    pub(super) fn seqs(&self, queue_id: &str) -> Vec<u64> {
        let b = self.buf.lock().expect("lock");
        b.iter()
            .filter(|r| r.queue_id == queue_id)
            .map(|r| r.seq)
            .collect()
    }

    /// Buffered jobs of `queue_id` delivered at or before stream sequence `upto`.
    pub(super) fn count(&self, queue_id: &str, upto: u64) -> u64 {
        let b = self.buf.lock().expect("lock");
        b.iter()
            .filter(|r| r.seq <= upto && r.queue_id == queue_id)
            .count() as u64
    }

    /// The oldest buffered job still well within its `ack_wait` (older ones are left to
    /// JetStream's redelivery).
    pub(super) fn pop(&self, ack_wait: Duration) -> Option<Ready> {
        let mut b = self.buf.lock().expect("lock");
        let out = loop {
            match b.pop_front() {
                Some(r) if r.got.elapsed() + MARGIN < ack_wait => break Some(r),
                Some(_) => continue,
                None => break None,
            }
        };
        if b.len() < BUFFER / 2 {
            self.room.notify_one();
        }
        out
    }
}
