//! Which limit applies to a key, and the JSON form limits take in the `WEIR_LIMITS` bucket.
//!
//! Keys need no declaration: a key without an entry of its own gets the limit of the longest
//! tier pattern it matches, or else the default. Precedence: exact key > longest pattern >
//! default. A destination may also have a cap of its own, shared by every key sent to it.
//!
//! | bucket key | value | meaning |
//! |---|---|---|
//! | `default` | `{"rate": "20/s", "burst": 1}` | every key without a more specific limit |
//! | `keys.<key>` | `{"rate": "40/s", "burst": 10}` | one key |
//! | `patterns.<name>` | `{"pattern": "gold-*", "rate": "100/s", "burst": 10}` | keys matching a glob (`*` = any run of characters) |
//! | `destinations.<dest>` | `{"rate": "500/s", "burst": 50}` | the sum over all keys sent to a destination |
//!
//! A rate of `"0/s"` pauses: the key's jobs are kept (held, then parked) until it is raised.
//! Bucket keys may only hold `[-/_=.a-zA-Z0-9]`, so other bytes of a key or destination are
//! written `=XX` (hex), and `=` itself `=3D`: key `a@b` is stored as `keys.a=40b`.
//!
//! The table is an immutable snapshot: the limits watcher builds a new one for each change and
//! every partition swaps it in, so reading it needs no lock. It is consulted when a key's state
//! is created or a limit changes, never per job.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::config::{Config, Limit};
use crate::job;

pub mod store;

/// The limits in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    default: Limit,
    /// The config file's default, in force while the bucket has no `default`.
    fallback: Limit,
    keys: HashMap<String, Limit>,
    /// Sorted by precedence: most literal characters first, then by name.
    patterns: Vec<Pattern>,
    destinations: HashMap<String, Limit>,
    /// The newest bucket revision applied (0: the config file only).
    pub revision: u64,
}

/// A tier: every key matching `glob` gets `limit` unless it has a limit of its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    pub name: String,
    pub glob: String,
    pub limit: Limit,
}

/// Where a key's effective limit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source<'a> {
    Key,
    /// A tier pattern, by name.
    Pattern(&'a str),
    Default,
}

impl std::fmt::Display for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Key => f.write_str("key"),
            Source::Pattern(n) => write!(f, "pattern:{n}"),
            Source::Default => f.write_str("default"),
        }
    }
}

/// One entry of the bucket, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Default,
    Key(String),
    Pattern(String),
    Destination(String),
}

/// Why a limit or a bucket key was refused: says what is wrong and how to write it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("unknown limits entry {0:?}: use default, keys.<key>, patterns.<name> or destinations.<destination>")]
    UnknownEntry(String),
    #[error("{what} {name:?} {problem}")]
    BadName {
        what: &'static str,
        name: String,
        problem: String,
    },
    #[error("invalid limit JSON: {0}; write {{\"rate\": \"40/s\", \"burst\": 10}} (patterns also need \"pattern\": \"gold-*\")")]
    Json(String),
    #[error("`rate` = {0:?} is invalid: {1}")]
    Rate(String, &'static str),
    #[error("`burst` = {0} is invalid: use a whole number of jobs from 1 to 1000000")]
    Burst(i64),
    #[error("`pattern` = {0:?} is invalid: {1}")]
    Glob(String, &'static str),
    #[error("`pattern` is only for patterns.<name> entries")]
    PatternOnNonPattern,
}

/// A limit as JSON: `{"rate": "40/s", "burst": 10}`, plus `"pattern"` for a tier.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitJson {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pattern: Option<String>,
    pub rate: String,
    #[serde(default)]
    pub burst: Option<i64>,
}

impl LimitJson {
    pub fn of(limit: &Limit, pattern: Option<&str>) -> Self {
        LimitJson {
            pattern: pattern.map(str::to_string),
            rate: limit.rate.to_string(),
            burst: Some(i64::from(limit.burst)),
        }
    }

