//! A round's privacy cost, computed in one place from the round's public parameters: the
//! coordinator's ledger charges it, the simulator calibrates noise with it, and a client
//! can recompute it from the task it was shown.
//!
//! Distributed mode: the DDGauss encoding is chosen for the round (`DdgParams::select`)
//! with each client adding σ²/(t − c) for a round that accepts t survivors and tolerates c
//! colluders, and its zCDP ρ (Kairouz–Liu–Steinke) counts only the shares of honest
//! survivors: `t − 1 − c` in the merchant unit (the protected merchant's own share and the c
//! colluders', who may add no noise or reveal theirs, excluded), `t − c` in the shopper unit. Poisson sampling at q amplifies it: for the
//! merchant unit under zero-out adjacency by joint convexity
//! (`PrivacyEvent::ZeroOutSampledZcdp`: a merchant that is not sampled takes its noise
//! share with it, so the add/remove bounds do not apply), for the shopper unit by Zhu and
//! Wang (`PrivacyEvent::SubsampledZcdp`: the merchant's share is there either way). Central
//! mode is the subsampled Gaussian with the noise multiplier (the coordinator adds the
//! noise whoever was sampled); local mode (simulator only) is the zero-out bound with the
//! Gaussian's ρ = 1/(2z²). `dangerous_none` costs nothing because it protects nothing.

use crate::accounting::{AccountingError, RdpCurve, calibrate_noise_by, epsilon_from_rdp, gaussian_zcdp_rho};
use crate::dp::{DdgParams, DpError, ParamsRequest, ddgauss_zcdp_rho, ddgauss_zcdp_rho_at};
use crate::ledger::PrivacyEvent;
use crate::{PrivacyMode, PrivacyUnit};

/// Everything that determines one round's privacy cost (all of it public).
#[derive(Clone, Debug, PartialEq)]
pub struct RoundPrivacy {
    pub mode: PrivacyMode,
    /// Whom the round protects: one merchant's update, or one shopper's.
    pub unit: PrivacyUnit,
    /// q: the probability that a merchant (merchant unit, drawn by the coordinator) or a
    /// shopper (shopper unit, drawn by its merchant) is in the round.
    pub sampling_rate: f64,
    /// z: the decoded sum carries noise of standard deviation z·c per coordinate.
    pub noise_multiplier: f64,
    /// c: L2 clip norm of one merchant's update (merchant unit) or one shopper's.
    pub clip_norm: f64,
    /// d: length of the update vector.
    pub dimension: usize,
    /// t: fewest survivors the round accepts.
    pub min_survivors: u32,
    /// c: survivors that may collude against a merchant (add no noise, or reveal theirs)
    /// without the charged ε failing: each client adds σ²/(t − c), and only the other
    /// honest survivors' shares are counted. Stated by the federation, checked by every
    /// merchant against its own floor.
    pub tolerated_colluders: u32,
    /// n: most vectors the sum may hold (for the modulus): the cohort (merchant unit) or a
    /// high-probability bound on the shoppers sampled across the federation (shopper unit).
    pub max_summands: u32,
    /// b: bits of the modular ring.
    pub bit_width: u32,
    /// Accepted probability that some coordinate of the sum wraps around 2^b.
    pub wrap_probability: f64,
}

/// What a round with these parameters costs, and the encoding that achieves it.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundCost {
    pub unit: PrivacyUnit,
    /// The colluding survivors the charged cost tolerates (the request's).
    pub tolerated_colluders: u32,
    /// The DDGauss encoding every client and the server use (also in non-distributed
    /// modes, where it carries no noise and only moves the update through SecAgg+).
    pub ddg: DdgParams,
    /// The ledger event; `None` in `dangerous_none` mode.
    pub event: Option<PrivacyEvent>,
}

