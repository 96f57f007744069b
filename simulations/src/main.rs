//! `guild-sim`: runs a federation on one machine.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use guild_proto::domain::AdapterFamilyName;

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
    /// FedAvg in this process, for tuning on the validation split: no secure aggregation,
    /// no noise, no network (the federated arms of `run` add those).
    Fedavg,
    /// Shopper-level DP-SGD in this process, for tuning on the validation split: every
    /// shopper Poisson-sampled at `--sampling-rate`, each one's update (`--steps` SGD steps
    /// at `--learning-rate` on its own rows) clipped to `--clip-norm`, summed, Gaussian noise
    /// of `--noise-multiplier`·c added, divided by q·N, and a server step.
    ShopperDp,
}

/// Which adapter family a local arm trains.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Family {
    /// FFA-LoRA in MiniLM's attention (the query tower runs MiniLM every step).
    Lora,
    /// The sequence tower over frozen title embeddings (zero-shot: mean of the last five).
    Tower,
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
        /// Also write each arm's final adapter under OUT/adapters (`[arms] keep_adapters`).
        #[arg(long)]
        keep_adapters: bool,
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
        #[arg(long, default_value_t = 14)]
        threshold: u32,
        /// Concurrent request loops of one more, flooding merchant (allow-listed, never in
        /// a cohort), each on its own connection; 0 for none.
        #[arg(long, default_value_t = 0)]
        flood: usize,
        /// Rounds without DP noise (`privacy.mode = "dangerous_none"`): secure aggregation
        /// alone, as a peer without DP runs it.
        #[arg(long)]
        dangerous_no_noise: bool,
    },
    /// Train and evaluate one non-federated arm on a fixed, seeded sample of test users.
    Local {
        #[arg(long, value_enum)]
        arm: Arm,
        #[arg(long, value_enum, default_value = "lora")]
        family: Family,
        /// Sequence tower: items of the history it reads.
        #[arg(long, default_value_t = 20)]
        history: usize,
        /// Sequence tower: rank of the item residual.
        #[arg(long, default_value_t = 32)]
        item_rank: usize,
        /// Sequence tower: transformer width.
        #[arg(long, default_value_t = 128)]
        width: usize,
        /// Sequence tower: transformer layers (0: pooling and item residual only).
        #[arg(long, default_value_t = 2)]
        layers: usize,
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
        /// Sequence tower: uniform negatives per batch (0: full softmax over the catalogue).
        #[arg(long, default_value_t = 0)]
        negatives: usize,
        #[command(flatten)]
        plan: FedAvgPlan,
    },
}

