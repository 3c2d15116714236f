//! Reading a partition's unacked jobs without async-nats' parser, and dead-lettering the ones it
//! cannot read.
//!
//! The JSON message get answers with the stored subject, and the header block and payload
//! base64-encoded, in a JSON body without headers: nothing in it can break the connection.
//! nats-server's JSON encoder replaces invalid UTF-8 in the subject by U+FFFD, so a subject with
//! U+FFFD is taken for one that was not valid UTF-8 (a real U+FFFD in a key is so taken too, but
//! only for a job that is unacked when the connection broke).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::Context;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;

use crate::job::{self, header};

/// Why a sweep stopped (the partition logs it and sweeps again after the next reconnect).
pub type SweepError = Box<dyn std::error::Error + Send + Sync>;

/// The header keeping the original header block of an unreadable job, base64-encoded.
pub const RAW_HEADERS: &str = "Weir-Raw-Headers";

/// Room kept below the server's `max_payload` for the dead letter's own headers and framing.
const ROOM: usize = 2048;

/// How many message gets one partition's sweep keeps in flight: the gaps between the jobs it
/// knows are walked side by side, so a sweep takes a fraction of the round trips one after
/// another would.
const IN_FLIGHT: usize = 16;

/// What a sweep dead-lettered: per job, its destination (empty when the subject does not
/// parse), for the dead metrics.
#[derive(Debug, Default)]
pub struct Swept {
    pub dests: Vec<String>,
    /// Jobs checked: unacked jobs the partition did not know of.
    pub checked: u64,
    /// Message gets made.
    pub gets: u64,
}

impl Swept {
    fn add(mut self, other: Swept) -> Swept {
        self.dests.extend(other.dests);
        self.checked += other.checked;
        self.gets += other.gets;
        self
    }
}

#[derive(Deserialize)]
struct GetReply {
    message: Option<Stored>,
    error: Option<ApiError>,
}

/// A stored message as the JSON message get shows it.
#[derive(Deserialize)]
pub struct Stored {
    pub subject: String,
    pub seq: u64,
    #[serde(default)]
    hdrs: Option<String>,
    #[serde(default)]
    data: Option<String>,
}

impl Stored {
    /// The raw header block, if the message has one.
    pub fn raw_headers(&self) -> Result<Option<Vec<u8>>, SweepError> {
        Ok(self.hdrs.as_deref().map(|h| B64.decode(h)).transpose()?)
    }

    pub fn payload(&self) -> Result<Bytes, SweepError> {
        Ok(Bytes::from(B64.decode(self.data.as_deref().unwrap_or(""))?))
    }
}

#[derive(Deserialize, Debug)]
struct ApiError {
    code: u16,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct DeleteReply {
    #[serde(default)]
    success: bool,
    error: Option<ApiError>,
}

/// A partition consumer's unacked jobs as its info shows them: what a sweep walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unacked {
    /// Every job at or below this stream sequence is acked.
    pub floor: u64,
    /// The last stream sequence delivered.
    pub upto: u64,
    /// Jobs delivered and not yet acked.
    pub pending: u64,
}

impl Unacked {
    /// Asks the server (one consumer info request).
    pub async fn of(consumer: &mut PullConsumer) -> Result<Unacked, SweepError> {
        let info = consumer.info().await?;
        Ok(Unacked {
            floor: info.ack_floor.stream_sequence,
            upto: info.delivered.stream_sequence,
            pending: info.num_ack_pending as u64,
        })
    }

    /// How many unacked jobs the partition cannot account for: those pending beyond the ones in
    /// `known` (sorted: the sequences it holds unacked, read, so readable). Zero means every
    /// unacked job was read by the partition and no sweep is needed; a reconnect with nothing
    /// unreadable costs one info request however many jobs are held.
    ///
    /// `known` must be taken after this info was answered: a job acked meanwhile would
    /// otherwise be counted by the partition and not by the server, and could hide an
    /// unreadable one. Taken after, a job is at worst counted by the server only (its ack still
    /// on the way), which only makes a sweep happen. A job the partition holds but the server
    /// no longer counts (lost in a nats-server crash, purged by an operator) can still hide an
    /// unreadable one, until that job is settled: the poison's next delivery breaks the
    /// connection again, and the sweep after that reconnect finds it.
    pub fn unknown(&self, known: &[u64]) -> u64 {
        let lo = known.partition_point(|&s| s <= self.floor);
        let hi = known.partition_point(|&s| s <= self.upto);
        self.pending.saturating_sub((hi - lo) as u64)
    }

