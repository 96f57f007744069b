//! Full rounds over loopback mutual TLS with lightweight clients (random updates, no
//! model): the round engine, SecAgg+, DDGauss, the ledger and the store together.

use std::sync::Arc;
use std::time::Duration;

use guild_client::learner::RandomLearner;
use guild_client::participant::{ClientLedger, Faults, Participant, ParticipantOptions};
use guild_coordinator::config::Config;
use guild_privacy::ledger::{Budget, Ledger, LedgerEntry, PrivacyEvent};
use guild_privacy::secagg::Phase;
use guild_sim::federation::Federation;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::harness::{
    adapter_values, committed_by, each_took_part_in, eight_merchants, every_client_in_every_round,
    four_merchants, four_merchants_unstarted, futures_join, lightweight_learner, options, shopper_unit,
    small, spawn_client, spawn_eight, spawn_participant, wait_for_rounds,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_commit_adapters_and_ledger_entries_that_match_the_accountant() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().expect("tempdir");
    // Raw steps: the random updates are noise to the gated shrinkage, which would leave the
    // adapter exactly where it was (as it should), and this test checks that rounds commit.
    let federation = four_merchants(dir.path(), 3, raw_steps).await;
    every_client_in_every_round(&federation, 4, 3).await;
    let store = federation.store().expect("store");
    assert_eq!(store.latest_adapter().expect("latest").map(|a| a.version), Some(3));
    assert_ne!(store.adapter(3).expect("v3").data, store.adapter(0).expect("v0").data, "the adapter moved");
    // ε is recomputed from the stored ledger with the privacy crate's accountant and
    // equals what the coordinator reports.
    let entries: Vec<LedgerEntry> = store.ledger().expect("ledger");
    assert_eq!(entries.len(), 3);
    assert!(entries.iter().all(
        |e| matches!(e.event, PrivacyEvent::ZeroOutSampledZcdp { sampling_rate, .. } if sampling_rate == 1.0)
    ));
    let spent = Ledger::new(Budget { epsilon: 1e6, delta: 1e-5 }, entries)
        .expect("ledger")
        .spent(guild_privacy::PrivacyUnit::Merchant)
        .expect("spent");
    let status = federation.in_process().expect("running").core.status().expect("status");
    assert!(
        (status.epsilon_spent - spent.epsilon).abs() <= 1e-9 * spent.epsilon,
        "{} vs {}",
        status.epsilon_spent,
        spent.epsilon
    );
    assert_eq!(status.rounds_completed, 3);
    // Every merchant is in every round here (q = 1): nothing is amplified, so the bound
    // against the coordinator is the model-level figure itself.
    let engine = federation.in_process().expect("running").core.engine().status();
    assert!(
        (engine.epsilon_against_coordinator_bound - spent.epsilon).abs() <= 1e-9 * spent.epsilon,
        "{} vs {}",
        engine.epsilon_against_coordinator_bound,
        spent.epsilon
    );
    // The metrics endpoint reports the same rounds and both ε figures.
    let metrics = federation.in_process().expect("running").core.engine().metrics.encode();
    assert!(metrics.contains("guild_rounds_completed_total 3"), "{metrics}");
    assert!(metrics.contains("guild_epsilon_against_coordinator_bound "), "{metrics}");
}

