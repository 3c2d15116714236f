//! `DELETE /deletequeue/` across processes: the key's pending jobs purged by the process that
//! runs its partition, wherever the request lands, and the queue's prefetched jobs dropped by
//! every process.
//!
//! Behind one address (a Kubernetes Service), a `deletequeue` reaches any process, and only the
//! one running the key's partition can purge its held and parked jobs
//! ([`crate::inspect::Partitions::purge`]). Another one asks it on core NATS subject [`SUBJECT`]
//! (payload `purge\n<queue_id>`): the process running the partition purges and answers
//! `purged\n<count>` (or `failed\n<why>`), the others answer `none`. Before, such a request
//! failed with 503 whenever it landed on another process.
//!
//! Each process keeps up to [`BUFFER`](super::dequeue::BUFFER) released jobs of a queue type
//! prefetched for its dequeues: delivered by the type's consumer, no longer in the stream's
//! undelivered part. Purging `released.<queue_type>.<queue_id>` deletes them from the stream,
//! but not from the buffers, so without this a worker could still dequeue hundreds of jobs of a
//! queue after it was deleted (a cancelled campaign's messages still going out). SHARQ deleted
//! every job not yet dequeued, and so does Weir:
//!
//! - the process serving the request reads `WEIR_RELEASED`'s last sequence, purges the queue's
//!   released jobs under it, and drops its own buffered jobs of the queue under it;
//! - then it asks the others on [`SUBJECT`] (payload `drop\n<queue_type>\n<queue_id>\n<below>`,
//!   header [`MEMBER`](super::forward::MEMBER)), and each drops its own and answers with how
//!   many, before the request is answered: once
//!   `deletequeue` has answered, no process hands out a job of the queue released before it;
//! - a process also drops, for a few seconds ([`FENCE`](super::feed::FENCE)), jobs of the queue
//!   under that sequence that arrive after: deliveries the server sent before the purge.
//!
//! The wait for the others' drops is bounded as for metrics ([`super::gather`]): every other
//! member, or 1 s at most; 200 ms when they cannot be counted. A purge gets [`PURGE_WAIT`].

use std::ops::ControlFlow;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::forward::next_request;
use super::gather::{WAIT, WAIT_UNCOUNTED};
use super::{Shared, SharqState};
use crate::inspect::InspectError;

/// The core NATS subject a deleted queue is announced on.
pub const SUBJECT: &str = "weir.sharq.deletequeue";
/// The longest wait for the process running the key's partition to purge it.
pub const PURGE_WAIT: Duration = Duration::from_secs(30);

/// What a process is asked.
#[derive(Debug, PartialEq)]
enum Ask<'a> {
    /// Purge the key's pending jobs, if its partition runs here.
    Purge(&'a str),
    /// Drop the queue's prefetched jobs under a `WEIR_RELEASED` sequence.
    Drop(&'a str, &'a str, u64),
}

/// Purges the key's pending jobs (held, parked, queued) here if this process runs its
/// partition, else through the process that does; answers how many went.
pub async fn purge_key(s: &Shared, queue_id: &str) -> Result<u64, String> {
    match s.inspect.purge(queue_id).await {
        Ok(p) => Ok(p.total()),
        Err(InspectError::NotOwned { .. }) => purge_elsewhere(s, queue_id).await,
        Err(e) => Err(e.to_string()),
    }
}

async fn purge_elsewhere(s: &Shared, queue_id: &str) -> Result<u64, String> {
    let body = Bytes::from(format!("purge\n{queue_id}"));
    let mut outcome = None;
    s.forward
        .ask_all(SUBJECT, body, PURGE_WAIT, PURGE_WAIT, |answer| {
            let text = String::from_utf8_lossy(answer);
            outcome = match text.split_once('\n') {
                Some(("purged", n)) => Some(Ok(n.parse().unwrap_or(0))),
                Some(("failed", why)) => Some(Err(why.to_string())),
                _ => return ControlFlow::Continue(()),
            };
            ControlFlow::Break(())
        })
        .await
        .map_err(|e| format!("cannot ask the other processes to purge the key: {e}"))?;
    outcome.unwrap_or_else(|| {
        Err("no Weir process runs the key's partition now (it is moving); retry".to_string())
    })
}

