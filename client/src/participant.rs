//! The merchant's side of a round, over the network: poll for a task, check it, train,
//! privatise (clip, DDGauss-encode with this client's share of the noise), and take part
//! in SecAgg+. The update leaves this process only as a SecAgg+ masked input: there is no
//! other code path that sends it.
//!
//! Training is behind [`Learner`], so the same loop runs the real model
//! ([`crate::learner::ModelLearner`]) or, for load tests, [`crate::learner::RandomLearner`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use guild_privacy::cost::round_rho;
use guild_privacy::dp::{DdgEncoding, DdgParams, RandomRotation, poisson_sample};
use guild_privacy::secagg::{Phase, RoundConfig, client as secagg, min_active_threshold};
use guild_privacy::{PrivacyMode, PrivacyUnit};
use guild_proto::domain::{MerchantId, MetricsReport, RoundTask, Task};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

pub use crate::faults::Faults;
use crate::faults::Injected;
use crate::identity::Identity;
pub use crate::learner::Learner;
use crate::learner::{RoundInput, Units, contribute};
pub use crate::ledger::{ClientLedger, Participation};
use crate::net::{Connection, NetError};
use crate::retrieval::RankingCounts;

/// The merchant's own guards and settings.
#[derive(Clone, Debug)]
pub struct ParticipantOptions {
    pub display_name: String,
    /// Refuse rounds whose noise multiplier is below this.
    pub min_noise_multiplier: f64,
    /// Take part in rounds whose mode has clients send un-noised (but clipped and masked)
    /// updates: `central` and `dangerous_none`. Off by default.
    pub dangerous_send_unnoised_updates: bool,
    /// Long-poll duration of task requests.
    pub poll: Duration,
    /// Longest pause between reconnection attempts.
    pub max_backoff: Duration,
    pub faults: Faults,
    /// Stop after taking part in this many rounds (0: never).
    pub max_rounds: u64,
    /// Refuse a distributed-DP round that would take this merchant's own ε against the
    /// coordinator past this, at `delta`: in the merchant unit its participations composed
    /// without amplification; in the shopper unit each of its shoppers' ε, amplified by this
    /// merchant's own sampling.
    pub max_epsilon: f64,
    /// Shopper unit: refuse a training round that asks this merchant to sample its shoppers
    /// at a higher rate (less amplification, and more of its shoppers in every round); a
    /// popularity release is exempt (it sends item sets only) but not from `max_epsilon`.
    pub max_shopper_sampling_rate: f64,
    pub delta: f64,
    /// Send the per-round evaluation counts on this merchant's validation shoppers to the
    /// coordinator: un-noised, not charged to any ledger, so off by default.
    pub dangerous_report_unnoised_metrics: bool,
}

/// A merchant's default cap on its own ε against the coordinator.
pub const DEFAULT_MAX_EPSILON: f64 = 10.0;
/// The δ of that cap.
pub const DEFAULT_DELTA: f64 = 1e-6;
/// A merchant's default cap on the rate at which a shopper-unit round has it sample.
pub const DEFAULT_MAX_SHOPPER_SAMPLING_RATE: f64 = 0.1;

impl Default for ParticipantOptions {
    fn default() -> Self {
        Self {
            display_name: "merchant".into(),
            min_noise_multiplier: 0.0,
            dangerous_send_unnoised_updates: false,
            poll: Duration::from_secs(20),
            max_backoff: Duration::from_secs(10),
            faults: Faults::default(),
            max_rounds: 0,
            max_epsilon: DEFAULT_MAX_EPSILON,
            max_shopper_sampling_rate: DEFAULT_MAX_SHOPPER_SAMPLING_RATE,
            delta: DEFAULT_DELTA,
            dangerous_report_unnoised_metrics: false,
        }
    }
}

/// Every cohort member's signing key must be the one its certificate binds, and every
/// certificate must be one the federation's CA issued for client authentication, valid now,
/// each listed once: a coordinator can neither put a key of its own in a real merchant's
/// place (to impersonate it towards this client) nor list a member the CA never certified.
fn check_cohort(task: &RoundTask, federation_ca: &[u8]) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for (index, key) in &task.cohort {
        let Some(certificate) = task.certificates.get(index) else {
            return Err(format!("cohort member {index} comes without a certificate"));
        };
        let bound = guild_proto::certificate::verify_member(federation_ca, certificate)
            .map_err(|e| format!("cohort member {index}'s certificate is refused: {e}"))?;
        if bound != *key {
            return Err(format!(
                "cohort member {index}'s signing key is not the one its certificate binds \
                 (a coordinator substituting a key?)"
            ));
        }
        if !seen.insert(certificate.as_slice()) {
            return Err(format!("cohort member {index}'s certificate is listed twice"));
        }
    }
    Ok(())
}

/// How a round this client took part in ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundOutcome {
    /// The coordinator committed a new adapter from the round.
    Committed,
    /// The round aborted after this client's last message (too few survivors, say).
    Aborted,
}

impl std::fmt::Display for RoundOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Committed => "committed",
            Self::Aborted => "aborted",
        })
    }
}

/// What happened in one round, for progress lines and reports.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RoundReport {
    pub round_id: u64,
    pub adapter_version: u64,
    pub outcome: RoundOutcome,
    pub train_seconds: f64,
    pub secagg_seconds: f64,
    pub bytes_sent: u64,
    pub norm_before_clipping: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    #[error("network: {0}")]
    Net(#[from] NetError),
    #[error("refusing the task: {0}")]
    Refused(String),
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] guild_privacy::secagg::SecAggError),
    #[error("privatising the update: {0}")]
    Dp(#[from] guild_privacy::dp::DpError),
    #[error("local training: {0}")]
    Training(String),
    #[error("injected fault: dropped out before phase {0}")]
    Dropped(Phase),
    #[error("{0}")]
    Ledger(String),
}

