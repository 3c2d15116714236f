//! Security against real nats-servers configured for each way in: user and password, NKey,
//! credentials file (operator/JWT mode), TLS with a private CA, and mutual TLS. For each, Weir
//! runs end to end (published jobs are released) and a wrong or missing credential fails at
//! once with a message that says what to fix and does not show the secret.
//!
//! Then: Weir under a NATS user with only the permissions the README lists, the admin API over
//! HTTPS, and no secrets in logs or metrics of a `weir run` logging at trace level.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::pki::{Dir, Operator, Pki};
use common::*;
use weir::config::{Config, Overrides};

const BASE: &str =
    "partitions = 2\nshutdown_grace_ms = 2000\n[limits.default]\nrate = \"1000/s\"\nburst = 100\n";

/// Parses `[nats]` settings as Weir would.
fn settings(nats_toml: &str) -> weir::config::NatsSettings {
    Config::from_toml(nats_toml, "test.toml", &Overrides::default())
        .unwrap_or_else(|e| panic!("invalid test config: {e}\n{nats_toml}"))
        .nats
}

/// A nats-server with `server_conf`, and a test client connected with `client_toml`'s `[nats]`.
async fn env(dir: &Dir, server_conf: &str, client_toml: &str) -> Env {
    let conf = dir.write("server.conf", server_conf);
    let options = settings(client_toml)
        .options("weir-test")
        .await
        .expect("test client options");
    Env::start_with(&["-c", conf.to_str().expect("utf-8 path")], options).await
}

/// A nats-server whose users are `users` (lines of its `authorization` block) and `admin`
/// (no limits), with the test client connected as `admin`.
async fn with_users(dir: &Dir, users: &str) -> Env {
    let conf =
        format!("authorization {{ users = [\n{{ user: admin, password: admin }}\n{users}] }}\n");
    let admin = "[nats]\nuser = \"admin\"\npassword = \"admin\"\n";
    env(dir, &conf, admin).await
}

/// Weir with `nats_toml` runs end to end: jobs published are released.
async fn runs_end_to_end(env: &Env, nats_toml: &str) {
    let weir = InProc::start(env, &format!("{BASE}{nats_toml}")).await;
    env.publish_all((0..20).map(|i| Job::seq("sms", "acme", i)), 20)
        .await;
    env.wait_all_released(20, Duration::from_secs(20)).await;
    weir.stop(Duration::from_secs(10))
        .await
        .expect("weir stops");
}

/// Weir with `nats_toml` is refused at once; returns the message.
async fn refused(url: &str, nats_toml: &str) -> String {
    let nats = settings(nats_toml);
    let r = tokio::time::timeout(Duration::from_secs(10), weir::connect_with(url, &nats))
        .await
        .expect("a refused connection fails at once, without retrying");
    match r {
        Ok(_) => panic!("connected with {nats_toml}"),
        Err(e) => e.to_string(),
    }
}

