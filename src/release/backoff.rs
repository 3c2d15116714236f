//! Backing off when JetStream refuses publishes.
//!
//! A publish can be refused for reasons that pass: `WEIR_RELEASED` at its limits with
//! `discard: new` (downstream stopped consuming), a stream leader election, a NATS restart, an
//! ack that timed out. The job is never acked then: it goes back to JetStream (a NAK with this
//! backoff's delay) and its key is fenced, so nothing newer of that key overtakes it. Meanwhile
//! the partition stops publishing and reading for the delay, which doubles on every refusal in a
//! row (from [`Backoff::FIRST`] to [`Backoff::MAX`]) and resets on the first success: a full
//! stream costs one probe per partition every couple of seconds, not a storm of NAKs and logs.
//!
//! The log says when an episode starts, every [`Backoff::LOG_EVERY`] while it lasts, and when it
//! ends; `weir_publish_refused_total` counts every refusal.

use std::fmt::Display;
use std::time::Duration;

use tokio::time::Instant;

/// One partition's publish backoff. Time comes from the caller (tokio's clock), so tests can
/// pause and advance it.
#[derive(Debug, Default)]
pub struct Backoff {
    /// The current delay; zero while publishes succeed.
    delay: Duration,
    /// No publishing before this instant.
    until: Option<Instant>,
    /// Refusals in the current episode, and when it started.
    refused: u64,
    since: Option<Instant>,
    last_log: Option<Instant>,
    /// The latest refusal, kept across episodes: releases decided before it may have to yield
    /// to the job it handed back.
    last_refusal: Option<Instant>,
}

impl Backoff {
    /// The first delay: short, so a single refusal (a leader moving) costs little.
    pub const FIRST: Duration = Duration::from_millis(50);
    /// The longest delay. Below the consumer's idle heartbeat (5 s), so a partition that stops
    /// reading for a delay does not miss two heartbeats and rebind.
    pub const MAX: Duration = Duration::from_secs(2);
    /// How often a long episode is logged again.
    pub const LOG_EVERY: Duration = Duration::from_secs(10);

    /// A publish was refused: returns the delay before the job should come back.
    pub fn refused(&mut self, now: Instant, partition: u16, error: &dyn Display) -> Duration {
        self.delay = if self.delay.is_zero() {
            Self::FIRST
        } else {
            (self.delay * 2).min(Self::MAX)
        };
        self.until = Some(now + self.delay);
        self.refused += 1;
        self.last_refusal = Some(now);
        let since = *self.since.get_or_insert(now);
        let due = self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Self::LOG_EVERY);
        if due {
            self.last_log = Some(now);
            if self.refused == 1 {
                tracing::warn!(partition, %error, "JetStream refused a publish; holding jobs (not acked) and retrying with backoff");
            } else {
                tracing::warn!(
                    partition,
                    %error,
                    refused = self.refused,
                    for_s = now.duration_since(since).as_secs(),
                    retry_ms = self.delay.as_millis() as u64,
                    "JetStream still refuses publishes; holding jobs and retrying"
                );
            }
        }
        self.delay
    }

    /// A publish succeeded: the episode, if any, is over.
    #[inline]
    pub fn published(&mut self, now: Instant, partition: u16) {
        if self.refused == 0 {
            return;
        }
        let since = self.since.take().unwrap_or(now);
        tracing::info!(
            partition,
            refused = self.refused,
            after_ms = now.duration_since(since).as_millis() as u64,
            "publishing again"
        );
        *self = Backoff {
            last_refusal: self.last_refusal,
            ..Backoff::default()
        };
    }

    /// Whether a publish was refused within `window` before `now`.
    #[inline]
    pub fn refused_within(&self, now: Instant, window: std::time::Duration) -> bool {
        self.last_refusal
            .is_some_and(|t| now.duration_since(t) < window)
    }

    /// True while the partition should neither publish nor read new jobs.
    #[inline]
    pub fn holding(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// Hold for `d` without counting a refusal: the connection is down, publishing now would
    /// only queue in the client.
    pub fn pause(&mut self, now: Instant, d: Duration) {
        let until = now + d;
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
    }

    /// When holding ends, if it has not yet.
    pub fn until(&self) -> Option<Instant> {
        self.until
    }

    /// The instant holding ended has passed: forget it (the delay stays until a success).
    pub fn expired(&mut self) {
        self.until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn doubles_up_to_the_max_and_resets_on_success() {
        let mut b = Backoff::default();
        let t0 = Instant::now();
        assert!(!b.holding(t0));
        let mut delays = Vec::new();
        for _ in 0..8 {
            delays.push(b.refused(Instant::now(), 0, &"full").as_millis());
        }
        assert_eq!(delays, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert!(b.holding(Instant::now()));
        tokio::time::advance(Backoff::MAX).await;
        assert!(!b.holding(Instant::now()), "holding ends after the delay");
        b.published(Instant::now(), 0);
        assert!(b.until().is_none());
        assert_eq!(b.refused(Instant::now(), 0, &"full"), Backoff::FIRST);
    }
}