    /// The stretches `[from, until)` of the unacked range between the jobs in `known` (sorted),
    /// skipping empty ones: every unacked job the partition does not know of is in one. When
    /// there are fewer than [`IN_FLIGHT`] (at start, when nothing is known, there is one), they
    /// are cut into that many, so that they too are walked side by side.
    fn gaps(&self, known: &[u64]) -> Vec<(u64, u64)> {
        let gaps = self.between(known);
        if gaps.len() >= IN_FLIGHT {
            return gaps;
        }
        let span: u64 = gaps.iter().map(|(f, u)| u - f).sum();
        let piece = span.div_ceil(IN_FLIGHT as u64).max(1);
        let mut out = Vec::with_capacity(IN_FLIGHT + gaps.len());
        for (mut from, until) in gaps {
            while from < until {
                let to = until.min(from + piece);
                out.push((from, to));
                from = to;
            }
        }
        out
    }

    fn between(&self, known: &[u64]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut from = self.floor + 1;
        let lo = known.partition_point(|&s| s <= self.floor);
        for &k in known[lo..].iter().take_while(|&&k| k <= self.upto) {
            if k > from {
                out.push((from, k));
            }
            from = k + 1;
        }
        if from <= self.upto {
            out.push((from, self.upto + 1));
        }
        out
    }
}

/// Checks every unacked job of `consumer` (its partition's filter, from the ack floor up to the
/// last delivered sequence), as at start, when the partition has read none of them.
pub async fn sweep_all(
    js: &Context,
    mut consumer: PullConsumer,
    partition: u16,
) -> Result<Swept, SweepError> {
    let range = Unacked::of(&mut consumer).await?;
    sweep(js, partition, range, &[]).await
}

/// Checks the unacked jobs in `range` (the partition's filter) that are not in `known` (sorted:
/// jobs the partition read, so readable) and dead-letters each one async-nats cannot read:
/// published to `dead.<dest>.<key>` (or `dead.invalid`) with its payload, the producer headers
/// that can be read, `Weir-Dead-Reason`, `Weir-Subject`, the derived `Nats-Msg-Id` and
/// `Weir-Raw-Headers`; deleted from `WEIR_JOBS` only once the dead letter is stored.
///
/// One message get per gap between known jobs and per job checked, `IN_FLIGHT` (16) at a time,
/// from both ends of the range: a poison that was delivered before is usually the oldest
/// unacked job (it holds the ack floor), while a fresh one, and jobs lost in flight, are among
/// the newest. It stops starting gaps once it has checked as many jobs as
/// [`Unacked::unknown`] counts, so a reconnect that lost one job finds it without reading the
/// rest (nothing at all when the count is zero).
pub async fn sweep(
    js: &Context,
    partition: u16,
    range: Unacked,
    known: &[u64],
) -> Result<Swept, SweepError> {
    let want = range.unknown(known);
    if want == 0 {
        return Ok(Swept::default());
    }
    let client = js.client();
    let filter = job::partition_filter(partition);
    let (client, filter) = (&client, filter.as_str());
    let checked = AtomicU64::new(0);
    let checked = &checked;
    futures::stream::iter(ends_first(range.gaps(known)))
        .take_while(|_| std::future::ready(checked.load(Relaxed) < want))
        .map(|(from, until)| walk(js, client, filter, partition, from, until, checked))
        .buffer_unordered(IN_FLIGHT)
        .try_fold(Swept::default(), |all, one| async move { Ok(all.add(one)) })
        .await
}

/// `gaps` reordered from both ends inwards: first, last, second, second last, ...
fn ends_first<T>(gaps: Vec<T>) -> impl Iterator<Item = T> {
    let mut gaps = std::collections::VecDeque::from(gaps);
    let mut back = false;
    std::iter::from_fn(move || {
        back = !back;
        if back {
            gaps.pop_front()
        } else {
            gaps.pop_back()
        }
    })
}

/// Checks the partition's jobs stored in `[from, until)`, one get each.
async fn walk(
    js: &Context,
    client: &async_nats::Client,
    filter: &str,
    partition: u16,
    mut from: u64,
    until: u64,
    checked: &AtomicU64,
) -> Result<Swept, SweepError> {
    let mut out = Swept::default();
    while from < until {
        out.gets += 1;
        let Some(m) = get(client, from, filter).await? else {
            break;
        };
        if m.seq >= until {
            break;
        }
        from = m.seq + 1;
        out.checked += 1;
        checked.fetch_add(1, Relaxed);
        let hdrs = m.raw_headers()?;
        let reason = check_stored(&m.subject, hdrs.as_deref());
        let Err(reason) = reason else { continue };
        tracing::warn!(partition, seq = m.seq, %reason, "dead-lettering a job the NATS client cannot read");
        out.dests
            .push(dead_letter(js, &m, hdrs.as_deref(), &reason).await?);
    }
    Ok(out)
}

