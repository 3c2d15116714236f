//! Jobs and their subjects: the naming contract producers and workers depend on.
//!
//! | what | subject | stream |
//! |---|---|---|
//! | a producer's job | `jobs.<destination>.<key>` | `WEIR_JOBS` (stored as `weir.in.<partition>.<destination>.<key>`) |
//! | a released job | `released.<destination>.<key>` | `WEIR_RELEASED` |
//! | a parked job | `park.<partition>.<key>` | `WEIR_PARK` |
//! | a dead job | `dead.<destination>.<key>` or `dead.invalid` | `WEIR_DEAD` |
//!
//! `WEIR_JOBS` rewrites `jobs.*.*` on arrival with a deterministic `partition()` subject transform,
//! so a partition is just a subject filter; subjects that do not match keep their `jobs.` form and
//! are dead-lettered by the triage consumer.

use std::fmt;

/// Header names Weir adds. Producers' own headers are always kept.
pub mod header {
    pub const KEY: &str = "Weir-Key";
    pub const DESTINATION: &str = "Weir-Destination";
    pub const ENQUEUED_AT: &str = "Weir-Enqueued-At";
    pub const RELEASED_AT: &str = "Weir-Released-At";
    pub const DEAD_REASON: &str = "Weir-Dead-Reason";
    /// The subject a dead job arrived on.
    pub const SUBJECT: &str = "Weir-Subject";
    /// On parked jobs: the job's sequence in `WEIR_JOBS`, which orders a key's jobs and derives
    /// the release's `Nats-Msg-Id`.
    pub const SOURCE_SEQ: &str = "Weir-Source-Seq";
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// The producer's own `Nats-Msg-Id`, kept when Weir sets the job's derived one: JetStream
    /// deduplicates producers' ids only within `WEIR_JOBS`' duplicate window, so two stored jobs
    /// may share one, and a release or dead letter carrying it could be dropped as a duplicate.
    pub const PRODUCER_MSG_ID: &str = "Weir-Producer-Msg-Id";
    /// A job's id, set by its producer: Weir keeps its status ([`crate::status`]) only for jobs
    /// that carry one.
    pub const JOB_ID: &str = "Weir-Job-Id";
    /// On parked jobs with a [`JOB_ID`]: when the job was parked (Unix ms), so that later
    /// status records can carry it.
    pub const PARKED_AT: &str = "Weir-Parked-At";
    /// How often a job taken through the SHARQ API may be handed out again after it expired
    /// unfinished (-1: forever), set by its enqueue ([`crate::sharq`]).
    pub const REQUEUE_LIMIT: &str = "Weir-Requeue-Limit";
}

pub const JOBS_STREAM: &str = "WEIR_JOBS";
pub const RELEASED_STREAM: &str = "WEIR_RELEASED";
pub const PARK_STREAM: &str = "WEIR_PARK";
pub const DEAD_STREAM: &str = "WEIR_DEAD";

/// Longest key or destination accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 256;

/// Prefix of the stored (partitioned) form of a job subject.
pub const STORED_PREFIX: &str = "weir.in";

/// The partition transform `WEIR_JOBS` applies: hash the key token only, so all of a key's jobs,
/// whatever their destination, land in one partition and one FIFO.
pub fn partition_transform(partitions: u16) -> (String, String) {
    (
        "jobs.*.*".to_string(),
        format!("{STORED_PREFIX}.{{{{partition({partitions},2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"),
    )
}

/// The partition nats-server's `{{partition(n,2)}}` transform puts a key in: FNV-1a (32 bit) of
/// the key token, modulo `n`. For tools and tests; Weir itself never needs to compute it.
pub fn partition_of(key: &str, partitions: u16) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % u32::from(partitions.max(1))) as u16
}

/// The consumer filter of one partition.
pub fn partition_filter(partition: u16) -> String {
    format!("{STORED_PREFIX}.{partition}.*.*")
}

pub fn park_subject(partition: u16, key: &str) -> String {
    format!("park.{partition}.{key}")
}

pub fn released_subject(dest: &str, key: &str) -> String {
    let mut s = String::with_capacity(10 + dest.len() + key.len());
    s.push_str("released.");
    s.push_str(dest);
    s.push('.');
    s.push_str(key);
    s
}

/// Where a job was headed, borrowed from its stored subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    pub partition: u16,
    pub dest: &'a str,
    pub key: &'a str,
}

/// Why a job cannot be handled; it becomes the `Weir-Dead-Reason` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadReason {
    /// The subject is not `jobs.<destination>.<key>`.
    BadSubject { tokens: usize },
    /// The key or destination is not a valid token.
    BadToken {
        which: &'static str,
        problem: TokenError,
    },
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadReason::BadSubject { tokens } => write!(
                f,
                "subject must be jobs.<destination>.<key> (3 tokens), got {tokens} token(s)"
            ),
            DeadReason::BadToken { which, problem } => write!(f, "{which} {problem}"),
        }
    }
}

/// What is wrong with a key or destination token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Empty,
    TooLong(usize),
    BadChar,
}

impl TokenError {
    /// How to fix it, for config errors.
    pub fn fix(&self) -> &'static str {
        match self {
            TokenError::Empty => "a key must not be empty",
            TokenError::TooLong(_) => "a key must be at most 256 bytes",
            TokenError::BadChar => {
                "a key must not contain '.', '*', '>', whitespace or control characters"
            }
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Empty => f.write_str("is empty"),
            TokenError::TooLong(n) => write!(f, "is {n} bytes, longer than {MAX_TOKEN_LEN}"),
            TokenError::BadChar => {
                f.write_str("contains '.', '*', '>', whitespace or a control character")
            }
        }
    }
}

