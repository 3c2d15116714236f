//! Test harness: a real nats-server per test, Weir in-process or as the `weir` binary, a
//! collector of released jobs, and helpers that wait for conditions (never fixed sleeps).
//!
//! Every test binary uses a different subset of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::header::HeaderMap;
use async_nats::jetstream::{self, consumer::pull::OrderedConfig, Context};
use async_nats::Client;
use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use weir::config::{Config, Overrides};
use weir::natsd::LocalNats;

pub mod pki;

/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(20);

/// Logs to the test's captured output; `RUST_LOG` selects (default: warnings only).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,async_nats=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Wall-clock Unix milliseconds (the clock of the `Weir-*-At` headers).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Polls `check` every [`POLL`] until it returns `Ok`, or panics after `timeout` with the last
/// state it reported.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(state) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last state: {state}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// A local address with a port that was free a moment ago (bind to port 0, read it, drop it).
/// The tiny race with other processes is handled by the starters, which retry on a listen error.
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

/// FNV-1a 32 of the key token, modulo the partition count: what nats-server's
/// `{{partition(n,2)}}` computes. Tests verify it against the stream rather than trusting it.
pub fn predicted_partition(key: &str, partitions: u16) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % u32::from(partitions)) as u16
}

/// A nats-server of this test's own, and clients on it.
pub struct Env {
    pub nats: LocalNats,
    pub client: Client,
    pub js: Context,
}

impl Env {
    pub async fn start() -> Env {
        init_tracing();
        let nats = LocalNats::start().expect("start nats-server");
        let client = async_nats::connect(nats.url())
            .await
            .expect("connect to nats-server");
        let js = jetstream::new(client.clone());
        Env { nats, client, js }
    }

    /// A nats-server started with extra arguments (e.g. `-c server.conf` for authentication or
    /// TLS) and a test client connected with `options` (its credentials and TLS settings).
    pub async fn start_with(args: &[&str], options: async_nats::ConnectOptions) -> Env {
        init_tracing();
        let nats = LocalNats::start_with(args).expect("start nats-server");
        let client = options
            .connect(nats.url())
            .await
            .expect("test client connects to nats-server");
        let js = jetstream::new(client.clone());
        Env { nats, client, js }
    }

    pub fn url(&self) -> String {
        self.nats.url()
    }

