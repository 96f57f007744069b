//! The spectral item prior: a low-rank embedding of the item-to-item table a tower decodes
//! from its pair sketch, so that two items that share neighbours score as related even
//! where neither is among the other's `M` decoded neighbours (the popular targets the table
//! misses: `python/probe_gap.py`).
//!
//! The table `T` (`T[i, j]` the thresholded log count of item `i`'s neighbour `j`,
//! [`crate::tower::counts_log`] at the decoded neighbours) is symmetrised, `S = (T + Tᵀ)/2`,
//! and degree-normalised, `A = D^{-1/2} S D^{-1/2}` (the normalised adjacency of spectral
//! clustering: eigenvalues in [−1, 1], the largest 1 for each connected part). Each item's
//! feature row is `U_i · √λ` over the `k` largest eigenpairs past the first (the first is
//! the degree vector, popularity again), brought to unit length; a candidate `c` then gains
//! `γ · F_c · Σ_j ρ^j F_{h_j}` over the shopper's last items ([`crate::tower::SPECTRAL_RECENCY`]).
//!
//! A function of the released sums alone, so in a DP federation it is post-processing and
//! costs no privacy. Computed the same way by every party (the client that scores, the
//! coordinator's export) from the same decoded table: plain `f64` arithmetic in a fixed
//! order, with a fixed seed, however many threads share it.
//!
//! The eigenpairs come from a randomised block Krylov method (Musco and Musco, NeurIPS 2015):
//! a seeded random block `Ω` and `A Ω, A² Ω, …` orthonormalised into one basis `V`
//! (classical Gram–Schmidt, twice), then the Rayleigh–Ritz step: the eigenpairs of the small
//! `Vᵀ A V` (nalgebra's symmetric eigensolver), lifted back by `V`.
//!
//! How exact that is matters less than it seems. On a federated tower's decoded table
//! (16,859 items, 64 neighbours each) the eigenvalues past the first fall from 0.44 to 0.19
//! at the 33rd and then sit on the edge of the bulk (0.1896 at the 34th, 0.1775 at the
//! 60th): no gap defines the last few of the `k` eigenvectors, so no solver's are the
//! "right" ones. Against ARPACK's (scipy's `eigsh`), the features' kernel `F Fᵀ` correlates
//! 0.39 at this depth and 0.87 at depth 10, yet the prior ranks as well: validation NDCG@10
//! of the probes' 4,000 users with the federated tower at γ = 0.1 / 0.2, 0.0762 / 0.0751
//! here (2 s on two cores), 0.0767 / 0.0747 at depth 10 (9 s), 0.0759 / 0.0751 with
//! ARPACK's. Where the spectrum has gaps the method is exact to the tolerance its test
//! states.

use nalgebra::{DMatrix, SymmetricEigen};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Columns of the random start beyond the `k + 1` eigenpairs wanted.
const OVERSAMPLE: usize = 8;

/// Krylov steps after the random start: the basis holds `(DEPTH + 1)·(k + 1 + OVERSAMPLE)`
/// columns (287 at `k = 32`).
const DEPTH: usize = 6;

/// The start block's seed: public and fixed, so every party computes the same features.
const SEED: u64 = 0x05ee_c7a1_f0a7;

/// A column whose norm falls below this share of its norm before orthogonalisation lies in
/// the span of the basis already (the table's rank is smaller than the basis) and is dropped.
const DEPENDENT: f64 = 1e-9;

/// A symmetric sparse matrix in compressed rows.
struct Symmetric {
    n: usize,
    starts: Vec<usize>,
    columns: Vec<u32>,
    values: Vec<f64>,
}

