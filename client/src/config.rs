//! The merchant's configuration file (`guild-client run --config merchant.toml`). Relative
//! paths are taken relative to the file's folder.

use std::path::{Path, PathBuf};

use guild_proto::domain::AdapterFamilyName;
use guild_proto::tower::TowerShape;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// e.g. `https://127.0.0.1:50051`.
    pub coordinator: String,
    pub display_name: String,
    /// Ed25519 key that signs this merchant's SecAgg+ messages (created if absent).
    pub identity: PathBuf,
    pub tls: TlsFiles,
    pub data: DataConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub adapter: AdapterSettings,
    #[serde(default)]
    pub guards: Guards,
    #[serde(default)]
    pub serve: ServeConfig,
}

/// `guild-client serve`: the federated model's recommendations and search for this shop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Address of the HTTP interface. It has no authentication of its own: keep it on the
    /// shop's internal network (the default listens on loopback only).
    pub listen: std::net::SocketAddr,
    /// Serve this folder, written by `guild-coordinator export-adapter`, instead of the
    /// latest version committed at the coordinator (for a shop that is offline).
    pub adapter: Option<PathBuf>,
    /// Seconds between checks for a newer committed version (each is built beside the one
    /// serving, then swapped in).
    pub refresh_seconds: u64,
    /// Search: the weight of the shopper's recommendation score added to the query's
    /// cosine when a history is given ([`DEFAULT_PERSONALISATION`]).
    pub personalisation: f64,
}

/// Search's weight of the recommendation score: the weight the default scenario's search
/// evaluation chooses on validation shoppers for a trained adapter (`[arms] search_users`;
/// docs/results/README.md).
pub const DEFAULT_PERSONALISATION: f64 = 0.125;

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 8080)),
            adapter: None,
            refresh_seconds: 30,
            personalisation: DEFAULT_PERSONALISATION,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A RecBole-format folder (`NAME.item`, `NAME.valid.inter`, `NAME.test.inter`).
    pub dataset: PathBuf,
    /// Train on one shop of the dataset's partition (public demo data) instead of all of it.
    #[serde(default)]
    pub merchant: Option<String>,
    #[serde(default = "default_shop_size")]
    pub shop_size: usize,
    #[serde(default)]
    pub partition_seed: u64,
    /// Validation users evaluated after each round.
    #[serde(default = "default_eval_users")]
    pub eval_users: usize,
}

fn default_shop_size() -> usize {
    300
}

fn default_eval_users() -> usize {
    100
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Folder with `model.safetensors` and `tokenizer.json`; the project's venv by default.
    pub dir: Option<PathBuf>,
    pub max_tokens: usize,
    /// Where catalogue embeddings are cached.
    pub cache: PathBuf,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self { dir: None, max_tokens: 96, cache: ".cache".into() }
    }
}

/// Must equal the coordinator's `[adapter]` section, or tasks are refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterSettings {
    pub family: AdapterFamilyName,
    pub rank: i64,
    pub alpha: f64,
    /// Seeds FFA-LoRA's frozen A, or the sequence tower's initial values.
    pub frozen_a_seed: u64,
    /// The sequence tower's shape (with `family = "sequence_tower"`).
    pub tower: TowerShape,
}

impl Default for AdapterSettings {
    fn default() -> Self {
        Self {
            family: AdapterFamilyName::FfaLora,
            rank: 8,
            alpha: 16.0,
            frozen_a_seed: 0,
            tower: TowerShape::default(),
        }
    }
}

/// The merchant's own privacy guards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Guards {
    /// Refuse rounds whose noise multiplier is below this.
    pub min_noise_multiplier: f64,
    /// Take part in `central` and `dangerous_none` rounds, which have clients send
    /// un-noised (clipped, masked) updates.
    pub dangerous_send_unnoised_updates: bool,
    /// Stop after taking part in this many committed rounds (0: run until stopped). A round
    /// that aborts does not count (its privacy cost does: `max_epsilon` counts every
    /// participation).
    pub max_rounds: u64,
    /// Refuse a distributed-DP round that would take this merchant's own ε against the
    /// coordinator past this, at δ = `delta`: merchant-unit rounds composed without
    /// amplification (the coordinator performs that sampling), and, separately, its
    /// shoppers' ε over shopper-unit rounds, amplified by this merchant's own sampling.
    pub max_epsilon: f64,
    pub delta: f64,
    /// Refuse shopper-unit training rounds that ask this merchant to sample its shoppers at
    /// a higher rate than this (a popularity release, which trains nothing and sends only
    /// item sets, may sample every shopper; it is held to `max_epsilon` like any round).
    pub max_shopper_sampling_rate: f64,
    /// Refuse rounds whose neighbour graph gives this merchant fewer share holders than
    /// this (a smaller cohort's complete graph is accepted).
    pub min_share_holders: u32,
    /// Refuse distributed rounds that tolerate fewer colluding survivors (who may add no
    /// noise, or reveal theirs) than this; a round whose threshold cannot leave that many is
    /// held to as many as it can (`guild_privacy::cost::round_colluders`).
    pub min_tolerated_colluders: u32,
    /// The privacy unit this merchant takes part in (`merchant` or `shopper`); a round in
    /// the other unit is refused.
    pub unit: guild_privacy::PrivacyUnit,
    /// This merchant's append-only privacy ledger (created if absent).
    pub ledger: PathBuf,
    /// Report per-round evaluation counts on this merchant's validation shoppers to the
    /// coordinator. They are neither noised nor charged to a ledger.
    pub dangerous_report_unnoised_metrics: bool,
}

