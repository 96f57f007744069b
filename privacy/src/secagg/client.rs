//! The client side of SecAgg+, one type per thing it waits for. Each step consumes the
//! state and the server's message and returns the next state and the message to send.
//!
//! ```text
//! start ─AdvertiseKeys→ ExpectRoster ─ShareKeys→ ExpectInbox ─MaskedInput→
//!   ExpectSurvivors ─ConsistencyCheck→ ExpectSignatures ─Unmask→ done
//! ```
//!
//! An honest client reveals, for each neighbour, either the share of its self-mask seed
//! (if the neighbour survived) or the share of its mask key (if it dropped), never both,
//! and only after every survivor signed the same survivor list.
//!
//! Shares are dealt signed and committed to; a neighbour whose signed shares do not open or
//! match their commitments is treated as dropped (its pairwise mask left out, and that one
//! seed revealed in a complaint), so one malicious neighbour cannot stop the round. A share
//! forwarded without its dealer's valid signature means the server altered it: the client
//! stops.

use std::collections::{BTreeMap, BTreeSet};

use rand_core::{CryptoRng, RngCore};

use super::crypto::{self, AgreementKey, MaskSign, SharedSecret, SigningKey};
use super::graph::{NeighbourGraph, roster_seed};
use super::message::*;
use super::shamir::{self, LIMBS, ShareValues};
use super::{Identities, PeerMisbehaved, Phase, RoundConfig, SecAggError, ServerMisbehaved, signed};

/// Sealed plaintext: owner and holder indices, the two commitment salts, the two shares.
const PLAINTEXT_LEN: usize = 8 + 2 * 32 + 2 * LIMBS * 8;

/// What stays the same through a client's round.
#[derive(Debug)]
struct Core {
    config: RoundConfig,
    me: ClientIndex,
    graph: NeighbourGraph,
    cipher_key: AgreementKey,
    mask_key: AgreementKey,
    self_mask_secret: [u8; 32],
    /// The cohort's long-term keys, kept from the roster to check sealed shares' signatures.
    identities: Identities,
}

impl Core {
    fn neighbours_in(&self, set: &BTreeSet<ClientIndex>) -> usize {
        self.graph.neighbours(self.me).iter().filter(|v| set.contains(v)).count()
    }

    fn require(&self, phase: Phase, survivors: usize) -> Result<(), SecAggError> {
        let needed = self.config.threshold as usize;
        if survivors < needed {
            return Err(SecAggError::TooFewSurvivors { phase, survivors, needed });
        }
        Ok(())
    }
}

