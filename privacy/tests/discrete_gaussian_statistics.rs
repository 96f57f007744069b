//! Statistical tests of the exact discrete Gaussian samplers.
//!
//! Each test uses a fixed seed, so it is deterministic; the thresholds are chosen so that
//! a correct sampler with a fresh seed would fail with probability at most 1e-6 per test
//! (the chi-square quantile at 1 − 1e-6). The OpenDP reference draws from its own thread
//! generator and cannot be seeded: the two-sample test is random on that side, with the
//! same 1e-6 false-failure rate.

use guild_privacy::dp::{Cks20Sampler, DiscreteGaussianSampler, OpenDpSampler, Rational};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use statrs::distribution::{ChiSquared, ContinuousCDF};

const FALSE_FAILURE_RATE: f64 = 1e-6;

/// Bins of integers `[lo, hi)` covering ±6σ, each wide enough to expect ≥ 50 draws,
/// plus the two tails.
fn bins(sigma: f64, draws: usize) -> Vec<(i64, i64)> {
    let half = (6.0 * sigma).ceil() as i64 + 1;
    let count = ((draws as f64 / 50.0).sqrt().min(2.0 * half as f64)) as i64; // ~√(draws/50) bins
    let width = ((2 * half) / count.max(1)).max(1);
    let mut out = vec![(i64::MIN, -half)];
    let mut lo = -half;
    while lo < half {
        out.push((lo, (lo + width).min(half)));
        lo += width;
    }
    out.push((half, i64::MAX));
    out
}

/// Exact probabilities of each bin under N_ℤ(0, σ²), normalised over |x| ≤ 40σ + 40.
fn exact_bin_probabilities(sigma: f64, bins: &[(i64, i64)]) -> Vec<f64> {
    let limit = (40.0 * sigma) as i64 + 40;
    let weight = |x: i64| (-(x as f64).powi(2) / (2.0 * sigma * sigma)).exp();
    let total: f64 = (-limit..=limit).map(weight).sum();
    bins.iter()
        .map(|&(lo, hi)| (lo.max(-limit)..hi.min(limit + 1)).map(weight).sum::<f64>() / total)
        .collect()
}

fn exact_variance(sigma: f64) -> f64 {
    let limit = (40.0 * sigma) as i64 + 40;
    let weight = |x: i64| (-(x as f64).powi(2) / (2.0 * sigma * sigma)).exp();
    let total: f64 = (-limit..=limit).map(weight).sum();
    (-limit..=limit).map(|x| (x as f64).powi(2) * weight(x)).sum::<f64>() / total
}

fn bin_counts(samples: &[i64], bins: &[(i64, i64)]) -> Vec<f64> {
    let mut counts = vec![0.0; bins.len()];
    for &x in samples {
        let i = bins.partition_point(|&(lo, _)| lo <= x) - 1;
        counts[i] += 1.0;
    }
    counts
}

fn critical_value(degrees_of_freedom: usize) -> f64 {
    ChiSquared::new(degrees_of_freedom as f64).expect("df > 0").inverse_cdf(1.0 - FALSE_FAILURE_RATE)
}

/// Pearson's goodness-of-fit statistic, skipping bins expected to be (nearly) empty.
fn check_against_pmf(sigma: f64, variance: Rational, draws: usize, seed: u64) {
    let mut sampler = Cks20Sampler::new(variance, ChaCha20Rng::seed_from_u64(seed));
    let mut samples = vec![0i64; draws];
    sampler.fill(&mut samples).expect("sampling");
    let bins = bins(sigma, draws);
    let expected: Vec<f64> = exact_bin_probabilities(sigma, &bins).iter().map(|p| p * draws as f64).collect();
    let observed = bin_counts(&samples, &bins);
    let (mut statistic, mut used) = (0.0, 0);
    for (o, e) in observed.iter().zip(&expected) {
        if *e >= 5.0 {
            statistic += (o - e).powi(2) / e;
            used += 1;
        } else {
            assert!(*o <= 5.0 + 10.0 * e.max(1.0), "σ = {sigma}: {o} draws in a bin expected to hold {e:.3}");
        }
    }
    let critical = critical_value(used - 1);
    assert!(statistic < critical, "σ = {sigma}: χ² = {statistic:.1} over {used} bins exceeds {critical:.1}");
    // The variance is the other property noise calibration relies on. For small σ the
    // discrete Gaussian's variance is below σ² (CKS20, Corollary 9): compare with the
    // exact value. 6 standard errors (≈ σ²√(2/n)) bound a false failure below 1e-8.
    let exact = exact_variance(sigma);
    assert!(exact <= sigma * sigma * (1.0 + 1e-9), "exact variance {exact} above σ²");
    let var = samples.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / draws as f64;
    let tolerance = 6.0 * (2.0 / draws as f64).sqrt() * sigma * sigma;
    assert!((var - exact).abs() < tolerance, "σ = {sigma}: sample variance {var}, exact {exact}");
}

/// σ = 1/2, 2, 50 and 10,000, each at its own seed.
#[test]
fn chi_square_against_the_exact_pmf_from_narrow_to_wide() {
    let variances = [(0.5, (1, 4)), (2.0, (4, 1)), (50.0, (2500, 1)), (1e4, (100_000_000, 1))];
    for (seed, (sigma, (num, den))) in (1..).zip(variances) {
        check_against_pmf(sigma, Rational::new(num, den).expect("valid"), 200_000, seed);
    }
}

/// Pearson's two-sample homogeneity test between our sampler and OpenDP's.
fn two_sample(sigma_num: u64, draws: usize, seed: u64) {
    let sigma = sigma_num as f64;
    let mut ours = vec![0i64; draws];
    let mut theirs = vec![0i64; draws];
    Cks20Sampler::new(
        Rational::new(sigma_num * sigma_num, 1).expect("valid"),
        ChaCha20Rng::seed_from_u64(seed),
    )
    .fill(&mut ours)
    .expect("ours");
    OpenDpSampler::new(sigma_num, 1).fill(&mut theirs).expect("opendp");
    let bins = bins(sigma, draws);
    let (a, b) = (bin_counts(&ours, &bins), bin_counts(&theirs, &bins));
    let (mut statistic, mut used) = (0.0, 0);
    for (x, y) in a.iter().zip(&b) {
        let pooled = (x + y) / 2.0;
        if pooled >= 5.0 {
            statistic += (x - pooled).powi(2) / pooled + (y - pooled).powi(2) / pooled;
            used += 1;
        }
    }
    let critical = critical_value(used - 1);
    assert!(
        statistic < critical,
        "σ = {sigma}: two-sample χ² = {statistic:.1} over {used} bins exceeds {critical:.1}"
    );
}

#[test]
fn two_sample_test_against_opendp_at_sigma_two() {
    two_sample(2, 40_000, 5);
}

#[test]
fn two_sample_test_against_opendp_at_sigma_fifty() {
    two_sample(50, 40_000, 6);
}
