//! The job ledger: reads what Weir stored in `WEIR_RELEASED` and `WEIR_DEAD` and says, per key,
//! what was released once, twice, out of order, dead or missing, and how far a key's releases
//! ran over its GCRA bound. `weir bench --only scale` and `weir chaos` check their runs with it.
//!
//! A job is identified by its payload: the first 8 bytes are its sequence within its key
//! (big-endian, from 0, as [`crate::load`] writes them); [`payload`] may append `|<key>`, so a
//! dead job whose subject no longer names its key (`dead.invalid`) can still be attributed.
//! Without that suffix the key is the subject's last token.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::jetstream::{consumer::pull::OrderedConfig, Context};
use bytes::Bytes;
use futures::StreamExt;

use crate::config::Limit;
use crate::job::header;

/// Why a stream could not be read through.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("reading {stream}: {message}; is nats-server reachable and the stream there?")]
    Nats { stream: String, message: String },
    #[error("reading {stream} stalled after {read} of {total} messages (no message for 30 s)")]
    Stalled {
        stream: String,
        read: u64,
        total: u64,
    },
    #[error("{stream} holds a job without a sequence in its payload (subject {subject}): the ledger needs payloads of 8 bytes or more, as `weir load` and `weir chaos` write them")]
    NoSequence { stream: String, subject: String },
}

/// A job payload naming its key and its sequence within the key.
pub fn payload(key: &str, seq: u64) -> Bytes {
    let mut b = Vec::with_capacity(9 + key.len());
    b.extend_from_slice(&seq.to_be_bytes());
    b.push(b'|');
    b.extend_from_slice(key.as_bytes());
    Bytes::from(b)
}

/// `(key, sequence)` of a payload; the key is `None` when the payload does not carry it.
pub fn parse(payload: &[u8]) -> Option<(Option<&str>, u64)> {
    let seq = crate::load::seq_of(payload)?;
    let key = (payload.get(8) == Some(&b'|'))
        .then(|| std::str::from_utf8(&payload[9..]).ok())
        .flatten();
    Some((key, seq))
}

/// One key's jobs as found in a stream.
#[derive(Debug, Default, Clone)]
pub struct KeyLog {
    /// Which sequences were seen (index = sequence).
    pub seen: Vec<bool>,
    /// The highest sequence seen so far, while reading in stream order.
    pub max: Option<u64>,
    /// `Weir-Released-At` of each stored copy, in stream order (Unix ms).
    pub released_at: Vec<u64>,
}

/// What one stream holds, by key.
#[derive(Debug, Default)]
pub struct Ledger {
    pub keys: HashMap<String, KeyLog>,
    pub messages: u64,
    /// Jobs stored more than once.
    pub duplicates: u64,
    /// Jobs stored after a later job of their key (first copies only).
    pub out_of_order: u64,
    /// Dead jobs by `Weir-Dead-Reason`.
    pub reasons: BTreeMap<String, u64>,
    /// The first few jobs stored out of order: `(key, sequence, the key's highest before it,
    /// stream sequence)`.
    pub reorders: Vec<(String, u64, u64, u64)>,
}

impl Ledger {
    /// Whether `key`'s job `seq` is in the stream.
    pub fn has(&self, key: &str, seq: u64) -> bool {
        (self.keys.get(key)).is_some_and(|k| k.seen.get(seq as usize) == Some(&true))
    }

    /// Distinct jobs found.
    pub fn distinct(&self) -> u64 {
        self.messages - self.duplicates
    }

    fn add(&mut self, key: &str, seq: u64, released_at: Option<u64>, stream_seq: u64) {
        let log = match self.keys.get_mut(key) {
            Some(l) => l,
            None => self.keys.entry(key.to_string()).or_default(),
        };
        let i = seq as usize;
        if log.seen.len() <= i {
            log.seen.resize(i + 1, false);
        }
        self.messages += 1;
        if std::mem::replace(&mut log.seen[i], true) {
            self.duplicates += 1;
        } else {
            if let Some(m) = log.max.filter(|m| seq < *m) {
                self.out_of_order += 1;
                if self.reorders.len() < 10 {
                    self.reorders.push((key.to_string(), seq, m, stream_seq));
                }
            }
            log.max = log.max.max(Some(seq));
        }
        if let Some(t) = released_at {
            log.released_at.push(t);
        }
    }
}

/// Reads `stream` once through, in stream order, with an ordered consumer.
pub async fn read(js: &Context, stream: &str) -> Result<Ledger, LedgerError> {
    let nats = |e: &dyn std::fmt::Display| LedgerError::Nats {
        stream: stream.to_string(),
        message: e.to_string(),
    };
    let mut s = js.get_stream(stream).await.map_err(|e| nats(&e))?;
    let total = s.info().await.map_err(|e| nats(&e))?.state.messages;
    let mut ledger = Ledger::default();
    if total == 0 {
        return Ok(ledger);
    }
    let consumer = (s.create_consumer(OrderedConfig::default()).await).map_err(|e| nats(&e))?;
    let mut msgs = consumer.messages().await.map_err(|e| nats(&e))?;
    for read in 0..total {
        let m = tokio::time::timeout(Duration::from_secs(30), msgs.next())
            .await
            .map_err(|_| LedgerError::Stalled {
                stream: stream.to_string(),
                read,
                total,
            })?
            .ok_or_else(|| nats(&"the consumer ended early"))?
            .map_err(|e| nats(&e))?;
        let get = |name: &str| (m.headers.as_ref()?.get(name)).map(|v| v.as_str().to_string());
        let (key, seq) = parse(&m.payload).ok_or_else(|| LedgerError::NoSequence {
            stream: stream.to_string(),
            subject: m.subject.to_string(),
        })?;
        let key = key.unwrap_or_else(|| m.subject.rsplit('.').next().unwrap_or_default());
        let at = get(header::RELEASED_AT).and_then(|v| v.parse().ok());
        if let Some(reason) = get(header::DEAD_REASON) {
            *ledger.reasons.entry(reason).or_default() += 1;
        }
        let stream_seq = m.info().map_or(0, |i| i.stream_sequence);
        ledger.add(key, seq, at, stream_seq);
    }
    Ok(ledger)
}

