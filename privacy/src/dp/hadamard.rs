//! The randomized Walsh–Hadamard rotation that spreads an update's energy evenly over
//! its coordinates before rounding, so the modular sum rarely wraps around.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// In-place fast Walsh–Hadamard transform, normalised to be orthonormal (and so its own
/// inverse). `x.len()` must be a power of two.
pub fn fwht(x: &mut [f64]) {
    let n = x.len();
    assert!(n.is_power_of_two(), "fwht needs a power-of-two length, got {n}");
    let mut h = 1;
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        h *= 2;
    }
    let scale = 1.0 / (n as f64).sqrt();
    for v in x.iter_mut() {
        *v *= scale;
    }
}

/// x ↦ H·D·x with D a diagonal of random signs drawn from a round's public seed, or the
/// identity ([`Self::identity`], an encoding without rotation).
#[derive(Clone, Debug)]
pub struct RandomRotation {
    /// `None`: the identity.
    signs: Option<Vec<bool>>,
}

impl RandomRotation {
    /// The rotation of `padded_dimension` (a power of two) coordinates for `seed`.
    pub fn new(padded_dimension: usize, seed: u64) -> Self {
        assert!(padded_dimension.is_power_of_two());
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut signs = Vec::with_capacity(padded_dimension);
        while signs.len() < padded_dimension {
            let word = rng.next_u64();
            signs.extend((0..64).map(|bit| word >> bit & 1 == 1).take(padded_dimension - signs.len()));
        }
        Self { signs: Some(signs) }
    }

    /// The identity, of any length: what an encoding without rotation applies.
    pub fn identity() -> Self {
        Self { signs: None }
    }

    /// H·D·x, in place.
    pub fn forward(&self, x: &mut [f64]) {
        let Some(signs) = &self.signs else { return };
        for (v, &negative) in x.iter_mut().zip(signs) {
            if negative {
                *v = -*v;
            }
        }
        fwht(x);
    }

    /// D·H·y, the inverse of [`Self::forward`], in place.
    pub fn inverse(&self, y: &mut [f64]) {
        let Some(signs) = &self.signs else { return };
        fwht(y);
        for (v, &negative) in y.iter_mut().zip(signs) {
            if negative {
                *v = -*v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fwht_of_a_unit_vector_is_flat() {
        let mut x = vec![0.0; 8];
        x[0] = 1.0;
        fwht(&mut x);
        let flat = 1.0 / 8f64.sqrt();
        assert!(x.iter().all(|v| (v - flat).abs() < 1e-15), "{x:?}");
    }

    #[test]
    fn rotation_preserves_norm_and_inverts() {
        let rotation = RandomRotation::new(1 << 10, 42);
        let original: Vec<f64> = (0..1 << 10).map(|i| ((i * 37 % 101) as f64 - 50.0) / 7.0).collect();
        let mut x = original.clone();
        rotation.forward(&mut x);
        let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
        assert!((norm(&x) - norm(&original)).abs() < 1e-9);
        assert_ne!(x, original);
        rotation.inverse(&mut x);
        let err = x.iter().zip(&original).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-12, "max error {err}");
    }

    #[test]
    fn different_seeds_give_different_rotations() {
        let mut a = vec![1.0; 16];
        let mut b = vec![1.0; 16];
        RandomRotation::new(16, 1).forward(&mut a);
        RandomRotation::new(16, 2).forward(&mut b);
        assert_ne!(a, b);
    }
}