/// The shopper unit end to end: every merchant in every round, each sampling its own 40
/// shoppers at q = 0.1 and encoding each sampled shopper's update on its own; the rounds
/// commit, the ledger charges them to the shopper unit at the shoppers' rate (not the
/// merchants'), and status and metrics report the shopper-level ε with the merchant-level
/// one untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shopper_unit_rounds_commit_and_charge_the_shoppers_rate() {
    use guild_privacy::PrivacyUnit;
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = four_merchants(dir.path(), 2, |c| {
        shopper_unit(c);
        raw_steps(c);
    })
    .await;
    every_client_in_every_round(&federation, 4, 2).await;
    let store = federation.store().expect("store");
    let entries: Vec<LedgerEntry> = store.ledger().expect("ledger");
    assert_eq!(entries.len(), 2);
    assert!(entries.iter().all(|e| e.unit == PrivacyUnit::Shopper
        && matches!(e.event, PrivacyEvent::SubsampledZcdp { sampling_rate, .. } if sampling_rate == 0.1)));
    let ledger = Ledger::new(Budget { epsilon: 1e6, delta: 1e-5 }, entries).expect("ledger");
    let shopper = ledger.spent(PrivacyUnit::Shopper).expect("spent").epsilon;
    let engine = federation.in_process().expect("running").core.engine().status();
    assert!(shopper > 0.0 && (engine.shopper_epsilon_spent - shopper).abs() <= 1e-9 * shopper);
    assert_eq!(engine.epsilon_spent, 0.0, "no merchant-level round ran");
    let metrics = federation.in_process().expect("running").core.engine().metrics.encode();
    assert!(metrics.contains("guild_shopper_epsilon_spent "), "{metrics}");
    assert_ne!(store.adapter(2).expect("v2").data, store.adapter(0).expect("v0").data, "the adapter moved");
}

/// A popularity release (`[rounds.popularity_release]`) end to end: the federation's first
/// version comes from a round in which every merchant samples every shopper (q = 1, above
/// the clients' cap of 0.1 on training rounds, which a release is exempt from), at its own
/// noise multiplier; the coordinator moves the histogram's coordinates only (everything
/// else in that sum is noise), and charges the shopper unit at the release's rate and
/// noise. The next round trains as usual, at the training rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_popularity_release_moves_only_the_histogram_and_is_charged_at_its_own_rate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = tower_with_one_release(dir.path(), 2, |c| {
        shopper_unit(c);
    })
    .await;
    let entries = run_and_check_a_release_then_training(&federation).await;
    let ((release_rate, release_rho), (training_rate, training_rho)) =
        (shopper_event(&entries[0]), shopper_event(&entries[1]));
    assert_eq!(release_rate, 1.0, "the release samples every shopper");
    assert_eq!(training_rate, 0.1, "training samples at the training rate");
    assert!(release_rho < training_rho / 5.0, "z = 3 against z = 1: ρ ∝ 1/z²");
}

/// The same release with the merchant as the unit (the coordinator samples merchants at
/// `rounds.popularity_release.sampling_rate`, 1 here): whatever the lightweight clients send, the
/// coordinator moves only the histogram with it, and charges the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_unit_popularity_release_moves_only_the_histogram() {
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = tower_with_one_release(dir.path(), 2, |_| {}).await;
    run_and_check_a_release_then_training(&federation).await;
}

/// A partitioned release (`rounds.popularity_release.partition`, no noise) end to end: two
/// releases over ten merchants take two disjoint parts of five, so every merchant's
/// statistics are summed exactly once. Each merchant leaves after its first committed
/// round, so the second release can take all five that are left only if its cohort is the
/// part the first did not take. Sampled instead, it fails: at q = 1 (the partition ignored)
/// the first round takes all ten and the second never commits; at q = 1/2 the second
/// commits without some of the five left (who then never stop) unless its draw holds all
/// of them, about 7% of the time. Nothing moves but the statistics, and nothing is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_release_sums_each_merchant_once_in_disjoint_parts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut federation = Federation::init(dir.path(), 10, |c| {
        small(c);
        c.adapter.family = guild_proto::domain::AdapterFamilyName::SequenceTower;
        c.adapter.tower = guild_proto::tower::TowerShape::tiny(16);
        c.privacy.mode = guild_privacy::PrivacyMode::DangerousNone;
        c.rounds.min_cohort = 5;
        c.rounds.threshold = 4;
        c.rounds.max_rounds = 2;
        c.rounds.popularity_release.rounds = 2;
        c.rounds.popularity_release.partition = true;
    })
    .expect("init");
    federation.start_in_process().await.expect("start");
    let mut clients = Vec::new();
    for i in 0..10 {
        let learner = lightweight_learner(&federation, i);
        // A federation without noise: each merchant must say it sends unnoised updates.
        let options =
            ParticipantOptions { dangerous_send_unnoised_updates: true, max_rounds: 1, ..options(i) };
        clients.push(spawn_participant(&federation, i, Box::new(learner), options).await);
    }
    wait_for_rounds(&federation, 2, Duration::from_secs(90)).await;
    assert_eq!(committed_by(clients).await, vec![1; 10], "each merchant is in exactly one release");
    let store = federation.store().expect("store");
    assert!(store.ledger().expect("ledger").is_empty(), "releases without noise are not charged");
    let manifest = federation.config.manifest().expect("manifest");
    let range = manifest.accumulated_range().expect("statistics");
    let d = manifest.parameter_count();
    let version = |v: u64| adapter_values(&store, d, v);
    let (v0, v1, v2) = (version(0), version(1), version(2));
    for (before, after) in [(&v0, &v1), (&v1, &v2)] {
        assert!(unchanged_outside(&range, before, after), "a release moves the statistics alone");
        assert_ne!(&before[range.clone()], &after[range.clone()], "each release moved the statistics");
    }
}

