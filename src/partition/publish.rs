//! Carrying a released job on: publish it (one of a window of publishes in flight), and once
//! JetStream acks the publish, ack its source and record its status.

use super::*;

impl Partition {
    /// Publishes a job the scheduler released (unless an older job of its key was refused
    /// meanwhile: then it goes back behind that one).
    pub(super) async fn release(&mut self, key: crate::scheduler::Key, held: Held<Job>) {
        let Held {
            src_seq,
            park_seq,
            job,
        } = held;
        // Decided before an older job of its key was refused: hand it back too, behind that one.
        // Checked only for a while after a refusal, so the usual path pays nothing.
        if self
            .backoff
            .refused_within(tokio::time::Instant::now(), self.fence_for)
            && self.sched.behind_refused(&key, src_seq, park_seq)
        {
            if let Some(a) = job.acker {
                let until = Nanos::new(now().as_u64() + self.fence_for.as_nanos() as u64);
                self.sched.fence_one(&key, src_seq, until);
                nak(a, Some(release::Backoff::FIRST)).await;
            }
            self.sched.release_done(&key, park_seq, false, now());
            return;
        }
        let mut h = job.headers.unwrap_or_default();
        let released_ms = release::unix_ms();
        let fresh_route = park_seq
            .is_none()
            .then(|| job::parse_stored(&job.subject).expect("validated when offered"));
        let (dest, enqueued_ms) = match &fresh_route {
            Some(route) => {
                release::stamp(&mut h, &key, route.dest, job.enqueued_ms, || {
                    job::derived_msg_id(src_seq)
                });
                (Cow::Borrowed(route.dest), job.enqueued_ms)
            }
            None => {
                let get = |name| h.get(name).map(|v| v.as_str());
                let dest = get(header::DESTINATION).unwrap_or_default().to_string();
                let enq = get(header::ENQUEUED_AT).and_then(|v| v.parse().ok());
                (Cow::Owned(dest), enq.unwrap_or(released_ms))
            }
        };
        self.metrics
            .released(&dest, released_ms.saturating_sub(enqueued_ms));
        if self.tracing.is_enabled() {
            self.tracing
                .hold(&mut h, &dest, &key, enqueued_ms, released_ms);
        }
        let mut status = self.status_of(Some(&h), JobState::Released, &dest, &key);
        if let Some(rec) = status.as_mut() {
            rec.queued_at = Some(enqueued_ms);
            rec.released_at = Some(released_ms);
            rec.parked_at = h
                .get(header::PARKED_AT)
                .and_then(|v| v.as_str().parse().ok());
        }
        // Recorded now, before the publish, not once it is acked: a worker can dequeue and
        // finish the job before the partition has seen the ack, and a `released` record
        // written then would overwrite its `finished` (status records are last-writer-wins).
        // Queued before the job is even published, it would have to be overtaken by a whole
        // store, delivery and dequeue. If the publish fails, the job is released again later
        // and recorded again.
        if let Some(rec) = status {
            self.status.record(&rec);
        }
        let subject = job::released_subject(&dest, &key);
        release::stamp_released(&mut h, released_ms);
        let tag = Tag::Release {
            key,
            src_seq,
            park_seq,
            acker: job.acker,
        };
        if let Err((e, tag)) = self.pubs.publish(subject, h, job.payload, tag).await {
            self.on_published(Err(e), tag).await;
        }
    }

    /// Whether new publishes may go out now (see [`Partition::in_doubt`]).
    pub(super) fn may_publish(&mut self) -> bool {
        use async_nats::connection::State;
        if self.client.connection_state() != State::Connected {
            self.in_doubt = true;
            self.graced = false;
            // Look again shortly; the hold also stops reading.
            self.backoff
                .pause(tokio::time::Instant::now(), Duration::from_millis(50));
            return false;
        }
        if self.in_doubt {
            if !self.pubs.is_empty() {
                // Connected again: acks of what went out on the old connection are gone with
                // it, and what the client queued meanwhile is acked within a round trip. Waiting
                // out the full 5 s held the partition (and a poison's next delivery, which tells
                // the sweep about it) for nothing.
                if !self.graced {
                    self.graced = true;
                    self.pubs.shorten_deadlines(
                        tokio::time::Instant::now() + release::RECONNECT_ACK_GRACE,
                    );
                }
                return false;
            }
            self.in_doubt = false;
        }
        self.backoff.until().is_none()
    }

    pub(super) async fn on_published(
        &mut self,
        res: Result<
            async_nats::jetstream::publish::PublishAck,
            async_nats::jetstream::context::PublishError,
        >,
        tag: Tag,
    ) {
        // A refused publish: the job goes back to JetStream after the backoff's delay, never
        // acked, and its key is fenced on it so nothing newer of the key overtakes it.
        let retry = match &res {
            Ok(ack) => {
                if ack.duplicate {
                    self.metrics.duplicate();
                }
                self.backoff.published(tokio::time::Instant::now(), self.id);
                None
            }
            Err(e) => {
                self.metrics.refused();
                Some(
                    self.backoff
                        .refused(tokio::time::Instant::now(), self.id, e),
                )
            }
        };
        let ok = retry.is_none();
        let fence_until = || Nanos::new(now().as_u64() + self.fence_for.as_nanos() as u64);
        match tag {
            Tag::Release {
                key,
                src_seq,
                park_seq,
                acker,
            } => {
                if let Some(a) = acker {
                    if ok {
                        ack(a).await
                    } else {
                        self.sched.fence_one(&key, src_seq, fence_until());
                        nak(a, retry).await
                    }
                }
                self.sched.release_done(&key, park_seq, ok, now());
            }
            Tag::Park {
                key,
                src_seq,
                acker,
                status,
            } => {
                self.record(ok, status);
                if ok {
                    ack(acker).await
                } else {
                    self.sched.fence_one(&key, src_seq, fence_until());
                    nak(acker, retry).await
                }
                self.sched.parked(&key, ok, now());
            }
            Tag::Dead { acker, status, .. } => {
                self.record(ok, status);
                if ok {
                    ack(acker).await
                } else {
                    nak(acker, retry).await
                }
            }
        }
    }

    /// Records a job's status once the publish that moved it is acked.
    pub(super) fn record(&self, ok: bool, status: Status) {
        if let (true, Some(rec)) = (ok, status) {
            self.status.record(&rec);
        }
    }
}
