//! One federated arm as a real federation: a `guild-coordinator` child process configured
//! from the arm's plan, merchants as clients (tasks sharing one base model, or
//! `guild-client` processes) over loopback mutual TLS, the scenario's faults and a
//! coordinator kill; every committed adapter scored as it lands.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use guild_client::config::{ClientConfig, DataConfig, Guards, ModelConfig, TlsFiles};
use guild_client::data::Merchant;
use guild_client::learner::{Learner, ModelLearner, TowerLearner};
use guild_client::participant::{ClientLedger, Faults, Participant, ParticipantOptions, RoundOutcome};
use guild_client::retrieval::Split;
use guild_coordinator::config::StatisticRounds;
use guild_privacy::ledger::Budget;
use guild_privacy::{PrivacyMode, PrivacyUnit};
use guild_proto::domain::AdapterFamilyName;
use guild_proto::round::RoundKind;
use guild_proto::round::Schedule;

use crate::federation::{Federation, coordinator_binary};
use crate::observe::{PhaseStats, charged_after_last_version, epsilon_after, per_phase};
use crate::progress::Progress;
use crate::results::{ArmResult, RoundPoint};
use crate::scenario::{ClientMode, Scenario};
use crate::world::World;

use super::plan::FederatedArm;

pub(super) async fn federated(
    world: &World,
    s: &Scenario,
    arm: &FederatedArm,
    out: &Path,
    progress: &Progress,
) -> anyhow::Result<ArmResult> {
    let f = &s.federation;
    let started = Instant::now();
    let dir = out.join("arms").join(&arm.name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    // The shopper-level arms' merchants hold several of the scenario's shops each.
    let merged;
    let merchants: &[Merchant] = match &arm.shopper {
        Some(sh) => {
            merged = merge_shops(&world.merchants, sh.merge_shops);
            &merged
        }
        None => &world.merchants,
    };
    let n = merchants.len();
    let shoppers: usize = merchants.iter().map(|m| m.users.len()).sum();
    let keystream_rate = crate::federation::mask_keystream_rate();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    // The federation states its catalogue; every merchant checks its own against it.
    let catalogue = hex::encode(crate::world::lock(&world.shared).catalogue_sha256);
    let mut federation = Federation::init(&dir, n, |c| {
        c.adapter.family = f.family;
        c.adapter.catalogue_sha256 = catalogue.clone();
        c.adapter.rank = f.rank;
        c.adapter.alpha = world.spec.lora.alpha as f32;
        c.adapter.tower = world.spec.tower.shape;
        c.adapter.frozen_a_seed = world.spec.tower.seed;
        c.rounds.training.sampling_rate = f.sampling_rate;
        c.rounds.min_cohort = f.min_cohort;
        // Every in-process merchant joins before the first round is sampled.
        c.rounds.start_after_registered = n as u64;
        c.rounds.threshold = f.threshold;
        c.rounds.neighbours = f.neighbours;
        c.rounds.phase_deadlines_ms = f.phase_deadlines_ms;
        c.rounds.early_close = f.early_close.clone();
        c.rounds.max_rounds = arm.rounds;
        c.rounds.local_steps = f.local_steps;
        c.rounds.batch_size = f.batch_size;
        c.rounds.learning_rate = f.learning_rate;
        c.rounds.negatives = f.negatives;
        c.rounds.server_learning_rate = f.server_learning_rate;
        c.rounds.server_optimizer = f.server_optimizer;
        // (The DP arms' tower may have no item-ID rows to scale: `federation.dp_tower`.)
        c.rounds.item_ids_scale = if world.spec.tower.shape.item_ids > 0 { f.item_ids_scale } else { 1.0 };
        c.privacy.mode = arm.mode;
        c.privacy.clip_norm = f.clip_norm;
        c.rounds.training.noise_multiplier = arm.noise_multiplier;
        c.privacy.tolerated_colluders = f.tolerated_colluders;
        c.privacy.epsilon_budget = arm.epsilon_cap;
        c.privacy.delta = arm.delta;
        if let Some(sh) = &arm.shopper {
            // Every merchant in every round, each sampling its own shoppers.
            c.rounds.min_cohort = n as u32;
            c.rounds.neighbours = 0;
            c.rounds.local_steps = sh.local_steps;
            c.rounds.learning_rate = sh.learning_rate;
            c.rounds.negatives = sh.negatives;
            c.rounds.server_learning_rate = sh.server_learning_rate;
            c.rounds.server_optimizer = sh.server_optimizer;
            c.rounds.trained = sh.trained;
            c.privacy.unit = PrivacyUnit::Shopper;
            c.rounds.training.sampling_rate = sh.sampling_rate;
            c.privacy.shoppers = shoppers as u64;
            c.privacy.clip_norm = sh.clip_norm;
            c.rounds.popularity_release = StatisticRounds {
                rounds: arm.schedule.popularity_releases,
                noise_multiplier: arm.popularity_noise_multiplier,
                sampling_rate: sh.popularity_sampling_rate,
                clip_norm: None,
                partition: false,
            };
            c.rounds.pooling_selection = StatisticRounds {
                rounds: u32::from(arm.schedule.pooling_selection),
                noise_multiplier: arm.selection_noise_multiplier,
                sampling_rate: sh.selection_rate(),
                clip_norm: None,
                partition: false,
            };
        } else if arm.schedule.pooling_selection {
            // A merchant-level selection: merchants sampled as for training, each sending
            // its shoppers' mean NDCG@10 at the selection's own clip norm.
            c.rounds.pooling_selection = StatisticRounds {
                rounds: 1,
                noise_multiplier: arm.selection_noise_multiplier,
                sampling_rate: arm.selection_rate,
                clip_norm: arm.selection_clip_norm,
                partition: false,
            };
        } else if arm.schedule.popularity_releases > 0 {
            // Without noise: every merchant's statistics, one part of the merchants a round.
            c.rounds.popularity_release = StatisticRounds {
                rounds: arm.schedule.popularity_releases,
                partition: true,
                ..StatisticRounds::default()
            };
            c.rounds.trained = f.trained;
        }
        // Every client of a cohort masks on this machine's cores: the masked-input phase
        // gets the time that takes (for a cohort one deviation above its mean; three times
        // the work leaves room for cohorts larger still and for the coordinator's own).
        let q = c.kind_privacy(RoundKind::Training).merchant_rate;
        let sampled = (q * n as f64 + (q * (1.0 - q) * n as f64).sqrt()).ceil() as usize;
        // A partitioned release's part is n/parts merchants (its vector no longer).
        let part = c.release_parts().map_or(0, |parts| n.div_ceil(parts as usize));
        let cohort = sampled.max(part).clamp(1, n);
        let k = if c.rounds.neighbours == 0 { cohort } else { c.rounds.neighbours as usize };
        // The longest vector any of the arm's round kinds masks (each kind sums its own
        // coordinates: a release the statistics, training the weights alone with `weights`),
        // as encoded: padded to a power of two where the mode rotates, as it is without noise.
        let schedule = c.rounds.schedule();
        let encoded = |d| guild_privacy::dp::encoded_length(c.privacy.mode, d);
        let longest = RoundKind::ALL
            .into_iter()
            .filter(|&kind| schedule.count(kind, c.rounds.max_rounds) > 0)
            .map(|kind| encoded(world.summed(kind, c.trained_in(kind))))
            .max()
            .unwrap_or_else(|| encoded(world.parameter_count()));
        c.rounds.phase_deadlines_ms = crate::federation::shared_machine_deadlines(
            c.rounds.phase_deadlines_ms,
            longest,
            cohort,
            k,
            cores,
            keystream_rate,
        );
    })?;
    let binary = coordinator_binary()?;
    federation.start_process(&binary).await?;
    let mut events = Vec::new();
    let configured = f.phase_deadlines_ms[guild_privacy::secagg::Phase::MaskedInput.index()];
    let masked =
        federation.config.rounds.phase_deadlines_ms[guild_privacy::secagg::Phase::MaskedInput.index()];
    if masked > configured {
        events.push(format!(
            "masked-input deadline {:.1} s, not {:.1} s: every client of a cohort masks on the same {cores} cores \
             (mask keystream, AES-256-CTR, at {:.2} GB/s per core)",
            masked as f64 / 1e3,
            configured as f64 / 1e3,
            keystream_rate / 1e9
        ));
    }
    if arm.mode != PrivacyMode::DangerousNone {
        // What `guild-coordinator privacy plan` says of this arm before it runs.
        let plan = guild_coordinator::plan::plan(&federation.config, n as u64)?;
        let figures: Vec<String> = plan
            .kinds
            .iter()
            .map(|k| {
                format!(
                    "{:?}: {} round(s), {:.0} summands expected, noise of the averaged update {:.2}× the clip norm",
                    k.kind, k.rounds, k.expected_summands, k.noise_to_clip
                )
            })
            .collect();
        events.push(format!("planned: {}", figures.join("; ")));
    }
    if arm.shopper.is_none() && arm.schedule.pooling_selection {
        events.push(format!(
            "one pooling selection: merchants sampled at q = {}, each sending its shoppers' NDCG@10 on their \
             validation items under the {} public settings of pooling and prior weight, summed, centred and \
             clipped at c = {}, \
             z = {:.3}; then {} training round(s) at z = {:.3}",
            arm.selection_rate,
            guild_proto::tower::SELECTION_SETTINGS,
            arm.selection_clip_norm.unwrap_or(f.clip_norm),
            arm.selection_noise_multiplier,
            arm.rounds - 1,
            arm.noise_multiplier
        ));
    }
    if arm.shopper.is_none() && arm.schedule.popularity_releases > 0 {
        events.push(format!(
            "{} popularity releases first, each over one of as many parts of the merchants (each merchant in \
             one, `rounds.popularity_release.partition`), every merchant's statistics summed without noise; \
             then {} training round(s) of {}",
            arm.schedule.popularity_releases,
            arm.rounds - u64::from(arm.schedule.popularity_releases),
            federation.config.rounds.trained
        ));
    }
    if let Some(sh) = &arm.shopper {
        // The arm's rounds as the coordinator's schedule runs them, one line per kind.
        let schedule = arm.schedule;
        let steps: Vec<String> = RoundKind::ALL
            .into_iter()
            .filter_map(|kind| {
                let count = schedule.count(kind, arm.rounds);
                (count > 0).then(|| match kind {
                    RoundKind::PopularityRelease => format!(
                        "{count} popularity release(s): every merchant's shoppers sampled at q = {}, each one's \
                         items at the whole clip norm, z = {:.3}",
                        sh.popularity_sampling_rate, arm.popularity_noise_multiplier,
                    ),
                    RoundKind::PoolingSelection => format!(
                        "one pooling selection: every merchant's shoppers sampled at q = {}, each one's NDCG@10 on \
                         its validation item under the {} public settings of pooling and prior weight, z = {:.3}",
                        sh.selection_rate(),
                        guild_proto::tower::SELECTION_SETTINGS,
                        arm.selection_noise_multiplier,
                    ),
                    RoundKind::Training => format!("{count} training round(s) at z = {:.3}", arm.noise_multiplier),
                })
            })
            .collect();
        if schedule.statistic_rounds() > 0 {
            events.push(steps.join("; then "));
        }
    }

    let faults = Faults {
        drop: s.faults.drop,
        straggle: s.faults.straggle,
        straggle_delay: Duration::from_millis(s.faults.straggle_ms),
        ..Default::default()
    };
    let unnoised = arm.mode != PrivacyMode::Distributed;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    let mut processes = Vec::new();
    for (i, merchant) in merchants.iter().enumerate() {
        match s.clients {
            ClientMode::Tasks => {
                let connection = federation.connect(i).await?;
                let (shared, users, eval_users, seed) =
                    (world.shared.clone(), merchant.users.clone(), s.data.client_eval_users, i as u64);
                let learner: Box<dyn Learner> = match world.spec.family {
                    AdapterFamilyName::FfaLora => {
                        Box::new(ModelLearner::new(shared, world.spec.lora.clone(), users, eval_users, seed))
                    }
                    AdapterFamilyName::SequenceTower => Box::new(TowerLearner::new(
                        shared,
                        world.spec.tower.clone(),
                        users,
                        eval_users,
                        seed,
                    )?),
                };
                let options = ParticipantOptions {
                    display_name: merchant.name.clone(),
                    dangerous_send_unnoised_updates: unnoised,
                    min_noise_multiplier: 0.0,
                    poll: Duration::from_secs(5),
                    max_backoff: Duration::from_secs(2),
                    faults: faults.clone(),
                    max_rounds: 0,
                    // The simulator reports each arm's ε; its merchants do not cap their own
                    // (nor the rate at which the shopper arms sample their shoppers).
                    max_epsilon: f64::INFINITY,
                    max_shopper_sampling_rate: 1.0,
                    min_tolerated_colluders: f.tolerated_colluders,
                    unit: arm.unit,
                    ..ParticipantOptions::default()
                };
                // Each merchant keeps its own durable ledger, read back after the arm for
                // its ε against the coordinator.
                let ledger = ClientLedger::open(&merchant_ledger(&federation, i))?;
                let mut participant =
                    Participant::new(connection, Arc::new(federation.identity(i)?), learner, options, ledger);
                let tx = tx.clone();
                tasks.push(tokio::spawn(async move {
                    participant
                        .run(|r| {
                            if let Ok(report) = r {
                                let _ = tx.send(report.clone());
                            }
                        })
                        .await
                }));
            }
            ClientMode::Processes => {
                processes.push(spawn_client_process(&federation, s, i, merchant, unnoised)?)
            }
        }
    }
    drop(tx);

    let store = federation.store()?;
    // The per-round curve may be drawn on the first `curve_users` evaluation users; the
    // arm's final scores are on all of them.
    let curve_world = world.evaluated_on_first(s.data.curve_users.unwrap_or(world.eval_users.len()));
    let budget = Budget { epsilon: arm.epsilon_cap, delta: arm.delta };
    let evaluate_new = |seen: &mut u64, curve: &mut Vec<RoundPoint>| -> anyhow::Result<()> {
        let latest = store.latest_adapter()?.map_or(0, |a| a.version);
        while *seen < latest {
            *seen += 1;
            if !drawn_on_curve(arm.schedule, *seen, s.data.curve_release_every) {
                progress.round_done(format!(
                    "{}: adapter version {seen}, a popularity release not drawn on the curve",
                    arm.name
                ));
                continue;
            }
            let record = store.adapter(*seen)?;
            let values = guild_proto::adapter::from_bytes(&record.data, world.parameter_count())?;
            let validation =
                tokio::task::block_in_place(|| curve_world.score(Some(&values), Split::Validation))?;
            curve.push(RoundPoint {
                round: *seen,
                validation,
                epsilon: epsilon_after(&store, budget, arm.unit, Some(*seen))?,
            });
            let epsilon = curve.last().map_or(0.0, |p: &RoundPoint| p.epsilon);
            progress.round_done(format!(
                "{}: adapter version {seen}, validation NDCG@10 {:.4}, MRR {:.4}, ε {epsilon:.3}",
                arm.name, validation.ndcg_at_10, validation.mrr
            ));
        }
        Ok(())
    };
    let mut status_connection = federation.connect(0).await?;
    let mut curve = Vec::new();
    let mut seen = 0u64;
    let mut killed = false;
    let mut phase_stats = PhaseStats::default();
    let limit = Duration::from_millis(f.phase_deadlines_ms.iter().sum::<u64>()) * (arm.rounds as u32 + 2)
        + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        evaluate_new(&mut seen, &mut curve)?;
        let counts = store.round_counts()?;
        if let Some(k) = arm.kill_after
            && !killed
            && counts.completed >= k
            && store.open_round_phase()?.is_some()
        {
            if let Some(address) = federation.config.server.metrics_listen {
                phase_stats.scrape(address);
            }
            let (round, phase) = match store.open_round_phase()? {
                Some((round, Some(phase))) => (round, phase.name()),
                Some((round, None)) => (round, "committing"),
                None => (0, "between rounds"),
            };
            federation.kill()?;
            // The daemon's `max_rounds` counts rounds of one run: the restarted daemon runs
            // only those still owed, or the arm would end with more rounds than planned.
            federation.config.rounds.max_rounds = arm.rounds.saturating_sub(counts.completed).max(1);
            std::fs::write(federation.config_path(), toml::to_string(&federation.config)?)?;
            events.push(format!(
                "coordinator SIGKILLed during round {round} ({phase}) after {} committed rounds",
                counts.completed
            ));
            federation.start_process(&binary).await?;
            events.push("coordinator restarted; the open round was aborted and clients reconnected".into());
            progress.message(format!("{}: {}", arm.name, events[events.len() - 2..].join("; ")));
            killed = true;
        }
        if counts.completed >= arm.rounds {
            break;
        }
        if let Ok(status) = status_connection.status().await
            && status.current_phase.contains("budget exhausted")
        {
            // A round may have committed since `counts` was read: the budget cut the run
            // short only if fewer rounds than planned are committed now.
            let completed = store.round_counts()?.completed;
            if completed < arm.rounds {
                events.push(format!(
                    "the privacy budget stopped the run after {completed} rounds: {}",
                    status.current_phase
                ));
            }
            break;
        }
        if started.elapsed() > limit {
            events.push(format!("stopped at the time limit after {} rounds", counts.completed));
            break;
        }
    }
    if let Some(address) = federation.config.server.metrics_listen {
        phase_stats.scrape(address);
    }
    evaluate_new(&mut seen, &mut curve)?;
    for task in &tasks {
        task.abort();
    }
    for mut p in processes {
        let _ = p.kill();
        let _ = p.wait();
    }
    if let Some(version) = arm.schedule.version_of(RoundKind::PoolingSelection)
        && world.spec.family == AdapterFamilyName::SequenceTower
        && let Ok(record) = store.adapter(version)
    {
        let values = guild_proto::adapter::from_bytes(&record.data, world.parameter_count())?;
        events.push(match guild_proto::tower::setting_of(&world.spec.tower.shape, &values) {
            Some(j) => format!(
                "the pooling selection (adapter version {version}) chose {}",
                guild_proto::tower::describe_setting(j)
            ),
            None => format!("adapter version {version} holds none of the selection's settings"),
        });
    }
    let (dropped, straggled) = faults.injected.counts();
    if dropped.iter().sum::<u64>() > 0 {
        events.push(format!("clients made to drop out: {}", per_phase(dropped)));
    }
    if straggled.iter().sum::<u64>() > 0 {
        events.push(format!(
            "clients made to straggle by {} ms (past the deadline where it is shorter): {}",
            s.faults.straggle_ms,
            per_phase(straggled)
        ));
    }
    let counts = store.round_counts()?;
    if counts.aborted > 0 {
        events.push(format!(
            "{} round(s) aborted and retried (dropouts below threshold or the restart)",
            counts.aborted
        ));
    }
    let charged_after = charged_after_last_version(&store)?;
    if charged_after > 0 {
        events.push(format!(
            "{charged_after} round(s) charged after the last version and then aborted (never refunded)"
        ));
    }
    let mut bytes = Vec::new();
    while let Ok(report) = rx.try_recv() {
        if report.outcome == RoundOutcome::Committed {
            bytes.push(report.bytes_sent as f64);
        }
    }
    let record = store.latest_adapter()?.context("no adapter")?;
    let values = guild_proto::adapter::from_bytes(&record.data, world.parameter_count())?;
    // The arm's model: its last version, or the mean of its last `average_last` training
    // versions (tail averaging; the statistics the last version's).
    let values = if s.federation.average_last > 1 {
        match guild_coordinator::average::averaged_adapter(
            &store,
            &world.manifest(),
            arm.schedule,
            record.version,
            s.federation.average_last,
        ) {
            Ok((averaged, versions)) => {
                events.push(format!(
                    "the model scored is the mean of adapter versions {} to {} (tail averaging, \
                     `average_last` = {}), the accumulated statistics version {}'s",
                    versions.start(),
                    versions.end(),
                    s.federation.average_last,
                    versions.end()
                ));
                averaged
            }
            Err(guild_coordinator::average::AverageError::Tail(
                guild_coordinator::average::TailError::NotTrained(_),
            )) => values,
            Err(error) => return Err(error.into()),
        }
    } else {
        values
    };
    // Without noise, the pooling is chosen on validation as for the other non-private arms
    // (the DP arms' own selection is a round of theirs).
    let values = if arm.mode == PrivacyMode::DangerousNone {
        let (values, choice) =
            super::with_pooling_choice(world, s, values, None, "the first evaluation users")?;
        events.extend(choice);
        values
    } else {
        values
    };
    let (test, ranks) = tokio::task::block_in_place(|| world.score_with_ranks(Some(&values), Split::Test))?;
    let validation = tokio::task::block_in_place(|| world.score(Some(&values), Split::Validation))?;
    let epsilon = epsilon_after(&store, budget, arm.unit, None)?;
    let status = status_connection.status().await.ok();
    let reported = |s: &guild_proto::domain::StatusReport| match arm.unit {
        PrivacyUnit::Merchant => s.epsilon_spent,
        PrivacyUnit::Shopper => s.shopper_epsilon_spent,
    };
    if let Some(status) = &status
        && arm.mode != PrivacyMode::DangerousNone
        && (reported(status) - epsilon).abs() > 1e-9 * epsilon.max(1.0)
    {
        anyhow::bail!("the coordinator reports ε = {} but its ledger gives {epsilon}", reported(status));
    }
    federation.kill()?;
    let against_coordinator = if arm.mode == PrivacyMode::Distributed {
        epsilon_against_coordinator(&federation, n, arm.unit, arm.delta)?
    } else {
        None
    };
    Ok(ArmResult {
        unit: (arm.mode != PrivacyMode::DangerousNone).then_some(arm.unit),
        epsilon_against_coordinator_max: against_coordinator.map(|(max, _)| max),
        epsilon_against_coordinator_mean: against_coordinator.map(|(_, mean)| mean),
        arm: arm.name.clone(),
        test,
        validation,
        worst: None,
        epsilon: (arm.mode != PrivacyMode::DangerousNone).then_some(epsilon),
        delta: (arm.mode != PrivacyMode::DangerousNone).then_some(arm.delta),
        noise_multiplier: (arm.mode != PrivacyMode::DangerousNone).then_some(arm.noise_multiplier),
        tolerated_colluders: (arm.mode == PrivacyMode::Distributed).then_some(f.tolerated_colluders),
        rounds: counts.completed,
        rounds_aborted: counts.aborted,
        charged_after_last_version: charged_after,
        wall_seconds: started.elapsed().as_secs_f64(),
        bytes_per_client_round: (!bytes.is_empty()).then(|| bytes.iter().sum::<f64>() / bytes.len() as f64),
        curve,
        test_ranks: vec![ranks],
        comparisons: Vec::new(),
        final_adapter: (world.spec.family == AdapterFamilyName::SequenceTower).then_some(values),
        phase_seconds: phase_stats.mean_seconds(),
        dropouts: phase_stats.dropouts(),
        events,
    })
}

