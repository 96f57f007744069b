//! The shopper unit's accounting against the exact Rényi divergence of the two discrete
//! output distributions, for small cases: adding or removing one shopper shifts the sum of
//! `n` discrete Gaussian noise shares by an integer vector of L2 norm at most Δ and changes
//! no share, so the outputs are the same distribution, shifted. The Kairouz–Liu–Steinke
//! bound the ledger charges (ρ, RDP α·ρ) must be at least the exact divergence at every
//! order, in both directions.
//!
//! The merchant unit is different: removing a merchant removes its noise share too, and
//! between sums of `t` and `t − 1` shares the divergence is infinite at orders α ≥ t (for
//! Gaussians of variances t·s and (t − 1)·s, σ_α² = s·(t − α) turns negative). That case is
//! checked here as well, as the documented reason the merchant unit's bound is stated for
//! replace-with-zero adjacency, not add/remove (see the README's threat model).

/// ln of the PMF of N_Z(0, var) on `-r..=r`, normalised.
fn discrete_gaussian(var: f64, r: i64) -> Vec<f64> {
    let unnormalised: Vec<f64> = (-r..=r).map(|x| -((x * x) as f64) / (2.0 * var)).collect();
    let z = log_sum_exp(&unnormalised);
    unnormalised.iter().map(|v| v - z).collect()
}

fn log_sum_exp(v: &[f64]) -> f64 {
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY { m } else { m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln() }
}

/// ln PMF of the sum of two independent integer variables given as ln PMFs centred at 0.
fn convolve(a: &[f64], b: &[f64]) -> Vec<f64> {
    let mut out = vec![f64::NEG_INFINITY; a.len() + b.len() - 1];
    for (i, out_i) in out.iter_mut().enumerate() {
        let terms: Vec<f64> =
            (0..a.len()).filter(|&j| i >= j && i - j < b.len()).map(|j| a[j] + b[i - j]).collect();
        *out_i = log_sum_exp(&terms);
    }
    out
}

/// D_α(P ‖ Q) for ln PMFs on the same grid, summed where both are represented (the grids
/// reach 20 standard deviations of a share past any point that matters: what is cut off
/// weighs less than e^−200).
fn renyi(p: &[f64], q: &[f64], alpha: f64) -> f64 {
    let terms: Vec<f64> = p
        .iter()
        .zip(q)
        .filter(|(lp, lq)| lp.is_finite() && lq.is_finite())
        .map(|(lp, lq)| alpha * lp + (1.0 - alpha) * lq)
        .collect();
    log_sum_exp(&terms) / (alpha - 1.0)
}

/// The KLS21 zCDP ρ for a one-coordinate sum of `n` shares of variance `var` and L2
/// sensitivity `delta`: ε = min{√(Δ²/(nσ̂²) + τ/2), Δ/(√n σ̂) + τ}, ρ = ε²/2.
fn kls_rho(var: f64, n: u32, delta: f64) -> f64 {
    let pi2 = std::f64::consts::PI.powi(2);
    let tau = 10.0 * (1..n).map(|k| (-2.0 * pi2 * var * f64::from(k) / f64::from(k + 1)).exp()).sum::<f64>();
    let nf = f64::from(n);
    let eps = (delta * delta / (nf * var) + tau / 2.0).sqrt().min(delta / (nf.sqrt() * var.sqrt()) + tau);
    eps * eps / 2.0
}

#[test]
fn one_shopper_shifts_the_noisy_sum_by_at_most_what_the_ledger_charges() {
    let r = 60;
    for (var, n) in [(4.0, 3u32), (6.25, 4), (9.0, 5), (4.0, 8)] {
        let share = discrete_gaussian(var, r);
        let mut sum = share.clone();
        for _ in 1..n {
            sum = convolve(&sum, &share);
        }
        for shift in 1..=4usize {
            // P: the sum with the shopper (shifted), Q: without it, on one grid.
            let mut p = vec![f64::NEG_INFINITY; sum.len() + shift];
            p[shift..].copy_from_slice(&sum);
            let mut q = sum.clone();
            q.resize(sum.len() + shift, f64::NEG_INFINITY);
            let rho = kls_rho(var, n, shift as f64);
            for alpha in [2.0, 3.0, 5.0, 8.0, 16.0, 32.0] {
                let (forward, backward) = (renyi(&p, &q, alpha), renyi(&q, &p, alpha));
                assert!(
                    forward <= alpha * rho * (1.0 + 1e-9) && backward <= alpha * rho * (1.0 + 1e-9),
                    "σ̂² = {var}, n = {n}, Δ = {shift}, α = {alpha}: exact {forward} / {backward} > bound {}",
                    alpha * rho
                );
                assert!(
                    forward > 0.5 * alpha * rho,
                    "the bound is not vacuous: {forward} vs {}",
                    alpha * rho
                );
            }
        }
    }
}

#[test]
fn removing_a_merchant_with_its_noise_share_is_not_a_shift() {
    // t = 4 shares of variance 9 with the merchant, 3 without it, no data at all: the
    // divergence is positive though nothing about the data differs, and it explodes as α
    // approaches t (infinite from α = t on, for the untruncated distributions).
    let (var, t, r) = (9.0, 4u32, 80);
    let share = discrete_gaussian(var, r);
    let mut without = share.clone();
    for _ in 2..t {
        without = convolve(&without, &share);
    }
    let with = convolve(&without, &share);
    let pad = (with.len() - without.len()) / 2;
    let mut q = vec![f64::NEG_INFINITY; with.len()];
    q[pad..pad + without.len()].copy_from_slice(&without);
    let at = |alpha: f64| renyi(&with, &q, alpha);
    // The Gaussian closed form for variances t·s and (t − 1)·s, at α = 2: with nothing in the
    // data, the bound the merchant unit charges for this pair would be zero.
    let (t_f, a) = (f64::from(t), 2.0);
    let gaussian = ((1.0 - a) * t_f.ln() + a * (t_f - 1.0).ln() - (t_f - a).ln()) / (2.0 * (a - 1.0));
    assert!((at(2.0) - gaussian).abs() < 0.05 * gaussian, "{} vs {gaussian}", at(2.0));
    // It climbs steeply towards α = t; beyond it the truncated sum only grows with the grid
    // (the untruncated one is infinite): no finite RDP bound covers those orders.
    assert!(at(3.9) > 7.0 * at(2.0), "{} vs {}", at(3.9), at(2.0));
    assert!(at(5.0) > 1000.0 * at(2.0), "{}", at(5.0));
}
