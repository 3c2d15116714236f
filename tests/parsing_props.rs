//! Property tests of what Weir parses from strangers: job subjects (from any producer) and limit
//! entries (from anyone who can write the `WEIR_LIMITS` bucket). Nothing may panic; what is
//! refused is refused with a reason; what the docs call valid is accepted.
//!
//! Fuzzing (cargo-fuzz) needs a nightly toolchain, which the project's machines do not have, so
//! these use proptest (stable), with generators biased towards the edges: separators, wildcards,
//! control and non-ASCII whitespace, lengths around 256 bytes, numbers at and past their limits.

use proptest::prelude::*;

use weir::config::Rate;
use weir::job::{
    self, check_token, dead_subject, parse_stored, released_subject, DeadReason, TokenError,
};
use weir::limits::{parse_value, Entry, LimitError, Limits};

/// Characters that make a token interesting: separators, wildcards, whitespace, controls.
fn nasty_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => proptest::char::range('a', 'z'),
        1 => Just('.'),
        1 => Just('*'),
        1 => Just('>'),
        1 => Just(' '),
        1 => Just('\t'),
        1 => Just('\u{7f}'),
        1 => Just('\u{0}'),
        1 => Just('\u{a0}'),
        1 => Just('\u{2028}'),
        1 => Just('é'),
        1 => Just('-'),
        1 => any::<char>(),
    ]
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::collection::vec(nasty_char(), 0..12).prop_map(|v| v.into_iter().collect()),
        1 => (250usize..262).prop_map(|n| "k".repeat(n)),
        1 => (84usize..90).prop_map(|n| "é".repeat(n) + "kk"),
    ]
}

/// The documented rule for a token, written independently of `check_token`.
fn is_valid_token(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= job::MAX_TOKEN_LEN
        && !t
            .chars()
            .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
}

proptest! {
    #[test]
    fn check_token_accepts_exactly_valid_tokens(t in token()) {
        let r = check_token(&t);
        prop_assert_eq!(r.is_ok(), is_valid_token(&t), "{:?} -> {:?}", t, r);
        match r {
            Err(TokenError::Empty) => prop_assert!(t.is_empty()),
            Err(TokenError::TooLong(n)) => prop_assert_eq!(n, t.len()),
            _ => {}
        }
    }

    #[test]
    fn stored_subjects_parse_or_say_why(p in any::<u16>(), dest in token(), key in token()) {
        let subject = format!("weir.in.{p}.{dest}.{key}");
        match parse_stored(&subject) {
            Ok(r) => {
                prop_assert!(is_valid_token(&dest) && is_valid_token(&key));
                prop_assert_eq!((r.partition, r.dest, r.key), (p, dest.as_str(), key.as_str()));
                // Round trip: the released subject carries the same destination and key.
                let rel = released_subject(r.dest, r.key);
                prop_assert_eq!(rel, format!("released.{dest}.{key}"));
                prop_assert_eq!(dead_subject(Some((r.dest, r.key))), format!("dead.{dest}.{key}"));
            }
            Err(reason) => {
                prop_assert!(!is_valid_token(&dest) || !is_valid_token(&key));
                prop_assert!(!reason.to_string().is_empty());
                // A reason names its problem: bad tokens say which.
                if let DeadReason::BadToken { which, .. } = &reason {
                    prop_assert!(reason.to_string().starts_with(which));
                }
                prop_assert_eq!(
                    dead_subject(Some((&dest, &key))) == "dead.invalid",
                    true
                );
            }
        }
    }

    #[test]
    fn arbitrary_subjects_never_panic(s in ".{0,300}") {
        let _ = parse_stored(&s);
        let reason = job::triage(&s);
        prop_assert!(!reason.to_string().is_empty());
        let _ = dead_subject(s.split_once('.'));
    }

    #[test]
    fn triage_names_the_problem(tokens in proptest::collection::vec(token(), 0..6)) {
        let subject = std::iter::once("jobs".to_string()).chain(tokens.iter().cloned()).collect::<Vec<_>>().join(".");
        // A generated token may hold a '.': judge the subject's own tokens, not the generated ones.
        let parts: Vec<&str> = subject.split('.').collect();
        let n = parts.len();
        let reason = job::triage(&subject).to_string();
        if n != 3 {
            prop_assert!(reason.contains(&format!("got {n} token(s)")), "{}", reason);
        } else if !is_valid_token(parts[1]) {
            prop_assert!(reason.starts_with("destination"), "{}", reason);
        } else if !is_valid_token(parts[2]) {
            prop_assert!(reason.starts_with("key"), "{}", reason);
        }
    }

    #[test]
    fn dead_letter_subject_header_is_bounded(s in "[a-zé.]{0,3000}") {
        let h = weir::dead::subject_header(&s);
        prop_assert!(h.len() <= weir::dead::MAX_SUBJECT_HEADER);
        if s.len() <= weir::dead::MAX_SUBJECT_HEADER {
            prop_assert_eq!(h, s);
        }
    }
}