fn assert_says(msg: &str, words: &[&str], secrets: &[&str]) {
    for w in words {
        assert!(msg.contains(w), "the message should say {w:?}: {msg}");
    }
    for s in secrets {
        assert!(!msg.contains(s), "the message shows a secret: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password() {
    let dir = Dir::new();
    let pw = "pw-5f2c9e1b7d";
    let nats = format!("[nats]\nuser = \"weir\"\npassword = \"{pw}\"\n");
    let env = env(
        &dir,
        &format!("authorization {{ users = [ {{ user: weir, password: \"{pw}\" }} ] }}\n"),
        &nats,
    )
    .await;
    runs_end_to_end(&env, &nats).await;

    let wrong = "wrong-pw-81a7";
    let msg = refused(
        &env.url(),
        &format!("[nats]\nuser = \"weir\"\npassword = \"{wrong}\"\n"),
    )
    .await;
    assert_says(
        &msg,
        &["authorization violation", "nats.user"],
        &[wrong, pw],
    );
    let msg = refused(&env.url(), "").await;
    assert_says(&msg, &["authorization violation"], &[pw]);

    // `weir limits` takes the same settings from Weir's file, the password from the environment.
    let file = config_file(&format!(
        "nats_url = \"{}\"\n[nats]\nuser = \"weir\"\n",
        env.url()
    ));
    let limits = |password: &str| {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_weir"));
        c.args(["limits", "list", "--config"])
            .arg(file.path())
            .env_remove("WEIR_NATS_URL")
            .env("WEIR_NATS_PASSWORD", password);
        async move { c.output().await.expect("run weir limits") }
    };
    let ok = limits(pw).await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = limits(wrong).await;
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(69), "{err}");
    assert_says(&err, &["authorization violation"], &[wrong, pw]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey() {
    let dir = Dir::new();
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let file = dir.write("weir.nk", &format!("{seed}\n"));
    let nats = format!("[nats]\nnkey_file = {:?}\n", file);
    let env = env(
        &dir,
        &format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
        &nats,
    )
    .await;
    runs_end_to_end(&env, &nats).await;

    let stranger = nkeys::KeyPair::new_user().seed().expect("seed");
    let other = dir.write("other.nk", &stranger);
    let msg = refused(&env.url(), &format!("[nats]\nnkey_file = {other:?}\n")).await;
    assert_says(
        &msg,
        &["authorization violation", "nats.nkey_file"],
        &[&stranger, &seed],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_file_in_operator_mode() {
    let dir = Dir::new();
    let op = Operator::new();
    let creds = dir.write("weir.creds", &Operator::creds(&op.account, "weir"));
    let nats = format!("[nats]\ncreds_file = {creds:?}\n");
    let env = env(&dir, &op.server_config(), &nats).await;
    runs_end_to_end(&env, &nats).await;

    // A user signed by an account the server does not know.
    let stranger = dir.write(
        "stranger.creds",
        &Operator::creds(&nkeys::KeyPair::new_account(), "stranger"),
    );
    let msg = refused(&env.url(), &format!("[nats]\ncreds_file = {stranger:?}\n")).await;
    assert_says(&msg, &["authorization violation", "nats.creds_file"], &[]);
    let msg = refused(&env.url(), "").await;
    assert_says(&msg, &["authorization violation"], &[]);
}

fn tls_block(pki: &Pki, verify: bool) -> String {
    let mut s = format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n",
        pki.server_cert, pki.server_key
    );
    if verify {
        s += &format!("  ca_file: {:?}\n  verify: true\n", pki.ca);
    }
    s + "}\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let dir = Dir::new();
    let pki = Pki::new(&dir);
    let nats = format!("[nats]\ntls_ca_file = {:?}\ntls_required = true\n", pki.ca);
    let env = env(&dir, &tls_block(&pki, false), &nats).await;
    runs_end_to_end(&env, &nats).await;

    let msg = refused(
        &env.url(),
        &format!("[nats]\ntls_ca_file = {:?}\n", pki.other_ca),
    )
    .await;
    assert_says(&msg, &["nats.tls_ca_file"], &[]);

    // TLS required, but the server offers none.
    let plain = weir::natsd::LocalNats::start().expect("plain nats-server");
    let msg = refused(&plain.url(), &nats).await;
    assert_says(&msg, &["refused"], &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls() {
    let dir = Dir::new();
    let pki = Pki::new(&dir);
    let nats = format!(
        "[nats]\ntls_ca_file = {:?}\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        pki.ca, pki.client_cert, pki.client_key
    );
    let env = env(&dir, &tls_block(&pki, true), &nats).await;
    runs_end_to_end(&env, &nats).await;

    let msg = refused(&env.url(), &format!("[nats]\ntls_ca_file = {:?}\n", pki.ca)).await;
    assert_says(&msg, &["nats.tls_cert_file"], &[]);
}

/// A NATS that is not up yet is waited for, not refused: the client keeps trying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_not_up_yet_is_waited_for() {
    let url = format!("nats://{}", free_addr());
    let client = tokio::time::timeout(
        Duration::from_secs(10),
        weir::connect_with(&url, &settings("")),
    )
    .await
    .expect("returns at once")
    .expect("a client that keeps trying");
    assert_ne!(
        client.connection_state(),
        async_nats::connection::State::Connected
    );
}

/// Weir's minimal permissions, as the README gives them (`$ACCOUNT` streams and buckets
/// created by Weir on its first start).
const WEIR_PERMISSIONS: &str = r#"{
  publish: {
    allow: [
      # JetStream API: its streams and buckets (create on first start, then info)
      "$JS.API.INFO"
      "$JS.API.STREAM.CREATE.WEIR_JOBS", "$JS.API.STREAM.INFO.WEIR_JOBS"
      "$JS.API.STREAM.CREATE.WEIR_RELEASED", "$JS.API.STREAM.INFO.WEIR_RELEASED"
      "$JS.API.STREAM.CREATE.WEIR_PARK", "$JS.API.STREAM.INFO.WEIR_PARK"
      "$JS.API.STREAM.CREATE.WEIR_DEAD", "$JS.API.STREAM.INFO.WEIR_DEAD"
      "$JS.API.STREAM.CREATE.KV_WEIR_LIMITS", "$JS.API.STREAM.INFO.KV_WEIR_LIMITS"
      "$JS.API.STREAM.CREATE.KV_WEIR_CLUSTER", "$JS.API.STREAM.INFO.KV_WEIR_CLUSTER"
      # job status (unless job_status_retention = "0"): created, or its max_age updated, at start
      "$JS.API.STREAM.CREATE.KV_WEIR_JOB_STATUS", "$JS.API.STREAM.INFO.KV_WEIR_JOB_STATUS"
      "$JS.API.STREAM.UPDATE.KV_WEIR_JOB_STATUS"
      # purge marks: created, or its max_age updated, at start
      "$JS.API.STREAM.CREATE.KV_WEIR_PURGES", "$JS.API.STREAM.INFO.KV_WEIR_PURGES"
      "$JS.API.STREAM.UPDATE.KV_WEIR_PURGES"
      # purging a key's jobs (DELETE /v1/keys/{key}/jobs) and its parked jobs
      "$JS.API.STREAM.PURGE.WEIR_JOBS", "$JS.API.STREAM.PURGE.WEIR_PARK"
      # stored jobs Weir would never see (unreadable headers, stranded subjects): read by
      # sequence, dead-lettered, deleted; the stranded sweep lists the consumers' floors
      "$JS.API.STREAM.MSG.GET.WEIR_JOBS", "$JS.API.STREAM.MSG.DELETE.WEIR_JOBS"
      "$JS.API.CONSUMER.LIST.WEIR_JOBS"
      # partition and triage consumers; reset hands a dead owner's jobs over at once
      "$JS.API.CONSUMER.CREATE.WEIR_JOBS.>", "$JS.API.CONSUMER.INFO.WEIR_JOBS.*"
      "$JS.API.CONSUMER.MSG.NEXT.WEIR_JOBS.*", "$JS.API.CONSUMER.RESET.WEIR_JOBS.*"
      # bucket watchers (ordered consumers) and their flow control
      "$JS.API.CONSUMER.CREATE.KV_WEIR_LIMITS", "$JS.API.CONSUMER.CREATE.KV_WEIR_LIMITS.>"
      "$JS.API.CONSUMER.CREATE.KV_WEIR_CLUSTER", "$JS.API.CONSUMER.CREATE.KV_WEIR_CLUSTER.>"
      "$JS.FC.>"
      # reads by sequence and by key: parked and unacked jobs, bucket entries
      "$JS.API.DIRECT.GET.WEIR_JOBS", "$JS.API.DIRECT.GET.WEIR_PARK"
      "$JS.API.DIRECT.GET.KV_WEIR_LIMITS.>", "$JS.API.DIRECT.GET.KV_WEIR_CLUSTER.>"
      "$JS.API.DIRECT.GET.KV_WEIR_JOB_STATUS.>", "$JS.API.DIRECT.GET.KV_WEIR_PURGES.>"
      # acks of the jobs it took, and what it stores
      "$JS.ACK.WEIR_JOBS.>"
      "released.>", "park.>", "dead.>"
      "$KV.WEIR_LIMITS.>", "$KV.WEIR_CLUSTER.>", "$KV.WEIR_JOB_STATUS.>", "$KV.WEIR_PURGES.>"
      # destination caps shared between processes
      "weir.caps"
    ]
  }
  subscribe: { allow: ["_INBOX.>", "weir.caps"] }
}"#;

/// A producer: publishes jobs and waits for JetStream's ack (a reply to its inbox).
const PRODUCER_PERMISSIONS: &str =
    r#"{ publish: { allow: ["jobs.>"] }, subscribe: { allow: ["_INBOX.>"] } }"#;

/// A downstream worker: a durable pull consumer `worker` on `WEIR_RELEASED`.
const WORKER_PERMISSIONS: &str = r#"{
  publish: {
    allow: [
      "$JS.API.STREAM.INFO.WEIR_RELEASED"
      "$JS.API.CONSUMER.CREATE.WEIR_RELEASED.worker", "$JS.API.CONSUMER.CREATE.WEIR_RELEASED.worker.>"
      "$JS.API.CONSUMER.INFO.WEIR_RELEASED.worker", "$JS.API.CONSUMER.MSG.NEXT.WEIR_RELEASED.worker"
      "$JS.ACK.WEIR_RELEASED.worker.>"
    ]
  }
  subscribe: { allow: ["_INBOX.>"] }
}"#;

/// Weir runs under a user with exactly [`WEIR_PERMISSIONS`] (and, once the topology exists,
/// without the stream-creating ones): jobs are released, a limit change through the bucket is
/// applied, a dead letter is stored, and nats-server reports no permission violation. A
/// producer and a worker with their minimal permissions publish and consume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_runs_with_minimal_permissions() {
    let dir = Dir::new();
    let provisioned: String = WEIR_PERMISSIONS
        .lines()
        .map(|l| {
            // Without "$JS.API.STREAM.CREATE.*": the streams and buckets exist by then.
            let kept: Vec<&str> = l
                .split(", ")
                .filter(|p| !p.contains("STREAM.CREATE"))
                .collect();
            kept.join(", ")
        })
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    let env = with_users(
        &dir,
        &format!(
            "{{ user: weir, password: weir, permissions: {WEIR_PERMISSIONS} }}\n\
             {{ user: weir2, password: weir, permissions: {provisioned} }}\n\
             {{ user: producer, password: producer, permissions: {PRODUCER_PERMISSIONS} }}\n\
             {{ user: worker, password: worker, permissions: {WORKER_PERMISSIONS} }}\n"
        ),
    )
    .await;
    let user = |u: &str| {
        let (url, u) = (env.url(), u.to_string());
        async move {
            async_nats::ConnectOptions::new()
                .user_and_password(u.clone(), u)
                .connect(url)
                .await
                .expect("connect")
        }
    };
    let producer = async_nats::jetstream::new(user("producer").await);
    let worker = async_nats::jetstream::new(user("worker").await);
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();

    for (round, weir_user) in ["weir", "weir2"].into_iter().enumerate() {
        let toml = format!("{BASE}[nats]\nuser = \"{weir_user}\"\npassword = \"weir\"\n");
        let weir = start_watched(&env, &toml, violations.clone()).await;
        let jobs = (0..20).map(|i| Job::seq("sms", "acme", i));
        publish_all(&producer, jobs, 20).await;
        producer
            .publish("jobs.bad", "no key".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
        env.wait_all_released(20 * (round as u64 + 1), Duration::from_secs(20))
            .await;
        env.wait_stream_len("WEIR_DEAD", round as u64 + 1, Duration::from_secs(10))
            .await;
        // A limit change through the admin API: Weir writes the bucket, its watcher applies it.
        let api = weir::cli::http::AdminClient::new(&format!("http://{}", weir.http)).unwrap();
        let rate = format!("{}/s", 500 + round);
        let a = api
            .request(
                axum::http::Method::PUT,
                "/v1/limits/keys/acme",
                Some(&serde_json::json!({ "rate": rate })),
                None,
            )
            .await
            .expect("PUT");
        assert_eq!(a.status, 200, "{}", a.body);
        eventually("the new limit applied", Duration::from_secs(10), || async {
            let a = api
                .request(axum::http::Method::GET, "/v1/keys/acme", None, None)
                .await
                .map_err(|e| e.to_string())?;
            let v: serde_json::Value = serde_json::from_str(&a.body).map_err(|e| e.to_string())?;
            if v["limit"]["rate"] == rate.as_str() {
                Ok(())
            } else {
                Err(a.body)
            }
        })
        .await;
        weir.stop(Duration::from_secs(10))
            .await
            .expect("weir stops");
    }

    // The worker reads every released job with its durable consumer and acks it.
    let stream = worker.get_stream("WEIR_RELEASED").await.expect("stream");
    let consumer = stream
        .get_or_create_consumer(
            "worker",
            async_nats::jetstream::consumer::pull::Config {
                durable_name: Some("worker".into()),
                ..Default::default()
            },
        )
        .await
        .expect("worker's consumer");
    let mut msgs = consumer.messages().await.expect("messages");
    for _ in 0..40 {
        let m = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut msgs))
            .await
            .expect("a released job")
            .expect("open")
            .expect("message");
        m.ack().await.expect("ack");
    }
    let v = violations.lock().unwrap().clone();
    assert!(v.is_empty(), "nats-server reported: {v:?}");
}

/// Weir connected as `toml` says, every error nats-server reports to its connection (such as a
/// permission violation) kept in `seen`.
async fn start_watched(env: &Env, toml: &str, seen: Arc<Mutex<Vec<String>>>) -> InProc {
    let url = env.url();
    InProc::start_with(env, toml, |cfg| {
        let (seen, url) = (seen.clone(), url.clone());
        async move {
            cfg.nats
                .options("weir")
                .await
                .expect("options")
                .max_reconnects(None)
                .event_callback(move |e| {
                    let seen = seen.clone();
                    async move {
                        if let async_nats::Event::ServerError(e) = e {
                            seen.lock().unwrap().push(e.to_string());
                        }
                    }
                })
                .connect(url)
                .await
                .expect("weir connects")
        }
    })
    .await
}

/// What the SHARQ-compatible API adds to [`WEIR_PERMISSIONS`], as the README lists it.
const SHARQ_PUBLISH: &str = r#""jobs.>", "$JS.API.CONSUMER.CREATE.WEIR_RELEASED.>"
      "$JS.API.CONSUMER.INFO.WEIR_RELEASED.*", "$JS.API.CONSUMER.MSG.NEXT.WEIR_RELEASED.*"
      "$JS.ACK.WEIR_RELEASED.>", "$JS.API.STREAM.PURGE.WEIR_RELEASED", "weir.sharq.finish"
      "weir.sharq.metrics", "weir.sharq.deletequeue", "$JS.API.DIRECT.GET.WEIR_RELEASED""#;
const SHARQ_SUBSCRIBE: &str =
    r#""weir.sharq.finish", "weir.sharq.metrics", "weir.sharq.deletequeue""#;

/// Two Weir processes serving the SHARQ API under [`WEIR_PERMISSIONS`] plus the README's
/// SHARQ additions: enqueue (single and bulk), dequeue, a finish forwarded from the other
/// process, metrics, deletequeue and deepstatus all work, and nats-server reports no violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharq_api_runs_with_its_documented_permissions() {
    use serde_json::{json, Value};
    let dir = Dir::new();
    let perms = WEIR_PERMISSIONS
        .replace(
            "      \"weir.caps\"\n    ]",
            &format!("      \"weir.caps\"\n      {SHARQ_PUBLISH}\n    ]"),
        )
        .replace(
            r#"subscribe: { allow: ["_INBOX.>", "weir.caps"] }"#,
            &format!(
                r#"subscribe: {{ allow: ["_INBOX.>", "weir.caps", {SHARQ_SUBSCRIBE}] }}
  allow_responses: true"#
            ),
        );
    assert_eq!(perms.matches("weir.sharq.finish").count(), 2, "{perms}");
    assert_eq!(perms.matches("weir.sharq.metrics").count(), 2, "{perms}");
    assert_eq!(
        perms.matches("weir.sharq.deletequeue").count(),
        2,
        "{perms}"
    );
    let env = with_users(
        &dir,
        &format!("{{ user: weir, password: weir, permissions: {perms} }}\n"),
    )
    .await;
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let (a, b) = (free_addr(), free_addr());
    let toml = |addr: SocketAddr| {
        format!("sharq_listen = \"{addr}\"\n{BASE}[nats]\nuser = \"weir\"\npassword = \"weir\"\n")
    };
    let wa = start_watched(&env, &toml(a), violations.clone()).await;
    let wb = start_watched(&env, &toml(b), violations.clone()).await;
    wait_members(&[wa.http, wb.http], 2).await;
    let job = |id: &str| json!({"job_id": id, "payload": {"n": 1}, "interval": 10});
    let (code, v) = http_json(a, "POST", "/enqueue/sms/acme/", Some(&job("p1"))).await;
    assert_eq!(code, 201, "{v}");
    let mut bulk = job("p2");
    bulk["queue_id"] = json!("acme");
    let (code, v) = http_json(
        a,
        "POST",
        "/enqueue/sms/bulk/",
        Some(&json!({"jobs": [bulk]})),
    )
    .await;
    assert_eq!((code, &v["status"]), (200, &json!("queued")), "{v}");
    let (code, v) = http_json(a, "GET", "/dequeue/sms/?wait_ms=10000", None).await;
    assert_eq!(code, 200, "{v}");
    let job_id = v["job_id"].as_str().expect("a job id").to_string();
    let path = format!("/finish/sms/acme/{job_id}/");
    assert_eq!(http_json(b, "POST", &path, None).await.0, 200);
    let (code, v): (u16, Value) = http_json(b, "GET", "/metrics/sms/acme/", None).await;
    assert_eq!(code, 200, "{v}");
    let body = json!({"purge_all": true});
    let (code, v) = http_json(b, "DELETE", "/deletequeue/sms/acme/", Some(&body)).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(http_json(a, "GET", "/deepstatus/", None).await.0, 200);
    let v = violations.lock().unwrap().clone();
    assert!(v.is_empty(), "nats-server reported: {v:?}");
}

