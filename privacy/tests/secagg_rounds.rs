//! SecAgg+ guarantees, on in-memory rounds: exact sums under dropouts at every phase,
//! aborts that reveal nothing, refusals of a misbehaving server, typed rejections of bad
//! messages, and masked vectors indistinguishable from uniform.

use std::collections::{BTreeMap, BTreeSet};

use guild_privacy::secagg::client::{self, ExpectSignatures};
use guild_privacy::secagg::crypto::{self, AgreementKey, MaskSign};
use guild_privacy::secagg::graph::NeighbourGraph;
use guild_privacy::secagg::message::*;
use guild_privacy::secagg::server::Server;
use guild_privacy::secagg::testkit::{TestCohort, TestRound, binding, index};
use guild_privacy::secagg::{PeerMisbehaved, Phase, SecAggError, ServerMisbehaved, shamir};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use statrs::distribution::{ChiSquared, ContinuousCDF};

type Federation = TestRound;

/// A round of `n` clients at threshold `t` with `k` neighbours over `d` random words of
/// `bit_width` bits each, every draw from `seed`.
fn federation(n: u32, k: u32, t: u32, d: usize, bit_width: u32, seed: u64) -> Federation {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let cohort = TestCohort::new(1, n, t, k, d, bit_width, &mut rng);
    let mask = if bit_width == 32 { u32::MAX } else { (1 << bit_width) - 1 };
    let inputs = (1..=n).map(|i| (index(i), (0..d).map(|_| rng.next_u32() & mask).collect())).collect();
    TestRound::new(cohort, inputs, rng)
}

/// The phase before which a client stops talking (0 = never advertises keys).
type Dropouts = BTreeMap<ClientIndex, usize>;

fn talks(dropouts: &Dropouts, c: ClientIndex, phase: usize) -> bool {
    dropouts.get(&c).is_none_or(|&p| p > phase)
}

/// Runs a whole round with honest parties; returns the server's result and U3.
fn run_round(f: &mut Federation, dropouts: &Dropouts) -> (Result<Vec<u32>, SecAggError>, Vec<ClientIndex>) {
    let mut server = f.server();
    let clients: Vec<ClientIndex> = (1..=f.config.cohort_size).map(index).collect();
    macro_rules! step {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => return (Err(e), server.survivors()),
            }
        };
    }

    let mut states = BTreeMap::new();
    for &c in clients.iter().filter(|&&c| talks(dropouts, c, 0)) {
        let (state, msg) = client::start(f.config.clone(), c, &f.signing[&c], &mut f.rng).expect("start");
        server.receive_keys(c, msg).expect("honest keys");
        states.insert(c, state);
    }
    let roster = step!(server.close_keys());

    let mut inboxes_wait = BTreeMap::new();
    for (c, state) in states {
        if !talks(dropouts, c, 1) {
            continue;
        }
        // An honest client that sees too few neighbours aborts, and so does the round.
        let (next, msg) = step!(state.on_roster(roster.clone(), &f.identities, &f.signing[&c], &mut f.rng));
        server.receive_shares(c, msg).expect("honest shares");
        inboxes_wait.insert(c, next);
    }
    let mut inboxes = step!(server.close_shares());

    let mut survivors_wait = BTreeMap::new();
    for (c, state) in inboxes_wait {
        if !talks(dropouts, c, 2) {
            continue;
        }
        let inbox = inboxes.remove(&c).unwrap_or_default();
        let (next, msg) = step!(state.on_inbox(inbox, &f.inputs[&c]));
        server.receive_masked_input(c, msg).expect("honest input");
        survivors_wait.insert(c, next);
    }
    let survivors = step!(server.close_inputs());

    let mut signatures_wait: BTreeMap<ClientIndex, ExpectSignatures> = BTreeMap::new();
    for (c, state) in survivors_wait {
        if !talks(dropouts, c, 3) {
            continue;
        }
        let (next, msg) = step!(state.on_survivors(survivors.clone(), &f.signing[&c]));
        server.receive_consistency(c, msg).expect("honest signature");
        signatures_wait.insert(c, next);
    }
    let signatures = step!(server.close_consistency());

    for (c, state) in signatures_wait {
        if !talks(dropouts, c, 4) {
            continue;
        }
        let msg = step!(state.on_signatures(signatures.clone(), &f.identities));
        let owners: BTreeSet<_> = msg.self_mask_shares.iter().map(|s| s.owner).collect();
        assert!(
            msg.mask_key_shares.iter().all(|s| !owners.contains(&s.owner)),
            "an honest client revealed both shares of one owner"
        );
        server.receive_unmask(c, msg).expect("honest unmask");
    }
    (server.finish(), survivors)
}

