//! Tasks: polling, the adapter manifest, the round task with its kind, privacy and SecAgg+
//! parameters, and the task digest that binds them.

use guild_privacy::secagg::message as sa;

use super::*;

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
                    neighbours: t.neighbours as usize,
                    pair_sketch: t.pair_sketch as usize,
                    item_ids: t.item_ids as usize,
                    spectral: t.spectral as usize,
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
            catalogue_sha256: if m.catalogue_sha256.is_empty() {
                None
            } else {
                Some(fixed(&m.catalogue_sha256, "AdapterManifest.catalogue_sha256")?)
            },
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
                    neighbours: t.neighbours as u32,
                    pair_sketch: t.pair_sketch as u32,
                    item_ids: t.item_ids as u32,
                    spectral: t.spectral as u32,
                }),
            },
            catalogue_sha256: m.catalogue_sha256.map(|d| d.to_vec()).unwrap_or_default(),
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

fn trained_part(part: i32) -> Result<TrainedPart> {
    match v1::TrainedPart::try_from(part) {
        Ok(v1::TrainedPart::Whole) => Ok(TrainedPart::Whole),
        Ok(v1::TrainedPart::Pooling) => Ok(TrainedPart::Pooling),
        Ok(v1::TrainedPart::Weights) => Ok(TrainedPart::Weights),
        Ok(v1::TrainedPart::Unspecified) | Err(_) => {
            Err(WireError::invalid("RoundTask.training.trained", format!("unknown trained part {part}")))
        }
    }
}

