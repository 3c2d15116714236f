//! `weir limits get|set|list|delete`: the `WEIR_LIMITS` bucket, straight through NATS.
//!
//! ```text
//! weir limits set key acme --rate 40/s --burst 10
//! weir limits set pattern gold --match 'gold-*' --rate 100/s
//! weir limits set destination carrier-x --rate 500/s --burst 50
//! weir limits set default --rate 20/s
//! weir limits get key acme
//! weir limits delete key acme
//! weir limits list [--json]
//! ```
//!
//! Input is checked before connecting, with the rules Weir applies when it reads the bucket,
//! so a typo fails at once with exit 64 and never reaches the running processes.

use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use super::table::Table;
use super::{print_json, CliError};
use crate::admin::limits::{entry_name, LimitEntry};
use crate::limits::store::{Store, StoreError, Stored};
use crate::limits::{parse_value, Entry, LimitJson};

/// `weir limits` flags.
#[derive(Debug, Args)]
pub struct LimitsArgs {
    /// NATS URL (beats the config file; default nats://127.0.0.1:4222).
    #[arg(long, env = "WEIR_NATS_URL", global = true)]
    pub nats_url: Option<String>,
    /// Weir's TOML config file: its `nats_url` and `[nats]` table (credentials, TLS) are used.
    #[arg(long, short, global = true)]
    pub config: Option<std::path::PathBuf>,
    /// Print JSON instead of a table, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: LimitsCmd,
}

#[derive(Debug, Subcommand)]
pub enum LimitsCmd {
    /// Show one stored limit.
    Get {
        #[command(subcommand)]
        target: Target,
    },
    /// Store a limit; every running Weir applies it within moments, to held jobs too.
    Set {
        #[command(subcommand)]
        target: SetTarget,
    },
    /// Every stored limit.
    List,
    /// Delete a stored limit (keys then fall back to a pattern or the default).
    Delete {
        #[command(subcommand)]
        target: Named,
    },
}

/// Which limit.
#[derive(Debug, Subcommand)]
pub enum Target {
    /// One key's own limit.
    Key {
        /// The key.
        name: String,
    },
    /// A destination's cap, shared by every key sent to it.
    Destination {
        /// The destination.
        name: String,
    },
    /// A tier: keys matching a glob.
    Pattern {
        /// The pattern's name (its glob is set with --match).
        name: String,
    },
    /// The limit of every key without a more specific one.
    Default,
}

