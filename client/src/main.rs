//! `guild-client`: the merchant-side binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use guild_client::config::{AdapterSettings, ClientConfig};
use guild_client::identity::Identity;
use guild_client::learner::{Learner, ModelLearner, Shared, TowerLearner};
use guild_client::model::lora::LoraConfig;
use guild_client::model::tower::TowerConfig;
use guild_client::model::{BaseModel, default_model_dir};
use guild_client::net::{Connection, NetError, TlsCredentials};
use guild_client::participant::{Participant, ParticipantOptions};
use guild_proto::domain::{AdapterFamilyName, AdapterManifest};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, Parser)]
#[command(name = "guild-client", version, about = "Guild merchant client")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register, then take part in rounds until stopped: train on local data, privatise,
    /// take part in SecAgg+, evaluate each new adapter and report the counts.
    Run {
        #[arg(long, env = "GUILD_CLIENT_CONFIG", default_value = "merchant.toml")]
        config: PathBuf,
    },
    /// Serve the federation's model to this shop over HTTP/JSON: recommendations
    /// (`POST /v1/recommend`) and search (`POST /v1/search`) from the latest committed
    /// adapter version (or `[serve] adapter`, an exported folder), picking up new versions
    /// as the federation commits them; `/healthz`, `/metrics`, `/openapi.json`.
    Serve {
        #[arg(long, env = "GUILD_CLIENT_CONFIG", default_value = "merchant.toml")]
        config: PathBuf,
    },
    /// Print this merchant's catalogue digest and item count as JSON: the value of the
    /// coordinator's `adapter.catalogue_sha256`, which every merchant's catalogue must match.
    Catalogue {
        #[arg(long, env = "GUILD_CLIENT_CONFIG", default_value = "merchant.toml")]
        config: PathBuf,
    },
    /// Register with the coordinator and print the assigned id as JSON.
    Register {
        #[arg(long, env = "GUILD_CLIENT_CONFIG", default_value = "merchant.toml")]
        config: PathBuf,
    },
    /// Make this merchant's keys and the certificate request to send to the federation's
    /// CA: `NAME.signing` (the Ed25519 SecAgg+ signing key, PKCS#8), `NAME.key` (the TLS
    /// key, PEM) and `NAME.csr` (a request for a certificate binding the signing key). The
    /// private keys never leave this machine; existing files are never overwritten.
    Keygen {
        /// The merchant id the certificate will carry.
        #[arg(long)]
        name: String,
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

/// `guild-client keygen`: refuses to overwrite anything, writes the private keys readable
/// by the owner only, and prints the paths as JSON.
fn keygen(name: &str, out: &std::path::Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        guild_proto::domain::MerchantId::parse(name).is_some(),
        "merchant id {name:?} must be 1 to 128 ASCII letters, digits, '-', '_' or '.'"
    );
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (signing, key, csr) = (
        out.join(format!("{name}.signing")),
        out.join(format!("{name}.key")),
        out.join(format!("{name}.csr")),
    );
    for path in [&signing, &key, &csr] {
        anyhow::ensure!(
            !path.exists(),
            "{} already exists; refusing to overwrite a merchant's keys",
            path.display()
        );
    }
    let identity = Identity::load_or_create(&signing)?;
    let request = guild_proto::certificate::merchant_request(name, &identity.public_key())?;
    guild_proto::pki::write_new(&key, request.key_pem.as_bytes(), true)?;
    guild_proto::pki::write_new(&csr, request.csr_pem.as_bytes(), false)?;
    println!(
        "{}",
        serde_json::json!({
            "signing_key": signing,
            "tls_key": key,
            "certificate_request": csr,
            "signing_public_key": guild_proto::certificate::signing_key_uri(&identity.public_key()),
            "next": "send the .csr to the federation's CA (guild-coordinator sign-csr) and set tls.cert to the certificate it returns",
        })
    );
    Ok(())
}

