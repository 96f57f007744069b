//! `guild-sim`: runs a federation on one machine.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use guild_client::identity::Identity;
use guild_client::net::Connection;
use guild_sim::LoopbackCoordinator;

#[derive(Debug, Parser)]
#[command(name = "guild-sim", version, about = "Guild federation simulator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a coordinator on loopback and register N merchants with it over gRPC.
    Register {
        #[arg(long, default_value_t = 5)]
        merchants: usize,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("guild-sim: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Register { merchants } => {
            let dir = tempfile::tempdir().context("creating a scratch folder")?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let coordinator = LoopbackCoordinator::start(&dir.path().join("guild.db")).await?;
                for i in 0..merchants {
                    let identity = Identity::load_or_create(&dir.path().join(format!("merchant-{i}.key")))?;
                    let mut connection = Connection::connect(
                        &coordinator.uri(),
                        guild_proto::limits::max_message_bytes(1 << 20, 1000),
                    )
                    .await?;
                    let registered = connection.register(&format!("Shop {i}"), &identity).await?;
                    println!("registered Shop {i} as {}", registered.merchant_id);
                }
                let recorded = coordinator.core.store().merchants()?;
                println!(
                    "{}",
                    serde_json::json!({
                        "coordinator": coordinator.address.to_string(),
                        "registered_merchants": recorded.len(),
                        "training_device": format!("{:?}", guild_client::training_device()),
                    })
                );
                anyhow::ensure!(
                    recorded.len() == merchants,
                    "the coordinator recorded {} of {merchants} merchants",
                    recorded.len()
                );
                Ok(())
            })
        }
    }
}
