//! The merchant's side of a round, over the network: poll for a task, check it, train,
//! privatise (clip, DDGauss-encode with this client's share of the noise), and take part
//! in SecAgg+. The update leaves this process only as a SecAgg+ masked input: there is no
//! other code path that sends it.
//!
//! Training is behind [`Learner`], so the same loop runs the real model
//! ([`crate::learner::ModelLearner`]) or, for load tests, [`crate::learner::RandomLearner`].

#[cfg(test)]
mod fixtures;
mod privatise;
mod vet;

use std::sync::Arc;
use std::time::{Duration, Instant};

use guild_privacy::PrivacyMode;
use guild_privacy::dp::DdgParams;
use guild_privacy::secagg::{Phase, RoundConfig, client as secagg};
use guild_proto::domain::{MerchantId, MetricsReport, RoundTask, Task};
use guild_proto::round::RoundKind;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

pub use crate::faults::Faults;
use crate::faults::Injected;
use crate::identity::Identity;
pub use crate::learner::Learner;
pub use crate::ledger::{ClientLedger, Participation};
use crate::net::{Connection, NetError};
use crate::retrieval::RankingCounts;
use privatise::privatised_update;
pub use vet::{
    DEFAULT_DELTA, DEFAULT_MAX_EPSILON, DEFAULT_MAX_SHOPPER_SAMPLING_RATE, DEFAULT_MIN_SHARE_HOLDERS,
    ParticipantOptions, shown_participation, shown_round_rho, vet_task,
};

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
    /// This merchant's own validation metrics of the version a committed round made (kept
    /// local unless `dangerous_report_unnoised_metrics`); `None` when it was not evaluated.
    pub evaluation: Option<VersionEvaluation>,
}

/// A committed version scored on this merchant's validation shoppers.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VersionEvaluation {
    pub version: u64,
    pub counts: RankingCounts,
    /// The version evaluated before it and its NDCG@10, when this one fell below it by more
    /// than noise ([`fell_beyond_noise`]).
    pub worse_than: Option<(u64, f64)>,
}