    /// Messages currently stored in a stream (0 if the stream does not exist yet).
    pub async fn stream_len(&self, name: &str) -> u64 {
        match self.js.get_stream(name).await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// Waits until the stream holds exactly `n` messages.
    pub async fn wait_stream_len(&self, name: &str, n: u64, timeout: Duration) {
        eventually(&format!("{name} to hold {n} messages"), timeout, || async {
            let have = self.stream_len(name).await;
            if have == n {
                Ok(())
            } else {
                Err(format!("{name} holds {have}"))
            }
        })
        .await
    }

    /// Waits until the stream holds at least `n` messages; returns how many it holds.
    pub async fn wait_stream_at_least(&self, name: &str, n: u64, timeout: Duration) -> u64 {
        eventually(
            &format!("{name} to hold at least {n} messages"),
            timeout,
            || async {
                let have = self.stream_len(name).await;
                if have >= n {
                    Ok(have)
                } else {
                    Err(format!("{name} holds {have}"))
                }
            },
        )
        .await
    }

    /// Waits until `WEIR_RELEASED` holds `total` jobs and nothing is left waiting in
    /// `WEIR_JOBS` or the park.
    pub async fn wait_all_released(&self, total: u64, timeout: Duration) {
        eventually("every job released, queues empty", timeout, || async {
            let (rel, jobs, park) = (
                self.stream_len("WEIR_RELEASED").await,
                self.stream_len("WEIR_JOBS").await,
                self.stream_len("WEIR_PARK").await,
            );
            if rel >= total && jobs == 0 && park == 0 {
                Ok(())
            } else {
                Err(format!(
                    "released {rel}/{total}, WEIR_JOBS {jobs}, WEIR_PARK {park}"
                ))
            }
        })
        .await
    }

    /// Every message stored in `name`, in stream order, read with an ordered consumer.
    pub async fn read_stream(&self, name: &str) -> Vec<Stored> {
        read_stream(&self.js, name, ">").await
    }

    /// Publishes `jobs` with pipelined acks (`window` in flight) and returns each job's
    /// `WEIR_JOBS` sequence, in publish order.
    pub async fn publish_all<I>(&self, jobs: I, window: usize) -> Vec<u64>
    where
        I: IntoIterator<Item = Job>,
    {
        publish_all(&self.js, jobs, window).await
    }
}

/// A job to publish: subject, optional headers, payload.
#[derive(Clone, Debug)]
pub struct Job {
    pub subject: String,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
}

impl Job {
    /// `jobs.<dest>.<key>` with payload `<key>#<i>`: the payload identifies the job and its
    /// place in its key's FIFO.
    pub fn seq(dest: &str, key: &str, i: usize) -> Job {
        Job {
            subject: format!("jobs.{dest}.{key}"),
            headers: None,
            payload: Bytes::from(format!("{key}#{i}")),
        }
    }
}

pub async fn publish_all<I>(js: &Context, jobs: I, window: usize) -> Vec<u64>
where
    I: IntoIterator<Item = Job>,
{
    let mut seqs = Vec::new();
    let mut inflight = FuturesOrdered::new();
    for j in jobs {
        let ack = match j.headers {
            Some(h) => {
                js.publish_with_headers(j.subject.clone(), h, j.payload)
                    .await
            }
            None => js.publish(j.subject.clone(), j.payload).await,
        }
        .unwrap_or_else(|e| panic!("publish to {}: {e}", j.subject));
        inflight.push_back(ack.into_future());
        if inflight.len() >= window {
            let a = inflight
                .next()
                .await
                .expect("in flight")
                .expect("publish ack");
            seqs.push(a.sequence);
        }
    }
    while let Some(a) = inflight.next().await {
        seqs.push(a.expect("publish ack").sequence);
    }
    seqs
}

/// A message read back from a stream.
#[derive(Clone, Debug)]
pub struct Stored {
    pub seq: u64,
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

impl Stored {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }
}

/// Reads every message of `stream` on subjects matching `filter`, in order, with an ordered
/// consumer: it reads up to the count of messages stored when it starts.
pub async fn read_stream(js: &Context, stream: &str, filter: &str) -> Vec<Stored> {
    let mut s = js.get_stream(stream).await.expect("get stream");
    let want = if filter == ">" {
        s.info().await.expect("stream info").state.messages
    } else {
        let mut info = s.info_with_subjects(filter).await.expect("stream info");
        let mut n = 0u64;
        while let Some(r) = info.next().await {
            n += r.expect("subject counts").1 as u64;
        }
        n
    };
    let mut out = Vec::with_capacity(want as usize);
    if want == 0 {
        return out;
    }
    let consumer = s
        .create_consumer(OrderedConfig {
            filter_subject: if filter == ">" {
                String::new()
            } else {
                filter.to_string()
            },
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let mut msgs = consumer
        .messages()
        .await
        .expect("ordered consumer messages");
    while (out.len() as u64) < want {
        let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "reading {stream}: stalled after {} of {want} messages",
                    out.len()
                )
            })
            .expect("ordered consumer ended")
            .expect("ordered consumer message");
        let seq = m.info().expect("message info").stream_sequence;
        out.push(Stored {
            seq,
            subject: m.subject.to_string(),
            headers: m.headers.clone().unwrap_or_default(),
            payload: m.payload.clone(),
        });
    }
    out
}

/// A released job as a core subscriber saw it, with its arrival instant.
#[derive(Clone, Debug)]
pub struct Seen {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
    pub at: Instant,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }

    pub fn released_ms(&self) -> u64 {
        self.header("Weir-Released-At")
            .expect("Weir-Released-At header")
            .parse()
            .expect("Weir-Released-At is Unix ms")
    }
}

