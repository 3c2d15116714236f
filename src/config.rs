//! Configuration: parsed and validated once, at start.
//!
//! Sources, strongest first: command-line flags, `WEIR_*` environment variables, the TOML file,
//! built-in defaults. Every field has a default, so an empty file (or none) is a valid config.
//! A bad value fails with [`ConfigError`], whose message names the field and the fix; `main`
//! turns it into exit code 64 (`EX_USAGE`).
//!
//! ```toml
//! nats_url = "nats://127.0.0.1:4222"
//! http_addr = "127.0.0.1:9090"
//! partitions = 16
//! [limits.default]
//! rate = "20/s"        # N/s, N/m or N/h
//! burst = 1            # jobs that may leave back to back
//! [limits.keys.acme]
//! rate = "100/s"
//! burst = 10
//! ```
//!
//! `admin_token` (or `WEIR_ADMIN_TOKEN`) makes the admin API's writes require
//! `Authorization: Bearer <token>`. It is kept in an [`AdminToken`], whose `Debug` never shows it,
//! so printing a `Config` cannot leak it into logs. `admin_tls_cert_file` and
//! `admin_tls_key_file` (PEM) make the admin API serve HTTPS only.
//!
//! `job_status_retention` (default `"1h"`; `"0"` turns it off) is how long the status of a job
//! with a `Weir-Job-Id` header is kept ([`crate::status`]).
//!
//! The `[nats]` table ([`nats`]) holds NATS authentication (credentials file, NKey, user and
//! password) and TLS. Like every table it follows the top-level keys in the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::job;
use crate::tls::{self, ServerTls};

mod limit;
pub mod nats;
pub mod sharq;

pub use limit::{Limit, Rate};
pub use nats::NatsSettings;
pub use sharq::SharqSettings;

/// The exit code for an invalid configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Why a configuration was refused: each variant names the field and says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for weir: {message}")]
    Parse { path: String, message: String },
    #[error("`{field}` = {value:?} is invalid: {fix}")]
    Invalid {
        field: String,
        value: String,
        fix: &'static str,
    },
    /// A file the config names cannot be used (its content is never shown).
    #[error("`{field}` = {path:?}: {problem}; {fix}")]
    File {
        field: String,
        path: String,
        problem: String,
        fix: &'static str,
    },
}

impl ConfigError {
    fn invalid(field: impl Into<String>, value: impl ToString, fix: &'static str) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            value: value.to_string(),
            fix,
        }
    }
}

/// The validated configuration of a Weir process.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where NATS is. `None` only for `weir demo`, which then starts a local nats-server.
    pub nats_url: Option<String>,
    /// Admin HTTP listener: `/healthz`, `/readyz`.
    pub http_addr: SocketAddr,
    /// How many partitions the key space is hashed into; each has its own consumer and task.
    /// Changing it re-maps keys, so it is fixed for the life of the `WEIR_JOBS` stream.
    pub partitions: u16,
    pub default_limit: Limit,
    pub key_limits: BTreeMap<String, Limit>,
    /// How far ahead a key's jobs are held in memory; the rest is parked. Must sit well inside
    /// `ack_wait`, since held jobs are unacked.
    pub horizon: Duration,
    /// JetStream ack wait of the partition consumers.
    pub ack_wait: Duration,
    /// Most jobs held unacked per partition (the consumer's `max_ack_pending`).
    pub max_held_per_partition: u32,
    /// Release publishes awaiting their JetStream ack, per partition.
    pub publish_window: u32,
    /// Release publishes of one key awaiting their ack. 1 (the default) keeps each key's order
    /// even when NATS dies with publishes in flight; more lets one key release faster than one
    /// job per publish round trip, but a NATS crash can then reorder the releases of a key that
    /// were in flight ([`crate::scheduler`]).
    pub publish_window_per_key: u32,
    /// How long a shutdown may take before in-flight work is abandoned to redelivery.
    pub shutdown_grace: Duration,
    /// Stream replicas for the streams Weir creates (1 for a single server, 3 in a cluster).
    pub replicas: usize,
    /// A static split: the partitions this process runs, whatever other processes do. Each
    /// partition must then be run by exactly one process, or its keys' rates and order break.
    /// `None` (the default): the process joins the group in `WEIR_CLUSTER` and owns a balanced
    /// share of the partitions, moving as processes come and go ([`crate::cluster`]).
    pub owned_partitions: Option<Vec<u16>>,
    /// This process's name in the group: unique among running processes (a pod name). A process
    /// restarted under its predecessor's name takes its partitions over at once, rather than
    /// after their leases expire. Default: the host name.
    pub member: String,
    /// How long a partition's lease lasts unrenewed: a process killed without a chance to hand
    /// over loses its partitions to the others after about this long. Used when Weir creates
    /// `WEIR_CLUSTER`; afterwards the bucket's own value (its `max_age`) rules.
    pub lease: Duration,
    /// When set, the admin API's writes (PUT, DELETE) need `Authorization: Bearer <token>`.
    /// Reads stay open: they expose backlogs and limits, never jobs.
    pub admin_token: Option<AdminToken>,
    /// When set, the admin API serves HTTPS only, with this certificate and key.
    pub admin_tls: Option<ServerTls>,
    /// NATS authentication and TLS: the `[nats]` table.
    pub nats: NatsSettings,
    /// How long a job's status ([`crate::status`]) is kept: the `max_age` of `WEIR_JOB_STATUS`.
    /// `None` (`job_status_retention = "0"`): status is not kept.
    pub job_status_retention: Option<Duration>,
    /// The SHARQ-compatible API: `sharq_listen` and its companions ([`sharq`]).
    pub sharq: SharqSettings,
}

