//! The distributed discrete Gaussian mechanism (DDGauss; Kairouz, Liu, Steinke, ICML
//! 2021): each client clips, rotates, scales, rounds and adds its share of discrete
//! Gaussian noise to its update, then reduces it mod 2^b for secure aggregation; the
//! server decodes only the sum.
//!
//! Client: `x ↦ clip_c(x) ↦ pad to 2^k ↦ H·D·x ↦ /γ ↦ conditional randomized rounding
//! (retry until ‖x̃‖₂ ≤ Δ₂) ↦ + N_ℤ(0, σ²/γ²/t) ↦ mod 2^b`.
//! Server: `Σ mod 2^b ↦ lift to [−2^(b−1), 2^(b−1)) ↦ ×γ ↦ D·H·y ↦ unpad`.

use rand_core::{CryptoRng, RngCore};

use super::discrete_gaussian::{Cks20Sampler, Rational};
use super::{DpError, RandomRotation, clip_l2};

/// β of the conditional rounding: the bound Δ₂ holds for a fresh rounding with
/// probability at least 1 − β, so a retry is needed less than 61% of the time.
const BETA: f64 = 0.606_530_659_712_633_4; // e^−0.5
/// Rounding retries before giving up; each try fails with probability ≤ β, so all of
/// them fail with probability below 10^−21.
const MAX_ROUNDING_TRIES: u32 = 100;
/// Smallest scaled local noise deviation σ̂ accepted (the τ term of the privacy bound
/// grows like exp(−π²σ̂²) below it).
const MIN_SCALED_STDDEV: f64 = 2.0;
/// Largest σ̂ selection aims for: beyond it, a finer γ would shrink the rounding error
/// (variance γ²/4) below 2^−42 of the noise and buy nothing.
const MAX_SCALED_STDDEV: f64 = (1u64 << 20) as f64;

/// What the coordinator knows when it chooses a round's encoding.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamsRequest {
    /// d: length of the update vector.
    pub dimension: usize,
    /// c: L2 clip norm.
    pub clip_norm: f64,
    /// σ: standard deviation of the noise the decoded sum must carry (z·c); 0 for none.
    pub noise_stddev: f64,
    /// s: the shares σ² is split across; each client adds σ²/s. A round that accepts t
    /// survivors and tolerates c colluders (who may add nothing) uses s = t − c, so the
    /// honest survivors alone carry σ² (`cost::RoundPrivacy::noise_shares`).
    pub noise_shares: u32,
    /// n: most clients that may be summed.
    pub max_summands: u32,
    /// b: bits of the modular ring, 1..=32.
    pub bit_width: u32,
    /// Accepted probability that some coordinate of the sum wraps around the modulus.
    pub wrap_probability: f64,
}

/// The parameters of one round's encoding, shared by every client and the server.
#[derive(Clone, Debug, PartialEq)]
pub struct DdgParams {
    dimension: usize,
    clip_norm: f64,
    gamma: f64,
    bit_width: u32,
    /// σ²/γ²/t, the variance of each client's noise in the scaled (integer) domain.
    local_variance: Rational,
    /// Whether the update is rotated (and padded to a power of two, [`padded_length`])
    /// before rounding; an encoding without noise need not be ([`Self::unrotated`]).
    rotated: bool,
}

/// One client's encoded, noised update, ready to be masked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DdgEncoding {
    pub values: Vec<u32>,
    /// L2 norm of the update before clipping, the largest over the summands (local
    /// diagnostics only; never sent).
    pub norm_before_clipping: u64,
    pub rounding_tries: u32,
}

/// A sum of summands (shoppers' updates), each clipped to c on its own, then scaled,
/// rotated and randomly rounded **once** ([`DdgParams::summands`]). Rounding is
/// unconditional, one uniform per coordinate drawn in coordinate order whatever the values:
/// coupled on those uniforms, rounding `a` and `a + x` gives integers that differ by less
/// than `|x_j| + 1` in each coordinate, so adding or removing one summand moves the rounded
/// sum by at most `c/γ + √d` in L2 ([`DdgParams::summed_delta2_squared`]).
#[derive(Debug)]
pub struct DdgSum<'a> {
    params: &'a DdgParams,
    rotation: &'a RandomRotation,
    sum: Vec<f64>,
    count: u32,
    largest_norm: f64,
}

