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
    Ok(binary)
}
