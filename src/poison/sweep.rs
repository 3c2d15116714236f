//! Reading a partition's unacked jobs without async-nats' parser, and dead-lettering the ones it
//! cannot read.
//!
//! The JSON message get answers with the stored subject, and the header block and payload
//! base64-encoded, in a JSON body without headers: nothing in it can break the connection.
//! nats-server's JSON encoder replaces invalid UTF-8 in the subject by U+FFFD, so a subject with
//! U+FFFD is taken for one that was not valid UTF-8 (a real U+FFFD in a key is so taken too, but
//! only for a job that is unacked when the connection broke).

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::Context;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;

use crate::job::{self, header};

/// Why a sweep stopped (the partition logs it and sweeps again after the next reconnect).
pub type SweepError = Box<dyn std::error::Error + Send + Sync>;

/// The header keeping the original header block of an unreadable job, base64-encoded.
pub const RAW_HEADERS: &str = "Weir-Raw-Headers";

/// Room kept below the server's `max_payload` for the dead letter's own headers and framing.
const ROOM: usize = 2048;

/// What a sweep dead-lettered: per job, its destination (empty when the subject does not
/// parse), for the dead metrics.
#[derive(Debug, Default)]
pub struct Swept {
    pub dests: Vec<String>,
    /// Jobs checked.
    pub checked: u64,
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

/// Checks every unacked job of `consumer` (its partition's filter, from the ack floor up to the
/// last delivered sequence) and dead-letters each one async-nats cannot read: published to
/// `dead.<dest>.<key>` (or `dead.invalid`) with its payload, the producer headers that can be
/// read, `Weir-Dead-Reason`, `Weir-Subject`, the derived `Nats-Msg-Id` and `Weir-Raw-Headers`;
/// deleted from `WEIR_JOBS` only once the dead letter is stored. One request per unacked job.
pub async fn sweep(
    js: &Context,
    mut consumer: PullConsumer,
    partition: u16,
) -> Result<Swept, SweepError> {
    let info = consumer.info().await?;
    let mut out = Swept::default();
    if info.num_ack_pending == 0 {
        return Ok(out);
    }
    let (mut seq, upto) = (
        info.ack_floor.stream_sequence + 1,
        info.delivered.stream_sequence,
    );
    let client = js.client();
    let filter = job::partition_filter(partition);
    while seq <= upto {
        let Some(m) = get(&client, seq, &filter).await? else {
            break;
        };
        if m.seq > upto {
            break;
        }
        seq = m.seq + 1;
        out.checked += 1;
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
    fn replaced_subject_bytes_count_as_invalid() {
        assert_eq!(
            check_stored("weir.in.0.sms.\u{fffd}", None),
            Err("subject is not valid UTF-8 (byte 14)".into())
        );
    }
}
