//! Scenario files (`scenarios/NAME.toml`): the data, the federation's settings, the arms
//! to compare and the faults to inject.

use std::path::{Path, PathBuf};

use guild_coordinator::config::{
    EarlyClose, ItemIdsScaleProblem, MAX_ITEM_IDS_SCALE, ServerOptimizer, item_ids_scale_problem,
};
use guild_privacy::secagg::Phase;
use guild_proto::domain::AdapterFamilyName;
use guild_proto::tower::TowerShape;
use serde::Deserialize;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// What the scenario shows and its cost arithmetic, for the report.
    #[serde(default)]
    pub description: String,
    pub data: DataSettings,
    pub federation: FederationSettings,
    pub arms: Arms,
    #[serde(default)]
    pub faults: FaultSettings,
    #[serde(default)]
    pub clients: ClientMode,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSettings {
    /// A RecBole-format folder, relative to the working directory.
    pub dataset: PathBuf,
    /// Keep only the first N users (and the items they touch), for quick runs.
    #[serde(default)]
    pub max_users: Option<usize>,
    pub shop_size: usize,
    /// Keep only the first N merchants of the partition.
    #[serde(default)]
    pub max_merchants: Option<usize>,
    #[serde(default)]
    pub seed: u64,
    /// Users sampled from the merchants' shoppers whose held-out items every arm ranks
    /// against the full catalogue.
    pub eval_users: usize,
    /// Draw the federated arms' per-round validation curve on the first this many
    /// evaluation users (default: all); every arm's final scores use all of them.
    #[serde(default)]
    pub curve_users: Option<usize>,
    /// Of a federated arm's popularity releases, the curve draws every this many-th
    /// version and the last (default: every one). Each point costs a scoring of the curve
    /// users, and with a pair sketch its decoding (seconds), on the cores the federation
    /// runs on; a partitioned release's intermediate versions hold part of the merchants'
    /// statistics only.
    #[serde(default)]
    pub curve_release_every: Option<u32>,
    /// Validation users each client evaluates after each round and reports.
    #[serde(default)]
    pub client_eval_users: usize,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    #[serde(default = "default_cache")]
    pub cache: PathBuf,
}

fn default_max_tokens() -> usize {
    96
}

