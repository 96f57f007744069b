//! The server side of SecAgg+: collects each phase's messages, checks them, and when the
//! coordinator closes the phase (all in, or the deadline passed) produces what to
//! forward. Masked inputs are added into one running sum as they arrive, so the server's
//! working memory is O(d) whatever the cohort size.
//!
//! The server can only ever recover the sum of the survivors' inputs: it receives either
//! the self-mask share or the mask-key share of a client from each honest neighbour,
//! never both, and it aborts (revealing nothing) when too few clients remain.

use std::collections::{BTreeMap, BTreeSet};

use super::crypto::{self, AgreementKey, MaskSign, SharedSecret};
use super::graph::{NeighbourGraph, roster_seed};
use super::message::*;
use super::shamir::{self, ShareValues};
use super::{Identities, PeerMisbehaved, Phase, RoundConfig, SecAggError, signed};

/// Where a round stands.
#[derive(Debug)]
enum Stage {
    AdvertiseKeys { keys: BTreeMap<ClientIndex, SignedKeys> },
    ShareKeys { shares: BTreeMap<ClientIndex, Vec<EncryptedShares>> },
    MaskedInput { received: BTreeSet<ClientIndex> },
    ConsistencyCheck { signatures: BTreeMap<ClientIndex, [u8; 64]> },
    Unmask { responders: BTreeSet<ClientIndex> },
    Finished,
    Aborted,
}

impl Stage {
    fn phase(&self) -> Option<Phase> {
        match self {
            Stage::AdvertiseKeys { .. } => Some(Phase::AdvertiseKeys),
            Stage::ShareKeys { .. } => Some(Phase::ShareKeys),
            Stage::MaskedInput { .. } => Some(Phase::MaskedInput),
            Stage::ConsistencyCheck { .. } => Some(Phase::ConsistencyCheck),
            Stage::Unmask { .. } => Some(Phase::Unmask),
            Stage::Finished | Stage::Aborted => None,
        }
    }
}

/// One round of SecAgg+ at the server.
#[derive(Debug)]
pub struct Server {
    config: RoundConfig,
    /// Drawn from the roster when phase 0 closes ([`roster_seed`]).
    graph: Option<NeighbourGraph>,
    identities: Identities,
    stage: Stage,
    /// U1: clients whose keys were forwarded.
    roster: BTreeMap<ClientIndex, SignedKeys>,
    /// U2: clients whose shares were forwarded.
    shared: BTreeSet<ClientIndex>,
    /// U3: clients whose masked input is in `sum`.
    survivors: BTreeSet<ClientIndex>,
    /// The commitments each owner (first) made to the shares it dealt each holder (second):
    /// mask key, then self-mask seed.
    commitments: BTreeMap<(ClientIndex, ClientIndex), ([u8; 32], [u8; 32])>,
    /// Complaints in the survivors' masked inputs: accuser → accused → revealed pairwise seed.
    complaints: BTreeMap<ClientIndex, BTreeMap<ClientIndex, [u8; 32]>>,
    /// Σ masked inputs of U3, mod 2^b.
    sum: Vec<u32>,
    self_mask_shares: BTreeMap<ClientIndex, Vec<(u32, ShareValues)>>,
    mask_key_shares: BTreeMap<ClientIndex, Vec<(u32, ShareValues)>>,
}

fn peer(who: ClientIndex, fault: PeerMisbehaved) -> SecAggError {
    SecAggError::Peer { who, fault }
}

impl Server {
    pub fn new(config: RoundConfig, identities: Identities) -> Result<Self, SecAggError> {
        config.validate()?;
        let graph = None;
        Ok(Self {
            sum: vec![0; config.vector_length],
            graph,
            identities,
            config,
            stage: Stage::AdvertiseKeys { keys: BTreeMap::new() },
            roster: BTreeMap::new(),
            shared: BTreeSet::new(),
            survivors: BTreeSet::new(),
            commitments: BTreeMap::new(),
            complaints: BTreeMap::new(),
            self_mask_shares: BTreeMap::new(),
            mask_key_shares: BTreeMap::new(),
        })
    }

    pub fn config(&self) -> &RoundConfig {
        &self.config
    }

    /// The phase the round is in; `None` once it finished or aborted.
    pub fn phase(&self) -> Option<Phase> {
        self.stage.phase()
    }

