//! `guild-sim`: runs a federation on one machine.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "guild-sim", version, about = "Guild federation simulator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Arm {
    /// The pretrained encoder, no adapters.
    ZeroShot,
    /// Adapters trained on every merchant's training data pooled (centralised, non-private).
    Pooled,
    /// Adapters trained on one merchant's data alone.
    Merchant,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Redraw a run's report (summary and plots) from its results.json.
    Report {
        results: std::path::PathBuf,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Run a scenario (baselines and federated arms on real data) and write its report.
    Run {
        /// Scenario file, e.g. scenarios/default.toml.
        scenario: std::path::PathBuf,
        /// Report folder (default: reports/NAME).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Load test: lightweight clients (random updates, no model) through full SecAgg+
    /// rounds over loopback mutual TLS; prints rounds per minute and per-phase latency.
    Load {
        #[arg(long, default_value_t = 200)]
        clients: usize,
        /// Length of the update vector (a power of two).
        #[arg(long, default_value_t = 1 << 18)]
        dimension: usize,
        #[arg(long, default_value_t = 3)]
        rounds: u64,
        /// SecAgg+ neighbours per client (0: complete graph).
        #[arg(long, default_value_t = 20)]
        neighbours: u32,
        #[arg(long, default_value_t = 11)]
        threshold: u32,
    },
    /// Train and evaluate one non-federated arm on a fixed, seeded sample of test users.
    Local {
        #[arg(long, value_enum)]
        arm: Arm,
        /// RecBole-format dataset folder.
        #[arg(long, default_value = "../shared/data/amazon-games")]
        data: std::path::PathBuf,
        /// Merchant to train on (with `--arm merchant`), e.g. `sony-000`.
        #[arg(long, default_value = "sony-000")]
        merchant: String,
        /// Users per shop when cutting platform families into merchants.
        #[arg(long, default_value_t = 300)]
        shop_size: usize,
        #[arg(long, default_value_t = 50)]
        steps: usize,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        #[arg(long, default_value_t = 1e-3)]
        learning_rate: f64,
        /// Test users ranked against the whole catalogue (a seeded sample).
        #[arg(long, default_value_t = 1000)]
        eval_users: usize,
        #[arg(long, default_value_t = 96)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where item embeddings are cached between runs.
        #[arg(long, default_value = ".cache")]
        cache: std::path::PathBuf,
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

#[allow(clippy::too_many_arguments)]
fn local(
    arm: Arm,
    data: &std::path::Path,
    merchant: &str,
    shop_size: usize,
    train: guild_client::retrieval::TrainConfig,
    eval_users: usize,
    max_tokens: usize,
    cache: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    use guild_client::data::{Dataset, partition};
    use guild_client::model::lora::{Adapters, LoraConfig};
    use guild_client::model::{BaseModel, default_model_dir};
    use guild_client::retrieval::{Split, catalogue_embeddings, evaluate, sample_users};

    let started = std::time::Instant::now();
    let dataset = Dataset::load(data)?;
    let merchants = partition(&dataset, shop_size, train.seed);
    let device = guild_client::training_device();
    let base = BaseModel::load(&default_model_dir(), max_tokens, device)?;
    let items = catalogue_embeddings(&base, &dataset, cache, max_tokens)?;
    let all: Vec<&guild_client::data::User> = dataset.users.iter().collect();
    // The same seeded test users for every arm.
    let test_users = sample_users(&all, eval_users, 12_345);
    let adapters = Adapters::new(LoraConfig::default(), base.config(), base.sha256(), device);
    let train_users: Vec<&guild_client::data::User> = match arm {
        Arm::ZeroShot => Vec::new(),
        Arm::Pooled => all.clone(),
        Arm::Merchant => {
            let m = merchants
                .iter()
                .find(|m| m.name == merchant)
                .with_context(|| format!("no merchant named {merchant} (shop size {shop_size})"))?;
            m.users.iter().map(|&i| &dataset.users[i]).collect()
        }
    };
    let training_started = std::time::Instant::now();
    let report = if train_users.is_empty() {
        None
    } else {
        Some(guild_client::retrieval::train(&base, &adapters, &dataset, &train_users, &items, &train)?)
    };
    let training_seconds = training_started.elapsed().as_secs_f64();
    let counts = evaluate(
        &base,
        report.as_ref().map(|_| &adapters),
        &dataset,
        &test_users,
        &items,
        Split::Test,
        train.history_items,
    )?;
    Ok(serde_json::json!({
        "arm": format!("{arm:?}"),
        "merchant": matches!(arm, Arm::Merchant).then_some(merchant),
        "merchants": merchants.len(),
        "train_users": train_users.len(),
        "train_examples": report.as_ref().map(|r| r.examples),
        "steps": report.as_ref().map(|r| r.steps),
        "first_loss": report.as_ref().map(|r| r.first_loss),
        "last_loss": report.as_ref().map(|r| r.last_loss),
        "training_examples_per_second": report.as_ref().map(|r| (r.steps * train.batch_size) as f64 / training_seconds),
        "test_users": counts.users,
        "recall_at_10": counts.recall_at_10(),
        "ndcg_at_10": counts.ndcg_at_10(),
        "mrr": counts.mrr(),
        "device": format!("{device:?}"),
        "wall_seconds": started.elapsed().as_secs_f64(),
    }))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Report { results, out } => {
            let results = guild_sim::report::read(&results)?;
            guild_sim::report::write(&results, &out)?;
            println!("{}", guild_sim::report::markdown(&results));
            Ok(())
        }
        Command::Run { scenario, out } => {
            let scenario = guild_sim::scenario::Scenario::load(&scenario)?;
            let out = out.unwrap_or_else(|| guild_sim::run::default_out(&scenario));
            // Training and evaluation share one base model behind a mutex, so a few blocking
            // threads suffice; hundreds would each keep their own allocator arenas.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .max_blocking_threads(8)
                .build()
                .context("starting the async runtime")?;
            let results = runtime.block_on(guild_sim::run::run(scenario, &out))?;
            guild_sim::report::write(&results, &out)?;
            println!("{}", guild_sim::report::markdown(&results));
            eprintln!("guild-sim: report written to {}", out.display());
            Ok(())
        }
        Command::Load { clients, dimension, rounds, neighbours, threshold } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let report =
                runtime.block_on(guild_sim::load::run(clients, dimension, rounds, neighbours, threshold))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Local {
            arm,
            data,
            merchant,
            shop_size,
            steps,
            batch_size,
            learning_rate,
            eval_users,
            max_tokens,
            seed,
            cache,
        } => {
            let train = guild_client::retrieval::TrainConfig {
                batch_size,
                steps,
                learning_rate,
                seed,
                ..Default::default()
            };
            let result = local(arm, &data, &merchant, shop_size, train, eval_users, max_tokens, &cache)?;
            println!("{result}");
            Ok(())
        }
    }
}
