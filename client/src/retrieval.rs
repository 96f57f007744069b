//! Two-tower next-item retrieval on the MiniLM encoder: the query tower (with adapters)
//! encodes a shopper's recent history as text, the item tower (the frozen base) encodes
//! product titles; score = cosine / τ; the loss is softmax cross-entropy against the
//! other targets of the batch. Evaluation ranks the whole catalogue.

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
    // Write to a temporary name, then rename: a crash never leaves a truncated cache.
    let partial = path.with_extension("partial");
    Tensor::write_safetensors(&[("items", &embeddings)], &partial)
        .map_err(|e| ModelError::load(&partial, e))?;
    std::fs::rename(&partial, &path).map_err(|e| ModelError::io(&path, e))?;
    Ok(embeddings)
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

/// Trains `adapters` on the training examples of `users` (in-batch softmax, AdamW on the
/// adapter variables only), deterministically for a seed on the CPU.
pub fn train(
    base: &BaseModel,
    adapters: &Adapters,
    dataset: &Dataset,
    users: &[&User],
    items: &Tensor,
    config: &TrainConfig,
) -> Result<TrainReport, ModelError> {
    let prefixes = users.iter().flat_map(|u| u.training_examples()).collect();
    let Some(mut examples) = training_set(prefixes, config) else {
        return Ok(TrainReport::nothing());
    };
    let mut rng = ChaCha20Rng::seed_from_u64(config.seed);
    examples.shuffle(&mut rng);
    // In-batch negatives are drawn in proportion to how often an item is a target, which
    // teaches the model to push popular items down; subtracting ln(frequency) from each
    // logit corrects that (the logQ correction of Yi et al., RecSys 2019). Frequencies come
    // from this merchant's own training targets, smoothed by one.
    let mut frequency = vec![1.0f32; items.size()[0] as usize];
    for e in &examples {
        frequency[e.target as usize] += 1.0;
    }
    let total: f32 = frequency.iter().sum();
    let log_q = Tensor::from_slice(&frequency.iter().map(|f| (f / total).ln()).collect::<Vec<_>>());
    let mut optimizer = adam_w(adapters.var_store(), config.learning_rate)?;
    let device = base.device();
    let progress = progress_bar(config.steps as u64, "training");
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    let example_count = examples.len();
    let mut batches = Batches { examples: &mut examples, size: config.batch_size, cursor: 0, rng };
    for step in 0..config.steps {
        let batch = batches.next_batch();
        let queries: Vec<String> =
            batch.iter().map(|e| query_text(dataset, e.history, config.history_items)).collect();
        let query_refs: Vec<&str> = queries.iter().map(String::as_str).collect();
        let targets: Vec<i64> = batch.iter().map(|e| i64::from(e.target)).collect();
        let target_ids = Tensor::from_slice(&targets);
        let q = base.embed(&query_refs, Some(adapters))?;
        let e = items.index_select(0, &target_ids).to(device);
        let correction = log_q.index_select(0, &target_ids).to(device).unsqueeze(0);
        let logits = q.matmul(&e.tr()) / config.temperature - correction;
        // Another row with the same target item is not a negative: mask it out.
        let same = target_ids.unsqueeze(1).eq_tensor(&target_ids.unsqueeze(0)).to(device);
        let diagonal = Tensor::eye(batch.len() as i64, (Kind::Bool, device));
        let false_negative = same.logical_and(&diagonal.logical_not());
        let logits = logits.masked_fill(&false_negative, -1e9);
        let labels = Tensor::arange(batch.len() as i64, (Kind::Int64, device));
        let loss = logits.cross_entropy_for_logits(&labels);
        optimizer.backward_step(&loss);
        last = loss.double_value(&[]);
        if step == 0 {
            first = last;
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(TrainReport { steps: config.steps, examples: example_count, first_loss: first, last_loss: last })
}

/// Sums of ranking metrics over users (sums, so they add up across merchants).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct RankingCounts {
    pub users: u64,
    pub hits_at_10: u64,
    pub ndcg_at_10_sum: f64,
    pub reciprocal_rank_sum: f64,
    /// Σ −log p(target), p the softmax over the catalogue (history items masked out) at the
    /// training temperature: the retrieval objective itself, smoother than any rank metric.
    pub cross_entropy_sum: f64,
}

impl RankingCounts {
    pub fn recall_at_10(&self) -> f64 {
        self.hits_at_10 as f64 / self.users.max(1) as f64
    }

    pub fn ndcg_at_10(&self) -> f64 {
        self.ndcg_at_10_sum / self.users.max(1) as f64
    }

    pub fn mrr(&self) -> f64 {
        self.reciprocal_rank_sum / self.users.max(1) as f64
    }

    /// Mean full-catalogue cross-entropy of the held-out item (lower is better).
    pub fn cross_entropy(&self) -> f64 {
        self.cross_entropy_sum / self.users.max(1) as f64
    }

    pub fn add(&mut self, other: &RankingCounts) {
        self.users += other.users;
        self.hits_at_10 += other.hits_at_10;
        self.ndcg_at_10_sum += other.ndcg_at_10_sum;
        self.reciprocal_rank_sum += other.reciprocal_rank_sum;
        self.cross_entropy_sum += other.cross_entropy_sum;
    }
}

/// The temperature of the evaluation's softmax: the training default, so the evaluation
/// cross-entropy is the objective training approximates.
pub const EVALUATION_TEMPERATURE: f64 = 0.05;

/// Which held-out example of each user to rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Validation,
    Test,
}

