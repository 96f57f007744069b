//! Opening a round: Poisson sampling of the eligible merchants, the round's encoding and
//! privacy cost (one function in guild-privacy, `RoundPrivacy::cost`), the ledger's
//! budget check, and one task per cohort member.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use guild_privacy::cost::RoundCost;
use guild_privacy::ledger::PrivacyEvent;
use guild_privacy::secagg::message::{ClientIndex, RoundBinding};
use guild_privacy::secagg::server::Server;
use guild_privacy::secagg::{Identities, Phase, RoundConfig};
use guild_privacy::{PrivacyMode, PrivacyUnit};
use guild_proto::convert::task_digest;
use guild_proto::domain::{PrivacyParams, RoundTask, SecAggParams, TrainingParams};
use guild_proto::round::{RoundKind, release_part};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::{Engine, Round, State};
use crate::config::KindPrivacy;
use crate::store::MerchantRecord;

/// The round-wide parameters every task of a round carries.
struct TaskTemplate<'a> {
    binding: RoundBinding,
    adapter_version: u64,
    round: &'a RoundConfig,
    cost: &'a RoundCost,
    kind: RoundKind,
    privacy: KindPrivacy,
    rotation_seed: u64,
    identities: &'a Identities,
    /// Each member's client certificate, which binds its signing key.
    certificates: &'a BTreeMap<ClientIndex, Vec<u8>>,
    deadlines: Vec<Duration>,
}

