//! Runs a scenario: baselines in this process, and each federated arm as a real
//! federation (a `guild-coordinator` child process, merchants as clients over loopback
//! mutual TLS), with the scenario's faults; every arm is scored on the same test users
//! against the full catalogue.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use guild_client::data::{Dataset, Merchant, User, partition};
use guild_client::identity::Identity;
use guild_client::learner::{ModelLearner, Shared};
use guild_client::model::lora::{Adapters, LoraConfig};
use guild_client::model::{BaseModel, default_model_dir};
use guild_client::participant::{Faults, Participant, ParticipantOptions};
use guild_client::retrieval::{self, RankingCounts, Split, TrainConfig};
use guild_privacy::PrivacyMode;
use guild_privacy::accounting::{calibrate_noise_multiplier, epsilon_from_rdp, subsampled_zcdp_rdp};
use guild_privacy::dp::{DdgParams, ParamsRequest, ddgauss_zcdp_rho};
use guild_privacy::ledger::{Budget, Ledger, LedgerEntry};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::federation::{Federation, coordinator_binary};
use crate::scenario::{ClientMode, Scenario};

/// Ranking quality of one arm on one split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub users: u64,
    pub recall_at_10: f64,
    pub ndcg_at_10: f64,
    pub mrr: f64,
    /// Mean full-catalogue cross-entropy of the held-out item (`RankingCounts::cross_entropy`).
    #[serde(default)]
    pub cross_entropy: f64,
}

impl From<RankingCounts> for Scores {
    fn from(c: RankingCounts) -> Self {
        Self {
            users: c.users,
            recall_at_10: c.recall_at_10(),
            ndcg_at_10: c.ndcg_at_10(),
            mrr: c.mrr(),
            cross_entropy: c.cross_entropy(),
        }
    }
}