/// Merchants of `size` consecutive shops each (the last may hold fewer), named after their
/// first shop.
pub(super) fn merge_shops(shops: &[Merchant], size: usize) -> Vec<Merchant> {
    shops
        .chunks(size.max(1))
        .map(|group| Merchant {
            name: format!("{}-x{}", group[0].name, group.len()),
            family: group[0].family,
            users: group.iter().flat_map(|m| m.users.iter().copied()).collect(),
        })
        .collect()
}

/// Merchant `i`'s own privacy ledger in a simulated federation.
fn merchant_ledger(federation: &Federation, i: usize) -> PathBuf {
    federation.dir.join("merchants").join(format!("{}.ledger", federation.pki.merchants[i].name))
}

/// Each merchant's ε against the coordinator for `unit` from its own ledger at `delta`
/// (merchant unit: its participations, no amplification by sampling; shopper unit: its
/// shoppers', amplified by its own sampling): (largest, mean over merchants that took part).
fn epsilon_against_coordinator(
    federation: &Federation,
    merchants: usize,
    unit: PrivacyUnit,
    delta: f64,
) -> anyhow::Result<Option<(f64, f64)>> {
    let mut spent = Vec::new();
    for i in 0..merchants {
        let ledger = ClientLedger::open(&merchant_ledger(federation, i))?;
        if ledger.participations().iter().any(|p| p.unit == unit) {
            spent.push(ledger.epsilon(unit, delta));
        }
    }
    Ok((!spent.is_empty())
        .then(|| (spent.iter().copied().fold(0.0, f64::max), spent.iter().sum::<f64>() / spent.len() as f64)))
}

