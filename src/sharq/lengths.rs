//! Queue lengths: SHARQ's `current_queue_length` and `queue_length`, the jobs of a queue that no
//! worker has had yet.
//!
//! Until a worker dequeues it, a queue's job is in one of four places, and the length adds
//! them up, each counted where it is:
//! - in `WEIR_JOBS` (`weir.in.<p>.<queue_type>.<queue_id>`), waiting for its turn or held for
//!   the rate: a subject-filtered stream info;
//! - parked in `WEIR_PARK` (`park.<p>.<queue_id>`, every destination of the key): another;
//! - released to `WEIR_RELEASED` (`released.<queue_type>.<queue_id>`) and not yet delivered to
//!   the type's consumer `sharq-<queue_type>`: one batched direct get from just past the
//!   consumer's delivered sequence; its `Nats-Num-Pending` header counts the rest. The
//!   consumer's info is read once per type per [`FRESH`]. That count costs the server more as
//!   the stream grows while workers lag, so it is reused for [`RELEASED_FRESH`], and at most
//!   `COUNTING` (4) run at once (a queue whose turn it is not keeps its last count);
//! - delivered to this process's prefetch buffer and not handed out yet: counted in memory.
//!
//! The requests run at once, and a length is reused for [`FRESH`]. The dequeue path's
//! `current_queue_length` ([`QueueLengths::peek`]) recounts all but the released part, which it
//! takes from the last full count (by an enqueue with `max_queued_length`, or
//! `GET /metrics/<queue_type>/<queue_id>/`): it runs thousands of times a second. Jobs prefetched
//! by another Weir process serving the same type (at most [`BUFFER`](super::dequeue::BUFFER) a
//! type and process) are added only by `GET /metrics/<queue_type>/<queue_id>/`, from the
//! sequences the others answer with ([`super::gather`]; see [`QueueLengths::get_upto`]). Not
//! counted: dequeued jobs whose time ran out until JetStream redelivers them. A job delivered
//! within the last [`FRESH`] and already handed out can be counted once more, until the next
//! count.
//!
//! The released part needs direct gets on `WEIR_RELEASED`: Weir makes the stream with
//! `allow_direct`, and [`streams`](crate::streams) turns it on at start for a stream made
//! without it. Where the stream still has none, or the NATS user may not read it, that part is
//! left out (logged once) and tried again a minute later.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::stream::Stream;
use async_nats::{Client, Request, RequestErrorKind, StatusCode};
use futures::StreamExt;

use super::dequeue::{consumer_name, Feeders};
use crate::job;

/// How long a queue length (and a consumer's delivered sequence) is reused.
pub const FRESH: Duration = Duration::from_millis(250);

/// How long a queue's count of released jobs not yet delivered is reused. Longer than
/// [`FRESH`]: the count's cost at the server grows with `WEIR_RELEASED`'s size when workers
/// lag (nats-server counts a subject from the nearer end of the stream, block by block).
pub const RELEASED_FRESH: Duration = Duration::from_secs(1);

/// Queues counted, past which those not counted for [`FORGET`] are forgotten.
const PRUNE_AT: usize = 4096;
const FORGET: Duration = Duration::from_secs(60);

/// Most counts of released jobs in flight at once, per process.
const COUNTING: usize = 4;

/// How long a direct get on `WEIR_RELEASED` may take before the released part is left out.
const DIRECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the released part stays left out after a direct get found no answer.
const RETRY_DIRECT: Duration = Duration::from_secs(60);

/// A queue: its type and id.
type Queue = (String, String);

/// A count of a queue's released jobs past its consumer: when, past which delivered sequence,
/// how many.
type Undelivered = (Instant, u64, u64);

/// A counted length.
#[derive(Clone, Copy)]
struct Length {
    at: Instant,
    n: u64,
    /// Whether it counted the released jobs past the consumer (a count at most
    /// [`RELEASED_FRESH`] old, or the last one when [`COUNTING`] were already running).
    full: bool,
    /// The consumer's delivered sequence the count saw: jobs another process holds prefetched
    /// at or below it are not in `n` ([`QueueLengths::get`]).
    upto: u64,
}

/// Queue lengths, cached for [`FRESH`].
pub struct QueueLengths {
    client: Client,
    jobs: Stream,
    park: Stream,
    released_stream: Stream,
    partitions: u16,
    /// The prefetch buffers of this process's dequeue side.
    feeders: Feeders,
    cache: Mutex<HashMap<Queue, Length>>,
    refreshing: Mutex<HashSet<Queue>>,
    /// Each queue's last count of released jobs not yet delivered.
    released: Mutex<HashMap<Queue, Undelivered>>,
    counting: tokio::sync::Semaphore,
    /// Each type's SHARQ consumer's delivered stream sequence: one read serves all its queues.
    delivered: Mutex<HashMap<String, (Instant, u64)>>,
    /// Until when the released part is left out (no direct get answered).
    no_direct_until: Mutex<Option<Instant>>,
    warned: AtomicBool,
}

