//! Destination caps for the whole process: one GCRA bucket per capped destination, shared by
//! every partition task (governor's state is one atomic, so sharing needs no lock).
//!
//! The caps come from the `destinations.<dest>` entries of the limits table. When a cap
//! changes, its destination gets a new bucket, empty, so the new bound holds from that moment
//! (no extra burst); a new cap starts full. Partitions receive the set through a
//! `tokio::sync::watch` channel and swap it in between jobs.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::limiter::Bucket;
use crate::limits::Limits;
use crate::scheduler::{Caps, Key};

/// Follows the limits table and publishes the process's destination buckets, each for `share`
/// of its destination's cap (the process's fraction of the partitions).
pub fn follow(
    mut limits: watch::Receiver<Arc<Limits>>,
    share: f64,
    cancel: CancellationToken,
) -> (watch::Receiver<Arc<Caps>>, tokio::task::JoinHandle<()>) {
    let table = limits.borrow_and_update().clone();
    let mut caps = Caps::new();
    update(&mut caps, &table, None, share);
    let (tx, rx) = watch::channel(Arc::new(caps.clone()));
    let task = tokio::spawn(async move {
        let mut old = table;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = limits.changed() => if r.is_err() { return },
            }
            let new = limits.borrow_and_update().clone();
            if new.destinations() != old.destinations() {
                update(&mut caps, &new, Some(&old), share);
                tx.send_replace(Arc::new(caps.clone()));
            }
            old = new;
        }
    });
    (rx, task)
}

/// Brings `caps` in line with `new`: changed caps get a fresh, empty bucket.
fn update(caps: &mut Caps, new: &Limits, old: Option<&Limits>, share: f64) {
    caps.retain(|d, _| new.destination(d).is_some());
    for (d, limit) in new.destinations() {
        let before = old.and_then(|o| o.destination(d));
        if before == Some(*limit) && caps.contains_key(d.as_str()) {
            continue;
        }
        let bucket = Bucket::share_of(limit, share);
        if before.is_some() {
            bucket.drain();
        }
        caps.insert(Key::from(d.as_str()), Arc::new(bucket));
    }
}
