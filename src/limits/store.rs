//! The `WEIR_LIMITS` bucket: where limits live, and the watcher that applies its changes.
//!
//! The config file seeds the bucket when it is first created; after that the bucket is the
//! truth, and an operator changes limits with `weir limits set`, the admin API, or any NATS
//! client. Every Weir process watches the bucket and swaps in a new [`Limits`] snapshot for each
//! change (a `tokio::sync::watch` channel: the partitions always see the newest table, and a
//! burst of changes coalesces).
//!
//! A value that does not parse (garbage JSON, a negative rate, `"1e99/s"`) is refused with a
//! logged reason and the last good limit stays in force.
//!
//! ```no_run
//! # async fn example(js: async_nats::jetstream::Context) -> Result<(), Box<dyn std::error::Error>> {
//! use weir::limits::{store::Store, Entry, LimitJson};
//! let store = Store::get(&js).await?;
//! let limit = LimitJson { pattern: None, rate: "100/s".into(), burst: Some(10) };
//! store.put(&Entry::Key("acme".into()), &limit).await?;
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::Context;
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{parse_value, Entry, LimitError, LimitJson, Limits};
use crate::config::{Config, Limit};

/// The bucket's name: part of the contract with operators' tools.
pub const BUCKET: &str = "WEIR_LIMITS";