/// The admin API's bearer token. `Debug` shows `AdminToken(<redacted>)`: a config printed in a
/// log or a panic message must not carry it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Validates a token: printable ASCII without spaces (it travels in an HTTP header), 1 to
    /// 4096 bytes.
    pub fn new(token: String) -> Result<AdminToken, &'static str> {
        let printable = token.bytes().all(|b| b.is_ascii_graphic());
        if token.is_empty() || token.len() > 4096 || !printable {
            return Err("use 1 to 4096 printable ASCII characters without spaces, e.g. the output of `openssl rand -hex 32`");
        }
        Ok(AdminToken(token))
    }

    /// The token itself, for comparing with a presented one. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats_url: None,
            http_addr: "127.0.0.1:9090".parse().expect("static address"),
            partitions: 16,
            default_limit: Limit::default(),
            key_limits: BTreeMap::new(),
            horizon: Duration::from_secs(5),
            ack_wait: Duration::from_secs(30),
            max_held_per_partition: 20_000,
            publish_window: 512,
            publish_window_per_key: 1,
            shutdown_grace: Duration::from_secs(20),
            replicas: 1,
            owned_partitions: None,
            member: default_member(),
            lease: Duration::from_secs(6),
            admin_token: None,
            admin_tls: None,
            nats: NatsSettings::default(),
            job_status_retention: Some(Duration::from_secs(3600)),
            sharq: SharqSettings::default(),
        }
    }
}

/// The file's shape; every field optional so defaults fill the gaps.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    nats_url: Option<String>,
    http_addr: Option<String>,
    partitions: Option<i64>,
    horizon_ms: Option<i64>,
    ack_wait_ms: Option<i64>,
    max_held_per_partition: Option<i64>,
    publish_window: Option<i64>,
    publish_window_per_key: Option<i64>,
    shutdown_grace_ms: Option<i64>,
    replicas: Option<i64>,
    owned_partitions: Option<Vec<i64>>,
    member: Option<String>,
    lease_ms: Option<i64>,
    admin_token: Option<String>,
    admin_tls_cert_file: Option<std::path::PathBuf>,
    admin_tls_key_file: Option<std::path::PathBuf>,
    job_status_retention: Option<String>,
    sharq_listen: Option<String>,
    sharq_job_expire_interval: Option<i64>,
    sharq_default_requeue_limit: Option<i64>,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    nats: nats::FileNats,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    default: Option<FileLimit>,
    #[serde(default)]
    keys: BTreeMap<String, FileLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimit {
    rate: String,
    burst: Option<i64>,
}

/// Values that override the file: flags and environment, already merged by clap.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub nats_url: Option<String>,
    pub http_addr: Option<String>,
    pub admin_token: Option<String>,
    pub member: Option<String>,
    /// `WEIR_NATS_PASSWORD`: the NATS password, kept out of the file.
    pub nats_password: Option<String>,
}

/// The host name (Kubernetes sets `HOSTNAME` to the pod's name), cut to what a member name may
/// hold; `weir` when there is none.
fn default_member() -> String {
    let raw = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() {
        "weir".into()
    } else {
        name
    }
}

