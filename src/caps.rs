//! Destination caps for the whole deployment: one GCRA bucket per capped destination in each
//! process, shared by its partition tasks (governor's state is one atomic: no lock), each for a
//! *share* of the cap that the processes lend each other.
//!
//! # Splitting a cap between processes
//! A cap is global: the releases to a destination from every process together stay within
//! `burst + floor(t / T)`. Each process holds a share `s_i` of the rate (and of the burst,
//! rounded down, at least one), with `sum(s_i) <= 1`, so the sum of their GCRA buckets never
//! exceeds the cap. A static split (each process its fraction of the partitions) is safe but
//! wastes the idle processes' shares when traffic is skewed; so the shares move with demand:
//!
//! - Every 250 ms each process publishes, on core NATS subject `weir.caps`, per capped
//!   destination: the share it applies, the share it is aiming for, how many of its keys are
//!   queued for the destination (saturated) and how much it used.
//! - Each computes its own target from everyone's latest report: a process that is not
//!   saturated keeps what it uses plus 25% headroom (at least 2% of the cap, so new traffic can
//!   start at once); the saturated ones split the rest in proportion to their queued keys (so
//!   the cap is shared per key across processes, not per process).
//! - Lowering applies at once. Raising is a reservation: the higher target is announced first,
//!   and applied only two reports later, and then only up to `1 - sum over others of
//!   max(applied, target)`. Two processes raising together each leave room for the other's
//!   announced target, so the sum stays within the cap as long as reports arrive within two
//!   periods (core NATS on one cluster: milliseconds).
//! - A process not heard from for a second is gone, and its share is lent out again (one that
//!   lost NATS cannot publish releases either). A process starts at its static fraction, which
//!   is safe before it has heard anyone.
//!
//! What it costs: with all traffic on one process, the idle ones keep 2% each, so with two
//! processes 98% of the cap stays usable. A share changes only by steps of 5% of the cap (each
//! change starts the bucket empty, which costs up to one token), so steady traffic does not
//! churn buckets.

use std::collections::HashMap as StdMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Limit;
use crate::limiter::Bucket;
use crate::limits::Limits;
use crate::partition::PartitionStats;
use crate::scheduler::{Caps, Key};

/// The core NATS subject processes report their cap usage on.
pub const SUBJECT: &str = "weir.caps";
const PERIOD: Duration = Duration::from_millis(250);
/// A member not heard from for this long is gone.
const GONE_AFTER: Duration = Duration::from_millis(1000);
/// What an unsaturated process keeps at least, as a fraction of the cap.
const FLOOR: f64 = 0.02;
/// Shares move in steps of this much.
const STEP: f64 = 0.05;

/// One destination in a report.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct DestReport {
    pub applied: f64,
    pub target: f64,
    /// Keys queued for the destination (the process wants more).
    pub waiting: u64,
    /// Releases per second in the last period.
    pub used: f64,
}

/// What a process says every period.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub id: String,
    pub dests: StdMap<String, DestReport>,
}

/// This process's view of one capped destination.
#[derive(Debug)]
struct Share {
    limit: Limit,
    applied: f64,
    target: f64,
    /// When the current raise was announced.
    raise_since: Option<Instant>,
    released_before: u64,
    report: DestReport,
}

/// Follows the limits table and the other processes' reports; publishes the process's
/// destination buckets.
pub fn follow(
    mut limits: watch::Receiver<Arc<Limits>>,
    partitions: Vec<Arc<PartitionStats>>,
    static_share: f64,
    client: async_nats::Client,
    cancel: CancellationToken,
) -> (watch::Receiver<Arc<Caps>>, tokio::task::JoinHandle<()>) {
    let table = limits.borrow_and_update().clone();
    let id = format!("{:016x}", rand::random::<u64>());
    let mut shares: StdMap<String, Share> = StdMap::new();
    let mut caps = Caps::new();
    sync_limits(&mut shares, &mut caps, &table, static_share);
    let (tx, rx) = watch::channel(Arc::new(caps.clone()));
    let task = tokio::spawn(async move {
        let mut sub = match client.subscribe(SUBJECT).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot hear other processes' caps; keeping static shares");
                None
            }
        };
        let mut peers: StdMap<String, (Instant, Report)> = StdMap::new();
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = limits.changed() => {
                    if r.is_err() { return; }
                    let table = limits.borrow_and_update().clone();
                    if sync_limits(&mut shares, &mut caps, &table, static_share) {
                        tx.send_replace(Arc::new(caps.clone()));
                    }
                }
                Some(m) = async { match sub.as_mut() { Some(s) => s.next().await, None => None } } => {
                    if let Ok(r) = serde_json::from_slice::<Report>(&m.payload) {
                        if r.id != id {
                            peers.insert(r.id.clone(), (Instant::now(), r));
                        }
                    }
                }
                _ = tick.tick() => {
                    if shares.is_empty() {
                        continue;
                    }
                    peers.retain(|_, (at, _)| at.elapsed() < GONE_AFTER);
                    measure(&mut shares, &partitions);
                    let peers: Vec<&Report> = peers.values().map(|(_, r)| r).collect();
                    if rebalance(&mut shares, &peers, Instant::now()) {
                        rebuild(&shares, &mut caps);
                        tx.send_replace(Arc::new(caps.clone()));
                    }
                    let report = Report {
                        id: id.clone(),
                        dests: shares.iter().map(|(d, s)| (d.clone(), s.report)).collect(),
                    };
                    let body = serde_json::to_vec(&report).expect("serialisable");
                    let _ = client.publish(SUBJECT, body.into()).await;
                }
            }
        }
    });
    (rx, task)
}

