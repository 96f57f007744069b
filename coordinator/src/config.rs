//! The coordinator's configuration: a TOML file, then `GUILD_<SECTION>__<KEY>` environment
//! variables over it (e.g. `GUILD_ROUNDS__SAMPLING_RATE=0.2`), validated once at start so
//! that a bad setting stops the daemon with a message naming it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use guild_privacy::cost::{RoundPrivacy, round_colluders, sampled_shoppers_bound};
use guild_privacy::secagg::graph::share_holders;
use guild_privacy::secagg::{Phase, min_active_threshold};
use guild_privacy::{PrivacyMode, PrivacyUnit};
use guild_proto::config_file::ConfigFileError;
use guild_proto::domain::{AdapterFamily, AdapterFamilyName, AdapterManifest, ManifestTensor};
use guild_proto::round::{RoundKind, Schedule, SummedCoordinates, TrainedPart};
use guild_proto::tower::TowerShape;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    #[serde(default)]
    pub adapter: AdapterConfig,
    #[serde(default)]
    pub rounds: RoundsConfig,
    #[serde(default)]
    pub privacy: PrivacyConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Prometheus `/metrics` over plain HTTP; none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The SQLite store, created on first start.
    pub store: PathBuf,
    /// sha256 of the base model's safetensors file, 64 hex digits.
    #[serde(default = "default_base_model")]
    pub base_model_sha256: String,
    /// Requests one merchant may make per second, sustained, across all its connections;
    /// beyond it (after `request_burst_per_merchant`) requests are refused from their
    /// headers, before their bodies are read. An honest client makes a handful a round.
    #[serde(default = "default_requests_per_second")]
    pub requests_per_second_per_merchant: u32,
    /// Requests one merchant may make at once above the sustained rate.
    #[serde(default = "default_request_burst")]
    pub request_burst_per_merchant: u32,
}

fn default_base_model() -> String {
    guild_proto::domain::BASE_MODEL_SHA256.into()
}

fn default_requests_per_second() -> u32 {
    20
}

fn default_request_burst() -> u32 {
    60
}

/// PEM files of the federation's CA, and the coordinator's certificate and key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The adapter the federation trains: FFA-LoRA B matrices of MiniLM's attention, or the
/// sequence tower over the frozen title embeddings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterConfig {
    pub family: AdapterFamilyName,
    pub layers: usize,
    pub hidden: usize,
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<String>,
    /// Seeds FFA-LoRA's frozen A, or the sequence tower's initial values.
    pub frozen_a_seed: u64,
    /// The sequence tower's shape; its `hidden` must equal `hidden`.
    pub tower: TowerShape,
    /// The federation's catalogue: 64 hex digits of `guild_proto::domain::catalogue_sha256`
    /// of its item ids in order (`guild-client catalogue --config merchant.toml` prints it).
    /// Stated in every task's manifest; a merchant whose catalogue differs refuses the
    /// federation's rounds instead of adding its shoppers to the wrong items. Empty: not
    /// stated (nothing is checked).
    pub catalogue_sha256: String,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            family: AdapterFamilyName::FfaLora,
            layers: 6,
            hidden: 384,
            rank: 8,
            alpha: 16.0,
            targets: vec!["query".into(), "value".into()],
            frozen_a_seed: 0,
            tower: TowerShape::default(),
            catalogue_sha256: String::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerOptimizer {
    FedAvg,
    FedAdam,
}

/// What the coordinator does to a training round's noisy sum before the server optimiser:
/// post-processing of the DP release, so it costs no privacy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shrinkage {
    /// Each tensor's part of the sum shrunk towards zero by its positive-part James–Stein
    /// factor at the sum's known noise variance (`guild_privacy::dp::james_stein`): never a
    /// larger expected error than the raw sum, and no step at all from a sum that is all
    /// noise. Without noise it changes nothing.
    #[default]
    JamesStein,
    /// The noisy sum as it is.
    None,
}

/// Closing a SecAgg+ phase before its deadline once most of its expected senders have
/// answered (`[rounds.early_close]`): the rest get a grace in proportion to how long the
/// quorum took. A merchant that vanished never answers, so without it every dropout costs
/// the whole phase deadline; a late merchant cut off is a dropout, which the protocol
/// tolerates down to the threshold (the phase waits for its deadline rather than leave
/// fewer than the threshold, and Unmask waits until every secret has threshold shares).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyClose {
    /// Share of the phase's expected senders that must have answered, in (0, 1].
    pub quorum: f64,
    /// The others get this multiple of the time the quorum took ...
    pub grace_factor: f64,
    /// ... and at least this many milliseconds.
    pub min_grace_ms: u64,
}

impl EarlyClose {
    /// The first setting out of range, as (its key in the coordinator's configuration, what
    /// it must be).
    pub fn problem(&self) -> Option<(&'static str, &'static str)> {
        if !(self.quorum.is_finite() && self.quorum > 0.0 && self.quorum <= 1.0) {
            return Some(("rounds.early_close.quorum", "must be in (0, 1]"));
        }
        if !(self.grace_factor.is_finite() && (0.0..=100.0).contains(&self.grace_factor)) {
            return Some(("rounds.early_close.grace_factor", "must be 0 to 100"));
        }
        (self.min_grace_ms > 3_600_000)
            .then_some(("rounds.early_close.min_grace_ms", "must be at most 1 hour"))
    }

    /// When the phase may close once `received` of its `expected` senders have answered,
    /// `elapsed` after it opened: `None` while short of the quorum.
    pub fn grace(&self, expected: usize, received: usize, elapsed: Duration) -> Option<Duration> {
        let needed = (self.quorum * expected as f64).ceil() as usize;
        (expected > 0 && received >= needed.max(1))
            .then(|| elapsed.mul_f64(self.grace_factor).max(Duration::from_millis(self.min_grace_ms)))
    }
}

/// The largest `rounds.item_ids_scale`: the cohort a round may hold
/// ([`RoundsConfig::max_cohort`]'s default), the most a row's few senders can be diluted.
pub const MAX_ITEM_IDS_SCALE: f64 = 1_000.0;

/// What makes a value unfit for `rounds.item_ids_scale`: the coordinator's configuration and
/// the simulator's scenarios ask the same question, each naming its own keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemIdsScaleProblem {
    /// Not positive, not finite, or above [`MAX_ITEM_IDS_SCALE`].
    OutOfRange,
    /// Other than 1 for an adapter without item-ID rows (not a sequence tower, or one whose
    /// shape has no `item_ids`): nothing to scale.
    NothingToScale,
}