/// Rate strings near and past the edges of what the docs allow.
fn rate_string() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        (0u32..=1_000_000_000).prop_map(|n| n.to_string()),
        Just("1e99".to_string()),
        Just("-1".to_string()),
        Just("NaN".to_string()),
        Just("inf".to_string()),
        Just("0.5".to_string()),
        Just("1000000001".to_string()),
        Just("".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
    ];
    let unit = prop_oneof![
        Just("s"),
        Just("m"),
        Just("h"),
        Just("d"),
        Just(""),
        Just("S")
    ];
    prop_oneof![
        4 => (number, unit).prop_map(|(n, u)| format!("{n}/{u}")),
        1 => ".{0,20}",
    ]
}

/// The documented rule: a whole number from 0 to 1e9, `/`, and `s`, `m` or `h`.
fn is_valid_rate(s: &str) -> bool {
    let Some((n, u)) = s.trim().split_once('/') else {
        return false;
    };
    let n = n.trim();
    let digits = n.strip_prefix('+').unwrap_or(n);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.parse::<u64>().is_ok_and(|v| v <= 1_000_000_000)
        && matches!(u.trim(), "s" | "m" | "h")
}

proptest! {
    #[test]
    fn rates_accept_exactly_what_the_docs_say(s in rate_string()) {
        let r = s.parse::<Rate>();
        prop_assert_eq!(r.is_ok(), is_valid_rate(&s), "{:?} -> {:?}", s, r);
        if let Ok(rate) = r {
            // Display round-trips.
            prop_assert_eq!(rate.to_string().parse::<Rate>(), Ok(rate));
        }
    }

    #[test]
    fn limit_json_is_accepted_or_refused_with_a_reason(
        rate in rate_string(),
        burst in prop_oneof![any::<i64>(), 0i64..=1_000_001, Just(i64::MAX), Just(-1)],
    ) {
        let v = serde_json::json!({ "rate": rate, "burst": burst }).to_string();
        match parse_value(&Entry::Key("k".into()), v.as_bytes()) {
            Ok((limit, None)) => {
                prop_assert!(is_valid_rate(&rate) && (1..=1_000_000).contains(&burst));
                prop_assert_eq!(i64::from(limit.burst), burst);
            }
            Ok((_, Some(_))) => prop_assert!(false, "a key entry never has a pattern"),
            Err(e) => {
                prop_assert!(!is_valid_rate(&rate) || !(1..=1_000_000).contains(&burst));
                let text = e.to_string();
                match e {
                    LimitError::Rate(..) => prop_assert!(text.contains("rate")),
                    LimitError::Burst(_) => prop_assert!(text.contains("burst")),
                    other => prop_assert!(false, "unexpected refusal {other:?}"),
                }
            }
        }
    }

    /// Arbitrary bytes as a bucket entry (keys and values): never a panic; a refusal leaves the
    /// table as it was.
    #[test]
    fn arbitrary_bucket_entries_never_panic(
        key in prop_oneof![
            Just("default".to_string()),
            "keys\\.[a-z=0-9A-F]{0,8}",
            "patterns\\.[a-z]{0,4}",
            "destinations\\.[a-z=]{0,6}",
            ".{0,16}",
        ],
        value in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            "\\{\"rate\": \"[-0-9e.NaInf]{0,6}/[smhd]\"(, \"burst\": -?[0-9]{1,20})?(, \"pattern\": \"[a-z*.>]{0,5}\")?\\}"
                .prop_map(String::into_bytes),
        ],
    ) {
        let config = weir::config::Config::from_toml("", "t", &Default::default()).unwrap();
        let mut table = Limits::from_config(&config);
        let before = table.clone();
        match table.apply(&key, Some(&value), 7) {
            Ok(_) => {}
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                prop_assert_eq!(&table, &before, "a refused entry changes nothing");
            }
        }
        let _ = table.apply(&key, None, 8);
    }
}

/// proptest's find: a generated destination `a.` makes `jobs.a.`, whose key is empty.
#[test]
fn a_dot_inside_a_token_makes_the_next_token_empty() {
    assert!(job::triage("jobs.a.").to_string().starts_with("key"));
}
