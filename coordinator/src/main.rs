//! `interlock`: the coordinator server (`interlock serve`) and the operator CLI.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use interlock_coordinator::{
    cli::{self, ClientArgs, OperatorCommand},
    serve::{self, ServeOptions, StoreChoice},
};

#[derive(Parser)]
#[command(
    name = "interlock",
    version,
    about = "Interlock coordinator and operator CLI"
)]
struct Cli {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a coordinator replica.
    Serve(ServeArgs),
    #[command(flatten)]
    Operator(OperatorCommand),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Policy file (TOML): action classes and their safety cases.
    #[arg(long)]
    config: PathBuf,
    /// etcd endpoints, comma-separated. Without it the embedded single-node store is used
    /// (one-host quickstart only).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Where the embedded store keeps its log (without --etcd). Omit to keep it in memory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Every key lives under this prefix.
    #[arg(long, default_value = "/interlock")]
    prefix: String,
    /// gRPC address to listen on.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: String,
    /// Address clients use to reach this replica (default: http://<listen>).
    #[arg(long)]
    advertise: Option<String>,
    /// HTTP address for /metrics, /healthz and /readyz ("" to disable).
    #[arg(long, default_value = "127.0.0.1:7401")]
    metrics_listen: String,
    /// How long a host stays registered without heartbeats.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    host_ttl: Duration,
    /// Leadership lease TTL; a dead leader is replaced within about this long.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    election_ttl: Duration,
    /// Audit records kept in the store (at least 100); the oldest are deleted beyond that.
    #[arg(long, default_value_t = 100_000)]
    audit_retention: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve_cmd(args).await.map(|()| ExitCode::SUCCESS),
            Command::Operator(command) => cli::run(&cli.client, command).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_cmd(args: ServeArgs) -> anyhow::Result<()> {
    let policy_text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("cannot read the policy file {}", args.config.display()))?;
    let grpc = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; pick a free address with --listen",
                args.listen
            )
        })?;
    let http = if args.metrics_listen.is_empty() {
        None
    } else {
        Some(
            tokio::net::TcpListener::bind(&args.metrics_listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {} for metrics; pick another with --metrics-listen",
                        args.metrics_listen
                    )
                })?,
        )
    };
    let failpoint = std::env::var("INTERLOCK_FAILPOINT_PAUSE_BEFORE_GRANT_COMMIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    let options = ServeOptions {
        store: if args.etcd.is_empty() {
            StoreChoice::Embedded(args.data_dir)
        } else {
            StoreChoice::Etcd(args.etcd)
        },
        policy_name: args.config.display().to_string(),
        policy_text,
        prefix: args.prefix,
        advertise: args.advertise,
        host_ttl: args.host_ttl,
        election_ttl: args.election_ttl,
        failpoint_pause_before_grant_commit: failpoint,
        audit_retention: args.audit_retention,
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: shutting down"),
        }
    };
    serve::run(options, grpc, http, shutdown).await?;
    Ok(())
}
