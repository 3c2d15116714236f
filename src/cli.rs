//! The operator's commands: `weir limits`, `weir status` and `weir top`.
//!
//! `weir limits` talks to NATS directly (the `WEIR_LIMITS` bucket), so limits can be read and
//! set while no Weir process runs, and with the same validation Weir applies when it reads them.
//! `weir status` and `weir top` ask a running Weir's admin API, because what they show (held
//! jobs, next release times) lives only in that process.
//!
//! Exit codes: 0 success; 1 the command ran but the answer is "no" (no such limit or key, Weir
//! not ready); 64 (`EX_USAGE`) bad input; 69 (`EX_UNAVAILABLE`) NATS or the admin API cannot be
//! reached.

pub mod api;
pub mod http;
pub mod limits;
pub mod status;
mod table;
pub mod top;

/// Where the operator's commands find NATS when neither a flag, `WEIR_NATS_URL` nor a config
/// file says.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// The NATS URL and `[nats]` settings (authentication, TLS) an operator command connects with:
/// the flag or `WEIR_NATS_URL` beats the config file's `nats_url`; the `[nats]` table comes from
/// the file (the same one `weir run` reads), the password also from `WEIR_NATS_PASSWORD`.
pub fn nats_target(
    config: Option<&std::path::Path>,
    nats_url: Option<String>,
) -> Result<(String, crate::config::NatsSettings), CliError> {
    let overrides = crate::config::Overrides {
        nats_url,
        nats_password: std::env::var("WEIR_NATS_PASSWORD").ok(),
        ..Default::default()
    };
    let c = crate::config::Config::load(config, &overrides)
        .map_err(|e| CliError::Usage(format!("invalid configuration: {e}")))?;
    let url = c.nats_url.unwrap_or_else(|| DEFAULT_NATS_URL.into());
    Ok((url, c.nats))
}

/// `EX_USAGE` from sysexits.h: the command line or its values are wrong.
pub const EXIT_USAGE: u8 = 64;
/// `EX_UNAVAILABLE` from sysexits.h: a service the command needs cannot be reached.
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Why a command failed; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad input (exit 64).
    #[error("{0}")]
    Usage(String),
    /// NATS or the admin API cannot be reached, or failed (exit 69).
    #[error("{0}")]
    Unavailable(String),
    /// The command ran and the answer is no: nothing stored there, no such key, not ready
    /// (exit 1).
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Unavailable(_) => EXIT_UNAVAILABLE,
            CliError::Failed(_) => 1,
        }
    }
}

impl From<http::HttpError> for CliError {
    fn from(e: http::HttpError) -> Self {
        match e {
            http::HttpError::BadUrl { .. } => CliError::Usage(e.to_string()),
            _ => CliError::Unavailable(e.to_string()),
        }
    }
}

/// Prints `value` as indented JSON on stdout.
fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("serialisable")
    );
}
