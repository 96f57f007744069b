//! SecAgg+ secure aggregation (Bonawitz et al., CCS 2017, with the sparse neighbour graph
//! of Bell et al., CCS 2020), as state machines that do no I/O: the client and server
//! consume messages and return the messages to send, and the coordinator and client
//! binaries only move them.
//!
//! Phases: (0) AdvertiseKeys, (1) ShareKeys, (2) MaskedInput, (3) ConsistencyCheck,
//! (4) Unmask. The server learns the modular sum of the survivors' inputs and nothing
//! else; with fewer than `threshold` survivors in any neighbourhood the round aborts.
//! Against malicious clients: keys are checked for low order, sealed shares carry their
//! dealer's signature and commitments (so garbage is attributed to its dealer, who is
//! treated as dropped by the recipient's complaint, and a false revealed share is refused),
//! and a dealer must share with every neighbour.

pub mod client;
pub mod crypto;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod graph;
pub mod message;
mod phase;
pub mod server;
pub mod shamir;
#[doc(hidden)]
pub mod testkit;

pub use error::{PeerMisbehaved, SecAggError, ServerMisbehaved};
pub use phase::{Phase, UnknownPhase};

use std::collections::BTreeMap;

use message::{ClientIndex, RoundBinding};

/// The long-term Ed25519 public key of every client of the cohort, by index.
pub type Identities = BTreeMap<ClientIndex, [u8; 32]>;

/// What every participant of a round agrees on before it starts (all of it public).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundConfig {
    pub binding: RoundBinding,
    /// n: clients in the cohort, indexed 1..=n.
    pub cohort_size: u32,
    /// t: shares needed to reconstruct a secret, and survivors needed in each neighbourhood.
    pub threshold: u32,
    /// k: neighbours per client (k ≥ n − 1: the original, complete-graph protocol). The
    /// graph itself is drawn from the roster ([`graph::roster_seed`]), not chosen by anyone.
    pub neighbours: u32,
    /// Length of the input vectors, in u32 words.
    pub vector_length: usize,
    /// b: inputs and masks live in Z_{2^b}, 1 ≤ b ≤ 32.
    pub bit_width: u32,
}

/// The smallest threshold that keeps a client's input hidden from a coordinator that
/// deviates from the protocol, when each client's secrets are shared among `holders`
/// neighbours (`n − 1` in the complete graph): `t = ⌊2k/3⌋ + 1`.
///
/// Why: a malicious coordinator can tell some of a victim's share holders that the victim
/// dropped (they reveal shares of its mask key) and others that it survived (they reveal
/// shares of its self-mask seed); with both it strips both masks. An honest holder reveals
/// only after t signatures on one survivor list and signs one list per round, so with
/// `c` colluding holders the coordinator needs `(k − c) + 2c ≥ 2t` (in the complete graph
/// `2t + 1`: a holder counts its neighbours' signatures, not its own; measured at both
/// ends by `colluders_who_sign_both_survivor_lists...` in `tests/secagg_rounds.rs`): the
/// input stays hidden while `c < 2t − k` (Bonawitz et al., CCS 2017, active model; Bell et al., CCS 2020, for
/// the neighbourhoods of SecAgg+). At `t = ⌊2k/3⌋ + 1` that is fewer than about k/3
/// colluders, and a round survives up to `k − t` dropped neighbours.
pub fn min_active_threshold(holders: u32) -> u32 {
    2 * holders / 3 + 1
}

/// How many of a client's share holders may collude with a malicious coordinator without
/// unmasking it, at threshold `t` (see [`min_active_threshold`]): the largest `c < 2t − k`.
pub fn colluders_tolerated(threshold: u32, holders: u32) -> u32 {
    (2 * threshold).saturating_sub(holders).saturating_sub(1)
}

impl RoundConfig {
    /// Checks the parameters' consistency. The protocol runs at any threshold ≥ 2 (secure
    /// against an honest-but-curious server); the active-security bound
    /// ([`min_active_threshold`]) is a policy the coordinator applies to every round and
    /// the merchant's client (`guild_client::participant::vet_task`) checks before it joins.
    pub fn validate(&self) -> Result<(), SecAggError> {
        let n = self.cohort_size;
        let k = graph::share_holders(n, self.neighbours);
        let problem = if n < 2 {
            Some("a round needs at least 2 clients".to_owned())
        } else if self.threshold < 2 || self.threshold > k {
            Some(format!("threshold {} must be in 2..={k} (the neighbourhood size)", self.threshold))
        } else if self.vector_length == 0 {
            Some("vector_length must be at least 1".to_owned())
        } else if !(1..=32).contains(&self.bit_width) {
            Some(format!("bit_width {} must be in 1..=32", self.bit_width))
        } else {
            None
        };
        problem.map_or(Ok(()), |reason| Err(SecAggError::Config(reason)))
    }

    pub fn contains(&self, client: ClientIndex) -> bool {
        client.get() <= self.cohort_size
    }
}

/// Domain-separated payloads that clients sign.
pub mod signed {
    use super::message::{ClientIndex, EncryptedShares, RoundBinding};

    pub fn keys(binding: &RoundBinding, sender: ClientIndex, cipher: &[u8; 32], mask: &[u8; 32]) -> Vec<u8> {
        let mut out = b"guild secagg+ v1 advertise keys".to_vec();
        out.extend_from_slice(&binding.to_bytes());
        out.extend_from_slice(&sender.get().to_be_bytes());
        out.extend_from_slice(cipher);
        out.extend_from_slice(mask);
        out
    }

    /// What the sender of sealed shares signs: both indices, the ciphertext (by its hash)
    /// and the commitments to the two shares inside it (everything but the signature).
    pub fn sealed_shares(binding: &RoundBinding, sealed: &EncryptedShares) -> Vec<u8> {
        let mut out = b"guild secagg+ v1 sealed shares".to_vec();
        out.extend_from_slice(&binding.to_bytes());
        out.extend_from_slice(&sealed.sender.get().to_be_bytes());
        out.extend_from_slice(&sealed.recipient.get().to_be_bytes());
        out.extend_from_slice(&super::crypto::sha256(&sealed.ciphertext));
        out.extend_from_slice(&sealed.key_commitment);
        out.extend_from_slice(&sealed.seed_commitment);
        out
    }

    pub fn survivors(binding: &RoundBinding, survivors: &[ClientIndex]) -> Vec<u8> {
        let mut out = b"guild secagg+ v1 consistency check".to_vec();
        out.extend_from_slice(&binding.to_bytes());
        for s in survivors {
            out.extend_from_slice(&s.get().to_be_bytes());
        }
        out
    }
}
