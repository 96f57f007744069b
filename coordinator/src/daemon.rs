//! Starting the daemon: store, engine, metrics endpoint and the mutual-TLS gRPC server,
//! from a validated [`Config`]. Used by `guild-coordinator serve` and, in-process, by the
//! simulator and the tests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::Config;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::service::{CoordinatorCore, CoordinatorService};
use crate::store::Store;
use guild_proto::pki::{self, FederationPki};

/// A running coordinator.
#[derive(Debug)]
pub struct Running {
    pub address: SocketAddr,
    pub metrics_address: Option<SocketAddr>,
    pub core: Arc<CoordinatorCore>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops serving (drops connections; the store stays consistent).
    pub fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Requests one client connection may have in flight at once (a merchant needs a task poll,
/// one phase message and an adapter download at most).
pub const MAX_REQUESTS_PER_CONNECTION: usize = 16;
/// Slack past a round's summed phase deadlines before a request is cut off.
const REQUEST_SLACK_SECONDS: u64 = 60;

/// Opens the store and starts serving; returns once the ports are bound.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let store = Arc::new(Store::open(&config.server.store)?);
    // Say what the configuration will do before any round runs, and refuse training that
    // would destroy the model (`plan::refuse`).
    let plan = crate::plan::plan(&config, store.allowed_count()?)?;
    crate::plan::refuse(&config, &plan).map_err(|reason| anyhow::anyhow!(reason))?;
    for warning in &plan.warnings {
        tracing::warn!("{warning}");
    }
    for k in &plan.kinds {
        tracing::info!(
            kind = ?k.kind,
            rounds = k.rounds,
            summands = k.expected_summands,
            noise_to_clip = k.noise_to_clip,
            epsilon = k.epsilon,
            "planned"
        );
    }
    let base_model = config.base_model_sha256()?;
    let federation_id = store.federation(base_model, rand::random())?;
    let metrics = Metrics::new();
    let engine = Arc::new(Engine::new(config.clone(), store.clone(), federation_id, metrics.clone())?);
    let core = Arc::new(CoordinatorCore::new(store, engine.clone(), federation_id, base_model));

    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(read(&config.tls.cert)?, read(&config.tls.key)?))
        .client_ca_root(Certificate::from_pem(read(&config.tls.ca)?));
    let d = engine.manifest().parameter_count().next_power_of_two();
    // Sized from this federation: its padded dimension and its largest cohort.
    let max_bytes = guild_proto::limits::max_message_bytes(d, config.rounds.max_cohort as usize);
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("binding {}", config.server.listen))?;
    let address = listener.local_addr()?;
    // No request outlives the longest legitimate long-poll (a whole round's deadlines), and
    // one connection holds a bounded number of requests in flight: a slow or flooding peer
    // ties up neither time nor tasks without bound.
    let longest_wait = Duration::from_millis(config.rounds.phase_deadlines_ms.iter().sum())
        + Duration::from_secs(REQUEST_SLACK_SECONDS);
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .context("configuring TLS")?
        .timeout(longest_wait)
        .concurrency_limit_per_connection(MAX_REQUESTS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(CoordinatorService::new(core.clone()).into_server(max_bytes, &config.server))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)));
    let mut tasks = vec![tokio::spawn(async move {
        if let Err(error) = server.await {
            tracing::error!(%error, "gRPC server stopped");
        }
    })];
    let mut metrics_address = None;
    if let Some(listen) = config.server.metrics_listen {
        let listener =
            Metrics::bind(listen).await.with_context(|| format!("binding the metrics port {listen}"))?;
        metrics_address = Some(listener.local_addr()?);
        tasks.push(tokio::spawn(async move {
            if let Err(error) = metrics.serve(listener).await {
                tracing::error!(%error, "metrics endpoint stopped");
            }
        }));
    }
    tasks.push(tokio::spawn(engine.run()));
    tracing::info!(%address, federation = %hex::encode(federation_id), "coordinator serving (mutual TLS)");
    Ok(Running { address, metrics_address, core, tasks })
}