impl Engine {
    /// Samples a cohort and opens a round, or says (in the status) why not.
    pub(super) fn try_open(&self) -> Result<bool, anyhow::Error> {
        let cfg = &self.config;
        let registered = self.store.merchant_count()?;
        if registered < cfg.rounds.start_after_registered {
            self.lock().status = format!(
                "waiting for merchants: {registered} registered, the first round waits for {} \
                 (rounds.start_after_registered)",
                cfg.rounds.start_after_registered
            );
            return Ok(false);
        }
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
        let kind = cfg.schedule(&self.manifest).kind_after(self.lock().latest.version);
        let privacy = cfg.kind_privacy(kind);
        if matches!(cfg.privacy.mode, PrivacyMode::Distributed | PrivacyMode::Central)
            && privacy.noise_multiplier <= 0.0
        {
            // (Configuration allows it only where `max_rounds` ends before such a round; a
            // restarted daemon may still reach one.)
            self.lock().status =
                format!("the next round is a {kind} and no noise multiplier is set for it; no more rounds");
            return Ok(false);
        }
        let mut rng = ChaCha20Rng::from_entropy();
        // (In the shopper unit the rate is 1: every merchant, each sampling its own shoppers.)
        let q = privacy.merchant_rate;
        let partition = cfg.release_parts().filter(|_| kind == RoundKind::PopularityRelease);
        let cohort: Vec<MerchantRecord> = match partition {
            // A partitioned release (no noise): the i-th release takes the merchants of part
            // i, so that each merchant is summed in exactly one (an aborted release is
            // retried with the same part).
            Some(parts) => {
                let part = (self.lock().latest.version % u64::from(parts)) as u32;
                let ids: Vec<&str> = eligible.iter().map(|m| m.merchant_id.as_str()).collect();
                let members = release_part(&self.federation_id, &ids, part, parts);
                members.into_iter().map(|i| eligible[i].clone()).collect()
            }
            // Poisson sampling: each merchant independently, with the OS's randomness.
            None => eligible.into_iter().filter(|_| rng.gen_bool(q)).collect(),
        };
        let n = cohort.len() as u32;
        if let Some(parts) = partition
            && !(cfg.rounds.min_cohort..=cfg.rounds.max_cohort).contains(&n)
        {
            // The same part comes up again: only more merchants registering can change it.
            self.lock().status = format!(
                "the partitioned release's part of {n} merchants is outside the cohort limits \
                 {}..={} (rounds.popularity_release.rounds = {parts} parts); waiting for merchants",
                cfg.rounds.min_cohort, cfg.rounds.max_cohort
            );
            return Ok(false);
        }
        if n > cfg.rounds.max_cohort {
            // As for a small sample: nothing is computed from it, so it costs no privacy.
            self.metrics.rounds_skipped.inc();
            self.lock().status = format!(
                "sampled {n} merchants, more than the maximum cohort {}; resampling",
                cfg.rounds.max_cohort
            );
            return Ok(false);
        }
        if n < cfg.rounds.min_cohort {
            // Nothing is computed or released from a skipped sample, so it costs no privacy.
            self.metrics.rounds_skipped.inc();
            self.lock().status = format!(
                "sampled {n} merchants, fewer than the minimum cohort {}; resampling",
                cfg.rounds.min_cohort
            );
            return Ok(false);
        }
        let (k, t) = cfg.cohort_shape(n);
        let p = &cfg.privacy;
        // What the sum is averaged over: merchants (drawn here), or shoppers (drawn by their
        // merchants).
        let denominator = match p.unit {
            PrivacyUnit::Merchant => q * population as f64,
            PrivacyUnit::Shopper => privacy.unit_rate * p.shoppers as f64,
        };
        let summed = cfg.summed(kind, &self.manifest);
        let round = cfg.round_privacy(kind, n, &self.manifest);
        let max_summands = round.max_summands;
        let cost = round.cost()?;
        let mut state = self.lock();
        if let Some(event) = &cost.event
            && !self.within_budget(&mut state, cost.unit, event)?
        {
            return Ok(false);
        }
        let round_id = self.store.open_round(n)?;
        let latest = state.latest.clone();
        let binding = RoundBinding {
            federation_id: self.federation_id,
            round_id,
            adapter_sha256: latest.sha256,
            task_sha256: [0; 32],
        };
        let mut round_config = RoundConfig {
            binding,
            cohort_size: n,
            threshold: t,
            neighbours: k,
            vector_length: cost.ddg.padded_dimension(),
            bit_width: cfg.privacy.bit_width,
        };
        let identities: Identities = cohort
            .iter()
            .enumerate()
            .map(|(i, m)| (ClientIndex::new(i as u32 + 1).expect("1-based"), m.signing_public_key))
            .collect();
        let certificates: BTreeMap<ClientIndex, Vec<u8>> = cohort
            .iter()
            .enumerate()
            .map(|(i, m)| (ClientIndex::new(i as u32 + 1).expect("1-based"), m.certificate.clone()))
            .collect();
        let mut template = TaskTemplate {
            binding,
            adapter_version: latest.version,
            round: &round_config,
            cost: &cost,
            kind,
            privacy,
            rotation_seed: rng.r#gen(),
            identities: &identities,
            certificates: &certificates,
            deadlines: Phase::ALL.into_iter().map(|p| cfg.phase_deadline(p)).collect(),
        };
        // Every client's task differs only in its index and data seed: the digest of the
        // rest goes into the binding that every signed message and derived key carries.
        template.binding.task_sha256 =
            task_digest(&self.task(&template, ClientIndex::new(1).expect("1-based"), 0));
        let mut members = BTreeMap::new();
        let mut tasks = BTreeMap::new();
        for (i, merchant) in cohort.iter().enumerate() {
            let index = ClientIndex::new(i as u32 + 1).expect("1-based");
            members.insert(merchant.merchant_id.clone(), index);
            tasks.insert(index, self.task(&template, index, rng.r#gen()));
        }
        let (binding, rotation_seed) = (template.binding, template.rotation_seed);
        round_config.binding = binding;
        let server = Server::new(round_config.clone(), identities.clone())?;
        tracing::info!(
            round = round_id,
            cohort = n,
            threshold = t,
            neighbours = k,
            adapter = latest.version,
            kind = %kind,
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
            ddg: cost.ddg,
            rotation_seed,
            event: cost.event,
            unit: cost.unit,
            max_summands,
            denominator,
            kind,
            summed,
            noise_multiplier: privacy.noise_multiplier,
            phase: Some(Phase::AdvertiseKeys),
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

    /// Whether the ledger can afford `event`; if not, says so in the status (once).
    fn within_budget(
        &self,
        state: &mut State,
        unit: PrivacyUnit,
        event: &PrivacyEvent,
    ) -> Result<bool, anyhow::Error> {
        let privacy = &self.config.privacy;
        let after = state.ledger.spent_if(unit, event)?;
        if after.epsilon <= privacy.epsilon_budget {
            return Ok(true);
        }
        let message = format!(
            "privacy budget exhausted: another round would raise the {unit}-level ε from {:.4} to {:.4}, past the cap of {} at δ = {:e}; no more rounds",
            state.ledger.spent(unit)?.epsilon,
            after.epsilon,
            privacy.epsilon_budget,
            privacy.delta
        );
        if state.status != message {
            tracing::warn!("{message}");
            self.metrics.rounds_refused.inc();
        }
        state.status = message;
        Ok(false)
    }

    /// The task of the cohort member at `index`.
    fn task(&self, template: &TaskTemplate<'_>, index: ClientIndex, data_seed: u64) -> RoundTask {
        let cfg = &self.config;
        let round = template.round;
        RoundTask {
            binding: template.binding,
            adapter_version: template.adapter_version,
            manifest: self.manifest.clone(),
            training: TrainingParams {
                local_steps: cfg.rounds.local_steps,
                negatives: cfg.rounds.negatives,
                batch_size: cfg.rounds.batch_size,
                learning_rate: cfg.rounds.learning_rate,
                data_seed,
                kind: template.kind,
                trained: cfg.trained_in(template.kind),
            },
            privacy: PrivacyParams {
                mode: cfg.privacy.mode,
                clip_norm: cfg.clip_norm(template.kind),
                noise_multiplier: template.privacy.noise_multiplier,
                gamma: template.cost.ddg.gamma(),
                bit_width: cfg.privacy.bit_width,
                min_survivors: round.threshold,
                tolerated_colluders: template.cost.tolerated_colluders,
                rotation_seed: template.rotation_seed,
                unit: template.cost.unit,
                shopper_sampling_rate: match template.cost.unit {
                    PrivacyUnit::Merchant => 0.0,
                    PrivacyUnit::Shopper => template.privacy.unit_rate,
                },
            },
            secagg: SecAggParams {
                my_index: index,
                cohort_size: round.cohort_size,
                threshold: round.threshold,
                neighbours: round.neighbours,
                vector_length: round.vector_length as u32,
                phase_deadlines: template.deadlines.clone(),
            },
            cohort: template.identities.clone(),
            certificates: template.certificates.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use guild_proto::domain::AdapterManifest;
    use guild_proto::round::RoundKind;
    use guild_proto::tower::TowerShape;

    use crate::config::{Config, KindPrivacy};

    fn config(extra: &str) -> Config {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:50051\"\nstore = \"guild.db\"\n\
             [tls]\nca = \"ca.pem\"\ncert = \"server.pem\"\nkey = \"server.key\"\n{extra}"
        );
        Config::parse(&text, Vec::new()).expect("valid")
    }

    /// The round after each version, as the coordinator opens it: the schedule's kind, at
    /// that kind's rates and noise.
    fn after(config: &Config, manifest: &AdapterManifest, version: u64) -> (RoundKind, KindPrivacy) {
        let kind = config.schedule(manifest).kind_after(version);
        (kind, config.kind_privacy(kind))
    }

    /// The federation's first releases come at their own rate and noise; later rounds
    /// train; an adapter without a popularity histogram has nothing to release.
    #[test]
    fn the_first_versions_come_from_releases_at_their_own_rate_and_noise() {
        let shopper = config(
            "[rounds.popularity_release]\nrounds = 2\nnoise_multiplier = 2.5\n\
             [rounds.training]\nsampling_rate = 0.02\nnoise_multiplier = 1.1\n\
             [privacy]\nunit = \"shopper\"\nshoppers = 1000\n",
        );
        let tower = AdapterManifest::sequence_tower([0; 32], TowerShape::tiny(10), 0);
        let release = (
            RoundKind::PopularityRelease,
            KindPrivacy { merchant_rate: 1.0, unit_rate: 1.0, noise_multiplier: 2.5 },
        );
        assert_eq!(after(&shopper, &tower, 0), release);
        assert_eq!(after(&shopper, &tower, 1), release);
        let training =
            (RoundKind::Training, KindPrivacy { merchant_rate: 1.0, unit_rate: 0.02, noise_multiplier: 1.1 });
        assert_eq!(after(&shopper, &tower, 2), training);
        let plain = AdapterManifest::sequence_tower([0; 32], TowerShape::tiny(0), 0);
        assert_eq!(after(&shopper, &plain, 0), training);
        // In the merchant unit a release samples merchants, at its own rate.
        let merchant = config(
            "[rounds.training]\nsampling_rate = 0.1\n\
             [rounds.popularity_release]\nrounds = 1\nnoise_multiplier = 2.0\nsampling_rate = 0.5\n",
        );
        let release = (
            RoundKind::PopularityRelease,
            KindPrivacy { merchant_rate: 0.5, unit_rate: 0.5, noise_multiplier: 2.0 },
        );
        assert_eq!(after(&merchant, &tower, 0), release);
        assert_eq!(after(&merchant, &tower, 1).1.merchant_rate, 0.1);
    }

    /// The pooling selection comes right after the releases (or first, without them), at
    /// its own rate and noise, and only for a tower with a prior.
    #[test]
    fn the_pooling_selection_follows_the_releases_at_its_own_noise() {
        let shopper = config(
            "[rounds.popularity_release]\nrounds = 1\nnoise_multiplier = 2.5\n\
             [rounds.pooling_selection]\nrounds = 1\nnoise_multiplier = 20.0\n\
             [rounds.training]\nsampling_rate = 0.02\nnoise_multiplier = 1.1\n\
             [privacy]\nunit = \"shopper\"\nshoppers = 1000\n",
        );
        let tower = AdapterManifest::sequence_tower([0; 32], TowerShape::tiny(10), 0);
        assert_eq!(after(&shopper, &tower, 0).0, RoundKind::PopularityRelease);
        let selection = (
            RoundKind::PoolingSelection,
            KindPrivacy { merchant_rate: 1.0, unit_rate: 1.0, noise_multiplier: 20.0 },
        );
        assert_eq!(after(&shopper, &tower, 1), selection);
        let training = after(&shopper, &tower, 2);
        assert_eq!((training.0, training.1.noise_multiplier), (RoundKind::Training, 1.1));
        // A tower without a prior has neither.
        let plain = AdapterManifest::sequence_tower([0; 32], TowerShape::tiny(0), 0);
        assert_eq!(after(&shopper, &plain, 0), training);
        // Without releases the selection is the first round.
        let first = config("[rounds.pooling_selection]\nrounds = 1\nnoise_multiplier = 20.0\n");
        assert_eq!(after(&first, &tower, 0).0, RoundKind::PoolingSelection);
        assert_eq!(after(&first, &tower, 1).0, RoundKind::Training);
    }

    /// With `start_after_registered`, no round opens while fewer merchants have registered,
    /// even with enough of them for a cohort, and the status says what it waits for; once
    /// they have, the round opens (every merchant sampled here, at rate 1).
    #[test]
    fn no_round_opens_before_the_configured_merchants_have_registered() {
        use std::sync::Arc;

        use crate::metrics::Metrics;
        use crate::store::{MerchantRecord, Store};

        let config = config(
            "[rounds]\nmin_cohort = 3\nthreshold = 2\nstart_after_registered = 4\n\
             [rounds.training]\nsampling_rate = 1.0\n",
        );
        let store = Arc::new(Store::open_in_memory().expect("store"));
        let engine = super::Engine::new(config, Arc::clone(&store), [0; 16], Metrics::new()).expect("engine");
        let join = |k: u8| {
            let id = format!("merchant-{k}");
            let record = MerchantRecord {
                merchant_id: id.clone(),
                display_name: id.clone(),
                signing_public_key: [k; 32],
                certificate: vec![k],
            };
            store.allow(&id, [k; 32]).expect("allowed");
            store.upsert_merchant(&record).expect("registered");
        };
        for k in 0..3 {
            join(k);
        }
        assert!(!engine.try_open().expect("no error"), "a round opened with 3 of 4 registered");
        assert!(engine.status().phase.contains("start_after_registered"), "{}", engine.status().phase);
        join(3);
        assert!(engine.try_open().expect("no error"), "{}", engine.status().phase);
    }
}
