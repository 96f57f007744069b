//! Tokenisation with Hugging Face's `tokenizers` from the model's `tokenizer.json`, with
//! padding to the longest sequence of a batch and truncation at a chosen length (the
//! file's own fixed padding to 128 is switched off).

use std::path::Path;

use tch::{Device, Tensor};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::ModelError;

/// A batch ready for the encoder: token ids and attention mask, `[batch, tokens]`.
#[derive(Debug)]
pub struct Batch {
    pub ids: Tensor,
    pub mask: Tensor,
}

#[derive(Debug)]
pub struct TextTokenizer {
    inner: Tokenizer,
}

impl TextTokenizer {
    pub fn load(path: &Path, max_tokens: usize) -> Result<Self, ModelError> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("loading {}: {e}", path.display())))?;
        inner
            .with_truncation(Some(TruncationParams { max_length: max_tokens, ..Default::default() }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        Ok(Self { inner })
    }

    pub fn encode(&self, texts: &[&str], device: Device) -> Result<Batch, ModelError> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let rows = encodings.len() as i64;
        let width = encodings.first().map_or(0, |e| e.get_ids().len()) as i64;
        let ids: Vec<i64> =
            encodings.iter().flat_map(|e| e.get_ids().iter().map(|&i| i64::from(i))).collect();
        let mask: Vec<i64> =
            encodings.iter().flat_map(|e| e.get_attention_mask().iter().map(|&m| i64::from(m))).collect();
        Ok(Batch {
            ids: Tensor::from_slice(&ids).view([rows, width]).to(device),
            mask: Tensor::from_slice(&mask).view([rows, width]).to(device),
        })
    }
}