/// The pooling selection end to end, between a release and a training round: version 2
/// keeps the histogram and every trained value of version 1 and holds one of the public
/// grid's settings of pooling and prior weight (whatever the lightweight clients send, the
/// coordinator writes nothing else), charged to the shopper unit at the release's rate and
/// the selection's own noise; version 3 trains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooling_selection_sets_only_the_pooling_and_prior_weight_to_a_grid_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shape = guild_proto::tower::TowerShape::tiny(16);
    let federation = tower_with_one_release(dir.path(), 3, |c| {
        c.rounds.pooling_selection.rounds = 1;
        c.rounds.pooling_selection.noise_multiplier = 20.0;
        shopper_unit(c);
    })
    .await;
    every_client_in_every_round(&federation, 4, 3).await;
    let store = federation.store().expect("store");
    let entries: Vec<LedgerEntry> = store.ledger().expect("ledger");
    assert_eq!(entries.len(), 3, "release, selection and training are all charged");
    let ((release_rate, release_rho), (selection_rate, selection_rho)) =
        (shopper_event(&entries[0]), shopper_event(&entries[1]));
    assert_eq!((release_rate, selection_rate), (1.0, 1.0), "both sample every shopper");
    assert!(selection_rho < release_rho / 20.0, "z = 20 against z = 3: ρ ∝ 1/z²");
    let manifest = federation.config.manifest().expect("manifest");
    let (recency, weight) = manifest.selection_ranges().expect("a tower with a prior");
    let d = manifest.parameter_count();
    let version = |v: u64| adapter_values(&store, d, v);
    let (v1, v2, v3) = (version(1), version(2), version(3));
    let selected = |i: usize| recency.contains(&i) || i == weight;
    let outside = |a: &[f32], b: &[f32]| a.iter().zip(b).enumerate().all(|(i, (x, y))| selected(i) || x == y);
    assert!(outside(&v1, &v2), "the selection changed nothing but the pooling and the prior weight");
    assert!(guild_proto::tower::setting_of(&shape, &v2).is_some(), "version 2 holds a setting of the grid");
    assert!(guild_proto::tower::setting_of(&shape, &v1).is_some(), "the start is a setting too");
    assert!(!outside(&v2, &v3), "the round after it trained");
}

/// Training rounds of the pooling part (shopper unit, one gradient each) commit versions
/// that differ from the one before only in the pooling weights and the prior weight: the
/// coordinator drops the rest of the noisy sum and leaves the histogram to the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_the_pooling_part_moves_only_the_pooling_and_prior_weight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = tower_with_one_release(dir.path(), 3, |c| {
        c.rounds.trained = guild_proto::round::TrainedPart::Pooling;
        c.rounds.local_steps = 1;
        shopper_unit(c);
    })
    .await;
    // The lightweight clients send random values at every coordinate: whatever reaches the
    // sum outside the part must not reach the model.
    every_client_in_every_round(&federation, 4, 3).await;
    let store = federation.store().expect("store");
    let manifest = federation.config.manifest().expect("manifest");
    let (recency, weight) = manifest.selection_ranges().expect("a tower with a prior");
    let d = manifest.parameter_count();
    let version = |v: u64| adapter_values(&store, d, v);
    let part = |i: usize| recency.contains(&i) || i == weight;
    for (before, after) in [(1, 2), (2, 3)] {
        let (a, b) = (version(before), version(after));
        let moved: Vec<usize> = (0..d).filter(|&i| a[i] != b[i]).collect();
        assert!(moved.iter().all(|&i| part(i)), "version {after} moved values outside the part: {moved:?}");
        assert!(!moved.is_empty(), "version {after} trained the part");
    }
    let entries: Vec<LedgerEntry> = store.ledger().expect("ledger");
    assert_eq!(entries.len(), 3, "the release and both training rounds are charged");
}