/// Dead-letters stored job `m` (`raw`: its header block) with `reason`, to `dead.<dest>.<key>`
/// or `dead.invalid`: its payload, the producer headers that can be read, the raw block,
/// `Weir-Dead-Reason`, `Weir-Subject` and the derived `Nats-Msg-Id`; deletes it from
/// `WEIR_JOBS` only once the dead letter is stored. Returns its destination (empty when its
/// subject names none), for the dead metrics.
pub async fn dead_letter(
    js: &Context,
    m: &Stored,
    raw: Option<&[u8]>,
    reason: &str,
) -> Result<String, SweepError> {
    let client = js.client();
    let payload = m.payload()?;
    let route = job::parse_stored(&m.subject).ok();
    let subject = job::dead_subject(route.as_ref().map(|r| (r.dest, r.key)));
    let max = client.server_info().max_payload;
    let h = dead_headers(&m.subject, raw, reason, m.seq, payload.len(), max);
    js.publish_with_headers(subject, h, payload).await?.await?;
    delete(&client, m.seq).await?;
    Ok(route.map_or(String::new(), |r| r.dest.to_string()))
}

/// [`super::check`] on a subject as the JSON get shows it (invalid UTF-8 replaced by U+FFFD).
fn check_stored(subject: &str, hdrs: Option<&[u8]>) -> Result<(), String> {
    if let Some(i) = subject.find('\u{fffd}') {
        return Err(format!("subject is not valid UTF-8 (byte {i})"));
    }
    super::check(subject.as_bytes(), hdrs)
}

