//! What a federation's configuration will do to its model and its budget, said before any
//! round runs (`guild-coordinator privacy plan`, checked by `serve` at start, printed by the
//! simulator for each DP arm): for each round kind, the summands a round expects, the noise
//! of the averaged update against the clip norm, and the ε the planned rounds spend.
//!
//! The noise-to-clip ratio is `√(d·v)/m / c`: `v` the noise variance of each coordinate of a
//! decoded sum (`guild_privacy::cost::decoded_sum_noise_variance`: every mode's noise, each
//! share's σ²/(t − colluders) in distributed mode, and the rounding), `d` the dimension, `m`
//! the expected summands the sum is averaged over, `c` the clip norm. A clipped update has
//! norm at most `c`, so a ratio above [`MAX_NOISE_TO_CLIP`] means the noise in one averaged
//! step is larger than any one unit's whole contribution: training with the raw noisy sum
//! then walks at random (it destroyed the model in the default scenario's merchant-level arm
//! before shrinkage: a ratio of about 20).

use guild_privacy::accounting::{RdpCurve, epsilon_from_rdp};
use guild_privacy::cost::{RoundPrivacy, decoded_sum_noise_variance};
use guild_privacy::{PrivacyMode, PrivacyUnit};
use guild_proto::round::RoundKind;
use serde::Serialize;

use guild_proto::domain::AdapterManifest;

use crate::config::{Config, Shrinkage};

/// The largest noise-to-clip ratio of a training round that `serve` starts with when the
/// server applies the raw noisy sum (`rounds.shrinkage = "none"`), unless
/// `privacy.dangerous_allow_noise_above_clip` is set.
pub const MAX_NOISE_TO_CLIP: f64 = 1.0;

/// Longest run of training rounds the planner counts when the federation runs until its
/// budget is spent (`rounds.max_rounds = 0`).
const MAX_PLANNED_ROUNDS: u64 = 100_000;

/// One round kind's plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KindPlan {
    pub kind: RoundKind,
    /// Rounds of this kind the federation runs: as scheduled, or, for training with no
    /// `max_rounds`, as many as the budget affords after the others.
    pub rounds: u64,
    pub unit: PrivacyUnit,
    /// q: the rate at which the unit is sampled (a partitioned release: the share of the
    /// merchants in each of its parts, none sampled).
    pub sampling_rate: f64,
    /// Whether the rounds take disjoint parts of the merchants instead of sampling them
    /// (`rounds.popularity_release.partition`).
    pub partitioned: bool,
    pub noise_multiplier: f64,
    /// Merchants expected in a round's cohort.
    pub expected_cohort: f64,
    /// What a round's sum is averaged over: the expected merchants or shoppers.
    pub expected_summands: f64,
    /// The fewest survivors a round of that cohort accepts, and the colluders it tolerates.
    pub threshold: u32,
    pub tolerated_colluders: u32,
    /// The adapter coordinates a round of this kind sums (`d` below).
    pub summed: usize,
    /// `√(d·v)/m / c`: the noise norm of the averaged update against the clip norm.
    pub noise_to_clip: f64,
    /// ε after this kind's rounds alone, at the federation's δ.
    pub epsilon: f64,
}

/// The whole plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PrivacyPlan {
    pub mode: PrivacyMode,
    pub merchants: u64,
    pub dimension: usize,
    pub clip_norm: f64,
    pub kinds: Vec<KindPlan>,
    /// ε after every planned round, composed, at `delta`.
    pub epsilon: f64,
    pub delta: f64,
    pub epsilon_budget: f64,
    /// Training rounds whose noise-to-clip ratio is above [`MAX_NOISE_TO_CLIP`], and what
    /// the server does about it.
    pub warnings: Vec<String>,
}

/// A round of one kind as the planner expects it: its privacy at the expected cohort.
struct Expected {
    round: RoundPrivacy,
    /// Merchants expected in the cohort, and that rounded (at least 2).
    cohort: f64,
    n: u32,
    /// The threshold the coordinator raises such a round to.
    t: u32,
    /// What its sum is averaged over.
    summands: f64,
}

/// A round of `kind` of `config` over `manifest`'s adapter (the coordinates a round of that
/// kind sums), at the cohort expected of `merchants` allowed merchants (the daemon computes
/// the same from the cohort it draws).
fn expected_round(config: &Config, kind: RoundKind, manifest: &AdapterManifest, merchants: u64) -> Expected {
    let privacy = config.kind_privacy(kind);
    let cohort = (privacy.merchant_rate * merchants as f64).max(f64::from(config.rounds.min_cohort));
    let n = cohort.round().max(2.0) as u32;
    let round = config.round_privacy(kind, n, manifest);
    let t = round.min_survivors;
    let summands = match config.privacy.unit {
        PrivacyUnit::Merchant => cohort,
        PrivacyUnit::Shopper => privacy.unit_rate * config.privacy.shoppers as f64,
    };
    Expected { round, cohort, n, t, summands }
}