/// Training rounds of the weights (`rounds.trained = "weights"`) after a release commit
/// versions that keep the statistics exactly as the release left them: the clients' rounds
/// carry the weights alone, and the coordinator adds nothing to the histogram or the counts
/// (trained whole, each round would add the cohort's statistics again). Every other
/// trained value moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_the_weights_leaves_the_statistics_to_the_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = tower_with_one_release(dir.path(), 3, |c| {
        c.rounds.trained = guild_proto::round::TrainedPart::Weights
    })
    .await;
    // The lightweight clients send random values at every coordinate, the statistics too.
    every_client_in_every_round(&federation, 4, 3).await;
    let store = federation.store().expect("store");
    let manifest = federation.config.manifest().expect("manifest");
    let statistics = manifest.accumulated_range().expect("statistics");
    let d = manifest.parameter_count();
    let version = |v: u64| adapter_values(&store, d, v);
    assert_ne!(&version(0)[statistics.clone()], &version(1)[statistics.clone()], "the release moved them");
    for (before, after) in [(1, 2), (2, 3)] {
        let (a, b) = (version(before), version(after));
        assert_eq!(&a[statistics.clone()], &b[statistics.clone()], "version {after} moved the statistics");
        let moved = (0..d).filter(|&i| !statistics.contains(&i) && a[i] != b[i]).count();
        assert!(moved > (d - statistics.len()) / 2, "version {after} trained the weights: {moved} moved");
    }
}

/// The server applies the raw noisy sum of a training round: the lightweight clients send
/// updates in random directions, which the default James–Stein shrinkage rightly takes for
/// noise (the adapter would stay where it was), and these tests are about the rounds' flow.
/// The planner then refuses the rounds' noise (as much as the clip norm), which these
/// federations accept on purpose.
fn raw_steps(c: &mut Config) {
    c.rounds.shrinkage = guild_coordinator::config::Shrinkage::None;
    c.privacy.dangerous_allow_noise_above_clip = true;
}

/// Four merchants on the tiny tower (its item vectors are `small`'s hidden size, 16),
/// `rounds` rounds, the first a popularity release at z = 3; `more` adjusts the rest.
async fn tower_with_one_release(
    dir: &std::path::Path,
    rounds: u64,
    more: impl FnOnce(&mut Config),
) -> Federation {
    four_merchants(dir, rounds, |c| {
        c.adapter.family = guild_proto::domain::AdapterFamilyName::SequenceTower;
        c.adapter.tower = guild_proto::tower::TowerShape::tiny(16);
        c.rounds.popularity_release.rounds = 1;
        c.rounds.popularity_release.noise_multiplier = 3.0;
        raw_steps(c);
        more(c);
    })
    .await
}

/// A shopper-unit ledger event's sampling rate and ρ (a panic for any other event).
fn shopper_event(e: &LedgerEntry) -> (f64, f64) {
    match e.event {
        PrivacyEvent::SubsampledZcdp { sampling_rate, rho } => (sampling_rate, rho),
        other => panic!("not a shopper-unit event: {other:?}"),
    }
}