fn check_exact_sum(n: u32, k: u32, t: u32, d: usize, dropouts: Dropouts, seed: u64) {
    let mut f = federation(n, k, t, d, 32, seed);
    let (result, survivors) = run_round(&mut f, &dropouts);
    let sum = result.unwrap_or_else(|e| panic!("n={n} k={k} t={t} dropouts={dropouts:?}: {e}"));
    let expected_survivors: Vec<ClientIndex> =
        (1..=n).map(index).filter(|&c| talks(&dropouts, c, 2)).collect();
    assert_eq!(survivors, expected_survivors);
    assert_eq!(sum, f.expected_sum(&survivors), "n={n}: the result is not the survivors' sum");
}

#[test]
fn without_dropouts_the_result_is_the_exact_sum() {
    check_exact_sum(3, 2, 2, 50, Dropouts::new(), 1);
    check_exact_sum(10, 9, 6, 200, Dropouts::new(), 2);
    check_exact_sum(100, 20, 11, 64, Dropouts::new(), 3);
}

#[test]
fn dropouts_at_every_phase_up_to_the_threshold_leave_the_exact_survivors_sum() {
    // Shares go to a client's neighbours, not to itself: each secret needs t of the
    // owner's neighbours alive, so with the complete graph a round survives while at
    // least t + 1 clients remain.
    // n = 10, complete graph, t = 6: two dropouts before any one phase.
    for phase in 0..=4 {
        let dropouts: Dropouts = [(index(3), phase), (index(7), phase)].into();
        check_exact_sum(10, 9, 6, 100, dropouts, 10 + phase as u64);
    }
    // n = 10, t = 5: four dropouts, one before each of phases 0..3, leave t + 1 = 6.
    let staggered: Dropouts = [(index(1), 0), (index(2), 1), (index(3), 2), (index(4), 3)].into();
    check_exact_sum(10, 9, 5, 100, staggered, 20);
    // SecAgg+ graph, n = 100, 10% dropouts spread over the phases.
    let spread: Dropouts = (0..10).map(|i| (index(1 + i * 10), (i % 5) as usize)).collect();
    check_exact_sum(100, 30, 12, 64, spread, 21);
}

#[test]
fn more_dropouts_than_the_threshold_abort_and_reveal_nothing() {
    for phase in 0..=3 {
        let mut f = federation(10, 9, 6, 32, 32, 30 + phase as u64);
        let dropouts: Dropouts = (1..=5).map(|i| (index(i), phase)).collect();
        let (result, _) = run_round(&mut f, &dropouts);
        assert!(
            matches!(result, Err(SecAggError::TooFewSurvivors { needed: 6, .. })),
            "dropping 5 of 10 before phase {phase} must abort, got {result:?}"
        );
    }
    // n = 3 with t = 2 (the smallest threshold that protects against one colluder)
    // tolerates no dropout: one at any phase aborts.
    for phase in 0..=4 {
        let mut f = federation(3, 2, 2, 16, 32, 35 + phase as u64);
        let (result, _) = run_round(&mut f, &[(index(2), phase)].into());
        assert!(
            matches!(result, Err(SecAggError::TooFewSurvivors { .. })),
            "n = 3, phase {phase}: {result:?}"
        );
    }
    // Inputs are in, but too few clients answer the unmasking: the server gets no result.
    let mut f = federation(10, 9, 6, 32, 32, 40);
    let dropouts: Dropouts = (1..=5).map(|i| (index(i), 4)).collect();
    let (result, _) = run_round(&mut f, &dropouts);
    assert!(matches!(result, Err(SecAggError::TooFewSurvivors { phase: Phase::Unmask, .. })), "{result:?}");
}

/// Drives an honest round up to the survivor lists, letting `survivors_for` choose what
/// the server tells each client; returns each client's answer to the signatures.
/// Runs phases 0 and 1 honestly for every client: the server, each client waiting for
/// its inbox, and the inboxes the server forwards.
fn honest_through_shares(
    f: &mut Federation,
) -> (Server, BTreeMap<ClientIndex, client::ExpectInbox>, BTreeMap<ClientIndex, Vec<EncryptedShares>>) {
    let mut server = f.server();
    let mut states = BTreeMap::new();
    for c in (1..=f.config.cohort_size).map(index) {
        let (state, msg) = client::start(f.config.clone(), c, &f.signing[&c], &mut f.rng).expect("start");
        server.receive_keys(c, msg).expect("keys");
        states.insert(c, state);
    }
    let roster = server.close_keys().expect("roster");
    let mut next = BTreeMap::new();
    for (c, state) in states {
        let (state, msg) =
            state.on_roster(roster.clone(), &f.identities, &f.signing[&c], &mut f.rng).expect("roster");
        server.receive_shares(c, msg).expect("shares");
        next.insert(c, state);
    }
    let inboxes = server.close_shares().expect("inboxes");
    (server, next, inboxes)
}

