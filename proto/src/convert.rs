//! Wire ↔ domain conversions. Wire → domain is a `TryFrom` that validates every field and
//! names the first bad one; domain → wire is a plain `From`.

use std::time::Duration;

use guild_privacy::secagg::message as sa;
use guild_privacy::{PrivacyMode, PrivacyUnit};

use crate::domain::*;
use crate::error::{Field, WireError};
use crate::limits::*;
use crate::round::RoundKind;
use crate::tower::TowerShape;
use crate::v1;

type Result<T> = std::result::Result<T, WireError>;

fn fixed<const N: usize>(bytes: &[u8], field: &'static str) -> Result<[u8; N]> {
    bytes.try_into().map_err(|_| WireError::Length { field: Field(field), expected: N, actual: bytes.len() })
}

fn index(value: u32, field: &'static str) -> Result<sa::ClientIndex> {
    sa::ClientIndex::new(value).ok_or_else(|| WireError::invalid(field, "client index 0 is reserved"))
}

fn bounded<T>(items: &[T], max: usize, field: &'static str) -> Result<()> {
    if items.len() > max {
        return Err(WireError::TooMany { field: Field(field), max, actual: items.len() });
    }
    Ok(())
}

fn required<T>(value: Option<T>, field: &'static str) -> Result<T> {
    value.ok_or(WireError::missing(field))
}

fn positive_finite(value: f64, field: &'static str) -> Result<f64> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(WireError::invalid(field, format!("must be a positive finite number, got {value}")))
    }
}

fn non_negative_finite(value: f64, field: &'static str) -> Result<f64> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(WireError::invalid(field, format!("must be a finite number ≥ 0, got {value}")))
    }
}

fn merchant_id(id: &str, field: &'static str) -> Result<MerchantId> {
    MerchantId::parse(id)
        .ok_or_else(|| WireError::invalid(field, "must be 1 to 128 ASCII letters, digits, '-', '_' or '.'"))
}

// ---------------------------------------------------------------- registration

impl TryFrom<v1::RegisterRequest> for Registration {
    type Error = WireError;
    fn try_from(m: v1::RegisterRequest) -> Result<Self> {
        if m.protocol_version != crate::PROTOCOL_VERSION {
            return Err(WireError::invalid(
                "RegisterRequest.protocol_version",
                format!(
                    "this coordinator speaks version {}, the client {}",
                    crate::PROTOCOL_VERSION,
                    m.protocol_version
                ),
            ));
        }
        let name = m.display_name.trim();
        if name.is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
            return Err(WireError::invalid(
                "RegisterRequest.display_name",
                "must be 1 to 128 bytes of printable text",
            ));
        }
        Ok(Self {
            display_name: name.to_owned(),
            signing_public_key: fixed(&m.signing_public_key, "RegisterRequest.signing_public_key")?,
        })
    }
}

impl From<Registration> for v1::RegisterRequest {
    fn from(r: Registration) -> Self {
        Self {
            display_name: r.display_name,
            signing_public_key: r.signing_public_key.to_vec(),
            protocol_version: crate::PROTOCOL_VERSION,
        }
    }
}

impl TryFrom<v1::RegisterResponse> for Registered {
    type Error = WireError;
    fn try_from(m: v1::RegisterResponse) -> Result<Self> {
        Ok(Self {
            merchant_id: merchant_id(&m.merchant_id, "RegisterResponse.merchant_id")?,
            federation_id: fixed(&m.federation_id, "RegisterResponse.federation_id")?,
            base_model_sha256: fixed(&m.base_model_sha256, "RegisterResponse.base_model_sha256")?,
        })
    }
}

impl From<Registered> for v1::RegisterResponse {
    fn from(r: Registered) -> Self {
        Self {
            merchant_id: r.merchant_id.0,
            federation_id: r.federation_id.to_vec(),
            base_model_sha256: r.base_model_sha256.to_vec(),
        }
    }
}

// ---------------------------------------------------------------- tasks

impl TryFrom<v1::GetTaskRequest> for TaskPoll {
    type Error = WireError;
    fn try_from(m: v1::GetTaskRequest) -> Result<Self> {
        let wait = Duration::from_millis(u64::from(m.wait_millis));
        if wait > MAX_TASK_WAIT {
            return Err(WireError::invalid(
                "GetTaskRequest.wait_millis",
                format!("at most {} ms", MAX_TASK_WAIT.as_millis()),
            ));
        }
        Ok(Self { merchant_id: merchant_id(&m.merchant_id, "GetTaskRequest.merchant_id")?, wait })
    }
}

impl From<TaskPoll> for v1::GetTaskRequest {
    fn from(p: TaskPoll) -> Self {
        Self {
            merchant_id: p.merchant_id.0,
            wait_millis: u32::try_from(p.wait.as_millis()).unwrap_or(u32::MAX),
        }
    }
}

impl TryFrom<v1::GetTaskResponse> for Task {
    type Error = WireError;
    fn try_from(m: v1::GetTaskResponse) -> Result<Self> {
        match required(m.task, "GetTaskResponse.task")? {
            v1::get_task_response::Task::Wait(w) => Ok(Task::Wait {
                retry_after: Duration::from_millis(u64::from(w.retry_after_millis)),
                reason: w.reason,
            }),
            v1::get_task_response::Task::Round(r) => Ok(Task::Round(Box::new(r.try_into()?))),
        }
    }
}

impl From<Task> for v1::GetTaskResponse {
    fn from(t: Task) -> Self {
        let task = match t {
            Task::Wait { retry_after, reason } => v1::get_task_response::Task::Wait(v1::Wait {
                retry_after_millis: u32::try_from(retry_after.as_millis()).unwrap_or(u32::MAX),
                reason,
            }),
            Task::Round(r) => v1::get_task_response::Task::Round((*r).into()),
        };
        Self { task: Some(task) }
    }
}

