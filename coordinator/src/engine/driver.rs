//! The round's timeline: the driver loop that opens rounds, closes each SecAgg+ phase
//! when every expected message arrived or its deadline passed, aborts a round that
//! cannot go on, and finishes one that can (unmask, decode, server step, commit).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guild_privacy::PrivacyMode;
use guild_privacy::dp::add_central_noise;
use guild_privacy::ledger::{Charge, LedgerEntry};
use guild_privacy::secagg::message::ClientIndex;
use guild_privacy::secagg::{PeerMisbehaved, Phase, SecAggError};
use guild_proto::round::{RoundKind, TrainedPart};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::optimizer::{Trained, release_step, scale_range, selection_step, server_step};
use super::{AdapterVersion, Engine, KEPT_OUTCOMES, Outcome, State};
use crate::config::Shrinkage;
use crate::store::{AdapterRecord, RoundCommit};

/// The probability that an honest round's sum is rejected as poisoned
/// (`DdgParams::honest_sum_norm_bound`).
pub const POISONED_SUM_FALSE_REJECTION: f64 = 1e-9;

impl Engine {
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
            match self.busy(|| self.try_open()) {
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

    /// Drives the open round through its phases, then finishes it.
    async fn drive(&self) {
        for phase in Phase::ALL {
            let opened = tokio::time::Instant::now();
            let mut deadline = opened + self.config.phase_deadline(phase);
            let mut shortened = false;
            loop {
                let notified = self.arrivals.notified();
                let (all_in, grace) = {
                    let state = self.lock();
                    match state.round.as_ref() {
                        None => (true, None),
                        Some(r) => (
                            r.expected.is_subset(&r.received),
                            if shortened { None } else { self.early_close(r, phase, opened) },
                        ),
                    }
                };
                if all_in {
                    break;
                }
                if let Some(grace) = grace {
                    shortened = true;
                    deadline = deadline.min(tokio::time::Instant::now() + grace);
                }
                tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            if let Err(reason) = self.busy(|| self.close_phase(phase)) {
                self.abort(reason);
                return;
            }
        }
        match self.busy(|| self.finish()) {
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

    /// The grace left to the phase's missing senders once `rounds.early_close`'s quorum has
    /// answered, and never while closing would leave fewer than the round's threshold (or,
    /// in Unmask, a secret short of its threshold shares): `None` to wait on.
    fn early_close(
        &self,
        round: &super::Round,
        phase: Phase,
        opened: tokio::time::Instant,
    ) -> Option<Duration> {
        let policy = self.config.rounds.early_close.as_ref()?;
        let received = round.expected.intersection(&round.received).count();
        if received < round.server.config().threshold as usize {
            return None;
        }
        if phase == Phase::Unmask && !round.server.has_unmask_shares() {
            return None;
        }
        policy.grace(round.expected.len(), received, opened.elapsed())
    }

    fn close_phase(&self, phase: Phase) -> Result<(), String> {
        let mut state = self.lock();
        let Some(round) = state.round.as_mut() else { return Err("the round vanished".into()) };
        let dropped = round.expected.difference(&round.received).count();
        let latency = round.phase_started.elapsed();
        let result = match phase {
            Phase::AdvertiseKeys => round.server.close_keys().map(|roster| round.roster = roster),
            Phase::ShareKeys => round.server.close_shares().map(|inboxes| round.inboxes = inboxes),
            Phase::MaskedInput => round.server.close_inputs().map(|survivors| round.survivors = survivors),
            Phase::ConsistencyCheck => round.server.close_consistency().map(|signatures| {
                // The signatures let clients reveal their Unmask shares, after which the sum
                // can be computed: charge the ledger durably first, never to be refunded.
                round.signatures = signatures;
            }),
            Phase::Unmask => Ok(()),
        };
        self.metrics.observe_phase(phase, latency, dropped);
        tracing::info!(
            round = round.id,
            phase = phase.name(),
            received = round.received.len(),
            dropped,
            ?latency,
            "phase closed"
        );
        result.map_err(|e| e.to_string())?;
        if phase == Phase::MaskedInput {
            let complaints = round.server.complaints();
            let threshold = self.config.rounds.quarantine_after_complaints.max(1) as usize;
            // An honest merchant complains only about neighbours whose signed shares did not
            // open for it. A round survives at most k − t of those around one merchant, and
            // more dishonest neighbours than that is past the collusion SecAgg+ tolerates: an
            // accuser past the bound is lying, is quarantined itself, and none of its
            // complaints count (else two colluders could quarantine every honest neighbour).
            let most = most_accusations(round.server.config());
            let mut by_accuser: BTreeMap<ClientIndex, Vec<ClientIndex>> = BTreeMap::new();
            for (accuser, accused) in complaints {
                self.metrics.complaints.inc();
                tracing::warn!(
                    round = round.id,
                    accuser = round.merchant_at(accuser),
                    accused = round.merchant_at(accused),
                    "a cohort member says a neighbour's signed shares do not open"
                );
                by_accuser.entry(accuser).or_default().push(accused);
            }
            let mut named: Vec<(String, String)> = Vec::new();
            let mut accusers: BTreeMap<ClientIndex, Vec<ClientIndex>> = BTreeMap::new();
            for (accuser, accused) in by_accuser {
                if accused.len() > most {
                    if let Some(merchant) = round.merchant_at(accuser) {
                        named.push((
                            merchant.to_owned(),
                            format!(
                                "round {}: it accused {} neighbours of sealing shares that do not open, more \
                                 than the {most} a round can survive (k − t)",
                                round.id,
                                accused.len()
                            ),
                        ));
                    }
                    continue;
                }
                for a in accused {
                    accusers.entry(a).or_default().push(accuser);
                }
            }
            let liars: BTreeSet<String> = named.iter().map(|(m, _)| m.clone()).collect();
            let accused: Vec<(String, String)> = accusers
                .into_iter()
                .filter(|(_, by)| by.len() >= threshold)
                .filter_map(|(accused, by)| {
                    let merchant = round.merchant_at(accused)?.to_owned();
                    let by: Vec<&str> = by.iter().filter_map(|&i| round.merchant_at(i)).collect();
                    Some((
                        merchant,
                        format!("round {}: its signed shares did not open for {}", round.id, by.join(", ")),
                    ))
                })
                .filter(|(merchant, _)| !liars.contains(merchant))
                .collect();
            named.extend(accused);
            let id = round.id;
            for (merchant, reason) in &named {
                self.quarantine(merchant, id, reason);
            }
        }
        let Some(round) = state.round.as_mut() else { return Err("the round vanished".into()) };
        if phase == Phase::ConsistencyCheck
            && let Some(event) = round.event.take()
        {
            let unit = round.unit;
            let (id, entry) = (round.id, LedgerEntry { round_id: round.id, event, unit });
            if let Err(error) = self.store.charge_round(id, &Charge { unit, event }) {
                return Err(format!("charging the ledger before the unmask phase failed: {error}"));
            }
            if let Err(error) = state.ledger.append(entry) {
                return Err(format!("the ledger refused round {id}'s charge: {error}"));
            }
            if let Err(error) = self.metrics.publish_privacy(&state.ledger) {
                tracing::warn!(%error, round = id, "publishing ε after the charge failed");
            }
        }
        let Some(round) = state.round.as_mut() else { return Err("the round vanished".into()) };
        round.expected = std::mem::take(&mut round.received);
        round.phase = phase.next();
        if let Err(error) = self.store.set_round_phase(round.id, round.phase) {
            tracing::warn!(%error, "recording the round's phase failed");
        }
        round.phase_started = Instant::now();
        drop(state);
        if !phase.is_last() {
            self.bump();
        }
        Ok(())
    }

    fn abort(&self, reason: String) {
        let mut state = self.lock();
        if let Some(mut round) = state.round.take() {
            round.server.abort();
            // A round aborted before ConsistencyCheck closed revealed nothing and was not
            // charged; one aborted later keeps its charge (made before any unmask share).
            let charged =
                round.event.is_none() && !matches!(self.config.privacy.mode, PrivacyMode::DangerousNone);
            tracing::warn!(round = round.id, %reason, charged, "round aborted");
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
        let sum = match round.server.finish() {
            Ok(sum) => sum,
            Err(error) => {
                // Shares that all match their dealer's signed commitments but do not lie on
                // one polynomial: the dealer cheated, provably.
                if let SecAggError::Peer { who, fault: PeerMisbehaved::BadShares } = &error
                    && let Some(merchant) = round.merchant_at(*who).map(str::to_owned)
                {
                    let reason = format!("round {}: it dealt shares that do not reconstruct", round.id);
                    self.quarantine(&merchant, round.id, &reason);
                }
                return Err(error.into());
            }
        };
        let rotation = round.ddg.rotation(round.rotation_seed);
        let mut decoded = round.ddg.decode(&sum, &rotation)?;
        // A poisoned sum: no clipped, encoded updates and noise reach this norm. The round is
        // rejected (its charge stands, as for any round that reached Unmask).
        let norm = decoded.iter().map(|x| x * x).sum::<f64>().sqrt();
        let bound = round.ddg.honest_sum_norm_bound(
            round.max_summands,
            round.server.config().cohort_size,
            POISONED_SUM_FALSE_REJECTION,
        );
        // (A NaN norm is rejected too.)
        if norm.is_nan() || norm > bound {
            self.metrics.rounds_poisoned.inc();
            anyhow::bail!(
                "the decoded sum has L2 norm {norm:.4e}, above the {bound:.4e} that {} clipped updates and the noise \
                 reach (false rejection below {POISONED_SUM_FALSE_REJECTION:e}): a cohort member sent something \
                 other than a clipped, encoded update; the sum is discarded",
                round.max_summands
            );
        }
        if self.config.privacy.mode == PrivacyMode::Central {
            let sigma = round.noise_multiplier * self.config.clip_norm(round.kind);
            add_central_noise(&mut decoded, sigma, &mut ChaCha20Rng::from_entropy())?;
        }
        // Back over the whole adapter: the coordinates the round did not sum stay zero.
        let mut decoded = if round.summed.is_whole() { decoded } else { round.summed.scatter(&decoded) };
        // The server step of the round's kind.
        let step = match round.kind {
            RoundKind::PoolingSelection => {
                let guild_proto::domain::AdapterFamily::SequenceTower(shape) = &self.manifest.family else {
                    anyhow::bail!("a pooling selection for an adapter that is not a sequence tower");
                };
                let (step, best) = selection_step(shape, &latest.values, &decoded, moments.as_ref())
                    .ok_or_else(|| {
                        anyhow::anyhow!("a pooling selection for a tower without a popularity prior")
                    })?;
                // The estimates, in NDCG@10: each shopper's setting's sum was c/√k times its
                // values (in the merchant unit the sums are of centred, clipped sums of
                // NDCG@10: then only their order means anything).
                let k = guild_proto::tower::SELECTION_SETTINGS;
                let scale = (k as f64).sqrt() / (self.config.clip_norm(round.kind) * round.denominator);
                let estimates: Vec<String> =
                    decoded[..k].iter().map(|s| format!("{:.4}", s * scale)).collect();
                tracing::info!(setting = best, estimates = %estimates.join(" "), "pooling selected");
                step
            }
            RoundKind::PopularityRelease => {
                // Only the histogram was sent: everything else in the sum is noise.
                release_step(
                    &latest.values,
                    &decoded,
                    round.denominator,
                    moments.as_ref(),
                    self.manifest.accumulated_range(),
                )
            }
            RoundKind::Training => {
                // A round that trains a part shrinks and steps on the part alone
                // (`Trained::Part` drops the rest of the sum: noise, and the statistics are the
                // releases' to move).
                let part = self.config.rounds.trained.ranges(&self.manifest);
                if self.config.rounds.shrinkage == Shrinkage::JamesStein {
                    let variance = if round.noise_multiplier > 0.0 {
                        guild_privacy::cost::decoded_sum_noise_variance(
                            self.config.privacy.mode,
                            round.noise_multiplier,
                            self.config.clip_norm(round.kind),
                            &round.ddg,
                            survivors_of(round),
                        )
                    } else {
                        0.0
                    };
                    // The pooling is one block: it is small, and trained as a whole. The
                    // weights (every trained tensor) are blocked as the whole adapter is.
                    let blocks = match (&part, self.config.rounds.trained) {
                        (Some(ranges), TrainedPart::Pooling) => vec![ranges.clone()],
                        _ => trained_blocks(&self.manifest),
                    };
                    let factors = guild_privacy::dp::james_stein(&mut decoded, &blocks, variance);
                    if variance > 0.0 {
                        let shown: Vec<String> = factors.iter().map(|f| format!("{f:.3}")).collect();
                        tracing::info!(round = round.id, variance, factors = %shown.join(" "), "noisy sum shrunk");
                    }
                }
                // The item-ID rows get their own step (`rounds.item_ids_scale`): each is sent by
                // the few merchants whose shoppers bought its item, and the mean divides by all.
                if let guild_proto::domain::AdapterFamily::SequenceTower(shape) = &self.manifest.family {
                    let rows = guild_proto::tower::tensor_range(shape, guild_proto::tower::ITEM_IDS);
                    scale_range(&mut decoded, rows, self.config.rounds.item_ids_scale);
                }
                let (optimizer, rate) =
                    (self.config.rounds.server_optimizer, self.config.rounds.server_learning_rate);
                let (values, n, moments) = (&latest.values, round.denominator, moments.as_ref());
                let trained = match &part {
                    Some(ranges) => Trained::Part(ranges),
                    None => Trained::All(self.manifest.accumulated_range()),
                };
                server_step(optimizer, values, &decoded, n, rate, moments, trained)
            }
        };
        let bytes = guild_proto::adapter::to_bytes(&step.values);
        let sha256 = guild_proto::adapter::sha256(&bytes);
        let version = latest.version + 1;
        let optimizer_state = step.moments.as_ref().map(super::optimizer::Moments::to_bytes);
        let survivors = round.survivors.len() as u32;
        // The round's privacy event was charged when ConsistencyCheck closed.
        debug_assert!(round.event.is_none(), "a round reaches its commit charged");
        self.store.commit_round(&RoundCommit {
            round_id: round.id,
            survivors,
            adapter: AdapterRecord { version, sha256, data: bytes.clone(), optimizer_state },
            ledger_event: None,
        })?;
        *latest = Arc::new(AdapterVersion { version, sha256, bytes, values: step.values });
        if step.moments.is_some() {
            *moments = step.moments;
        }
        let unit = round.unit;
        let epsilon = ledger.spent(unit)?.epsilon;
        state.rounds_completed += 1;
        state.rounds_this_run += 1;
        self.metrics.rounds_completed.inc();
        tracing::info!(version, survivors, epsilon, unit = %unit, "round committed");
        Ok(version)
    }
}

fn push_outcome(outcomes: &mut VecDeque<(u64, Outcome)>, round: u64, outcome: Outcome) {
    outcomes.push_back((round, outcome));
    while outcomes.len() > KEPT_OUTCOMES {
        outcomes.pop_front();
    }
}

/// How many noise shares (and roundings) the decoded sum of `round` holds: one per survivor.
fn survivors_of(round: &super::Round) -> u32 {
    u32::try_from(round.survivors.len()).unwrap_or(u32::MAX)
}

/// A tensor of fewer coordinates than this is not a shrinkage block of its own. A block's
/// factor is `1 − (d − 2)σ²/‖y‖²`, and for a block that is all noise `‖y‖²/σ²` is χ² with
/// `d` degrees of freedom: for the 20 recency weights the factor exceeds 0.2 in about 31%
/// of rounds, letting a fifth of the noise (in a merchant-level DP round, as large as the
/// weights themselves) into the pooling; at 1,024 coordinates that takes a 5.5σ draw.
pub(crate) const MIN_SHRINKAGE_BLOCK: usize = 1024;

/// The trained tensors' coordinates in the adapter's flat vector, grouped in blocks for the
/// shrinkage: each tensor of at least [`MIN_SHRINKAGE_BLOCK`] coordinates a block of its own,
/// and the smaller ones (the recency weights, layer norms, the prior's weight) in the largest
/// block, shrunk by its factor (per-block James–Stein still dominates the raw sum). The
/// accumulated statistics (the popularity histogram, the item-to-item counts) are left out.
fn trained_blocks(manifest: &guild_proto::domain::AdapterManifest) -> Vec<Vec<std::ops::Range<usize>>> {
    let accumulated = manifest.accumulated_range().unwrap_or(0..0);
    let mut start = 0;
    let (mut blocks, mut small) = (Vec::<Vec<std::ops::Range<usize>>>::new(), Vec::new());
    for tensor in &manifest.tensors {
        let len: usize = tensor.shape.iter().product();
        let block = start..start + len;
        start += len;
        if block.start < accumulated.end && block.end > accumulated.start {
            continue;
        }
        if len < MIN_SHRINKAGE_BLOCK { small.push(block) } else { blocks.push(vec![block]) }
    }
    match blocks.iter_mut().max_by_key(|b| b.iter().map(ExactSizeIterator::len).sum::<usize>()) {
        Some(largest) => largest.extend(small),
        None if !small.is_empty() => blocks.push(small),
        None => {}
    }
    blocks
}

/// The most neighbours one merchant may accuse in a round: `k − t` (share holders in the
/// graph built, less the threshold), as many as a round survives without their shares; at
/// least 1.
pub(super) fn most_accusations(config: &guild_privacy::secagg::RoundConfig) -> usize {
    let holders = guild_privacy::secagg::graph::share_holders(config.cohort_size, config.neighbours);
    holders.saturating_sub(config.threshold).max(1) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use guild_proto::domain::AdapterManifest;
    use guild_proto::tower::TowerShape;

    #[test]
    fn the_shrinkage_blocks_are_the_large_trained_tensors_and_the_rest_joins_the_largest() {
        let size = |b: &Vec<std::ops::Range<usize>>| b.iter().map(ExactSizeIterator::len).sum::<usize>();
        for neighbours in [0, 4] {
            // The default scenario's tower: item_a and item_b (384 × 32), the layer's
            // matrices, the output; the norms, recency and the prior's weight are small.
            let shape = TowerShape {
                hidden: 384,
                history: 20,
                zero_shot_items: 5,
                item_rank: 32,
                width: 128,
                layers: 1,
                heads: 4,
                catalogue: 300,
                neighbours,
                pair_sketch: 0,
                item_ids: 0,
                spectral: 0,
            };
            let tower = AdapterManifest::sequence_tower([0; 32], shape, 0);
            let blocks = trained_blocks(&tower);
            let accumulated = tower.accumulated_range().expect("statistics");
            assert_eq!(accumulated.len(), 300 * (1 + neighbours));
            let ranges: Vec<&std::ops::Range<usize>> = blocks.iter().flatten().collect();
            assert!(ranges.iter().all(|b| b.end <= accumulated.start || b.start >= accumulated.end));
            // The blocks and the statistics tile the flat vector, each tensor once.
            let covered: usize = ranges.iter().map(|b| b.len()).sum::<usize>() + accumulated.len();
            assert_eq!(covered, tower.parameter_count());
            assert_eq!(ranges.len() + 1 + usize::from(neighbours > 0), tower.tensors.len());
            assert!(blocks.iter().all(|b| size(b) >= MIN_SHRINKAGE_BLOCK), "{blocks:?}");
            let of = |name: &str| guild_proto::tower::tensor_range(&shape, name).expect(name);
            let largest = blocks.iter().max_by_key(|b| size(b)).expect("blocks");
            for small in ["recency", guild_proto::tower::POPULARITY_WEIGHT] {
                assert!(largest.contains(&of(small)), "{small} joins the largest block: {blocks:?}");
            }
            assert!(blocks.iter().any(|b| b == &vec![of("item_a")]) || largest.contains(&of("item_a")));
        }
        // A tower whose tensors are all small is one block.
        let tiny = AdapterManifest::sequence_tower([0; 32], TowerShape::tiny(0), 0);
        let blocks = trained_blocks(&tiny);
        assert_eq!((blocks.len(), blocks[0].len()), (1, tiny.tensors.len()));
    }
}