impl Config {
    /// Loads `path` (if given), applies `overrides` and validates the result.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?,
            None => String::new(),
        };
        let name = path.map_or("<none>".into(), |p| p.display().to_string());
        Config::from_toml(&text, &name, overrides)
    }

    /// Parses and validates TOML text (`name` is used in error messages).
    pub fn from_toml(text: &str, name: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.to_string(),
            message: parse_message(text, &e),
        })?;
        let mut c = Config {
            nats_url: overrides.nats_url.clone().or(file.nats_url),
            ..Config::default()
        };
        if let Some(url) = &c.nats_url {
            if url.trim().is_empty() {
                return Err(ConfigError::invalid(
                    "nats_url",
                    url,
                    "give a NATS URL such as \"nats://127.0.0.1:4222\"",
                ));
            }
        }
        if let Some(addr) = overrides.http_addr.clone().or(file.http_addr) {
            c.http_addr = addr.parse().map_err(|_| {
                ConfigError::invalid(
                    "http_addr",
                    &addr,
                    "give an IP address and port such as \"127.0.0.1:9090\" or \"0.0.0.0:9090\"",
                )
            })?;
        }
        if let Some(p) = file.partitions {
            c.partitions = in_range(
                "partitions",
                p,
                1,
                1024,
                "use a whole number from 1 to 1024",
            )? as u16;
        }
        let ms = |field: &str, v: Option<i64>, d: Duration, lo: i64, hi: i64, fix: &'static str| {
            v.map_or(Ok(d), |v| {
                in_range(field, v, lo, hi, fix).map(|v| Duration::from_millis(v as u64))
            })
        };
        c.horizon = ms(
            "horizon_ms",
            file.horizon_ms,
            c.horizon,
            100,
            600_000,
            "use milliseconds from 100 to 600000, well below ack_wait_ms",
        )?;
        c.ack_wait = ms(
            "ack_wait_ms",
            file.ack_wait_ms,
            c.ack_wait,
            1_000,
            3_600_000,
            "use milliseconds from 1000 to 3600000",
        )?;
        c.shutdown_grace = ms(
            "shutdown_grace_ms",
            file.shutdown_grace_ms,
            c.shutdown_grace,
            0,
            3_600_000,
            "use milliseconds from 0 to 3600000",
        )?;
        if c.horizon * 2 > c.ack_wait {
            return Err(ConfigError::invalid(
                "horizon_ms",
                c.horizon.as_millis(),
                "held jobs are unacked: keep horizon_ms at most half of ack_wait_ms",
            ));
        }
        if let Some(v) = file.max_held_per_partition {
            c.max_held_per_partition = in_range(
                "max_held_per_partition",
                v,
                1,
                1_000_000,
                "use a whole number from 1 to 1000000",
            )? as u32;
        }
        if let Some(v) = file.publish_window {
            c.publish_window = in_range(
                "publish_window",
                v,
                1,
                65_536,
                "use a whole number from 1 to 65536",
            )? as u32;
        }
        if let Some(v) = file.publish_window_per_key {
            c.publish_window_per_key = in_range(
                "publish_window_per_key",
                v,
                1,
                65_536,
                "use a whole number from 1 to 65536 (1 keeps a key's order across a NATS crash)",
            )? as u32;
        }
        if let Some(v) = file.replicas {
            c.replicas = in_range(
                "replicas",
                v,
                1,
                5,
                "use 1 for a single nats-server, 3 or 5 in a cluster",
            )? as usize;
        }
        c.owned_partitions = match &file.owned_partitions {
            None => None,
            Some(list) => {
                let mut owned = Vec::with_capacity(list.len());
                for &p in list {
                    if !(0..i64::from(c.partitions)).contains(&p) || owned.contains(&(p as u16)) {
                        return Err(ConfigError::invalid(
                            "owned_partitions",
                            format!("{list:?}"),
                            "list distinct partition numbers from 0 to partitions - 1, e.g. [0, 1, 2, 3]",
                        ));
                    }
                    owned.push(p as u16);
                }
                if owned.is_empty() {
                    return Err(ConfigError::invalid(
                        "owned_partitions",
                        "[]",
                        "list at least one partition, or leave it out to run them all",
                    ));
                }
                owned.sort_unstable();
                Some(owned)
            }
        };
        if let Some(m) = overrides.member.clone().or(file.member) {
            let ok = (1..=64).contains(&m.len())
                && m.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(ConfigError::invalid(
                    "member",
                    &m,
                    "use 1 to 64 letters, digits, '-' or '_', unique among running processes (e.g. the pod name)",
                ));
            }
            c.member = m;
        }
        c.lease = ms(
            "lease_ms",
            file.lease_ms,
            c.lease,
            1_000,
            300_000,
            "use milliseconds from 1000 to 300000; a killed process's partitions move after about this long",
        )?;
        if let Some(t) = overrides.admin_token.clone().or(file.admin_token) {
            // The value is never echoed: it is a secret, and a typo'd one is still close to it.
            let len = t.len();
            c.admin_token = Some(AdminToken::new(t).map_err(|fix| ConfigError::Invalid {
                field: "admin_token".into(),
                value: format!("<{len} bytes, not shown>"),
                fix,
            })?);
        }
        c.admin_tls = match (&file.admin_tls_cert_file, &file.admin_tls_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(ServerTls::load(cert, key).map_err(|(which, e)| {
                let (field, path, fix) = match which {
                    tls::Which::Cert => (
                        "admin_tls_cert_file",
                        cert,
                        "give the admin API's certificate chain (PEM, leaf first)",
                    ),
                    tls::Which::Key => (
                        "admin_tls_key_file",
                        key,
                        "give the PEM private key of admin_tls_cert_file",
                    ),
                };
                ConfigError::File {
                    field: field.into(),
                    path: path.display().to_string(),
                    problem: e.to_string(),
                    fix,
                }
            })?),
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "admin_tls_key_file",
                    "<not set>",
                    "HTTPS needs a key: set admin_tls_key_file with admin_tls_cert_file",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "admin_tls_cert_file",
                    "<not set>",
                    "HTTPS needs a certificate: set admin_tls_cert_file with admin_tls_key_file",
                ))
            }
        };
        if let Some(r) = &file.job_status_retention {
            c.job_status_retention = parse_retention(r).map_err(|fix| {
                ConfigError::invalid("job_status_retention", format!("{r:?}"), fix)
            })?;
        }
        c.nats = NatsSettings::from_file(file.nats, overrides.nats_password.clone())?;
        c.sharq = SharqSettings::from_file(
            file.sharq_listen,
            file.sharq_job_expire_interval,
            file.sharq_default_requeue_limit,
        )?;
        if let Some(d) = file.limits.default {
            c.default_limit = parse_limit("limits.default", &d)?;
        }
        for (key, l) in &file.limits.keys {
            if let Err(reason) = job::check_token(key) {
                return Err(ConfigError::Invalid {
                    field: format!("limits.keys.{key}"),
                    value: key.clone(),
                    fix: reason.fix(),
                });
            }
            c.key_limits
                .insert(key.clone(), parse_limit(&format!("limits.keys.{key}"), l)?);
        }
        Ok(c)
    }
}