impl TryFrom<v1::AdapterManifest> for AdapterManifest {
    type Error = WireError;
    fn try_from(m: v1::AdapterManifest) -> Result<Self> {
        bounded(&m.tensors, MAX_MANIFEST_TENSORS, "AdapterManifest.tensors")?;
        let mut total: usize = 0;
        let mut tensors = Vec::with_capacity(m.tensors.len());
        for t in m.tensors {
            if t.name.is_empty() || t.name.len() > 256 {
                return Err(WireError::invalid("AdapterManifest.tensors.name", "must be 1 to 256 bytes"));
            }
            if t.shape.is_empty() || t.shape.len() > 4 || t.shape.contains(&0) {
                return Err(WireError::invalid(
                    "AdapterManifest.tensors.shape",
                    format!("tensor {} has shape {:?}: 1 to 4 non-zero dimensions", t.name, t.shape),
                ));
            }
            let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
            let size = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            total = size.and_then(|s| total.checked_add(s)).filter(|&t| t <= MAX_VECTOR_LENGTH).ok_or_else(
                || {
                    WireError::invalid(
                        "AdapterManifest.tensors",
                        format!("more than {MAX_VECTOR_LENGTH} parameters"),
                    )
                },
            )?;
            tensors.push(ManifestTensor { name: t.name, shape });
        }
        if m.rank == 0 {
            return Err(WireError::invalid("AdapterManifest.rank", "must be at least 1"));
        }
        let family = match (m.family.as_str(), m.tower) {
            ("" | "ffa_lora", None) => AdapterFamily::FfaLora,
            ("sequence_tower", Some(t)) => {
                let shape = TowerShape {
                    hidden: t.hidden as usize,
                    history: t.history as usize,
                    zero_shot_items: t.zero_shot_items as usize,
                    item_rank: t.item_rank as usize,
                    width: t.width as usize,
                    layers: t.layers as usize,
                    heads: t.heads as usize,
                    catalogue: t.catalogue as usize,
                };
                shape.validate().map_err(|reason| WireError::invalid("AdapterManifest.tower", reason))?;
                let expected: Vec<ManifestTensor> = crate::tower::tensors(&shape)
                    .into_iter()
                    .map(|t| ManifestTensor { name: t.name, shape: t.shape })
                    .collect();
                if expected != tensors {
                    return Err(WireError::invalid(
                        "AdapterManifest.tensors",
                        "they are not the tensors of the sequence tower the manifest describes",
                    ));
                }
                AdapterFamily::SequenceTower(shape)
            }
            (family, tower) => {
                return Err(WireError::invalid(
                    "AdapterManifest.family",
                    format!(
                        "{family:?} with{} a tower shape: expected \"ffa_lora\" without one or \"sequence_tower\" with one",
                        if tower.is_some() { "" } else { "out" }
                    ),
                ));
            }
        };
        Ok(Self {
            base_model_sha256: fixed(&m.base_model_sha256, "AdapterManifest.base_model_sha256")?,
            tensors,
            rank: m.rank as usize,
            alpha: positive_finite(f64::from(m.alpha), "AdapterManifest.alpha")? as f32,
            frozen_a_seed: m.frozen_a_seed,
            family,
        })
    }
}

impl From<AdapterManifest> for v1::AdapterManifest {
    fn from(m: AdapterManifest) -> Self {
        Self {
            base_model_sha256: m.base_model_sha256.to_vec(),
            tensors: m
                .tensors
                .into_iter()
                .map(|t| v1::AdapterManifestEntry {
                    name: t.name,
                    shape: t.shape.iter().map(|&d| d as u32).collect(),
                })
                .collect(),
            rank: m.rank as u32,
            alpha: m.alpha,
            frozen_a_seed: m.frozen_a_seed,
            family: match m.family {
                AdapterFamily::FfaLora => "ffa_lora".into(),
                AdapterFamily::SequenceTower(_) => "sequence_tower".into(),
            },
            tower: match m.family {
                AdapterFamily::FfaLora => None,
                AdapterFamily::SequenceTower(t) => Some(v1::TowerShape {
                    hidden: t.hidden as u32,
                    history: t.history as u32,
                    zero_shot_items: t.zero_shot_items as u32,
                    item_rank: t.item_rank as u32,
                    width: t.width as u32,
                    layers: t.layers as u32,
                    heads: t.heads as u32,
                    catalogue: t.catalogue as u32,
                }),
            },
        }
    }
}

/// The round's task digest: SHA-256 (domain-separated) of the task's wire encoding with
/// what differs between its clients (`my_index`, `data_seed`) and the digest itself zeroed.
/// Prost encodes a message deterministically (fields in tag order, no maps), so the
/// coordinator and every client compute the same bytes from the same task.
pub fn task_digest(task: &RoundTask) -> [u8; 32] {
    use prost::Message;
    use sha2::Digest;
    let mut wire = v1::RoundTask::from(task.clone());
    wire.task_sha256.clear();
    if let Some(t) = wire.training.as_mut() {
        t.data_seed = 0;
    }
    if let Some(s) = wire.secagg.as_mut() {
        s.my_index = 0;
    }
    let mut hasher = sha2::Sha256::new();
    hasher.update(b"guild/v1/round-task\0");
    hasher.update(wire.encode_to_vec());
    hasher.finalize().into()
}

fn round_kind(kind: i32) -> Result<RoundKind> {
    match v1::RoundKind::try_from(kind) {
        Ok(v1::RoundKind::Training) => Ok(RoundKind::Training),
        Ok(v1::RoundKind::PopularityRelease) => Ok(RoundKind::PopularityRelease),
        Ok(v1::RoundKind::PoolingSelection) => Ok(RoundKind::PoolingSelection),
        Ok(v1::RoundKind::Unspecified) | Err(_) => {
            Err(WireError::invalid("RoundTask.training.kind", format!("unknown round kind {kind}")))
        }
    }
}

fn round_kind_to_wire(kind: RoundKind) -> v1::RoundKind {
    match kind {
        RoundKind::Training => v1::RoundKind::Training,
        RoundKind::PopularityRelease => v1::RoundKind::PopularityRelease,
        RoundKind::PoolingSelection => v1::RoundKind::PoolingSelection,
    }
}

