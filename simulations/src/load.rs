//! The coordinator under load: many lightweight clients (random update vectors, no model)
//! through full SecAgg+ rounds over loopback mutual TLS, timing each phase and the
//! coordinator's own work.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guild_client::identity::Identity;
use guild_client::learner::RandomLearner;
use guild_client::participant::{Participant, ParticipantOptions};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::federation::Federation;

#[derive(Clone, Debug, serde::Serialize)]
pub struct LoadReport {
    pub clients: usize,
    pub dimension: usize,
    pub neighbours: u32,
    pub threshold: u32,
    pub rounds: u64,
    /// From the end of round 1 to the end of the last round.
    pub wall_seconds: f64,
    pub rounds_per_minute: f64,
    /// Mean seconds from a phase's start to its close, by phase.
    pub phase_seconds: Vec<(String, f64)>,
    /// The coordinator's own work per round (excluding waiting for clients).
    pub coordinator_seconds_per_round: f64,
}

/// Mean of a histogram family member in Prometheus text: `sum / count`.
fn counter(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.trim().parse().ok())
}

/// Runs `rounds` rounds of `clients` lightweight clients with d = `dimension`.
pub async fn run(
    clients: usize,
    dimension: usize,
    rounds: u64,
    neighbours: u32,
    threshold: u32,
) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(rounds >= 2, "at least 2 rounds: the first is warm-up");
    anyhow::ensure!(
        dimension.is_power_of_two() && dimension >= 1024,
        "dimension must be a power of two ≥ 1024"
    );
    let dir = tempfile::tempdir()?;
    let mut federation = Federation::init(dir.path(), clients, |c| {
        c.adapter.layers = 1;
        c.adapter.hidden = 512;
        c.adapter.rank = dimension / 1024;
        c.rounds.sampling_rate = 1.0;
        c.rounds.min_cohort = clients as u32;
        c.rounds.threshold = threshold;
        c.rounds.neighbours = neighbours;
        c.rounds.max_rounds = rounds;
        c.rounds.phase_deadlines_ms = [300_000, 120_000, 300_000, 120_000, 120_000];
        c.privacy.clip_norm = 1.0;
        c.privacy.noise_multiplier = 1.0;
        c.privacy.epsilon_budget = 1e9;
    })?;
    federation.start_in_process().await?;
    let manifest = federation.config.manifest()?;
    anyhow::ensure!(
        manifest.parameter_count() == dimension,
        "manifest has {} parameters",
        manifest.parameter_count()
    );
    let mut tasks = Vec::new();
    for i in 0..clients {
        let connection = federation.connect(i).await?;
        let learner = RandomLearner {
            manifest: manifest.clone(),
            norm: 0.5,
            rng: ChaCha20Rng::seed_from_u64(i as u64),
            shoppers: 0,
        };
        let options = ParticipantOptions {
            display_name: format!("load-{i}"),
            max_rounds: rounds,
            ..Default::default()
        };
        let mut participant = Participant::new(
            connection,
            Arc::new(Identity::ephemeral()?),
            Box::new(learner),
            options,
            guild_client::participant::ClientLedger::in_memory(),
        );
        participant.register().await?;
        tasks.push(tokio::spawn(async move { participant.run(|_| {}).await }));
    }
    // Steady state: time from the end of the first round (warm-up: connections, first
    // adapter download) to the end of the last.
    let store = federation.store()?;
    let wait_for = |n: u64| {
        let store = &store;
        async move {
            let limit = Instant::now() + Duration::from_secs(1800);
            while store.round_counts()?.completed < n {
                anyhow::ensure!(store.round_counts()?.aborted == 0, "a round aborted: see the logs");
                anyhow::ensure!(Instant::now() < limit, "rounds did not complete in 30 minutes");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(())
        }
    };
    wait_for(1).await?;
    let started = Instant::now();
    wait_for(rounds).await?;
    let wall = started.elapsed().as_secs_f64();
    let timed_rounds = rounds - 1;
    for task in tasks {
        task.abort();
    }
    let text = federation.in_process().map(|r| r.core.engine().metrics.encode()).unwrap_or_default();
    let mut stats = crate::observe::PhaseStats::default();
    stats.add(&text);
    let phase_seconds = guild_privacy::secagg::Phase::ALL
        .into_iter()
        .map(|p| (p.name().to_owned(), stats.mean_seconds_of(p)))
        .collect();
    let busy = counter(&text, "guild_engine_busy_seconds_total").unwrap_or(f64::NAN);
    Ok(LoadReport {
        clients,
        dimension,
        neighbours,
        threshold,
        rounds,
        wall_seconds: wall,
        rounds_per_minute: timed_rounds as f64 * 60.0 / wall,
        phase_seconds,
        coordinator_seconds_per_round: busy / rounds as f64,
    })
}
