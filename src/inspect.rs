//! What operators ask a running Weir: one key's state, the busiest keys, and purging a key.
//!
//! A partition's state lives in its task with no lock, so questions are sent to the task over a
//! bounded channel and answered between jobs. [`Partitions`] routes a key's question to the
//! partition that owns it (the same FNV-1a hash nats-server's partition transform uses).
//! Figures that JetStream already keeps (parked jobs, released and dead counts) are read from
//! the streams' per-subject counts, so per-key figures cost no memory in Weir.

use std::sync::{Arc, RwLock};

use async_nats::jetstream::stream::Stream;
use futures::TryStreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::Limit;
use crate::job;
use crate::limits::Limits;

/// A key as its partition sees it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct KeyView {
    pub key: String,
    /// Jobs of the key held in memory.
    pub held: u64,
    /// Jobs of the key in the park not yet read back.
    pub parked: u64,
    /// When the next job may leave, from now (none: no backlog, or paused).
    pub next_release_in_ms: Option<u64>,
    pub paused: bool,
    /// Jobs offered and released since the key last had a backlog (0 for a key with none).
    pub offered: u64,
    pub released: u64,
}

impl KeyView {
    pub fn backlog(&self) -> u64 {
        self.held + self.parked
    }
}

/// What purging a key's pending jobs removed.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Purged {
    /// Jobs held in memory (acked without release).
    pub held: u64,
    /// Jobs deleted from the park.
    pub parked: u64,
    /// Jobs deleted from `WEIR_JOBS` before any partition read them.
    pub queued: u64,
}

impl Purged {
    pub fn total(&self) -> u64 {
        self.held + self.parked + self.queued
    }
}

/// A message for a partition task: new limits or caps, or an operator's question.
pub enum Command {
    /// The limits table changed.
    Limits(Arc<Limits>),
    /// The process's destination buckets changed.
    Caps(Arc<crate::scheduler::Caps>),
    Key {
        key: String,
        reply: oneshot::Sender<Option<KeyView>>,
    },
    Top {
        limit: usize,
        reply: oneshot::Sender<Vec<KeyView>>,
    },
    /// Drop the key's held and parked jobs, and those of its jobs under stream sequence
    /// `below` that arrive later.
    Purge {
        key: String,
        below: u64,
        reply: oneshot::Sender<Purged>,
    },
}

/// Why a question got no answer.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("partition {0} is not running (starting, or shutting down)")]
    Unavailable(u16),
    #[error("partition {partition} is run by another Weir process{}", owner.as_ref().map(|o| format!(": {o}")).unwrap_or_default())]
    NotOwned {
        partition: u16,
        /// Who runs it, when the group knows: `member <name> at <admin address>`.
        owner: Option<String>,
    },
    #[error("NATS: {0}")]
    Nats(String),
}

/// The channels of the partition tasks this process runs now, by partition number. Partitions
/// come and go as the group rebalances ([`crate::shards`] keeps this up to date); a partition's
/// channel is registered before it reads its first limits, so no change is missed.
pub struct Registry {
    senders: RwLock<Vec<Option<mpsc::Sender<Command>>>>,
}

impl Registry {
    pub fn new(partitions: u16) -> Self {
        Registry {
            senders: RwLock::new(vec![None; partitions as usize]),
        }
    }

    pub fn count(&self) -> u16 {
        self.read().len() as u16
    }

    pub fn set(&self, p: u16, sender: Option<mpsc::Sender<Command>>) {
        self.senders.write().unwrap_or_else(|e| e.into_inner())[p as usize] = sender;
    }

    pub fn get(&self, p: u16) -> Option<mpsc::Sender<Command>> {
        self.read().get(p as usize).cloned().flatten()
    }