/// Brings the shares in line with the table's caps; `true` if the buckets changed.
fn sync_limits(
    shares: &mut StdMap<String, Share>,
    caps: &mut Caps,
    table: &Limits,
    static_share: f64,
) -> bool {
    let mut changed = false;
    shares.retain(|d, _| table.destination(d).is_some());
    caps.retain(|d, _| {
        let keep = table.destination(d).is_some();
        changed |= !keep;
        keep
    });
    for (d, limit) in table.destinations() {
        let (share, fresh) = match shares.get_mut(d) {
            Some(s) if s.limit == *limit => continue,
            Some(s) => {
                s.limit = *limit;
                (s.applied, false)
            }
            None => {
                let s = Share {
                    limit: *limit,
                    applied: static_share,
                    target: static_share,
                    raise_since: None,
                    released_before: 0,
                    report: DestReport {
                        applied: static_share,
                        target: static_share,
                        ..DestReport::default()
                    },
                };
                shares.insert(d.clone(), s);
                (static_share, true)
            }
        };
        // A changed cap starts empty, so its new bound holds from now; a new one starts full.
        let bucket = Bucket::share_of(limit, share);
        if !fresh {
            bucket.drain();
        }
        caps.insert(Key::from(d.as_str()), Arc::new(bucket));
        changed = true;
    }
    changed
}

/// Reads the partitions' queued keys and releases per capped destination.
fn measure(shares: &mut StdMap<String, Share>, partitions: &[Arc<PartitionStats>]) {
    let mut totals: StdMap<&str, (u64, u64)> = StdMap::new();
    let usages: Vec<_> = partitions.iter().map(|p| p.dest_usage()).collect();
    for usage in &usages {
        for (d, &(waiting, released)) in usage.iter() {
            let t = totals.entry(d.as_str()).or_default();
            t.0 += waiting;
            t.1 += released;
        }
    }
    for (d, s) in shares.iter_mut() {
        let (waiting, released) = totals.get(d.as_str()).copied().unwrap_or_default();
        s.report.waiting = waiting;
        s.report.used = released.saturating_sub(s.released_before) as f64 / PERIOD.as_secs_f64();
        s.released_before = released;
    }
}

/// Computes targets and applies what may be applied; `true` if an applied share changed.
fn rebalance(shares: &mut StdMap<String, Share>, peers: &[&Report], now: Instant) -> bool {
    let mut changed = false;
    for (d, s) in shares.iter_mut() {
        let rate = s.limit.rate.per_second().max(f64::MIN_POSITIVE);
        let others: Vec<DestReport> = peers
            .iter()
            .filter_map(|r| r.dests.get(d).copied())
            .collect();
        let mine = DestReport {
            applied: s.applied,
            ..s.report
        };
        let target = quantize(target_share(&mine, &others, rate));
        s.target = target;
        if target < s.applied {
            s.applied = target;
            s.raise_since = None;
            changed = true;
        } else if target > s.applied {
            let since = *s.raise_since.get_or_insert(now);
            if now.duration_since(since) >= PERIOD * 2 {
                let reserved: f64 = others.iter().map(|o| o.applied.max(o.target)).sum();
                let room = quantize_down(1.0 - reserved);
                let next = target.min(room);
                if next > s.applied {
                    s.applied = next;
                    changed = true;
                }
                s.raise_since = None;
            }
        } else {
            s.raise_since = None;
        }
        s.report.applied = s.applied;
        s.report.target = s.target;
    }
    changed
}

