//! The SHARQ-compatible API over real HTTP against a real nats-server: sharq-server's own
//! `tests.py` cases, ported (a job is released asynchronously by Weir, so a dequeue right after
//! an enqueue long-polls with `?wait_ms=`), then bulk enqueue, the native batch, requeue and
//! dead letters, a live interval change, bad input, queue length, deletequeue and deepstatus.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    assert_gcra_bound, eventually, http_json, http_request, wait_members, Collector, Env, InProc,
};
use serde_json::{json, Value};

/// Fast by default: SHARQ's intervals set each queue's own limit.
const TOML: &str = "partitions = 2\n[limits.default]\nrate = \"1000/s\"\nburst = 100\n";
const JOB: &str = "ef022088-d2b3-44ad-bf0d-a93d6d93b82c";

async fn start() -> (Env, InProc, SocketAddr) {
    let env = Env::start().await;
    let (w, sharq) = InProc::start_sharq(&env, TOML).await;
    (env, w, sharq)
}

async fn enqueue(sharq: SocketAddr, path: &str, job_id: &str, interval: u64) -> (u16, Value) {
    let body =
        json!({"job_id": job_id, "payload": {"message": "Hello, world."}, "interval": interval});
    http_json(sharq, "POST", path, Some(&body)).await
}

async fn dequeue(sharq: SocketAddr, queue_type: &str, wait_ms: u64) -> (u16, Value) {
    let path = format!("/dequeue/{queue_type}/?wait_ms={wait_ms}");
    http_json(sharq, "GET", &path, None).await
}

#[tokio::test]
async fn root_dequeue_fail_and_enqueue() {
    let (_env, _w, sharq) = start().await;
    assert_eq!(
        http_json(sharq, "GET", "/", None).await,
        (200, json!({"message": "Hello, SharQ!"}))
    );
    for path in ["/dequeue/", "/dequeue/sms/"] {
        let (code, v) = http_json(sharq, "GET", path, None).await;
        assert_eq!((code, v), (404, json!({"status": "failure"})), "{path}");
    }
    let (code, v) = enqueue(sharq, "/enqueue/sms/johdoe/", JOB, 1000).await;
    assert_eq!((code, &v["status"]), (201, &json!("queued")), "{v}");
}

#[tokio::test]
async fn dequeue_finish_and_finish_fail() {
    let (_env, _w, sharq) = start().await;
    let (code, _) = http_json(sharq, "POST", &format!("/finish/sms/johndoe/{JOB}/"), None).await;
    assert_eq!(code, 404);
    // Long-poll first: the enqueue wakes it.
    let waiting = tokio::spawn(async move { dequeue(sharq, "sms", 10_000).await });
    enqueue(sharq, "/enqueue/sms/johndoe/", JOB, 1000).await;
    let (code, v) = waiting.await.unwrap();
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], "success");
    assert_eq!(v["job_id"], JOB);
    assert_eq!(v["queue_id"], "johndoe");
    assert_eq!(v["payload"], json!({"message": "Hello, world."}));
    assert_eq!(v["requeues_remaining"], -1);
    assert!(v["current_queue_length"].is_u64(), "{v}");
    let path = format!("/finish/sms/johndoe/{JOB}/");
    assert_eq!(
        http_json(sharq, "POST", &path, None).await,
        (200, json!({"status": "success"}))
    );
    assert_eq!(http_json(sharq, "POST", &path, None).await.0, 404);
    // SHARQ's `GET /dequeue/` is the queue type "default".
    enqueue(sharq, "/enqueue/default/q1/", "j-default", 0).await;
    let (code, v) = http_json(sharq, "GET", "/dequeue/?wait_ms=10000", None).await;
    assert_eq!((code, &v["job_id"]), (200, &json!("j-default")), "{v}");
}