    /// Checks what every message must satisfy: this round, a cohort member, no forgery.
    fn admit(
        &self,
        binding: &RoundBinding,
        from: ClientIndex,
        claimed: ClientIndex,
    ) -> Result<(), SecAggError> {
        if *binding != self.config.binding {
            return Err(SecAggError::WrongRound {
                expected: self.config.binding.round_id,
                got: binding.round_id,
            });
        }
        if !self.config.contains(from) {
            return Err(peer(from, PeerMisbehaved::NotInCohort));
        }
        if claimed != from {
            return Err(peer(from, PeerMisbehaved::ForgedSender { claimed }));
        }
        Ok(())
    }

    /// The neighbour graph, drawn when phase 0 closed.
    fn graph(&self) -> Result<&NeighbourGraph, SecAggError> {
        self.graph
            .as_ref()
            .ok_or(SecAggError::WrongPhase { phase: self.stage.phase(), got: Phase::ShareKeys })
    }

    /// The round's neighbour graph, once phase 0 has closed.
    pub fn neighbour_graph(&self) -> Option<&NeighbourGraph> {
        self.graph.as_ref()
    }

    fn wrong_phase(&self, got: Phase) -> SecAggError {
        SecAggError::WrongPhase { phase: self.stage.phase(), got }
    }

    fn require(&mut self, phase: Phase, survivors: usize) -> Result<(), SecAggError> {
        let needed = self.config.threshold as usize;
        if survivors < needed {
            self.abort();
            return Err(SecAggError::TooFewSurvivors { phase, survivors, needed });
        }
        Ok(())
    }

    /// Ends the round without a result; the partial sum is erased.
    pub fn abort(&mut self) {
        self.stage = Stage::Aborted;
        self.sum.iter_mut().for_each(|v| *v = 0);
        self.self_mask_shares.clear();
        self.mask_key_shares.clear();
    }

    // ------------------------------------------------------------ phase 0

    /// A client's signed key advertisement, `from` being its authenticated index.
    pub fn receive_keys(&mut self, from: ClientIndex, message: AdvertiseKeys) -> Result<(), SecAggError> {
        self.admit(&message.binding, from, message.keys.sender)?;
        let identity = *self.identities.get(&from).ok_or(peer(from, PeerMisbehaved::UnknownIdentity))?;
        let k = &message.keys;
        let payload = signed::keys(&self.config.binding, from, &k.cipher_public_key, &k.mask_public_key);
        if !crypto::verify(&identity, &payload, &k.signature) {
            return Err(peer(from, PeerMisbehaved::BadSignature));
        }
        // A low-order key would make every neighbour's key agreement fail: keep it (and its
        // sender) out of the roster instead.
        if !crypto::is_usable_agreement_key(&k.cipher_public_key)
            || !crypto::is_usable_agreement_key(&k.mask_public_key)
        {
            return Err(peer(from, PeerMisbehaved::WeakKey));
        }
        let Stage::AdvertiseKeys { keys } = &mut self.stage else {
            return Err(self.wrong_phase(Phase::AdvertiseKeys));
        };
        if keys.contains_key(&from) {
            return Err(peer(from, PeerMisbehaved::Duplicate));
        }
        keys.insert(from, message.keys);
        Ok(())
    }

    /// Closes phase 0: the roster every client receives.
    pub fn close_keys(&mut self) -> Result<Vec<SignedKeys>, SecAggError> {
        let Stage::AdvertiseKeys { keys } = &mut self.stage else {
            return Err(self.wrong_phase(Phase::AdvertiseKeys));
        };
        let keys = std::mem::take(keys);
        self.require(Phase::AdvertiseKeys, keys.len())?;
        let seed = roster_seed(&self.config.binding, &keys);
        self.graph = Some(NeighbourGraph::new(self.config.cohort_size, self.config.neighbours, seed));
        self.roster = keys;
        self.stage = Stage::ShareKeys { shares: BTreeMap::new() };
        Ok(self.roster.values().cloned().collect())
    }

    // ------------------------------------------------------------ phase 1