/// The validation score of the adapter after one round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundPoint {
    pub round: u64,
    pub validation: Scores,
    pub epsilon: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ArmResult {
    pub arm: String,
    pub test: Scores,
    pub validation: Scores,
    /// Local-only: the worst merchant's test scores (by MRR).
    pub worst: Option<Scores>,
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    pub noise_multiplier: Option<f64>,
    pub rounds: u64,
    pub rounds_aborted: u64,
    pub wall_seconds: f64,
    pub bytes_per_client_round: Option<f64>,
    pub curve: Vec<RoundPoint>,
    /// Mean seconds per SecAgg+ phase and dropouts per phase, from the coordinator's metrics.
    pub phase_seconds: BTreeMap<String, f64>,
    pub dropouts: BTreeMap<String, u64>,
    pub events: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResults {
    pub scenario: String,
    pub description: String,
    pub machine: String,
    pub merchants: usize,
    pub dataset_users: usize,
    pub catalogue: usize,
    pub eval_users: usize,
    pub expected_cohort: f64,
    pub adapter_parameters: usize,
    pub wall_seconds: f64,
    pub arms: Vec<ArmResult>,
}

/// What every arm shares.
struct World {
    scenario: Scenario,
    shared: Arc<Mutex<Shared>>,
    merchants: Vec<Merchant>,
    eval_users: Vec<usize>,
    lora: LoraConfig,
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl World {
    fn load(scenario: Scenario) -> anyhow::Result<Self> {
        let mut dataset = Dataset::load(&scenario.data.dataset)?;
        if let Some(n) = scenario.data.max_users {
            dataset = dataset.first_users(n);
        }
        let mut merchants = partition(&dataset, scenario.data.shop_size, scenario.data.seed);
        if let Some(n) = scenario.data.max_merchants {
            merchants.shuffle(&mut ChaCha20Rng::seed_from_u64(scenario.data.seed));
            merchants.truncate(n);
            merchants.sort_by(|a, b| a.name.cmp(&b.name));
        }
        let device = guild_client::training_device();
        let base = BaseModel::load(&default_model_dir(), scenario.data.max_tokens, device)?;
        let items =
            retrieval::catalogue_embeddings(&base, &dataset, &scenario.data.cache, scenario.data.max_tokens)?;
        // The same seeded test users for every arm, drawn from the merchants' shoppers.
        let mut pool: Vec<usize> = merchants.iter().flat_map(|m| m.users.iter().copied()).collect();
        pool.sort_unstable();
        pool.shuffle(&mut ChaCha20Rng::seed_from_u64(12_345));
        pool.truncate(scenario.data.eval_users);
        let lora = LoraConfig {
            rank: scenario.federation.rank as i64,
            alpha: 2.0 * scenario.federation.rank as f64,
            ..LoraConfig::default()
        };
        Ok(Self {
            shared: Arc::new(Mutex::new(Shared { base, dataset, items })),
            merchants,
            eval_users: pool,
            lora,
            scenario,
        })
    }

    fn users<'a>(dataset: &'a Dataset, indices: &[usize]) -> Vec<&'a User> {
        indices.iter().map(|&i| &dataset.users[i]).collect()
    }

    /// Fresh adapters (B = 0) of this world's configuration.
    fn adapters(&self, shared: &Shared) -> Adapters {
        Adapters::new(self.lora.clone(), shared.base.config(), shared.base.sha256(), shared.base.device())
    }

    /// Scores adapter values (none: the base model) on the evaluation users.
    fn score(&self, values: Option<&[f32]>, split: Split) -> anyhow::Result<Scores> {
        let shared = lock(&self.shared);
        let mut adapters = self.adapters(&shared);
        if let Some(v) = values {
            adapters.set_flat(v)?;
        }
        let users = Self::users(&shared.dataset, &self.eval_users);
        let counts = retrieval::evaluate(
            &shared.base,
            values.map(|_| &adapters),
            &shared.dataset,
            &users,
            &shared.items,
            split,
            5,
        )?;
        Ok(counts.into())
    }

    fn train_on(&self, users: &[usize], steps: usize, seed: u64) -> anyhow::Result<Vec<f32>> {
        let shared = lock(&self.shared);
        let adapters = self.adapters(&shared);
        let config =
            TrainConfig { batch_size: 32, steps, learning_rate: 1e-3, seed, ..TrainConfig::default() };
        let users = Self::users(&shared.dataset, users);
        retrieval::train(&shared.base, &adapters, &shared.dataset, &users, &shared.items, &config)?;
        Ok(adapters.flat())
    }

    fn parameter_count(&self) -> usize {
        self.adapters(&lock(&self.shared)).manifest().parameter_count()
    }
}

/// ε after `rounds` rounds of DDGauss at noise multiplier `z`, as the coordinator's ledger
/// would compute it for rounds of at most `n` summands.
#[allow(clippy::too_many_arguments)]
fn distributed_epsilon(
    z: f64,
    q: f64,
    rounds: u64,
    delta: f64,
    d: usize,
    c: f64,
    t: u32,
    n: u32,
) -> anyhow::Result<f64> {
    let ddg = DdgParams::select(&ParamsRequest {
        dimension: d,
        clip_norm: c,
        noise_stddev: z * c,
        min_survivors: t,
        max_summands: n.max(t),
        bit_width: 32,
        wrap_probability: 1e-9,
    })?;
    let rho = ddgauss_zcdp_rho(&ddg, t - 1)?;
    Ok(epsilon_from_rdp(&subsampled_zcdp_rdp(q, rho)?.times(rounds), delta)?.0)
}

/// The smallest z (to 0.1%) whose ledger ε stays within `target`.
#[allow(clippy::too_many_arguments)]
pub fn calibrate_distributed(
    target: f64,
    q: f64,
    rounds: u64,
    delta: f64,
    d: usize,
    c: f64,
    t: u32,
    n: u32,
) -> anyhow::Result<f64> {
    let (mut lo, mut hi) = (0.05, 500.0);
    anyhow::ensure!(
        distributed_epsilon(hi, q, rounds, delta, d, c, t, n)? <= target,
        "ε = {target} is out of reach"
    );
    while hi / lo > 1.001 {
        let mid = (lo * hi).sqrt();
        let ok = distributed_epsilon(mid, q, rounds, delta, d, c, t, n).map(|e| e <= target).unwrap_or(false);
        if ok { hi = mid } else { lo = mid }
    }
    Ok(hi)
}

