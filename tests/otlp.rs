//! OTLP/HTTP export end to end, against a stand-in collector on 127.0.0.1: metrics and a hold
//! span reach `/v1/metrics` and `/v1/traces` as protobuf, from inside a tokio runtime, flushed by
//! `shutdown()` called from async code. Its own test binary: it sets `OTEL_EXPORTER_OTLP_ENDPOINT`
//! before anything else runs in this process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use weir::metrics::Metrics;
use weir::trace::Tracing;

/// One request the stand-in collector received.
#[derive(Debug)]
struct Request {
    path: String,
    content_type: String,
    body_len: usize,
}

/// A minimal HTTP/1.1 server answering 200 to every request, reporting each one.
fn collector() -> (SocketAddr, mpsc::Receiver<Request>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut w = conn.try_clone().expect("clone");
                let mut r = BufReader::new(conn);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let (mut len, mut content_type) = (0usize, String::new());
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            match k.to_ascii_lowercase().as_str() {
                                "content-length" => len = v.trim().parse().unwrap_or(0),
                                "content-type" => content_type = v.trim().to_string(),
                                _ => {}
                            }
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                    let _ = tx.send(Request {
                        path,
                        content_type,
                        body_len: len,
                    });
                }
            });
        }
    });
    (addr, rx)
}

#[test]
fn metrics_and_spans_reach_an_otlp_collector() {
    let (addr, requests) = collector();
    // The only test in this binary: nothing else reads the environment concurrently.
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let metrics = Metrics::install("weir-otlp-test").expect("metrics");
        let tracing = Tracing::install("weir-otlp-test").expect("tracing");
        assert!(metrics.otlp_enabled());
        assert!(tracing.is_enabled());
        let mut p = metrics.partition(0);
        p.received("sms");
        p.released("sms", 1_500);
        let mut h = async_nats::HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        assert!(tracing.hold(&mut h, "sms", "acme", 1_000, 2_500));
        // Prometheus keeps working alongside.
        assert!(metrics.render().contains("weir_jobs_released_total"));
        // Called from async code, as `weir::run` would at the end.
        metrics.shutdown();
        tracing.shutdown();
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut metrics_seen, mut traces_seen) = (false, false);
    while !(metrics_seen && traces_seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = requests
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("metrics {metrics_seen}, traces {traces_seen}"));
        assert_eq!(r.content_type, "application/x-protobuf", "{r:?}");
        assert!(r.body_len > 0, "{r:?}");
        match r.path.as_str() {
            "/v1/metrics" => metrics_seen = true,
            "/v1/traces" => traces_seen = true,
            other => panic!("unexpected path {other}"),
        }
    }
}