/// Whether `scale` may be `rounds.item_ids_scale` for an adapter of `family` whose tower
/// shape has `item_ids` values per item.
pub fn item_ids_scale_problem(
    scale: f64,
    family: AdapterFamilyName,
    item_ids: usize,
) -> Option<ItemIdsScaleProblem> {
    if !(scale.is_finite() && scale > 0.0 && scale <= MAX_ITEM_IDS_SCALE) {
        return Some(ItemIdsScaleProblem::OutOfRange);
    }
    let has_item_ids = family == AdapterFamilyName::SequenceTower && item_ids > 0;
    (scale != 1.0 && !has_item_ids).then_some(ItemIdsScaleProblem::NothingToScale)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoundsConfig {
    /// Fewest sampled merchants a round starts with; a smaller sample is skipped.
    pub min_cohort: u32,
    /// No round opens before this many merchants have registered (quarantined ones
    /// included, so a quarantine never stalls the federation): a federation whose merchants
    /// join over some seconds would otherwise sample its first rounds from the first
    /// `min_cohort` to arrive. 0: as soon as `min_cohort` are eligible.
    pub start_after_registered: u64,
    /// t: survivors needed in every neighbourhood (and in all) for the sum to be revealed.
    pub threshold: u32,
    /// k: SecAgg+ neighbours per client; 0 for the complete graph.
    pub neighbours: u32,
    /// Deadlines of the five SecAgg+ phases, in milliseconds from the phase's start. The
    /// first covers fetching the task and local training.
    pub phase_deadlines_ms: [u64; Phase::COUNT],
    /// Rounds to run before idling; 0 for no limit.
    pub max_rounds: u64,
    /// Most merchants a round's cohort may hold; a larger sample is skipped (and costs no
    /// privacy, as nothing is computed from it). The gRPC message-size limit is sized from
    /// it and the adapter's dimension.
    pub max_cohort: u32,
    /// Pause between rounds.
    pub pause_ms: u64,
    /// Close a phase once most of it has answered (`[rounds.early_close]`); without it a
    /// phase waits for every expected sender or its deadline.
    pub early_close: Option<EarlyClose>,
    pub local_steps: u32,
    pub batch_size: u32,
    pub learning_rate: f32,
    /// Uniform negatives of the sequence tower's sampled softmax in each client's local
    /// training (0: the full softmax over the catalogue); ignored by FFA-LoRA.
    pub negatives: u32,
    pub server_optimizer: ServerOptimizer,
    pub server_learning_rate: f64,
    /// The factor a training round's averaged update of the sequence tower's item-ID rows
    /// (`item_ids`) is multiplied by before the server optimiser (with FedAvg: those rows'
    /// learning rate is this times `server_learning_rate`). A row moves only in the
    /// merchants whose shoppers bought its item, and the mean divides what they send by the
    /// whole cohort; every other value is shared by all of them. Post-processing of the
    /// noisy sum: it costs no privacy, and scales those rows' noise with their step. 1: plain
    /// FedAvg; at most [`MAX_ITEM_IDS_SCALE`].
    pub item_ids_scale: f64,
    /// Applied to a training round's noisy sum before the server optimiser.
    pub shrinkage: Shrinkage,
    /// Training rounds' noise and sampling (`[rounds.training]`).
    pub training: TrainingRounds,
    /// What training rounds train: `"whole"` (every trained value of the adapter, and each
    /// unit adds its statistics), `"weights"` (the same less the statistics, which the
    /// popularity releases carry: a federation whose releases sum every merchant's statistics
    /// once, `popularity_release.partition`, would otherwise add the sampled merchants' again)
    /// or `"pooling"` (the sequence tower's pooling weights and prior weight alone, a few
    /// dozen values that DP noise does not drown; shopper unit with `local_steps = 1`,
    /// DP-SGD's per-shopper gradient, only). The statistics are left to the releases in both.
    pub trained: TrainedPart,
    /// Popularity releases (`[rounds.popularity_release]`): the federation's first
    /// `rounds` adapter versions come from them (sequence towers with a popularity histogram
    /// only). Each sampled unit sends its popularity contribution at the whole clip norm and
    /// the coordinator adds the mean to the histogram and trains nothing. One release
    /// estimates the head of the catalogue far better than many training rounds that give
    /// the histogram a share of the clip.
    pub popularity_release: StatisticRounds,
    /// The pooling selection (`[rounds.pooling_selection]`, `rounds` at most 1): the adapter
    /// version after the releases comes from a round in which each sampled unit sends its
    /// NDCG@10 on its validation items under each setting of the public grid
    /// (`guild_proto::tower::selection_grid`), and the coordinator sets the tower's pooling
    /// and prior weight to the setting with the largest noisy sum and trains nothing
    /// (sequence towers with a popularity prior only).
    pub pooling_selection: StatisticRounds,
    /// Distinct cohort members that must complain about one merchant's sealed shares in a
    /// round before it is quarantined (a complaint cannot be checked by the coordinator, so
    /// one merchant's word is not enough). Protocol violations the coordinator sees itself
    /// quarantine at once.
    pub quarantine_after_complaints: u32,
}

impl RoundsConfig {
    /// The order of round kinds these settings ask for, whatever the adapter.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            popularity_releases: self.popularity_release.rounds,
            pooling_selection: self.pooling_selection.rounds > 0,
        }
    }
}

impl Default for RoundsConfig {
    fn default() -> Self {
        Self {
            min_cohort: 3,
            start_after_registered: 0,
            threshold: 2,
            neighbours: 0,
            phase_deadlines_ms: [120_000, 10_000, 30_000, 10_000, 10_000],
            max_rounds: 0,
            max_cohort: 1_000,
            pause_ms: 0,
            early_close: None,
            quarantine_after_complaints: 2,
            local_steps: 2,
            batch_size: 32,
            learning_rate: 1e-3,
            negatives: 1024,
            server_optimizer: ServerOptimizer::FedAvg,
            server_learning_rate: 1.0,
            item_ids_scale: 1.0,
            shrinkage: Shrinkage::JamesStein,
            training: TrainingRounds::default(),
            trained: TrainedPart::Whole,
            popularity_release: StatisticRounds::default(),
            pooling_selection: StatisticRounds::default(),
        }
    }
}

/// The rounds that train the adapter: their noise and sampling, as each statistic kind has
/// its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingRounds {
    /// z: the decoded sum carries N(0, (z·c)²) per coordinate.
    pub noise_multiplier: f64,
    /// q, the unit's sampling rate: merchants, by the coordinator, in the merchant unit;
    /// shoppers, each merchant its own, in the shopper unit (where every merchant takes part).
    pub sampling_rate: f64,
}