    pub fn receive_shares(&mut self, from: ClientIndex, message: ShareKeys) -> Result<(), SecAggError> {
        self.admit(&message.binding, from, from)?;
        if !self.roster.contains_key(&from) {
            return Err(peer(from, PeerMisbehaved::NotASurvivor));
        }
        let identity = *self.identities.get(&from).ok_or(peer(from, PeerMisbehaved::UnknownIdentity))?;
        let mut recipients = BTreeSet::new();
        for share in &message.shares {
            if share.sender != from {
                return Err(peer(from, PeerMisbehaved::ForgedSender { claimed: share.sender }));
            }
            if !self.graph()?.are_neighbours(from, share.recipient)
                || !self.roster.contains_key(&share.recipient)
            {
                return Err(peer(from, PeerMisbehaved::NotANeighbour(share.recipient)));
            }
            if !recipients.insert(share.recipient) {
                return Err(peer(from, PeerMisbehaved::Duplicate));
            }
            if !crypto::verify(
                &identity,
                &signed::sealed_shares(&self.config.binding, share),
                &share.signature,
            ) {
                return Err(peer(from, PeerMisbehaved::BadSignature));
            }
        }
        // Every neighbour in the roster gets shares: a neighbour left out could not mask
        // with this client, and its own survivor check would stop the round.
        if let Some(&missing) = self
            .graph()?
            .neighbours(from)
            .iter()
            .find(|v| self.roster.contains_key(v) && !recipients.contains(v))
        {
            return Err(peer(from, PeerMisbehaved::IncompleteShares(missing)));
        }
        let Stage::ShareKeys { shares } = &mut self.stage else {
            return Err(self.wrong_phase(Phase::ShareKeys));
        };
        if shares.contains_key(&from) {
            return Err(peer(from, PeerMisbehaved::Duplicate));
        }
        shares.insert(from, message.shares);
        Ok(())
    }

    /// Closes phase 1: each client's inbox of shares sealed for it.
    pub fn close_shares(&mut self) -> Result<BTreeMap<ClientIndex, Vec<EncryptedShares>>, SecAggError> {
        let Stage::ShareKeys { shares } = &mut self.stage else {
            return Err(self.wrong_phase(Phase::ShareKeys));
        };
        let shares = std::mem::take(shares);
        self.require(Phase::ShareKeys, shares.len())?;
        self.shared = shares.keys().copied().collect();
        self.commitments = shares
            .values()
            .flatten()
            .map(|s| ((s.sender, s.recipient), (s.key_commitment, s.seed_commitment)))
            .collect();
        let mut inboxes: BTreeMap<ClientIndex, Vec<EncryptedShares>> =
            self.shared.iter().map(|&c| (c, Vec::new())).collect();
        for share in shares.into_values().flatten() {
            if let Some(inbox) = inboxes.get_mut(&share.recipient) {
                inbox.push(share);
            }
        }
        self.stage = Stage::MaskedInput { received: BTreeSet::new() };
        Ok(inboxes)
    }

    // ------------------------------------------------------------ phase 2

    pub fn receive_masked_input(
        &mut self,
        from: ClientIndex,
        message: MaskedInput,
    ) -> Result<(), SecAggError> {
        self.admit(&message.binding, from, message.sender)?;
        if !self.shared.contains(&from) {
            return Err(peer(from, PeerMisbehaved::NotASurvivor));
        }
        let expected = self.config.vector_length;
        if message.masked.len() != expected {
            return Err(peer(from, PeerMisbehaved::WrongLength { expected, actual: message.masked.len() }));
        }
        let bit_width = self.config.bit_width;
        if bit_width < 32 && message.masked.iter().any(|&v| v >> bit_width != 0) {
            return Err(peer(from, PeerMisbehaved::OutOfRange { bit_width }));
        }
        // A complaint must name a neighbour that sent this client shares.
        let mut complaints = BTreeMap::new();
        for complaint in &message.complaints {
            let accused = complaint.accused;
            let valid = accused != from
                && self.shared.contains(&accused)
                && self.graph()?.are_neighbours(from, accused)
                && complaints.insert(accused, complaint.pairwise_seed).is_none();
            if !valid {
                return Err(peer(from, PeerMisbehaved::BadComplaint(accused)));
            }
        }
        let Stage::MaskedInput { received } = &mut self.stage else {
            return Err(self.wrong_phase(Phase::MaskedInput));
        };
        if !received.insert(from) {
            return Err(peer(from, PeerMisbehaved::Duplicate));
        }
        crate::dp::add_mod(&mut self.sum, &message.masked, bit_width);
        if !complaints.is_empty() {
            self.complaints.insert(from, complaints);
        }
        Ok(())
    }

