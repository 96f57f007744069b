//! The two non-distributed modes, kept for comparison: `central` (a trusted coordinator
//! adds N(0, σ²) to the plain sum) and `local` (each client adds all of N(0, σ²) itself).
//!
//! Both use continuous Gaussian noise from a CSPRNG via the Box–Muller transform, as the
//! design specifies. Floating-point Gaussian samplers leak through their low-order bits
//! (Mironov, CCS 2012); the production mode, `distributed`, uses the exact discrete
//! Gaussian instead.

use rand_core::{CryptoRng, RngCore};

use super::{DpError, clip_l2};

/// A uniform draw from (0, 1]: 53 random bits, never zero.
fn open_unit(rng: &mut impl RngCore) -> f64 {
    ((rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
}

fn add_gaussian(x: &mut [f64], sigma: f64, rng: &mut (impl RngCore + CryptoRng)) {
    for pair in x.chunks_mut(2) {
        let r = (-2.0 * open_unit(rng).ln()).sqrt() * sigma;
        let theta = std::f64::consts::TAU * open_unit(rng);
        pair[0] += r * theta.cos();
        if let Some(second) = pair.get_mut(1) {
            *second += r * theta.sin();
        }
    }
}

fn check_sigma(sigma: f64) -> Result<(), DpError> {
    if sigma.is_finite() && sigma >= 0.0 {
        Ok(())
    } else {
        Err(DpError::Parameter {
            name: "noise_stddev",
            reason: format!("must be finite and ≥ 0, got {sigma}"),
        })
    }
}

/// Central mode: adds N(0, σ²) to every coordinate of the plain sum of clipped updates.
pub fn add_central_noise(
    sum: &mut [f64],
    sigma: f64,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<(), DpError> {
    check_sigma(sigma)?;
    add_gaussian(sum, sigma, rng);
    Ok(())
}

/// Local mode: clips `x` to `clip_norm` and adds the full N(0, σ²) noise at the client.
pub fn privatise_local(
    x: &mut [f32],
    clip_norm: f64,
    sigma: f64,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<Vec<f64>, DpError> {
    check_sigma(sigma)?;
    clip_l2(x, clip_norm)?;
    let mut out: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    add_gaussian(&mut out, sigma, rng);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    /// Mean and variance of 200,000 draws: with fixed seeds the test is deterministic; for
    /// a fresh seed, a 6-standard-error band fails with probability below 1e-8.
    #[test]
    fn central_noise_has_the_asked_variance() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let n = 200_000;
        let mut x = vec![0.0; n];
        add_central_noise(&mut x, 2.0, &mut rng).expect("valid");
        let mean = x.iter().sum::<f64>() / n as f64;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 6.0 * 2.0 / (n as f64).sqrt(), "mean {mean}");
        // The sample variance of a Gaussian has standard error σ²·√(2/n).
        assert!((var - 4.0).abs() < 6.0 * 4.0 * (2.0 / n as f64).sqrt(), "variance {var}");
    }

    #[test]
    fn local_mode_clips_before_noising() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let mut x = vec![30.0f32, 40.0];
        let out = privatise_local(&mut x, 1.0, 0.0, &mut rng).expect("valid");
        assert!((out[0] - 0.6).abs() < 1e-5 && (out[1] - 0.8).abs() < 1e-5, "{out:?}");
        assert!(privatise_local(&mut x, 1.0, f64::NAN, &mut rng).is_err());
    }
}
