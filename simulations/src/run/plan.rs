//! Planning a scenario's federated arms: each arm's privacy unit, its schedule of round
//! kinds and the noise multipliers that keep it within its ε, calibrated with the
//! coordinator's own cost function.

use anyhow::Context as _;
use guild_privacy::accounting::{Neighbours, RdpCurve, calibrate_noise_multiplier};
use guild_privacy::cost::{RoundPrivacy, calibrate_noise, round_colluders};
use guild_privacy::{PrivacyMode, PrivacyUnit};
use guild_proto::round::{RoundKind, Schedule, TrainedPart};

use crate::scenario::{MerchantSelection, Scenario, ShopperDp};
use crate::world::World;

use super::federated::merge_shops;

pub(super) struct FederatedArm {
    pub(super) name: String,
    pub(super) mode: PrivacyMode,
    pub(super) unit: PrivacyUnit,
    /// The shopper-level arms' settings (the unit is then `Shopper`).
    pub(super) shopper: Option<ShopperDp>,
    /// z of the training rounds (0 when the arm runs none).
    pub(super) noise_multiplier: f64,
    /// The round kinds before training (shopper-level arms, and merchant-level ones with a
    /// selection), in the coordinator's order.
    pub(super) schedule: Schedule,
    /// z of the popularity releases and of the pooling selection (0 when the schedule has none).
    pub(super) popularity_noise_multiplier: f64,
    pub(super) selection_noise_multiplier: f64,
    /// c of the pooling selection where it is not the arm's clip norm (merchant-level arms).
    pub(super) selection_clip_norm: Option<f64>,
    /// The merchants' sampling rate in a merchant-level selection.
    pub(super) selection_rate: f64,
    pub(super) epsilon_cap: f64,
    pub(super) delta: f64,
    /// Every round the arm runs: its popularity releases and its training rounds.
    pub(super) rounds: u64,
    /// Kill the coordinator after this many committed rounds (and restart it).
    pub(super) kill_after: Option<u64>,
}

impl FederatedArm {
    /// An arm whose unit is the merchant and whose every round trains: `noise_multiplier`
    /// z in `mode` (0 in `dangerous_none`), capped at `epsilon_cap` at `delta`.
    fn merchant_level(
        name: String,
        mode: PrivacyMode,
        noise_multiplier: f64,
        epsilon_cap: f64,
        delta: f64,
        rounds: u64,
    ) -> Self {
        Self {
            name,
            mode,
            unit: PrivacyUnit::Merchant,
            shopper: None,
            noise_multiplier,
            schedule: Schedule::default(),
            popularity_noise_multiplier: 0.0,
            selection_noise_multiplier: 0.0,
            selection_clip_norm: None,
            selection_rate: 1.0,
            epsilon_cap,
            delta,
            rounds,
            kill_after: None,
        }
    }
}

