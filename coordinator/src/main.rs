//! `guild-coordinator`: the daemon and its operator commands.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use guild_coordinator::config::Config;
use guild_coordinator::daemon;
use guild_coordinator::store::Store;
use guild_privacy::PrivacyUnit;
use guild_privacy::accounting::{
    Neighbours, RdpCurve, calibrate_noise_multiplier, epsilon_from_rdp, sampled_gaussian_curve,
};
use guild_privacy::ledger::{Budget, Ledger};

#[derive(Debug, Parser)]
#[command(name = "guild-coordinator", version, about = "Guild federated-learning coordinator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum QuarantineCommand {
    /// Every quarantined merchant with the round and reason it was named for (JSON).
    List {
        #[arg(long, env = "GUILD_CONFIG", default_value = "guild.toml")]
        config: PathBuf,
    },
    /// Let a quarantined merchant into cohorts again.
    Lift {
        #[arg(long, env = "GUILD_CONFIG", default_value = "guild.toml")]
        config: PathBuf,
        #[arg(long)]
        merchant: String,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator daemon.
    Serve {
        /// TOML configuration (keys overridable by GUILD_<SECTION>__<KEY> variables).
        #[arg(long, env = "GUILD_CONFIG", default_value = "guild.toml")]
        config: PathBuf,
    },
    /// Issue a CA and a server certificate, write guild.toml and a new store; with
    /// `--merchants N`, also N demo merchants (keys, certificates, configs, allow-listed).
    InitFederation {
        #[arg(long)]
        out: PathBuf,
        /// Demo merchants to make (0: none; real merchants make their own keys with
        /// `guild-client keygen` and are signed and allowed one by one).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000))]
        merchants: u64,
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// A host name or IP address merchants on other machines connect to (repeatable):
        /// the server certificate covers it besides `localhost` and `127.0.0.1`, and the
        /// sample merchant configurations use the first.
        #[arg(long = "server-name")]
        server_names: Vec<String>,
    },
    /// Issue a new server certificate and key for the names merchants connect to (host names
    /// or IP addresses; `localhost` and `127.0.0.1` are always included), signed by the
    /// federation's CA: `OUT/server.pem` and `OUT/server.key`, never overwritten. Point
    /// `[tls] cert` and `key` at them and restart the daemon.
    IssueServerCert {
        #[arg(long)]
        ca_cert: PathBuf,
        #[arg(long)]
        ca_key: PathBuf,
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a merchant's certificate request (made by `guild-client keygen`) as the
    /// federation's CA: the certificate keeps the request's name and the SecAgg+ signing key
    /// it binds. Run it where the CA key is kept; the coordinator daemon needs only
    /// `ca.pem`. Allow the certificate afterwards with `allow`.
    SignCsr {
        #[arg(long)]
        ca_cert: PathBuf,
        #[arg(long)]
        ca_key: PathBuf,
        #[arg(long)]
        csr: PathBuf,
        /// Where to write the certificate (PEM); never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// List the allow-list: every merchant, its certificate's SHA-256, and whether it is
    /// revoked (JSON).
    Allowed {
        #[arg(long, env = "GUILD_CONFIG", default_value = "guild.toml")]
        config: PathBuf,
    },
    /// Allow a merchant's certificate (PEM), replacing any earlier one. The certificate must
    /// be the federation CA's, for client authentication, binding a SecAgg+ key, and issued
    /// for this merchant id.
    Allow {
        #[arg(long, env = "GUILD_CONFIG", default_value = "guild.toml")]
        config: PathBuf,
        #[arg(long)]
        merchant: String,
        #[arg(long)]
        cert: PathBuf,
    },
    /// Revoke a merchant's certificate: its connections are refused from now on.
    Revoke {
        #[arg(long, env = "GUILD_CONFIG", default_value = "guild.toml")]
        config: PathBuf,
        #[arg(long)]
        merchant: String,
    },
    /// Merchants named as misbehaving in a round and kept out of cohorts: list them, or
    /// lift one's quarantine.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// Rounds, merchants, ε spent and the current phase, read from the store (JSON).
    Status {
        #[arg(long, env = "GUILD_CONFIG", default_value = "guild.toml")]
        config: PathBuf,
    },
    /// Write adapter version V as a Hugging Face PEFT adapter.
    ExportAdapter {
        #[arg(long, env = "GUILD_CONFIG", default_value = "guild.toml")]
        config: PathBuf,
        #[arg(long)]
        version: u64,
        #[arg(long)]
        out: PathBuf,
        /// Write the mean of the last K training versions up to V instead of V alone (tail
        /// averaging; the accumulated statistics are V's). 1: V itself.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        average_last: u64,
    },
    /// Privacy accounting for the Poisson-subsampled Gaussian (prints JSON).
    #[command(subcommand)]
    Privacy(PrivacyCommand),
}

#[derive(Debug, Subcommand)]
enum PrivacyCommand {
    /// ε(δ) after T rounds at sampling rate q and noise multiplier z.
    Epsilon {
        /// merchant: q is the coordinator's rate of sampling merchants; shopper: each
        /// merchant's rate of sampling its own shoppers.
        #[arg(long, default_value = "merchant")]
        unit: PrivacyUnit,
        #[arg(long, value_parser = sampling_rate)]
        sampling_rate: f64,
        #[arg(long, value_parser = positive)]
        noise_multiplier: f64,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        rounds: u64,
        #[arg(long, value_parser = delta)]
        delta: f64,
    },
    /// What the federation's configuration will do, before it runs: for each round kind,
    /// the rounds, the expected summands, the noise of the averaged update against the clip
    /// norm and the ε spent (JSON); `serve` refuses what this warns about when the server
    /// applies the raw noisy sum.
    Plan {
        #[arg(long, env = "GUILD_CONFIG", default_value = "guild.toml")]
        config: PathBuf,
        /// Merchants in the federation (default: those on the allow-list).
        #[arg(long)]
        merchants: Option<u64>,
    },
    /// The smallest noise multiplier z that keeps T rounds at rate q within ε at δ.
    NoiseMultiplier {
        #[arg(long, default_value = "merchant")]
        unit: PrivacyUnit,
        #[arg(long, value_parser = sampling_rate)]
        sampling_rate: f64,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        rounds: u64,
        #[arg(long, value_parser = delta)]
        delta: f64,
        #[arg(long, value_parser = positive)]
        target_epsilon: f64,
    },
}

fn number(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_finite() { Ok(v) } else { Err(format!("{s} is not finite")) }
}

fn sampling_rate(s: &str) -> Result<f64, String> {
    let q = number(s)?;
    if q > 0.0 && q <= 1.0 { Ok(q) } else { Err(format!("the sampling rate must be in (0, 1], got {q}")) }
}

fn positive(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v > 0.0 { Ok(v) } else { Err(format!("must be positive, got {v}")) }
}

fn delta(s: &str) -> Result<f64, String> {
    let d = number(s)?;
    if d > 0.0 && d < 1.0 { Ok(d) } else { Err(format!("δ must be in (0, 1), got {d}")) }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Colours only on a terminal: the daemon's log usually goes to a file or a journal.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("guild-coordinator: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn privacy(command: PrivacyCommand) -> anyhow::Result<serde_json::Value> {
    Ok(match command {
        PrivacyCommand::Plan { config, merchants } => {
            let config = load_config(&config)?;
            let merchants = match merchants {
                Some(n) => n,
                None => Store::open(&config.server.store)?.allowed_count()?,
            };
            let plan = guild_coordinator::plan::plan(&config, merchants)?;
            let mut value = serde_json::to_value(&plan)?;
            if let Err(reason) = guild_coordinator::plan::refuse(&config, &plan) {
                value["serve_refuses"] = serde_json::json!(reason);
            }
            value
        }
        PrivacyCommand::Epsilon { unit, sampling_rate, noise_multiplier, rounds, delta } => {
            let (epsilon, order) =
                epsilon_from_rdp(&model_curve(unit, sampling_rate, noise_multiplier)?.times(rounds), delta)?;
            serde_json::json!({
                "unit": unit,
                "epsilon": epsilon,
                "epsilon_against_coordinator": against_coordinator(unit, epsilon, noise_multiplier, rounds, delta)?,
                "delta": delta,
                "optimal_order": order,
                "sampling_rate": sampling_rate,
                "noise_multiplier": noise_multiplier,
                "rounds": rounds,
                "accountant": accountant(unit),
            })
        }
        PrivacyCommand::NoiseMultiplier { unit, sampling_rate, rounds, delta, target_epsilon } => {
            let z =
                calibrate_noise_multiplier(neighbours(unit), sampling_rate, rounds, delta, target_epsilon)?;
            let (epsilon, _) = epsilon_from_rdp(&model_curve(unit, sampling_rate, z)?.times(rounds), delta)?;
            serde_json::json!({
                "unit": unit,
                "noise_multiplier": z,
                "epsilon_against_coordinator": against_coordinator(unit, epsilon, z, rounds, delta)?,
                "epsilon": epsilon,
                "target_epsilon": target_epsilon,
                "delta": delta,
                "sampling_rate": sampling_rate,
                "rounds": rounds,
                "accountant": accountant(unit),
            })
        }
    })
}

/// One round's model-level RDP curve at noise multiplier z: a merchant under zero-out
/// adjacency (it takes its noise share with it when not sampled: the joint-convexity
/// bound), a shopper under add/remove (its merchant's share is there either way: the
/// subsampled Gaussian).
/// The neighbours of `unit`'s model-level accountant: merchants' noise is added by the
/// participants (zero-out), shoppers are added or removed.
fn neighbours(unit: PrivacyUnit) -> Neighbours {
    match unit {
        PrivacyUnit::Merchant => Neighbours::ZeroOut,
        PrivacyUnit::Shopper => Neighbours::AddRemove,
    }
}

fn model_curve(unit: PrivacyUnit, q: f64, z: f64) -> anyhow::Result<RdpCurve> {
    Ok(sampled_gaussian_curve(neighbours(unit), q, z)?)
}

fn accountant(unit: PrivacyUnit) -> &'static str {
    match unit {
        PrivacyUnit::Merchant => {
            "rdp at integer orders 2..=256: Gaussian, Poisson sampling amplified by joint convexity (zero-out neighbours)"
        }
        PrivacyUnit::Shopper => {
            "rdp at integer orders 2..=256: Poisson-subsampled Gaussian (add/remove neighbours)"
        }
    }
}

/// ε against the coordinator of `rounds` rounds at noise multiplier z: the model-level ε in
/// the shopper unit (merchants sample their shoppers in secret), and for a merchant in every
/// round without amplification in the merchant unit (the coordinator knows whom it sampled).
fn against_coordinator(
    unit: PrivacyUnit,
    epsilon: f64,
    z: f64,
    rounds: u64,
    delta: f64,
) -> anyhow::Result<f64> {
    Ok(match unit {
        PrivacyUnit::Shopper => epsilon,
        PrivacyUnit::Merchant => {
            epsilon_from_rdp(&sampled_gaussian_curve(Neighbours::AddRemove, 1.0, z)?.times(rounds), delta)?.0
        }
    })
}

fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    Ok(Config::load(path, std::env::vars())?)
}

