//! Publishing with pipelined acks, and the headers a released job carries.
//!
//! A source message is acked only after the publish that carries it on (to `WEIR_RELEASED`,
//! `WEIR_PARK` or `WEIR_DEAD`) is acknowledged by JetStream. Waiting for each ack would cap a
//! partition at one job per round trip, so publishes are pipelined: up to `window` acks are in
//! flight, collected in send order (JetStream answers a connection's publishes in order, so
//! polling the oldest first costs nothing).
//!
//! Each publish gets [`ACK_TIMEOUT`] from when it was sent. async-nats starts its own ack timer
//! only when the ack future is first polled, and only the oldest is polled: after a broken
//! connection, N lost acks would otherwise time out one after another, N times 5 s, while the
//! partition holds everything behind them (seen as a partition stalled for more than 10 s).

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::header::{HeaderMap, HeaderName};
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::Context;
use bytes::Bytes;

use crate::job::header;

pub mod backoff;
pub use backoff::Backoff;

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

/// How long a publish waits for its ack, counted from when it was sent (async-nats' context
/// default, which it counts from the first poll).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long publishes still in flight when the connection comes back wait for their acks. Those
/// sent on the old connection lost their acks with it; those the client queued meanwhile went
/// out on the new one and are acked within a round trip. A publish that was stored but timed out
/// here is retried, and `WEIR_RELEASED`'s duplicate window drops the copy.
pub const RECONNECT_ACK_GRACE: Duration = Duration::from_secs(1);

/// Publishes in flight, each with its deadline and the tag that says what to do once it is
/// acknowledged.
pub struct Pipeline<T> {
    js: Context,
    inflight: VecDeque<(AckFuture, tokio::time::Instant, T)>,
    window: usize,
    /// One timer for the oldest publish's deadline, reset as the oldest changes (no timer per
    /// publish); made on first need, inside the runtime.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: Option<tokio::time::Instant>,
}

impl<T> Pipeline<T> {
    pub fn new(js: Context, window: usize) -> Self {
        Pipeline {
            js,
            inflight: VecDeque::with_capacity(window),
            window: window.max(1),
            timer: None,
            armed: None,
        }
    }

    pub fn len(&self) -> usize {
        self.inflight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    /// True when no more publishes may start until some are acknowledged.
    pub fn is_full(&self) -> bool {
        self.inflight.len() >= self.window
    }

    /// The tags of the publishes in flight, oldest first.
    pub fn tags(&self) -> impl Iterator<Item = &T> {
        self.inflight.iter().map(|(_, _, t)| t)
    }

    /// Sends a publish; its ack is collected later by [`Pipeline::next_ack`]. A publish that
    /// could not even be sent comes back at once, with its tag.
    pub async fn publish(
        &mut self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
        tag: T,
    ) -> Result<(), (PublishError, T)> {
        match self
            .js
            .publish_with_headers(subject, headers, payload)
            .await
        {
            Ok(ack) => {
                let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
                self.inflight.push_back((ack.into_future(), deadline, tag));
                Ok(())
            }
            Err(e) => Err((e, tag)),
        }
    }

    /// Gives every publish in flight at most until `until` (after a reconnect; see
    /// [`RECONNECT_ACK_GRACE`]).
    pub fn shorten_deadlines(&mut self, until: tokio::time::Instant) {
        for (_, deadline, _) in self.inflight.iter_mut() {
            if *deadline > until {
                *deadline = until;
            }
        }
    }

    /// The oldest publish's outcome, once it is known.
    pub fn next_ack(
        &mut self,
    ) -> impl Future<Output = Option<(Result<PublishAck, PublishError>, T)>> + '_ {
        std::future::poll_fn(move |cx: &mut TaskContext<'_>| self.poll_next(cx))
    }

    fn poll_next(
        &mut self,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<(Result<PublishAck, PublishError>, T)>> {
        let Some((fut, deadline, _)) = self.inflight.front_mut() else {
            return Poll::Ready(None);
        };
        let res = match fut.as_mut().poll(cx) {
            Poll::Ready(res) => res,
            Poll::Pending => {
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(*deadline)));
                if self.armed != Some(*deadline) {
                    timer.as_mut().reset(*deadline);
                    self.armed = Some(*deadline);
                }
                match timer.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => Err(PublishError::new(PublishErrorKind::TimedOut)),
                }
            }
        };
        let (_, _, tag) = self.inflight.pop_front().expect("front");
        Poll::Ready(Some((res, tag)))
    }
}