fn trained_part_to_wire(part: TrainedPart) -> v1::TrainedPart {
    match part {
        TrainedPart::Whole => v1::TrainedPart::Whole,
        TrainedPart::Pooling => v1::TrainedPart::Pooling,
        TrainedPart::Weights => v1::TrainedPart::Weights,
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
        let trained = trained_part(t.trained)?;
        if !kind.trains() && trained != TrainedPart::Whole {
            return Err(WireError::invalid(
                "RoundTask.training.trained",
                format!("{trained} in a {kind}, which trains nothing"),
            ));
        }
        if let Some(why) = trained.unsupported_by(&manifest) {
            return Err(WireError::invalid("RoundTask.training.trained", format!("{trained}, but {why}")));
        }
        let training = TrainingParams {
            local_steps: t.local_steps,
            batch_size: t.batch_size,
            learning_rate: positive_finite(f64::from(t.learning_rate), "RoundTask.training.learning_rate")?
                as f32,
            data_seed: t.data_seed,
            negatives: t.negatives,
            kind,
            trained,
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
            tolerated_colluders: p.tolerated_colluders,
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
        let summed = crate::round::SummedCoordinates::of(kind, trained, &manifest);
        if s.vector_length as usize != guild_privacy::dp::encoded_length(mode, summed.len()) {
            return Err(WireError::invalid(
                "RoundTask.secagg.vector_length",
                format!(
                    "{} does not match the manifest: a {kind} sums {} of its {} parameters, padded to a power of two unless the mode adds no noise",
                    s.vector_length,
                    summed.len(),
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
                trained: trained_part_to_wire(t.training.trained).into(),
            }),
            privacy: Some(v1::PrivacyParams {
                mode: privacy_mode_to_wire(t.privacy.mode).into(),
                clip_norm: t.privacy.clip_norm,
                noise_multiplier: t.privacy.noise_multiplier,
                gamma: t.privacy.gamma,
                bit_width: t.privacy.bit_width,
                min_survivors: t.privacy.min_survivors,
                tolerated_colluders: t.privacy.tolerated_colluders,
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
                catalogue_sha256: Some([5; 32]),
            },
            training: TrainingParams {
                local_steps: 2,
                batch_size: 32,
                learning_rate: 1e-3,
                data_seed: 9,
                negatives: 1024,
                kind: RoundKind::Training,
                trained: TrainedPart::Whole,
            },
            privacy: PrivacyParams {
                mode: PrivacyMode::Distributed,
                clip_norm: 1.0,
                noise_multiplier: 1.1,
                gamma: 1e-3,
                bit_width: 20,
                min_survivors: 8,
                tolerated_colluders: 2,
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
            neighbours: 3,
            pair_sketch: 0,
            item_ids: 0,
            spectral: 0,
        };
        let mut task = round_task();
        task.manifest = AdapterManifest::sequence_tower([3; 32], shape, 9);
        task.secagg.vector_length = task.summed().len().next_power_of_two() as u32;
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
        // A tower whose neighbours come from a pair sketch travels with its sketch's width
        // (the task digest covers it), and a width that is not a power of two is refused.
        let mut sketched = task.clone();
        sketched.manifest =
            AdapterManifest::sequence_tower([3; 32], TowerShape { pair_sketch: 64, ..shape }, 9);
        sketched.secagg.vector_length = sketched.summed().len().next_power_of_two() as u32;
        let wire = v1::RoundTask::from(sketched.clone());
        assert_eq!(RoundTask::try_from(wire.clone()).expect("valid"), sketched);
        let mut odd = wire;
        if let Some(t) = odd.manifest.as_mut().and_then(|m| m.tower.as_mut()) {
            t.pair_sketch = 48;
        }
        let error = RoundTask::try_from(odd).expect_err("odd width").to_string();
        assert!(error.contains("pair_sketch 48"), "{error}");
        // A pooling selection's vector is its twelve scores, padded: 16, not the adapter's.
        let mut selection = task.clone();
        selection.training.kind = RoundKind::PoolingSelection;
        selection.secagg.vector_length = 16;
        assert_eq!(RoundTask::try_from(v1::RoundTask::from(selection.clone())).expect("valid"), selection);
        selection.secagg.vector_length = task.secagg.vector_length;
        let error =
            RoundTask::try_from(v1::RoundTask::from(selection)).expect_err("whole length").to_string();
        assert!(error.contains("a pooling selection sums 12 of its"), "{error}");
        // A round that trains the weights alone round-trips, its vector the weights' length.
        let mut weights = sketched;
        weights.training.trained = TrainedPart::Weights;
        weights.secagg.vector_length = weights.summed().len().next_power_of_two() as u32;
        assert_eq!(RoundTask::try_from(v1::RoundTask::from(weights.clone())).expect("valid"), weights);
        // A round that adds no noise encodes without rotation: its vector is the summed
        // coordinates themselves, and the padded length is refused (as is the unpadded one
        // in a mode with noise).
        let d = weights.summed().len();
        assert!(!d.is_power_of_two(), "the case needs padding to differ");
        let mut plain = weights.clone();
        plain.privacy.mode = PrivacyMode::DangerousNone;
        plain.secagg.vector_length = d as u32;
        assert_eq!(RoundTask::try_from(v1::RoundTask::from(plain.clone())).expect("valid"), plain);
        plain.secagg.vector_length = d.next_power_of_two() as u32;
        let error = RoundTask::try_from(v1::RoundTask::from(plain)).expect_err("padded").to_string();
        assert!(error.contains("RoundTask.secagg.vector_length"), "{error}");
        weights.secagg.vector_length = d as u32;
        let error = RoundTask::try_from(v1::RoundTask::from(weights)).expect_err("unpadded").to_string();
        assert!(error.contains("RoundTask.secagg.vector_length"), "{error}");
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
            |t| {
                if let Some(m) = t.manifest.as_mut() {
                    m.catalogue_sha256 = vec![1, 2, 3]
                }
            },
            "AdapterManifest.catalogue_sha256",
        );
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
            |t| t.training.as_mut().expect("training").trained = v1::TrainedPart::Unspecified.into(),
            "RoundTask.training.trained: unknown trained part 0",
        );
        check_rejected(
            |t| t.training.as_mut().expect("training").trained = v1::TrainedPart::Pooling.into(),
            "RoundTask.training.trained: the pooling and prior weight, but the adapter is not a tower",
        );
        check_rejected(
            |t| t.training.as_mut().expect("training").trained = v1::TrainedPart::Weights.into(),
            "RoundTask.training.trained: the weights without the statistics, but the adapter has no statistics",
        );
        check_rejected(
            |t| t.cohort[2].certificate = vec![0; 1025],
            "RoundTask.cohort.certificate: 1025 bytes for client #3, above the 1024-byte limit",
        );
        check_rejected(
            |t| t.cohort[0].signing_public_key.push(0),
            "RoundTask.cohort.signing_public_key: expected 32 bytes, got 33",
        );
    }
}