/// Runs `federation`'s two rounds with every client, then checks that both were charged,
/// that version 1 (the popularity release) differs from version 0 in the histogram alone,
/// and that version 2 (training) moves more than the histogram; returns the ledger.
async fn run_and_check_a_release_then_training(federation: &Federation) -> Vec<LedgerEntry> {
    every_client_in_every_round(federation, 4, 2).await;
    let store = federation.store().expect("store");
    let entries: Vec<LedgerEntry> = store.ledger().expect("ledger");
    assert_eq!(entries.len(), 2, "the release and the training round are both charged");
    let manifest = federation.config.manifest().expect("manifest");
    let range = manifest.accumulated_range().expect("a histogram");
    let d = manifest.parameter_count();
    let version = |v: u64| adapter_values(&store, d, v);
    let (v0, v1, v2) = (version(0), version(1), version(2));
    assert!(unchanged_outside(&range, &v0, &v1), "the release changed nothing but the histogram");
    assert_ne!(&v0[range.clone()], &v1[range.clone()], "the release moved the histogram");
    assert!(!unchanged_outside(&range, &v1, &v2), "the training round after it trained");
    entries
}

/// Whether `a` and `b` hold the same values everywhere outside `range`.
fn unchanged_outside(range: &std::ops::Range<usize>, a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).enumerate().filter(|(i, _)| !range.contains(i)).all(|(_, (x, y))| x == y)
}

/// #15.2: a hostile merchant sends uniform ring elements instead of its clipped, encoded
/// update. SecAgg+ hides who did it, but the decoded sum's norm is far above what clipped
/// updates and the noise reach: the coordinator discards the sum (no adapter is committed
/// from it, the round's ledger charge stands), counts it, and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_sum_is_rejected_and_nothing_is_committed_from_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = four_merchants(dir.path(), 1, |_| {}).await;
    let mut clients = Vec::new();
    for i in 0..4 {
        let faults = Faults { poison_update: i == 2, ..Faults::default() };
        clients.push(spawn_client(&federation, i, faults, 0).await);
    }
    let store = federation.store().expect("store");
    let core = &federation.in_process().expect("running").core;
    let started = std::time::Instant::now();
    while !core.engine().metrics.encode().contains("guild_rounds_poisoned_total 1") {
        assert!(started.elapsed() < Duration::from_secs(60), "{:?}", store.round_counts());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for client in clients {
        client.abort();
    }
    // Every round carries the poisoned update, so none commits; each that reached Unmask
    // (the poisoned one, at least) keeps its charge.
    assert_eq!(store.round_counts().expect("counts").completed, 0);
    assert_eq!(store.latest_adapter().expect("latest").map(|a| a.version), Some(0), "nothing committed");
    assert!(!store.ledger().expect("ledger").is_empty(), "the round reached Unmask: its charge stands");
    let outcomes = core.engine().recent_outcomes();
    assert!(
        outcomes.iter().any(|(_, o)| matches!(o, guild_coordinator::engine::Outcome::Aborted { reason }
            if reason.contains("decoded sum has L2 norm"))),
        "{outcomes:?}"
    );
}

/// A random learner whose local evaluation finds something (ten validation shoppers, three
/// hits): what a merchant would report if it opted in.
struct EvaluatingLearner(RandomLearner);

impl guild_client::learner::Learner for EvaluatingLearner {
    fn manifest(&self) -> guild_proto::domain::AdapterManifest {
        self.0.manifest()
    }

    fn train(
        &mut self,
        round: guild_client::learner::RoundInput<'_>,
        each: &mut guild_client::learner::Each<'_>,
    ) -> anyhow::Result<()> {
        self.0.train(round, each)
    }

    fn evaluate(&mut self, _: &[f32]) -> anyhow::Result<Option<guild_client::retrieval::RankingCounts>> {
        Ok(Some(guild_client::retrieval::RankingCounts {
            users: 10,
            hits_at_10: 3,
            ndcg_at_10_sum: 1.5,
            reciprocal_rank_sum: 1.2,
            cross_entropy_sum: 80.0,
        }))
    }
}