/// `GET path` over HTTPS, trusting only `ca`: `(status, body)`.
async fn https_get(addr: SocketAddr, ca: &Path, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::ServerName;
    let config = weir::tls::client_config(Some(ca))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let io = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = connector.connect(name, tcp).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tls.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        // A peer that closes without close_notify still gave the whole answer.
        let _ = tls.read_to_end(&mut buf).await;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).to_string())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not HTTP: {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    Ok((status, body.unwrap_or_default()))
}

/// With `admin_tls_cert_file` and `admin_tls_key_file`, the admin API answers HTTPS (verified
/// against the test CA) and plain HTTP on that port gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_over_https() {
    let dir = Dir::new();
    let pki = Pki::new(&dir);
    let env = Env::start().await;
    let http = free_addr();
    let toml = format!(
        "admin_tls_cert_file = {:?}\nadmin_tls_key_file = {:?}\n{BASE}",
        pki.server_cert, pki.server_key
    );
    let cfg = config(&toml, &env.url(), http);
    let client = weir::connect(&env.url()).await.expect("connect");
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(weir::run(cfg, client, stop.clone().cancelled_owned()));
    let ready = eventually("HTTPS /readyz", Duration::from_secs(20), || async {
        assert!(!run.is_finished(), "weir stopped");
        match https_get(http, &pki.ca, "/readyz").await {
            Ok((200, body)) => Ok(body),
            Ok((code, body)) => Err(format!("{code} {body}")),
            Err(e) => Err(e),
        }
    })
    .await;
    assert!(ready.contains("\"ready\":true"), "{ready}");
    let (code, metrics) = https_get(http, &pki.ca, "/metrics").await.expect("metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("weir_"), "{metrics}");

    let plain = http_get(http, "/healthz").await;
    assert!(plain.is_err(), "plain HTTP got an answer: {plain:?}");
    let untrusted = https_get(http, &pki.other_ca, "/healthz").await;
    assert!(
        untrusted.is_err(),
        "a client without the CA got {untrusted:?}"
    );
    // The listener still serves after the failed handshakes.
    assert_eq!(
        https_get(http, &pki.ca, "/healthz").await.map(|a| a.0),
        Ok(200)
    );

    // `weir status` over HTTPS: trusting the admin API's CA it reports ready; trusting
    // another CA it fails to connect, naming the URL.
    let status = |ca: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
            .args([
                "status",
                "--json",
                "--admin-url",
                &format!("https://{http}"),
            ])
            .arg("--admin-ca-file")
            .arg(ca)
            .env_remove("WEIR_ADMIN_URL")
            .output()
            .expect("run weir status")
    };
    let ok = status(&pki.ca);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        out.contains("\"ready\":true") || out.contains("\"ready\": true"),
        "{out}"
    );
    let bad = status(&pki.other_ca);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "{err}");
    assert!(err.contains(&format!("https://{http}")), "{err}");

    stop.cancel();
    run.await.expect("task").expect("weir stops cleanly");
}