impl QueueLengths {
    pub fn new(
        client: Client,
        topology: &crate::streams::Topology,
        partitions: u16,
        feeders: Feeders,
    ) -> Self {
        QueueLengths {
            client,
            jobs: topology.jobs.clone(),
            park: topology.park.clone(),
            released_stream: topology.released.clone(),
            partitions,
            feeders,
            cache: Mutex::default(),
            refreshing: Mutex::default(),
            released: Mutex::default(),
            counting: tokio::sync::Semaphore::new(COUNTING),
            delivered: Mutex::default(),
            no_direct_until: Mutex::default(),
            warned: AtomicBool::new(false),
        }
    }

    /// The cached length (0 if never counted) at once, for the dequeue path; a stale one is
    /// recounted in the background, one count per queue at a time. These counts leave the
    /// released jobs past the consumer to the last full count ([`get`](Self::get)): the
    /// dequeue path runs thousands of times a second, and that part is the costly one.
    pub fn peek(self: &Arc<Self>, queue_type: &str, queue_id: &str) -> u64 {
        let k = (queue_type.to_string(), queue_id.to_string());
        let cached = self.cache.lock().expect("lock").get(&k).copied();
        let stale = cached.is_none_or(|c| c.at.elapsed() >= FRESH);
        if stale && self.refreshing.lock().expect("lock").insert(k.clone()) {
            let me = self.clone();
            tokio::spawn(async move {
                let _ = me.count(&k.0, &k.1, false).await;
                me.refreshing.lock().expect("lock").remove(&k);
            });
        }
        cached.map_or(0, |c| c.n)
    }

    /// The length, counted in full if the last full count is older than [`FRESH`]. Jobs other
    /// processes hold prefetched are not in it (see [`get_upto`](Self::get_upto)).
    pub async fn get(&self, queue_type: &str, queue_id: &str) -> Result<u64, String> {
        self.get_upto(queue_type, queue_id).await.map(|(n, _)| n)
    }

    /// [`get`](Self::get) with the consumer's delivered sequence that count saw: of the jobs
    /// other processes hold prefetched, those at or below it are not in the count (those above
    /// it are, among the released jobs past the consumer).
    pub async fn get_upto(&self, queue_type: &str, queue_id: &str) -> Result<(u64, u64), String> {
        let k = (queue_type.to_string(), queue_id.to_string());
        if let Some(c) = self.cache.lock().expect("lock").get(&k) {
            if c.full && c.at.elapsed() < FRESH {
                return Ok((c.n, c.upto));
            }
        }
        self.count(queue_type, queue_id, true).await
    }

    /// The `WEIR_RELEASED` sequences of the queue's jobs this process holds prefetched.
    pub fn prefetched(&self, queue_type: &str, queue_id: &str) -> Vec<u64> {
        self.feeders.seqs(queue_type, queue_id)
    }

    /// Counts the length; the released jobs past the consumer only if `full`, else as last
    /// counted.
    async fn count(
        &self,
        queue_type: &str,
        queue_id: &str,
        full: bool,
    ) -> Result<(u64, u64), String> {
        let p = job::partition_of(queue_id, self.partitions);
        let stored = format!("{}.{p}.{queue_type}.{queue_id}", job::STORED_PREFIX);
        let park = job::park_subject(p, queue_id);
        let (waiting, parked, (released, upto)) = tokio::try_join!(
            count(&self.jobs, &stored),
            count(&self.park, &park),
            self.released_waiting(queue_type, queue_id, full),
        )?;
        let n = waiting + parked + released;
        let mut cache = self.cache.lock().expect("lock");
        prune(&mut cache, |c| c.at);
        let at = Instant::now();
        cache.insert(
            (queue_type.to_string(), queue_id.to_string()),
            Length { at, n, full, upto },
        );
        Ok((n, upto))
    }

