//! The SHARQ-compatible HTTP API's settings ([`crate::sharq`]): top-level keys of the file.
//!
//! ```toml
//! sharq_listen = "0.0.0.0:8080"          # unset: the API is off
//! sharq_job_expire_interval = 30000      # ms a dequeued job may run before it is requeued
//! sharq_default_requeue_limit = -1       # requeues of a job that names none (-1: forever)
//! ```
//!
//! The API has a listener of its own: SHARQ's `GET /metrics/` must not meet the admin API's
//! Prometheus `GET /metrics`, and SHARQ's workers and producers can then be pointed at it by
//! changing nothing but the URL.

use std::net::SocketAddr;
use std::time::Duration;

use super::ConfigError;

/// The validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharqSettings {
    /// Where the SHARQ API listens; `None`: it is not served.
    pub listen: Option<SocketAddr>,
    /// SHARQ's `job_expire_interval`: a dequeued job not finished within it is requeued
    /// (the dequeue consumers' JetStream `ack_wait`).
    pub job_expire_interval: Duration,
    /// SHARQ's `default_job_requeue_limit`, for an enqueue without `requeue_limit`.
    pub default_requeue_limit: i64,
}

impl Default for SharqSettings {
    fn default() -> Self {
        SharqSettings {
            listen: None,
            job_expire_interval: Duration::from_secs(30),
            default_requeue_limit: -1,
        }
    }
}

impl SharqSettings {
    /// Validates the three file keys.
    pub(super) fn from_file(
        listen: Option<String>,
        expire_ms: Option<i64>,
        requeue_limit: Option<i64>,
    ) -> Result<SharqSettings, ConfigError> {
        let mut s = SharqSettings::default();
        if let Some(addr) = listen {
            s.listen = Some(addr.parse().map_err(|_| {
                ConfigError::invalid(
                    "sharq_listen",
                    &addr,
                    "give an IP address and port such as \"0.0.0.0:8080\", or leave it out to turn the SHARQ API off",
                )
            })?);
        }
        if let Some(ms) = expire_ms {
            if !(500..=86_400_000).contains(&ms) {
                return Err(ConfigError::invalid(
                    "sharq_job_expire_interval",
                    ms,
                    "use milliseconds from 500 to 86400000 (SHARQ's job_expire_interval)",
                ));
            }
            s.job_expire_interval = Duration::from_millis(ms as u64);
        }
        if let Some(n) = requeue_limit {
            if !(-1..=1_000_000).contains(&n) {
                return Err(ConfigError::invalid(
                    "sharq_default_requeue_limit",
                    n,
                    "use -1 (requeue forever) or a whole number of requeues from 0 to 1000000",
                ));
            }
            s.default_requeue_limit = n;
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, Overrides};

    fn load(text: &str) -> Result<Config, crate::config::ConfigError> {
        Config::from_toml(text, "t.toml", &Overrides::default())
    }

    #[test]
    fn off_by_default_and_checked_when_set() {
        let c = load("").unwrap();
        assert_eq!(c.sharq.listen, None);
        assert_eq!(c.sharq.job_expire_interval.as_secs(), 30);
        assert_eq!(c.sharq.default_requeue_limit, -1);
        let c = load("sharq_listen = \"127.0.0.1:8080\"\nsharq_job_expire_interval = 1000\nsharq_default_requeue_limit = 3").unwrap();
        assert_eq!(c.sharq.listen.unwrap().port(), 8080);
        assert_eq!(c.sharq.job_expire_interval.as_millis(), 1000);
        assert_eq!(c.sharq.default_requeue_limit, 3);
        for (text, field) in [
            ("sharq_listen = \"anywhere\"", "sharq_listen"),
            (
                "sharq_job_expire_interval = 10",
                "sharq_job_expire_interval",
            ),
            (
                "sharq_default_requeue_limit = -2",
                "sharq_default_requeue_limit",
            ),
        ] {
            let e = load(text).unwrap_err().to_string();
            assert!(
                e.contains(field) && (e.contains("use") || e.contains("give")),
                "{e}"
            );
        }
    }
}