/// Starts a round: fresh X25519 keys and self-mask seed, and the signed key advertisement.
pub fn start(
    config: RoundConfig,
    me: ClientIndex,
    signing_key: &SigningKey,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<(ExpectRoster, AdvertiseKeys), SecAggError> {
    config.validate()?;
    if !config.contains(me) {
        return Err(SecAggError::Config(format!("{me} is outside the cohort of {}", config.cohort_size)));
    }
    // The graph is drawn from the roster once it arrives (`roster_seed`); until then this
    // client has no neighbours.
    let graph = NeighbourGraph::new(0, 0, 0);
    let core = Core {
        me,
        graph,
        cipher_key: AgreementKey::generate(rng),
        mask_key: AgreementKey::generate(rng),
        self_mask_secret: crypto::random_bytes(rng),
        identities: Identities::new(),
        config,
    };
    let (cipher, mask) = (core.cipher_key.public(), core.mask_key.public());
    let signature = crypto::sign(signing_key, &signed::keys(&core.config.binding, me, &cipher, &mask));
    let keys = SignedKeys { sender: me, cipher_public_key: cipher, mask_public_key: mask, signature };
    let message = AdvertiseKeys { binding: core.config.binding, keys: keys.clone() };
    Ok((ExpectRoster { core, sent: keys }, message))
}

/// Waiting for the key roster (the end of phase 0).
#[derive(Debug)]
pub struct ExpectRoster {
    core: Core,
    sent: SignedKeys,
}

impl ExpectRoster {
    /// Checks the roster, derives the neighbour graph from it, and deals this client's two
    /// secrets to its neighbours: each pair of shares sealed for its holder, committed to
    /// and signed.
    pub fn on_roster(
        self,
        roster: Vec<SignedKeys>,
        identities: &Identities,
        signing_key: &SigningKey,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(ExpectInbox, ShareKeys), SecAggError> {
        let mut core = self.core;
        let mut keys = BTreeMap::new();
        for entry in roster {
            let who = entry.sender;
            if !core.config.contains(who) {
                return Err(SecAggError::Peer { who, fault: PeerMisbehaved::NotInCohort });
            }
            let identity = identities
                .get(&who)
                .ok_or(SecAggError::Peer { who, fault: PeerMisbehaved::UnknownIdentity })?;
            let payload =
                signed::keys(&core.config.binding, who, &entry.cipher_public_key, &entry.mask_public_key);
            if !crypto::verify(identity, &payload, &entry.signature) {
                return Err(SecAggError::Peer { who, fault: PeerMisbehaved::BadSignature });
            }
            if keys.insert(who, entry).is_some() {
                return Err(SecAggError::Server(ServerMisbehaved::DuplicateInRoster(who)));
            }
        }
        if keys.get(&core.me) != Some(&self.sent) {
            return Err(SecAggError::Server(ServerMisbehaved::RosterAltered));
        }
        // The neighbour graph, from every advertisement in the roster: the coordinator does
        // not choose it, and every client (and the server) derives the same one.
        let seed = roster_seed(&core.config.binding, &keys);
        core.graph = NeighbourGraph::new(core.config.cohort_size, core.config.neighbours, seed);
        let present: BTreeSet<ClientIndex> = keys.keys().copied().collect();
        core.require(Phase::AdvertiseKeys, core.neighbours_in(&present))?;

        // Share s_sk and b among the neighbours present, t of whom reconstruct them.
        let holders: Vec<ClientIndex> =
            core.graph.neighbours(core.me).iter().copied().filter(|v| present.contains(v)).collect();
        let xs: Vec<u32> = holders.iter().map(|v| v.get()).collect();
        let t = core.config.threshold as usize;
        let key_shares = shamir::split(&core.mask_key.secret_bytes(), t, &xs, rng);
        let seed_shares = shamir::split(&core.self_mask_secret, t, &xs, rng);
        let mut shares = Vec::with_capacity(holders.len());
        for ((&holder, key_share), seed_share) in holders.iter().zip(&key_shares).zip(&seed_shares) {
            let peer = &keys[&holder];
            let key = core
                .cipher_key
                .share_key(&peer.cipher_public_key, &core.config.binding)
                .ok_or(SecAggError::Peer { who: holder, fault: PeerMisbehaved::WeakKey })?;
            let (key_salt, seed_salt) = (crypto::random_bytes(rng), crypto::random_bytes(rng));
            let binding = &core.config.binding;
            let commit = |secret, salt, values: &ShareValues| {
                crypto::share_commitment(binding, core.me, holder, secret, salt, values)
            };
            let key_commitment = commit(SharedSecret::MaskKey, &key_salt, key_share);
            let seed_commitment = commit(SharedSecret::SelfMaskSeed, &seed_salt, seed_share);
            let mut plaintext = Vec::with_capacity(PLAINTEXT_LEN);
            plaintext.extend_from_slice(&core.me.get().to_be_bytes());
            plaintext.extend_from_slice(&holder.get().to_be_bytes());
            plaintext.extend_from_slice(&key_salt);
            plaintext.extend_from_slice(&seed_salt);
            for value in key_share.iter().chain(seed_share) {
                plaintext.extend_from_slice(&value.to_be_bytes());
            }
            let mut sealed = EncryptedShares {
                sender: core.me,
                recipient: holder,
                ciphertext: crypto::seal(&key, binding, core.me, holder, &plaintext),
                key_commitment,
                seed_commitment,
                signature: [0; SIGNATURE_LEN],
            };
            sealed.signature = crypto::sign(signing_key, &signed::sealed_shares(binding, &sealed));
            shares.push(sealed);
        }
        core.identities = identities.clone();
        let message = ShareKeys { binding: core.config.binding, shares };
        Ok((ExpectInbox { core, keys }, message))
    }
}

/// The shares of one neighbour's secrets that this client holds, with their salts.
#[derive(Clone, Debug)]
struct Held {
    mask_key: ShareValues,
    self_mask_seed: ShareValues,
    key_salt: [u8; 32],
    seed_salt: [u8; 32],
}

/// Waiting for the shares addressed to this client (the end of phase 1).
#[derive(Debug)]
pub struct ExpectInbox {
    core: Core,
    keys: BTreeMap<ClientIndex, SignedKeys>,
}

impl ExpectInbox {
    /// Opens the forwarded shares and masks `input` (already encoded in Z_{2^b}).
    pub fn on_inbox(
        self,
        inbox: Vec<EncryptedShares>,
        input: &[u32],
    ) -> Result<(ExpectSurvivors, MaskedInput), SecAggError> {
        let core = self.core;
        let config = &core.config;
        if input.len() != config.vector_length {
            return Err(SecAggError::Config(format!(
                "input has {} words, the round expects {}",
                input.len(),
                config.vector_length
            )));
        }
        let modulus_mask = if config.bit_width == 32 { u32::MAX } else { (1 << config.bit_width) - 1 };
        if input.iter().any(|&v| v & !modulus_mask != 0) {
            return Err(SecAggError::Config(format!("input values must be below 2^{}", config.bit_width)));
        }

        let mut held = BTreeMap::new();
        let mut complaints = Vec::new();
        for sealed in inbox {
            let who = sealed.sender;
            if sealed.recipient != core.me {
                return Err(SecAggError::Server(ServerMisbehaved::Misaddressed));
            }
            if !core.graph.are_neighbours(core.me, who) {
                return Err(SecAggError::Peer { who, fault: PeerMisbehaved::NotANeighbour(core.me) });
            }
            let peer =
                self.keys.get(&who).ok_or(SecAggError::Peer { who, fault: PeerMisbehaved::NotASurvivor })?;
            if held.contains_key(&who) || complaints.iter().any(|c: &Complaint| c.accused == who) {
                return Err(SecAggError::Peer { who, fault: PeerMisbehaved::Duplicate });
            }
            // The server checked every signature before forwarding: a bad one here means
            // it altered the shares, and this client stops.
            let identity = core
                .identities
                .get(&who)
                .ok_or(SecAggError::Peer { who, fault: PeerMisbehaved::UnknownIdentity })?;
            if !crypto::verify(identity, &signed::sealed_shares(&config.binding, &sealed), &sealed.signature)
            {
                return Err(SecAggError::Server(ServerMisbehaved::AlteredShares(who)));
            }
            let key = core
                .cipher_key
                .share_key(&peer.cipher_public_key, &config.binding)
                .ok_or(SecAggError::Peer { who, fault: PeerMisbehaved::WeakKey })?;
            // Shares the sender signed but that do not open, parse or match the sender's own
            // commitments: the sender misbehaved. Treat it as dropped, leave out its mask,
            // and say so, so that the round goes on without it.
            let opened = crypto::open(&key, &config.binding, who, core.me, &sealed.ciphertext)
                .and_then(|plaintext| parse_plaintext(&plaintext, who, core.me))
                .filter(|shares| shares.matches(&config.binding, who, core.me, &sealed));
            match opened {
                Some(shares) => {
                    held.insert(who, shares);
                }
                None => {
                    let pairwise_seed = core
                        .mask_key
                        .pairwise_seed(&peer.mask_public_key, &config.binding)
                        .ok_or(SecAggError::Peer { who, fault: PeerMisbehaved::WeakKey })?;
                    complaints.push(Complaint { accused: who, pairwise_seed });
                }
            }
        }
        let senders: BTreeSet<ClientIndex> = held.keys().copied().collect();
        core.require(Phase::ShareKeys, core.neighbours_in(&senders))?;

        // y = x + PRG(b) + Σ_{v > me} PRG(s_{me,v}) − Σ_{v < me} PRG(s_{me,v})  (mod 2^b),
        // over the neighbours v whose shares arrived and opened.
        let mut masked = input.to_vec();
        crypto::apply_mask(
            &mut masked,
            &crypto::self_mask_seed(&core.self_mask_secret, &config.binding),
            MaskSign::Add,
            config.bit_width,
        );
        for &v in &senders {
            let seed = core
                .mask_key
                .pairwise_seed(&self.keys[&v].mask_public_key, &config.binding)
                .ok_or(SecAggError::Peer { who: v, fault: PeerMisbehaved::WeakKey })?;
            let sign = if v > core.me { MaskSign::Add } else { MaskSign::Subtract };
            crypto::apply_mask(&mut masked, &seed, sign, config.bit_width);
        }
        let complained = complaints.iter().map(|c| c.accused).collect();
        let message = MaskedInput { binding: config.binding, sender: core.me, masked, complaints };
        Ok((ExpectSurvivors { core, held, complained }, message))
    }
}

fn parse_plaintext(plaintext: &[u8], owner: ClientIndex, holder: ClientIndex) -> Option<Held> {
    if plaintext.len() != PLAINTEXT_LEN {
        return None;
    }
    let word = |i: usize| u32::from_be_bytes(plaintext[i..i + 4].try_into().expect("4 bytes"));
    if word(0) != owner.get() || word(4) != holder.get() {
        return None;
    }
    let salt = |i: usize| -> [u8; 32] { plaintext[i..i + 32].try_into().expect("32 bytes") };
    let (key_salt, seed_salt) = (salt(8), salt(40));
    let value = |i: usize| u64::from_be_bytes(plaintext[72 + 8 * i..80 + 8 * i].try_into().expect("8 bytes"));
    let mask_key: ShareValues = std::array::from_fn(value);
    let self_mask_seed: ShareValues = std::array::from_fn(|i| value(LIMBS + i));
    let in_field = mask_key.iter().chain(&self_mask_seed).all(|&v| v < shamir::P);
    in_field.then_some(Held { mask_key, self_mask_seed, key_salt, seed_salt })
}

impl Held {
    /// Whether these are the shares the owner committed to in its signed message.
    fn matches(
        &self,
        binding: &RoundBinding,
        owner: ClientIndex,
        holder: ClientIndex,
        sealed: &EncryptedShares,
    ) -> bool {
        let commit = |secret, salt, values: &ShareValues| {
            crypto::share_commitment(binding, owner, holder, secret, salt, values)
        };
        commit(SharedSecret::MaskKey, &self.key_salt, &self.mask_key) == sealed.key_commitment
            && commit(SharedSecret::SelfMaskSeed, &self.seed_salt, &self.self_mask_seed)
                == sealed.seed_commitment
    }
}

/// Waiting for the list of clients whose masked input the server received (phase 2).
#[derive(Debug)]
pub struct ExpectSurvivors {
    core: Core,
    held: BTreeMap<ClientIndex, Held>,
    /// Neighbours this client complained about (their shares were unusable).
    complained: BTreeSet<ClientIndex>,
}

impl ExpectSurvivors {
    pub fn on_survivors(
        self,
        survivors: Vec<ClientIndex>,
        signing_key: &SigningKey,
    ) -> Result<(ExpectSignatures, ConsistencyCheck), SecAggError> {
        let core = self.core;
        let mut set = BTreeSet::new();
        for &s in &survivors {
            if !core.config.contains(s) {
                return Err(SecAggError::Peer { who: s, fault: PeerMisbehaved::NotInCohort });
            }
            if !set.insert(s) {
                return Err(SecAggError::Server(ServerMisbehaved::DuplicateInRoster(s)));
            }
            // A neighbour that never sent this client its shares cannot have masked input.
            if core.graph.are_neighbours(core.me, s)
                && !self.held.contains_key(&s)
                && !self.complained.contains(&s)
            {
                return Err(SecAggError::Server(ServerMisbehaved::SurvivorsNotSubset));
            }
        }
        if !set.contains(&core.me) {
            return Err(SecAggError::Server(ServerMisbehaved::LeftOutOfSurvivors));
        }
        core.require(Phase::MaskedInput, core.neighbours_in(&set))?;
        let sorted: Vec<ClientIndex> = set.iter().copied().collect();
        let signature = crypto::sign(signing_key, &signed::survivors(&core.config.binding, &sorted));
        let message = ConsistencyCheck { binding: core.config.binding, sender: core.me, signature };
        Ok((ExpectSignatures { core, held: self.held, survivors: set }, message))
    }
}

/// Waiting for every survivor's signature over the survivor list (phase 3).
#[derive(Debug)]
pub struct ExpectSignatures {
    core: Core,
    held: BTreeMap<ClientIndex, Held>,
    survivors: BTreeSet<ClientIndex>,
}

impl ExpectSignatures {
    /// Checks that the survivors all signed this client's survivor list, then reveals the
    /// shares that remove the masks of the sum and nothing else.
    pub fn on_signatures(
        self,
        signatures: Vec<SurvivorSignature>,
        identities: &Identities,
    ) -> Result<Unmask, SecAggError> {
        let core = self.core;
        let sorted: Vec<ClientIndex> = self.survivors.iter().copied().collect();
        let payload = signed::survivors(&core.config.binding, &sorted);
        let mut signers = BTreeSet::new();
        for s in signatures {
            let who = s.sender;
            if !self.survivors.contains(&who) {
                return Err(SecAggError::Server(ServerMisbehaved::SurvivorsNotSubset));
            }
            let identity = identities
                .get(&who)
                .ok_or(SecAggError::Peer { who, fault: PeerMisbehaved::UnknownIdentity })?;
            if !crypto::verify(identity, &payload, &s.signature) {
                return Err(SecAggError::Server(ServerMisbehaved::InconsistentSurvivors(who)));
            }
            if !signers.insert(who) {
                return Err(SecAggError::Peer { who, fault: PeerMisbehaved::Duplicate });
            }
        }
        core.require(Phase::ConsistencyCheck, core.neighbours_in(&signers))?;
        core.require(Phase::ConsistencyCheck, signers.len())?;

        let mut self_mask_shares = Vec::new();
        let mut mask_key_shares = Vec::new();
        for (&owner, held) in &self.held {
            if self.survivors.contains(&owner) {
                let y = held.self_mask_seed.to_vec();
                self_mask_shares.push(ShamirShare { owner, x: core.me, y, salt: held.seed_salt });
            } else {
                let y = held.mask_key.to_vec();
                mask_key_shares.push(ShamirShare { owner, x: core.me, y, salt: held.key_salt });
            }
        }
        Ok(Unmask { binding: core.config.binding, sender: core.me, self_mask_shares, mask_key_shares })
    }
}

impl ExpectRoster {
    /// This client's index.
    pub fn me(&self) -> ClientIndex {
        self.core.me
    }
}