fn default_cache() -> PathBuf {
    ".cache".into()
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSettings {
    pub rounds: u64,
    pub sampling_rate: f64,
    pub min_cohort: u32,
    pub threshold: u32,
    #[serde(default)]
    pub neighbours: u32,
    pub local_steps: u32,
    pub batch_size: u32,
    pub learning_rate: f32,
    pub clip_norm: f64,
    #[serde(default = "one")]
    pub server_learning_rate: f64,
    #[serde(default = "fed_avg")]
    pub server_optimizer: ServerOptimizer,
    /// The factor the server multiplies the tower's item-ID rows' averaged update by
    /// (`rounds.item_ids_scale` of the coordinator): a row is moved only by the merchants
    /// whose shoppers bought its item, and the mean divides by the whole cohort.
    #[serde(default = "one")]
    pub item_ids_scale: f64,
    /// Each federated arm's model, the one scored on the test split, is the mean of its last
    /// this many training versions (`guild_coordinator::average`, `export-adapter
    /// --average-last`: tail averaging, post-processing of released versions); 1: its last
    /// version alone.
    #[serde(default = "one_version")]
    pub average_last: u64,
    /// The non-private federated arm first sums every merchant's statistics (the
    /// popularity histogram and the item-to-item counts) in this many popularity releases,
    /// each over one part of the merchants (`rounds.popularity_release.partition` of the
    /// coordinator), then trains its `rounds`; 0: no releases, its statistics come from the
    /// training rounds' sampled cohorts alone (ten rounds at q = 0.05 reach about 40% of
    /// the merchants).
    #[serde(default)]
    pub release_parts: u32,
    /// What the non-private federated arm's training rounds train (`rounds.trained` of the
    /// coordinator): `"whole"` (every trained value, each merchant adding its statistics
    /// again) or `"weights"` (the same less the statistics, which its `release_parts`
    /// releases have summed once: a round's vector is then the weights alone).
    #[serde(default)]
    pub trained: guild_proto::round::TrainedPart,
    /// Uniform negatives of the tower's sampled softmax in each client's rounds (0: full).
    #[serde(default = "tower_negatives")]
    pub negatives: u32,
    /// FFA-LoRA's rank (with `family = "ffa_lora"`).
    pub rank: usize,
    /// The adapter family: `ffa_lora` (default) or `sequence_tower`.
    #[serde(default)]
    pub family: AdapterFamilyName,
    /// The sequence tower's shape (with `family = "sequence_tower"`; its `catalogue` is
    /// set from the data when `popularity` is on).
    #[serde(default)]
    pub tower: TowerShape,
    /// The DP arms' tower shape where it is not `tower` (their `catalogue` set the same
    /// way): a pair sketch of millions of buckets carries noise no DP arm here survives, so
    /// the non-private arms (every baseline and the federated arm without noise) may carry
    /// collaborative signal that the DP arms, with title neighbours, do not.
    #[serde(default)]
    pub dp_tower: Option<TowerShape>,
    /// The sequence tower carries the popularity prior: a histogram over the catalogue that
    /// the federation accumulates (noised like the rest, in DP arms).
    #[serde(default = "yes")]
    pub popularity: bool,
    pub phase_deadlines_ms: [u64; Phase::COUNT],
    /// Every federated arm's phases close once this share of their senders answered and
    /// the rest had their grace (`[rounds.early_close]` of the coordinator): a merchant the
    /// faults made vanish then costs a fraction of a phase deadline, not all of it.
    #[serde(default)]
    pub early_close: Option<EarlyClose>,
    /// δ of the DP arms; by default 1e-5, or 1/N^1.1 when N merchants make that smaller.
    #[serde(default)]
    pub delta: Option<f64>,
    /// c: colluding survivors the DP arms' ε holds against (each client adds σ²/(t − c));
    /// the coordinator states it and every merchant requires it.
    #[serde(default = "default_tolerated_colluders")]
    pub tolerated_colluders: u32,
}

fn default_tolerated_colluders() -> u32 {
    guild_privacy::cost::DEFAULT_TOLERATED_COLLUDERS
}

fn yes() -> bool {
    true
}

fn one_version() -> u64 {
    1
}

fn one() -> f64 {
    1.0
}

fn fed_avg() -> ServerOptimizer {
    ServerOptimizer::FedAvg
}

/// Every arm is off (or empty) unless the scenario names it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Arms {
    pub zero_shot: bool,
    /// Sequence tower: the titles-concatenated zero-shot ranker runs MiniLM per user, so it
    /// may be scored on the first this many evaluation users only (default: all of them; 0:
    /// not run, the mean of the last five is zero-shot); its comparisons pair those users.
    pub titles_zero_shot_users: Option<usize>,
    /// Each of a seeded sample of merchants trains alone.
    pub local_only: Option<LocalOnly>,
    /// Every merchant's training data pooled in one place.
    pub centralised: Option<Centralised>,
    /// Sequence tower: the item-to-item counts of every merchant's shoppers, summed in one
    /// place, as the untrained count ranker and as a prior added to the zero-shot and the
    /// centralised rankers (its weight chosen on the validation split).
    pub item_counts: bool,
    /// With `item_counts`: the exact counts as a prior on the centralised tower too (default:
    /// yes), an upper reference for a tower with the counts summed without noise.
    #[serde(default = "yes")]
    pub centralised_with_counts: bool,
    /// Sequence tower: the shopper-level arms' release and pooling selection without noise
    /// (every merchant's shoppers' statistics summed exactly, the setting with the best mean
    /// validation NDCG@10 over them), and the same selection on the centralised tower: how
    /// much of those arms' gain privacy costs, and what the selection adds to a trained
    /// tower. Each selection scores every shopper under the grid's 12 settings.
    pub exact_selection: bool,
    /// Sequence tower: the tower's start with every merchant's shoppers' statistics summed
    /// exactly, its pooling and priors' weights (β_t, and γ of a spectral prior) chosen on
    /// validation as a trained arm's are, nothing trained: the untrained ranker a reviewer
    /// builds from the federation's releases, and a reference every arm is compared with.
    pub statistics_ranker: bool,
    /// Sequence tower: the non-private trained arms (centralised, federated without noise,
    /// each local-only merchant) choose their pooling on validation before the test split is
    /// read, as the DP arms' selection round does: their own trained pooling or one of the
    /// grid's 12 settings, by mean validation NDCG@10 over the first this many evaluation
    /// users (a local-only merchant: over its own shoppers); 0: no choice.
    pub pooling_choice_users: usize,
    /// Sequence tower: evaluate search on this many of the evaluation users (0: none) with
    /// the query protocol of `guild_client::retrieval::search`: text only, personalised by
    /// the zero-shot history score, and personalised by each trained arm's adapter, the
    /// personalisation weight chosen on validation.
    pub search_users: usize,
    /// Sequence tower: serve the federated arm's final version with `guild-client serve`'s
    /// router on loopback and send this many `Recommend` calls over gRPC (the first
    /// evaluation users' test histories) at concurrency 1 and 16; the report quotes requests
    /// per second, p50 and p99 (0: not measured).
    pub serve_requests: usize,
    /// Write each arm's final adapter (the tower each trained or selected arm is scored
    /// with, its pooling and β_t choices applied) as an exported folder
    /// `OUT/adapters/ARM/v0`, as `guild-coordinator export-adapter` writes one: what
    /// `guild-client serve --adapter` serves and `python/rank_with_tower.py` reads. About
    /// 16 MB a sketched tower, so off unless asked (`guild-sim run --keep-adapters`).
    pub keep_adapters: bool,
    /// Federated without noise (clients opt in with `dangerous_send_unnoised_updates`).
    pub federated: bool,
    /// Rounds of each DP arm (default: `federation.rounds`); at a fixed ε, fewer rounds
    /// mean less noise per round.
    pub dp_rounds: Option<u64>,
    /// Federated with distributed DP (DDGauss + SecAgg+) at these ε.
    pub distributed_dp_epsilons: Vec<f64>,
    /// Sequence tower: the merchant-level DP arms start with one pooling selection, its
    /// cost charged first and the training rounds' z calibrated to what it leaves.
    pub dp_selection: Option<MerchantSelection>,
    /// Federated with central DP (trusted coordinator) at these ε.
    pub central_dp_epsilons: Vec<f64>,
    /// Federated with shopper-level distributed DP at these ε (settings in `shopper_dp`).
    pub shopper_dp_epsilons: Vec<f64>,
    pub shopper_dp: Option<ShopperDp>,
}