fn status(config: &Config) -> anyhow::Result<serde_json::Value> {
    let store = Store::open(&config.server.store)?;
    let counts = store.round_counts()?;
    let budget = Budget { epsilon: config.privacy.epsilon_budget, delta: config.privacy.delta };
    let ledger = Ledger::new(budget, store.ledger()?)?;
    let spent = ledger.spent(PrivacyUnit::Merchant)?;
    let against = ledger.spent_against_sampler(PrivacyUnit::Merchant)?;
    let shopper = ledger.spent(PrivacyUnit::Shopper)?;
    let phase = match store.open_round_phase()? {
        Some((round, Some(phase))) => format!("round {round}: {phase}"),
        Some((round, None)) => format!("round {round}: committing"),
        None => "idle".to_owned(),
    };
    Ok(serde_json::json!({
        "merchants_registered": store.merchant_count()?,
        "merchants_allowed": store.allowed_count()?,
        "rounds_completed": counts.completed,
        "rounds_aborted": counts.aborted,
        "current_phase": phase,
        "latest_adapter_version": store.latest_adapter()?.map(|a| a.version),
        "epsilon_spent": spent.epsilon,
        // Against this coordinator, which knows whom it sampled: a merchant in every charged
        // round, no amplification (an upper bound; each merchant's own ledger is exact).
        "epsilon_against_coordinator_bound": against.epsilon,
        // Shopper-level rounds: merchants sample their own shoppers in secret, so this is
        // also the figure against the coordinator.
        "shopper_epsilon_spent": shopper.epsilon,
        "privacy_unit": config.privacy.unit,
        "epsilon_budget": budget.epsilon,
        "delta": budget.delta,
        // As the daemon decides it: whether the next round would take ε past the budget.
        "budget_exhausted": guild_coordinator::plan::next_round_exhausts(
            config,
            &ledger,
            store.latest_adapter()?.map_or(0, |a| a.version),
            store.allowed_count()?,
        )?,
        "quarantined": store.quarantined()?,
    }))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Privacy(command) => {
            println!("{}", privacy(command)?);
            Ok(())
        }
        Command::InitFederation { out, merchants, listen, server_names } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let pki = daemon::init_federation(&out, merchants as usize, listen, &server_names)?;
            let mut report = serde_json::json!({
                "config": out.join("guild.toml"),
                "ca": out.join("ca.pem"),
                "server_names": guild_proto::pki::server_names(&server_names)?,
                "merchants": pki.merchants.iter().map(|m| &m.name).collect::<Vec<_>>(),
            });
            if listen.ip().is_unspecified() && server_names.is_empty() {
                report["warning"] = serde_json::json!(format!(
                    "listening on {listen}, but the server certificate covers only localhost and 127.0.0.1: \
                     merchants on other machines cannot connect; pass --server-name HOST, or issue one later \
                     with `guild-coordinator issue-server-cert`"
                ));
            }
            println!("{report}");
            Ok(())
        }
        Command::IssueServerCert { ca_cert, ca_key, names, out } => {
            let read =
                |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
            let issuer = guild_proto::pki::issuer_from_pem(&read(&ca_cert)?, &read(&ca_key)?)
                .with_context(|| format!("{} with {}", ca_cert.display(), ca_key.display()))?;
            let issued = guild_proto::pki::issue_server(&issuer, &names)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let (cert, key) = (out.join("server.pem"), out.join("server.key"));
            for path in [&cert, &key] {
                anyhow::ensure!(
                    !path.exists(),
                    "{} already exists; refusing to overwrite it",
                    path.display()
                );
            }
            guild_proto::pki::write_new(&key, issued.key_pem.as_bytes(), true)?;
            guild_proto::pki::write_new(&cert, issued.cert_pem.as_bytes(), false)?;
            println!(
                "{}",
                serde_json::json!({
                    "certificate": cert,
                    "key": key,
                    "names": guild_proto::pki::server_names(&names)?,
                    "next": "set [tls] cert and key in the coordinator's configuration to these files and restart it; merchants connect with https://NAME:PORT",
                })
            );
            Ok(())
        }
        Command::SignCsr { ca_cert, ca_key, csr, out } => {
            let read =
                |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
            let issuer = guild_proto::pki::issuer_from_pem(&read(&ca_cert)?, &read(&ca_key)?)?;
            let issued = guild_proto::pki::sign_merchant_request(&read(&csr)?, &issuer)
                .with_context(|| format!("{}", csr.display()))?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&out)
                .with_context(|| format!("creating {} (it must not exist)", out.display()))?;
            std::io::Write::write_all(&mut file, issued.cert_pem.as_bytes())
                .and_then(|()| file.sync_all())
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "{}",
                serde_json::json!({
                    "merchant": issued.name,
                    "certificate": out,
                    "sha256": hex::encode(issued.fingerprint()),
                    "signing_public_key": guild_proto::certificate::signing_key_uri(
                        &guild_proto::certificate::bound_signing_key(&issued.cert_der)?
                    ),
                })
            );
            Ok(())
        }
        Command::Allowed { config } => {
            let store = Store::open(&load_config(&config)?.server.store)?;
            let list: Vec<serde_json::Value> = store
                .allow_list()?
                .into_iter()
                .map(|a| {
                    serde_json::json!({
                        "merchant": a.merchant_id,
                        "certificate_sha256": hex::encode(a.cert_sha256),
                        "revoked": a.revoked,
                        "added_at": a.added_at,
                    })
                })
                .collect();
            println!("{}", serde_json::json!({ "allowed": list }));
            Ok(())
        }
        Command::Allow { config, merchant, cert } => {
            let config = load_config(&config)?;
            let der = guild_proto::pki::read_cert_der(&cert)?;
            anyhow::ensure!(
                guild_proto::domain::MerchantId::parse(&merchant).is_some(),
                "merchant id {merchant:?} must be 1 to 128 ASCII letters, digits, '-', '_' or '.'"
            );
            let ca = guild_proto::pki::read_cert_der(&config.tls.ca)?;
            guild_proto::certificate::verify_member(&ca, &der)
                .with_context(|| format!("{} is refused", cert.display()))?;
            let name = guild_proto::certificate::common_name(&der)?;
            anyhow::ensure!(
                name == merchant,
                "{} was issued for {name:?}, not {merchant:?}: allowing it would let {name} register as {merchant}",
                cert.display()
            );
            Store::open(&config.server.store)?.allow(&merchant, guild_proto::pki::fingerprint(&der))?;
            println!("{}", serde_json::json!({ "allowed": merchant }));
            Ok(())
        }
        Command::Revoke { config, merchant } => {
            let config = load_config(&config)?;
            anyhow::ensure!(
                Store::open(&config.server.store)?.revoke(&merchant)?,
                "{merchant} is not on the allow-list"
            );
            println!("{}", serde_json::json!({ "revoked": merchant }));
            Ok(())
        }
        Command::Status { config } => {
            println!("{}", status(&load_config(&config)?)?);
            Ok(())
        }
        Command::Quarantine(QuarantineCommand::List { config }) => {
            let store = Store::open(&load_config(&config)?.server.store)?;
            println!("{}", serde_json::json!({ "quarantined": store.quarantined()? }));
            Ok(())
        }
        Command::Quarantine(QuarantineCommand::Lift { config, merchant }) => {
            let store = Store::open(&load_config(&config)?.server.store)?;
            anyhow::ensure!(store.lift_quarantine(&merchant)?, "{merchant} is not quarantined");
            println!("{}", serde_json::json!({ "lifted": merchant }));
            Ok(())
        }
        Command::ExportAdapter { config, version, out, average_last } => {
            let config = load_config(&config)?;
            let manifest = config.manifest()?;
            let store = Store::open(&config.server.store)?;
            let versions = store.adapter_versions()?;
            anyhow::ensure!(
                versions.contains(&version),
                "there is no adapter version {version}; the store holds {}",
                match (versions.first(), versions.last()) {
                    (Some(first), Some(last)) => format!("versions {first} to {last}"),
                    _ => "none".to_owned(),
                }
            );
            anyhow::ensure!(
                std::fs::read_dir(&out).map_or(true, |mut entries| entries.next().is_none()),
                "{} exists and is not empty; refusing to overwrite it",
                out.display()
            );
            let record = store.adapter(version)?;
            let (flat, averaged) = if average_last > 1 {
                let schedule = config.schedule(&manifest);
                let (flat, versions) = guild_coordinator::average::averaged_adapter(
                    &store,
                    &manifest,
                    schedule,
                    version,
                    average_last,
                )?;
                (flat, Some(versions))
            } else {
                (guild_proto::adapter::from_bytes(&record.data, manifest.parameter_count())?, None)
            };
            guild_proto::adapter::export(&out, &manifest, &flat)?;
            let averaged = averaged.map(|v| serde_json::json!({ "first": v.start(), "last": v.end() }));
            println!(
                "{}",
                serde_json::json!({
                    "version": version,
                    "sha256": hex::encode(record.sha256),
                    "averaged_versions": averaged,
                    "out": out,
                })
            );
            Ok(())
        }
        Command::Serve { config } => {
            let config = load_config(&config)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async move {
                let running = daemon::start(config).await?;
                tracing::info!(address = %running.address, metrics = ?running.metrics_address, "coordinator started");
                tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
                tracing::info!("shutting down");
                running.stop();
                Ok(())
            })
        }
    }
}
