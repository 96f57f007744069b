//! The merchant's configuration file (`guild-client run --config merchant.toml`). Relative
//! paths are taken relative to the file's folder.

use std::path::{Path, PathBuf};

use guild_proto::domain::{AdapterFamily, AdapterFamilyName, AdapterManifest};
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
    /// The adapter the federation trains. Leave it out to take the coordinator's (its
    /// status states it); when given, it must equal the coordinator's or the client stops
    /// at start naming what differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterSettings>,
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
    /// Where `guild-client run` keeps every committed version it evaluates, each an exported
    /// folder `v{N}` (a sequence tower of the default scenario's shape is about 5.4 MB);
    /// `adapter` may name this folder to serve the newest kept.
    pub versions: PathBuf,
    /// How many of the newest versions `run` keeps there (0: none); older ones are removed.
    pub keep_versions: usize,
    /// Serve the mean of the last this many training versions the coordinator committed
    /// (tail averaging, as `guild-coordinator export-adapter --average-last` exports it)
    /// instead of the newest alone (1); each download's hash is checked. Versions from the
    /// coordinator only, not `adapter`.
    pub average_last: u64,
}

/// How many committed versions a merchant keeps by default (about 54 MB of the default tower).
pub const DEFAULT_KEEP_VERSIONS: usize = 10;

/// Search's weight of the recommendation score: the weight the default scenario's search
/// evaluation has chosen on validation shoppers for the federated adapter in every run since
/// the tower carried both collaborative signals (2026-12-06 (e) to 2026-12-07 (h), `[arms]
/// search_users`; the report's search table, `docs/results/default/summary.md`). It was
/// 0.125, the choice of the runs before.
pub const DEFAULT_PERSONALISATION: f64 = 0.25;

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 8080)),
            adapter: None,
            refresh_seconds: 30,
            personalisation: DEFAULT_PERSONALISATION,
            versions: "adapters".into(),
            keep_versions: DEFAULT_KEEP_VERSIONS,
            average_last: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The name the coordinator's certificate holds, when `coordinator` reaches it by
    /// another (an IP address, a proxy): the certificate is checked for this name instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

impl TlsFiles {
    /// Reads the three PEM files (each checked to hold what it should).
    pub fn credentials(&self) -> Result<crate::net::TlsCredentials, crate::net::NetError> {
        Ok(crate::net::TlsCredentials::load(&self.ca, &self.cert, &self.key)?
            .with_server_name(self.server_name.clone()))
    }
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

/// The coordinator's `[adapter]` section, as a merchant states it (or learns it from the
/// coordinator's manifest: [`AdapterSettings::resolve`]).
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

impl AdapterSettings {
    /// The settings a federation's manifest states.
    pub fn from_manifest(manifest: &AdapterManifest) -> Self {
        let defaults = Self::default();
        let (family, rank, alpha, tower) = match manifest.family {
            AdapterFamily::FfaLora => {
                (AdapterFamilyName::FfaLora, manifest.rank as i64, f64::from(manifest.alpha), defaults.tower)
            }
            AdapterFamily::SequenceTower(shape) => {
                (AdapterFamilyName::SequenceTower, defaults.rank, defaults.alpha, shape)
            }
        };
        Self { family, rank, alpha, frozen_a_seed: manifest.frozen_a_seed, tower }
    }

    /// Where these settings differ from what `manifest` states, one phrase each ("rank: 8
    /// here, 4 at the coordinator"); empty when they agree. A sequence tower's `rank` and
    /// `alpha` are not part of its manifest, and FFA-LoRA's tower shape is not.
    pub fn differences(&self, manifest: &AdapterManifest) -> Vec<String> {
        self.compare(&Self::from_manifest(manifest), "here", "at the coordinator")
    }

