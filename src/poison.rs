//! Stored jobs the NATS client cannot read ("poison"), found and dead-lettered.
//!
//! nats-server stores a job's header block and subject as the producer sent them. async-nats
//! (0.51) parses every message it receives (`try_read_op`, the `MSG`/`HMSG` branches) and, when
//! it cannot, treats that as a broken connection: it drops the whole connection and reconnects,
//! logging at debug only, and the message never reaches a subscriber. A job like that would
//! never reach its partition; JetStream would redeliver it after every `ack_wait`, and each time
//! the connection (and every partition's deliveries in flight on it) would break again.
//!
//! [`check`] applies the parser's rules to a message's raw subject and header block and names
//! what it would fail on. [`sweep()`] reads a partition's unacked jobs through the JSON message
//! get (`$JS.API.STREAM.MSG.GET`), which carries the stored headers base64-encoded inside JSON
//! and so cannot trip the parser, dead-letters each unreadable one with its payload intact and
//! its original header block in `Weir-Raw-Headers`, and only then deletes it from `WEIR_JOBS`.
//! A partition sweeps after every reconnect of the client (a poison's only visible trace), and
//! when listing its unacked jobs at start failed because the connection broke. After a
//! reconnect it reads only what it cannot account for: the jobs it holds unacked were read, so
//! are readable; when the consumer counts no other unacked job the sweep is one info request,
//! and otherwise it walks the gaps between the held jobs, several at a time
//! ([`sweep::Unacked`]). Nothing is added to the per-job path.

pub mod sweep;
pub use sweep::{sweep, sweep_all, Swept, Unacked};

/// The `weir.dead_reason` metric kind for a job async-nats cannot read.
pub const UNREADABLE: &str = "unreadable";

/// The header block's first line, as async-nats requires it.
const VERSION: &str = "NATS/1.0";

/// Why async-nats cannot read a stored message, or `Ok` when it can.
///
/// `subject` is the stored subject; `headers` the raw header block (`None` when the message has
/// none). The rules are those of async-nats 0.51's `try_read_op`: the control line must be UTF-8
/// (and, with headers, is split on any Unicode whitespace); the header block must be UTF-8, begin
/// with `NATS/1.0` and an optional numeric status; each further non-empty line must be
/// `name: value` (continuation lines start with whitespace), the name printable ASCII, the value
/// (trimmed, continuations joined) without a carriage return (async-nats would panic on it). A
/// block with a status is reported too, as a consumer would take it for the server's status
/// message; but nats-server (2.15) strips a published status line when it stores the job
/// (`NATS/1.0 503` is stored as `NATS/1.0`), so such a job is released like any other
/// (`tests/hostile.rs`).
pub fn check(subject: &[u8], headers: Option<&[u8]>) -> Result<(), String> {
    let subject = std::str::from_utf8(subject)
        .map_err(|e| format!("subject is not valid UTF-8 (byte {})", e.valid_up_to()))?;
    let Some(block) = headers else {
        return Ok(());
    };
    if let Some((i, c)) = subject.char_indices().find(|(_, c)| c.is_whitespace()) {
        return Err(format!(
            "subject contains whitespace (U+{:04X} at byte {i}), which async-nats cannot read in a message with headers",
            c as u32
        ));
    }
    let text = std::str::from_utf8(block)
        .map_err(|e| format!("header block is not valid UTF-8 (byte {})", e.valid_up_to()))?;
    let mut lines = text.lines().enumerate().peekable();
    let (_, first) = lines.next().ok_or("header block is empty")?;
    let rest = first.strip_prefix(VERSION).ok_or_else(|| {
        format!(
            "header block does not begin with {VERSION} (first line {:?})",
            cut(first)
        )
    })?;
    let status = rest.trim().split_once(' ').map_or(rest.trim(), |(s, _)| s);
    if !status.is_empty() {
        return Err(match status.parse::<u16>() {
            Ok(n) if (100..1000).contains(&n) => format!(
                "header block carries a status ({VERSION} {n}), which a consumer takes for the server's"
            ),
            _ => format!("header block has a status async-nats cannot parse ({:?})", cut(status)),
        });
    }
    while let Some((i, line)) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let n = i + 1;
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("header line {n} has no ':' ({:?})", cut(line)))?;
        if name.contains(|c: char| !c.is_ascii_graphic()) {
            return Err(format!(
                "header name on line {n} ({:?}) has a character other than printable ASCII",
                cut(name)
            ));
        }
        let mut value = value.trim_start().to_owned();
        while let Some((_, more)) = lines.next_if(|(_, s)| s.starts_with(char::is_whitespace)) {
            value.push_str(more);
        }
        if value.trim_end().contains(['\r', '\n']) {
            return Err(format!(
                "header value on line {n} ({name}) contains a carriage return"
            ));
        }
    }
    Ok(())
}

/// The producer headers of a block that async-nats could not read, those that can be kept as
/// they are (valid name, UTF-8 value without a carriage return); the rest survive only in the
/// raw block. Lenient by design: any bytes give some (possibly empty) map.
pub fn salvage(block: &[u8]) -> async_nats::HeaderMap {
    use async_nats::header::{HeaderName, HeaderValue};
    let mut h = async_nats::HeaderMap::new();
    for line in block.split(|&b| b == b'\n').skip(1) {
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            name.parse::<HeaderName>(),
            value.trim().parse::<HeaderValue>(),
        ) else {
            continue;
        };
        h.append(name, value);
    }
    h
}

