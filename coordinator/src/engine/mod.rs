//! The round engine: opens rounds, drives the SecAgg+ server state machine through its
//! five phases against per-phase deadlines, decodes the noisy sum, applies the server
//! optimiser and commits the new adapter with its round record and ledger entry.
//!
//! One driver task ([`Engine::run`], in `driver`) owns the round's timeline; `open`
//! samples a cohort and prepares its tasks; gRPC handlers hand messages to the round
//! ([`Engine::receive`], in `messages`) and wait for the phase they answered to close
//! ([`Engine::wait_phase`]); `optimizer` holds FedAvg and FedAdam as pure functions.
//! State lives behind one mutex that is never held across an `.await`; every change
//! bumps a `watch` generation that waiting handlers observe.

mod driver;
mod messages;
mod open;
pub mod optimizer;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use guild_privacy::PrivacyUnit;
use guild_privacy::dp::DdgParams;
use guild_privacy::ledger::{Budget, Ledger, PrivacyEvent, Spent};
use guild_privacy::secagg::message::{
    ClientIndex, EncryptedShares, RoundBinding, SignedKeys, SurvivorSignature,
};
use guild_privacy::secagg::server::Server;
use guild_privacy::secagg::{Phase, SecAggError};
use guild_proto::domain::{AdapterManifest, RoundTask};
use tokio::sync::{Notify, watch};

pub use messages::PhaseMessage;
use optimizer::Moments;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// Rounds whose outcome stays readable after they end (for late waiters).
const KEPT_OUTCOMES: usize = 16;

/// Why the engine refused a message or a wait.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no round is open")]
    NoRound,
    #[error(
        "the message is bound to round {got}, but the open round is {open} (or to another federation or adapter)"
    )]
    WrongRound { open: u64, got: u64 },
    #[error("merchant {0} is not in this round's cohort")]
    NotInCohort(String),
    #[error("round {round} is {}; a {got} message is too early or too late", match phase {
        Some(phase) => format!("in phase {phase}"),
        None => "committing".to_owned(),
    })]
    WrongPhase {
        round: u64,
        /// The phase collecting messages; `None` once every phase closed.
        phase: Option<Phase>,
        got: Phase,
    },
    #[error("rejected: {0}")]
    Rejected(SecAggError),
    #[error("round {round} was aborted: {reason}")]
    Aborted { round: u64, reason: String },
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
    #[error("coordinator is shutting down")]
    Shutdown,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Committed { version: u64 },
    Aborted { reason: String },
}

/// A committed adapter version, ready to serve.
#[derive(Debug)]
pub struct AdapterVersion {
    pub version: u64,
    pub sha256: [u8; 32],
    pub bytes: Vec<u8>,
    pub values: Vec<f32>,
}

/// What a phase's close hands back to each client.
#[derive(Clone, Debug)]
pub enum PhaseOutput {
    Roster(Vec<SignedKeys>),
    Inbox(Vec<EncryptedShares>),
    Survivors(Vec<ClientIndex>),
    Signatures(Vec<SurvivorSignature>),
    Finished(Outcome),
}

#[derive(Debug)]
struct Round {
    id: u64,
    binding: RoundBinding,
    members: BTreeMap<String, ClientIndex>,
    tasks: BTreeMap<ClientIndex, RoundTask>,
    server: Server,
    ddg: DdgParams,
    rotation_seed: u64,
    event: Option<PrivacyEvent>,
    /// Whom `event` protects.
    unit: PrivacyUnit,
    /// Most vectors the sum may hold (merchants, or shoppers in the shopper unit): with the
    /// clip norm and the noise, what bounds an honest sum's norm.
    max_summands: u32,
    /// Fixed FedAvg denominator: the expected number of summands, q·N (merchants sampled
    /// by the coordinator, or shoppers sampled by their merchants).
    denominator: f64,
    /// Training, a popularity release or the pooling selection: picks the server step.
    kind: guild_proto::round::RoundKind,
    /// The adapter coordinates the round sums (its vector is their concatenation).
    summed: guild_proto::round::SummedCoordinates,
    /// z of the round's kind (central mode adds the noise itself).
    noise_multiplier: f64,
    /// The phase now collecting messages; `None` once every phase closed.
    phase: Option<Phase>,
    phase_started: Instant,
    expected: BTreeSet<ClientIndex>,
    received: BTreeSet<ClientIndex>,
    roster: Vec<SignedKeys>,
    inboxes: BTreeMap<ClientIndex, Vec<EncryptedShares>>,
    survivors: Vec<ClientIndex>,
    signatures: Vec<SurvivorSignature>,
}