    /// Validates: the limit, and the glob when there is one.
    pub fn check(&self) -> Result<(Limit, Option<String>), LimitError> {
        let rate = self
            .rate
            .parse()
            .map_err(|fix| LimitError::Rate(self.rate.clone(), fix))?;
        let burst = match self.burst {
            None => 1,
            Some(b) if (1..=1_000_000).contains(&b) => b as u32,
            Some(b) => return Err(LimitError::Burst(b)),
        };
        if let Some(g) = &self.pattern {
            check_glob(g).map_err(|fix| LimitError::Glob(g.clone(), fix))?;
        }
        Ok((Limit { rate, burst }, self.pattern.clone()))
    }
}

/// Parses a stored value for `entry`.
pub fn parse_value(entry: &Entry, value: &[u8]) -> Result<(Limit, Option<String>), LimitError> {
    let j: LimitJson =
        serde_json::from_slice(value).map_err(|e| LimitError::Json(e.to_string()))?;
    let (limit, glob) = j.check()?;
    match (entry, &glob) {
        (Entry::Pattern(_), None) => Err(LimitError::Glob(
            String::new(),
            "a patterns.<name> entry needs \"pattern\", e.g. \"gold-*\"",
        )),
        (Entry::Pattern(_), Some(_)) | (_, None) => Ok((limit, glob)),
        (_, Some(_)) => Err(LimitError::PatternOnNonPattern),
    }
}

fn check_glob(g: &str) -> Result<(), &'static str> {
    if g.is_empty() || g.len() > job::MAX_TOKEN_LEN {
        return Err("use 1 to 256 bytes, e.g. \"gold-*\"");
    }
    let bad = |c: char| c.is_whitespace() || c.is_control() || c == '.' || c == '>';
    if g.chars().any(bad) {
        return Err("use key characters and '*' (any run of characters), e.g. \"gold-*\"");
    }
    Ok(())
}

/// Whether `key` matches `glob`, where `*` stands for any run of characters.
pub fn glob_match(glob: &str, key: &str) -> bool {
    let mut parts = glob.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = key.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = parts.collect();
    let Some(last) = parts.pop() else {
        return rest.is_empty(); // no '*': exact
    };
    for p in parts {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

impl Entry {
    /// Parses a bucket key.
    pub fn parse(kv_key: &str) -> Result<Entry, LimitError> {
        if kv_key == "default" {
            return Ok(Entry::Default);
        }
        let (kind, name) = kv_key
            .split_once('.')
            .ok_or_else(|| LimitError::UnknownEntry(kv_key.into()))?;
        let decoded = kv_decode(name).ok_or_else(|| LimitError::BadName {
            what: "name",
            name: name.into(),
            problem: "has a malformed =XX escape".into(),
        })?;
        let named = |what: &'static str, problem: Option<String>| match problem {
            Some(problem) => Err(LimitError::BadName {
                what,
                name: decoded.clone(),
                problem,
            }),
            None => Ok(decoded.clone()),
        };
        let token = |t: &str| job::check_token(t).err().map(|e| e.to_string());
        match kind {
            "keys" => named("key", token(&decoded)).map(Entry::Key),
            "destinations" => named("destination", token(&decoded)).map(Entry::Destination),
            "patterns" => named("pattern name", token(&decoded)).map(Entry::Pattern),
            _ => Err(LimitError::UnknownEntry(kv_key.into())),
        }
    }

    /// The bucket key.
    pub fn kv_key(&self) -> String {
        match self {
            Entry::Default => "default".into(),
            Entry::Key(k) => format!("keys.{}", kv_encode(k)),
            Entry::Pattern(n) => format!("patterns.{}", kv_encode(n)),
            Entry::Destination(d) => format!("destinations.{}", kv_encode(d)),
        }
    }

    /// The kind, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::Default => "default",
            Entry::Key(_) => "key",
            Entry::Pattern(_) => "pattern",
            Entry::Destination(_) => "destination",
        }
    }
}

