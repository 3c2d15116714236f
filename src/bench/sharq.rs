//! (11) The SHARQ-compatible API under a concurrent HTTP load ([`super::http`]): enqueue one
//! job a request, enqueue in bulk, and dequeue + finish, against one Weir process on a fresh
//! nats-server, with requests/s and p50/p99/max latency per request kind.
//!
//! The reference is sharq-server 0.2 with gunicorn (2 workers) on Redis, on the same kind of
//! 2-core machine: 1,200-3,100 enqueue and 750-1,800 dequeue requests/s, p99 160-280 ms.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use hyper::Method;
use serde_json::{json, Value};

use super::http::{drive, drive_pair, Conn, Figures, Step};
use super::{config, fresh, start_weir, BenchArgs, BoxError};

/// Queues (keys) the jobs are spread over.
const QUEUES: u64 = 100;

/// Runs the measure twice: with job status kept (the default, one more record per job and
/// state) and with `job_status_retention = "0"`, so the cost of status shows.
pub async fn run(a: &BenchArgs) -> Result<(), BoxError> {
    for status in [true, false] {
        println!(
            "(11) SHARQ API, job status {}",
            if status { "on (default)" } else { "off" }
        );
        run_once(a, status).await?;
    }
    Ok(())
}

async fn run_once(a: &BenchArgs, status: bool) -> Result<(), BoxError> {
    let (nats, client) = fresh().await?;
    let js = jetstream::new(client.clone());
    let addr = free_addr()?;
    let admin = free_addr()?;
    let c = config_at(
        a.partitions,
        admin,
        &format!(
            "member = \"bench-a\"\nsharq_listen = \"{addr}\"\njob_status_retention = \"{}\"\n[limits.default]\nrate = \"1000000000/s\"\nburst = 1000000",
            if status { "1h" } else { "0" }
        ),
    )?;
    let (stop, h) = start_weir(c, client.clone());
    wait_up(addr).await?;
    let conc = a.http_concurrency;
    let n = a.http_requests;

    let raw = raw_enqueue(&js, conc, n).await?;
    report(
        &format!("raw JetStream ceiling: {conc} tasks, publish one job and await its ack"),
        &raw,
    );
    let single = drive(addr, conc, n, step(enqueue)).await?;
    report(
        &format!("enqueue, 1 job a request, {conc} connections"),
        &single,
    );
    println!(
        "    enqueue: {:.2} of the raw ceiling (same client, same server, same concurrency)",
        single.per_sec() / raw.per_sec()
    );
    let batch = a.bulk_size;
    let bulks = (n / batch).max(20);
    let bulk = drive(addr, conc.min(8), bulks, bulk_step(batch)).await?;
    report(
        &format!(
            "bulk enqueue, {batch} jobs a request, {} connections",
            conc.min(8)
        ),
        &bulk,
    );
    println!(
        "    bulk: {:.0} jobs/s, {:.1}x the single-request enqueue rate",
        bulk.per_sec() * batch as f64,
        bulk.per_sec() * batch as f64 / single.per_sec()
    );
    // Everything enqueued is released at once (no limit): wait until it is, then drain it.
    let total = 2 * n + bulks * batch;
    super::wait_count(
        &js,
        crate::job::RELEASED_STREAM,
        total,
        Duration::from_secs(300),
    )
    .await?;
    let drained = drive(addr, conc, n, step(dequeue_finish)).await?;
    report(&format!("dequeue + finish, {conc} connections"), &drained);
    println!(
        "    p99: enqueue {:.2} ms, dequeue {:.2} ms, finish {:.2} ms (target < 20 ms; SHARQ 160-280 ms)",
        single.p99_ms("enqueue"),
        drained.p99_ms("dequeue"),
        drained.p99_ms("finish")
    );

    // Behind one address, a finish lands on any process: a second Weir, and every finish sent
    // to the process that did not hand the job out (it is forwarded over NATS).
    let addr_b = free_addr()?;
    let c = config(
        a.partitions,
        &format!(
            "member = \"bench-b\"\nsharq_listen = \"{addr_b}\"\njob_status_retention = \"{}\"",
            if status { "1h" } else { "0" }
        ),
    )?;
    let (stop_b, h_b) = start_weir(c, async_nats::connect(nats.url()).await?);
    wait_up(addr_b).await?;
    wait_members(&js, 2).await?;
    // The first drain left `total - n` >= `n` released jobs.
    let crossed = drive_pair(addr, addr_b, conc, n, step(dequeue_finish_elsewhere)).await?;
    report(
        &format!("dequeue on one process + finish on another, {conc} connections"),
        &crossed,
    );
    println!(
        "    forwarded finish: {:.2} of the pairs/s with finish on the same process; p99 finish {:.2} ms",
        crossed.per_sec() / drained.per_sec(),
        crossed.p99_ms("finish")
    );
    if status {
        // Status is an observation: records that find its queue full are dropped and counted.
        println!(
            "    job status records dropped (queue full): {}",
            status_dropped(admin).await?
        );
        // Every record the bucket stored, over every job enqueued (each is released, 2n of
        // them also dequeued and finished): records written at once are written as one.
        let mut kv = js
            .get_stream(format!("KV_{}", crate::status::BUCKET))
            .await?;
        let stored = kv.info().await?.state.last_sequence;
        println!(
            "    job status records stored: {stored}, {:.2} a job",
            stored as f64 / total as f64
        );
    }
    stop_b.cancel();
    stop.cancel();
    h_b.await?;
    h.await?;
    Ok(())
}