/// Keeps committed version `version` (the flat vector `values` of `manifest`) as the folder
/// `dir/v{version}`, written as `guild-coordinator export-adapter` writes one (what `serve`
/// reads), whole or not at all: built in a temporary folder beside it, then renamed. A
/// version already kept is left as it is.
pub fn keep_version(
    dir: &std::path::Path,
    version: u64,
    manifest: &guild_proto::domain::AdapterManifest,
    values: &[f32],
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;
    let kept = dir.join(format!("v{version}"));
    if kept.exists() {
        return Ok(kept);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let building = tempfile::Builder::new()
        .prefix(&format!(".v{version}-"))
        .tempdir_in(dir)
        .with_context(|| format!("a temporary folder in {}", dir.display()))?;
    guild_proto::adapter::export(building.path(), manifest, values)?;
    let building = building.keep();
    if let Err(e) = std::fs::rename(&building, &kept) {
        let _ = std::fs::remove_dir_all(&building);
        if !kept.exists() {
            return Err(e).with_context(|| format!("renaming into {}", kept.display()));
        }
    }
    Ok(kept)
}

/// Removes the versions kept in `dir` (folders `v{N}`) but the newest `last`.
pub fn prune_versions(dir: &std::path::Path, last: usize) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut kept = crate::serve::kept_versions(dir).with_context(|| format!("listing {}", dir.display()))?;
    kept.sort_unstable_by_key(|(version, _)| std::cmp::Reverse(*version));
    for (_, path) in kept.into_iter().skip(last) {
        std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// Whether NDCG@10 fell from `before` to `after` by more than two standard errors of the
/// difference. One shopper's NDCG@10 lies in [0, 1], so its variance is at most its mean m,
/// and the difference of the two means has variance at most m₁/n₁ + m₂/n₂ (the bound for
/// independent samples: the same shoppers scored twice only make the difference less noisy,
/// so the test errs towards silence). Two versions that rank equally well are flagged at
/// most about 2.3% of the time (one-sided, normal approximation of the mean).
pub fn fell_beyond_noise(before: &RankingCounts, after: &RankingCounts) -> bool {
    if before.users == 0 || after.users == 0 {
        return false;
    }
    let (m1, m2) = (before.ndcg_at_10(), after.ndcg_at_10());
    let standard_error = (m1 / before.users as f64 + m2 / after.users as f64).sqrt();
    m1 - m2 > 2.0 * standard_error
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

/// A merchant client: its connection, identity and learner. It keeps no copy of the global
/// adapter between rounds (a whole adapter per merchant adds up where many run in one
/// process, as in the simulator): each round and evaluation fetches the version it names.
pub struct Participant {
    connection: Connection,
    identity: Arc<Identity>,
    learner: Option<Box<dyn Learner>>,
    options: ParticipantOptions,
    merchant_id: Option<MerchantId>,
    federation_id: [u8; 16],
    rng: ChaCha20Rng,
    ledger: ClientLedger,
    /// The last version this merchant evaluated, and its counts.
    last_evaluation: Option<(u64, RankingCounts)>,
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
            rng: ChaCha20Rng::from_entropy(),
            last_evaluation: None,
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

    /// Polls for tasks and takes part in rounds until it has taken part in `max_rounds`
    /// committed rounds, calling `on_round` after each round it takes part in (committed or
    /// not). Survives coordinator restarts (backoff and retry).
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
        let mut committed = 0u64;
        // The last task this merchant refused (its round and digest): polled again, the same
        // task is not refused again (a refusal storm would trip the coordinator's rate limit)
        // but waited out until the coordinator offers another.
        let mut refused: Option<(u64, [u8; 32])> = None;
        loop {
            if self.options.max_rounds > 0 && committed >= self.options.max_rounds {
                return Ok(());
            }
            let task = match self.connection.get_task(&merchant, self.options.poll).await {
                Ok(Task::Round(task)) => {
                    outage.recovered();
                    backoff = Duration::from_millis(100);
                    if refused == Some((task.binding.round_id, task.binding.task_sha256)) {
                        tracing::debug!(
                            round = task.binding.round_id,
                            "the task refused before; waiting for another"
                        );
                        tokio::time::sleep(self.options.poll).await;
                        continue;
                    }
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
            let key = (task.binding.round_id, task.binding.task_sha256);
            let mut result = self.take_part(*task).await;
            if let Err(e) = &result {
                tracing::info!(error = %e, "round not completed");
            }
            if let Err(ParticipantError::Refused(_)) = &result {
                refused = Some(key);
            }
            if let Ok(report) = &mut result
                && report.outcome == RoundOutcome::Committed
            {
                committed += 1;
                match self.evaluate_latest().await {
                    Ok(evaluation) => report.evaluation = evaluation,
                    Err(e) => tracing::warn!(error = %e, "evaluation of the new adapter failed"),
                }
            }
            on_round(&result);
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
        let (bytes, sha) = self.connection.download_adapter(version).await?;
        if sha != sha256 {
            return Err(ParticipantError::Refused(format!(
                "adapter version {version} has a different hash than the task binds (a server showing clients different models?)"
            )));
        }
        guild_proto::adapter::from_bytes(&bytes, d)
            .map_err(|e| ParticipantError::Refused(format!("adapter version {version}: {e}")))
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
        // A popularity release sends this merchant's own statistics and reads nothing of the
        // adapter the round starts from: it is not fetched (with a pair sketch, 16 MB each
        // merchant of a release).
        let global = if task.training.kind == RoundKind::PopularityRelease {
            Vec::new()
        } else {
            self.global_adapter(
                task.adapter_version,
                task.binding.adapter_sha256,
                task.manifest.parameter_count(),
            )
            .await?
        };

        // The encoding: clip, rotate, scale, round, add this client's share of the noise.
        let p = &task.privacy;
        let noise = if p.mode == PrivacyMode::Distributed { p.noise_multiplier * p.clip_norm } else { 0.0 };
        let shares = guild_privacy::cost::noise_shares(p.min_survivors, p.tolerated_colluders);
        // Over the coordinates the round sums, not the whole adapter.
        // (Without noise the encoding is not rotated: `PrivacyMode::rotates`.)
        let d = task.summed().len();
        let ddg = if p.mode.rotates() {
            DdgParams::from_round(d, p.clip_norm, p.gamma, p.bit_width, noise, shares)?
        } else {
            DdgParams::unrotated(d, p.clip_norm, p.gamma, p.bit_width)?
        };
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
        let (state, mut masked) = state.on_inbox(inbox, &encoded.values)?;
        // The encoded update is in the masked input now: free it (4 bytes a coordinate of
        // the round's vector) before the phases that wait on the whole cohort (a simulated
        // federation holds every merchant's at once).
        let norm_before_clipping = encoded.norm_before_clipping;
        drop(encoded);
        if self.options.faults.false_complaints {
            for &index in task.cohort.keys().filter(|&&i| i != s.my_index) {
                if !masked.complaints.iter().any(|c| c.accused == index) {
                    let mut pairwise_seed = [0u8; 32];
                    rand::RngCore::fill_bytes(&mut os_rng, &mut pairwise_seed);
                    masked
                        .complaints
                        .push(guild_privacy::secagg::message::Complaint { accused: index, pairwise_seed });
                }
            }
        }
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
            norm_before_clipping: norm_before_clipping as f64,
            evaluation: None,
        })
    }

    /// Fetches the latest adapter, evaluates it on this merchant's validation data, warns
    /// when it fell below the version evaluated before by more than noise, and reports the
    /// counts to the coordinator only with `dangerous_report_unnoised_metrics`.
    pub async fn evaluate_latest(&mut self) -> Result<Option<VersionEvaluation>, ParticipantError> {
        let Some(merchant) = self.merchant_id.clone() else { return Ok(None) };
        let status = self.connection.status().await?;
        let Some(learner) = &self.learner else { return Ok(None) };
        let d = learner.manifest().parameter_count();
        let (bytes, _) = self.connection.download_adapter(status.latest_adapter_version).await?;
        let values = guild_proto::adapter::from_bytes(&bytes, d)
            .map_err(|e| ParticipantError::Refused(format!("adapter: {e}")))?;
        let mut learner =
            self.learner.take().ok_or_else(|| ParticipantError::Refused("learner busy".into()))?;
        let (learner, counts, values) = tokio::task::spawn_blocking(move || {
            let counts = learner.evaluate(&values);
            (learner, counts, values)
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
        let version = status.latest_adapter_version;
        if let (Some((dir, last)), Some(learner)) = (&self.options.keep_versions, &self.learner)
            && let Err(e) = keep_version(dir, version, &learner.manifest(), &values)
                .and_then(|_| prune_versions(dir, *last))
        {
            tracing::warn!(version, error = %e, "cannot keep the committed version locally");
        }
        let Some(counts) = counts else { return Ok(None) };
        let worse_than = match &self.last_evaluation {
            Some((before, previous)) if *before < version && fell_beyond_noise(previous, &counts) => {
                tracing::warn!(
                    version,
                    ndcg_at_10 = counts.ndcg_at_10(),
                    previous_version = before,
                    previous_ndcg_at_10 = previous.ndcg_at_10(),
                    users = counts.users,
                    "the federation's new version ranks this merchant's validation shoppers worse than the one before, beyond noise"
                );
                Some((*before, previous.ndcg_at_10()))
            }
            _ => None,
        };
        self.last_evaluation = Some((version, counts));
        Ok(Some(VersionEvaluation { version, counts, worse_than }))
    }
}

#[cfg(test)]
mod evaluation_tests {
    use super::*;

    fn counts(users: u64, ndcg: f64) -> RankingCounts {
        RankingCounts { users, ndcg_at_10_sum: ndcg * users as f64, ..RankingCounts::default() }
    }

    #[test]
    fn a_version_is_flagged_only_when_it_falls_by_more_than_two_standard_errors() {
        // 1,000 shoppers: 0.04 → 0.02 is beyond 2·√(0.06/1000) = 0.0155; 0.04 → 0.035 is not.
        assert!(fell_beyond_noise(&counts(1000, 0.04), &counts(1000, 0.02)));
        assert!(!fell_beyond_noise(&counts(1000, 0.04), &counts(1000, 0.035)));
        // A gain is never flagged, nor a version no shopper scored.
        assert!(!fell_beyond_noise(&counts(1000, 0.02), &counts(1000, 0.04)));
        assert!(!fell_beyond_noise(&counts(0, 0.0), &counts(1000, 0.0)));
        // The fall the deployment trial saw (0.0248 → 0.0011) is within noise over 100
        // shoppers (2·√(0.0259/100) = 0.032) and beyond it over 500 (0.0144).
        assert!(!fell_beyond_noise(&counts(100, 0.0248), &counts(100, 0.0011)));
        assert!(fell_beyond_noise(&counts(500, 0.0248), &counts(500, 0.0011)));
    }

    #[test]
    fn a_kept_version_is_an_export_serve_reads_and_is_written_once() {
        let shape = guild_proto::tower::TowerShape::tiny(6);
        let manifest = guild_proto::domain::AdapterManifest::sequence_tower([3; 32], shape, 5)
            .with_catalogue(Some([4; 32]));
        let values: Vec<f32> = (0..manifest.parameter_count()).map(|i| i as f32 * 1e-3).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let kept = keep_version(dir.path(), 7, &manifest, &values).expect("kept");
        assert_eq!(kept, dir.path().join("v7"));
        assert_eq!(guild_proto::adapter::read_tower_manifest(&kept).expect("read"), Some(manifest.clone()));
        // Kept again (another round's evaluation of the same version): left as it is, and no
        // temporary folder is left behind either time.
        let before = std::fs::read(kept.join("tower.safetensors")).expect("read");
        let zeros = vec![0.0; values.len()];
        keep_version(dir.path(), 7, &manifest, &zeros).expect("kept again");
        assert_eq!(std::fs::read(kept.join("tower.safetensors")).expect("read"), before);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["v7"]);
        // serve's `[serve] adapter = <this folder>` takes the newest kept.
        keep_version(dir.path(), 12, &manifest, &zeros).expect("kept");
        keep_version(dir.path(), 9, &manifest, &zeros).expect("kept");
        assert_eq!(crate::serve::newest_kept(dir.path()), dir.path().join("v12"));
        assert_eq!(crate::serve::newest_kept(&kept), kept, "an export is served as it is");
        // Only the newest two are kept (by version, not by the order they were kept).
        std::fs::create_dir(dir.path().join("notes")).expect("an unrelated folder");
        prune_versions(dir.path(), 2).expect("pruned");
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["notes", "v12", "v9"]);
    }
}
