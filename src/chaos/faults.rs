//! The faults `weir chaos` injects, and what it measures around them.
//!
//! - **kill -9 of a Weir process**, chosen at random, restarted at once under the same member
//!   name (a container restarted in its pod). The partitions it held at the kill are recorded:
//!   each is one hand-over, worth one extra burst to its keys.
//! - **nats-server kill -9**, down for a while, then restarted on the same port and store.
//!   While it is down, every process's `/healthz` must answer 200 and `/readyz` must not; after
//!   the restart, the time until every process is ready again (all partitions owned and bound)
//!   and until releases resume is measured.
//! - **nats-server SIGSTOP**, longer than the 5 s publish ack timeout, then SIGCONT.
//!
//! A NATS fault counts as one hand-over for every partition: an outage over 2/3 of a lease
//! fences them all, and their keys restart with full buckets.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use rand::Rng;
use serde::Serialize;

use crate::bench::BoxError;
use crate::job::RELEASED_STREAM;
use crate::members::{get, settled, signal, Member, POLL};
use crate::natsd::LocalNats;

/// The Weir processes of the run, and what was done to them.
pub struct Group {
    pub members: Vec<Member>,
    pub config: PathBuf,
    pub url: String,
    pub partitions: u16,
    /// Hand-overs each partition went through (kills of its holder, NATS faults).
    pub moves: Vec<u32>,
    pub kills: u32,
    /// Peak resident memory per member name: `(highest VmRSS sampled, highest VmHWM)`.
    pub memory: Vec<(String, u64, u64)>,
}

/// One NATS fault and its measures.
#[derive(Debug, Clone, Serialize)]
pub struct NatsFault {
    /// `restart` (kill -9, down, start) or `pause` (SIGSTOP, SIGCONT).
    pub kind: &'static str,
    /// Seconds since the start of the run.
    pub at_s: f64,
    pub down_ms: u64,
    /// Every `/healthz` asked while NATS was away answered 200.
    pub healthz_ok_while_away: bool,
    /// Every `/readyz` asked while NATS was away (from 1 s in) did not answer 200.
    pub readyz_down_while_away: bool,
    /// From the server's return until every process was ready with every partition owned.
    pub ready_after_ms: Option<u64>,
    /// From the server's return until `WEIR_RELEASED` grew again (`None`: nothing to release).
    pub releases_after_ms: Option<u64>,
}

