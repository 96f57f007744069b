//! Differential privacy of one client's update: clipping, the distributed discrete
//! Gaussian encoder (DDGauss, Kairouz, Liu, Steinke ICML 2021), the exact discrete
//! Gaussian samplers it draws noise from, and the central and local modes kept for
//! comparison.

mod clip;
mod ddgauss;
mod discrete_gaussian;
mod gaussian;
mod hadamard;
mod sampling;
mod shrinkage;

pub use clip::{clip_l2, l2_norm};
pub use ddgauss::{
    DdgEncoding, DdgParams, DdgSum, ParamsRequest, add_mod, ddgauss_zcdp_rho, ddgauss_zcdp_rho_at,
    encoded_length,
};
pub use discrete_gaussian::{Cks20Sampler, DiscreteGaussianSampler, OpenDpSampler, Rational};
pub use gaussian::{add_central_noise, privatise_local};
pub use hadamard::{RandomRotation, fwht};
pub use sampling::poisson_sample;
pub use shrinkage::{james_stein, max_normal_quantile, noise_exceedances};

/// What can go wrong when privatising or decoding an update.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DpError {
    #[error("invalid parameter {name}: {reason}")]
    Parameter { name: &'static str, reason: String },
    #[error(
        "modulus 2^{bit_width} is too small for {summands} clients at a wrap-around probability of {wrap_probability:e}: \
         raise bit_width or the wrap-around probability, or lower the cohort"
    )]
    ModulusTooSmall { bit_width: u32, summands: u32, wrap_probability: f64 },
    #[error(
        "the granularity γ = {gamma:e} leaves a scaled local noise deviation of {scaled_stddev:.3}, below the minimum 2 \
         that keeps the privacy bound's τ term small: raise bit_width"
    )]
    GranularityTooCoarse { gamma: f64, scaled_stddev: f64 },
    #[error("vector has {actual} coordinates, the encoding expects {expected}")]
    Dimension { expected: usize, actual: usize },
    #[error("update contains a non-finite value at coordinate {index}")]
    NonFinite { index: usize },
    #[error("conditional rounding did not meet the norm bound in {tries} tries")]
    RoundingFailed { tries: u32 },
    #[error("the reference sampler failed: {0}")]
    Reference(String),
}