impl Default for TrainingRounds {
    fn default() -> Self {
        Self { noise_multiplier: 1.0, sampling_rate: 1.0 }
    }
}

/// A kind of round that sends a bounded statistic of each unit's data instead of training:
/// how many such rounds the schedule holds, and their noise and sampling, together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatisticRounds {
    /// Rounds of this kind in the schedule (`guild_proto::round::Schedule`).
    pub rounds: u32,
    /// z of these rounds: the decoded sum carries N(0, (z·c)²) per coordinate.
    pub noise_multiplier: f64,
    /// The unit's sampling rate in these rounds: shoppers, each merchant its own, in the
    /// shopper unit; merchants, by the coordinator, in the merchant unit.
    pub sampling_rate: f64,
    /// c of these rounds, where it differs from `privacy.clip_norm` (a statistic's scale
    /// is not an update's: a merchant's centred sum of its shoppers' NDCG@10 under the
    /// selection's settings is clipped at 1 in the default scenario, its training updates
    /// at 10).
    pub clip_norm: Option<f64>,
    /// Popularity releases only, and only without noise: the `rounds` releases partition
    /// the merchants instead of sampling them, so that each takes part in exactly one
    /// (`guild_proto::round::release_part` of its id) and the summed statistics cover every
    /// merchant while each round's cohort stays about `1/rounds` of the federation (a
    /// round of every merchant at once would be as large as the federation). Training's
    /// few sampled rounds reach a fraction of the merchants; the counts' prior is only as
    /// good as the pairs summed into it.
    pub partition: bool,
}

impl Default for StatisticRounds {
    fn default() -> Self {
        Self { rounds: 0, noise_multiplier: 0.0, sampling_rate: 1.0, clip_norm: None, partition: false }
    }
}

/// How one round of a kind samples and how much noise it carries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KindPrivacy {
    /// The rate at which the coordinator samples merchants.
    pub merchant_rate: f64,
    /// The rate at which the DP unit is sampled: merchants (by the coordinator) or
    /// shoppers (each merchant its own).
    pub unit_rate: f64,
    pub noise_multiplier: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    pub mode: PrivacyMode,
    /// Whom the DP protects: `merchant` (the coordinator samples merchants at each round
    /// kind's `sampling_rate`) or `shopper` (every merchant takes part and samples its own
    /// shoppers at the kind's `sampling_rate`).
    pub unit: PrivacyUnit,
    /// Shopper unit: N, the shoppers across the federation (declared by the merchants). The
    /// server divides the noisy sum by the expected number sampled, q·N, never by a count.
    pub shoppers: u64,
    /// c: the L2 clip norm of one merchant's update, or of one shopper's in the shopper unit.
    pub clip_norm: f64,
    /// Survivors that may collude against a merchant (add no noise, or reveal theirs to the
    /// coordinator) with the charged ε still holding: each client adds σ²/(t − c) and the
    /// ledger counts only honest shares. A round whose threshold is below c + 2 (c + 1 in
    /// the shopper unit) tolerates as many as it can (`guild_privacy::cost::round_colluders`).
    /// Each merchant refuses a task below its own `guards.min_tolerated_colluders`.
    pub tolerated_colluders: u32,
    /// Start even when a DP training round's noise is above `plan::MAX_NOISE_TO_CLIP` times
    /// the clip norm while `rounds.shrinkage = "none"` (`guild-coordinator privacy plan`).
    pub dangerous_allow_noise_above_clip: bool,
    /// The federation's cap on ε at `delta`, over its whole life.
    pub epsilon_budget: f64,
    pub delta: f64,
    /// b: bits of the SecAgg+ ring.
    pub bit_width: u32,
    /// Accepted probability that a coordinate of the sum wraps around 2^b.
    pub wrap_probability: f64,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            mode: PrivacyMode::Distributed,
            unit: PrivacyUnit::Merchant,
            shoppers: 0,
            clip_norm: 0.1,
            tolerated_colluders: guild_privacy::cost::DEFAULT_TOLERATED_COLLUDERS,
            dangerous_allow_noise_above_clip: false,
            epsilon_budget: 8.0,
            delta: 1e-5,
            bit_width: 32,
            wrap_probability: 1e-9,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] ConfigFileError),
    #[error("environment variable {name}: {message}")]
    Env { name: String, message: String },
    #[error("invalid setting {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, reason: reason.into() }
}

/// A round kind's sampling rate `q` at `key` must be in (0, 1].
fn check_rate(q: f64, key: &'static str) -> Result<(), ConfigError> {
    if q > 0.0 && q <= 1.0 { Ok(()) } else { Err(invalid(key, format!("must be in (0, 1], got {q}"))) }
}

const ENV_PREFIX: &str = "GUILD_";

impl Config {
    /// Reads `path`, applies `GUILD_<SECTION>__<KEY>` overrides from `env`, and validates.
    /// Relative paths in the file are taken relative to the file's folder.
    pub fn load(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let text = guild_proto::config_file::read(path)?;
        let mut config = Self::parse(&text, env).map_err(|e| match e {
            ConfigError::File(ConfigFileError::Invalid { message, .. }) => {
                ConfigFileError::invalid(path, message).into()
            }
            other => other,
        })?;
        let tls = &mut config.tls;
        let paths = [&mut config.server.store, &mut tls.ca, &mut tls.cert, &mut tls.key];
        guild_proto::config_file::resolve_relative(path, paths);
        Ok(config)
    }

    pub fn parse(text: &str, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        // The file's name is added by `load`.
        let unnamed =
            |e: toml::de::Error| ConfigFileError::Invalid { path: String::new(), message: e.to_string() };
        let mut table: toml::Table = text.parse().map_err(unnamed)?;
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else { continue };
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            let Some((key, sections)) = path.split_last() else { continue };
            if sections.is_empty() {
                continue;
            }
            // A TOML literal if it parses as one (numbers, booleans, arrays), else a string.
            let parsed = format!("v = {value}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value));
            let mut current = &mut table;
            for (depth, section) in sections.iter().enumerate() {
                current = current
                    .entry(section.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| ConfigError::Env {
                        name: name.clone(),
                        message: format!("{} is not a section", sections[..=depth].join(".")),
                    })?;
            }
            current.insert(key.clone(), parsed);
        }
        let config: Config = toml::Value::Table(table).try_into().map_err(unnamed)?;
        config.validate()?;
        Ok(config)
    }