/// Whether the daemon would refuse the next round for the budget, as `status` reports it:
/// the round of the kind the schedule runs after `latest_version`, at the cohort expected of
/// `merchants`, would take the ledger's ε past `privacy.epsilon_budget` (the daemon checks
/// the same with the cohort it draws; spent ε alone can be below the cap while no round fits).
pub fn next_round_exhausts(
    config: &Config,
    ledger: &guild_privacy::ledger::Ledger,
    latest_version: u64,
    merchants: u64,
) -> anyhow::Result<bool> {
    let manifest = config.manifest()?;
    let kind = config.schedule(&manifest).kind_after(latest_version);
    let cost = expected_round(config, kind, &manifest, merchants).round.cost()?;
    Ok(match &cost.event {
        Some(event) => ledger.spent_if(cost.unit, event)?.epsilon > config.privacy.epsilon_budget,
        None => false,
    })
}

/// The plan of `config` for a federation of `merchants` allowed merchants.
pub fn plan(config: &Config, merchants: u64) -> anyhow::Result<PrivacyPlan> {
    let manifest = config.manifest()?;
    let d = manifest.parameter_count();
    let schedule = config.schedule(&manifest);
    let p = &config.privacy;
    let delta = p.delta;
    let scheduled = |kind: RoundKind| -> u64 {
        match kind {
            RoundKind::PopularityRelease => u64::from(schedule.popularity_releases),
            RoundKind::PoolingSelection => u64::from(schedule.pooling_selection),
            RoundKind::Training if config.rounds.max_rounds > 0 => {
                schedule.count(RoundKind::Training, config.rounds.max_rounds)
            }
            RoundKind::Training => MAX_PLANNED_ROUNDS,
        }
    };
    let mut kinds = Vec::new();
    let mut composed = RdpCurve::zero();
    let mut warnings = Vec::new();
    for kind in [RoundKind::PopularityRelease, RoundKind::PoolingSelection, RoundKind::Training] {
        let mut rounds = scheduled(kind);
        if rounds == 0 {
            continue;
        }
        let privacy = config.kind_privacy(kind);
        let Expected { round, cohort, n, t, summands } = expected_round(config, kind, &manifest, merchants);
        let cost = round.cost()?;
        let c = config.clip_norm(kind);
        let variance = decoded_sum_noise_variance(p.mode, privacy.noise_multiplier, c, &cost.ddg, n);
        // The noise that reaches the model: over the coordinates the round sums.
        let moved = round.dimension;
        let noise_to_clip = (moved as f64 * variance).sqrt() / summands.max(1.0) / c;
        // Training without a round limit runs until the budget is spent: count those rounds.
        if kind == RoundKind::Training
            && config.rounds.max_rounds == 0
            && p.mode != PrivacyMode::DangerousNone
        {
            rounds = affordable(&round, &composed, p.epsilon_budget, delta)?;
        }
        let curve = round.curve_after(rounds)?;
        let epsilon = match &curve {
            Some(c) => epsilon_from_rdp(c, delta)?.0,
            None => f64::INFINITY,
        };
        if let Some(c) = &curve {
            composed = composed.compose(c);
        }
        if kind == RoundKind::Training
            && p.mode != PrivacyMode::DangerousNone
            && noise_to_clip > MAX_NOISE_TO_CLIP
        {
            warnings.push(match config.rounds.shrinkage {
                Shrinkage::JamesStein => format!(
                    "a training round's noise ({noise_to_clip:.2} times the clip norm in the averaged update) is \
                     above {MAX_NOISE_TO_CLIP}: the server shrinks each noisy sum by its James-Stein factor, so a \
                     round that is mostly noise moves the model little, but expect little gain from training"
                ),
                Shrinkage::None => format!(
                    "a training round's noise ({noise_to_clip:.2} times the clip norm in the averaged update) is \
                     above {MAX_NOISE_TO_CLIP} and the server applies the raw noisy sum (rounds.shrinkage = \
                     \"none\"): training would walk the model at random"
                ),
            });
        }
        kinds.push(KindPlan {
            kind,
            rounds,
            unit: p.unit,
            sampling_rate: privacy.unit_rate,
            partitioned: kind == RoundKind::PopularityRelease && config.release_parts().is_some(),
            noise_multiplier: privacy.noise_multiplier,
            expected_cohort: cohort,
            expected_summands: summands,
            threshold: t,
            tolerated_colluders: round.tolerated_colluders,
            summed: round.dimension,
            noise_to_clip,
            epsilon,
        });
    }
    let epsilon = if p.mode == PrivacyMode::DangerousNone {
        f64::INFINITY
    } else {
        epsilon_from_rdp(&composed, delta)?.0
    };
    Ok(PrivacyPlan {
        mode: p.mode,
        merchants,
        dimension: d,
        clip_norm: p.clip_norm,
        kinds,
        epsilon,
        delta,
        epsilon_budget: p.epsilon_budget,
        warnings,
    })
}