    /// Where `self` (called `ours`) differs from `theirs`, in the fields `theirs`'s family
    /// uses.
    pub fn compare(&self, theirs: &Self, ours: &str, their: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut differ = |what: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{what}: {a} {ours}, {b} {their}"));
            }
        };
        differ("family", format!("{:?}", self.family), format!("{:?}", theirs.family));
        differ("frozen_a_seed", self.frozen_a_seed.to_string(), theirs.frozen_a_seed.to_string());
        match theirs.family {
            AdapterFamilyName::FfaLora => {
                differ("rank", self.rank.to_string(), theirs.rank.to_string());
                differ("alpha", (self.alpha as f32).to_string(), (theirs.alpha as f32).to_string());
            }
            AdapterFamilyName::SequenceTower => {
                differ("tower", format!("{:?}", self.tower), format!("{:?}", theirs.tower));
            }
        }
        out
    }

    /// The adapter a merchant trains and serves: its own `[adapter]` section (`configured`)
    /// checked against the coordinator's manifest (`stated`), or learned from the manifest
    /// when the section is left out. Errors name what differs, or what is missing.
    pub fn resolve(
        configured: Option<&Self>,
        stated: Option<&AdapterManifest>,
    ) -> Result<Self, AdapterSettingsError> {
        match (configured, stated) {
            (Some(own), Some(manifest)) => {
                let differences = own.differences(manifest);
                if differences.is_empty() {
                    Ok(own.clone())
                } else {
                    Err(AdapterSettingsError::Differs(differences.join("; ")))
                }
            }
            (Some(own), None) => Ok(own.clone()),
            (None, Some(manifest)) => Ok(Self::from_manifest(manifest)),
            (None, None) => Err(AdapterSettingsError::Unstated),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdapterSettingsError {
    #[error(
        "this config's [adapter] differs from the federation's ({0}): remove [adapter] to take the coordinator's, or ask its operator which is meant"
    )]
    Differs(String),
    #[error(
        "the federation (its coordinator, or an exported folder) does not state its adapter (an older version): set [adapter] in this config to the coordinator's"
    )]
    Unstated,
    #[error(
        "this merchant's catalogue (SHA-256 {local}) is not the federation's ({stated}): every merchant must hold the same items in the same order (`guild-client catalogue --config FILE` prints a data folder's digest)"
    )]
    Catalogue { local: String, stated: String },
}