/// The dead letter's headers, within the server's `max_payload`: the readable producer headers
/// and the raw block if they fit, else the raw block alone, else a note of its size.
pub fn dead_headers(
    subject: &str,
    raw: Option<&[u8]>,
    reason: &str,
    seq: u64,
    payload: usize,
    max_payload: usize,
) -> async_nats::HeaderMap {
    let weir = |mut h: async_nats::HeaderMap| {
        crate::release::set_msg_id(&mut h, job::derived_msg_id(seq));
        h.insert(header::DEAD_REASON, reason);
        h.insert(
            header::SUBJECT,
            crate::dead::subject_header(subject).as_str(),
        );
        h
    };
    let Some(raw) = raw else {
        return weir(async_nats::HeaderMap::new());
    };
    let encoded = B64.encode(raw);
    let budget = max_payload.saturating_sub(payload + ROOM);
    let salvaged = super::salvage(raw);
    let salvaged_len: usize = salvaged
        .iter()
        .map(|(k, vs)| {
            vs.iter()
                .map(|v| AsRef::<str>::as_ref(k).len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum();
    let mut h = if encoded.len() + salvaged_len <= budget {
        salvaged
    } else {
        async_nats::HeaderMap::new()
    };
    if encoded.len() <= budget {
        h.insert(RAW_HEADERS, encoded.as_str());
    } else {
        h.insert(
            "Weir-Raw-Headers-Omitted",
            format!("{} bytes, too large to keep beside the payload", raw.len()).as_str(),
        );
    }
    weir(h)
}

/// The first message of `filter` at or after `seq`, by the JSON message get.
async fn get(
    client: &async_nats::Client,
    seq: u64,
    filter: &str,
) -> Result<Option<Stored>, SweepError> {
    get_json(
        client,
        serde_json::json!({ "seq": seq, "next_by_subj": filter }),
    )
    .await
}

/// The message at exactly `seq`, by the JSON message get (no subject filter), or `None` when
/// it is gone.
pub async fn get_seq(client: &async_nats::Client, seq: u64) -> Result<Option<Stored>, SweepError> {
    get_json(client, serde_json::json!({ "seq": seq })).await
}

async fn get_json(
    client: &async_nats::Client,
    req: serde_json::Value,
) -> Result<Option<Stored>, SweepError> {
    let reply = request(client, "MSG.GET", req).await?;
    let r: GetReply = serde_json::from_slice(&reply)?;
    match (r.message, r.error) {
        (Some(m), _) => Ok(Some(m)),
        (None, Some(e)) if e.code == 404 => Ok(None),
        (None, e) => Err(format!("message get answered {e:?}").into()),
    }
}

/// Deletes `seq` from `WEIR_JOBS`; one already gone (another sweep was first) is no error.
pub async fn delete(client: &async_nats::Client, seq: u64) -> Result<(), SweepError> {
    let reply = request(client, "MSG.DELETE", serde_json::json!({ "seq": seq })).await?;
    let r: DeleteReply = serde_json::from_slice(&reply)?;
    match r.error {
        None if r.success => Ok(()),
        Some(e) if e.code == 404 || e.description.contains("not found") => Ok(()),
        e => Err(format!("deleting message {seq} answered {e:?}").into()),
    }
}

async fn request(
    client: &async_nats::Client,
    op: &str,
    body: serde_json::Value,
) -> Result<Bytes, SweepError> {
    let subject = format!("$JS.API.STREAM.{op}.{}", job::JOBS_STREAM);
    let m = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(subject, body.to_string().into()),
    )
    .await??;
    Ok(m.payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_headers_fit() {
        let raw = b"NATS/1.0\r\nX-Ok: 1\r\nX-Bad: \xff\r\n\r\n";
        let h = dead_headers("weir.in.0.sms.a", Some(raw), "why", 7, 10, 1 << 20);
        assert_eq!(h.get("X-Ok").unwrap().as_str(), "1");
        assert_eq!(
            B64.decode(h.get(RAW_HEADERS).unwrap().as_str()).unwrap(),
            raw
        );
        assert_eq!(h.get(header::MSG_ID).unwrap().as_str(), "WEIR_JOBS:7");
        assert_eq!(h.get(header::DEAD_REASON).unwrap().as_str(), "why");
        // No room beside the payload: the raw block only, then only its size.
        let tight = dead_headers("s", Some(raw), "why", 7, 10, 10 + ROOM + 45);
        assert!(tight.get("X-Ok").is_none());
        assert!(tight.get(RAW_HEADERS).is_some());
        let none = dead_headers("s", Some(raw), "why", 7, 10, 10 + ROOM);
        assert!(none.get(RAW_HEADERS).is_none());
        assert!(none.get("Weir-Raw-Headers-Omitted").is_some());
    }

    #[test]
    fn known_jobs_are_skipped() {
        let r = Unacked {
            floor: 10,
            upto: 20,
            pending: 4,
        };
        // Known below the floor or past the last delivered do not count.
        assert_eq!(r.unknown(&[3, 12, 13, 15, 21]), 1);
        assert_eq!(r.unknown(&[11, 12, 13, 15]), 0);
        assert_eq!(r.unknown(&[]), 4);
        // A job acked meanwhile (the server no longer counts it) never makes the count negative.
        assert_eq!(r.unknown(&[11, 12, 13, 15, 16]), 0);
        assert_eq!(r.between(&[]), vec![(11, 21)]);
        assert_eq!(
            r.between(&[3, 11, 12, 15, 20, 25]),
            vec![(13, 15), (16, 20)]
        );
        assert_eq!(r.between(&[13]), vec![(11, 13), (14, 21)]);
        // Few gaps are cut into pieces to walk side by side, covering the same sequences.
        let wide = Unacked {
            floor: 0,
            upto: 1000,
            pending: 9,
        };
        let pieces = wide.gaps(&[500]);
        assert_eq!(pieces.len(), IN_FLIGHT);
        assert_eq!(pieces.first(), Some(&(1, 64)));
        assert_eq!(pieces.last(), Some(&(942, 1001)));
        assert!(pieces.windows(2).all(|w| w[0].1 == w[1].0 || w[1].0 == 501));
        assert!(pieces.iter().all(|(f, u)| f < u && (*u <= 500 || *f > 500)));
        assert_eq!(
            r.gaps(&[13]),
            vec![
                (11, 12),
                (12, 13),
                (14, 15),
                (15, 16),
                (16, 17),
                (17, 18),
                (18, 19),
                (19, 20),
                (20, 21)
            ]
        );
        let none = Unacked {
            floor: 10,
            upto: 10,
            pending: 0,
        };
        assert!(none.gaps(&[]).is_empty());
        assert_eq!(
            ends_first(vec![1, 2, 3, 4, 5]).collect::<Vec<_>>(),
            vec![1, 5, 2, 4, 3]
        );
    }

    #[test]
    fn replaced_subject_bytes_count_as_invalid() {
        assert_eq!(
            check_stored("weir.in.0.sms.\u{fffd}", None),
            Err("subject is not valid UTF-8 (byte 14)".into())
        );
    }
}