impl Round {
    /// The merchant at cohort index `index`.
    fn merchant_at(&self, index: ClientIndex) -> Option<&str> {
        self.members.iter().find(|(_, i)| **i == index).map(|(m, _)| m.as_str())
    }

    /// Whether `phase` has closed in this round.
    fn closed(&self, phase: Phase) -> bool {
        self.phase.is_none_or(|open| open > phase)
    }
}

#[derive(Debug)]
struct State {
    round: Option<Round>,
    outcomes: VecDeque<(u64, Outcome)>,
    latest: Arc<AdapterVersion>,
    /// FedAdam's first and second moments.
    moments: Option<Moments>,
    ledger: Ledger,
    status: String,
    rounds_completed: u64,
    rounds_aborted: u64,
    rounds_this_run: u64,
}

/// What `guild-coordinator status` shows.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EngineStatus {
    pub phase: String,
    pub round: Option<u64>,
    pub rounds_completed: u64,
    pub rounds_aborted: u64,
    pub latest_adapter_version: u64,
    /// Merchant-level ε, model-level (amplified by sampling).
    pub epsilon_spent: f64,
    /// Merchant-level ε against this coordinator for a merchant in every charged round
    /// (unamplified): an upper bound on every merchant's; each merchant's own ledger has its
    /// exact figure.
    pub epsilon_against_coordinator_bound: f64,
    /// Shopper-level ε: the same model-level and against the coordinator, since merchants
    /// sample their own shoppers in secret.
    pub shopper_epsilon_spent: f64,
    pub epsilon_budget: f64,
    pub delta: f64,
    /// Merchants named as misbehaving, kept out of cohorts until an operator lifts it.
    pub quarantined: Vec<crate::store::Quarantined>,
}

#[derive(Debug)]
pub struct Engine {
    config: Config,
    manifest: AdapterManifest,
    store: Arc<Store>,
    federation_id: [u8; 16],
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    arrivals: Notify,
    pub metrics: Metrics,
}