    /// The federation's order of round kinds, for the adapter it trains.
    pub fn schedule(&self, manifest: &AdapterManifest) -> Schedule {
        self.rounds.schedule().for_adapter(manifest)
    }

    /// What a round of `kind` trains: `rounds.trained` for training, the whole adapter (as the
    /// wire states it) for the statistic kinds, which train nothing.
    pub fn trained_in(&self, kind: RoundKind) -> TrainedPart {
        if kind.trains() { self.rounds.trained } else { TrainedPart::Whole }
    }

    /// The coordinates of `manifest`'s adapter a round of `kind` sums: its SecAgg+ vector,
    /// its noise and its privacy cost are over these alone.
    pub fn summed(&self, kind: RoundKind, manifest: &AdapterManifest) -> SummedCoordinates {
        SummedCoordinates::of(kind, self.trained_in(kind), manifest)
    }

    /// The SecAgg+ shape of a round over `n` sampled merchants: each one's neighbours `k` (the
    /// complete graph when `rounds.neighbours` is 0) and the threshold `t`, the configured
    /// floor raised to the active-security bound for that neighbourhood, which every client
    /// checks for itself.
    pub fn cohort_shape(&self, n: u32) -> (u32, u32) {
        let r = &self.rounds;
        let k = if r.neighbours == 0 { n.saturating_sub(1) } else { r.neighbours.min(n.saturating_sub(1)) };
        (k, r.threshold.max(min_active_threshold(share_holders(n, k))))
    }

    /// The privacy of a round of `kind` over `n` sampled merchants and `manifest`'s adapter
    /// (over the coordinates the kind sums, [`Self::summed`]): the one description the daemon
    /// charges and the planner predicts with (merchant unit: at most `n` summands; shopper
    /// unit: the bound on the shoppers the merchants sample).
    pub fn round_privacy(&self, kind: RoundKind, n: u32, manifest: &AdapterManifest) -> RoundPrivacy {
        let p = &self.privacy;
        let privacy = self.kind_privacy(kind);
        let (_, t) = self.cohort_shape(n);
        let max_summands = match p.unit {
            PrivacyUnit::Merchant => n,
            PrivacyUnit::Shopper => sampled_shoppers_bound(p.shoppers, privacy.unit_rate),
        };
        RoundPrivacy {
            mode: p.mode,
            unit: p.unit,
            sampling_rate: privacy.unit_rate,
            noise_multiplier: privacy.noise_multiplier,
            clip_norm: self.clip_norm(kind),
            dimension: self.summed(kind, manifest).len(),
            min_survivors: t,
            tolerated_colluders: round_colluders(p.tolerated_colluders, t, p.unit),
            max_summands,
            bit_width: p.bit_width,
            wrap_probability: p.wrap_probability,
        }
    }

    /// c of a round of `kind`: the kind's own `clip_norm` where its table states one,
    /// `privacy.clip_norm` otherwise (training always).
    pub fn clip_norm(&self, kind: RoundKind) -> f64 {
        let own = match kind {
            RoundKind::Training => None,
            RoundKind::PopularityRelease => self.rounds.popularity_release.clip_norm,
            RoundKind::PoolingSelection => self.rounds.pooling_selection.clip_norm,
        };
        own.unwrap_or(self.privacy.clip_norm)
    }

    /// The number of parts a partitioned popularity release splits the merchants into (its
    /// `rounds`; `rounds.popularity_release.partition`), `None` where releases sample.
    pub fn release_parts(&self) -> Option<u32> {
        let release = &self.rounds.popularity_release;
        (release.partition && release.rounds > 0).then_some(release.rounds)
    }