fn scrape(address: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

/// Adds a metrics scrape's per-phase sums, counts and dropouts into `acc`.
fn accumulate(text: &str, acc: &mut BTreeMap<String, (f64, f64, u64)>) {
    for phase in guild_coordinator::engine::PHASES {
        let value = |name: &str| {
            let prefix = format!("{name}{{phase=\"{phase}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let entry = acc.entry(phase.to_owned()).or_default();
        entry.0 += value("guild_phase_seconds_sum");
        entry.1 += value("guild_phase_seconds_count");
        entry.2 += value("guild_dropouts_total") as u64;
    }
}

struct FederatedArm {
    name: String,
    mode: PrivacyMode,
    noise_multiplier: f64,
    epsilon_cap: f64,
    delta: f64,
}

async fn federated(
    world: &World,
    arm: &FederatedArm,
    out: &Path,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<ArmResult> {
    let s = &world.scenario;
    let f = &s.federation;
    let started = Instant::now();
    let dir = out.join("arms").join(&arm.name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let n = world.merchants.len();
    let mut federation = Federation::init(&dir, n, |c| {
        c.adapter.rank = f.rank;
        c.adapter.alpha = world.lora.alpha as f32;
        c.rounds.sampling_rate = f.sampling_rate;
        c.rounds.min_cohort = f.min_cohort;
        c.rounds.threshold = f.threshold;
        c.rounds.neighbours = f.neighbours;
        c.rounds.phase_deadlines_ms = f.phase_deadlines_ms;
        c.rounds.max_rounds = f.rounds;
        c.rounds.local_steps = f.local_steps;
        c.rounds.batch_size = f.batch_size;
        c.rounds.learning_rate = f.learning_rate;
        c.rounds.server_learning_rate = f.server_learning_rate;
        c.rounds.server_optimizer = if f.server_optimizer == "fed_adam" {
            guild_coordinator::config::ServerOptimizer::FedAdam
        } else {
            guild_coordinator::config::ServerOptimizer::FedAvg
        };
        c.privacy.mode = arm.mode;
        c.privacy.clip_norm = f.clip_norm;
        c.privacy.noise_multiplier = arm.noise_multiplier;
        c.privacy.epsilon_budget = arm.epsilon_cap;
        c.privacy.delta = arm.delta;
    })?;
    let binary = coordinator_binary()?;
    federation.start_process(&binary).await?;
    let mut events = Vec::new();

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
    for (i, merchant) in world.merchants.iter().enumerate() {
        match s.clients {
            ClientMode::Tasks => {
                let connection = federation.connect(i).await?;
                let learner = ModelLearner::new(
                    world.shared.clone(),
                    world.lora.clone(),
                    merchant.users.clone(),
                    s.data.client_eval_users,
                    i as u64,
                );
                let options = ParticipantOptions {
                    display_name: merchant.name.clone(),
                    dangerous_send_unnoised_updates: unnoised,
                    min_noise_multiplier: 0.0,
                    poll: Duration::from_secs(5),
                    max_backoff: Duration::from_secs(2),
                    faults: faults.clone(),
                    max_rounds: 0,
                };
                let mut participant = Participant::new(
                    connection,
                    Arc::new(Identity::ephemeral()?),
                    Box::new(learner),
                    options,
                );
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
                processes.push(spawn_client_process(&federation, world, i, merchant, unnoised)?)
            }
        }
    }
    drop(tx);

    let store = federation.store()?;
    let budget = Budget { epsilon: arm.epsilon_cap, delta: arm.delta };
    // ε after the first `rounds` committed rounds: each committed round adds one ledger
    // entry and one adapter version, in order.
    let epsilon_after =
        |store: &guild_coordinator::store::Store, rounds: Option<usize>| -> anyhow::Result<f64> {
            let mut entries = store
                .ledger()?
                .into_iter()
                .map(|(round_id, json)| Ok(LedgerEntry { round_id, event: serde_json::from_str(&json)? }))
                .collect::<anyhow::Result<Vec<_>>>()?;
            if let Some(k) = rounds {
                entries.truncate(k);
            }
            Ok(if entries.is_empty() { 0.0 } else { Ledger::new(budget, entries)?.spent()?.epsilon })
        };
    let evaluate_new = |seen: &mut u64, curve: &mut Vec<RoundPoint>| -> anyhow::Result<()> {
        let latest = store.latest_adapter()?.map_or(0, |a| a.version);
        while *seen < latest {
            *seen += 1;
            let record = store.adapter(*seen)?;
            let values = guild_proto::adapter::from_bytes(&record.data, world.parameter_count())?;
            let validation = tokio::task::block_in_place(|| world.score(Some(&values), Split::Validation))?;
            curve.push(RoundPoint {
                round: *seen,
                validation,
                epsilon: epsilon_after(&store, Some(*seen as usize))?,
            });
            progress.inc(1);
            progress.set_message(format!("{}: round {seen}, validation MRR {:.4}", arm.name, validation.mrr));
        }
        Ok(())
    };
    let mut status_connection = federation.connect(0).await?;
    let mut curve = Vec::new();
    let mut seen = 0u64;
    let mut killed = false;
    let mut metrics_acc = BTreeMap::new();
    let limit = Duration::from_millis(f.phase_deadlines_ms.iter().sum::<u64>()) * (f.rounds as u32 + 2)
        + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        evaluate_new(&mut seen, &mut curve)?;
        let counts = store.round_counts()?;
        if let Some(k) = s.faults.kill_coordinator_after_round
            && !killed
            && counts.completed >= k
            && store.open_round_phase()?.is_some()
        {
            if let Some(address) = federation.config.server.metrics_listen {
                accumulate(&scrape(address), &mut metrics_acc);
            }
            let (round, phase) = store.open_round_phase()?.unwrap_or_default();
            federation.kill()?;
            // The daemon's `max_rounds` counts rounds of one run: the restarted daemon runs
            // only those still owed, or the arm would end with more rounds than planned.
            federation.config.rounds.max_rounds = f.rounds.saturating_sub(counts.completed).max(1);
            std::fs::write(federation.config_path(), toml::to_string(&federation.config)?)?;
            events.push(format!(
                "coordinator SIGKILLed during round {round} ({phase}) after {} committed rounds",
                counts.completed
            ));
            federation.start_process(&binary).await?;
            events.push("coordinator restarted; the open round was aborted and clients reconnected".into());
            killed = true;
        }
        if counts.completed >= f.rounds {
            break;
        }
        if let Ok(status) = status_connection.status().await
            && status.current_phase.contains("budget exhausted")
        {
            // A round may have committed since `counts` was read: the budget cut the run
            // short only if fewer rounds than planned are committed now.
            let completed = store.round_counts()?.completed;
            if completed < f.rounds {
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
        accumulate(&scrape(address), &mut metrics_acc);
    }
    evaluate_new(&mut seen, &mut curve)?;
    for task in &tasks {
        task.abort();
    }
    for mut p in processes {
        let _ = p.kill();
        let _ = p.wait();
    }
    let (dropped, straggled) = faults.injected.counts();
    let per_phase = |counts: [u64; 5]| {
        let parts: Vec<String> = guild_coordinator::engine::PHASES
            .iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .map(|(phase, n)| format!("{n} before {phase}"))
            .collect();
        parts.join(", ")
    };
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
    let mut bytes = Vec::new();
    while let Ok(report) = rx.try_recv() {
        if report.outcome == "committed" {
            bytes.push(report.bytes_sent as f64);
        }
    }
    let record = store.latest_adapter()?.context("no adapter")?;
    let values = guild_proto::adapter::from_bytes(&record.data, world.parameter_count())?;
    let test = tokio::task::block_in_place(|| world.score(Some(&values), Split::Test))?;
    let validation = match curve.last() {
        Some(p) => p.validation,
        None => tokio::task::block_in_place(|| world.score(Some(&values), Split::Validation))?,
    };
    let epsilon = epsilon_after(&store, None)?;
    let status = status_connection.status().await.ok();
    if let Some(status) = &status
        && arm.mode != PrivacyMode::DangerousNone
        && (status.epsilon_spent - epsilon).abs() > 1e-9 * epsilon.max(1.0)
    {
        anyhow::bail!("the coordinator reports ε = {} but its ledger gives {epsilon}", status.epsilon_spent);
    }
    federation.kill()?;
    let dropouts = metrics_acc.iter().map(|(k, v)| (k.clone(), v.2)).collect();
    let phase_seconds = metrics_acc.iter().map(|(k, v)| (k.clone(), v.0 / v.1.max(1.0))).collect();
    Ok(ArmResult {
        arm: arm.name.clone(),
        test,
        validation,
        worst: None,
        epsilon: (arm.mode != PrivacyMode::DangerousNone).then_some(epsilon),
        delta: (arm.mode != PrivacyMode::DangerousNone).then_some(arm.delta),
        noise_multiplier: (arm.mode != PrivacyMode::DangerousNone).then_some(arm.noise_multiplier),
        rounds: counts.completed,
        rounds_aborted: counts.aborted,
        wall_seconds: started.elapsed().as_secs_f64(),
        bytes_per_client_round: (!bytes.is_empty()).then(|| bytes.iter().sum::<f64>() / bytes.len() as f64),
        curve,
        phase_seconds,
        dropouts,
        events,
    })
}

fn spawn_client_process(
    federation: &Federation,
    world: &World,
    i: usize,
    merchant: &Merchant,
    unnoised: bool,
) -> anyhow::Result<std::process::Child> {
    let s = &world.scenario;
    anyhow::ensure!(
        s.data.max_users.is_none(),
        "client processes read the dataset themselves: max_users must not be set"
    );
    let dir = federation.dir.join("merchants");
    let name = &federation.pki.merchants[i].name;
    let dataset = std::fs::canonicalize(&s.data.dataset)?;
    let cache = std::fs::canonicalize(&s.data.cache).unwrap_or_else(|_| s.data.cache.clone());
    let config = format!(
        "coordinator = \"{uri}\"\ndisplay_name = \"{shop}\"\nidentity = \"{name}.signing\"\n[tls]\nca = \"../ca.pem\"\ncert = \"{name}.pem\"\nkey = \"{name}.key\"\n[data]\ndataset = \"{dataset}\"\nmerchant = \"{shop}\"\nshop_size = {size}\npartition_seed = {seed}\neval_users = {eval}\n[model]\nmax_tokens = {tokens}\ncache = \"{cache}\"\n[adapter]\nrank = {rank}\nalpha = {alpha}\n[guards]\nmin_noise_multiplier = 0.0\ndangerous_send_unnoised_updates = {unnoised}\n",
        uri = federation.uri(),
        shop = merchant.name,
        dataset = dataset.display(),
        size = s.data.shop_size,
        seed = s.data.seed,
        eval = s.data.client_eval_users,
        tokens = s.data.max_tokens,
        cache = cache.display(),
        rank = world.lora.rank,
        alpha = world.lora.alpha,
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config)?;
    let binary = coordinator_binary()?.with_file_name("guild-client");
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    Ok(std::process::Command::new(binary).args(["run", "--config"]).arg(&path).stderr(log).spawn()?)
}

/// Runs `scenario`, writing stores and logs under `out`; returns every arm's results.
pub async fn run(scenario: Scenario, out: &Path) -> anyhow::Result<RunResults> {
    let started = Instant::now();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let world = tokio::task::block_in_place(|| World::load(scenario.clone()))?;
    let s = &world.scenario;
    let f = &s.federation;
    let n = world.merchants.len();
    let d = world.parameter_count();
    let delta = s.delta(n);
    let federated_arms = usize::from(s.arms.federated)
        + s.arms.distributed_dp_epsilons.len()
        + s.arms.central_dp_epsilons.len();
    let progress = indicatif::ProgressBar::new(f.rounds * federated_arms as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} rounds  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut arms = Vec::new();
    let baseline = |name: &str, test: Scores, validation: Scores, wall: f64| ArmResult {
        arm: name.to_owned(),
        test,
        validation,
        wall_seconds: wall,
        ..ArmResult::default()
    };
    if s.arms.zero_shot {
        progress.set_message("zero-shot");
        let t = Instant::now();
        let (test, validation) = tokio::task::block_in_place(|| {
            anyhow::Ok((world.score(None, Split::Test)?, world.score(None, Split::Validation)?))
        })?;
        arms.push(baseline("zero-shot", test, validation, t.elapsed().as_secs_f64()));
    }
    if let Some(local) = &s.arms.local_only {
        let t = Instant::now();
        let mut sample: Vec<&Merchant> = world.merchants.iter().collect();
        sample.shuffle(&mut ChaCha20Rng::seed_from_u64(s.data.seed + 1));
        sample.truncate(local.merchants);
        let mut scores = Vec::new();
        for (i, m) in sample.iter().enumerate() {
            progress.set_message(format!("local-only: {} ({}/{})", m.name, i + 1, sample.len()));
            let pair = tokio::task::block_in_place(|| {
                let values = world.train_on(&m.users, local.steps, s.data.seed)?;
                anyhow::Ok((
                    world.score(Some(&values), Split::Test)?,
                    world.score(Some(&values), Split::Validation)?,
                ))
            })?;
            scores.push(pair);
        }
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
        let mut arm =
            baseline("local-only (mean)", mean(&|p| p.0), mean(&|p| p.1), t.elapsed().as_secs_f64());
        arm.worst = scores.iter().map(|p| p.0).min_by(|a, b| a.mrr.total_cmp(&b.mrr));
        arm.events.push(format!("{} merchants, {} steps each", scores.len(), local.steps));
        arms.push(arm);
    }
    if let Some(central) = &s.arms.centralised {
        progress.set_message("centralised");
        let t = Instant::now();
        let users: Vec<usize> = world.merchants.iter().flat_map(|m| m.users.iter().copied()).collect();
        let (test, validation) = tokio::task::block_in_place(|| {
            let values = world.train_on(&users, central.steps, s.data.seed)?;
            anyhow::Ok((
                world.score(Some(&values), Split::Test)?,
                world.score(Some(&values), Split::Validation)?,
            ))
        })?;
        let mut arm = baseline("centralised (non-private)", test, validation, t.elapsed().as_secs_f64());
        arm.events.push(format!("{} steps of batch 32 on {} users", central.steps, users.len()));
        arms.push(arm);
    }
    let mut plan = Vec::new();
    if s.arms.federated {
        plan.push(FederatedArm {
            name: "federated (non-private)".into(),
            mode: PrivacyMode::DangerousNone,
            noise_multiplier: 0.0,
            epsilon_cap: 1e9,
            delta,
        });
    }
    let expected = f.sampling_rate * n as f64;
    // Calibrate for a generous cohort (mean + 4 sd): larger cohorts give a coarser γ and a
    // slightly larger ρ per round, so actual rounds stay within the cap.
    let generous = (expected + 4.0 * (expected * (1.0 - f.sampling_rate)).sqrt()).ceil().min(n as f64) as u32;
    for &epsilon in &s.arms.distributed_dp_epsilons {
        let z = calibrate_distributed(
            epsilon,
            f.sampling_rate,
            f.rounds,
            delta,
            d,
            f.clip_norm,
            f.threshold,
            generous,
        )?;
        plan.push(FederatedArm {
            name: format!("federated DP ε={epsilon}"),
            mode: PrivacyMode::Distributed,
            noise_multiplier: z,
            epsilon_cap: epsilon,
            delta,
        });
    }
    for &epsilon in &s.arms.central_dp_epsilons {
        let z = calibrate_noise_multiplier(f.sampling_rate, f.rounds, delta, epsilon)?;
        plan.push(FederatedArm {
            name: format!("central DP ε={epsilon}"),
            mode: PrivacyMode::Central,
            noise_multiplier: z,
            epsilon_cap: epsilon,
            delta,
        });
    }
    for arm in &plan {
        progress.set_message(arm.name.clone());
        let result =
            federated(&world, arm, out, &progress).await.with_context(|| format!("arm {}", arm.name))?;
        arms.push(result);
    }
    progress.finish_and_clear();
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
