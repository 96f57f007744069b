//! Positive-part James–Stein shrinkage of a noisy sum: post-processing of a DP release, so
//! it costs no privacy.
//!
//! The coordinator knows the variance `σ²` of the noise in every coordinate of a decoded
//! sum (it set the noise multiplier, the clip norm and the survivors' shares). For a block of
//! `d ≥ 3` coordinates `y = θ + ε`, `ε ~ N(0, σ²·I)`, the estimate
//! `y · max(0, 1 − (d − 2)·σ² / ‖y‖²)` has expected squared error below `d·σ²`, the raw
//! sum's, whatever `θ` (James and Stein 1961; the positive part improves on it again). When
//! the sum is all noise (`‖y‖² ≈ d·σ²`) the factor is about zero and the model stays where
//! it was, instead of taking a step of noise `√d·σ` long. Applied per block (per tensor of
//! the adapter), each block is shrunk by its own signal-to-noise ratio; the dominance holds
//! for each block, hence for the whole.
//!
//! James–Stein alone still takes a step when the sum is all noise: about `√2·σ` long per
//! block (its expected error, `2σ²`, is far below the raw sum's but not zero), and a model
//! that takes such a step in every block and every round drifts from where it was (the
//! default scenario's merchant-level DP arm fell below its start that way). So a block is
//! moved at all only if its squared norm is significantly above what noise alone gives:
//! above `(d + T·√(2d))·σ²`, the mean of `σ²·χ²_d` plus [`SIGNAL_THRESHOLD`] of its standard
//! deviations (a pretest estimator, Sclove 1968). Pure noise passes with probability about
//! 0.1% per block; a signal the gate leaves out has `‖θ‖²` below about `T·√(2d)·σ²`, far
//! below the raw sum's error `d·σ²` for the blocks the coordinator forms (1,024 coordinates
//! or more), so the gated estimate's expected error stays below the raw sum's.
//!
//! The decoded sum's noise is the sum of discrete Gaussians and of the encoding's
//! randomised rounding (bounded, variance at most `γ²/4` per summand and coordinate), not
//! exactly Gaussian: the variance used is the sum of both, which overstates what rounding
//! adds, so the shrinkage errs towards leaving the model in place.

use std::ops::Range;

/// How many standard deviations of pure noise's squared norm (`√(2d)·σ²`) a block's squared
/// norm must exceed the noise's mean (`d·σ²`) by for the block to move at all: the one-sided
/// 0.1% point of the normal approximation to `χ²_d`.
pub const SIGNAL_THRESHOLD: f64 = 3.09;

/// The level that the largest of `count` independent standard normals exceeds with
/// probability at most `alpha`: `Φ⁻¹(1 − α/count)`, the Bonferroni bound over the `count`
/// one-sided tails (tight for small `α`). A summed statistic whose entries are kept only
/// above this many noise deviations keeps anything from a sum that is all noise with
/// probability at most `alpha`.
pub fn max_normal_quantile(count: usize, alpha: f64) -> f64 {
    use statrs::distribution::{ContinuousCDF, Normal};
    -Normal::standard().inverse_cdf(alpha / count.max(1) as f64)
}

