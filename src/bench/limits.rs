//! Live limits in the end-to-end benchmark: how long a write to `WEIR_LIMITS` takes to act,
//! and how much of a destination cap a process gets when all traffic is on it and another
//! process shares the cap.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;

use super::{config, fresh, start_weir, BoxError};
use crate::limits::store::Store;
use crate::limits::{Entry, LimitJson};

fn json(rate: &str, burst: i64) -> LimitJson {
    LimitJson {
        pattern: None,
        rate: rate.into(),
        burst: Some(burst),
    }
}

/// (7) From a KV write to its effect: every key is paused (default `0/s`) with one job held;
/// for each key in turn, write a limit for it and time until its job arrives on `released.>`.
pub async fn apply_latency(samples: usize, partitions: u16) -> Result<(), BoxError> {
    let (_n, client) = fresh().await?;
    let js = jetstream::new(client.clone());
    let c = config(partitions, "[limits.default]\nrate = \"0/s\"\nburst = 1")?;
    let (stop, h) = start_weir(c, client.clone());
    let store = loop {
        match Store::get(&js).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut sub = client.subscribe("released.>").await?;
    for i in 0..samples {
        js.publish(format!("jobs.sms.lat-{i}"), "x".into())
            .await?
            .await?;
    }
    // Paused, nothing leaves: wait until the partitions hold every job (delivered, unacked).
    let jobs = js.get_stream(crate::job::JOBS_STREAM).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let mut held = 0;
        for p in 0..partitions {
            let mut c: jetstream::consumer::PullConsumer = jobs
                .get_consumer(&crate::streams::partition_consumer(p))
                .await?;
            held += c.info().await?.num_ack_pending;
        }
        if held >= samples {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples {
        let t = Instant::now();
        store
            .put(&Entry::Key(format!("lat-{i}")), &json("1000/s", 1))
            .await?;
        tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await?
            .ok_or("subscription ended")?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    stop.cancel();
    h.await?;
    lat.sort_by(f64::total_cmp);
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize];
    println!(
        "(7) limit write -> applied -> held job released: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({samples} samples)",
        p(0.5),
        p(0.99),
        lat[lat.len() - 1]
    );
    Ok(())
}

/// (8) A 100/s destination cap shared by two processes (one partition each), all traffic on
/// the first: the releases per second it gets once shares settle.
pub async fn cap_lending(seconds: u64) -> Result<(), BoxError> {
    let (nats, client) = fresh().await?;
    let js = jetstream::new(client.clone());
    let base = "[limits.default]\nrate = \"1000/s\"\nburst = 10";
    let c0 = config(2, &format!("owned_partitions = [0]\n{base}"))?;
    crate::streams::ensure(&js, &c0).await?;
    let store = Store::open(&js, &c0).await?;
    store
        .put(&Entry::Destination("carrier".into()), &json("100/s", 10))
        .await?;
    let c1 = config(2, &format!("owned_partitions = [1]\n{base}"))?;
    let (s0, h0) = start_weir(c0, client.clone());
    // The second process has its own connection, as it would in production.
    let (s1, h1) = start_weir(c1, crate::connect(&nats.url()).await?);
    let keys: Vec<String> = (0..)
        .map(|i| format!("skew-{i}"))
        .filter(|k| crate::job::partition_of(k, 2) == 0)
        .take(8)
        .collect();
    let jobs = 100 * (seconds + 4);
    let mut sub = client.subscribe("released.carrier.>").await?;
    let mut acks = Vec::new();
    for i in 0..jobs {
        let k = &keys[i as usize % keys.len()];
        acks.push(js.publish(format!("jobs.carrier.{k}"), "x".into()).await?);
    }
    for a in acks {
        a.await?;
    }
    // Skip the first 2 s (shares settle), then count for `seconds`.
    let first = sub.next().await.ok_or("no release")?;
    drop(first);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2 + seconds) {
        match tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
            Ok(Some(_)) if start.elapsed() >= Duration::from_secs(2) => n += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    s0.cancel();
    s1.cancel();
    h0.await?;
    h1.await?;
    let rate = n as f64 / seconds as f64;
    println!(
        "(8) destination cap 100/s over 2 processes, all traffic on one: {rate:.1} releases/s, {rate:.1}% of the cap (static halves: 50%)"
    );
    Ok(())
}
