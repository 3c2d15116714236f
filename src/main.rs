//! The `weir` binary: parse the command line, start tracing, hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use weir::config::{Config, Overrides, EXIT_CONFIG};

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "Rate-limited queueing on NATS JetStream"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the throttler.
    Run(RunArgs),
    /// Start a local nats-server (unless --nats-url is given), Weir and a flood of three keys,
    /// and show throttling live.
    Demo(weir::demo::DemoArgs),
    /// Publish jobs: keys, rate, count, payload size.
    Load(weir::load::LoadArgs),
    /// The end-to-end benchmark: raw JetStream ceiling vs Weir, rate error, latency, memory.
    Bench(weir::bench::BenchArgs),
    /// Long runs under injected faults (kill -9, NATS restarts) and a job ledger: lost,
    /// duplicated, reordered, rate overshoot; exits 2 if the ledger is not clean.
    Chaos(weir::chaos::ChaosArgs),
    /// Read and change limits in the WEIR_LIMITS bucket (through NATS; no Weir needs to run).
    Limits(weir::cli::limits::LimitsArgs),
    /// A running Weir's readiness and busiest keys, or one key's status (admin API).
    Status(weir::cli::status::StatusArgs),
    /// The busiest keys, live: offered/s, released/s, backlog, limit (admin API).
    Top(weir::cli::top::TopArgs),
}

#[derive(Args)]
struct RunArgs {
    /// TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// NATS URL (beats the file).
    #[arg(long, env = "WEIR_NATS_URL")]
    nats_url: Option<String>,
    /// Admin HTTP address (beats the file).
    #[arg(long, env = "WEIR_HTTP_ADDR")]
    http_addr: Option<String>,
    /// Bearer token the admin API's writes require (beats the file). Prefer the environment:
    /// a flag shows in process listings.
    #[arg(long, env = "WEIR_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// This process's name in the group, unique among running processes (beats the file;
    /// default: the host name). In Kubernetes, the pod name.
    #[arg(long, env = "WEIR_MEMBER")]
    member: Option<String>,
}

fn main() -> ExitCode {
    // Usage errors exit 64 (EX_USAGE), like an invalid configuration; help and version exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_CONFIG as u8 } else { 0 });
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match cli.command {
        Cmd::Run(a) => {
            let overrides = Overrides {
                nats_url: a.nats_url,
                http_addr: a.http_addr,
                admin_token: a.admin_token,
                member: a.member,
                nats_password: nats_password(),
            };
            let config = match Config::load(a.config.as_deref(), &overrides) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("weir: invalid configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG as u8);
                }
            };
            let url = config
                .nats_url
                .clone()
                .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
            rt.block_on(async move {
                let client = weir::connect_with(&url, &config.nats).await?;
                weir::run(config, client, weir::signal::shutdown()).await
            })
            .map_or_else(|e| fail(&e), |()| ExitCode::SUCCESS)
        }
        Cmd::Demo(a) => rt
            .block_on(weir::demo::main(a))
            .map_or_else(|e| fail(&*e), |()| ExitCode::SUCCESS),
        Cmd::Load(a) => rt
            .block_on(weir::load::main(a))
            .map_or_else(|e| fail(&*e), |()| ExitCode::SUCCESS),
        Cmd::Bench(a) => rt
            .block_on(weir::bench::main(a))
            .map_or_else(|e| fail(&*e), |()| ExitCode::SUCCESS),
        Cmd::Chaos(a) => match rt.block_on(weir::chaos::main(a)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(2),
            Err(e) => fail(&*e),
        },
        Cmd::Limits(a) => exit(rt.block_on(weir::cli::limits::main(a))),
        Cmd::Status(a) => exit(rt.block_on(weir::cli::status::main(a))),
        Cmd::Top(a) => exit(rt.block_on(weir::cli::top::main(a))),
    }
}

/// An operator command's outcome as an exit code (see [`weir::cli`]).
fn exit(r: Result<(), weir::cli::CliError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `WEIR_NATS_PASSWORD`, read from the environment only: a flag would show in process listings.
fn nats_password() -> Option<String> {
    std::env::var("WEIR_NATS_PASSWORD").ok()
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("weir: {e}");
    ExitCode::FAILURE
}