impl DdgSum<'_> {
    /// Clips `x` (consumed as scratch space) to c and adds it to the sum. A non-finite `x`
    /// is refused and leaves the sum as it was.
    pub fn add(&mut self, x: &mut [f32]) -> Result<(), DpError> {
        if x.len() != self.params.dimension {
            return Err(DpError::Dimension { expected: self.params.dimension, actual: x.len() });
        }
        let norm = clip_l2(x, self.params.clip_norm)?;
        for (s, &v) in self.sum.iter_mut().zip(x.iter()) {
            *s += f64::from(v);
        }
        self.count += 1;
        self.largest_norm = self.largest_norm.max(norm);
        Ok(())
    }

    /// Adds a sparse summand: `values` at the coordinates `indices` (strictly increasing,
    /// each below the dimension), zero everywhere else. `values` is consumed as scratch
    /// space. Exactly [`Self::add`] on the dense vector, to the bit (its norm, clipping and
    /// sum skip only zeros), at the cost of the non-zeros rather than of d: a popularity
    /// release or a pooling selection touches a shopper's few coordinates out of millions.
    /// Indices out of order, repeated or out of range are refused (a repeated index would
    /// hide part of the summand's norm from the clipping) and leave the sum as it was.
    pub fn add_sparse(&mut self, indices: &[usize], values: &mut [f32]) -> Result<(), DpError> {
        if indices.len() != values.len() {
            return Err(parameter(
                "indices",
                format!("{} indices for {} values", indices.len(), values.len()),
            ));
        }
        if let Some(pair) = indices.windows(2).find(|pair| pair[0] >= pair[1]) {
            return Err(parameter(
                "indices",
                format!("must be strictly increasing, found {} then {}", pair[0], pair[1]),
            ));
        }
        if let Some(&last) = indices.last()
            && last >= self.params.dimension
        {
            return Err(DpError::Dimension { expected: self.params.dimension, actual: last + 1 });
        }
        let norm = clip_l2(values, self.params.clip_norm).map_err(|e| match e {
            DpError::NonFinite { index } => DpError::NonFinite { index: indices[index] },
            other => other,
        })?;
        for (&i, &v) in indices.iter().zip(values.iter()) {
            self.sum[i] += f64::from(v);
        }
        self.count += 1;
        self.largest_norm = self.largest_norm.max(norm);
        Ok(())
    }

    /// Summands added so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The sum scaled by 1/γ, rotated and randomly rounded, before noise: what one
    /// summand's sensitivity is about.
    pub fn rounded(&self, rng: &mut (impl RngCore + CryptoRng)) -> Vec<i64> {
        let mut rotated = vec![0.0f64; self.params.padded_dimension()];
        for (r, &v) in rotated.iter_mut().zip(&self.sum) {
            *r = v / self.params.gamma;
        }
        self.rotation.forward(&mut rotated);
        rotated
            .iter()
            .map(|&v| {
                let floor = v.floor();
                (floor + if uniform01(rng) < v - floor { 1.0 } else { 0.0 }) as i64
            })
            .collect()
    }

    /// Rounds the sum, adds this client's share of the discrete Gaussian noise once, and
    /// reduces mod 2^b.
    pub fn finish(self, rng: &mut (impl RngCore + CryptoRng)) -> Result<DdgEncoding, DpError> {
        let rounded = self.rounded(rng);
        let mut noise = vec![0i64; self.params.padded_dimension()];
        let mut sampler = Cks20Sampler::new(self.params.local_variance, &mut *rng);
        super::DiscreteGaussianSampler::fill(&mut sampler, &mut noise)?;
        let mask = self.params.mask();
        let values =
            rounded.iter().zip(&noise).map(|(&r, &z)| (r.wrapping_add(z) as u64 & mask) as u32).collect();
        Ok(DdgEncoding { values, norm_before_clipping: self.largest_norm.round() as u64, rounding_tries: 1 })
    }
}

fn parameter(name: &'static str, reason: String) -> DpError {
    DpError::Parameter { name, reason }
}

impl DdgParams {
    /// Chooses γ for a modulus of 2^b so that the sum of `max_summands` encodings wraps
    /// around with probability at most `wrap_probability`, following the condition of
    /// Kairouz et al. `2^b ≥ 2k·√(c²n²/d + (γ²/4 + σ²/t)·n)/γ` with
    /// `k = √(2 ln(2d / p_wrap))` standard deviations (a union bound over the d
    /// coordinates of sub-Gaussian tails). γ is the finest that meets it, but no finer than
    /// σ̂ = 2^20 needs. Refuses settings where no γ meets it, or where the resulting γ
    /// leaves the scaled noise too coarse to account for.
    pub fn select(request: &ParamsRequest) -> Result<Self, DpError> {
        let ParamsRequest {
            dimension,
            clip_norm,
            noise_stddev,
            noise_shares,
            max_summands,
            bit_width,
            wrap_probability,
        } = *request;
        if !(wrap_probability > 0.0 && wrap_probability < 1.0) {
            return Err(parameter("wrap_probability", format!("must be in (0, 1), got {wrap_probability}")));
        }
        if noise_shares == 0 || max_summands < noise_shares {
            return Err(parameter(
                "noise_shares",
                format!("need 1 ≤ noise_shares ({noise_shares}) ≤ max_summands ({max_summands})"),
            ));
        }
        if !(noise_stddev.is_finite() && noise_stddev >= 0.0) {
            return Err(parameter("noise_stddev", format!("must be finite and ≥ 0, got {noise_stddev}")));
        }
        check_shape(dimension, clip_norm, bit_width)?;
        let d = padded_length(true, dimension) as f64;
        let n = f64::from(max_summands);
        let k = (2.0 * (2.0 * d / wrap_probability).ln()).sqrt();
        let modulus = 2f64.powi(bit_width as i32);
        let local_variance = noise_stddev * noise_stddev / f64::from(noise_shares);
        let signal_and_noise = clip_norm * clip_norm * n * n / d + local_variance * n;
        let room = modulus * modulus / (4.0 * k * k) - n / 4.0;
        if room <= 0.0 {
            return Err(DpError::ModulusTooSmall { bit_width, summands: max_summands, wrap_probability });
        }
        let finest = (signal_and_noise / room).sqrt();
        let gamma = finest.max(local_variance.sqrt() / MAX_SCALED_STDDEV);
        Self::from_round(dimension, clip_norm, gamma, bit_width, noise_stddev, noise_shares)
    }

