//! `guild-coordinator`: the daemon and its operator commands.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use guild_coordinator::service::{CoordinatorCore, CoordinatorService};
use guild_coordinator::store::Store;

#[derive(Debug, Parser)]
#[command(name = "guild-coordinator", version, about = "Guild federated-learning coordinator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator daemon.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "GUILD_LISTEN", default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// SQLite store (created on first start).
        #[arg(long, env = "GUILD_STORE", default_value = "guild.db")]
        store: PathBuf,
        /// sha256 of the base model's safetensors file (64 hex digits).
        #[arg(long, env = "GUILD_BASE_MODEL_SHA256", value_parser = parse_sha256,
              default_value = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db")]
        base_model_sha256: [u8; 32],
        /// Largest accepted gRPC message, in bytes.
        #[arg(long, env = "GUILD_MAX_MESSAGE_BYTES", default_value_t = guild_proto::limits::max_message_bytes(1 << 20, 1000))]
        max_message_bytes: usize,
    },
    /// Privacy accounting for the Poisson-subsampled Gaussian (prints JSON).
    #[command(subcommand)]
    Privacy(PrivacyCommand),
}

#[derive(Debug, Subcommand)]
enum PrivacyCommand {
    /// ε(δ) after T rounds at sampling rate q and noise multiplier z.
    Epsilon {
        #[arg(long, value_parser = sampling_rate)]
        sampling_rate: f64,
        #[arg(long, value_parser = positive)]
        noise_multiplier: f64,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        rounds: u64,
        #[arg(long, value_parser = delta)]
        delta: f64,
    },
    /// The smallest noise multiplier z that keeps T rounds at rate q within ε at δ.
    NoiseMultiplier {
        #[arg(long, value_parser = sampling_rate)]
        sampling_rate: f64,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        rounds: u64,
        #[arg(long, value_parser = delta)]
        delta: f64,
        #[arg(long, value_parser = positive)]
        target_epsilon: f64,
    },
}

fn number(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_finite() { Ok(v) } else { Err(format!("{s} is not finite")) }
}

fn sampling_rate(s: &str) -> Result<f64, String> {
    let q = number(s)?;
    if q > 0.0 && q <= 1.0 { Ok(q) } else { Err(format!("the sampling rate must be in (0, 1], got {q}")) }
}

fn positive(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v > 0.0 { Ok(v) } else { Err(format!("must be positive, got {v}")) }
}

fn delta(s: &str) -> Result<f64, String> {
    let d = number(s)?;
    if d > 0.0 && d < 1.0 { Ok(d) } else { Err(format!("δ must be in (0, 1), got {d}")) }
}

fn parse_sha256(s: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(s).map_err(|e| format!("not hex: {e}"))?;
    bytes.try_into().map_err(|b: Vec<u8>| format!("expected 32 bytes, got {}", b.len()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("guild-coordinator: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn privacy(command: PrivacyCommand) -> anyhow::Result<serde_json::Value> {
    use guild_privacy::accounting::{calibrate_noise_multiplier, epsilon_from_rdp, subsampled_gaussian_rdp};
    Ok(match command {
        PrivacyCommand::Epsilon { sampling_rate, noise_multiplier, rounds, delta } => {
            let curve = subsampled_gaussian_rdp(sampling_rate, noise_multiplier)?.times(rounds);
            let (epsilon, order) = epsilon_from_rdp(&curve, delta)?;
            serde_json::json!({
                "epsilon": epsilon,
                "delta": delta,
                "optimal_order": order,
                "sampling_rate": sampling_rate,
                "noise_multiplier": noise_multiplier,
                "rounds": rounds,
                "accountant": "rdp, integer orders 2..=256",
            })
        }
        PrivacyCommand::NoiseMultiplier { sampling_rate, rounds, delta, target_epsilon } => {
            let z = calibrate_noise_multiplier(sampling_rate, rounds, delta, target_epsilon)?;
            let (epsilon, _) =
                epsilon_from_rdp(&subsampled_gaussian_rdp(sampling_rate, z)?.times(rounds), delta)?;
            serde_json::json!({
                "noise_multiplier": z,
                "epsilon": epsilon,
                "target_epsilon": target_epsilon,
                "delta": delta,
                "sampling_rate": sampling_rate,
                "rounds": rounds,
            })
        }
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Privacy(command) => {
            println!("{}", privacy(command)?);
            Ok(())
        }
        Command::Serve { listen, store, base_model_sha256, max_message_bytes } => {
            let store = Store::open(&store)?;
            let core = Arc::new(CoordinatorCore::new(store, base_model_sha256)?);
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding {listen}"))?;
                tracing::info!(address = %listener.local_addr()?, "coordinator listening");
                tonic::transport::Server::builder()
                    .add_service(CoordinatorService::new(core).into_server(max_message_bytes))
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        async {
                            let _ = tokio::signal::ctrl_c().await;
                        },
                    )
                    .await
                    .context("serving gRPC")
            })
        }
    }
}
