//! `weir chaos` as a subprocess, with small numbers: its `--json` ledger must be clean.
//!
//! Each run starts its own nats-server and two `weir run` processes, publishes a few thousand
//! jobs (hot keys with backlogs that park, cold keys, a few invalid ones) and kills a Weir
//! process every 2 s while they drain. The default 100,000-job runs and their figures are in
//! the README's Reliability section.

use std::process::Command;

use serde_json::Value;

/// Runs `weir chaos --json` with `args`; returns its exit code and ledger.
fn chaos(args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("chaos")
        .args([
            "--json",
            "--jobs",
            "3000",
            "--hot-keys",
            "4",
            "--cold-keys",
            "200",
            "--invalid",
            "5",
            "--kill-every",
            "2",
            "--deadline",
            "60",
        ])
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("run weir chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ledger: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "weir chaos printed no JSON ledger ({e}); stdout: {stdout}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), ledger)
}

fn assert_clean(code: i32, l: &Value) {
    let n = |f: &str| l[f].as_u64().unwrap_or_else(|| panic!("no {f} in {l}"));
    assert_eq!(n("published"), 3005, "every job accepted: {l:#}");
    assert_eq!(n("released"), 3000, "{l:#}");
    assert_eq!(n("dead"), 5, "{l:#}");
    assert_eq!(n("lost"), 0, "{l:#}");
    assert_eq!(n("duplicated"), 0, "{l:#}");
    assert_eq!(n("reordered"), 0, "{l:#}");
    assert_eq!(n("unexpected"), 0, "{l:#}");
    assert!(n("kills") >= 2, "a couple of kills: {l:#}");
    assert_eq!(l["rate"]["within_handover_bound"], true, "{l:#}");
    assert_eq!(l["clean"], true, "{l:#}");
    assert_eq!(code, 0, "exit status of a clean run: {l:#}");
}

#[test]
fn kills_leave_a_clean_ledger() {
    let (code, l) = chaos(&["--nats-restarts", "0"]);
    assert_clean(code, &l);
}

/// Ignored until it is reliable. It used to fail every run on order: a release lost with the
/// broken connection blocked the publish pipeline for the 5 s ack timeout while newer releases of
/// its key went out. Since partitions hold while the connection is down, settle every publish in
/// flight before publishing again, and decide no release while held (releases decided during the
/// outage used to go out together afterwards: 245 over a key's bound in one of six runs), five of
/// six runs were clean; the sixth had one job reordered within its key (a publish lost with the
/// connection while a later one of its key, still in the client's buffer, was stored after the
/// reconnect). Run with `--ignored`.
#[test]
#[ignore = "not yet reliable: 5 of 6 runs clean, one reordered a job within its key across the NATS restart"]
fn kills_and_a_nats_restart_leave_a_clean_ledger() {
    let (code, l) = chaos(&[
        "--nats-restarts",
        "1",
        "--nats-every",
        "3",
        "--nats-down",
        "2",
    ]);
    let f = &l["nats_faults"][0];
    assert_eq!(f["healthz_ok_while_away"], true, "{l:#}");
    assert_eq!(f["readyz_down_while_away"], true, "{l:#}");
    assert!(
        f["ready_after_ms"].is_u64(),
        "ready again after the restart: {l:#}"
    );
    assert_clean(code, &l);
}
