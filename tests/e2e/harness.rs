//! The e2e harness: small in-process federations of lightweight merchants (random
//! updates of a fixed norm, no model), and waiting for their rounds.

use std::sync::Arc;
use std::time::Duration;

use guild_client::learner::{Learner, RandomLearner};
use guild_client::participant::{ClientLedger, Faults, Participant, ParticipantOptions, RoundOutcome};
use guild_coordinator::config::Config;
use guild_sim::federation::Federation;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tokio::task::JoinHandle;

/// A tiny adapter (d = 64) and short deadlines.
pub fn small(config: &mut Config) {
    config.adapter.layers = 1;
    config.adapter.hidden = 16;
    config.adapter.rank = 2;
    config.rounds.training.sampling_rate = 1.0;
    config.rounds.min_cohort = 3;
    config.rounds.threshold = 2;
    config.rounds.phase_deadlines_ms = [5_000, 3_000, 3_000, 3_000, 3_000];
    config.privacy.clip_norm = 1.0;
    config.rounds.training.noise_multiplier = 1.0;
    config.privacy.epsilon_budget = 1e6;
}

/// The shopper unit for the four-merchant federations: 160 shoppers across the federation
/// (each lightweight merchant has 40), each merchant sampling its own at q = 0.1 in training
/// rounds.
pub fn shopper_unit(config: &mut Config) {
    config.privacy.unit = guild_privacy::PrivacyUnit::Shopper;
    config.rounds.training.sampling_rate = 0.1;
    config.privacy.shoppers = 160;
}

/// An in-process federation of four small merchants, all needed for a round, that stops
/// after `max_rounds` committed rounds (0: never), with `more` applied to its config; not
/// started.
pub fn four_merchants_unstarted(
    dir: &std::path::Path,
    max_rounds: u64,
    more: impl FnOnce(&mut Config),
) -> Federation {
    Federation::init(dir, 4, |c| {
        small(c);
        c.rounds.min_cohort = 4;
        c.rounds.max_rounds = max_rounds;
        more(c);
    })
    .expect("init")
}

/// [`four_merchants_unstarted`], started.
pub async fn four_merchants(
    dir: &std::path::Path,
    max_rounds: u64,
    more: impl FnOnce(&mut Config),
) -> Federation {
    let mut federation = four_merchants_unstarted(dir, max_rounds, more);
    federation.start_in_process().await.expect("start");
    federation
}

/// Spawns merchant `i` (0-based) as a lightweight client that stops once it has taken part
/// in `committed` committed rounds (0: never; abort its task); returns that count. A round
/// that aborts (a deadline missed on a loaded machine) does not count: the client takes
/// part in the retry, as a merchant's daemon would.
pub async fn spawn_client(
    federation: &Federation,
    i: usize,
    faults: Faults,
    committed: u64,
) -> JoinHandle<anyhow::Result<u64>> {
    let learner = lightweight_learner(federation, i);
    // A lightweight merchant pins the unit its federation announces.
    let unit = federation.config.privacy.unit;
    let options = ParticipantOptions { faults, max_rounds: committed, unit, ..options(i) };
    spawn_participant(federation, i, Box::new(learner), options).await
}

/// Merchant `i`'s lightweight learner: seeded random updates of norm 0.5 over the
/// federation's adapter, as if from 40 shoppers.
pub fn lightweight_learner(federation: &Federation, i: usize) -> RandomLearner {
    let manifest = federation.config.manifest().expect("manifest");
    RandomLearner { manifest, norm: 0.5, rng: ChaCha20Rng::seed_from_u64(i as u64), shoppers: 40 }
}

/// The values of adapter `version` in `store`, an adapter of `d` values.
pub fn adapter_values(store: &guild_coordinator::store::Store, d: usize, version: u64) -> Vec<f32> {
    guild_proto::adapter::from_bytes(&store.adapter(version).expect("version").data, d).expect("values")
}

/// A lightweight merchant's options: quick polls and reconnections, and no ε cap of its own.
pub fn options(i: usize) -> ParticipantOptions {
    ParticipantOptions {
        display_name: format!("Shop {i}"),
        max_rounds: 0,
        poll: Duration::from_secs(2),
        max_backoff: Duration::from_millis(500),
        // These tests are about the coordinator's rounds and ledger; a merchant's own ε cap
        // (which would stop these clients after two rounds of z = 1) is tested in
        // `guild_client::participant` and by `a_merchant_stops_at_its_own_epsilon_cap`.
        max_epsilon: f64::INFINITY,
        ..Default::default()
    }
}

