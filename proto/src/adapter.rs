//! The adapter as it is stored and transferred: the flat vector of FFA-LoRA's B entries in
//! manifest order, as little-endian f32, named by its sha256. Also what both the client
//! and the coordinator (which never links a tensor library) need to rebuild the frozen A
//! matrices from the federation's seed and to write a Hugging Face PEFT adapter.

use std::collections::BTreeSet;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

use crate::domain::AdapterManifest;

/// Serialises a flat B vector.
pub fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Parses a flat B vector of exactly `expected` values.
pub fn from_bytes(bytes: &[u8], expected: usize) -> Result<Vec<f32>, AdapterError> {
    if bytes.len() != 4 * expected {
        return Err(AdapterError::Length { expected: 4 * expected, actual: bytes.len() });
    }
    let values: Vec<f32> =
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(AdapterError::NonFinite { index });
    }
    Ok(values)
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    #[error("adapter holds {actual} bytes, its manifest needs {expected}")]
    Length { expected: usize, actual: usize },
    #[error("adapter value {index} is not finite")]
    NonFinite { index: usize },
    #[error("adapter manifest: {0}")]
    Manifest(String),
    #[error("writing {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("serialising safetensors: {0}")]
    Safetensors(String),
}

/// The frozen A matrices (`[rank, in]` each, row-major), one per manifest tensor, in
/// manifest order: PEFT's default initialisation U(−1/√in, 1/√in), drawn from a ChaCha20
/// stream seeded with the federation's `frozen_a_seed`. Each B tensor is `[out, rank]`;
/// the targets (attention query and value) are square, so `in = out`.
pub fn frozen_a(manifest: &AdapterManifest) -> Vec<Vec<f32>> {
    let mut rng = ChaCha20Rng::seed_from_u64(manifest.frozen_a_seed);
    manifest
        .tensors
        .iter()
        .map(|t| {
            let fan_in = t.shape[0];
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..manifest.rank * fan_in).map(|_| rng.gen_range(-bound..bound) as f32).collect()
        })
        .collect()
}

fn io(path: &Path, source: std::io::Error) -> AdapterError {
    AdapterError::Io { path: path.display().to_string(), source }
}

/// Writes f32 tensors `(name, shape, little-endian bytes)` as one safetensors file.
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) -> Result<(), AdapterError> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|view| (name.clone(), view))
                .map_err(|e| AdapterError::Safetensors(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| AdapterError::Safetensors(format!("{}: {e}", path.display())))
}

/// Writes an adapter in its family's export format: a PEFT LoRA adapter for FFA-LoRA
/// ([`write_peft`]), the tower's weights and manifest for the sequence tower
/// ([`write_tower`]).
pub fn export(dir: &Path, manifest: &AdapterManifest, flat: &[f32]) -> Result<(), AdapterError> {
    match manifest.family {
        crate::domain::AdapterFamily::FfaLora => write_peft(dir, manifest, flat),
        crate::domain::AdapterFamily::SequenceTower(_) => write_tower(dir, manifest, flat),
    }
}

/// The manifest of the tower exported in `dir` (its `tower.json`), or `None` for an export
/// that does not state its seed and base model (written before they were stated).
pub fn read_tower_manifest(dir: &Path) -> Result<Option<AdapterManifest>, AdapterError> {
    #[derive(serde::Deserialize)]
    struct Description {
        family: String,
        shape: crate::tower::TowerShape,
        frozen_a_seed: Option<u64>,
        base_model_sha256: Option<String>,
        catalogue_sha256: Option<String>,
    }
    let path = dir.join("tower.json");
    let text = std::fs::read(&path).map_err(|e| io(&path, e))?;
    let bad = |what: String| AdapterError::Manifest(format!("{}: {what}", path.display()));
    let d: Description = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    if d.family != "sequence_tower" {
        return Err(bad(format!("family {:?}, not a sequence tower", d.family)));
    }
    let digest = |field: &str, hex: &str| -> Result<[u8; 32], AdapterError> {
        hex::decode(hex)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad(format!("{field} must be 64 hex digits, got {hex:?}")))
    };
    let (Some(seed), Some(base)) = (d.frozen_a_seed, d.base_model_sha256) else { return Ok(None) };
    let catalogue = d.catalogue_sha256.map(|c| digest("catalogue_sha256", &c)).transpose()?;
    Ok(Some(
        AdapterManifest::sequence_tower(digest("base_model_sha256", &base)?, d.shape, seed)
            .with_catalogue(catalogue),
    ))
}

