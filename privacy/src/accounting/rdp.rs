//! Rényi-DP curves at integer orders and their conversion to (ε, δ).

/// The integer orders α at which every curve is evaluated.
pub const ORDERS: std::ops::RangeInclusive<u32> = 2..=256;
const ORDER_COUNT: usize = 255;

/// A Rényi-DP curve: `values[i]` is the RDP at order `i + 2`. Curves of composed
/// mechanisms add pointwise.
#[derive(Clone, Debug, PartialEq)]
pub struct RdpCurve {
    values: Vec<f64>,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AccountingError {
    #[error("sampling rate must be in (0, 1], got {0}")]
    SamplingRate(f64),
    #[error("noise multiplier must be positive and finite, got {0}")]
    NoiseMultiplier(f64),
    #[error("delta must be in (0, 1), got {0}")]
    Delta(f64),
    #[error("zCDP parameter rho must be non-negative and finite, got {0}")]
    Rho(f64),
    #[error("target epsilon must be positive and finite, got {0}")]
    TargetEpsilon(f64),
    #[error("no noise multiplier up to {max} reaches epsilon {target} (it gives {reached})")]
    Unreachable { target: f64, max: f64, reached: f64 },
}

impl RdpCurve {
    /// The curve of a mechanism that reveals nothing.
    pub fn zero() -> Self {
        Self { values: vec![0.0; ORDER_COUNT] }
    }

    /// RDP at integer order `alpha` (2..=256).
    pub fn at(&self, alpha: u32) -> f64 {
        self.values[(alpha - 2) as usize]
    }

    /// The curve of this mechanism run `times` times.
    pub fn times(mut self, times: u64) -> Self {
        for v in &mut self.values {
            *v *= times as f64;
        }
        self
    }

    /// The curve of running both mechanisms (adaptive composition).
    pub fn compose(mut self, other: &RdpCurve) -> Self {
        for (a, b) in self.values.iter_mut().zip(&other.values) {
            *a += b;
        }
        self
    }

