//! Job status: where a job with a `Weir-Job-Id` header is (queued, parked, released, dequeued,
//! finished, requeued or dead) and when it got there, kept in the KV bucket `WEIR_JOB_STATUS`
//! for `job_status_retention` (the bucket's `max_age`), not in process memory.
//!
//! # Why it is written this way
//! The pipeline moves tens of thousands of jobs a second per core; a status write on that path
//! must not wait for JetStream. So each writer writes the *whole* record from what it knows
//! (times carried in the job's headers), never reading the entry first, and [`StatusStore::record`]
//! only serialises it and hands it to a bounded queue (`try_send`: it never awaits, never blocks).
//! A background task drains the queue into plain core publishes to `$KV.WEIR_JOB_STATUS.<key>`
//! (a KV put is exactly that publish; without a reply subject JetStream stores it and sends no
//! ack), a job's records coming within a few milliseconds of each other written as the last
//! alone. When the queue is full (NATS slow or away) the record is dropped and counted in
//! `weir_job_status_dropped_total`: status is an observation, never a reason to slow jobs.
//! Records from one process reach the bucket in the order they were recorded (one queue, one
//! connection).
//!
//! A `queued` record is the one written from outside the pipeline, once the enqueue that stored
//! the job is acked; by then the pipeline may already have parked or released the job and
//! written that. So it is written only where the job has no record yet
//! ([`StatusStore::record_first`]: the put carries `Nats-Expected-Last-Subject-Sequence: 0`,
//! which JetStream checks and, the put having no reply subject, refuses in silence), and a later
//! state is never set back to `queued`.
//!
//! Jobs without an id cost the pipeline one header lookup and nothing else.
//!
//! The KV key is the job id passed through [`crate::limits::kv_encode`], which leaves ids of
//! letters, digits, `-`, `_` and `/` (UUIDs, numbers) as they are and escapes anything else, so
//! two ids never share a key.

use std::collections::hash_map::{Entry, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::{HeaderMap, HeaderName};
use async_nats::jetstream::{kv, Context};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::job::header;

/// The bucket's name.
pub const BUCKET: &str = "WEIR_JOB_STATUS";
/// Longest job id tracked, in bytes: its key (escaped, up to 3 bytes a byte) must fit in a
/// subject well under nats-server's control line limit.
pub const MAX_JOB_ID_LEN: usize = 256;
/// Records waiting for the background publisher; beyond it they are dropped and counted.
pub const QUEUE: usize = 16_384;
/// Records of jobs enqueued again after a purge being written at once
/// ([`StatusStore::record_over_purged`]); beyond it they are dropped and counted.
pub const OVER_PURGED: usize = 1024;

const JOB_ID: HeaderName = HeaderName::from_static(header::JOB_ID);

/// Where a job is. Serialised in lowercase: `"released"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Parked,
    Released,
    Dequeued,
    Finished,
    Requeued,
    Dead,
}

/// A job's status: the value stored under its key. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    /// The job's destination.
    pub queue_type: String,
    /// The job's key.
    pub queue_id: String,
    pub state: JobState,
    #[serde(default)]
    pub requeues: u32,
    /// Why the job is dead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dequeued_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_at: Option<u64>,
    /// The job's sequence in `WEIR_JOBS`, on `queued` and `parked` records: a purge of its key
    /// that began after it was stored took it ([`crate::purges`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
}

impl JobRecord {
    /// A record in `state` with no times yet.
    pub fn new(
        job_id: impl Into<String>,
        queue_type: impl Into<String>,
        queue_id: impl Into<String>,
        state: JobState,
    ) -> JobRecord {
        JobRecord {
            job_id: job_id.into(),
            queue_type: queue_type.into(),
            queue_id: queue_id.into(),
            state,
            requeues: 0,
            reason: None,
            queued_at: None,
            parked_at: None,
            released_at: None,
            dequeued_at: None,
            finished_at: None,
            dead_at: None,
            sequence: None,
        }
    }