fn privacy_mode(mode: i32) -> Result<PrivacyMode> {
    match v1::PrivacyMode::try_from(mode) {
        Ok(v1::PrivacyMode::Distributed) => Ok(PrivacyMode::Distributed),
        Ok(v1::PrivacyMode::Central) => Ok(PrivacyMode::Central),
        Ok(v1::PrivacyMode::Local) => Ok(PrivacyMode::Local),
        Ok(v1::PrivacyMode::DangerousNone) => Ok(PrivacyMode::DangerousNone),
        Ok(v1::PrivacyMode::Unspecified) | Err(_) => {
            Err(WireError::invalid("PrivacyParams.mode", format!("unknown privacy mode {mode}")))
        }
    }
}

/// The unit, and the shopper sampling rate it needs: in (0, 1] for shoppers, 0 for merchants.
fn privacy_unit(unit: i32, shopper_sampling_rate: f64) -> Result<PrivacyUnit> {
    let unit = match v1::PrivacyUnit::try_from(unit) {
        Ok(v1::PrivacyUnit::Merchant) => PrivacyUnit::Merchant,
        Ok(v1::PrivacyUnit::Shopper) => PrivacyUnit::Shopper,
        Ok(v1::PrivacyUnit::Unspecified) | Err(_) => {
            return Err(WireError::invalid("PrivacyParams.unit", format!("unknown privacy unit {unit}")));
        }
    };
    let q = shopper_sampling_rate;
    let valid = match unit {
        PrivacyUnit::Merchant => q == 0.0,
        PrivacyUnit::Shopper => q > 0.0 && q <= 1.0,
    };
    if !valid {
        return Err(WireError::invalid(
            "RoundTask.privacy.shopper_sampling_rate",
            format!("must be in (0, 1] in the shopper unit and 0 in the merchant unit, got {q} for {unit}"),
        ));
    }
    Ok(unit)
}

fn privacy_unit_to_wire(unit: PrivacyUnit) -> v1::PrivacyUnit {
    match unit {
        PrivacyUnit::Merchant => v1::PrivacyUnit::Merchant,
        PrivacyUnit::Shopper => v1::PrivacyUnit::Shopper,
    }
}

fn privacy_mode_to_wire(mode: PrivacyMode) -> v1::PrivacyMode {
    match mode {
        PrivacyMode::Distributed => v1::PrivacyMode::Distributed,
        PrivacyMode::Central => v1::PrivacyMode::Central,
        PrivacyMode::Local => v1::PrivacyMode::Local,
        PrivacyMode::DangerousNone => v1::PrivacyMode::DangerousNone,
    }
}

impl TryFrom<v1::RoundTask> for RoundTask {
    type Error = WireError;
    fn try_from(m: v1::RoundTask) -> Result<Self> {
        let binding = sa::RoundBinding {
            federation_id: fixed(&m.federation_id, "RoundTask.federation_id")?,
            round_id: m.round_id,
            adapter_sha256: fixed(&m.adapter_sha256, "RoundTask.adapter_sha256")?,
            task_sha256: fixed(&m.task_sha256, "RoundTask.task_sha256")?,
        };
        let manifest: AdapterManifest = required(m.manifest, "RoundTask.manifest")?.try_into()?;

        let t = required(m.training, "RoundTask.training")?;
        if t.local_steps == 0 || t.batch_size == 0 {
            return Err(WireError::invalid(
                "RoundTask.training",
                "local_steps and batch_size must be at least 1",
            ));
        }
        if t.negatives > MAX_NEGATIVES {
            return Err(WireError::invalid(
                "RoundTask.training.negatives",
                format!("{} is above the limit of {}", t.negatives, MAX_NEGATIVES),
            ));
        }
        let kind = round_kind(t.kind)?;
        if let Some(why) = kind.unsupported_by(&manifest) {
            return Err(WireError::invalid("RoundTask.training.kind", format!("a {kind}, but {why}")));
        }
        let training = TrainingParams {
            local_steps: t.local_steps,
            batch_size: t.batch_size,
            learning_rate: positive_finite(f64::from(t.learning_rate), "RoundTask.training.learning_rate")?
                as f32,
            data_seed: t.data_seed,
            negatives: t.negatives,
            kind,
        };

        let p = required(m.privacy, "RoundTask.privacy")?;
        let mode = privacy_mode(p.mode)?;
        let unit = privacy_unit(p.unit, p.shopper_sampling_rate)?;
        if !(1..=32).contains(&p.bit_width) {
            return Err(WireError::invalid(
                "RoundTask.privacy.bit_width",
                format!("must be 1..=32, got {}", p.bit_width),
            ));
        }
        let privacy = PrivacyParams {
            mode,
            clip_norm: positive_finite(p.clip_norm, "RoundTask.privacy.clip_norm")?,
            noise_multiplier: non_negative_finite(p.noise_multiplier, "RoundTask.privacy.noise_multiplier")?,
            gamma: positive_finite(p.gamma, "RoundTask.privacy.gamma")?,
            bit_width: p.bit_width,
            min_survivors: p.min_survivors,
            rotation_seed: p.rotation_seed,
            unit,
            shopper_sampling_rate: p.shopper_sampling_rate,
        };

        let s = required(m.secagg, "RoundTask.secagg")?;
        let cohort = s.cohort_size as usize;
        if cohort == 0 || cohort > MAX_COHORT {
            return Err(WireError::invalid(
                "RoundTask.secagg.cohort_size",
                format!("must be 1..={MAX_COHORT}, got {cohort}"),
            ));
        }
        if s.my_index as usize > cohort {
            return Err(WireError::invalid("RoundTask.secagg.my_index", "beyond the cohort size"));
        }
        if s.neighbours == 0 || s.neighbours as usize >= cohort.max(2) {
            return Err(WireError::invalid("RoundTask.secagg.neighbours", "must be 1..cohort_size"));
        }
        if s.threshold == 0 || s.threshold > s.neighbours + 1 {
            return Err(WireError::invalid("RoundTask.secagg.threshold", "must be 1..=neighbours + 1"));
        }
        if s.vector_length == 0 || s.vector_length as usize > MAX_VECTOR_LENGTH {
            return Err(WireError::invalid(
                "RoundTask.secagg.vector_length",
                format!("must be 1..={MAX_VECTOR_LENGTH}"),
            ));
        }
        if s.vector_length as usize != manifest.parameter_count().next_power_of_two() {
            return Err(WireError::invalid(
                "RoundTask.secagg.vector_length",
                format!(
                    "{} does not match the manifest's {} parameters padded to a power of two",
                    s.vector_length,
                    manifest.parameter_count()
                ),
            ));
        }
        if s.phase_deadline_millis.len() != 5 {
            return Err(WireError::invalid(
                "RoundTask.secagg.phase_deadline_millis",
                "one deadline per SecAgg+ phase (5)",
            ));
        }
        let secagg = SecAggParams {
            my_index: index(s.my_index, "RoundTask.secagg.my_index")?,
            cohort_size: s.cohort_size,
            threshold: s.threshold,
            neighbours: s.neighbours,
            vector_length: s.vector_length,
            phase_deadlines: s
                .phase_deadline_millis
                .iter()
                .map(|&ms| Duration::from_millis(u64::from(ms)))
                .collect(),
        };
        if m.cohort.len() != secagg.cohort_size as usize {
            return Err(WireError::invalid(
                "RoundTask.cohort",
                format!("lists {} members for a cohort of {}", m.cohort.len(), secagg.cohort_size),
            ));
        }
        let mut cohort = guild_privacy::secagg::Identities::new();
        let mut certificates = std::collections::BTreeMap::new();
        for member in m.cohort {
            let who = index(member.index, "RoundTask.cohort.index")?;
            if member.index > secagg.cohort_size {
                return Err(WireError::invalid("RoundTask.cohort.index", "beyond the cohort size"));
            }
            let key = fixed(&member.signing_public_key, "RoundTask.cohort.signing_public_key")?;
            if cohort.insert(who, key).is_some() {
                return Err(WireError::invalid("RoundTask.cohort.index", format!("{who} is listed twice")));
            }
            if member.certificate.len() > crate::certificate::MAX_CERTIFICATE_BYTES {
                return Err(WireError::invalid(
                    "RoundTask.cohort.certificate",
                    format!(
                        "{} bytes for {who}, above the {}-byte limit",
                        member.certificate.len(),
                        crate::certificate::MAX_CERTIFICATE_BYTES
                    ),
                ));
            }
            certificates.insert(who, member.certificate);
        }
        Ok(Self {
            binding,
            adapter_version: m.adapter_version,
            manifest,
            training,
            privacy,
            secagg,
            cohort,
            certificates,
        })
    }
}

