//! The MiniLM two-tower family: in-batch softmax training of the query tower's adapters
//! and full-catalogue evaluation.

use super::*;

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
