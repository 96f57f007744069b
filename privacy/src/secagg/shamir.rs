//! Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^61 − 1).
//!
//! A secret is cut into five 7-byte limbs (each below 2^56 < p); each limb is the
//! constant term of its own random polynomial of degree t − 1, evaluated at the holder's
//! client index. Any t shares reconstruct it; fewer reveal nothing.

use rand_core::{CryptoRng, RngCore};

/// The Mersenne prime 2^61 − 1.
pub const P: u64 = (1 << 61) - 1;
/// Field elements per shared secret.
pub const LIMBS: usize = 5;
const LIMB_BYTES: usize = 7;

fn reduce(x: u128) -> u64 {
    let folded = (x & u128::from(P)) + (x >> 61);
    let folded = (folded & u128::from(P)) + (folded >> 61);
    let r = folded as u64;
    if r >= P { r - P } else { r }
}

fn mul(a: u64, b: u64) -> u64 {
    reduce(u128::from(a) * u128::from(b))
}

fn add(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= P { s - P } else { s }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + P - b }
}

fn pow(mut base: u64, mut exp: u64) -> u64 {
    let mut acc = 1;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

fn inverse(a: u64) -> u64 {
    pow(a, P - 2)
}

fn uniform_element(rng: &mut impl RngCore) -> u64 {
    loop {
        let v = rng.next_u64() & P; // 61 random bits
        if v < P {
            return v;
        }
    }
}

/// One holder's share: the evaluations of the limb polynomials at `x`.
pub type ShareValues = [u64; LIMBS];

/// Splits `secret` into shares for the holders `xs` (distinct, non-zero), any
/// `threshold` of which reconstruct it.
pub fn split(
    secret: &[u8; 32],
    threshold: usize,
    xs: &[u32],
    rng: &mut (impl RngCore + CryptoRng),
) -> Vec<ShareValues> {
    assert!(threshold >= 1, "threshold must be at least 1");
    let mut padded = [0u8; LIMBS * LIMB_BYTES];
    padded[..32].copy_from_slice(secret);
    let mut shares = vec![[0u64; LIMBS]; xs.len()];
    for limb in 0..LIMBS {
        let mut bytes = [0u8; 8];
        bytes[..LIMB_BYTES].copy_from_slice(&padded[limb * LIMB_BYTES..(limb + 1) * LIMB_BYTES]);
        let mut coefficients = vec![u64::from_le_bytes(bytes)];
        coefficients.extend((1..threshold).map(|_| uniform_element(rng)));
        for (share, &x) in shares.iter_mut().zip(xs) {
            // Horner's rule.
            share[limb] = coefficients.iter().rev().fold(0, |acc, &c| add(mul(acc, u64::from(x)), c));
        }
    }
    shares
}

/// Why a set of shares does not give back a secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShamirError {
    #[error("{got} shares, {needed} needed")]
    TooFew { got: usize, needed: usize },
    #[error("two shares for the same evaluation point {0}")]
    DuplicatePoint(u32),
    #[error("a share value is not a field element")]
    OutOfField,
    #[error("the shares do not lie on one polynomial of degree < threshold")]
    Inconsistent,
}

/// Lagrange interpolation at 0 of the points `(xs[i], ys[i])`.
fn interpolate_at_zero(xs: &[u64], ys: &[u64]) -> u64 {
    let mut acc = 0;
    for (i, (&xi, &yi)) in xs.iter().zip(ys).enumerate() {
        let (mut num, mut den) = (1, 1);
        for (j, &xj) in xs.iter().enumerate() {
            if i != j {
                num = mul(num, xj);
                den = mul(den, sub(xj, xi));
            }
        }
        acc = add(acc, mul(yi, mul(num, inverse(den))));
    }
    acc
}

/// Evaluates at `x` the polynomial through the points `(xs[i], ys[i])`.
fn interpolate_at(x: u64, xs: &[u64], ys: &[u64]) -> u64 {
    let mut acc = 0;
    for (i, (&xi, &yi)) in xs.iter().zip(ys).enumerate() {
        let (mut num, mut den) = (1, 1);
        for (j, &xj) in xs.iter().enumerate() {
            if i != j {
                num = mul(num, sub(x, xj));
                den = mul(den, sub(xi, xj));
            }
        }
        acc = add(acc, mul(yi, mul(num, inverse(den))));
    }
    acc
}