impl Group {
    pub async fn start(
        config: PathBuf,
        url: String,
        n: usize,
        partitions: u16,
    ) -> Result<Group, BoxError> {
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member::start(&config, &url, &format!("chaos-{i}")).await?);
        }
        let memory = members.iter().map(|m| (m.name.clone(), 0, 0)).collect();
        Ok(Group {
            members,
            config,
            url,
            partitions,
            moves: vec![0; usize::from(partitions)],
            kills: 0,
            memory,
        })
    }

    /// Waits until every partition is owned and every process ready (`deadline` from now).
    pub async fn wait_ready(&self, deadline: Duration) -> Result<Duration, String> {
        let t0 = Instant::now();
        loop {
            match settled(&self.members, self.partitions, false).await {
                Ok(()) => return Ok(t0.elapsed()),
                Err(e) if t0.elapsed() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// `kill -9` of a random process, restarted at once under its name.
    pub async fn kill_one(&mut self) -> Result<(), BoxError> {
        let i = rand::rng().random_range(0..self.members.len());
        let name = self.members[i].name.clone();
        // The partitions it holds now move (to its successor) with the kill.
        let held: Vec<usize> = match get(&self.members[i].admin, "/v1/cluster").await {
            Ok((_, c)) => (c["assignment"].as_array().into_iter().flatten())
                .filter(|r| r["owner"].as_str() == Some(name.as_str()))
                .filter_map(|r| r["partition"].as_u64().map(|p| p as usize))
                .collect(),
            Err(_) => (0..self.moves.len()).collect(),
        };
        self.sample_memory();
        tracing::info!(member = %name, partitions = ?held, "chaos: kill -9");
        self.members[i].kill9().await?;
        for p in held {
            self.moves[p] += 1;
        }
        self.kills += 1;
        self.members[i] = Member::start(&self.config, &self.url, &name).await?;
        Ok(())
    }

    /// Reads every process's VmRSS and VmHWM and keeps the peaks.
    pub fn sample_memory(&mut self) {
        for m in &self.members {
            if let Some((rss, hwm)) = crate::members::memory(m.pid) {
                if let Some(e) = self.memory.iter_mut().find(|e| e.0 == m.name) {
                    e.1 = e.1.max(rss);
                    e.2 = e.2.max(hwm);
                }
            }
        }
    }

    /// Every process's `/healthz` and `/readyz` status (0: no answer).
    async fn probes(&self) -> Vec<(u16, u16)> {
        let mut out = Vec::new();
        for m in &self.members {
            let h = get(&m.admin, "/healthz").await.map_or(0, |r| r.0);
            let r = get(&m.admin, "/readyz").await.map_or(0, |r| r.0);
            out.push((h, r));
        }
        out
    }

    /// kill -9 (or SIGSTOP) of nats-server for `down`, then its return, with the measures.
    pub async fn nats_fault(
        &mut self,
        nats: &mut LocalNats,
        pause: bool,
        down: Duration,
        run_start: Instant,
    ) -> Result<NatsFault, BoxError> {
        let at_s = run_start.elapsed().as_secs_f64();
        let released_before = released_last_seq(&self.url).await;
        let pid = nats.pid().ok_or("nats-server is not running")?;
        let t0 = Instant::now();
        tracing::info!(pause, "chaos: nats-server fault");
        if pause {
            signal(pid, "-STOP").await?;
        } else {
            nats.kill();
        }
        let (mut healthz_ok, mut readyz_down) = (true, true);
        while t0.elapsed() < down {
            let late = t0.elapsed() > Duration::from_secs(1);
            for (h, r) in self.probes().await {
                healthz_ok &= h == 200;
                readyz_down &= !late || r != 200;
            }
            self.sample_memory();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if pause {
            signal(pid, "-CONT").await?;
        } else {
            // `restart` blocks until the server logs that it is ready.
            tokio::task::block_in_place(|| nats.restart())?;
        }
        let back = Instant::now();
        tracing::info!("chaos: nats-server back");
        let down_ms = (back - t0).as_millis() as u64;
        for p in self.moves.iter_mut() {
            *p += 1;
        }
        let ready = self.wait_ready(Duration::from_secs(120)).await;
        let ready_after_ms = ready.ok().map(|_| back.elapsed().as_millis() as u64);
        let releases_after_ms = match released_before {
            Some(before) => releases_resumed(&self.url, before, back).await,
            None => None,
        };
        Ok(NatsFault {
            kind: if pause { "pause" } else { "restart" },
            at_s,
            down_ms,
            healthz_ok_while_away: healthz_ok,
            readyz_down_while_away: readyz_down,
            ready_after_ms,
            releases_after_ms,
        })
    }
}

/// `WEIR_RELEASED`'s last sequence, on a connection of its own (the run's client may still be
/// backing off its reconnect).
async fn released_last_seq(url: &str) -> Option<u64> {
    let client = tokio::time::timeout(Duration::from_secs(2), async_nats::connect(url))
        .await
        .ok()?
        .ok()?;
    let js = jetstream::new(client);
    let mut s = js.get_stream(RELEASED_STREAM).await.ok()?;
    Some(s.info().await.ok()?.state.last_sequence)
}

/// Time from `back` until `WEIR_RELEASED` grows past `before`, if it does within 60 s and there
/// is still work waiting.
async fn releases_resumed(url: &str, before: u64, back: Instant) -> Option<u64> {
    let client = async_nats::connect(url).await.ok()?;
    let js = jetstream::new(client);
    let mut released = js.get_stream(RELEASED_STREAM).await.ok()?;
    let mut jobs = js.get_stream(crate::job::JOBS_STREAM).await.ok()?;
    let mut park = js.get_stream(crate::job::PARK_STREAM).await.ok()?;
    while back.elapsed() < Duration::from_secs(60) {
        if released.info().await.ok()?.state.last_sequence > before {
            return Some(back.elapsed().as_millis() as u64);
        }
        let waiting =
            jobs.info().await.ok()?.state.messages + park.info().await.ok()?.state.messages;
        if waiting == 0 {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
    None
}