/// #14.8: per-merchant evaluation counts are un-noised, so they reach the coordinator only
/// from a merchant that set `dangerous_report_unnoised_metrics`; the others evaluate
/// locally and send nothing but their masked updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluation_counts_reach_the_coordinator_only_from_a_merchant_that_opts_in() {
    use guild_client::learner::Learner as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = four_merchants(dir.path(), 1, |_| {}).await;
    let manifest = federation.config.manifest().expect("manifest");
    let mut handles = Vec::new();
    for i in 0..4 {
        let learner = EvaluatingLearner(RandomLearner {
            manifest: manifest.clone(),
            norm: 0.5,
            rng: ChaCha20Rng::seed_from_u64(i as u64),
            shoppers: 0,
        });
        assert!(learner.manifest() == manifest);
        let options =
            ParticipantOptions { dangerous_report_unnoised_metrics: i == 3, max_rounds: 1, ..options(i) };
        handles.push(spawn_participant(&federation, i, Box::new(learner), options).await);
    }
    each_took_part_in(&federation, handles, 1).await;
    let evaluations = federation.store().expect("store").evaluations().expect("evaluations");
    assert_eq!(evaluations.len(), 1, "{evaluations:?}");
    assert_eq!(
        (evaluations[0].adapter_version, evaluations[0].users),
        (1, 10),
        "one merchant's counts, not four"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_survive_dropouts_and_abort_cleanly_below_threshold() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Ten clients: nine share holders each, so the round's threshold is the active-security
    // bound ⌊2·9/3⌋ + 1 = 7, which tolerates the two dropouts below.
    let mut federation = Federation::init(dir.path(), 10, |c| {
        small(c);
        c.rounds.threshold = 3;
        c.rounds.min_cohort = 8;
        c.rounds.phase_deadlines_ms = [3_000, 1_000, 1_000, 1_000, 1_000];
    })
    .expect("init");
    federation.start_in_process().await.expect("start");
    // Eight reliable clients and two that drop before MaskedInput and ConsistencyCheck.
    let mut clients = futures_join(&federation, 8, Faults::default(), 0).await;
    for i in 8..10 {
        let mut drop = [0.0; 5];
        drop[i - 6] = 1.0;
        clients.push(spawn_client(&federation, i, Faults { drop, ..Default::default() }, 0).await);
    }
    wait_for_rounds(&federation, 2, Duration::from_secs(60)).await;
    let store = federation.store().expect("store");
    let metrics = federation.in_process().expect("running").core.engine().metrics.encode();
    assert!(metrics.contains("guild_dropouts_total{phase=\"MaskedInput\"}"), "{metrics}");
    for c in &clients {
        c.abort();
    }
    // Each completed round has exactly one adapter version and one ledger entry.
    let counts = store.round_counts().expect("counts");
    assert_eq!(store.ledger().expect("ledger").len() as u64, counts.completed);
    assert_eq!(store.adapter_count().expect("adapters"), counts.completed + 1);
}

