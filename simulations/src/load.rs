//! The coordinator under load: many lightweight clients (random update vectors, no model)
//! through full SecAgg+ rounds over loopback mutual TLS, timing each phase and the
//! coordinator's own work; optionally with one allow-listed merchant flooding the
//! coordinator (bounded loops of garbage and polling requests on many connections).

use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Whether the rounds carried DP noise (DDGauss in distributed mode) or none.
    pub noise: bool,
    /// From the end of round 1 to the end of the last round.
    pub wall_seconds: f64,
    pub rounds_per_minute: f64,
    /// Mean seconds from a phase's start to its close, by phase.
    pub phase_seconds: Vec<(String, f64)>,
    /// The coordinator's own work per round (excluding waiting for clients).
    pub coordinator_seconds_per_round: f64,
    /// Concurrent request loops of the flooding merchant (0: none).
    pub flood_streams: usize,
    /// Requests the flooding merchant sent, and how many the per-merchant rate limit refused
    /// before reading them.
    pub flood_requests: u64,
    pub flood_rate_limited: u64,
    /// Peak resident memory of this whole process (coordinator and every client), MiB.
    pub peak_rss_mib: f64,
}

/// One flooding loop: an allow-listed merchant (never registered, so never in a cohort)
/// sends, until `stop`, a cycle of a status request, a short task poll and a full-size
/// masked input bound to no round; returns how many requests it sent.
async fn flood(
    connection: guild_client::net::Connection,
    dimension: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    use guild_proto::v1;
    let mut raw = connection.raw();
    let garbage = v1::MaskedInputRequest {
        binding: Some(v1::RoundBinding {
            federation_id: vec![0; 16],
            round_id: u64::MAX,
            adapter_sha256: vec![0; 32],
            task_sha256: vec![0; 32],
        }),
        sender: 1,
        masked: vec![7; dimension],
        complaints: vec![],
    };
    let mut sent = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let _ = raw.status(v1::StatusRequest {}).await;
        let _ = raw.get_task(v1::GetTaskRequest { merchant_id: "flood".into(), wait_millis: 10 }).await;
        let _ = raw.masked_input(garbage.clone()).await;
        sent += 3;
    }
    sent
}

/// Mean of a histogram family member in Prometheus text: `sum / count`.
fn counter(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.trim().parse().ok())
}

/// Runs `rounds` rounds of `clients` lightweight clients with d = `dimension`.
/// What a load run does.
#[derive(Clone, Debug)]
pub struct LoadSettings {
    pub clients: usize,
    /// Length of each update vector: a power of two, at least 1,024.
    pub dimension: usize,
    /// Rounds to run; the first is warm-up and not timed.
    pub rounds: u64,
    /// SecAgg+ neighbours per client (0: the complete graph).
    pub neighbours: u32,
    pub threshold: u32,
    /// Request loops of one more, flooding merchant (0: none).
    pub flood_streams: usize,
    /// Rounds without DP noise (`privacy.mode = "dangerous_none"`): SecAgg+ and the
    /// encoding alone, the work a secure-aggregation peer without DP does (random vectors,
    /// no data).
    pub dangerous_no_noise: bool,
}

pub async fn run(settings: LoadSettings) -> anyhow::Result<LoadReport> {
    let LoadSettings { clients, dimension, rounds, neighbours, threshold, flood_streams, dangerous_no_noise } =
        settings;
    anyhow::ensure!(rounds >= 2, "at least 2 rounds: the first is warm-up");
    anyhow::ensure!(
        dimension.is_power_of_two() && dimension >= 1024,
        "dimension must be a power of two ≥ 1024"
    );
    let dir = tempfile::tempdir()?;
    // The flooding merchant is one more allow-listed certificate (the last).
    let merchants = clients + usize::from(flood_streams > 0);
    let mut federation = Federation::init(dir.path(), merchants, |c| {
        c.adapter.layers = 1;
        // A LoRA shape of exactly `dimension` values (A and B: 2 · hidden · rank).
        let hidden = 512.max(((dimension / 2) as f64).sqrt() as usize).next_power_of_two();
        c.adapter.hidden = hidden;
        c.adapter.rank = dimension / (2 * hidden);
        c.rounds.min_cohort = clients as u32;
        c.rounds.threshold = threshold;
        c.rounds.neighbours = neighbours;
        c.rounds.max_rounds = rounds;
        c.rounds.phase_deadlines_ms = [300_000, 120_000, 300_000, 120_000, 120_000];
        c.privacy.clip_norm = 1.0;
        // Noise large enough that the clients' own ε caps (`guards.max_epsilon`) admit every
        // round: the work per round does not depend on it.
        c.rounds.training.noise_multiplier = 5.0;
        c.privacy.epsilon_budget = 1e9;
        if dangerous_no_noise {
            c.privacy.mode = guild_privacy::PrivacyMode::DangerousNone;
        }
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
            dangerous_send_unnoised_updates: dangerous_no_noise,
            ..Default::default()
        };
        let mut participant = Participant::new(
            connection,
            Arc::new(federation.identity(i)?),
            Box::new(learner),
            options,
            guild_client::participant::ClientLedger::in_memory(),
        );
        participant.register().await?;
        tasks.push(tokio::spawn(async move { participant.run(|_| {}).await }));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flooders = Vec::new();
    for _ in 0..flood_streams {
        // A connection per loop: the per-connection concurrency limit does not bound it.
        let connection = federation.connect(clients).await?;
        flooders.push(tokio::spawn(flood(connection, dimension, stop.clone())));
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
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut flood_requests = 0;
    for flooder in flooders {
        flood_requests += tokio::time::timeout(Duration::from_secs(30), flooder)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
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
        noise: !dangerous_no_noise,
        wall_seconds: wall,
        rounds_per_minute: timed_rounds as f64 * 60.0 / wall,
        phase_seconds,
        coordinator_seconds_per_round: busy / rounds as f64,
        flood_streams,
        flood_requests,
        flood_rate_limited: counter(&text, "guild_requests_rate_limited_total").unwrap_or(0.0) as u64,
        peak_rss_mib: guild_client::peak_rss_mib(),
    })
}