/// The shopper-level DP arms: every merchant in every round, each Poisson-sampling its own
/// shoppers and clipping each one's update (`privacy.unit = "shopper"`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShopperDp {
    /// Each merchant of these arms holds this many of the scenario's shops (consecutive in
    /// the partition): every merchant is in every round, so a few dozen large merchants
    /// (each adding σ²/t of the noise, t > 2/3 of them) rather than hundreds of small ones.
    #[serde(default = "one_shop")]
    pub merge_shops: usize,
    /// q: the rate at which each merchant samples each of its shoppers per round.
    pub sampling_rate: f64,
    pub rounds: u64,
    /// c: L2 clip norm of one shopper's update.
    pub clip_norm: f64,
    /// SGD steps on one shopper's rows (1: its gradient, as DP-SGD).
    #[serde(default = "one_step")]
    pub local_steps: u32,
    /// η of those steps: one shopper's update is −η·∇ before clipping.
    pub learning_rate: f32,
    /// Uniform negatives of each shopper's sampled softmax (0: full).
    #[serde(default = "shopper_negatives")]
    pub negatives: u32,
    #[serde(default = "fed_avg")]
    pub server_optimizer: ServerOptimizer,
    #[serde(default = "one")]
    pub server_learning_rate: f64,
    /// What the training rounds train (`[rounds] trained`): `"whole"`, or `"pooling"` (the
    /// tower's pooling and prior weight alone, by each shopper's gradient; `local_steps = 1`).
    #[serde(default)]
    pub trained: guild_proto::round::TrainedPart,
    /// δ of the shopper-level arms (default: min(1e-6, 1/N^1.1) for N shoppers).
    #[serde(default)]
    pub delta: Option<f64>,
    /// Popularity releases before the training rounds (`[rounds.popularity_release]`): each
    /// merchant samples its shoppers at `popularity_sampling_rate` and sends each one's
    /// unit vector of items at the whole clip norm; nothing is trained.
    #[serde(default)]
    pub popularity_releases: u32,
    #[serde(default = "every_shopper")]
    pub popularity_sampling_rate: f64,
    /// The share of each arm's ε the releases are calibrated to when there are training
    /// rounds too (the training rounds' z is then calibrated to the rest, composed); all of
    /// it when there are none.
    #[serde(default)]
    pub popularity_budget: Option<f64>,
    /// z of one pooling selection after the releases (`[rounds.pooling_selection]`): each
    /// merchant samples its shoppers at `popularity_sampling_rate` and sends each one's
    /// NDCG@10 on its validation item under every setting of the public grid, and the
    /// coordinator keeps the best setting of the tower's pooling and prior weight. Its cost
    /// at this fixed z is charged first; the releases and training rounds are calibrated
    /// to what is left of each arm's ε. None: no selection.
    #[serde(default)]
    pub selection_noise_multiplier: Option<f64>,
    /// q of the pooling selection: the rate at which each merchant samples its shoppers for
    /// it (default: `popularity_sampling_rate`). Scoring a shopper under every setting costs
    /// about a millisecond of a core against the whole catalogue, so sampling fewer makes
    /// the selection cheaper as well as amplified; its noisy sums still separate the
    /// settings when thousands of shoppers are sampled.
    #[serde(default)]
    pub selection_sampling_rate: Option<f64>,
}

