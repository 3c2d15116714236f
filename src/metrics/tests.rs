use std::collections::BTreeSet;

use prometheus_parse::{Sample, Scrape, Value};

use super::*;

fn scrape(m: &Metrics) -> Scrape {
    let text = m.render();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid exposition")
}

/// The value of the one sample of `name` whose labels include `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<&Sample> = s
        .samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect();
    assert!(found.len() <= 1, "{name} {labels:?}: {found:?}");
    found.first().map(|x| match &x.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{name}: not a number: {other:?}"),
    })
}

/// Records one of everything, on two partitions.
fn one_of_everything() -> Metrics {
    let m = Metrics::prometheus_only("weir-test").expect("metrics");
    let mut p0 = m.partition(0);
    let mut p1 = m.partition(1);
    p0.received("sms");
    p0.received("sms");
    p1.received("sms");
    p0.received("email");
    p0.released("sms", 1_500);
    p0.parked("email");
    p0.dead("sms", "bad_token");
    p1.dead("", "bad_subject");
    p0.throttled();
    p1.duplicate();
    p0.set_backlog(7, 3);
    p0.set_consumer_lag(42);
    p1.set_backlog(1, 0);
    m.limit_update_applied("key");
    m.limit_update_applied("key");
    m.limit_update_applied("default");
    m.limit_update_rejected();
    m.enable_top_keys(2);
    m.set_top_keys(vec![("a".into(), 5), ("b".into(), 9), ("c".into(), 1)]);
    m
}

#[test]
fn values_move() {
    let m = one_of_everything();
    let s = scrape(&m);
    let sms = [
        ("messaging_system", "nats"),
        ("messaging_destination_name", "sms"),
    ];
    let email = [("messaging_destination_name", "email")];
    assert_eq!(value(&s, "weir_jobs_received_total", &sms), Some(3.0));
    assert_eq!(value(&s, "weir_jobs_received_total", &email), Some(1.0));
    assert_eq!(value(&s, "weir_jobs_released_total", &sms), Some(1.0));
    assert_eq!(value(&s, "weir_jobs_parked_total", &email), Some(1.0));
    let dead = |dest, reason| {
        value(
            &s,
            "weir_jobs_dead_total",
            &[
                ("messaging_destination_name", dest),
                ("weir_dead_reason", reason),
            ],
        )
    };
    assert_eq!(dead("sms", "bad_token"), Some(1.0));
    assert_eq!(dead(UNKNOWN_DESTINATION, "bad_subject"), Some(1.0));
    let p = |id| [("weir_partition", id)];
    assert_eq!(
        value(&s, "weir_decisions_throttled_total", &p("0")),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "weir_decisions_throttled_total", &p("1")),
        Some(0.0)
    );
    assert_eq!(value(&s, "weir_jobs_duplicates_total", &p("1")), Some(1.0));
    assert_eq!(value(&s, "weir_backlog_held", &p("0")), Some(7.0));
    assert_eq!(value(&s, "weir_backlog_held", &p("1")), Some(1.0));
    assert_eq!(value(&s, "weir_backlog_parked", &p("0")), Some(3.0));
    assert_eq!(value(&s, "weir_consumer_lag", &p("0")), Some(42.0));
    let kind = |k| [("weir_limit_kind", k)];
    assert_eq!(
        value(&s, "weir_limits_updates_total", &kind("key")),
        Some(2.0)
    );
    assert_eq!(
        value(&s, "weir_limits_updates_total", &kind("default")),
        Some(1.0)
    );
    assert_eq!(value(&s, "weir_limits_rejected_total", &[]), Some(1.0));
    assert_eq!(
        value(&s, "weir_key_backlog", &[("weir_key", "b")]),
        Some(9.0)
    );
    assert_eq!(
        value(&s, "weir_key_backlog", &[("weir_key", "a")]),
        Some(5.0)
    );
    assert_eq!(value(&s, "weir_key_backlog", &[("weir_key", "c")]), None);

    let h = s
        .samples
        .iter()
        .find(|x| x.metric == "weir_release_delay_milliseconds")
        .expect("release delay histogram");
    assert_eq!(h.labels.get("messaging_destination_name"), Some("sms"));
    let Value::Histogram(buckets) = &h.value else {
        panic!("not a histogram: {h:?}")
    };
    let at = |le: f64| buckets.iter().find(|b| b.less_than == le).map(|b| b.count);
    assert_eq!(at(1_000.0), Some(0.0));
    assert_eq!(at(2_500.0), Some(1.0));
    assert_eq!(at(86_400_000.0), Some(1.0));
    let text = m.render();
    assert!(text.contains("weir_release_delay_milliseconds_sum{"));
    assert!(text.contains("weir_release_delay_milliseconds_count{"));
    assert!(text.contains("service_name=\"weir-test\""), "target_info");
}

#[test]
fn dead_reason_kinds() {
    let kind = |subject| dead_reason_kind(&crate::job::parse_stored(subject).unwrap_err());
    assert_eq!(kind("weir.in.1.sms"), "bad_subject");
    assert_eq!(kind("weir.in.1.sms.a b"), "bad_token");
}