/// Waits until `n` members are in the group.
async fn wait_members(js: &jetstream::Context, n: usize) -> Result<(), BoxError> {
    use futures::StreamExt;
    let kv = js.get_key_value(crate::cluster::BUCKET).await?;
    for _ in 0..400 {
        let keys: Vec<String> = kv
            .keys()
            .await?
            .filter_map(|k| async { k.ok() })
            .collect()
            .await;
        let members = keys
            .iter()
            .filter(|k| k.starts_with(crate::cluster::view::MEMBERS));
        if members.count() >= n {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(format!("{n} members did not join the group").into())
}

/// The broker's ceiling for what one enqueue request does, without HTTP and JSON: `conc` tasks,
/// each publishing a job (with the enqueue's `Nats-Msg-Id` and `Weir-Job-Id`) and awaiting its
/// JetStream ack before the next, on Weir's own client, while Weir releases what they publish.
async fn raw_enqueue(js: &jetstream::Context, conc: usize, n: u64) -> Result<Figures, BoxError> {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let next = Arc::new(AtomicU64::new(0));
    let start = std::time::Instant::now();
    let tasks: Vec<_> = (0..conc)
        .map(|_| {
            let (js, next) = (js.clone(), next.clone());
            tokio::spawn(async move {
                let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
                loop {
                    let i = next.fetch_add(1, Relaxed);
                    if i >= n {
                        return Ok::<_, BoxError>(h);
                    }
                    let q = i % QUEUES;
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", format!("job:sms:q{q}:raw{i}").as_str());
                    headers.insert(crate::job::header::JOB_ID, format!("raw{i}").as_str());
                    let body =
                        Bytes::from(json!({"n": i, "text": "hello from the bench"}).to_string());
                    let t = std::time::Instant::now();
                    js.publish_with_headers(format!("jobs.sms.q{q}"), headers, body)
                        .await?
                        .await?;
                    h.record(t.elapsed().as_micros() as u64)?;
                }
            })
        })
        .collect();
    let mut all = hdrhistogram::Histogram::<u64>::new(3)?;
    for t in tasks {
        all.add(t.await??)?;
    }
    Ok(Figures {
        iterations: n,
        elapsed: start.elapsed(),
        latency: vec![("publish", all)],
    })
}

/// `weir_job_status_dropped_total` from the admin API's `GET /metrics`.
async fn status_dropped(admin: SocketAddr) -> Result<u64, BoxError> {
    let mut c = Conn::open(admin).await?;
    let a = c.call("metrics", Method::GET, "/metrics", None).await?;
    let text = String::from_utf8_lossy(&a.body);
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("weir_job_status_dropped_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    match values.is_empty() {
        true => Err("GET /metrics has no weir_job_status_dropped_total".into()),
        false => Ok(values.iter().sum::<f64>() as u64),
    }
}

/// [`config`], with the admin API on `admin`.
fn config_at(
    partitions: u16,
    admin: SocketAddr,
    extra: &str,
) -> Result<crate::config::Config, BoxError> {
    let text = format!("partitions = {partitions}\nhttp_addr = \"{admin}\"\n{extra}");
    Ok(crate::config::Config::from_toml(
        &text,
        "bench",
        &Default::default(),
    )?)
}

fn report(what: &str, f: &Figures) {
    println!(
        "(11) {what}: {:.0} iterations/s over {:.1} s",
        f.per_sec(),
        f.elapsed.as_secs_f64()
    );
    for l in f.lines() {
        println!("    {l}");
    }
}

fn step<F, Fut>(f: F) -> Step
where
    F: Fn(Conn, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = (Conn, Result<(), BoxError>)> + Send + 'static,
{
    Arc::new(move |c, i| Box::pin(f(c, i)))
}

fn job(i: u64) -> Value {
    json!({"job_id": format!("j{i}"), "payload": {"n": i, "text": "hello from the bench"}, "interval": 0})
}

async fn enqueue(mut c: Conn, i: u64) -> (Conn, Result<(), BoxError>) {
    let path = format!("/enqueue/sms/q{}/", i % QUEUES);
    let body = Bytes::from(job(i).to_string());
    let r = c.call("enqueue", Method::POST, &path, Some(body)).await;
    let res = r.and_then(|a| expect(a.status, 201, &a.body));
    (c, res)
}

fn bulk_step(batch: u64) -> Step {
    step(move |mut c: Conn, i: u64| async move {
        let jobs: Vec<Value> = (0..batch)
            .map(|j| {
                let n = 1_000_000_000 + i * batch + j;
                let mut v = job(n);
                v["queue_id"] = json!(format!("q{}", n % QUEUES));
                v
            })
            .collect();
        let body = Bytes::from(json!({ "jobs": jobs }).to_string());
        let r = c
            .call("bulk", Method::POST, "/enqueue/sms/bulk/", Some(body))
            .await;
        // 200 with one result per job; every one must be queued.
        let res = r.and_then(|a| {
            expect(a.status, 200, &a.body)?;
            let v: Value = serde_json::from_slice(&a.body)?;
            match v["status"].as_str() {
                Some("queued") => Ok(()),
                _ => Err(format!("bulk enqueue answered status {}", v["status"]).into()),
            }
        });
        (c, res)
    })
}

async fn dequeue_finish(c: Conn, i: u64) -> (Conn, Result<(), BoxError>) {
    dequeue_then_finish(c, i, false).await
}

/// Dequeues from the connection's server and finishes through its peer.
async fn dequeue_finish_elsewhere(c: Conn, i: u64) -> (Conn, Result<(), BoxError>) {
    dequeue_then_finish(c, i, true).await
}

async fn dequeue_then_finish(
    mut c: Conn,
    _i: u64,
    elsewhere: bool,
) -> (Conn, Result<(), BoxError>) {
    let res = async {
        let a = c
            .call("dequeue", Method::GET, "/dequeue/sms/?wait_ms=1000", None)
            .await?;
        expect(a.status, 200, &a.body).map_err(|e| format!("dequeue: {e}"))?;
        let v: Value = serde_json::from_slice(&a.body)?;
        let (q, j) = (v["queue_id"].as_str(), v["job_id"].as_str());
        let (Some(q), Some(j)) = (q, j) else {
            return Err(format!("dequeue answered {v}").into());
        };
        let path = format!("/finish/sms/{q}/{j}/");
        let a = c
            .call_to(elsewhere, "finish", Method::POST, &path, None)
            .await?;
        expect(a.status, 200, &a.body).map_err(|e| format!("finish {path}: {e}").into())
    }
    .await;
    (c, res)
}

fn expect(status: u16, want: u16, body: &[u8]) -> Result<(), BoxError> {
    match status == want {
        true => Ok(()),
        false => Err(format!(
            "expected {want}, got {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        )
        .into()),
    }
}

fn free_addr() -> Result<SocketAddr, BoxError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

async fn wait_up(addr: SocketAddr) -> Result<(), BoxError> {
    for _ in 0..200 {
        if let Ok(mut c) = Conn::open(addr).await {
            if c.call("hello", Method::GET, "/", None).await.is_ok() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("the SHARQ API did not come up on {addr}").into())
}
