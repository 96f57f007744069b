//! The arms of a scenario: baselines in this process (zero-shot, local-only per merchant,
//! centralised), and each federated arm as a real federation (a `guild-coordinator` child
//! process, merchants as clients over loopback mutual TLS) with the scenario's faults;
//! every arm is scored on the same evaluation users against the full catalogue.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use guild_client::config::{AdapterSettings, ClientConfig, DataConfig, Guards, ModelConfig, TlsFiles};
use guild_client::data::Merchant;
use guild_client::learner::{Learner, ModelLearner, TowerLearner};
use guild_client::participant::{ClientLedger, Faults, Participant, ParticipantOptions, RoundOutcome};
use guild_client::retrieval::{Split, TrainConfig};
use guild_coordinator::config::StatisticRounds;
use guild_privacy::accounting::{RdpCurve, calibrate_noise_multiplier};
use guild_privacy::cost::{RoundPrivacy, calibrate_noise};
use guild_privacy::ledger::Budget;
use guild_privacy::{PrivacyMode, PrivacyUnit};
use guild_proto::domain::AdapterFamilyName;
use guild_proto::round::{RoundKind, Schedule};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;

use crate::federation::{Federation, coordinator_binary};
use crate::observe::{PhaseStats, charged_after_last_version, epsilon_after, per_phase};
use crate::progress::Progress;
use crate::results::{ArmResult, Comparison, RoundPoint, RunResults, Scores};
use crate::scenario::{ClientMode, Scenario, ShopperDp};
use crate::stats::{BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, Metric, PairingError, paired_difference, per_user};
use crate::world::{World, WorldSpec, lock};

/// The reference arms every other arm is compared with.
pub const ZERO_SHOT: &str = "zero-shot";
pub const LOCAL_ONLY: &str = "local-only (mean)";
pub const CENTRALISED: &str = "centralised (non-private)";
/// The other untrained ranker of the sequence-tower family, also a reference.
pub const WEAKER_ZERO_SHOT: &str = "zero-shot (the weaker untrained ranker)";
/// The tower's start plus the exact popularity histogram of every merchant's shoppers, no
/// training: how much of a trained arm's gain popularity alone gives.
pub const POPULARITY: &str = "zero-shot + popularity (non-private)";