#[test]
fn no_per_key_label_by_default() {
    let m = Metrics::prometheus_only("weir-test").expect("metrics");
    let mut p = m.partition(0);
    p.released("sms", 3);
    m.set_top_keys(vec![("acme".into(), 5)]);
    p.set_top_keys(vec![("acme".into(), 5)]);
    assert_eq!(p.top_keys_wanted(), 0);
    let text = m.render();
    assert!(!text.contains("weir_key"), "{text}");
    assert!(!text.contains("acme"), "{text}");
}

#[test]
fn top_keys_follow_the_latest_lists() {
    let m = Metrics::prometheus_only("weir-test").expect("metrics");
    m.enable_top_keys(2);
    let (p0, p1) = (m.partition(0), m.partition(1));
    p0.set_top_keys(vec![("a".into(), 5), ("b".into(), 1)]);
    p1.set_top_keys(vec![("c".into(), 3)]);
    let s = scrape(&m);
    let key = |s: &Scrape, k| value(s, "weir_key_backlog", &[("weir_key", k)]);
    assert_eq!(
        (key(&s, "a"), key(&s, "b"), key(&s, "c")),
        (Some(5.0), None, Some(3.0))
    );
    p0.set_top_keys(vec![("d".into(), 8)]);
    let s = scrape(&m);
    assert_eq!(
        (key(&s, "a"), key(&s, "d"), key(&s, "c")),
        (None, Some(8.0), Some(3.0))
    );
}

#[test]
fn destinations_beyond_the_bound_are_other() {
    let m = Metrics::prometheus_only("weir-test").expect("metrics");
    let mut p = m.partition(0);
    for i in 0..MAX_DESTINATIONS + 5 {
        p.received(&format!("dest-{i}"));
    }
    // A destination seen before the bound keeps its name on another partition too.
    m.partition(1).received("dest-0");
    let s = scrape(&m);
    let received: Vec<&Sample> = s
        .samples
        .iter()
        .filter(|x| x.metric == "weir_jobs_received_total")
        .collect();
    assert_eq!(received.len(), MAX_DESTINATIONS + 1);
    let dest = |d| [("messaging_destination_name", d)];
    assert_eq!(
        value(&s, "weir_jobs_received_total", &dest(OTHER_DESTINATION)),
        Some(5.0)
    );
    assert_eq!(
        value(&s, "weir_jobs_received_total", &dest("dest-0")),
        Some(2.0)
    );
}

#[test]
fn instances_are_independent() {
    let a = Metrics::prometheus_only("a").expect("metrics");
    let b = Metrics::prometheus_only("b").expect("metrics");
    a.partition(0).received("sms");
    let sb = scrape(&b);
    assert_eq!(value(&sb, "weir_jobs_received_total", &[]), None);
    let sa = scrape(&a);
    assert_eq!(value(&sa, "weir_jobs_received_total", &[]), Some(1.0));
    a.shutdown();
    b.partition(0).received("sms");
    assert_eq!(
        value(&scrape(&b), "weir_jobs_received_total", &[]),
        Some(1.0)
    );
}

#[tokio::test]
async fn handler_serves_the_text_format() {
    let m = one_of_everything();
    let ([(name, ctype)], body) = metrics_handler(State(m)).await;
    assert_eq!(name, CONTENT_TYPE);
    assert_eq!(ctype, "text/plain; version=0.0.4");
    assert!(body.contains("weir_jobs_received_total"));
    let _router: axum::Router = router(Metrics::prometheus_only("r").expect("metrics"));
}

/// Metric names in the exposition (sample lines, so `_bucket`/`_sum`/`_count` included).
fn rendered_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or("").to_string())
        .collect()
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(o) => {
            for (k, v) in o {
                match v {
                    serde_json::Value::String(s) if k == "expr" || k == "definition" => {
                        out.push(s.clone())
                    }
                    v => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_uses_only_rendered_names() {
    let dash: serde_json::Value =
        serde_json::from_str(include_str!("../../dashboards/weir.json")).expect("dashboard JSON");
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    assert!(all.len() >= 9, "{all:?}");
    let m = one_of_everything();
    let names = rendered_names(&m.render());
    // Label names (`weir_partition`, ...) are not metric names.
    let labels: BTreeSet<String> = scrape(&m)
        .samples
        .iter()
        .flat_map(|x| x.labels.keys().cloned().collect::<Vec<_>>())
        .collect();
    let mut used = BTreeSet::new();
    for e in &all {
        for token in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            if token.starts_with("weir_") && !labels.contains(token) {
                used.insert(token.to_string());
            }
        }
    }
    let missing: Vec<&String> = used.iter().filter(|n| !names.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "dashboard names not rendered: {missing:?}\nrendered: {names:?}"
    );
    for n in [
        "weir_jobs_released_total",
        "weir_jobs_received_total",
        "weir_jobs_parked_total",
        "weir_jobs_dead_total",
        "weir_backlog_held",
        "weir_backlog_parked",
        "weir_release_delay_milliseconds_bucket",
        "weir_decisions_throttled_total",
        "weir_consumer_lag",
        "weir_limits_updates_total",
    ] {
        assert!(used.contains(n), "the dashboard has no panel on {n}");
    }
}