/// Purges the queue's released jobs stored so far and drops those prefetched by any process;
/// answers how many the purge deleted (the prefetched ones among them: they were still in the
/// stream), or why it failed.
pub async fn purge_released(s: &Shared, queue_type: &str, queue_id: &str) -> Result<u64, String> {
    let below = {
        let mut released = s.released.clone();
        let info = released.info().await.map_err(|e| e.to_string())?;
        info.state.last_sequence + 1
    };
    let purged = s
        .released
        .purge()
        .filter(crate::job::released_subject(queue_type, queue_id))
        .sequence(below)
        .await
        .map_err(|e| e.to_string())?
        .purged;
    let mine = s.dequeue.drop_queue(queue_type, queue_id, below).await;
    let theirs = others(s, queue_type, queue_id, below).await;
    if mine + theirs > 0 {
        tracing::info!(
            queue_type,
            queue_id,
            here = mine,
            elsewhere = theirs,
            "deletequeue: dropped prefetched jobs"
        );
    }
    Ok(purged)
}

/// Has the other processes drop the queue's prefetched jobs; how many they dropped.
async fn others(s: &Shared, queue_type: &str, queue_id: &str, below: u64) -> u64 {
    let body = Bytes::from(format!("drop\n{queue_type}\n{queue_id}\n{below}"));
    let mut dropped = 0;
    let asked = s
        .forward
        .ask_all(SUBJECT, body, WAIT, WAIT_UNCOUNTED, |answer| {
            let n = std::str::from_utf8(answer)
                .ok()
                .and_then(|n| n.parse::<u64>().ok());
            dropped += n.unwrap_or(0);
            ControlFlow::Continue(())
        })
        .await;
    match asked {
        Err(e) => {
            tracing::warn!(error = %e, queue_type, queue_id, "cannot ask the other processes to drop a deleted queue's prefetched jobs")
        }
        Ok(a) if a.missed_some() => tracing::warn!(
            others = ?a.others,
            heard = a.heard,
            queue_type,
            queue_id,
            "deletequeue: not every process answered; one that did not may hand out prefetched jobs of the queue"
        ),
        Ok(_) => {}
    }
    dropped
}

/// `purge\n<queue_id>` or `drop\n<queue_type>\n<queue_id>\n<below>`.
fn decode(payload: &[u8]) -> Option<Ask<'_>> {
    let parts: Vec<&str> = std::str::from_utf8(payload).ok()?.split('\n').collect();
    match parts[..] {
        ["purge", q] => Some(Ask::Purge(q)),
        ["drop", t, q, below] => Some(Ask::Drop(t, q, below.parse().ok()?)),
        _ => None,
    }
}

/// Answers the other processes' deleted queues until `cancel`.
pub async fn answer(state: SharqState, cancel: CancellationToken) {
    let client = state.forward.client.clone();
    let Some(mut requests) = state
        .forward
        .listen(SUBJECT, "deleted queues of other processes")
        .await
    else {
        return;
    };
    while let Some((m, reply)) = next_request(&mut requests, &state.forward.me, &cancel).await {
        let (t, q, below) = match decode(&m.payload) {
            Some(Ask::Drop(t, q, below)) => (t, q, below),
            Some(Ask::Purge(q)) => {
                // A purge can take seconds: not in the way of the drops.
                let (state, client, q) = (state.clone(), client.clone(), q.to_string());
                tokio::spawn(async move {
                    let body = match state.inspect.purge(&q).await {
                        Ok(p) => format!("purged\n{}", p.total()),
                        Err(InspectError::NotOwned { .. }) => "none".to_string(),
                        Err(e) => format!("failed\n{e}"),
                    };
                    if let Err(e) = client.publish(reply, Bytes::from(body)).await {
                        tracing::debug!(error = %e, "cannot answer a purge request");
                    }
                });
                continue;
            }
            None => {
                tracing::warn!("an unreadable deleted queue announcement");
                continue;
            }
        };
        let n = state.dequeue.drop_queue(t, q, below).await;
        if n > 0 {
            tracing::info!(
                queue_type = t,
                queue_id = q,
                dropped = n,
                "dropped a deleted queue's prefetched jobs"
            );
        }
        if let Err(e) = client.publish(reply, Bytes::from(n.to_string())).await {
            tracing::debug!(error = %e, "cannot answer a deleted queue announcement");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_read_back() {
        assert_eq!(
            decode(b"drop\nsms\nacme\n42"),
            Some(Ask::Drop("sms", "acme", 42))
        );
        assert_eq!(decode(b"purge\nacme"), Some(Ask::Purge("acme")));
        assert_eq!(decode(b"drop\nsms\nacme"), None);
        assert_eq!(decode(b"drop\nsms\nacme\nx"), None);
        assert_eq!(decode(b"purge\nacme\n1"), None);
        assert_eq!(decode(b"sms\nacme\n1"), None);
    }
}
