//! The post-mortem of lost jobs: where `WEIR_JOBS` stored each one (from its publish ack), which
//! stored job, if any, carries the release id derived from that sequence, what became of its
//! neighbours in its key, and what `WEIR_JOBS` and `WEIR_PARK` still hold. Read only when a
//! run lost jobs.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::Context;
use futures::StreamExt;

use super::plan::{Acked, Plan};
use crate::job::{self, header, DEAD_STREAM, JOBS_STREAM, PARK_STREAM, RELEASED_STREAM};

/// One message of `WEIR_RELEASED` or `WEIR_DEAD`.
struct Copy {
    stream: &'static str,
    stream_seq: u64,
    key: String,
    seq: u64,
    /// The `WEIR_JOBS` sequence its `Nats-Msg-Id` was derived from.
    src_seq: Option<u64>,
    /// It went through the park (it carries `Weir-Source-Seq`).
    parked: bool,
    released_at: Option<u64>,
}

impl Copy {
    fn describe(&self, t0_ms: u64) -> String {
        let at = self.released_at.map_or(String::new(), |t| {
            format!(", at {:+.2} s", (t as f64 - t0_ms as f64) / 1000.0)
        });
        format!(
            "{} seq {} ({} job {}, from WEIR_JOBS seq {}, {}{at})",
            self.stream,
            self.stream_seq,
            self.key,
            self.seq,
            self.src_seq.map_or("?".into(), |s| s.to_string()),
            if self.parked { "via the park" } else { "fresh" },
        )
    }
}

