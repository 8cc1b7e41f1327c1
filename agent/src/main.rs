//! `interlock-agent`: parses flags, sets up logging and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use interlock_agent::config::{self, LogFormat};
use interlock_agent::{demo, doctor, flows, run};

#[derive(Parser)]
#[command(name = "interlock-agent", version, about = "Interlock host agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Observe the host, register with the coordinator and report findings until SIGTERM.
    Run {
        #[arg(long, default_value = "/etc/interlock/agent.toml")]
        config: PathBuf,
    },
    /// Get this host's certificate with a one-time join token (`interlock certs token --host
    /// H`): a new key and certificate are written to the config's [tls] cert and key.
    Enrol {
        #[arg(long, default_value = "/etc/interlock/agent.toml")]
        config: PathBuf,
        /// The join token (or INTERLOCK_JOIN_TOKEN).
        #[arg(long, env = "INTERLOCK_JOIN_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Check a config file: prints "ok" or every problem (exit 1).
    Check {
        #[arg(long, default_value = "/etc/interlock/agent.toml")]
        config: PathBuf,
    },
    /// What this host offers the agent: kernel, BTF, tracefs, bpffs, cgroups, PSI, probes, and
    /// (with --config) whether the coordinator answers.
    Doctor {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
    /// A top-like view of TCP flows per process and remote endpoint.
    Flows {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
        /// Refresh interval, e.g. 1s or 500ms.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Stop after this many refreshes.
        #[arg(long)]
        count: Option<u64>,
    },
    /// A tiny HTTP service to watch and restart (quickstart, tests, benchmarks): GET /healthz
    /// answers 200 once ready, GET /crash makes it exit with status 1.
    DemoService {
        #[arg(long, default_value = "127.0.0.1:7410")]
        listen: std::net::SocketAddr,
        /// How long after start /healthz starts answering 200.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        ready_after: Duration,
        /// Exit with status 1 this long after start (a flapping process).
        #[arg(long, value_parser = humantime::parse_duration)]
        crash_after: Option<Duration>,
        /// Append "pid unix_ms" to this file at every start.
        #[arg(long)]
        starts: Option<PathBuf>,
    },
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let term = async {
        match &mut term {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(_) => {
                println!("ok");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                for problem in e.problems() {
                    println!("{}: {problem}", config.display());
                }
                Ok(ExitCode::from(1))
            }
        },
        Command::Enrol { config, token } => {
            init_logging(LogFormat::Text);
            let path = config;
            let config = config::load(&path)?;
            let Some(tls) = &config.tls else {
                anyhow::bail!(
                    "{}: add [tls] with ca (the installation's ca.pem), cert and key (where to \
                     write them) to enrol",
                    path.display()
                );
            };
            let not_after = interlock_agent::enrol::enrol(
                &config.host_id,
                &config.coordinator,
                &tls.files,
                &token,
            )
            .await?;
            println!(
                "host:{} enrolled: {} (key {}, 0600), valid until unix {not_after}; the agent renews it",
                config.host_id,
                tls.files.cert.display(),
                tls.files.key.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config } => {
            let config = config::load(&config)?;
            init_logging(config.log_format);
            run::run(config, shutdown_signal())
                .await
                .context("running the agent")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor { config, output } => {
            init_logging(LogFormat::Text);
            let (coordinators, tls) = match &config {
                Some(path) => {
                    let c = config::load(path)?;
                    (c.coordinator, c.tls.map(|t| t.files))
                }
                None => (Vec::new(), None),
            };
            let report = doctor::diagnose(&coordinators, tls.as_ref()).await;
            match output {
                Output::Table => print!("{}", report.to_text()),
                Output::Json => println!("{}", report.to_json()),
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Flows {
            output,
            interval,
            count,
        } => {
            init_logging(LogFormat::Text);
            let format = match output {
                Output::Table => flows::FlowsFormat::Table,
                Output::Json => flows::FlowsFormat::Json,
            };
            flows::watch(interval, count, format, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DemoService {
            listen,
            ready_after,
            crash_after,
            starts,
        } => {
            let options = demo::DemoOptions {
                listen,
                ready_after,
                crash_after,
                starts,
            };
            let code = tokio::task::spawn_blocking(move || demo::serve(&options))
                .await
                .context("demo service task")?
                .with_context(|| format!("demo service on {listen}"))?;
            Ok(ExitCode::from(code))
        }
    }
}
