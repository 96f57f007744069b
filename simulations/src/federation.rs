//! A test federation on loopback: certificates, a coordinator configuration and store in a
//! folder, the coordinator itself (in this process, or as a real `guild-coordinator`
//! child process that can be SIGKILLed and restarted), and mTLS connections for its
//! merchants.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use guild_client::net::{Connection, TlsCredentials};
use guild_coordinator::config::Config;
use guild_coordinator::daemon::{self, Running};
use guild_coordinator::store::Store;
use guild_proto::pki::FederationPki;

/// A federation's files, and its coordinator when running.
#[derive(Debug)]
pub struct Federation {
    pub dir: PathBuf,
    pub pki: FederationPki,
    pub config: Config,
    pub address: SocketAddr,
    in_process: Option<Running>,
    process: Option<Child>,
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

impl Federation {
    /// Issues certificates for `merchants`, writes the configuration (adjusted by `tweak`)
    /// and allow-lists every merchant, under `dir`.
    pub fn init(dir: &Path, merchants: usize, tweak: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let address = free_port()?;
        std::fs::create_dir_all(dir)?;
        // Absolute, so that the paths written into guild.toml mean the same from anywhere.
        let dir = &std::fs::canonicalize(dir)?;
        let pki = daemon::init_federation(dir, merchants, address, &[])?;
        let config_path = dir.join("guild.toml");
        let mut config = Config::load(&config_path, std::iter::empty())?;
        config.server.metrics_listen = Some(free_port()?);
        tweak(&mut config);
        config.validate()?;
        std::fs::write(&config_path, toml::to_string(&config)?)?;
        Ok(Self { dir: dir.to_owned(), pki, config, address, in_process: None, process: None })
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("guild.toml")
    }

    pub fn uri(&self) -> String {
        format!("https://127.0.0.1:{}", self.address.port())
    }

    /// Starts the coordinator inside this process.
    pub async fn start_in_process(&mut self) -> anyhow::Result<&Running> {
        let running = daemon::start(self.config.clone()).await?;
        Ok(self.in_process.insert(running))
    }

    pub fn in_process(&self) -> Option<&Running> {
        self.in_process.as_ref()
    }

