//! The job ledger of a chaos run, as text or JSON.
//!
//! Every accepted job must be in `WEIR_RELEASED` or (for the invalid ones) `WEIR_DEAD` exactly
//! once, in its key's order. The rate check takes each key's `Weir-Released-At` stamps and
//! finds the window that most exceeds `burst + floor(t/T)` (+1 for millisecond stamps); the
//! documented bound across hand-overs allows one extra burst per move of the key's partition.

use std::collections::BTreeMap;

use serde::Serialize;

use super::faults::NatsFault;
use super::plan::Plan;
use crate::ledger::{gcra_overshoot, Ledger};

/// What a run did to the jobs.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub members: usize,
    pub partitions: u16,
    pub keys: usize,
    pub planned: u64,
    /// Jobs whose publish was acked.
    pub published: u64,
    pub publish_retries: u64,
    pub publish_duplicate_acks: u64,
    pub released: u64,
    pub dead: u64,
    pub dead_by_reason: BTreeMap<String, u64>,
    /// Accepted jobs found in neither stream.
    pub lost: u64,
    /// The first few lost jobs: key and sequence.
    pub lost_jobs: Vec<(String, u64)>,
    /// What the streams show of each of those ([`super::trace`]).
    pub lost_trace: Vec<String>,
    /// Copies beyond the first, in either stream, or a job in both.
    pub duplicated: u64,
    /// Jobs released after a later job of their key.
    pub reordered: u64,
    /// The first few: key, sequence, the key's highest sequence released before it, and
    /// its sequence in `WEIR_RELEASED`.
    pub reorders: Vec<(String, u64, u64, u64)>,
    /// Jobs found that were never accepted (a publish whose ack was lost before a give-up).
    pub unexpected: u64,
    pub rate: RateCheck,
    pub kills: u32,
    pub nats_faults: Vec<NatsFault>,
    /// Peak resident memory of any Weir process: highest VmRSS sampled, and VmHWM.
    pub peak_rss_bytes: u64,
    pub peak_hwm_bytes: u64,
    pub memory: Vec<MemoryRow>,
    pub publish_s: f64,
    pub wall_s: f64,
    /// All accepted jobs were accounted for before the deadline.
    pub drained: bool,
    pub clean: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryRow {
    pub member: String,
    pub peak_rss_bytes: u64,
    pub peak_hwm_bytes: u64,
}

/// Rate overshoot over the GCRA bound, per key.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RateCheck {
    /// The key with the largest overshoot, and by how many releases.
    pub worst_key: Option<String>,
    pub worst_overshoot: u64,
    /// Its burst and the moves of its partition.
    pub worst_burst: u32,
    pub worst_moves: u32,
    /// Keys over the plain bound.
    pub keys_over_plain_bound: u64,
    /// Keys over the plain bound plus one burst per move of their partition.
    pub keys_over_handover_bound: u64,
    pub within_handover_bound: bool,
}

/// The jobs counted against the plan.
#[derive(Debug, Default)]
pub struct Tally {
    pub lost: u64,
    pub lost_jobs: Vec<(String, u64)>,
    /// Jobs both released and dead.
    pub both: u64,
    pub unexpected: u64,
    pub rate: RateCheck,
}