    fn from_fn(f: impl Fn(u32) -> f64) -> Self {
        Self { values: ORDERS.map(f).collect() }
    }
}

fn check_rate(q: f64) -> Result<(), AccountingError> {
    if q > 0.0 && q <= 1.0 { Ok(()) } else { Err(AccountingError::SamplingRate(q)) }
}

fn check_delta(delta: f64) -> Result<(), AccountingError> {
    if delta > 0.0 && delta < 1.0 { Ok(()) } else { Err(AccountingError::Delta(delta)) }
}

/// ln C(n, k) from a table of ln n! for n ≤ 256 (exact sums of logs, built once).
fn ln_binomial(n: u32, k: u32) -> f64 {
    static LN_FACTORIAL: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    let table = LN_FACTORIAL.get_or_init(|| {
        let mut table = vec![0.0; *ORDERS.end() as usize + 1];
        for i in 2..table.len() {
            table[i] = table[i - 1] + (i as f64).ln();
        }
        table
    });
    table[n as usize] - table[k as usize] - table[(n - k) as usize]
}

fn log_sum_exp(terms: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = terms.clone().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + terms.map(|t| (t - max).exp()).sum::<f64>().ln()
}

/// RDP of one step of the Poisson-subsampled Gaussian mechanism with sampling rate `q`
/// and noise multiplier `z` (noise std / L2 sensitivity), add/remove neighbours:
/// `A_α = Σ_{i=0}^{α} C(α,i) (1−q)^{α−i} q^i exp((i²−i)/(2z²))`, RDP(α) = ln(A_α)/(α−1),
/// computed in log space. For q = 1 this is the plain Gaussian, α/(2z²).
pub fn subsampled_gaussian_rdp(q: f64, z: f64) -> Result<RdpCurve, AccountingError> {
    check_rate(q)?;
    if !(z.is_finite() && z > 0.0) {
        return Err(AccountingError::NoiseMultiplier(z));
    }
    if q == 1.0 {
        return Ok(RdpCurve::from_fn(|a| f64::from(a) / (2.0 * z * z)));
    }
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    Ok(RdpCurve::from_fn(|alpha| {
        let terms = (0..=alpha).map(move |i| {
            let i_f = f64::from(i);
            ln_binomial(alpha, i)
                + f64::from(alpha - i) * ln_1mq
                + i_f * ln_q
                + (i_f * i_f - i_f) / (2.0 * z * z)
        });
        log_sum_exp(terms) / f64::from(alpha - 1)
    }))
}

/// RDP of one step of a Poisson-subsampled mechanism that satisfies ρ-zCDP (so its RDP
/// at order l is ε(l) = lρ), by the general upper bound of Zhu and Wang (ICML 2019,
/// "Poisson subsampled Rényi differential privacy", Theorem 6), valid for any mechanism
/// and integer α ≥ 2:
///
/// `(α−1)·RDP'(α) ≤ ln[(1−q)^{α−1}(αq − q + 1) + C(α,2) q² (1−q)^{α−2} e^{ε(2)}
///                      + 3 Σ_{l=3}^{α} C(α,l) (1−q)^{α−l} q^l e^{(l−1)ε(l)}]`.
///
/// This is how the distributed discrete Gaussian composes over rounds with client
/// sampling: each round's Kairouz–Liu–Steinke bound gives ρ, this gives the amplified
/// curve. For q = 1 the curve is exactly αρ.
pub fn subsampled_zcdp_rdp(q: f64, rho: f64) -> Result<RdpCurve, AccountingError> {
    check_rate(q)?;
    if !(rho.is_finite() && rho >= 0.0) {
        return Err(AccountingError::Rho(rho));
    }
    let plain = RdpCurve::from_fn(|a| f64::from(a) * rho);
    if q == 1.0 {
        return Ok(plain);
    }
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let eps = |l: u32| f64::from(l) * rho;
    let amplified = RdpCurve::from_fn(|alpha| {
        let a = f64::from(alpha);
        let first = (a - 1.0) * ln_1mq + (a * q - q + 1.0).ln();
        let second = ln_binomial(alpha, 2) + 2.0 * ln_q + (a - 2.0) * ln_1mq + eps(2);
        let rest = (3..=alpha).map(move |l| {
            3f64.ln()
                + ln_binomial(alpha, l)
                + f64::from(alpha - l) * ln_1mq
                + f64::from(l) * ln_q
                + f64::from(l - 1) * eps(l)
        });
        let all = [first, second].into_iter().chain(rest);
        log_sum_exp(all) / (a - 1.0)
    });
    // Subsampling never hurts: keep the smaller of the two valid bounds at each order.
    Ok(RdpCurve::from_fn(|a| amplified.at(a).min(plain.at(a))))
}

/// The Gaussian mechanism's zCDP ρ = 1/(2z²) at noise multiplier z.
pub fn gaussian_zcdp_rho(z: f64) -> Result<f64, AccountingError> {
    if z.is_finite() && z > 0.0 { Ok(1.0 / (2.0 * z * z)) } else { Err(AccountingError::NoiseMultiplier(z)) }
}

/// RDP of one step of a Poisson-sampled ρ-zCDP mechanism under **zero-out adjacency** when
/// the round's output without the unit is arbitrary: `(1 − q)·A + q·B_x` against
/// `(1 − q)·A + q·B_0`, where `B_x` and `B_0` (the unit sampled, with its data or with its
/// data zeroed) are ρ-zCDP neighbours and `A` (the unit not sampled) is any distribution,
/// the same on both sides. By the joint convexity of `(p, q) ↦ p^α q^{1−α}`:
///
/// `RDP(α) ≤ ln(1 − q + q·e^{(α−1)·α·ρ}) / (α − 1)`,
///
/// in both directions. This is the merchant unit's amplification by sampling in distributed
/// and local modes: a merchant that is not sampled adds no noise share either (and a round
/// with too few others aborts), so `A` is not `B_0` and the add/remove bounds of Mironov and
/// of Zhu and Wang do not apply (`privacy/tests/adjacency.rs` computes the exact divergence
/// and shows the Zhu–Wang value below it). Linear in q where those are quadratic, and tight
/// when the release itself shows the unit was sampled. For q = 1 the curve is exactly αρ.
pub fn zero_out_sampled_zcdp_rdp(q: f64, rho: f64) -> Result<RdpCurve, AccountingError> {
    check_rate(q)?;
    if !(rho.is_finite() && rho >= 0.0) {
        return Err(AccountingError::Rho(rho));
    }
    if q == 1.0 {
        return Ok(RdpCurve::from_fn(|a| f64::from(a) * rho));
    }
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    Ok(RdpCurve::from_fn(|alpha| {
        let a = f64::from(alpha);
        let exponent = (a - 1.0) * a * rho;
        log_sum_exp([ln_1mq, ln_q + exponent].into_iter()) / (a - 1.0)
    }))
}

/// Converts an RDP curve to ε at the given δ with the bound of Canonne, Kamath and
/// Steinke (2020) that `dp_accounting` uses:
/// `ε = min_α [RDP(α) + ln((α−1)/α) − (ln δ + ln α)/(α−1)]`, floored at 0.
/// Returns ε and the order that achieved it. The zero curve gives ε = 0.
pub fn epsilon_from_rdp(curve: &RdpCurve, delta: f64) -> Result<(f64, u32), AccountingError> {
    check_delta(delta)?;
    if curve.values.iter().all(|&v| v == 0.0) {
        // Nothing was revealed: that is 0-DP, which the conversion's slack would hide.
        return Ok((0.0, *ORDERS.start()));
    }
    let ln_delta = delta.ln();
    let mut best = (f64::INFINITY, 2);
    for alpha in ORDERS {
        let a = f64::from(alpha);
        let eps = curve.at(alpha) + ((a - 1.0) / a).ln() - (ln_delta + a.ln()) / (a - 1.0);
        if eps < best.0 {
            best = (eps, alpha);
        }
    }
    Ok((best.0.max(0.0), best.1))
}

/// Which datasets the Poisson-subsampled Gaussian's accountant treats as neighbours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Neighbours {
    /// One unit added or removed ([`subsampled_gaussian_rdp`]): central mode, and the
    /// shopper unit.
    AddRemove,
    /// One unit's contribution replaced by zero ([`zero_out_sampled_zcdp_rdp`] with the
    /// Gaussian's ρ = 1/(2z²)): the merchant unit with the noise added by the participants.
    ZeroOut,
}

