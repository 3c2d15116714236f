//! SHARQ's metrics for the whole group, whichever process a `GET /metrics/...` reaches.
//!
//! SHARQ kept its counts in Redis, so every sharq-server answered for all of them. A Weir
//! process counts the requests it serves ([`counters`](super::counters)), so the one that gets
//! `GET /metrics/...` asks the others on core NATS subject [`SUBJECT`] and adds their answers
//! to its own:
//!
//! - the request's payload is the [`Scope`] (`all`, `type\n<queue_type>` or
//!   `queue\n<queue_type>\n<queue_id>`), its header [`MEMBER`](super::forward::MEMBER) the
//!   asking process (which ignores its own request);
//! - every process serving the API answers with its [`Part`] for that scope, in JSON (for a
//!   queue, with the sequences of the queue's jobs it holds prefetched, which the asking
//!   process adds to the queue's length);
//! - the asking process adds up what arrives until every other member of the group (from
//!   `WEIR_CLUSTER`) has answered, or [`WAIT`] at the latest ([`WAIT_UNCOUNTED`] when the others
//!   cannot be counted: a static split knows no members). A process that does not answer in
//!   time is left out of that answer, never waited for again.
//!
//! One request and one small reply per other process and metrics request; no JetStream.

use std::ops::ControlFlow;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::counters::{Part, Scope};
use super::forward::next_request;
use super::{Shared, SharqState};

/// The core NATS subject metrics requests go out on.
pub const SUBJECT: &str = "weir.sharq.metrics";
/// The longest wait for the other members' parts.
pub const WAIT: Duration = Duration::from_secs(1);
/// The wait when the others cannot be counted: every answer that comes in that time is added.
pub const WAIT_UNCOUNTED: Duration = Duration::from_millis(200);

/// This process's part of `scope`, with every other process's that answers in time.
pub async fn part(s: &Shared, scope: &Scope) -> Part {
    let mut part = s.counters.part(scope);
    let body = Bytes::from(scope.encode());
    let asked = s
        .forward
        .ask_all(SUBJECT, body, WAIT, WAIT_UNCOUNTED, |answer| {
            match serde_json::from_slice::<Part>(answer) {
                Ok(p) => part.add(p),
                Err(e) => tracing::warn!(error = %e, "a process answered SHARQ metrics unreadably"),
            }
            ControlFlow::Continue(())
        })
        .await;
    match asked {
        Err(e) => {
            tracing::warn!(error = %e, "cannot ask the other processes for their SHARQ metrics")
        }
        Ok(a) if a.missed_some() => tracing::warn!(
            others = ?a.others,
            heard = a.heard,
            "SHARQ metrics without every process's counts"
        ),
        Ok(_) => {}
    }
    part
}

/// Answers the other processes' metrics requests until `cancel`.
pub async fn answer(state: SharqState, cancel: CancellationToken) {
    let client = state.forward.client.clone();
    let Some(mut requests) = state
        .forward
        .listen(SUBJECT, "SHARQ metrics requests")
        .await
    else {
        return;
    };
    while let Some((m, reply)) = next_request(&mut requests, &state.forward.me, &cancel).await {
        let Some(scope) = std::str::from_utf8(&m.payload).ok().and_then(Scope::decode) else {
            continue;
        };
        let mut part = state.counters.part(&scope);
        if let Scope::Queue(t, q) = &scope {
            part.prefetched = state.lengths.prefetched(t, q);
        }
        let body = match serde_json::to_vec(&part) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode SHARQ metrics");
                continue;
            }
        };
        if let Err(e) = client.publish(reply, body).await {
            tracing::debug!(error = %e, "cannot answer a SHARQ metrics request");
        }
    }
}