/// Lines describing each of `lost` (key, sequence), after a few lines on the whole run.
/// `t0_ms`: the run's start (Unix ms), for the release times.
pub async fn lost(
    js: &Context,
    plan: &Plan,
    acks: &[Vec<Acked>],
    lost: &[(String, u64)],
    partitions: u16,
    t0_ms: u64,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut copies = Vec::new();
    for stream in [RELEASED_STREAM, DEAD_STREAM] {
        match read(js, stream).await {
            Ok(c) => copies.extend(c),
            Err(e) => out.push(format!("trace: reading {stream} failed: {e}")),
        }
    }
    let mut by_src: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut by_job: HashMap<(&str, u64), Vec<usize>> = HashMap::new();
    for (i, c) in copies.iter().enumerate() {
        if let Some(s) = c.src_seq {
            by_src.entry(s).or_default().push(i);
        }
        by_job.entry((c.key.as_str(), c.seq)).or_default().push(i);
    }

    // Acks that gave two jobs one WEIR_JOBS sequence: the store reused a sequence.
    let mut acked: HashMap<u64, Vec<(usize, u64)>> = HashMap::new();
    for (k, a) in acks.iter().enumerate() {
        for (seq, ack) in a.iter().enumerate() {
            acked
                .entry(ack.stream_seq)
                .or_default()
                .push((k, seq as u64));
        }
    }
    let shared: Vec<String> = (acked.iter())
        .filter(|(_, jobs)| jobs.len() > 1)
        .take(10)
        .map(|(s, jobs)| {
            let names: Vec<String> = (jobs.iter())
                .map(|(k, q)| format!("{} job {q}", plan.keys[*k].name))
                .collect();
            format!("{s}: {}", names.join(", "))
        })
        .collect();
    let mut jobs = js.get_stream(JOBS_STREAM).await.ok();
    let mut park = js.get_stream(PARK_STREAM).await.ok();
    let jobs_state = match jobs.as_mut() {
        Some(s) => s.info().await.ok().map(|i| i.state.clone()),
        None => None,
    };
    if let Some(st) = &jobs_state {
        let seen: BTreeSet<u64> = by_src.keys().copied().collect();
        let gaps: Vec<u64> = (1..=st.last_sequence)
            .filter(|s| !seen.contains(s))
            .take(20)
            .collect();
        out.push(format!(
            "trace: WEIR_JOBS holds {} (first seq {}, last {}); {} distinct sequences acked to the publisher; released or dead copies carry {} distinct source sequences; none carries {gaps:?}{}",
            st.messages,
            st.first_sequence,
            st.last_sequence,
            acked.len(),
            seen.len(),
            if shared.is_empty() { String::new() } else { format!("; sequences acked for two jobs: {shared:?}") }
        ));
    }
    if let Some(p) = park.as_mut() {
        if let Ok(i) = p.info().await {
            out.push(format!(
                "trace: WEIR_PARK holds {} (first seq {}, last {})",
                i.state.messages, i.state.first_sequence, i.state.last_sequence
            ));
        }
    }

    for (name, seq) in lost {
        let Some(k) = plan.keys.iter().position(|k| &k.name == name) else {
            continue;
        };
        let Some(ack) = acks[k].get(*seq as usize) else {
            continue;
        };
        let s = ack.stream_seq;
        let mut line = format!(
            "{name} job {seq}: acked as WEIR_JOBS seq {s} at {:+.2} s after {} tries{}",
            ack.at_ms as f64 / 1000.0,
            ack.tries,
            if ack.duplicate { " (duplicate)" } else { "" }
        );
        if let Some(j) = jobs.as_ref() {
            match j.get_raw_message(s).await {
                Ok(m) => line.push_str(&format!("; still in WEIR_JOBS ({})", m.subject)),
                Err(_) => line.push_str("; gone from WEIR_JOBS"),
            }
        }
        let carriers: Vec<String> = (by_src.get(&s).into_iter().flatten())
            .map(|&i| copies[i].describe(t0_ms))
            .collect();
        line.push_str(&format!(
            "; id {} carried by {}",
            job::derived_msg_id(s),
            if carriers.is_empty() {
                "nothing".to_string()
            } else {
                carriers.join(" and ")
            }
        ));
        if let Some(p) = park.as_mut() {
            let subject = job::park_subject(job::partition_of(name, partitions), name);
            let n = match p.info_with_subjects(subject.clone()).await {
                Ok(mut info) => {
                    let mut n = 0;
                    while let Some(Ok((_, c))) = info.next().await {
                        n += c;
                    }
                    n.to_string()
                }
                Err(e) => format!("? ({e})"),
            };
            line.push_str(&format!("; {subject} holds {n}"));
        }
        out.push(line);
        for q in [seq.wrapping_sub(1), seq + 1] {
            let near: Vec<String> = (by_job.get(&(name.as_str(), q)).into_iter().flatten())
                .map(|&i| copies[i].describe(t0_ms))
                .collect();
            let ack = (acks[k].get(q as usize)).map_or(String::new(), |a| {
                format!(
                    "WEIR_JOBS seq {} at {:+.2} s",
                    a.stream_seq,
                    a.at_ms as f64 / 1000.0
                )
            });
            out.push(format!(
                "  job {q} ({ack}): {}",
                if near.is_empty() {
                    "nowhere".to_string()
                } else {
                    near.join(" and ")
                }
            ));
        }
    }
    out
}

/// Every message of `stream`, in order.
async fn read(js: &Context, stream: &'static str) -> Result<Vec<Copy>, async_nats::Error> {
    let mut s = js.get_stream(stream).await?;
    let total = s.info().await?.state.messages;
    let mut out = Vec::new();
    if total == 0 {
        return Ok(out);
    }
    let mut msgs = (s.create_consumer(OrderedConfig::default()).await?)
        .messages()
        .await?;
    for _ in 0..total {
        let m = tokio::time::timeout(Duration::from_secs(30), msgs.next())
            .await?
            .ok_or("the consumer ended early")??;
        let get = |name: &str| (m.headers.as_ref()?.get(name)).map(|v| v.as_str().to_string());
        let Some((key, seq)) = crate::ledger::parse(&m.payload) else {
            continue;
        };
        let key = key
            .unwrap_or_else(|| m.subject.rsplit('.').next().unwrap_or_default())
            .to_string();
        let src_seq = get(header::MSG_ID)
            .and_then(|id| id.strip_prefix(&format!("{JOBS_STREAM}:"))?.parse().ok());
        out.push(Copy {
            stream,
            stream_seq: m.info().map_or(0, |i| i.stream_sequence),
            key,
            seq,
            src_seq,
            parked: get(header::SOURCE_SEQ).is_some(),
            released_at: get(header::RELEASED_AT).and_then(|v| v.parse().ok()),
        });
    }
    Ok(out)
}
