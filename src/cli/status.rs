//! `weir status [KEY]`: a running Weir's readiness and busiest keys, or one key's status.

use clap::Args;
use serde_json::json;

use super::api::{next_release, ranges, Cluster, KeyStatus, Ready, Top, TopKey};
use super::http::{error_message, segment, AdminClient};
use super::table::Table;
use super::{print_json, CliError};
use crate::job;

/// `weir status` flags.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A key to show; without it, readiness and the busiest keys.
    pub key: Option<String>,
    /// The admin API of a running `weir run`.
    #[arg(long, env = "WEIR_ADMIN_URL", default_value = "http://127.0.0.1:9090")]
    pub admin_url: String,
    /// For an `https://` admin URL: the CA that signed the admin API's certificate (default:
    /// the system's roots).
    #[arg(long, env = "WEIR_ADMIN_CA_FILE")]
    pub admin_ca_file: Option<std::path::PathBuf>,
    /// How many of the busiest keys to list.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub limit: u16,
    /// Print the API's JSON instead, for scripts.
    #[arg(long)]
    pub json: bool,
}

/// `weir status`: exits 1 when Weir is not ready or the key is unknown.
pub async fn main(a: StatusArgs) -> Result<(), CliError> {
    let client = AdminClient::with_ca(&a.admin_url, a.admin_ca_file.as_deref())?;
    match &a.key {
        Some(key) => key_status(&client, key, a.json).await,
        None => overview(&client, a.limit, a.json).await,
    }
}

async fn key_status(client: &AdminClient, key: &str, json: bool) -> Result<(), CliError> {
    job::check_token(key).map_err(|e| CliError::Usage(format!("key {key:?} {e}")))?;
    let path = format!("/v1/keys/{}", segment(key));
    let answer = client.get(&path).await?;
    match answer.status {
        200 => {}
        404 => return Err(CliError::Failed(error_message(&answer))),
        400..=499 => return Err(CliError::Usage(error_message(&answer))),
        _ => return Err(CliError::Unavailable(error_message(&answer))),
    }
    if json {
        let v: serde_json::Value = client.json(&path, &answer)?;
        print_json(&v);
        return Ok(());
    }
    let s: KeyStatus = client.json(&path, &answer)?;
    print!("{}", describe_key(&s));
    Ok(())
}

/// One key, one fact a line.
pub fn describe_key(s: &KeyStatus) -> String {
    let lines = [
        ("key", s.key.clone()),
        ("partition", s.partition.to_string()),
        (
            "limit",
            format!("{} (from {})", s.limit.short(), s.limit.source),
        ),
        (
            "backlog",
            format!("{} (held {}, parked {})", s.backlog, s.held, s.parked),
        ),
        (
            "next release",
            match (
                next_release(s.next_release_in_ms, s.paused, s.backlog),
                s.next_release_at,
            ) {
                (text, Some(at)) => format!("{text} (Unix ms {at})"),
                (text, None) => text,
            },
        ),
        (
            "since backlog",
            format!("offered {}, released {}", s.offered, s.released),
        ),
        (
            "released",
            format!("{} stored in WEIR_RELEASED", s.released_stored),
        ),
        ("dead", format!("{} in WEIR_DEAD", s.dead)),
    ];
    lines.iter().map(|(k, v)| format!("{k:<14}{v}\n")).collect()
}

async fn overview(client: &AdminClient, limit: u16, json: bool) -> Result<(), CliError> {
    let answer = client.get("/readyz").await?;
    let ready: Ready = client.json("/readyz", &answer)?;
    let top_path = format!("/v1/keys?sort=backlog&limit={limit}");
    let top = client.get(&top_path).await?;
    let keys = match top.status {
        200 => Ok(client.json::<Top>(&top_path, &top)?.keys),
        _ => Err(error_message(&top)),
    };
    let cluster_answer = client.get("/v1/cluster").await?;
    let cluster = match cluster_answer.status {
        200 => Ok(client.json::<Cluster>("/v1/cluster", &cluster_answer)?),
        _ => Err(error_message(&cluster_answer)),
    };
    if json {
        let keys: serde_json::Value = match &keys {
            Ok(_) => client.json::<serde_json::Value>(&top_path, &top)?["keys"].take(),
            Err(e) => json!({ "error": e }),
        };
        let cluster: serde_json::Value = match &cluster {
            Ok(_) => client.json("/v1/cluster", &cluster_answer)?,
            Err(e) => json!({ "error": e }),
        };
        let ready_json: serde_json::Value = client.json("/readyz", &answer)?;
        print_json(&json!({ "ready": ready_json, "cluster": cluster, "keys": keys }));
    } else {
        println!(
            "weir at {}: {} (NATS {}, {} of {} partitions bound)",
            client.url(),
            if ready.ready { "ready" } else { "NOT READY" },
            if ready.nats_connected {
                "connected"
            } else {
                "disconnected"
            },
            ready.partitions_bound,
            ready.partitions
        );
        match &cluster {
            Ok(c) => print!("{}", describe_cluster(c)),
            Err(e) => println!("\ncluster: unavailable ({e})"),
        }
        match &keys {
            Ok(k) if k.is_empty() => println!("\nno key of this process holds a backlog"),
            Ok(k) => print!("\nbusiest keys, by backlog:\n{}", top_table(k).render()),
            Err(e) => println!("\nbusiest keys: unavailable ({e})"),
        }
    }
    if !ready.ready {
        return Err(CliError::Failed(format!(
            "weir at {} is not ready",
            client.url()
        )));
    }
    keys.map(|_| ()).map_err(CliError::Unavailable)
}

/// The group's members and each partition's owner, backlog and lag.
pub fn describe_cluster(c: &Cluster) -> String {
    let mut members = Table::new(&["MEMBER", "ADMIN", "PARTS", "PARTITIONS"], &[2]);
    for m in &c.members {
        let me = if m.name == c.me { " (this one)" } else { "" };
        members.row(vec![
            format!("{}{me}", m.name),
            m.http.clone(),
            m.partitions.len().to_string(),
            ranges(&m.partitions),
        ]);
    }
    let mut parts = Table::new(
        &["PARTITION", "OWNER", "HELD", "PARKED", "LAG", "ACK PENDING"],
        &[0, 2, 3, 4, 5],
    );
    let opt = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    for a in &c.assignment {
        parts.row(vec![
            a.partition.to_string(),
            a.owner.clone().unwrap_or_else(|| "(none)".into()),
            a.held.to_string(),
            a.parked.to_string(),
            opt(a.lag),
            opt(a.ack_pending),
        ]);
    }
    let unowned = c.assignment.iter().filter(|a| a.owner.is_none()).count();
    let mut out = format!(
        "\n{} member(s), {} mode{}:\n{}",
        c.members.len(),
        c.mode,
        if unowned > 0 {
            format!(", {unowned} partition(s) without an owner")
        } else {
            String::new()
        },
        members.render()
    );
    out.push_str(&format!("\npartitions:\n{}", parts.render()));
    out
}

/// The busiest keys as a table.
fn top_table(keys: &[TopKey]) -> Table {
    let mut t = Table::new(
        &[
            "KEY",
            "BACKLOG",
            "HELD",
            "PARKED",
            "LIMIT",
            "FROM",
            "NEXT RELEASE",
        ],
        &[1, 2, 3],
    );
    for k in keys {
        t.row(vec![
            k.key.clone(),
            k.backlog.to_string(),
            k.held.to_string(),
            k.parked.to_string(),
            k.limit.short(),
            k.limit.source.clone(),
            next_release(k.next_release_in_ms, k.paused, k.backlog),
        ]);
    }
    t
}