    /// Released jobs of the queue no worker has had: past the consumer's delivered sequence
    /// (if `full`, recounted at most every [`RELEASED_FRESH`], and by at most [`COUNTING`]
    /// requests at once; otherwise the last count), or in this process's prefetch buffer
    /// (counted now). With the delivered sequence it counted past.
    async fn released_waiting(
        &self,
        queue_type: &str,
        queue_id: &str,
        full: bool,
    ) -> Result<(u64, u64), String> {
        let k = (queue_type.to_string(), queue_id.to_string());
        let last = self.released.lock().expect("lock").get(&k).copied();
        let fresh = last.filter(|(at, ..)| at.elapsed() < RELEASED_FRESH);
        let permit = match fresh {
            Some(_) => None,
            None if full => self.counting.try_acquire().ok(),
            None => None,
        };
        let (upto, undelivered) = match (permit, last) {
            (Some(_permit), _) => {
                let upto = self.delivered(queue_type).await?;
                let subject = job::released_subject(queue_type, queue_id);
                let n = self.count_from(&subject, upto + 1).await?;
                let mut released = self.released.lock().expect("lock");
                prune(&mut released, |(at, ..)| *at);
                released.insert(k, (Instant::now(), upto, n));
                (upto, n)
            }
            (None, Some((_, upto, n))) => (upto, n),
            // Never counted, and no request free to count it: jobs in memory only.
            (None, None) => (u64::MAX, 0),
        };
        Ok((
            undelivered + self.feeders.count(queue_type, queue_id, upto),
            upto,
        ))
    }

    /// The type's SHARQ consumer's delivered stream sequence (0 before its first dequeue).
    async fn delivered(&self, queue_type: &str) -> Result<u64, String> {
        if let Some((at, d)) = self.delivered.lock().expect("lock").get(queue_type) {
            if at.elapsed() < FRESH {
                return Ok(*d);
            }
        }
        let name = consumer_name(queue_type);
        let d = match self.released_stream.consumer_info(&name).await {
            Ok(info) => info.delivered.stream_sequence,
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => 0,
            Err(e) => return Err(format!("cannot read consumer {name}: {e}")),
        };
        self.delivered
            .lock()
            .expect("lock")
            .insert(queue_type.to_string(), (Instant::now(), d));
        Ok(d)
    }

    /// Messages on `subject` in `WEIR_RELEASED` from sequence `from` on: the first one's
    /// direct get, with `batch` set so that the server adds how many more match.
    async fn count_from(&self, subject: &str, from: u64) -> Result<u64, String> {
        if let Some(until) = *self.no_direct_until.lock().expect("lock") {
            if Instant::now() < until {
                return Ok(0);
            }
        }
        let body = serde_json::json!({ "seq": from, "next_by_subj": subject, "batch": 1 });
        let request = Request::new()
            .payload(body.to_string().into())
            .timeout(Some(DIRECT_TIMEOUT));
        let api = format!("$JS.API.DIRECT.GET.{}", job::RELEASED_STREAM);
        let m = match self.client.send_request(api, request).await {
            Ok(m) => m,
            Err(e)
                if matches!(
                    e.kind(),
                    RequestErrorKind::NoResponders | RequestErrorKind::TimedOut
                ) =>
            {
                self.leave_out_released(&e);
                return Ok(0);
            }
            Err(e) => return Err(format!("cannot count {subject}: {e}")),
        };
        match m.status {
            Some(StatusCode::NOT_FOUND) => return Ok(0),
            Some(code) if code != StatusCode::OK => {
                return Err(format!(
                    "cannot count {subject}: direct get answered {code}"
                ))
            }
            _ => {}
        }
        let more = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Num-Pending"))
            .and_then(|v| v.as_str().parse::<u64>().ok())
            .ok_or_else(|| {
                format!("cannot count {subject}: no Nats-Num-Pending (nats-server < 2.11?)")
            })?;
        Ok(1 + more)
    }

    fn leave_out_released(&self, e: &dyn std::fmt::Display) {
        *self.no_direct_until.lock().expect("lock") = Some(Instant::now() + RETRY_DIRECT);
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = %e,
                "no direct get on WEIR_RELEASED (allow_direct off, or the NATS user lacks \
                 $JS.API.DIRECT.GET.WEIR_RELEASED): SHARQ queue lengths leave out released \
                 jobs not yet dequeued"
            );
        }
    }
}

/// Forgets queues not counted for [`FORGET`] once a map holds [`PRUNE_AT`] of them, so that
/// queues that come and go do not pile up.
fn prune<V>(map: &mut HashMap<Queue, V>, at: impl Fn(&V) -> Instant) {
    if map.len() >= PRUNE_AT {
        map.retain(|_, v| at(v).elapsed() < FORGET);
    }
}

/// Messages on one subject of a stream.
async fn count(stream: &Stream, subject: &str) -> Result<u64, String> {
    let mut info = stream
        .info_with_subjects(subject)
        .await
        .map_err(|e| format!("cannot count {subject}: {e}"))?;
    let mut n = 0;
    while let Some(r) = info.next().await {
        n += r.map_err(|e| format!("cannot count {subject}: {e}"))?.1 as u64;
    }
    Ok(n)
}
