//! The round engine: opens rounds, drives the SecAgg+ server state machine through its
//! five phases against per-phase deadlines, decodes the noisy sum, applies the server
//! optimiser and commits the new adapter with its round record and ledger entry.
//!
//! One driver task ([`Engine::run`]) owns the round's timeline; gRPC handlers hand it
//! messages ([`Engine::receive`]) and wait for the phase they answered to close
//! ([`Engine::wait_phase`]). State lives behind one mutex that is never held across an
//! `.await`; every change bumps a `watch` generation that waiting handlers observe.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guild_privacy::PrivacyMode;
use guild_privacy::dp::{DdgParams, ParamsRequest, RandomRotation, add_central_noise, ddgauss_zcdp_rho};
use guild_privacy::ledger::{Budget, Ledger, LedgerEntry, PrivacyEvent};
use guild_privacy::secagg::message::{
    AdvertiseKeys, ClientIndex, ConsistencyCheck, EncryptedShares, MaskedInput, RoundBinding, ShareKeys,
    SignedKeys, SurvivorSignature, Unmask,
};
use guild_privacy::secagg::server::Server;
use guild_privacy::secagg::{Identities, RoundConfig, SecAggError};
use guild_proto::domain::{AdapterManifest, PrivacyParams, RoundTask, SecAggParams, TrainingParams};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tokio::sync::{Notify, watch};

use crate::config::{Config, ServerOptimizer};
use crate::metrics::Metrics;
use crate::store::{AdapterRecord, RoundCommit, Store, StoreError};

/// Names of the SecAgg+ phases, by number.
pub const PHASES: [&str; 5] = ["AdvertiseKeys", "ShareKeys", "MaskedInput", "ConsistencyCheck", "Unmask"];
const PHASE_COUNT: usize = PHASES.len();
/// Rounds whose outcome stays readable after they end (for late waiters).
const KEPT_OUTCOMES: usize = 16;
/// FedAdam's constants (Reddi et al., ICLR 2021).
const ADAM_BETA1: f64 = 0.9;
const ADAM_BETA2: f64 = 0.99;
const ADAM_TAU: f64 = 1e-3;

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
    #[error("round {round} is in phase {phase}; a {got} message is too early or too late")]
    WrongPhase { round: u64, phase: &'static str, got: &'static str },
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
    /// Fixed FedAvg denominator: the expected cohort, q·N.
    denominator: f64,
    /// The phase now collecting messages (0..=4); 5 once every phase closed.
    phase: usize,
    phase_started: Instant,
    expected: BTreeSet<ClientIndex>,
    received: BTreeSet<ClientIndex>,
    roster: Vec<SignedKeys>,
    inboxes: BTreeMap<ClientIndex, Vec<EncryptedShares>>,
    survivors: Vec<ClientIndex>,
    signatures: Vec<SurvivorSignature>,
}