/// Spawns merchant `i` with `learner` and `options` (its `max_rounds` committed rounds);
/// returns how many committed rounds it took part in.
pub async fn spawn_participant(
    federation: &Federation,
    i: usize,
    learner: Box<dyn Learner>,
    options: ParticipantOptions,
) -> JoinHandle<anyhow::Result<u64>> {
    let connection = federation.connect(i).await.expect("connect");
    let mut participant = Participant::new(
        connection,
        Arc::new(federation.identity(i).expect("identity")),
        learner,
        options,
        ClientLedger::in_memory(),
    );
    tokio::spawn(async move {
        let mut taken = 0u64;
        participant
            .run(|result| {
                if matches!(result, Ok(r) if r.outcome == RoundOutcome::Committed) {
                    taken += 1;
                }
            })
            .await?;
        Ok(taken)
    })
}

/// Waits until the store holds `rounds` completed rounds.
/// The eight merchants of [`eight_merchants`] as lightweight clients, merchant `i` with
/// the faults and the number of committed rounds after which it stops of `each(i)`.
pub async fn spawn_eight(
    federation: &Federation,
    each: impl Fn(usize) -> (Faults, u64),
) -> Vec<JoinHandle<anyhow::Result<u64>>> {
    let mut clients = Vec::new();
    for i in 0..8 {
        let (faults, committed) = each(i);
        clients.push(spawn_client(federation, i, faults, committed).await);
    }
    clients
}

pub async fn wait_for_rounds(federation: &Federation, rounds: u64, limit: Duration) {
    let store = federation.store().expect("store");
    let started = std::time::Instant::now();
    while store.round_counts().expect("counts").completed < rounds {
        assert!(
            started.elapsed() < limit,
            "{rounds} rounds did not complete in {limit:?}: {:?}; the last aborts, newest first: {:?}",
            store.round_counts(),
            store.recent_aborts(5)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `n` fault-free clients for `rounds` rounds and checks that each took part in every
/// one of them.
pub async fn every_client_in_every_round(federation: &Federation, n: usize, rounds: u64) {
    let clients: Vec<_> = futures_join(federation, n, Faults::default(), rounds).await;
    each_took_part_in(federation, clients, rounds).await;
}

/// Waits for `rounds` completed rounds, then for each client to stop, and checks that each
/// took part in all of them.
pub async fn each_took_part_in(
    federation: &Federation,
    clients: Vec<JoinHandle<anyhow::Result<u64>>>,
    rounds: u64,
) {
    wait_for_rounds(federation, rounds, Duration::from_secs(60)).await;
    for committed in committed_by(clients).await {
        assert_eq!(committed, rounds, "every client took part in every round");
    }
}

/// Waits for each of `clients` to stop (30 s each) and returns how many committed rounds
/// each took part in.
pub async fn committed_by(clients: Vec<JoinHandle<anyhow::Result<u64>>>) -> Vec<u64> {
    let mut counts = Vec::with_capacity(clients.len());
    for client in clients {
        let committed = tokio::time::timeout(Duration::from_secs(30), client)
            .await
            .expect("client stops")
            .expect("join")
            .expect("client ran");
        counts.push(committed);
    }
    counts
}

/// Spawns `n` lightweight clients.
pub async fn futures_join(
    federation: &Federation,
    n: usize,
    faults: Faults,
    max_rounds: u64,
) -> Vec<JoinHandle<anyhow::Result<u64>>> {
    let mut clients = Vec::new();
    for i in 0..n {
        clients.push(spawn_client(federation, i, faults.clone(), max_rounds).await);
    }
    clients
}

/// Eight merchants in a complete graph: seven share holders each, threshold ⌊2·7/3⌋ + 1 = 5,
/// so each merchant's secrets survive two holders without its shares.
pub async fn eight_merchants(dir: &std::path::Path, max_rounds: u64, min_cohort: u32) -> Federation {
    let mut federation = Federation::init(dir, 8, |c| {
        small(c);
        c.rounds.min_cohort = min_cohort;
        c.rounds.max_rounds = max_rounds;
    })
    .expect("init");
    federation.start_in_process().await.expect("start");
    federation
}