/// The most releases by which any window of `times` (Unix ms, any order) exceeds the GCRA bound
/// `burst + floor(t/T) + 1`, and 0 if none does. The `+ 1` is for the measurement, as in the
/// tests: the stamps are whole milliseconds (a true span may exceed the stamped one by < 1 ms,
/// which can cross one period boundary) and are taken just after the token.
///
/// Exact in O(n log n): with `a = t × count` and `P` the limit's period in ms, a window from
/// release i to j (sorted) holds `j - i + 1` releases and allows `burst + 1 + floor((a_j -
/// a_i) / P)`; writing `a = qP + r`, that floor is `q_j - q_i - [r_j < r_i]`. So each j needs
/// the largest `q_i - i` over earlier i, and over earlier i with `r_i > r_j` (a max-Fenwick
/// tree over the ranks of r).
pub fn gcra_overshoot(times: &[u64], limit: Limit) -> u64 {
    if times.is_empty() || limit.rate.is_paused() {
        return 0;
    }
    let mut t = times.to_vec();
    t.sort_unstable();
    let per_ms = limit.rate.per.as_millis();
    let count = u128::from(limit.rate.count);
    let qr: Vec<(i128, u128)> = (t.iter())
        .map(|&x| {
            let a = u128::from(x - t[0]) * count;
            ((a / per_ms) as i128, a % per_ms)
        })
        .collect();
    // Ranks of r, largest first, so "r_i > r_j" is a prefix of the ranks.
    let mut rs: Vec<u128> = qr.iter().map(|&(_, r)| r).collect();
    rs.sort_unstable_by(|a, b| b.cmp(a));
    rs.dedup();
    let rank = |r: u128| rs.partition_point(|&x| x > r); // ranks of values > r: 0..rank
    let mut fen = vec![i128::MIN; rs.len() + 1];
    let (mut best_all, mut worst) = (i128::MIN, 0i128);
    let allowance = i128::from(limit.burst) + 1;
    for (j, &(q, r)) in qr.iter().enumerate() {
        let (j, v) = (j as i128, q - j as i128);
        best_all = best_all.max(v);
        // max over i <= j of (q_i - i), and +1 for those with r_i > r_j.
        let mut above = i128::MIN;
        let mut k = rank(r);
        while k > 0 {
            above = above.max(fen[k]);
            k &= k - 1;
        }
        let best = best_all.max(above.saturating_add(1));
        worst = worst.max(j - q + 1 - allowance + best);
        let mut k = rank(r) + 1; // this r's own rank, 1-based
        while k < fen.len() {
            fen[k] = fen[k].max(v);
            k += k & k.wrapping_neg();
        }
    }
    worst.max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rate;

    fn limit(count: u32, per_s: u64, burst: u32) -> Limit {
        let per = Duration::from_secs(per_s);
        Limit {
            rate: Rate { count, per },
            burst,
        }
    }

    /// The definition, in O(n²).
    fn brute(times: &[u64], l: Limit) -> u64 {
        let mut t = times.to_vec();
        t.sort_unstable();
        let per_ms = l.rate.per.as_millis() as u64;
        let mut worst = 0i64;
        for i in 0..t.len() {
            for j in i..t.len() {
                let allowed =
                    u64::from(l.burst) + 1 + (t[j] - t[i]) * u64::from(l.rate.count) / per_ms;
                worst = worst.max((j - i + 1) as i64 - allowed as i64);
            }
        }
        worst as u64
    }

    #[test]
    fn payloads_name_key_and_sequence() {
        assert_eq!(parse(&payload("hot-1", 7)), Some((Some("hot-1"), 7)));
        let plain = [0, 0, 0, 0, 0, 0, 0, 3, b'x', b'x'];
        assert_eq!(parse(&plain), Some((None, 3)));
        assert_eq!(parse(b"short"), None);
    }

    #[test]
    fn overshoot_is_zero_on_the_bound_and_counts_excess() {
        let l = limit(10, 1, 2); // T = 100 ms
        let paced: Vec<u64> = (0..50).map(|i| 1_000 + i * 100).collect();
        assert_eq!(gcra_overshoot(&paced, l), 0);
        // burst + 1 back to back, then paced: still within (the +1 is the stamps' slack).
        let mut b = vec![1_000; 3];
        b.extend((1..20).map(|i| 1_000 + i * 100));
        assert_eq!(gcra_overshoot(&b, l), 0);
        // Four more at one instant: 5 releases at t = 2000 where burst + 1 = 3 may leave.
        let mut over = paced.clone();
        over.extend([2_000, 2_000, 2_000, 2_000]);
        assert_eq!(gcra_overshoot(&over, l), brute(&over, l));
        assert_eq!(gcra_overshoot(&over, l), 2);
    }

    #[test]
    fn overshoot_matches_the_definition() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        for _ in 0..300 {
            let l = limit(1 + next(40) as u32, 1 + next(2) * 59, 1 + next(5) as u32);
            let n = next(60) as usize;
            let times: Vec<u64> = (0..n).map(|_| 5_000 + next(3_000)).collect();
            assert_eq!(
                gcra_overshoot(&times, l),
                brute(&times, l),
                "{l:?} {times:?}"
            );
        }
    }
}
