//! Finishing a job through any Weir process, not only the one that handed it out.
//!
//! A dequeued job's ack handle lives in the memory of the process that dequeued it (module
//! [`dequeue`](super::dequeue)). Behind one address (a Kubernetes Service, a load balancer) a
//! SHARQ worker's `POST /finish/...` lands on any process, so a process that does not hold the
//! job asks the others on core NATS subject [`SUBJECT`]:
//!
//! - the request's payload is `<queue_type>\n<queue_id>\n<job_id>` ('\n' is in no token), its
//!   header [`MEMBER`] the asking process (which ignores its own request);
//! - every process serving the API answers: [`DONE`] if it held the job and its ack reached
//!   NATS, [`NONE`] if it does not hold it, or `fail:<why>` if the ack failed;
//! - the asking process takes the first [`DONE`]; it answers 404 once every other member of
//!   the group (from `WEIR_CLUSTER`) has said [`NONE`], or after [`WAIT`] at the latest: long
//!   enough for an overloaded peer, and the bound when the others cannot be counted (a static
//!   split knows no members; a member without the API does not answer).
//!
//! The fast path is untouched: a finish that reaches the holder costs no NATS message beyond
//! the ack. A miss costs one request and one reply per other process, no JetStream.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::SharqState;
use crate::cluster::view::View;

/// The core NATS subject finishes are forwarded on.
pub const SUBJECT: &str = "weir.sharq.finish";
/// The header naming the asking process.
pub const MEMBER: &str = "Weir-Member";
/// The answer of the process that held the job and acked it.
pub const DONE: &[u8] = b"done";
/// The answer of a process that does not hold the job.
pub const NONE: &[u8] = b"none";
/// The longest wait for the other processes' answers.
pub const WAIT: Duration = Duration::from_secs(1);

/// What a finish came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    /// The job was in flight here (or, forwarded, somewhere) and its ack reached NATS.
    Done,
    /// No process holds the job: never dequeued, finished already, or its time is up.
    NotHeld,
    /// The holder's ack did not reach NATS; the job will be redelivered.
    Failed(String),
}

/// How this process reaches the others.
pub struct Forward {
    pub client: Client,
    /// This process's member name.
    pub me: String,
    /// The group's members, when the group assigns the partitions (not with a static split).
    pub view: Option<watch::Receiver<Arc<View>>>,
}

impl Forward {
    /// How many other processes should answer, when known: not with a static split, nor
    /// before the group's first view is out (it holds this process once its watcher has read
    /// the bucket).
    pub fn others(&self) -> Option<usize> {
        let view = self.view.as_ref()?;
        let v = view.borrow();
        let me = v.members.contains_key(&self.me);
        me.then(|| v.members.len() - 1)
    }

    /// Sends `body` to the other processes on `subject`, signed with this process's
    /// [`MEMBER`] name; their answers arrive on the returned subscription.
    pub(super) async fn request(
        &self,
        subject: &'static str,
        body: Bytes,
    ) -> Result<async_nats::Subscriber, async_nats::Error> {
        let inbox = self.client.new_inbox();
        let answers = self.client.subscribe(inbox.clone()).await?;
        let mut headers = HeaderMap::new();
        headers.insert(MEMBER, self.me.as_str());
        self.client
            .publish_with_reply_and_headers(subject, inbox, headers, body)
            .await?;
        Ok(answers)
    }