/// Builds the ledger from what the streams hold.
pub fn build(
    plan: &Plan,
    accepted: &[u64],
    released: &Ledger,
    dead: &Ledger,
    moves: &[u32],
    partitions: u16,
) -> Tally {
    let mut t = Tally::default();

    for (k, key) in plan.keys.iter().enumerate() {
        let n = accepted[k];
        for seq in 0..n {
            match (released.has(&key.name, seq), dead.has(&key.name, seq)) {
                (false, false) => {
                    t.lost += 1;
                    if t.lost_jobs.len() < 10 {
                        t.lost_jobs.push((key.name.clone(), seq));
                    }
                }
                (true, true) => t.both += 1,
                _ => {}
            }
        }
        for l in [released, dead] {
            if let Some(log) = l.keys.get(&key.name) {
                let beyond = log.seen.iter().skip(n as usize).filter(|s| **s).count();
                t.unexpected += beyond as u64;
            }
        }
        let Some(log) = released.keys.get(&key.name) else {
            continue;
        };
        let over = gcra_overshoot(&log.released_at, key.limit);
        let p = crate::job::partition_of(&key.name, partitions);
        let m = moves.get(usize::from(p)).copied().unwrap_or(0);
        if over > 0 {
            t.rate.keys_over_plain_bound += 1;
        }
        if over > u64::from(key.limit.burst) * u64::from(m) {
            t.rate.keys_over_handover_bound += 1;
        }
        if over > t.rate.worst_overshoot {
            t.rate.worst_overshoot = over;
            t.rate.worst_key = Some(key.name.clone());
            t.rate.worst_burst = key.limit.burst;
            t.rate.worst_moves = m;
        }
    }
    // Keys in the streams that the plan does not know.
    for l in [released, dead] {
        for (name, log) in &l.keys {
            if !plan.keys.iter().any(|k| &k.name == name) {
                t.unexpected += log.seen.iter().filter(|s| **s).count() as u64;
            }
        }
    }
    t.rate.within_handover_bound = t.rate.keys_over_handover_bound == 0;
    t
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

impl Report {
    pub fn print(&self) {
        let r = self;
        println!(
            "weir chaos ({}): {} Weir processes, {} partitions, {} keys, {:.1} s",
            r.scenario, r.members, r.partitions, r.keys, r.wall_s
        );
        println!(
            "  faults: {} kill -9 of a Weir process, {} NATS fault(s)",
            r.kills,
            r.nats_faults.len()
        );
        for f in &r.nats_faults {
            let ms = |v: Option<u64>| v.map_or("n/a".into(), |v| format!("{v} ms"));
            println!(
                "    NATS {} at {:.1} s, away {} ms: /healthz 200 throughout: {}, /readyz not 200 (after 1 s): {}; all ready again after {}, releases resumed after {}",
                f.kind, f.at_s, f.down_ms, f.healthz_ok_while_away, f.readyz_down_while_away,
                ms(f.ready_after_ms), ms(f.releases_after_ms)
            );
        }
        println!("  ledger:");
        println!(
            "    published   {:>9}  (of {} planned; {} retries, {} answered duplicate; {:.1} s)",
            r.published, r.planned, r.publish_retries, r.publish_duplicate_acks, r.publish_s
        );
        println!("    released    {:>9}", r.released);
        println!("    dead        {:>9}", r.dead);
        for (reason, n) in &r.dead_by_reason {
            println!("      {n:>9}  {reason}");
        }
        println!("    lost        {:>9}", r.lost);
        for (key, seq) in &r.lost_jobs {
            println!("      {key} job {seq}");
        }
        for line in &r.lost_trace {
            println!("      {line}");
        }
        println!("    duplicated  {:>9}", r.duplicated);
        println!("    reordered   {:>9}", r.reordered);
        for (key, seq, after, at) in &r.reorders {
            println!("      {key} job {seq} after job {after} (WEIR_RELEASED seq {at})");
        }
        if r.unexpected > 0 {
            println!(
                "    unexpected  {:>9}  (found but never acked)",
                r.unexpected
            );
        }
        let q = &r.rate;
        println!(
            "  rate: worst overshoot {} release(s) over burst + floor(t/T) + 1{}; {} key(s) over the plain bound, {} over one extra burst per hand-over: {}",
            q.worst_overshoot,
            q.worst_key.as_ref().map_or(String::new(), |k| format!(
                " ({k}, burst {}, its partition moved {} time(s))",
                q.worst_burst, q.worst_moves
            )),
            q.keys_over_plain_bound,
            q.keys_over_handover_bound,
            if q.within_handover_bound { "within the documented bound" } else { "OVER the documented bound" }
        );
        println!(
            "  memory: peak RSS of a Weir process {} (VmHWM {})",
            mib(r.peak_rss_bytes),
            mib(r.peak_hwm_bytes)
        );
        for m in &r.memory {
            println!(
                "    {:<10} VmRSS peak {:>10}, VmHWM {:>10}",
                m.member,
                mib(m.peak_rss_bytes),
                mib(m.peak_hwm_bytes)
            );
        }
        println!(
            "  {}",
            if r.clean {
                "clean: nothing lost, duplicated or reordered"
            } else if !r.drained {
                "NOT CLEAN: the jobs were not all accounted for by the deadline"
            } else {
                "NOT CLEAN: jobs were lost, duplicated or reordered"
            }
        );
    }
}
