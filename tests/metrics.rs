//! `/metrics` against a running Weir: the Prometheus exposition parses, and the figures move
//! as jobs flow (received, released, dead, the release-delay histogram). A producer's
//! `traceparent` reaches the released job.

mod common;

use std::time::Duration;

use async_nats::header::HeaderMap;
use bytes::Bytes;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_when_jobs_flow() {
    let env = Env::start().await;
    let weir = InProc::start(
        &env,
        "partitions = 2\n[limits.default]\nrate = \"1000/s\"\nburst = 100\n",
    )
    .await;
    let before = scrape(weir.http).await;
    assert_eq!(metric_total(&before, "weir_jobs_released_total"), 0.0);

    let collector = Collector::start(&env.client, "released.>").await;
    let mut jobs: Vec<Job> = (0..20)
        .map(|i| Job::seq(if i % 2 == 0 { "sms" } else { "email" }, "m", i))
        .collect();
    let mut h = HeaderMap::new();
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    h.insert("traceparent", parent);
    jobs.push(Job {
        subject: "jobs.sms.traced".into(),
        headers: Some(h),
        payload: Bytes::from_static(b"traced#0"),
    });
    jobs.push(Job {
        subject: "jobs.only-two-tokens".into(),
        headers: None,
        payload: Bytes::from_static(b"bad"),
    });
    env.publish_all(jobs, 64).await;
    let seen = collector.wait_for(21, Duration::from_secs(10)).await;
    let traced = seen
        .iter()
        .find(|s| s.header("Weir-Key") == Some("traced"))
        .expect("the traced job");
    // Tracing export is off here (no OTLP endpoint): the producer's context passes untouched.
    assert_eq!(traced.header("traceparent"), Some(parent));
    env.wait_stream_len("WEIR_DEAD", 1, Duration::from_secs(10))
        .await;

    let after = eventually("the metrics to move", Duration::from_secs(10), || async {
        let s = scrape(weir.http).await;
        let dead = metric_total(&s, "weir_jobs_dead_total");
        if metric_total(&s, "weir_jobs_released_total") >= 21.0 && dead >= 1.0 {
            Ok(s)
        } else {
            Err(format!(
                "released {}, dead {dead}",
                metric_total(&s, "weir_jobs_released_total")
            ))
        }
    })
    .await;
    assert!(metric_total(&after, "weir_jobs_received_total") >= 21.0);
    assert!(
        metric_total(&after, "weir_release_delay_milliseconds") >= 21.0,
        "delay histogram"
    );
    let by_dest: Vec<_> = after
        .samples
        .iter()
        .filter(|x| x.metric == "weir_jobs_released_total")
        .map(|x| {
            x.labels
                .get("messaging_destination_name")
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(
        by_dest.iter().any(|d| d == "sms") && by_dest.iter().any(|d| d == "email"),
        "{by_dest:?}"
    );
    assert!(
        after
            .samples
            .iter()
            .all(|x| x.labels.get("weir_key").is_none()),
        "no per-key label by default"
    );
}
