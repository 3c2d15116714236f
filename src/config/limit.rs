//! A limit: a rate (`"40/s"`) and a burst, as the config file, `WEIR_LIMITS` and the admin API
//! write them.

use std::time::Duration;

/// A rate: `count` jobs per `per`. Parsed from `"N/s"`, `"N/m"` or `"N/h"`; `"0/s"` pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// 0: paused (jobs are kept, none leaves).
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// The emission interval T = per / count: one job every T (for a paused rate, `per`).
    pub fn period(&self) -> Duration {
        self.per / self.count.max(1)
    }

    /// A rate of zero: the key's jobs are held until the rate is raised.
    pub fn is_paused(&self) -> bool {
        self.count == 0
    }

    /// Jobs per second, for display and for sizing the in-memory horizon.
    pub fn per_second(&self) -> f64 {
        f64::from(self.count) / self.per.as_secs_f64()
    }
}

impl std::str::FromStr for Rate {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const FIX: &str = "write a whole number of jobs per unit, e.g. \"40/s\", \"600/m\" or \"5000/h\" (at most 1000000000; \"0/s\" pauses)";
        let (n, unit) = s.trim().split_once('/').ok_or(FIX)?;
        let count: u32 = n.trim().parse().map_err(|_| FIX)?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(FIX),
        };
        if count > 1_000_000_000 {
            return Err(FIX);
        }
        Ok(Rate { count, per })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{}", self.count, unit)
    }
}

/// One limit: a rate and the number of jobs that may leave back to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub rate: Rate,
    pub burst: u32,
}

impl Default for Limit {
    fn default() -> Self {
        Limit {
            rate: Rate {
                count: 20,
                per: Duration::from_secs(1),
            },
            burst: 1,
        }
    }
}