impl From<RoundTask> for v1::RoundTask {
    fn from(t: RoundTask) -> Self {
        Self {
            round_id: t.binding.round_id,
            federation_id: t.binding.federation_id.to_vec(),
            adapter_version: t.adapter_version,
            adapter_sha256: t.binding.adapter_sha256.to_vec(),
            task_sha256: t.binding.task_sha256.to_vec(),
            manifest: Some(t.manifest.into()),
            training: Some(v1::TrainingParams {
                local_steps: t.training.local_steps,
                batch_size: t.training.batch_size,
                learning_rate: t.training.learning_rate,
                data_seed: t.training.data_seed,
                negatives: t.training.negatives,
                kind: round_kind_to_wire(t.training.kind).into(),
            }),
            privacy: Some(v1::PrivacyParams {
                mode: privacy_mode_to_wire(t.privacy.mode).into(),
                clip_norm: t.privacy.clip_norm,
                noise_multiplier: t.privacy.noise_multiplier,
                gamma: t.privacy.gamma,
                bit_width: t.privacy.bit_width,
                min_survivors: t.privacy.min_survivors,
                rotation_seed: t.privacy.rotation_seed,
                unit: privacy_unit_to_wire(t.privacy.unit).into(),
                shopper_sampling_rate: t.privacy.shopper_sampling_rate,
            }),
            secagg: Some(v1::SecAggParams {
                my_index: t.secagg.my_index.get(),
                cohort_size: t.secagg.cohort_size,
                threshold: t.secagg.threshold,
                neighbours: t.secagg.neighbours,
                vector_length: t.secagg.vector_length,
                phase_deadline_millis: t
                    .secagg
                    .phase_deadlines
                    .iter()
                    .map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX))
                    .collect(),
            }),
            cohort: t
                .cohort
                .iter()
                .map(|(i, key)| v1::CohortMember {
                    index: i.get(),
                    signing_public_key: key.to_vec(),
                    certificate: t.certificates.get(i).cloned().unwrap_or_default(),
                })
                .collect(),
        }
    }
}

// ---------------------------------------------------------------- SecAgg+

fn binding(m: Option<v1::RoundBinding>) -> Result<sa::RoundBinding> {
    let m = required(m, "binding")?;
    Ok(sa::RoundBinding {
        federation_id: fixed(&m.federation_id, "binding.federation_id")?,
        round_id: m.round_id,
        adapter_sha256: fixed(&m.adapter_sha256, "binding.adapter_sha256")?,
        task_sha256: fixed(&m.task_sha256, "binding.task_sha256")?,
    })
}

fn binding_to_wire(b: sa::RoundBinding) -> Option<v1::RoundBinding> {
    Some(v1::RoundBinding {
        federation_id: b.federation_id.to_vec(),
        round_id: b.round_id,
        adapter_sha256: b.adapter_sha256.to_vec(),
        task_sha256: b.task_sha256.to_vec(),
    })
}

impl TryFrom<v1::SignedKeys> for sa::SignedKeys {
    type Error = WireError;
    fn try_from(m: v1::SignedKeys) -> Result<Self> {
        Ok(Self {
            sender: index(m.sender, "SignedKeys.sender")?,
            cipher_public_key: fixed(&m.cipher_public_key, "SignedKeys.cipher_public_key")?,
            mask_public_key: fixed(&m.mask_public_key, "SignedKeys.mask_public_key")?,
            signature: fixed(&m.signature, "SignedKeys.signature")?,
        })
    }
}