/// Every federated arm the scenario asks for, in order, with its noise calibrated by the
/// coordinator's own cost (`guild_privacy::cost::calibrate_noise`) from the coordinator's
/// schedule of round kinds; and the expected merchant-level cohort. The DP arms run in
/// `private` (the world of the scenario's `dp_tower`, or `world`), and their dimensions are
/// its.
pub(super) fn plan(world: &World, private: &World, s: &Scenario) -> anyhow::Result<(Vec<FederatedArm>, f64)> {
    let f = &s.federation;
    let n = world.merchants.len();
    // Merchant-level arms train the whole adapter; each round kind's cost is over the
    // coordinates it sums, as the coordinator charges it.
    let d = private.summed(RoundKind::Training, TrainedPart::Whole);
    let delta = s.delta(n);
    // The arms whose coordinator is killed (and restarted) after some round.
    let killed = |index: usize| {
        s.faults.kill_coordinator_after_round.is_some()
            && (index == 0 || !s.faults.kill_coordinator_in_first_arm_only)
    };
    let kill_after = |index: usize| s.faults.kill_coordinator_after_round.filter(|_| killed(index));
    let mut plan = Vec::new();
    if s.arms.federated {
        let releases = u64::from(f.release_parts);
        let arm = FederatedArm::merchant_level(
            "federated (non-private)".into(),
            PrivacyMode::DangerousNone,
            0.0,
            1e9,
            delta,
            f.rounds + releases,
        );
        // Its partitioned releases (if any) come first, then its training rounds.
        let schedule = Schedule { popularity_releases: f.release_parts, pooling_selection: false };
        plan.push(FederatedArm { kill_after: kill_after(plan.len()), schedule, ..arm });
    }
    let expected = f.sampling_rate * n as f64;
    // Calibrate for a generous cohort (mean + 4 sd): larger cohorts give a coarser γ and a
    // slightly larger ρ per round, so actual rounds stay within the cap.
    let generous = |q: f64| {
        let (mean, n) = (q * n as f64, n as f64);
        ((mean + 4.0 * (mean * (1.0 - q)).sqrt()).ceil().min(n) as u32).max(f.threshold)
    };
    let round = RoundPrivacy {
        mode: PrivacyMode::Distributed,
        unit: PrivacyUnit::Merchant,
        sampling_rate: f.sampling_rate,
        noise_multiplier: 1.0,
        clip_norm: f.clip_norm,
        dimension: d,
        min_survivors: f.threshold,
        tolerated_colluders: round_colluders(f.tolerated_colluders, f.threshold, PrivacyUnit::Merchant),
        max_summands: generous(f.sampling_rate),
        bit_width: guild_coordinator::config::PrivacyConfig::default().bit_width,
        wrap_probability: guild_coordinator::config::PrivacyConfig::default().wrap_probability,
    };
    let dp_rounds = s.arms.dp_rounds.unwrap_or(f.rounds);
    // Calibrated for one round more than planned: a round that aborts in Unmask was charged
    // before its shares were asked for (and is never refunded), so the cap must leave room
    // for one such round or the arm would end short. An arm whose coordinator is killed
    // gets room for one more: the kill can land after the open round's charge.
    let charged_rounds = |index: usize| dp_rounds + 1 + u64::from(killed(index));
    let selection_rate = |sel: &MerchantSelection| sel.sampling_rate.unwrap_or(f.sampling_rate);
    // A merchant-level pooling selection, at its fixed z, is charged first (merchants
    // sampled at its own rate, the training rounds' by default); the training rounds get
    // what it leaves.
    let selection = match &s.arms.dp_selection {
        Some(sel) => Some((
            sel,
            (RoundPrivacy {
                noise_multiplier: sel.noise_multiplier,
                clip_norm: sel.clip_norm,
                dimension: private.summed(RoundKind::PoolingSelection, TrainedPart::Whole),
                sampling_rate: selection_rate(sel),
                max_summands: generous(selection_rate(sel)),
                ..round.clone()
            })
            .curve_after(1)?
            .context("a selection without noise")?,
        )),
        None => None,
    };
    for &epsilon in &s.arms.distributed_dp_epsilons {
        let before = selection.as_ref().map_or_else(RdpCurve::zero, |(_, curve)| curve.clone());
        let z = calibrate_noise(epsilon, &before, &round, charged_rounds(plan.len()), delta)?;
        let arm = FederatedArm::merchant_level(
            format!("federated DP ε={epsilon}"),
            PrivacyMode::Distributed,
            z,
            epsilon,
            delta,
            dp_rounds,
        );
        let arm = match &selection {
            Some((sel, _)) => FederatedArm {
                schedule: Schedule { popularity_releases: 0, pooling_selection: true },
                selection_noise_multiplier: sel.noise_multiplier,
                selection_clip_norm: Some(sel.clip_norm),
                selection_rate: selection_rate(sel),
                rounds: dp_rounds + 1,
                ..arm
            },
            None => arm,
        };
        plan.push(FederatedArm { kill_after: kill_after(plan.len()), ..arm });
    }
    for &epsilon in &s.arms.central_dp_epsilons {
        let z = calibrate_noise_multiplier(
            Neighbours::AddRemove,
            f.sampling_rate,
            charged_rounds(plan.len()),
            delta,
            epsilon,
        )?;
        let arm = FederatedArm::merchant_level(
            format!("central DP ε={epsilon}"),
            PrivacyMode::Central,
            z,
            epsilon,
            delta,
            dp_rounds,
        );
        plan.push(FederatedArm { kill_after: kill_after(plan.len()), ..arm });
    }
    if let Some(sh) = &s.arms.shopper_dp {
        let merchants = merge_shops(&world.merchants, sh.merge_shops).len() as u32;
        let shoppers = world.merchants.iter().map(|m| m.users.len()).sum::<usize>() as u64;
        let shopper_delta = sh.delta.unwrap_or_else(|| 1e-6f64.min(1.0 / (shoppers as f64).powf(1.1)));
        let shopper_threshold =
            f.threshold.max(guild_privacy::secagg::min_active_threshold(merchants.saturating_sub(1)));
        let round = RoundPrivacy {
            mode: PrivacyMode::Distributed,
            unit: PrivacyUnit::Shopper,
            sampling_rate: sh.sampling_rate,
            noise_multiplier: 1.0,
            clip_norm: sh.clip_norm,
            dimension: private.summed(RoundKind::Training, sh.trained),
            // Every merchant is in the complete-graph cohort: the threshold the coordinator
            // raises each round to.
            min_survivors: shopper_threshold,
            tolerated_colluders: round_colluders(
                f.tolerated_colluders,
                shopper_threshold,
                PrivacyUnit::Shopper,
            ),
            max_summands: guild_privacy::cost::sampled_shoppers_bound(shoppers, sh.sampling_rate),
            bit_width: guild_coordinator::config::PrivacyConfig::default().bit_width,
            wrap_probability: guild_coordinator::config::PrivacyConfig::default().wrap_probability,
        };
        // The statistic rounds (releases, selection): every merchant's shoppers sampled at
        // the kind's own rate, the sum bounded accordingly.
        let sampled_at = |q: f64, kind: RoundKind| RoundPrivacy {
            sampling_rate: q,
            max_summands: guild_privacy::cost::sampled_shoppers_bound(shoppers, q),
            dimension: private.summed(kind, TrainedPart::Whole),
            ..round.clone()
        };
        let statistic = sampled_at(sh.popularity_sampling_rate, RoundKind::PopularityRelease);
        // The coordinator's schedule of the arm's rounds, and how many of each kind it runs.
        let schedule = sh.schedule();
        let total = schedule.statistic_rounds() + sh.rounds;
        let (releases, training) =
            (schedule.count(RoundKind::PopularityRelease, total), schedule.count(RoundKind::Training, total));
        // The pooling selection, at its fixed z, is charged first; the rest is calibrated
        // to what it leaves.
        let selection = match sh.selection_noise_multiplier {
            Some(z) => (RoundPrivacy {
                noise_multiplier: z,
                ..sampled_at(sh.selection_rate(), RoundKind::PoolingSelection)
            })
            .curve_after(schedule.count(RoundKind::PoolingSelection, total))?
            .context("a selection without noise")?,
            None => RdpCurve::zero(),
        };
        for &epsilon in &s.arms.shopper_dp_epsilons {
            // Room for one round charged and then aborted (two if the coordinator is
            // killed before its last round), as for the other DP arms; a statistics-only arm
            // is calibrated for its releases alone and one more only if killed before its
            // last (every merchant is in each round: an abort needs a third of them to fail
            // at once).
            let spare = u64::from(
                killed(plan.len()) && s.faults.kill_coordinator_after_round.is_some_and(|k| k < total),
            );
            let (z_release, z) = if training == 0 {
                let z_release = if releases == 0 {
                    0.0
                } else {
                    calibrate_noise(epsilon, &selection, &statistic, releases + spare, shopper_delta)?
                };
                (z_release, 0.0)
            } else if releases == 0 {
                (0.0, calibrate_noise(epsilon, &selection, &round, training + 1 + spare, shopper_delta)?)
            } else {
                // (Scenario validation requires the share when both kinds of round run; the
                // selection's cost counts towards the releases' share.)
                let share = sh.popularity_budget.context("arms.shopper_dp.popularity_budget")?;
                let z_release =
                    calibrate_noise(share * epsilon, &selection, &statistic, releases, shopper_delta)?;
                let before = (RoundPrivacy { noise_multiplier: z_release, ..statistic.clone() })
                    .curve_after(releases)?
                    .context("a release without noise")?
                    .compose(&selection);
                let z = calibrate_noise(epsilon, &before, &round, training + 1 + spare, shopper_delta)?;
                (z_release, z)
            };
            plan.push(FederatedArm {
                name: format!("shopper-level DP ε={epsilon}"),
                mode: PrivacyMode::Distributed,
                unit: PrivacyUnit::Shopper,
                shopper: Some(sh.clone()),
                noise_multiplier: z,
                schedule,
                popularity_noise_multiplier: z_release,
                selection_noise_multiplier: sh.selection_noise_multiplier.unwrap_or(0.0),
                selection_clip_norm: None,
                selection_rate: 1.0,
                epsilon_cap: epsilon,
                delta: shopper_delta,
                rounds: total,
                kill_after: kill_after(plan.len()),
            });
        }
    }
    Ok((plan, expected))
}