/// Adds to every arm its paired differences in NDCG@10 and Recall@10 (with 95% bootstrap
/// intervals) against each reference arm present: zero-shot (and, for the sequence tower,
/// the weaker untrained ranker), the local-only mean (each user's metric averaged over the
/// local merchants' models) and centralised.
pub fn compare_arms(arms: &mut [ArmResult]) -> anyhow::Result<()> {
    let metrics = [Metric::NdcgAt10, Metric::RecallAt10];
    let references: Vec<(String, Vec<Vec<f64>>)> = arms
        .iter()
        .filter(|a| {
            [ZERO_SHOT, WEAKER_ZERO_SHOT, POPULARITY, LOCAL_ONLY, CENTRALISED].contains(&a.arm.as_str())
                && !a.test_ranks.is_empty()
        })
        .map(|a| {
            Ok((
                a.arm.clone(),
                metrics.iter().map(|&m| per_user(m, &a.test_ranks)).collect::<Result<_, _>>()?,
            ))
        })
        .collect::<Result<_, PairingError>>()?;
    // The zero-shot reference is what every other arm is measured against; it is not
    // compared with the trained references itself (their comparisons show the same pairs).
    for arm in arms.iter_mut().filter(|a| !a.test_ranks.is_empty() && a.arm != ZERO_SHOT) {
        let mine: Vec<Vec<f64>> =
            metrics.iter().map(|&m| per_user(m, &arm.test_ranks)).collect::<Result<_, _>>()?;
        arm.comparisons = references
            .iter()
            .filter(|(name, _)| *name != arm.arm)
            .map(|(name, theirs)| {
                let differences = metrics
                    .iter()
                    .zip(mine.iter().zip(theirs))
                    .map(|(&m, (a, b))| {
                        // An arm scored on the first n evaluation users only (a seeded
                        // subsample) pairs with the others' first n.
                        let n = a.len().min(b.len());
                        paired_difference(m, &a[..n], &b[..n], BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
                    })
                    .collect::<Result<_, _>>()?;
                Ok(Comparison { against: name.clone(), differences })
            })
            .collect::<Result<_, PairingError>>()?;
    }
    Ok(())
}

/// How the in-process baselines train.
/// The sequence tower trains with the same sampled softmax as the merchants' clients.
fn baseline_training(
    world: &World,
    steps: usize,
    batch_size: usize,
    learning_rate: f64,
    seed: u64,
) -> TrainConfig {
    let negatives = match world.spec.family {
        AdapterFamilyName::FfaLora => 0,
        AdapterFamilyName::SequenceTower => guild_client::learner::TOWER_NEGATIVES,
    };
    TrainConfig { batch_size, steps, learning_rate, seed, negatives, ..TrainConfig::default() }
}

struct FederatedArm {
    name: String,
    mode: PrivacyMode,
    unit: PrivacyUnit,
    /// The shopper-level arms' settings (the unit is then `Shopper`).
    shopper: Option<ShopperDp>,
    /// z of the training rounds (0 when the arm runs none).
    noise_multiplier: f64,
    /// The round kinds before training (shopper-level arms), in the coordinator's order.
    schedule: Schedule,
    /// z of the popularity releases and of the pooling selection (0 when the schedule has none).
    popularity_noise_multiplier: f64,
    selection_noise_multiplier: f64,
    epsilon_cap: f64,
    delta: f64,
    /// Every round the arm runs: its popularity releases and its training rounds.
    rounds: u64,
}

async fn federated(
    world: &World,
    s: &Scenario,
    arm: &FederatedArm,
    kill_after: Option<u64>,
    out: &Path,
    progress: &Progress,
) -> anyhow::Result<ArmResult> {
    let f = &s.federation;
    let started = Instant::now();
    let dir = out.join("arms").join(&arm.name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    // The shopper-level arms' merchants hold several of the scenario's shops each.
    let merged;
    let merchants: &[Merchant] = match &arm.shopper {
        Some(sh) => {
            merged = merge_shops(&world.merchants, sh.merge_shops);
            &merged
        }
        None => &world.merchants,
    };
    let n = merchants.len();
    let shoppers: usize = merchants.iter().map(|m| m.users.len()).sum();
    let mut federation = Federation::init(&dir, n, |c| {
        c.adapter.family = f.family;
        c.adapter.rank = f.rank;
        c.adapter.alpha = world.spec.lora.alpha as f32;
        c.adapter.tower = world.spec.tower.shape;
        c.adapter.frozen_a_seed = world.spec.tower.seed;
        c.rounds.sampling_rate = f.sampling_rate;
        c.rounds.min_cohort = f.min_cohort;
        c.rounds.threshold = f.threshold;
        c.rounds.neighbours = f.neighbours;
        c.rounds.phase_deadlines_ms = f.phase_deadlines_ms;
        c.rounds.max_rounds = arm.rounds;
        c.rounds.local_steps = f.local_steps;
        c.rounds.batch_size = f.batch_size;
        c.rounds.learning_rate = f.learning_rate;
        c.rounds.negatives = f.negatives;
        c.rounds.server_learning_rate = f.server_learning_rate;
        c.rounds.server_optimizer = f.server_optimizer;
        c.privacy.mode = arm.mode;
        c.privacy.clip_norm = f.clip_norm;
        c.privacy.noise_multiplier = arm.noise_multiplier;
        c.privacy.epsilon_budget = arm.epsilon_cap;
        c.privacy.delta = arm.delta;
        if let Some(sh) = &arm.shopper {
            // Every merchant in every round, each sampling its own shoppers.
            c.rounds.sampling_rate = 1.0;
            c.rounds.min_cohort = n as u32;
            c.rounds.neighbours = 0;
            c.rounds.local_steps = sh.local_steps;
            c.rounds.learning_rate = sh.learning_rate;
            c.rounds.negatives = sh.negatives;
            c.rounds.server_learning_rate = sh.server_learning_rate;
            c.rounds.server_optimizer = sh.server_optimizer;
            c.privacy.unit = PrivacyUnit::Shopper;
            c.privacy.shopper_sampling_rate = sh.sampling_rate;
            c.privacy.shoppers = shoppers as u64;
            c.privacy.clip_norm = sh.clip_norm;
            c.rounds.popularity_release = StatisticRounds {
                rounds: arm.schedule.popularity_releases,
                noise_multiplier: arm.popularity_noise_multiplier,
                sampling_rate: sh.popularity_sampling_rate,
            };
            c.rounds.pooling_selection = StatisticRounds {
                rounds: u32::from(arm.schedule.pooling_selection),
                noise_multiplier: arm.selection_noise_multiplier,
                sampling_rate: sh.popularity_sampling_rate,
            };
        }
    })?;
    let binary = coordinator_binary()?;
    federation.start_process(&binary).await?;
    let mut events = Vec::new();
    if let Some(sh) = &arm.shopper {
        // The arm's rounds as the coordinator's schedule runs them, one line per kind.
        let schedule = arm.schedule;
        let steps: Vec<String> = RoundKind::ALL
            .into_iter()
            .filter_map(|kind| {
                let count = schedule.count(kind, arm.rounds);
                (count > 0).then(|| match kind {
                    RoundKind::PopularityRelease => format!(
                        "{count} popularity release(s): every merchant's shoppers sampled at q = {}, each one's \
                         items at the whole clip norm, z = {:.3}",
                        sh.popularity_sampling_rate, arm.popularity_noise_multiplier,
                    ),
                    RoundKind::PoolingSelection => format!(
                        "one pooling selection: every merchant's shoppers sampled at q = {}, each one's NDCG@10 on \
                         its validation item under the {} public settings of pooling and prior weight, z = {:.3}",
                        sh.popularity_sampling_rate,
                        guild_proto::tower::SELECTION_SETTINGS,
                        arm.selection_noise_multiplier,
                    ),
                    RoundKind::Training => format!("{count} training round(s) at z = {:.3}", arm.noise_multiplier),
                })
            })
            .collect();
        if schedule.statistic_rounds() > 0 {
            events.push(steps.join("; then "));
        }
    }

    let faults = Faults {
        drop: s.faults.drop,
        straggle: s.faults.straggle,
        straggle_delay: Duration::from_millis(s.faults.straggle_ms),
        ..Default::default()
    };
    let unnoised = arm.mode != PrivacyMode::Distributed;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    let mut processes = Vec::new();
    for (i, merchant) in merchants.iter().enumerate() {
        match s.clients {
            ClientMode::Tasks => {
                let connection = federation.connect(i).await?;
                let (shared, users, eval_users, seed) =
                    (world.shared.clone(), merchant.users.clone(), s.data.client_eval_users, i as u64);
                let learner: Box<dyn Learner> = match world.spec.family {
                    AdapterFamilyName::FfaLora => {
                        Box::new(ModelLearner::new(shared, world.spec.lora.clone(), users, eval_users, seed))
                    }
                    AdapterFamilyName::SequenceTower => Box::new(TowerLearner::new(
                        shared,
                        world.spec.tower.clone(),
                        users,
                        eval_users,
                        seed,
                    )?),
                };
                let options = ParticipantOptions {
                    display_name: merchant.name.clone(),
                    dangerous_send_unnoised_updates: unnoised,
                    min_noise_multiplier: 0.0,
                    poll: Duration::from_secs(5),
                    max_backoff: Duration::from_secs(2),
                    faults: faults.clone(),
                    max_rounds: 0,
                    // The simulator reports each arm's ε; its merchants do not cap their own
                    // (nor the rate at which the shopper arms sample their shoppers).
                    max_epsilon: f64::INFINITY,
                    max_shopper_sampling_rate: 1.0,
                    ..ParticipantOptions::default()
                };
                // Each merchant keeps its own durable ledger, read back after the arm for
                // its ε against the coordinator.
                let ledger = ClientLedger::open(&merchant_ledger(&federation, i))?;
                let mut participant =
                    Participant::new(connection, Arc::new(federation.identity(i)?), learner, options, ledger);
                let tx = tx.clone();
                tasks.push(tokio::spawn(async move {
                    participant
                        .run(|r| {
                            if let Ok(report) = r {
                                let _ = tx.send(report.clone());
                            }
                        })
                        .await
                }));
            }
            ClientMode::Processes => {
                processes.push(spawn_client_process(&federation, world, s, i, merchant, unnoised)?)
            }
        }
    }
    drop(tx);

    let store = federation.store()?;
    // The per-round curve may be drawn on the first `curve_users` evaluation users; the
    // arm's final scores are on all of them.
    let curve_world = world.evaluated_on_first(s.data.curve_users.unwrap_or(world.eval_users.len()));
    let budget = Budget { epsilon: arm.epsilon_cap, delta: arm.delta };
    let evaluate_new = |seen: &mut u64, curve: &mut Vec<RoundPoint>| -> anyhow::Result<()> {
        let latest = store.latest_adapter()?.map_or(0, |a| a.version);
        while *seen < latest {
            *seen += 1;
            let record = store.adapter(*seen)?;
            let values = guild_proto::adapter::from_bytes(&record.data, world.parameter_count())?;
            let validation =
                tokio::task::block_in_place(|| curve_world.score(Some(&values), Split::Validation))?;
            curve.push(RoundPoint {
                round: *seen,
                validation,
                epsilon: epsilon_after(&store, budget, arm.unit, Some(*seen))?,
            });
            let epsilon = curve.last().map_or(0.0, |p: &RoundPoint| p.epsilon);
            progress.round_done(format!(
                "{}: adapter version {seen}, validation NDCG@10 {:.4}, MRR {:.4}, ε {epsilon:.3}",
                arm.name, validation.ndcg_at_10, validation.mrr
            ));
        }
        Ok(())
    };
    let mut status_connection = federation.connect(0).await?;
    let mut curve = Vec::new();
    let mut seen = 0u64;
    let mut killed = false;
    let mut phase_stats = PhaseStats::default();
    let limit = Duration::from_millis(f.phase_deadlines_ms.iter().sum::<u64>()) * (arm.rounds as u32 + 2)
        + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        evaluate_new(&mut seen, &mut curve)?;
        let counts = store.round_counts()?;
        if let Some(k) = kill_after
            && !killed
            && counts.completed >= k
            && store.open_round_phase()?.is_some()
        {
            if let Some(address) = federation.config.server.metrics_listen {
                phase_stats.scrape(address);
            }
            let (round, phase) = match store.open_round_phase()? {
                Some((round, Some(phase))) => (round, phase.name()),
                Some((round, None)) => (round, "committing"),
                None => (0, "between rounds"),
            };
            federation.kill()?;
            // The daemon's `max_rounds` counts rounds of one run: the restarted daemon runs
            // only those still owed, or the arm would end with more rounds than planned.
            federation.config.rounds.max_rounds = arm.rounds.saturating_sub(counts.completed).max(1);
            std::fs::write(federation.config_path(), toml::to_string(&federation.config)?)?;
            events.push(format!(
                "coordinator SIGKILLed during round {round} ({phase}) after {} committed rounds",
                counts.completed
            ));
            federation.start_process(&binary).await?;
            events.push("coordinator restarted; the open round was aborted and clients reconnected".into());
            progress.message(format!("{}: {}", arm.name, events[events.len() - 2..].join("; ")));
            killed = true;
        }
        if counts.completed >= arm.rounds {
            break;
        }
        if let Ok(status) = status_connection.status().await
            && status.current_phase.contains("budget exhausted")
        {
            // A round may have committed since `counts` was read: the budget cut the run
            // short only if fewer rounds than planned are committed now.
            let completed = store.round_counts()?.completed;
            if completed < arm.rounds {
                events.push(format!(
                    "the privacy budget stopped the run after {completed} rounds: {}",
                    status.current_phase
                ));
            }
            break;
        }
        if started.elapsed() > limit {
            events.push(format!("stopped at the time limit after {} rounds", counts.completed));
            break;
        }
    }
    if let Some(address) = federation.config.server.metrics_listen {
        phase_stats.scrape(address);
    }
    evaluate_new(&mut seen, &mut curve)?;
    for task in &tasks {
        task.abort();
    }
    for mut p in processes {
        let _ = p.kill();
        let _ = p.wait();
    }
    if let Some(version) = arm.schedule.version_of(RoundKind::PoolingSelection)
        && world.spec.family == AdapterFamilyName::SequenceTower
        && let Ok(record) = store.adapter(version)
    {
        let values = guild_proto::adapter::from_bytes(&record.data, world.parameter_count())?;
        events.push(match guild_proto::tower::setting_of(&world.spec.tower.shape, &values) {
            Some(j) => format!(
                "the pooling selection (adapter version {version}) chose {}",
                guild_proto::tower::describe_setting(j)
            ),
            None => format!("adapter version {version} holds none of the selection's settings"),
        });
    }
    let (dropped, straggled) = faults.injected.counts();
    if dropped.iter().sum::<u64>() > 0 {
        events.push(format!("clients made to drop out: {}", per_phase(dropped)));
    }
    if straggled.iter().sum::<u64>() > 0 {
        events.push(format!(
            "clients made to straggle by {} ms (past the deadline where it is shorter): {}",
            s.faults.straggle_ms,
            per_phase(straggled)
        ));
    }
    let counts = store.round_counts()?;
    if counts.aborted > 0 {
        events.push(format!(
            "{} round(s) aborted and retried (dropouts below threshold or the restart)",
            counts.aborted
        ));
    }
    let charged_after = charged_after_last_version(&store)?;
    if charged_after > 0 {
        events.push(format!(
            "{charged_after} round(s) charged after the last version and then aborted (never refunded)"
        ));
    }
    let mut bytes = Vec::new();
    while let Ok(report) = rx.try_recv() {
        if report.outcome == RoundOutcome::Committed {
            bytes.push(report.bytes_sent as f64);
        }
    }
    let record = store.latest_adapter()?.context("no adapter")?;
    let values = guild_proto::adapter::from_bytes(&record.data, world.parameter_count())?;
    let (test, ranks) = tokio::task::block_in_place(|| world.score_with_ranks(Some(&values), Split::Test))?;
    let validation = tokio::task::block_in_place(|| world.score(Some(&values), Split::Validation))?;
    let epsilon = epsilon_after(&store, budget, arm.unit, None)?;
    let status = status_connection.status().await.ok();
    let reported = |s: &guild_proto::domain::StatusReport| match arm.unit {
        PrivacyUnit::Merchant => s.epsilon_spent,
        PrivacyUnit::Shopper => s.shopper_epsilon_spent,
    };
    if let Some(status) = &status
        && arm.mode != PrivacyMode::DangerousNone
        && (reported(status) - epsilon).abs() > 1e-9 * epsilon.max(1.0)
    {
        anyhow::bail!("the coordinator reports ε = {} but its ledger gives {epsilon}", reported(status));
    }
    federation.kill()?;
    let against_coordinator = if arm.mode == PrivacyMode::Distributed {
        epsilon_against_coordinator(&federation, n, arm.unit, arm.delta)?
    } else {
        None
    };
    Ok(ArmResult {
        unit: (arm.mode != PrivacyMode::DangerousNone).then_some(arm.unit),
        epsilon_against_coordinator_max: against_coordinator.map(|(max, _)| max),
        epsilon_against_coordinator_mean: against_coordinator.map(|(_, mean)| mean),
        arm: arm.name.clone(),
        test,
        validation,
        worst: None,
        epsilon: (arm.mode != PrivacyMode::DangerousNone).then_some(epsilon),
        delta: (arm.mode != PrivacyMode::DangerousNone).then_some(arm.delta),
        noise_multiplier: (arm.mode != PrivacyMode::DangerousNone).then_some(arm.noise_multiplier),
        rounds: counts.completed,
        rounds_aborted: counts.aborted,
        charged_after_last_version: charged_after,
        wall_seconds: started.elapsed().as_secs_f64(),
        bytes_per_client_round: (!bytes.is_empty()).then(|| bytes.iter().sum::<f64>() / bytes.len() as f64),
        curve,
        test_ranks: vec![ranks],
        comparisons: Vec::new(),
        phase_seconds: phase_stats.mean_seconds(),
        dropouts: phase_stats.dropouts(),
        events,
    })
}

/// Merchants of `size` consecutive shops each (the last may hold fewer), named after their
/// first shop.
fn merge_shops(shops: &[Merchant], size: usize) -> Vec<Merchant> {
    shops
        .chunks(size.max(1))
        .map(|group| Merchant {
            name: format!("{}-x{}", group[0].name, group.len()),
            family: group[0].family,
            users: group.iter().flat_map(|m| m.users.iter().copied()).collect(),
        })
        .collect()
}

/// Merchant `i`'s own privacy ledger in a simulated federation.
fn merchant_ledger(federation: &Federation, i: usize) -> PathBuf {
    federation.dir.join("merchants").join(format!("{}.ledger", federation.pki.merchants[i].name))
}

/// Each merchant's ε against the coordinator for `unit` from its own ledger at `delta`
/// (merchant unit: its participations, no amplification by sampling; shopper unit: its
/// shoppers', amplified by its own sampling): (largest, mean over merchants that took part).
fn epsilon_against_coordinator(
    federation: &Federation,
    merchants: usize,
    unit: PrivacyUnit,
    delta: f64,
) -> anyhow::Result<Option<(f64, f64)>> {
    let mut spent = Vec::new();
    for i in 0..merchants {
        let ledger = ClientLedger::open(&merchant_ledger(federation, i))?;
        if ledger.participations().iter().any(|p| p.unit == unit) {
            spent.push(ledger.epsilon(unit, delta));
        }
    }
    Ok((!spent.is_empty())
        .then(|| (spent.iter().copied().fold(0.0, f64::max), spent.iter().sum::<f64>() / spent.len() as f64)))
}

fn spawn_client_process(
    federation: &Federation,
    world: &World,
    s: &Scenario,
    i: usize,
    merchant: &Merchant,
    unnoised: bool,
) -> anyhow::Result<std::process::Child> {
    anyhow::ensure!(
        s.data.max_users.is_none(),
        "client processes read the dataset themselves: max_users must not be set"
    );
    let dir = federation.dir.join("merchants");
    let name = &federation.pki.merchants[i].name;
    let config = ClientConfig {
        coordinator: federation.uri(),
        display_name: merchant.name.clone(),
        identity: format!("{name}.signing").into(),
        tls: TlsFiles {
            ca: "../ca.pem".into(),
            cert: format!("{name}.pem").into(),
            key: format!("{name}.key").into(),
        },
        data: DataConfig {
            dataset: std::fs::canonicalize(&s.data.dataset)?,
            merchant: Some(merchant.name.clone()),
            shop_size: s.data.shop_size,
            partition_seed: s.data.seed,
            eval_users: s.data.client_eval_users,
        },
        model: ModelConfig {
            dir: None,
            max_tokens: s.data.max_tokens,
            cache: std::fs::canonicalize(&s.data.cache).unwrap_or_else(|_| s.data.cache.clone()),
        },
        adapter: AdapterSettings {
            family: s.federation.family,
            rank: world.spec.lora.rank,
            alpha: world.spec.lora.alpha,
            frozen_a_seed: match s.federation.family {
                AdapterFamilyName::FfaLora => world.spec.lora.frozen_a_seed,
                AdapterFamilyName::SequenceTower => world.spec.tower.seed,
            },
            tower: world.spec.tower.shape,
        },
        guards: Guards {
            min_noise_multiplier: 0.0,
            dangerous_send_unnoised_updates: unnoised,
            max_rounds: 0,
            max_epsilon: f64::INFINITY,
            ledger: merchant_ledger(federation, i),
            ..Guards::default()
        },
    };
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml::to_string(&config)?)?;
    let binary = coordinator_binary()?.with_file_name("guild-client");
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    Ok(std::process::Command::new(binary).args(["run", "--config"]).arg(&path).stderr(log).spawn()?)
}

