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
    counts.cross_entropy_sum += cross_entropy_sum(&scores, &targets);
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

/// Rows of the double-precision softmax taken at once: a row is a catalogue's worth of f64
/// (135 KB for 16,859 items), so 32 rows stay far below glibc's largest mmap threshold
/// (32 MiB). A whole scoring batch at once (256 rows, 35 MB in f64, twice: the cast and
/// the softmax) was mapped afresh and faulted in page by page on every batch: 27.5 M minor
/// page faults and 65 s of system time in the default scenario's untrained and centralised
/// arms alone (`perf record -e page-faults`), where chunks reuse the same heap memory.
const SOFTMAX_ROWS: i64 = 32;

/// Σ −log p(target) over the rows of `scores` (masked, `[batch, catalogue]`, on the CPU),
/// p the softmax at [`EVALUATION_TEMPERATURE`] in double precision, `SOFTMAX_ROWS` rows at a
/// time (the same value as one softmax over the whole batch: rows are independent).
fn cross_entropy_sum(scores: &Tensor, targets: &Tensor) -> f64 {
    let rows = scores.size()[0];
    let mut sum = 0.0;
    let mut start = 0;
    while start < rows {
        let n = SOFTMAX_ROWS.min(rows - start);
        let log_p = (scores.narrow(0, start, n) / EVALUATION_TEMPERATURE)
            .log_softmax(1, Kind::Double)
            .gather(1, &targets.narrow(0, start, n).unsqueeze(1), false);
        sum -= f64::try_from(log_p.sum(Kind::Double)).expect("a scalar");
        start += n;
    }
    sum
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Taken in chunks of rows, the cross-entropy is the one softmax over the whole batch
    /// (to rounding in the last places), masked items included, for a batch that is not a
    /// multiple of the chunk.
    #[test]
    fn the_chunked_cross_entropy_is_the_whole_batchs() {
        tch::manual_seed(11);
        let rows = 2 * SOFTMAX_ROWS + 5;
        let scores = Tensor::randn([rows, 300], (Kind::Float, tch::Device::Cpu));
        let _ = scores.get(3).index_fill_(0, &Tensor::from_slice(&[0i64, 7, 8]), f64::NEG_INFINITY);
        let targets = Tensor::randint(299, [rows], (Kind::Int64, tch::Device::Cpu)) + 1;
        let whole = -f64::try_from(
            (&scores / EVALUATION_TEMPERATURE)
                .log_softmax(1, Kind::Double)
                .gather(1, &targets.unsqueeze(1), false)
                .sum(Kind::Double),
        )
        .expect("a scalar");
        let chunked = cross_entropy_sum(&scores, &targets);
        assert!(whole.is_finite() && whole > 0.0, "{whole}");
        assert!((chunked - whole).abs() <= 1e-9 * whole, "chunked {chunked} against {whole}");
        // One row alone: its own −log p.
        let one = cross_entropy_sum(&scores.narrow(0, 0, 1), &targets.narrow(0, 0, 1));
        let row = (&scores.get(0) / EVALUATION_TEMPERATURE).to_kind(Kind::Double);
        let target = row.double_value(&[targets.int64_value(&[0])]);
        let expected = row.logsumexp([0], false).double_value(&[]) - target;
        assert!((one - expected).abs() < 1e-9 * expected.abs().max(1.0), "{one} against {expected}");
    }
}