    /// Starts `guild-coordinator serve` as a child process (its log goes to
    /// `coordinator.log` in the federation's folder) and waits until it accepts connections.
    pub async fn start_process(&mut self, binary: &Path) -> anyhow::Result<()> {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("coordinator.log"))?;
        let child = Command::new(binary)
            .args(["serve", "--config"])
            .arg(self.config_path())
            .env("RUST_LOG", std::env::var("GUILD_COORDINATOR_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        self.process = Some(child);
        let started = Instant::now();
        while tokio::net::TcpStream::connect(self.address).await.is_err() {
            if let Some(child) = &mut self.process
                && let Some(status) = child.try_wait()?
            {
                anyhow::bail!(
                    "the coordinator exited with {status}; see {}",
                    self.dir.join("coordinator.log").display()
                );
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "the coordinator did not start in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// SIGKILLs the coordinator process (no shutdown code runs) and reaps it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.process.take() {
            child.kill()?;
            child.wait()?;
        }
        if let Some(running) = self.in_process.take() {
            running.stop();
        }
        Ok(())
    }

    /// The store, opened beside the running coordinator (SQLite WAL allows it).
    pub fn store(&self) -> anyhow::Result<Store> {
        Ok(Store::open(&self.config.server.store)?)
    }

    pub fn credentials(&self, merchant: usize) -> TlsCredentials {
        let m = &self.pki.merchants[merchant];
        TlsCredentials {
            ca_pem: self.pki.ca.cert_pem.clone().into_bytes(),
            cert_pem: m.cert_pem.clone().into_bytes(),
            key_pem: m.key_pem.clone().into_bytes(),
            server_name: None,
        }
    }

    /// Merchant `merchant`'s (0-based) SecAgg+ signing key: the one its certificate binds.
    pub fn identity(&self, merchant: usize) -> anyhow::Result<guild_client::identity::Identity> {
        Ok(guild_client::identity::Identity::from_pkcs8(&self.pki.merchants[merchant].signing_pkcs8)?)
    }

    /// A connection as merchant `merchant` (0-based), retrying while the coordinator starts.
    pub async fn connect(&self, merchant: usize) -> anyhow::Result<Connection> {
        let d = self.config.manifest()?.parameter_count().next_power_of_two();
        let limit = guild_proto::limits::max_message_bytes(d, guild_proto::limits::MAX_COHORT);
        Ok(Connection::connect(&self.uri(), &self.credentials(merchant), limit).await?)
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// How fast this machine expands SecAgg+ masks, in keystream bytes per second on one core:
/// the time [`guild_privacy::secagg::crypto::apply_mask`] takes over 16 MiB, best of three.
pub fn mask_keystream_rate() -> f64 {
    let mut acc = vec![0u32; 1 << 22];
    let seed = [7u8; 32];
    let best = (0..3)
        .map(|_| {
            let started = Instant::now();
            guild_privacy::secagg::crypto::apply_mask(
                &mut acc,
                &seed,
                guild_privacy::secagg::crypto::MaskSign::Add,
                32,
            );
            started.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    (4 * acc.len()) as f64 / best.max(1e-9)
}

/// The phase deadlines of a federation whose clients all run on one machine of `cores`
/// cores: the configured ones, with the masked-input phase's raised to what the phase
/// does. In that phase each of `cohort` clients expands its self mask and one pairwise mask
/// per neighbour of the graph built from k = `neighbours` (`secagg::graph::share_holders`),
/// each `encoded_length` words (the vector as the round's mode encodes it,
/// `guild_privacy::dp::encoded_length`), before it can send; on
/// separate machines that takes each merchant a fraction of a second, but a simulated
/// cohort does it all on the same cores, beside the coordinator: a fixed deadline that a
/// loaded machine cannot meet aborts the round after every client has charged its ledger,
/// and the retry trains again. The phase gets 1 s plus three times the expansion's time at
/// `keystream_rate` bytes per second per core ([`mask_keystream_rate`]), if that is longer
/// than configured.
pub fn shared_machine_deadlines(
    configured_ms: [u64; guild_privacy::secagg::Phase::COUNT],
    encoded_length: usize,
    cohort: usize,
    neighbours: usize,
    cores: usize,
    keystream_rate: f64,
) -> [u64; guild_privacy::secagg::Phase::COUNT] {
    let degree = guild_privacy::secagg::graph::share_holders(
        u32::try_from(cohort).unwrap_or(u32::MAX),
        u32::try_from(neighbours).unwrap_or(u32::MAX),
    );
    let masks = cohort as f64 * f64::from(degree + 1);
    let seconds = masks * 4.0 * encoded_length as f64 / (keystream_rate * cores.max(1) as f64);
    let needed = 1_000 + (3_000.0 * seconds).ceil() as u64;
    let mut deadlines = configured_ms;
    let masked = guild_privacy::secagg::Phase::MaskedInput.index();
    deadlines[masked] = deadlines[masked].max(needed);
    deadlines
}

/// The `guild-coordinator` binary built beside the running executable (`target/<profile>/`).
pub fn coordinator_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable has no folder")?.to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let binary = dir.join("guild-coordinator");
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: build it with `cargo build -p guild-coordinator` (with --release for a release guild-sim)",
        binary.display()
    );
    // Run from the source tree it was built in, a binary older than a source it is built
    // from would run old code where the rest of the process runs new (`cargo test -p` and
    // `cargo build -p guild-sim` do not rebuild it).
    let built = std::fs::metadata(&binary).and_then(|m| m.modified()).ok();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_owned);
    if let (Some(built), Some(root)) = (built, root)
        && let Some((source, _)) = newer_source(&root, built)
    {
        anyhow::bail!(
            "{} is older than {}: rebuild it with `cargo build --workspace` (with --release for a release guild-sim)",
            binary.display(),
            source.display()
        );
    }
    Ok(binary)
}

/// A source file of the coordinator's crates under `root` (a workspace checkout) modified
/// after `built`, with its time; `None` when there is none or no such tree.
fn newer_source(root: &Path, built: std::time::SystemTime) -> Option<(PathBuf, std::time::SystemTime)> {
    fn walk(dir: &Path, built: std::time::SystemTime) -> Option<(PathBuf, std::time::SystemTime)> {
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                if let Some(found) = walk(&path, built) {
                    return Some(found);
                }
            } else if let Ok(modified) = meta.modified()
                && modified > built
                && path.extension().is_some_and(|e| e == "rs" || e == "proto")
            {
                return Some((path, modified));
            }
        }
        None
    }
    ["coordinator/src", "proto/src", "proto/proto", "privacy/src"]
        .iter()
        .find_map(|dir| walk(&root.join(dir), built))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A coordinator binary older than a source of its crates is named with that source;
    /// one built after every source, or without a source tree, passes.
    #[test]
    fn a_source_newer_than_the_binary_is_found() {
        let tree = tempfile::tempdir().expect("tempdir");
        let source = tree.path().join("coordinator/src/engine/driver.rs");
        std::fs::create_dir_all(source.parent().expect("folder")).expect("folders");
        std::fs::write(&source, "// code").expect("source");
        std::fs::write(tree.path().join("coordinator/src/notes.txt"), "").expect("other file");
        let written = std::fs::metadata(&source).and_then(|m| m.modified()).expect("mtime");
        let before = written - Duration::from_secs(60);
        assert_eq!(newer_source(tree.path(), before).map(|(p, _)| p), Some(source));
        assert_eq!(newer_source(tree.path(), written + Duration::from_secs(60)), None);
        assert_eq!(newer_source(&tree.path().join("nowhere"), before), None);
    }

    /// The masked-input deadline grows with the phase's work (cohort × masks × length over
    /// the cores) and never drops below what is configured; the other phases keep theirs.
    #[test]
    fn the_masked_input_deadline_follows_the_cohorts_masking_work() {
        let configured = [300_000, 3_000, 3_000, 3_000, 3_000];
        let gb = 1e9;
        // 26 clients, each with 25 neighbours, masking 2^21 words at 1 GB/s on 2 cores:
        // 26 · 26 · 8 MiB / 2 GB/s ≈ 2.84 s of work, so 1 s + 3 · 2.84 s.
        let raised = shared_machine_deadlines(configured, 1 << 21, 26, 25, 2, gb);
        let work = 26.0 * 26.0 * 4.0 * f64::from(1u32 << 21) / (2.0 * gb);
        assert_eq!(raised[2], 1_000 + (3_000.0 * work).ceil() as u64);
        assert_eq!([raised[0], raised[1], raised[3], raised[4]], [300_000, 3_000, 3_000, 3_000]);
        // Neighbours beyond the cohort do not count; twice the cores, about half the time.
        assert_eq!(shared_machine_deadlines(configured, 1 << 21, 26, 1_000, 2, gb), raised);
        let wider = shared_machine_deadlines(configured, 1 << 21, 26, 25, 4, gb);
        assert!(wider[2] < raised[2] && wider[2] > raised[2] / 2, "{wider:?}");
        // A small round needs less than configured: the configured deadline stands.
        assert_eq!(shared_machine_deadlines(configured, 64, 4, 3, 2, gb), configured);
    }

    /// The measured keystream rate is a rate: positive and finite.
    #[test]
    fn the_keystream_rate_is_measured() {
        let rate = mask_keystream_rate();
        assert!(rate.is_finite() && rate > 1e6, "{rate}");
    }
}