impl Symmetric {
    /// `D^{-1/2} (T + Tᵀ)/2 D^{-1/2}` of the table `T` whose row `i` holds `values[i·m + j]`
    /// at column `lists[i·m + j]` (entries at or below zero and out-of-range columns left
    /// out); `None` if nothing is left.
    fn normalised(n: usize, m: usize, lists: &[u32], values: &[f32]) -> Option<Self> {
        let mut entries: Vec<(u32, u32, f64)> = Vec::new();
        for (slot, (&to, &v)) in lists.iter().zip(values).enumerate().take(n * m) {
            let from = (slot / m) as u32;
            if v > 0.0 && (to as usize) < n && to != from {
                let half = f64::from(v) / 2.0;
                entries.push((from, to, half));
                entries.push((to, from, half));
            }
        }
        if entries.is_empty() {
            return None;
        }
        entries.sort_unstable_by_key(|e| (e.0, e.1));
        let mut merged: Vec<(u32, u32, f64)> = Vec::with_capacity(entries.len());
        for (i, j, v) in entries {
            match merged.last_mut() {
                Some(last) if last.0 == i && last.1 == j => last.2 += v,
                _ => merged.push((i, j, v)),
            }
        }
        let mut degree = vec![0.0f64; n];
        for &(i, _, v) in &merged {
            degree[i as usize] += v;
        }
        let scale: Vec<f64> = degree.iter().map(|&d| if d > 0.0 { 1.0 / d.sqrt() } else { 0.0 }).collect();
        let mut starts = vec![0usize; n + 1];
        for &(i, _, _) in &merged {
            starts[i as usize + 1] += 1;
        }
        for i in 0..n {
            starts[i + 1] += starts[i];
        }
        let columns = merged.iter().map(|e| e.1).collect();
        let values = merged.iter().map(|&(i, j, v)| scale[i as usize] * v * scale[j as usize]).collect();
        Some(Self { n, starts, columns, values })
    }

    /// `A x` for each column `x` of `block`, the rows spread over `threads`.
    fn apply(&self, block: &[Vec<f64>], threads: usize) -> Vec<Vec<f64>> {
        let parts = in_parallel(self.n, threads, |rows| {
            block
                .iter()
                .map(|x| {
                    rows.clone()
                        .map(|i| {
                            let (s, e) = (self.starts[i], self.starts[i + 1]);
                            self.columns[s..e]
                                .iter()
                                .zip(&self.values[s..e])
                                .map(|(&j, &a)| a * x[j as usize])
                                .sum()
                        })
                        .collect::<Vec<f64>>()
                })
                .collect::<Vec<_>>()
        });
        (0..block.len()).map(|c| parts.iter().flat_map(|part| part[c].iter().copied()).collect()).collect()
    }
}

