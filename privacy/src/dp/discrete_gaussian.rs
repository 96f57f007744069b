//! Exact samplers of the discrete Gaussian N_ℤ(0, σ²): OpenDP's arbitrary-precision
//! implementation as the reference, and [`Cks20Sampler`], the same algorithm (Canonne,
//! Kamath, Steinke, NeurIPS 2020) in fixed-width integer arithmetic over a caller-supplied
//! CSPRNG, which is an order of magnitude faster.

use rand_core::{CryptoRng, RngCore};

use super::DpError;

/// A non-negative rational number `num / den`, in lowest terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rational {
    num: u64,
    den: u64,
}

impl Rational {
    pub fn new(num: u64, den: u64) -> Option<Self> {
        if den == 0 {
            return None;
        }
        let g = gcd(num, den);
        Some(Self { num: num / g, den: den / g })
    }

    /// Largest numerator [`Self::approximate`] produces: it keeps every product that
    /// [`Cks20Sampler`] forms within 128 bits for candidates up to 256σ.
    pub const MAX_NUMERATOR: u64 = 1 << 56;

    /// The nearest rational `m / 2^k` with the largest k ≤ 20 that keeps m ≤ 2^56: an
    /// absolute error below 5e-7 for x < 2^36, a relative error below 2^−55 above.
    /// `None` for negative, non-finite or too large (> 2^56) values.
    pub fn approximate(x: f64) -> Option<Self> {
        if !(x.is_finite() && x >= 0.0 && x <= Self::MAX_NUMERATOR as f64) {
            return None;
        }
        let mut k = 20;
        while k > 0 && x * 2f64.powi(k) > Self::MAX_NUMERATOR as f64 {
            k -= 1;
        }
        let den = 1u64 << k;
        Self::new((x * den as f64).round() as u64, den)
    }

    pub fn numerator(self) -> u64 {
        self.num
    }

    pub fn denominator(self) -> u64 {
        self.den
    }

