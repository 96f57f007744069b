//! Seeded SecAgg+ cohorts for tests, benchmarks and the fuzz drivers: one round's
//! configuration and each member's Ed25519 signing key, drawn from a caller's seeded
//! generator. Never used by the protocol itself.

use std::collections::BTreeMap;

use rand_chacha::ChaCha20Rng;
use rand_core::RngCore;

use super::crypto::SigningKey;
use super::message::{ClientIndex, RoundBinding};
use super::server::Server;
use super::{Identities, RoundConfig};

/// Client `i` (1-based).
pub fn index(i: u32) -> ClientIndex {
    ClientIndex::new(i).expect("a 1-based index")
}

/// A binding for round `round_id` of a made-up federation, adapter and task.
pub fn binding(round_id: u64) -> RoundBinding {
    RoundBinding { federation_id: [1; 16], round_id, adapter_sha256: [2; 32], task_sha256: [3; 32] }
}

/// One round's configuration and its cohort's signing keys.
#[derive(Debug)]
pub struct TestCohort {
    pub config: RoundConfig,
    pub signing: BTreeMap<ClientIndex, SigningKey>,
    pub identities: Identities,
}

impl TestCohort {
    /// A round of round id `round_id` for `n` clients at threshold `t` with `k` neighbours,
    /// over vectors of `d` words in Z_{2^bit_width}; each client's signing key from 32
    /// bytes of `rng`, in index order.
    pub fn new(
        round_id: u64,
        n: u32,
        t: u32,
        k: u32,
        d: usize,
        bit_width: u32,
        rng: &mut impl RngCore,
    ) -> Self {
        let config = RoundConfig {
            binding: binding(round_id),
            cohort_size: n,
            threshold: t,
            neighbours: k,
            vector_length: d,
            bit_width,
        };
        let (mut signing, mut identities) = (BTreeMap::new(), Identities::new());
        for i in 1..=n {
            let mut seed = [0u8; 32];
            rng.fill_bytes(&mut seed);
            let key = SigningKey::from_seed_unchecked(&seed).expect("a 32-byte seed");
            let public: [u8; 32] =
                ring::signature::KeyPair::public_key(&key).as_ref().try_into().expect("32 bytes");
            identities.insert(index(i), public);
            signing.insert(index(i), key);
        }
        Self { config, signing, identities }
    }
}

/// A cohort, each member's input vector and the generator the members draw from: what a
/// test needs to play whole rounds and check their sums.
#[derive(Debug)]
pub struct TestRound {
    pub config: RoundConfig,
    pub signing: BTreeMap<ClientIndex, SigningKey>,
    pub identities: Identities,
    pub inputs: BTreeMap<ClientIndex, Vec<u32>>,
    pub rng: ChaCha20Rng,
}

impl TestRound {
    pub fn new(cohort: TestCohort, inputs: BTreeMap<ClientIndex, Vec<u32>>, rng: ChaCha20Rng) -> Self {
        let TestCohort { config, signing, identities } = cohort;
        Self { config, signing, identities, inputs, rng }
    }

    /// A fresh server for the round.
    pub fn server(&self) -> Server {
        Server::new(self.config.clone(), self.identities.clone()).expect("a valid round configuration")
    }

    /// The sum of `survivors`' inputs in the round's ring: what a finished round must give.
    pub fn expected_sum(&self, survivors: &[ClientIndex]) -> Vec<u32> {
        let mut sum = vec![0u32; self.config.vector_length];
        for s in survivors {
            crate::dp::add_mod(&mut sum, &self.inputs[s], self.config.bit_width);
        }
        sum
    }
}
