//! `weir load`: a load generator for any NATS server with JetStream.
//!
//! It publishes jobs to `jobs.<destination>.<key>` through JetStream and waits for every publish
//! ack, so a job counts as *acked* only once the stream has stored it. [`publish`] is the
//! library entry point; `weir demo` and `weir bench` call it too.
//!
//! - **Keys and count.** Jobs go round-robin over the keys; `count` is **per key** (so
//!   `--key-count 100 --count 50` publishes 5000 jobs), 0 meaning "until `--seconds` or Ctrl-C".
//! - **Rate** is per key, in jobs per second; 0 publishes as fast as the ack window allows.
//!   The schedule is open-loop: job `i` is due at `i / (rate × keys)` seconds after the start,
//!   whatever happened before. A tokio interval only wakes the loop (`MissedTickBehavior::Delay`,
//!   so a stall does not queue up a string of immediate ticks); after a stall, everything that
//!   fell due is sent at once, so a slow server does not silently lower the offered load.
//! - **Window.** Up to `window` publishes await their ack at once, in send order. A publish
//!   that fails (send error, error ack or ack timeout) is counted in `failed`, never retried.
//! - **Payload.** `payload` bytes; when that is at least 8, the first 8 bytes are the job's
//!   sequence number within its key (big-endian `u64`, from 0), so a consumer can check that
//!   a key's jobs arrive in order ([`seq_of`]). The rest is `b'x'` filler.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::Context;
use async_nats::Subject;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::job::check_token;

mod cli;
pub use cli::{main, LoadArgs};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What to publish.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub destination: String,
    pub keys: Vec<String>,
    /// Jobs per second per key; 0 = as fast as possible.
    pub rate: f64,
    /// Jobs per key; 0 = no limit (stop on `duration` or [`Progress::stop`]).
    pub count: u64,
    /// Paced: publish the jobs due in this time (`rate × keys × duration`, even if the server
    /// falls behind); unpaced: stop sending when it is over.
    pub duration: Option<Duration>,
    /// Payload size in bytes (the first 8 carry the sequence when there is room).
    pub payload: usize,
    /// Publish acks awaited at once. Give the [`Context`] at least this `max_ack_inflight`.
    pub window: usize,
}

impl LoadSpec {
    /// How many jobs this spec publishes, if that is known in advance. Paced, a duration means
    /// exactly the jobs due within it; unpaced, it is a deadline.
    pub fn planned(&self) -> Option<u64> {
        let total_rate = self.rate * self.keys.len() as f64;
        let by_time = match self.duration {
            Some(d) if total_rate > 0.0 => {
                Some((d.as_secs_f64() * total_rate - 1e-9).ceil() as u64)
            }
            _ => None,
        };
        let by_count = (self.count > 0).then(|| self.count.saturating_mul(self.keys.len() as u64));
        by_count.into_iter().chain(by_time).min()
    }
}

/// Live counters of a running load, and a switch to stop it early. Share it (e.g. in an `Arc`)
/// with whatever displays progress.
#[derive(Debug, Default)]
pub struct Progress {
    /// Publishes sent (their ack may still be pending).
    pub sent: AtomicU64,
    /// Publishes stored by JetStream.
    pub acked: AtomicU64,
    pub failed: AtomicU64,
    stop: CancellationToken,
}

impl Progress {
    /// Stops sending; publishes in flight are still awaited and counted.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// What a finished load did.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    /// From the first publish to the last ack.
    pub elapsed: Duration,
    pub first_error: Option<String>,
}

