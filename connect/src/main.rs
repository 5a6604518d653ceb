//! `syncline-connect` (also run as `syncline connect`): the connector runtime. Runs the sources
//! and sinks of a `connectors.toml` (`--config`), or prints their status (`status`).
//!
//! Exit status: 0 on a clean stop (SIGTERM or Ctrl-C); 1 on failure with one line
//! `error: MESSAGE` on stderr (a configuration error names the connector and the key); 2 on a
//! usage error.
//!
//! # Layout
//!
//! - `config`: the file's typed keys and their checks.
//! - `envelope`: record keys, the Debezium-shaped JSON envelope, positions.
//! - `transform`: per-connector rewrites.
//! - `source/`: PostgreSQL change data capture.
//! - `sink/`: PostgreSQL, Redis and HTTP sinks over consumer groups.
//! - `runtime`: tasks, restarts, statuses, metrics.
//! - `status`: connector status and its Prometheus form.

mod config;
mod envelope;
mod runtime;
mod sink;
mod source;
mod status;
mod transform;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use syncline_client::{Client, ClientConfig};
use tokio_util::sync::CancellationToken;

const AFTER_HELP: &str = "\
The configuration file's keys are documented in the README (\"Connectors\"). The broker address \
comes from --broker, else SYNCLINE_BROKER, else [connect] broker in the file, else 127.0.0.1:7450.

Exit status: 0 on a clean stop; 1 on failure (one line `error: MESSAGE` on stderr); 2 on a usage \
error. Set RUST_LOG (e.g. RUST_LOG=syncline_connect=debug) for more logs.";

#[derive(Debug, Parser)]
#[command(
    name = "syncline connect",
    version,
    about = "Runs Syncline connectors: change data capture from PostgreSQL, and sinks into \
             PostgreSQL, Redis and HTTP endpoints",
    after_help = AFTER_HELP
)]
struct Cli {
    /// The connectors file.
    #[arg(
        long,
        global = true,
        env = "SYNCLINE_CONNECT_CONFIG",
        default_value = "connectors.toml"
    )]
    config: PathBuf,
    /// Broker address(es), HOST:PORT[,...] (overrides [connect] broker).
    #[arg(
        long,
        global = true,
        env = "SYNCLINE_BROKER",
        value_name = "HOST:PORT[,...]"
    )]
    broker: Option<String>,
    /// Bearer token for a cluster with authentication (overrides [connect] token).
    #[arg(long, global = true, env = "SYNCLINE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Only check the configuration file and exit.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print each connector's state, position, lag and last error, from the status topic.
    Status {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let file = config::Config::load(&cli.config)?;
    if cli.check {
        println!(
            "{}: {} source(s), {} sink(s): ok",
            cli.config.display(),
            file.source.len(),
            file.sink.len()
        );
        return Ok(());
    }
    let broker = cli
        .broker
        .clone()
        .or_else(|| file.connect.broker.clone())
        .unwrap_or_else(|| "127.0.0.1:7450".to_owned());
    let mut client_config = ClientConfig::default();
    if let Some(token) = cli.token.as_ref().or(file.connect.token.as_ref()) {
        client_config = client_config.with_token(token)?;
    }
    let client = Client::connect_with(&broker, client_config)
        .await
        .with_context(|| format!("connecting to {broker}"))?;
    match cli.command {
        Some(Command::Status { json }) => status(&client, &file, json).await,
        None => {
            let cancel = CancellationToken::new();
            let signal = cancel.clone();
            tokio::spawn(async move {
                wait_for_shutdown().await;
                tracing::info!("shutting down");
                signal.cancel();
            });
            runtime::run(file, client, cancel).await
        }
    }
}

async fn status(client: &Client, file: &config::Config, json: bool) -> anyhow::Result<()> {
    let reports = runtime::read_statuses(client, &file.connect.status_topic).await?;
    let now = envelope::now_ms();
    let mut stdout = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut stdout, &reports)?;
        writeln!(stdout)?;
        return Ok(());
    }
    writeln!(
        stdout,
        "{:<20} {:<6} {:<8} {:<12} {:<14} {:>12} {:>10} {:>7}  LAST ERROR",
        "CONNECTOR", "KIND", "TYPE", "STATE", "POSITION", "LAG", "RECORDS", "ERRORS"
    )?;
    for report in reports {
        let state = if now - report.updated_ms > status::STALE_AFTER_MS && report.state != "stopped"
        {
            format!("{} (stale)", report.state)
        } else {
            report.state.clone()
        };
        let lag = report
            .lag
            .map(|lag| format!("{lag} {}", report.lag_unit))
            .unwrap_or_else(|| "-".to_owned());
        writeln!(
            stdout,
            "{:<20} {:<6} {:<8} {:<12} {:<14} {:>12} {:>10} {:>7}  {}",
            report.connector,
            report.kind,
            report.connector_type,
            state,
            report.position.as_deref().unwrap_or("-"),
            lag,
            report.records_total,
            report.errors_total,
            report.last_error.as_deref().unwrap_or("-")
        )?;
    }
    Ok(())
}

async fn wait_for_shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