/// Runs `scenario`, writing stores and logs under `out`; returns every arm's results.
pub async fn run(scenario: Scenario, out: &Path) -> anyhow::Result<RunResults> {
    let started = Instant::now();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let world = tokio::task::block_in_place(|| World::load(WorldSpec::of(&scenario)))?;
    let s = &scenario;
    let f = &s.federation;
    let n = world.merchants.len();
    let d = world.parameter_count();
    let delta = s.delta(n);
    let dp_arms = (s.arms.distributed_dp_epsilons.len() + s.arms.central_dp_epsilons.len()) as u64;
    let shopper_rounds =
        s.arms.shopper_dp.as_ref().map_or(0, |sh| sh.rounds + sh.schedule().statistic_rounds());
    let progress = Progress::new(
        u64::from(s.arms.federated) * f.rounds
            + dp_arms * s.arms.dp_rounds.unwrap_or(f.rounds)
            + s.arms.shopper_dp_epsilons.len() as u64 * shopper_rounds,
    );
    let mut arms = Vec::new();
    let baseline =
        |name: &str, test: Scores, validation: Scores, wall: f64, ranks: Vec<Vec<u32>>| ArmResult {
            arm: name.to_owned(),
            test,
            validation,
            wall_seconds: wall,
            test_ranks: ranks,
            ..ArmResult::default()
        };
    if s.arms.zero_shot {
        progress.message("zero-shot");
        let t = Instant::now();
        let ((test, ranks), validation) = tokio::task::block_in_place(|| {
            anyhow::Ok((world.score_with_ranks(None, Split::Test)?, world.score(None, Split::Validation)?))
        })?;
        let mut zero_shot = baseline(ZERO_SHOT, test, validation, t.elapsed().as_secs_f64(), vec![ranks]);
        if world.spec.family == AdapterFamilyName::SequenceTower {
            // Two untrained rankers: the tower's own start (the mean of the last five item
            // vectors) and MiniLM on the last five titles concatenated, the latter on the
            // first `titles_zero_shot_users` evaluation users. The stronger on validation
            // (on those users) is the zero-shot every arm is compared with.
            let t = Instant::now();
            let k =
                s.arms.titles_zero_shot_users.unwrap_or(world.eval_users.len()).min(world.eval_users.len());
            let subsample = world.evaluated_on_first(k);
            progress.message(format!("zero-shot: MiniLM on titles, {k} users"));
            let ((test, ranks), validation, mean_of_five) = tokio::task::block_in_place(|| {
                anyhow::Ok((
                    subsample.score_lora(None, Split::Test)?,
                    subsample.score_lora(None, Split::Validation)?.0,
                    subsample.score(None, Split::Validation)?,
                ))
            })?;
            let mut titles = baseline(ZERO_SHOT, test, validation, t.elapsed().as_secs_f64(), vec![ranks]);
            zero_shot.events.push("ranker: the mean of the last five item vectors".into());
            titles.events.push(format!(
                "ranker: MiniLM on the last five titles concatenated, on the first {k} evaluation users \
                 (validation NDCG@10 {:.4} against {:.4} for the mean of the last five on them)",
                titles.validation.ndcg_at_10, mean_of_five.ndcg_at_10
            ));
            if titles.validation.ndcg_at_10 > mean_of_five.ndcg_at_10 {
                std::mem::swap(&mut titles, &mut zero_shot);
            }
            titles.arm = WEAKER_ZERO_SHOT.into();
            arms.push(zero_shot);
            arms.push(titles);
        } else {
            arms.push(zero_shot);
        }
        let t = Instant::now();
        if let Some(values) = world.popularity_only(&world.all_merchant_users())? {
            progress.message("zero-shot + popularity");
            let ((test, ranks), validation) = tokio::task::block_in_place(|| {
                anyhow::Ok((
                    world.score_with_ranks(Some(&values), Split::Test)?,
                    world.score(Some(&values), Split::Validation)?,
                ))
            })?;
            let mut arm = baseline(POPULARITY, test, validation, t.elapsed().as_secs_f64(), vec![ranks]);
            arm.events.push(
                "the tower's start with the exact histogram of every merchant's shoppers and the prior's \
                 initial weight; nothing trained"
                    .into(),
            );
            arms.push(arm);
        }
    }
    if let Some(local) = &s.arms.local_only {
        let t = Instant::now();
        let mut sample: Vec<&Merchant> = world.merchants.iter().collect();
        sample.shuffle(&mut ChaCha20Rng::seed_from_u64(s.data.seed + 1));
        sample.truncate(local.merchants);
        let mut scores = Vec::new();
        for (i, m) in sample.iter().enumerate() {
            progress.message(format!("local-only: {} ({}/{})", m.name, i + 1, sample.len()));
            let pair = tokio::task::block_in_place(|| {
                let (values, _) = world.train_on(
                    &m.users,
                    &baseline_training(
                        &world,
                        local.steps,
                        local.batch_size,
                        local.learning_rate,
                        s.data.seed,
                    ),
                )?;
                anyhow::Ok((
                    world.score_with_ranks(Some(&values), Split::Test)?,
                    world.score(Some(&values), Split::Validation)?,
                ))
            })?;
            scores.push(pair);
        }
        let ranks: Vec<Vec<u32>> = scores.iter_mut().map(|((_, r), _)| std::mem::take(r)).collect();
        let scores: Vec<(Scores, Scores)> = scores.into_iter().map(|((t, _), v)| (t, v)).collect();
        let mean = |f: &dyn Fn(&(Scores, Scores)) -> Scores| {
            let k = scores.len().max(1) as f64;
            let all: Vec<Scores> = scores.iter().map(f).collect();
            Scores {
                users: all.first().map_or(0, |s| s.users),
                recall_at_10: all.iter().map(|s| s.recall_at_10).sum::<f64>() / k,
                ndcg_at_10: all.iter().map(|s| s.ndcg_at_10).sum::<f64>() / k,
                mrr: all.iter().map(|s| s.mrr).sum::<f64>() / k,
                cross_entropy: all.iter().map(|s| s.cross_entropy).sum::<f64>() / k,
            }
        };
        let mut arm = baseline(LOCAL_ONLY, mean(&|p| p.0), mean(&|p| p.1), t.elapsed().as_secs_f64(), ranks);
        arm.worst = scores.iter().map(|p| p.0).min_by(|a, b| a.mrr.total_cmp(&b.mrr));
        arm.events.push(format!("{} merchants, {} steps each", scores.len(), local.steps));
        arms.push(arm);
    }
    if let Some(central) = &s.arms.centralised {
        progress.message("centralised");
        let t = Instant::now();
        let users = world.all_merchant_users();
        let ((test, ranks), validation) = tokio::task::block_in_place(|| {
            let (values, _) = world.train_on(
                &users,
                &baseline_training(
                    &world,
                    central.steps,
                    central.batch_size,
                    central.learning_rate,
                    s.data.seed,
                ),
            )?;
            anyhow::Ok((
                world.score_with_ranks(Some(&values), Split::Test)?,
                world.score(Some(&values), Split::Validation)?,
            ))
        })?;
        let mut arm = baseline(CENTRALISED, test, validation, t.elapsed().as_secs_f64(), vec![ranks]);
        arm.events.push(format!(
            "{} steps of batch {} on {} users",
            central.steps,
            central.batch_size,
            users.len()
        ));
        arms.push(arm);
    }
    let mut plan = Vec::new();
    if s.arms.federated {
        plan.push(FederatedArm {
            name: "federated (non-private)".into(),
            mode: PrivacyMode::DangerousNone,
            unit: PrivacyUnit::Merchant,
            shopper: None,
            noise_multiplier: 0.0,
            schedule: Schedule::default(),
            popularity_noise_multiplier: 0.0,
            selection_noise_multiplier: 0.0,
            epsilon_cap: 1e9,
            delta,
            rounds: f.rounds,
        });
    }
    let expected = f.sampling_rate * n as f64;
    // Calibrate for a generous cohort (mean + 4 sd): larger cohorts give a coarser γ and a
    // slightly larger ρ per round, so actual rounds stay within the cap.
    let generous = (expected + 4.0 * (expected * (1.0 - f.sampling_rate)).sqrt()).ceil().min(n as f64) as u32;
    let round = RoundPrivacy {
        mode: PrivacyMode::Distributed,
        unit: PrivacyUnit::Merchant,
        sampling_rate: f.sampling_rate,
        noise_multiplier: 1.0,
        clip_norm: f.clip_norm,
        dimension: d,
        min_survivors: f.threshold,
        max_summands: generous.max(f.threshold),
        bit_width: guild_coordinator::config::PrivacyConfig::default().bit_width,
        wrap_probability: guild_coordinator::config::PrivacyConfig::default().wrap_probability,
    };
    let dp_rounds = s.arms.dp_rounds.unwrap_or(f.rounds);
    // Calibrated for one round more than planned: a round that aborts in Unmask was charged
    // before its shares were asked for (and is never refunded), so the cap must leave room
    // for one such round or the arm would end short. An arm whose coordinator is killed
    // gets room for one more: the kill can land after the open round's charge.
    let killed = |index: usize| {
        s.faults.kill_coordinator_after_round.is_some()
            && (index == 0 || !s.faults.kill_coordinator_in_first_arm_only)
    };
    let charged_rounds = |index: usize| dp_rounds + 1 + u64::from(killed(index));
    for &epsilon in &s.arms.distributed_dp_epsilons {
        let z = calibrate_noise(epsilon, &RdpCurve::zero(), &round, charged_rounds(plan.len()), delta)?;
        plan.push(FederatedArm {
            name: format!("federated DP ε={epsilon}"),
            mode: PrivacyMode::Distributed,
            unit: PrivacyUnit::Merchant,
            shopper: None,
            noise_multiplier: z,
            schedule: Schedule::default(),
            popularity_noise_multiplier: 0.0,
            selection_noise_multiplier: 0.0,
            epsilon_cap: epsilon,
            delta,
            rounds: dp_rounds,
        });
    }
    for &epsilon in &s.arms.central_dp_epsilons {
        let z = calibrate_noise_multiplier(f.sampling_rate, charged_rounds(plan.len()), delta, epsilon)?;
        plan.push(FederatedArm {
            name: format!("central DP ε={epsilon}"),
            mode: PrivacyMode::Central,
            unit: PrivacyUnit::Merchant,
            shopper: None,
            noise_multiplier: z,
            schedule: Schedule::default(),
            popularity_noise_multiplier: 0.0,
            selection_noise_multiplier: 0.0,
            epsilon_cap: epsilon,
            delta,
            rounds: dp_rounds,
        });
    }
    if let Some(sh) = &s.arms.shopper_dp {
        let merchants = merge_shops(&world.merchants, sh.merge_shops).len() as u32;
        let shoppers = world.merchants.iter().map(|m| m.users.len()).sum::<usize>() as u64;
        let shopper_delta = sh.delta.unwrap_or_else(|| 1e-6f64.min(1.0 / (shoppers as f64).powf(1.1)));
        let round = RoundPrivacy {
            mode: PrivacyMode::Distributed,
            unit: PrivacyUnit::Shopper,
            sampling_rate: sh.sampling_rate,
            noise_multiplier: 1.0,
            clip_norm: sh.clip_norm,
            dimension: d,
            // Every merchant is in the complete-graph cohort: the threshold the coordinator
            // raises each round to.
            min_survivors: f
                .threshold
                .max(guild_privacy::secagg::min_active_threshold(merchants.saturating_sub(1))),
            max_summands: guild_privacy::cost::sampled_shoppers_bound(shoppers, sh.sampling_rate),
            bit_width: guild_coordinator::config::PrivacyConfig::default().bit_width,
            wrap_probability: guild_coordinator::config::PrivacyConfig::default().wrap_probability,
        };
        // The statistic rounds (releases, selection): every merchant's shoppers sampled at
        // their own rate, the sum bounded accordingly.
        let statistic = RoundPrivacy {
            sampling_rate: sh.popularity_sampling_rate,
            max_summands: guild_privacy::cost::sampled_shoppers_bound(shoppers, sh.popularity_sampling_rate),
            ..round.clone()
        };
        // The coordinator's schedule of the arm's rounds, and how many of each kind it runs.
        let schedule = sh.schedule();
        let total = schedule.statistic_rounds() + sh.rounds;
        let (releases, training) =
            (schedule.count(RoundKind::PopularityRelease, total), schedule.count(RoundKind::Training, total));
        // The pooling selection, at its fixed z, is charged first; the rest is calibrated
        // to what it leaves.
        let selection = match sh.selection_noise_multiplier {
            Some(z) => (RoundPrivacy { noise_multiplier: z, ..statistic.clone() })
                .curve_after(schedule.count(RoundKind::PoolingSelection, total))?
                .context("a selection without noise")?,
            None => RdpCurve::zero(),
        };
        for &epsilon in &s.arms.shopper_dp_epsilons {
            // Room for one round charged and then aborted (two if the coordinator is
            // killed before its last round), as for the other DP arms; a statistics-only arm
            // is calibrated for its releases alone and one more only if killed before its
            // last (every merchant is in each round: an abort needs a third of them to fail
            // at once).
            let spare = u64::from(
                killed(plan.len()) && s.faults.kill_coordinator_after_round.is_some_and(|k| k < total),
            );
            let (z_release, z) = if training == 0 {
                let z_release = if releases == 0 {
                    0.0
                } else {
                    calibrate_noise(epsilon, &selection, &statistic, releases + spare, shopper_delta)?
                };
                (z_release, 0.0)
            } else if releases == 0 {
                (0.0, calibrate_noise(epsilon, &selection, &round, training + 1 + spare, shopper_delta)?)
            } else {
                // (Scenario validation requires the share when both kinds of round run; the
                // selection's cost counts towards the releases' share.)
                let share = sh.popularity_budget.context("arms.shopper_dp.popularity_budget")?;
                let z_release =
                    calibrate_noise(share * epsilon, &selection, &statistic, releases, shopper_delta)?;
                let before = (RoundPrivacy { noise_multiplier: z_release, ..statistic.clone() })
                    .curve_after(releases)?
                    .context("a release without noise")?
                    .compose(&selection);
                let z = calibrate_noise(epsilon, &before, &round, training + 1 + spare, shopper_delta)?;
                (z_release, z)
            };
            plan.push(FederatedArm {
                name: format!("shopper-level DP ε={epsilon}"),
                mode: PrivacyMode::Distributed,
                unit: PrivacyUnit::Shopper,
                shopper: Some(sh.clone()),
                noise_multiplier: z,
                schedule,
                popularity_noise_multiplier: z_release,
                selection_noise_multiplier: sh.selection_noise_multiplier.unwrap_or(0.0),
                epsilon_cap: epsilon,
                delta: shopper_delta,
                rounds: total,
            });
        }
    }
    for (i, arm) in plan.iter().enumerate() {
        progress.message(arm.name.clone());
        let kill_after = s.faults.kill_coordinator_after_round.filter(|_| killed(i));
        let result = federated(&world, s, arm, kill_after, out, &progress)
            .await
            .with_context(|| format!("arm {}", arm.name))?;
        arms.push(result);
    }
    progress.finish();
    compare_arms(&mut arms)?;
    let shared = lock(&world.shared);
    Ok(RunResults {
        scenario: s.name.clone(),
        description: s.description.clone(),
        machine: machine(),
        merchants: n,
        dataset_users: shared.dataset.users.len(),
        catalogue: shared.dataset.titles.len(),
        eval_users: world.eval_users.len(),
        expected_cohort: expected,
        adapter_parameters: d,
        wall_seconds: started.elapsed().as_secs_f64(),
        arms,
    })
}

/// A one-line description of this machine.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let device = guild_client::training_device();
    format!("{cpus} CPU threads, {} training device {device:?}", std::env::consts::ARCH)
}

/// The report folder for a scenario run.
pub fn default_out(scenario: &Scenario) -> PathBuf {
    PathBuf::from("reports").join(&scenario.name)
}