    /// The parameters a client rebuilds from its round task; each client adds σ²/`noise_shares`.
    pub fn from_round(
        dimension: usize,
        clip_norm: f64,
        gamma: f64,
        bit_width: u32,
        noise_stddev: f64,
        noise_shares: u32,
    ) -> Result<Self, DpError> {
        check_shape(dimension, clip_norm, bit_width)?;
        if !(gamma.is_finite() && gamma > 0.0) {
            return Err(parameter("gamma", format!("must be positive and finite, got {gamma}")));
        }
        if noise_shares == 0 {
            return Err(parameter("noise_shares", "must be at least 1".into()));
        }
        let scaled = noise_stddev * noise_stddev / (gamma * gamma) / f64::from(noise_shares);
        let local_variance = Rational::approximate(scaled).ok_or_else(|| {
            parameter("noise_stddev", format!("scaled local variance {scaled:e} is out of range"))
        })?;
        if noise_stddev > 0.0 && local_variance.to_f64().sqrt() < MIN_SCALED_STDDEV {
            return Err(DpError::GranularityTooCoarse {
                gamma,
                scaled_stddev: local_variance.to_f64().sqrt(),
            });
        }
        Ok(Self { dimension, clip_norm, gamma, bit_width, local_variance, rotated: true })
    }

    /// The encoding of a round that adds no noise (`dangerous_none`), γ chosen here: no
    /// rotation and no padding, each coordinate clipped, scaled and rounded where it is. A
    /// clipped update's coordinate is at most c in magnitude and its rounding moves it by
    /// less than 1 in the scaled domain, so the sum of `max_summands` encodings stays below
    /// `n·(c/γ + 1)` in every coordinate; γ = n·c / (2^(b−1) − n − 1) keeps that inside the
    /// ring's half-width, and the sum never wraps (no probability to accept). Coarser than a
    /// rotated encoding's γ by about √d / (2k) (k a few standard deviations), which at 32
    /// bits leaves a clipped update's coordinates a rounding error near 10⁻⁷·c each: it
    /// saves the rotation, the padding (up to half the masked vector) and their inverse.
    pub fn select_unrotated(
        dimension: usize,
        clip_norm: f64,
        max_summands: u32,
        bit_width: u32,
    ) -> Result<Self, DpError> {
        check_shape(dimension, clip_norm, bit_width)?;
        let n = f64::from(max_summands.max(1));
        let room = 2f64.powi(bit_width as i32 - 1) - n - 1.0;
        if room <= 0.0 {
            return Err(parameter(
                "bit_width",
                format!("a ring of 2^{bit_width} cannot hold the sum of {max_summands} unrotated encodings"),
            ));
        }
        Self::unrotated(dimension, clip_norm, n * clip_norm / room, bit_width)
    }

    /// The parameters of an encoding without rotation or noise that a client rebuilds from
    /// its round task ([`Self::select_unrotated`]).
    pub fn unrotated(dimension: usize, clip_norm: f64, gamma: f64, bit_width: u32) -> Result<Self, DpError> {
        let rotated = Self::from_round(dimension, clip_norm, gamma, bit_width, 0.0, 1)?;
        Ok(Self { rotated: false, ..rotated })
    }

    /// Whether the update is rotated before rounding (and its length padded to a power of
    /// two); [`Self::rotation`] is the identity when not.
    pub fn rotated(&self) -> bool {
        self.rotated
    }

    /// The round's rotation for its public `seed`: the randomized Hadamard transform of the
    /// padded dimension, or the identity for an encoding without rotation.
    pub fn rotation(&self, seed: u64) -> RandomRotation {
        if self.rotated {
            RandomRotation::new(self.padded_dimension(), seed)
        } else {
            RandomRotation::identity()
        }
    }

    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// The length of an encoding and of the masked vector: the dimension padded to a power
    /// of two, or the dimension itself without rotation.
    pub fn padded_dimension(&self) -> usize {
        padded_length(self.rotated, self.dimension)
    }

    pub fn gamma(&self) -> f64 {
        self.gamma
    }

    pub fn bit_width(&self) -> u32 {
        self.bit_width
    }

    /// σ̂²: the variance of one client's noise in the scaled domain, exactly as sampled.
    pub fn scaled_local_variance(&self) -> f64 {
        self.local_variance.to_f64()
    }

    /// The variance of each coordinate of a decoded sum of `shares` encodings, in the update's
    /// units: `shares` noise shares of `σ²/t` each, plus each encoding's randomised rounding
    /// (at most `γ²/4` per coordinate, taken at that bound), the whole rotated back (an
    /// orthogonal map keeps i.i.d. coordinates' variance).
    pub fn decoded_noise_variance(&self, shares: u32) -> f64 {
        f64::from(shares) * self.gamma * self.gamma * (self.scaled_local_variance() + 0.25)
    }

    /// Δ₂²: the bound on ‖x̃‖₂² that conditional rounding enforces, in the scaled domain:
    /// `min{(c/γ + √d)², c²/γ² + d/4 + √(2 ln(1/β))·(c/γ + √d/2)}`.
    pub fn delta2_squared(&self) -> f64 {
        let (c, d) = (self.clip_norm / self.gamma, self.padded_dimension() as f64);
        let first = (c + d.sqrt()).powi(2);
        let second = c * c + d / 4.0 + (2.0 * (1.0 / BETA).ln()).sqrt() * (c + d.sqrt() / 2.0);
        first.min(second)
    }

