//! Hostile input against a real nats-server: every job a producer can get stored is released or
//! dead-lettered with a `Weir-Dead-Reason` that names the problem, nothing is lost or stuck,
//! and Weir goes on serving normal jobs afterwards. Some input is refused at publish (by
//! nats-server, or by `WEIR_JOBS`' `max_msg_size`); the tests show that too.
//!
//! Some of it cannot be sent with async-nats (it refuses to build such messages), so
//! [`raw_publish`] speaks the NATS protocol over TCP.

mod common;

use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::jetstream::stream::{Config as StreamConfig, RetentionPolicy, StorageType};
use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use common::*;
use weir::job::header;

const WEIR: &str = "partitions = 2\n[limits.default]\nrate = \"200/s\"\nburst = 20\n";

/// What nats-server answered a raw publish: an `-ERR` line, and the JetStream ack (if any).
#[derive(Debug)]
struct RawReply {
    err: Option<String>,
    ack: Option<String>,
}

/// Publishes over a raw TCP connection (`HPUB` when `headers` is given, else `PUB`), with a
/// reply inbox for the JetStream ack. Reads until the server's `PONG` (an `-ERR` for the
/// publish comes before it) and then, if `expect_ack`, until the ack.
async fn raw_publish(
    url: &str,
    subject: &[u8],
    headers: Option<&[u8]>,
    payload: &[u8],
    expect_ack: bool,
) -> RawReply {
    let addr = url.trim_start_matches("nats://");
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect raw");
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r);
    let mut line = String::new();
    lines.read_line(&mut line).await.expect("INFO");
    assert!(line.starts_with("INFO"), "{line}");
    let mut out = Vec::new();
    out.extend_from_slice(
        b"CONNECT {\"headers\":true,\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\n",
    );
    out.extend_from_slice(b"SUB _INBOX.raw 1\r\n");
    match headers {
        Some(h) => {
            out.extend_from_slice(b"HPUB ");
            out.extend_from_slice(subject);
            out.extend_from_slice(
                format!(" _INBOX.raw {} {}\r\n", h.len(), h.len() + payload.len()).as_bytes(),
            );
            out.extend_from_slice(h);
        }
        None => {
            out.extend_from_slice(b"PUB ");
            out.extend_from_slice(subject);
            out.extend_from_slice(format!(" _INBOX.raw {}\r\n", payload.len()).as_bytes());
        }
    }
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\nPING\r\n");
    w.write_all(&out).await.expect("write raw");
    let mut reply = RawReply {
        err: None,
        ack: None,
    };
    let mut ponged = false;
    let read = async {
        loop {
            let mut l = Vec::new();
            if lines.read_until(b'\n', &mut l).await.expect("read raw") == 0 {
                break;
            }
            let l = String::from_utf8_lossy(&l).trim_end().to_string();
            if l.starts_with("-ERR") {
                reply.err = Some(l);
            } else if l == "PONG" {
                ponged = true;
                if !expect_ack {
                    break;
                }
            } else if l.starts_with("MSG") {
                let mut body = String::new();
                lines.read_line(&mut body).await.expect("ack body");
                reply.ack = Some(body.trim_end().to_string());
                if ponged {
                    break;
                }
            }
            if ponged && reply.ack.is_some() {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or_else(|_| panic!("raw publish: no reply; so far {reply:?}"));
    reply
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, *v);
    }
    h
}

/// Waits for `WEIR_DEAD` to hold `n` letters and returns them by the subject they came on.
async fn dead_letters(env: &Env, n: u64) -> Vec<Stored> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while env.stream_len("WEIR_DEAD").await < n {
        if tokio::time::Instant::now() > deadline {
            let have: Vec<String> = env
                .read_stream("WEIR_DEAD")
                .await
                .iter()
                .map(|d| format!("{:?}", d.header(header::SUBJECT)))
                .collect();
            panic!("WEIR_DEAD holds {} of {n} after 30 s: {have:?}", have.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.read_stream("WEIR_DEAD").await
}

fn reason_of<'a>(dead: &'a [Stored], subject: &str) -> &'a str {
    let d = dead
        .iter()
        .find(|d| d.header(header::SUBJECT) == Some(subject))
        .unwrap_or_else(|| {
            let have: Vec<_> = dead.iter().map(|d| d.header(header::SUBJECT)).collect();
            panic!("no dead letter for {subject:?}; have {have:?}")
        });
    d.header(header::DEAD_REASON).expect("Weir-Dead-Reason")
}

