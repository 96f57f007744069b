//! FFA-LoRA adapters (Sun et al., ICLR 2024): for each targeted projection W, the update
//! ΔW = (α/r)·B·A with A frozen, drawn from the federation's seed, and B zero-initialised
//! and trained. Only the B matrices live in the adapter `VarStore` (the only one the
//! optimiser sees), cross the wire, and are clipped, noised and aggregated: averaging B
//! averages ΔW exactly, since A is shared.
//!
//! Export and import use Hugging Face PEFT's format (`adapter_model.safetensors` and
//! `adapter_config.json`), so a merchant can load a Guild adapter with `peft`.

use std::collections::BTreeMap;
use std::path::Path;

use guild_proto::domain::{AdapterManifest, ManifestTensor};
use tch::{Device, Kind, Tensor, nn};

use super::ModelError;
use super::bert::{BertConfig, LowRank, Target};

/// Rank, scaling and placement of the adapters.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub rank: i64,
    pub alpha: f64,
    pub targets: Vec<Target>,
    /// Seed of the frozen A matrices, fixed when the federation is created.
    pub frozen_a_seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 8, alpha: 16.0, targets: vec![Target::Query, Target::Value], frozen_a_seed: 0 }
    }
}

/// The B tensors of one model, in their own `VarStore`, with the frozen A beside them.
#[derive(Debug)]
pub struct Adapters {
    config: LoraConfig,
    bert: BertConfig,
    base_model_sha256: [u8; 32],
    vs: nn::VarStore,
    /// (layer, target) → (A `[r, in]`, frozen; B `[out, r]`, trainable), in manifest order.
    modules: BTreeMap<(usize, Target), (Tensor, Tensor)>,
}

fn module_path(layer: usize, target: Target) -> String {
    format!("encoder.layer.{layer}.attention.self.{}", target.module_name())
}

impl Adapters {
    /// Fresh adapters: A from `config.frozen_a_seed` (PEFT's default initialisation,
    /// U(−1/√in, 1/√in)), B zero.
    pub fn new(config: LoraConfig, bert: BertConfig, base_model_sha256: [u8; 32], device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let mut targets = config.targets.clone();
        targets.sort();
        targets.dedup();
        let mut modules = BTreeMap::new();
        for layer in 0..bert.layers as usize {
            for &target in &targets {
                let path =
                    vs.root() / "encoder" / "layer" / layer / "attention" / "self" / target.module_name();
                let b = path.var("lora_B", &[bert.hidden, config.rank], nn::Init::Const(0.0));
                modules.insert((layer, target), (Tensor::new(), b));
            }
        }
        let mut adapters =
            Self { config: LoraConfig { targets, ..config }, bert, base_model_sha256, vs, modules };
        // A comes from the one generator the coordinator also uses (manifest order).
        let a = guild_proto::adapter::frozen_a(&adapters.manifest());
        for ((_, (slot, _)), values) in adapters.modules.iter_mut().zip(a) {
            *slot = Tensor::from_slice(&values).view([adapters.config.rank, bert.hidden]).to(device);
        }
        adapters
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The store the optimiser trains: the B matrices and nothing else.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn scale(&self) -> f64 {
        self.config.alpha / self.config.rank as f64
    }

    /// Names and shapes of the B tensors, in the order of [`Self::flat`].
    pub fn manifest(&self) -> AdapterManifest {
        AdapterManifest {
            base_model_sha256: self.base_model_sha256,
            tensors: self
                .modules
                .keys()
                .map(|&(layer, target)| ManifestTensor {
                    name: format!("{}.lora_B", module_path(layer, target)),
                    shape: vec![self.bert.hidden as usize, self.config.rank as usize],
                })
                .collect(),
            rank: self.config.rank as usize,
            alpha: self.config.alpha as f32,
            frozen_a_seed: self.config.frozen_a_seed,
            family: guild_proto::domain::AdapterFamily::FfaLora,
            catalogue_sha256: None,
        }
    }

    /// All B entries as one flat vector, in manifest order.
    pub fn flat(&self) -> Vec<f32> {
        let parts: Vec<Tensor> =
            self.modules.values().map(|(_, b)| b.detach().to(Device::Cpu).flatten(0, -1)).collect();
        let flat = Tensor::cat(&parts, 0);
        Vec::<f32>::try_from(&flat).expect("B tensors are float32")
    }

    /// Overwrites every B entry from a flat vector in manifest order.
    pub fn set_flat(&mut self, values: &[f32]) -> Result<(), ModelError> {
        let expected = self.manifest().parameter_count();
        if values.len() != expected {
            return Err(ModelError::AdapterShape(format!(
                "flat vector has {} values, expected {expected}",
                values.len()
            )));
        }
        super::copy_flat(self.modules.values_mut().map(|(_, b)| b), values);
        Ok(())
    }

    /// Writes the adapters as a Hugging Face PEFT LoRA adapter, with the same writer the
    /// coordinator's `export-adapter` uses (A regenerated from the federation's seed, which
    /// is how this model drew it).
    pub fn export_peft(&self, dir: &Path) -> Result<(), ModelError> {
        guild_proto::adapter::write_peft(dir, &self.manifest(), &self.flat())
            .map_err(|e| ModelError::AdapterShape(format!("exporting to {}: {e}", dir.display())))
    }

    /// Loads B from a PEFT adapter written by [`Self::export_peft`]; its A matrices must
    /// be this federation's (same seed), or the adapter belongs elsewhere.
    pub fn import_peft(&mut self, dir: &Path) -> Result<(), ModelError> {
        let path = dir.join("adapter_model.safetensors");
        let tensors: BTreeMap<String, Tensor> =
            Tensor::read_safetensors(&path).map_err(|e| ModelError::load(&path, e))?.into_iter().collect();
        let expected_tensors = 2 * self.modules.len();
        if tensors.len() != expected_tensors {
            return Err(ModelError::AdapterShape(format!(
                "{} holds {} tensors, expected {expected_tensors}",
                path.display(),
                tensors.len()
            )));
        }
        let mut flat = Vec::with_capacity(self.manifest().parameter_count());
        for (&(layer, target), (a, b)) in &self.modules {
            let prefix = format!("base_model.model.{}", module_path(layer, target));
            let get = |suffix: &str| {
                tensors.get(&format!("{prefix}.{suffix}")).ok_or_else(|| {
                    ModelError::AdapterShape(format!("{} lacks {prefix}.{suffix}", path.display()))
                })
            };
            let (file_a, file_b) = (get("lora_A.weight")?, get("lora_B.weight")?);
            if file_b.size() != b.size() || file_a.size() != a.size() {
                return Err(ModelError::AdapterShape(format!(
                    "{prefix}: shapes differ from this federation's"
                )));
            }
            if !file_a.to_kind(Kind::Float).allclose(&a.to(Device::Cpu), 0.0, 0.0, false) {
                return Err(ModelError::AdapterShape(format!(
                    "{prefix}.lora_A differs from this federation's frozen A (another seed?)"
                )));
            }
            flat.extend(Vec::<f32>::try_from(&file_b.to_kind(Kind::Float).flatten(0, -1)).expect("float32"));
        }
        self.set_flat(&flat)
    }
}

impl LowRank for Adapters {
    fn delta(&self, layer: usize, target: Target, xs: &Tensor) -> Option<Tensor> {
        let (a, b) = self.modules.get(&(layer, target))?;
        Some(xs.matmul(&a.tr()).matmul(&b.tr()) * self.scale())
    }
}
