//! `weir run` subprocesses of the current executable, for `weir bench --only scale` and
//! `weir chaos`: starting, stopping and watching them, and reading their CPU time and memory.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bench::BoxError;
use crate::cli::http::AdminClient;

/// How often the group's state is polled.
pub const POLL: Duration = Duration::from_millis(20);

/// One `weir run` subprocess; killed (SIGKILL) when dropped, so a failed bench leaves none.
pub struct Member {
    pub name: String,
    pub admin: AdminClient,
    pub child: tokio::process::Child,
    pub pid: u32,
}

impl Member {
    /// Starts `weir run` and waits until its admin API answers. The admin port is one that was
    /// free a moment ago; if another process took it meanwhile, Weir exits and is started again.
    pub async fn start(config: &Path, nats_url: &str, name: &str) -> Result<Member, BoxError> {
        let exe = std::env::current_exe()?;
        for _ in 0..5 {
            let http: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("run").arg("--config").arg(config);
            cmd.args(["--nats-url", nats_url, "--http-addr", &http.to_string()]);
            cmd.args(["--member", name]).kill_on_drop(true);
            cmd.stdin(std::process::Stdio::null());
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "warn,async_nats=error");
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot run {} run: {e}", exe.display()))?;
            let pid = child.id().ok_or("weir exited at once")?;
            let admin = AdminClient::new(&http.to_string())?;
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && child.try_wait()?.is_none() {
                if get(&admin, "/healthz").await.is_ok() {
                    let name = name.to_string();
                    return Ok(Member {
                        name,
                        admin,
                        child,
                        pid,
                    });
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Err(format!("weir run --member {name} did not start (5 attempts)").into())
    }

    pub async fn kill9(&mut self) -> Result<(), BoxError> {
        Ok(self.child.kill().await?)
    }

    pub async fn sigterm(&self) -> Result<(), BoxError> {
        signal(self.pid, "-TERM").await
    }
}

/// Sends `sig` (as `kill` takes it: `-TERM`, `-STOP`, `-CONT`) to `pid`. The one place the
/// benchmark and chaos runs signal a process (no unsafe `libc::kill` under `forbid(unsafe_code)`).
pub async fn signal(pid: u32, sig: &str) -> Result<(), BoxError> {
    let ok = (tokio::process::Command::new("kill").args([sig, &pid.to_string()]))
        .status()
        .await?
        .success();
    ok.then_some(())
        .ok_or_else(|| format!("kill {sig} {pid} failed").into())
}

/// `GET path` as JSON (any status), bounded to a second.
pub async fn get(admin: &AdminClient, path: &str) -> Result<(u16, Value), String> {
    let a = tokio::time::timeout(Duration::from_secs(1), admin.get(path))
        .await
        .map_err(|_| format!("{path}: no answer within 1 s"))?
        .map_err(|e| e.to_string())?;
    let v = admin.json(path, &a).map_err(|e| e.to_string())?;
    Ok((a.status, v))
}

/// `Ok` once every partition is owned by one of `live` and every live member is ready with as
/// many partitions running as it owns; with `balanced`, also the quotas of `live.len()` members.
/// `Err` says what is still missing. Asks the group's view of `live[0]`.
pub async fn settled(live: &[Member], partitions: u16, balanced: bool) -> Result<(), String> {
    let (_, c) = get(&live[0].admin, "/v1/cluster").await?;
    let mut owned: HashMap<&str, u64> = live.iter().map(|m| (m.name.as_str(), 0)).collect();
    let rows = c["assignment"].as_array().ok_or("no assignment")?;
    for row in rows {
        match row["owner"].as_str().and_then(|o| owned.get_mut(o)) {
            Some(n) => *n += 1,
            None => {
                return Err(format!(
                    "partition {} owned by {}",
                    row["partition"], row["owner"]
                ))
            }
        }
    }
    if rows.len() != usize::from(partitions) {
        return Err(format!("{} partitions listed", rows.len()));
    }
    if balanced {
        let mut got: Vec<u64> = owned.values().copied().collect();
        got.sort_unstable();
        let k = live.len() as u64;
        let p = u64::from(partitions);
        let want: Vec<u64> = (0..k).map(|i| p / k + u64::from(i >= k - p % k)).collect();
        if got != want {
            return Err(format!("ownership {owned:?}, want {want:?}"));
        }
    }
    for m in live {
        let (code, r) = get(&m.admin, "/readyz").await?;
        if code != 200 || r["partitions"].as_u64() != Some(owned[m.name.as_str()]) {
            return Err(format!(
                "{}: /readyz {code} {r}, owns {}",
                m.name,
                owned[m.name.as_str()]
            ));
        }
    }
    Ok(())
}

/// Polls [`settled`] every 20 ms; returns the time from `since` to the end of the first poll
/// that found the group settled (so figures are at most one poll late).
pub async fn wait_settled(
    live: &[Member],
    partitions: u16,
    balanced: bool,
    since: Instant,
) -> Result<Duration, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match settled(live, partitions, balanced).await {
            Ok(()) => return Ok(since.elapsed()),
            Err(state) if Instant::now() > deadline => {
                return Err(format!("the group did not settle within 60 s: {state}").into())
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// User plus system CPU time of a process, in clock ticks (all its threads).
pub fn cpu_ticks(pid: u32) -> Result<u64, BoxError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e} (CPU figures need Linux)"))?;
    // Fields after the command name (which may hold spaces): state is the first; utime and
    // stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    Ok(f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0))
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux when that cannot be asked).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn config_file(toml: &str) -> Result<tempfile::NamedTempFile, BoxError> {
    use std::io::Write;
    let mut f = tempfile::Builder::new()
        .prefix("weir-bench-")
        .suffix(".toml")
        .tempfile()?;
    f.write_all(toml.as_bytes())?;
    Ok(f)
}

/// Whether `pid` is nats-server itself (not a wrapper that forked it).
pub fn is_nats_server(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "nats-server")
}

/// Resident memory of a process from `/proc/<pid>/status`, in bytes: `(VmRSS, VmHWM)`, the
/// current and the peak resident set. `None` once the process is gone (or off Linux).
pub fn memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}
