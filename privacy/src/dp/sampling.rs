//! Poisson sampling: each member of a population is included independently with
//! probability q, which is what the subsampled-Gaussian and subsampled-zCDP accountants
//! assume (a fixed-size sample is a different mechanism, with a different bound).

use rand_core::{CryptoRng, RngCore};

use super::DpError;

/// The indices in `0..population` that a Poisson sample at rate `q` includes, in order.
/// Pass the OS CSPRNG in production: whoever can predict the sample loses the amplification.
pub fn poisson_sample(
    population: usize,
    q: f64,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<Vec<usize>, DpError> {
    if !(q > 0.0 && q <= 1.0) {
        return Err(DpError::Parameter {
            name: "sampling_rate",
            reason: format!("must be in (0, 1], got {q}"),
        });
    }
    // 53 uniform bits against q: P(u < q) = ⌈q·2^53⌉/2^53, q to within 2^−53.
    let threshold = (q * (1u64 << 53) as f64).ceil() as u64;
    Ok((0..population).filter(|_| (rng.next_u64() >> 11) < threshold).collect())
}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;

    /// 400 samples of 1,000 at q = 0.05, seeded. Each member's inclusion count is
    /// Binomial(400, 0.05) and independent of the others', so Pearson's statistic over the
    /// 1,000 members is close to χ²(1000) (mean 1,000, sd 44.7); the size of one sample is
    /// Binomial(1000, 0.05) (variance 47.5), so the variance of the 400 sizes over 47.5 is
    /// about χ²(399)/399 (sd 0.071). Each check allows 5 standard deviations: a correct
    /// sampler fails either with probability below 10⁻⁵ (normal tails plus the skew of χ²),
    /// while a fixed-size sample (variance 0) or a rate off by 10% fails surely.
    #[test]
    fn inclusion_is_independent_with_probability_q() {
        let (n, q, trials) = (1000usize, 0.05, 400usize);
        let mut rng = ChaCha20Rng::seed_from_u64(13);
        let mut inclusions = vec![0u32; n];
        let mut sizes = Vec::new();
        for _ in 0..trials {
            let sample = poisson_sample(n, q, &mut rng).expect("valid rate");
            assert!(sample.windows(2).all(|w| w[0] < w[1]), "indices come in order, once each");
            sizes.push(sample.len() as f64);
            for i in sample {
                inclusions[i] += 1;
            }
        }
        let total: f64 = sizes.iter().sum();
        let expected_total = (n * trials) as f64 * q;
        let total_sd = (expected_total * (1.0 - q)).sqrt();
        assert!(
            (total - expected_total).abs() < 5.0 * total_sd,
            "{total} members sampled, expected {expected_total}"
        );
        let per_member = trials as f64 * q;
        let pearson: f64 =
            inclusions.iter().map(|&c| (f64::from(c) - per_member).powi(2) / (per_member * (1.0 - q))).sum();
        let chi_sd = (2.0 * n as f64).sqrt();
        assert!((pearson - n as f64).abs() < 5.0 * chi_sd, "Pearson statistic {pearson}");
        let mean = total / trials as f64;
        let variance = sizes.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (trials - 1) as f64;
        let ratio = variance / (n as f64 * q * (1.0 - q));
        assert!(
            (ratio - 1.0).abs() < 5.0 * (2.0 / (trials - 1) as f64).sqrt(),
            "size variance ratio {ratio}"
        );
    }

    #[test]
    fn rates_outside_zero_to_one_are_refused_and_one_takes_everyone() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for q in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(matches!(
                poisson_sample(10, q, &mut rng),
                Err(DpError::Parameter { name: "sampling_rate", .. })
            ));
        }
        assert_eq!(poisson_sample(5, 1.0, &mut rng).expect("valid"), vec![0, 1, 2, 3, 4]);
    }
}
