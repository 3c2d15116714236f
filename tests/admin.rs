//! The operator's API and CLI against a real nats-server: limits, keys, purge, auth, errors, the
//! OpenAPI document, and `weir limits|status|top` as subprocesses.
//!
//! Limit changes reach the partitions through the bucket watcher, so checks on their effect
//! wait for them (`eventually`), never for a fixed time.

mod common;

use std::time::Duration;

use axum::http::Method;
use serde_json::{json, Value};
use weir::cli::http::AdminClient;

use common::*;

const RELEASED: &str = "WEIR_RELEASED";
const BASE: &str = "partitions = 4\n[limits.default]\nrate = \"1000/s\"\nburst = 100\n";
const TOKEN: &str = "t0ken-for-tests";

/// The admin API of an in-process Weir.
struct Api {
    client: AdminClient,
}

impl Api {
    fn of(weir: &InProc) -> Api {
        Api {
            client: AdminClient::new(&format!("http://{}", weir.http)).expect("admin url"),
        }
    }

    /// A request with an optional JSON body and token: `(status, JSON body)`. Every answer of
    /// the API is JSON, errors included; this panics otherwise.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let a = self
            .client
            .request(method.clone(), path, body.as_ref(), token)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let v: Value = serde_json::from_str(&a.body).unwrap_or_else(|e| {
            panic!(
                "{method} {path}: {} is not JSON ({e}): {}",
                a.status, a.body
            )
        });
        (a.status, v)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, None, None).await
    }

    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(Method::PUT, path, Some(body), None).await
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        self.call(Method::DELETE, path, None, None).await
    }

    /// PUT that must succeed; returns the stored entry.
    async fn set(&self, path: &str, body: Value) -> Value {
        let (code, v) = self.put(path, body).await;
        assert_eq!(code, 200, "PUT {path}: {v}");
        v
    }

    /// Waits until `GET /v1/keys/{key}` shows `limit` (rate, burst, source).
    async fn wait_limit(&self, key: &str, rate: &str, burst: u64, source: &str) -> Value {
        let path = format!("/v1/keys/{key}");
        eventually(
            &format!("{key} to get {rate} burst {burst} from {source}"),
            Duration::from_secs(10),
            || async {
                let (code, v) = self.get(&path).await;
                let l = &v["limit"];
                if code == 200 && l["rate"] == rate && l["burst"] == burst && l["source"] == source
                {
                    Ok(v)
                } else {
                    Err(format!("{code} {v}"))
                }
            },
        )
        .await
    }
}