/// Why a bucket operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the {BUCKET} bucket does not exist yet: start `weir run` once (it creates and seeds it)"
    )]
    Missing,
    #[error(transparent)]
    Invalid(#[from] LimitError),
    #[error("NATS refused the {op} on {BUCKET}: {message}")]
    Nats { op: &'static str, message: String },
}

impl StoreError {
    fn nats(op: &'static str, e: impl std::fmt::Display) -> Self {
        StoreError::Nats {
            op,
            message: e.to_string(),
        }
    }
}

/// One stored limit.
#[derive(Debug, Clone)]
pub struct Stored {
    pub entry: Entry,
    pub limit: Limit,
    pub pattern: Option<String>,
    pub revision: u64,
}

/// The bucket, with validation on every write.
#[derive(Clone)]
pub struct Store {
    kv: kv::Store,
}

impl Store {
    /// Opens the bucket, creating it (and seeding it from `config`) if it does not exist.
    /// Seeding writes only entries that are absent, so processes starting together agree.
    pub async fn open(js: &Context, config: &Config) -> Result<Store, StoreError> {
        if let Ok(kv) = js.get_key_value(BUCKET).await {
            return Ok(Store { kv });
        }
        let kv = js
            .create_key_value(kv::Config {
                bucket: BUCKET.into(),
                description:
                    "Weir limits: default, keys.<key>, patterns.<name>, destinations.<dest>".into(),
                history: 5,
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| StoreError::nats("create", e))?;
        for (entry, json) in Limits::seed(config) {
            let value = serde_json::to_vec(&json).expect("serialisable");
            // Already there: another process seeded it first.
            let _ = kv.create(entry.kv_key(), value.into()).await;
        }
        tracing::info!(bucket = BUCKET, "created and seeded from the config file");
        Ok(Store { kv })
    }

    /// Opens an existing bucket (for the CLI and the admin API).
    pub async fn get(js: &Context) -> Result<Store, StoreError> {
        use async_nats::jetstream::context::GetStreamErrorKind;
        use async_nats::jetstream::ErrorCode;
        // Asked first so that "no bucket" is told apart from NATS being away or slow.
        if let Err(e) = js.get_stream(format!("KV_{BUCKET}")).await {
            return Err(match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    StoreError::Missing
                }
                _ => StoreError::nats("open", e),
            });
        }
        js.get_key_value(BUCKET)
            .await
            .map(|kv| Store { kv })
            .map_err(|e| StoreError::nats("open", e))
    }

    pub async fn get_entry(&self, entry: &Entry) -> Result<Option<Stored>, StoreError> {
        let e = self
            .kv
            .entry(entry.kv_key())
            .await
            .map_err(|e| StoreError::nats("get", e))?;
        match e {
            Some(e) if e.operation == Operation::Put => {
                let (limit, pattern) = parse_value(entry, &e.value)?;
                Ok(Some(Stored {
                    entry: entry.clone(),
                    limit,
                    pattern,
                    revision: e.revision,
                }))
            }
            _ => Ok(None),
        }
    }

    /// Validates and writes a limit; returns its revision.
    pub async fn put(&self, entry: &Entry, json: &LimitJson) -> Result<u64, StoreError> {
        let value = serde_json::to_vec(json).expect("serialisable");
        parse_value(entry, &value)?;
        self.kv
            .put(entry.kv_key(), value.into())
            .await
            .map_err(|e| StoreError::nats("put", e))
    }

    /// Deletes a limit; `false` if there was none.
    pub async fn delete(&self, entry: &Entry) -> Result<bool, StoreError> {
        if self.get_entry(entry).await?.is_none() {
            return Ok(false);
        }
        self.kv
            .delete(entry.kv_key())
            .await
            .map_err(|e| StoreError::nats("delete", e))?;
        Ok(true)
    }

    /// Every valid stored limit, in bucket-key order; invalid ones are skipped with a warning.
    pub async fn list(&self) -> Result<Vec<Stored>, StoreError> {
        let mut keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(|e| StoreError::nats("list", e))?
            .filter_map(|k| async move { k.ok() })
            .collect()
            .await;
        keys.sort();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let entry = match Entry::parse(&k) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(key = %k, error = %e, "skipping an invalid bucket key");
                    continue;
                }
            };
            match self.get_entry(&entry).await {
                Ok(Some(s)) => out.push(s),
                Ok(None) => {}
                Err(StoreError::Invalid(e)) => {
                    tracing::warn!(key = %k, error = %e, "skipping an invalid limit")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Applies the bucket's contents to `base`, publishes the result, then follows every change
    /// until `cancel`. Returns once the initial contents are applied (or after `ready_within`
    /// if NATS is slow, with the config file's limits in force meanwhile); keeps watching in a
    /// task.
    pub async fn watch(
        self,
        base: Limits,
        ready_within: Duration,
        on_change: impl Fn(Result<&Entry, &LimitError>) + Send + Sync + 'static,
        cancel: CancellationToken,
    ) -> (watch::Receiver<Arc<Limits>>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(Arc::new(base.clone()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut table = base;
            let mut ready = Some(ready_tx);
            let mut from = 0u64;
            loop {
                if self
                    .follow(&mut table, &mut from, &tx, &mut ready, &on_change, &cancel)
                    .await
                {
                    return;
                }
                tracing::warn!(bucket = BUCKET, "limits watch ended; watching again");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        if tokio::time::timeout(ready_within, ready_rx).await.is_err() {
            tracing::warn!(
                bucket = BUCKET,
                "limits not read in time; the config file's are in force until they are"
            );
        }
        (rx, task)
    }

    /// One watch: from the start (last value per key) or from revision `from`. Returns `true`
    /// when cancelled.
    async fn follow(
        &self,
        table: &mut Limits,
        from: &mut u64,
        tx: &watch::Sender<Arc<Limits>>,
        ready: &mut Option<tokio::sync::oneshot::Sender<()>>,
        on_change: &(impl Fn(Result<&Entry, &LimitError>) + Send + Sync),
        cancel: &CancellationToken,
    ) -> bool {
        let w = if *from == 0 {
            // An empty bucket sends nothing: it is read already.
            if let Ok(s) = self.kv.status().await {
                if s.values() == 0 {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
            }
            self.kv.watch_with_history(">").await
        } else {
            self.kv.watch_all_from_revision(*from + 1).await
        };
        let mut w = match w {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(bucket = BUCKET, error = %e, "cannot watch limits");
                return cancel.is_cancelled();
            }
        };
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return true,
                n = w.next() => n,
            };
            let e = match next {
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    tracing::warn!(bucket = BUCKET, error = %e, "limits watch error");
                    return false;
                }
                None => return false,
            };
            *from = e.revision;
            let value = (e.operation == Operation::Put).then_some(&e.value[..]);
            match table.apply(&e.key, value, e.revision) {
                Ok(entry) => {
                    tracing::info!(entry = %e.key, revision = e.revision, op = ?e.operation, "limit applied");
                    on_change(Ok(&entry));
                }
                Err(err) => {
                    tracing::warn!(entry = %e.key, revision = e.revision, error = %err, "limit refused; the last good one stays in force");
                    on_change(Err(&err));
                }
            }
            // The initial contents go out as one table, not one per entry.
            if e.delta == 0 || ready.is_none() {
                tx.send_replace(Arc::new(table.clone()));
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
        }
    }
}
