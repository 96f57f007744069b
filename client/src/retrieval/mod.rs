//! Two-tower next-item retrieval on the MiniLM encoder: the query tower (with adapters)
//! encodes a shopper's recent history as text, the item tower (the frozen base) encodes
//! product titles; score = cosine / τ; the loss is softmax cross-entropy against the
//! other targets of the batch. Evaluation ranks the whole catalogue.

mod counts;
mod metrics;
mod minilm;
mod search;
mod selection;
mod tower;

pub use counts::{CO_OCCURRENCE_WEIGHT, ItemCounts, RECENCY, WINDOW, evaluate_counts, evaluate_most_popular};
pub use metrics::{EVALUATION_TEMPERATURE, RankingCounts, Split};
use metrics::{held_out, ndcg_at_10, rank_rows};
pub use minilm::{evaluate_ranks, train};
pub use search::{QUERY_WORDS, evaluate_search, query_for, search_queries};
pub use selection::{Candidate, candidates_ndcg, selection_ndcg, validation_ndcg};
pub use tower::{
    HistoryPrior, evaluate_tower, shopper_part_gradients, shopper_seed, shopper_updates, train_tower,
    train_tower_with,
};

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;
use tch::{Kind, Tensor, nn, nn::OptimizerConfig};

use crate::data::{Dataset, Example, ItemIndex, User};
use crate::model::lora::Adapters;
use crate::model::tower::{
    Tower, TowerRow, last_positions, last_windows, normalise, tower_rows, zero_shot_scores,
};
use crate::model::{BaseModel, ModelError};
use guild_proto::tower::{PoolingSetting, TowerShape};

/// Hyper-parameters of local training.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub steps: usize,
    pub learning_rate: f64,
    /// τ: cosine similarities are divided by it.
    pub temperature: f64,
    /// K: titles of the most recent K items form the query.
    pub history_items: usize,
    pub seed: u64,
    /// Sequence tower: uniform negatives shared by a batch, each row's own target beside
    /// them (a sampled softmax); 0: the full softmax over the whole catalogue. Uniform
    /// sampling needs no logQ correction.
    pub negatives: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            steps: 20,
            learning_rate: 1e-3,
            temperature: EVALUATION_TEMPERATURE,
            history_items: 5,
            seed: 0,
            negatives: 0,
        }
    }
}

/// The query text of a history: titles of the last `k` items, most recent first.
pub fn query_text(dataset: &Dataset, history: &[ItemIndex], k: usize) -> String {
    history.iter().rev().take(k).map(|&i| dataset.title(i)).collect::<Vec<_>>().join(" ; ")
}

/// Item embeddings of the whole catalogue from the frozen base, computed once and cached
/// on disk under a key of the base model's hash, the dataset and the token limit.
pub fn catalogue_embeddings(
    base: &BaseModel,
    dataset: &Dataset,
    cache_dir: &Path,
    max_tokens: usize,
) -> Result<Tensor, ModelError> {
    let key = format!(
        "items-{}-{}-{}-{max_tokens}.safetensors",
        &hex::encode(base.sha256())[..16],
        dataset.name,
        dataset.titles.len()
    );
    let path: PathBuf = cache_dir.join(key);
    if let Ok(mut tensors) = Tensor::read_safetensors(&path)
        && let Some((_, t)) = tensors.pop()
        && t.size() == [dataset.titles.len() as i64, base.config().hidden]
    {
        return Ok(t);
    }
    let titles: Vec<&str> = dataset.titles.iter().map(String::as_str).collect();
    let progress = progress_bar(titles.len() as u64, "encoding catalogue");
    let mut parts = Vec::new();
    for chunk in titles.chunks(2048) {
        parts.push(base.embed_all(chunk, 64, None)?);
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    let embeddings = Tensor::cat(&parts, 0);
    std::fs::create_dir_all(cache_dir).map_err(|e| ModelError::io(cache_dir, e))?;
    write_atomically(&path, |partial| {
        Tensor::write_safetensors(&[("items", &embeddings)], partial)
            .map_err(|e| ModelError::load(partial, e))
    })?;
    Ok(embeddings)
}

/// Writes `path` through `write` into a temporary file of its own beside it, then renames
/// that over `path`: a crash never leaves a truncated file, and writers racing for the same
/// path (two processes encoding the same catalogue) each publish a whole file instead of
/// renaming one another's half-written one away.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let prefix = path.file_name().map(|n| format!("{}.", n.to_string_lossy())).unwrap_or_default();
    let partial = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(|e| ModelError::io(dir, e))?;
    write(partial.path())?;
    partial.persist(path).map_err(|e| ModelError::io(path, e.error))?;
    Ok(())
}