    /// The largest L2 norm the decoded sum of an honest round reaches, except with
    /// probability `false_rejection`: `m·c + m·γ·√d + √v·(√d + √(2 ln(1/p)))`, with `m` the
    /// most summands (each clipped to c), `d` the padded dimension (each summand's rounding
    /// moves each rotated coordinate by less than γ) and `v = shares·σ²/t` the variance
    /// proxy of the noise per coordinate (`shares` noise shares of σ²/t each; a discrete
    /// Gaussian is sub-Gaussian with its variance), by the norm bound for sub-Gaussian vectors
    /// (Hsu, Kakade and Zhang 2012). A sum above it did not come from clipped, encoded
    /// updates: some client sent something else.
    pub fn honest_sum_norm_bound(&self, summands: u32, shares: u32, false_rejection: f64) -> f64 {
        let d = self.padded_dimension() as f64;
        let m = f64::from(summands);
        let v = f64::from(shares) * self.scaled_local_variance() * self.gamma * self.gamma;
        m * self.clip_norm
            + m * self.gamma * d.sqrt()
            + v.sqrt() * (d.sqrt() + (2.0 * (1.0 / false_rejection).ln()).sqrt())
    }

    fn mask(&self) -> u64 {
        (1u64 << self.bit_width) - 1
    }