/// Asserts an error answer: the status, JSON `{"error": ...}` only, and words the message must hold.
fn assert_error(what: &str, (code, v): (u16, Value), want: u16, words: &[&str]) {
    assert_eq!(code, want, "{what}: {v}");
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error message: {v}"));
    assert_eq!(
        v.as_object().map(|o| o.len()),
        Some(1),
        "{what}: only `error`: {v}"
    );
    for w in words {
        assert!(
            msg.contains(w),
            "{what}: the message should mention {w:?}: {msg}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_crud_through_the_api() {
    let env = Env::start().await;
    let weir = InProc::start(
        &env,
        &format!("{BASE}[limits.keys.seeded]\nrate = \"5/s\"\n"),
    )
    .await;
    let api = Api::of(&weir);

    let (code, v) = api.get("/healthz").await;
    assert_eq!((code, &v["status"]), (200, &json!("ok")));
    let (code, v) = api.get("/openapi.json").await;
    assert_eq!(code, 200);
    assert_eq!(
        v,
        serde_json::from_str::<Value>(weir::admin::OPENAPI).unwrap()
    );

    // Seeded from the config file.
    let (code, v) = api.get("/v1/limits").await;
    assert_eq!(code, 200, "{v}");
    let kinds: Vec<(String, String)> = v["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["kind"].as_str().unwrap().into(),
                l["name"].as_str().unwrap_or("-").into(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("default".into(), "-".into()),
            ("key".into(), "seeded".into())
        ]
    );
    let (code, v) = api.get("/v1/limits/default").await;
    assert_eq!(
        (code, &v["rate"], &v["burst"]),
        (200, &json!("1000/s"), &json!(100)),
        "{v}"
    );

    let key = api
        .set("/v1/limits/keys/acme", json!({"rate": "40/s", "burst": 10}))
        .await;
    assert_eq!(key["kind"], "key");
    assert_eq!(key["name"], "acme");
    assert_eq!(
        (&key["rate"], &key["burst"], &key["paused"]),
        (&json!("40/s"), &json!(10), &json!(false))
    );
    let rev = key["revision"].as_u64().expect("a revision");
    let (code, got) = api.get("/v1/limits/keys/acme").await;
    assert_eq!((code, &got), (200, &key));

    let dest = api
        .set(
            "/v1/limits/destinations/carrier-x",
            json!({"rate": "500/s", "burst": 50}),
        )
        .await;
    assert_eq!(
        (&dest["kind"], &dest["name"]),
        (&json!("destination"), &json!("carrier-x"))
    );
    assert_eq!(
        api.get("/v1/limits/destinations/carrier-x").await,
        (200, dest)
    );

    let pat = api
        .set(
            "/v1/limits/patterns/gold",
            json!({"pattern": "gold-*", "rate": "100/s"}),
        )
        .await;
    assert_eq!(
        (&pat["pattern"], &pat["burst"]),
        (&json!("gold-*"), &json!(1)),
        "the burst defaults to 1"
    );
    assert_eq!(api.get("/v1/limits/patterns/gold").await, (200, pat));

    let def = api.set("/v1/limits/default", json!({"rate": "20/s"})).await;
    assert_eq!(def["kind"], "default");
    assert!(def.get("name").is_none(), "{def}");
    let last = def["revision"].as_u64().unwrap();
    assert!(last > rev);
    assert_eq!(api.get("/v1/limits/default").await, (200, def));

    // The listing, and this process applying the newest revision.
    eventually(
        "the newest revision applied",
        Duration::from_secs(10),
        || async {
            let (_, v) = api.get("/v1/limits").await;
            match v["applied_revision"].as_u64() {
                Some(r) if r >= last => Ok(()),
                _ => Err(v.to_string()),
            }
        },
    )
    .await;
    let (_, v) = api.get("/v1/limits").await;
    let names: Vec<&str> = v["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap_or("default"))
        .collect();
    assert_eq!(
        names,
        ["default", "carrier-x", "acme", "seeded", "gold"],
        "bucket-key order: {v}"
    );

    // A rate of zero pauses.
    let paused = api
        .set("/v1/limits/keys/acme", json!({"rate": "0/s"}))
        .await;
    assert_eq!(paused["paused"], true);

    // Deletes, then nothing there.
    for path in [
        "/v1/limits/keys/acme",
        "/v1/limits/destinations/carrier-x",
        "/v1/limits/patterns/gold",
    ] {
        let (code, v) = api.delete(path).await;
        assert_eq!(
            (code, &v["deleted"]),
            (200, &json!(true)),
            "DELETE {path}: {v}"
        );
        assert_error(
            &format!("GET {path} after DELETE"),
            api.get(path).await,
            404,
            &["no "],
        );
        assert_error(
            &format!("DELETE {path} again"),
            api.delete(path).await,
            404,
            &["no "],
        );
    }
    assert_error(
        "a key without a limit of its own",
        api.get("/v1/limits/keys/acme").await,
        404,
        &[
            "no limit stored for key \"acme\"",
            "from default",
            "PUT /v1/limits/keys/acme",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_status_shows_the_effective_limit_and_pattern_precedence() {
    let env = Env::start().await;
    let weir = InProc::start(&env, BASE).await;
    let api = Api::of(&weir);
    // One released job each gives Weir a trace of the keys.
    let keys = ["acme", "gold-eu-1", "gold-us-1"];
    env.publish_all(keys.iter().map(|k| Job::seq("sms", k, 0)), 8)
        .await;
    env.wait_stream_len(RELEASED, 3, Duration::from_secs(10))
        .await;

    let v = api.wait_limit("acme", "1000/s", 100, "default").await;
    assert_eq!(v["key"], "acme");
    assert_eq!(v["partition"], predicted_partition("acme", 4));
    assert_eq!(
        (&v["released_stored"], &v["dead"], &v["backlog"]),
        (&json!(1), &json!(0), &json!(0)),
        "{v}"
    );
    assert_eq!(
        (&v["held"], &v["parked"], &v["paused"]),
        (&json!(0), &json!(0), &json!(false)),
        "{v}"
    );
    assert!(v["next_release_at"].is_null(), "{v}");

    api.set("/v1/limits/keys/acme", json!({"rate": "40/s", "burst": 10}))
        .await;
    api.wait_limit("acme", "40/s", 10, "key").await;

    api.set(
        "/v1/limits/patterns/gold",
        json!({"pattern": "gold-*", "rate": "100/s"}),
    )
    .await;
    api.set(
        "/v1/limits/patterns/goldeu",
        json!({"pattern": "gold-eu-*", "rate": "60/s", "burst": 3}),
    )
    .await;
    api.wait_limit("gold-eu-1", "60/s", 3, "pattern:goldeu")
        .await;
    api.wait_limit("gold-us-1", "100/s", 1, "pattern:gold")
        .await;
    // An exact key beats the longest pattern; deleting it falls back to the pattern.
    api.set("/v1/limits/keys/gold-eu-1", json!({"rate": "1/s"}))
        .await;
    api.wait_limit("gold-eu-1", "1/s", 1, "key").await;
    assert_eq!(api.delete("/v1/limits/keys/gold-eu-1").await.0, 200);
    api.wait_limit("gold-eu-1", "60/s", 3, "pattern:goldeu")
        .await;
    // The default moves keys without a limit of their own.
    api.set("/v1/limits/default", json!({"rate": "7/s"})).await;
    api.set("/v1/limits/keys/plain", json!({"rate": "2/s"}))
        .await;
    assert_eq!(api.delete("/v1/limits/keys/plain").await.0, 200);
    env.publish_all([Job::seq("sms", "plain", 0)], 1).await;
    env.wait_stream_len(RELEASED, 4, Duration::from_secs(10))
        .await;
    api.wait_limit("plain", "7/s", 1, "default").await;

    assert_error(
        "an unknown key",
        api.get("/v1/keys/nobody").await,
        404,
        &["no trace of key \"nobody\""],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busiest_keys_and_purge() {
    let env = Env::start().await;
    let weir = InProc::start(&env, BASE).await;
    let api = Api::of(&weir);
    let (code, v) = api.get("/v1/keys").await;
    assert_eq!(
        (code, &v["sort"], &v["limit"]),
        (200, &json!("backlog"), &json!(50)),
        "defaults: {v}"
    );

    // A paused key keeps everything it is sent.
    api.set("/v1/limits/keys/slow", json!({"rate": "0/s"}))
        .await;
    api.wait_limit_applied().await;
    env.publish_all((0..50).map(|i| Job::seq("sms", "slow", i)), 64)
        .await;
    env.publish_all((0..5).map(|i| Job::seq("sms", "busy", i)), 8)
        .await;
    let v = eventually("slow's backlog of 50", Duration::from_secs(10), || async {
        let (code, v) = api.get("/v1/keys?sort=backlog&limit=10").await;
        if code == 200 && v["keys"][0]["key"] == "slow" && v["keys"][0]["backlog"] == 50 {
            Ok(v)
        } else {
            Err(format!("{code} {v}"))
        }
    })
    .await;
    let top = &v["keys"][0];
    assert_eq!(
        (
            &top["paused"],
            &top["limit"]["rate"],
            &top["limit"]["source"]
        ),
        (&json!(true), &json!("0/s"), &json!("key")),
        "{v}"
    );
    assert_eq!(
        top["held"].as_u64().unwrap() + top["parked"].as_u64().unwrap(),
        50,
        "{v}"
    );
    let (code, one) = api.get("/v1/keys?limit=1").await;
    assert_eq!(
        (code, one["keys"].as_array().map(Vec::len)),
        (200, Some(1)),
        "{one}"
    );
    let (code, k) = api.get("/v1/keys/slow").await;
    assert_eq!(
        (code, &k["backlog"], &k["paused"], &k["released_stored"]),
        (200, &json!(50), &json!(true), &json!(0)),
        "{k}"
    );

    let (code, p) = api.delete("/v1/keys/slow/jobs").await;
    assert_eq!(code, 200, "{p}");
    assert_eq!(p["key"], "slow");
    let [held, parked, queued] = ["held", "parked", "queued"].map(|f| p[f].as_u64().unwrap());
    let total = p["total"].as_u64().unwrap();
    assert_eq!(held + parked + queued, total, "{p}");
    // Each job counted once: a held job read back from the park (still stored there until it
    // is released) as parked only, a fresh held one (acked, and confirmed, before WEIR_JOBS is
    // purged) as held only.
    assert_eq!(total, 50, "{p}");

    // Unpause and send a marker: a key's jobs leave in order, so any purged job that survived
    // would be released before it.
    api.set(
        "/v1/limits/keys/slow",
        json!({"rate": "1000/s", "burst": 100}),
    )
    .await;
    env.publish_all([Job::seq("sms", "slow", 999)], 1).await;
    let released = eventually("the marker released", Duration::from_secs(10), || async {
        let got = released_payloads(&env, "slow").await;
        if got.iter().any(|p| p == "slow#999") {
            Ok(got)
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await;
    assert_eq!(
        released,
        ["slow#999"],
        "only the marker may come out after the purge"
    );
    assert_eq!(env.stream_len("WEIR_PARK").await, 0);
}

/// A purge while a key's jobs pour in takes every job stored before it began, including those
/// JetStream had already delivered to the partition but the partition had not read: what
/// survives is a suffix of the key's jobs, never a job with older ones purged around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_during_a_flood_leaves_only_a_suffix() {
    purge_during_a_flood(json!({"rate": "0/s"})).await;
}

/// The same for a key that keeps releasing (and reading its parked jobs back) meanwhile:
/// its jobs released before the purge, the purged ones, then the survivors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_of_a_releasing_key_during_a_flood_leaves_only_a_suffix() {
    purge_during_a_flood(json!({"rate": "500/s", "burst": 20})).await;
}

/// The payloads of `key`'s jobs in `WEIR_RELEASED`.
async fn released_payloads(env: &Env, key: &str) -> Vec<String> {
    read_stream(&env.js, RELEASED, &format!("released.*.{key}"))
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect()
}

/// Floods key `flood` (limited by `limit`) with 10,000 jobs, purges it once it has a backlog
/// of 1,000, releases the rest at once and checks that the released jobs are at most two runs:
/// those released before the purge (from job 0), and the survivors (to the last).
async fn purge_during_a_flood(limit: Value) {
    const N: usize = 10_000;
    let env = Env::start().await;
    let weir = InProc::start(&env, BASE).await;
    let api = Api::of(&weir);
    api.set("/v1/limits/keys/flood", limit).await;
    api.wait_limit_applied().await;
    let flood = env.publish_all((0..N).map(|i| Job::seq("sms", "flood", i)), 8);
    let purge = async {
        eventually("a backlog to purge", Duration::from_secs(20), || async {
            let (_, k) = api.get("/v1/keys/flood").await;
            match k["backlog"].as_u64() {
                Some(b) if b >= 1_000 => Ok(()),
                _ => Err(k.to_string()),
            }
        })
        .await;
        let (code, p) = api.delete("/v1/keys/flood/jobs").await;
        assert_eq!(code, 200, "{p}");
        p
    };
    let (_, purged) = tokio::join!(flood, purge);
    env.publish_all([Job::seq("sms", "flood", N)], 1).await;
    api.set(
        "/v1/limits/keys/flood",
        json!({"rate": "100000/s", "burst": 1000}),
    )
    .await;
    let marker = format!("flood#{N}");
    let released = eventually("the marker released", Duration::from_secs(30), || async {
        let got = released_payloads(&env, "flood").await;
        if got.contains(&marker) {
            Ok(got)
        } else {
            Err(format!("{} released", got.len()))
        }
    })
    .await;
    let mut idx: Vec<usize> = released
        .iter()
        .map(|p| p.trim_start_matches("flood#").parse().unwrap())
        .collect();
    idx.sort_unstable();
    let gaps: Vec<(usize, usize)> = idx
        .windows(2)
        .filter(|w| w[1] != w[0] + 1)
        .map(|w| (w[0], w[1]))
        .collect();
    let before = match gaps.first() {
        Some(&(last_before, _)) if idx[0] == 0 => last_before + 1,
        _ => 0,
    };
    let runs_ok = match gaps.len() {
        0 => idx[0] > 0,
        1 => idx[0] == 0,
        _ => false,
    };
    assert!(
        runs_ok && idx.last() == Some(&N),
        "after purging {purged}: {} released, not a prefix and a suffix of the key's jobs; first {}, {before} released before the purge, gaps {:?}",
        idx.len(),
        idx[0],
        &gaps[..gaps.len().min(10)]
    );
    // No job released twice.
    let unique: std::collections::HashSet<&usize> = idx.iter().collect();
    assert_eq!(unique.len(), idx.len(), "a job released twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_the_token_reads_do_not() {
    let env = Env::start().await;
    let weir = InProc::start(&env, &format!("admin_token = \"{TOKEN}\"\n{BASE}")).await;
    let api = Api::of(&weir);
    let body = || Some(json!({"rate": "40/s"}));
    let writes = [
        (Method::PUT, "/v1/limits/keys/acme"),
        (Method::PUT, "/v1/limits/default"),
        (Method::DELETE, "/v1/limits/keys/acme"),
        (Method::DELETE, "/v1/keys/acme/jobs"),
    ];
    for (m, path) in &writes {
        let b = (*m == Method::PUT).then(body).flatten();
        let none = api.call(m.clone(), path, b.clone(), None).await;
        assert_error(
            &format!("{m} {path} without a token"),
            none,
            401,
            &["Authorization: Bearer"],
        );
        let wrong = api
            .call(m.clone(), path, b.clone(), Some("not-the-token"))
            .await;
        assert_error(
            &format!("{m} {path} with a wrong token"),
            wrong.clone(),
            401,
            &["not the admin_token"],
        );
        assert!(
            !wrong.1.to_string().contains(TOKEN),
            "the answer must not reveal the token"
        );
    }
    // The right token, in the order that leaves each write something to do.
    for (m, path) in [&writes[0], &writes[1], &writes[2], &writes[3]] {
        let b = (*m == Method::PUT).then(body).flatten();
        let (code, v) = api.call(m.clone(), path, b, Some(TOKEN)).await;
        assert_eq!(code, 200, "{m} {path} with the token: {v}");
    }
    // Reads stay open.
    for path in [
        "/v1/limits",
        "/v1/limits/default",
        "/v1/keys",
        "/readyz",
        "/openapi.json",
    ] {
        assert_eq!(api.get(path).await.0, 200, "GET {path} without a token");
    }
    // An unknown path or a wrong method is answered as such, token or not.
    assert_eq!(api.call(Method::PUT, "/v1/nope", body(), None).await.0, 404);
    assert_eq!(
        api.call(Method::PUT, "/v1/keys/acme", body(), None).await.0,
        405
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_and_nats_failures_503() {
    let mut env = Env::start().await;
    let weir = InProc::start(&env, BASE).await;
    let api = Api::of(&weir);
    let raw = |ct: Option<&'static str>, body: &'static str| {
        let c = api.client.clone();
        async move {
            let a = c
                .request_raw(
                    Method::PUT,
                    "/v1/limits/keys/acme",
                    ct,
                    body.as_bytes().to_vec(),
                    None,
                )
                .await
                .expect("answer");
            (
                a.status,
                serde_json::from_str::<Value>(&a.body)
                    .unwrap_or_else(|e| panic!("{e}: {}", a.body)),
            )
        }
    };
    let json_ct = Some("application/json");
    assert_error(
        "bad JSON",
        raw(json_ct, "{not json").await,
        400,
        &["not valid JSON", "\"rate\": \"40/s\""],
    );
    assert_error(
        "no content type",
        raw(None, r#"{"rate": "1/s"}"#).await,
        415,
        &["Content-Type: application/json"],
    );
    assert_error(
        "not a limit",
        raw(json_ct, "[1, 2]").await,
        400,
        &["not a limit"],
    );
    assert_error(
        "no rate",
        raw(json_ct, r#"{"burst": 3}"#).await,
        400,
        &["rate"],
    );
    for (path, body, words) in [
        (
            "/v1/limits/keys/acme",
            json!({"rate": "fast"}),
            &["`rate` = \"fast\"", "e.g."][..],
        ),
        ("/v1/limits/keys/acme", json!({"rate": "1e99/s"}), &["rate"]),
        (
            "/v1/limits/keys/acme",
            json!({"rate": "5/s", "burst": 0}),
            &["`burst` = 0", "1 to 1000000"],
        ),
        (
            "/v1/limits/keys/acme",
            json!({"rate": "5/s", "burst": "ten"}),
            &["burst"],
        ),
        (
            "/v1/limits/keys/acme",
            json!({"rate": "5/s", "colour": 1}),
            &["colour"],
        ),
        (
            "/v1/limits/keys/acme",
            json!({"rate": "5/s", "pattern": "x*"}),
            &["`pattern` is only for"],
        ),
        (
            "/v1/limits/patterns/p",
            json!({"rate": "5/s"}),
            &["needs \"pattern\""],
        ),
        (
            "/v1/limits/patterns/p",
            json!({"rate": "5/s", "pattern": "a.b"}),
            &["`pattern` = \"a.b\""],
        ),
        (
            "/v1/limits/keys/a%20b",
            json!({"rate": "5/s"}),
            &["key \"a b\"", "whitespace"],
        ),
        (
            "/v1/limits/destinations/x%3E",
            json!({"rate": "5/s"}),
            &["destination \"x>\""],
        ),
        (
            "/v1/limits/patterns/a.b",
            json!({"pattern": "a*", "rate": "5/s"}),
            &["pattern \"a.b\""],
        ),
    ] {
        assert_error(
            &format!("PUT {path} {body}"),
            api.put(path, body.clone()).await,
            400,
            words,
        );
    }
    assert_eq!(
        api.get("/v1/limits/keys/acme").await.0,
        404,
        "nothing refused was stored"
    );
    for (path, words) in [
        ("/v1/keys/%2A", &["key \"*\""][..]),
        ("/v1/keys/a.b", &["key \"a.b\""]),
        ("/v1/keys?sort=size", &["sort=backlog"]),
        ("/v1/keys?limit=0", &["1 to 1000"]),
        ("/v1/keys?limit=1001", &["1 to 1000"]),
        ("/v1/keys?limit=many", &["limit=\"many\""]),
        (
            "/v1/keys?colour=red",
            &["unknown query parameter \"colour\""],
        ),
    ] {
        assert_error(&format!("GET {path}"), api.get(path).await, 400, words);
    }
    assert_error(
        "purge a bad key",
        api.delete("/v1/keys/%3E/jobs").await,
        400,
        &["key \">\""],
    );
    assert_error(
        "unknown path",
        api.get("/v2/nothing").await,
        404,
        &["no such path /v2/nothing", "/openapi.json"],
    );
    assert_error(
        "unknown limit",
        api.get("/v1/limits/patterns/nope").await,
        404,
        &["no pattern named \"nope\""],
    );
    assert_error(
        "unknown destination",
        api.get("/v1/limits/destinations/d").await,
        404,
        &["destination \"d\""],
    );
    assert_error(
        "unknown key",
        api.delete("/v1/limits/keys/nobody").await,
        404,
        &["key \"nobody\""],
    );
    assert_error(
        "wrong method",
        api.call(Method::POST, "/v1/limits", None, None).await,
        405,
        &["POST is not allowed on /v1/limits"],
    );
    assert_error(
        "no DELETE on the default",
        api.delete("/v1/limits/default").await,
        405,
        &["DELETE"],
    );

    // NATS away: reads of the bucket fail with 503 and a JSON reason; /healthz stays up.
    env.nats.kill();
    eventually("a 503 without NATS", Duration::from_secs(30), || async {
        match api.get("/v1/limits").await {
            (503, v) if v["error"].as_str().is_some_and(|e| e.contains("NATS")) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(api.get("/healthz").await.0, 200);
}

/// Every documented operation is routed, and every other method on a documented path is a 405.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_router() {
    let env = Env::start().await;
    let weir = InProc::start(&env, BASE).await;
    let api = Api::of(&weir);
    let doc: Value = serde_json::from_str(weir::admin::OPENAPI).unwrap();
    let methods = [
        Method::GET,
        Method::PUT,
        Method::POST,
        Method::DELETE,
        Method::PATCH,
    ];
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{key}", "probe")
            .replace("{dest}", "probe")
            .replace("{name}", "probe");
        for m in &methods {
            let body = (*m == Method::PUT).then(|| json!({"rate": "5/s", "pattern": "probe-*"}));
            let (code, v) = api.call(m.clone(), &concrete, body, None).await;
            let documented = ops.get(m.as_str().to_lowercase()).is_some();
            let unrouted = code == 405
                || (code == 404
                    && v["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("no such path")));
            assert_eq!(!unrouted, documented, "{m} {path}: {code} {v}");
            if !documented {
                assert_eq!(code, 405, "{m} {path}: {v}");
            }
        }
    }
}

/// Runs `weir <args>` with the environment cleared of Weir's variables plus `env`.
async fn weir(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_weir"));
    c.args(args)
        .env_remove("WEIR_NATS_URL")
        .env_remove("WEIR_ADMIN_URL")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), c.output())
        .await
        .unwrap_or_else(|_| panic!("weir {args:?} did not finish"))
        .expect("run weir");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_cli_against_nats() {
    let env = Env::start().await;
    let weir_run = InProc::start(&env, BASE).await;
    let url = env.url();
    let limits = |args: &[&str]| {
        let mut all = vec!["limits", "--nats-url", &url];
        all.extend_from_slice(args);
        all.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| async move {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        weir(&a, &[]).await
    };

    let (code, out, err) = run(limits(&[
        "set", "key", "acme", "--rate", "40/s", "--burst", "10",
    ]))
    .await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("KIND") && lines[0].contains("REVISION"),
        "{out}"
    );
    assert_eq!(
        lines[1].split_whitespace().take(5).collect::<Vec<_>>(),
        ["key", "acme", "-", "40/s", "10"],
        "{out}"
    );
    for args in [
        &[
            "set", "pattern", "gold", "--match", "gold-*", "--rate", "100/s",
        ][..],
        &[
            "set",
            "destination",
            "carrier-x",
            "--rate",
            "500/s",
            "--burst",
            "50",
        ],
        &["set", "default", "--rate", "20/s"],
    ] {
        let (code, _, err) = run(limits(args)).await;
        assert_eq!(code, 0, "{args:?}: {err}");
    }

    let (code, out, err) = run(limits(&["get", "key", "acme", "--json"])).await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(
        (&v["rate"], &v["burst"], &v["kind"]),
        (&json!("40/s"), &json!(10), &json!("key")),
        "{v}"
    );
    // The API reads the same bucket.
    let api = Api::of(&weir_run);
    assert_eq!(
        api.get("/v1/limits/keys/acme").await.1["revision"],
        v["revision"]
    );

    let (code, out, err) = run(limits(&["list"])).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "header and four limits: {out}");
    let rate_col = lines[0].find("RATE").unwrap();
    for l in &lines[1..] {
        assert!(
            l[rate_col..].starts_with(|c: char| c.is_ascii_digit()),
            "the RATE column lines up: {out}"
        );
    }
    assert!(
        out.contains("gold-*") && out.contains("carrier-x") && out.contains("500/s"),
        "{out}"
    );
    let (_, out, _) = run(limits(&["list", "--json"])).await;
    let all: Vec<Value> = serde_json::from_str(&out).expect("a JSON array");
    let kinds: Vec<&str> = all.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["default", "destination", "key", "pattern"], "{out}");

    let (code, out, err) = run(limits(&["delete", "key", "acme"])).await;
    assert_eq!(
        (code, out.trim()),
        (0, "deleted the limit of key \"acme\""),
        "{err}"
    );
    let (code, _, err) = run(limits(&["get", "key", "acme"])).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no limit stored for key \"acme\""), "{err}");

    // The environment names NATS too.
    let (code, out, err) = weir(&["limits", "get", "default"], &[("WEIR_NATS_URL", &url)]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("20/s"), "{out}");

    // Bad input: exit 64 with the reason, before NATS is asked.
    for (args, words) in [
        (
            &["set", "key", "acme", "--rate", "fast"][..],
            &["rate", "e.g."][..],
        ),
        (
            &["set", "key", "acme", "--rate", "1/s", "--burst", "0"],
            &["burst"],
        ),
        (&["set", "key", "a b", "--rate", "1/s"], &["key \"a b\""]),
        (&["set", "pattern", "p", "--rate", "1/s"], &["--match"]),
        (
            &["set", "pattern", "p", "--match", "a.b", "--rate", "1/s"],
            &["pattern"],
        ),
        (&["frob"], &["frob"]),
    ] {
        let (code, _, err) = run(limits(args)).await;
        assert_eq!(code, 64, "{args:?}: {err}");
        for w in words {
            assert!(
                err.contains(w),
                "{args:?}: the message should mention {w}: {err}"
            );
        }
    }
    // NATS unreachable: 69.
    let nowhere = format!("nats://{}", free_addr());
    let (code, _, err) = weir(&["limits", "list", "--nats-url", &nowhere], &[]).await;
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("cannot connect to NATS"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_top_cli_against_the_admin_api() {
    let env = Env::start().await;
    let weir_run = InProc::start(&env, BASE).await;
    let api = Api::of(&weir_run);
    let admin = format!("http://{}", weir_run.http);

    api.set("/v1/limits/keys/hot", json!({"rate": "0/s"})).await;
    api.wait_limit_applied().await;
    env.publish_all((0..20).map(|i| Job::seq("sms", "hot", i)), 32)
        .await;
    eventually("hot's backlog of 20", Duration::from_secs(10), || async {
        let (_, v) = api.get("/v1/keys/hot").await;
        if v["backlog"] == 20 {
            Ok(())
        } else {
            Err(v.to_string())
        }
    })
    .await;

    let (code, out, err) = weir(&["status", "--admin-url", &admin], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!(
            "weir at {admin}: ready (NATS connected, 4 of 4 partitions bound)"
        )),
        "{out}"
    );
    assert!(out.contains("1 member(s), group mode:"), "{out}");
    let me = out
        .lines()
        .find(|l| l.contains("(this one)"))
        .unwrap_or_else(|| panic!("a row for this member: {out}"));
    assert!(me.trim_end().ends_with("4  0-3"), "{me}");
    assert!(out.contains("PARTITION  OWNER"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("hot "))
        .unwrap_or_else(|| panic!("a row for hot: {out}"));
    assert_eq!(row.split_whitespace().nth(1), Some("20"), "{out}");
    assert!(
        row.contains("0/s burst 1") && row.contains("paused"),
        "{row}"
    );

    let (code, out, err) = weir(&["status", "hot"], &[("WEIR_ADMIN_URL", &admin)]).await;
    assert_eq!(code, 0, "{err}");
    for want in [
        "key           hot",
        "limit         0/s burst 1 (from key)",
        "backlog       20 (held",
        "next release  paused",
    ] {
        assert!(out.contains(want), "{want:?} in {out}");
    }
    let (code, out, _) = weir(&["status", "hot", "--json", "--admin-url", &admin], &[]).await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["backlog"], 20);

    let (code, _, err) = weir(&["status", "nobody", "--admin-url", &admin], &[]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no trace of key \"nobody\""), "{err}");
    let (code, _, err) = weir(
        &["status", "--admin-url", &format!("http://{}", free_addr())],
        &[],
    )
    .await;
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("cannot reach the admin API"), "{err}");

    // A key releasing at its rate, for top's rates: 200 jobs at 20/s keep it busy for 10 s.
    api.set("/v1/limits/keys/warm", json!({"rate": "20/s"}))
        .await;
    api.wait_limit_applied().await;
    env.publish_all((0..200).map(|i| Job::seq("sms", "warm", i)), 64)
        .await;
    eventually(
        "warm's 200 jobs taken in",
        Duration::from_secs(10),
        || async {
            let (_, v) = api.get("/v1/keys/warm").await;
            let (backlog, released) = (v["backlog"].as_u64(), v["released_stored"].as_u64());
            if backlog.zip(released).map(|(b, r)| b + r) == Some(200) && backlog >= Some(100) {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    )
    .await;
    let args = [
        "top",
        "--once",
        "--interval-ms",
        "1000",
        "--admin-url",
        &admin,
    ];
    let (code, out, err) = weir(&args, &[]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with(&format!("weir top: {admin}, 2 busiest keys")),
        "{out}"
    );
    assert!(
        lines[2].starts_with("KEY")
            && lines[2].contains("OFFERED/S")
            && lines[2].contains("RELEASED/S"),
        "{out}"
    );
    let row = |key: &str| -> Vec<String> {
        let line = lines[3..]
            .iter()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("a row for {key}: {out}"));
        line.split_whitespace().map(str::to_string).collect()
    };
    // KEY, LIMIT (3 words), FROM, OFFERED/S, RELEASED/S, BACKLOG, HELD, PARKED, NEXT RELEASE
    let hot = row("hot");
    assert_eq!(
        (&hot[4][..], &hot[5][..], &hot[6][..], &hot[7][..]),
        ("key", "0.0", "0.0", "20"),
        "{out}"
    );
    assert_eq!(hot.last().map(String::as_str), Some("paused"), "{out}");
    let warm = row("warm");
    assert_eq!(
        (&warm[1][..], &warm[4][..], &warm[5][..]),
        ("20/s", "key", "0.0"),
        "{out}"
    );
    let released: f64 = warm[6].parse().expect("released/s is a number");
    assert!(
        (12.0..=28.0).contains(&released),
        "warm releases at about 20/s: {out}"
    );
}

impl Api {
    /// Waits until this process applied every limit stored so far.
    async fn wait_limit_applied(&self) {
        let (_, v) = self.get("/v1/limits").await;
        let newest = v["limits"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l["revision"].as_u64())
            .max()
            .unwrap_or(0);
        eventually(
            "the newest limit applied",
            Duration::from_secs(10),
            || async {
                let (_, v) = self.get("/v1/limits").await;
                if v["applied_revision"].as_u64() >= Some(newest) {
                    Ok(())
                } else {
                    Err(v.to_string())
                }
            },
        )
        .await;
    }
}