    /// Closes phase 2: the survivor list every client signs.
    pub fn close_inputs(&mut self) -> Result<Vec<ClientIndex>, SecAggError> {
        let Stage::MaskedInput { received } = &mut self.stage else {
            return Err(self.wrong_phase(Phase::MaskedInput));
        };
        let received = std::mem::take(received);
        self.require(Phase::MaskedInput, received.len())?;
        self.survivors = received;
        self.stage = Stage::ConsistencyCheck { signatures: BTreeMap::new() };
        Ok(self.survivors.iter().copied().collect())
    }

    // ------------------------------------------------------------ phase 3

    pub fn receive_consistency(
        &mut self,
        from: ClientIndex,
        message: ConsistencyCheck,
    ) -> Result<(), SecAggError> {
        self.admit(&message.binding, from, message.sender)?;
        if !self.survivors.contains(&from) {
            return Err(peer(from, PeerMisbehaved::NotASurvivor));
        }
        let identity = *self.identities.get(&from).ok_or(peer(from, PeerMisbehaved::UnknownIdentity))?;
        let list: Vec<ClientIndex> = self.survivors.iter().copied().collect();
        if !crypto::verify(&identity, &signed::survivors(&self.config.binding, &list), &message.signature) {
            return Err(peer(from, PeerMisbehaved::BadSignature));
        }
        let Stage::ConsistencyCheck { signatures } = &mut self.stage else {
            return Err(self.wrong_phase(Phase::ConsistencyCheck));
        };
        if signatures.insert(from, message.signature).is_some() {
            return Err(peer(from, PeerMisbehaved::Duplicate));
        }
        Ok(())
    }

    /// Closes phase 3: the signatures every survivor checks before unmasking.
    pub fn close_consistency(&mut self) -> Result<Vec<SurvivorSignature>, SecAggError> {
        let Stage::ConsistencyCheck { signatures } = &mut self.stage else {
            return Err(self.wrong_phase(Phase::ConsistencyCheck));
        };
        let signatures = std::mem::take(signatures);
        self.require(Phase::ConsistencyCheck, signatures.len())?;
        self.stage = Stage::Unmask { responders: BTreeSet::new() };
        Ok(signatures
            .into_iter()
            .map(|(sender, signature)| SurvivorSignature { sender, signature })
            .collect())
    }

    // ------------------------------------------------------------ phase 4

    pub fn receive_unmask(&mut self, from: ClientIndex, message: Unmask) -> Result<(), SecAggError> {
        self.admit(&message.binding, from, message.sender)?;
        if !self.survivors.contains(&from) {
            return Err(peer(from, PeerMisbehaved::NotASurvivor));
        }
        // Validate everything before recording anything.
        let mut owners = BTreeSet::new();
        let check = |share: &ShamirShare, owner_survived: bool| -> Result<ShareValues, SecAggError> {
            let allowed = self.graph()?.are_neighbours(from, share.owner)
                && self.shared.contains(&share.owner)
                && self.survivors.contains(&share.owner) == owner_survived;
            if !allowed {
                return Err(peer(from, PeerMisbehaved::ForbiddenReveal));
            }
            if share.x != from {
                return Err(peer(from, PeerMisbehaved::ForgedSender { claimed: share.x }));
            }
            let values: ShareValues =
                share.y.as_slice().try_into().map_err(|_| peer(from, PeerMisbehaved::BadShares))?;
            // The share must be the one its owner dealt this holder (its signed commitment):
            // a false share is refused here and its holder named, so it never reaches
            // reconstruction.
            let (secret, committed) = match (owner_survived, self.commitments.get(&(share.owner, from))) {
                (_, None) => return Err(peer(from, PeerMisbehaved::ForbiddenReveal)),
                (true, Some((_, seed))) => (SharedSecret::SelfMaskSeed, seed),
                (false, Some((key, _))) => (SharedSecret::MaskKey, key),
            };
            let commitment = crypto::share_commitment(
                &self.config.binding,
                share.owner,
                from,
                secret,
                &share.salt,
                &values,
            );
            if commitment != *committed {
                return Err(peer(from, PeerMisbehaved::ShareMismatch { owner: share.owner }));
            }
            Ok(values)
        };
        let mut self_mask = Vec::new();
        for share in &message.self_mask_shares {
            self_mask.push((share.owner, check(share, true)?));
            owners.insert(share.owner);
        }
        let mut mask_key = Vec::new();
        for share in &message.mask_key_shares {
            mask_key.push((share.owner, check(share, false)?));
            owners.insert(share.owner);
        }
        if owners.len() != self_mask.len() + mask_key.len() {
            return Err(peer(from, PeerMisbehaved::Duplicate));
        }
        let Stage::Unmask { responders } = &mut self.stage else {
            return Err(self.wrong_phase(Phase::Unmask));
        };
        if !responders.insert(from) {
            return Err(peer(from, PeerMisbehaved::Duplicate));
        }
        for (owner, values) in self_mask {
            self.self_mask_shares.entry(owner).or_default().push((from.get(), values));
        }
        for (owner, values) in mask_key {
            self.mask_key_shares.entry(owner).or_default().push((from.get(), values));
        }
        Ok(())
    }