struct LyingRound {
    answers: BTreeMap<ClientIndex, Result<Unmask, SecAggError>>,
    masked: BTreeMap<ClientIndex, Vec<u32>>,
    roster: Vec<SignedKeys>,
}

fn round_with_lying_server(
    f: &mut Federation,
    survivors_for: impl Fn(ClientIndex) -> Vec<ClientIndex>,
) -> LyingRound {
    let (server, next, mut inboxes) = honest_through_shares(f);
    let roster = server.roster();
    let mut signers = BTreeMap::new();
    let mut signatures = Vec::new();
    let mut masked = BTreeMap::new();
    for (c, state) in next {
        let (s, input) =
            state.on_inbox(inboxes.remove(&c).unwrap_or_default(), &f.inputs[&c]).expect("inbox");
        masked.insert(c, input.masked);
        match s.on_survivors(survivors_for(c), &f.signing[&c]) {
            Ok((s, check)) => {
                signatures.push(SurvivorSignature { sender: c, signature: check.signature });
                signers.insert(c, s);
            }
            Err(SecAggError::Server(ServerMisbehaved::LeftOutOfSurvivors)) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let answers =
        signers.into_iter().map(|(c, s)| (c, s.on_signatures(signatures.clone(), &f.identities))).collect();
    LyingRound { answers, masked, roster }
}

#[test]
fn honest_clients_refuse_a_server_that_shows_different_survivor_lists() {
    // The server tells client 1 that client 5 dropped (hoping for 5's mask-key share)
    // and everyone else that 5 survived (for 5's self-mask share): with both it could
    // unmask 5's input alone. The signatures expose the split.
    let mut f = federation(6, 5, 3, 16, 32, 50);
    let all: Vec<ClientIndex> = (1..=6).map(index).collect();
    let without_5: Vec<ClientIndex> = all.iter().copied().filter(|&c| c != index(5)).collect();
    let round =
        round_with_lying_server(&mut f, |c| if c == index(1) { without_5.clone() } else { all.clone() });
    for (c, answer) in round.answers {
        assert!(
            matches!(answer, Err(SecAggError::Server(ServerMisbehaved::InconsistentSurvivors(_)))),
            "{c} must refuse to unmask, got {answer:?}"
        );
    }
}

/// The most shares of each of the victim's two secrets (its mask key, its self-mask seed)
/// a lying server can collect with `colluders` holders on its side, over every way of
/// splitting the victim's honest holders between a survivor list without the victim (they
/// reveal shares of its mask key) and the full list (shares of its self-mask seed): each
/// client is shown only the signatures on its own list, the colluders sign both lists and
/// hand over their own share of each secret. The graph is complete, so only how many
/// honest holders are told the victim dropped matters. Returns the best split's smaller
/// count: the victim is unmasked when it reaches t.
fn best_split_against_the_last_client(n: u32, t: u32, colluders: u32, seed: u64) -> u32 {
    let victim = index(n);
    let everyone: Vec<ClientIndex> = (1..=n).map(index).collect();
    let without_victim: Vec<ClientIndex> = everyone.iter().copied().filter(|&c| c != victim).collect();
    let colluding: Vec<ClientIndex> = (1..=colluders).map(index).collect();
    let honest_holders: Vec<ClientIndex> = (colluders + 1..n).map(index).collect();
    let mut best = 0;
    for told in 0..=honest_holders.len() {
        let told_dropped: BTreeSet<ClientIndex> = honest_holders[..told].iter().copied().collect();
        let list_for = |c: ClientIndex| if told_dropped.contains(&c) { &without_victim } else { &everyone };
        let mut f = federation(n, n - 1, t, 16, 32, seed + told as u64);
        let (_, states, mut inboxes) = honest_through_shares(&mut f);
        let mut signed = Vec::new();
        let mut waiting = Vec::new();
        for (c, state) in states {
            let (state, _) =
                state.on_inbox(inboxes.remove(&c).unwrap_or_default(), &f.inputs[&c]).expect("inbox");
            if colluding.contains(&c) {
                for list in [&without_victim, &everyone] {
                    let payload = guild_privacy::secagg::signed::survivors(&f.config.binding, list);
                    let signature = crypto::sign(&f.signing[&c], &payload);
                    signed.push((list.clone(), SurvivorSignature { sender: c, signature }));
                }
                continue;
            }
            let (state, check) = state.on_survivors(list_for(c).clone(), &f.signing[&c]).expect("a survivor");
            signed.push((list_for(c).clone(), SurvivorSignature { sender: c, signature: check.signature }));
            waiting.push((c, state));
        }
        let (mut mask_key, mut self_mask) = (colluders, colluders);
        for (c, state) in waiting {
            let shown: Vec<SurvivorSignature> =
                signed.iter().filter(|(list, _)| list == list_for(c)).map(|(_, s)| s.clone()).collect();
            if let Ok(unmask) = state.on_signatures(shown, &f.identities) {
                mask_key += unmask.mask_key_shares.iter().filter(|s| s.owner == victim).count() as u32;
                self_mask += unmask.self_mask_shares.iter().filter(|s| s.owner == victim).count() as u32;
            }
        }
        best = best.max(mask_key.min(self_mask));
    }
    best
}

#[test]
fn colluders_who_sign_both_survivor_lists_unmask_no_one_within_the_threshold_bound() {
    // Thirteen clients, each holding shares of every other's secrets (k = 12), at the
    // active threshold t = ⌊2k/3⌋ + 1 = 9: the bound tolerates c < 2t − k, five colluders.
    // An honest holder reveals only after t of its neighbours (not itself) signed its list,
    // so the split needs h_A − 1 + c ≥ t on the victim-dropped side and h_B + c ≥ t on the
    // other (the victim signs there): it works from c = 2t + 1 − k = 7 on, fewer than the
    // t = 9 that could rebuild the secrets alone. At five, and at six (the bound's margin of
    // one), every split leaves the server short of t shares of one secret. The signature
    // check is what stops six: a holder that revealed whenever asked would need only
    // h_A + c ≥ t and h_B + c ≥ t, c ≥ 2t − k = 6 (this test fails without it).
    let (n, t) = (13, 9);
    let bound = guild_privacy::secagg::colluders_tolerated(t, n - 1);
    assert_eq!((bound, guild_privacy::secagg::min_active_threshold(n - 1)), (5, t));
    for colluders in [bound, bound + 1] {
        let best = best_split_against_the_last_client(n, t, colluders, 70);
        assert!(best < t, "{colluders} colluders collected {best} shares of both secrets");
    }
    let beyond = best_split_against_the_last_client(n, t, bound + 2, 90);
    assert!(beyond >= t, "{} colluders reach t = {t} with the right split, got {beyond}", bound + 2);
}

#[test]
fn a_client_the_server_calls_dropped_after_its_input_stays_hidden() {
    // The server receives client 4's masked input but tells everyone (consistently) that
    // 4 dropped. Honest clients then reveal 4's mask-key shares, never its self-mask
    // shares: removing 4's pairwise masks still leaves PRG(b_4) on its input.
    let mut f = federation(5, 4, 3, 256, 32, 60);
    let four = index(4);
    let without_4: Vec<ClientIndex> = (1..=5).map(index).filter(|&c| c != four).collect();
    let round = round_with_lying_server(&mut f, |_| without_4.clone());
    let unmasks: Vec<Unmask> =
        round.answers.into_values().map(|a| a.expect("consistent lists are accepted")).collect();
    assert!(unmasks.iter().all(|u| u.self_mask_shares.iter().all(|s| s.owner != four)));
    let key_shares: Vec<(u32, shamir::ShareValues)> = unmasks
        .iter()
        .flat_map(|u| u.mask_key_shares.iter().filter(|s| s.owner == four))
        .map(|s| (s.x.get(), s.y.as_slice().try_into().expect("5 limbs")))
        .collect();
    assert!(key_shares.len() >= 3, "the server can rebuild 4's mask key");

    // Everything the server can do with what it got: rebuild 4's mask key and strip
    // every pairwise mask from 4's real masked input.
    let key = AgreementKey::from_secret_bytes(shamir::reconstruct(&key_shares, 3).expect("enough shares"));
    let keys_of = |c: ClientIndex| round.roster.iter().find(|k| k.sender == c).expect("in roster");
    assert_eq!(key.public(), keys_of(four).mask_public_key, "the reconstruction is 4's real key");
    let mut stripped = round.masked[&four].clone();
    for &v in NeighbourGraph::new(5, 4, 0).neighbours(four) {
        let seed = key.pairwise_seed(&keys_of(v).mask_public_key, &f.config.binding).expect("contributory");
        // 4 added +PRG(s_4v) for v > 4 and −PRG(s_4v) for v < 4.
        crypto::apply_mask(
            &mut stripped,
            &seed,
            if v > four { MaskSign::Subtract } else { MaskSign::Add },
            32,
        );
    }
    // What remains is x_4 + PRG(b_4): still hiding 4's input, and uniform-looking.
    let input = &f.inputs[&four];
    assert_ne!(&stripped, input, "client 4's input must stay hidden");
    let matching = stripped.iter().zip(input).filter(|(a, b)| a == b).count();
    assert!(matching < 3, "{matching} of 256 words match the input");
    assert!(uniformity_p_value(&stripped, 32) > 1e-6, "what remains looks uniform");
}

fn uniformity_p_value(values: &[u32], bit_width: u32) -> f64 {
    let bins = 256usize;
    let mut counts = vec![0f64; bins];
    for &v in values {
        counts[(v >> (bit_width - 8)) as usize] += 1.0;
    }
    let expected = values.len() as f64 / bins as f64;
    let statistic: f64 = counts.iter().map(|c| (c - expected).powi(2) / expected).sum();
    1.0 - ChiSquared::new((bins - 1) as f64).expect("df").cdf(statistic)
}

#[test]
fn a_single_masked_vector_is_indistinguishable_from_uniform() {
    // Chi-square on the top 8 bits of 2^16 masked words of an all-zero input (the most
    // structured input there is). Seeded, so deterministic; with a fresh seed a uniform
    // vector fails the 1e-6 threshold with probability 1e-6.
    let mut f = federation(4, 3, 2, 1 << 16, 32, 70);
    for input in f.inputs.values_mut() {
        input.iter_mut().for_each(|v| *v = 0);
    }
    let (_server, mut next, mut inboxes) = honest_through_shares(&mut f);
    let state = next.remove(&index(1)).expect("client 1");
    let (_, masked) =
        state.on_inbox(inboxes.remove(&index(1)).unwrap_or_default(), &f.inputs[&index(1)]).expect("mask");
    let p = uniformity_p_value(&masked.masked, 32);
    assert!(p > 1e-6, "masked vector is distinguishable from uniform (p = {p:e})");
    // And the test has power: the unmasked input is far from uniform.
    assert!(uniformity_p_value(&f.inputs[&index(1)], 32) < 1e-6);
}

#[test]
fn bad_messages_are_rejected_with_typed_errors_naming_the_sender() {
    let mut f = federation(4, 3, 2, 8, 32, 80);
    let mut server = f.server();
    let (one, two) = (index(1), index(2));
    let (_, keys_1) = client::start(f.config.clone(), one, &f.signing[&one], &mut f.rng).expect("start");

    // Another round's message.
    let mut stale = keys_1.clone();
    stale.binding = binding(99);
    assert_eq!(server.receive_keys(one, stale), Err(SecAggError::WrongRound { expected: 1, got: 99 }));
    // A forged sender: client 2 submits client 1's advertisement.
    assert!(matches!(
        server.receive_keys(two, keys_1.clone()),
        Err(SecAggError::Peer { who, fault: PeerMisbehaved::ForgedSender { .. } }) if who == two
    ));
    // A bad signature.
    let mut tampered = keys_1.clone();
    tampered.keys.signature[0] ^= 1;
    assert_eq!(
        server.receive_keys(one, tampered),
        Err(SecAggError::Peer { who: one, fault: PeerMisbehaved::BadSignature })
    );
    // A client outside the cohort.
    let stranger = index(9);
    let mut outside = keys_1.clone();
    outside.keys.sender = stranger;
    assert_eq!(
        server.receive_keys(stranger, outside),
        Err(SecAggError::Peer { who: stranger, fault: PeerMisbehaved::NotInCohort })
    );
    // The genuine message, then its replay.
    server.receive_keys(one, keys_1.clone()).expect("genuine");
    assert_eq!(
        server.receive_keys(one, keys_1),
        Err(SecAggError::Peer { who: one, fault: PeerMisbehaved::Duplicate })
    );
    // A message of a later phase arriving early (reordered).
    let early = MaskedInput { binding: binding(1), sender: one, masked: vec![0; 8], complaints: Vec::new() };
    assert!(matches!(
        server.receive_masked_input(one, early),
        Err(SecAggError::Peer { .. }) | Err(SecAggError::WrongPhase { .. })
    ));

    // A full honest run up to phase 2 to test lengths.
    let mut f = federation(4, 3, 2, 8, 16, 81);
    let mut server = f.server();
    let mut states = BTreeMap::new();
    for c in (1..=4).map(index) {
        let (s, msg) = client::start(f.config.clone(), c, &f.signing[&c], &mut f.rng).expect("start");
        server.receive_keys(c, msg).expect("keys");
        states.insert(c, s);
    }
    let roster = server.close_keys().expect("roster");
    // A roster with a duplicated entry is refused by clients.
    let mut doubled = roster.clone();
    doubled.push(roster[0].clone());
    let state = states.remove(&one).expect("client 1");
    let (probe, _) = client::start(f.config.clone(), one, &f.signing[&one], &mut f.rng).expect("start");
    assert!(matches!(
        probe.on_roster(doubled, &f.identities, &f.signing[&one], &mut f.rng),
        Err(SecAggError::Server(_))
    ));
    let (state, shares) =
        state.on_roster(roster.clone(), &f.identities, &f.signing[&one], &mut f.rng).expect("roster");
    server.receive_shares(one, shares.clone()).expect("shares");
    assert_eq!(
        server.receive_shares(one, shares),
        Err(SecAggError::Peer { who: one, fault: PeerMisbehaved::Duplicate })
    );
    for (c, s) in states {
        let (_, msg) =
            s.on_roster(roster.clone(), &f.identities, &f.signing[&c], &mut f.rng).expect("roster");
        server.receive_shares(c, msg).expect("shares");
    }
    let mut inboxes = server.close_shares().expect("inboxes");
    let (_, masked) =
        state.on_inbox(inboxes.remove(&one).unwrap_or_default(), &f.inputs[&one]).expect("mask");
    let mut short = masked.clone();
    short.masked.pop();
    assert_eq!(
        server.receive_masked_input(one, short),
        Err(SecAggError::Peer { who: one, fault: PeerMisbehaved::WrongLength { expected: 8, actual: 7 } })
    );
    let mut wide = masked.clone();
    wide.masked[0] = 1 << 20;
    assert_eq!(
        server.receive_masked_input(one, wide),
        Err(SecAggError::Peer { who: one, fault: PeerMisbehaved::OutOfRange { bit_width: 16 } })
    );
    server.receive_masked_input(one, masked.clone()).expect("genuine");
    assert_eq!(
        server.receive_masked_input(one, masked),
        Err(SecAggError::Peer { who: one, fault: PeerMisbehaved::Duplicate })
    );
}

#[test]
fn the_server_refuses_reveals_honest_clients_never_make() {
    // A malicious client (or a replay) offering a survivor's mask-key share is refused.
    let mut f = federation(5, 4, 3, 8, 32, 90);
    let (mut server, next, mut inboxes) = honest_through_shares(&mut f);
    let mut after = BTreeMap::new();
    for (c, s) in next {
        let (s, msg) = s.on_inbox(inboxes.remove(&c).unwrap_or_default(), &f.inputs[&c]).expect("mask");
        server.receive_masked_input(c, msg).expect("input");
        after.insert(c, s);
    }
    let survivors = server.close_inputs().expect("survivors");
    for (c, s) in after {
        let (_, msg) = s.on_survivors(survivors.clone(), &f.signing[&c]).expect("sign");
        server.receive_consistency(c, msg).expect("signature");
    }
    server.close_consistency().expect("signatures");
    let forbidden = Unmask {
        binding: binding(1),
        sender: index(1),
        self_mask_shares: vec![],
        mask_key_shares: vec![ShamirShare {
            owner: index(2),
            x: index(1),
            y: vec![0; shamir::LIMBS],
            salt: [0; 32],
        }],
    };
    assert_eq!(
        server.receive_unmask(index(1), forbidden),
        Err(SecAggError::Peer { who: index(1), fault: PeerMisbehaved::ForbiddenReveal })
    );
}

#[test]
fn neighbour_graph_limits_who_shares_with_whom() {
    let graph = NeighbourGraph::new(100, 20, 3);
    let total: usize = (1..=100).map(|i| graph.neighbours(index(i)).len()).sum();
    assert_eq!(total, 100 * 20, "each client has exactly k neighbours");
}

/// Bounded fuzzing on stable Rust, in every test run: 2,000 random tapes for each
/// SecAgg+ driver (the same drivers `cargo fuzz` runs for longer; see fuzz/README.md).
#[test]
fn state_machines_survive_random_adversaries() {
    let mut rng = ChaCha20Rng::seed_from_u64(2024);
    for _ in 0..2000 {
        let mut tape = vec![0u8; (rng.next_u32() % 64) as usize];
        rng.fill_bytes(&mut tape);
        guild_privacy::secagg::fuzzing::drive_client(&tape);
        guild_privacy::secagg::fuzzing::drive_server(&tape);
    }
}

/// #14.2: the coordinator no longer chooses the neighbour graph. Every client derives it
/// from the roster of signed key advertisements it verified, and the server from the same
/// roster: they agree (each client shares exactly with its roster-derived neighbours, which
/// the server accepts), and a coordinator that wants another graph has no number to set —
/// only the roster to change, which changes the seed unpredictably (keys are fresh each
/// round) and costs it the left-out clients.
#[test]
fn the_neighbour_graph_is_drawn_from_the_roster_not_chosen_by_the_coordinator() {
    use guild_privacy::secagg::graph::roster_seed;
    let mut f = federation(30, 10, 7, 16, 32, 21);
    let mut server = f.server();
    let mut states = BTreeMap::new();
    for c in (1..=30).map(index) {
        let (state, msg) = client::start(f.config.clone(), c, &f.signing[&c], &mut f.rng).expect("start");
        server.receive_keys(c, msg).expect("honest keys");
        states.insert(c, state);
    }
    assert!(server.neighbour_graph().is_none(), "no graph before the roster exists");
    let roster = server.close_keys().expect("roster");
    let by_index: BTreeMap<ClientIndex, SignedKeys> = roster.iter().map(|k| (k.sender, k.clone())).collect();
    let graph = NeighbourGraph::new(30, 10, roster_seed(&f.config.binding, &by_index));
    assert_eq!(server.neighbour_graph(), Some(&graph), "the server draws the roster's graph");
    for (c, state) in states {
        let (_, msg) = state
            .on_roster(roster.clone(), &f.identities, &f.signing[&c], &mut f.rng)
            .expect("honest roster");
        let recipients: BTreeSet<ClientIndex> = msg.shares.iter().map(|s| s.recipient).collect();
        let expected: BTreeSet<ClientIndex> = graph.neighbours(c).iter().copied().collect();
        assert_eq!(recipients, expected, "client {c} shares with its roster-derived neighbours");
        server.receive_shares(c, msg).expect("the server agrees on the graph");
    }
    // The seed depends on every advertisement and on the round: leaving one client out of
    // the roster, or another round, gives another graph.
    let mut fewer = by_index.clone();
    fewer.remove(&index(17));
    let seed = roster_seed(&f.config.binding, &by_index);
    assert_ne!(roster_seed(&f.config.binding, &fewer), seed);
    assert_ne!(roster_seed(&binding(2), &by_index), seed);
    let mut other_keys = by_index.clone();
    if let Some(k) = other_keys.get_mut(&index(3)) {
        k.mask_public_key[0] ^= 1;
    }
    assert_ne!(roster_seed(&f.config.binding, &other_keys), seed);
    assert_ne!(NeighbourGraph::new(30, 10, roster_seed(&f.config.binding, &fewer)), graph);
}

/// What malicious clients do in [`adversarial_round`] (#15.1).
#[derive(Default)]
struct Misbehaviour {
    /// (sender, recipient): the sender seals garbage for the recipient, under its own valid
    /// signature.
    garbage: Vec<(ClientIndex, ClientIndex)>,
    /// A holder that reveals a wrong value of its first self-mask share at Unmask.
    false_share: Option<ClientIndex>,
    /// Clients that stop before MaskedInput.
    drop_before_input: Vec<ClientIndex>,
}

struct AdversarialRound {
    result: Result<Vec<u32>, SecAggError>,
    survivors: Vec<ClientIndex>,
    complaints: Vec<(ClientIndex, ClientIndex)>,
    /// The server's refusals, in order.
    refused: Vec<SecAggError>,
}

fn adversarial_round(f: &mut Federation, bad: &Misbehaviour) -> AdversarialRound {
    let mut server = f.server();
    let mut refused = Vec::new();
    let clients: Vec<ClientIndex> = (1..=f.config.cohort_size).map(index).collect();
    let mut states = BTreeMap::new();
    for &c in &clients {
        let (state, msg) = client::start(f.config.clone(), c, &f.signing[&c], &mut f.rng).expect("start");
        server.receive_keys(c, msg).expect("keys");
        states.insert(c, state);
    }
    let roster = server.close_keys().expect("roster");
    let mut waiting = BTreeMap::new();
    for (c, state) in states {
        let (next, mut msg) =
            state.on_roster(roster.clone(), &f.identities, &f.signing[&c], &mut f.rng).expect("shares");
        for share in msg.shares.iter_mut().filter(|s| bad.garbage.contains(&(c, s.recipient))) {
            share.ciphertext.iter_mut().for_each(|b| *b ^= 0x5a);
            let payload = guild_privacy::secagg::signed::sealed_shares(&f.config.binding, share);
            share.signature = crypto::sign(&f.signing[&c], &payload);
        }
        server.receive_shares(c, msg).expect("validly signed shares are forwarded");
        waiting.insert(c, next);
    }
    let mut inboxes = server.close_shares().expect("inboxes");
    let mut masked = BTreeMap::new();
    for (c, state) in waiting {
        let inbox = inboxes.remove(&c).unwrap_or_default();
        let (next, msg) = state.on_inbox(inbox, &f.inputs[&c]).expect("an honest client goes on");
        if bad.drop_before_input.contains(&c) {
            continue;
        }
        server.receive_masked_input(c, msg).expect("input");
        masked.insert(c, next);
    }
    let survivors = server.close_inputs().expect("survivors");
    let complaints = server.complaints();
    let mut checked = BTreeMap::new();
    for (c, state) in masked {
        let (next, msg) = state.on_survivors(survivors.clone(), &f.signing[&c]).expect("signature");
        server.receive_consistency(c, msg).expect("signature");
        checked.insert(c, next);
    }
    let signatures = server.close_consistency().expect("signatures");
    for (c, state) in checked {
        let mut msg = state.on_signatures(signatures.clone(), &f.identities).expect("unmask");
        if bad.false_share == Some(c) {
            msg.self_mask_shares[0].y[0] ^= 1;
        }
        if let Err(error) = server.receive_unmask(c, msg) {
            refused.push(error);
        }
    }
    AdversarialRound { result: server.finish(), survivors, complaints, refused }
}

/// #15.1: a merchant that seals garbage for neighbours (under its own signature, so the
/// server forwarded it) no longer aborts their round: each complains, leaves out the
/// pairwise mask and reveals that one seed; the server removes the other half and gets the
/// exact sum, and the complaints name the sender. The same when the garbage sender then
/// drops out (its mask key is rebuilt from the shares it dealt the others). Up to k − t
/// neighbours can be left without its shares (here 7 − 5 = 2), as many as may drop out;
/// garbage for more leaves its self mask beyond reconstruction, and the round aborts
/// naming it (the coordinator then quarantines it, and the next round goes on without it).
#[test]
fn a_neighbour_that_seals_garbage_is_named_and_the_round_still_gives_the_exact_sum() {
    for drops in [false, true] {
        let mut f = federation(8, 7, 5, 64, 24, 41);
        let bad = Misbehaviour {
            garbage: vec![(index(8), index(2)), (index(8), index(5))],
            drop_before_input: if drops { vec![index(8)] } else { vec![] },
            ..Misbehaviour::default()
        };
        let round = adversarial_round(&mut f, &bad);
        assert_eq!(round.complaints, vec![(index(2), index(8)), (index(5), index(8))]);
        let expected_survivors: Vec<ClientIndex> = (1..=if drops { 7 } else { 8 }).map(index).collect();
        assert_eq!(round.survivors, expected_survivors);
        assert_eq!(round.result.expect("the round finishes"), f.expected_sum(&round.survivors));
        assert!(round.refused.is_empty());
    }
    let mut f = federation(8, 7, 5, 64, 24, 42);
    let garbage = [2, 5, 6].map(|i| (index(8), index(i))).to_vec();
    let round = adversarial_round(&mut f, &Misbehaviour { garbage, ..Misbehaviour::default() });
    assert_eq!(
        round.result,
        Err(SecAggError::Peer { who: index(8), fault: PeerMisbehaved::UndecryptableShares })
    );
}

/// #15.1: a holder that reveals a false share at Unmask is refused against the owner's
/// signed commitment and named; the others' shares reconstruct and the sum is exact.
#[test]
fn a_false_unmask_share_is_refused_its_holder_named_and_the_round_finishes() {
    let mut f = federation(8, 7, 5, 64, 24, 43);
    let bad = Misbehaviour { false_share: Some(index(3)), ..Misbehaviour::default() };
    let round = adversarial_round(&mut f, &bad);
    assert!(
        matches!(
            round.refused.as_slice(),
            [SecAggError::Peer { who, fault: PeerMisbehaved::ShareMismatch { .. } }] if *who == index(3)
        ),
        "{:?}",
        round.refused
    );
    assert_eq!(round.result.expect("seven honest holders are enough"), f.expected_sum(&round.survivors));
}

/// A server that alters a sealed share it forwards is caught by the sender's signature:
/// the recipient stops (it cannot tell which neighbour to blame otherwise), and a sender
/// that leaves a neighbour out of its shares is refused at ShareKeys and named.
#[test]
fn altered_forwarded_shares_stop_the_client_and_incomplete_shares_are_refused() {
    let mut f = federation(5, 4, 3, 8, 16, 44);
    let (mut server, mut waiting, mut inboxes) = honest_through_shares(&mut f);
    let one = index(1);
    let mut inbox = inboxes.remove(&one).expect("an inbox");
    inbox[0].ciphertext[0] ^= 1;
    let from = inbox[0].sender;
    let error =
        waiting.remove(&one).expect("client 1").on_inbox(inbox, &f.inputs[&one]).expect_err("altered");
    assert_eq!(error, SecAggError::Server(ServerMisbehaved::AlteredShares(from)));
    server.abort();

    let mut server = f.server();
    let mut states = BTreeMap::new();
    for c in (1..=5).map(index) {
        let (state, msg) = client::start(f.config.clone(), c, &f.signing[&c], &mut f.rng).expect("start");
        server.receive_keys(c, msg).expect("keys");
        states.insert(c, state);
    }
    let roster = server.close_keys().expect("roster");
    let state = states.remove(&one).expect("client 1");
    let (_, mut msg) = state.on_roster(roster, &f.identities, &f.signing[&one], &mut f.rng).expect("shares");
    let left_out = msg.shares.pop().expect("a share").recipient;
    assert_eq!(
        server.receive_shares(one, msg),
        Err(SecAggError::Peer { who: one, fault: PeerMisbehaved::IncompleteShares(left_out) })
    );
}