impl ShopperDp {
    /// The coordinator's schedule of the round kinds before training that these settings ask for.
    pub fn schedule(&self) -> guild_proto::round::Schedule {
        guild_proto::round::Schedule {
            popularity_releases: self.popularity_releases,
            pooling_selection: self.selection_noise_multiplier.is_some(),
        }
    }

    /// The rate at which the pooling selection samples each merchant's shoppers.
    pub fn selection_rate(&self) -> f64 {
        self.selection_sampling_rate.unwrap_or(self.popularity_sampling_rate)
    }
}

fn every_shopper() -> f64 {
    1.0
}

fn one_shop() -> usize {
    1
}

fn one_step() -> u32 {
    1
}

fn tower_negatives() -> u32 {
    guild_client::learner::TOWER_NEGATIVES as u32
}

fn shopper_negatives() -> u32 {
    guild_client::learner::SHOPPER_NEGATIVES as u32
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalOnly {
    pub merchants: usize,
    pub steps: usize,
    #[serde(default = "baseline_batch")]
    pub batch_size: usize,
    #[serde(default = "baseline_learning_rate")]
    pub learning_rate: f64,
}

fn baseline_batch() -> usize {
    32
}

fn baseline_learning_rate() -> f64 {
    1e-3
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Centralised {
    /// Steps of training; with `early_stopping`, the most it trains.
    pub steps: usize,
    #[serde(default = "baseline_batch")]
    pub batch_size: usize,
    #[serde(default = "baseline_learning_rate")]
    pub learning_rate: f64,
    /// Sequence tower: stop when validation NDCG@10 stops improving.
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
}

/// A merchant-level pooling selection: merchants sampled at `sampling_rate`, each
/// sending its shoppers' NDCG@10 on their validation items under the public grid's
/// settings, summed, centred and clipped at `clip_norm`, with noise
/// `noise_multiplier`·`clip_norm`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantSelection {
    pub noise_multiplier: f64,
    pub clip_norm: f64,
    /// The merchants' sampling rate in the selection (default: the training rounds').
    #[serde(default)]
    pub sampling_rate: Option<f64>,
}

/// Early stopping on the validation split: validation NDCG@10 of the first `users`
/// evaluation users (their validation items, never their test items) at the start and every
/// `every` steps; training stops once `patience` checks in a row have not beaten the best,
/// and the arm is the best check's tower.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    pub every: usize,
    pub patience: usize,
    pub users: usize,
}