    /// Whether the Unmask responses so far hold `threshold` shares of every secret
    /// [`Server::finish`] reconstructs: each survivor's self-mask seed and each key of a
    /// client that dropped after sharing. A coordinator may close the phase early once it
    /// holds (waiting for the rest reveals nothing more); whether the shares reconstruct is
    /// still `finish`'s to check.
    pub fn has_unmask_shares(&self) -> bool {
        if !matches!(self.stage, Stage::Unmask { .. }) {
            return false;
        }
        let t = self.config.threshold as usize;
        let enough = |map: &BTreeMap<ClientIndex, Vec<(u32, ShareValues)>>, owner: &ClientIndex| {
            map.get(owner).is_some_and(|shares| shares.len() >= t)
        };
        self.survivors.iter().all(|v| enough(&self.self_mask_shares, v))
            && self.shared.difference(&self.survivors).all(|u| enough(&self.mask_key_shares, u))
    }

    /// Removes every mask and returns Σ_{U3} x mod 2^b, or aborts if some secret has
    /// fewer than `threshold` shares or does not reconstruct.
    pub fn finish(&mut self) -> Result<Vec<u32>, SecAggError> {
        let Stage::Unmask { .. } = &self.stage else { return Err(self.wrong_phase(Phase::Unmask)) };
        // Derive every mask first, so that a failure leaves nothing partially unmasked.
        let masks = match self.masks_to_remove() {
            Ok(masks) => masks,
            Err(error) => {
                self.abort();
                return Err(error);
            }
        };
        for (seed, sign) in &masks {
            crypto::apply_mask(&mut self.sum, seed, *sign, self.config.bit_width);
        }
        self.stage = Stage::Finished;
        self.self_mask_shares.clear();
        self.mask_key_shares.clear();
        Ok(std::mem::take(&mut self.sum))
    }

    /// The seeds (and signs) of the masks still in the sum: the self masks of the
    /// survivors, and the pairwise masks between survivors and clients that dropped after
    /// sharing their keys.
    fn masks_to_remove(&self) -> Result<Vec<([u8; 32], MaskSign)>, SecAggError> {
        let t = self.config.threshold as usize;
        let binding = self.config.binding;
        let shares_of = |map: &BTreeMap<ClientIndex, Vec<(u32, ShareValues)>>, owner: ClientIndex| {
            let shares = map.get(&owner).map_or(&[][..], Vec::as_slice);
            let accused = self.complaints.values().any(|c| c.contains_key(&owner));
            if shares.len() < t && accused {
                // It sealed garbage for more neighbours than the threshold leaves to spare.
                return Err(peer(owner, PeerMisbehaved::UndecryptableShares));
            }
            if shares.len() < t {
                return Err(SecAggError::TooFewSurvivors {
                    phase: Phase::Unmask,
                    survivors: shares.len(),
                    needed: t,
                });
            }
            shamir::reconstruct(shares, t).map_err(|_| peer(owner, PeerMisbehaved::BadShares))
        };
        let mut masks = Vec::new();
        for &v in &self.survivors {
            let b = shares_of(&self.self_mask_shares, v)?;
            masks.push((crypto::self_mask_seed(&b, &binding), MaskSign::Subtract));
        }
        for &u in self.shared.difference(&self.survivors) {
            let key = AgreementKey::from_secret_bytes(shares_of(&self.mask_key_shares, u)?);
            if key.public() != self.roster[&u].mask_public_key {
                return Err(peer(u, PeerMisbehaved::BadShares));
            }
            for &v in self.graph()?.neighbours(u) {
                // A survivor that complained about u never applied their mask.
                let complained = self.complaints.get(&v).is_some_and(|c| c.contains_key(&u));
                if !self.survivors.contains(&v) || complained {
                    continue;
                }
                let seed = key
                    .pairwise_seed(&self.roster[&v].mask_public_key, &binding)
                    .ok_or(peer(v, PeerMisbehaved::WeakKey))?;
                // v added +PRG(s_uv) if u > v and −PRG(s_uv) if u < v: undo it.
                masks.push((seed, if u > v { MaskSign::Subtract } else { MaskSign::Add }));
            }
        }
        // An accuser c left out its mask with the accused a; if a survived, a's half is
        // still in the sum: a added +PRG(s) if c > a and −PRG(s) if c < a.
        for (&c, accused) in &self.complaints {
            for (&a, seed) in accused {
                if self.survivors.contains(&a) {
                    masks.push((*seed, if c > a { MaskSign::Subtract } else { MaskSign::Add }));
                }
            }
        }
        Ok(masks)
    }

