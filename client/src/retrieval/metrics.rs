//! What evaluation counts: each held-out item's rank against the whole catalogue, as
//! additive sums (Recall@10, NDCG@10, MRR, cross-entropy) and per user.

use super::*;

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

/// Ranks each example's target in its row of `scores` (`[batch, catalogue]`), with the
/// items already in its history excluded, and adds the row to `counts` and `ranks`.
pub(super) fn rank_rows(
    scores: &Tensor,
    examples: &[Example<'_>],
    counts: &mut RankingCounts,
    ranks: &mut Vec<u32>,
) {
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
pub(super) fn ndcg_at_10(rank: i64) -> f64 {
    if rank <= 10 { 1.0 / ((rank + 1) as f64).log2() } else { 0.0 }
}

/// The examples of `split` of each user (users without one are skipped).
pub(super) fn held_out<'a>(users: &[&'a User], split: Split) -> Vec<Example<'a>> {
    users
        .iter()
        .filter_map(|u| match split {
            Split::Validation => u.validation_example(),
            Split::Test => Some(u.test_example()),
        })
        .collect()
}