fn main() -> ExitCode {
    guild_client::bound_allocator_memory();
    guild_client::init_logging("warn");
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("guild-client: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(config: &ClientConfig, tls: &TlsCredentials) -> Result<Connection, NetError> {
    Connection::connect(&config.coordinator, tls, guild_proto::limits::max_message_bytes(1 << 20, 10_000))
        .await
}

/// Connects, waiting with exponential backoff (up to a minute between tries) while the
/// coordinator is down; any other failure is returned.
async fn connect_with_retry(config: &ClientConfig, tls: &TlsCredentials) -> Result<Connection, NetError> {
    let mut backoff = Duration::from_secs(1);
    loop {
        match connect(config, tls).await {
            Err(e) if e.is_transient() => {
                eprintln!("guild-client: {e}; retrying in {} s", backoff.as_secs());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
            other => return other,
        }
    }
}

/// A spinner with the elapsed time and what the client is doing; hidden when standard
/// error is not a terminal (the per-round lines are printed either way).
fn spinner() -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The adapter this merchant trains or serves: its config's `[adapter]`, checked against
/// what the coordinator (or an exported folder) states, or learned from it; and its base
/// model held to the stated one (the catalogue is checked before the model loads).
fn adapter_for(
    config: &ClientConfig,
    stated: Option<&AdapterManifest>,
    base_model_sha256: [u8; 32],
    source: &str,
) -> anyhow::Result<AdapterSettings> {
    let settings = AdapterSettings::resolve(config.adapter.as_ref(), stated)
        .with_context(|| format!("the adapter of {source}"))?;
    if let Some(manifest) = stated {
        anyhow::ensure!(
            manifest.base_model_sha256 == base_model_sha256,
            "{source} adapts base model {}, this merchant's is {} (`[model] dir`)",
            hex::encode(manifest.base_model_sha256),
            hex::encode(base_model_sha256)
        );
    }
    Ok(settings)
}

/// What `run` and `serve` both start from, given the manifest `source` states: the
/// merchant's catalogue checked against it (before the model loads), the base model, the
/// adapter settings (`adapter_for`) and the catalogue's title vectors, whose size a tower
/// must read.
fn load_for(
    config: &ClientConfig,
    dataset: &guild_client::data::Dataset,
    stated: Option<AdapterManifest>,
    source: &str,
    device: tch::Device,
) -> anyhow::Result<(BaseModel, AdapterSettings, Option<AdapterManifest>, tch::Tensor)> {
    if let Some(manifest) = &stated {
        guild_client::config::check_catalogue(manifest, &dataset.item_ids)
            .with_context(|| format!("the catalogue of {source}"))?;
    }
    let model_dir = config.model.dir.clone().unwrap_or_else(default_model_dir);
    let base = BaseModel::load(&model_dir, config.model.max_tokens, device)?;
    let settings = adapter_for(config, stated.as_ref(), base.sha256(), source)?;
    let items = guild_client::retrieval::catalogue_embeddings(
        &base,
        dataset,
        &config.model.cache,
        config.model.max_tokens,
    )?;
    let hidden = items.size()[1] as usize;
    anyhow::ensure!(
        settings.family != AdapterFamilyName::SequenceTower || settings.tower.hidden == hidden,
        "the adapter's tower reads {}-value item vectors, but the catalogue's have {hidden} values",
        settings.tower.hidden
    );
    Ok((base, settings, stated, items))
}

/// `guild-client serve`: loads the catalogue, its title vectors and the adapter, then
/// answers until stopped.
async fn serve(config: ClientConfig) -> anyhow::Result<()> {
    use guild_client::serve::http::AppState;
    use guild_client::serve::{
        Catalogue, Engine, LoraSpec, ModelSpec, ServedModel, fetch_average, follow, served_versions,
    };
    let dataset = guild_client::data::Dataset::load(&config.data.dataset)?;
    // Where versions come from: `[serve] adapter` (one exported folder, or the folder of
    // kept versions), or the coordinator, asked first, so that one that cannot be reached,
    // or states another catalogue, is named before the model loads.
    enum From {
        Export(PathBuf),
        Coordinator { connection: Connection, latest: u64, training_from: u64 },
    }
    let (from, stated, source) = match config.serve.adapter.as_deref() {
        Some(dir) => {
            let dir = guild_client::serve::newest_kept(dir);
            let stated = guild_proto::adapter::read_tower_manifest(&dir)?;
            let source = dir.display().to_string();
            (From::Export(dir), stated, source)
        }
        None => {
            let tls = config.tls.credentials()?;
            let mut connection = connect_with_retry(&config, &tls).await?;
            let status = connection.status().await?;
            let from = From::Coordinator {
                connection,
                latest: status.latest_adapter_version,
                training_from: status.training_from_version,
            };
            (from, status.manifest, format!("the federation at {}", config.coordinator))
        }
    };
    // Queries are encoded on the CPU: one short text per request.
    let (base, a, stated, items) = load_for(&config, &dataset, stated, &source, tch::Device::Cpu)?;
    let tower = TowerConfig { shape: a.tower, seed: a.frozen_a_seed };
    let lora =
        LoraConfig { rank: a.rank, alpha: a.alpha, frozen_a_seed: a.frozen_a_seed, ..LoraConfig::default() };
    let (spec, manifest) = match a.family {
        AdapterFamilyName::SequenceTower => (
            ModelSpec::Tower(tower.clone()),
            stated
                .unwrap_or_else(|| AdapterManifest::sequence_tower(base.sha256(), a.tower, a.frozen_a_seed)),
        ),
        AdapterFamilyName::FfaLora => {
            let manifest = stated.unwrap_or_else(|| {
                guild_client::model::lora::Adapters::new(
                    lora.clone(),
                    base.config(),
                    base.sha256(),
                    base.device(),
                )
                .manifest()
            });
            let spec = LoraSpec {
                config: lora,
                model_dir: config.model.dir.clone().unwrap_or_else(default_model_dir),
                max_tokens: config.model.max_tokens,
                titles: dataset.titles.clone().into(),
            };
            (ModelSpec::Lora(spec), manifest)
        }
    };
    let catalogue = Arc::new(Catalogue::new(&dataset));
    let (model, connection) = match from {
        From::Export(dir) => {
            anyhow::ensure!(
                a.family == AdapterFamilyName::SequenceTower,
                "{source} is an exported FFA-LoRA adapter (a PEFT folder); guild-client serve reads exported \
                 sequence towers only, and serves FFA-LoRA from the coordinator (leave [serve] adapter out)"
            );
            (ServedModel::from_export(&dir, &manifest, tower, &items)?, None)
        }
        From::Coordinator { mut connection, latest, training_from } => {
            let versions = served_versions(latest, training_from, config.serve.average_last);
            let model =
                fetch_average(&mut connection, versions.clone(), &manifest, &spec, items.shallow_clone())
                    .await
                    .with_context(|| {
                        format!("loading adapter versions {versions:?} from {}", config.coordinator)
                    })?;
            if versions.start() != versions.end() {
                eprintln!("guild-client: the mean of adapter versions {} to {latest}", versions.start());
            }
            (model, Some(connection))
        }
    };
    let version = model.version;
    eprintln!(
        "guild-client: serving adapter version {} over {} items on http://{}",
        version,
        catalogue.len(),
        config.serve.listen
    );
    let engine = Arc::new(Engine::new(catalogue, model, Box::new(base), config.serve.personalisation));
    let state = Arc::new(AppState::new(engine));
    state.metrics.set_version(version);
    if let Some(connection) = connection {
        let period = Duration::from_secs(config.serve.refresh_seconds);
        let average_last = config.serve.average_last;
        tokio::spawn(follow(connection, state.clone(), manifest, spec, items, period, average_last));
    }
    let listener = tokio::net::TcpListener::bind(config.serve.listen)
        .await
        .with_context(|| format!("listening on {}", config.serve.listen))?;
    guild_client::serve::http::serve(listener, state).await.context("serving HTTP")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Keygen { name, out } => keygen(&name, &out),
        Command::Catalogue { config } => {
            let config = ClientConfig::load(&config)?;
            let dataset = guild_client::data::Dataset::load(&config.data.dataset)?;
            let digest = guild_proto::domain::catalogue_sha256(&dataset.item_ids);
            let shown = serde_json::json!({
                "items": dataset.item_ids.len(),
                "catalogue_sha256": hex::encode(digest),
            });
            println!("{shown}");
            Ok(())
        }
        Command::Register { config } => {
            let config = ClientConfig::load(&config)?;
            let tls = config.tls.credentials()?;
            let identity = Identity::load_or_create(&config.identity)?;
            let registered = runtime.block_on(async {
                let mut connection = connect(&config, &tls).await?;
                anyhow::Ok(connection.register(&config.display_name, &identity).await?)
            })?;
            println!(
                "{}",
                serde_json::json!({
                    "merchant_id": registered.merchant_id.as_str(),
                    "federation_id": hex::encode(registered.federation_id),
                    "training_device": format!("{:?}", guild_client::training_device()),
                })
            );
            Ok(())
        }
        Command::Serve { config } => {
            let config = ClientConfig::load(&config)?;
            runtime.block_on(serve(config))
        }
        Command::Run { config } => {
            let config = ClientConfig::load(&config)?;
            // Cheap checks first: a wrong certificate or data file is named before the
            // model loads.
            let tls = config.tls.credentials()?;
            let identity = Arc::new(Identity::load_or_create(&config.identity)?);
            let dataset = guild_client::data::Dataset::load(&config.data.dataset)?;
            let users: Vec<usize> = match &config.data.merchant {
                None => (0..dataset.users.len()).collect(),
                Some(name) => {
                    guild_client::data::partition(&dataset, config.data.shop_size, config.data.partition_seed)
                        .into_iter()
                        .find(|m| &m.name == name)
                        .with_context(|| {
                            format!(
                                "the dataset has no shop named {name} at shop size {}",
                                config.data.shop_size
                            )
                        })?
                        .users
                }
            };
            let device = guild_client::training_device();
            // Ask the coordinator which adapter it trains before the model loads: a
            // coordinator that cannot be reached, or states another catalogue, is named first.
            let mut connection = runtime.block_on(connect_with_retry(&config, &tls))?;
            let stated = runtime.block_on(connection.status())?.manifest;
            let source = format!("the federation at {}", config.coordinator);
            let (base, a, _, items) = load_for(&config, &dataset, stated, &source, device)?;
            eprintln!(
                "guild-client: {} shoppers, catalogue of {} items, training {:?} on {device:?}",
                users.len(),
                dataset.titles.len(),
                a.family
            );
            let shared = Arc::new(Mutex::new(Shared::new(base, dataset, items)));
            let learner: Box<dyn Learner> = match a.family {
                AdapterFamilyName::FfaLora => {
                    let lora = LoraConfig {
                        rank: a.rank,
                        alpha: a.alpha,
                        frozen_a_seed: a.frozen_a_seed,
                        ..LoraConfig::default()
                    };
                    Box::new(ModelLearner::new(shared, lora, users, config.data.eval_users, 0))
                }
                AdapterFamilyName::SequenceTower => {
                    let tower = TowerConfig { shape: a.tower, seed: a.frozen_a_seed };
                    Box::new(TowerLearner::new(shared, tower, users, config.data.eval_users, 0)?)
                }
            };
            let options = ParticipantOptions {
                display_name: config.display_name.clone(),
                min_noise_multiplier: config.guards.min_noise_multiplier,
                dangerous_send_unnoised_updates: config.guards.dangerous_send_unnoised_updates,
                max_rounds: config.guards.max_rounds,
                max_epsilon: config.guards.max_epsilon,
                max_shopper_sampling_rate: config.guards.max_shopper_sampling_rate,
                min_share_holders: config.guards.min_share_holders,
                min_tolerated_colluders: config.guards.min_tolerated_colluders,
                unit: config.guards.unit,
                delta: config.guards.delta,
                dangerous_report_unnoised_metrics: config.guards.dangerous_report_unnoised_metrics,
                keep_versions: (config.serve.keep_versions > 0)
                    .then(|| (config.serve.versions.clone(), config.serve.keep_versions)),
                ..Default::default()
            };
            let ledger = guild_client::participant::ClientLedger::open(&config.guards.ledger)?;
            eprintln!(
                "guild-client: privacy ledger {}: {} participations, ε against the coordinator {:.3} for this merchant and {:.3} for its shoppers (cap {}) at δ = {:e}",
                config.guards.ledger.display(),
                ledger.participations().len(),
                ledger.epsilon(guild_privacy::PrivacyUnit::Merchant, config.guards.delta),
                ledger.epsilon(guild_privacy::PrivacyUnit::Shopper, config.guards.delta),
                config.guards.max_epsilon,
                config.guards.delta
            );
            runtime.block_on(async {
                let mut participant = Participant::new(connection, identity, learner, options, ledger);
                let merchant = participant.register().await?;
                eprintln!("guild-client: registered as {merchant}; waiting for rounds");
                let bar = spinner();
                bar.set_message("waiting for a round");
                participant
                    .run(|result| {
                        let line = match result {
                            Ok(r) => {
                                bar.set_message(format!(
                                    "last round {} ({}); waiting for the next",
                                    r.round_id, r.outcome
                                ));
                                let validation = r.evaluation.as_ref().map_or(String::new(), |e| {
                                    let worse = e.worse_than.map_or(String::new(), |(v, before)| {
                                        format!(", WORSE than v{v}'s {before:.4} beyond noise")
                                    });
                                    format!(
                                        " | v{}: validation NDCG@10 {:.4} over {} of its shoppers{worse}",
                                        e.version,
                                        e.counts.ndcg_at_10(),
                                        e.counts.users
                                    )
                                });
                                format!(
                                    "round {:>4} | adapter v{} | {} | train {:.1} s | secagg {:.2} s | sent {} KiB{validation}",
                                    r.round_id,
                                    r.adapter_version,
                                    r.outcome,
                                    r.train_seconds,
                                    r.secagg_seconds,
                                    r.bytes_sent / 1024
                                )
                            }
                            Err(e) => format!("round skipped: {e}"),
                        };
                        bar.suspend(|| eprintln!("{line}"));
                    })
                    .await?;
                bar.finish_and_clear();
                anyhow::Ok(())
            })
        }
    }
}