impl LoadReport {
    /// Acked jobs per second.
    pub fn rate(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Why a load could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid load: {0}")]
    Invalid(String),
    #[error("publish refused: {0}")]
    Refused(String),
}

/// The per-key sequence number a payload from [`publish`] carries, if it is long enough.
pub fn seq_of(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

fn payload(template: &[u8], seq: u64) -> Bytes {
    let mut b = template.to_vec();
    if b.len() >= 8 {
        b[..8].copy_from_slice(&seq.to_be_bytes());
    }
    Bytes::from(b)
}

type Ack = BoxFuture<'static, Result<(), String>>;

/// Publishes `spec` through `js`, updating `progress` as it goes, until the count is reached,
/// the duration is over or [`Progress::stop`] is called; then awaits the acks still in flight.
pub async fn publish(
    js: &Context,
    spec: &LoadSpec,
    progress: Option<&Progress>,
) -> Result<LoadReport, LoadError> {
    check_token(&spec.destination).map_err(|e| LoadError::Invalid(format!("destination {e}")))?;
    if spec.keys.is_empty() {
        return Err(LoadError::Invalid("no keys".into()));
    }
    for k in &spec.keys {
        check_token(k).map_err(|e| LoadError::Invalid(format!("key {k:?} {e}")))?;
    }
    if !spec.rate.is_finite() || spec.rate < 0.0 {
        return Err(LoadError::Invalid(format!("rate {} jobs/s", spec.rate)));
    }
    let subjects: Vec<Subject> = (spec.keys.iter())
        .map(|k| Subject::from(format!("jobs.{}.{k}", spec.destination)))
        .collect();
    let nkeys = subjects.len() as u64;
    let total_rate = spec.rate * nkeys as f64;
    let total = spec.planned();
    let template = vec![b'x'; spec.payload];
    let window = spec.window.max(1);
    let local = Progress::default();
    let p = progress.unwrap_or(&local);
    let mut report = LoadReport::default();

    let start = Instant::now();
    let deadline = (spec.duration.filter(|_| total_rate == 0.0)).map(|d| start + d);
    // Only wakes the loop when paced; what is due is computed from the elapsed time.
    let period = Duration::from_secs_f64(1.0 / total_rate.max(1e-6)).max(Duration::from_millis(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut inflight: FuturesOrdered<Ack> = FuturesOrdered::new();
    let mut i: u64 = 0;
    let mut sending = true;
    let record = |res: Result<(), String>, report: &mut LoadReport| match res {
        Ok(()) => {
            report.acked += 1;
            p.acked.fetch_add(1, Relaxed);
        }
        Err(e) => {
            report.failed += 1;
            p.failed.fetch_add(1, Relaxed);
            report.first_error.get_or_insert(e);
        }
    };
    loop {
        if sending
            && (p.stop.is_cancelled()
                || total.is_some_and(|t| i >= t)
                || deadline.is_some_and(|d| Instant::now() >= d))
        {
            sending = false;
        }
        if !sending && inflight.is_empty() {
            break;
        }
        let due = if total_rate > 0.0 {
            (start.elapsed().as_secs_f64() * total_rate + 1e-9) as u64 + 1
        } else {
            u64::MAX
        };
        if sending && i < due && inflight.len() < window {
            let k = (i % nkeys) as usize;
            let body = payload(&template, i / nkeys);
            i += 1;
            report.sent += 1;
            p.sent.fetch_add(1, Relaxed);
            match js.publish(subjects[k].clone(), body).await {
                Ok(ack) => inflight.push_back(Box::pin(async move {
                    ack.await.map(drop).map_err(|e| e.to_string())
                })),
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    return Err(LoadError::Refused(e.to_string()))
                }
                Err(e) => record(Err(e.to_string()), &mut report),
            }
            // Collect acks that are already in, without waiting.
            while let Some(Some(res)) = inflight.next().now_or_never() {
                record(res, &mut report);
            }
            continue;
        }
        tokio::select! {
            biased;
            _ = p.stop.cancelled(), if sending => sending = false,
            Some(res) = inflight.next(), if !inflight.is_empty() => record(res, &mut report),
            _ = tick.tick(), if sending && inflight.len() < window => {}
        }
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_carry_the_sequence() {
        let p = payload(&[b'x'; 16], 258);
        assert_eq!(p.len(), 16);
        assert_eq!(seq_of(&p), Some(258));
        assert_eq!(&p[8..], b"xxxxxxxx");
        assert_eq!(seq_of(&payload(&[b'x'; 4], 7)), None);
    }

    #[test]
    fn planned_counts() {
        let mut s = LoadSpec {
            destination: "sms".into(),
            keys: vec!["a".into(), "b".into()],
            rate: 0.0,
            count: 10,
            duration: None,
            payload: 16,
            window: 8,
        };
        assert_eq!(s.planned(), Some(20));
        s.duration = Some(Duration::from_secs(1));
        assert_eq!(s.planned(), Some(20));
        s.rate = 3.0;
        assert_eq!(s.planned(), Some(6));
        s.count = 0;
        s.rate = 0.0;
        assert_eq!(s.planned(), None);
    }
}