/// No faults unless the scenario asks for them.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultSettings {
    /// Probability that a client abandons a round before each phase's message.
    pub drop: [f64; Phase::COUNT],
    /// Probability that a client sleeps `straggle_ms` before a phase's message.
    pub straggle: f64,
    pub straggle_ms: u64,
    /// SIGKILL the coordinator once the round after this many committed rounds is open,
    /// then restart it (in every federated arm, or the first only, below).
    pub kill_coordinator_after_round: Option<u64>,
    /// Kill and restart the coordinator in the first federated arm only (each restart costs
    /// an aborted round and the clients' reconnection, about 30 s on two cores).
    pub kill_coordinator_in_first_arm_only: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientMode {
    /// Clients as tasks in the simulator's process, sharing one loaded base model.
    #[default]
    Tasks,
    /// Clients as `guild-client run` processes, each loading the model.
    Processes,
}

/// A scenario file that could not be read or says something invalid.
pub type ScenarioError = guild_proto::config_file::ConfigFileError;

impl Scenario {
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let scenario: Scenario = guild_proto::config_file::load(path)?;
        let invalid = |message: String| ScenarioError::invalid(path, message);
        let f = &scenario.federation;
        if f.rounds == 0 || !(f.sampling_rate > 0.0 && f.sampling_rate <= 1.0) {
            return Err(invalid("federation.rounds must be ≥ 1 and sampling_rate in (0, 1]".into()));
        }
        if f.average_last == 0 {
            return Err(invalid("federation.average_last must be ≥ 1 (1: the last version alone)".into()));
        }
        match item_ids_scale_problem(f.item_ids_scale, f.family, f.tower.item_ids) {
            Some(ItemIdsScaleProblem::OutOfRange) => {
                return Err(invalid(format!(
                    "federation.item_ids_scale must be positive and at most {MAX_ITEM_IDS_SCALE}"
                )));
            }
            Some(ItemIdsScaleProblem::NothingToScale) => {
                return Err(invalid(
                    "federation.item_ids_scale scales the sequence tower's item-ID rows: needs family = \
                     \"sequence_tower\" and tower.item_ids set"
                        .into(),
                ));
            }
            None => {}
        }
        if f.dp_tower.is_some() && f.family != AdapterFamilyName::SequenceTower {
            return Err(invalid(
                "federation.dp_tower is a sequence tower's shape: needs family = \"sequence_tower\"".into(),
            ));
        }
        if f.release_parts > 0 && !(f.family == AdapterFamilyName::SequenceTower && f.popularity) {
            return Err(invalid(
                "federation.release_parts releases the sequence tower's statistics: needs family = \
                 \"sequence_tower\" and popularity = true"
                    .into(),
            ));
        }
        match f.trained {
            guild_proto::round::TrainedPart::Whole => {}
            guild_proto::round::TrainedPart::Weights if f.release_parts > 0 => {}
            other => {
                return Err(invalid(format!(
                    "federation.trained: the federated arm trains \"whole\", or \"weights\" after its \
                     release_parts releases have summed the statistics, not {other}"
                )));
            }
        }
        if let Some((key, problem)) = f.early_close.as_ref().and_then(EarlyClose::problem) {
            return Err(invalid(format!("federation.{}: {problem}", key.trim_start_matches("rounds."))));
        }
        if scenario.data.eval_users == 0 || scenario.data.shop_size == 0 {
            return Err(invalid("data.eval_users and data.shop_size must be ≥ 1".into()));
        }
        if let Some(sel) = &scenario.arms.dp_selection
            && !(sel.noise_multiplier > 0.0
                && sel.clip_norm > 0.0
                && sel.clip_norm.is_finite()
                && sel.sampling_rate.is_none_or(|q| q > 0.0 && q <= 1.0))
        {
            return Err(invalid(
                "arms.dp_selection's noise_multiplier and clip_norm must be positive, its sampling_rate in (0, 1]"
                    .into(),
            ));
        }
        if let Some(stop) = scenario.arms.centralised.as_ref().and_then(|c| c.early_stopping.as_ref())
            && (stop.every == 0 || stop.patience == 0 || stop.users == 0)
        {
            return Err(invalid(
                "arms.centralised.early_stopping's every, patience and users must be ≥ 1".into(),
            ));
        }
        if scenario
            .arms
            .distributed_dp_epsilons
            .iter()
            .chain(&scenario.arms.central_dp_epsilons)
            .chain(&scenario.arms.shopper_dp_epsilons)
            .any(|e| e.is_nan() || *e <= 0.0)
        {
            return Err(invalid("every ε must be positive".into()));
        }
        if !scenario.arms.shopper_dp_epsilons.is_empty() {
            let Some(sh) = &scenario.arms.shopper_dp else {
                return Err(invalid("shopper_dp_epsilons needs [arms.shopper_dp] settings".into()));
            };
            if !(sh.sampling_rate > 0.0 && sh.sampling_rate <= 1.0)
                || sh.rounds + sh.schedule().statistic_rounds() == 0
                || sh.merge_shops == 0
            {
                return Err(invalid(
                    "arms.shopper_dp: sampling_rate must be in (0, 1], rounds + popularity_releases (+ the \
                     selection) and merge_shops at least 1"
                        .into(),
                ));
            }
            if sh.popularity_releases > 0 {
                if !(sh.popularity_sampling_rate > 0.0 && sh.popularity_sampling_rate <= 1.0) {
                    return Err(invalid("arms.shopper_dp.popularity_sampling_rate must be in (0, 1]".into()));
                }
                if !scenario.federation.popularity {
                    return Err(invalid(
                        "arms.shopper_dp.popularity_releases needs federation.popularity = true".into(),
                    ));
                }
                match (sh.rounds, sh.popularity_budget) {
                    (0, _) => {}
                    (_, Some(b)) if b > 0.0 && b < 1.0 => {}
                    _ => {
                        return Err(invalid(
                            "arms.shopper_dp.popularity_budget (in (0, 1)) is needed to share ε between \
                             popularity releases and training rounds"
                                .into(),
                        ));
                    }
                }
            }
            if let Some(z) = sh.selection_noise_multiplier {
                if !(z.is_finite() && z > 0.0) {
                    return Err(invalid(
                        "arms.shopper_dp.selection_noise_multiplier must be positive".into(),
                    ));
                }
                if !scenario.federation.popularity {
                    return Err(invalid(
                        "arms.shopper_dp.selection_noise_multiplier needs federation.popularity = true (the \
                         selection scores the prior's weight)"
                            .into(),
                    ));
                }
                if !(sh.selection_rate() > 0.0 && sh.selection_rate() <= 1.0) {
                    return Err(invalid(
                        "arms.shopper_dp.selection_sampling_rate (or popularity_sampling_rate, its default) must \
                         be in (0, 1]"
                            .into(),
                    ));
                }
            }
            if sh.trained == guild_proto::round::TrainedPart::Pooling
                && (sh.local_steps != 1 || !scenario.federation.popularity)
            {
                return Err(invalid(
                    "arms.shopper_dp.trained = \"pooling\" takes one gradient per shopper of a tower with a \
                     popularity prior: needs local_steps = 1 and federation.popularity = true"
                        .into(),
                ));
            }
            if scenario.clients != ClientMode::Tasks {
                return Err(invalid("shopper-level arms run with clients = \"tasks\" only".into()));
            }
        }
        Ok(scenario)
    }

    /// δ for N merchants: the configured one, or min(1e-5, 1/N^1.1).
    pub fn delta(&self, merchants: usize) -> f64 {
        self.federation.delta.unwrap_or_else(|| 1e-5f64.min(1.0 / (merchants as f64).powf(1.1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Scenario, ScenarioError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.toml");
        std::fs::write(&path, text).expect("write");
        Scenario::load(&path)
    }

    const BASE: &str = r#"
name = "t"
[data]
dataset = "d"
shop_size = 10
eval_users = 5
[federation]
rounds = 2
sampling_rate = 0.5
min_cohort = 2
threshold = 2
local_steps = 1
batch_size = 4
learning_rate = 0.01
clip_norm = 1.0
rank = 1
phase_deadlines_ms = [1000, 1000, 1000, 1000, 1000]
[arms]
federated = true
"#;

    /// Every scenario this repository ships loads and validates (its dataset need not exist).
    #[test]
    fn every_shipped_scenario_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("scenarios/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let scenario = Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                names.push(scenario.name);
            }
        }
        names.sort();
        assert!(names.contains(&"default".to_owned()) && names.contains(&"shopper".to_owned()), "{names:?}");
    }

    #[test]
    fn training_the_pooling_part_needs_one_step_per_shopper() {
        let arm = |more: &str| {
            BASE.replace(
                "federated = true",
                &format!(
                    "federated = true\nshopper_dp_epsilons = [3.0]\nshopper_dp = {{ sampling_rate = 0.1, rounds = 2, \
                     popularity_releases = 1, popularity_budget = 0.9, clip_norm = 1.0, learning_rate = 1.0, \
                     trained = \"pooling\"{more} }}"
                ),
            )
        };
        let sh = load(&arm("")).expect("valid").arms.shopper_dp.expect("shopper arms");
        assert_eq!(sh.trained, guild_proto::round::TrainedPart::Pooling);
        let error = load(&arm(", local_steps = 2")).expect_err("two steps").to_string();
        assert!(error.contains("one gradient per shopper"), "{error}");
    }

    #[test]
    fn the_pooling_selection_samples_at_its_own_rate_or_the_releases_and_a_bad_rate_is_refused() {
        let shopper = BASE.replace(
            "federated = true",
            "federated = true\nshopper_dp_epsilons = [3.0]\nshopper_dp = { sampling_rate = 0.1, rounds = 0, \
             popularity_releases = 1, popularity_sampling_rate = 0.8, selection_noise_multiplier = 10.0, \
             clip_norm = 1.0, learning_rate = 1.0 }",
        );
        let selection_rate =
            |text: &str| load(text).map(|s| s.arms.shopper_dp.expect("shopper arms").selection_rate());
        assert_eq!(selection_rate(&shopper).expect("valid"), 0.8);
        let own = shopper.replace(
            "selection_noise_multiplier",
            "selection_sampling_rate = 0.3, selection_noise_multiplier",
        );
        assert_eq!(selection_rate(&own).expect("valid"), 0.3);
        for bad in ["0.0", "1.5"] {
            let text = shopper.replace(
                "selection_noise_multiplier",
                &format!("selection_sampling_rate = {bad}, selection_noise_multiplier"),
            );
            let error = selection_rate(&text).expect_err("refused").to_string();
            assert!(error.contains("selection_sampling_rate"), "{error}");
        }
    }

    #[test]
    fn the_server_optimiser_is_a_known_name_not_a_string_a_typo_turns_into_fed_avg() {
        assert_eq!(load(BASE).expect("valid").federation.server_optimizer, ServerOptimizer::FedAvg);
        let adam = BASE.replace("rank = 1", "rank = 1\nserver_optimizer = \"fed_adam\"");
        assert_eq!(load(&adam).expect("valid").federation.server_optimizer, ServerOptimizer::FedAdam);
        let typo = BASE.replace("rank = 1", "rank = 1\nserver_optimizer = \"fedadam\"");
        let error = load(&typo).expect_err("a typo is refused").to_string();
        assert!(error.contains("fedadam"), "{error}");
    }

    #[test]
    fn partitioned_releases_are_off_by_default_and_need_a_tower_with_statistics() {
        assert_eq!(load(BASE).expect("valid").federation.release_parts, 0);
        let tower = "rank = 1\nfamily = \"sequence_tower\"\nrelease_parts = 20";
        assert_eq!(load(&BASE.replace("rank = 1", tower)).expect("valid").federation.release_parts, 20);
        for bad in ["rank = 1\nrelease_parts = 20", &format!("{tower}\npopularity = false")] {
            let error = load(&BASE.replace("rank = 1", bad)).expect_err("refused").to_string();
            assert!(error.contains("federation.release_parts"), "{bad}: {error}");
        }
        // Training the weights alone follows the releases that carry the statistics.
        let weights = format!("{tower}\ntrained = \"weights\"");
        let loaded = load(&BASE.replace("rank = 1", &weights)).expect("valid");
        assert_eq!(loaded.federation.trained, guild_proto::round::TrainedPart::Weights);
        for bad in [
            weights.replace("release_parts = 20", "release_parts = 0"),
            format!("{tower}\ntrained = \"pooling\""),
        ] {
            let error = load(&BASE.replace("rank = 1", &bad)).expect_err("refused").to_string();
            assert!(error.contains("federation.trained"), "{bad}: {error}");
        }
    }

    /// `federation.early_close` reaches the scenario as written, is off by default, and a
    /// quorum out of range is refused naming the scenario's key.
    #[test]
    fn early_close_is_read_and_a_bad_quorum_is_named() {
        assert_eq!(load(BASE).expect("valid").federation.early_close, None);
        let policy = "rank = 1\nearly_close = { quorum = 0.8, grace_factor = 0.5, min_grace_ms = 500 }";
        let loaded = load(&BASE.replace("rank = 1", policy)).expect("valid");
        assert_eq!(
            loaded.federation.early_close,
            Some(EarlyClose { quorum: 0.8, grace_factor: 0.5, min_grace_ms: 500 })
        );
        let error =
            load(&BASE.replace("rank = 1", &policy.replace("0.8", "1.2"))).expect_err("refused").to_string();
        assert!(error.contains("federation.early_close.quorum"), "{error}");
    }

    /// The DP arms' own tower shape: absent by default (every arm shares `tower`), read as
    /// written, and refused with a family that has no tower.
    #[test]
    fn the_dp_arms_tower_is_their_own_only_when_set_and_only_for_the_tower() {
        assert_eq!(load(BASE).expect("valid").federation.dp_tower, None);
        let tower =
            "rank = 1\nfamily = \"sequence_tower\"\ntower = { neighbours = 64, pair_sketch = 1048576 }";
        let both = format!("{tower}\ndp_tower = {{ neighbours = 60 }}");
        let loaded = load(&BASE.replace("rank = 1", &both)).expect("valid");
        let (shape, dp) = (loaded.federation.tower, loaded.federation.dp_tower.expect("set"));
        assert_eq!((shape.neighbours, shape.pair_sketch), (64, 1 << 20));
        assert_eq!((dp.neighbours, dp.pair_sketch), (60, 0));
        let error =
            load(&BASE.replace("rank = 1", "rank = 1\ndp_tower = { neighbours = 60 }")).expect_err("LoRA");
        assert!(error.to_string().contains("federation.dp_tower"), "{error}");
    }

    #[test]
    fn the_tail_average_defaults_to_the_last_version_and_an_empty_one_is_named() {
        assert_eq!(load(BASE).expect("valid").federation.average_last, 1);
        let averaged = load(&BASE.replace("rank = 1", "rank = 1\naverage_last = 8")).expect("valid");
        assert_eq!(averaged.federation.average_last, 8);
        let error = load(&BASE.replace("rank = 1", "rank = 1\naverage_last = 0")).expect_err("none");
        assert!(error.to_string().contains("federation.average_last"), "{error}");
    }

    #[test]
    fn the_item_id_rows_scale_defaults_to_plain_fed_avg_and_a_bad_one_is_named() {
        assert_eq!(load(BASE).expect("valid").federation.item_ids_scale, 1.0);
        let tower = "rank = 1\nfamily = \"sequence_tower\"\ntower = { catalogue = 100, item_ids = 4 }";
        let scaled = BASE.replace("rank = 1", &format!("{tower}\nitem_ids_scale = 10.0"));
        assert_eq!(load(&scaled).expect("valid").federation.item_ids_scale, 10.0);
        // Without item IDs there is nothing to scale.
        let error = load(&BASE.replace("rank = 1", "rank = 1\nitem_ids_scale = 10.0")).expect_err("no IDs");
        assert!(error.to_string().contains("tower.item_ids"), "{error}");
        for bad in ["0.0", "-2.0", "5000.0"] {
            let text = BASE.replace("rank = 1", &format!("{tower}\nitem_ids_scale = {bad}"));
            let error = load(&text).expect_err("refused").to_string();
            assert!(error.contains("federation.item_ids_scale"), "{bad}: {error}");
        }
    }
}
