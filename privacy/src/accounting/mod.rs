//! Privacy accounting: Rényi DP of the Poisson-subsampled Gaussian (Mironov, Talwar,
//! Zhang 2019), of subsampled zCDP mechanisms (the distributed discrete Gaussian; add/remove
//! neighbours by Zhu and Wang, zero-out neighbours by joint convexity for the merchant unit,
//! whose noise leaves with it), their composition and conversion to (ε, δ), and noise
//! calibration.
//!
//! All curves are evaluated at the integer orders α = 2..=256, the grid Google's
//! `dp_accounting` uses; the fixture test reproduces its values.

mod rdp;

pub use rdp::{
    AccountingError, Neighbours, ORDERS, RdpCurve, calibrate_noise_by, calibrate_noise_multiplier,
    epsilon_from_rdp, gaussian_zcdp_rho, sampled_gaussian_curve, subsampled_gaussian_rdp,
    subsampled_zcdp_rdp, zero_out_sampled_zcdp_rdp,
};