#[derive(Debug)]
struct State {
    round: Option<Round>,
    outcomes: VecDeque<(u64, Outcome)>,
    latest: Arc<AdapterVersion>,
    /// FedAdam's first and second moments.
    moments: Option<(Vec<f64>, Vec<f64>)>,
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
    pub epsilon_spent: f64,
    pub epsilon_budget: f64,
    pub delta: f64,
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

fn decode_moments(bytes: &[u8], d: usize) -> Option<(Vec<f64>, Vec<f64>)> {
    let values = guild_proto::adapter::from_bytes(bytes, 2 * d).ok()?;
    let (m, v) = values.split_at(d);
    Some((m.iter().map(|&x| f64::from(x)).collect(), v.iter().map(|&x| f64::from(x)).collect()))
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
        let moments = record.optimizer_state.as_deref().and_then(|b| decode_moments(b, d));
        let entries = store
            .ledger()?
            .into_iter()
            .map(|(round_id, json)| {
                serde_json::from_str::<PrivacyEvent>(&json)
                    .map(|event| LedgerEntry { round_id, event })
                    .map_err(|e| anyhow::anyhow!("ledger entry of round {round_id} is malformed: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let budget = Budget { epsilon: config.privacy.epsilon_budget, delta: config.privacy.delta };
        let ledger = Ledger::new(budget, entries)?;
        let counts = store.round_counts()?;
        metrics.epsilon_spent.set(ledger.spent()?.epsilon);
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

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    pub fn manifest(&self) -> &AdapterManifest {
        &self.manifest
    }

    pub fn latest_adapter(&self) -> Arc<AdapterVersion> {
        self.lock().latest.clone()
    }

    pub fn status(&self) -> EngineStatus {
        let state = self.lock();
        let spent = state.ledger.spent().map(|s| s.epsilon).unwrap_or(f64::INFINITY);
        EngineStatus {
            phase: match &state.round {
                Some(r) if r.phase < PHASE_COUNT => format!("round {}: {}", r.id, PHASES[r.phase]),
                Some(r) => format!("round {}: committing", r.id),
                None => state.status.clone(),
            },
            round: state.round.as_ref().map(|r| r.id),
            rounds_completed: state.rounds_completed,
            rounds_aborted: state.rounds_aborted,
            latest_adapter_version: state.latest.version,
            epsilon_spent: spent,
            epsilon_budget: self.config.privacy.epsilon_budget,
            delta: self.config.privacy.delta,
        }
    }

    /// Wakes the driver (a merchant registered, say).
    pub fn poke(&self) {
        self.arrivals.notify_one();
    }

    // ------------------------------------------------------------------ tasks

    /// The caller's task if it is in the open round's cohort and phase 0 is collecting;
    /// otherwise waits for one up to `wait`, then returns `Err(reason)`.
    pub async fn task_for(&self, merchant: &str, wait: Duration) -> Result<RoundTask, String> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            {
                let state = self.lock();
                if let Some(round) = &state.round
                    && round.phase == 0
                    && let Some(index) = round.members.get(merchant)
                    && !round.received.contains(index)
                    && let Some(task) = round.tasks.get(index)
                {
                    return Ok(task.clone());
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(match &state.round {
                        Some(r) => format!("round {} is running without this merchant", r.id),
                        None => state.status.clone(),
                    });
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_ok_and(|r| r.is_err()) {
                return Err("coordinator is shutting down".into());
            }
        }
    }

    // ------------------------------------------------------------------ messages

    /// Hands a phase message from `merchant` (its authenticated identity) to the SecAgg+
    /// server. Returns the round id and phase to wait on.
    pub fn receive(&self, merchant: &str, message: PhaseMessage) -> Result<(u64, usize), EngineError> {
        let started = Instant::now();
        let result = self.receive_inner(merchant, message);
        self.metrics.busy_since(started);
        result
    }

    fn receive_inner(&self, merchant: &str, message: PhaseMessage) -> Result<(u64, usize), EngineError> {
        let mut state = self.lock();
        let round = state.round.as_mut().ok_or(EngineError::NoRound)?;
        let binding = message.binding();
        if binding != round.binding {
            return Err(EngineError::WrongRound { open: round.id, got: binding.round_id });
        }
        let from =
            *round.members.get(merchant).ok_or_else(|| EngineError::NotInCohort(merchant.to_owned()))?;
        let phase = message.phase();
        if phase != round.phase {
            return Err(EngineError::WrongPhase {
                round: round.id,
                phase: PHASES.get(round.phase).copied().unwrap_or("Finished"),
                got: PHASES[phase],
            });
        }
        let result = match message {
            PhaseMessage::Keys(m) => round.server.receive_keys(from, m),
            PhaseMessage::Shares(m) => round.server.receive_shares(from, m),
            PhaseMessage::Input(m) => round.server.receive_masked_input(from, m),
            PhaseMessage::Consistency(m) => round.server.receive_consistency(from, m),
            PhaseMessage::Unmask(m) => round.server.receive_unmask(from, m),
        };
        result.map_err(EngineError::Rejected)?;
        round.received.insert(from);
        let all_in = round.expected.is_subset(&round.received);
        let id = round.id;
        drop(state);
        if all_in {
            self.arrivals.notify_one();
        }
        Ok((id, phase))
    }

    /// Waits until `phase` of round `round_id` closes and returns what `merchant` gets.
    pub async fn wait_phase(
        &self,
        merchant: &str,
        round_id: u64,
        phase: usize,
    ) -> Result<PhaseOutput, EngineError> {
        let mut rx = self.changed.subscribe();
        loop {
            {
                let state = self.lock();
                match &state.round {
                    Some(round) if round.id == round_id && round.phase > phase && phase < PHASE_COUNT - 1 => {
                        let me = round.members.get(merchant).copied();
                        return Ok(match phase {
                            0 => PhaseOutput::Roster(round.roster.clone()),
                            1 => PhaseOutput::Inbox(
                                me.and_then(|i| round.inboxes.get(&i).cloned()).unwrap_or_default(),
                            ),
                            2 => PhaseOutput::Survivors(round.survivors.clone()),
                            _ => PhaseOutput::Signatures(round.signatures.clone()),
                        });
                    }
                    Some(round) if round.id == round_id => {}
                    _ => {
                        let outcome =
                            state.outcomes.iter().find(|(id, _)| *id == round_id).map(|(_, o)| o.clone());
                        return match outcome {
                            Some(Outcome::Aborted { reason }) => {
                                Err(EngineError::Aborted { round: round_id, reason })
                            }
                            Some(outcome) if phase == PHASE_COUNT - 1 => Ok(PhaseOutput::Finished(outcome)),
                            _ => Err(EngineError::Aborted {
                                round: round_id,
                                reason: "the round is over".into(),
                            }),
                        };
                    }
                }
            }
            if rx.changed().await.is_err() {
                return Err(EngineError::Shutdown);
            }
        }
    }

    // ------------------------------------------------------------------ driver

    /// Runs rounds until `max_rounds` (if set) have completed in this run.
    pub async fn run(self: Arc<Self>) {
        loop {
            if self.config.rounds.max_rounds > 0
                && self.lock().rounds_this_run >= self.config.rounds.max_rounds
            {
                self.lock().status =
                    format!("idle: ran the configured {} rounds", self.config.rounds.max_rounds);
                self.bump();
                return;
            }
            let started = Instant::now();
            let opened = self.try_open();
            self.metrics.busy_since(started);
            match opened {
                Ok(true) => {
                    self.bump();
                    self.drive().await;
                    if self.config.rounds.pause_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(self.config.rounds.pause_ms)).await;
                    }
                }
                Ok(false) => {
                    self.bump();
                    let _ = tokio::time::timeout(Duration::from_millis(500), self.arrivals.notified()).await;
                }
                Err(error) => {
                    tracing::error!(%error, "cannot open a round");
                    self.lock().status = format!("error: {error}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Samples a cohort and opens a round, or says (in the status) why not.
    fn try_open(&self) -> Result<bool, anyhow::Error> {
        let cfg = &self.config;
        let eligible = self.store.eligible_merchants()?;
        let population = self.store.allowed_count()?.max(eligible.len() as u64);
        if (eligible.len() as u32) < cfg.rounds.min_cohort {
            self.lock().status = format!(
                "waiting for merchants: {} registered and allowed, a round needs at least {}",
                eligible.len(),
                cfg.rounds.min_cohort
            );
            return Ok(false);
        }
        // Poisson sampling: each merchant independently, with the OS's randomness.
        let mut rng = ChaCha20Rng::from_entropy();
        let q = cfg.rounds.sampling_rate;
        let cohort: Vec<_> = eligible.into_iter().filter(|_| rng.gen_bool(q)).collect();
        let n = cohort.len() as u32;
        if n < cfg.rounds.min_cohort {
            // Nothing is computed or released from a skipped sample, so it costs no privacy.
            self.metrics.rounds_skipped.inc();
            self.lock().status = format!(
                "sampled {n} merchants, fewer than the minimum cohort {}; resampling",
                cfg.rounds.min_cohort
            );
            return Ok(false);
        }
        let t = cfg.rounds.threshold;
        let k = if cfg.rounds.neighbours == 0 { n - 1 } else { cfg.rounds.neighbours.min(n - 1) };
        let d = self.manifest.parameter_count();
        let z = cfg.privacy.noise_multiplier;
        let c = cfg.privacy.clip_norm;
        let client_noise = if cfg.privacy.mode == PrivacyMode::Distributed { z * c } else { 0.0 };
        let ddg = DdgParams::select(&ParamsRequest {
            dimension: d,
            clip_norm: c,
            noise_stddev: client_noise,
            min_survivors: t,
            max_summands: n,
            bit_width: cfg.privacy.bit_width,
            wrap_probability: cfg.privacy.wrap_probability,
        })?;
        let event = match cfg.privacy.mode {
            PrivacyMode::Distributed => {
                Some(PrivacyEvent::SubsampledZcdp { sampling_rate: q, rho: ddgauss_zcdp_rho(&ddg, t - 1)? })
            }
            PrivacyMode::Central | PrivacyMode::Local => {
                Some(PrivacyEvent::SubsampledGaussian { sampling_rate: q, noise_multiplier: z })
            }
            PrivacyMode::DangerousNone => None,
        };
        let mut state = self.lock();
        if let Some(event) = &event {
            let after = state.ledger.spent_if(event)?;
            if after.epsilon > cfg.privacy.epsilon_budget {
                let message = format!(
                    "privacy budget exhausted: another round would raise ε from {:.4} to {:.4}, past the cap of {} at δ = {:e}; no more rounds",
                    state.ledger.spent()?.epsilon,
                    after.epsilon,
                    cfg.privacy.epsilon_budget,
                    cfg.privacy.delta
                );
                if state.status != message {
                    tracing::warn!("{message}");
                    self.metrics.rounds_refused.inc();
                }
                state.status = message;
                return Ok(false);
            }
        }
        let round_id = self.store.open_round(n)?;
        let latest = state.latest.clone();
        let binding =
            RoundBinding { federation_id: self.federation_id, round_id, adapter_sha256: latest.sha256 };
        let graph_seed: u64 = rng.r#gen();
        let rotation_seed: u64 = rng.r#gen();
        let padded = ddg.padded_dimension();
        let round_config = RoundConfig {
            binding,
            cohort_size: n,
            threshold: t,
            neighbours: k,
            graph_seed,
            vector_length: padded,
            bit_width: cfg.privacy.bit_width,
        };
        let identities: Identities = cohort
            .iter()
            .enumerate()
            .map(|(i, m)| (ClientIndex::new(i as u32 + 1).expect("1-based"), m.signing_public_key))
            .collect();
        let server = Server::new(round_config, identities.clone())?;
        let deadlines: Vec<Duration> = (0..PHASE_COUNT).map(|p| cfg.phase_deadline(p)).collect();
        let mut members = BTreeMap::new();
        let mut tasks = BTreeMap::new();
        for (i, merchant) in cohort.iter().enumerate() {
            let index = ClientIndex::new(i as u32 + 1).expect("1-based");
            members.insert(merchant.merchant_id.clone(), index);
            tasks.insert(
                index,
                RoundTask {
                    binding,
                    adapter_version: latest.version,
                    manifest: self.manifest.clone(),
                    training: TrainingParams {
                        local_steps: cfg.rounds.local_steps,
                        batch_size: cfg.rounds.batch_size,
                        learning_rate: cfg.rounds.learning_rate,
                        data_seed: rng.r#gen(),
                    },
                    privacy: PrivacyParams {
                        mode: cfg.privacy.mode,
                        clip_norm: c,
                        noise_multiplier: z,
                        gamma: ddg.gamma(),
                        bit_width: cfg.privacy.bit_width,
                        min_survivors: t,
                        rotation_seed,
                    },
                    secagg: SecAggParams {
                        my_index: index,
                        cohort_size: n,
                        threshold: t,
                        neighbours: k,
                        graph_seed,
                        vector_length: padded as u32,
                        phase_deadlines: deadlines.clone(),
                    },
                    cohort: identities.clone(),
                },
            );
        }
        tracing::info!(
            round = round_id,
            cohort = n,
            threshold = t,
            neighbours = k,
            adapter = latest.version,
            "round opened"
        );
        self.metrics.participants.set(i64::from(n));
        state.round = Some(Round {
            id: round_id,
            binding,
            expected: members.values().copied().collect(),
            members,
            tasks,
            server,
            ddg,
            rotation_seed,
            event,
            denominator: q * population as f64,
            phase: 0,
            phase_started: Instant::now(),
            received: BTreeSet::new(),
            roster: Vec::new(),
            inboxes: BTreeMap::new(),
            survivors: Vec::new(),
            signatures: Vec::new(),
        });
        state.status = format!("round {round_id} open");
        Ok(true)
    }

    /// Drives the open round through its phases, then finishes it.
    async fn drive(&self) {
        for phase in 0..PHASE_COUNT {
            let deadline = tokio::time::Instant::now() + self.config.phase_deadline(phase);
            loop {
                let notified = self.arrivals.notified();
                let all_in = {
                    let state = self.lock();
                    state.round.as_ref().is_none_or(|r| r.expected.is_subset(&r.received))
                };
                if all_in {
                    break;
                }
                tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            let started = Instant::now();
            let closed = self.close_phase(phase);
            self.metrics.busy_since(started);
            if let Err(reason) = closed {
                self.abort(reason);
                return;
            }
        }
        let started = Instant::now();
        let result = self.finish();
        self.metrics.busy_since(started);
        match result {
            Ok(version) => {
                let mut state = self.lock();
                let round_id = state.round.take().map(|r| r.id).unwrap_or_default();
                push_outcome(&mut state.outcomes, round_id, Outcome::Committed { version });
                state.status = format!("round {round_id} committed adapter version {version}");
                drop(state);
                self.bump();
            }
            Err(error) => self.abort(format!("finishing failed: {error}")),
        }
    }

    fn close_phase(&self, phase: usize) -> Result<(), String> {
        let mut state = self.lock();
        let Some(round) = state.round.as_mut() else { return Err("the round vanished".into()) };
        let dropped = round.expected.difference(&round.received).count();
        let latency = round.phase_started.elapsed();
        let result = match phase {
            0 => round.server.close_keys().map(|roster| round.roster = roster),
            1 => round.server.close_shares().map(|inboxes| round.inboxes = inboxes),
            2 => round.server.close_inputs().map(|survivors| round.survivors = survivors),
            3 => round.server.close_consistency().map(|signatures| round.signatures = signatures),
            _ => Ok(()),
        };
        self.metrics.observe_phase(PHASES[phase], latency, dropped);
        tracing::info!(
            round = round.id,
            phase = PHASES[phase],
            received = round.received.len(),
            dropped,
            ?latency,
            "phase closed"
        );
        result.map_err(|e| e.to_string())?;
        round.expected = std::mem::take(&mut round.received);
        round.phase = phase + 1;
        if let Err(error) =
            self.store.set_round_phase(round.id, PHASES.get(phase + 1).copied().unwrap_or("committing"))
        {
            tracing::warn!(%error, "recording the round's phase failed");
        }
        round.phase_started = Instant::now();
        drop(state);
        if phase < PHASE_COUNT - 1 {
            self.bump();
        }
        Ok(())
    }

    fn abort(&self, reason: String) {
        let mut state = self.lock();
        if let Some(mut round) = state.round.take() {
            round.server.abort();
            tracing::warn!(round = round.id, %reason, "round aborted; nothing was revealed and no budget spent");
            if let Err(error) = self.store.abort_round(round.id, &reason) {
                tracing::error!(%error, "recording the abort failed (it is recorded at the next start)");
            }
            state.rounds_aborted += 1;
            self.metrics.rounds_aborted.inc();
            state.status = format!("round {} aborted: {reason}", round.id);
            push_outcome(&mut state.outcomes, round.id, Outcome::Aborted { reason });
        }
        drop(state);
        self.bump();
    }

    /// Unmasks the sum, decodes it, applies the server optimiser and commits.
    fn finish(&self) -> Result<u64, anyhow::Error> {
        let mut state = self.lock();
        let State { round, latest, moments, ledger, .. } = &mut *state;
        let round = round.as_mut().ok_or_else(|| anyhow::anyhow!("the round vanished"))?;
        let sum = round.server.finish()?;
        let rotation = RandomRotation::new(round.ddg.padded_dimension(), round.rotation_seed);
        let mut decoded = round.ddg.decode(&sum, &rotation)?;
        if self.config.privacy.mode == PrivacyMode::Central {
            let sigma = self.config.privacy.noise_multiplier * self.config.privacy.clip_norm;
            add_central_noise(&mut decoded, sigma, &mut ChaCha20Rng::from_entropy())?;
        }
        let eta = self.config.rounds.server_learning_rate;
        let mean: Vec<f64> = decoded.iter().map(|s| s / round.denominator).collect();
        let mut new_moments = None;
        let values: Vec<f32> = match self.config.rounds.server_optimizer {
            ServerOptimizer::FedAvg => {
                latest.values.iter().zip(&mean).map(|(&b, &u)| (f64::from(b) + eta * u) as f32).collect()
            }
            ServerOptimizer::FedAdam => {
                let d = mean.len();
                let (mut m, mut v) = moments.clone().unwrap_or_else(|| (vec![0.0; d], vec![0.0; d]));
                for i in 0..d {
                    m[i] = ADAM_BETA1 * m[i] + (1.0 - ADAM_BETA1) * mean[i];
                    v[i] = ADAM_BETA2 * v[i] + (1.0 - ADAM_BETA2) * mean[i] * mean[i];
                }
                let values = latest
                    .values
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| (f64::from(b) + eta * m[i] / (v[i].sqrt() + ADAM_TAU)) as f32)
                    .collect();
                new_moments = Some((m, v));
                values
            }
        };
        let bytes = guild_proto::adapter::to_bytes(&values);
        let sha256 = guild_proto::adapter::sha256(&bytes);
        let version = latest.version + 1;
        let optimizer_state = new_moments.as_ref().map(|(m, v)| {
            let flat: Vec<f32> = m.iter().chain(v).map(|&x| x as f32).collect();
            guild_proto::adapter::to_bytes(&flat)
        });
        let survivors = round.survivors.len() as u32;
        let entry = round.event.map(|event| LedgerEntry { round_id: round.id, event });
        let mut next_ledger = ledger.clone();
        if let Some(entry) = entry {
            next_ledger.append(entry)?;
        }
        self.store.commit_round(&RoundCommit {
            round_id: round.id,
            survivors,
            adapter: AdapterRecord { version, sha256, data: bytes.clone(), optimizer_state },
            ledger_event: entry.map(|e| serde_json::to_string(&e.event)).transpose()?,
        })?;
        *ledger = next_ledger;
        *latest = Arc::new(AdapterVersion { version, sha256, bytes, values });
        if new_moments.is_some() {
            *moments = new_moments;
        }
        let epsilon = ledger.spent()?.epsilon;
        state.rounds_completed += 1;
        state.rounds_this_run += 1;
        self.metrics.rounds_completed.inc();
        self.metrics.epsilon_spent.set(epsilon);
        tracing::info!(version, survivors, epsilon, "round committed");
        Ok(version)
    }
}

fn push_outcome(outcomes: &mut VecDeque<(u64, Outcome)>, round: u64, outcome: Outcome) {
    outcomes.push_back((round, outcome));
    while outcomes.len() > KEPT_OUTCOMES {
        outcomes.pop_front();
    }
}

/// A SecAgg+ message of any phase, validated at the wire boundary.
#[derive(Debug)]
pub enum PhaseMessage {
    Keys(AdvertiseKeys),
    Shares(ShareKeys),
    Input(MaskedInput),
    Consistency(ConsistencyCheck),
    Unmask(Unmask),
}

impl PhaseMessage {
    fn phase(&self) -> usize {
        match self {
            Self::Keys(_) => 0,
            Self::Shares(_) => 1,
            Self::Input(_) => 2,
            Self::Consistency(_) => 3,
            Self::Unmask(_) => 4,
        }
    }

    fn binding(&self) -> RoundBinding {
        match self {
            Self::Keys(m) => m.binding,
            Self::Shares(m) => m.binding,
            Self::Input(m) => m.binding,
            Self::Consistency(m) => m.binding,
            Self::Unmask(m) => m.binding,
        }
    }
}