/// A merchant's checks of a task, before it trains or sends anything: the federation and
/// the model; the SecAgg+ threshold against the active-security bound; `min_survivors` ≤
/// threshold (else a round could complete with less noise than σ²); in distributed mode
/// the noise multiplier and the round's own privacy cost (recomputed from the task, without
/// amplification) against this merchant's ledger and cap; un-noised modes only when opted in.
/// `Err` says why the task is refused.
pub fn vet_task(
    task: &RoundTask,
    manifest: &guild_proto::domain::AdapterManifest,
    federation_id: [u8; 16],
    federation_ca: &[u8],
    options: &ParticipantOptions,
    ledger: &ClientLedger,
) -> Result<(), String> {
    let refuse = |m: String| Err(m);
    if task.binding.federation_id != federation_id {
        return refuse("the task is for another federation".into());
    }
    if task.binding.task_sha256 != guild_proto::convert::task_digest(task) {
        return refuse(
            "the task's digest does not match its parameters (a coordinator showing clients different tasks?)".into(),
        );
    }
    check_cohort(task, federation_ca)?;
    if task.manifest != *manifest {
        return refuse("the task's adapter manifest differs from this client's model".into());
    }
    if let Some(why) = task.training.kind.unsupported_by(manifest) {
        return refuse(format!("a {}, but {why}", task.training.kind));
    }
    let s = &task.secagg;
    let holders = s.neighbours.min(s.cohort_size.saturating_sub(1));
    if s.threshold < min_active_threshold(holders) {
        return refuse(format!(
            "threshold {} is below the active-security bound {} for {holders} share holders \
             (a coordinator showing different survivor lists could unmask this merchant)",
            s.threshold,
            min_active_threshold(holders)
        ));
    }
    // Each client adds σ²/min_survivors; at least `threshold` must survive to unmask, so
    // the sum carries σ² only if min_survivors ≤ threshold.
    if task.privacy.min_survivors > s.threshold {
        return refuse(format!(
            "min_survivors {} is above the threshold {}: a round could complete with less noise than σ²",
            task.privacy.min_survivors, s.threshold
        ));
    }
    match task.privacy.mode {
        PrivacyMode::Distributed => {
            if task.privacy.noise_multiplier < options.min_noise_multiplier {
                return refuse(format!(
                    "noise multiplier {} is below this merchant's minimum {}",
                    task.privacy.noise_multiplier, options.min_noise_multiplier
                ));
            }
            let unit = task.privacy.unit;
            // A popularity release or a pooling selection may sample every shopper: what it
            // sends of each is a bounded statistic (the shopper's item set, or its NDCG@10
            // under each public setting), no gradient, and its whole cost, unamplified at
            // q = 1, goes through the ε cap below like any round's.
            if unit == PrivacyUnit::Shopper
                && task.training.kind.trains()
                && task.privacy.shopper_sampling_rate > options.max_shopper_sampling_rate
            {
                return refuse(format!(
                    "shopper sampling rate {} is above this merchant's maximum {}",
                    task.privacy.shopper_sampling_rate, options.max_shopper_sampling_rate
                ));
            }
            let participation = shown_participation(task).map_err(|e| e.to_string())?;
            let after = ledger.epsilon_if(&participation, options.delta);
            if after > options.max_epsilon {
                let whose = match unit {
                    PrivacyUnit::Merchant => {
                        "this merchant's ε against the coordinator (without amplification)"
                    }
                    PrivacyUnit::Shopper => "its shoppers' ε (amplified by its own sampling)",
                };
                return refuse(format!(
                    "this round (ρ = {:.4}) would take {whose} from {:.3} to {after:.3}, past its cap of {} at δ = {:e}",
                    participation.rho,
                    ledger.epsilon(unit, options.delta),
                    options.max_epsilon,
                    options.delta
                ));
            }
        }
        PrivacyMode::Central | PrivacyMode::DangerousNone => {
            if !options.dangerous_send_unnoised_updates {
                return refuse(format!(
                    "mode {:?} has clients send un-noised updates; set dangerous_send_unnoised_updates to take part",
                    task.privacy.mode
                ));
            }
        }
        PrivacyMode::Local => return refuse("local mode is not offered over the network".into()),
    }
    Ok(())
}

/// The zCDP ρ of a distributed round as the task shows it, before amplification: the same
/// function the coordinator's ledger charges (`guild_privacy::cost::round_rho`), on the
/// encoding rebuilt from the task's own parameters.
pub fn shown_round_rho(task: &RoundTask) -> Result<f64, guild_privacy::cost::CostError> {
    let p = &task.privacy;
    let ddg = DdgParams::from_round(
        task.manifest.parameter_count(),
        p.clip_norm,
        p.gamma,
        p.bit_width,
        p.noise_multiplier * p.clip_norm,
        p.min_survivors,
    )?;
    round_rho(&ddg, p.min_survivors, p.unit)
}

/// What this merchant's own ledger records for a distributed round as the task shows it:
/// ρ ([`shown_round_rho`]), with no amplification in the merchant unit and with the
/// merchant's own sampling rate in the shopper unit.
pub fn shown_participation(task: &RoundTask) -> Result<Participation, guild_privacy::cost::CostError> {
    let rho = shown_round_rho(task)?;
    let federation = hex::encode(task.binding.federation_id);
    let round = task.binding.round_id;
    Ok(match task.privacy.unit {
        PrivacyUnit::Merchant => Participation::merchant(federation, round, rho),
        PrivacyUnit::Shopper => {
            Participation::shopper(federation, round, rho, task.privacy.shopper_sampling_rate)
        }
    })
}