impl Default for Guards {
    fn default() -> Self {
        Self {
            min_noise_multiplier: 0.5,
            dangerous_send_unnoised_updates: false,
            max_rounds: 0,
            max_epsilon: crate::participant::DEFAULT_MAX_EPSILON,
            delta: crate::participant::DEFAULT_DELTA,
            max_shopper_sampling_rate: crate::participant::DEFAULT_MAX_SHOPPER_SAMPLING_RATE,
            min_share_holders: crate::participant::DEFAULT_MIN_SHARE_HOLDERS,
            min_tolerated_colluders: guild_privacy::cost::DEFAULT_TOLERATED_COLLUDERS,
            unit: guild_privacy::PrivacyUnit::Merchant,
            ledger: "privacy-ledger.txt".into(),
            dangerous_report_unnoised_metrics: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientConfigError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

impl ClientConfig {
    pub fn load(path: &Path) -> Result<Self, ClientConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ClientConfigError::Read { path: path.display().to_string(), source })?;
        let mut config: Self = toml::from_str(&text).map_err(|e| ClientConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        if config.guards.min_noise_multiplier.is_nan() || config.guards.min_noise_multiplier < 0.0 {
            return Err(ClientConfigError::Parse {
                path: path.display().to_string(),
                message: "guards.min_noise_multiplier must be ≥ 0".into(),
            });
        }
        let (cap, delta) = (config.guards.max_epsilon, config.guards.delta);
        if cap.is_nan() || cap <= 0.0 || delta.is_nan() || delta <= 0.0 || delta >= 1.0 {
            return Err(ClientConfigError::Parse {
                path: path.display().to_string(),
                message: "guards.max_epsilon must be > 0 and guards.delta in (0, 1)".into(),
            });
        }
        let w = config.serve.personalisation;
        if !(w.is_finite() && w >= 0.0) || config.serve.refresh_seconds == 0 {
            return Err(ClientConfigError::Parse {
                path: path.display().to_string(),
                message: format!(
                    "serve.personalisation must be finite and ≥ 0 (got {w}) and serve.refresh_seconds at least 1"
                ),
            });
        }
        let rate = config.guards.max_shopper_sampling_rate;
        if !(rate > 0.0 && rate <= 1.0) {
            return Err(ClientConfigError::Parse {
                path: path.display().to_string(),
                message: format!("guards.max_shopper_sampling_rate must be in (0, 1], got {rate}"),
            });
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut paths = vec![
            &mut config.identity,
            &mut config.tls.ca,
            &mut config.tls.cert,
            &mut config.tls.key,
            &mut config.data.dataset,
            &mut config.model.cache,
            &mut config.guards.ledger,
        ];
        if let Some(dir) = config.model.dir.as_mut() {
            paths.push(dir);
        }
        if let Some(dir) = config.serve.adapter.as_mut() {
            paths.push(dir);
        }
        for p in paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_follow_the_file_and_typos_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("merchant.toml");
        let text = r#"
            coordinator = "https://127.0.0.1:50051"
            display_name = "Shop"
            identity = "merchant.key"
            [tls]
            ca = "ca.pem"
            cert = "m.pem"
            key = "m.key"
            [data]
            dataset = "data"
        "#;
        std::fs::write(&path, text).expect("write");
        let config = ClientConfig::load(&path).expect("valid");
        assert_eq!(config.tls.ca, dir.path().join("ca.pem"));
        assert_eq!(
            config.guards,
            Guards { ledger: dir.path().join("privacy-ledger.txt"), ..Guards::default() }
        );
        std::fs::write(&path, text.replace("[data]", "[data]\ndatset = 1")).expect("write");
        let error = ClientConfig::load(&path).expect_err("typo").to_string();
        assert!(error.contains("datset") && error.contains("merchant.toml"), "{error}");
    }
}
