//! `interlock`: the coordinator server (`interlock serve`) and the operator CLI.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use interlock_coordinator::server::{self, ServerConfig};
use interlock_proto::v1::{PingRequest, coordinator_client::CoordinatorClient};

#[derive(Parser)]
#[command(
    name = "interlock",
    version,
    about = "Interlock coordinator and operator CLI"
)]
struct Cli {
    /// Coordinator to talk to.
    #[arg(
        long,
        global = true,
        env = "INTERLOCK_COORDINATOR",
        default_value = "http://127.0.0.1:7400"
    )]
    coordinator: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: String,
    },
    /// Check that the coordinator answers.
    Ping,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { listen } => {
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| {
                    format!("cannot listen on {listen}; pick a free address with --listen")
                })?;
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            server::run(
                listener,
                ServerConfig {
                    store_kind: "embedded",
                },
                shutdown,
            )
            .await?;
            Ok(())
        }
        Command::Ping => {
            let mut client = CoordinatorClient::connect(cli.coordinator.clone())
                .await
                .with_context(|| format!("cannot reach the coordinator at {}; is `interlock serve` running? (set --coordinator or INTERLOCK_COORDINATOR)", cli.coordinator))?;
            let reply = client
                .ping(PingRequest {
                    caller: "cli".into(),
                })
                .await?
                .into_inner();
            println!("coordinator {} (store: {})", reply.version, reply.store);
            Ok(())
        }
    }
}
