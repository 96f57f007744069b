//! Drivers that feed arbitrary bytes to the SecAgg+ state machines, shared by the
//! `cargo fuzz` targets in `fuzz/` and by the bounded runs in this crate's tests. Each
//! plays an honest round of 4 clients in which the bytes decide what the adversary
//! (a client or the server) corrupts, reorders, replays or drops. The only acceptable
//! outcomes are a typed error or a correct result: never a panic, never a wrong sum.

use std::collections::BTreeMap;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use super::client;
use super::message::*;
use super::server::Server;
use super::testkit::{TestCohort, TestRound, index};

/// Reads the fuzzer's bytes as a stream of small decisions.
struct Tape<'a> {
    data: &'a [u8],
}

impl Tape<'_> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn below(&mut self, n: usize) -> usize {
        self.byte() as usize % n.max(1)
    }

    fn chance(&mut self, one_in: u8) -> bool {
        self.byte().is_multiple_of(one_in)
    }
}

fn setup() -> TestRound {
    let mut rng = ChaCha20Rng::seed_from_u64(0);
    let cohort = TestCohort::new(5, 4, 2, 3, 8, 16, &mut rng);
    let inputs = (1..=4).map(|i| (index(i), (0..8).map(|j| (i * 100 + j) & 0xffff).collect())).collect();
    TestRound::new(cohort, inputs, rng)
}

fn corrupt_bytes(tape: &mut Tape<'_>, bytes: &mut Vec<u8>) {
    match tape.below(4) {
        0 if !bytes.is_empty() => {
            let i = tape.below(bytes.len());
            bytes[i] ^= tape.byte() | 1;
        }
        1 => {
            bytes.truncate(tape.below(bytes.len() + 1));
        }
        2 => bytes.push(tape.byte()),
        _ => {}
    }
}

fn some_index(tape: &mut Tape<'_>) -> ClientIndex {
    index(1 + tape.below(6) as u32) // sometimes outside the cohort of 4
}

/// Plays a round in which the server (the tape) tampers with what it forwards to client
/// 1; client 1 must either finish or stop with an error.
pub fn drive_client(data: &[u8]) {
    let mut tape = Tape { data };
    let mut s = setup();
    let me = index(1);
    let mut server = s.server();
    let mut states = BTreeMap::new();
    for c in (1..=4).map(index) {
        let (state, msg) =
            client::start(s.config.clone(), c, &s.signing[&c], &mut s.rng).expect("honest start");
        server.receive_keys(c, msg).expect("honest keys");
        states.insert(c, state);
    }
    let mut roster = server.close_keys().expect("honest roster");
    if tape.chance(2) && !roster.is_empty() {
        let i = tape.below(roster.len());
        match tape.below(4) {
            0 => {
                roster.remove(i);
            }
            1 => roster.push(roster[i].clone()),
            2 => roster[i].sender = some_index(&mut tape),
            _ => roster[i].mask_public_key[tape.below(32)] ^= 1,
        }
    }
    let mut next = BTreeMap::new();
    for (c, state) in states {
        let roster = if c == me { roster.clone() } else { server_roster_for_others(&roster) };
        let Ok((state, msg)) = state.on_roster(roster, &s.identities, &s.signing[&c], &mut s.rng) else {
            continue;
        };
        let _ = server.receive_shares(c, msg);
        next.insert(c, state);
    }
    let Ok(mut inboxes) = server.close_shares() else { return };
    let mut inbox = inboxes.remove(&me).unwrap_or_default();
    if tape.chance(2) && !inbox.is_empty() {
        let i = tape.below(inbox.len());
        match tape.below(4) {
            0 => corrupt_bytes(&mut tape, &mut inbox[i].ciphertext),
            1 => inbox.push(inbox[i].clone()),
            2 => inbox[i].sender = some_index(&mut tape),
            _ => inbox[i].recipient = some_index(&mut tape),
        }
    }
    let mut after = BTreeMap::new();
    for (c, state) in next {
        let mine = if c == me { std::mem::take(&mut inbox) } else { inboxes.remove(&c).unwrap_or_default() };
        let Ok((state, msg)) = state.on_inbox(mine, &s.inputs[&c]) else { continue };
        let _ = server.receive_masked_input(c, msg);
        after.insert(c, state);
    }
    let Ok(mut survivors) = server.close_inputs() else { return };
    let honest_survivors = survivors.clone();
    if tape.chance(2) {
        match tape.below(3) {
            0 if !survivors.is_empty() => {
                survivors.remove(tape.below(survivors.len()));
            }
            1 => survivors.push(some_index(&mut tape)),
            _ => survivors.reverse(),
        }
    }
    let mut last = BTreeMap::new();
    for (c, state) in after {
        let list = if c == me { survivors.clone() } else { honest_survivors.clone() };
        let Ok((state, msg)) = state.on_survivors(list, &s.signing[&c]) else { continue };
        let _ = server.receive_consistency(c, msg);
        last.insert(c, state);
    }
    let Ok(mut signatures) = server.close_consistency() else { return };
    if tape.chance(2) && !signatures.is_empty() {
        let i = tape.below(signatures.len());
        match tape.below(3) {
            0 => signatures[i].signature[tape.below(64)] ^= 1,
            1 => signatures.push(signatures[i].clone()),
            _ => signatures[i].sender = some_index(&mut tape),
        }
    }
    for (c, state) in last {
        if let Ok(msg) = state.on_signatures(signatures.clone(), &s.identities) {
            let _ = server.receive_unmask(c, msg);
        }
    }
    if let Ok(sum) = server.finish() {
        check_sum(&s, &server, &sum);
    }
}