/// Subjects that are not `jobs.<destination>.<key>` with valid tokens: refused by nats-server
/// (empty tokens) or dead-lettered with a reason naming the problem; then normal jobs flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn bad_subjects_are_refused_or_dead_lettered_with_their_reason() {
    let env = Env::start().await;
    let _weir = InProc::start(&env, WEIR).await;
    let url = env.url();

    // Empty destination or key: nats-server drops the publish as an invalid subject; nothing is
    // stored, and an async-nats producer is told "no stream found for given subject" (no
    // responders). The final counts below show nothing was stored.
    let js = async_nats::jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(1))
        .build(env.client.clone());
    let empty = ["jobs..acme", "jobs.sms.", "jobs.sms..x"].map(|s| {
        let js = js.clone();
        async move { (s, js.publish(s, "x".into()).await.unwrap().await) }
    });
    for (s, r) in futures::future::join_all(empty).await {
        let e = r.expect_err(s);
        assert!(e.to_string().contains("no stream found"), "{s}: {e}");
    }
    // Wildcard tokens: nats-server answers "Invalid Publish Subject" yet stores them,
    // untransformed; the triage consumer dead-letters them.
    for s in ["jobs.sms.*", "jobs.*.acme", "jobs.sms.>"] {
        let r = raw_publish(&url, s.as_bytes(), None, b"x", true).await;
        assert!(r.ack.is_some(), "{s}: {r:?}");
    }
    let long_key = "k".repeat(300);
    let long = format!("jobs.sms.{long_key}");
    let bad_char = "key contains '.', '*', '>', whitespace or a control character";
    let cases: Vec<(String, String)> = vec![
        ("jobs.sms".into(), "got 2 token(s)".into()),
        ("jobs.sms.acme.extra".into(), "got 4 token(s)".into()),
        ("jobs.a.b.c.d.e.f".into(), "got 7 token(s)".into()),
        (long.clone(), "key is 300 bytes, longer than 256".into()),
        ("jobs.sms.a*b".into(), bad_char.into()),
        ("jobs.sms.a>".into(), bad_char.into()),
        ("jobs.sms.del\u{7f}".into(), bad_char.into()),
        ("jobs.sms.ctl\u{1}".into(), bad_char.into()),
        ("jobs.sms.nb\u{a0}sp".into(), bad_char.into()),
        ("jobs.sms.ls\u{2028}".into(), bad_char.into()),
        (
            "jobs.s*s.acme".into(),
            "destination contains '.', '*', '>', whitespace or a control character".into(),
        ),
    ];
    for (s, _) in &cases {
        env.js
            .publish(s.clone(), Bytes::from_static(b"payload"))
            .await
            .expect("publish")
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    let dead = dead_letters(&env, cases.len() as u64 + 3).await;
    for (s, want) in &cases {
        // 3-token subjects are rewritten by the partition transform (`weir.in.<p>.<dest>.<key>`)
        // and dead-lettered by their partition. async-nats trims header values when it reads
        // them, so a subject ending in Unicode whitespace is compared trimmed.
        let rest = s.strip_prefix("jobs.").unwrap();
        let stored = dead
            .iter()
            .filter_map(|d| d.header(header::SUBJECT))
            .find(|h| {
                *h == s.trim_end()
                    || h.strip_prefix("weir.in.")
                        .and_then(|h| h.split_once('.'))
                        .is_some_and(|(_, h)| h == rest.trim_end())
            })
            .unwrap_or_else(|| panic!("no dead letter for {s:?}"));
        let reason = reason_of(&dead, stored);
        assert!(reason.contains(want.as_str()), "{s}: reason {reason:?}");
    }
    for s in ["jobs.sms.*", "jobs.sms.>"] {
        assert!(reason_of(&dead, s).starts_with("key contains"), "{s}");
    }
    assert!(reason_of(&dead, "jobs.*.acme").starts_with("destination contains"));
    let raw = ["jobs.sms.*", "jobs.*.acme", "jobs.sms.>"];
    for d in &dead {
        assert_eq!(d.subject, "dead.invalid");
        let payload: &[u8] = match raw.contains(&d.header(header::SUBJECT).unwrap()) {
            true => b"x",
            false => b"payload",
        };
        assert_eq!(&d.payload[..], payload, "the job is kept whole");
        assert!(d.header(header::MSG_ID).unwrap().starts_with("WEIR_JOBS:"));
    }

    // A producer's Nats-Msg-Id reused for another key within WEIR_JOBS' duplicate window:
    // JetStream tells the producer at publish, and keeps only the first.
    let first = env
        .js
        .publish_with_headers(
            "jobs.sms.one",
            headers(&[("Nats-Msg-Id", "same")]),
            "1".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let second = env
        .js
        .publish_with_headers(
            "jobs.sms.two",
            headers(&[("Nats-Msg-Id", "same")]),
            "2".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate, "the publish ack says duplicate");

    // Still serving: normal jobs are all released, and WEIR_JOBS empties (the triage filters
    // do not keep acked jobs in the work queue).
    env.publish_all((0..50).map(|i| Job::seq("sms", "normal", i)), 64)
        .await;
    env.wait_all_released(51, Duration::from_secs(20)).await;
    assert_eq!(env.stream_len("WEIR_RELEASED").await, 51);
}

/// Sizes at the edge: a job larger than `WEIR_JOBS` accepts is refused at publish with a clear
/// error; one exactly at the limit (with the longest key and destination) is released with all
/// of Weir's headers. 1,000 producer headers and a garbage `traceparent` pass through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_sizes_and_headers_are_released_or_refused_at_publish() {
    let env = Env::start().await;
    let _weir = InProc::start(&env, WEIR).await;
    let max_payload = env.client.server_info().max_payload;
    let limit = weir::streams::jobs_max_msg_size(max_payload) as usize;
    let mut info = env.js.get_stream("WEIR_JOBS").await.unwrap();
    assert_eq!(
        info.info().await.unwrap().config.max_message_size as usize,
        limit
    );

    // At the server's max_payload: refused by the stream, the producer is told why.
    let e = env
        .js
        .publish("jobs.sms.big", Bytes::from(vec![b'x'; max_payload - 64]))
        .await
        .unwrap()
        .await
        .expect_err("too large for WEIR_JOBS");
    assert!(e.to_string().contains("maximum"), "{e}");

    // Exactly at the limit, with a producer Nats-Msg-Id and the longest tokens: released.
    let (dest, key) = ("d".repeat(256), "k".repeat(256));
    let h = headers(&[("Nats-Msg-Id", "big-1"), ("X-Producer", "p")]);
    let wire = 10
        + ["Nats-Msg-Id: big-1", "X-Producer: p"]
            .iter()
            .map(|l| l.len() + 2)
            .sum::<usize>()
        + 2;
    let payload = Bytes::from(vec![b'y'; limit - wire]);
    env.js
        .publish_with_headers(format!("jobs.{dest}.{key}"), h, payload.clone())
        .await
        .unwrap()
        .await
        .expect("a job at WEIR_JOBS' limit is accepted");
    // No headers, at the limit.
    env.js
        .publish("jobs.sms.plain", Bytes::from(vec![b'z'; limit]))
        .await
        .unwrap()
        .await
        .expect("accepted");

    // 1,000 headers, and a garbage traceparent/tracestate.
    let mut many = HeaderMap::new();
    for i in 0..1000 {
        many.insert(format!("X-Hostile-{i}").as_str(), i.to_string());
    }
    env.js
        .publish_with_headers("jobs.sms.many", many, "many".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let garbage = headers(&[
        ("traceparent", "00-not-a-trace-id-zz"),
        ("tracestate", ",,=,"),
    ]);
    env.js
        .publish_with_headers("jobs.sms.traced", garbage, "traced".into())
        .await
        .unwrap()
        .await
        .unwrap();

    env.wait_all_released(4, Duration::from_secs(20)).await;
    let released = env.read_stream("WEIR_RELEASED").await;
    assert_eq!(released.len(), 4);
    let get = |subject: &str| {
        released
            .iter()
            .find(|r| r.subject == subject)
            .unwrap_or_else(|| panic!("{subject} not released"))
    };
    let big = get(&format!("released.{dest}.{key}"));
    assert_eq!(big.payload, payload);
    assert_eq!(big.header(header::PRODUCER_MSG_ID), Some("big-1"));
    assert!(big
        .header(header::MSG_ID)
        .unwrap()
        .starts_with("WEIR_JOBS:"));
    assert_eq!(big.header(header::KEY), Some(key.as_str()));
    assert_eq!(big.header("X-Producer"), Some("p"));
    assert_eq!(get("released.sms.plain").payload.len(), limit);
    let many = get("released.sms.many");
    for i in [0, 499, 999] {
        assert_eq!(
            many.header(&format!("X-Hostile-{i}")),
            Some(i.to_string().as_str())
        );
    }
    assert_eq!(many.headers.iter().count(), 1000 + 5);
    let traced = get("released.sms.traced");
    assert_eq!(traced.header("traceparent"), Some("00-not-a-trace-id-zz"));
    assert_eq!(traced.header("tracestate"), Some(",,=,"));
    assert_eq!(env.stream_len("WEIR_DEAD").await, 0);
}

/// Two stored jobs with the same producer `Nats-Msg-Id` (possible once `WEIR_JOBS`' duplicate
/// window has passed) are both released, and two such bad jobs both dead-lettered: each
/// carries its own derived `Nats-Msg-Id`, the producer's kept in `Weir-Producer-Msg-Id`.
///
/// The window cannot be waited out (2 minutes), so `WEIR_JOBS` is made beforehand as Weir would
/// make it but with a 1 s window (Weir uses an existing stream that fits), and the second job is
/// published until JetStream no longer calls it a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_msg_id_reused_after_the_window_loses_no_job() {
    let env = Env::start().await;
    let (source, destination) = weir::job::partition_transform(2);
    env.js
        .create_stream(StreamConfig {
            name: "WEIR_JOBS".into(),
            subjects: vec!["jobs.>".into()],
            subject_transform: Some(async_nats::jetstream::stream::SubjectTransform {
                source,
                destination,
            }),
            retention: RetentionPolicy::WorkQueue,
            allow_direct: true,
            storage: StorageType::File,
            duplicate_window: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .expect("create WEIR_JOBS");
    let _weir = InProc::start(&env, WEIR).await;

    let publish_outside_window = |subject: &'static str, id: &'static str| {
        let js = env.js.clone();
        async move {
            let mut tries = 0;
            eventually(
                "a publish JetStream does not call a duplicate",
                Duration::from_secs(10),
                || {
                    tries += 1;
                    let js = js.clone();
                    async move {
                        let ack = js
                            .publish_with_headers(
                                subject,
                                headers(&[("Nats-Msg-Id", id)]),
                                subject.into(),
                            )
                            .await
                            .map_err(|e| e.to_string())?
                            .await
                            .map_err(|e| e.to_string())?;
                        if ack.duplicate {
                            Err("duplicate".to_string())
                        } else {
                            Ok(())
                        }
                    }
                },
            )
            .await;
            tries
        }
    };
    for (a, b, id) in [
        ("jobs.sms.first", "jobs.sms.second", "reused"),
        ("jobs.sms.bad*1", "jobs.sms.bad*2", "reused-dead"),
    ] {
        assert_eq!(publish_outside_window(a, id).await, 1);
        assert!(
            publish_outside_window(b, id).await > 1,
            "the id was deduplicated at first"
        );
    }

    env.wait_all_released(2, Duration::from_secs(20)).await;
    let dead = dead_letters(&env, 2).await;
    let released = env.read_stream("WEIR_RELEASED").await;
    assert_eq!(released.len(), 2, "both jobs released: {released:?}");
    for (stored, id) in [(&released, "reused"), (&dead, "reused-dead")] {
        let ids: std::collections::HashSet<_> =
            stored.iter().map(|m| m.header(header::MSG_ID)).collect();
        assert_eq!(ids.len(), 2, "distinct Nats-Msg-Ids: {ids:?}");
        for m in stored.iter() {
            assert_eq!(m.header(header::PRODUCER_MSG_ID), Some(id));
        }
    }
}

/// Jobs async-nats (0.51) cannot read, which nats-server stores as they are: each breaks the
/// client's connection when it is delivered (async-nats drops and reopens the connection, and
/// never hands the message on). Weir sweeps its partitions' unacked jobs after the reconnect and
/// dead-letters each such job, with a reason naming the problem and its original header block,
/// long before `ack_wait` would bring it back; the normal jobs around them are all released
/// exactly once, `WEIR_JOBS` ends empty, and the connection stops breaking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_jobs_are_dead_lettered_and_the_connection_settles() {
    // Above the JetStream context's 5 s publish timeout, and far above the 1 s a partition gives
    // the releases still in flight when the connection comes back
    // (`release::RECONNECT_ACK_GRACE`): a release whose ack was lost with the connection times
    // out (and is retried) before its job comes back. Before that grace the partition waited out
    // the full 5 s, reading nothing, so the next unreadable job (whose delivery tells the sweep
    // about it) could come 10 s late.
    const ACK_WAIT: Duration = Duration::from_secs(7);
    let env = Env::start().await;
    let disconnects = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = disconnects.clone();
    let toml = format!(
        "ack_wait_ms = {}\nhorizon_ms = 500\n{WEIR}",
        ACK_WAIT.as_millis()
    );
    let weir_url = env.url();
    let _weir = InProc::start_with(&env, &toml, move |_cfg| {
        let (url, seen) = (weir_url.clone(), seen.clone());
        async move {
            async_nats::ConnectOptions::new()
                .max_reconnects(None)
                .event_callback(move |e| {
                    let seen = seen.clone();
                    async move {
                        if matches!(e, async_nats::Event::Disconnected) {
                            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                })
                .connect(url)
                .await
                .expect("weir connects")
        }
    })
    .await;
    let url = env.url();
    let ok_headers: &'static [u8] = b"NATS/1.0\r\nX-Fine: 1\r\n\r\n";
    // (subject, header block, what the reason must say)
    type Poison = (&'static [u8], Option<&'static [u8]>, &'static str);
    let poisons: Vec<Poison> = vec![
        (
            b"jobs.sms.p0",
            Some(b"NATS/1.0\r\nX-Bad: \xff\xfe\r\n\r\n"),
            "header block is not valid UTF-8 (byte 17)",
        ),
        (
            b"jobs.sms.p1",
            Some(b"NATS/1.0\r\nX-\xff: v\r\n\r\n"),
            "header block is not valid UTF-8 (byte 12)",
        ),
        (
            b"jobs.sms.p2",
            Some(b"NATS/1.0\r\nX-Ok: 1\r\nno colon here\r\n\r\n"),
            "header line 3 has no ':'",
        ),
        (
            b"jobs.sms.p3",
            Some(b"NATS/1.1\r\nX-A: 1\r\n\r\n"),
            "does not begin with NATS/1.0",
        ),
        (b"jobs.sms.p4\xff", None, "subject is not valid UTF-8"),
        (
            "jobs.sms.p5\u{a0}nbsp".as_bytes(),
            Some(ok_headers),
            "subject contains whitespace (U+00A0",
        ),
    ];
    let start = std::time::Instant::now();
    let mut normal = 0;
    for (i, (subject, h, _)) in poisons.iter().enumerate() {
        env.publish_all((0..20).map(|j| Job::seq("sms", &format!("n{i}"), j)), 32)
            .await;
        normal += 20;
        let r = raw_publish(&url, subject, *h, format!("poison-{i}").as_bytes(), true).await;
        assert!(r.ack.is_some() && r.err.is_none(), "stored: {r:?}");
    }
    env.publish_all((0..20).map(|j| Job::seq("sms", "last", j)), 32)
        .await;
    normal += 20;

    let dead = dead_letters(&env, poisons.len() as u64).await;
    let settled = start.elapsed();
    eprintln!("every unreadable job dead-lettered {settled:?} after the first was published");
    assert!(
        settled < ACK_WAIT,
        "every unreadable job dead-lettered in {settled:?}, before ack_wait brought one back"
    );
    for (i, (_, h, want)) in poisons.iter().enumerate() {
        let payload = format!("poison-{i}");
        let d = dead
            .iter()
            .find(|d| d.payload == payload.as_bytes())
            .unwrap_or_else(|| panic!("no dead letter for {payload}"));
        let reason = d.header(header::DEAD_REASON).expect("reason");
        assert!(reason.contains(want), "{payload}: reason {reason:?}");
        assert!(d.subject.starts_with("dead."));
        assert!(d.header(header::MSG_ID).unwrap().starts_with("WEIR_JOBS:"));
        if let Some(h) = h {
            use base64::Engine;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(d.header("Weir-Raw-Headers").expect("raw headers"))
                .unwrap();
            assert_eq!(&raw[..], *h, "{payload}: the original header block is kept");
        }
    }
    assert_eq!(
        dead.iter()
            .find(|d| d.payload == b"poison-2"[..])
            .unwrap()
            .header("X-Ok"),
        Some("1"),
        "readable producer headers are kept"
    );

    let breaks = disconnects.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        breaks >= 1 && breaks <= poisons.len() as u64,
        "{breaks} disconnects"
    );
    // Normal jobs delivered after a poison in the same batch were lost with the connection;
    // they come back after ack_wait.
    env.wait_stream_len("WEIR_RELEASED", normal, ACK_WAIT * 2)
        .await;
    let released = env.read_stream("WEIR_RELEASED").await;
    let payloads: std::collections::HashSet<_> =
        released.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(released.len() as u64, normal, "each released once");
    assert_eq!(payloads.len() as u64, normal);
    // Every job acked: nothing is left behind in WEIR_JOBS (a release whose ack was lost with
    // the connection was retried and its source acked).
    env.wait_stream_len("WEIR_JOBS", 0, ACK_WAIT * 2).await;
    // No further breaks: the lost jobs came back after ack_wait, and no poison with them.
    assert_eq!(
        disconnects.load(std::sync::atomic::Ordering::Relaxed),
        breaks
    );
    assert_eq!(env.stream_len("WEIR_DEAD").await, poisons.len() as u64);
}

/// Jobs whose header block carries a status line (`NATS/1.0 503`, `408`, `100 Idle Heartbeat`,
/// `409 Consumer Deleted`): a consumer would take such a message for the server's own status
/// message and drop it (or end its stream). nats-server strips the status line when it stores
/// the job, so each is released like any other, its producer headers kept, and the jobs of its
/// key around it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_with_a_status_line_are_released() {
    let env = Env::start().await;
    let _weir = InProc::start(&env, WEIR).await;
    let url = env.url();
    let statuses: [(&[u8], &[u8]); 4] = [
        (b"jobs.sms.s0", b"NATS/1.0 503\r\nX-A: 0\r\n\r\n"),
        (
            b"jobs.sms.s1",
            b"NATS/1.0 408 Request Timeout\r\nX-A: 1\r\n\r\n",
        ),
        (
            b"jobs.sms.s2",
            b"NATS/1.0 100 Idle Heartbeat\r\nX-A: 2\r\n\r\n",
        ),
        (
            b"jobs.sms.s3",
            b"NATS/1.0 409 Consumer Deleted\r\nX-A: 3\r\n\r\n",
        ),
    ];
    let mut total = 0;
    for (i, (subject, h)) in statuses.iter().enumerate() {
        let r = raw_publish(
            &url,
            subject,
            Some(h),
            format!("status-{i}").as_bytes(),
            true,
        )
        .await;
        assert!(r.ack.is_some() && r.err.is_none(), "stored: {r:?}");
        let key = std::str::from_utf8(&subject[9..]).unwrap();
        env.publish_all((0..10).map(|j| Job::seq("sms", key, j)), 10)
            .await;
        total += 11;
    }
    env.wait_all_released(total, Duration::from_secs(20)).await;
    let released = env.read_stream("WEIR_RELEASED").await;
    assert_eq!(released.len() as u64, total, "each released once");
    for i in 0..statuses.len() {
        let r = released
            .iter()
            .find(|r| r.payload == format!("status-{i}").as_bytes())
            .unwrap_or_else(|| panic!("status-{i} released"));
        assert_eq!(r.subject, format!("released.sms.s{i}"));
        assert_eq!(r.header("X-A"), Some(i.to_string().as_str()));
    }
    assert_eq!(env.stream_len("WEIR_DEAD").await, 0);
}