fn progress_bar(len: u64, message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len).with_message(message);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// What a training run did.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainReport {
    pub steps: usize,
    pub examples: usize,
    pub first_loss: f64,
    pub last_loss: f64,
}

/// Shuffled batches over `examples`, reshuffled (with `rng`) each time an epoch runs out.
struct Batches<'e, T> {
    examples: &'e mut [T],
    size: usize,
    cursor: usize,
    rng: ChaCha20Rng,
}

impl<'e, T> Batches<'e, T> {
    fn new(examples: &'e mut [T], size: usize, seed: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        examples.shuffle(&mut rng);
        Self { examples, size, cursor: 0, rng }
    }

    fn next_batch(&mut self) -> &[T] {
        if self.cursor + self.size > self.examples.len() {
            self.examples.shuffle(&mut self.rng);
            self.cursor = 0;
        }
        let start = self.cursor;
        self.cursor = (start + self.size).min(self.examples.len());
        &self.examples[start..self.cursor]
    }
}

/// AdamW without weight decay over every variable of `vs`.
fn adam_w(vs: &nn::VarStore, learning_rate: f64) -> Result<nn::Optimizer, ModelError> {
    nn::AdamW { wd: 0.0, ..Default::default() }
        .build(vs, learning_rate)
        .map_err(|e| ModelError::AdapterShape(format!("optimizer: {e}")))
}

impl TrainReport {
    /// The report of a run with nothing to train on.
    fn nothing() -> Self {
        Self { steps: 0, examples: 0, first_loss: f64::NAN, last_loss: f64::NAN }
    }
}

/// `set` (training prefixes or tower rows), or `None` when there is nothing to train;
/// seeds libtorch's generator with the run's seed.
fn training_set<T>(set: Vec<T>, config: &TrainConfig) -> Option<Vec<T>> {
    tch::manual_seed(config.seed as i64);
    (!set.is_empty() && config.steps > 0).then_some(set)
}

/// A seeded sample of at most `n` users (all of them if `n` is larger).
pub fn sample_users<'a>(users: &[&'a User], n: usize, seed: u64) -> Vec<&'a User> {
    let mut sample = users.to_vec();
    sample.shuffle(&mut ChaCha20Rng::seed_from_u64(seed));
    sample.truncate(n);
    sample
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    #[test]
    fn writers_racing_for_one_cache_file_each_publish_a_whole_file() {
        // Every writer has written its file before any publishes it: with one shared
        // temporary name the first rename moves it away and the others fail (as two
        // simulations encoding the same catalogue once did).
        let (dir, path) = guild_testkit::scratch_path("items.safetensors");
        let writers = 4;
        let written = Arc::new(Barrier::new(writers));
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let (path, written) = (path.clone(), Arc::clone(&written));
                std::thread::spawn(move || {
                    write_atomically(&path, |partial| {
                        std::fs::write(partial, vec![w as u8; 4096])
                            .map_err(|e| ModelError::io(partial, e))?;
                        written.wait();
                        Ok(())
                    })
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("writer thread").expect("every writer publishes");
        }
        let bytes = std::fs::read(&path).expect("the published file");
        assert_eq!(bytes.len(), 4096);
        assert!(bytes.iter().all(|&b| b == bytes[0]), "one writer's whole file");
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("list").collect();
        assert_eq!(left.len(), 1, "no temporary file left behind: {left:?}");
    }
}

#[cfg(test)]
mod test_support {
    use super::*;

    /// A one-layer tower over 16-dimensional items, L = 8 (the start: the mean of five).
    pub(super) fn tower_shape(item_rank: usize, heads: usize, catalogue: usize) -> TowerShape {
        TowerShape {
            hidden: 16,
            history: 8,
            zero_shot_items: 5,
            item_rank,
            width: 16,
            layers: 1,
            heads,
            catalogue,
            neighbours: 0,
            pair_sketch: 0,
            item_ids: 0,
            spectral: 0,
        }
    }

    /// Shoppers on a synthetic catalogue whose next item is always the item after the last
    /// one: a pattern the tower can learn from item vectors alone.
    pub(super) fn shoppers(n: u32, items: u32) -> Vec<User> {
        (0..n)
            .map(|u| {
                let start = (u * 7) % items;
                let history: Vec<ItemIndex> = (0..6).map(|k| (start + k) % items).collect();
                User { id: u.to_string(), history, test_target: (start + 6) % items }
            })
            .collect()
    }
}