/// Two merchants vanish every round, before ShareKeys and before MaskedInput, and the
/// phases' deadlines are a minute: with `rounds.early_close` each phase closes once eight
/// in ten have answered and the rest had their grace, so two rounds commit in far less than
/// the two minutes a single round would wait out without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phases_close_early_once_a_quorum_answered_and_the_vanished_cost_no_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut federation = Federation::init(dir.path(), 10, |c| {
        small(c);
        c.rounds.threshold = 3;
        c.rounds.min_cohort = 8;
        c.rounds.phase_deadlines_ms = [10_000, 60_000, 60_000, 60_000, 60_000];
        c.rounds.early_close =
            Some(guild_coordinator::config::EarlyClose { quorum: 0.8, grace_factor: 1.0, min_grace_ms: 300 });
    })
    .expect("init");
    federation.start_in_process().await.expect("start");
    let mut clients = futures_join(&federation, 8, Faults::default(), 0).await;
    for (i, phase) in [(8, Phase::ShareKeys), (9, Phase::MaskedInput)] {
        let mut drop = [0.0; 5];
        drop[phase.index()] = 1.0;
        clients.push(spawn_client(&federation, i, Faults { drop, ..Default::default() }, 0).await);
    }
    wait_for_rounds(&federation, 2, Duration::from_secs(60)).await;
    let metrics = federation.in_process().expect("running").core.engine().metrics.encode();
    for phase in ["ShareKeys", "MaskedInput"] {
        assert!(metrics.contains(&format!("guild_dropouts_total{{phase=\"{phase}\"}}")), "{metrics}");
    }
    for c in &clients {
        c.abort();
    }
    let store = federation.store().expect("store");
    let counts = store.round_counts().expect("counts");
    assert_eq!(store.ledger().expect("ledger").len() as u64, counts.completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_refuses_the_round_that_would_cross_it_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The cap sits halfway between what two and three rounds of this mechanism cost (four
    // clients: three share holders each, so the threshold is raised to 3), computed with the
    // coordinator's own cost function: it admits exactly two.
    let mut federation = four_merchants_unstarted(dir.path(), 0, |_| {});
    let config = &federation.config;
    let manifest = config.manifest().expect("manifest");
    let round = config.round_privacy(guild_proto::round::RoundKind::Training, 4, &manifest);
    assert_eq!(round.dimension, manifest.parameter_count(), "a training round sums the whole adapter");
    assert_eq!(
        round.min_survivors,
        guild_privacy::secagg::min_active_threshold(3).max(config.rounds.threshold)
    );
    assert_eq!(round.max_summands, 4);
    let delta = config.privacy.delta;
    let (two, three) = (round.epsilon_after(2, delta).expect("ε"), round.epsilon_after(3, delta).expect("ε"));
    let cap = (two + three) / 2.0;
    federation.config.privacy.epsilon_budget = cap;
    std::fs::write(federation.config_path(), toml::to_string(&federation.config).expect("toml"))
        .expect("write");
    federation.start_in_process().await.expect("start");
    let clients = futures_join(&federation, 4, Faults::default(), 0).await;
    wait_for_rounds(&federation, 2, Duration::from_secs(60)).await;
    let core = federation.in_process().expect("running").core.clone();
    let started = std::time::Instant::now();
    loop {
        let status = core.status().expect("status");
        if status.current_phase.contains("privacy budget exhausted") {
            assert!(status.epsilon_spent <= cap, "{} > {cap}", status.epsilon_spent);
            assert!((status.epsilon_spent - two).abs() < 1e-9 * two, "{} ≠ {two}", status.epsilon_spent);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no refusal: {}", status.current_phase);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let store = federation.store().expect("store");
    assert_eq!(store.round_counts().expect("counts").completed, 2, "no third round ran");
    assert_eq!(store.ledger().expect("ledger").len(), 2);
    // Still serving: a client can ask for status, and is told to wait.
    let mut connection = federation.connect(0).await.expect("connect");
    let status = connection.status().await.expect("status over gRPC");
    assert!(status.current_phase.contains("privacy budget exhausted"), "{}", status.current_phase);
    let metrics = core.engine().metrics.encode();
    assert!(metrics.contains("guild_rounds_refused_total 1"), "{metrics}");
    for c in clients {
        c.abort();
    }
}

/// A merchant's own ε cap (against the coordinator: its participations, no amplification)
/// stops it after the rounds it allows, its durable ledger records exactly those, and a
/// restarted client reads them back and still refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_stops_at_its_own_epsilon_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = four_merchants(dir.path(), 0, |_| {}).await;
    let task_rho = |participant_ledger: &ClientLedger| participant_ledger.rho();
    let mut handles = Vec::new();
    let ledgers: Vec<std::path::PathBuf> =
        (0..4).map(|i| dir.path().join(format!("shop-{i}.ledger"))).collect();
    // One round of this federation costs ρ ≈ 1 (z = 1, three share holders, t = 3, one
    // colluder tolerated: each client adds σ²/2 and one honest other share is counted):
    // ε(δ = 1e-6) ≈ 8.4 after one round and ≈ 12.5 after two; a cap of 9 allows one.
    for (i, path) in ledgers.iter().enumerate() {
        let connection = federation.connect(i).await.expect("connect");
        let learner = lightweight_learner(&federation, i);
        let options = ParticipantOptions {
            display_name: format!("Shop {i}"),
            poll: Duration::from_secs(1),
            max_backoff: Duration::from_millis(500),
            max_epsilon: 9.0,
            delta: 1e-6,
            ..Default::default()
        };
        let ledger = ClientLedger::open(path).expect("ledger");
        let mut participant = Participant::new(
            connection,
            Arc::new(federation.identity(i).expect("identity")),
            Box::new(learner),
            options,
            ledger,
        );
        handles.push(tokio::spawn(async move {
            let mut refusals = 0u32;
            participant
                .run(|result| {
                    if let Err(e) = result
                        && e.to_string().contains("past its cap of 9")
                    {
                        refusals += 1;
                    }
                })
                .await
                .ok();
            refusals
        }));
    }
    wait_for_rounds(&federation, 1, Duration::from_secs(60)).await;
    // The next round is offered and refused by every merchant: it never completes.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let store = federation.store().expect("store");
    assert_eq!(store.round_counts().expect("counts").completed, 1, "no merchant joined a second round");
    for handle in &handles {
        handle.abort();
    }
    for path in &ledgers {
        let ledger = ClientLedger::open(path).expect("reopen");
        assert_eq!(ledger.participations().len(), 1, "{}", path.display());
        let rho = task_rho(&ledger);
        assert!(rho > 0.95 && rho < 1.1, "ρ = {rho}");
        let next = guild_client::participant::Participation::merchant("f".into(), 99, rho);
        assert!(ledger.epsilon(guild_privacy::PrivacyUnit::Merchant, 1e-6) <= 9.0);
        assert!(ledger.epsilon_if(&next, 1e-6) > 9.0);
    }
    let coordinator_ledger = store.ledger().expect("ledger");
    assert_eq!(coordinator_ledger.len(), 1);
}

/// #15.1: a merchant that seals garbage for two neighbours, under its own valid signature,
/// no longer aborts the round: the two complain (and leave out its pairwise mask), the
/// round commits with all eight inputs, the two complaints name it, and the coordinator
/// quarantines it (store, `status`, metrics), so the next round runs with the seven others.
/// An operator lifts the quarantine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_that_seals_garbage_is_named_quarantined_and_the_round_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = eight_merchants(dir.path(), 2, 7).await;
    let clients = spawn_eight(&federation, |i| {
        let hostile = i == 7;
        (
            Faults { garbage_shares: if hostile { 2 } else { 0 }, ..Faults::default() },
            if hostile { 1 } else { 2 },
        )
    })
    .await;
    wait_for_rounds(&federation, 2, Duration::from_secs(90)).await;
    for client in clients {
        let _ = tokio::time::timeout(Duration::from_secs(30), client).await;
    }
    let store = federation.store().expect("store");
    assert_eq!(store.round_counts().expect("counts").completed, 2);
    let hostile = &federation.pki.merchants[7].name;
    let quarantined = store.quarantined().expect("quarantine");
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert_eq!(&quarantined[0].merchant_id, hostile);
    assert!(quarantined[0].reason.contains("did not open"), "{}", quarantined[0].reason);
    let engine = federation.in_process().expect("running").core.engine();
    assert_eq!(engine.status().quarantined, quarantined);
    let metrics = engine.metrics.encode();
    assert!(metrics.contains("guild_complaints_total 2"), "{metrics}");
    assert!(metrics.contains("guild_merchants_quarantined 1"), "{metrics}");
    assert!(
        !store.eligible_merchants().expect("eligible").iter().any(|m| &m.merchant_id == hostile),
        "a quarantined merchant is not sampled"
    );
    assert!(store.lift_quarantine(hostile).expect("lift"));
    assert!(store.eligible_merchants().expect("eligible").iter().any(|m| &m.merchant_id == hostile));
}

/// #15.1: a merchant that reveals a false share at Unmask is refused against the dealer's
/// signed commitment, named and quarantined; the other holders' shares reconstruct every
/// secret and the round commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_false_unmask_share_is_refused_its_sender_quarantined_and_the_round_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = eight_merchants(dir.path(), 1, 8).await;
    let clients =
        spawn_eight(&federation, |i| (Faults { false_unmask_share: i == 3, ..Faults::default() }, 1)).await;
    wait_for_rounds(&federation, 1, Duration::from_secs(60)).await;
    for client in clients {
        client.abort();
    }
    let store = federation.store().expect("store");
    assert_eq!(store.round_counts().expect("counts").completed, 1);
    let quarantined = store.quarantined().expect("quarantine");
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert_eq!(quarantined[0].merchant_id, federation.pki.merchants[3].name);
    assert!(quarantined[0].reason.contains("is not the one"), "{}", quarantined[0].reason);
}