/// `weir run` logging at trace level, with a NATS password and an admin token, through jobs,
/// failing and succeeding admin writes and a metrics scrape: neither its output nor
/// `/metrics` holds either secret. Neither do its messages for a refused password in the URL
/// or a config it rejects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secrets_in_logs_metrics_or_errors() {
    let dir = Dir::new();
    let (pw, token) = ("nats-pw-3c8e1f09aa", "admin-tok-77d2b4e6c1");
    let env = env(
        &dir,
        &format!("authorization {{ users = [ {{ user: weir, password: \"{pw}\" }} ] }}\n"),
        &format!("[nats]\nuser = \"weir\"\npassword = \"{pw}\"\n"),
    )
    .await;
    let log = dir.path().join("weir.log");
    let secrets = [
        ("WEIR_NATS_PASSWORD", pw),
        ("WEIR_ADMIN_TOKEN", token),
        ("RUST_LOG", "trace"),
    ];
    let toml = format!("{BASE}[nats]\nuser = \"weir\"\n");
    let weir = Proc::start_with(&env.url(), &toml, &secrets, Some(&log)).await;
    env.publish_all((0..20).map(|i| Job::seq("sms", "acme", i)), 20)
        .await;
    env.wait_all_released(20, Duration::from_secs(20)).await;
    let api = weir::cli::http::AdminClient::new(&format!("http://{}", weir.http)).unwrap();
    let body = serde_json::json!({ "rate": "50/s" });
    let put = |t: Option<&'static str>| {
        let (api, body) = (api.clone(), body.clone());
        async move {
            api.request(
                axum::http::Method::PUT,
                "/v1/limits/keys/acme",
                Some(&body),
                t,
            )
            .await
            .expect("PUT")
        }
    };
    assert_eq!(put(Some("not-the-token")).await.status, 401);
    assert_eq!(put(None).await.status, 401);
    let ok = put(Some(token)).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let metrics = api
        .request(axum::http::Method::GET, "/metrics", None, None)
        .await
        .expect("metrics");
    assert!(metrics.body.contains("weir_"), "{}", metrics.body);
    weir.sigterm();
    let mut weir = weir;
    weir.wait_exit(Duration::from_secs(20))
        .await
        .expect("exits");

    let out = std::fs::read_to_string(&log).expect("weir's output");
    assert!(out.contains("TRACE"), "trace logging was on: {out}");
    for (what, text) in [("output", &out), ("/metrics", &metrics.body)] {
        assert!(!text.contains(pw), "{what} holds the NATS password");
        assert!(!text.contains(token), "{what} holds the admin token");
    }

    // A wrong password in the URL, and rejected configs: the messages show neither.
    let run = |toml: &str, args: &[&str], env: &[(&str, &str)]| {
        let file = config_file(toml);
        let mut cmd = weir_command(file.path(), args);
        cmd.envs(env.iter().copied());
        async move {
            let out = cmd.output().await.expect("run weir");
            drop(file);
            assert!(!out.status.success(), "weir should fail");
            String::from_utf8_lossy(&out.stderr).to_string()
        }
    };
    let wrong = "wrong-url-pw-90ab";
    let url = env
        .url()
        .replace("nats://", &format!("nats://weir:{wrong}@"));
    let err = run(BASE, &["--nats-url", &url], &[]).await;
    assert_says(&err, &["authorization violation", "***@"], &[wrong]);
    for (toml, env) in [
        (format!("[nats]\npassword = \"{pw}\""), vec![]),
        ("[nats]\n".to_string(), vec![("WEIR_NATS_PASSWORD", pw)]),
        (format!("[nats]\nuser = \"weir\"\npassword = {pw}"), vec![]),
        (format!("admin_token = \"{pw} {token}\""), vec![]),
    ] {
        // Refused before connecting: the URL is never tried.
        let err = run(&toml, &["--nats-url", "nats://127.0.0.1:1"], &env).await;
        assert_says(&err, &["invalid configuration"], &[pw, token]);
    }
}
