//! `guild-client`: the merchant-side binary.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use guild_client::identity::Identity;
use guild_client::net::Connection;

#[derive(Debug, Parser)]
#[command(name = "guild-client", version, about = "Guild merchant client")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register this merchant with the coordinator and print the assigned id as JSON.
    Register {
        /// Coordinator URI.
        #[arg(long, env = "GUILD_COORDINATOR", default_value = "http://127.0.0.1:50051")]
        coordinator: String,
        /// Display name of this merchant.
        #[arg(long, env = "GUILD_MERCHANT_NAME")]
        name: String,
        /// Ed25519 identity key (PKCS#8), created if absent.
        #[arg(long, env = "GUILD_IDENTITY", default_value = "merchant.key")]
        identity: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("guild-client: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Register { coordinator, name, identity } => {
            let identity = Identity::load_or_create(&identity)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let registered = runtime.block_on(async {
                let mut connection =
                    Connection::connect(&coordinator, guild_proto::limits::max_message_bytes(1 << 20, 1000))
                        .await?;
                connection.register(&name, &identity).await
            })?;
            let device = guild_client::training_device();
            println!(
                "{}",
                serde_json::json!({
                    "merchant_id": registered.merchant_id.as_str(),
                    "federation_id": registered.federation_id.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                    "training_device": format!("{device:?}"),
                })
            );
            Ok(())
        }
    }
}