/// Parts of key names whose values are (or, mistyped, may be) secrets: a parse error on their
/// line shows the key, not the value.
const SECRET_KEYS: [&str; 6] = ["pas", "word", "token", "secret", "seed", "pwd"];

/// The parser's message plus the line it points at: a wrong type ("invalid type: string, expected
/// i64") names no field by itself. A secret's line is shown without its value.
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let start = text[..span.start.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = text[..start].matches('\n').count() + 1;
    let shown = text[start..end].trim();
    let key = shown
        .split('=')
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches('"');
    let lower = key.to_ascii_lowercase();
    if SECRET_KEYS.iter().any(|s| lower.contains(s)) {
        // The parser's message may quote the value too.
        return format!("invalid value for `{key}` (line {line}; value not shown)");
    }
    format!("{} (line {line}: `{shown}`)", e.message())
}

fn in_range(field: &str, v: i64, lo: i64, hi: i64, fix: &'static str) -> Result<i64, ConfigError> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::invalid(field, v, fix))
    }
}

/// Longest `job_status_retention`: 30 days.
const MAX_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// A retention such as `"1h"`, `"30m"`, `"90s"`, `"1500ms"` or `"7d"`; `"0"` turns status off
/// (`None`). At least one second: nats-server expires messages on a timer, and a shorter
/// retention would lose a record before anyone could read it.
pub fn parse_retention(s: &str) -> Result<Option<Duration>, &'static str> {
    const FIX: &str = "write a duration such as \"1h\", \"30m\", \"90s\" or \"7d\" (from 1s to 30d), or \"0\" to keep no job status";
    let s = s.trim();
    if s == "0" {
        return Ok(None);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or(FIX)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| FIX)?;
    let unit_ms: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(FIX),
    };
    let ms = n.checked_mul(unit_ms).ok_or(FIX)?;
    if ms == 0 {
        return Ok(None);
    }
    let d = Duration::from_millis(ms);
    if d < Duration::from_secs(1) || d > MAX_RETENTION {
        return Err(FIX);
    }
    Ok(Some(d))
}

fn parse_limit(field: &str, l: &FileLimit) -> Result<Limit, ConfigError> {
    let rate = l
        .rate
        .parse()
        .map_err(|fix| ConfigError::invalid(format!("{field}.rate"), &l.rate, fix))?;
    let burst = match l.burst {
        None => 1,
        Some(b) => in_range(
            &format!("{field}.burst"),
            b,
            1,
            1_000_000,
            "use a whole number of jobs from 1 to 1000000",
        )? as u32,
    };
    Ok(Limit { rate, burst })
}

#[cfg(test)]
mod tests;