fn spawn_client_process(
    federation: &Federation,
    s: &Scenario,
    i: usize,
    merchant: &Merchant,
    unnoised: bool,
) -> anyhow::Result<std::process::Child> {
    anyhow::ensure!(
        s.data.max_users.is_none(),
        "client processes read the dataset themselves: max_users must not be set"
    );
    let dir = federation.dir.join("merchants");
    let name = &federation.pki.merchants[i].name;
    let config = ClientConfig {
        coordinator: federation.uri(),
        display_name: merchant.name.clone(),
        identity: format!("{name}.signing").into(),
        tls: TlsFiles {
            ca: "../ca.pem".into(),
            cert: format!("{name}.pem").into(),
            key: format!("{name}.key").into(),
            server_name: None,
        },
        data: DataConfig {
            dataset: std::fs::canonicalize(&s.data.dataset)?,
            merchant: Some(merchant.name.clone()),
            shop_size: s.data.shop_size,
            partition_seed: s.data.seed,
            eval_users: s.data.client_eval_users,
        },
        model: ModelConfig {
            dir: None,
            max_tokens: s.data.max_tokens,
            cache: std::fs::canonicalize(&s.data.cache).unwrap_or_else(|_| s.data.cache.clone()),
        },
        // Left out: each process learns the federation's adapter from the coordinator.
        adapter: None,
        guards: Guards {
            min_noise_multiplier: 0.0,
            dangerous_send_unnoised_updates: unnoised,
            max_rounds: 0,
            max_epsilon: f64::INFINITY,
            ledger: merchant_ledger(federation, i),
            unit: federation.config.privacy.unit,
            min_tolerated_colluders: s.federation.tolerated_colluders,
            ..Guards::default()
        },
        serve: Default::default(),
    };
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml::to_string(&config)?)?;
    let binary = coordinator_binary()?.with_file_name("guild-client");
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    Ok(std::process::Command::new(binary).args(["run", "--config"]).arg(&path).stderr(log).spawn()?)
}

/// Whether the curve draws adapter version `version`: every training version, and of the
/// popularity releases every `every`-th and the last (every one without `every`).
fn drawn_on_curve(schedule: Schedule, version: u64, every: Option<u32>) -> bool {
    let releases = u64::from(schedule.popularity_releases);
    match every {
        Some(every) if version >= 1 && version < releases => version.is_multiple_of(u64::from(every.max(1))),
        _ => true,
    }
}

#[cfg(test)]
mod curve_tests {
    use super::*;

    #[test]
    fn the_curve_thins_the_releases_alone_and_keeps_their_last() {
        let schedule = Schedule { popularity_releases: 20, pooling_selection: false };
        let drawn: Vec<u64> = (1..=30).filter(|&v| drawn_on_curve(schedule, v, Some(5))).collect();
        assert_eq!(drawn, [5, 10, 15, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]);
        let odd = Schedule { popularity_releases: 7, pooling_selection: true };
        let drawn: Vec<u64> = (1..=10).filter(|&v| drawn_on_curve(odd, v, Some(3))).collect();
        assert_eq!(drawn, [3, 6, 7, 8, 9, 10]);
        assert!((1..=30).all(|v| drawn_on_curve(schedule, v, None)));
    }
}