    pub fn to_f64(self) -> f64 {
        self.num as f64 / self.den as f64
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

/// An exact sampler of N_ℤ(0, σ²) for a fixed σ².
pub trait DiscreteGaussianSampler {
    /// The variance σ² every sample is drawn with.
    fn variance(&self) -> f64;
    /// Fills `out` with independent samples.
    fn fill(&mut self, out: &mut [i64]) -> Result<(), DpError>;
}

/// CKS20's exact rejection sampler in `u128` arithmetic, for σ² = a/b given exactly.
///
/// Every Bernoulli trial is decided by comparing a uniform integer with an exact
/// rational, so the output distribution is exactly N_ℤ(0, a/b) except on events whose
/// products would overflow 128 bits. With a ≤ 2^56 (as [`Rational::approximate`]
/// guarantees) those are a Laplace candidate beyond 256σ or a Bernoulli(exp(−γ)) series
/// past 2^40 terms; such a candidate is rejected and redrawn. Each has probability
/// below e^−256.
#[derive(Debug)]
pub struct Cks20Sampler<R> {
    rng: R,
    a: u128,
    b: u128,
    /// Scale of the discrete Laplace proposal, ⌊σ⌋ + 1.
    t: u128,
}

impl<R: RngCore + CryptoRng> Cks20Sampler<R> {
    /// Panics if the numerator exceeds [`Rational::MAX_NUMERATOR`].
    pub fn new(variance: Rational, rng: R) -> Self {
        assert!(variance.num <= Rational::MAX_NUMERATOR, "variance numerator beyond 2^56");
        let (a, b) = (u128::from(variance.num), u128::from(variance.den));
        let t = u128::from(isqrt(variance.num / variance.den)) + 1;
        Self { rng, a, b, t }
    }

    /// One sample of N_ℤ(0, a/b).
    pub fn sample(&mut self) -> i64 {
        if self.a == 0 {
            return 0;
        }
        loop {
            let y = self.discrete_laplace();
            // Accept with probability exp(−(|y| − σ²/t)² / (2σ²))
            //   = exp(−(|y|·t·b − a)² / (2·a·b·t²)).
            let Some(num) = u128::from(y.unsigned_abs())
                .checked_mul(self.t)
                .and_then(|v| v.checked_mul(self.b))
                .map(|v| v.abs_diff(self.a))
                .and_then(|v| v.checked_mul(v))
            else {
                continue;
            };
            let Some(den) = (2 * self.a).checked_mul(self.b).and_then(|v| v.checked_mul(self.t * self.t))
            else {
                continue;
            };
            if self.bernoulli_exp(num, den) {
                return y;
            }
        }
    }

    /// Discrete Laplace with scale t: P(x) ∝ exp(−|x|/t) (CKS20 Algorithm 2, s = 1).
    fn discrete_laplace(&mut self) -> i64 {
        loop {
            let u = self.uniform(self.t);
            if !self.bernoulli_exp(u, self.t) {
                continue;
            }
            let mut v: u128 = 0;
            while self.bernoulli_exp(1, 1) {
                v += 1;
            }
            let Some(x) =
                v.checked_mul(self.t).and_then(|tv| tv.checked_add(u)).and_then(|x| i64::try_from(x).ok())
            else {
                continue;
            };
            let negative = self.rng.next_u32() & 1 == 1;
            if negative && x == 0 {
                continue;
            }
            return if negative { -x } else { x };
        }
    }

    /// Bernoulli(exp(−num/den)) exactly (CKS20 Algorithm 1).
    fn bernoulli_exp(&mut self, mut num: u128, den: u128) -> bool {
        while num > den {
            if !self.bernoulli_exp(1, 1) {
                return false;
            }
            num -= den;
        }
        // Now γ = num/den ∈ [0, 1]: count k until Bernoulli(γ/k) fails; succeed if k odd.
        let mut k: u128 = 1;
        loop {
            let Some(scaled) = den.checked_mul(k) else { return k % 2 == 1 };
            if !self.bernoulli(num, scaled) {
                return k % 2 == 1;
            }
            k += 1;
        }
    }

    /// Bernoulli(num/den) exactly, for num ≤ den.
    fn bernoulli(&mut self, num: u128, den: u128) -> bool {
        self.uniform(den) < num
    }

    /// Uniform on [0, n) by rejection, n ≥ 1.
    fn uniform(&mut self, n: u128) -> u128 {
        if let Ok(n64) = u64::try_from(n) {
            // 2^64 mod n values at the top are rejected so every residue is equally likely.
            let reject_from = u64::MAX - (u64::MAX % n64 + 1) % n64;
            loop {
                let r = self.rng.next_u64();
                if r <= reject_from {
                    return u128::from(r % n64);
                }
            }
        }
        let reject_from = u128::MAX - (u128::MAX % n + 1) % n;
        loop {
            let r = (u128::from(self.rng.next_u64()) << 64) | u128::from(self.rng.next_u64());
            if r <= reject_from {
                return r % n;
            }
        }
    }
}

impl<R: RngCore + CryptoRng> DiscreteGaussianSampler for Cks20Sampler<R> {
    fn variance(&self) -> f64 {
        self.a as f64 / self.b as f64
    }

    fn fill(&mut self, out: &mut [i64]) -> Result<(), DpError> {
        for x in out {
            *x = self.sample();
        }
        Ok(())
    }
}

fn isqrt(n: u64) -> u64 {
    let mut x = (n as f64).sqrt() as u64;
    while x.checked_mul(x).is_none_or(|sq| sq > n) {
        x -= 1;
    }
    while (x + 1).checked_mul(x + 1).is_some_and(|sq| sq <= n) {
        x += 1;
    }
    x
}

/// OpenDP's exact sampler (arbitrary precision; its randomness from `rand`'s thread
/// generator, as OpenDP is built without its `use-openssl` feature), the reference that
/// [`Cks20Sampler`] is tested and benchmarked against; no round's noise comes from it.
/// Takes σ, not σ², as a rational.
#[derive(Debug)]
pub struct OpenDpSampler {
    scale: dashu::rational::RBig,
    variance: f64,
}

impl OpenDpSampler {
    /// σ = num/den.
    pub fn new(num: u64, den: u64) -> Self {
        let scale = dashu::rational::RBig::from_parts(num.into(), den.into());
        let sigma = num as f64 / den as f64;
        Self { scale, variance: sigma * sigma }
    }
}

impl DiscreteGaussianSampler for OpenDpSampler {
    fn variance(&self) -> f64 {
        self.variance
    }

    fn fill(&mut self, out: &mut [i64]) -> Result<(), DpError> {
        for x in out {
            let sample = opendp::traits::samplers::sample_discrete_gaussian(self.scale.clone())
                .map_err(|e| DpError::Reference(e.to_string()))?;
            *x = i64::try_from(sample).map_err(|e| DpError::Reference(e.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn isqrt_is_exact_at_the_edges() {
        for n in [0u64, 1, 2, 3, 4, 15, 16, 17, 99_999_999, 100_000_000, u64::MAX] {
            let r = isqrt(n);
            assert!(r * r <= n && (r + 1).checked_mul(r + 1).is_none_or(|s| s > n), "isqrt({n}) = {r}");
        }
    }

    #[test]
    fn rationals_are_reduced_and_approximations_are_close() {
        assert_eq!(Rational::new(6, 8), Rational::new(3, 4));
        assert_eq!(Rational::approximate(0.25), Rational::new(1, 4));
        let r = Rational::approximate(std::f64::consts::PI).expect("finite");
        assert!((r.to_f64() - std::f64::consts::PI).abs() < 1e-6);
        assert_eq!(Rational::approximate(-1.0), None);
        assert_eq!(Rational::approximate(f64::NAN), None);
        let big = Rational::approximate(5.8e15).expect("below 2^56");
        assert!(big.numerator() <= Rational::MAX_NUMERATOR);
        assert!((big.to_f64() - 5.8e15).abs() / 5.8e15 < 1e-15);
        assert_eq!(Rational::approximate(1e18), None);
    }

    #[test]
    fn zero_variance_gives_zeros_and_seeded_runs_repeat() {
        let mut zero = Cks20Sampler::new(Rational::new(0, 1).expect("ok"), ChaCha20Rng::seed_from_u64(1));
        assert_eq!(zero.sample(), 0);
        let draw = |seed| {
            let mut s = Cks20Sampler::new(Rational::new(4, 1).expect("ok"), ChaCha20Rng::seed_from_u64(seed));
            (0..100).map(|_| s.sample()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }
}