/// Reconstructs a secret from `(x, share)` pairs. With more than `threshold` shares, the
/// extra ones must agree with the polynomial the first `threshold` define, so a
/// corrupted share is detected rather than silently producing a wrong secret.
pub fn reconstruct(shares: &[(u32, ShareValues)], threshold: usize) -> Result<[u8; 32], ShamirError> {
    if shares.len() < threshold {
        return Err(ShamirError::TooFew { got: shares.len(), needed: threshold });
    }
    let mut seen = std::collections::BTreeSet::new();
    for (x, values) in shares {
        if *x == 0 || !seen.insert(*x) {
            return Err(ShamirError::DuplicatePoint(*x));
        }
        if values.iter().any(|&v| v >= P) {
            return Err(ShamirError::OutOfField);
        }
    }
    let xs: Vec<u64> = shares[..threshold].iter().map(|(x, _)| u64::from(*x)).collect();
    let mut padded = [0u8; LIMBS * LIMB_BYTES];
    for limb in 0..LIMBS {
        let ys: Vec<u64> = shares[..threshold].iter().map(|(_, v)| v[limb]).collect();
        for (x, values) in &shares[threshold..] {
            if interpolate_at(u64::from(*x), &xs, &ys) != values[limb] {
                return Err(ShamirError::Inconsistent);
            }
        }
        let value = interpolate_at_zero(&xs, &ys);
        if value >= 1 << 56 {
            return Err(ShamirError::Inconsistent);
        }
        padded[limb * LIMB_BYTES..(limb + 1) * LIMB_BYTES]
            .copy_from_slice(&value.to_le_bytes()[..LIMB_BYTES]);
    }
    if padded[32..].iter().any(|&b| b != 0) {
        return Err(ShamirError::Inconsistent);
    }
    let mut secret = [0u8; 32];
    secret.copy_from_slice(&padded[..32]);
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn field_arithmetic_known_answers() {
        assert_eq!(mul(P - 1, P - 1), 1); // (−1)² = 1
        assert_eq!(add(P - 1, 1), 0);
        assert_eq!(sub(0, 1), P - 1);
        assert_eq!(mul(inverse(3), 3), 1);
        assert_eq!(pow(2, 61), 1); // 2^61 ≡ 1 (mod 2^61 − 1)
        assert_eq!(reduce(u128::from(P) * 5 + 7), 7);
    }

    #[test]
    fn known_answer_for_a_fixed_polynomial() {
        // With threshold 1 every share equals the secret's limbs.
        let mut secret = [0u8; 32];
        secret[0] = 1;
        secret[7] = 2;
        let mut rng = ChaCha20Rng::seed_from_u64(0);
        let shares = split(&secret, 1, &[5, 9], &mut rng);
        assert_eq!(shares[0], [1, 2, 0, 0, 0]);
        assert_eq!(shares[1], [1, 2, 0, 0, 0]);
        // f(x) = 1 + 2x through (1, 3) and (2, 5) gives back f(0) = 1.
        assert_eq!(interpolate_at_zero(&[1, 2], &[3, 5]), 1);
    }

    #[test]
    fn any_threshold_subset_reconstructs_and_fewer_do_not() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let secret: [u8; 32] = std::array::from_fn(|i| (i * 7 + 3) as u8);
        let xs: Vec<u32> = (1..=7).collect();
        let shares: Vec<(u32, ShareValues)> =
            xs.iter().copied().zip(split(&secret, 4, &xs, &mut rng)).collect();
        for subset in [&shares[..4], &shares[3..], &shares[1..5], &shares[..]] {
            assert_eq!(reconstruct(subset, 4), Ok(secret));
        }
        assert_eq!(reconstruct(&shares[..3], 4), Err(ShamirError::TooFew { got: 3, needed: 4 }));
        // Three shares interpolated as if they were enough give something else.
        assert_ne!(reconstruct(&shares[..3], 3), Ok(secret));
    }

    #[test]
    fn corrupted_or_duplicated_shares_are_detected() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let secret = [9u8; 32];
        let xs: Vec<u32> = (1..=5).collect();
        let mut shares: Vec<(u32, ShareValues)> =
            xs.iter().copied().zip(split(&secret, 3, &xs, &mut rng)).collect();
        shares[4].1[2] = add(shares[4].1[2], 1);
        assert_eq!(reconstruct(&shares, 3), Err(ShamirError::Inconsistent));
        shares[4] = shares[0];
        assert_eq!(reconstruct(&shares, 3), Err(ShamirError::DuplicatePoint(1)));
        assert_eq!(reconstruct(&[(1, [P; LIMBS])], 1), Err(ShamirError::OutOfField));
    }
}
