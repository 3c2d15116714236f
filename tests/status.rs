//! Job status against a real nats-server: jobs published with a `Weir-Job-Id` header show up at
//! `GET /v1/jobs/{job_id}` as released, parked then released, dead with their reason, or dead
//! `purged` after a purge of their key; an
//! unknown id is a 404, a record past its retention expires to a 404, and with status off the
//! endpoint answers 503. Every check polls for its event (`eventually`), never sleeps.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::header::HeaderMap;
use serde_json::Value;

use common::*;

const BASE: &str = "partitions = 2\n[limits.default]\nrate = \"1000/s\"\nburst = 100\n";
const WAIT: Duration = Duration::from_secs(10);

/// `GET /v1/jobs/{id}`: the status code and the JSON body.
async fn job_status(http: SocketAddr, id: &str) -> (u16, Value) {
    let (code, body) = http_get(http, &format!("/v1/jobs/{id}"))
        .await
        .expect("GET /v1/jobs");
    let v =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{code}: not JSON ({e}): {body}"));
    (code, v)
}

/// Waits until the job's record is in `state`; returns the record.
async fn wait_state(http: SocketAddr, id: &str, state: &str) -> Value {
    eventually(&format!("job {id} to be {state}"), WAIT, || async {
        match job_status(http, id).await {
            (200, v) if v["state"] == state => Ok(v),
            (code, v) => Err(format!("{code} {v}")),
        }
    })
    .await
}

/// Publishes one job with a `Weir-Job-Id` and waits for the stream's ack.
async fn publish_with_id(env: &Env, subject: &str, id: &str) {
    let mut h = HeaderMap::new();
    h.insert("Weir-Job-Id", id);
    env.js
        .publish_with_headers(subject.to_string(), h, "x".into())
        .await
        .expect("publish")
        .await
        .expect("publish ack");
}

