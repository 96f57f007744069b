//! The SecAgg+ communication graph (Bell et al. 2020): each client shares its secrets
//! with, and masks against, only its k neighbours in a random k-regular graph (a
//! Harary-style ring over a random permutation drawn from the round's public seed).
//! k ≥ n − 1 gives the complete graph of the original protocol.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use std::collections::BTreeMap;

use super::message::{ClientIndex, RoundBinding, SignedKeys};

/// The round's graph seed: SHA-256 over the round binding and every signed key
/// advertisement of the roster, in index order (first 8 bytes, little-endian). The
/// coordinator does not choose it: every client recomputes it from the roster it received
/// and builds the graph from it, so steering a victim's neighbourhood would take choosing
/// which advertisements to leave out of the roster and hashing until one suits (each
/// combination one try, every left-out client a dropout the round must absorb), not picking
/// a number. Each advertisement carries fresh X25519 keys drawn by its client after the
/// cohort was fixed, so no party knows the seed before the roster closes.
pub fn roster_seed(binding: &RoundBinding, roster: &BTreeMap<ClientIndex, SignedKeys>) -> u64 {
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    hash.update(b"guild secagg+ v1 graph seed");
    hash.update(&binding.to_bytes());
    for (index, keys) in roster {
        hash.update(&index.get().to_be_bytes());
        hash.update(&keys.cipher_public_key);
        hash.update(&keys.mask_public_key);
        hash.update(&keys.signature);
    }
    let digest = hash.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_le_bytes(first)
}

/// How many share holders each client of a round of `n` clients with `k` neighbours has in
/// the graph [`NeighbourGraph::new`] builds: `k` rounded up to even (a client's neighbours
/// lie on both sides of it on a shuffled ring), at most `n − 1`. Every bound that depends on
/// the neighbourhood (the active-security threshold, the colluders it tolerates) takes this
/// number, not `k`: with an odd `k` each client has one holder more than asked for.
pub fn share_holders(n: u32, k: u32) -> u32 {
    let others = n.saturating_sub(1);
    if k + 1 >= n { others } else { (2 * k.div_ceil(2)).min(others) }
}

/// The neighbour lists of every client of a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeighbourGraph {
    /// `neighbours[i]` lists the neighbours of client `i + 1`, sorted.
    neighbours: Vec<Vec<ClientIndex>>,
}

impl NeighbourGraph {
    /// The graph over clients 1..=n in which each has `k` neighbours (rounded up to even,
    /// capped at n − 1).
    pub fn new(n: u32, k: u32, seed: u64) -> Self {
        let n_us = n as usize;
        let index = |i: usize| ClientIndex::new(i as u32 + 1).expect("i + 1 > 0");
        if k + 1 >= n {
            let neighbours = (0..n_us).map(|u| (0..n_us).filter(|&v| v != u).map(index).collect()).collect();
            return Self { neighbours };
        }
        let mut order: Vec<usize> = (0..n_us).collect();
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        for i in (1..n_us).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let half = k.div_ceil(2) as usize;
        let mut neighbours = vec![Vec::with_capacity(2 * half); n_us];
        for (position, &u) in order.iter().enumerate() {
            for step in 1..=half {
                neighbours[u].push(index(order[(position + step) % n_us]));
                neighbours[u].push(index(order[(position + n_us - step) % n_us]));
            }
        }
        for list in &mut neighbours {
            list.sort();
            list.dedup();
        }
        Self { neighbours }
    }

    pub fn neighbours(&self, of: ClientIndex) -> &[ClientIndex] {
        self.neighbours.get(of.get() as usize - 1).map_or(&[], Vec::as_slice)
    }

    pub fn are_neighbours(&self, a: ClientIndex, b: ClientIndex) -> bool {
        self.neighbours(a).binary_search(&b).is_ok()
    }

    pub fn len(&self) -> usize {
        self.neighbours.len()
    }

    pub fn is_empty(&self) -> bool {
        self.neighbours.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The holders' count the bounds use is the degree of the graph actually built, for
    /// every cohort and neighbour count up to 40 (odd and even k, sparse and complete).
    #[test]
    fn share_holders_is_the_degree_of_the_graph_built() {
        for n in 2..=40u32 {
            for k in 1..=n + 1 {
                let graph = NeighbourGraph::new(n, k, u64::from(n * 100 + k));
                for u in 1..=n {
                    let u = ClientIndex::new(u).expect("non-zero");
                    assert_eq!(graph.neighbours(u).len() as u32, share_holders(n, k), "n = {n}, k = {k}");
                }
            }
        }
        // The case that broke the client's check: 25 clients, 23 asked, a complete graph.
        assert_eq!(share_holders(25, 23), 24);
    }

    #[test]
    fn graph_is_symmetric_regular_and_seeded() {
        let graph = NeighbourGraph::new(100, 10, 7);
        for u in 1..=100 {
            let u = ClientIndex::new(u).expect("non-zero");
            assert_eq!(graph.neighbours(u).len(), 10);
            assert!(!graph.are_neighbours(u, u));
            for &v in graph.neighbours(u) {
                assert!(graph.are_neighbours(v, u), "edge {u}–{v} is one-way");
            }
        }
        assert_eq!(graph, NeighbourGraph::new(100, 10, 7));
        assert_ne!(graph, NeighbourGraph::new(100, 10, 8));
    }

    #[test]
    fn k_of_n_minus_one_is_the_complete_graph() {
        let graph = NeighbourGraph::new(5, 4, 1);
        let one = ClientIndex::new(1).expect("non-zero");
        assert_eq!(graph.neighbours(one).iter().map(|c| c.get()).collect::<Vec<_>>(), vec![2, 3, 4, 5]);
    }
}