/// In an exported tower with a pair sketch: each item's neighbours decoded from it,
/// `[catalogue, M]` item indices as f32 (`guild_proto::tower::sketch_neighbours`).
pub const SKETCH_NEIGHBOURS: &str = "sketch_neighbours";
/// In an exported tower with a pair sketch: the estimated counts of [`SKETCH_NEIGHBOURS`].
pub const SKETCH_COUNTS: &str = "sketch_counts";
/// In an exported tower with a spectral prior: each item's feature row, `[catalogue,
/// spectral]` (`guild_proto::tower::spectral_features` of the decoded table).
pub const SPECTRAL_FEATURES: &str = "spectral_features";

/// Writes a sequence tower (`offset` from its seeded initial values, in manifest order) as
/// `tower.safetensors` (every tensor at `initial + offset`, named as in the manifest) and
/// `tower.json` (the family, the shape, the temperature and how to score).
pub fn write_tower(dir: &Path, manifest: &AdapterManifest, offset: &[f32]) -> Result<(), AdapterError> {
    let crate::domain::AdapterFamily::SequenceTower(shape) = manifest.family else {
        return Err(AdapterError::Manifest("not a sequence-tower manifest".into()));
    };
    if offset.len() != manifest.parameter_count() {
        return Err(AdapterError::Length {
            expected: 4 * manifest.parameter_count(),
            actual: 4 * offset.len(),
        });
    }
    let initial = crate::tower::initial_values(&shape, manifest.frozen_a_seed);
    let values: Vec<f32> = initial.iter().zip(offset).map(|(i, o)| i + o).collect();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut start = 0;
    for t in &manifest.tensors {
        let n: usize = t.shape.iter().product();
        tensors.push((t.name.clone(), t.shape.clone(), to_bytes(&values[start..start + n])));
        start += n;
    }
    // A pair sketch's decoding, so that a ranker outside Guild need not hash and decode it:
    // each item's neighbours (item indices, exact in f32) and their estimated counts.
    if let Some(range) = crate::tower::transitions_range(&shape).filter(|_| shape.pair_sketch > 0) {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let (lists, estimates) = crate::tower::sketch_neighbours(&shape, &values[range], threads);
        // The spectral prior's features, so that a ranker outside Guild need not compute
        // them (and ranks with exactly these).
        if shape.spectral > 0 {
            let features = crate::tower::spectral_features(&shape, &lists, &estimates, threads);
            tensors.push((
                SPECTRAL_FEATURES.into(),
                vec![shape.catalogue, shape.spectral],
                to_bytes(&features),
            ));
        }
        let lists: Vec<f32> = lists.iter().map(|&i| i as f32).collect();
        let dims = vec![shape.catalogue, shape.neighbours];
        tensors.push((SKETCH_NEIGHBOURS.into(), dims.clone(), to_bytes(&lists)));
        tensors.push((SKETCH_COUNTS.into(), dims, to_bytes(&estimates)));
    }
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    write_safetensors(&dir.join("tower.safetensors"), &tensors)?;
    let description = serde_json::json!({
        "family": "sequence_tower",
        "base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
        "item_vectors": "the base model's normalised mean-pooled embedding of each product title",
        "shape": shape,
        "frozen_a_seed": manifest.frozen_a_seed,
        "base_model_sha256": hex::encode(manifest.base_model_sha256),
        "catalogue_sha256": manifest.catalogue_sha256.map(hex::encode),
        "temperature": 0.05,
        "layer_norm_eps": 1e-5,
        "popularity_smoothing": crate::tower::POPULARITY_SMOOTHING,
        "popularity_noise_threshold": crate::tower::noise_threshold(shape.catalogue),
        "transitions_noise_threshold": crate::tower::COUNTS_NOISE_THRESHOLD,
        "transitions_noise_exceedances": crate::tower::counts_noise_exceedances(shape.catalogue * shape.neighbours),
        "transitions_strict_threshold": crate::tower::noise_threshold(shape.catalogue * shape.neighbours),
        "pair_sketch": shape.pair_sketch,
        "item_ids": shape.item_ids,
        "scoring": "items' = v + (v @ item_a) @ item_b [+ item_ids[i] @ item_ids_out, for item i, when \
                    item_ids > 0] [+ spectral_features[i] @ spectral_in, for item i, when spectral > 0]; shopper = sum_j recency[j] * items'[last - j] \
                    + transformer(last `history` items')[-1] @ output; score = cos(shopper, items') \
                    [+ popularity_weight * ln(1 + v / (popularity_smoothing * mean(v))), \
                    v = max(popularity - popularity_noise_threshold * sigma, 0), sigma = sqrt(mean of the \
                    squared negative entries of popularity), when the tower has a popularity histogram] \
                    [+ transitions_weight[0] * sum_k transitions_recency[k] * ln(1 + u / (popularity_smoothing \
                    * mean(u)))[h_k, j] added to the score of item neighbours[h_k, j], h_k the k-th most \
                    recent history item, u = max(popularity_next - t_u * sigma_u, 0), \
                    sigma_u from its negative entries, t_u = transitions_noise_threshold when more than \
                    transitions_noise_exceedances entries of popularity_next exceed \
                    transitions_noise_threshold * sigma_u, else transitions_strict_threshold, neighbours[i] the shape's `neighbours` items other than i \
                    whose item vectors have the largest cosine with i's, nearest first, when the tower \
                    has item-to-item counts; with pair_sketch > 0, popularity_next is a count-min \
                    sketch of every pair, and neighbours and the counts u is computed from are the \
                    file's sketch_neighbours and sketch_counts, decoded from it by \
                    guild_proto::tower::sketch_neighbours] \
                    [+ spectral_weight[0] * spectral_features[i] . sum_j spectral_recency[j] * \
                    spectral_features[h_j] for item i, h_j the j-th most recent history item, when \
                    spectral > 0: the file's spectral_features, each item's unit row from the top \
                    eigenvectors of the decoded table, guild_proto::spectral]",
        "transitions_recency": crate::tower::TRANSITIONS_RECENCY,
        "spectral": shape.spectral,
        "spectral_recency": crate::tower::SPECTRAL_RECENCY,
    });
    let path = dir.join("tower.json");
    let text =
        serde_json::to_vec_pretty(&description).map_err(|e| AdapterError::Safetensors(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| io(&path, e))
}

/// Writes `flat` (B entries in manifest order) and the frozen A matrices as a Hugging Face
/// PEFT LoRA adapter: `adapter_model.safetensors` and `adapter_config.json`.
pub fn write_peft(dir: &Path, manifest: &AdapterManifest, flat: &[f32]) -> Result<(), AdapterError> {
    if flat.len() != manifest.parameter_count() {
        return Err(AdapterError::Length {
            expected: 4 * manifest.parameter_count(),
            actual: 4 * flat.len(),
        });
    }
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let a = frozen_a(manifest);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut targets = BTreeSet::new();
    let mut offset = 0;
    for (t, a) in manifest.tensors.iter().zip(&a) {
        let module = t.name.strip_suffix(".lora_B").ok_or_else(|| {
            AdapterError::Manifest(format!("tensor {} is not a LoRA B matrix (.lora_B)", t.name))
        })?;
        if t.shape.len() != 2 || t.shape[1] != manifest.rank {
            return Err(AdapterError::Manifest(format!(
                "{} has shape {:?}, not [out, rank]",
                t.name, t.shape
            )));
        }
        if let Some(target) = module.rsplit('.').next() {
            targets.insert(target.to_owned());
        }
        let n = t.shape[0] * t.shape[1];
        let prefix = format!("base_model.model.{module}");
        tensors.push((format!("{prefix}.lora_A.weight"), vec![manifest.rank, t.shape[0]], to_bytes(a)));
        tensors.push((
            format!("{prefix}.lora_B.weight"),
            t.shape.clone(),
            to_bytes(&flat[offset..offset + n]),
        ));
        offset += n;
    }
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
        "r": manifest.rank,
        "lora_alpha": manifest.alpha,
        "lora_dropout": 0.0,
        "target_modules": targets.into_iter().collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "modules_to_save": null,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
    });
    let path = dir.join("adapter_config.json");
    let text = serde_json::to_vec_pretty(&config).map_err(|e| AdapterError::Safetensors(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| io(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ManifestTensor;

    #[test]
    fn flat_vectors_round_trip_and_bad_bytes_are_named() {
        let values = [0.5f32, -1.25, 3.0];
        assert_eq!(from_bytes(&to_bytes(&values), 3).expect("valid"), values);
        assert!(matches!(from_bytes(&[0; 11], 3), Err(AdapterError::Length { expected: 12, actual: 11 })));
        let nan = to_bytes(&[1.0, f32::NAN]);
        assert!(matches!(from_bytes(&nan, 2), Err(AdapterError::NonFinite { index: 1 })));
    }

    #[test]
    fn peft_export_holds_a_and_b_with_the_right_shapes() {
        let manifest = AdapterManifest {
            base_model_sha256: [0; 32],
            tensors: vec![
                ManifestTensor {
                    name: "encoder.layer.0.attention.self.query.lora_B".into(),
                    shape: vec![4, 2],
                },
                ManifestTensor {
                    name: "encoder.layer.0.attention.self.value.lora_B".into(),
                    shape: vec![4, 2],
                },
            ],
            rank: 2,
            alpha: 4.0,
            frozen_a_seed: 7,
            family: crate::domain::AdapterFamily::FfaLora,
            catalogue_sha256: None,
        };
        let flat: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        write_peft(dir.path(), &manifest, &flat).expect("export");
        let bytes = std::fs::read(dir.path().join("adapter_model.safetensors")).expect("read");
        let file = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let b =
            file.tensor("base_model.model.encoder.layer.0.attention.self.value.lora_B.weight").expect("B");
        assert_eq!(b.shape(), [4, 2]);
        assert_eq!(from_bytes(b.data(), 8).expect("f32"), flat[8..]);
        let a =
            file.tensor("base_model.model.encoder.layer.0.attention.self.query.lora_A.weight").expect("A");
        assert_eq!(a.shape(), [2, 4]);
        assert_eq!(from_bytes(a.data(), 8).expect("f32"), frozen_a(&manifest)[0]);
        assert!(frozen_a(&manifest)[0].iter().all(|v| v.abs() <= 0.5));
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("adapter_config.json")).expect("read"))
                .expect("json");
        assert_eq!(config["target_modules"], serde_json::json!(["query", "value"]));
    }

    #[test]
    fn a_tower_export_states_the_manifest_it_follows() {
        let shape = crate::tower::TowerShape::tiny(5);
        let manifest = AdapterManifest::sequence_tower([3; 32], shape, 42).with_catalogue(Some([4; 32]));
        let dir = tempfile::tempdir().expect("tempdir");
        write_tower(dir.path(), &manifest, &vec![0.0; manifest.parameter_count()]).expect("export");
        assert_eq!(read_tower_manifest(dir.path()).expect("read"), Some(manifest.clone()));
        // One that states no catalogue reads back without one.
        let unstated = manifest.clone().with_catalogue(None);
        write_tower(dir.path(), &unstated, &vec![0.0; manifest.parameter_count()]).expect("export");
        assert_eq!(read_tower_manifest(dir.path()).expect("read"), Some(unstated));
        // An export from before the seed and base model were stated: nothing to learn from.
        let path = dir.path().join("tower.json");
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        json.as_object_mut().expect("object").remove("frozen_a_seed");
        std::fs::write(&path, json.to_string()).expect("write");
        assert_eq!(read_tower_manifest(dir.path()).expect("read"), None);
        // A digest that is not one is named.
        json["frozen_a_seed"] = 42.into();
        json["catalogue_sha256"] = "abc".into();
        std::fs::write(&path, json.to_string()).expect("write");
        let error = read_tower_manifest(dir.path()).expect_err("bad digest").to_string();
        assert!(
            error.contains("catalogue_sha256 must be 64 hex digits") && error.contains("tower.json"),
            "{error}"
        );
    }
}