/// A sample configuration for a federation initialised under `dir`.
pub fn sample_config(listen: SocketAddr) -> String {
    format!(
        r#"# Guild coordinator configuration. Every key can be overridden by an environment
# variable GUILD_<SECTION>__<KEY>, e.g. GUILD_ROUNDS__SAMPLING_RATE=0.2.
[server]
listen = "{listen}"
metrics_listen = "127.0.0.1:9464"
store = "guild.db"

[tls]
ca = "ca.pem"
cert = "server.pem"
key = "server.key"

[adapter]
rank = 8
alpha = 16.0
targets = ["query", "value"]
frozen_a_seed = 0

[rounds]
min_cohort = 3
threshold = 2
neighbours = 0
phase_deadlines_ms = [120000, 10000, 30000, 10000, 10000]
local_steps = 2
batch_size = 32
learning_rate = 0.001
server_optimizer = "fed_avg"
server_learning_rate = 1.0
# Uncomment to close a phase once 80% of its senders answered and the rest had half the time
# that took (at least 0.5 s), rather than wait out the deadline for a merchant that vanished;
# never below the threshold. Must come before the [rounds.*] tables, as here.
# early_close = {{ quorum = 0.8, grace_factor = 0.5, min_grace_ms = 500 }}
# A training round's noisy sum is shrunk per tensor by its positive-part James–Stein factor
# at the sum's known noise variance before the server step (free post-processing; "none"
# keeps the raw sum).
shrinkage = "james_stein"
# Each kind of round has its own noise multiplier z (the decoded sum carries N(0, (z·c)²) per
# coordinate) and sampling rate (of merchants, or of shoppers in the shopper unit).
[rounds.training]
noise_multiplier = 1.0
sampling_rate = 1.0
# Rounds that send a bounded statistic instead of training come first, each kind with its
# own count (sequence towers with a popularity prior only):
# [rounds.popularity_release]
# rounds = 1
# noise_multiplier = 10.0
# sampling_rate = 1.0
# (Without noise, `partition = true` makes the `rounds` releases take disjoint parts of the
# merchants instead of sampling: every merchant's statistics summed once, cohorts 1/rounds.)
# [rounds.pooling_selection]
# rounds = 1
# noise_multiplier = 10.0
# sampling_rate = 1.0

[privacy]
mode = "distributed"
clip_norm = 0.1
# Survivors that may collude against a merchant (add no noise, or reveal theirs) with the
# charged ε still holding: each client adds σ²/(t − c). Merchants refuse fewer than their floor.
tolerated_colluders = 3
epsilon_budget = 8.0
delta = 1e-5
"#
    )
}

/// A `guild-client run` configuration for merchant `name` (paths relative to `merchants/`),
/// connecting to `host` (a name the server certificate covers).
pub fn sample_client_config(name: &str, host: &str, listen: SocketAddr) -> String {
    format!(
        r#"# guild-client configuration of {name}. Point [data] at this merchant's behaviour data.
coordinator = "https://{host}:{port}"
display_name = "{name}"
identity = "{name}.signing"
[tls]
ca = "../ca.pem"
cert = "{name}.pem"
key = "{name}.key"
[data]
# A RecBole-format folder; `merchant` picks one shop of a public dataset's partition.
dataset = "data"
eval_users = 100
[guards]
# The privacy unit this merchant takes part in ("merchant" or "shopper"); it refuses the other.
unit = "merchant"
min_noise_multiplier = 0.5
# Refuse rounds that tolerate fewer colluding survivors than this (a round too small for it:
# as many as its threshold allows).
min_tolerated_colluders = 3
dangerous_send_unnoised_updates = false
# This merchant's own ε against the coordinator (its participations, no amplification by
# sampling), kept in its own append-only ledger; rounds past the cap are refused.
max_epsilon = 10.0
delta = 1e-6
ledger = "{name}.privacy-ledger"
dangerous_report_unnoised_metrics = false
[serve]
# `guild-client serve`: this shop's recommendations and search over HTTP/JSON, from the latest
# committed version (or `adapter = "folder"`, an export). No authentication: keep it internal.
listen = "127.0.0.1:8080"
refresh_seconds = 30
"#,
        port = listen.port()
    )
}

/// Issues a test federation's certificates under `dir` (the server's for `localhost`,
/// `127.0.0.1` and `server_names`), writes `guild.toml`, and creates the store with every
/// merchant's certificate on the allow-list; the merchants' sample configurations connect
/// to the first of `server_names` (`localhost` without one).
pub fn init_federation(
    dir: &Path,
    merchants: usize,
    listen: SocketAddr,
    server_names: &[String],
) -> anyhow::Result<FederationPki> {
    let config_path = dir.join("guild.toml");
    if config_path.exists() {
        anyhow::bail!("{} already exists; refusing to overwrite a federation", config_path.display());
    }
    let pki = pki::issue_for(merchants, server_names)?;
    // The first name asked for (checked by the issue above), as a URI's host.
    let host = match server_names.first().map(|n| n.trim().trim_end_matches('.').to_ascii_lowercase()) {
        Some(name) if name.parse::<std::net::Ipv6Addr>().is_ok() => format!("[{name}]"),
        Some(name) => name,
        None => "localhost".to_owned(),
    };
    pki.write(dir)?;
    std::fs::write(&config_path, sample_config(listen))
        .with_context(|| format!("writing {}", config_path.display()))?;
    let store = Store::open(&dir.join("guild.db"))?;
    for m in &pki.merchants {
        store.allow(&m.name, m.fingerprint())?;
        let client = dir.join("merchants").join(format!("{}.toml", m.name));
        std::fs::write(&client, sample_client_config(&m.name, &host, listen))
            .with_context(|| format!("writing {}", client.display()))?;
    }
    Ok(pki)
}
