//! Purge marks: each key's last purge, kept in the KV bucket `WEIR_PURGES`, so that what a purge
//! removed can be told apart from what is still pending.
//!
//! # Why it is needed
//! A purge ([`crate::inspect::Partitions::purge`]: `DELETE /v1/keys/{key}/jobs` and SHARQ's
//! `DELETE /deletequeue/`) deletes a key's jobs, but JetStream's duplicate window still holds
//! their `Nats-Msg-Id`s for two minutes. Enqueueing one of those jobs again through the HTTP APIs
//! (same queue and job id) would be answered "duplicate" and not stored: `queued` to the client,
//! and the job gone. And the status a purged job last had (`queued`, `parked`) would stay until
//! the retention. So before it deletes anything, a purge leaves a mark `(key, below)`: every job
//! of the key stored in `WEIR_JOBS` under sequence `below` was taken by it unless it had left.
//! - An enqueue JetStream answers as a duplicate of sequence `s`, with `s < below` for the job's
//!   key, is published again under a message id naming the purge
//!   ([`crate::sharq::enqueue`]), and is stored.
//! - A job whose status record is `queued` or `parked` at a sequence under its key's mark reads
//!   `dead`, reason `purged` ([`crate::status::StatusStore::get`]).
//!
//! Marks are read only on those two paths, never per job in the pipeline. The bucket keeps a
//! mark for the longer of `WEIR_JOBS`' duplicate window and `job_status_retention`, plus a
//! minute, so it outlives both the message ids and the status records it answers for.

use std::time::Duration;

use async_nats::jetstream::{kv, Context};
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// The bucket's name.
pub const BUCKET: &str = "WEIR_PURGES";

/// How many times a mark is tried again when another purge of the key wrote one meanwhile.
const CONFLICTS: usize = 5;

/// A key's last purge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// `WEIR_JOBS`' last sequence when the purge began, plus one: the key's jobs stored under it
    /// and still pending were deleted.
    pub below: u64,
    /// When the purge began, Unix milliseconds: the purged jobs' `dead_at`.
    pub at_ms: u64,
}

impl Mark {
    /// Whether the key's job stored at `seq` was stored before this purge began.
    pub fn covers(&self, seq: u64) -> bool {
        seq < self.below
    }
}

/// Why a mark could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PurgesError {
    #[error("cannot {what} the {BUCKET} bucket: {source}; check that the NATS account allows it (README, minimal NATS permissions)")]
    Nats {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the {BUCKET} entry of key {key:?} is not a purge mark ({source}); it was written by something other than Weir: delete it")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
}

fn nats(what: &'static str) -> impl FnOnce(kv::EntryError) -> PurgesError {
    move |e| PurgesError::Nats {
        what,
        source: Box::new(e),
    }
}

/// The purge marks bucket. Cheap to clone.
#[derive(Clone)]
pub struct Purges {
    kv: kv::Store,
}

impl Purges {
    /// Creates the bucket, or updates its `max_age` to this configuration's.
    pub async fn open(js: &Context, c: &Config) -> Result<Purges, PurgesError> {
        let kv = js
            .create_or_update_key_value(kv::Config {
                bucket: BUCKET.into(),
                description: "Weir: each key's last purge, so purged jobs can be enqueued again and read as purged".into(),
                history: 1,
                max_age: max_age(c.job_status_retention),
                num_replicas: c.replicas,
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| PurgesError::Nats {
                what: "create",
                source: Box::new(e),
            })?;
        Ok(Purges { kv })
    }

    /// Records that `key`'s jobs under `mark.below` are being purged. A mark already there with a
    /// higher `below` (a later purge, by another process) is kept.
    pub async fn mark(&self, key: &str, mark: Mark) -> Result<(), PurgesError> {
        let k = crate::limits::kv_encode(key);
        let value: bytes::Bytes = serde_json::to_vec(&mark).expect("a mark serialises").into();
        for _ in 0..CONFLICTS {
            let written = match self.kv.entry(&k).await.map_err(nats("read"))? {
                Some(e) if e.operation == kv::Operation::Put => {
                    match serde_json::from_slice::<Mark>(&e.value) {
                        Ok(old) if old.below >= mark.below => return Ok(()),
                        _ => self.kv.update(&k, value.clone(), e.revision).await.is_ok(),
                    }
                }
                Some(e) => self.kv.update(&k, value.clone(), e.revision).await.is_ok(),
                None => self.kv.create(&k, value.clone()).await.is_ok(),
            };
            if written {
                return Ok(());
            }
        }
        // Still losing to other writers: write it anyway, a purge must not fail on its mark.
        self.kv
            .put(&k, value)
            .await
            .map(|_| ())
            .map_err(|e| PurgesError::Nats {
                what: "write",
                source: Box::new(e),
            })
    }

    /// `key`'s last purge within the bucket's `max_age`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<Mark>, PurgesError> {
        let value = self
            .kv
            .get(crate::limits::kv_encode(key))
            .await
            .map_err(nats("read"))?;
        value
            .map(|v| serde_json::from_slice(&v))
            .transpose()
            .map_err(|source| PurgesError::Corrupt {
                key: key.to_string(),
                source,
            })
    }
}

/// How long a mark is kept: past both the message ids it answers for (`WEIR_JOBS`' duplicate
/// window) and the status records (`job_status_retention`), plus a minute for records written
/// just after the mark.
pub fn max_age(status_retention: Option<Duration>) -> Duration {
    crate::streams::JOBS_DUPLICATE_WINDOW.max(status_retention.unwrap_or_default())
        + Duration::from_secs(60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_covers_what_was_stored_before_it() {
        let m = Mark {
            below: 11,
            at_ms: 5,
        };
        assert!(m.covers(10));
        assert!(!m.covers(11));
        assert_eq!(
            serde_json::to_value(m).unwrap(),
            serde_json::json!({"below": 11, "at_ms": 5})
        );
    }

    #[test]
    fn marks_outlive_message_ids_and_status_records() {
        assert_eq!(max_age(None), Duration::from_secs(180));
        assert_eq!(
            max_age(Some(Duration::from_secs(3600))),
            Duration::from_secs(3660)
        );
    }
}
