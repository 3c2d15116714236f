//! A concurrent HTTP load generator: `concurrency` keep-alive connections, each sending its
//! requests one after another, with every request's latency in a histogram per label.
//!
//! Closed-loop: a connection sends its next request when the previous answer is in, so the
//! request rate is what the server sustains at that concurrency, and the latency is what a
//! client of it sees (including queueing in the server, not in the generator).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{header, Method, Request};
use hyper_util::rt::TokioIo;

use super::BoxError;

/// One keep-alive connection and the latencies of its requests.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    authority: String,
    hists: HashMap<&'static str, Histogram<u64>>,
    /// A second connection, to another server ([`drive_pair`]), for [`Conn::call_to`].
    peer: Option<(SendRequest<Full<Bytes>>, String)>,
}

/// An answer: status and body.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Result<Conn, BoxError> {
        Ok(Conn {
            sender: connect(addr).await?,
            authority: addr.to_string(),
            hists: HashMap::new(),
            peer: None,
        })
    }

    /// Sends one request and records its latency under `label`.
    pub async fn call(
        &mut self,
        label: &'static str,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Answer, BoxError> {
        self.call_to(false, label, method, path, body).await
    }

    /// [`Conn::call`], to the peer server if `to_peer` (and there is one).
    pub async fn call_to(
        &mut self,
        to_peer: bool,
        label: &'static str,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Answer, BoxError> {
        let (sender, authority) = match self.peer.as_mut().filter(|_| to_peer) {
            Some((s, a)) => (s, a.as_str()),
            None => (&mut self.sender, self.authority.as_str()),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, authority);
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(body.unwrap_or_default()))?;
        let start = Instant::now();
        sender.ready().await?;
        let res = sender.send_request(req).await?;
        let status = res.status().as_u16();
        let body = res.into_body().collect().await?.to_bytes();
        let us = start.elapsed().as_micros() as u64;
        self.hists
            .entry(label)
            .or_insert_with(|| Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"))
            .saturating_record(us.max(1));
        Ok(Answer { status, body })
    }
}

/// What a load run measured.
pub struct Figures {
    /// Iterations completed (each may be several requests).
    pub iterations: u64,
    pub elapsed: Duration,
    /// Per label: requests, p50, p99 and max latency.
    pub latency: Vec<(&'static str, Histogram<u64>)>,
}

impl Figures {
    pub fn per_sec(&self) -> f64 {
        self.iterations as f64 / self.elapsed.as_secs_f64()
    }

    /// One line per label: requests/s, p50, p99, max.
    pub fn lines(&self) -> Vec<String> {
        self.latency
            .iter()
            .map(|(label, h)| {
                format!(
                    "{label:>8}: {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms",
                    h.len() as f64 / self.elapsed.as_secs_f64(),
                    h.value_at_quantile(0.5) as f64 / 1000.0,
                    h.value_at_quantile(0.99) as f64 / 1000.0,
                    h.max() as f64 / 1000.0,
                )
            })
            .collect()
    }

    pub fn p99_ms(&self, label: &str) -> f64 {
        self.latency
            .iter()
            .find(|(l, _)| *l == label)
            .map_or(f64::NAN, |(_, h)| h.value_at_quantile(0.99) as f64 / 1000.0)
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, BoxError> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One iteration of a scenario on a connection; `i` is the iteration's global index.
pub type Step = Arc<
    dyn Fn(Conn, u64) -> Pin<Box<dyn Future<Output = (Conn, Result<(), BoxError>)> + Send>>
        + Send
        + Sync,
>;

/// Runs `iterations` iterations of `step` over `concurrency` connections to `addr`.
/// The first error stops the run and is returned.
pub async fn drive(
    addr: SocketAddr,
    concurrency: usize,
    iterations: u64,
    step: Step,
) -> Result<Figures, BoxError> {
    drive_on(addr, None, concurrency, iterations, step).await
}

/// [`drive`], each connection with a peer connection to `peer` for [`Conn::call_to`].
pub async fn drive_pair(
    addr: SocketAddr,
    peer: SocketAddr,
    concurrency: usize,
    iterations: u64,
    step: Step,
) -> Result<Figures, BoxError> {
    drive_on(addr, Some(peer), concurrency, iterations, step).await
}

async fn drive_on(
    addr: SocketAddr,
    peer: Option<SocketAddr>,
    concurrency: usize,
    iterations: u64,
    step: Step,
) -> Result<Figures, BoxError> {
    let next = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let mut c = Conn::open(addr).await?;
        if let Some(p) = peer {
            c.peer = Some((connect(p).await?, p.to_string()));
        }
        conns.push(c);
    }
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (next, step) = (next.clone(), step.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Relaxed);
                    if i >= iterations {
                        return Ok::<_, BoxError>(conn.hists);
                    }
                    let (c, res) = step(conn, i).await;
                    conn = c;
                    res?;
                }
            })
        })
        .collect();
    let mut merged: HashMap<&'static str, Histogram<u64>> = HashMap::new();
    for t in tasks {
        for (label, h) in t.await?? {
            match merged.get_mut(label) {
                Some(m) => m.add(&h)?,
                None => {
                    merged.insert(label, h);
                }
            }
        }
    }
    let elapsed = start.elapsed();
    let mut latency: Vec<_> = merged.into_iter().collect();
    latency.sort_by_key(|(l, _)| *l);
    Ok(Figures {
        iterations,
        elapsed,
        latency,
    })
}