fn time(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a time in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_job_shows_both_times() {
    let env = Env::start().await;
    let weir = InProc::start(&env, BASE).await;
    let before = unix_ms();
    publish_with_id(&env, "jobs.sms.acme", "3f2a-1").await;
    let v = wait_state(weir.http, "3f2a-1", "released").await;
    assert_eq!(v["job_id"], "3f2a-1");
    assert_eq!(v["queue_type"], "sms");
    assert_eq!(v["queue_id"], "acme");
    assert_eq!(v["requeues"], 0);
    let (queued, released) = (time(&v, "queued_at"), time(&v, "released_at"));
    assert!(
        before.saturating_sub(1_000) <= queued && queued <= released && released <= unix_ms(),
        "{v}"
    );
    assert!(
        v.get("parked_at").is_none() && v.get("reason").is_none(),
        "{v}"
    );
    // The released job carries the id on, for the dequeue side.
    let rel = env.read_stream("WEIR_RELEASED").await;
    assert_eq!(rel[0].header("Weir-Job-Id"), Some("3f2a-1"));
    // Ids that are not valid KV keys are escaped, and found again by the same id.
    publish_with_id(&env, "jobs.sms.acme", "order 7.b").await;
    let v = wait_state(weir.http, "order%207.b", "released").await;
    assert_eq!(v["job_id"], "order 7.b");
    let s = scrape(weir.http).await;
    let dropped = s
        .samples
        .iter()
        .find(|x| x.metric == "weir_job_status_dropped_total")
        .expect("weir_job_status_dropped_total is exported");
    assert_eq!(
        dropped.value,
        prometheus_parse::Value::Counter(0.0),
        "no record dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_job_shows_parked_then_released() {
    let env = Env::start().await;
    // At 2/s with a 100 ms horizon, a key's third job is parked and released a second later.
    let toml = format!("horizon_ms = 100\n{BASE}[limits.keys.slow]\nrate = \"2/s\"\nburst = 1\n");
    let weir = InProc::start(&env, &toml).await;
    for i in 1..=3 {
        publish_with_id(&env, "jobs.sms.slow", &format!("slow-{i}")).await;
    }
    let parked = wait_state(weir.http, "slow-3", "parked").await;
    let parked_at = time(&parked, "parked_at");
    assert!(time(&parked, "queued_at") <= parked_at, "{parked}");
    assert!(parked.get("released_at").is_none(), "{parked}");
    let released = wait_state(weir.http, "slow-3", "released").await;
    assert_eq!(time(&released, "parked_at"), parked_at, "{released}");
    assert_eq!(
        time(&released, "queued_at"),
        time(&parked, "queued_at"),
        "{released}"
    );
    assert!(time(&released, "released_at") >= parked_at, "{released}");
    assert_eq!(env.stream_len("WEIR_PARK").await, 0);
}

/// Jobs a purge deleted read `dead`, reason `purged`: the held one as its partition recorded it,
/// the parked one through the key's purge mark (its record still says parked); the job already
/// released stays released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_jobs_show_dead_purged() {
    let env = Env::start().await;
    let toml = format!("horizon_ms = 100\n{BASE}[limits.keys.gone]\nrate = \"1/m\"\nburst = 1\n");
    let weir = InProc::start(&env, &toml).await;
    for i in 1..=5 {
        publish_with_id(&env, "jobs.sms.gone", &format!("gone-{i}")).await;
    }
    wait_state(weir.http, "gone-1", "released").await;
    // The second is held in memory (a key keeps its next job there); the others are parked.
    let mut parked = Vec::new();
    for i in 3..=5 {
        parked.push(wait_state(weir.http, &format!("gone-{i}"), "parked").await);
    }
    let before = unix_ms();
    let (code, v) = http_json(weir.http, "DELETE", "/v1/keys/gone/jobs", None).await;
    assert_eq!((code, &v["total"]), (200, &serde_json::json!(4)), "{v}");
    let v = wait_state(weir.http, "gone-2", "dead").await;
    assert_eq!(v["reason"], "purged", "{v}");
    for (i, p) in (3..=5).zip(&parked) {
        let v = wait_state(weir.http, &format!("gone-{i}"), "dead").await;
        assert_eq!(v["reason"], "purged", "{v}");
        assert!(time(&v, "dead_at") >= before.saturating_sub(1_000), "{v}");
        assert_eq!(v["parked_at"], p["parked_at"], "{v}");
    }
    // The last, minutes from its turn, was never read back from the park: its record is still
    // the one written when it was parked, and the answer above came from the key's purge mark.
    let kv = env
        .js
        .get_key_value("WEIR_JOB_STATUS")
        .await
        .expect("the bucket");
    let raw = kv.get("gone-5").await.expect("read").expect("a record");
    let raw: Value = serde_json::from_slice(&raw).expect("JSON");
    assert_eq!(raw["state"], "parked", "{raw}");
    assert_eq!(job_status(weir.http, "gone-1").await.1["state"], "released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_job_shows_dead_with_its_reason() {
    let env = Env::start().await;
    let weir = InProc::start(&env, BASE).await;
    // Dead-lettered by the triage (wrong number of tokens) ...
    publish_with_id(&env, "jobs.onlyone", "bad-1").await;
    // ... and by its partition (a key longer than 256 bytes).
    let long = "k".repeat(300);
    publish_with_id(&env, &format!("jobs.sms.{long}"), "bad-2").await;
    let v = wait_state(weir.http, "bad-1", "dead").await;
    let reason = v["reason"].as_str().expect("a reason");
    assert!(reason.contains("3 tokens"), "{v}");
    assert!(time(&v, "queued_at") <= time(&v, "dead_at"), "{v}");
    let v = wait_state(weir.http, "bad-2", "dead").await;
    assert!(
        v["reason"].as_str().unwrap().contains("key is 300 bytes"),
        "{v}"
    );
    assert_eq!(v["queue_type"], "sms");
    assert_eq!(v["queue_id"], long.as_str());
    assert!(time(&v, "queued_at") <= time(&v, "dead_at"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_job_is_404_and_a_record_expires_after_the_retention() {
    let env = Env::start().await;
    let weir = InProc::start(&env, &format!("job_status_retention = \"1s\"\n{BASE}")).await;
    let (code, v) = job_status(weir.http, "never-seen").await;
    assert_eq!(code, 404, "{v}");
    let e = v["error"].as_str().expect("an error message");
    assert!(
        e.contains("never-seen") && e.contains("job_status_retention (1s)"),
        "{e}"
    );
    let (code, v) = job_status(weir.http, &"x".repeat(300)).await;
    assert_eq!(code, 400, "{v}");

    publish_with_id(&env, "jobs.sms.acme", "short-lived").await;
    wait_state(weir.http, "short-lived", "released").await;
    let started = std::time::Instant::now();
    eventually("the record to expire", WAIT, || async {
        match job_status(weir.http, "short-lived").await {
            (404, _) => Ok(()),
            (code, v) => Err(format!("{code} {v}")),
        }
    })
    .await;
    println!("expired {:?} after it was seen", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_off_answers_503_and_makes_no_bucket() {
    let env = Env::start().await;
    let weir = InProc::start(&env, &format!("job_status_retention = \"0\"\n{BASE}")).await;
    publish_with_id(&env, "jobs.sms.acme", "untracked").await;
    env.wait_all_released(1, WAIT).await;
    let (code, v) = job_status(weir.http, "untracked").await;
    assert_eq!(code, 503, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("job status is off"),
        "{v}"
    );
    assert!(env.js.get_stream("KV_WEIR_JOB_STATUS").await.is_err());
}
