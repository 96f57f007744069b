//! n clients encode with DDGauss, the encodings are summed mod 2^b, the server decodes:
//! the error of the decoded sum is unbiased with the calibrated variance, and without
//! noise it stays within the rounding bound.
//!
//! Seeds are fixed, so the tests are deterministic; the 6-standard-error bands would fail
//! for a fresh seed with probability below 1e-8.

use guild_privacy::dp::{DdgParams, ParamsRequest, RandomRotation, add_mod, l2_norm};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// A random vector of norm `norm`.
fn vector(rng: &mut ChaCha20Rng, d: usize, norm: f64) -> Vec<f32> {
    let raw: Vec<f32> = (0..d).map(|_| (rng.next_u32() as f32 / u32::MAX as f32) - 0.5).collect();
    let scale = norm / l2_norm(&raw);
    raw.iter().map(|&v| (f64::from(v) * scale) as f32).collect()
}

/// Encodes every client's vector, sums mod 2^b, decodes; returns decoded − true sum.
fn round_error(
    params: &DdgParams,
    inputs: &[Vec<f32>],
    rotation_seed: u64,
    rng: &mut ChaCha20Rng,
) -> Vec<f64> {
    let rotation = RandomRotation::new(params.padded_dimension(), rotation_seed);
    let mut sum = vec![0u32; params.padded_dimension()];
    for input in inputs {
        let mut scratch = input.clone();
        let encoding = params.encode(&mut scratch, &rotation, rng).expect("encode");
        add_mod(&mut sum, &encoding.values, params.bit_width());
    }
    let decoded = params.decode(&sum, &rotation).expect("decode");
    let truth: Vec<f64> =
        (0..params.dimension()).map(|i| inputs.iter().map(|x| f64::from(x[i])).sum::<f64>()).collect();
    decoded.iter().zip(&truth).map(|(a, b)| a - b).collect()
}

#[test]
fn decoded_sum_is_unbiased_and_carries_the_calibrated_noise() {
    let (d, clients, sigma) = (1000, 10, 0.5);
    let params = DdgParams::select(&ParamsRequest {
        dimension: d,
        clip_norm: 1.0,
        noise_stddev: sigma,
        noise_shares: clients,
        max_summands: clients,
        bit_width: 32,
        wrap_probability: 1e-9,
    })
    .expect("feasible");
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let mut errors = Vec::new();
    for round in 0..20 {
        let inputs: Vec<Vec<f32>> = (0..clients).map(|_| vector(&mut rng, d, 0.9)).collect();
        errors.extend(round_error(&params, &inputs, round, &mut rng));
    }
    let n = errors.len() as f64;
    let mean = errors.iter().sum::<f64>() / n;
    let var = errors.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / n;
    // The sum carries t shares of σ²/t, plus rounding noise of at most γ²/4 per client.
    let expected = sigma * sigma + clients as f64 * params.gamma().powi(2) / 4.0;
    assert!(mean.abs() < 6.0 * sigma / n.sqrt(), "mean error {mean}");
    assert!((var - expected).abs() < 6.0 * expected * (2.0 / n).sqrt(), "variance {var} vs {expected}");
}

#[test]
fn without_noise_the_decoded_sum_is_within_the_rounding_bound() {
    let (d, clients) = (300, 7);
    let params = DdgParams::from_round(d, 1.0, 1e-4, 24, 0.0, clients).expect("valid");
    let mut rng = ChaCha20Rng::seed_from_u64(12);
    let inputs: Vec<Vec<f32>> = (0..clients).map(|_| vector(&mut rng, d, 0.99)).collect();
    let error = round_error(&params, &inputs, 3, &mut rng);
    let norm = error.iter().map(|e| e * e).sum::<f64>().sqrt();
    // Each client's rounding moves each scaled, rotated coordinate by less than 1: at most
    // γ·√d_pad in L2 per client after the (orthonormal) inverse rotation.
    let bound = clients as f64 * params.gamma() * (params.padded_dimension() as f64).sqrt();
    assert!(norm <= bound, "error {norm} above the rounding bound {bound}");
    assert!(norm > 0.0, "randomized rounding should perturb the sum");
}

#[test]
fn clipping_bounds_each_contribution() {
    let d = 64;
    let params = DdgParams::from_round(d, 1.0, 1e-5, 32, 0.0, 1).expect("valid");
    let mut rng = ChaCha20Rng::seed_from_u64(13);
    let huge = vector(&mut rng, d, 1000.0);
    let error = round_error(&params, std::slice::from_ref(&huge), 4, &mut rng);
    let decoded: Vec<f64> = error.iter().zip(&huge).map(|(e, x)| e + f64::from(*x)).collect();
    let norm = decoded.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "a norm-1000 update must decode to norm 1, got {norm}");
}

#[test]
fn a_wrong_length_is_refused() {
    let params = DdgParams::from_round(10, 1.0, 1e-4, 20, 0.0, 1).expect("valid");
    let rotation = RandomRotation::new(16, 0);
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    assert!(params.encode(&mut [0.0; 9], &rotation, &mut rng).is_err());
    assert!(params.decode(&[0; 10], &rotation).is_err());
}