/// How many rounds of `round` fit in `budget` after `before` (the ledger refuses the one
/// that would cross it).
fn affordable(round: &RoundPrivacy, before: &RdpCurve, budget: f64, delta: f64) -> anyhow::Result<u64> {
    let fits = |rounds: u64| -> anyhow::Result<bool> {
        let Some(curve) = round.curve_after(rounds)? else { return Ok(true) };
        Ok(epsilon_from_rdp(&before.clone().compose(&curve), delta)?.0 <= budget)
    };
    let (mut low, mut high) = (0u64, MAX_PLANNED_ROUNDS);
    if fits(high)? {
        return Ok(high);
    }
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if fits(mid)? { low = mid } else { high = mid }
    }
    Ok(low)
}

/// `Err` with the reason when `serve` must not start this plan: a DP training round whose
/// noise is above [`MAX_NOISE_TO_CLIP`] times the clip norm while the server applies the raw
/// sum, unless `privacy.dangerous_allow_noise_above_clip`.
pub fn refuse(config: &Config, plan: &PrivacyPlan) -> Result<(), String> {
    if config.rounds.shrinkage != Shrinkage::None || config.privacy.dangerous_allow_noise_above_clip {
        return Ok(());
    }
    match plan.kinds.iter().find(|k| k.kind == RoundKind::Training && k.noise_to_clip > MAX_NOISE_TO_CLIP) {
        Some(k) if plan.mode != PrivacyMode::DangerousNone => Err(format!(
            "training rounds would carry noise {:.2} times the clip norm in each averaged update (above \
             {MAX_NOISE_TO_CLIP}) and rounds.shrinkage is \"none\": they would destroy the model. Sample more \
             merchants or shoppers per round, train fewer rounds, turn shrinkage on, or set \
             privacy.dangerous_allow_noise_above_clip = true",
            k.noise_to_clip
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::MINIMAL;

    const ROUNDS: &str = r#"
        [rounds]
        min_cohort = 15
        threshold = 10
        max_rounds = 3
        [rounds.training]
        sampling_rate = 0.05
        noise_multiplier = 0.9
        [privacy]
        clip_norm = 10.0
    "#;

    fn config(more: &[(&str, &str)]) -> Config {
        Config::parse(
            &format!("{MINIMAL}{ROUNDS}"),
            more.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
        .expect("valid")
    }

    /// The disagreement an operator saw: spent ε below the budget while the daemon refuses
    /// the next round, which would cross it. `status` now asks what the daemon asks.
    #[test]
    fn the_budget_is_exhausted_when_the_next_round_would_cross_it_not_only_once_crossed() {
        use guild_privacy::ledger::{Budget, Ledger, LedgerEntry};
        // One round at z = 0.9 over the default scenario's cohorts costs a few ε; a budget a
        // little above one round's ε holds one round and not two.
        let one = config(&[]);
        let manifest = one.manifest().expect("manifest");
        let kind = one.schedule(&manifest).kind_after(0);
        let cost = expected_round(&one, kind, &manifest, 508).round.cost().expect("cost");
        let event = cost.event.expect("a DP round");
        let fresh = Ledger::new(Budget { epsilon: 1e9, delta: 1e-5 }, Vec::new()).expect("ledger");
        let one_round = fresh.spent_if(cost.unit, &event).expect("spent").epsilon;
        let budget = (one_round * 1.2).to_string();
        let config = config(&[("GUILD_PRIVACY__EPSILON_BUDGET", budget.as_str())]);
        let empty =
            Ledger::new(Budget { epsilon: one_round * 1.2, delta: 1e-5 }, Vec::new()).expect("ledger");
        assert!(!next_round_exhausts(&config, &empty, 0, 508).expect("status"));
        let entry = LedgerEntry { round_id: 1, unit: cost.unit, event };
        let charged =
            Ledger::new(Budget { epsilon: one_round * 1.2, delta: 1e-5 }, vec![entry]).expect("ledger");
        let spent = charged.spent(cost.unit).expect("spent").epsilon;
        assert!(spent < one_round * 1.2, "below the budget: {spent}");
        assert!(next_round_exhausts(&config, &charged, 1, 508).expect("status"), "no second round fits");
    }

    /// The default scenario's merchant-level arm (about 25 of 508 merchants a round, z ≈ 0.9,
    /// d in the hundred thousands): the averaged update's noise is many times the clip norm,
    /// and the figure follows √d·z/m.
    #[test]
    fn the_plan_states_the_noise_of_an_averaged_update_against_the_clip_norm() {
        let plan = plan(&config(&[]), 508).expect("plan");
        let training = plan.kinds.iter().find(|k| k.kind == RoundKind::Training).expect("training");
        assert_eq!(training.rounds, 3);
        assert!((training.expected_summands - 25.4).abs() < 1e-9);
        let d = plan.dimension as f64;
        // Each of ~25 survivors adds σ²/(t − c): the decoded noise is at least z·c·√(d·25/(t − c)).
        let floor =
            0.9 * (d * 25.0 / f64::from(training.threshold - training.tolerated_colluders)).sqrt() / 25.4;
        assert!(training.noise_to_clip >= floor * 0.99, "{} vs {floor}", training.noise_to_clip);
        assert!(training.noise_to_clip > 5.0, "{}", training.noise_to_clip);
        assert!(plan.epsilon.is_finite() && plan.epsilon > 0.0);
        assert!((plan.epsilon - training.epsilon).abs() < 1e-9, "training is the only kind");
        // With shrinkage (the default) serve starts and warns; with the raw sum it refuses,
        // unless the dangerous setting says otherwise.
        assert_eq!(plan.warnings.len(), 1);
        assert!(refuse(&config(&[]), &plan).is_ok());
        let raw = config(&[("GUILD_ROUNDS__SHRINKAGE", "none")]);
        let error = refuse(&raw, &super::plan(&raw, 508).expect("plan")).expect_err("refused");
        assert!(error.contains("would destroy the model"), "{error}");
        let allowed = config(&[
            ("GUILD_ROUNDS__SHRINKAGE", "none"),
            ("GUILD_PRIVACY__DANGEROUS_ALLOW_NOISE_ABOVE_CLIP", "true"),
        ]);
        assert!(refuse(&allowed, &super::plan(&allowed, 508).expect("plan")).is_ok());
        // More merchants per round: less noise per averaged step.
        let crowded =
            super::plan(&config(&[("GUILD_ROUNDS__TRAINING__SAMPLING_RATE", "1.0")]), 508).expect("plan");
        let crowded = crowded.kinds.iter().find(|k| k.kind == RoundKind::Training).expect("training");
        assert!(crowded.noise_to_clip < training.noise_to_clip / 3.0);
    }

    /// A partitioned release (no noise) is planned as what it is: its rounds, each about
    /// `1/rounds` of the merchants, none sampled, and no ε bound (nothing is noised).
    #[test]
    fn a_partitioned_release_is_planned_as_parts_of_the_merchants() {
        let partitioned = config(&[
            ("GUILD_PRIVACY__MODE", "dangerous_none"),
            ("GUILD_ADAPTER__FAMILY", "sequence_tower"),
            ("GUILD_ADAPTER__TOWER__CATALOGUE", "100"),
            ("GUILD_ROUNDS__MAX_ROUNDS", "25"),
            ("GUILD_ROUNDS__POPULARITY_RELEASE__ROUNDS", "20"),
            ("GUILD_ROUNDS__POPULARITY_RELEASE__PARTITION", "true"),
        ]);
        let plan = plan(&partitioned, 508).expect("plan");
        let release = plan.kinds.iter().find(|k| k.kind == RoundKind::PopularityRelease).expect("release");
        assert!(release.partitioned);
        assert_eq!(release.rounds, 20);
        assert!((release.expected_cohort - 25.4).abs() < 1e-9, "{}", release.expected_cohort);
        assert!(release.epsilon.is_infinite(), "{}", release.epsilon);
        let training = plan.kinds.iter().find(|k| k.kind == RoundKind::Training).expect("training");
        assert!(!training.partitioned);
        assert_eq!(training.rounds, 5);
    }

    /// With no round limit the planner counts the training rounds the budget affords.
    #[test]
    fn without_a_round_limit_the_plan_spends_the_budget() {
        let plan = plan(&config(&[("GUILD_ROUNDS__MAX_ROUNDS", "0")]), 508).expect("plan");
        let training = plan.kinds.iter().find(|k| k.kind == RoundKind::Training).expect("training");
        assert!(training.rounds > 3, "{}", training.rounds);
        assert!(plan.epsilon <= plan.epsilon_budget, "{} > {}", plan.epsilon, plan.epsilon_budget);
    }
}