    /// The complaints in the survivors' masked inputs, as (accuser, accused): each accuser
    /// says the accused sealed it signed shares that did not open or match its commitments.
    /// The server cannot check which of the two lies (the shares are sealed under their
    /// pairwise key), so it names both and leaves the judgement to a policy over rounds.
    pub fn complaints(&self) -> Vec<(ClientIndex, ClientIndex)> {
        self.complaints.iter().flat_map(|(&c, accused)| accused.keys().map(move |&a| (c, a))).collect()
    }

    /// The key roster forwarded at the end of phase 0 (U1).
    pub fn roster(&self) -> Vec<SignedKeys> {
        self.roster.values().cloned().collect()
    }

    /// Clients whose input is in the result (U3), once phase 2 closed.
    pub fn survivors(&self) -> Vec<ClientIndex> {
        self.survivors.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::super::testkit::TestCohort;

    use super::*;
    use crate::secagg::client;

    fn index(i: u32) -> ClientIndex {
        ClientIndex::new(i).expect("1-based")
    }

    /// Plays ShareKeys, MaskedInput and ConsistencyCheck honestly for the clients whose keys
    /// `server` took (`states`), `vanish` dropping out before its masked input: what each
    /// survivor holds at Unmask, and the signatures it gets.
    fn play_to_unmask(
        server: &mut Server,
        cohort: &TestCohort,
        states: BTreeMap<ClientIndex, client::ExpectRoster>,
        inputs: &BTreeMap<ClientIndex, Vec<u32>>,
        vanish: Option<ClientIndex>,
        rng: &mut ChaCha20Rng,
    ) -> (BTreeMap<ClientIndex, client::ExpectSignatures>, Vec<SurvivorSignature>) {
        let TestCohort { signing, identities, .. } = cohort;
        let roster = server.close_keys().expect("roster");
        let mut waiting = BTreeMap::new();
        for (c, state) in states {
            let (next, msg) = state.on_roster(roster.clone(), identities, &signing[&c], rng).expect("shares");
            server.receive_shares(c, msg).expect("shares");
            waiting.insert(c, next);
        }
        let mut inboxes = server.close_shares().expect("inboxes");
        let mut masked = BTreeMap::new();
        for (c, state) in waiting {
            let (next, msg) =
                state.on_inbox(inboxes.remove(&c).unwrap_or_default(), &inputs[&c]).expect("input");
            if Some(c) == vanish {
                continue;
            }
            server.receive_masked_input(c, msg).expect("input");
            masked.insert(c, next);
        }
        let survivors = server.close_inputs().expect("survivors");
        let mut checked = BTreeMap::new();
        for (c, state) in masked {
            let (next, msg) = state.on_survivors(survivors.clone(), &signing[&c]).expect("signature");
            server.receive_consistency(c, msg).expect("signature");
            checked.insert(c, next);
        }
        (checked, server.close_consistency().expect("signatures"))
    }

    /// The small-order points of Curve25519 as X25519 public keys (u-coordinates,
    /// little-endian; the list libsodium refuses), and non-canonical encodings of them.
    const LOW_ORDER: [&str; 7] = [
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ];

    fn bytes32(hex: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
        }
        out
    }