/// Records every message on a subject (core subscription), with arrival instants. A core
/// subscriber sees re-releases that the stream's duplicate window drops, so end-state checks
/// read the stream; the collector is for timing.
pub struct Collector {
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Collector {
    pub async fn start(client: &Client, subject: &str) -> Collector {
        let mut sub = client
            .subscribe(subject.to_string())
            .await
            .expect("subscribe");
        client.flush().await.expect("flush subscription");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let into = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let at = Instant::now();
                into.lock().unwrap().push(Seen {
                    subject: m.subject.to_string(),
                    headers: m.headers.unwrap_or_default(),
                    payload: m.payload,
                    at,
                });
            }
        });
        Collector { seen, task }
    }

    pub fn len(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn snapshot(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until at least `n` messages arrived; returns them all.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Seen> {
        eventually(&format!("{n} released jobs"), timeout, || async {
            let have = self.len();
            if have >= n {
                Ok(self.snapshot())
            } else {
                Err(format!("{have} seen"))
            }
        })
        .await
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Splits payloads `<key>#<i>` by key, keeping arrival order.
pub fn by_key<'a>(payloads: impl IntoIterator<Item = &'a Bytes>) -> BTreeMap<String, Vec<usize>> {
    let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for p in payloads {
        let s = std::str::from_utf8(p).expect("utf-8 payload");
        let (k, i) = s.rsplit_once('#').expect("payload <key>#<i>");
        out.entry(k.to_string())
            .or_default()
            .push(i.parse().expect("job number"));
    }
    out
}

/// Asserts that each key's jobs came exactly once each and in publish order `0..n`.
pub fn assert_fifo_complete(got: &BTreeMap<String, Vec<usize>>, want: &BTreeMap<String, usize>) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "keys released"
    );
    for (k, &n) in want {
        let seq = &got[k];
        let dups = seq.len() - seq.iter().collect::<HashSet<_>>().len();
        assert_eq!(dups, 0, "key {k}: {dups} duplicate release(s)");
        assert_eq!(seq.len(), n, "key {k}: released {} of {n}", seq.len());
        if let Some(pos) = seq.iter().enumerate().position(|(i, &j)| i != j) {
            let late = seq.iter().position(|&j| j == pos).expect("complete");
            panic!(
                "key {k}: out of order: job {pos} released in place {late}, after {:?}…; \
                 order around place {pos}: {:?}",
                &seq[pos..pos + 5.min(late - pos)],
                &seq[pos.saturating_sub(3)..(pos + 5).min(seq.len())]
            );
        }
    }
}

/// Asserts the GCRA bound on release times in ms: in every window `[t_i, t_j]`,
/// `j - i + 1 <= burst + floor((t_j - t_i) / T) + 1`.
///
/// The `+ 1` is for measurement, not for Weir: the stamps are whole milliseconds (a true span
/// may exceed the measured one by < 1 ms, which can add one period boundary), and a stamp is taken
/// just after the token, so two stamps may sit slightly closer than their tokens. Both effects are
/// far below one period T, so together they cost at most one job per window.
pub fn assert_gcra_bound(times_ms: &[u64], burst: u64, period_ms: u64, what: &str) {
    for w in times_ms.windows(2) {
        assert!(w[0] <= w[1], "{what}: release stamps go backwards: {w:?}");
    }
    let mut worst = (0i64, 0, 0);
    for i in 0..times_ms.len() {
        for j in i..times_ms.len() {
            let n = (j - i + 1) as u64;
            let bound = burst + (times_ms[j] - times_ms[i]) / period_ms + 1;
            let excess = n as i64 - bound as i64;
            if excess > worst.0 {
                worst = (excess, i, j);
            }
        }
    }
    let (excess, i, j) = worst;
    assert!(
        excess <= 0,
        "{what}: {} releases in {} ms (jobs {i}..={j}), bound is {} (burst {burst}, T {period_ms} ms, +1 for ms stamps)",
        j - i + 1,
        times_ms[j] - times_ms[i],
        burst + (times_ms[j] - times_ms[i]) / period_ms + 1,
    );
}

/// The sum over every sample of the Prometheus metric `name` (all label sets).
pub fn metric_total(s: &prometheus_parse::Scrape, name: &str) -> f64 {
    use prometheus_parse::Value;
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            _ => 0.0,
        })
        .sum()
}

/// `GET /metrics` from the admin address, parsed.
pub async fn scrape(http: SocketAddr) -> prometheus_parse::Scrape {
    let (code, body) = http_get(http, "/metrics").await.expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("a valid Prometheus exposition")
}

/// A minimal HTTP/1.1 GET: `(status, body)`, within 2 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    exchange(addr, head, "", Duration::from_secs(2)).await
}

/// A minimal HTTP/1.1 request with an optional JSON body: `(status, body)`. Bodies up to a
/// bulk request's; 30 s for the whole exchange.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    exchange(addr, head, body, Duration::from_secs(30)).await
}