/// Full-catalogue ranking (no sampled negatives) of each user's held-out target among all
/// items except those already in the user's history (the standard full-ranking protocol;
/// in the Amazon Games data no target repeats a history item); rank = 1 + the number of
/// items scored strictly higher.
///
/// Returns the summed counts and each evaluated user's rank of its held-out item
/// (1-based, in the order of `users`, skipping users without an example of `split`), for
/// paired comparisons between arms evaluated on the same users.
pub fn evaluate_ranks(
    base: &BaseModel,
    adapters: Option<&Adapters>,
    dataset: &Dataset,
    users: &[&User],
    items: &Tensor,
    split: Split,
    history_items: usize,
) -> Result<(RankingCounts, Vec<u32>), ModelError> {
    let examples = held_out(users, split);
    let mut counts = RankingCounts::default();
    let mut all_ranks = Vec::with_capacity(examples.len());
    let progress = progress_bar(examples.len() as u64, "evaluating");
    for chunk in examples.chunks(64) {
        let queries: Vec<String> =
            chunk.iter().map(|e| query_text(dataset, e.history, history_items)).collect();
        let refs: Vec<&str> = queries.iter().map(String::as_str).collect();
        let q = base.embed_all(&refs, 64, adapters.map(|a| a as &dyn crate::model::bert::LowRank))?;
        let scores = q.matmul(&items.tr()); // [batch, catalogue], CPU
        rank_rows(&scores, chunk, &mut counts, &mut all_ranks);
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    Ok((counts, all_ranks))
}

/// Ranks each example's target in its row of `scores` (`[batch, catalogue]`), with the
/// items already in its history excluded, and adds the row to `counts` and `ranks`.
fn rank_rows(scores: &Tensor, examples: &[Example<'_>], counts: &mut RankingCounts, ranks: &mut Vec<u32>) {
    let (scores, targets, row_ranks) = target_ranks(scores, examples);
    let log_p = (&scores / EVALUATION_TEMPERATURE).log_softmax(1, Kind::Double).gather(
        1,
        &targets.unsqueeze(1),
        false,
    );
    counts.cross_entropy_sum -= f64::try_from(log_p.sum(Kind::Double)).expect("a scalar");
    for rank in Vec::<i64>::try_from(&row_ranks).expect("int64 ranks") {
        ranks.push(u32::try_from(rank).unwrap_or(u32::MAX));
        counts.users += 1;
        counts.reciprocal_rank_sum += 1.0 / rank as f64;
        if rank <= 10 {
            counts.hits_at_10 += 1;
            counts.ndcg_at_10_sum += ndcg_at_10(rank);
        }
    }
}

/// Each example's 1-based rank of its target among `scores` (a row per example, on any
/// device), the items of its history other than the target masked out; with the masked
/// scores (on the CPU) and the targets.
fn target_ranks(scores: &Tensor, examples: &[Example<'_>]) -> (Tensor, Tensor, Tensor) {
    let scores = scores.to(tch::Device::Cpu);
    for (row, example) in examples.iter().enumerate() {
        let seen: Vec<i64> =
            example.history.iter().filter(|&&i| i != example.target).map(|&i| i64::from(i)).collect();
        let _ = scores.get(row as i64).index_fill_(0, &Tensor::from_slice(&seen), f64::NEG_INFINITY);
    }
    let targets = Tensor::from_slice(&examples.iter().map(|e| i64::from(e.target)).collect::<Vec<_>>());
    let target_scores = scores.gather(1, &targets.unsqueeze(1), false);
    let row_ranks = scores.gt_tensor(&target_scores).sum_dim_intlist(1, false, Kind::Int64) + 1;
    (scores, targets, row_ranks)
}

/// NDCG@10 of a target at 1-based `rank`.
fn ndcg_at_10(rank: i64) -> f64 {
    if rank <= 10 { 1.0 / ((rank + 1) as f64).log2() } else { 0.0 }
}

/// What a pooling selection asks of each user: its NDCG@10 on its validation item under
/// every setting of `grid` (`guild_proto::tower::selection_grid` of the tower's shape),
/// ranked as [`evaluate_tower`] ranks (the history's other items masked out, ties in the
/// target's favour), with the tower's own values everywhere else; `[users][settings]`, all
/// zeros for a user without a validation item. Per batch of users the items' residual, the
/// transformer and the masks are computed once, the cosine once per distinct pooling and
/// the ranks once per setting.
pub fn selection_ndcg(
    tower: &Tower,
    items: &Tensor,
    users: &[&User],
    grid: &[PoolingSetting],
) -> Result<Vec<Vec<f32>>, ModelError> {
    let shape = tower.config().shape;
    let bad = |what: &str| ModelError::AdapterShape(format!("a pooling selection {what}"));
    let prior = tower.popularity_log().ok_or_else(|| bad("needs a tower with a popularity prior"))?;
    if grid.iter().any(|s| s.recency.len() != shape.history) {
        return Err(bad("setting does not fit the tower's history length"));
    }
    let device = items.device();
    // Distinct poolings in grid order, each with the settings that use it.
    let mut poolings: Vec<(&[f32], Vec<usize>)> = Vec::new();
    for (j, setting) in grid.iter().enumerate() {
        match poolings.iter_mut().find(|(r, _)| *r == setting.recency.as_slice()) {
            Some((_, settings)) => settings.push(j),
            None => poolings.push((&setting.recency, vec![j])),
        }
    }
    let recencies: Vec<Tensor> = poolings.iter().map(|(r, _)| Tensor::from_slice(r).to(device)).collect();
    let recencies: Vec<&Tensor> = recencies.iter().collect();
    let mut out = vec![vec![0.0f32; grid.len()]; users.len()];
    let examples: Vec<(usize, Example<'_>)> =
        users.iter().enumerate().filter_map(|(i, u)| Some((i, u.validation_example()?))).collect();
    let catalogue = items.size()[0];
    tch::no_grad(|| {
        let adapted = normalise(&tower.adapt_items(items)).tr();
        for chunk in examples.chunks(256) {
            let histories: Vec<&[ItemIndex]> = chunk.iter().map(|(_, e)| e.history).collect();
            let windows = last_windows(&histories, shape.history);
            let b = chunk.len() as i64;
            // The history's items other than the target, masked out of every ranking.
            let seen: Vec<i64> = chunk
                .iter()
                .enumerate()
                .flat_map(|(row, (_, e))| {
                    e.history
                        .iter()
                        .filter(|&&i| i != e.target)
                        .map(move |&i| row as i64 * catalogue + i64::from(i))
                })
                .collect();
            let mask = Tensor::zeros([b * catalogue], (Kind::Bool, device))
                .index_fill(0, &Tensor::from_slice(&seen).to(device), 1)
                .view([b, catalogue]);
            let targets =
                Tensor::from_slice(&chunk.iter().map(|(_, e)| i64::from(e.target)).collect::<Vec<_>>())
                    .to(device)
                    .unsqueeze(1);
            let prior_rows = prior.unsqueeze(0);
            let target_prior = prior.index_select(0, &targets.squeeze_dim(1)).unsqueeze(1);
            for ((_, settings), sequence) in poolings.iter().zip(tower.sequences(items, &windows, &recencies))
            {
                let shoppers = normalise(&last_positions(&sequence, &windows));
                let cosine = shoppers.matmul(&adapted).masked_fill(&mask, f64::NEG_INFINITY);
                let target_cosine = cosine.gather(1, &targets, false);
                for &j in settings {
                    let beta = f64::from(grid[j].weight);
                    let above =
                        (&cosine + &prior_rows * beta).gt_tensor(&(&target_cosine + &target_prior * beta));
                    let ranks = above.sum_dim_intlist(1, false, Kind::Int64).to(tch::Device::Cpu) + 1;
                    let ranks = Vec::<i64>::try_from(&ranks).expect("int64 ranks");
                    for ((user, _), rank) in chunk.iter().zip(ranks) {
                        out[*user][j] = ndcg_at_10(rank) as f32;
                    }
                }
            }
        }
    });
    Ok(out)
}

/// The examples of `split` of each user (users without one are skipped).
fn held_out<'a>(users: &[&'a User], split: Split) -> Vec<Example<'a>> {
    users
        .iter()
        .filter_map(|u| match split {
            Split::Validation => u.validation_example(),
            Split::Test => Some(u.test_example()),
        })
        .collect()
}

/// Full-catalogue evaluation of the sequence tower (as [`evaluate_ranks`]); `None`: the
/// zero-shot ranker of `shape`, the mean of the last five item vectors.
pub fn evaluate_tower(
    shape: &TowerShape,
    tower: Option<&Tower>,
    users: &[&User],
    items: &Tensor,
    split: Split,
) -> (RankingCounts, Vec<u32>) {
    let examples = held_out(users, split);
    let mut counts = RankingCounts::default();
    let mut ranks = Vec::with_capacity(examples.len());
    tch::no_grad(|| {
        let adapted = tower.map(|t| normalise(&t.adapt_items(items)));
        let prior = tower.and_then(Tower::prior).map(|p| p.unsqueeze(0));
        for chunk in examples.chunks(256) {
            let histories: Vec<&[ItemIndex]> = chunk.iter().map(|e| e.history).collect();
            let scores = match (tower, &adapted) {
                (Some(t), Some(adapted)) => {
                    let cosine = normalise(&t.shoppers(items, &histories)).matmul(&adapted.tr());
                    match &prior {
                        Some(prior) => cosine + prior,
                        None => cosine,
                    }
                }
                _ => zero_shot_scores(items, &histories, shape),
            };
            rank_rows(&scores, chunk, &mut counts, &mut ranks);
        }
    });
    (counts, ranks)
}

/// The tower's softmax cross-entropy of every target of `rows` (each weighs the same): over
/// the whole catalogue, or (with `config.negatives`) over the target and uniform negatives
/// shared by the batch.
fn tower_loss(tower: &Tower, items: &Tensor, rows: &[TowerRow<'_>], config: &TrainConfig) -> Tensor {
    let device = items.device();
    let windows: Vec<&[ItemIndex]> = rows.iter().map(|r| r.window).collect();
    let sequence = tower.sequence(items, &windows);
    let (b, m, hidden) = sequence.size3().expect("[batch, length, hidden]");
    let (mut at, mut target) = (Vec::new(), Vec::new());
    for (i, row) in rows.iter().enumerate() {
        for p in row.first_target..row.window.len() {
            at.push(i as i64 * m + p as i64);
            target.push(i64::from(row.next[p]));
        }
    }
    let targets = Tensor::from_slice(&target).to(device);
    let shoppers =
        normalise(&sequence.reshape([b * m, hidden]).index_select(0, &Tensor::from_slice(&at).to(device)));
    let catalogue = items.size()[0];
    let k = config.negatives as i64;
    // The popularity prior (β is trained through it; the histogram is not).
    let prior = tower.prior();
    if k == 0 || k >= catalogue {
        let cosine = shoppers.matmul(&normalise(&tower.adapt_items(items)).tr());
        let scores = match &prior {
            Some(prior) => cosine + prior.unsqueeze(0),
            None => cosine,
        };
        return (scores / config.temperature).cross_entropy_for_logits(&targets);
    }
    let positives = normalise(&tower.adapt_items(&items.index_select(0, &targets)));
    let negatives = Tensor::randint(catalogue, [k], (Kind::Int64, device));
    let negative_vectors = normalise(&tower.adapt_items(&items.index_select(0, &negatives)));
    let own = (&shoppers * &positives).sum_dim_intlist(-1, true, Kind::Float);
    let others = shoppers.matmul(&negative_vectors.tr());
    // Out of place (not `+=`), so autograd keeps what it saved.
    let (own, others) = match &prior {
        Some(prior) => (
            own + prior.index_select(0, &targets).unsqueeze(1),
            others + prior.index_select(0, &negatives).unsqueeze(0),
        ),
        None => (own, others),
    };
    // A sampled negative that is the row's own target is not a negative.
    let same = targets.unsqueeze(1).eq_tensor(&negatives.unsqueeze(0));
    let others = others.masked_fill(&same, -1e4);
    let logits = Tensor::cat(&[own, others], 1) / config.temperature;
    logits.cross_entropy_for_logits(&Tensor::zeros([targets.size()[0]], (Kind::Int64, device)))
}

/// Trains the sequence tower on the training examples of `users`: softmax cross-entropy at
/// temperature τ (full, or sampled with `config.negatives`), AdamW on every tower variable,
/// `config.steps` batches of `config.batch_size` rows (a row is one shopper's history of up
/// to `L` items, trained at every position at once, or one longer prefix; reshuffled each
/// epoch), deterministic for a seed.
pub fn train_tower(
    tower: &Tower,
    items: &Tensor,
    users: &[&User],
    config: &TrainConfig,
) -> Result<TrainReport, ModelError> {
    let length = tower.config().shape.history;
    let rows = users.iter().flat_map(|u| tower_rows(u, length)).collect();
    let Some(mut rows) = training_set(rows, config) else {
        return Ok(TrainReport::nothing());
    };
    let mut optimizer = adam_w(tower.var_store(), config.learning_rate)?;
    let items = items.to(tower.var_store().device());
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    let example_count = rows.iter().map(TowerRow::targets).sum();
    let mut batches = Batches::new(&mut rows, config.batch_size, config.seed);
    for step in 0..config.steps {
        let loss = tower_loss(tower, &items, batches.next_batch(), config);
        optimizer.backward_step(&loss);
        last = loss.double_value(&[]);
        if step == 0 {
            first = last;
        }
    }
    Ok(TrainReport { steps: config.steps, examples: example_count, first_loss: first, last_loss: last })
}

/// The shopper unit's local computation: for each of `users` on its own, `config.steps`
/// steps of plain SGD at `config.learning_rate` on that shopper's training rows alone
/// (every row of its history at once), starting from the tower's values at `global`
/// (an offset); `each` receives that shopper's update Δ = values − global, unclipped, one
/// shopper at a time (the caller clips and encodes each on its own). One step is DP-SGD's
/// per-example gradient, scaled by −η; several are user-level DP-FedAvg's local training
/// (McMahan et al. 2018) with the shopper as the client. A shopper with no training rows
/// gives a zero update. Leaves the tower at `global`.
pub fn shopper_updates(
    tower: &mut Tower,
    items: &Tensor,
    users: &[&User],
    global: &[f32],
    config: &TrainConfig,
    each: &mut dyn FnMut(&mut [f32]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let length = tower.config().shape.history;
    let items = items.to(tower.var_store().device());
    tch::manual_seed(config.seed as i64);
    tower.set_offset(global)?;
    if config.steps == 1 {
        // One step is −η times the gradient at `global`: no copy of the values, no optimiser.
        for user in users {
            let rows = tower_rows(user, length);
            let mut update = if rows.is_empty() {
                vec![0.0; global.len()]
            } else {
                tower.zero_gradients();
                tower_loss(tower, &items, &rows, config).backward();
                tower.flat_gradient()
            };
            let eta = config.learning_rate as f32;
            update.iter_mut().for_each(|g| *g *= -eta);
            each(&mut update)?;
        }
        return Ok(());
    }
    for user in users {
        tower.set_offset(global)?;
        let rows = tower_rows(user, length);
        if !rows.is_empty() && config.steps > 0 {
            let mut sgd = nn::Sgd::default().build(tower.var_store(), config.learning_rate)?;
            for _ in 0..config.steps {
                let loss = tower_loss(tower, &items, &rows, config);
                sgd.backward_step(&loss);
            }
        }
        let mut update = tower.offset();
        update.iter_mut().zip(global).for_each(|(u, g)| *u -= g);
        each(&mut update)?;
    }
    tower.set_offset(global)?;
    Ok(())
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
    use tch::Device;

    use super::*;
    use crate::model::tower::TowerConfig;

    /// A one-layer tower over 16-dimensional items, L = 8 (the start: the mean of five).
    fn tower_shape(item_rank: usize, heads: usize, catalogue: usize) -> TowerShape {
        TowerShape {
            hidden: 16,
            history: 8,
            zero_shot_items: 5,
            item_rank,
            width: 16,
            layers: 1,
            heads,
            catalogue,
        }
    }

    /// Shoppers on a synthetic catalogue whose next item is always the item after the last
    /// one: a pattern the tower can learn from item vectors alone.
    fn shoppers(n: u32, items: u32) -> Vec<User> {
        (0..n)
            .map(|u| {
                let start = (u * 7) % items;
                let history: Vec<ItemIndex> = (0..6).map(|k| (start + k) % items).collect();
                User { id: u.to_string(), history, test_target: (start + 6) % items }
            })
            .collect()
    }

    /// The oracle: each setting applied to the tower on its own and scored by
    /// `evaluate_tower`, which the reports use.
    #[test]
    fn a_pooling_selection_scores_each_setting_as_the_evaluation_would() {
        tch::manual_seed(2);
        let catalogue = 120;
        let items = normalise(&Tensor::randn([catalogue, 16], (Kind::Float, Device::Cpu)));
        let mut users = shoppers(40, catalogue as u32);
        // Varied histories (one too short for a validation item), so that the settings differ.
        for (u, user) in users.iter_mut().enumerate() {
            user.history.truncate(1 + u % 6);
            user.history.extend((0..u % 4).map(|k| ((u * 13 + k * 29) % catalogue as usize) as u32));
        }
        let refs: Vec<&User> = users.iter().collect();
        let shape = tower_shape(4, 4, catalogue as usize);
        let mut tower = Tower::new(TowerConfig { shape, seed: 5 }, Device::Cpu).expect("tower");
        let histogram: Vec<f32> = (0..catalogue).map(|i| ((i * 37) % 11) as f32).collect();
        tower.set_popularity(&histogram).expect("histogram");
        // A trained offset elsewhere must be kept while the settings are scored.
        let offset: Vec<f32> =
            tower.offset().iter().enumerate().map(|(i, o)| o + (i % 7) as f32 * 1e-3).collect();
        tower.set_offset(&offset).expect("offset");
        let grid = guild_proto::tower::selection_grid(&shape);
        let selected = selection_ndcg(&tower, &items, &refs, &grid).expect("selection");
        let moved = tower.offset().iter().zip(&offset).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(moved < 1e-5, "the tower is left at its values (moved by {moved})");
        assert_eq!(selected.len(), refs.len());
        assert!(selected[0].iter().all(|&v| v == 0.0), "no validation item, nothing scored");
        let mut differ = false;
        for (j, setting) in grid.iter().enumerate() {
            let mut alone = Tower::new(TowerConfig { shape, seed: 5 }, Device::Cpu).expect("tower");
            alone
                .set_offset(&guild_proto::tower::with_setting(&shape, &offset, setting).expect("fits"))
                .expect("set");
            let (_, ranks) = evaluate_tower(&shape, Some(&alone), &refs, &items, Split::Validation);
            let with_item: Vec<&Vec<f32>> = refs
                .iter()
                .zip(&selected)
                .filter(|(u, _)| u.validation_example().is_some())
                .map(|(_, v)| v)
                .collect();
            assert_eq!(ranks.len(), with_item.len());
            for (rank, values) in ranks.iter().zip(&with_item) {
                assert!((f64::from(values[j]) - ndcg_at_10(i64::from(*rank))).abs() < 1e-6, "setting {j}");
                differ |= values[j] != values[0];
            }
        }
        assert!(differ, "the grid's settings rank differently somewhere");
    }

    #[test]
    fn the_tower_learns_with_the_full_and_the_sampled_softmax() {
        tch::manual_seed(1);
        let items = normalise(&Tensor::randn([200, 16], (Kind::Float, Device::Cpu)));
        let users = shoppers(300, 200);
        let refs: Vec<&User> = users.iter().collect();
        let shape = tower_shape(8, 2, 0);
        let (start, _) = evaluate_tower(&shape, None, &refs, &items, Split::Validation);
        for negatives in [0, 32] {
            let tower = Tower::new(TowerConfig { shape, seed: 4 }, Device::Cpu).expect("tower");
            let config = TrainConfig {
                batch_size: 32,
                steps: 150,
                learning_rate: 1e-2,
                negatives,
                ..TrainConfig::default()
            };
            let report = train_tower(&tower, &items, &refs, &config).expect("train");
            assert!(report.last_loss < report.first_loss, "{negatives} negatives: {report:?}");
            let (trained, ranks) = evaluate_tower(&shape, Some(&tower), &refs, &items, Split::Validation);
            assert_eq!(ranks.len(), 300);
            assert!(
                trained.cross_entropy() < start.cross_entropy() - 0.5 && trained.mrr() > start.mrr(),
                "{negatives} negatives: {trained:?} against the start {start:?}"
            );
        }
    }

    /// The shopper unit's local computation: one step (the gradient fast path) equals one
    /// SGD step of the general path on that shopper alone, each shopper's update depends on
    /// its own rows only, and the tower is left at the global values.
    #[test]
    fn shopper_updates_are_each_shoppers_own_sgd_step() {
        let items = normalise(&Tensor::randn([50, 16], (Kind::Float, Device::Cpu)));
        let users = shoppers(4, 50);
        let refs: Vec<&User> = users.iter().collect();
        let shape = tower_shape(4, 2, 0);
        let mut tower = Tower::new(TowerConfig { shape, seed: 4 }, Device::Cpu).expect("tower");
        let global: Vec<f32> = (0..tower.parameter_count()).map(|i| ((i % 13) as f32 - 6.0) * 1e-3).collect();
        let collect = |tower: &mut Tower, users: &[&User], steps: usize| {
            let config = TrainConfig { steps, learning_rate: 0.5, negatives: 0, ..TrainConfig::default() };
            let mut updates = Vec::new();
            shopper_updates(tower, &items, users, &global, &config, &mut |u| {
                updates.push(u.to_vec());
                Ok(())
            })
            .expect("updates");
            updates
        };
        let fast = collect(&mut tower, &refs, 1);
        let moved = tower.offset().iter().zip(&global).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(moved < 1e-6, "the tower is left at the global values (moved {moved})");
        assert_eq!(fast.len(), 4);
        for (i, user) in refs.iter().enumerate() {
            // The general path (an optimiser step from `global`) on this shopper alone.
            let mut other = Tower::new(TowerConfig { shape, seed: 4 }, Device::Cpu).expect("tower");
            other.set_offset(&global).expect("offset");
            let mut sgd = nn::Sgd::default().build(other.var_store(), 0.5).expect("sgd");
            let config = TrainConfig { negatives: 0, ..TrainConfig::default() };
            sgd.backward_step(&tower_loss(&other, &items, &tower_rows(user, 8), &config));
            let expected: Vec<f32> = other.offset().iter().zip(&global).map(|(v, g)| v - g).collect();
            let diff = fast[i].iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let norm = expected.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(norm > 0.0 && diff < 1e-5 * norm.max(1.0), "shopper {i}: off by {diff} (norm {norm})");
            // The same shopper alone gives the same update: nothing leaks between shoppers.
            let alone = collect(&mut tower, &refs[i..=i], 1);
            assert!(alone[0] == fast[i], "shopper {i}: its update depends on the others");
        }
        let general = collect(&mut tower, &refs, 2);
        assert_eq!(general.len(), 4);
        assert!(general.iter().zip(&fast).all(|(g, f)| g != f), "two steps differ from one");
    }
}