    #[test]
    fn low_order_keys_are_unusable_and_generated_ones_are_usable() {
        for hex in LOW_ORDER {
            assert!(!crypto::is_usable_agreement_key(&bytes32(hex)), "{hex}");
        }
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        for _ in 0..32 {
            assert!(crypto::is_usable_agreement_key(&AgreementKey::generate(&mut rng).public()));
        }
    }

    /// One merchant advertises a validly signed low-order key: the server refuses it at
    /// AdvertiseKeys, names it, and the other four finish the round with their exact sum.
    #[test]
    fn a_low_order_key_is_refused_at_advertise_keys_and_the_round_completes_without_it() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let cohort = TestCohort::new(2, 5, 3, 4, 16, 32, &mut rng);
        let TestCohort { config, signing, identities } = &cohort;
        let inputs: BTreeMap<ClientIndex, Vec<u32>> =
            (1..=5).map(|i| (index(i), (0..16).map(|j| i * 1000 + j).collect())).collect();
        let mut server = Server::new(config.clone(), identities.clone()).expect("server");
        let mut states = BTreeMap::new();
        for c in (1..=5).map(index) {
            let (state, mut msg) = client::start(config.clone(), c, &signing[&c], &mut rng).expect("start");
            if c == index(5) {
                msg.keys.mask_public_key = bytes32(LOW_ORDER[2]);
                let payload =
                    signed::keys(&config.binding, c, &msg.keys.cipher_public_key, &msg.keys.mask_public_key);
                msg.keys.signature = crypto::sign(&signing[&c], &payload);
                let error = server.receive_keys(c, msg).expect_err("a low-order key");
                assert!(
                    matches!(error, SecAggError::Peer { who, fault: PeerMisbehaved::WeakKey } if who == c),
                    "{error}"
                );
                continue;
            }
            server.receive_keys(c, msg).expect("honest keys");
            states.insert(c, state);
        }
        let (checked, signatures) = play_to_unmask(&mut server, &cohort, states, &inputs, None, &mut rng);
        assert_eq!(server.roster().len(), 4, "the bad key never reaches the others");
        for (c, state) in checked {
            let msg = state.on_signatures(signatures.clone(), identities).expect("unmask");
            server.receive_unmask(c, msg).expect("unmask");
        }
        let sum = server.finish().expect("the round completes");
        let expected: Vec<u32> =
            (0..16).map(|j| (1..=4u32).map(|i| inputs[&index(i)][j]).fold(0u32, u32::wrapping_add)).collect();
        assert_eq!(sum, expected);
    }

    /// Client 5 shares its keys, then drops before MaskedInput. The Unmask phase holds
    /// `threshold` shares of every secret only once enough survivors have answered: never
    /// before `threshold` of them, and with every survivor's answer the sum comes out exact.
    #[test]
    fn unmask_shares_are_enough_only_with_threshold_responders() {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let cohort = TestCohort::new(3, 5, 3, 4, 8, 32, &mut rng);
        let TestCohort { config, signing, identities } = &cohort;
        let inputs: BTreeMap<ClientIndex, Vec<u32>> =
            (1..=5).map(|i| (index(i), (0..8).map(|j| i * 100 + j).collect())).collect();
        let mut server = Server::new(config.clone(), identities.clone()).expect("server");
        let mut states = BTreeMap::new();
        for c in (1..=5).map(index) {
            let (state, msg) = client::start(config.clone(), c, &signing[&c], &mut rng).expect("start");
            server.receive_keys(c, msg).expect("keys");
            states.insert(c, state);
        }
        assert!(!server.has_unmask_shares(), "not in the Unmask phase");
        let (checked, signatures) =
            play_to_unmask(&mut server, &cohort, states, &inputs, Some(index(5)), &mut rng);
        assert!(!server.has_unmask_shares(), "no share yet");
        for (answered, (c, state)) in checked.into_iter().enumerate() {
            let msg = state.on_signatures(signatures.clone(), identities).expect("unmask");
            server.receive_unmask(c, msg).expect("unmask");
            if answered + 1 < 3 {
                assert!(!server.has_unmask_shares(), "{} responders hold fewer than 3 shares", answered + 1);
            }
        }
        assert!(server.has_unmask_shares(), "every survivor answered");
        let sum = server.finish().expect("the round completes");
        let expected: Vec<u32> =
            (0..8).map(|j| (1..=4u32).map(|i| inputs[&index(i)][j]).fold(0u32, u32::wrapping_add)).collect();
        assert_eq!(sum, expected);
    }
}