    /// Clips, rotates, scales, rounds and noises `x` (consumed as scratch space) and
    /// reduces it mod 2^b: one client's whole update as one summand.
    pub fn encode(
        &self,
        x: &mut [f32],
        rotation: &RandomRotation,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<DdgEncoding, DpError> {
        let (rounded, norm, tries) = self.round_one(x, rotation, rng)?;
        let mut noise = vec![0i64; self.padded_dimension()];
        let mut sampler = Cks20Sampler::new(self.local_variance, &mut *rng);
        super::DiscreteGaussianSampler::fill(&mut sampler, &mut noise)?;
        let mask = self.mask();
        let values = rounded.iter().zip(&noise).map(|(&r, &z)| ((r + z) as u64 & mask) as u32).collect();
        Ok(DdgEncoding { values, norm_before_clipping: norm.round() as u64, rounding_tries: tries })
    }

    /// An empty sum of summands, each clipped to c on its own ([`DdgSum::add`]), the sum
    /// scaled, rotated, rounded and noised once ([`DdgSum::finish`]): the shopper unit's
    /// encoding of one merchant's sampled shoppers. One summand's sensitivity is
    /// [`Self::summed_delta2_squared`].
    pub fn summands<'a>(&'a self, rotation: &'a RandomRotation) -> DdgSum<'a> {
        DdgSum { params: self, rotation, sum: vec![0.0; self.dimension], count: 0, largest_norm: 0.0 }
    }

    /// One summand's L2 sensitivity, squared, through [`DdgSum`]'s shared unconditional
    /// rounding: `(c/γ + √d)²` (d padded), the first term of [`Self::delta2_squared`]. At
    /// the γ a 32-bit ring gives, c/γ is many orders of magnitude above √d, so this costs
    /// almost nothing against per-summand conditional rounding, which would rotate and round
    /// d coordinates per shopper instead of per merchant.
    pub fn summed_delta2_squared(&self) -> f64 {
        (self.clip_norm / self.gamma + (self.padded_dimension() as f64).sqrt()).powi(2)
    }

    /// Clips `x` (consumed) to c, rotates, scales by 1/γ and rounds it conditionally: the
    /// integer vector has squared L2 norm at most Δ₂² ([`Self::delta2_squared`]).
    /// Returns the vector, the norm before clipping and the tries the rounding took.
    pub fn round_one(
        &self,
        x: &mut [f32],
        rotation: &RandomRotation,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(Vec<i64>, f64, u32), DpError> {
        if x.len() != self.dimension {
            return Err(DpError::Dimension { expected: self.dimension, actual: x.len() });
        }
        let norm = clip_l2(x, self.clip_norm)?;
        let mut rotated = vec![0.0f64; self.padded_dimension()];
        for (r, &v) in rotated.iter_mut().zip(x.iter()) {
            *r = f64::from(v) / self.gamma;
        }
        rotation.forward(&mut rotated);

        let bound = self.delta2_squared();
        let mut rounded = vec![0i64; self.padded_dimension()];
        let mut tries = 0;
        loop {
            tries += 1;
            if tries > MAX_ROUNDING_TRIES {
                return Err(DpError::RoundingFailed { tries: MAX_ROUNDING_TRIES });
            }
            let mut norm_squared = 0.0;
            for (out, &v) in rounded.iter_mut().zip(&rotated) {
                let floor = v.floor();
                let up = uniform01(rng) < v - floor;
                let r = floor + if up { 1.0 } else { 0.0 };
                norm_squared += r * r;
                *out = r as i64;
            }
            if norm_squared <= bound {
                return Ok((rounded, norm, tries));
            }
        }
    }

    /// Decodes the modular sum of encodings back to the sum of (clipped, noised) updates.
    pub fn decode(&self, sum: &[u32], rotation: &RandomRotation) -> Result<Vec<f64>, DpError> {
        if sum.len() != self.padded_dimension() {
            return Err(DpError::Dimension { expected: self.padded_dimension(), actual: sum.len() });
        }
        let modulus = 1i64 << self.bit_width;
        let half = modulus / 2;
        let mut y: Vec<f64> = sum
            .iter()
            .map(|&s| {
                let s = i64::from(s) & (modulus - 1);
                let lifted = if s >= half { s - modulus } else { s };
                lifted as f64 * self.gamma
            })
            .collect();
        rotation.inverse(&mut y);
        y.truncate(self.dimension);
        Ok(y)
    }
}

fn check_shape(dimension: usize, clip_norm: f64, bit_width: u32) -> Result<(), DpError> {
    if dimension == 0 {
        return Err(parameter("dimension", "must be at least 1".into()));
    }
    if !(clip_norm.is_finite() && clip_norm > 0.0) {
        return Err(parameter("clip_norm", format!("must be positive and finite, got {clip_norm}")));
    }
    if !(1..=32).contains(&bit_width) {
        return Err(parameter("bit_width", format!("must be 1..=32, got {bit_width}")));
    }
    Ok(())
}

fn uniform01(rng: &mut impl RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The length of a round's encoding of `dimension` coordinates in `mode`: padded to a
/// power of two for the rotation, or the dimension itself ([`DdgParams::rotated`]).
pub fn encoded_length(mode: crate::PrivacyMode, dimension: usize) -> usize {
    padded_length(mode.rotates(), dimension)
}

/// The one rule of an encoding's length: a rotated one is padded to a power of two for the
/// Hadamard transform, an unrotated one is the dimension itself.
fn padded_length(rotated: bool, dimension: usize) -> usize {
    if rotated { dimension.next_power_of_two() } else { dimension }
}

/// Adds `x` into `acc` coordinate-wise mod 2^b.
pub fn add_mod(acc: &mut [u32], x: &[u32], bit_width: u32) {
    let mask = if bit_width == 32 { u32::MAX } else { (1u32 << bit_width) - 1 };
    for (a, &v) in acc.iter_mut().zip(x) {
        *a = a.wrapping_add(v) & mask;
    }
}

/// ρ of the ½ε²-zCDP guarantee of one round whose sum carries the noise of at least
/// `noise_shares` clients, by Kairouz, Liu and Steinke (2021, Theorem 1 with the
/// conditional-rounding sensitivity Δ₂):
/// `ε = min{√(Δ₂²/(nσ̂²) + ½τd), Δ₂/(√n σ̂) + τ√d}`, `τ = 10·Σ_{k=1}^{n−1} exp(−2π²σ̂²·k/(k+1))`.
///
/// Merchant unit: pass `noise_shares = t − 1` for a round that accepts t survivors (the
/// protected merchant's own share is not counted). Shopper unit: pass t — a shopper's own
/// merchant is the party it trusts with its data, and its share is in the sum like any
/// other; adding or removing a shopper changes no merchant's share, so the two neighbouring
/// outputs differ only in mean (by the shopper's rounded vector, L2 norm ≤ Δ₂).
pub fn ddgauss_zcdp_rho(params: &DdgParams, noise_shares: u32) -> Result<f64, DpError> {
    ddgauss_zcdp_rho_at(params, noise_shares, params.delta2_squared())
}

/// [`ddgauss_zcdp_rho`] at a given sensitivity Δ₂² (the shopper unit passes
/// [`DdgParams::summed_delta2_squared`]).
pub fn ddgauss_zcdp_rho_at(params: &DdgParams, noise_shares: u32, delta2_sq: f64) -> Result<f64, DpError> {
    if noise_shares == 0 {
        return Err(parameter("noise_shares", "at least one other client's noise is needed".into()));
    }
    let sigma2 = params.scaled_local_variance();
    if sigma2 <= 0.0 {
        return Ok(f64::INFINITY);
    }
    let n = f64::from(noise_shares);
    let d = params.padded_dimension() as f64;
    let pi2 = std::f64::consts::PI * std::f64::consts::PI;
    let tau = 10.0
        * (1..noise_shares)
            .map(|k| {
                let k = f64::from(k);
                (-2.0 * pi2 * sigma2 * k / (k + 1.0)).exp()
            })
            .sum::<f64>();
    let first = (delta2_sq / (n * sigma2) + 0.5 * tau * d).sqrt();
    let second = delta2_sq.sqrt() / (n.sqrt() * sigma2.sqrt()) + tau * d.sqrt();
    let epsilon = first.min(second);
    Ok(epsilon * epsilon / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without rotation: no padding, the identity rotation, and the sum of the worst case (every
    /// client's whole clip norm in one coordinate, of either sign) decodes without wrapping,
    /// each coordinate within n·γ of the clipped sum. A γ one part in a thousand finer
    /// wraps it, so the bound is what holds the sum in the ring.
    #[test]
    fn an_unrotated_encoding_holds_the_worst_case_sum_without_padding() {
        use rand_core::SeedableRng;
        let (d, n, c, b) = (1000usize, 30u32, 2.5f64, 20u32);
        let params = DdgParams::select_unrotated(d, c, n, b).expect("fits");
        assert!(!params.rotated());
        assert_eq!(params.padded_dimension(), d);
        assert_eq!(encoded_length(crate::PrivacyMode::DangerousNone, d), d);
        assert_eq!(encoded_length(crate::PrivacyMode::Distributed, d), 1024);
        assert_eq!(DdgParams::unrotated(d, c, params.gamma(), b).expect("rebuilt"), params);
        assert!(DdgParams::from_round(d, c, params.gamma(), b, 0.0, 1).expect("rotated").rotated());
        let sum_of = |params: &DdgParams, sign: f32| {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
            let rotation = params.rotation(9);
            let mut acc = vec![0u32; params.padded_dimension()];
            for _ in 0..n {
                // Above the clip norm: clipped to c, all of it in coordinate 3.
                let mut x = vec![0f32; d];
                x[3] = sign * 4.0;
                x[7] = sign * 1e-3;
                let encoded = params.encode(&mut x, &rotation, &mut rng).expect("encode");
                add_mod(&mut acc, &encoded.values, b);
            }
            params.decode(&acc, &rotation).expect("decode")
        };
        for sign in [1.0f32, -1.0] {
            let decoded = sum_of(&params, sign);
            // The clipped update: c·x/‖x‖ at coordinates 3 and 7, zero elsewhere.
            let norm = f64::from(4.0f32).hypot(f64::from(1e-3f32));
            let clipped = |i: usize| match i {
                3 => f64::from(sign) * c * 4.0 / norm,
                7 => f64::from(sign) * c * f64::from(1e-3f32) / norm,
                _ => 0.0,
            };
            for (i, v) in decoded.iter().enumerate() {
                let expected = f64::from(n) * clipped(i);
                assert!(
                    (v - expected).abs() <= f64::from(n) * params.gamma(),
                    "coordinate {i}: {v} vs {expected}"
                );
            }
        }
        let finer = DdgParams::unrotated(d, c, params.gamma() * 0.999, b).expect("finer");
        let wrapped = sum_of(&finer, 1.0);
        assert!(wrapped[3] < 0.0, "a finer γ wraps the worst case: {}", wrapped[3]);
        // A ring too small for the summands is refused, naming the bit width.
        let error = DdgParams::select_unrotated(d, c, 1 << 12, 12).expect_err("too small").to_string();
        assert!(error.contains("bit_width"), "{error}");
    }

    fn request() -> ParamsRequest {
        ParamsRequest {
            dimension: 1000,
            clip_norm: 1.0,
            noise_stddev: 1.0,
            noise_shares: 8,
            max_summands: 10,
            bit_width: 20,
            wrap_probability: 1e-9,
        }
    }

    #[test]
    fn selection_meets_the_modulus_condition() {
        let p = DdgParams::select(&request()).expect("feasible");
        let r = request();
        let (d, n, c) = (1024.0, 10.0, 1.0);
        let k = (2.0 * (2.0 * d / r.wrap_probability).ln()).sqrt();
        let needed =
            2.0 * k * (c * c * n * n / d + (p.gamma * p.gamma / 4.0 + 1.0 / 8.0) * n).sqrt() / p.gamma;
        assert!(needed <= 2f64.powi(20) * (1.0 + 1e-9), "needs {needed}");
        assert!(needed >= 2f64.powi(20) * (1.0 - 1e-6), "γ should be as fine as the modulus allows");
        // With 32 bits the modulus allows more precision than is useful: σ̂ is capped.
        let wide = DdgParams::select(&ParamsRequest { bit_width: 32, ..request() }).expect("feasible");
        assert!((wide.scaled_local_variance().sqrt() - MAX_SCALED_STDDEV).abs() < 1.0);
    }

    #[test]
    fn infeasible_settings_are_refused_with_a_reason() {
        let tiny = ParamsRequest { bit_width: 4, max_summands: 10, ..request() };
        assert!(matches!(DdgParams::select(&tiny), Err(DpError::ModulusTooSmall { .. })));
        let coarse = DdgParams::from_round(1000, 1.0, 0.5, 20, 1.0, 8);
        assert!(matches!(coarse, Err(DpError::GranularityTooCoarse { .. })), "{coarse:?}");
        let zero = ParamsRequest { noise_shares: 0, ..request() };
        assert!(matches!(DdgParams::select(&zero), Err(DpError::Parameter { name: "noise_shares", .. })));
    }

    #[test]
    fn delta2_is_at_least_the_scaled_clip_norm() {
        let p = DdgParams::select(&request()).expect("feasible");
        assert!(p.delta2_squared() >= (1.0 / p.gamma).powi(2));
        assert!(p.delta2_squared() <= (1.0 / p.gamma + 32.0).powi(2));
    }

    /// The shopper unit's sum: whatever one shopper's data makes its update (huge, spiked,
    /// alternating, exactly at the clip norm, tiny), adding it to a merchant's sum moves the
    /// rounded integers by at most √(summed Δ₂²) = c/γ + √d in L2 — checked on the actual
    /// integers, the rounding coupled on the same uniforms in both sums.
    #[test]
    fn one_summand_moves_the_rounded_sum_by_at_most_the_summed_sensitivity() {
        use rand_chacha::ChaCha20Rng;
        use rand_core::SeedableRng;
        let p =
            DdgParams::select(&ParamsRequest { bit_width: 32, noise_stddev: 0.5, ..request() }).expect("ok");
        let rotation = RandomRotation::new(p.padded_dimension(), 7);
        let mut data = ChaCha20Rng::seed_from_u64(3);
        let honest: Vec<Vec<f32>> = (0..20)
            .map(|i| (0..1000).map(|_| (uniform01(&mut data) as f32 - 0.5) * (i as f32 * 0.01)).collect())
            .collect();
        let mut spike = vec![0.0f32; 1000];
        spike[17] = 1e30;
        let mut at_clip = vec![0.0f32; 1000];
        at_clip[0] = 1.0;
        let adversarial = [
            vec![1e30f32; 1000],
            spike,
            (0..1000).map(|i| if i % 2 == 0 { 3e7 } else { -3e7 }).collect(),
            at_clip,
            vec![1e-9f32; 1000],
        ];
        let bound = p.summed_delta2_squared();
        assert!(bound < p.delta2_squared() * 1.01, "the sum's bound is close to per-summand rounding's");
        let mut without = p.summands(&rotation);
        for h in &honest {
            without.add(&mut h.clone()).expect("finite");
        }
        let mut largest = 0.0f64;
        for (case, shopper) in adversarial.iter().enumerate() {
            let mut with = p.summands(&rotation);
            for h in &honest {
                with.add(&mut h.clone()).expect("finite");
            }
            with.add(&mut shopper.clone()).expect("finite");
            assert_eq!((with.count(), without.count()), (21, 20));
            for seed in 0..20u64 {
                let a = with.rounded(&mut ChaCha20Rng::seed_from_u64(seed));
                let b = without.rounded(&mut ChaCha20Rng::seed_from_u64(seed));
                let moved: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
                assert!(moved <= bound, "case {case}: moved {moved} > Δ₂² = {bound}");
                if case < 4 {
                    // Not vacuous: a shopper at the clip norm moves the sum by about c/γ.
                    assert!(moved >= (0.9 / p.gamma()).powi(2), "case {case}: moved only {moved}");
                }
                largest = largest.max(moved);
            }
        }
        assert!(largest > 0.5 * bound, "the bound is nearly reached: {largest} of {bound}");
        // A non-finite update is refused and leaves the sum as it was.
        let before = without.rounded(&mut ChaCha20Rng::seed_from_u64(1));
        let mut bad = vec![0.0f32; 1000];
        bad[3] = f32::NAN;
        assert!(matches!(without.add(&mut bad), Err(DpError::NonFinite { .. })));
        assert_eq!(without.count(), 20);
        assert_eq!(without.rounded(&mut ChaCha20Rng::seed_from_u64(1)), before);
    }

    /// A sparse summand adds exactly what its dense vector adds, to the bit, whether it is
    /// clipped or not; malformed sparse summands are refused, name what is wrong, and leave
    /// the sum as it was.
    #[test]
    fn a_sparse_summand_adds_exactly_its_dense_vector_and_malformed_ones_are_refused() {
        use rand_chacha::ChaCha20Rng;
        use rand_core::SeedableRng;
        let p = DdgParams::select(&request()).expect("ok");
        let rotation = RandomRotation::new(p.padded_dimension(), 1);
        let (mut dense, mut sparse) = (p.summands(&rotation), p.summands(&rotation));
        // Short summands (untouched by the clipping) and long ones (clipped), overlapping.
        let cases: [(&[usize], &[f32]); 4] = [
            (&[0, 7, 999], &[0.1, -0.2, 0.3]),
            (&[3, 7, 500], &[30.0, -40.0, 1e-3]),
            (&[], &[]),
            (&[7], &[5.0]),
        ];
        for (indices, values) in cases {
            let mut x = vec![0.0f32; 1000];
            indices.iter().zip(values).for_each(|(&i, &v)| x[i] = v);
            dense.add(&mut x).expect("finite");
            sparse.add_sparse(indices, &mut values.to_vec()).expect("well formed");
        }
        assert_eq!(sparse.count(), 4);
        assert_eq!(sparse.largest_norm.to_bits(), dense.largest_norm.to_bits());
        assert!(sparse.sum.iter().zip(&dense.sum).all(|(a, b)| a.to_bits() == b.to_bits()));
        let before = sparse.rounded(&mut ChaCha20Rng::seed_from_u64(1));
        assert_eq!(before, dense.rounded(&mut ChaCha20Rng::seed_from_u64(1)));

        let refused = |sum: &mut DdgSum<'_>, indices: &[usize], values: &[f32]| {
            sum.add_sparse(indices, &mut values.to_vec()).expect_err("malformed").to_string()
        };
        let repeated = refused(&mut sparse, &[3, 3], &[1.0, 1.0]);
        assert!(repeated.contains("strictly increasing, found 3 then 3"), "{repeated}");
        assert!(refused(&mut sparse, &[5, 2], &[1.0, 1.0]).contains("found 5 then 2"));
        assert!(refused(&mut sparse, &[2, 1000], &[1.0, 1.0]).contains("1001 coordinates"));
        assert!(refused(&mut sparse, &[2, 4], &[1.0]).contains("2 indices for 1 values"));
        let nan = sparse.add_sparse(&[2, 40], &mut [1.0, f32::NAN]);
        assert_eq!(nan, Err(DpError::NonFinite { index: 40 }));
        assert_eq!(sparse.count(), 4);
        assert_eq!(sparse.rounded(&mut ChaCha20Rng::seed_from_u64(1)), before);
    }

    /// The decoded sum of a merchant's summands is the sum of each one clipped on its own.
    #[test]
    fn a_sum_of_summands_decodes_to_the_sum_of_each_clipped() {
        use rand_chacha::ChaCha20Rng;
        use rand_core::SeedableRng;
        let p =
            DdgParams::select(&ParamsRequest { noise_stddev: 0.0, bit_width: 32, ..request() }).expect("ok");
        let rotation = RandomRotation::new(p.padded_dimension(), 1);
        let mut sum = p.summands(&rotation);
        let mut expected = vec![0.0f64; 1000];
        for k in 0..5 {
            let x: Vec<f32> = (0..1000).map(|i| ((i * (k + 1)) as f32).sin() * 3.0).collect();
            let mut clipped = x.clone();
            clip_l2(&mut clipped, 1.0).expect("finite");
            expected.iter_mut().zip(&clipped).for_each(|(e, c)| *e += f64::from(*c));
            sum.add(&mut x.clone()).expect("finite");
        }
        let encoded = sum.finish(&mut ChaCha20Rng::seed_from_u64(2)).expect("ok");
        let decoded = p.decode(&encoded.values, &rotation).expect("decode");
        let error = decoded.iter().zip(&expected).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        assert!(error < 1e-3, "{error}");
    }

    /// The decoded sum of 10 encodings of a non-zero update minus the exact sum of the
    /// clipped updates is noise whose per-coordinate variance is what
    /// `decoded_noise_variance` says: at least the noise shares' (10 of σ²/8 = 1.25) and at
    /// most that plus rounding's γ²/4 per encoding. Over 1,000 coordinates the sample
    /// variance's relative standard error is about 4.5%: the 20% margins make a false
    /// failure below 1e-5; the seed is fixed.
    #[test]
    fn the_decoded_noise_variance_is_what_a_sum_carries() {
        use rand_chacha::ChaCha20Rng;
        use rand_core::SeedableRng;
        let p = DdgParams::select(&ParamsRequest { bit_width: 32, ..request() }).expect("ok");
        let rotation = RandomRotation::new(p.padded_dimension(), 5);
        let mut rng = ChaCha20Rng::seed_from_u64(17);
        let update: Vec<f32> = (0..1000).map(|i| ((i % 5) as f32 - 2.0) * 0.01).collect();
        let mut sum = vec![0u32; p.padded_dimension()];
        for _ in 0..10 {
            let mut x = update.clone();
            add_mod(&mut sum, &p.encode(&mut x, &rotation, &mut rng).expect("encode").values, 32);
        }
        let decoded = p.decode(&sum, &rotation).expect("decode");
        let noise: Vec<f64> = decoded.iter().zip(&update).map(|(d, u)| d - 10.0 * f64::from(*u)).collect();
        let sample = noise.iter().map(|v| v * v).sum::<f64>() / noise.len() as f64;
        let shares_only = 10.0 * p.scaled_local_variance() * p.gamma() * p.gamma();
        assert!((shares_only - 1.25).abs() < 1e-3, "{shares_only}");
        let predicted = p.decoded_noise_variance(10);
        assert!(predicted >= shares_only && predicted <= shares_only + 2.5 * p.gamma() * p.gamma());
        assert!(sample > 0.8 * shares_only && sample < 1.2 * predicted, "{sample} against {predicted}");
    }

    /// Honest sums stay below `honest_sum_norm_bound` (20 seeded rounds of 10 clients whose
    /// updates all sit at the clip norm in one direction, the worst case for the signal
    /// term); one client sending uniform ring elements instead lands far above it.
    #[test]
    fn honest_sums_stay_below_the_norm_bound_and_a_poisoned_one_does_not() {
        use rand_chacha::ChaCha20Rng;
        use rand_core::SeedableRng;
        let request = ParamsRequest { bit_width: 32, max_summands: 10, noise_shares: 8, ..request() };
        let p = DdgParams::select(&request).expect("ok");
        let rotation = RandomRotation::new(p.padded_dimension(), 3);
        let bound = p.honest_sum_norm_bound(10, 10, 1e-9);
        // Ten aligned clipped updates (norm 10) plus noise of variance 10/8 per coordinate
        // over 1,024 coordinates (norm about 36): the bound is tight to within a factor 2.
        assert!(bound > 10.0 + 35.0 && bound < 2.0 * (10.0 + 36.0), "{bound}");
        let direction: Vec<f32> = (0..1000).map(|i| ((i % 7) as f32) - 3.0).collect();
        for seed in 0..20u64 {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let mut sum = vec![0u32; p.padded_dimension()];
            let mut encodings = Vec::new();
            for _ in 0..10 {
                let mut x: Vec<f32> = direction.iter().map(|v| v * 100.0).collect();
                let encoded = p.encode(&mut x, &rotation, &mut rng).expect("encode");
                add_mod(&mut sum, &encoded.values, 32);
                encodings.push(encoded.values);
            }
            let norm = |sum: &[u32]| {
                p.decode(sum, &rotation).expect("decode").iter().map(|v| v * v).sum::<f64>().sqrt()
            };
            let honest = norm(&sum);
            assert!(honest <= bound && honest > 0.5 * bound, "seed {seed}: {honest} against {bound}");
            // One client replaces its encoding with uniform ring elements.
            let mut poisoned = vec![0u32; p.padded_dimension()];
            for (i, e) in encodings.iter().enumerate() {
                let garbage: Vec<u32> = (0..e.len()).map(|_| rng.next_u32()).collect();
                add_mod(&mut poisoned, if i == 3 { &garbage } else { e }, 32);
            }
            assert!(norm(&poisoned) > 100.0 * bound, "seed {seed}");
        }
    }

    #[test]
    fn more_noise_or_more_clients_means_smaller_rho() {
        let p = DdgParams::select(&request()).expect("feasible");
        let noisier = DdgParams::select(&ParamsRequest { noise_stddev: 2.0, ..request() }).expect("feasible");
        let rho = ddgauss_zcdp_rho(&p, 7).expect("ok");
        assert!(rho > 0.0 && rho.is_finite());
        assert!(ddgauss_zcdp_rho(&noisier, 7).expect("ok") < rho);
        // For large σ̂ τ vanishes and ρ approaches the Gaussian value Δ₂²/(2nσ̂²), with Δ₂
        // slightly above c/γ, i.e. close to c²/(2·(n/t)·σ²) = 1/(2·7/8).
        let gaussian = p.delta2_squared() / (2.0 * 7.0 * p.scaled_local_variance());
        assert!((rho - gaussian).abs() / gaussian < 1e-6, "{rho} vs {gaussian}");
        assert!((rho - 8.0 / 14.0).abs() / rho < 0.05, "{rho}");
    }
}