impl From<sa::SignedKeys> for v1::SignedKeys {
    fn from(k: sa::SignedKeys) -> Self {
        Self {
            sender: k.sender.get(),
            cipher_public_key: k.cipher_public_key.to_vec(),
            mask_public_key: k.mask_public_key.to_vec(),
            signature: k.signature.to_vec(),
        }
    }
}

impl TryFrom<v1::AdvertiseKeysRequest> for sa::AdvertiseKeys {
    type Error = WireError;
    fn try_from(m: v1::AdvertiseKeysRequest) -> Result<Self> {
        Ok(Self {
            binding: binding(m.binding)?,
            keys: required(m.keys, "AdvertiseKeysRequest.keys")?.try_into()?,
        })
    }
}

impl From<sa::AdvertiseKeys> for v1::AdvertiseKeysRequest {
    fn from(m: sa::AdvertiseKeys) -> Self {
        Self { binding: binding_to_wire(m.binding), keys: Some(m.keys.into()) }
    }
}

/// The key roster the server broadcasts when phase 0 closes.
pub fn roster_from_wire(m: v1::AdvertiseKeysResponse) -> Result<Vec<sa::SignedKeys>> {
    bounded(&m.roster, MAX_COHORT, "AdvertiseKeysResponse.roster")?;
    m.roster.into_iter().map(TryInto::try_into).collect()
}

pub fn roster_to_wire(roster: Vec<sa::SignedKeys>) -> v1::AdvertiseKeysResponse {
    v1::AdvertiseKeysResponse { roster: roster.into_iter().map(Into::into).collect() }
}

impl TryFrom<v1::EncryptedShares> for sa::EncryptedShares {
    type Error = WireError;
    fn try_from(m: v1::EncryptedShares) -> Result<Self> {
        if m.ciphertext.is_empty() || m.ciphertext.len() > MAX_CIPHERTEXT_BYTES {
            return Err(WireError::invalid(
                "EncryptedShares.ciphertext",
                format!("must be 1..={MAX_CIPHERTEXT_BYTES} bytes, got {}", m.ciphertext.len()),
            ));
        }
        Ok(Self {
            sender: index(m.sender, "EncryptedShares.sender")?,
            recipient: index(m.recipient, "EncryptedShares.recipient")?,
            ciphertext: m.ciphertext,
            key_commitment: fixed(&m.key_commitment, "EncryptedShares.key_commitment")?,
            seed_commitment: fixed(&m.seed_commitment, "EncryptedShares.seed_commitment")?,
            signature: fixed(&m.signature, "EncryptedShares.signature")?,
        })
    }
}

impl From<sa::EncryptedShares> for v1::EncryptedShares {
    fn from(s: sa::EncryptedShares) -> Self {
        Self {
            sender: s.sender.get(),
            recipient: s.recipient.get(),
            ciphertext: s.ciphertext,
            key_commitment: s.key_commitment.to_vec(),
            seed_commitment: s.seed_commitment.to_vec(),
            signature: s.signature.to_vec(),
        }
    }
}

impl TryFrom<v1::ShareKeysRequest> for sa::ShareKeys {
    type Error = WireError;
    fn try_from(m: v1::ShareKeysRequest) -> Result<Self> {
        bounded(&m.shares, MAX_COHORT, "ShareKeysRequest.shares")?;
        Ok(Self {
            binding: binding(m.binding)?,
            shares: m.shares.into_iter().map(TryInto::try_into).collect::<Result<_>>()?,
        })
    }
}

impl From<sa::ShareKeys> for v1::ShareKeysRequest {
    fn from(m: sa::ShareKeys) -> Self {
        Self { binding: binding_to_wire(m.binding), shares: m.shares.into_iter().map(Into::into).collect() }
    }
}

/// The sealed shares addressed to one client, forwarded when phase 1 closes.
pub fn inbox_from_wire(m: v1::ShareKeysResponse) -> Result<Vec<sa::EncryptedShares>> {
    bounded(&m.inbox, MAX_COHORT, "ShareKeysResponse.inbox")?;
    m.inbox.into_iter().map(TryInto::try_into).collect()
}

pub fn inbox_to_wire(inbox: Vec<sa::EncryptedShares>) -> v1::ShareKeysResponse {
    v1::ShareKeysResponse { inbox: inbox.into_iter().map(Into::into).collect() }
}