/// Trains and privatises this merchant's contribution to a round, on the training thread.
/// Merchant unit: one update, clipped and encoded whole. Shopper unit: shoppers
/// Poisson-sampled here at the task's rate with the OS's randomness (the coordinator never
/// learns who), each one's update clipped to c on its own and summed, the sum scaled,
/// rotated and rounded once (one shopper moves the rounded sum by at most c/γ + √d); a
/// shopper whose update is not finite is left out (as if not sampled, which moves the sum
/// by no more than one shopper may). Then this client's noise share, once, and the
/// reduction mod 2^b.
fn privatised_update(
    learner: &mut dyn Learner,
    task: &RoundTask,
    global: &[f32],
    ddg: &DdgParams,
) -> Result<DdgEncoding, ParticipantError> {
    let p = &task.privacy;
    let rotation = RandomRotation::new(ddg.padded_dimension(), p.rotation_seed);
    let mut os_rng = ChaCha20Rng::from_entropy();
    let training = |e: anyhow::Error| ParticipantError::Training(format!("{e:#}"));
    match p.unit {
        PrivacyUnit::Merchant => {
            let mut encoded = None;
            let mut each = |update: &mut [f32]| -> anyhow::Result<()> {
                anyhow::ensure!(
                    encoded.is_none(),
                    "the learner handed over more than the merchant's one update"
                );
                encoded = Some(ddg.encode(update, &rotation, &mut os_rng)?);
                Ok(())
            };
            contribute(learner, RoundInput { task, global, units: Units::Merchant }, &mut each)
                .map_err(training)?;
            encoded.ok_or_else(|| ParticipantError::Training("the learner handed over no update".into()))
        }
        PrivacyUnit::Shopper => {
            let sampled = poisson_sample(learner.shopper_count(), p.shopper_sampling_rate, &mut os_rng)?;
            let mut sum = ddg.summands(&rotation);
            let mut left_out = 0usize;
            let mut each = |update: &mut [f32]| -> anyhow::Result<()> {
                match sum.add(update) {
                    Ok(()) => {}
                    Err(guild_privacy::dp::DpError::NonFinite { .. }) => left_out += 1,
                    Err(e) => return Err(e.into()),
                }
                Ok(())
            };
            contribute(learner, RoundInput { task, global, units: Units::Shoppers(&sampled) }, &mut each)
                .map_err(training)?;
            if left_out > 0 {
                tracing::warn!(
                    left_out,
                    sampled = sampled.len(),
                    "shoppers with a non-finite update were left out"
                );
            }
            tracing::debug!(sampled = sampled.len(), encoded = sum.count(), "shopper updates encoded");
            Ok(sum.finish(&mut os_rng)?)
        }
    }
}

/// One stretch of time during which the coordinator could not be reached: logged once when
/// it starts and once when it ends (a restart of the coordinator would otherwise log a line
/// per client per retry), each retry in between only at debug level.
#[derive(Debug, Default)]
struct Outage {
    since: Option<(Instant, u32)>,
}

impl Outage {
    fn failed(&mut self, error: &NetError, what: &str) {
        match &mut self.since {
            None => {
                tracing::info!(%error, what, "coordinator unavailable; retrying with backoff");
                self.since = Some((Instant::now(), 1));
            }
            Some((_, attempts)) => {
                *attempts += 1;
                tracing::debug!(%error, what, attempts = *attempts, "coordinator still unavailable");
            }
        }
    }

    fn recovered(&mut self) {
        if let Some((since, attempts)) = self.since.take() {
            tracing::info!(attempts, seconds = since.elapsed().as_secs_f64(), "coordinator reachable again");
        }
    }
}

/// A merchant client: its connection, identity, learner and the adapter it last fetched.
pub struct Participant {
    connection: Connection,
    identity: Arc<Identity>,
    learner: Option<Box<dyn Learner>>,
    options: ParticipantOptions,
    merchant_id: Option<MerchantId>,
    federation_id: [u8; 16],
    adapter: Option<(u64, [u8; 32], Vec<f32>)>,
    rng: ChaCha20Rng,
    ledger: ClientLedger,
}

impl std::fmt::Debug for Participant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participant").field("merchant_id", &self.merchant_id).finish_non_exhaustive()
    }
}

impl Participant {
    /// A participant whose privacy ledger is `ledger` (see [`ClientLedger`]).
    pub fn new(
        connection: Connection,
        identity: Arc<Identity>,
        learner: Box<dyn Learner>,
        options: ParticipantOptions,
        ledger: ClientLedger,
    ) -> Self {
        Self {
            ledger,
            connection,
            identity,
            learner: Some(learner),
            options,
            merchant_id: None,
            federation_id: [0; 16],
            adapter: None,
            rng: ChaCha20Rng::from_entropy(),
        }
    }

    pub fn merchant_id(&self) -> Option<&MerchantId> {
        self.merchant_id.as_ref()
    }

    /// This merchant's own privacy ledger (its participations, unamplified).
    pub fn ledger(&self) -> &ClientLedger {
        &self.ledger
    }