/// The RDP curve of one round of the Gaussian with noise multiplier `z`, each unit
/// Poisson-sampled at rate `q`, for `neighbours`.
pub fn sampled_gaussian_curve(neighbours: Neighbours, q: f64, z: f64) -> Result<RdpCurve, AccountingError> {
    match neighbours {
        Neighbours::AddRemove => subsampled_gaussian_rdp(q, z),
        Neighbours::ZeroOut => zero_out_sampled_zcdp_rdp(q, gaussian_zcdp_rho(z)?),
    }
}

/// The smallest noise multiplier z (to 1e-6 relative) for which `rounds` rounds of
/// [`sampled_gaussian_curve`] stay within `target_epsilon` at `delta`.
pub fn calibrate_noise_multiplier(
    neighbours: Neighbours,
    q: f64,
    rounds: u64,
    delta: f64,
    target_epsilon: f64,
) -> Result<f64, AccountingError> {
    check_rate(q)?;
    check_delta(delta)?;
    calibrate_noise_by(
        |z| Ok(epsilon_from_rdp(&sampled_gaussian_curve(neighbours, q, z)?.times(rounds), delta)?.0),
        target_epsilon,
    )
}

/// The workspace's one noise calibrator: the smallest noise multiplier z (to 1e-6 relative,
/// from above, so the result always meets the target) with `epsilon(z) ≤ target_epsilon`,
/// for any ε(z) that decreases in z (the ledger's own cost of a schedule of rounds, or an
/// ideal mechanism's). z is searched up to 10⁴.
pub fn calibrate_noise_by<E: From<AccountingError>>(
    epsilon: impl Fn(f64) -> Result<f64, E>,
    target_epsilon: f64,
) -> Result<f64, E> {
    if !(target_epsilon.is_finite() && target_epsilon > 0.0) {
        return Err(AccountingError::TargetEpsilon(target_epsilon).into());
    }
    let epsilon = |z: f64| -> Result<f64, E> {
        if !(z.is_finite() && z > 0.0) {
            return Err(AccountingError::NoiseMultiplier(z).into());
        }
        epsilon(z)
    };
    const MAX_Z: f64 = 1e4;
    let (mut lo, mut hi) = (1e-3, 1.0);
    while epsilon(hi)? > target_epsilon {
        lo = hi;
        hi *= 2.0;
        if hi > MAX_Z {
            return Err(AccountingError::Unreachable {
                target: target_epsilon,
                max: MAX_Z,
                reached: epsilon(MAX_Z)?,
            }
            .into());
        }
    }
    // ε(z) is decreasing in z: bisect for the boundary.
    while (hi - lo) > 1e-6 * hi {
        let mid = 0.5 * (lo + hi);
        if epsilon(mid)? > target_epsilon {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_gaussian_is_alpha_over_two_z_squared() {
        let curve = subsampled_gaussian_rdp(1.0, 2.0).expect("valid");
        assert_eq!(curve.at(2), 2.0 / 8.0);
        assert_eq!(curve.at(100), 100.0 / 8.0);
    }

    #[test]
    fn zcdp_amplification_is_monotone_and_bounded_by_the_plain_curve() {
        let plain = subsampled_zcdp_rdp(1.0, 0.05).expect("valid");
        let sampled = subsampled_zcdp_rdp(0.01, 0.05).expect("valid");
        for a in ORDERS {
            assert!(sampled.at(a) <= plain.at(a));
            assert!(sampled.at(a) >= 0.0);
        }
        // At small orders amplification by subsampling gives roughly a q² factor.
        assert!(sampled.at(2) < 0.01 * plain.at(2), "{} vs {}", sampled.at(2), plain.at(2));
    }

    #[test]
    fn the_zero_out_bound_is_plain_at_q_one_linear_in_q_and_above_the_add_remove_bound() {
        let rho = 0.05;
        assert_eq!(
            zero_out_sampled_zcdp_rdp(1.0, rho).expect("valid"),
            subsampled_zcdp_rdp(1.0, rho).expect("valid")
        );
        let zero_out = zero_out_sampled_zcdp_rdp(0.01, rho).expect("valid");
        let add_remove = subsampled_zcdp_rdp(0.01, rho).expect("valid");
        for a in ORDERS {
            let alpha = f64::from(a);
            // The closed form, and never above the unsampled curve.
            let expected = (1.0 - 0.01 + 0.01 * ((alpha - 1.0) * alpha * rho).exp()).ln() / (alpha - 1.0);
            assert!((zero_out.at(a) - expected).abs() <= 1e-12 * expected.max(1.0), "α = {a}");
            assert!(zero_out.at(a) <= alpha * rho * (1.0 + 1e-12) && zero_out.at(a) >= add_remove.at(a));
        }
        // Small orders: about q·α·ρ, where the add/remove bound is about q²·α·ρ.
        assert!((zero_out.at(2) / (0.01 * 2.0 * rho) - 1.0).abs() < 0.1, "{}", zero_out.at(2));
        assert!(add_remove.at(2) < 0.1 * zero_out.at(2));
        // Huge exponents stay finite (log space).
        assert!(zero_out_sampled_zcdp_rdp(0.01, 50.0).expect("valid").at(256).is_finite());
    }

    #[test]
    fn zero_out_calibration_inverts_its_accountant_and_needs_more_noise() {
        let z = calibrate_noise_multiplier(Neighbours::ZeroOut, 0.05, 6, 1e-5, 8.0).expect("reachable");
        let curve = zero_out_sampled_zcdp_rdp(0.05, 1.0 / (2.0 * z * z)).expect("valid").times(6);
        let (eps, _) = epsilon_from_rdp(&curve, 1e-5).expect("ok");
        assert!(eps <= 8.0 && eps > 7.99, "z = {z} gives ε = {eps}");
        assert!(
            z > calibrate_noise_multiplier(Neighbours::AddRemove, 0.05, 6, 1e-5, 8.0).expect("reachable")
        );
    }

    #[test]
    fn calibration_inverts_the_accountant() {
        let z = calibrate_noise_multiplier(Neighbours::AddRemove, 0.1, 100, 1e-5, 3.0).expect("reachable");
        let (eps, _) =
            epsilon_from_rdp(&subsampled_gaussian_rdp(0.1, z).expect("valid").times(100), 1e-5).expect("ok");
        assert!(eps <= 3.0 && eps > 2.99, "z = {z} gives ε = {eps}");
        // DESIGN.md quotes z ≈ 1.80 for this setting (dp_accounting).
        assert!((z - 1.80).abs() < 0.02, "z = {z}");
    }

    #[test]
    fn invalid_arguments_are_named() {
        assert_eq!(subsampled_gaussian_rdp(0.0, 1.0), Err(AccountingError::SamplingRate(0.0)));
        assert_eq!(subsampled_gaussian_rdp(0.5, -1.0), Err(AccountingError::NoiseMultiplier(-1.0)));
        assert_eq!(epsilon_from_rdp(&RdpCurve::zero(), 1.0), Err(AccountingError::Delta(1.0)));
    }
}