    /// The record as its key's last purge leaves it: a job still `queued` or `parked` at a
    /// sequence the purge covers was deleted by it, so it reads `dead`, reason `purged`.
    pub fn after(mut self, purge: Option<crate::purges::Mark>) -> JobRecord {
        if let (Some(seq), Some(m)) = (self.pending_at(), purge) {
            if m.covers(seq) {
                self.state = JobState::Dead;
                self.reason = Some(PURGED.into());
                self.dead_at = Some(m.at_ms);
            }
        }
        self
    }

    /// Whether this record, read back, is an older job's under the same id that a purge took
    /// before `seq` was stored, and so may be replaced by the record of the job at `seq`.
    fn purged_before(&self, seq: u64) -> bool {
        self.pending_at().is_some_and(|s| s < seq)
    }

    /// The job's sequence in `WEIR_JOBS` while it is `queued` or `parked`: what a purge may
    /// have taken.
    fn pending_at(&self) -> Option<u64> {
        match self.state {
            JobState::Queued | JobState::Parked => self.sequence,
            _ => None,
        }
    }
}

/// The `reason` of a job a purge deleted.
pub const PURGED: &str = "purged";

/// Why a status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("job status is off (job_status_retention = \"0\"); set job_status_retention, e.g. \"1h\", to track jobs that carry a Weir-Job-Id header")]
    Off,
    #[error("a job id must be 1 to {MAX_JOB_ID_LEN} bytes, this one is {len}; use a shorter Weir-Job-Id")]
    BadId { len: usize },
    #[error("cannot {what} the {BUCKET} bucket: {source}")]
    Nats {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Purges(#[from] crate::purges::PurgesError),
    #[error("the entry of job {job_id:?} in {BUCKET} is not a job record ({source}); it was written by something other than Weir: delete it")]
    Corrupt {
        job_id: String,
        source: serde_json::Error,
    },
}

/// The KV key of a job id; `None` for an id that is empty or longer than [`MAX_JOB_ID_LEN`].
pub fn kv_key(job_id: &str) -> Option<String> {
    if job_id.is_empty() || job_id.len() > MAX_JOB_ID_LEN {
        return None;
    }
    Some(crate::limits::kv_encode(job_id))
}

/// The job's id, if it carries one: the one header lookup the pipeline makes per job.
pub fn job_id(headers: Option<&HeaderMap>) -> Option<&str> {
    headers?.get(JOB_ID).map(|v| v.as_str())
}

/// Destination and key as well as can be told from a subject Weir could not route
/// (`weir.in.<p>.<dest>.<key>` or `jobs.…`), for a dead job's record.
pub fn guess_route(subject: &str) -> (&str, &str) {
    let rest = match subject.strip_prefix(crate::job::STORED_PREFIX) {
        Some(r) => r
            .strip_prefix('.')
            .and_then(|r| r.split_once('.'))
            .map_or("", |(_, r)| r),
        None => subject.strip_prefix("jobs.").unwrap_or(""),
    };
    rest.split_once('.').unwrap_or((rest, ""))
}

/// The job status bucket: cheap to clone; [`StatusStore::off`] when status is not kept.
#[derive(Clone, Default)]
pub struct StatusStore {
    inner: Option<Arc<Inner>>,
}

/// One record on its way to the bucket: its subject, its value, and whether it may be written
/// only where the job has no record yet.
type Put = (String, Bytes, bool);

struct Inner {
    tx: mpsc::Sender<Put>,
    kv: kv::Store,
    purges: crate::purges::Purges,
    /// Records of jobs enqueued again after a purge being written ([`OVER_PURGED`] at most).
    over_purged: Arc<tokio::sync::Semaphore>,
    retention: Duration,
    dropped: Arc<AtomicU64>,
}

impl StatusStore {
    /// Status not kept: `record` does nothing, `get` answers [`StatusError::Off`].
    pub fn off() -> StatusStore {
        StatusStore { inner: None }
    }

    /// Creates (or updates to the configured retention) the bucket and starts the background
    /// publisher, which ends once every clone of the store is dropped. `dropped` counts records
    /// dropped on a full queue ([`crate::metrics::Metrics::job_status_dropped`]). Off when
    /// `job_status_retention` is 0.
    pub async fn open(
        js: &Context,
        c: &Config,
        purges: crate::purges::Purges,
        dropped: Arc<AtomicU64>,
    ) -> Result<(StatusStore, Option<JoinHandle<()>>), StatusError> {
        let Some(retention) = c.job_status_retention else {
            return Ok((StatusStore::off(), None));
        };
        // Updated, not just opened: a changed retention applies to the bucket.
        let kv = js
            .create_or_update_key_value(kv::Config {
                bucket: BUCKET.into(),
                description:
                    "Weir job status by Weir-Job-Id; entries expire after job_status_retention"
                        .into(),
                history: 1,
                max_age: retention,
                num_replicas: c.replicas,
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| StatusError::Nats {
                what: "create",
                source: Box::new(e),
            })?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(publish(js.client(), rx));
        let inner = Inner {
            tx,
            kv,
            purges,
            over_purged: Arc::new(tokio::sync::Semaphore::new(OVER_PURGED)),
            retention,
            dropped,
        };
        Ok((
            StatusStore {
                inner: Some(Arc::new(inner)),
            },
            Some(task),
        ))
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// How long a record is kept; `None` when status is off.
    pub fn retention(&self) -> Option<Duration> {
        self.inner.as_ref().map(|i| i.retention)
    }

    /// Records dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.inner.as_ref().map_or(0, |i| i.dropped.load(Relaxed))
    }

    /// Queues `rec` for writing: never awaits, never blocks. A record whose id cannot be a key,
    /// or that finds the queue full, is dropped and counted.
    pub fn record(&self, rec: &JobRecord) {
        self.put(rec, false);
    }

    /// As [`StatusStore::record`], but the bucket keeps the record only if the job has none yet:
    /// for a state the pipeline may already have moved the job past (`queued`). A job id used
    /// again within the retention keeps its old record until the pipeline writes the new job's.
    pub fn record_first(&self, rec: &JobRecord) {
        self.put(rec, true);
    }

    fn put(&self, rec: &JobRecord, first: bool) {
        let Some(inner) = &self.inner else { return };
        let Some(key) = kv_key(&rec.job_id) else {
            inner.dropped.fetch_add(1, Relaxed);
            tracing::debug!(
                len = rec.job_id.len(),
                "job id too long or empty for a status key"
            );
            return;
        };
        let mut subject = String::with_capacity(5 + BUCKET.len() + key.len());
        subject.push_str("$KV.");
        subject.push_str(BUCKET);
        subject.push('.');
        subject.push_str(&key);
        let value = serde_json::to_vec(rec).expect("a job record serialises");
        if inner.tx.try_send((subject, value.into(), first)).is_err() {
            inner.dropped.fetch_add(1, Relaxed);
        }
    }

    /// As [`StatusStore::record_first`], for a job enqueued again after a purge took the job
    /// that had its id: the record is written where the job has none, or where the one there is
    /// the purged job's (`queued` or `parked` at a sequence under `rec.sequence`), never over a
    /// record the pipeline wrote for the new job meanwhile (a compare-and-set on the entry's
    /// revision). Rare (see [`crate::purges`]), so it reads before it writes, in a task of its
    /// own: it never blocks the caller. At most [`OVER_PURGED`] at once; past that the record
    /// is dropped and counted.
    pub fn record_over_purged(&self, rec: &JobRecord) {
        let (Some(inner), Some(key), Some(seq)) = (&self.inner, kv_key(&rec.job_id), rec.sequence)
        else {
            return self.record_first(rec);
        };
        let Ok(permit) = inner.over_purged.clone().try_acquire_owned() else {
            inner.dropped.fetch_add(1, Relaxed);
            return;
        };
        let kv = inner.kv.clone();
        let value: Bytes = serde_json::to_vec(rec)
            .expect("a job record serialises")
            .into();
        tokio::spawn(async move {
            let written = match kv.entry(key.clone()).await {
                Ok(None) => kv
                    .create(&key, value)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Ok(Some(e)) => match serde_json::from_slice::<JobRecord>(&e.value) {
                    Ok(old) if !old.purged_before(seq) => Ok(()),
                    _ => kv
                        .update(&key, value, e.revision)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = written {
                tracing::debug!(error = %e, "the status of a job enqueued again after a purge was not written");
            }
            drop(permit);
        });
    }

    /// The job's record, as its key's last purge leaves it ([`JobRecord::after`]); `None` when no
    /// record is known (never seen, or older than the retention).
    pub async fn get(&self, job_id: &str) -> Result<Option<JobRecord>, StatusError> {
        let inner = self.inner.as_ref().ok_or(StatusError::Off)?;
        let key = kv_key(job_id).ok_or(StatusError::BadId { len: job_id.len() })?;
        let value = inner.kv.get(key).await.map_err(|e| StatusError::Nats {
            what: "read",
            source: Box::new(e),
        })?;
        let Some(rec) = value
            .map(|v| serde_json::from_slice::<JobRecord>(&v))
            .transpose()
            .map_err(|source| StatusError::Corrupt {
                job_id: job_id.to_string(),
                source,
            })?
        else {
            return Ok(None);
        };
        match rec.pending_at() {
            // Only a pending job can have been purged: one more read, off the job path.
            Some(_) => {
                let mark = inner.purges.get(&rec.queue_id).await?;
                Ok(Some(rec.after(mark)))
            }
            None => Ok(Some(rec)),
        }
    }
}

/// Drains the queue into core publishes until every sender is gone.
///
/// Records are taken in batches: after the first of a batch arrives, more are gathered for up
/// to [`LINGER`] (or until [`BATCH`] are in), and a job with several records in the batch gets
/// one write, the one the bucket would have been left with ([`deciders`]). At full speed a
/// job's `queued` and `released` (or `dequeued` and `finished`) records are often recorded a
/// few milliseconds apart: writing the last alone spares JetStream a stored message and a
/// removal per job, when JetStream is what the pipeline waits for. The cost is that a record
/// reaches the bucket up to [`LINGER`] later.
async fn publish(client: async_nats::Client, mut rx: mpsc::Receiver<Put>) {
    let mut first_only = HeaderMap::new();
    first_only.insert("Nats-Expected-Last-Subject-Sequence", "0");
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            let room = BATCH - batch.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
                Ok(n) if n > 0 => continue,
                _ => break,
            }
        }
        let keep = deciders(&batch);
        for ((subject, value, first), keep) in batch.drain(..).zip(keep) {
            if !keep {
                continue;
            }
            let sent = if first {
                client
                    .publish_with_headers(subject, first_only.clone(), value)
                    .await
            } else {
                client.publish(subject, value).await
            };
            if let Err(e) = sent {
                tracing::debug!(error = %e, "publishing a job status failed");
            }
        }
    }
}

/// How long a batch of records gathers before it is written.
const LINGER: Duration = Duration::from_millis(10);
/// Most records written as one batch.
const BATCH: usize = 2048;

/// Which puts of `batch` to write: for each subject, the one that decides what the bucket
/// keeps. A plain put overwrites whatever was there, so the subject's last plain put decides;
/// a first-only put after a plain one would be refused, and one before it is overwritten.
/// With no plain put, the first first-only put is the only one that can take.
fn deciders(batch: &[Put]) -> Vec<bool> {
    let mut keep = vec![false; batch.len()];
    let mut decider: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
    for (i, (subject, _, first)) in batch.iter().enumerate() {
        match decider.entry(subject.as_str()) {
            Entry::Vacant(v) => {
                v.insert(i);
                keep[i] = true;
            }
            Entry::Occupied(mut o) if !first => {
                keep[*o.get()] = false;
                o.insert(i);
                keep[i] = true;
            }
            Entry::Occupied(_) => {}
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_as_the_contract_says() {
        let mut r = JobRecord::new("j-1", "sms", "acme", JobState::Released);
        r.queued_at = Some(1);
        r.released_at = Some(2);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"job_id": "j-1", "queue_type": "sms", "queue_id": "acme",
                "state": "released", "requeues": 0, "queued_at": 1, "released_at": 2})
        );
        let back: JobRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        for (s, text) in [
            (JobState::Dead, "\"dead\""),
            (JobState::Requeued, "\"requeued\""),
        ] {
            assert_eq!(serde_json::to_string(&s).unwrap(), text);
        }
    }

    fn put(subject: &str, value: &'static str, first: bool) -> Put {
        (subject.into(), Bytes::from_static(value.as_bytes()), first)
    }

    #[test]
    fn a_job_with_several_records_in_a_batch_gets_the_one_that_decides() {
        let batch = vec![
            put("a", "queued", true),
            put("b", "released", false),
            put("a", "released", false),
            put("c", "queued", true),
            put("b", "queued", true),
            put("c", "queued again", true),
            put("a", "dequeued", false),
            put("d", "finished", false),
        ];
        let kept: Vec<&str> = batch
            .iter()
            .zip(deciders(&batch))
            .filter(|(_, k)| *k)
            .map(|(p, _)| std::str::from_utf8(&p.1).unwrap())
            .collect();
        // a: its last plain put; b: the plain put, the later first-only one would be refused;
        // c: the first first-only put; d: alone.
        assert_eq!(kept, ["released", "queued", "dequeued", "finished"]);
    }

    #[test]
    fn a_pending_job_under_its_keys_purge_reads_purged() {
        use crate::purges::Mark;
        let mark = Some(Mark {
            below: 10,
            at_ms: 99,
        });
        let at = |state, seq: Option<u64>| {
            let mut r = JobRecord::new("j", "sms", "acme", state);
            r.sequence = seq;
            r
        };
        let purged = at(JobState::Parked, Some(9)).after(mark);
        assert_eq!(
            (purged.state, purged.reason.as_deref(), purged.dead_at),
            (JobState::Dead, Some(PURGED), Some(99))
        );
        assert_eq!(
            at(JobState::Queued, Some(9)).after(mark).state,
            JobState::Dead
        );
        // Stored after the purge began, moved on, or of unknown sequence: as recorded.
        assert_eq!(
            at(JobState::Queued, Some(10)).after(mark).state,
            JobState::Queued
        );
        assert_eq!(
            at(JobState::Released, Some(9)).after(mark).state,
            JobState::Released
        );
        assert_eq!(
            at(JobState::Parked, None).after(mark).state,
            JobState::Parked
        );
        assert_eq!(
            at(JobState::Parked, Some(9)).after(None).state,
            JobState::Parked
        );
        // A job enqueued again after the purge replaces only a record the purge made stale.
        assert!(at(JobState::Parked, Some(9)).purged_before(12));
        assert!(!at(JobState::Parked, Some(12)).purged_before(12));
        assert!(!at(JobState::Released, Some(9)).purged_before(12));
    }

    #[test]
    fn keys_are_escaped_only_when_needed() {
        assert_eq!(kv_key("3f2a-9c/b_1").as_deref(), Some("3f2a-9c/b_1"));
        assert_eq!(kv_key("a.b c").as_deref(), Some("a=2Eb=20c"));
        // Distinct ids, distinct keys: '=' itself is escaped.
        assert_ne!(kv_key("a=2E"), kv_key("a."));
        assert!(kv_key("").is_none());
        assert!(kv_key(&"x".repeat(MAX_JOB_ID_LEN + 1)).is_none());
    }

    #[test]
    fn routes_are_guessed_from_bad_subjects() {
        assert_eq!(guess_route("weir.in.3.sms.a b"), ("sms", "a b"));
        assert_eq!(guess_route("jobs.onlyone"), ("onlyone", ""));
        assert_eq!(guess_route("jobs.sms.a.b"), ("sms", "a.b"));
        assert_eq!(guess_route("jobs"), ("", ""));
    }
}