fn main() -> ExitCode {
    guild_client::bound_allocator_memory();
    guild_client::keep_large_buffers_in_heap();
    guild_client::init_logging("warn");
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("guild-sim: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Trains (unless zero-shot) and scores one non-federated arm in the same model world the
/// simulator's arms use.
fn local(
    arm: Arm,
    spec: guild_sim::world::WorldSpec,
    merchant: &str,
    train: guild_client::retrieval::TrainConfig,
    plan: FedAvgPlan,
) -> anyhow::Result<serde_json::Value> {
    use guild_client::retrieval::Split;

    let started = std::time::Instant::now();
    let shop_size = spec.shop_size;
    let world = guild_sim::world::World::load(spec)?;
    let train_users: Vec<usize> = match arm {
        Arm::ZeroShot | Arm::Fedavg | Arm::ShopperDp => Vec::new(),
        Arm::Pooled => world.all_merchant_users(),
        Arm::Merchant => world
            .merchants
            .iter()
            .find(|m| m.name == merchant)
            .with_context(|| format!("no merchant named {merchant} (shop size {shop_size})"))?
            .users
            .clone(),
    };
    let training_started = std::time::Instant::now();
    let in_process = InProcess { world: &world, train: &train, plan: &plan, started };
    if let Arm::Fedavg = arm {
        return fedavg(in_process);
    }
    if let Arm::ShopperDp = arm {
        return shopper_dp(in_process);
    }
    let trained = if train_users.is_empty() { None } else { Some(world.train_on(&train_users, &train)?) };
    let training_seconds = training_started.elapsed().as_secs_f64();
    let values = trained.as_ref().map(|(values, _)| values.as_slice());
    let (scores, validation) = (world.score(values, Split::Test)?, world.score(values, Split::Validation)?);
    let report = trained.as_ref().map(|(_, report)| report);
    Ok(serde_json::json!({
        "arm": format!("{arm:?}"),
        "merchant": matches!(arm, Arm::Merchant).then_some(merchant),
        "merchants": world.merchants.len(),
        "train_users": train_users.len(),
        "train_examples": report.map(|r| r.examples),
        "steps": report.map(|r| r.steps),
        "first_loss": report.map(|r| r.first_loss),
        "last_loss": report.map(|r| r.last_loss),
        // A row is one training prefix for LoRA, and for the sequence tower one shopper's
        // window of up to L items trained at every position (`train_examples` counts targets).
        "training_rows_per_second": report.map(|r| (r.steps * train.batch_size) as f64 / training_seconds),
        "test_users": scores.users,
        "recall_at_10": scores.recall_at_10,
        "ndcg_at_10": scores.ndcg_at_10,
        "mrr": scores.mrr,
        "validation": validation,
        "parameters": values.map(<[f32]>::len),
        "device": format!("{:?}", guild_client::training_device()),
        "wall_seconds": started.elapsed().as_secs_f64(),
    }))
}

/// `--arm fedavg`'s and `--arm shopper-dp`'s schedule.
#[derive(Debug, clap::Args)]
struct FedAvgPlan {
    /// `--arm fedavg`: rounds; `--steps` and `--batch-size` are each merchant's per round.
    #[arg(long, default_value_t = 10)]
    rounds: u64,
    /// `--arm fedavg`: Poisson sampling rate of merchants per round.
    #[arg(long, default_value_t = 0.1)]
    sampling_rate: f64,
    /// `--arm fedavg`: the server's learning rate on the mean update.
    #[arg(long, default_value_t = 1.0)]
    server_learning_rate: f64,
    /// `--arm fedavg`: the server's momentum (FedAvgM; 0: plain FedAvg).
    #[arg(long, default_value_t = 0.0)]
    server_momentum: f64,
    /// `--arm fedavg`: FedAdam (the coordinator's) instead of FedAvg(M) on the server.
    #[arg(long)]
    server_adam: bool,
    /// `--arm shopper-dp`: L2 clip norm of one shopper's update.
    #[arg(long, default_value_t = 1.0)]
    clip_norm: f64,
    /// `--arm shopper-dp`: z; the noisy sum carries N(0, (z·c)²) per coordinate.
    #[arg(long, default_value_t = 1.0)]
    noise_multiplier: f64,
}

/// The in-process server optimiser: FedAdam (the coordinator's own step) or FedAvg with
/// momentum (FedAvgM; plain FedAvg at momentum 0).
struct ServerState {
    velocity: Vec<f32>,
    moments: Option<guild_coordinator::engine::optimizer::Moments>,
}

impl ServerState {
    fn new(dimension: usize) -> Self {
        Self { velocity: vec![0.0; dimension], moments: None }
    }

    /// Moves `global` by the server's learning rate on the round's mean update.
    fn step(&mut self, plan: &FedAvgPlan, global: &mut Vec<f32>, mean: &[f64]) {
        if plan.server_adam {
            use guild_coordinator::config::ServerOptimizer;
            use guild_coordinator::engine::optimizer::{Trained, server_step};
            let step = server_step(
                ServerOptimizer::FedAdam,
                global,
                mean,
                1.0,
                plan.server_learning_rate,
                self.moments.as_ref(),
                Trained::All(None),
            );
            *global = step.values;
            self.moments = step.moments;
        } else {
            for ((g, v), m) in global.iter_mut().zip(self.velocity.iter_mut()).zip(mean) {
                *v = plan.server_momentum as f32 * *v + *m as f32;
                *g += plan.server_learning_rate as f32 * *v;
            }
        }
    }
}

/// What an arm that runs its rounds in this process (no gRPC, no SecAgg+) works from.
#[derive(Clone, Copy)]
struct InProcess<'a> {
    world: &'a guild_sim::world::World,
    train: &'a guild_client::retrieval::TrainConfig,
    plan: &'a FedAvgPlan,
    started: std::time::Instant,
}

/// Shopper-level DP-SGD in this process (see [`Arm::ShopperDp`]), with continuous Gaussian
/// noise standing in for the federation's distributed discrete Gaussian. Prints the
/// validation metric and the accountant's ε (δ = 1e-6) each round.
fn shopper_dp(arm: InProcess<'_>) -> anyhow::Result<serde_json::Value> {
    let InProcess { world, train, plan, started } = arm;
    use guild_privacy::accounting::{epsilon_from_rdp, subsampled_gaussian_rdp};
    use guild_privacy::dp::{add_central_noise, clip_l2, poisson_sample};
    use rand::SeedableRng;

    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(train.seed ^ 0x5709);
    let shoppers = world.all_merchant_users();
    let expected = plan.sampling_rate * shoppers.len() as f64;
    let per_round = subsampled_gaussian_rdp(plan.sampling_rate, plan.noise_multiplier)?;
    let mut training_seconds = 0.0;
    let dimension = world.parameter_count();
    let mut result = in_process_rounds(world, plan, "shopper-level DP-SGD", |round, global| {
        let sampled: Vec<usize> = poisson_sample(shoppers.len(), plan.sampling_rate, &mut rng)?
            .into_iter()
            .map(|i| shoppers[i])
            .collect();
        let mut sum = vec![0.0f64; global.len()];
        let config =
            guild_client::retrieval::TrainConfig { seed: train.seed ^ (round << 20), ..train.clone() };
        let t = std::time::Instant::now();
        world.shopper_updates(global, &sampled, &config, &mut |update| {
            clip_l2(update, plan.clip_norm)?;
            sum.iter_mut().zip(update.iter()).for_each(|(s, u)| *s += f64::from(*u));
            Ok(())
        })?;
        training_seconds += t.elapsed().as_secs_f64();
        let signal = sum.iter().map(|s| s * s).sum::<f64>().sqrt() / expected;
        add_central_noise(&mut sum, plan.noise_multiplier * plan.clip_norm, &mut rng)?;
        let mean: Vec<f64> = sum.iter().map(|s| s / expected).collect();
        let epsilon = epsilon_from_rdp(&per_round.clone().times(round), 1e-6)?.0;
        let line = format!(
            "{} shoppers, mean clipped update norm {signal:.4} (noise {:.4}), ε {epsilon:.2}, {:.0} s ({:.1} ms a shopper)",
            sampled.len(),
            plan.noise_multiplier * plan.clip_norm * (dimension as f64).sqrt() / expected,
            started.elapsed().as_secs_f64(),
            1e3 * training_seconds / (round as f64 * expected),
        );
        Ok((mean, line))
    })?;
    result.insert("epsilon_at_1e-6".into(), epsilon_from_rdp(&per_round.times(plan.rounds), 1e-6)?.0.into());
    result.insert("training_seconds".into(), training_seconds.into());
    result.insert("wall_seconds".into(), started.elapsed().as_secs_f64().into());
    Ok(serde_json::Value::Object(result))
}

/// `plan.rounds` rounds in this process: `round` returns each round's mean update (from the
/// global values it is given) and a line describing it; the server steps on the mean, the
/// validation metric is printed after each round and the test metric read once at the end.
fn in_process_rounds(
    world: &guild_sim::world::World,
    plan: &FedAvgPlan,
    arm: &str,
    mut round: impl FnMut(u64, &[f32]) -> anyhow::Result<(Vec<f64>, String)>,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    use guild_client::retrieval::Split;

    let mut global = vec![0.0f32; world.parameter_count()];
    let mut server = ServerState::new(global.len());
    let mut curve = Vec::new();
    for r in 1..=plan.rounds {
        let (mean, line) = round(r, &global)?;
        server.step(plan, &mut global, &mean);
        let validation = world.score(Some(&global), Split::Validation)?;
        eprintln!("round {r}: {line}, validation NDCG@10 {:.4}", validation.ndcg_at_10);
        curve.push(validation.ndcg_at_10);
    }
    let test = world.score(Some(&global), Split::Test)?;
    let mut result = serde_json::Map::new();
    result.insert("arm".into(), arm.into());
    result.insert("validation_ndcg_at_10_by_round".into(), curve.into());
    result.insert("ndcg_at_10".into(), test.ndcg_at_10.into());
    result.insert("recall_at_10".into(), test.recall_at_10.into());
    Ok(result)
}

/// FedAvg(M) in this process: each round Poisson-samples merchants, each trains from the
/// global values and returns its change, the server moves by its learning rate times the
/// (momentum-averaged) mean change. Prints the validation metric each round.
fn fedavg(arm: InProcess<'_>) -> anyhow::Result<serde_json::Value> {
    let InProcess { world, train, plan, started } = arm;
    use rand::{Rng, SeedableRng};

    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(train.seed ^ 0xfed);
    let mut result = in_process_rounds(world, plan, "FedAvg", |round, global| {
        let cohort: Vec<_> = world.merchants.iter().filter(|_| rng.gen_bool(plan.sampling_rate)).collect();
        let mut mean = vec![0.0f64; global.len()];
        for (i, merchant) in cohort.iter().enumerate() {
            let config = guild_client::retrieval::TrainConfig {
                seed: train.seed ^ (round << 20) ^ i as u64,
                ..train.clone()
            };
            let (values, _) = world.train_from(global, &merchant.users, &config)?;
            for ((m, v), g) in mean.iter_mut().zip(&values).zip(global) {
                *m += f64::from((v - g) / cohort.len().max(1) as f32);
            }
        }
        Ok((mean, format!("{} merchants, {:.0} s", cohort.len(), started.elapsed().as_secs_f64())))
    })?;
    result.insert("wall_seconds".into(), started.elapsed().as_secs_f64().into());
    Ok(serde_json::Value::Object(result))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Report { results, out } => {
            let results = guild_sim::report::read(&results)?;
            guild_sim::report::write(&results, &out)?;
            println!("{}", guild_sim::report::markdown(&results));
            Ok(())
        }
        Command::Run { scenario, out, keep_adapters } => {
            let mut scenario = guild_sim::scenario::Scenario::load(&scenario)?;
            scenario.arms.keep_adapters |= keep_adapters;
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
            match &results.comparisons_failed {
                Some(error) => anyhow::bail!(
                    "the paired comparisons failed ({error}); every arm's scores are in {}",
                    out.display()
                ),
                None => Ok(()),
            }
        }
        Command::Load { clients, dimension, rounds, neighbours, threshold, flood, dangerous_no_noise } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let settings = guild_sim::load::LoadSettings {
                clients,
                dimension,
                rounds,
                neighbours,
                threshold,
                flood_streams: flood,
                dangerous_no_noise,
            };
            let report = runtime.block_on(guild_sim::load::run(settings))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Local {
            arm,
            family,
            history,
            item_rank,
            width,
            layers,
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
            negatives,
            plan,
        } => {
            let train = guild_client::retrieval::TrainConfig {
                batch_size,
                steps,
                learning_rate,
                seed,
                negatives,
                ..Default::default()
            };
            let spec = guild_sim::world::WorldSpec {
                dataset: data,
                max_users: None,
                shop_size,
                max_merchants: None,
                seed,
                max_tokens,
                cache,
                eval_users,
                family: match family {
                    Family::Lora => AdapterFamilyName::FfaLora,
                    Family::Tower => AdapterFamilyName::SequenceTower,
                },
                lora: guild_client::model::lora::LoraConfig::default(),
                tower: guild_client::model::tower::TowerConfig {
                    shape: guild_proto::tower::TowerShape {
                        history,
                        item_rank,
                        width,
                        layers,
                        ..guild_proto::tower::TowerShape::default()
                    },
                    seed,
                },
                // The in-process tuner averages every coordinate: no summed histogram.
                popularity: false,
            };
            let result = local(arm, spec, &merchant, train, plan)?;
            println!("{result}");
            Ok(())
        }
    }
}