impl Engine {
    /// Loads the latest adapter and the ledger from the store, aborts any round a previous
    /// run left open, and stores adapter version 0 (zeros) in a fresh federation.
    pub fn new(
        config: Config,
        store: Arc<Store>,
        federation_id: [u8; 16],
        metrics: Metrics,
    ) -> Result<Self, anyhow::Error> {
        let manifest = config.manifest()?;
        let d = manifest.parameter_count();
        let zeros = guild_proto::adapter::to_bytes(&vec![0.0; d]);
        store.ensure_initial_adapter(&zeros, guild_proto::adapter::sha256(&zeros))?;
        let aborted = store.abort_open_rounds("the coordinator restarted during the round")?;
        if aborted > 0 {
            tracing::warn!(rounds = aborted, "aborted rounds left open by a previous run");
        }
        let record = store.latest_adapter()?.ok_or(StoreError::NoSuchAdapter(0))?;
        let values = guild_proto::adapter::from_bytes(&record.data, d).map_err(|e| {
            anyhow::anyhow!("stored adapter {} does not fit the configured manifest: {e}", record.version)
        })?;
        let moments = record
            .optimizer_state
            .as_deref()
            .map(|bytes| Moments::from_bytes(bytes, d))
            .transpose()
            .map_err(|e| {
                anyhow::anyhow!("stored optimiser moments of adapter {} are malformed: {e}", record.version)
            })?;
        let budget = Budget { epsilon: config.privacy.epsilon_budget, delta: config.privacy.delta };
        let ledger = Ledger::new(budget, store.ledger()?)?;
        let counts = store.round_counts()?;
        metrics.publish_privacy(&ledger)?;
        let latest = Arc::new(AdapterVersion {
            version: record.version,
            sha256: record.sha256,
            bytes: record.data,
            values,
        });
        let (changed, _) = watch::channel(0);
        Ok(Self {
            manifest,
            store,
            federation_id,
            state: Mutex::new(State {
                round: None,
                outcomes: VecDeque::new(),
                latest,
                moments,
                ledger,
                status: "idle".into(),
                rounds_completed: counts.completed,
                rounds_aborted: counts.aborted,
                rounds_this_run: 0,
            }),
            changed,
            arrivals: Notify::new(),
            metrics,
            config,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `work` and adds its time to the engine's busy-time metric.
    fn busy<T>(&self, work: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let result = work();
        self.metrics.busy_since(started);
        result
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    pub fn manifest(&self) -> &AdapterManifest {
        &self.manifest
    }

    /// The first version a training round commits under this coordinator's schedule (its
    /// statistic rounds come first), as the status states it.
    pub fn training_from_version(&self) -> u64 {
        self.config.schedule(&self.manifest).first_training_version()
    }

    pub fn latest_adapter(&self) -> Arc<AdapterVersion> {
        self.lock().latest.clone()
    }

    pub fn status(&self) -> EngineStatus {
        let state = self.lock();
        let epsilon = |spent: Result<Spent, _>| spent.map(|s: Spent| s.epsilon).unwrap_or(f64::INFINITY);
        let spent = epsilon(state.ledger.spent(PrivacyUnit::Merchant));
        let against = epsilon(state.ledger.spent_against_sampler(PrivacyUnit::Merchant));
        let shopper = epsilon(state.ledger.spent(PrivacyUnit::Shopper));
        let quarantined = self.store.quarantined().unwrap_or_else(|error| {
            tracing::warn!(%error, "reading the quarantine failed");
            Vec::new()
        });
        EngineStatus {
            quarantined,
            phase: match &state.round {
                Some(Round { id, phase: Some(phase), .. }) => format!("round {id}: {phase}"),
                Some(r) => format!("round {}: committing", r.id),
                None => state.status.clone(),
            },
            round: state.round.as_ref().map(|r| r.id),
            rounds_completed: state.rounds_completed,
            rounds_aborted: state.rounds_aborted,
            latest_adapter_version: state.latest.version,
            epsilon_spent: spent,
            epsilon_against_coordinator_bound: against,
            shopper_epsilon_spent: shopper,
            epsilon_budget: self.config.privacy.epsilon_budget,
            delta: self.config.privacy.delta,
        }
    }

    /// How the most recent rounds ended, oldest first (a bounded window).
    pub fn recent_outcomes(&self) -> Vec<(u64, Outcome)> {
        self.lock().outcomes.iter().cloned().collect()
    }

    /// Quarantines `merchant`, named as misbehaving in round `round_id`: it is left out of
    /// cohorts (and told why) until an operator lifts it.
    fn quarantine(&self, merchant: &str, round_id: u64, reason: &str) {
        match self.store.quarantine(merchant, round_id, reason) {
            Ok(true) => {
                tracing::warn!(merchant, round = round_id, reason, "merchant quarantined");
                if let Ok(all) = self.store.quarantined() {
                    self.metrics.merchants_quarantined.set(all.len() as i64);
                }
            }
            Ok(false) => {}
            Err(error) => tracing::error!(%error, merchant, reason, "recording a quarantine failed"),
        }
    }

    /// Wakes the driver (a merchant registered, say).
    pub fn poke(&self) {
        self.arrivals.notify_one();
    }
}