/// At most 64 characters of `s`, for a reason.
fn cut(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bad(subject: &[u8], h: &[u8]) -> String {
        check(subject, Some(h)).expect_err("unreadable")
    }

    #[test]
    fn readable_blocks_pass() {
        assert_eq!(check(b"weir.in.0.sms.acme", None), Ok(()));
        let ok: &[&[u8]] = &[
            b"NATS/1.0\r\n\r\n",
            b"NATS/1.0\r\nX-A: 1\r\nX-B: two words\r\n\r\n",
            b"NATS/1.0\r\nX-A: folded\r\n  on\r\n\r\n",
            b"NATS/1.0\r\nX-A: \xc3\xa9t\xc3\xa9\r\n\r\n",
            b"NATS/1.0\r\nX-A: trailing cr\r\r\n\r\n",
            b"NATS/1.0\r\n: empty name\r\n\r\n",
        ];
        for h in ok {
            assert_eq!(check(b"weir.in.0.sms.acme", Some(h)), Ok(()), "{h:?}");
        }
    }

    #[test]
    fn each_problem_is_named() {
        let s = b"weir.in.0.sms.acme";
        assert_eq!(
            check(b"weir.in.0.sms.\xff", None),
            Err("subject is not valid UTF-8 (byte 14)".into())
        );
        assert!(
            bad("weir.in.0.sms.nb\u{a0}sp".as_bytes(), b"NATS/1.0\r\n\r\n")
                .starts_with("subject contains whitespace (U+00A0 at byte 16)")
        );
        assert_eq!(
            check("weir.in.0.sms.nb\u{a0}sp".as_bytes(), None),
            Ok(()),
            "without headers async-nats splits the line on spaces only"
        );
        assert_eq!(
            bad(s, b"NATS/1.0\r\nX-Bad: \xff\xfe\r\n\r\n"),
            "header block is not valid UTF-8 (byte 17)"
        );
        assert_eq!(
            bad(s, b"NATS/1.0\r\nX-\xc3\xa9: v\r\n\r\n"),
            "header name on line 2 (\"X-\u{e9}\") has a character other than printable ASCII"
        );
        assert_eq!(
            bad(s, b"NATS/1.0\r\nX-Ok: 1\r\nno colon here\r\n\r\n"),
            "header line 3 has no ':' (\"no colon here\")"
        );
        assert!(bad(s, b"HTTP/1.1\r\nX-A: 1\r\n\r\n")
            .starts_with("header block does not begin with NATS/1.0"));
        assert_eq!(bad(s, b""), "header block is empty");
        assert!(bad(s, b"NATS/1.0 503\r\n\r\n").contains("carries a status"));
        assert!(bad(s, b"NATS/1.0 abc\r\n\r\n").contains("cannot parse"));
        assert_eq!(
            bad(s, b"NATS/1.0\r\nX-A: a\rb\r\n\r\n"),
            "header value on line 2 (X-A) contains a carriage return"
        );
    }

    #[test]
    fn salvage_keeps_what_can_be_read() {
        let h = salvage(b"NATS/1.0\r\nX-Ok: 1\r\nX-Bad: \xff\r\nnocolon\r\nX-Two: a b\r\n\r\n");
        assert_eq!(h.get("X-Ok").unwrap().as_str(), "1");
        assert_eq!(h.get("X-Two").unwrap().as_str(), "a b");
        assert_eq!(h.iter().count(), 2);
    }

    fn name() -> impl Strategy<Value = String> {
        "[!-9;-~]{1,20}"
    }

    fn value() -> impl Strategy<Value = String> {
        // Printable text, Unicode included, no CR or LF.
        "[^\r\n]{0,30}"
    }

    fn block(pairs: &[(String, String)]) -> Vec<u8> {
        let mut b = b"NATS/1.0\r\n".to_vec();
        for (k, v) in pairs {
            b.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        b.extend_from_slice(b"\r\n");
        b
    }

    proptest! {
        /// Whatever a client can send with valid names and values is readable.
        #[test]
        fn valid_headers_pass(pairs in prop::collection::vec((name(), value()), 0..8)) {
            prop_assert_eq!(check(b"weir.in.1.d.k", Some(&block(&pairs))), Ok(()));
        }

        /// A byte that breaks UTF-8 anywhere in the block is found, at its offset.
        #[test]
        fn invalid_utf8_is_found_where_it_is(
            pairs in prop::collection::vec((name(), value()), 1..6),
            at in any::<prop::sample::Index>(),
            byte in 0xf8u8..=0xff,
        ) {
            let mut b = block(&pairs);
            let i = at.index(b.len());
            // At a character boundary, so that the prefix stays valid.
            let i = (0..=i).rev().find(|&j| std::str::from_utf8(&b[..j]).is_ok()).unwrap();
            b.insert(i, byte);
            prop_assert_eq!(
                check(b"weir.in.1.d.k", Some(&b)),
                Err(format!("header block is not valid UTF-8 (byte {i})"))
            );
        }

        /// Never panics, and whatever it accepts has a `NATS/1.0` first line.
        #[test]
        fn arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..64), s in prop::collection::vec(any::<u8>(), 0..16)) {
            if check(&s, Some(&b)).is_ok() {
                prop_assert!(b.starts_with(VERSION.as_bytes()));
            }
            let _ = salvage(&b);
        }
    }
}