/// Sends `head` and `body` on a fresh connection and reads the answer until the server closes.
async fn exchange(
    addr: SocketAddr,
    head: String,
    body: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(head.as_bytes()).await?;
        s.write_all(body.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(timeout, io)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "http timeout"))??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Waits until each of the admin APIs at `admins` sees `n` members in the group
/// (`/v1/cluster`).
pub async fn wait_members(admins: &[SocketAddr], n: usize) {
    for &admin in admins {
        eventually(
            &format!("{n} members in the view"),
            Duration::from_secs(10),
            || async {
                let (code, v) = http_json(admin, "GET", "/v1/cluster", None).await;
                let have = v["members"].as_array().map_or(0, Vec::len);
                (code == 200 && have == n)
                    .then_some(())
                    .ok_or(format!("{code} {v}"))
            },
        )
        .await;
    }
}

/// [`http_request`] whose body must be JSON: `(status, value)`.
pub async fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let text = body.map(|b| b.to_string());
    let (code, got) = http_request(addr, method, path, text.as_deref())
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let v = serde_json::from_str(&got)
        .unwrap_or_else(|e| panic!("{method} {path} answered {code} with non-JSON ({e}): {got}"));
    (code, v)
}

/// `Ok` once `/readyz` answers 200 (with every partition bound).
async fn readyz_ok(addr: SocketAddr) -> Result<(), String> {
    match http_get(addr, "/readyz").await {
        Ok((200, body)) => Ok(body).and_then(|b| {
            let v: serde_json::Value = serde_json::from_str(&b).map_err(|e| e.to_string())?;
            if v["ready"] == true && v["partitions_bound"] == v["partitions"] {
                Ok(())
            } else {
                Err(format!("200 with body {b}"))
            }
        }),
        Ok((code, body)) => Err(format!("{code} {body}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A member name no other Weir of this test run has, unless `toml` names one (a test that
/// restarts "the same" process gives it the same name).
pub fn member_name(toml: &str) -> Option<String> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let named = toml.lines().any(|l| l.trim_start().starts_with("member"));
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (!named).then(|| format!("t{}-{n}", std::process::id()))
}

/// The config a test asked for, with the NATS URL, a fresh admin address and a unique member
/// name (unless the test gives one).
pub fn config(toml: &str, nats_url: &str, http: SocketAddr) -> Config {
    Config::from_toml(
        toml,
        "test.toml",
        &Overrides {
            nats_url: Some(nats_url.to_string()),
            http_addr: Some(http.to_string()),
            member: member_name(toml),
            ..Overrides::default()
        },
    )
    .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{toml}"))
}

/// Weir running in this process on a spawned task, stopped by a token the test holds.
pub struct InProc {
    pub http: SocketAddr,
    stop: CancellationToken,
    handle: Option<JoinHandle<Result<(), weir::RunError>>>,
}

impl InProc {
    /// Starts Weir with `toml` (the NATS URL and admin address are filled in; its `[nats]`
    /// table is used to connect) and waits until `/readyz` says every partition is bound.
    pub async fn start(env: &Env, toml: &str) -> InProc {
        let url = env.url();
        InProc::start_with(env, toml, |cfg| {
            let url = url.clone();
            async move {
                weir::connect_with(&url, &cfg.nats)
                    .await
                    .expect("weir connects")
            }
        })
        .await
    }

    /// [`InProc::start`] with Weir's NATS client made by `connect` from the config (a test that
    /// watches the connection's events).
    pub async fn start_with<F, Fut>(env: &Env, toml: &str, connect: F) -> InProc
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Client>,
    {
        for _attempt in 0..5 {
            let http = free_addr();
            let cfg = config(toml, &env.url(), http);
            let client = connect(cfg.clone()).await;
            let stop = CancellationToken::new();
            let handle = tokio::spawn(weir::run(cfg, client, stop.clone().cancelled_owned()));
            let mut w = InProc {
                http,
                stop,
                handle: Some(handle),
            };
            let ready = eventually("weir to be ready", Duration::from_secs(20), || async {
                if w.handle.as_ref().expect("running").is_finished() {
                    return Ok(false);
                }
                readyz_ok(http).await.map(|()| true)
            })
            .await;
            if ready && !w.handle.as_ref().expect("running").is_finished() {
                return w;
            }
            match w.handle.take().expect("running").await.expect("weir task") {
                Err(weir::RunError::Listen { addr, source }) => {
                    tracing::warn!(%addr, error = %source, "admin port taken; retrying");
                }
                other => panic!("weir stopped before it was ready: {other:?}"),
            }
        }
        panic!("no free admin port after 5 attempts");
    }

    /// [`InProc::start`] with the SHARQ API on a free port (`sharq_listen` is put first in
    /// `toml`, whose other top-level keys still apply); returns Weir and the SHARQ address.
    pub async fn start_sharq(env: &Env, toml: &str) -> (InProc, SocketAddr) {
        let sharq = free_addr();
        let w = InProc::start(env, &format!("sharq_listen = \"{sharq}\"\n{toml}")).await;
        (w, sharq)
    }

    /// Asks Weir to stop and waits for `run` to return.
    pub async fn stop(mut self, timeout: Duration) -> Result<(), weir::RunError> {
        self.stop.cancel();
        let h = self.handle.take().expect("running");
        tokio::time::timeout(timeout, h)
            .await
            .expect("weir stops within the timeout")
            .expect("weir task")
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `kill -<sig> <pid>` (no libc/nix needed).
pub fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} {pid} failed");
}

/// The `weir` binary as a subprocess.
pub struct Proc {
    pub http: SocketAddr,
    child: tokio::process::Child,
    _config: tempfile::NamedTempFile,
}

/// Writes `toml` to a temporary file.
pub fn config_file(toml: &str) -> tempfile::NamedTempFile {
    use std::io::Write;
    let mut f = tempfile::Builder::new()
        .prefix("weir-test-")
        .suffix(".toml")
        .tempfile()
        .expect("temp config");
    f.write_all(toml.as_bytes()).expect("write config");
    f.flush().expect("flush config");
    f
}

/// `weir run --config <file> ...` with the given extra arguments, stdout/stderr as given.
pub fn weir_command(config: &std::path::Path, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_weir"));
    c.arg("run")
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("WEIR_NATS_URL")
        .env_remove("WEIR_HTTP_ADDR")
        .kill_on_drop(true);
    if std::env::var_os("RUST_LOG").is_none() {
        c.env("RUST_LOG", "warn,async_nats=error");
    }
    c
}

impl Proc {
    /// Starts `weir run` and waits until `/readyz` answers 200.
    pub async fn start(nats_url: &str, toml: &str) -> Proc {
        Proc::start_with(nats_url, toml, &[], None).await
    }

    /// [`Proc::start`] with extra environment variables, and stdout and stderr appended to
    /// `output` when given (else inherited).
    pub async fn start_with(
        nats_url: &str,
        toml: &str,
        env: &[(&str, &str)],
        output: Option<&std::path::Path>,
    ) -> Proc {
        for _attempt in 0..5 {
            let http = free_addr();
            let file = config_file(toml);
            let http_arg = http.to_string();
            let mut args = vec!["--nats-url", nats_url, "--http-addr", &http_arg];
            let member = member_name(toml);
            if let Some(m) = &member {
                args.extend(["--member", m]);
            }
            let mut cmd = weir_command(file.path(), &args);
            cmd.envs(env.iter().copied());
            if let Some(path) = output {
                let open = || {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .expect("open output file")
                };
                cmd.stdout(open()).stderr(open());
            }
            let child = cmd.spawn().expect("spawn weir");
            let mut p = Proc {
                http,
                child,
                _config: file,
            };
            let ready = eventually("weir to be ready", Duration::from_secs(20), || {
                let exited = p.child.try_wait().expect("try_wait").is_some();
                async move {
                    if exited {
                        return Ok(false);
                    }
                    readyz_ok(http).await.map(|()| true)
                }
            })
            .await;
            if ready && p.child.try_wait().expect("try_wait").is_none() {
                return p;
            }
            // Exited before it was ready: most likely the admin port was taken meanwhile.
            tracing::warn!(status = ?p.child.try_wait(), "weir exited before it was ready; retrying");
        }
        panic!("weir did not start after 5 attempts");
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// `kill -9`: nothing is flushed, acked or drained.
    pub async fn kill9(&mut self) {
        self.child.kill().await.expect("kill -9 weir");
    }

    /// `kill -TERM <pid>`.
    pub fn sigterm(&self) {
        signal(self.pid(), "-TERM");
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .map(|r| r.expect("wait for weir"))
    }
}
