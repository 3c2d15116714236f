//! Noticing a consumer stream that stopped pulling after a reconnect, and rebinding it.
//!
//! async-nats (0.51) keeps a pull consumer's stream alive across reconnects: a task re-sends the
//! pull request when it sees the connection state go from not connected to connected. It reads
//! the "previous" state afresh on each turn of its loop, though, so when the disconnect and the
//! reconnect both happen before that task runs (a local server that is back within a
//! millisecond, two busy cores, a job that breaks the connection as it is delivered; see
//! [`crate::poison`]), it sees connected twice, sends nothing, and the stream waits for two
//! missed idle heartbeats (10 s at Weir's 5 s) before it pulls again. `tests/hostile.rs` hit this
//! in 4 runs of 75 when three ran at once: its jobs came 10 s late.
//!
//! So after each reconnect, once the partition has been free to read for [`QUIET`] and nothing
//! came, it asks the server for the consumer's info. No pull request waiting while jobs are
//! pending means the stream is stalled, and the partition rebinds (a fresh stream, a fresh pull
//! request). Rebinding loses nothing: with no pull request waiting nothing is on its way to the
//! old stream, and after a quiet second of reading its buffer is empty. At worst a job delivered
//! in between comes back after `ack_wait`.
//!
//! The watch is a plain state machine, driven by the partition's tick and its messages, so the
//! rules can be tested without a server.

use std::time::Duration;
use tokio::time::Instant;

/// How long a partition free to read must hear nothing after a reconnect before it asks.
pub const QUIET: Duration = Duration::from_secs(1);

/// Where a partition is in checking its stream after a reconnect.
#[derive(Debug, Default)]
pub struct StallWatch {
    /// When to ask, if nothing is heard before: set by a reconnect, pushed back while the
    /// partition is not reading, cleared by a message.
    due: Option<Instant>,
    /// A question is out; a message heard meanwhile answers it.
    asking: bool,
    heard: bool,
}

impl StallWatch {
    /// The connection came back (the partition's tick saw the connect count move).
    pub fn reconnected(&mut self, now: Instant) {
        self.due = Some(now + QUIET);
        self.heard = false;
    }

    /// A message arrived: the stream is pulling. Two stores; called per message.
    #[inline]
    pub fn heard(&mut self) {
        self.due = None;
        self.heard = true;
    }

    /// On the partition's tick. `reading`: the partition polls its stream now (not held by a
    /// backoff, publishes in doubt or a full publish window; a stream not polled is not
    /// stalled). True when it is time to ask the server.
    pub fn tick(&mut self, now: Instant, reading: bool) -> bool {
        let Some(due) = self.due else {
            return false;
        };
        if !reading {
            self.due = Some(now + QUIET);
            return false;
        }
        if now < due || self.asking {
            return false;
        }
        self.due = None;
        self.asking = true;
        self.heard = false;
        true
    }

    /// The server's answer: true when the partition should rebind.
    pub fn answered(&mut self, waiting: usize, pending: u64) -> bool {
        self.asking = false;
        !self.heard && waiting == 0 && pending > 0
    }

    /// The question could not be answered (the connection broke again: the next reconnect
    /// starts the watch over).
    pub fn failed(&mut self) {
        self.asking = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn a_quiet_second_after_a_reconnect_asks_once() {
        let t0 = Instant::now();
        let mut w = StallWatch::default();
        assert!(
            !w.tick(at(t0, 0), true),
            "nothing to watch before a reconnect"
        );
        w.reconnected(t0);
        assert!(!w.tick(at(t0, 500), true));
        assert!(w.tick(at(t0, 1000), true));
        assert!(!w.tick(at(t0, 1250), true), "one question per reconnect");
        assert!(w.answered(0, 5), "no pull waiting, jobs pending: stalled");
        assert!(!w.tick(at(t0, 5000), true));
    }

    #[test]
    fn a_message_means_the_stream_pulls() {
        let t0 = Instant::now();
        let mut w = StallWatch::default();
        w.reconnected(t0);
        w.heard();
        assert!(!w.tick(at(t0, 2000), true));
        // Heard while the question was out.
        w.reconnected(at(t0, 3000));
        assert!(w.tick(at(t0, 4000), true));
        w.heard();
        assert!(!w.answered(0, 5));
    }

    #[test]
    fn time_not_reading_does_not_count() {
        let t0 = Instant::now();
        let mut w = StallWatch::default();
        w.reconnected(t0);
        assert!(!w.tick(at(t0, 900), false));
        assert!(
            !w.tick(at(t0, 1500), true),
            "a second of reading, from 900 ms"
        );
        assert!(w.tick(at(t0, 1900), true));
    }

    #[test]
    fn a_waiting_pull_or_nothing_pending_is_not_a_stall() {
        let t0 = Instant::now();
        let mut w = StallWatch::default();
        w.reconnected(t0);
        assert!(w.tick(at(t0, 1000), true));
        assert!(!w.answered(1, 5));
        w.reconnected(at(t0, 2000));
        assert!(w.tick(at(t0, 3000), true));
        assert!(!w.answered(0, 0));
        w.reconnected(at(t0, 4000));
        assert!(w.tick(at(t0, 5000), true));
        w.failed();
        assert!(
            !w.tick(at(t0, 9000), true),
            "a failed question waits for the next reconnect"
        );
    }
}
