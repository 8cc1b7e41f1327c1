//! `interlock-agent`: parses flags, sets up logging and calls the library.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use interlock_agent::probes::{TcpProbe, TcpProbeOptions};

#[derive(Parser)]
#[command(name = "interlock-agent", version, about = "Interlock host agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the TCP probe and print every TCP state transition until Ctrl-C.
    Flows,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Flows => flows().await,
    }
}

async fn flows() -> anyhow::Result<()> {
    let mut probe =
        TcpProbe::load(&TcpProbeOptions::default()).context("starting the TCP probe")?;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                batch.clear();
                probe.drain(&mut batch);
                for r in &batch {
                    println!(
                        "{:>7} {:<16} {} -> {} {} -> {}",
                        r.pid, r.comm, r.local, r.remote, r.old_state, r.new_state
                    );
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