/// Whether a failed publish is worth retrying later (the job is handed back, not lost, either way).
pub fn is_transient(e: &PublishError) -> bool {
    !matches!(e.kind(), PublishErrorKind::MaxPayloadExceeded)
}

/// Wall-clock Unix milliseconds, for the `Weir-*-At` headers only (never for decisions).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// Header names built once: inserting by `&str` would parse (and allocate) the name per job.
const MSG_ID: HeaderName = HeaderName::from_static(header::MSG_ID);
const KEY: HeaderName = HeaderName::from_static(header::KEY);
const DESTINATION: HeaderName = HeaderName::from_static(header::DESTINATION);
const ENQUEUED_AT: HeaderName = HeaderName::from_static(header::ENQUEUED_AT);
const RELEASED_AT: HeaderName = HeaderName::from_static(header::RELEASED_AT);
const PRODUCER_MSG_ID: HeaderName = HeaderName::from_static(header::PRODUCER_MSG_ID);

/// Adds Weir's headers for a fresh job: the key, destination, enqueue time and message id.
/// Producer headers are kept, except that the `Nats-Msg-Id` is always the derived one (unique
/// per source job); a producer's own moves to `Weir-Producer-Msg-Id` ([`set_msg_id`]).
pub fn stamp(
    headers: &mut HeaderMap,
    key: &str,
    dest: &str,
    enqueued_ms: u64,
    msg_id: impl FnOnce() -> String,
) {
    set_msg_id(headers, msg_id());
    headers.insert(KEY, key);
    headers.insert(DESTINATION, dest);
    headers.insert(ENQUEUED_AT, itoa(enqueued_ms));
}

/// Sets `Nats-Msg-Id` to `derived` (see [`crate::job::derived_msg_id`]). A producer's own id
/// differs: it is moved to `Weir-Producer-Msg-Id`, never dropped silently and never used
/// downstream for deduplication. JetStream drops a producer's reused id only within the
/// `WEIR_JOBS` duplicate window; outside it two stored jobs can share an id, and a release,
/// park or dead letter carrying it would be taken for a duplicate of the other and lost.
/// Moving the value rather than copying it keeps the growth of the headers bounded (see
/// [`crate::streams::HEADER_ROOM`]); if a producer sent several `Nats-Msg-Id` values, the first
/// (the one JetStream deduplicated on) is kept.
pub fn set_msg_id(headers: &mut HeaderMap, derived: String) {
    if let Some(own) = headers.get(MSG_ID) {
        if own.as_str() == derived {
            return;
        }
        let own = own.clone();
        headers.insert(PRODUCER_MSG_ID, own);
    }
    headers.insert(MSG_ID, derived);
}

/// Marks the moment of release.
pub fn stamp_released(headers: &mut HeaderMap, released_ms: u64) {
    headers.insert(RELEASED_AT, itoa(released_ms));
}

fn itoa(n: u64) -> String {
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producer_msg_id_is_kept_aside() {
        let mut h = HeaderMap::new();
        h.insert(header::MSG_ID, "mine");
        h.insert("X-Trace", "t1");
        stamp(&mut h, "acme", "sms", 42, || "derived".into());
        assert_eq!(h.get(header::MSG_ID).unwrap().as_str(), "derived");
        assert_eq!(h.get(header::PRODUCER_MSG_ID).unwrap().as_str(), "mine");
        // Stamped again (a parked job read back): nothing moves twice.
        stamp(&mut h, "acme", "sms", 42, || "derived".into());
        assert_eq!(h.get(header::PRODUCER_MSG_ID).unwrap().as_str(), "mine");
        assert_eq!(h.get("X-Trace").unwrap().as_str(), "t1");
        assert_eq!(h.get(header::ENQUEUED_AT).unwrap().as_str(), "42");
        let mut h = HeaderMap::new();
        stamp(&mut h, "acme", "sms", 42, || "derived".into());
        assert_eq!(h.get(header::MSG_ID).unwrap().as_str(), "derived");
        assert!(h.get(header::PRODUCER_MSG_ID).is_none());
        assert_eq!(h.get(header::KEY).unwrap().as_str(), "acme");
    }
}