/// Escapes a name into the characters a bucket key may hold.
pub fn kv_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// Reverses [`kv_encode`]; `None` for a malformed escape.
pub fn kv_decode(s: &str) -> Option<String> {
    if !s.contains('=') {
        return Some(s.to_string());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Limits {
    pub fn from_config(c: &Config) -> Self {
        Limits {
            default: c.default_limit,
            fallback: c.default_limit,
            keys: c.key_limits.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            patterns: Vec::new(),
            destinations: HashMap::new(),
            revision: 0,
        }
    }

    /// The config file's limits as bucket entries, to seed a new bucket.
    pub fn seed(c: &Config) -> Vec<(Entry, LimitJson)> {
        let mut out = vec![(Entry::Default, LimitJson::of(&c.default_limit, None))];
        out.extend(
            c.key_limits
                .iter()
                .map(|(k, l)| (Entry::Key(k.clone()), LimitJson::of(l, None))),
        );
        out
    }

    /// An empty table on top of the config's default: what the bucket's contents are applied to.
    pub fn base(c: &Config) -> Self {
        Limits {
            keys: HashMap::new(),
            ..Limits::from_config(c)
        }
    }

    /// The limit of `key` and where it came from.
    pub fn resolve(&self, key: &str) -> (Limit, Source<'_>) {
        if let Some(l) = self.keys.get(key) {
            return (*l, Source::Key);
        }
        match self.patterns.iter().find(|p| glob_match(&p.glob, key)) {
            Some(p) => (p.limit, Source::Pattern(&p.name)),
            None => (self.default, Source::Default),
        }
    }

    pub fn for_key(&self, key: &str) -> Limit {
        self.resolve(key).0
    }

    /// The cap of a destination, if it has one.
    pub fn destination(&self, dest: &str) -> Option<Limit> {
        self.destinations.get(dest).copied()
    }

    pub fn destinations(&self) -> &HashMap<String, Limit> {
        &self.destinations
    }

    pub fn default_limit(&self) -> Limit {
        self.default
    }

    /// Whether the change from `old` to `self` can move keys without an entry of their own
    /// (the default or a pattern changed): then every tracked key is resolved again.
    pub fn moves_unnamed_keys(&self, old: &Limits) -> bool {
        self.default != old.default || self.patterns != old.patterns
    }

    /// Keys whose own entry differs between `old` and `self`.
    pub fn changed_keys<'a>(&'a self, old: &'a Limits) -> impl Iterator<Item = &'a str> + 'a {
        let gone = old
            .keys
            .keys()
            .filter(|k| !self.keys.contains_key(*k))
            .map(String::as_str);
        let new = self
            .keys
            .iter()
            .filter(|(k, l)| old.keys.get(*k) != Some(l))
            .map(|(k, _)| k.as_str());
        gone.chain(new)
    }

    /// Applies one bucket change (`None`: deleted). Returns the entry it changed.
    pub fn apply(
        &mut self,
        kv_key: &str,
        value: Option<&[u8]>,
        revision: u64,
    ) -> Result<Entry, LimitError> {
        let entry = Entry::parse(kv_key)?;
        let parsed = value.map(|v| parse_value(&entry, v)).transpose()?;
        match (&entry, parsed) {
            (Entry::Default, Some((l, _))) => self.default = l,
            (Entry::Default, None) => self.default = self.fallback,
            (Entry::Key(k), Some((l, _))) => {
                self.keys.insert(k.clone(), l);
            }
            (Entry::Key(k), None) => {
                self.keys.remove(k);
            }
            (Entry::Destination(d), Some((l, _))) => {
                self.destinations.insert(d.clone(), l);
            }
            (Entry::Destination(d), None) => {
                self.destinations.remove(d);
            }
            (Entry::Pattern(n), p) => {
                self.patterns.retain(|p| &p.name != n);
                if let Some((limit, Some(glob))) = p {
                    self.patterns.push(Pattern {
                        name: n.clone(),
                        glob,
                        limit,
                    });
                    self.patterns.sort_by(|a, b| {
                        let lit = |p: &Pattern| p.glob.len() - p.glob.matches('*').count();
                        lit(b).cmp(&lit(a)).then_with(|| a.name.cmp(&b.name))
                    });
                }
            }
        }
        self.revision = self.revision.max(revision);
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_toml(
            "[limits.default]\nrate = \"5/s\"\n[limits.keys.acme]\nrate = \"100/s\"\nburst = 10",
            "t",
            &Default::default(),
        )
        .unwrap()
    }

    #[test]
    fn exact_key_beats_longest_pattern_beats_default() {
        let c = config();
        let mut l = Limits::from_config(&c);
        assert_eq!(l.resolve("acme").1, Source::Key);
        assert_eq!(l.for_key("acme").burst, 10);
        assert_eq!(l.resolve("other"), (c.default_limit, Source::Default));
        l.apply(
            "patterns.gold",
            Some(br#"{"pattern": "gold-*", "rate": "50/s"}"#),
            1,
        )
        .unwrap();
        l.apply(
            "patterns.goldeu",
            Some(br#"{"pattern": "gold-eu-*", "rate": "60/s", "burst": 3}"#),
            2,
        )
        .unwrap();
        l.apply(
            "patterns.all",
            Some(br#"{"pattern": "*", "rate": "7/s"}"#),
            3,
        )
        .unwrap();
        assert_eq!(l.resolve("gold-us-1").1, Source::Pattern("gold"));
        assert_eq!(l.resolve("gold-eu-1").1, Source::Pattern("goldeu"));
        assert_eq!(l.for_key("gold-eu-1").burst, 3);
        assert_eq!(l.resolve("silver").1, Source::Pattern("all"));
        l.apply("keys.gold-eu-1", Some(br#"{"rate": "1/s"}"#), 4)
            .unwrap();
        assert_eq!(l.resolve("gold-eu-1").1, Source::Key);
        l.apply("patterns.all", None, 5).unwrap();
        assert_eq!(l.resolve("silver").1, Source::Default);
        assert_eq!(l.revision, 5);
    }

    #[test]
    fn globs() {
        assert!(glob_match("gold-*", "gold-1"));
        assert!(glob_match("gold-*", "gold-"));
        assert!(!glob_match("gold-*", "gol"));
        assert!(glob_match("*-eu", "acme-eu"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("ab*ab", "abab"));
        assert!(!glob_match("ab*ab", "aba"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        let mut l = Limits::from_config(&config());
        let before = l.clone();
        for (k, v, needle) in [
            ("keys.a", &b"{not json"[..], "invalid limit JSON"),
            ("keys.a", br#"{"rate": "-5/s"}"#, "rate"),
            ("keys.a", br#"{"rate": "1e99/s"}"#, "rate"),
            ("keys.a", br#"{"rate": "5/s", "burst": 0}"#, "burst"),
            ("keys.a", br#"{"rate": "5/s", "colour": 1}"#, "colour"),
            ("keys.a", br#"{"rate": "5/s", "pattern": "x*"}"#, "pattern"),
            ("patterns.p", br#"{"rate": "5/s"}"#, "pattern"),
            (
                "patterns.p",
                br#"{"rate": "5/s", "pattern": "a.b"}"#,
                "pattern",
            ),
            ("colours.red", br#"{"rate": "5/s"}"#, "unknown limits entry"),
        ] {
            let e = l.apply(k, Some(v), 9).unwrap_err().to_string();
            assert!(e.contains(needle), "{k} {v:?}: {e}");
        }
        assert_eq!(l, before, "a refused value changes nothing");
    }

    #[test]
    fn paused_is_a_rate_of_zero() {
        let mut l = Limits::from_config(&config());
        l.apply("keys.acme", Some(br#"{"rate": "0/s"}"#), 1)
            .unwrap();
        assert!(l.for_key("acme").rate.is_paused());
    }

    #[test]
    fn names_outside_the_bucket_alphabet_round_trip() {
        for name in ["a@b", "x=y", "plain-key_1", "ü:1"] {
            let e = Entry::Key(name.into());
            let k = e.kv_key();
            assert!(k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b)));
            assert_eq!(Entry::parse(&k).unwrap(), e);
        }
        assert!(Entry::parse("keys.a=4").is_err());
    }

    #[test]
    fn changes_are_found_by_diff() {
        let old = Limits::from_config(&config());
        let mut new = old.clone();
        new.apply("keys.acme", None, 1).unwrap();
        new.apply("keys.zed", Some(br#"{"rate": "3/s"}"#), 2)
            .unwrap();
        let mut changed: Vec<_> = new.changed_keys(&old).collect();
        changed.sort();
        assert_eq!(changed, ["acme", "zed"]);
        assert!(!new.moves_unnamed_keys(&old));
        new.apply("default", Some(br#"{"rate": "3/s"}"#), 3)
            .unwrap();
        assert!(new.moves_unnamed_keys(&old));
    }
}
