//! The admin API against its own OpenAPI document, driven by schemathesis: generated requests
//! (valid and invalid) to every operation, reads and writes (with the admin token), and each
//! response checked: no 5xx, a status code the document lists, its content type, and its body
//! against the document's schema (so every 4xx is a JSON error as documented).
//!
//! schemathesis is a Python tool: `scripts/setup.sh` installs the pinned version and exports
//! `SCHEMATHESIS_BIN` (an existing one is honoured). Offline: it reads the document from the
//! repository and talks only to the Weir this test starts on 127.0.0.1.

mod common;

use std::time::Duration;

use common::*;

const TOKEN: &str = "schema-test-token";
/// The `job_id` example of openapi.json.
const JOB_ID: &str = "3f2a9c1e-5b7d-4e1a-9f00-1c2d3e4f5a6b";
const BASE: &str = "partitions = 2\n[limits.default]\nrate = \"50/s\"\nburst = 5\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_conforms_to_its_openapi_document() {
    let Some(bin) = std::env::var_os("SCHEMATHESIS_BIN") else {
        panic!("SCHEMATHESIS_BIN is not set: run `source scripts/setup.sh` first");
    };
    let env = Env::start().await;
    let weir = InProc::start(&env, &format!("admin_token = \"{TOKEN}\"\n{BASE}")).await;
    // Something to look at: a key with jobs held, so /v1/keys has entries.
    env.publish_all((0..20).map(|i| Job::seq("sms", "acme", i)), 32)
        .await;
    // And a job with the id of openapi.json's example, so GET /v1/jobs/{job_id} answers 200.
    let mut job = Job::seq("sms", "tracked", 0);
    let mut h = async_nats::header::HeaderMap::new();
    h.insert("Weir-Job-Id", JOB_ID);
    job.headers = Some(h);
    env.publish_all([job], 1).await;
    eventually(
        "the example job's status",
        Duration::from_secs(10),
        || async {
            match http_get(weir.http, &format!("/v1/jobs/{JOB_ID}")).await {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    let doc = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    let report = tempfile::tempdir().expect("temp dir");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["run", doc, "--url"])
        .arg(format!("http://{}", weir.http))
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "15",
            "--phases",
            "examples,coverage,fuzzing",
            "--seed",
            "1",
            "--generation-database",
            "none",
            "--request-timeout",
            "5",
            "--no-color",
        ])
        .current_dir(report.path())
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .kill_on_drop(true);
    let started = std::time::Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("schemathesis finishes within 2 minutes")
        .expect("run schemathesis");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("schemathesis took {:?}\n{text}", started.elapsed());
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
}