/// Checks a merchant's catalogue against the one `manifest` states (not checked when it
/// states none).
pub fn check_catalogue(manifest: &AdapterManifest, item_ids: &[u64]) -> Result<(), AdapterSettingsError> {
    let Some(stated) = manifest.catalogue_sha256 else { return Ok(()) };
    let local = guild_proto::domain::catalogue_sha256(item_ids);
    if local == stated {
        Ok(())
    } else {
        Err(AdapterSettingsError::Catalogue { local: hex::encode(local), stated: hex::encode(stated) })
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

/// A merchant's configuration file that could not be read or says something invalid.
pub type ClientConfigError = guild_proto::config_file::ConfigFileError;

impl ClientConfig {
    pub fn load(path: &Path) -> Result<Self, ClientConfigError> {
        let mut config: Self = guild_proto::config_file::load(path)?;
        let invalid = |message: String| ClientConfigError::invalid(path, message);
        if config.guards.min_noise_multiplier.is_nan() || config.guards.min_noise_multiplier < 0.0 {
            return Err(invalid("guards.min_noise_multiplier must be ≥ 0".into()));
        }
        let (cap, delta) = (config.guards.max_epsilon, config.guards.delta);
        if cap.is_nan() || cap <= 0.0 || delta.is_nan() || delta <= 0.0 || delta >= 1.0 {
            return Err(invalid("guards.max_epsilon must be > 0 and guards.delta in (0, 1)".into()));
        }
        let w = config.serve.personalisation;
        if !(w.is_finite() && w >= 0.0) || config.serve.refresh_seconds == 0 {
            return Err(invalid(format!(
                "serve.personalisation must be finite and ≥ 0 (got {w}) and serve.refresh_seconds at least 1"
            )));
        }
        if config.serve.average_last == 0 {
            return Err(invalid(
                "serve.average_last must be at least 1 (1: the newest version alone)".into(),
            ));
        }
        let rate = config.guards.max_shopper_sampling_rate;
        if !(rate > 0.0 && rate <= 1.0) {
            return Err(invalid(format!("guards.max_shopper_sampling_rate must be in (0, 1], got {rate}")));
        }
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
        paths.push(&mut config.serve.versions);
        guild_proto::config_file::resolve_relative(path, paths);
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paths in a merchant's config are relative to the file, not to where the client runs;
    /// a misspelt key is refused, naming the key and the file.
    #[test]
    fn relative_paths_follow_the_file_and_typos_are_named() {
        let (dir, path) = guild_testkit::scratch_path("merchant.toml");
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
        assert_eq!(config.adapter, None, "left out: learned from the coordinator");
        // Serving the mean of the last versions: 1 (the newest alone) unless set; 0 refused.
        assert_eq!(config.serve.average_last, 1);
        std::fs::write(&path, format!("{text}\n[serve]\naverage_last = 8\n")).expect("write");
        assert_eq!(ClientConfig::load(&path).expect("valid").serve.average_last, 8);
        std::fs::write(&path, format!("{text}\n[serve]\naverage_last = 0\n")).expect("write");
        let error = ClientConfig::load(&path).expect_err("no versions").to_string();
        assert!(error.contains("serve.average_last") && error.contains("merchant.toml"), "{error}");
    }

    fn tower_manifest(shape: TowerShape, seed: u64) -> AdapterManifest {
        AdapterManifest::sequence_tower([7; 32], shape, seed).with_catalogue(Some([9; 32]))
    }

    #[test]
    fn a_merchant_without_an_adapter_section_takes_the_coordinators() {
        let shape = TowerShape { catalogue: 100, neighbours: 4, ..TowerShape::tiny(100) };
        let manifest = tower_manifest(shape, 11);
        let learned = AdapterSettings::resolve(None, Some(&manifest)).expect("learned");
        assert_eq!(learned.family, AdapterFamilyName::SequenceTower);
        assert_eq!((learned.tower, learned.frozen_a_seed), (shape, 11));
        // What it learned builds the manifest it learned from.
        let rebuilt = AdapterManifest::sequence_tower([7; 32], learned.tower, learned.frozen_a_seed);
        assert_eq!(rebuilt.with_catalogue(manifest.catalogue_sha256), manifest);
        assert!(learned.differences(&manifest).is_empty());

        let lora = AdapterManifest {
            base_model_sha256: [7; 32],
            tensors: Vec::new(),
            rank: 4,
            alpha: 8.0,
            frozen_a_seed: 3,
            family: AdapterFamily::FfaLora,
            catalogue_sha256: None,
        };
        let learned = AdapterSettings::resolve(None, Some(&lora)).expect("learned");
        assert_eq!(
            (learned.family, learned.rank, learned.alpha, learned.frozen_a_seed),
            (AdapterFamilyName::FfaLora, 4, 8.0, 3)
        );
    }

    #[test]
    fn a_stated_adapter_that_differs_is_refused_naming_each_difference() {
        let shape = TowerShape::tiny(100);
        let manifest = tower_manifest(shape, 11);
        let own = AdapterSettings {
            family: AdapterFamilyName::SequenceTower,
            frozen_a_seed: 12,
            tower: TowerShape { layers: shape.layers + 1, ..shape },
            ..AdapterSettings::default()
        };
        let error = AdapterSettings::resolve(Some(&own), Some(&manifest)).expect_err("differs").to_string();
        assert!(error.contains("frozen_a_seed: 12 here, 11 at the coordinator"), "{error}");
        assert!(error.contains("tower:") && error.contains("remove [adapter]"), "{error}");
        let same = AdapterSettings { frozen_a_seed: 11, tower: shape, ..own.clone() };
        assert_eq!(AdapterSettings::resolve(Some(&same), Some(&manifest)).expect("agrees"), same);
        let lora = AdapterSettings::default();
        let error = AdapterSettings::resolve(Some(&lora), Some(&manifest)).expect_err("family").to_string();
        assert!(error.contains("family: FfaLora here, SequenceTower at the coordinator"), "{error}");
        // An older coordinator that states nothing: the config's own section, or an error.
        assert_eq!(AdapterSettings::resolve(Some(&lora), None).expect("own"), lora);
        let error = AdapterSettings::resolve(None, None).expect_err("nothing").to_string();
        assert!(error.contains("does not state its adapter"), "{error}");
    }

    #[test]
    fn a_catalogue_that_differs_from_the_federations_is_named_by_both_digests() {
        let ids = [5_u64, 6, 7];
        let digest = guild_proto::domain::catalogue_sha256(&ids);
        let manifest = AdapterManifest::sequence_tower([7; 32], TowerShape::tiny(3), 0);
        assert!(
            check_catalogue(&manifest, &[7, 6, 5]).is_ok(),
            "a federation that states none is not checked"
        );
        let manifest = manifest.with_catalogue(Some(digest));
        assert!(check_catalogue(&manifest, &ids).is_ok());
        let error = check_catalogue(&manifest, &[7, 6, 5]).expect_err("reordered").to_string();
        let local = hex::encode(guild_proto::domain::catalogue_sha256(&[7, 6, 5]));
        assert!(error.contains(&local) && error.contains(&hex::encode(digest)), "{error}");
    }
}