    /// Registers, retrying with exponential backoff while the coordinator is unreachable.
    pub async fn register(&mut self) -> Result<MerchantId, ParticipantError> {
        let mut backoff = Duration::from_millis(100);
        let mut outage = Outage::default();
        loop {
            match self.connection.register(&self.options.display_name, &self.identity).await {
                Ok(registered) => {
                    outage.recovered();
                    self.federation_id = registered.federation_id;
                    self.merchant_id = Some(registered.merchant_id.clone());
                    return Ok(registered.merchant_id);
                }
                Err(e) if e.is_transient() => {
                    outage.failed(&e, "registration");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.options.max_backoff);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Polls for tasks and takes part in rounds until `max_rounds` rounds were attempted,
    /// calling `on_round` after each. Survives coordinator restarts (backoff and retry).
    pub async fn run(
        &mut self,
        mut on_round: impl FnMut(&Result<RoundReport, ParticipantError>),
    ) -> Result<(), ParticipantError> {
        let merchant = match &self.merchant_id {
            Some(m) => m.clone(),
            None => self.register().await?,
        };
        let mut backoff = Duration::from_millis(100);
        let mut outage = Outage::default();
        let mut attempted = 0u64;
        loop {
            if self.options.max_rounds > 0 && attempted >= self.options.max_rounds {
                return Ok(());
            }
            let task = match self.connection.get_task(&merchant, self.options.poll).await {
                Ok(Task::Round(task)) => {
                    outage.recovered();
                    backoff = Duration::from_millis(100);
                    task
                }
                Ok(Task::Wait { retry_after, .. }) => {
                    outage.recovered();
                    backoff = Duration::from_millis(100);
                    tokio::time::sleep(retry_after.min(Duration::from_secs(5))).await;
                    continue;
                }
                Err(NetError::Refused(status)) if status.code() == tonic::Code::NotFound => {
                    // The coordinator lost or never had our registration: register again.
                    self.register().await?;
                    continue;
                }
                Err(e) if e.is_transient() => {
                    outage.failed(&e, "task poll");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.options.max_backoff);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            attempted += 1;
            let result = self.take_part(*task).await;
            if let Err(e) = &result {
                tracing::info!(error = %e, "round not completed");
            }
            on_round(&result);
            if let Ok(report) = &result
                && report.outcome == RoundOutcome::Committed
                && let Err(e) = self.evaluate_latest().await
            {
                tracing::warn!(error = %e, "evaluation of the new adapter failed");
            }
        }
    }

    /// Checks a task against this merchant's guards before doing anything with it.
    fn check(&self, task: &RoundTask) -> Result<(), ParticipantError> {
        let Some(learner) = &self.learner else {
            return Err(ParticipantError::Refused("the learner is busy".into()));
        };
        vet_task(
            task,
            &learner.manifest(),
            self.federation_id,
            self.connection.federation_ca(),
            &self.options,
            &self.ledger,
        )
        .map_err(ParticipantError::Refused)
    }

    async fn global_adapter(
        &mut self,
        version: u64,
        sha256: [u8; 32],
        d: usize,
    ) -> Result<Vec<f32>, ParticipantError> {
        if let Some((v, sha, values)) = &self.adapter
            && *v == version
            && *sha == sha256
        {
            return Ok(values.clone());
        }
        let (bytes, sha) = self.connection.download_adapter(version).await?;
        if sha != sha256 {
            return Err(ParticipantError::Refused(format!(
                "adapter version {version} has a different hash than the task binds (a server showing clients different models?)"
            )));
        }
        let values = guild_proto::adapter::from_bytes(&bytes, d)
            .map_err(|e| ParticipantError::Refused(format!("adapter version {version}: {e}")))?;
        self.adapter = Some((version, sha, values.clone()));
        Ok(values)
    }

    /// Injects the simulation's fault, if any, before `phase`'s message.
    async fn fault(&mut self, phase: Phase) -> Result<(), ParticipantError> {
        match self.options.faults.roll(phase, &mut self.rng) {
            Injected::None => Ok(()),
            Injected::Drop => Err(ParticipantError::Dropped(phase)),
            Injected::Straggle(delay) => {
                tokio::time::sleep(delay).await;
                Ok(())
            }
        }
    }

    /// One round: check, fetch, train, privatise, SecAgg+.
    pub async fn take_part(&mut self, task: RoundTask) -> Result<RoundReport, ParticipantError> {
        self.check(&task)?;
        let d = task.manifest.parameter_count();
        let global = self.global_adapter(task.adapter_version, task.binding.adapter_sha256, d).await?;

        // The encoding: clip, rotate, scale, round, add this client's share of the noise.
        let p = &task.privacy;
        let noise = if p.mode == PrivacyMode::Distributed { p.noise_multiplier * p.clip_norm } else { 0.0 };
        let ddg = DdgParams::from_round(d, p.clip_norm, p.gamma, p.bit_width, noise, p.min_survivors)?;
        if ddg.padded_dimension() != task.secagg.vector_length as usize {
            return Err(ParticipantError::Refused("vector length does not match the encoding".into()));
        }
        let started = Instant::now();
        let learner = self.learner.take().ok_or_else(|| ParticipantError::Refused("learner busy".into()))?;
        let task_for_training = task.clone();
        let encoding = ddg.clone();
        let (learner, encoded) = tokio::task::spawn_blocking(move || {
            let mut learner = learner;
            let result = privatised_update(learner.as_mut(), &task_for_training, &global, &encoding);
            (learner, result)
        })
        .await
        .map_err(|e| ParticipantError::Training(format!("the training thread failed: {e}")))?;
        self.learner = Some(learner);
        let mut encoded = encoded?;
        if self.options.faults.poison_update {
            let mask = if p.bit_width == 32 { u32::MAX } else { (1u32 << p.bit_width) - 1 };
            encoded.values.iter_mut().for_each(|v| *v = rand::RngCore::next_u32(&mut self.rng) & mask);
        }
        let train_seconds = started.elapsed().as_secs_f64();
        let mut os_rng = ChaCha20Rng::from_entropy();

        let secagg_started = Instant::now();
        let s = &task.secagg;
        let config = RoundConfig {
            binding: task.binding,
            cohort_size: s.cohort_size,
            threshold: s.threshold,
            neighbours: s.neighbours,
            vector_length: s.vector_length as usize,
            bit_width: p.bit_width,
        };
        // Each long-poll may wait until its phase's deadline, plus the time the phases
        // before it may still take: bound by the sum of all deadlines.
        let timeout = s.phase_deadlines.iter().sum::<Duration>() + Duration::from_secs(10);
        let identity = self.identity.clone();
        let signing = identity.key_pair();
        let mut bytes_sent = 0u64;

        self.fault(Phase::AdvertiseKeys).await?;
        let (state, keys) = secagg::start(config, s.my_index, signing, &mut os_rng)?;
        let roster = self.connection.advertise_keys(keys, timeout).await?;
        bytes_sent += 200;
        let (state, mut shares) = state.on_roster(roster, &task.cohort, signing, &mut os_rng)?;
        for share in shares.shares.iter_mut().take(self.options.faults.garbage_shares) {
            share.ciphertext.iter_mut().for_each(|b| *b ^= 0x5a);
            let payload = guild_privacy::secagg::signed::sealed_shares(&task.binding, share);
            share.signature = guild_privacy::secagg::crypto::sign(signing, &payload);
        }
        self.fault(Phase::ShareKeys).await?;
        // Each sealed share: indices, ciphertext, two commitments and a signature.
        bytes_sent += shares.shares.iter().map(|x| x.ciphertext.len() as u64 + 16 + 128).sum::<u64>();
        let inbox = self.connection.share_keys(shares, timeout).await?;
        let (state, masked) = state.on_inbox(inbox, &encoded.values)?;
        for complaint in &masked.complaints {
            tracing::warn!(
                round = task.binding.round_id,
                accused = complaint.accused.get(),
                "a neighbour's signed shares do not open: treating it as dropped and telling the coordinator"
            );
        }
        self.fault(Phase::MaskedInput).await?;
        if p.mode == PrivacyMode::Distributed {
            // Charged durably before the noised update can leave; never refunded. The same
            // function that vetted the task computes what is recorded (it rebuilds the
            // encoding's parameters from the task: cheap, and equal to the vetted ρ by
            // construction).
            let participation =
                shown_participation(&task).map_err(|e| ParticipantError::Refused(e.to_string()))?;
            self.ledger.record(participation).map_err(|e| ParticipantError::Ledger(e.to_string()))?;
        }
        bytes_sent += 4 * masked.masked.len() as u64;
        let survivors = self.connection.masked_input(masked, timeout).await?;
        let (state, check) = state.on_survivors(survivors, signing)?;
        self.fault(Phase::ConsistencyCheck).await?;
        bytes_sent += 100;
        let signatures = self.connection.consistency_check(check, timeout).await?;
        let mut unmask = state.on_signatures(signatures, &task.cohort)?;
        if self.options.faults.false_unmask_share
            && let Some(share) = unmask.self_mask_shares.first_mut().or(unmask.mask_key_shares.first_mut())
        {
            share.y[0] ^= 1;
        }
        self.fault(Phase::Unmask).await?;
        bytes_sent += unmask
            .self_mask_shares
            .iter()
            .chain(&unmask.mask_key_shares)
            .map(|x| 8 * x.y.len() as u64 + 8 + 32)
            .sum::<u64>();
        let accepted = self.connection.unmask(unmask, timeout).await?;
        Ok(RoundReport {
            round_id: task.binding.round_id,
            adapter_version: task.adapter_version,
            outcome: if accepted { RoundOutcome::Committed } else { RoundOutcome::Aborted },
            train_seconds,
            secagg_seconds: secagg_started.elapsed().as_secs_f64(),
            bytes_sent,
            norm_before_clipping: encoded.norm_before_clipping as f64,
        })
    }

    /// Fetches the latest adapter, evaluates it on this merchant's validation data, and
    /// reports the counts.
    pub async fn evaluate_latest(&mut self) -> Result<Option<RankingCounts>, ParticipantError> {
        let Some(merchant) = self.merchant_id.clone() else { return Ok(None) };
        let status = self.connection.status().await?;
        let Some(learner) = &self.learner else { return Ok(None) };
        let d = learner.manifest().parameter_count();
        let (bytes, sha) = self.connection.download_adapter(status.latest_adapter_version).await?;
        let values = guild_proto::adapter::from_bytes(&bytes, d)
            .map_err(|e| ParticipantError::Refused(format!("adapter: {e}")))?;
        self.adapter = Some((status.latest_adapter_version, sha, values.clone()));
        let mut learner =
            self.learner.take().ok_or_else(|| ParticipantError::Refused("learner busy".into()))?;
        let (learner, counts) = tokio::task::spawn_blocking(move || {
            let counts = learner.evaluate(&values);
            (learner, counts)
        })
        .await
        .map_err(|e| ParticipantError::Training(format!("the evaluation thread failed: {e}")))?;
        self.learner = Some(learner);
        let counts = counts.map_err(|e| ParticipantError::Training(format!("{e:#}")))?;
        if let Some(c) = counts
            && self.options.dangerous_report_unnoised_metrics
        {
            self.connection
                .report_metrics(MetricsReport {
                    merchant_id: merchant,
                    adapter_version: status.latest_adapter_version,
                    users: c.users,
                    hits_at_10: c.hits_at_10,
                    ndcg_at_10_sum: c.ndcg_at_10_sum,
                    reciprocal_rank_sum: c.reciprocal_rank_sum,
                })
                .await?;
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use guild_privacy::cost::RoundPrivacy;
    use guild_privacy::secagg::message::{ClientIndex, RoundBinding};
    use guild_proto::domain::{AdapterManifest, PrivacyParams, SecAggParams, TrainingParams};
    use guild_proto::round::RoundKind;
    use guild_proto::tower::TowerShape;

    use super::*;

    const FEDERATION: [u8; 16] = [7; 16];

    fn manifest() -> AdapterManifest {
        tower(0)
    }

    /// A small tower; with a popularity histogram over `catalogue` items if not 0.
    fn tower(catalogue: usize) -> AdapterManifest {
        AdapterManifest::sequence_tower([1; 32], TowerShape::tiny(catalogue), 0)
    }

    /// The task an honest coordinator would send for a distributed round of `n` clients at
    /// threshold `t` (its encoding chosen by the same function the ledger uses).
    fn task(n: u32, t: u32, noise_multiplier: f64) -> RoundTask {
        task_for(manifest(), n, t, noise_multiplier)
    }

    fn task_for(manifest: AdapterManifest, n: u32, t: u32, noise_multiplier: f64) -> RoundTask {
        let d = manifest.parameter_count();
        let cost = RoundPrivacy {
            mode: PrivacyMode::Distributed,
            unit: PrivacyUnit::Merchant,
            sampling_rate: 0.1,
            noise_multiplier,
            clip_norm: 1.0,
            dimension: d,
            min_survivors: t,
            max_summands: n,
            bit_width: 32,
            wrap_probability: 1e-9,
        }
        .cost()
        .expect("cost");
        let pki = pki();
        let cohort: BTreeMap<ClientIndex, [u8; 32]> = (1..=n)
            .map(|i| (ClientIndex::new(i).expect("1-based"), bound_key(&pki.merchants[i as usize - 1])))
            .collect();
        let certificates: BTreeMap<ClientIndex, Vec<u8>> = (1..=n)
            .map(|i| (ClientIndex::new(i).expect("1-based"), pki.merchants[i as usize - 1].cert_der.clone()))
            .collect();
        let mut task = RoundTask {
            binding: RoundBinding {
                federation_id: FEDERATION,
                round_id: 3,
                adapter_sha256: [2; 32],
                task_sha256: [0; 32],
            },
            adapter_version: 2,
            manifest,
            training: TrainingParams {
                local_steps: 1,
                batch_size: 8,
                learning_rate: 1e-3,
                data_seed: 1,
                negatives: 0,
                kind: RoundKind::Training,
            },
            privacy: PrivacyParams {
                mode: PrivacyMode::Distributed,
                clip_norm: 1.0,
                noise_multiplier,
                gamma: cost.ddg.gamma(),
                bit_width: 32,
                min_survivors: t,
                rotation_seed: 4,
                unit: PrivacyUnit::Merchant,
                shopper_sampling_rate: 0.0,
            },
            secagg: SecAggParams {
                my_index: ClientIndex::new(1).expect("1-based"),
                cohort_size: n,
                threshold: t,
                neighbours: n - 1,
                vector_length: cost.ddg.padded_dimension() as u32,
                phase_deadlines: vec![Duration::from_secs(5); Phase::COUNT],
            },
            cohort,
            certificates,
        };
        task.binding.task_sha256 = guild_proto::convert::task_digest(&task);
        task
    }

    /// A federation's certificates for 60 merchants, issued once for the whole module.
    fn pki() -> &'static guild_coordinator::pki::FederationPki {
        static PKI: std::sync::OnceLock<guild_coordinator::pki::FederationPki> = std::sync::OnceLock::new();
        PKI.get_or_init(|| guild_coordinator::pki::issue(60).expect("pki"))
    }

    fn bound_key(merchant: &guild_coordinator::pki::Issued) -> [u8; 32] {
        Identity::from_pkcs8(&merchant.signing_pkcs8).expect("identity").public_key()
    }

    fn vet(task: &RoundTask, options: &ParticipantOptions, ledger: &ClientLedger) -> Result<(), String> {
        vet_task(task, &manifest(), FEDERATION, &pki().ca.cert_der, options, ledger)
    }

    /// The attacks a coordinator could make on the cohort list, each refused: a key of its
    /// own in a real merchant's place, a member certified by another CA (of the same name:
    /// only the signature tells them apart), a server certificate, a certificate
    /// binding no key, a missing or duplicated certificate. Each task carries a matching
    /// digest, so only the certificate check stands in the way.
    #[test]
    fn a_cohort_member_whose_key_its_certificate_does_not_bind_is_refused() {
        let options = ParticipantOptions::default();
        let ledger = ClientLedger::in_memory();
        let other = guild_coordinator::pki::issue(1).expect("another federation's CA");
        let second = ClientIndex::new(2).expect("1-based");
        type Attack = (Box<dyn Fn(&mut RoundTask)>, &'static str);
        let attacks: Vec<Attack> = vec![
            (
                Box::new(move |t| {
                    t.cohort.insert(second, [0xee; 32]);
                }),
                "signing key is not the one its certificate binds",
            ),
            (
                Box::new(move |t| {
                    let sybil = &other.merchants[0];
                    t.cohort.insert(second, bound_key(sybil));
                    t.certificates.insert(second, sybil.cert_der.clone());
                }),
                "does not verify under the federation's CA key",
            ),
            (
                Box::new(move |t| {
                    t.certificates.insert(second, pki().server.cert_der.clone());
                }),
                "not a client-authentication certificate",
            ),
            (
                Box::new(move |t| {
                    t.certificates.remove(&second);
                }),
                "comes without a certificate",
            ),
            (
                Box::new(move |t| {
                    let first = t.certificates[&ClientIndex::new(1).expect("1-based")].clone();
                    t.certificates.insert(second, first.clone());
                    t.cohort.insert(second, t.cohort[&ClientIndex::new(1).expect("1-based")]);
                }),
                "listed twice",
            ),
            (
                Box::new(move |t| {
                    let mut forged = t.certificates[&second].clone();
                    let last = forged.len() - 1;
                    forged[last] ^= 1; // the signature's last byte
                    t.certificates.insert(second, forged);
                }),
                "certificate is refused",
            ),
        ];
        for (i, (attack, expected)) in attacks.iter().enumerate() {
            let mut shown = task(20, 14, 1.0);
            attack(&mut shown);
            shown.binding.task_sha256 = guild_proto::convert::task_digest(&shown);
            let error = vet(&shown, &options, &ledger).expect_err("refused");
            assert!(error.contains(expected), "attack {i}: {error}");
        }
        vet(&task(20, 14, 1.0), &options, &ledger).expect("the honest cohort passes");
    }

    #[test]
    fn an_honest_task_passes() {
        vet(&task(51, 35, 1.0), &ParticipantOptions::default(), &ClientLedger::in_memory()).expect("honest");
    }

    #[test]
    fn a_task_that_differs_from_its_digest_is_refused_and_the_digest_ignores_only_per_client_fields() {
        let honest = task(51, 35, 1.0);
        let mut other_client = honest.clone();
        other_client.secagg.my_index = ClientIndex::new(7).expect("1-based");
        other_client.training.data_seed = 99;
        assert_eq!(guild_proto::convert::task_digest(&other_client), honest.binding.task_sha256);
        let options = ParticipantOptions::default();
        let ledger = ClientLedger::in_memory();
        vet(&other_client, &options, &ledger).expect("same round, another client");
        // Each common parameter is covered: a coordinator that shows one client other values
        // without a matching digest is refused; with a matching digest, the bindings differ.
        type Change = Box<dyn Fn(&mut RoundTask)>;
        let changes: Vec<Change> = vec![
            Box::new(|t| t.secagg.neighbours -= 1),
            Box::new(|t| t.secagg.threshold += 1),
            Box::new(|t| t.privacy.noise_multiplier *= 0.5),
            Box::new(|t| t.privacy.min_survivors -= 1),
            Box::new(|t| t.privacy.rotation_seed ^= 1),
            Box::new(|t| (t.privacy.unit, t.privacy.shopper_sampling_rate) = (PrivacyUnit::Shopper, 0.05)),
            Box::new(|t| t.training.learning_rate *= 2.0),
            Box::new(|t| {
                t.cohort.insert(ClientIndex::new(2).expect("1-based"), [0xee; 32]);
            }),
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut shown = honest.clone();
            change(&mut shown);
            let error = vet(&shown, &options, &ledger).expect_err("changed");
            assert!(error.contains("digest"), "change {i}: {error}");
            assert_ne!(guild_proto::convert::task_digest(&shown), honest.binding.task_sha256, "change {i}");
        }
    }

    #[test]
    fn a_threshold_below_the_active_security_bound_is_refused() {
        // The split-survivor-list attack needs 2t ≤ k + colluders: with 51 clients (50 share
        // holders) and t = 20 it needs none. The bound is ⌊2·50/3⌋ + 1 = 34.
        let options = ParticipantOptions::default();
        let ledger = ClientLedger::in_memory();
        let error = vet(&task(51, 20, 1.0), &options, &ledger).expect_err("t = 20 of 50");
        assert!(error.contains("active-security bound 34"), "{error}");
        assert!(vet(&task(51, 33, 1.0), &options, &ledger).is_err());
        vet(&task(51, 34, 1.0), &options, &ledger).expect("t = 34 is at the bound");
    }

    #[test]
    fn a_task_that_cuts_every_clients_noise_share_is_refused() {
        // min_survivors = 10⁴ would have each client add σ²/10⁴: the noise multiplier alone
        // passes the guard, the survivors check does not.
        let mut cut = task(51, 35, 1.0);
        cut.privacy.min_survivors = 10_000;
        let error = vet(&cut, &ParticipantOptions::default(), &ClientLedger::in_memory()).expect_err("cut");
        assert!(error.contains("digest"), "a task changed after its digest is refused first: {error}");
        cut.binding.task_sha256 = guild_proto::convert::task_digest(&cut);
        let error = vet(&cut, &ParticipantOptions::default(), &ClientLedger::in_memory()).expect_err("cut");
        assert!(error.contains("min_survivors 10000 is above the threshold 35"), "{error}");
    }

    #[test]
    fn the_merchants_own_cap_refuses_a_round_that_costs_too_much_and_counts_its_ledger() {
        let options = ParticipantOptions { max_epsilon: 5.0, ..ParticipantOptions::default() };
        let honest = task(51, 35, 2.0);
        let rho = shown_round_rho(&honest).expect("rho");
        // Each round adds ρ ≈ 1/(2z²) · (t−1)/t: a few rounds fit under ε = 5 at δ = 1e-6.
        assert!(rho > 0.1 && rho < 0.13, "ρ = {rho}");
        let mut ledger = ClientLedger::in_memory();
        let mut taken = 0;
        while vet(&honest, &options, &ledger).is_ok() {
            ledger.record(Participation::merchant("f".into(), taken, rho)).expect("record");
            taken += 1;
            assert!(taken < 100, "the cap never bites");
        }
        let next = Participation::merchant("f".into(), taken, rho);
        assert!(ledger.epsilon(PrivacyUnit::Merchant, options.delta) <= 5.0);
        assert!(ledger.epsilon_if(&next, options.delta) > 5.0);
        // A coordinator that shows a low noise multiplier (still above the merchant's minimum)
        // is refused on cost at once.
        let cheap = task(51, 35, 0.5);
        let error = vet(&cheap, &options, &ClientLedger::in_memory()).expect_err("one round too costly");
        assert!(error.contains("past its cap of 5"), "{error}");
    }

    /// The same task in the shopper unit at the merchant's sampling rate `q`.
    fn shopper_task(n: u32, t: u32, noise_multiplier: f64, q: f64) -> RoundTask {
        let mut task = task(n, t, noise_multiplier);
        (task.privacy.unit, task.privacy.shopper_sampling_rate) = (PrivacyUnit::Shopper, q);
        task.binding.task_sha256 = guild_proto::convert::task_digest(&task);
        task
    }

    #[test]
    fn shopper_rounds_are_vetted_on_the_merchants_own_rate_and_its_shoppers_amplified_epsilon() {
        let options = ParticipantOptions { max_epsilon: 3.0, ..ParticipantOptions::default() };
        let ledger = ClientLedger::in_memory();
        vet(&shopper_task(51, 35, 1.0, 0.02), &options, &ledger).expect("honest shopper round");
        let error = vet(&shopper_task(51, 35, 1.0, 0.5), &options, &ledger).expect_err("rate above the cap");
        assert!(error.contains("shopper sampling rate 0.5 is above this merchant's maximum 0.1"), "{error}");
        // The shopper unit counts every survivor's share (t, not t − 1) and the merchant's
        // own sampling amplifies it: ρ-zCDP rounds at q = 0.02 cost far less than unamplified.
        let task = shopper_task(51, 35, 1.0, 0.02);
        let participation = shown_participation(&task).expect("participation");
        assert_eq!((participation.unit, participation.sampling_rate), (PrivacyUnit::Shopper, 0.02));
        assert!(participation.rho < shown_round_rho(&self::task(51, 35, 1.0)).expect("rho"));
        let mut ledger = ClientLedger::in_memory();
        let mut taken = 0u64;
        while vet(&task, &options, &ledger).is_ok() {
            ledger.record(Participation { round_id: taken, ..participation.clone() }).expect("record");
            taken += 1;
            assert!(taken < 10_000, "the cap never bites");
        }
        assert!(taken > 20, "amplified rounds are cheap: only {taken} fit");
        let error = vet(&task, &options, &ledger).expect_err("over the cap");
        assert!(error.contains("its shoppers' ε"), "{error}");
        assert!(ledger.epsilon(PrivacyUnit::Shopper, options.delta) <= 3.0);
        assert_eq!(ledger.epsilon(PrivacyUnit::Merchant, options.delta), 0.0);
        // A merchant-unit round is judged on its own ledger column, still open.
        vet(&self::task(51, 35, 2.0), &ParticipantOptions { max_epsilon: 5.0, ..options }, &ledger)
            .expect("merchant round under its own cap");
    }

    #[test]
    fn a_popularity_release_or_selection_may_sample_every_shopper_but_pays_its_unamplified_cost() {
        let options = ParticipantOptions { max_epsilon: 3.0, ..ParticipantOptions::default() };
        let ledger = ClientLedger::in_memory();
        let release = |z: f64| {
            let mut task = task_for(tower(5), 51, 35, z);
            (task.privacy.unit, task.privacy.shopper_sampling_rate) = (PrivacyUnit::Shopper, 1.0);
            task.training.kind = RoundKind::PopularityRelease;
            task.binding.task_sha256 = guild_proto::convert::task_digest(&task);
            task
        };
        let vet_release =
            |task: &RoundTask| vet_task(task, &tower(5), FEDERATION, &pki().ca.cert_der, &options, &ledger);
        // q = 1 is above the training rounds' cap of 0.1, and allowed for a release…
        vet_release(&release(2.0)).expect("a release at q = 1 within the ε cap");
        // …whose ε, at q = 1 (no amplification), is what the cap judges.
        let error = vet_release(&release(0.6)).expect_err("over the cap");
        assert!(error.contains("its shoppers' ε"), "{error}");
        // A training round at q = 1 is still refused, and a release needs a histogram.
        let mut training = release(2.0);
        training.training.kind = RoundKind::Training;
        training.binding.task_sha256 = guild_proto::convert::task_digest(&training);
        let error = vet_release(&training).expect_err("rate above the cap");
        assert!(error.contains("above this merchant's maximum"), "{error}");
        let mut lora = shopper_task(51, 35, 2.0, 1.0);
        lora.training.kind = RoundKind::PopularityRelease;
        lora.binding.task_sha256 = guild_proto::convert::task_digest(&lora);
        let error = vet(&lora, &options, &ledger).expect_err("no histogram");
        assert!(error.contains("has no popularity histogram"), "{error}");
        // So may a pooling selection, which needs a tower with a prior too.
        let mut selection = release(2.0);
        selection.training.kind = RoundKind::PoolingSelection;
        selection.binding.task_sha256 = guild_proto::convert::task_digest(&selection);
        vet_release(&selection).expect("a selection at q = 1 within the ε cap");
        lora.training.kind = RoundKind::PoolingSelection;
        lora.binding.task_sha256 = guild_proto::convert::task_digest(&lora);
        let error = vet(&lora, &options, &ledger).expect_err("no tower");
        assert!(error.contains("not a tower with a popularity prior"), "{error}");
    }

    /// Shopper unit on the training thread: the merchant samples its own shoppers, each
    /// update is encoded on its own; with no noise, the decoded sum is the sum of each
    /// shopper's update clipped to c (not the sum clipped once).
    #[test]
    fn a_shopper_round_sums_each_sampled_shoppers_clipped_update() {
        let mut task = shopper_task(51, 35, 1.0, 1.0);
        task.privacy.mode = PrivacyMode::DangerousNone;
        let d = task.manifest.parameter_count();
        let p = &task.privacy;
        let ddg =
            DdgParams::from_round(d, p.clip_norm, p.gamma, p.bit_width, 0.0, p.min_survivors).expect("ddg");
        // Ten shoppers, each update of norm 5 along a random direction, clipped to 1.
        let mut learner = crate::learner::RandomLearner {
            manifest: manifest(),
            norm: 5.0,
            rng: ChaCha20Rng::seed_from_u64(3),
            shoppers: 10,
        };
        let encoded = privatised_update(&mut learner, &task, &vec![0.0; d], &ddg).expect("encoded");
        let rotation = RandomRotation::new(ddg.padded_dimension(), p.rotation_seed);
        let sum = ddg.decode(&encoded.values, &rotation).expect("decode");
        let mut replay = crate::learner::RandomLearner {
            manifest: manifest(),
            norm: 1.0,
            rng: ChaCha20Rng::seed_from_u64(3),
            shoppers: 10,
        };
        let mut expected = vec![0.0f64; d];
        let mut add = |x: &mut [f32]| -> anyhow::Result<()> {
            expected.iter_mut().zip(x.iter()).for_each(|(e, v)| *e += f64::from(*v));
            Ok(())
        };
        replay
            .train(
                RoundInput { task: &task, global: &vec![0.0; d], units: Units::Shoppers(&[0; 10]) },
                &mut add,
            )
            .expect("updates");
        let error: f64 = sum.iter().zip(&expected).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = expected.iter().map(|x| x * x).sum::<f64>().sqrt();
        // Rounding adds about γ/2·√(10·d) of error: far below the norm of the sum (≈ √10).
        assert!(error < 0.01 * norm, "decoded sum off by {error} (norm {norm})");
        assert!(norm > 2.5, "ten clipped unit updates, not one clipped sum: {norm}");
    }
}