/// The other clients see the honest roster (only client 1's view is tampered with).
fn server_roster_for_others(roster: &[SignedKeys]) -> Vec<SignedKeys> {
    let mut seen = std::collections::BTreeSet::new();
    roster.iter().filter(|k| k.sender.get() <= 4 && seen.insert(k.sender)).cloned().collect()
}

/// A round that finishes must give exactly the survivors' sum.
fn check_sum(s: &TestRound, server: &Server, sum: &[u32]) {
    let expected = s.expected_sum(&server.survivors());
    assert_eq!(sum, expected.as_slice(), "a finished round must yield exactly the survivors' sum");
}

/// Plays a round in which client 1 (the tape) sends the server corrupted, replayed,
/// reordered or forged messages; the server must reject them with errors and, if the
/// round still finishes with honest unmasking shares, give the exact sum.
pub fn drive_server(data: &[u8]) {
    let mut tape = Tape { data };
    let mut s = setup();
    let attacker = index(1);
    let mut server = s.server();

    let mut states = BTreeMap::new();
    let mut replay: Vec<(ClientIndex, AdvertiseKeys)> = Vec::new();
    for c in (1..=4).map(index) {
        let (state, mut msg) = client::start(s.config.clone(), c, &s.signing[&c], &mut s.rng).expect("start");
        let from = if c == attacker && tape.chance(3) { some_index(&mut tape) } else { c };
        if c == attacker && tape.chance(3) {
            msg.keys.signature[tape.below(64)] ^= 1;
        }
        if c == attacker && tape.chance(3) {
            msg.binding.round_id ^= 1;
        }
        replay.push((from, msg.clone()));
        let _ = server.receive_keys(from, msg);
        states.insert(c, state);
    }
    if tape.chance(2) {
        let (from, msg) = replay[tape.below(replay.len())].clone();
        let _ = server.receive_keys(from, msg);
    }
    // Out-of-phase messages must be refused, not acted on.
    if tape.chance(3) {
        let early = MaskedInput {
            binding: s.config.binding,
            sender: attacker,
            masked: vec![7; tape.below(10)],
            complaints: Vec::new(),
        };
        let _ = server.receive_masked_input(attacker, early);
    }
    let Ok(roster) = server.close_keys() else { return };

    let mut next = BTreeMap::new();
    for (c, state) in states {
        let Ok((state, mut msg)) = state.on_roster(roster.clone(), &s.identities, &s.signing[&c], &mut s.rng)
        else {
            continue;
        };
        if c == attacker && tape.chance(2) && !msg.shares.is_empty() {
            let i = tape.below(msg.shares.len());
            match tape.below(6) {
                0 => msg.shares[i].recipient = some_index(&mut tape),
                1 => msg.shares[i].sender = some_index(&mut tape),
                2 => msg.shares.push(msg.shares[i].clone()),
                3 => {
                    msg.shares.remove(i);
                }
                4 => corrupt_bytes(&mut tape, &mut msg.shares[i].ciphertext),
                _ => {
                    // Garbage under the attacker's own valid signature: its neighbour
                    // complains and the round goes on without their pairwise mask.
                    let share = &mut msg.shares[i];
                    corrupt_bytes(&mut tape, &mut share.ciphertext);
                    share.key_commitment[0] ^= tape.byte() & 1;
                    let payload = super::signed::sealed_shares(&s.config.binding, share);
                    share.signature = super::crypto::sign(&s.signing[&c], &payload);
                }
            }
        }
        let _ = server.receive_shares(c, msg);
        next.insert(c, state);
    }
    let Ok(mut inboxes) = server.close_shares() else { return };

    // A client that complains falsely (a wrong seed) shifts the sum by a pseudorandom
    // vector, as it could by masking a wrong input: SecAgg+ keeps inputs private, and the
    // coordinator's norm check on the decoded sum bounds what a malicious client adds.
    let mut complained_falsely = false;
    let mut after = BTreeMap::new();
    for (c, state) in next {
        let Ok((state, mut msg)) = state.on_inbox(inboxes.remove(&c).unwrap_or_default(), &s.inputs[&c])
        else {
            continue;
        };
        if c == attacker && tape.chance(2) {
            match tape.below(5) {
                0 => {
                    msg.masked.truncate(tape.below(9));
                }
                1 => msg.masked[0] = u32::MAX,
                2 => msg.sender = some_index(&mut tape),
                3 => {
                    complained_falsely = true;
                    msg.complaints.push(Complaint { accused: some_index(&mut tape), pairwise_seed: [9; 32] });
                }
                _ => {
                    let _ = server.receive_masked_input(c, msg.clone());
                }
            }
        }
        let _ = server.receive_masked_input(c, msg);
        after.insert(c, state);
    }
    let Ok(survivors) = server.close_inputs() else { return };

    let mut last = BTreeMap::new();
    for (c, state) in after {
        let Ok((state, mut msg)) = state.on_survivors(survivors.clone(), &s.signing[&c]) else { continue };
        if c == attacker && tape.chance(2) {
            msg.signature[tape.below(64)] ^= 1;
        }
        let _ = server.receive_consistency(c, msg);
        last.insert(c, state);
    }
    let Ok(signatures) = server.close_consistency() else { return };

    // A wrong share value is refused against its owner's commitment, so it never reaches
    // reconstruction: whatever the attacker reveals, a finished round has the exact sum.
    for (c, state) in last {
        let Ok(mut msg) = state.on_signatures(signatures.clone(), &s.identities) else { continue };
        if c == attacker && tape.chance(2) {
            match tape.below(5) {
                0 if !msg.self_mask_shares.is_empty() => {
                    // Offer a survivor's key share: honest servers must refuse it.
                    let share = msg.self_mask_shares.remove(0);
                    msg.mask_key_shares.push(share);
                }
                1 if !msg.self_mask_shares.is_empty() => msg.self_mask_shares[0].y[0] ^= 1,
                2 if !msg.self_mask_shares.is_empty() => msg.self_mask_shares[0].y.push(1),
                3 if !msg.self_mask_shares.is_empty() => msg.self_mask_shares[0].salt[0] ^= 1,
                _ => msg.sender = some_index(&mut tape),
            }
        }
        let _ = server.receive_unmask(c, msg);
    }
    if let Ok(sum) = server.finish()
        && !complained_falsely
    {
        check_sum(&s, &server, &sum);
    }
}