impl TryFrom<v1::MaskedInputRequest> for sa::MaskedInput {
    type Error = WireError;
    fn try_from(m: v1::MaskedInputRequest) -> Result<Self> {
        if m.masked.is_empty() {
            return Err(WireError::missing("MaskedInputRequest.masked"));
        }
        bounded(&m.masked, MAX_VECTOR_LENGTH, "MaskedInputRequest.masked")?;
        bounded(&m.complaints, MAX_COHORT, "MaskedInputRequest.complaints")?;
        let complaints = m
            .complaints
            .into_iter()
            .map(|c| {
                Ok(sa::Complaint {
                    accused: index(c.accused, "Complaint.accused")?,
                    pairwise_seed: fixed(&c.pairwise_seed, "Complaint.pairwise_seed")?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            binding: binding(m.binding)?,
            sender: index(m.sender, "MaskedInputRequest.sender")?,
            masked: m.masked,
            complaints,
        })
    }
}

impl From<sa::MaskedInput> for v1::MaskedInputRequest {
    fn from(m: sa::MaskedInput) -> Self {
        Self {
            binding: binding_to_wire(m.binding),
            sender: m.sender.get(),
            masked: m.masked,
            complaints: m
                .complaints
                .into_iter()
                .map(|c| v1::Complaint { accused: c.accused.get(), pairwise_seed: c.pairwise_seed.to_vec() })
                .collect(),
        }
    }
}

fn indices(values: &[u32], field: &'static str) -> Result<Vec<sa::ClientIndex>> {
    bounded(values, MAX_COHORT, field)?;
    values.iter().map(|&v| index(v, field)).collect()
}

/// The survivors of phase 2, announced when it closes.
pub fn survivors_from_wire(m: v1::MaskedInputResponse) -> Result<Vec<sa::ClientIndex>> {
    indices(&m.survivors, "MaskedInputResponse.survivors")
}

pub fn survivors_to_wire(survivors: &[sa::ClientIndex]) -> v1::MaskedInputResponse {
    v1::MaskedInputResponse { survivors: survivors.iter().map(|i| i.get()).collect() }
}

impl TryFrom<v1::ConsistencyCheckRequest> for sa::ConsistencyCheck {
    type Error = WireError;
    fn try_from(m: v1::ConsistencyCheckRequest) -> Result<Self> {
        Ok(Self {
            binding: binding(m.binding)?,
            sender: index(m.sender, "ConsistencyCheckRequest.sender")?,
            signature: fixed(&m.signature, "ConsistencyCheckRequest.signature")?,
        })
    }
}

impl From<sa::ConsistencyCheck> for v1::ConsistencyCheckRequest {
    fn from(m: sa::ConsistencyCheck) -> Self {
        Self { binding: binding_to_wire(m.binding), sender: m.sender.get(), signature: m.signature.to_vec() }
    }
}

/// The survivors' signatures, forwarded when phase 3 closes.
pub fn signatures_from_wire(m: v1::ConsistencyCheckResponse) -> Result<Vec<sa::SurvivorSignature>> {
    bounded(&m.signatures, MAX_COHORT, "ConsistencyCheckResponse.signatures")?;
    m.signatures
        .into_iter()
        .map(|s| {
            Ok(sa::SurvivorSignature {
                sender: index(s.sender, "SurvivorSignature.sender")?,
                signature: fixed(&s.signature, "SurvivorSignature.signature")?,
            })
        })
        .collect()
}

pub fn signatures_to_wire(signatures: Vec<sa::SurvivorSignature>) -> v1::ConsistencyCheckResponse {
    v1::ConsistencyCheckResponse {
        signatures: signatures
            .into_iter()
            .map(|s| v1::SurvivorSignature { sender: s.sender.get(), signature: s.signature.to_vec() })
            .collect(),
    }
}

fn shares(values: Vec<v1::ShamirShare>, field: &'static str) -> Result<Vec<sa::ShamirShare>> {
    bounded(&values, MAX_COHORT, field)?;
    values
        .into_iter()
        .map(|s| {
            if s.y.is_empty() || s.y.len() > MAX_SHARE_WORDS {
                return Err(WireError::invalid(
                    field,
                    format!("a share has {} words, expected 1..={MAX_SHARE_WORDS}", s.y.len()),
                ));
            }
            Ok(sa::ShamirShare {
                owner: index(s.owner, field)?,
                x: index(s.x, field)?,
                y: s.y,
                salt: fixed(&s.salt, "ShamirShare.salt")?,
            })
        })
        .collect()
}

fn shares_to_wire(values: Vec<sa::ShamirShare>) -> Vec<v1::ShamirShare> {
    values
        .into_iter()
        .map(|s| v1::ShamirShare { owner: s.owner.get(), x: s.x.get(), y: s.y, salt: s.salt.to_vec() })
        .collect()
}

impl TryFrom<v1::UnmaskRequest> for sa::Unmask {
    type Error = WireError;
    fn try_from(m: v1::UnmaskRequest) -> Result<Self> {
        Ok(Self {
            binding: binding(m.binding)?,
            sender: index(m.sender, "UnmaskRequest.sender")?,
            self_mask_shares: shares(m.self_mask_shares, "UnmaskRequest.self_mask_shares")?,
            mask_key_shares: shares(m.mask_key_shares, "UnmaskRequest.mask_key_shares")?,
        })
    }
}

impl From<sa::Unmask> for v1::UnmaskRequest {
    fn from(m: sa::Unmask) -> Self {
        Self {
            binding: binding_to_wire(m.binding),
            sender: m.sender.get(),
            self_mask_shares: shares_to_wire(m.self_mask_shares),
            mask_key_shares: shares_to_wire(m.mask_key_shares),
        }
    }
}

// ---------------------------------------------------------------- adapter, metrics, status

impl TryFrom<v1::AdapterChunk> for AdapterChunk {
    type Error = WireError;
    fn try_from(m: v1::AdapterChunk) -> Result<Self> {
        if m.data.len() > ADAPTER_CHUNK_BYTES {
            return Err(WireError::TooMany {
                field: Field("AdapterChunk.data"),
                max: ADAPTER_CHUNK_BYTES,
                actual: m.data.len(),
            });
        }
        let end = m.offset.checked_add(m.data.len() as u64);
        if end.is_none_or(|end| end > m.total_bytes) {
            return Err(WireError::invalid("AdapterChunk.offset", "chunk runs past total_bytes"));
        }
        Ok(Self {
            version: m.version,
            offset: m.offset,
            total_bytes: m.total_bytes,
            sha256: fixed(&m.sha256, "AdapterChunk.sha256")?,
            data: m.data,
        })
    }
}

impl From<AdapterChunk> for v1::AdapterChunk {
    fn from(c: AdapterChunk) -> Self {
        Self {
            version: c.version,
            offset: c.offset,
            total_bytes: c.total_bytes,
            sha256: c.sha256.to_vec(),
            data: c.data,
        }
    }
}

impl TryFrom<v1::ReportMetricsRequest> for MetricsReport {
    type Error = WireError;
    fn try_from(m: v1::ReportMetricsRequest) -> Result<Self> {
        if m.hits_at_10 > m.users {
            return Err(WireError::invalid("ReportMetricsRequest.hits_at_10", "more hits than users"));
        }
        let users = m.users as f64;
        for (value, field) in [
            (m.ndcg_at_10_sum, "ReportMetricsRequest.ndcg_at_10_sum"),
            (m.reciprocal_rank_sum, "ReportMetricsRequest.reciprocal_rank_sum"),
        ] {
            if non_negative_finite(value, field)? > users {
                return Err(WireError::invalid(field, "sum exceeds the number of users"));
            }
        }
        Ok(Self {
            merchant_id: merchant_id(&m.merchant_id, "ReportMetricsRequest.merchant_id")?,
            adapter_version: m.adapter_version,
            users: m.users,
            hits_at_10: m.hits_at_10,
            ndcg_at_10_sum: m.ndcg_at_10_sum,
            reciprocal_rank_sum: m.reciprocal_rank_sum,
        })
    }
}

impl From<MetricsReport> for v1::ReportMetricsRequest {
    fn from(r: MetricsReport) -> Self {
        Self {
            merchant_id: r.merchant_id.0,
            adapter_version: r.adapter_version,
            users: r.users,
            hits_at_10: r.hits_at_10,
            ndcg_at_10_sum: r.ndcg_at_10_sum,
            reciprocal_rank_sum: r.reciprocal_rank_sum,
        }
    }
}

impl TryFrom<v1::StatusResponse> for StatusReport {
    type Error = WireError;
    fn try_from(m: v1::StatusResponse) -> Result<Self> {
        Ok(Self {
            federation_id: fixed(&m.federation_id, "StatusResponse.federation_id")?,
            registered_merchants: m.registered_merchants,
            rounds_completed: m.rounds_completed,
            rounds_aborted: m.rounds_aborted,
            latest_adapter_version: m.latest_adapter_version,
            epsilon_spent: non_negative_finite(m.epsilon_spent, "StatusResponse.epsilon_spent")?,
            delta: non_negative_finite(m.delta, "StatusResponse.delta")?,
            current_phase: m.current_phase,
            shopper_epsilon_spent: non_negative_finite(
                m.shopper_epsilon_spent,
                "StatusResponse.shopper_epsilon_spent",
            )?,
        })
    }
}

impl From<StatusReport> for v1::StatusResponse {
    fn from(s: StatusReport) -> Self {
        Self {
            federation_id: s.federation_id.to_vec(),
            registered_merchants: s.registered_merchants,
            rounds_completed: s.rounds_completed,
            rounds_aborted: s.rounds_aborted,
            latest_adapter_version: s.latest_adapter_version,
            epsilon_spent: s.epsilon_spent,
            delta: s.delta,
            current_phase: s.current_phase,
            shopper_epsilon_spent: s.shopper_epsilon_spent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_task() -> RoundTask {
        RoundTask {
            binding: sa::RoundBinding {
                federation_id: [1; 16],
                round_id: 7,
                adapter_sha256: [2; 32],
                task_sha256: [4; 32],
            },
            adapter_version: 6,
            manifest: AdapterManifest {
                base_model_sha256: [3; 32],
                tensors: vec![
                    ManifestTensor { name: "layer.0.query.lora_B".into(), shape: vec![384, 8] },
                    ManifestTensor { name: "layer.0.value.lora_B".into(), shape: vec![384, 8] },
                ],
                rank: 8,
                alpha: 16.0,
                frozen_a_seed: 42,
                family: AdapterFamily::FfaLora,
            },
            training: TrainingParams {
                local_steps: 2,
                batch_size: 32,
                learning_rate: 1e-3,
                data_seed: 9,
                negatives: 1024,
                kind: RoundKind::Training,
            },
            privacy: PrivacyParams {
                mode: PrivacyMode::Distributed,
                clip_norm: 1.0,
                noise_multiplier: 1.1,
                gamma: 1e-3,
                bit_width: 20,
                min_survivors: 8,
                rotation_seed: 5,
                unit: PrivacyUnit::Merchant,
                shopper_sampling_rate: 0.0,
            },
            secagg: SecAggParams {
                my_index: sa::ClientIndex::new(3).expect("non-zero"),
                cohort_size: 10,
                threshold: 5,
                neighbours: 8,
                vector_length: 8192,
                phase_deadlines: vec![Duration::from_secs(30); 5],
            },
            cohort: (1..=10).map(|i| (sa::ClientIndex::new(i).expect("non-zero"), [i as u8; 32])).collect(),
            certificates: (1..=10)
                .map(|i| (sa::ClientIndex::new(i).expect("non-zero"), vec![i as u8; 40]))
                .collect(),
        }
    }

    /// Converts a domain task to the wire, lets `corrupt` damage it, and returns the error.
    fn check_rejected(corrupt: impl FnOnce(&mut v1::RoundTask), expected: &str) {
        let mut wire = v1::RoundTask::from(round_task());
        corrupt(&mut wire);
        let error = RoundTask::try_from(wire).expect_err("corrupted task must be rejected");
        assert!(error.to_string().contains(expected), "{error} does not mention {expected:?}");
    }

    #[test]
    fn round_task_survives_the_wire() {
        let task = round_task();
        let back = RoundTask::try_from(v1::RoundTask::from(task.clone())).expect("valid task");
        assert_eq!(back, task);
    }

    #[test]
    fn a_sequence_tower_manifest_survives_the_wire_and_must_name_its_own_tensors() {
        let shape = TowerShape {
            hidden: 16,
            history: 6,
            zero_shot_items: 5,
            item_rank: 2,
            width: 8,
            layers: 1,
            heads: 2,
            catalogue: 40,
        };
        let mut task = round_task();
        task.manifest = AdapterManifest::sequence_tower([3; 32], shape, 9);
        task.secagg.vector_length = task.manifest.parameter_count().next_power_of_two() as u32;
        let wire = v1::RoundTask::from(task.clone());
        assert_eq!(RoundTask::try_from(wire.clone()).expect("valid"), task);
        let mut renamed = wire.clone();
        if let Some(m) = renamed.manifest.as_mut() {
            m.tensors[0].name = "something.else".into();
        }
        let error = RoundTask::try_from(renamed).expect_err("foreign tensors").to_string();
        assert!(error.contains("not the tensors of the sequence tower"), "{error}");
        let mut shapeless = wire.clone();
        if let Some(m) = shapeless.manifest.as_mut() {
            m.tower = None;
        }
        let error = RoundTask::try_from(shapeless).expect_err("no shape").to_string();
        assert!(error.contains("AdapterManifest.family"), "{error}");
        let mut bad = wire;
        if let Some(t) = bad.manifest.as_mut().and_then(|m| m.tower.as_mut()) {
            t.heads = 3;
        }
        let error = RoundTask::try_from(bad).expect_err("bad shape").to_string();
        assert!(error.contains("AdapterManifest.tower"), "{error}");
    }

    #[test]
    fn malformed_round_tasks_name_the_bad_field() {
        check_rejected(
            |t| t.federation_id.truncate(15),
            "RoundTask.federation_id: expected 16 bytes, got 15",
        );
        check_rejected(|t| t.manifest = None, "RoundTask.manifest: missing");
        check_rejected(
            |t| {
                if let Some(p) = t.privacy.as_mut() {
                    p.mode = 99
                }
            },
            "unknown privacy mode 99",
        );
        check_rejected(
            |t| {
                if let Some(p) = t.privacy.as_mut() {
                    p.unit = 0
                }
            },
            "unknown privacy unit 0",
        );
        for (unit, rate) in [(1, 0.1), (2, 0.0), (2, 1.5), (2, f64::NAN)] {
            check_rejected(
                |t| {
                    if let Some(p) = t.privacy.as_mut() {
                        (p.unit, p.shopper_sampling_rate) = (unit, rate)
                    }
                },
                "RoundTask.privacy.shopper_sampling_rate",
            );
        }
        check_rejected(
            |t| {
                if let Some(p) = t.privacy.as_mut() {
                    p.clip_norm = f64::NAN
                }
            },
            "RoundTask.privacy.clip_norm",
        );
        check_rejected(
            |t| {
                if let Some(p) = t.privacy.as_mut() {
                    p.bit_width = 33
                }
            },
            "RoundTask.privacy.bit_width",
        );
        check_rejected(
            |t| {
                if let Some(s) = t.secagg.as_mut() {
                    s.my_index = 0
                }
            },
            "client index 0 is reserved",
        );
        check_rejected(
            |t| {
                if let Some(s) = t.secagg.as_mut() {
                    s.my_index = 11
                }
            },
            "beyond the cohort size",
        );
        check_rejected(
            |t| {
                if let Some(s) = t.secagg.as_mut() {
                    s.threshold = 10
                }
            },
            "RoundTask.secagg.threshold",
        );
        check_rejected(
            |t| {
                if let Some(s) = t.secagg.as_mut() {
                    s.vector_length = 4096
                }
            },
            "does not match the manifest",
        );
        check_rejected(
            |t| {
                if let Some(m) = t.manifest.as_mut() {
                    m.tensors[0].shape = vec![384, 0]
                }
            },
            "1 to 4 non-zero dimensions",
        );
        check_rejected(
            |t| {
                if let Some(m) = t.manifest.as_mut() {
                    m.tensors[0].shape = vec![u32::MAX, u32::MAX]
                }
            },
            "parameters",
        );
        check_rejected(|t| t.cohort.truncate(9), "RoundTask.cohort: lists 9 members for a cohort of 10");
        check_rejected(|t| t.cohort[1].index = 1, "is listed twice");
        check_rejected(
            |t| t.training.as_mut().expect("training").negatives = (1 << 20) + 1,
            "RoundTask.training.negatives: 1048577 is above the limit of 1048576",
        );
        check_rejected(
            |t| t.training.as_mut().expect("training").kind = v1::RoundKind::PopularityRelease.into(),
            "RoundTask.training.kind: a popularity release, but the adapter has no popularity histogram to release",
        );
        check_rejected(
            |t| t.training.as_mut().expect("training").kind = v1::RoundKind::PoolingSelection.into(),
            "RoundTask.training.kind: a pooling selection, but the adapter is not a tower with a popularity prior",
        );
        check_rejected(
            |t| t.training.as_mut().expect("training").kind = v1::RoundKind::Unspecified.into(),
            "RoundTask.training.kind: unknown round kind 0",
        );
        check_rejected(|t| t.training.as_mut().expect("training").kind = 9, "unknown round kind 9");
        check_rejected(
            |t| t.cohort[2].certificate = vec![0; 1025],
            "RoundTask.cohort.certificate: 1025 bytes for client #3, above the 1024-byte limit",
        );
        check_rejected(
            |t| t.cohort[0].signing_public_key.push(0),
            "RoundTask.cohort.signing_public_key: expected 32 bytes, got 33",
        );
    }

    #[test]
    fn secagg_messages_check_every_length() {
        let binding = Some(v1::RoundBinding {
            federation_id: vec![0; 16],
            round_id: 1,
            adapter_sha256: vec![0; 32],
            task_sha256: vec![0; 32],
        });
        let keys = |sig: usize| v1::AdvertiseKeysRequest {
            binding: binding.clone(),
            keys: Some(v1::SignedKeys {
                sender: 1,
                cipher_public_key: vec![0; 32],
                mask_public_key: vec![0; 32],
                signature: vec![0; sig],
            }),
        };
        assert!(sa::AdvertiseKeys::try_from(keys(64)).is_ok());
        let error = sa::AdvertiseKeys::try_from(keys(63)).expect_err("short signature");
        assert_eq!(error.to_string(), "SignedKeys.signature: expected 64 bytes, got 63");

        let masked =
            v1::MaskedInputRequest { binding: None, sender: 1, masked: vec![1, 2], complaints: vec![] };
        assert_eq!(
            sa::MaskedInput::try_from(masked).expect_err("no binding").to_string(),
            "binding: missing"
        );

        let unmask = v1::UnmaskRequest {
            binding,
            sender: 2,
            self_mask_shares: vec![v1::ShamirShare {
                owner: 1,
                x: 2,
                y: vec![0; MAX_SHARE_WORDS + 1],
                salt: vec![0; 32],
            }],
            mask_key_shares: vec![],
        };
        let error = sa::Unmask::try_from(unmask).expect_err("long share");
        assert!(error.to_string().contains("UnmaskRequest.self_mask_shares"), "{error}");
    }

    #[test]
    fn adapter_chunks_may_not_run_past_their_file() {
        let chunk = v1::AdapterChunk {
            version: 1,
            offset: 10,
            total_bytes: 12,
            sha256: vec![0; 32],
            data: vec![0; 3],
        };
        let error = AdapterChunk::try_from(chunk).expect_err("overrun");
        assert!(error.to_string().contains("past total_bytes"), "{error}");
    }
}