    /// The partitions running here, with their channels.
    pub fn running(&self) -> Vec<(u16, mpsc::Sender<Command>)> {
        self.read()
            .iter()
            .enumerate()
            .filter_map(|(p, s)| s.clone().map(|s| (p as u16, s)))
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Option<mpsc::Sender<Command>>>> {
        self.senders.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Says who runs a partition this process does not (the group's view), for error messages.
pub type OwnerOf = Arc<dyn Fn(u16) -> Option<String> + Send + Sync>;

/// Handles to every partition task of this process.
#[derive(Clone)]
pub struct Partitions {
    registry: Arc<Registry>,
    owner_of: Option<OwnerOf>,
    jobs: Stream,
    released: Stream,
    dead: Stream,
    limits: tokio::sync::watch::Receiver<Arc<Limits>>,
    /// Where a purge leaves its mark before it deletes anything.
    purges: crate::purges::Purges,
}

/// Everything known about one key: its partition's view, its effective limit, and counts from
/// the streams.
#[derive(Debug, Clone, Serialize)]
pub struct KeyStatus {
    #[serde(flatten)]
    pub view: KeyView,
    pub partition: u16,
    pub limit: LimitView,
    /// Released jobs of the key still stored in `WEIR_RELEASED`.
    pub released_stored: u64,
    /// Dead-lettered jobs of the key in `WEIR_DEAD`.
    pub dead: u64,
}

/// A limit and where it came from (`key`, `pattern:<name>` or `default`).
#[derive(Debug, Clone, Serialize)]
pub struct LimitView {
    pub rate: String,
    pub burst: u32,
    pub source: String,
}

impl LimitView {
    pub fn new(l: &Limit, source: impl ToString) -> Self {
        LimitView {
            rate: l.rate.to_string(),
            burst: l.burst,
            source: source.to_string(),
        }
    }
}

/// One partition's channel.
pub fn channel() -> (mpsc::Sender<Command>, mpsc::Receiver<Command>) {
    mpsc::channel(64)
}

/// Forwards every new limits table and caps set to each partition until `cancel`.
pub async fn forward(
    mut limits: tokio::sync::watch::Receiver<Arc<Limits>>,
    mut caps: tokio::sync::watch::Receiver<Arc<crate::scheduler::Caps>>,
    partitions: Arc<Registry>,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let cmd = tokio::select! {
            _ = cancel.cancelled() => return,
            Ok(()) = limits.changed() => Command::Limits(limits.borrow_and_update().clone()),
            Ok(()) = caps.changed() => Command::Caps(caps.borrow_and_update().clone()),
            else => return,
        };
        for (_, p) in partitions.running() {
            let cmd = match &cmd {
                Command::Limits(l) => Command::Limits(l.clone()),
                Command::Caps(c) => Command::Caps(c.clone()),
                _ => unreachable!("only limits and caps are forwarded"),
            };
            // A partition that has stopped needs no limits.
            let _ = p.send(cmd).await;
        }
    }
}

impl Partitions {
    pub fn new(
        registry: Arc<Registry>,
        owner_of: Option<OwnerOf>,
        jobs: Stream,
        released: Stream,
        dead: Stream,
        limits: tokio::sync::watch::Receiver<Arc<Limits>>,
        purges: crate::purges::Purges,
    ) -> Self {
        Partitions {
            registry,
            owner_of,
            jobs,
            released,
            dead,
            limits,
            purges,
        }
    }

    pub fn count(&self) -> u16 {
        self.registry.count()
    }

    /// The limits in force in this process.
    pub fn limits(&self) -> Arc<Limits> {
        self.limits.borrow().clone()
    }

    /// The channel of partition `p`, if this process runs it.
    fn sender(&self, p: u16) -> Result<mpsc::Sender<Command>, InspectError> {
        self.registry.get(p).ok_or_else(|| InspectError::NotOwned {
            partition: p,
            owner: self.owner_of.as_ref().and_then(|f| f(p)),
        })
    }

    async fn ask<T>(
        &self,
        p: u16,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, InspectError> {
        let (tx, rx) = oneshot::channel();
        self.sender(p)?
            .send(make(tx))
            .await
            .map_err(|_| InspectError::Unavailable(p))?;
        rx.await.map_err(|_| InspectError::Unavailable(p))
    }

    /// A key's status; `None` for a key Weir has no trace of (no state, nothing parked,
    /// released or dead).
    pub async fn key(&self, key: &str) -> Result<Option<KeyStatus>, InspectError> {
        let p = job::partition_of(key, self.count());
        let view = self
            .ask(p, |reply| Command::Key {
                key: key.to_string(),
                reply,
            })
            .await?;
        let released_stored = subject_count(&self.released, format!("released.*.{key}")).await?;
        let dead = subject_count(&self.dead, format!("dead.*.{key}")).await?;
        if view.is_none() && released_stored == 0 && dead == 0 {
            return Ok(None);
        }
        let limits = self.limits();
        let (limit, source) = limits.resolve(key);
        Ok(Some(KeyStatus {
            view: view.unwrap_or_else(|| KeyView {
                key: key.to_string(),
                ..KeyView::default()
            }),
            partition: p,
            limit: LimitView::new(&limit, source),
            released_stored,
            dead,
        }))
    }

    /// The `limit` keys with the largest backlog, over every partition of this process.
    pub async fn top(&self, limit: usize) -> Result<Vec<KeyView>, InspectError> {
        let mut all = Vec::new();
        for (p, _) in self.registry.running() {
            match self.ask(p, |reply| Command::Top { limit, reply }).await {
                Ok(keys) => all.extend(keys),
                // Handed over meanwhile: its keys are another process's now.
                Err(InspectError::NotOwned { .. } | InspectError::Unavailable(_)) => {}
                Err(e) => return Err(e),
            }
        }
        all.sort_by(|a, b| b.backlog().cmp(&a.backlog()).then(a.key.cmp(&b.key)));
        all.truncate(limit);
        Ok(all)
    }

    /// Deletes a key's pending jobs stored before the purge began: held in memory, parked,
    /// queued in `WEIR_JOBS`, and those already delivered to the partition but not yet read,
    /// which it drops as they come (SHARQ's `clear_queue`). What is left is a suffix: jobs
    /// stored later, maybe less a few the partition held when the purge reached it. The count
    /// leaves out the jobs dropped on arrival.
    ///
    /// First it marks the key ([`crate::purges`]), so that the purged jobs can be enqueued again
    /// and read as purged. Marked first: a purge that fails half-way leaves jobs that an enqueue
    /// may then store a second time, never a job that is not stored at all.
    pub async fn purge(&self, key: &str) -> Result<Purged, InspectError> {
        let p = job::partition_of(key, self.count());
        // Not marked by a process that would not purge.
        self.sender(p)?;
        // The purge takes the jobs stored before it began; the partition drops those it has
        // not read yet as they come ([`crate::partition`]'s fences).
        let below = self
            .jobs
            .get_info()
            .await
            .map_err(|e| InspectError::Nats(e.to_string()))?
            .state
            .last_sequence
            + 1;
        let mark = crate::purges::Mark {
            below,
            at_ms: crate::release::unix_ms(),
        };
        self.purges
            .mark(key, mark)
            .await
            .map_err(|e| InspectError::Nats(e.to_string()))?;
        let mut purged = self
            .ask(p, |reply| Command::Purge {
                key: key.to_string(),
                below,
                reply,
            })
            .await?;
        let filter = format!("{}.{p}.*.{key}", job::STORED_PREFIX);
        purged.queued = self
            .jobs
            .purge()
            .filter(filter)
            .sequence(below)
            .await
            .map_err(|e| InspectError::Nats(e.to_string()))?
            .purged;
        Ok(purged)
    }
}

/// Messages stored under `filter`, summed over its subjects.
async fn subject_count(stream: &Stream, filter: String) -> Result<u64, InspectError> {
    let mut info = stream
        .info_with_subjects(filter)
        .await
        .map_err(|e| InspectError::Nats(e.to_string()))?;
    let mut n = 0u64;
    while let Some((_, c)) = info
        .try_next()
        .await
        .map_err(|e| InspectError::Nats(e.to_string()))?
    {
        n += c as u64;
    }
    Ok(n)
}
