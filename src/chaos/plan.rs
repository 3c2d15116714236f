//! What `weir chaos` publishes, and publishing it exactly once.
//!
//! **Keys.** Hot keys carry most jobs, with backlogs far deeper than the in-memory horizon (so
//! they park): half match the pattern `hot-fast-*` (a faster tier), half `hot-slow-*` (a slower
//! one). Thousands of cold keys (`cold-<i>`) run at the default limit with a few jobs each. A
//! few jobs go to invalid subjects (`jobs.chaos.bad-<i>.x`) and must come out dead. In the
//! flood, 100,000 keys (`flood-<i>`) get ten jobs each, all ten within about a second: ten
//! times their rate.
//!
//! **Exactly-once publishing.** Each job carries `Nats-Msg-Id` `chaos-<run>-<key>-<seq>`. Jobs
//! go out on `lanes` serial lanes (a key always on the same lane), each waiting for a job's ack
//! before its next job and retrying a failed publish with the same id until the deadline. So a
//! lost ack costs a duplicate that `WEIR_JOBS` drops, never a gap, and a key's jobs are stored
//! in their order even across a NATS restart (a pipelined retry could store job 5 after job 6).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::header::HeaderMap;
use async_nats::jetstream::Context;

use crate::config::{Limit, Rate};
use crate::job::header;

