//! Which limit applies to a key.
//!
//! Keys need no declaration: a key without an entry of its own gets the default limit the first
//! time one of its jobs is seen. The table is shared by every partition task and read only when a
//! key's state is created, never per job.

use std::collections::HashMap;

use crate::config::{Config, Limit};

/// The limits in force: a default and per-key overrides.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    default: Limit,
    keys: HashMap<String, Limit>,
}

/// Where a key's effective limit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Key,
    Default,
}

impl Limits {
    pub fn from_config(c: &Config) -> Self {
        Limits {
            default: c.default_limit,
            keys: c.key_limits.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }

    /// The limit of `key` and where it came from.
    pub fn resolve(&self, key: &str) -> (Limit, Source) {
        match self.keys.get(key) {
            Some(l) => (*l, Source::Key),
            None => (self.default, Source::Default),
        }
    }

    pub fn for_key(&self, key: &str) -> Limit {
        self.resolve(key).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_key_beats_default() {
        let c = crate::config::Config::from_toml(
            "[limits.default]\nrate = \"5/s\"\n[limits.keys.acme]\nrate = \"100/s\"\nburst = 10",
            "t",
            &Default::default(),
        )
        .unwrap();
        let l = Limits::from_config(&c);
        assert_eq!(l.resolve("acme").1, Source::Key);
        assert_eq!(l.for_key("acme").burst, 10);
        assert_eq!(l.resolve("other"), (c.default_limit, Source::Default));
    }
}