    /// Subscribes to the other processes' requests on `subject`; when it cannot, logs that
    /// `what` will go unanswered.
    pub(super) async fn listen(
        &self,
        subject: &'static str,
        what: &str,
    ) -> Option<async_nats::Subscriber> {
        match self.client.subscribe(subject).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot answer {what}");
                None
            }
        }
    }

    /// Sends `body` to the other processes on `subject` and hands each answer to `each`, until
    /// `each` breaks, every other member has answered, or `wait` is up (`uncounted` when the
    /// others cannot be counted). With no other member it sends nothing. The one way every
    /// question to the other processes (finish, metrics, deletequeue) is asked and waited for.
    pub(super) async fn ask_all(
        &self,
        subject: &'static str,
        body: Bytes,
        wait: Duration,
        uncounted: Duration,
        mut each: impl FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<Asked, async_nats::Error> {
        let others = self.others();
        let mut asked = Asked { heard: 0, others };
        if others == Some(0) {
            return Ok(asked);
        }
        let mut answers = self.request(subject, body).await?;
        let deadline = tokio::time::Instant::now() + others.map_or(uncounted, |_| wait);
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, answers.next()).await {
            asked.heard += 1;
            if each(&m.payload).is_break() || others.is_some_and(|n| asked.heard >= n) {
                break;
            }
        }
        Ok(asked)
    }

    /// Asks the other processes to finish a job this one does not hold.
    pub async fn ask(&self, queue_type: &str, queue_id: &str, job_id: &str) -> Finished {
        let body = Bytes::from(format!("{queue_type}\n{queue_id}\n{job_id}"));
        let (mut done, mut failed) = (false, None);
        let asked = self
            .ask_all(SUBJECT, body, WAIT, WAIT, |answer| match answer {
                DONE => {
                    done = true;
                    ControlFlow::Break(())
                }
                NONE => ControlFlow::Continue(()),
                other => {
                    let why =
                        String::from_utf8_lossy(other.strip_prefix(b"fail:").unwrap_or(other));
                    failed = Some(why.into_owned());
                    ControlFlow::Continue(())
                }
            })
            .await;
        let asked = match asked {
            Ok(_) if done => return Finished::Done,
            Ok(a) => a,
            Err(e) => return Finished::Failed(format!("cannot ask the other processes: {e}")),
        };
        tracing::debug!(
            queue_type,
            queue_id,
            job_id,
            others = ?asked.others,
            nays = asked.heard,
            "no process holds the job"
        );
        failed.map_or(Finished::NotHeld, Finished::Failed)
    }
}

/// How a question to the other processes went ([`Forward::ask_all`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Asked {
    /// Answers taken.
    pub heard: usize,
    /// Other members of the group; `None` when they cannot be counted.
    pub others: Option<usize>,
}

impl Asked {
    /// Whether a member known to be there did not answer in time.
    pub fn missed_some(&self) -> bool {
        self.others.is_some_and(|n| self.heard < n)
    }
}

/// The next request on `requests` from another process (this one's own, and messages without a
/// reply subject, skipped), with its reply subject; `None` once `cancel` fires or the
/// subscription ends.
pub(super) async fn next_request(
    requests: &mut async_nats::Subscriber,
    me: &str,
    cancel: &CancellationToken,
) -> Option<(async_nats::Message, async_nats::Subject)> {
    loop {
        let m = tokio::select! {
            _ = cancel.cancelled() => return None,
            m = requests.next() => m?,
        };
        let Some(reply) = m.reply.clone() else {
            continue;
        };
        let asker = m.headers.as_ref().and_then(|h| h.get(MEMBER));
        if asker.is_some_and(|a| a.as_str() == me) {
            continue;
        }
        return Some((m, reply));
    }
}

/// Answers the other processes' finish requests until `cancel`.
pub async fn answer(state: SharqState, cancel: CancellationToken) {
    let client = state.forward.client.clone();
    let Some(mut requests) = state.forward.listen(SUBJECT, "forwarded finishes").await else {
        return;
    };
    while let Some((m, reply)) = next_request(&mut requests, &state.forward.me, &cancel).await {
        let mut ids = std::str::from_utf8(&m.payload).unwrap_or("").split('\n');
        let (Some(t), Some(q), Some(j), None) = (ids.next(), ids.next(), ids.next(), ids.next())
        else {
            continue;
        };
        let Some(held) = state.dequeue.take(t, q, j) else {
            if let Err(e) = client.publish(reply, Bytes::from_static(NONE)).await {
                tracing::debug!(error = %e, "cannot answer a forwarded finish");
            }
            continue;
        };
        // The ack awaits NATS: off this loop, so one slow ack does not hold up the others. At
        // most one task per job in flight here.
        let (state, client) = (state.clone(), client.clone());
        let (t, q, j) = (t.to_string(), q.to_string(), j.to_string());
        tokio::spawn(async move {
            let answer = match state.dequeue.ack(held, &t, &q, &j).await {
                Finished::Done => Bytes::from_static(DONE),
                Finished::NotHeld => Bytes::from_static(NONE),
                Finished::Failed(why) => Bytes::from(format!("fail:{why}")),
            };
            if let Err(e) = client.publish(reply, answer).await {
                tracing::debug!(error = %e, "cannot answer a forwarded finish");
            }
        });
    }
}