/// Why a round's cost cannot be computed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CostError {
    #[error(transparent)]
    Encoding(#[from] DpError),
    #[error(transparent)]
    Accounting(#[from] AccountingError),
}

/// One distributed round's zCDP ρ for one unit, before any amplification by sampling: the
/// DDGauss bound (Kairouz–Liu–Steinke) with sensitivity Δ₂ (one merchant's conditionally
/// rounded update; or one shopper's clipped update through its merchant's shared rounding,
/// `DdgParams::summed_delta2_squared`) and the noise of `t = min_survivors`
/// survivors, less the protected merchant's own share in the merchant unit (`t − 1`
/// shares). In the shopper unit every share counts: the shopper's merchant is the party it
/// trusts with its data, and adding or removing a shopper changes no merchant's share, so
/// the neighbouring outputs differ in mean only. The ledger charges ρ amplified by q; a
/// merchant, which the coordinator knows it sampled, charges a merchant round whole.
///
/// `tolerated_colluders` (c) of the survivors are counted as adding nothing: `t − 1 − c`
/// shares in the merchant unit, `t − c` in the shopper unit (the shopper's own merchant is
/// the party it trusts, so it is not among the colluders).
pub fn round_rho(
    ddg: &DdgParams,
    min_survivors: u32,
    tolerated_colluders: u32,
    unit: PrivacyUnit,
) -> Result<f64, CostError> {
    let honest = min_survivors.saturating_sub(tolerated_colluders);
    Ok(match unit {
        PrivacyUnit::Merchant => ddgauss_zcdp_rho(ddg, honest.saturating_sub(1))?,
        PrivacyUnit::Shopper => ddgauss_zcdp_rho_at(ddg, honest, ddg.summed_delta2_squared())?,
    })
}

/// The shares σ² is split across when a round accepts `min_survivors` (t) and tolerates
/// `tolerated_colluders` (c): `t − c`, so that the honest survivors of any round that
/// completes carry σ² between them; at least 1 (an error in the cost otherwise).
pub fn noise_shares(min_survivors: u32, tolerated_colluders: u32) -> u32 {
    min_survivors.saturating_sub(tolerated_colluders)
}

/// The default number of colluding survivors a round tolerates (the federation's
/// `privacy.tolerated_colluders`) and a merchant requires (`guards.min_tolerated_colluders`).
pub const DEFAULT_TOLERATED_COLLUDERS: u32 = 3;

/// The most colluders a round that accepts `min_survivors` (t) can tolerate and still
/// leave a merchant one honest other share (`t − 2` in the merchant unit) or a shopper its
/// own merchant's (`t − 1` in the shopper unit).
pub fn most_tolerable_colluders(min_survivors: u32, unit: PrivacyUnit) -> u32 {
    match unit {
        PrivacyUnit::Merchant => min_survivors.saturating_sub(2),
        PrivacyUnit::Shopper => min_survivors.saturating_sub(1),
    }
}

/// The colluders a round with threshold t tolerates when `stated` are asked for: `stated`,
/// or as many as t allows when that is fewer (a cohort so small that its active-security
/// threshold is below `stated + 2`; the same rule a merchant applies to its floor, as it
/// does for its share holders). The coordinator and every merchant compute it alike.
pub fn round_colluders(stated: u32, min_survivors: u32, unit: PrivacyUnit) -> u32 {
    stated.min(most_tolerable_colluders(min_survivors, unit))
}

/// The standard deviation, in units of z·c, of the noise in a decoded sum of `survivors`
/// distributed shares, each σ²/(t − c): `√(survivors/(t − c))`, the price in noise of
/// tolerating c colluders (1 when exactly t − c honest shares are summed).
pub fn decoded_noise_multiplier_factor(survivors: u32, min_survivors: u32, tolerated_colluders: u32) -> f64 {
    (f64::from(survivors) / f64::from(noise_shares(min_survivors, tolerated_colluders).max(1))).sqrt()
}

/// A bound on the shoppers that Poisson sampling at rate q draws from N, for the encoding's
/// modulus: `qN + 8·√(qN) + 8`. By Bernstein's inequality the count exceeds it with
/// probability below e^−24 (and exceeding it risks a wrapped coordinate, never privacy).
pub fn sampled_shoppers_bound(shoppers: u64, q: f64) -> u32 {
    let mean = shoppers as f64 * q;
    (mean + 8.0 * mean.sqrt() + 8.0).ceil().min(f64::from(u32::MAX)) as u32
}

/// ε(δ) of zCDP ρ: `ρ + 2·√(ρ·ln(1/δ))` (Bun–Steinke 2016, Prop. 1.3); infinite for infinite ρ.
pub fn zcdp_epsilon(rho: f64, delta: f64) -> f64 {
    if rho.is_infinite() {
        f64::INFINITY
    } else if rho == 0.0 {
        // Also for -0.0, the sum of no rounds' ρ, which would print as "-0.000".
        0.0
    } else {
        rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt()
    }
}

impl RoundPrivacy {
    /// The noise standard deviation the decoded sum must carry: z·c in distributed
    /// mode; none in the other modes (the coordinator adds central noise itself, local
    /// clients add theirs before encoding, `dangerous_none` adds none).
    pub fn distributed_noise_stddev(&self) -> f64 {
        if self.mode == PrivacyMode::Distributed { self.noise_multiplier * self.clip_norm } else { 0.0 }
    }

    /// The round's encoding and privacy event.
    pub fn cost(&self) -> Result<RoundCost, CostError> {
        let ddg = if self.mode.rotates() {
            DdgParams::select(&ParamsRequest {
                dimension: self.dimension,
                clip_norm: self.clip_norm,
                noise_stddev: self.distributed_noise_stddev(),
                noise_shares: noise_shares(self.min_survivors, self.tolerated_colluders),
                max_summands: self.max_summands,
                bit_width: self.bit_width,
                wrap_probability: self.wrap_probability,
            })?
        } else {
            DdgParams::select_unrotated(self.dimension, self.clip_norm, self.max_summands, self.bit_width)?
        };
        let sampling_rate = self.sampling_rate;
        let event = match (self.mode, self.unit) {
            (PrivacyMode::Distributed, PrivacyUnit::Merchant) => Some(PrivacyEvent::ZeroOutSampledZcdp {
                sampling_rate,
                rho: round_rho(&ddg, self.min_survivors, self.tolerated_colluders, self.unit)?,
            }),
            (PrivacyMode::Distributed, PrivacyUnit::Shopper) => Some(PrivacyEvent::SubsampledZcdp {
                sampling_rate,
                rho: round_rho(&ddg, self.min_survivors, self.tolerated_colluders, self.unit)?,
            }),
            (PrivacyMode::Local, PrivacyUnit::Merchant) => Some(PrivacyEvent::ZeroOutSampledZcdp {
                sampling_rate,
                rho: gaussian_zcdp_rho(self.noise_multiplier)?,
            }),
            (PrivacyMode::Central | PrivacyMode::Local, _) => Some(PrivacyEvent::SubsampledGaussian {
                sampling_rate,
                noise_multiplier: self.noise_multiplier,
            }),
            (PrivacyMode::DangerousNone, _) => None,
        };
        Ok(RoundCost { unit: self.unit, tolerated_colluders: self.tolerated_colluders, ddg, event })
    }

    /// The RDP curve of `rounds` rounds of this cost, composed; `None` in `dangerous_none`
    /// mode (nothing is charged).
    pub fn curve_after(&self, rounds: u64) -> Result<Option<RdpCurve>, CostError> {
        match self.cost()?.event {
            Some(event) => Ok(Some(event.curve()?.times(rounds))),
            None => Ok(None),
        }
    }

    /// ε(δ) after `rounds` rounds of this cost; infinite in `dangerous_none` mode.
    pub fn epsilon_after(&self, rounds: u64, delta: f64) -> Result<f64, CostError> {
        match self.curve_after(rounds)? {
            Some(curve) => Ok(epsilon_from_rdp(&curve, delta)?.0),
            None => Ok(f64::INFINITY),
        }
    }
}

/// The smallest z for which `rounds` rounds of `round` (its noise multiplier replaced),
/// after rounds whose composed RDP is `before`, stay within ε = `target` at `delta`, by
/// the cost the ledger charges ([`RoundPrivacy::curve_after`]); the bisection is the
/// workspace's one calibrator ([`calibrate_noise_by`]). An error if no z reaches it (say,
/// `before` alone is past it) or the round has no noise to calibrate (`dangerous_none`).
pub fn calibrate_noise(
    target: f64,
    before: &RdpCurve,
    round: &RoundPrivacy,
    rounds: u64,
    delta: f64,
) -> Result<f64, CostError> {
    calibrate_noise_by(
        |z| {
            let curve = (RoundPrivacy { noise_multiplier: z, ..round.clone() })
                .curve_after(rounds)?
                .ok_or(AccountingError::NoiseMultiplier(0.0))?;
            Ok(epsilon_from_rdp(&before.clone().compose(&curve), delta)?.0)
        },
        target,
    )
}

/// The noise variance of each coordinate of a round's decoded sum of `survivors` encodings,
/// whatever the mode: the distributed shares (carried by `ddg`), the coordinator's own
/// noise in central mode, each client's whole noise in local mode; every encoding's
/// randomised rounding in all of them ([`DdgParams::decoded_noise_variance`]).
pub fn decoded_sum_noise_variance(
    mode: PrivacyMode,
    noise_multiplier: f64,
    clip_norm: f64,
    ddg: &DdgParams,
    survivors: u32,
) -> f64 {
    let sigma_squared = (noise_multiplier * clip_norm).powi(2);
    let added = match mode {
        PrivacyMode::Central => sigma_squared,
        PrivacyMode::Local => f64::from(survivors) * sigma_squared,
        PrivacyMode::Distributed | PrivacyMode::DangerousNone => 0.0,
    };
    ddg.decoded_noise_variance(survivors) + added
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_decoded_sum_carries_each_modes_noise_and_the_roundings() {
        let request = |noise_stddev| ParamsRequest {
            dimension: 100,
            clip_norm: 1.0,
            noise_stddev,
            noise_shares: 4,
            max_summands: 5,
            bit_width: 32,
            wrap_probability: 1e-9,
        };
        let (z, c, n) = (2.0, 0.5, 5);
        let distributed = DdgParams::select(&request(z * c)).expect("feasible");
        let plain = DdgParams::select(&request(0.0)).expect("feasible");
        let rounding = plain.decoded_noise_variance(n);
        let variance = |mode, ddg: &DdgParams| decoded_sum_noise_variance(mode, z, c, ddg, n);
        // Distributed: five shares of σ²/4, σ = z·c = 1.
        assert!(
            (variance(PrivacyMode::Distributed, &distributed) - distributed.decoded_noise_variance(n)).abs()
                < 1e-12
        );
        assert!(distributed.decoded_noise_variance(n) >= 1.25);
        assert!((variance(PrivacyMode::Central, &plain) - (rounding + 1.0)).abs() < 1e-12);
        assert!((variance(PrivacyMode::Local, &plain) - (rounding + 5.0)).abs() < 1e-12);
        assert!((variance(PrivacyMode::DangerousNone, &plain) - rounding).abs() < 1e-12);
    }

    use super::*;

    #[test]
    fn no_rounds_spend_exactly_zero_and_some_spend_the_bun_steinke_figure() {
        let none: f64 = std::iter::empty::<f64>().sum();
        assert_eq!(zcdp_epsilon(none, 1e-6).to_bits(), 0.0_f64.to_bits(), "+0, not -0");
        let rho = 0.125;
        assert_eq!(zcdp_epsilon(rho, 1e-6), rho + 2.0 * (rho * 1e6_f64.ln()).sqrt());
        assert_eq!(zcdp_epsilon(f64::INFINITY, 1e-6), f64::INFINITY);
    }
    use crate::accounting::{RdpCurve, subsampled_gaussian_rdp, zero_out_sampled_zcdp_rdp};

    fn round(mode: PrivacyMode) -> RoundPrivacy {
        RoundPrivacy {
            mode,
            unit: PrivacyUnit::Merchant,
            sampling_rate: 0.1,
            noise_multiplier: 1.0,
            clip_norm: 0.5,
            dimension: 4608,
            min_survivors: 20,
            tolerated_colluders: 0,
            max_summands: 60,
            bit_width: 32,
            wrap_probability: 1e-9,
        }
    }

    #[test]
    fn distributed_cost_is_the_ddgauss_bound_with_t_minus_one_noise_shares() {
        let p = round(PrivacyMode::Distributed);
        let cost = p.cost().expect("cost");
        let rho = ddgauss_zcdp_rho(&cost.ddg, 19).expect("rho");
        assert_eq!(cost.event, Some(PrivacyEvent::ZeroOutSampledZcdp { sampling_rate: 0.1, rho }));
        let by_hand = epsilon_from_rdp(&zero_out_sampled_zcdp_rdp(0.1, rho).expect("rdp").times(8), 1e-5)
            .expect("eps")
            .0;
        assert_eq!(p.epsilon_after(8, 1e-5).expect("eps"), by_hand);
        // More rounds cost more; more noise costs less.
        assert!(p.epsilon_after(16, 1e-5).expect("eps") > by_hand);
        let noisier = RoundPrivacy { noise_multiplier: 2.0, ..p.clone() };
        assert!(noisier.epsilon_after(8, 1e-5).expect("eps") < by_hand);
    }

    #[test]
    fn central_costs_the_subsampled_gaussian_local_its_zero_out_bound_and_none_infinity() {
        let eps = |curve: RdpCurve| epsilon_from_rdp(&curve.times(5), 1e-5).expect("eps").0;
        let central = round(PrivacyMode::Central);
        assert_eq!(
            central.epsilon_after(5, 1e-5).expect("eps"),
            eps(subsampled_gaussian_rdp(0.1, 1.0).expect("rdp"))
        );
        // Local: every merchant adds the whole noise, and only when sampled.
        let local = round(PrivacyMode::Local);
        assert_eq!(
            local.epsilon_after(5, 1e-5).expect("eps"),
            eps(zero_out_sampled_zcdp_rdp(0.1, 0.5).expect("rdp"))
        );
        assert!(local.epsilon_after(5, 1e-5).expect("eps") > central.epsilon_after(5, 1e-5).expect("eps"));
        for p in [central, local] {
            assert_eq!(p.distributed_noise_stddev(), 0.0);
        }
        let none = round(PrivacyMode::DangerousNone);
        assert_eq!(none.cost().expect("cost").event, None);
        assert_eq!(none.epsilon_after(1, 1e-5).expect("eps"), f64::INFINITY);
    }

    #[test]
    fn a_threshold_of_one_leaves_no_other_noise_share_and_is_refused() {
        let p = RoundPrivacy { min_survivors: 1, ..round(PrivacyMode::Distributed) };
        assert!(matches!(
            p.cost(),
            Err(CostError::Encoding(DpError::Parameter { name: "noise_shares", .. }))
        ));
        // In the shopper unit the shopper's own merchant's share counts: one survivor's
        // noise is enough to account for.
        let shopper = RoundPrivacy { unit: PrivacyUnit::Shopper, ..p };
        assert!(shopper.cost().is_ok());
    }

    #[test]
    fn a_shopper_round_counts_every_share_and_its_own_sampling_rate() {
        let merchant = round(PrivacyMode::Distributed);
        let shopper = RoundPrivacy { unit: PrivacyUnit::Shopper, sampling_rate: 0.02, ..merchant.clone() };
        let cost = shopper.cost().expect("cost");
        let rho = ddgauss_zcdp_rho_at(&cost.ddg, 20, cost.ddg.summed_delta2_squared()).expect("rho");
        assert_eq!(cost.unit, PrivacyUnit::Shopper);
        assert_eq!(cost.event, Some(PrivacyEvent::SubsampledZcdp { sampling_rate: 0.02, rho }));
        let merchant_rho = ddgauss_zcdp_rho(&merchant.cost().expect("cost").ddg, 19).expect("rho");
        assert!(rho < merchant_rho, "20 shares of noise, not 19: {rho} vs {merchant_rho}");
    }

    /// Colluding survivors who withhold their noise (add none, or reveal it to the
    /// coordinator) leave a merchant only the other honest survivors' shares. With c
    /// tolerated, every round that completes (s ≥ t survivors, at most c of them colluding)
    /// leaves it at least the noise the ledger charges for; one colluder more than tolerated
    /// does not. Without the tolerance (c = 0, each client adding σ²/t and the ledger counting
    /// t − 1 shares) the same c colluders take ε past the charge: the hole this closes.
    #[test]
    fn colluders_who_withhold_their_noise_stay_within_the_charged_cost() {
        let (t, c) = (17, 9);
        for unit in [PrivacyUnit::Merchant, PrivacyUnit::Shopper] {
            let p = RoundPrivacy {
                unit,
                min_survivors: t,
                tolerated_colluders: c,
                ..round(PrivacyMode::Distributed)
            };
            let cost = p.cost().expect("cost");
            let charged = round_rho(&cost.ddg, t, c, unit).expect("rho");
            // What the merchant (or the shopper's merchant) really gets from `honest` shares.
            let delta2_of = |ddg: &DdgParams| match unit {
                PrivacyUnit::Merchant => ddg.delta2_squared(),
                PrivacyUnit::Shopper => ddg.summed_delta2_squared(),
            };
            let delta2 = delta2_of(&cost.ddg);
            let own = u32::from(unit == PrivacyUnit::Shopper);
            let real = |survivors: u32, colluding: u32| {
                ddgauss_zcdp_rho_at(&cost.ddg, survivors - 1 - colluding + own, delta2).expect("rho")
            };
            for survivors in t..=25 {
                for colluding in 0..=c {
                    assert!(
                        real(survivors, colluding) <= charged * (1.0 + 1e-12),
                        "{unit:?} s={survivors} c={colluding}"
                    );
                }
            }
            assert!(real(t, c + 1) > charged, "{unit:?}: the tolerance is tight");
            // The old accounting: σ²/t each, t − 1 (merchant) or t (shopper) shares counted.
            let naive = RoundPrivacy { tolerated_colluders: 0, ..p.clone() }.cost().expect("cost");
            let naive_charged = round_rho(&naive.ddg, t, 0, unit).expect("rho");
            let naive_real =
                ddgauss_zcdp_rho_at(&naive.ddg, t - 1 - c + own, delta2_of(&naive.ddg)).expect("rho");
            assert!(naive_real > 1.5 * naive_charged, "{unit:?}: {naive_real} vs {naive_charged}");
        }
        // Tolerating c costs noise in the decoded sum: √(s/(t − c)) times z·c.
        assert!((decoded_noise_multiplier_factor(24, 17, 9) - (24.0f64 / 8.0).sqrt()).abs() < 1e-12);
        assert!((decoded_noise_multiplier_factor(17, 17, 0) - 1.0).abs() < 1e-12);
        // A tolerance that leaves no honest other share is refused.
        let none_left =
            RoundPrivacy { min_survivors: 10, tolerated_colluders: 9, ..round(PrivacyMode::Distributed) };
        assert!(none_left.cost().is_err());
    }

    fn shopper_round(q: f64) -> RoundPrivacy {
        RoundPrivacy {
            mode: PrivacyMode::Distributed,
            unit: PrivacyUnit::Shopper,
            sampling_rate: q,
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            dimension: 4096,
            min_survivors: 18,
            tolerated_colluders: 0,
            max_summands: sampled_shoppers_bound(50_000, q),
            bit_width: 32,
            wrap_probability: 1e-9,
        }
    }

    fn curve_at(round: &RoundPrivacy, z: f64, rounds: u64) -> RdpCurve {
        let round = RoundPrivacy { noise_multiplier: z, ..round.clone() };
        round.curve_after(rounds).expect("cost").expect("noised")
    }

    fn spent(parts: &[(&RoundPrivacy, f64, u64)], delta: f64) -> f64 {
        let curve = parts.iter().fold(RdpCurve::zero(), |composed, (round, z, rounds)| {
            composed.compose(&curve_at(round, *z, *rounds))
        });
        epsilon_from_rdp(&curve, delta).expect("ε").0
    }

    /// A release-only schedule spends its ε on the release; a release followed by training
    /// rounds spends its share on the release and the rest, composed, on the training
    /// rounds: the whole stays within the target and reaches it to the bisection's 1e-6.
    #[test]
    fn releases_and_training_rounds_share_the_target_epsilon_composed() {
        let (release, training, delta) = (shopper_round(1.0), shopper_round(0.03), 1e-6);
        let alone = calibrate_noise(3.0, &RdpCurve::zero(), &release, 1, delta).expect("z");
        let total = spent(&[(&release, alone, 1)], delta);
        assert!(total <= 3.0 && total > 3.0 * 0.9999, "{total}");
        let z_release = calibrate_noise(1.5, &RdpCurve::zero(), &release, 1, delta).expect("z");
        assert!(z_release > alone, "half the ε, more noise: {z_release} vs {alone}");
        let before = curve_at(&release, z_release, 1);
        let z = calibrate_noise(3.0, &before, &training, 6, delta).expect("z");
        let total = spent(&[(&release, z_release, 1), (&training, z, 6)], delta);
        assert!(total <= 3.0 && total > 3.0 * 0.9999, "{total}");
        let training_alone = calibrate_noise(3.0, &RdpCurve::zero(), &training, 6, delta).expect("z");
        assert!(z > training_alone, "the rest of the budget needs more noise: {z} vs {training_alone}");
        assert!(
            calibrate_noise(0.01, &before, &training, 6, delta).is_err(),
            "the release alone is past 0.01"
        );
        let none = RoundPrivacy { mode: PrivacyMode::DangerousNone, ..training };
        assert!(calibrate_noise(3.0, &RdpCurve::zero(), &none, 1, delta).is_err(), "nothing to calibrate");
    }
}