/// Checks one subject token (a key or a destination).
pub fn check_token(t: &str) -> Result<(), TokenError> {
    if t.is_empty() {
        return Err(TokenError::Empty);
    }
    if t.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong(t.len()));
    }
    // Bytes first (keys are nearly always ASCII); chars only when there is non-ASCII.
    let bad_ascii = |b: u8| b <= b' ' || b == 0x7f || matches!(b, b'.' | b'*' | b'>');
    if t.bytes().any(bad_ascii)
        || (!t.is_ascii() && t.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(TokenError::BadChar);
    }
    Ok(())
}

/// Parses a stored job subject `weir.in.<partition>.<destination>.<key>`.
pub fn parse_stored(subject: &str) -> Result<Route<'_>, DeadReason> {
    let rest = subject
        .strip_prefix(STORED_PREFIX)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or(DeadReason::BadSubject {
            tokens: count_tokens(subject),
        })?;
    let mut it = rest.splitn(3, '.');
    let (Some(p), Some(dest), Some(key)) = (it.next(), it.next(), it.next()) else {
        return Err(DeadReason::BadSubject {
            tokens: count_tokens(subject),
        });
    };
    let partition = p.parse().map_err(|_| DeadReason::BadSubject {
        tokens: count_tokens(subject),
    })?;
    check_token(dest).map_err(|problem| DeadReason::BadToken {
        which: "destination",
        problem,
    })?;
    check_token(key).map_err(|problem| DeadReason::BadToken {
        which: "key",
        problem,
    })?;
    Ok(Route {
        partition,
        dest,
        key,
    })
}

/// Why a subject left in its `jobs.` form (the transform did not match it) is invalid: the
/// count of tokens, or for `jobs.<destination>.<key>` with a wildcard token (the transform does
/// not rewrite those), the token at fault.
pub fn triage(subject: &str) -> DeadReason {
    let tokens = count_tokens(subject);
    if let (3, Some(rest)) = (tokens, subject.strip_prefix("jobs.")) {
        if let Some((dest, key)) = rest.split_once('.') {
            for (which, t) in [("destination", dest), ("key", key)] {
                if let Err(problem) = check_token(t) {
                    return DeadReason::BadToken { which, problem };
                }
            }
        }
    }
    DeadReason::BadSubject { tokens }
}

fn count_tokens(s: &str) -> usize {
    s.split('.').count()
}

/// The dead-letter subject for a job: `dead.<destination>.<key>` when both are valid tokens,
/// else `dead.invalid`.
pub fn dead_subject(route: Option<(&str, &str)>) -> String {
    match route {
        Some((d, k)) if check_token(d).is_ok() && check_token(k).is_ok() => {
            format!("dead.{d}.{k}")
        }
        _ => "dead.invalid".to_string(),
    }
}

/// The `Nats-Msg-Id` of every release, park and dead letter: unique per source message, so a
/// re-release after a crash is dropped by the duplicate window of `WEIR_RELEASED`, and two jobs
/// never share one (a producer's id is moved to [`header::PRODUCER_MSG_ID`]).
pub fn derived_msg_id(source_seq: u64) -> String {
    format!("{JOBS_STREAM}:{source_seq}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_subjects_parse() {
        let r = parse_stored("weir.in.3.sms.acme").unwrap();
        assert_eq!(
            r,
            Route {
                partition: 3,
                dest: "sms",
                key: "acme"
            }
        );
        assert!(matches!(
            parse_stored("weir.in.3.sms"),
            Err(DeadReason::BadSubject { .. })
        ));
    }

    #[test]
    fn tokens_are_checked() {
        assert_eq!(check_token(""), Err(TokenError::Empty));
        assert_eq!(check_token(&"k".repeat(257)), Err(TokenError::TooLong(257)));
        assert!(check_token(&"k".repeat(256)).is_ok());
        assert_eq!(check_token("a b"), Err(TokenError::BadChar));
        assert_eq!(check_token("a\u{7}"), Err(TokenError::BadChar));
        assert!(check_token("gold-acme_1").is_ok());
        let long = format!("weir.in.0.sms.{}", "k".repeat(300));
        let e = parse_stored(&long).unwrap_err().to_string();
        assert!(e.contains("key is 300 bytes"), "{e}");
    }

    #[test]
    fn reasons_read_well() {
        assert_eq!(
            triage("jobs.onlyone").to_string(),
            "subject must be jobs.<destination>.<key> (3 tokens), got 2 token(s)"
        );
        assert_eq!(dead_subject(Some(("sms", "acme"))), "dead.sms.acme");
        assert_eq!(dead_subject(Some(("sms", ""))), "dead.invalid");
        assert_eq!(dead_subject(None), "dead.invalid");
    }

    #[test]
    fn partition_of_matches_what_the_server_did() {
        // Seen on nats-server 2.15 with 4 partitions.
        for (k, p) in [("acme", 3), ("b", 1), ("hot", 0), ("cold1", 2)] {
            assert_eq!(partition_of(k, 4), p, "{k}");
        }
    }

    #[test]
    fn the_transform_hashes_the_key_token() {
        let (src, dest) = partition_transform(16);
        assert_eq!(src, "jobs.*.*");
        assert_eq!(
            dest,
            "weir.in.{{partition(16,2)}}.{{wildcard(1)}}.{{wildcard(2)}}"
        );
    }
}