/// How many of `count` independent standard normals pure noise puts above `level`, except
/// with probability at most `alpha`: the smallest `k` with `P(Binomial(count, 1 − Φ(level))
/// > k) ≤ α`. A summed statistic with more of its entries above `level` noise deviations
/// than this carries signal at that level (a one-sided test at level `alpha`).
pub fn noise_exceedances(count: usize, level: f64, alpha: f64) -> u64 {
    use statrs::distribution::{Binomial, ContinuousCDF, DiscreteCDF, Normal};
    let count = count as u64;
    let Ok(binomial) = Binomial::new(Normal::standard().sf(level), count) else { return count };
    // The CDF is non-decreasing and 1 at `count`: bisect for its first value ≥ 1 − α.
    let (mut low, mut high) = (0, count);
    while low < high {
        let middle = low + (high - low) / 2;
        if binomial.cdf(middle) >= 1.0 - alpha {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    low
}

/// Shrinks each block of `sum` (each a set of ranges into it, shrunk together; a block of
/// fewer than 3 coordinates is left as it is) towards zero by its positive-part James–Stein
/// factor at per-coordinate noise variance `variance`, and to zero when its squared norm is
/// not [`SIGNAL_THRESHOLD`] deviations above the noise's; returns each block's factor in
/// `[0, 1]`. A variance of zero (no noise) leaves every block as it is, with factor 1; so
/// does a block with a range outside `sum`.
pub fn james_stein(sum: &mut [f64], blocks: &[Vec<Range<usize>>], variance: f64) -> Vec<f64> {
    blocks
        .iter()
        .map(|block| {
            if block.iter().any(|r| r.end > sum.len()) {
                return 1.0;
            }
            let d: usize = block.iter().map(ExactSizeIterator::len).sum();
            if d < 3 || variance <= 0.0 || !variance.is_finite() {
                return 1.0;
            }
            let norm_squared: f64 = block.iter().flat_map(|r| &sum[r.clone()]).map(|v| v * v).sum();
            let d = d as f64;
            let significant = norm_squared > (d + SIGNAL_THRESHOLD * (2.0 * d).sqrt()) * variance;
            let factor = if significant { (1.0 - (d - 2.0) * variance / norm_squared).max(0.0) } else { 0.0 };
            for r in block {
                sum[r.clone()].iter_mut().for_each(|v| *v *= factor);
            }
            factor
        })
        .collect()
}

#[cfg(test)]
// One range covering a whole vector is what these tests mean by `vec![0..d]`.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;
    use statrs::distribution::{ContinuousCDF, Normal};

    /// `n` standard normals (inverse CDF of uniforms from a seeded ChaCha20 stream).
    fn normals(n: usize, seed: u64) -> Vec<f64> {
        use rand_core::RngCore;
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let standard = Normal::new(0.0, 1.0).expect("a normal");
        (0..n)
            .map(|_| {
                let u = (f64::from(rng.next_u32()) + 0.5) / 4_294_967_296.0;
                standard.inverse_cdf(u)
            })
            .collect()
    }

    fn squared_error(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum()
    }

    #[test]
    fn a_sum_that_is_all_noise_leaves_the_model_where_it_was() {
        // θ = 0 in blocks of d = 1,024 (the smallest the coordinator forms) to 50,000, σ = 3.
        // A block moves only if ‖y‖²/σ² (χ² with d degrees of freedom) exceeds its mean by
        // 3.09 deviations: a false failure rate of about 1e-3 per block, 20 blocks here
        // (about 2% for a fresh set of seeds; these are fixed).
        for (k, d) in [1_024, 10_000, 50_000].into_iter().enumerate() {
            for seed in 0..(if d > 10_000 { 4 } else { 8 }) {
                let sigma = 3.0;
                let mut y: Vec<f64> = normals(d, 100 * k as u64 + seed).iter().map(|z| sigma * z).collect();
                let factors = james_stein(&mut y, &[vec![0..d]], sigma * sigma);
                assert_eq!(factors[0], 0.0, "d = {d}, seed {seed}");
                assert!(y.iter().all(|&v| v == 0.0), "d = {d}, seed {seed}: a step taken from noise");
            }
        }
    }

    #[test]
    fn without_the_gate_james_stein_alone_would_step_on_pure_noise() {
        // What the gate is for: the positive-part factor on pure noise is about √(2/d), not
        // zero (d = 10,000: a step of about √2·σ), and the gate alone sets it to zero.
        let (d, sigma) = (10_000usize, 3.0);
        let mut moved = 0;
        for seed in 0..20 {
            let y: Vec<f64> = normals(d, 500 + seed).iter().map(|z| sigma * z).collect();
            let norm_squared: f64 = y.iter().map(|v| v * v).sum();
            let ungated = (1.0 - (d as f64 - 2.0) * sigma * sigma / norm_squared).max(0.0);
            moved += usize::from(ungated > 0.0);
            let mut gated = y.clone();
            assert_eq!(james_stein(&mut gated, &[vec![0..d]], sigma * sigma), vec![0.0]);
        }
        // About half the draws give a positive factor (P(χ²_d > d − 2) ≈ 0.5); fewer than 4
        // of 20 has probability below 2e-3.
        assert!(moved >= 4, "{moved} of 20 draws would have moved without the gate");
    }

    #[test]
    fn shrinking_never_raises_the_expected_error_and_lowers_it_when_noise_dominates() {
        // Signals of ‖θ‖² = s·d·σ² for s from 0.1 (noise dominates) to 10 (signal does), in
        // blocks of d = 200, 400 trials each: the mean squared error of the shrunk sum against
        // the raw one's. Theory: raw d·σ²; shrunk about d·σ²·s/(1 + s) where the gate passes
        // the block (s ≥ 1: ‖θ‖² far above its 3.09·√(2d)·σ² ≈ 0.31·d·σ²), about ‖θ‖² = s·d·σ²
        // where it leaves the block out (s = 0.1), and between the two at the gate (s = 0.3:
        // asserted below the raw error only). With 400 trials the mean errors' standard errors
        // are about 0.4% of d·σ²: the margins asserted are more than 10 of them, so a false
        // failure is below 1e-20; the seeds are fixed.
        let (d, sigma, trials) = (200, 0.5, 400);
        for (k, s) in [0.1f64, 0.3, 1.0, 10.0].into_iter().enumerate() {
            let direction = normals(d, 1000 + k as u64);
            let length = (direction.iter().map(|v| v * v).sum::<f64>()).sqrt();
            let theta: Vec<f64> =
                direction.iter().map(|v| v / length * (s * d as f64).sqrt() * sigma).collect();
            let (mut raw, mut shrunk) = (0.0, 0.0);
            for trial in 0..trials {
                let noise = normals(d, 10_000 * (k as u64 + 1) + trial);
                let mut y: Vec<f64> = theta.iter().zip(&noise).map(|(t, z)| t + sigma * z).collect();
                raw += squared_error(&y, &theta);
                james_stein(&mut y, &[vec![0..d]], sigma * sigma);
                shrunk += squared_error(&y, &theta);
            }
            let baseline = trials as f64 * d as f64 * sigma * sigma;
            assert!((raw / baseline - 1.0).abs() < 0.05, "s = {s}: raw error {}", raw / baseline);
            assert!(shrunk <= raw, "s = {s}: shrunk {shrunk} above raw {raw}");
            let expected = match s {
                0.3 => continue,
                0.1 => s,
                _ => s / (1.0 + s),
            };
            assert!(
                (shrunk / baseline - expected).abs() < 0.06,
                "s = {s}: shrunk error {} of the raw, theory {expected}",
                shrunk / baseline
            );
        }
    }

    /// Known values of the normal's upper tail: Φ⁻¹(1 − 10⁻³) = 3.0902, and the Bonferroni
    /// level over 16,859 and 1,078,976 entries at α = 10⁻³ (Φ⁻¹(1 − 5.93·10⁻⁸) = 5.2956,
    /// Φ⁻¹(1 − 9.27·10⁻¹⁰) = 6.0101, from Python's `statistics.NormalDist`).
    #[test]
    fn the_largest_of_many_normals_quantiles_match_the_tables() {
        assert!((max_normal_quantile(1, 1e-3) - 3.0902).abs() < 1e-4);
        assert!((max_normal_quantile(16_859, 1e-3) - 5.2956).abs() < 1e-3);
        assert!((max_normal_quantile(1_078_976, 1e-3) - 6.0101).abs() < 1e-3);
        // Simulated: the largest of 5,000 normals passes the level at α = 0.2 in about a
        // fifth of 200 seeded draws (a binomial's 99.9% range: 0.2 ± 0.093; the bound is
        // tight here to about α²/2).
        let level = max_normal_quantile(5_000, 0.2);
        let passed = (0..200).filter(|&seed| normals(5_000, seed).iter().any(|&z| z > level)).count();
        assert!((0.107..=0.293).contains(&(passed as f64 / 200.0)), "{passed} of 200");
    }

    /// Known values from SciPy 1.17's `binom.ppf(1 − α, n, norm.sf(level))`: 301 of
    /// 16,859 × 64 entries above 3.5 deviations at α = 10⁻³, 6 of 1,000 above 3 and 2,353 of
    /// 100,000 above 2 at α = 0.05; and simulated, pure noise of 2,000 entries passes the
    /// bound at α = 0.2 in about a fifth of 200 seeded draws (a binomial's 99.9% range:
    /// 0.2 ± 0.093, below it since the count is discrete).
    #[test]
    fn noise_exceedances_match_the_binomial_quantiles() {
        assert_eq!(noise_exceedances(16_859 * 64, 3.5, 1e-3), 301);
        assert_eq!(noise_exceedances(1_000, 3.0, 1e-3), 6);
        assert_eq!(noise_exceedances(100_000, 2.0, 0.05), 2_353);
        assert_eq!(noise_exceedances(0, 3.5, 1e-3), 0, "nothing to exceed");
        assert!(noise_exceedances(6, 3.5, 1e-3) <= 1, "{}", noise_exceedances(6, 3.5, 1e-3));
        let bound = noise_exceedances(2_000, 1.5, 0.2) as usize;
        let passed = (0..200)
            .filter(|&seed| normals(2_000, seed).iter().filter(|&&z| z > 1.5).count() > bound)
            .count();
        assert!((0.107..=0.293).contains(&(passed as f64 / 200.0)), "{passed} of 200");
    }

    /// `len` values of noise N(0, 0.1²) (seeded), the first `d` of them shifted by a strong
    /// signal of 5.
    fn strong_then_noise(d: usize, len: usize, seed: u64) -> Vec<f64> {
        let mut y: Vec<f64> = normals(len, seed).iter().map(|z| 0.1 * z).collect();
        y[..d].iter_mut().for_each(|v| *v += 5.0);
        y
    }

    #[test]
    fn each_block_is_shrunk_by_its_own_signal_to_noise_ratio() {
        // Block 0 carries a strong signal, block 1 none; a 2-coordinate block is left alone.
        let d = 1_000;
        let mut y = strong_then_noise(d, 2 * d + 2, 7);
        let before = y.clone();
        let factors = james_stein(&mut y, &[vec![0..d], vec![d..2 * d], vec![2 * d..2 * d + 2]], 0.01);
        assert!(factors[0] > 0.999, "strong signal: {}", factors[0]);
        assert_eq!(factors[1], 0.0, "pure noise");
        assert_eq!(factors[2], 1.0);
        assert_eq!(y[2 * d..], before[2 * d..]);
    }

    #[test]
    fn a_block_of_several_ranges_is_shrunk_as_one() {
        // A scalar of pure noise joined to a block of strong signal keeps the block's factor
        // (about 1); joined to a block of pure noise it goes to zero with it.
        let d = 1_000;
        let mut y = strong_then_noise(d, 2 * d + 1, 9);
        let scalar = y[2 * d];
        let factors = james_stein(&mut y, &[vec![0..d, 2 * d..2 * d + 1], vec![d..2 * d]], 0.01);
        assert!(factors[0] > 0.999 && (y[2 * d] - scalar * factors[0]).abs() < 1e-12, "{factors:?}");
        let mut y: Vec<f64> = normals(2 * d + 1, 9).iter().map(|z| 0.1 * z).collect();
        let factors = james_stein(&mut y, &[vec![0..d, 2 * d..2 * d + 1]], 0.01);
        assert_eq!(factors[0], 0.0, "{factors:?}");
        assert_eq!(y[2 * d], 0.0);
    }

    #[test]
    fn without_noise_nothing_changes() {
        let mut y = vec![0.5, -1.0, 2.0, 0.25];
        let before = y.clone();
        assert_eq!(james_stein(&mut y, &[vec![0..4]], 0.0), vec![1.0]);
        assert_eq!(y, before);
        // An empty or out-of-range block is left alone too.
        assert_eq!(james_stein(&mut y, &[vec![0..0], vec![2..9]], 1.0), vec![1.0, 1.0]);
        assert_eq!(y, before);
    }
}