/// The share a process should aim for, given its own report and everyone else's.
fn target_share(mine: &DestReport, others: &[DestReport], rate: f64) -> f64 {
    let need = |r: &DestReport| ((r.used * 1.25) / rate).clamp(FLOOR, 1.0);
    let everyone = std::iter::once(mine).chain(others.iter());
    let kept: f64 = everyone.clone().filter(|r| r.waiting == 0).map(need).sum();
    let queued: u64 = everyone.map(|r| r.waiting).sum();
    if mine.waiting == 0 {
        if queued == 0 {
            // Nobody wants more: split evenly, so whoever starts first has room at once.
            return 1.0 / (others.len() + 1) as f64;
        }
        return need(mine);
    }
    let rest = (1.0 - kept).max(0.0);
    (rest * mine.waiting as f64 / queued as f64).max(FLOOR)
}

fn quantize(x: f64) -> f64 {
    ((x / STEP).round() * STEP).clamp(FLOOR, 1.0)
}

fn quantize_down(x: f64) -> f64 {
    ((x / STEP + 1e-9).floor() * STEP).clamp(FLOOR, 1.0)
}

/// New buckets, empty, for the destinations whose applied share changed.
fn rebuild(shares: &StdMap<String, Share>, caps: &mut Caps) {
    for (d, s) in shares {
        let bucket = Bucket::share_of(&s.limit, s.applied);
        bucket.drain();
        caps.insert(Key::from(d.as_str()), Arc::new(bucket));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(applied: f64, target: f64, waiting: u64, used: f64) -> DestReport {
        DestReport {
            applied,
            target,
            waiting,
            used,
        }
    }

    /// Destination "d", capped at 100/s, as this process reports it.
    fn one_share(report: DestReport) -> StdMap<String, Share> {
        let limit = Limit {
            rate: "100/s".parse().unwrap(),
            burst: 10,
        };
        let share = Share {
            limit,
            applied: report.applied,
            target: report.target,
            raise_since: None,
            released_before: 0,
            report,
        };
        [("d".to_string(), share)].into()
    }

    #[test]
    fn a_saturated_process_borrows_what_idle_ones_do_not_use() {
        // Cap 100/s; the other process is idle.
        let t = target_share(&r(0.5, 0.5, 10, 50.0), &[r(0.5, 0.5, 0, 0.0)], 100.0);
        assert!((t - 0.98).abs() < 1e-9, "{t}");
        // The other process uses 30/s and is not saturated: it keeps 37.5%.
        let t = target_share(&r(0.5, 0.5, 10, 50.0), &[r(0.5, 0.5, 0, 30.0)], 100.0);
        assert!((t - 0.625).abs() < 1e-9, "{t}");
        // Both saturated: split by queued keys.
        let t = target_share(&r(0.5, 0.5, 30, 50.0), &[r(0.5, 0.5, 10, 50.0)], 100.0);
        assert!((t - 0.75).abs() < 1e-9, "{t}");
    }

    #[test]
    fn raising_waits_for_the_reservation_and_leaves_room_for_others() {
        let mut shares = one_share(r(0.5, 0.5, 10, 50.0));
        let idle = Report {
            id: "b".into(),
            dests: [("d".to_string(), r(0.5, 0.5, 0, 0.0))].into(),
        };
        let t0 = Instant::now();
        assert!(!rebalance(&mut shares, &[&idle], t0), "not at once");
        assert_eq!(shares["d"].target, 1.0_f64.min(quantize(0.98)));
        // The idle process has not lowered yet: no room.
        assert!(!rebalance(&mut shares, &[&idle], t0 + PERIOD * 2));
        // It lowers to its floor: now the raise applies, leaving it its share.
        let lowered = Report {
            id: "b".into(),
            dests: [("d".to_string(), r(FLOOR, FLOOR, 0, 0.0))].into(),
        };
        rebalance(&mut shares, &[&lowered], t0 + PERIOD * 3);
        assert!(rebalance(&mut shares, &[&lowered], t0 + PERIOD * 6));
        let applied = shares["d"].applied;
        assert!(applied + FLOOR <= 1.0 + 1e-9 && applied >= 0.9, "{applied}");
    }

    #[test]
    fn lowering_applies_at_once() {
        let mut shares = one_share(r(0.95, 0.95, 1, 90.0));
        let busy = Report {
            id: "b".into(),
            dests: [("d".to_string(), r(0.05, 0.05, 3, 5.0))].into(),
        };
        assert!(rebalance(&mut shares, &[&busy], Instant::now()));
        assert!(
            (shares["d"].applied - 0.25).abs() < 1e-9,
            "{}",
            shares["d"].applied
        );
    }
}