/// `f` of `0..n` cut into one contiguous range per thread, the results in order: the same
/// whatever `threads` is, since each index is computed alone.
fn in_parallel<T: Send>(n: usize, threads: usize, f: impl Fn(std::ops::Range<usize>) -> T + Sync) -> Vec<T> {
    let per = n.div_ceil(threads.max(1)).max(1);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> =
            (0..n).step_by(per).map(|start| scope.spawn(move || f(start..(start + per).min(n)))).collect();
        handles.into_iter().map(|h| h.join().expect("a spectral worker panicked")).collect()
    })
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y` less its projection on every column of `basis`, twice (classical Gram–Schmidt with
/// one reorthogonalisation: as accurate as the modified form, and each column independent
/// of the others, so a block's columns can be done in parallel).
fn project_out(basis: &[Vec<f64>], y: &mut [f64]) {
    for _ in 0..2 {
        let coefficients: Vec<f64> = basis.iter().map(|q| dot(q, y)).collect();
        for (q, c) in basis.iter().zip(coefficients) {
            for (yi, qi) in y.iter_mut().zip(q) {
                *yi -= c * qi;
            }
        }
    }
}

/// Appends the columns of `block` to `basis`, each orthonormalised against the basis and the
/// block's earlier columns; a column dependent on them ([`DEPENDENT`]) is dropped. The
/// projection on the basis is spread over `threads` (each column's result is the same
/// however they are spread).
fn extend_basis(basis: &mut Vec<Vec<f64>>, block: Vec<Vec<f64>>, threads: usize) {
    let norms: Vec<f64> = block.iter().map(|y| dot(y, y).sqrt()).collect();
    let projected = in_parallel(block.len(), threads, |columns| {
        let mut part: Vec<Vec<f64>> = block[columns].to_vec();
        part.iter_mut().for_each(|y| project_out(basis, y));
        part
    });
    let start = basis.len();
    for (mut y, norm) in projected.into_iter().flatten().zip(norms) {
        project_out(&basis[start..], &mut y);
        let left = dot(&y, &y).sqrt();
        if norm > 0.0 && left > DEPENDENT * norm {
            y.iter_mut().for_each(|v| *v /= left);
            basis.push(y);
        }
    }
}

/// The `k` largest eigenpairs past the first of the matrix, approximately: eigenvalues,
/// largest first, and the eigenvectors as columns (fewer where the basis is smaller).
fn top_eigenpairs(a: &Symmetric, k: usize, threads: usize) -> (Vec<f64>, Vec<Vec<f64>>) {
    let width = (k + 1 + OVERSAMPLE).min(a.n);
    let mut rng = ChaCha20Rng::seed_from_u64(SEED);
    // Zero on the items with no entry, so that every basis vector is (those items' rows and
    // columns of the matrix are zero, and so are their entries of every eigenvector with a
    // non-zero eigenvalue) and their feature rows stay exactly zero.
    let start: Vec<Vec<f64>> = (0..width)
        .map(|_| {
            (0..a.n)
                .map(|i| {
                    let x = rng.gen_range(-1.0..1.0);
                    if a.starts[i + 1] > a.starts[i] { x } else { 0.0 }
                })
                .collect()
        })
        .collect();
    let mut basis = Vec::new();
    extend_basis(&mut basis, start, threads);
    // `A V`, column by column as the basis grows: each Krylov step's products are the images
    // of the block before it, kept before they are orthogonalised into the next block.
    let mut images: Vec<Vec<f64>> = Vec::new();
    let mut from = 0;
    for _ in 0..DEPTH {
        if basis.len() >= a.n || from == basis.len() {
            break;
        }
        let next = a.apply(&basis[from..], threads);
        images.extend(next.iter().cloned());
        from = basis.len();
        extend_basis(&mut basis, next, threads);
    }
    let last = a.apply(&basis[images.len()..], threads);
    images.extend(last);
    let p = basis.len();
    // `Vᵀ A V`, symmetric: its upper triangle, row by row over the threads.
    let rows = in_parallel(p, threads, |rows| {
        rows.map(|i| (i..p).map(|j| dot(&basis[i], &images[j])).collect::<Vec<f64>>()).collect::<Vec<_>>()
    });
    let mut small = DMatrix::<f64>::zeros(p, p);
    for (i, row) in rows.into_iter().flatten().enumerate() {
        for (offset, v) in row.into_iter().enumerate() {
            small[(i, i + offset)] = v;
            small[(i + offset, i)] = v;
        }
    }
    let eigen = SymmetricEigen::new(small);
    let mut order: Vec<usize> = (0..p).collect();
    order.sort_by(|&x, &y| eigen.eigenvalues[y].total_cmp(&eigen.eigenvalues[x]).then(x.cmp(&y)));
    let kept: Vec<usize> = order.into_iter().skip(1).take(k).collect();
    let values = kept.iter().map(|&c| eigen.eigenvalues[c]).collect();
    let vectors = kept
        .iter()
        .map(|&c| {
            let mut u = vec![0.0f64; a.n];
            for (q, &w) in basis.iter().zip(eigen.eigenvectors.column(c).iter()) {
                for (ui, qi) in u.iter_mut().zip(q) {
                    *ui += w * qi;
                }
            }
            u
        })
        .collect();
    (values, vectors)
}

/// Each item's spectral feature row, `[n, k]` row-major: `U_i · √max(λ, 0)` over the `k`
/// largest eigenpairs past the first of the normalised table (see the module's notes),
/// brought to unit length; all zeros for a table with no positive entry (the start, so
/// that a tower's term is exactly zero there), and zero rows for items with no entry.
/// `lists` and `logs` are `[n, m]` row-major: item `i`'s neighbours and their prior values.
pub fn features(n: usize, m: usize, lists: &[u32], logs: &[f32], k: usize, threads: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n * k];
    if k == 0 || m == 0 || n < 2 {
        return out;
    }
    let Some(a) = Symmetric::normalised(n, m, lists, logs) else {
        return out;
    };
    let (values, vectors) = top_eigenpairs(&a, k, threads);
    let scales: Vec<f64> = values.iter().map(|&l| l.max(0.0).sqrt()).collect();
    for i in 0..n {
        let row: Vec<f64> = vectors.iter().zip(&scales).map(|(u, s)| u[i] * s).collect();
        let norm = dot(&row, &row).sqrt();
        if norm > 1e-12 {
            for (o, v) in out[i * k..i * k + row.len()].iter_mut().zip(&row) {
                *o = (v / norm) as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random table of `n` items with `m` neighbours each, in `blocks` groups that link
    /// mostly within themselves (so that the matrix has a few large eigenvalues apart).
    fn table(n: usize, m: usize, blocks: usize, seed: u64) -> (Vec<u32>, Vec<f32>) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let (mut lists, mut logs) = (Vec::new(), Vec::new());
        for i in 0..n {
            for _ in 0..m {
                let to = if rng.gen_bool(0.8) {
                    let size = n / blocks;
                    (i / size) * size + rng.gen_range(0..size)
                } else {
                    rng.gen_range(0..n)
                };
                lists.push(to as u32);
                logs.push(rng.gen_range(0.1f32..3.0));
            }
        }
        (lists, logs)
    }

    /// The dense normalised matrix of the same table, for the exact eigensolver.
    fn dense(n: usize, m: usize, lists: &[u32], logs: &[f32]) -> DMatrix<f64> {
        let a = Symmetric::normalised(n, m, lists, logs).expect("entries");
        let mut d = DMatrix::<f64>::zeros(n, n);
        for i in 0..n {
            for s in a.starts[i]..a.starts[i + 1] {
                d[(i, a.columns[s] as usize)] = a.values[s];
            }
        }
        d
    }

    /// Known answer: on a table small enough for the exact dense eigensolver, the features'
    /// kernel `F Fᵀ` before row normalisation, `Σ λ u uᵀ` over the eigenpairs kept, is the
    /// exact one's (the kernel, unlike the eigenvectors, does not depend on their signs or on
    /// rotations within a repeated eigenvalue).
    #[test]
    fn the_eigenpairs_match_the_exact_solver_on_a_small_table() {
        let (n, m, k) = (240, 6, 5);
        let (lists, logs) = table(n, m, 6, 3);
        let a = Symmetric::normalised(n, m, &lists, &logs).expect("entries");
        let (values, vectors) = top_eigenpairs(&a, k, 2);
        let exact = SymmetricEigen::new(dense(n, m, &lists, &logs));
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&x, &y| exact.eigenvalues[y].total_cmp(&exact.eigenvalues[x]));
        for (got, &c) in values.iter().zip(order.iter().skip(1)) {
            assert!((got - exact.eigenvalues[c]).abs() < 1e-3, "{got} against {}", exact.eigenvalues[c]);
        }
        for i in (0..n).step_by(7) {
            for j in (0..n).step_by(11) {
                let ours: f64 = values.iter().zip(&vectors).map(|(l, u)| l * u[i] * u[j]).sum();
                let theirs: f64 = order
                    .iter()
                    .skip(1)
                    .take(k)
                    .map(|&c| exact.eigenvalues[c] * exact.eigenvectors[(i, c)] * exact.eigenvectors[(j, c)])
                    .sum();
                assert!((ours - theirs).abs() < 1e-3, "({i}, {j}): {ours} against {theirs}");
            }
        }
        // The first eigenvalue of a normalised adjacency is 1, and it is the one left out.
        assert!((exact.eigenvalues[order[0]] - 1.0).abs() < 1e-9);
    }

    #[test]
    fn features_are_unit_rows_the_same_for_any_thread_count_and_zero_without_entries() {
        let (n, m, k) = (300, 5, 8);
        let (lists, logs) = table(n, m, 5, 9);
        let one = features(n, m, &lists, &logs, k, 1);
        assert_eq!(one, features(n, m, &lists, &logs, k, 3), "threads change nothing");
        for row in one.chunks(k) {
            let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "row norm {norm}");
        }
        // Items of one group are closer to each other than to another group's.
        let cosine = |a: usize, b: usize| -> f32 { (0..k).map(|c| one[a * k + c] * one[b * k + c]).sum() };
        let within: f32 = (1..60).map(|j| cosine(0, j)).sum::<f32>() / 59.0;
        let across: f32 = (120..180).map(|j| cosine(0, j)).sum::<f32>() / 60.0;
        assert!(within > across + 0.3, "within {within}, across {across}");
        // The start's table (every count zero, so every log zero) gives no features at all.
        assert!(features(n, m, &lists, &vec![0.0; n * m], k, 2).iter().all(|&v| v == 0.0));
        // An item with no entry keeps a zero row.
        let (mut lists, mut logs) = (lists, logs);
        logs.iter_mut().take(m).for_each(|v| *v = 0.0);
        lists.iter_mut().for_each(|to| *to = if *to == 0 { 1 } else { *to });
        let f = features(n, m, &lists, &logs, k, 2);
        assert!(f[..k].iter().all(|&v| v == 0.0));
    }
}