    /// How a round of `kind` samples and how much noise it carries: at its own table's rate
    /// and z (`[rounds.training]`, `[rounds.popularity_release]`, `[rounds.pooling_selection]`).
    /// The rate is the unit's: merchants in the merchant unit; shoppers in the shopper unit,
    /// where every merchant takes part.
    pub fn kind_privacy(&self, kind: RoundKind) -> KindPrivacy {
        let r = &self.rounds;
        let (unit_rate, noise_multiplier) = match kind {
            RoundKind::Training => (r.training.sampling_rate, r.training.noise_multiplier),
            // A partitioned release takes a `1/rounds` part of the merchants each round.
            RoundKind::PopularityRelease => (
                self.release_parts()
                    .map_or(r.popularity_release.sampling_rate, |parts| 1.0 / f64::from(parts)),
                r.popularity_release.noise_multiplier,
            ),
            RoundKind::PoolingSelection => {
                (r.pooling_selection.sampling_rate, r.pooling_selection.noise_multiplier)
            }
        };
        let merchant_rate = match self.privacy.unit {
            PrivacyUnit::Merchant => unit_rate,
            PrivacyUnit::Shopper => 1.0,
        };
        KindPrivacy { merchant_rate, unit_rate, noise_multiplier }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.base_model_sha256()?;
        self.catalogue_sha256()?;
        let a = &self.adapter;
        if a.family == AdapterFamilyName::SequenceTower {
            a.tower.validate().map_err(|reason| invalid("adapter.tower", reason))?;
            if a.tower.hidden != a.hidden {
                return Err(invalid(
                    "adapter.tower.hidden",
                    format!("{} differs from adapter.hidden = {}", a.tower.hidden, a.hidden),
                ));
            }
        }
        if a.layers == 0 || a.hidden == 0 || a.rank == 0 || a.rank > a.hidden {
            return Err(invalid("adapter", "layers, hidden and rank must be positive, rank ≤ hidden"));
        }
        if a.targets.is_empty() || a.targets.iter().any(|t| !matches!(t.as_str(), "query" | "value" | "key"))
        {
            return Err(invalid(
                "adapter.targets",
                format!("{:?}: each must be query, key or value", a.targets),
            ));
        }
        if !(a.alpha.is_finite() && a.alpha > 0.0) {
            return Err(invalid("adapter.alpha", "must be positive"));
        }
        let r = &self.rounds;
        if r.threshold < 2 {
            return Err(invalid("rounds.threshold", "must be at least 2"));
        }
        if r.max_cohort < r.min_cohort || r.max_cohort as usize > guild_proto::limits::MAX_COHORT {
            return Err(invalid(
                "rounds.max_cohort",
                format!(
                    "must be in min_cohort..={} (the wire's largest cohort)",
                    guild_proto::limits::MAX_COHORT
                ),
            ));
        }
        if self.server.requests_per_second_per_merchant == 0 || self.server.request_burst_per_merchant == 0 {
            return Err(invalid(
                "server.requests_per_second_per_merchant",
                "the per-merchant request rate and burst must be at least 1",
            ));
        }
        if r.min_cohort < r.threshold + 1 {
            return Err(invalid(
                "rounds.min_cohort",
                format!(
                    "must be at least threshold + 1 = {} (every neighbourhood needs t others)",
                    r.threshold + 1
                ),
            ));
        }
        if r.neighbours != 0 && r.neighbours < r.threshold {
            return Err(invalid("rounds.neighbours", "must be 0 (complete graph) or at least the threshold"));
        }
        if r.neighbours != 0 && r.threshold < min_active_threshold(r.neighbours) {
            return Err(invalid(
                "rounds.threshold",
                format!(
                    "must be at least ⌊2k/3⌋ + 1 = {} for k = {} neighbours (below it a coordinator that deviates from the protocol could unmask a merchant); with the complete graph (neighbours = 0) each round raises it to that bound itself",
                    min_active_threshold(r.neighbours),
                    r.neighbours
                ),
            ));
        }
        if r.phase_deadlines_ms.iter().any(|&ms| ms == 0 || ms > 3_600_000) {
            return Err(invalid("rounds.phase_deadlines_ms", "each must be 1 ms to 1 hour"));
        }
        if let Some((key, problem)) = r.early_close.as_ref().and_then(EarlyClose::problem) {
            return Err(invalid(key, problem));
        }
        if r.local_steps == 0 || r.batch_size == 0 || !(r.learning_rate.is_finite() && r.learning_rate > 0.0)
        {
            return Err(invalid("rounds", "local_steps, batch_size and learning_rate must be positive"));
        }
        if r.negatives > guild_proto::limits::MAX_NEGATIVES {
            return Err(invalid(
                "rounds.negatives",
                format!("must be at most {} (0: the full softmax)", guild_proto::limits::MAX_NEGATIVES),
            ));
        }
        if !(r.server_learning_rate.is_finite() && r.server_learning_rate > 0.0) {
            return Err(invalid("rounds.server_learning_rate", "must be positive"));
        }
        match item_ids_scale_problem(r.item_ids_scale, self.adapter.family, self.adapter.tower.item_ids) {
            Some(ItemIdsScaleProblem::OutOfRange) => {
                return Err(invalid(
                    "rounds.item_ids_scale",
                    format!("must be positive and at most {MAX_ITEM_IDS_SCALE}"),
                ));
            }
            Some(ItemIdsScaleProblem::NothingToScale) => {
                return Err(invalid(
                    "rounds.item_ids_scale",
                    "scales the sequence tower's item-ID rows: needs adapter.family = \"sequence_tower\" with \
                     adapter.tower.item_ids set (1 leaves every adapter as FedAvg moves it)",
                ));
            }
            None => {}
        }
        let p = &self.privacy;
        if !(p.clip_norm.is_finite() && p.clip_norm > 0.0) {
            return Err(invalid("privacy.clip_norm", "must be positive"));
        }
        for (key, own) in [
            ("rounds.popularity_release.clip_norm", self.rounds.popularity_release.clip_norm),
            ("rounds.pooling_selection.clip_norm", self.rounds.pooling_selection.clip_norm),
        ] {
            if own.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
                return Err(invalid(key, "must be positive"));
            }
        }
        let training = &r.training;
        if !(training.noise_multiplier.is_finite() && training.noise_multiplier >= 0.0) {
            return Err(invalid("rounds.training.noise_multiplier", "must be ≥ 0"));
        }
        check_rate(training.sampling_rate, "rounds.training.sampling_rate")?;
        // Training's z may be left at 0 only by a federation that never trains: one whose
        // `max_rounds` ends within the schedule's statistic rounds.
        let trains = r.max_rounds == 0 || r.max_rounds > r.schedule().statistic_rounds();
        match p.mode {
            PrivacyMode::Distributed | PrivacyMode::Central if trains && training.noise_multiplier <= 0.0 => {
                return Err(invalid(
                    "rounds.training.noise_multiplier",
                    "must be positive in distributed and central mode when the federation trains \
                     (mode = \"dangerous_none\" turns noise off)",
                ));
            }
            PrivacyMode::Local => {
                return Err(invalid("privacy.mode", "local mode is offered by the simulator only"));
            }
            _ => {}
        }
        if r.trained == TrainedPart::Pooling {
            if a.family != AdapterFamilyName::SequenceTower || a.tower.catalogue == 0 {
                return Err(invalid(
                    "rounds.trained",
                    "\"pooling\" trains a sequence tower's pooling and popularity prior weight: needs \
                     adapter.family = \"sequence_tower\" with adapter.tower.catalogue set",
                ));
            }
            if p.unit != PrivacyUnit::Shopper || r.local_steps != 1 {
                return Err(invalid(
                    "rounds.trained",
                    "\"pooling\" takes one gradient per shopper: needs privacy.unit = \"shopper\" and \
                     rounds.local_steps = 1",
                ));
            }
        }
        if r.trained == TrainedPart::Weights {
            if a.family != AdapterFamilyName::SequenceTower || a.tower.catalogue == 0 {
                return Err(invalid(
                    "rounds.trained",
                    "\"weights\" leaves a sequence tower's statistics out of training: needs adapter.family = \
                     \"sequence_tower\" with adapter.tower.catalogue set",
                ));
            }
            if r.popularity_release.rounds == 0 {
                return Err(invalid(
                    "rounds.trained",
                    "\"weights\" leaves the statistics to the popularity releases: needs \
                     rounds.popularity_release.rounds of at least 1 (without releases the statistics \
                     would stay empty)",
                ));
            }
        }
        if r.pooling_selection.rounds > 1 {
            return Err(invalid(
                "rounds.pooling_selection.rounds",
                format!(
                    "a federation selects its pooling once: must be 0 or 1, got {}",
                    r.pooling_selection.rounds
                ),
            ));
        }
        for (s, z_key, q_key) in [
            (
                &r.popularity_release,
                "rounds.popularity_release.noise_multiplier",
                "rounds.popularity_release.sampling_rate",
            ),
            (
                &r.pooling_selection,
                "rounds.pooling_selection.noise_multiplier",
                "rounds.pooling_selection.sampling_rate",
            ),
        ] {
            if s.rounds == 0 {
                continue;
            }
            let z = s.noise_multiplier;
            if !(z.is_finite() && (z > 0.0 || p.mode == PrivacyMode::DangerousNone)) {
                return Err(invalid(
                    z_key,
                    format!("must be positive when the schedule has such rounds, got {z}"),
                ));
            }
            check_rate(s.sampling_rate, q_key)?;
        }
        if r.pooling_selection.partition {
            return Err(invalid(
                "rounds.pooling_selection.partition",
                "only popularity releases partition the merchants (a selection is one round)",
            ));
        }
        if r.popularity_release.partition {
            // Each merchant in exactly one round is parallel composition, which the ledger
            // does not account; under DP a release at sampling_rate 1 covers every merchant.
            if p.mode != PrivacyMode::DangerousNone || p.unit != PrivacyUnit::Merchant {
                return Err(invalid(
                    "rounds.popularity_release.partition",
                    "partitions the merchants of a federation without noise only: needs privacy.mode = \
                     \"dangerous_none\" and privacy.unit = \"merchant\" (under DP, a release at \
                     sampling_rate = 1 takes every merchant in one round)",
                ));
            }
            if r.popularity_release.sampling_rate != 1.0 {
                return Err(invalid(
                    "rounds.popularity_release.sampling_rate",
                    "a partitioned release takes each merchant in one of its rounds, sampling none: \
                     leave sampling_rate out (or at 1)",
                ));
            }
        }
        if !(p.epsilon_budget.is_finite() && p.epsilon_budget > 0.0 && p.delta > 0.0 && p.delta < 1.0) {
            return Err(invalid("privacy", "epsilon_budget must be positive and delta in (0, 1)"));
        }
        if p.unit == PrivacyUnit::Shopper && p.shoppers == 0 {
            return Err(invalid(
                "privacy.shoppers",
                "the shopper unit needs the number of shoppers across the federation",
            ));
        }
        if !(8..=32).contains(&p.bit_width) {
            return Err(invalid("privacy.bit_width", "must be 8..=32"));
        }
        if !(p.wrap_probability > 0.0 && p.wrap_probability < 1.0) {
            return Err(invalid("privacy.wrap_probability", "must be in (0, 1)"));
        }
        Ok(())
    }

    pub fn base_model_sha256(&self) -> Result<[u8; 32], ConfigError> {
        hex::decode(&self.server.base_model_sha256)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| invalid("server.base_model_sha256", "must be 64 hex digits"))
    }

    /// The federation's catalogue digest, if `adapter.catalogue_sha256` states one.
    pub fn catalogue_sha256(&self) -> Result<Option<[u8; 32]>, ConfigError> {
        let hex = &self.adapter.catalogue_sha256;
        if hex.is_empty() {
            return Ok(None);
        }
        hex::decode(hex).ok().and_then(|b| b.try_into().ok()).map(Some).ok_or_else(|| {
            invalid("adapter.catalogue_sha256", "must be 64 hex digits (or empty: not stated)")
        })
    }

    /// The manifest of the adapter this federation trains, in the order of its flat vector.
    pub fn manifest(&self) -> Result<AdapterManifest, ConfigError> {
        let a = &self.adapter;
        let catalogue = self.catalogue_sha256()?;
        if a.family == AdapterFamilyName::SequenceTower {
            return Ok(AdapterManifest::sequence_tower(self.base_model_sha256()?, a.tower, a.frozen_a_seed)
                .with_catalogue(catalogue));
        }
        let mut targets = a.targets.clone();
        targets.sort();
        targets.dedup();
        let tensors = (0..a.layers)
            .flat_map(|layer| {
                targets.iter().map(move |t| ManifestTensor {
                    name: format!("encoder.layer.{layer}.attention.self.{t}.lora_B"),
                    shape: vec![a.hidden, a.rank],
                })
            })
            .collect();
        Ok(AdapterManifest {
            base_model_sha256: self.base_model_sha256()?,
            tensors,
            rank: a.rank,
            alpha: a.alpha,
            frozen_a_seed: a.frozen_a_seed,
            family: AdapterFamily::FfaLora,
            catalogue_sha256: catalogue,
        })
    }

    pub fn phase_deadline(&self, phase: Phase) -> Duration {
        Duration::from_millis(self.rounds.phase_deadlines_ms[phase.index()])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The smallest configuration `Config::parse` accepts: listen address, store and TLS files.
    pub(crate) const MINIMAL: &str = r#"
        [server]
        listen = "127.0.0.1:50051"
        store = "guild.db"
        [tls]
        ca = "ca.pem"
        cert = "server.pem"
        key = "server.key"
    "#;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn defaults_and_environment_overrides() {
        let config = Config::parse(MINIMAL, env(&[])).expect("valid");
        assert_eq!(config.rounds, RoundsConfig::default());
        assert_eq!(config.manifest().expect("manifest").parameter_count(), 6 * 2 * 384 * 8);
        let config = Config::parse(
            MINIMAL,
            env(&[
                ("GUILD_ROUNDS__TRAINING__SAMPLING_RATE", "0.25"),
                ("GUILD_PRIVACY__MODE", "central"),
                ("GUILD_SERVER__LISTEN", "0.0.0.0:9000"),
                ("UNRELATED", "x"),
            ]),
        )
        .expect("valid");
        assert_eq!(config.rounds.training.sampling_rate, 0.25);
        assert_eq!(config.privacy.mode, PrivacyMode::Central);
        assert_eq!(config.server.listen.port(), 9000);
    }

    /// `[rounds.early_close]`: off by default, read from its table (and written back by a
    /// configuration's serialisation), its grace the larger of the factor times the time the
    /// quorum took and the floor, none short of the quorum; a quorum outside (0, 1] or a
    /// negative factor is refused naming its key.
    #[test]
    fn early_close_parses_round_trips_and_is_checked() {
        let table = "[rounds.early_close]\nquorum = 0.8\ngrace_factor = 0.5\nmin_grace_ms = 300";
        let config = Config::parse(&format!("{MINIMAL}\n{table}"), env(&[])).expect("valid");
        let policy = config.rounds.early_close.clone().expect("set");
        assert_eq!(policy, EarlyClose { quorum: 0.8, grace_factor: 0.5, min_grace_ms: 300 });
        let written = toml::to_string(&config).expect("toml");
        assert_eq!(
            Config::parse(&written, env(&[])).expect("reparsed").rounds.early_close,
            Some(policy.clone())
        );
        let ms = Duration::from_millis;
        assert_eq!(policy.grace(25, 19, ms(4_000)), None, "19 of 25 is short of 80%");
        assert_eq!(policy.grace(25, 20, ms(4_000)), Some(ms(2_000)));
        assert_eq!(policy.grace(25, 20, ms(100)), Some(ms(300)), "the floor");
        assert_eq!(policy.grace(0, 0, ms(100)), None, "nobody expected");
        for (key, value) in [("QUORUM", "0"), ("QUORUM", "1.5"), ("GRACE_FACTOR", "-1")] {
            let refused = Config::parse(
                &format!("{MINIMAL}\n{table}"),
                env(&[(&format!("GUILD_ROUNDS__EARLY_CLOSE__{key}"), value)]),
            )
            .expect_err("out of range");
            assert!(
                refused.to_string().contains(&format!("rounds.early_close.{}", key.to_lowercase())),
                "{refused}"
            );
        }
        assert_eq!(Config::parse(MINIMAL, env(&[])).expect("valid").rounds.early_close, None);
        // The line `init-federation`'s sample configuration carries, uncommented, is this policy.
        let sample = crate::daemon::sample_config("127.0.0.1:50051".parse().expect("address"));
        let line = "# early_close = { quorum = 0.8, grace_factor = 0.5, min_grace_ms = 500 }";
        assert!(sample.contains(line), "the sample names the policy");
        let uncommented = Config::parse(&sample.replace(line, &line[2..]), env(&[])).expect("valid");
        assert_eq!(
            uncommented.rounds.early_close,
            Some(EarlyClose { quorum: 0.8, grace_factor: 0.5, min_grace_ms: 500 })
        );
    }

    /// A statistic kind's own clip norm reaches what the round charges, encodes and sends
    /// (`round_privacy`, and through it the task); training keeps `privacy.clip_norm`; a
    /// clip norm that is not positive is refused naming its key.
    #[test]
    fn a_statistic_kind_clips_at_its_own_norm() {
        let selection = "[rounds.pooling_selection]\nrounds = 1\nnoise_multiplier = 0.5\nclip_norm = 0.1\n\
                         [adapter]\nfamily = \"sequence_tower\"\n[privacy]\nclip_norm = 10.0";
        let config = Config::parse(&format!("{MINIMAL}\n{selection}"), env(&[])).expect("valid");
        assert_eq!(config.clip_norm(RoundKind::PoolingSelection), 0.1);
        assert_eq!(config.clip_norm(RoundKind::PopularityRelease), 10.0);
        assert_eq!(config.clip_norm(RoundKind::Training), 10.0);
        let manifest = config.manifest().expect("manifest");
        assert_eq!(config.round_privacy(RoundKind::PoolingSelection, 20, &manifest).clip_norm, 0.1);
        assert_eq!(config.round_privacy(RoundKind::Training, 20, &manifest).clip_norm, 10.0);
        let refused = Config::parse(
            &format!("{MINIMAL}\n{selection}"),
            env(&[("GUILD_ROUNDS__POOLING_SELECTION__CLIP_NORM", "-1")]),
        )
        .expect_err("a negative clip norm");
        assert!(refused.to_string().contains("rounds.pooling_selection.clip_norm"), "{refused}");
    }

    /// A partitioned release: without noise and in the merchant unit only, sampling nothing
    /// (each round a `1/rounds` part of the merchants); under DP, or with a rate, or in a
    /// selection, it is refused naming the key.
    #[test]
    fn a_partitioned_release_is_for_a_federation_without_noise() {
        let release =
            "[rounds.popularity_release]\nrounds = 4\npartition = true\n[privacy]\nmode = \"dangerous_none\"";
        let config = Config::parse(&format!("{MINIMAL}\n{release}"), env(&[])).expect("valid partition");
        assert_eq!(config.release_parts(), Some(4));
        let q = config.kind_privacy(RoundKind::PopularityRelease);
        assert_eq!((q.merchant_rate, q.unit_rate), (0.25, 0.25));
        assert_eq!(config.kind_privacy(RoundKind::Training).merchant_rate, 1.0);
        let error = |pairs: &[(&str, &str)]| {
            Config::parse(&format!("{MINIMAL}\n{release}"), env(pairs)).expect_err("invalid").to_string()
        };
        let noisy = error(&[
            ("GUILD_PRIVACY__MODE", "distributed"),
            ("GUILD_ROUNDS__POPULARITY_RELEASE__NOISE_MULTIPLIER", "1.0"),
        ]);
        assert!(
            noisy.contains("rounds.popularity_release.partition") && noisy.contains("dangerous_none"),
            "{noisy}"
        );
        let shoppers = error(&[("GUILD_PRIVACY__UNIT", "shopper"), ("GUILD_PRIVACY__SHOPPERS", "1000")]);
        assert!(shoppers.contains("rounds.popularity_release.partition"), "{shoppers}");
        let sampled = error(&[("GUILD_ROUNDS__POPULARITY_RELEASE__SAMPLING_RATE", "0.5")]);
        assert!(sampled.contains("rounds.popularity_release.sampling_rate"), "{sampled}");
        let selection = error(&[("GUILD_ROUNDS__POOLING_SELECTION__PARTITION", "true")]);
        assert!(selection.contains("rounds.pooling_selection.partition"), "{selection}");
        // Without `partition`, releases sample at their rate.
        let sampled = Config::parse(
            &format!("{MINIMAL}\n{release}"),
            env(&[
                ("GUILD_ROUNDS__POPULARITY_RELEASE__PARTITION", "false"),
                ("GUILD_ROUNDS__POPULARITY_RELEASE__SAMPLING_RATE", "0.5"),
            ]),
        )
        .expect("a sampled release");
        assert_eq!(sampled.release_parts(), None);
        assert_eq!(sampled.kind_privacy(RoundKind::PopularityRelease).merchant_rate, 0.5);
    }

    #[test]
    fn bad_settings_are_named() {
        let error = |extra: &str, env_pairs: &[(&str, &str)]| {
            Config::parse(&format!("{MINIMAL}\n{extra}"), env(env_pairs)).expect_err("invalid").to_string()
        };
        assert!(
            error("", &[("GUILD_ROUNDS__TRAINING__SAMPLING_RATE", "1.5")])
                .contains("rounds.training.sampling_rate")
        );
        assert!(error("[rounds]\nthreshold = 5\nmin_cohort = 4", &[]).contains("rounds.min_cohort"));
        // The item-ID rows' step: positive and bounded, from the file or the environment.
        for bad in ["0.0", "-1.0", "1001.0", "nan"] {
            assert!(
                error("", &[("GUILD_ROUNDS__ITEM_IDS_SCALE", bad)]).contains("rounds.item_ids_scale"),
                "{bad}"
            );
        }
        // A scale other than 1 needs item IDs to scale.
        let scale = format!("{MINIMAL}\n[rounds]\nitem_ids_scale = 10.0");
        let ids = [
            ("GUILD_ADAPTER__FAMILY", "sequence_tower"),
            ("GUILD_ADAPTER__TOWER__CATALOGUE", "100"),
            ("GUILD_ADAPTER__TOWER__ITEM_IDS", "4"),
        ];
        let scaled = Config::parse(&scale, env(&ids)).expect("a valid scale");
        assert_eq!(scaled.rounds.item_ids_scale, 10.0);
        let without = Config::parse(&scale, env(&ids[..2])).expect_err("no item IDs").to_string();
        assert!(
            without.contains("rounds.item_ids_scale") && without.contains("adapter.tower.item_ids"),
            "{without}"
        );
        let untrained = error("[rounds.training]\nnoise_multiplier = 0.0", &[]);
        assert!(
            untrained.contains("rounds.training.noise_multiplier") && untrained.contains("dangerous_none")
        );
        // The shopper unit needs its population; the training table's rate is then the
        // shoppers', and every merchant takes part.
        assert!(error("[privacy]\nunit = \"shopper\"", &[]).contains("privacy.shoppers"));
        let shopper =
            "[rounds.training]\nsampling_rate = 0.02\n[privacy]\nunit = \"shopper\"\nshoppers = 50000";
        assert!(error("[privacy]\nunit = \"shop\"", &[]).contains("unit"));
        let config = Config::parse(&format!("{MINIMAL}\n{shopper}"), env(&[])).expect("valid shopper unit");
        assert_eq!((config.privacy.unit, config.privacy.shoppers), (PrivacyUnit::Shopper, 50_000));
        let training = config.kind_privacy(RoundKind::Training);
        assert_eq!((training.merchant_rate, training.unit_rate), (1.0, 0.02));
        // A popularity release needs its own noise, and a rate in (0, 1]; nested tables
        // take overrides too.
        let release = "[rounds.popularity_release]\nrounds = 1";
        assert!(error(release, &[]).contains("rounds.popularity_release.noise_multiplier"));
        let release = format!("{release}\nnoise_multiplier = 2.0");
        assert!(
            error(&release, &[("GUILD_ROUNDS__POPULARITY_RELEASE__SAMPLING_RATE", "0")])
                .contains("rounds.popularity_release.sampling_rate")
        );
        let config = Config::parse(&format!("{MINIMAL}\n{release}"), env(&[])).expect("valid release");
        let r = &config.rounds.popularity_release;
        assert_eq!((r.rounds, r.noise_multiplier, r.sampling_rate), (1, 2.0, 1.0));
        // So does a pooling selection, whatever the releases; a federation runs one at most.
        let selection = "[rounds.pooling_selection]\nrounds = 1";
        assert!(error(selection, &[]).contains("rounds.pooling_selection.noise_multiplier"));
        let selection = format!("{selection}\nnoise_multiplier = 20.0");
        let config = Config::parse(&format!("{MINIMAL}\n{selection}"), env(&[])).expect("valid selection");
        assert_eq!(config.rounds.pooling_selection.rounds, 1);
        assert!(
            error(&selection, &[("GUILD_ROUNDS__POOLING_SELECTION__SAMPLING_RATE", "1.5")])
                .contains("rounds.pooling_selection.sampling_rate")
        );
        assert!(
            error(&selection, &[("GUILD_ROUNDS__POOLING_SELECTION__ROUNDS", "2")])
                .contains("rounds.pooling_selection.rounds")
        );
        // Training the pooling part: a tower with a prior, the shopper unit, one local step.
        let tower = [("GUILD_ADAPTER__FAMILY", "sequence_tower"), ("GUILD_ADAPTER__TOWER__CATALOGUE", "100")];
        let pooling = format!("[rounds]\ntrained = \"pooling\"\n{shopper}");
        assert!(
            error(&pooling, &[("GUILD_ROUNDS__LOCAL_STEPS", "1")])
                .contains("adapter.family = \"sequence_tower\"")
        );
        assert!(error(&pooling, &tower).contains("rounds.local_steps = 1"));
        let one_step = [tower[0], tower[1], ("GUILD_ROUNDS__LOCAL_STEPS", "1")];
        let config = Config::parse(&format!("{MINIMAL}\n{pooling}"), env(&one_step)).expect("valid pooling");
        assert_eq!(config.rounds.trained, TrainedPart::Pooling);
        assert!(error("[rounds]\ntrained = \"pooling\"", &one_step).contains("privacy.unit = \"shopper\""));
        assert!(error("[rounds]\ntrained = \"pool\"", &[]).contains("trained"));
        // Training the weights alone: a tower with statistics, and releases that carry them.
        let weights = "[rounds]\ntrained = \"weights\"";
        let releases = [
            tower[0],
            tower[1],
            ("GUILD_ROUNDS__POPULARITY_RELEASE__ROUNDS", "4"),
            ("GUILD_ROUNDS__POPULARITY_RELEASE__PARTITION", "true"),
            ("GUILD_PRIVACY__MODE", "dangerous_none"),
        ];
        assert!(error(weights, &releases[2..]).contains("adapter.family = \"sequence_tower\""));
        assert!(error(weights, &tower).contains("rounds.popularity_release.rounds of at least 1"));
        let config = Config::parse(&format!("{MINIMAL}\n{weights}"), env(&releases)).expect("valid weights");
        assert_eq!(config.rounds.trained, TrainedPart::Weights);
        assert_eq!(config.trained_in(RoundKind::Training), TrainedPart::Weights);
        assert_eq!(config.trained_in(RoundKind::PopularityRelease), TrainedPart::Whole);
        assert!(
            error("[rounds]\nthreshold = 2", &[("GUILD_ROUNDS__THRESHOLD__X", "1")])
                .contains("rounds.threshold is not a section")
        );
        assert!(error("[rounds.training]\nsampling_rat = 0.5", &[]).contains("sampling_rat"));
        assert!(error("[adapter]\ncatalogue_sha256 = \"abc\"", &[]).contains("adapter.catalogue_sha256"));
        let digest = "ab".repeat(32);
        let stated =
            Config::parse(&format!("{MINIMAL}\n[adapter]\ncatalogue_sha256 = \"{digest}\""), env(&[]))
                .expect("a stated catalogue");
        assert_eq!(stated.manifest().expect("manifest").catalogue_sha256, Some([0xab; 32]));
        assert!(error("", &[("GUILD_SERVER__LISTEN", "nowhere")]).contains("listen"));
        assert!(
            Config::parse(
                &MINIMAL.replace("guild.db\"", "guild.db\"\nbase_model_sha256 = \"abc\""),
                env(&[])
            )
            .expect_err("bad hash")
            .to_string()
            .contains("server.base_model_sha256")
        );
    }
}
