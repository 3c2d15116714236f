//! The `weir load` command line: flags, a progress bar on stderr, a summary on stdout.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::ContextBuilder;
use indicatif::{ProgressBar, ProgressStyle};

use super::{publish, BoxError, LoadSpec, Progress};

/// `weir load` flags.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// NATS URL (beats the config file; default nats://127.0.0.1:4222).
    #[arg(long, env = "WEIR_NATS_URL")]
    pub nats_url: Option<String>,
    /// Weir's TOML config file: its `nats_url` and `[nats]` table (credentials, TLS) are used.
    #[arg(long, short)]
    pub config: Option<std::path::PathBuf>,
    /// Keys, comma-separated.
    #[arg(long, value_delimiter = ',', conflicts_with = "key_count")]
    pub keys: Vec<String>,
    /// Generate keys key-0 .. key-(N-1) instead of --keys.
    #[arg(long, default_value_t = 1)]
    pub key_count: usize,
    /// Destination token of the subject `jobs.<destination>.<key>`.
    #[arg(long, default_value = "sms")]
    pub destination: String,
    /// Jobs per second per key; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Jobs per key; 0 = until --seconds or Ctrl-C.
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Publish for this many seconds (with --rate: exactly the jobs due in that time).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Payload bytes (the first 8 carry the job's sequence within its key).
    #[arg(long, default_value_t = 16)]
    pub payload: usize,
    /// Publish acks in flight.
    #[arg(long, default_value_t = 1024)]
    pub window: usize,
}

/// `weir load`: publish, show progress on stderr, print a summary; fails if any publish failed.
pub async fn main(a: LoadArgs) -> Result<(), BoxError> {
    let keys = if a.keys.is_empty() {
        (0..a.key_count).map(|i| format!("key-{i}")).collect()
    } else {
        a.keys
    };
    let duration = match a.seconds {
        Some(s) if !(s.is_finite() && s > 0.0) => return Err("--seconds must be > 0".into()),
        s => s.map(Duration::from_secs_f64),
    };
    let spec = LoadSpec {
        destination: a.destination,
        keys,
        rate: a.rate,
        count: a.count,
        duration,
        payload: a.payload,
        window: a.window.max(1),
    };
    let (url, nats) = crate::cli::nats_target(a.config.as_deref(), a.nats_url.clone())?;
    let shown = crate::config::nats::redact_url(&url);
    let client = nats
        .options("weir-load")
        .await
        .map_err(|e| format!("cannot use nats.creds_file: {e}"))?
        .connect(&url)
        .await
        .map_err(|e| format!("cannot connect to NATS at {shown}: {e}"))?;
    let js = ContextBuilder::new()
        .max_ack_inflight(spec.window)
        .backpressure_on_inflight(true)
        .build(client.clone());
    let Some(key) = spec.keys.first() else {
        return Err("no keys: give --keys or a --key-count above 0".into());
    };
    let first = format!("jobs.{}.{key}", spec.destination);
    if js.stream_by_subject(first.clone()).await.is_err() {
        return Err(format!("no JetStream stream stores {first}; start `weir run` first").into());
    }

    let bar = if let Some(total) = spec.planned() {
        ProgressBar::new(total).with_style(style(
            "{bar:40} {pos}/{len} acked {per_sec} eta {eta} {msg}",
        ))
    } else {
        ProgressBar::no_length().with_style(style("{spinner} {pos} acked {per_sec} {msg}"))
    };
    let progress = Arc::new(Progress::default());
    let watch = {
        let (p, bar) = (progress.clone(), bar.clone());
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_millis(100));
            let ctrl_c = tokio::signal::ctrl_c();
            tokio::pin!(ctrl_c);
            let mut stopped = false;
            loop {
                tokio::select! {
                    _ = t.tick() => {}
                    _ = &mut ctrl_c, if !stopped => { stopped = true; p.stop() }
                }
                bar.set_position(p.acked.load(Relaxed) + p.failed.load(Relaxed));
                let (sent, failed) = (p.sent.load(Relaxed), p.failed.load(Relaxed));
                bar.set_message(format!("sent {sent} failed {failed}"));
            }
        })
    };
    let report = publish(&js, &spec, Some(&progress)).await;
    watch.abort();
    bar.finish_and_clear();
    let r = report?;
    println!(
        "{} keys, destination {}: sent {}, acked {}, failed {} in {:.2} s ({:.0} jobs/s acked)",
        spec.keys.len(),
        spec.destination,
        r.sent,
        r.acked,
        r.failed,
        r.elapsed.as_secs_f64(),
        r.rate()
    );
    client.flush().await.ok();
    match r.first_error {
        Some(e) => Err(format!("{} publishes failed; first: {e}", r.failed).into()),
        None => Ok(()),
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).expect("static template")
}