/// The tiers of the run's keys: `(name prefix, pattern name in WEIR_LIMITS, limit)`.
pub fn tiers(flood: bool) -> (Limit, Vec<(&'static str, Limit)>) {
    let l = |count: u32, burst: u32| Limit {
        rate: Rate {
            count,
            per: Duration::from_secs(1),
        },
        burst,
    };
    if flood {
        // 10 jobs per key at 2/s: each key's backlog stays within the 5 s horizon, so the
        // flood is held in memory (up to max_held_per_partition), the worst case for RSS.
        (l(2, 1), vec![])
    } else {
        (
            l(50, 5),
            vec![("hot-fast", l(400, 40)), ("hot-slow", l(100, 10))],
        )
    }
}

/// One key of the run.
#[derive(Debug, Clone)]
pub struct KeyPlan {
    pub name: String,
    pub limit: Limit,
    /// Jobs planned for it.
    pub jobs: u64,
    /// Published to an invalid subject: must end in `WEIR_DEAD`.
    pub invalid: bool,
}

/// Every key, and the global publish order (an index into `keys` per job).
pub struct Plan {
    pub keys: Vec<KeyPlan>,
    pub order: Vec<u32>,
}

/// The normal run: `hot` keys carrying `hot_share` of `jobs`, the rest round-robin over `cold`
/// keys, hot and cold interleaved evenly; then `invalid` bad jobs.
pub fn mixed(jobs: u64, hot: u64, hot_share: f64, cold: u64, invalid: u64) -> Plan {
    let (default, tiers) = tiers(false);
    let mut keys = Vec::new();
    for i in 0..hot {
        let (prefix, limit) = tiers[(i % 2) as usize];
        keys.push(KeyPlan {
            name: format!("{prefix}-{i}"),
            limit,
            jobs: 0,
            invalid: false,
        });
    }
    for i in 0..cold {
        keys.push(KeyPlan {
            name: format!("cold-{i}"),
            limit: default,
            jobs: 0,
            invalid: false,
        });
    }
    let hot_jobs = if hot == 0 {
        0
    } else {
        ((jobs as f64 * hot_share.clamp(0.0, 1.0)) as u64).min(jobs)
    };
    let mut order = Vec::with_capacity(jobs as usize);
    let (mut h, mut c) = (0u64, 0u64);
    for i in 0..jobs {
        // Job i is hot when it brings the hot count up to its share of the first i + 1 jobs.
        // (jobs > 0 inside this loop.)
        let hot_due = (i + 1) * hot_jobs / jobs;
        let k = if (h < hot_due || cold == 0) && hot > 0 {
            h += 1;
            (h - 1) % hot
        } else {
            c += 1;
            hot + (c - 1) % cold.max(1)
        };
        order.push(k as u32);
    }
    add_invalid(&mut keys, &mut order, invalid, default);
    count(&mut keys, &order);
    Plan { keys, order }
}

/// The flood: `per_key` jobs for each of `keys` keys, in blocks of 1,000 keys, each block's
/// jobs round-robin (so a key's jobs go out within about a second, ten times its rate).
pub fn flood(keys_n: u64, per_key: u64) -> Plan {
    let (default, _) = tiers(true);
    let mut keys: Vec<KeyPlan> = (0..keys_n)
        .map(|i| KeyPlan {
            name: format!("flood-{i}"),
            limit: default,
            jobs: 0,
            invalid: false,
        })
        .collect();
    let mut order = Vec::with_capacity((keys_n * per_key) as usize);
    for block in (0..keys_n).step_by(1000) {
        for _ in 0..per_key {
            order.extend((block..(block + 1000).min(keys_n)).map(|k| k as u32));
        }
    }
    count(&mut keys, &order);
    Plan { keys, order }
}

fn add_invalid(keys: &mut Vec<KeyPlan>, order: &mut Vec<u32>, n: u64, limit: Limit) {
    for i in 0..n {
        order.push(keys.len() as u32);
        keys.push(KeyPlan {
            name: format!("bad-{i}"),
            limit,
            jobs: 0,
            invalid: true,
        });
    }
}

fn count(keys: &mut [KeyPlan], order: &[u32]) {
    for &k in order {
        keys[k as usize].jobs += 1;
    }
}

/// Live publishing counters.
#[derive(Debug, Default)]
pub struct Published {
    /// Jobs whose publish was acked (stored, or recognised as a duplicate of a stored one).
    pub accepted: AtomicU64,
    /// Publishes tried again after an error or an ack timeout.
    pub retries: AtomicU64,
    /// Retries that JetStream answered "duplicate": the first try had been stored.
    pub duplicate_acks: AtomicU64,
}

/// One accepted publish, kept for the post-mortem of a lost job ([`super::trace`]).
#[derive(Debug, Clone, Copy)]
pub struct Acked {
    /// The job's sequence in `WEIR_JOBS`, as the ack gave it (a duplicate's is the original's).
    pub stream_seq: u64,
    /// Answered "duplicate": an earlier try had been stored.
    pub duplicate: bool,
    /// Publishes it took.
    pub tries: u32,
    /// When the ack came, in ms since `t0`.
    pub at_ms: u64,
}

/// Publishes `plan` on `lanes` lanes; returns, per key, the acks of its accepted jobs in order
/// (a key whose job could not be published by `deadline` stops there).
pub async fn publish(
    js: &Context,
    plan: Arc<Plan>,
    run: String,
    lanes: usize,
    stats: Arc<Published>,
    (t0, deadline): (Instant, Instant),
) -> Vec<Vec<Acked>> {
    let lanes = lanes.max(1);
    let tasks: Vec<_> = (0..lanes)
        .map(|lane| {
            let (js, plan, run, stats) = (js.clone(), plan.clone(), run.clone(), stats.clone());
            tokio::spawn(async move {
                publish_lane(&js, &plan, &run, (lane, lanes), &stats, (t0, deadline)).await
            })
        })
        .collect();
    let mut accepted = vec![Vec::new(); plan.keys.len()];
    for t in tasks {
        for (k, acks) in t.await.expect("a publish lane panicked") {
            accepted[k] = acks;
        }
    }
    accepted
}

async fn publish_lane(
    js: &Context,
    plan: &Plan,
    run: &str,
    (lane, lanes): (usize, usize),
    stats: &Published,
    (t0, deadline): (Instant, Instant),
) -> Vec<(usize, Vec<Acked>)> {
    let mut next: std::collections::HashMap<usize, Vec<Acked>> = Default::default();
    let mut stopped = std::collections::HashSet::new();
    for &k in &plan.order {
        let k = k as usize;
        if k % lanes != lane || stopped.contains(&k) {
            continue;
        }
        let key = &plan.keys[k];
        let seq = next.entry(k).or_default().len() as u64;
        let subject = if key.invalid {
            format!("jobs.chaos.{}.x", key.name)
        } else {
            format!("jobs.chaos.{}", key.name)
        };
        let mut h = HeaderMap::new();
        h.insert(header::MSG_ID, format!("chaos-{run}-{}-{seq}", key.name));
        let body = crate::ledger::payload(&key.name, seq);
        let mut backoff = Duration::from_millis(50);
        let mut first = true;
        let mut tries = 0;
        loop {
            tries += 1;
            if !first {
                stats.retries.fetch_add(1, Relaxed);
            }
            let sent = js
                .publish_with_headers(subject.clone(), h.clone(), body.clone())
                .await;
            let acked = match sent {
                Ok(ack) => ack.await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match acked {
                Ok(ack) => {
                    if ack.duplicate && !first {
                        stats.duplicate_acks.fetch_add(1, Relaxed);
                    }
                    stats.accepted.fetch_add(1, Relaxed);
                    next.entry(k).or_default().push(Acked {
                        stream_seq: ack.sequence,
                        duplicate: ack.duplicate,
                        tries,
                        at_ms: t0.elapsed().as_millis() as u64,
                    });
                    break;
                }
                Err(e) if Instant::now() + backoff > deadline => {
                    tracing::warn!(key = %key.name, seq, error = %e, "giving up publishing");
                    stopped.insert(k);
                    break;
                }
                Err(e) => {
                    tracing::debug!(key = %key.name, seq, error = %e, "publish failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    first = false;
                }
            }
        }
    }
    next.into_iter().collect()
}