#[tokio::test]
async fn interval_and_interval_fail() {
    let (env, _w, sharq) = start().await;
    let five = json!({"interval": 5000});
    let (code, v) = http_json(sharq, "POST", "/interval/sms/johndoe/", Some(&five)).await;
    assert_eq!((code, v), (404, json!({"status": "failure"})));
    enqueue(sharq, "/enqueue/sms/johndoe/", JOB, 1000).await;
    let (code, v) = http_json(sharq, "POST", "/interval/sms/johndoe/", Some(&five)).await;
    assert_eq!((code, v), (200, json!({"status": "success"})));
    let kv = env.js.get_key_value("WEIR_LIMITS").await.unwrap();
    let stored = kv
        .get("keys.johndoe")
        .await
        .unwrap()
        .expect("the queue's limit");
    let limit: Value = serde_json::from_slice(&stored).unwrap();
    assert_eq!(
        (limit["rate"].as_str(), limit["burst"].as_i64()),
        (Some("12/m"), Some(1))
    );
    // The queue drains; its interval stays (SHARQ forgot it).
    let (code, _) = dequeue(sharq, "sms", 10_000).await;
    assert_eq!(code, 200);
    http_json(sharq, "POST", &format!("/finish/sms/johndoe/{JOB}/"), None).await;
    let (code, _) = http_json(sharq, "POST", "/interval/sms/johndoe/", Some(&five)).await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn metrics_in_sharqs_shape() {
    let (_env, _w, sharq) = start().await;
    enqueue(sharq, "/enqueue/sms/johndoe/", JOB, 0).await;
    let (code, v) = http_json(sharq, "GET", "/metrics/", None).await;
    assert_eq!((code, &v["status"]), (200, &json!("success")), "{v}");
    assert_eq!(v["queue_types"], json!(["sms"]));
    let counts = v["enqueue_counts"].as_object().expect("enqueue_counts");
    assert_eq!(counts.len(), 10);
    let newest = counts
        .keys()
        .map(|k| k.parse::<u64>().unwrap())
        .max()
        .unwrap();
    assert_eq!(newest % 60_000, 0, "keys are minute timestamps in ms");
    assert_eq!(counts[&newest.to_string()], 1);
    assert_eq!(v["dequeue_counts"].as_object().unwrap().len(), 10);
    let (_, v) = http_json(sharq, "GET", "/metrics/sms/", None).await;
    assert_eq!(
        (&v["status"], &v["queue_ids"]),
        (&json!("success"), &json!(["johndoe"]))
    );
    let (_, v) = http_json(sharq, "GET", "/metrics/sms/johndoe/", None).await;
    assert_eq!(v["status"], "success");
    assert!(v["queue_length"].is_u64(), "{v}");
    assert!(v["enqueue_counts"].is_object() && v["dequeue_counts"].is_object());
}

#[tokio::test]
async fn bad_input_is_400_json() {
    let (_env, _w, sharq) = start().await;
    let cases: [(&str, &str, Option<&str>); 8] = [
        ("POST", "/enqueue/sms/q/", Some("not json")),
        (
            "POST",
            "/enqueue/sms/q/",
            Some(r#"{"job_id": "j", "payload": {}}"#),
        ),
        (
            "POST",
            "/enqueue/sms/q/",
            Some(r#"{"job_id": "j", "payload": {}, "interval": -5}"#),
        ),
        (
            "POST",
            "/enqueue/sms/q/",
            Some(r#"{"job_id": 7, "payload": {}, "interval": 1}"#),
        ),
        (
            "POST",
            "/enqueue/sms/a.b/",
            Some(r#"{"job_id": "j", "payload": {}, "interval": 1}"#),
        ),
        (
            "POST",
            "/enqueue/sms/q/",
            Some(r#"{"job_id": "j", "payload": {}, "interval": 1, "requeue_limit": -2}"#),
        ),
        ("POST", "/interval/sms/q/", Some(r#"{"interval": "soon"}"#)),
        ("DELETE", "/deletequeue/sms/q/", Some("{")),
    ];
    for (method, path, body) in cases {
        let (code, text) = http_request(sharq, method, path, body).await.unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: {text}"));
        assert_eq!(code, 400, "{method} {path} {body:?}: {v}");
        assert_eq!(v["status"], "failure");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
}

#[tokio::test]
async fn bulk_10000_jobs_answered_one_by_one() {
    let (env, _w, sharq) = start().await;
    let jobs: Vec<Value> = (0..10_000)
        .map(|i| {
            let job_id = if i == 5000 { "bad.id".to_string() } else { format!("job-{i}") };
            json!({"queue_id": format!("q{}", i % 50), "job_id": job_id, "payload": {"i": i}, "interval": 0})
        })
        .collect();
    let t = Instant::now();
    let (code, v) = http_json(
        sharq,
        "POST",
        "/enqueue/sms/bulk/",
        Some(&json!({"jobs": jobs})),
    )
    .await;
    let took = t.elapsed();
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (v["queued"].as_u64(), v["failed"].as_u64()),
        (Some(9_999), Some(1))
    );
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 10_000);
    for (i, r) in results.iter().enumerate() {
        if i == 5000 {
            assert_eq!(
                (&r["job_id"], &r["status"]),
                (&json!("bad.id"), &json!("failure"))
            );
            assert!(r["message"].as_str().unwrap().contains("job_id"), "{r}");
        } else {
            assert_eq!(
                r,
                &json!({"job_id": format!("job-{i}"), "status": "queued"})
            );
        }
    }
    eprintln!("bulk of 10,000 answered in {took:?}");
    env.wait_all_released(9_999, Duration::from_secs(30)).await;
    let too_many: Vec<Value> = (0..10_001)
        .map(|i| json!({"queue_id": "q", "job_id": format!("x{i}"), "payload": {}, "interval": 0}))
        .collect();
    let (code, v) = http_json(
        sharq,
        "POST",
        "/enqueue/sms/bulk/",
        Some(&json!({"jobs": too_many})),
    )
    .await;
    assert_eq!((code, &v["status"]), (413, &json!("failure")), "{v}");
}

#[tokio::test]
async fn native_batch_and_duplicates_stored_once() {
    let (env, w, sharq) = start().await;
    let body = json!({"jobs": [
        {"destination": "email", "key": "acme", "job_id": "n1", "payload": {"a": 1}},
        {"destination": "email", "key": "bad key", "job_id": "n2", "payload": {}},
        {"destination": "email", "key": "acme", "job_id": "n1", "payload": {"a": 1}},
    ]});
    let (code, v) = http_json(w.http, "POST", "/v1/jobs:batch", Some(&body)).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (v["accepted"].as_u64(), v["refused"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(
        v["results"][0],
        json!({"accepted": true, "duplicate": false})
    );
    assert_eq!(v["results"][1]["accepted"], false);
    assert_eq!(
        v["results"][2],
        json!({"accepted": true, "duplicate": true})
    );
    // The same job through the SHARQ API twice: one job, no phantom.
    enqueue(sharq, "/enqueue/email/acme/", "s1", 0).await;
    enqueue(sharq, "/enqueue/email/acme/", "s1", 0).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let (code, v) = dequeue(sharq, "email", 10_000).await;
        assert_eq!(code, 200, "{v}");
        got.push(v["job_id"].as_str().unwrap().to_string());
    }
    got.sort();
    assert_eq!(got, ["n1", "s1"]);
    assert_eq!(dequeue(sharq, "email", 500).await.0, 404);
    assert_eq!(env.stream_len("WEIR_RELEASED").await, 2);
}

/// Behind one address, a worker's finish lands on any process: a process that does not hold
/// the job forwards the finish to the one that does.
#[tokio::test]
async fn a_finish_reaches_the_process_that_handed_the_job_out() {
    let env = Env::start().await;
    let toml = format!("sharq_job_expire_interval = 2000\n{TOML}");
    let (a, sharq_a) = InProc::start_sharq(&env, &toml).await;
    let (b, sharq_b) = InProc::start_sharq(&env, &toml).await;
    // Each knows the other (from WEIR_CLUSTER): a miss is answered without waiting.
    wait_members(&[a.http, b.http], 2).await;
    assert_eq!(enqueue(sharq_a, "/enqueue/sms/fw/", "f1", 0).await.0, 201);
    let (code, v) = dequeue(sharq_a, "sms", 10_000).await;
    assert_eq!((code, &v["job_id"]), (200, &json!("f1")), "{v}");
    assert_eq!(
        http_json(sharq_b, "POST", "/finish/sms/fw/f1/", None).await,
        (200, json!({"status": "success"}))
    );
    // Finished once: no process holds it any more.
    for sharq in [sharq_b, sharq_a] {
        assert_eq!(
            http_json(sharq, "POST", "/finish/sms/fw/f1/", None).await,
            (404, json!({"status": "failure"}))
        );
    }
    // Recorded by the process that held it; readable through either.
    eventually("the finished record", Duration::from_secs(10), || async {
        let (code, v) = http_json(sharq_b, "GET", "/status/sms/fw/f1/", None).await;
        match (code, v["job"]["state"].as_str()) {
            (200, Some("finished")) => Ok(()),
            _ => Err(format!("{code} {v}")),
        }
    })
    .await;
    // Acked for good: not redelivered after the expiry, to either process.
    for sharq in [sharq_a, sharq_b] {
        assert_eq!(dequeue(sharq, "sms", 2500).await.0, 404);
    }
}

/// Behind one address, `GET /metrics/...` reaches any process: each answers for the whole
/// group, the others' counts added to its own (asked on core NATS), as SHARQ's Redis did.
#[tokio::test]
async fn metrics_add_up_over_the_processes() {
    let env = Env::start().await;
    let (a, sharq_a) = InProc::start_sharq(&env, TOML).await;
    let (b, sharq_b) = InProc::start_sharq(&env, TOML).await;
    wait_members(&[a.http, b.http], 2).await;
    for (sharq, path, id) in [
        (sharq_a, "/enqueue/sms/m1/", "e1"),
        (sharq_a, "/enqueue/sms/m1/", "e2"),
        (sharq_b, "/enqueue/sms/m2/", "e3"),
    ] {
        assert_eq!(enqueue(sharq, path, id, 0).await.0, 201);
    }
    assert_eq!(dequeue(sharq_b, "sms", 10_000).await.0, 200);
    // Summed over the ten minutes: the run may straddle a minute.
    let total = |v: &Value, which: &str| -> u64 {
        v[which]
            .as_object()
            .unwrap_or_else(|| panic!("{which} in {v}"))
            .values()
            .map(|n| n.as_u64().unwrap())
            .sum()
    };
    for sharq in [sharq_a, sharq_b] {
        let (code, v) = http_json(sharq, "GET", "/metrics/", None).await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["queue_types"], json!(["sms"]));
        assert_eq!(v["enqueue_counts"].as_object().unwrap().len(), 10);
        assert_eq!(
            (total(&v, "enqueue_counts"), total(&v, "dequeue_counts")),
            (3, 1),
            "{v}"
        );
        let (_, v) = http_json(sharq, "GET", "/metrics/sms/", None).await;
        assert_eq!(v["queue_ids"], json!(["m1", "m2"]), "{v}");
        let (_, v) = http_json(sharq, "GET", "/metrics/sms/m1/", None).await;
        assert_eq!(total(&v, "enqueue_counts"), 2, "{v}");
    }
}

/// Waits until consumer `sharq-sms` has delivered every job it has, and `n` are unacked.
async fn wait_all_delivered(env: &Env, n: u64) {
    let released = env.js.get_stream("WEIR_RELEASED").await.unwrap();
    eventually(&format!("{n} delivered"), Duration::from_secs(10), || {
        let released = released.clone();
        async move {
            let mut c: async_nats::jetstream::consumer::PullConsumer = released
                .get_consumer("sharq-sms")
                .await
                .map_err(|e| e.to_string())?;
            let i = c.info().await.map_err(|e| e.to_string())?;
            match (i.num_pending, i.num_ack_pending as u64) {
                (0, m) if m == n => Ok(()),
                got => Err(format!("(pending, ack pending) {got:?}")),
            }
        }
    })
    .await;
}

/// A queue's length at `GET /metrics/<queue_type>/<queue_id>/` counts the jobs another process
/// holds prefetched: the process asked cannot see them in any stream (they are past the type's
/// consumer), so the others answer with them.
#[tokio::test]
async fn queue_length_counts_jobs_another_process_prefetched() {
    let env = Env::start().await;
    let (a, sharq_a) = InProc::start_sharq(&env, TOML).await;
    let (b, sharq_b) = InProc::start_sharq(&env, TOML).await;
    wait_members(&[a.http, b.http], 2).await;
    for i in 0..5 {
        let id = format!("p{i}");
        assert_eq!(enqueue(sharq_a, "/enqueue/sms/away/", &id, 0).await.0, 201);
    }
    // B hands one out and holds the other four in its prefetch buffer: every job delivered to
    // B, none acked.
    let (code, v) = dequeue(sharq_b, "sms", 10_000).await;
    assert_eq!(code, 200, "{v}");
    wait_all_delivered(&env, 5).await;
    for sharq in [sharq_a, sharq_b] {
        let (code, v) = http_json(sharq, "GET", "/metrics/sms/away/", None).await;
        assert_eq!((code, &v["queue_length"]), (200, &json!(4)), "{v}");
    }
}

/// `deletequeue` takes the queue's jobs a process holds prefetched for its dequeues, on every
/// process: once it has answered, no dequeue hands out a job of the deleted queue (before, up to
/// the prefetch buffer's 256 a type and process still went out). Other queues' prefetched jobs
/// stay.
#[tokio::test]
async fn deletequeue_takes_the_jobs_other_processes_prefetched() {
    let env = Env::start().await;
    let (a, sharq_a) = InProc::start_sharq(&env, TOML).await;
    let (b, sharq_b) = InProc::start_sharq(&env, TOML).await;
    wait_members(&[a.http, b.http], 2).await;
    let released = |ids: Vec<String>| async move {
        eventually("released", Duration::from_secs(10), || async {
            for id in &ids {
                let (_, v) = http_json(a.http, "GET", &format!("/v1/jobs/{id}"), None).await;
                if v["state"] != "released" {
                    return Err(format!("{id}: {v}"));
                }
            }
            Ok(())
        })
        .await
    };
    // The campaign's five first, then another queue's two: released in that order.
    let campaign: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    for id in &campaign {
        assert_eq!(
            enqueue(sharq_a, "/enqueue/sms/campaign/", id, 0).await.0,
            201
        );
    }
    released(campaign).await;
    let other: Vec<String> = (0..2).map(|i| format!("o{i}")).collect();
    for id in &other {
        assert_eq!(enqueue(sharq_a, "/enqueue/sms/other/", id, 0).await.0, 201);
    }
    released(other).await;
    // B hands out the campaign's first and holds the other six prefetched.
    let (code, v) = dequeue(sharq_b, "sms", 10_000).await;
    assert_eq!((code, &v["queue_id"]), (200, &json!("campaign")), "{v}");
    wait_all_delivered(&env, 7).await;
    // Deleted through A; B's four prefetched campaign jobs go with it.
    let purge = json!({"purge_all": false});
    let (code, v) = http_json(
        sharq_a,
        "DELETE",
        "/deletequeue/sms/campaign/",
        Some(&purge),
    )
    .await;
    assert_eq!((code, &v["status"]), (200, &json!("Success")), "{v}");
    let mut got = Vec::new();
    loop {
        match dequeue(sharq_b, "sms", 1_000).await {
            (200, v) => got.push(v["job_id"].as_str().unwrap().to_string()),
            (404, _) => break,
            (code, v) => panic!("{code} {v}"),
        }
    }
    assert_eq!(got, ["o0", "o1"]);
    assert_eq!(dequeue(sharq_a, "sms", 500).await.0, 404);
    // The job dequeued before the delete is still its worker's to finish.
    let (code, v) = http_json(sharq_b, "POST", "/finish/sms/campaign/c0/", None).await;
    assert_eq!(code, 200, "{v}");
    // Deleting it again finds nothing.
    let (_, v) = http_json(
        sharq_a,
        "DELETE",
        "/deletequeue/sms/campaign/",
        Some(&purge),
    )
    .await;
    assert_eq!(v["status"], "Failure", "{v}");
}

/// `deletequeue` reaching a process that does not run the key's partition is carried out by the
/// one that does (before, it answered 503 there: half the time, with two processes behind one
/// address).
#[tokio::test]
async fn deletequeue_reaches_the_process_running_the_key() {
    let env = Env::start().await;
    let (a, sharq_a) = InProc::start_sharq(&env, TOML).await;
    let (b, sharq_b) = InProc::start_sharq(&env, TOML).await;
    wait_members(&[a.http, b.http], 2).await;
    // One released, one held, one parked.
    for id in ["s1", "s2", "s3"] {
        assert_eq!(
            enqueue(sharq_a, "/enqueue/sms/slow/", id, 60_000).await.0,
            201
        );
    }
    eventually("s3 parked", Duration::from_secs(10), || async {
        match http_json(a.http, "GET", "/v1/jobs/s3", None).await {
            (200, v) if v["state"] == "parked" => Ok(()),
            (code, v) => Err(format!("{code} {v}")),
        }
    })
    .await;
    let (owner, other) = match http_json(a.http, "GET", "/v1/keys/slow", None).await {
        (421, _) => ((b.http, sharq_b), sharq_a),
        (200, _) => ((a.http, sharq_a), sharq_b),
        (code, v) => panic!("{code} {v}"),
    };
    let purge = json!({"purge_all": false});
    let (code, v) = http_json(other, "DELETE", "/deletequeue/sms/slow/", Some(&purge)).await;
    assert_eq!((code, &v["status"]), (200, &json!("Success")), "{v}");
    let (code, v) = http_json(owner.0, "GET", "/v1/keys/slow", None).await;
    assert_eq!(
        (code, &v["held"], &v["parked"]),
        (200, &json!(0), &json!(0)),
        "{v}"
    );
    for id in ["s2", "s3"] {
        let (_, v) = http_json(owner.0, "GET", &format!("/v1/jobs/{id}"), None).await;
        assert_eq!(
            (&v["state"], &v["reason"]),
            (&json!("dead"), &json!("purged")),
            "{id}: {v}"
        );
    }
    assert_eq!(dequeue(owner.1, "sms", 500).await.0, 404);
}

#[tokio::test]
async fn requeued_after_expiry_up_to_the_limit_then_dead_lettered() {
    let env = Env::start().await;
    let toml = format!("sharq_job_expire_interval = 1000\n{TOML}");
    let (_w, sharq) = InProc::start_sharq(&env, &toml).await;
    let body = json!({"job_id": "r1", "payload": {"n": 1}, "interval": 0, "requeue_limit": 2});
    assert_eq!(
        http_json(sharq, "POST", "/enqueue/sms/rq/", Some(&body))
            .await
            .0,
        201
    );
    for remaining in [2, 1, 0] {
        let (code, v) = dequeue(sharq, "sms", 10_000).await;
        assert_eq!((code, &v["job_id"]), (200, &json!("r1")), "{v}");
        assert_eq!(v["requeues_remaining"], remaining, "{v}");
        // Not finished: expires and comes back.
    }
    // Its time is up: finishing now is too late.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        http_json(sharq, "POST", "/finish/sms/rq/r1/", None).await.0,
        404
    );
    env.wait_stream_len("WEIR_DEAD", 1, Duration::from_secs(10))
        .await;
    let dead = env.read_stream("WEIR_DEAD").await;
    assert_eq!(dead[0].subject, "dead.sms.rq");
    let reason = dead[0].header("Weir-Dead-Reason").unwrap();
    assert!(reason.starts_with("requeue-limit"), "{reason}");
    assert_eq!(dead[0].header("Weir-Job-Id"), Some("r1"));
    assert_eq!(dequeue(sharq, "sms", 1500).await.0, 404);
}

#[tokio::test]
async fn interval_change_applies_live() {
    let (env, _w, sharq) = start().await;
    let seen = Collector::start(&env.client, "released.sms.live").await;
    for i in 0..12 {
        let (code, _) = enqueue(sharq, "/enqueue/sms/live/", &format!("l{i}"), 500).await;
        assert_eq!(code, 201);
    }
    seen.wait_for(2, Duration::from_secs(10)).await;
    let (code, _) = http_json(
        sharq,
        "POST",
        "/interval/sms/live/",
        Some(&json!({"interval": 50})),
    )
    .await;
    assert_eq!(code, 200);
    let all = seen.wait_for(12, Duration::from_secs(10)).await;
    let times: Vec<u64> = all.iter().map(|s| s.released_ms()).collect();
    assert!(
        times[1] - times[0] >= 450,
        "interval 500 ms spaces the first two: {times:?}"
    );
    assert_gcra_bound(&times, 1, 50, "after the change");
    assert_gcra_bound(&times[..2], 1, 500, "before the change");
    // At 500 ms the last would leave 5.5 s after the first.
    assert!(
        times[11] - times[0] < 3_000,
        "the new interval applied: {times:?}"
    );
}

#[tokio::test]
async fn max_queued_length_and_deletequeue() {
    let (_env, _w, sharq) = start().await;
    let mut refused = None;
    for i in 0..20 {
        let body = json!({"job_id": format!("m{i}"), "payload": {"max_queued_length": 3}, "interval": 60_000});
        let (code, v) = http_json(sharq, "POST", "/enqueue/sms/slow/", Some(&body)).await;
        match code {
            201 => assert!(v["current_queue_length"].as_u64().unwrap() < 3, "{v}"),
            429 => {
                refused = Some(v);
                break;
            }
            _ => panic!("{code} {v}"),
        }
        // Past the 250 ms cache of the count.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let v = refused.expect("a 429 once 3 jobs wait");
    assert_eq!(v["status"], "failure");
    assert!(v["current_queue_length"].as_u64().unwrap() >= 3, "{v}");
    let purge = json!({"purge_all": true});
    let (code, v) = http_json(sharq, "DELETE", "/deletequeue/sms/slow/", Some(&purge)).await;
    assert_eq!((code, &v["status"]), (200, &json!("Success")), "{v}");
    let (code, v) = http_json(sharq, "DELETE", "/deletequeue/sms/slow/", Some(&purge)).await;
    assert_eq!(
        (code, v),
        (
            200,
            json!({"status": "Failure", "message": "No queued calls found"})
        )
    );
    // purge_all forgot the interval (once the limits watcher has seen the delete).
    common::eventually("the interval forgotten", Duration::from_secs(5), || async {
        let one = json!({"interval": 1});
        match http_json(sharq, "POST", "/interval/sms/slow/", Some(&one)).await {
            (404, _) => Ok(()),
            (code, v) => Err(format!("{code} {v}")),
        }
    })
    .await;
}

#[tokio::test]
async fn deepstatus_follows_nats() {
    let (mut env, _w, sharq) = start().await;
    assert_eq!(
        http_json(sharq, "GET", "/deepstatus/", None).await,
        (200, json!({"status": "success"}))
    );
    env.nats.kill();
    let (code, v) = http_json(sharq, "GET", "/deepstatus/", None).await;
    assert_eq!((code, &v["status"]), (500, &json!("failure")), "{v}");
}

/// A job's life through the SHARQ API shows in its status, on both paths: queued or released
/// after the enqueue, dequeued, then finished with every time kept that the writer knew.
#[tokio::test]
async fn job_status_follows_a_job_through_the_api() {
    let (_env, w, sharq) = start().await;
    let sharq_path = format!("/status/sms/alice/{JOB}/");
    let native_path = format!("/v1/jobs/{JOB}");
    let (code, v) = http_json(sharq, "GET", &sharq_path, None).await;
    assert_eq!((code, v), (404, json!({"status": "failure"})));

    enqueue(sharq, "/enqueue/sms/alice/", JOB, 0).await;
    // Released (Weir releases it at once); the partition's record carries both times.
    let rec = common::eventually("the released record", Duration::from_secs(10), || async {
        let (code, v) = http_json(w.http, "GET", &native_path, None).await;
        match (code, v["state"].as_str()) {
            (200, Some("released")) => Ok(v),
            _ => Err(format!("{code} {v}")),
        }
    })
    .await;
    assert!(
        rec["queued_at"].as_u64().is_some() && rec["released_at"].as_u64().is_some(),
        "{rec}"
    );
    assert_eq!(
        (&rec["queue_type"], &rec["queue_id"]),
        (&json!("sms"), &json!("alice"))
    );

    let (code, v) = dequeue(sharq, "sms", 5_000).await;
    assert_eq!((code, &v["job_id"]), (200, &json!(JOB)), "{v}");
    let dequeued = common::eventually("the dequeued record", Duration::from_secs(10), || async {
        let (code, v) = http_json(sharq, "GET", &sharq_path, None).await;
        match (code, v["job"]["state"].as_str()) {
            (200, Some("dequeued")) => Ok(v),
            _ => Err(format!("{code} {v}")),
        }
    })
    .await;
    assert_eq!(dequeued["status"], "success");
    assert!(
        dequeued["job"]["dequeued_at"].as_u64().is_some(),
        "{dequeued}"
    );

    let (code, _) = http_json(sharq, "POST", &format!("/finish/sms/alice/{JOB}/"), None).await;
    assert_eq!(code, 200);
    let done = common::eventually("the finished record", Duration::from_secs(10), || async {
        let (code, v) = http_json(w.http, "GET", &native_path, None).await;
        match (code, v["state"].as_str()) {
            (200, Some("finished")) => Ok(v),
            _ => Err(format!("{code} {v}")),
        }
    })
    .await;
    assert!(done["finished_at"].as_u64().is_some(), "{done}");
    // Another queue's path does not show this job.
    let (code, _) = http_json(sharq, "GET", &format!("/status/sms/bob/{JOB}/"), None).await;
    assert_eq!(code, 404);
}

/// Released jobs no worker has dequeued still count in the queue's length: as SHARQ counts
/// them, and so that `max_queued_length` holds producers back while workers are away.
#[tokio::test]
async fn released_jobs_count_until_dequeued() {
    let (_env, w, sharq) = start().await;
    let ids: Vec<String> = (0..5).map(|i| format!("r{i}")).collect();
    for id in &ids {
        let (code, v) = enqueue(sharq, "/enqueue/sms/away/", id, 0).await;
        assert_eq!(code, 201, "{v}");
    }
    let length = || async {
        let (code, v) = http_json(sharq, "GET", "/metrics/sms/away/", None).await;
        assert_eq!(code, 200, "{v}");
        v["queue_length"].as_u64().expect("a length")
    };
    // All five released (interval 0) and none dequeued: the length is still 5.
    eventually("5 released, 5 counted", Duration::from_secs(10), || async {
        for id in &ids {
            let (_, v) = http_json(w.http, "GET", &format!("/v1/jobs/{id}"), None).await;
            if v["state"] != "released" {
                return Err(format!("{id}: {v}"));
            }
        }
        match length().await {
            5 => Ok(()),
            n => Err(format!("length {n}")),
        }
    })
    .await;
    let full = json!({"job_id": "r5", "payload": {"max_queued_length": 5}, "interval": 0});
    let (code, v) = http_json(sharq, "POST", "/enqueue/sms/away/", Some(&full)).await;
    assert_eq!((code, &v["current_queue_length"]), (429, &json!(5)), "{v}");

    // One dequeued: the other four wait in this process's prefetch buffer, still counted.
    let (code, v) = dequeue(sharq, "sms", 5_000).await;
    assert_eq!(code, 200, "{v}");
    eventually("4 counted", Duration::from_secs(5), || async {
        match length().await {
            4 => Ok(()),
            n => Err(format!("length {n}")),
        }
    })
    .await;
    for _ in 0..4 {
        assert_eq!(dequeue(sharq, "sms", 5_000).await.0, 200);
    }
    eventually("0 counted", Duration::from_secs(5), || async {
        match length().await {
            0 => Ok(()),
            n => Err(format!("length {n}")),
        }
    })
    .await;
}

/// A job's `queued` record is written once its enqueue is acked, when the pipeline may already
/// have parked or released it and written that: it never overwrites a later record. (CI once
/// saw a released job read `queued` this way.)
#[tokio::test]
async fn a_queued_record_never_overwrites_a_later_one() {
    // A 60 s horizon holds `late` in memory, not parked: the pipeline writes nothing for it.
    let toml = "partitions = 2\nhorizon_ms = 60000\nack_wait_ms = 120000\n\
                [limits.default]\nrate = \"1000/s\"\nburst = 100\n";
    let env = Env::start().await;
    let (w, sharq) = InProc::start_sharq(&env, toml).await;
    // The queue's first job leaves at once; `late` waits 30 s behind it.
    assert_eq!(
        enqueue(sharq, "/enqueue/sms/slow/", "first", 30_000)
            .await
            .0,
        201
    );
    // As if the pipeline had released `late` before its enqueue's ack came back.
    let released = json!({"job_id": "late", "queue_type": "sms", "queue_id": "slow",
        "state": "released", "requeues": 0, "queued_at": 1, "released_at": 2});
    let kv = env.js.get_key_value("WEIR_JOB_STATUS").await.unwrap();
    kv.put("late", serde_json::to_vec(&released).unwrap().into())
        .await
        .unwrap();
    assert_eq!(
        enqueue(sharq, "/enqueue/sms/slow/", "late", 30_000).await.0,
        201
    );
    // Records from one process land in order: once the next job's shows, `late`'s was seen.
    assert_eq!(enqueue(sharq, "/enqueue/sms/fast/", "next", 0).await.0, 201);
    eventually("the next job's record", Duration::from_secs(10), || async {
        match http_json(w.http, "GET", "/v1/jobs/next", None).await {
            (200, v) => Ok(v),
            (code, v) => Err(format!("{code} {v}")),
        }
    })
    .await;
    assert_eq!(
        http_json(w.http, "GET", "/v1/jobs/late", None).await,
        (200, released)
    );
    // A job with no record yet gets its `queued` one.
    let (code, v) = http_json(w.http, "GET", "/v1/jobs/first", None).await;
    assert_eq!(code, 200, "{v}");
}

/// A `WEIR_RELEASED` made without direct gets (by an older Weir, or by hand) has them turned
/// on at start, and released jobs are counted in it.
#[tokio::test]
async fn an_older_released_stream_gets_direct_gets() {
    use async_nats::jetstream::stream::{Config, StorageType};
    let env = Env::start().await;
    env.js
        .create_stream(Config {
            name: "WEIR_RELEASED".into(),
            subjects: vec!["released.>".into()],
            storage: StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .expect("create WEIR_RELEASED without allow_direct");
    let (w, sharq) = InProc::start_sharq(&env, TOML).await;
    let mut stream = env.js.get_stream("WEIR_RELEASED").await.expect("stream");
    assert!(stream.info().await.expect("info").config.allow_direct);
    enqueue(sharq, "/enqueue/sms/old/", "o1", 0).await;
    eventually("released and counted", Duration::from_secs(10), || async {
        let (_, job) = http_json(w.http, "GET", "/v1/jobs/o1", None).await;
        let (_, m) = http_json(sharq, "GET", "/metrics/sms/old/", None).await;
        match (job["state"].as_str(), m["queue_length"].as_u64()) {
            (Some("released"), Some(1)) => Ok(()),
            _ => Err(format!("{job} {m}")),
        }
    })
    .await;
}

/// A job deleted by `deletequeue` reads as purged, and enqueued again with the same id within
/// JetStream's duplicate window it is stored again and delivered: the delete must not turn the
/// second enqueue into a duplicate of a job that no longer exists. A third enqueue is a
/// duplicate again.
#[tokio::test]
async fn a_job_enqueued_again_after_deletequeue_is_delivered() {
    let (_env, w, sharq) = start().await;
    let state = |id: &'static str| async move {
        let (code, v) = http_json(w.http, "GET", &format!("/v1/jobs/{id}"), None).await;
        (code, v)
    };
    // The first takes the queue's one token; the second waits a minute, held; the third two,
    // beyond the 5 s horizon: parked.
    for job in ["first", "second", "third"] {
        let (code, v) = enqueue(sharq, "/enqueue/sms/again/", job, 60_000).await;
        assert_eq!(code, 201, "{v}");
    }
    eventually("the third parked", Duration::from_secs(10), || async {
        match state("third").await {
            (200, v) if v["state"] == "parked" => Ok(()),
            (code, v) => Err(format!("{code} {v}")),
        }
    })
    .await;
    let purge = json!({"purge_all": false});
    let (code, v) = http_json(sharq, "DELETE", "/deletequeue/sms/again/", Some(&purge)).await;
    assert_eq!((code, &v["status"]), (200, &json!("Success")), "{v}");
    // The parked job's record still says parked; the key's purge mark says what became of it.
    let (code, v) = state("third").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (&v["state"], &v["reason"]),
        (&json!("dead"), &json!("purged")),
        "{v}"
    );
    assert!(v["dead_at"].as_u64() >= v["parked_at"].as_u64(), "{v}");
    // The held one is recorded so by the partition that held it.
    eventually("the second purged", Duration::from_secs(10), || async {
        match state("second").await {
            (200, v) if v["state"] == "dead" && v["reason"] == "purged" => Ok(()),
            (code, v) => Err(format!("{code} {v}")),
        }
    })
    .await;

    // Again, with no interval now: released at once, and recorded as the new job.
    let (code, v) = enqueue(sharq, "/enqueue/sms/again/", "third", 0).await;
    assert_eq!((code, &v["status"]), (201, &json!("queued")), "{v}");
    let (code, v) = dequeue(sharq, "sms", 10_000).await;
    assert_eq!((code, &v["job_id"]), (200, &json!("third")), "{v}");
    eventually("the new job's record", Duration::from_secs(10), || async {
        match state("third").await {
            (200, v) if v["state"] == "dequeued" => Ok(()),
            (code, v) => Err(format!("{code} {v}")),
        }
    })
    .await;
    // The same job once more: a duplicate of the one enqueued after the purge.
    let (code, v) = enqueue(sharq, "/enqueue/sms/again/", "third", 0).await;
    assert_eq!((code, &v["status"]), (201, &json!("queued")), "{v}");
    let (code, v) = dequeue(sharq, "sms", 1_000).await;
    assert_eq!(code, 404, "stored once: {v}");
    // The held one, through a bulk enqueue.
    let bulk =
        json!({"jobs": [{"job_id": "second", "queue_id": "again", "payload": {}, "interval": 0}]});
    let (code, v) = http_json(sharq, "POST", "/enqueue/sms/bulk/", Some(&bulk)).await;
    assert_eq!((code, &v["queued"]), (200, &json!(1)), "{v}");
    let (code, v) = dequeue(sharq, "sms", 10_000).await;
    assert_eq!((code, &v["job_id"]), (200, &json!("second")), "{v}");
}