/// A named limit (the default cannot be deleted, only set).
#[derive(Debug, Subcommand)]
pub enum Named {
    /// One key's own limit.
    Key {
        /// The key.
        name: String,
    },
    /// A destination's cap.
    Destination {
        /// The destination.
        name: String,
    },
    /// A tier pattern.
    Pattern {
        /// The pattern's name (its glob is set with --match).
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SetTarget {
    /// One key's own limit (beats any pattern).
    Key {
        /// The key.
        name: String,
        #[command(flatten)]
        limit: LimitFlags,
    },
    /// A destination's cap, shared by every key sent to it.
    Destination {
        /// The destination.
        name: String,
        #[command(flatten)]
        limit: LimitFlags,
    },
    /// A tier: every key matching --match without a limit of its own (the longest pattern wins).
    Pattern {
        /// The pattern's name.
        name: String,
        /// The glob keys must match; `*` is any run of characters, e.g. 'gold-*'.
        #[arg(long = "match", value_name = "GLOB")]
        glob: String,
        #[command(flatten)]
        limit: LimitFlags,
    },
    /// The limit of every key without a more specific one.
    Default {
        #[command(flatten)]
        limit: LimitFlags,
    },
}

#[derive(Debug, Args)]
pub struct LimitFlags {
    /// Jobs per second, minute or hour: N/s, N/m or N/h; 0/s pauses (jobs are kept).
    #[arg(long)]
    pub rate: String,
    /// Jobs that may leave back to back [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    pub burst: Option<i64>,
}

impl Target {
    fn entry(self) -> Entry {
        match self {
            Target::Key { name } => Entry::Key(name),
            Target::Destination { name } => Entry::Destination(name),
            Target::Pattern { name } => Entry::Pattern(name),
            Target::Default => Entry::Default,
        }
    }
}

impl Named {
    fn entry(self) -> Entry {
        match self {
            Named::Key { name } => Entry::Key(name),
            Named::Destination { name } => Entry::Destination(name),
            Named::Pattern { name } => Entry::Pattern(name),
        }
    }
}

impl SetTarget {
    fn entry(self) -> (Entry, LimitJson) {
        let json = |l: LimitFlags, pattern| LimitJson {
            pattern,
            rate: l.rate,
            burst: l.burst,
        };
        match self {
            SetTarget::Key { name, limit } => (Entry::Key(name), json(limit, None)),
            SetTarget::Destination { name, limit } => (Entry::Destination(name), json(limit, None)),
            SetTarget::Pattern { name, glob, limit } => {
                (Entry::Pattern(name), json(limit, Some(glob)))
            }
            SetTarget::Default { limit } => (Entry::Default, json(limit, None)),
        }
    }
}

/// The action, with its input checked.
enum Action {
    Get(Entry),
    Set(Entry, LimitJson),
    List,
    Delete(Entry),
}

/// `weir limits ...`.
pub async fn main(a: LimitsArgs) -> Result<(), CliError> {
    let action = match a.command {
        LimitsCmd::Get { target } => Action::Get(checked(target.entry())?),
        LimitsCmd::Set { target } => {
            let (entry, json) = target.entry();
            let entry = checked(entry)?;
            let value = serde_json::to_vec(&json).expect("serialisable");
            parse_value(&entry, &value).map_err(|e| CliError::Usage(e.to_string()))?;
            Action::Set(entry, json)
        }
        LimitsCmd::List => Action::List,
        LimitsCmd::Delete { target } => Action::Delete(checked(target.entry())?),
    };
    let store = open(a.config.as_deref(), a.nats_url.clone()).await?;
    match action {
        Action::Get(entry) => match store.get_entry(&entry).await.map_err(store_error)? {
            Some(s) => show(&[LimitEntry::of(&s)], a.json, false),
            None => {
                return Err(CliError::Failed(format!(
                    "no limit stored for {}",
                    describe(&entry)
                )))
            }
        },
        Action::Set(entry, json) => {
            let revision = store.put(&entry, &json).await.map_err(store_error)?;
            let (limit, pattern) = json.check().map_err(|e| CliError::Usage(e.to_string()))?;
            let stored = Stored {
                entry,
                limit,
                pattern,
                revision,
            };
            show(&[LimitEntry::of(&stored)], a.json, false);
        }
        Action::List => {
            let all: Vec<LimitEntry> = store
                .list()
                .await
                .map_err(store_error)?
                .iter()
                .map(LimitEntry::of)
                .collect();
            show(&all, a.json, true);
        }
        Action::Delete(entry) => {
            if !store.delete(&entry).await.map_err(store_error)? {
                return Err(CliError::Failed(format!(
                    "no limit stored for {}: nothing to delete",
                    describe(&entry)
                )));
            }
            if a.json {
                print_json(
                    &json!({"deleted": true, "kind": entry.kind(), "name": entry_name(&entry)}),
                );
            } else {
                println!("deleted the limit of {}", describe(&entry));
            }
        }
    }
    Ok(())
}

/// `key "acme"`, `the default`.
fn describe(e: &Entry) -> String {
    match entry_name(e) {
        Some(n) => format!("{} {n:?}", e.kind()),
        None => "the default".into(),
    }
}

/// Checks a name the way Weir checks it when reading the bucket.
fn checked(e: Entry) -> Result<Entry, CliError> {
    Entry::parse(&e.kv_key())
        .map(|_| e)
        .map_err(|err| CliError::Usage(err.to_string()))
}

fn store_error(e: StoreError) -> CliError {
    match e {
        StoreError::Invalid(e) => CliError::Usage(e.to_string()),
        e => CliError::Unavailable(e.to_string()),
    }
}

/// Connects without retrying: a command should fail fast when NATS is away.
async fn open(config: Option<&std::path::Path>, url: Option<String>) -> Result<Store, CliError> {
    let (url, nats) = super::nats_target(config, url)?;
    let shown = crate::config::nats::redact_url(&url);
    let options = nats
        .options("weir-cli")
        .await
        .map_err(|e| CliError::Usage(format!("cannot use nats.creds_file: {e} (--config)")))?;
    let client = options
        .connection_timeout(Duration::from_secs(5))
        .connect(&url)
        .await
        .map_err(|e| {
            CliError::Unavailable(format!(
                "cannot connect to NATS at {shown}: {e} (--nats-url, WEIR_NATS_URL; credentials and TLS: --config, WEIR_NATS_PASSWORD)"
            ))
        })?;
    Store::get(&async_nats::jetstream::new(client))
        .await
        .map_err(store_error)
}

/// Prints entries as a table (or JSON: an array for `list`, else the one object).
fn show(entries: &[LimitEntry], json: bool, many: bool) {
    if json {
        match entries {
            [one] if !many => print_json(one),
            all => print_json(&all),
        }
        return;
    }
    if entries.is_empty() {
        println!("no limits stored");
        return;
    }
    let mut t = Table::new(
        &["KIND", "NAME", "PATTERN", "RATE", "BURST", "REVISION"],
        &[4, 5],
    );
    for e in entries {
        let dash = || "-".to_string();
        t.row(vec![
            e.kind.clone(),
            e.name.clone().unwrap_or_else(dash),
            e.pattern.clone().unwrap_or_else(dash),
            if e.paused {
                format!("{} (paused)", e.rate)
            } else {
                e.rate.clone()
            },
            e.burst.to_string(),
            e.revision.to_string(),
        ]);
    }
    print!("{}", t.render());
}
