//! A round's privacy cost, computed in one place from the round's public parameters: the
//! coordinator's ledger charges it, the simulator calibrates noise with it, and a client
//! can recompute it from the task it was shown.
//!
//! Distributed mode: the DDGauss encoding is chosen for the round (`DdgParams::select`)
//! and its zCDP ρ (Kairouz–Liu–Steinke) counts the noise of `t − 1` clients, the
//! protected merchant's own share excluded; Poisson sampling at q amplifies it
//! (`PrivacyEvent::SubsampledZcdp`). Central and local modes are the subsampled Gaussian
//! with the noise multiplier. `dangerous_none` costs nothing because it protects nothing.

use crate::PrivacyMode;
use crate::accounting::{AccountingError, epsilon_from_rdp};
use crate::dp::{DdgParams, DpError, ParamsRequest, ddgauss_zcdp_rho};
use crate::ledger::PrivacyEvent;

/// Everything that determines one round's privacy cost (all of it public).
#[derive(Clone, Debug, PartialEq)]
pub struct RoundPrivacy {
    pub mode: PrivacyMode,
    /// q: the probability that a merchant is in the round.
    pub sampling_rate: f64,
    /// z: the decoded sum carries noise of standard deviation z·c per coordinate.
    pub noise_multiplier: f64,
    /// c: L2 clip norm of one merchant's update.
    pub clip_norm: f64,
    /// d: length of the update vector.
    pub dimension: usize,
    /// t: fewest survivors the round accepts (each adds σ²/t of the noise variance).
    pub min_survivors: u32,
    /// n: most clients that may be summed (the cohort).
    pub max_summands: u32,
    /// b: bits of the modular ring.
    pub bit_width: u32,
    /// Accepted probability that some coordinate of the sum wraps around 2^b.
    pub wrap_probability: f64,
}

/// What a round with these parameters costs, and the encoding that achieves it.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundCost {
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

/// One distributed round's zCDP ρ for a merchant that takes part, before any amplification
/// by sampling: the DDGauss bound (Kairouz–Liu–Steinke) with the noise of the `t − 1` other
/// survivors, `t = min_survivors` (the merchant's own share excluded). The ledger charges
/// it amplified by q; a merchant, which the coordinator knows it sampled, charges it whole.
pub fn round_rho(ddg: &DdgParams, min_survivors: u32) -> Result<f64, CostError> {
    Ok(ddgauss_zcdp_rho(ddg, min_survivors.saturating_sub(1))?)
}

/// ε(δ) of zCDP ρ: `ρ + 2·√(ρ·ln(1/δ))` (Bun–Steinke 2016, Prop. 1.3); infinite for infinite ρ.
pub fn zcdp_epsilon(rho: f64, delta: f64) -> f64 {
    if rho.is_infinite() { f64::INFINITY } else { rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt() }
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
        let ddg = DdgParams::select(&ParamsRequest {
            dimension: self.dimension,
            clip_norm: self.clip_norm,
            noise_stddev: self.distributed_noise_stddev(),
            min_survivors: self.min_survivors,
            max_summands: self.max_summands,
            bit_width: self.bit_width,
            wrap_probability: self.wrap_probability,
        })?;
        let event = match self.mode {
            PrivacyMode::Distributed => Some(PrivacyEvent::SubsampledZcdp {
                sampling_rate: self.sampling_rate,
                rho: round_rho(&ddg, self.min_survivors)?,
            }),
            PrivacyMode::Central | PrivacyMode::Local => Some(PrivacyEvent::SubsampledGaussian {
                sampling_rate: self.sampling_rate,
                noise_multiplier: self.noise_multiplier,
            }),
            PrivacyMode::DangerousNone => None,
        };
        Ok(RoundCost { ddg, event })
    }

    /// ε(δ) after `rounds` rounds of this cost; infinite in `dangerous_none` mode.
    pub fn epsilon_after(&self, rounds: u64, delta: f64) -> Result<f64, CostError> {
        match self.cost()?.event {
            Some(event) => Ok(epsilon_from_rdp(&event.curve()?.times(rounds), delta)?.0),
            None => Ok(f64::INFINITY),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::{subsampled_gaussian_rdp, subsampled_zcdp_rdp};

    fn round(mode: PrivacyMode) -> RoundPrivacy {
        RoundPrivacy {
            mode,
            sampling_rate: 0.1,
            noise_multiplier: 1.0,
            clip_norm: 0.5,
            dimension: 4608,
            min_survivors: 20,
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
        assert_eq!(cost.event, Some(PrivacyEvent::SubsampledZcdp { sampling_rate: 0.1, rho }));
        let by_hand =
            epsilon_from_rdp(&subsampled_zcdp_rdp(0.1, rho).expect("rdp").times(8), 1e-5).expect("eps").0;
        assert_eq!(p.epsilon_after(8, 1e-5).expect("eps"), by_hand);
        // More rounds cost more; more noise costs less.
        assert!(p.epsilon_after(16, 1e-5).expect("eps") > by_hand);
        let noisier = RoundPrivacy { noise_multiplier: 2.0, ..p.clone() };
        assert!(noisier.epsilon_after(8, 1e-5).expect("eps") < by_hand);
    }

    #[test]
    fn central_and_local_cost_the_subsampled_gaussian_and_none_costs_infinity() {
        for mode in [PrivacyMode::Central, PrivacyMode::Local] {
            let p = round(mode);
            let expected = epsilon_from_rdp(&subsampled_gaussian_rdp(0.1, 1.0).expect("rdp").times(5), 1e-5)
                .expect("eps")
                .0;
            assert_eq!(p.epsilon_after(5, 1e-5).expect("eps"), expected);
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
    }
}
