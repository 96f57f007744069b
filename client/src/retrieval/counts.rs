//! Item-to-item counts: the collaborative statistic the frozen title vectors lack, and the
//! simple ranker a recommender engineer tries first. Which item follows which in shoppers'
//! training histories (transitions), and which items appear within a short window of each
//! other (co-occurrence), summed over shoppers. A history's score of a candidate is the
//! recency-weighted sum, over its last few items, of that item's counts with the candidate.
//!
//! The counts are a sum over shoppers, like the popularity histogram; this module computes
//! them exactly, in one process, as a reference (the untrained count ranker, and the
//! ceiling of a tower that adds them as a prior).

use tch::Tensor;

use super::metrics::{held_out, rank_rows};
use super::{RankingCounts, Split};
use crate::data::{ItemIndex, User};

/// The pair weights, shared with the federated counts of the sequence tower
/// (`guild_proto::tower`; both enumerate pairs with `model::tower::item_pairs`): a
/// co-occurrence within the window counts 0.3, a transition 1.
pub use guild_proto::tower::{CO_OCCURRENCE_WEIGHT, CO_OCCURRENCE_WINDOW as WINDOW};
/// The weights of a history's last items in its score, from the most recent.
pub const RECENCY: [f32; 3] = [1.0, 0.5, 0.25];
/// The weight of popularity in the count ranker: it only breaks ties (at most this much,
/// for the most popular item, far below one co-occurrence).
const TIE_BREAK: f32 = 1e-3;

/// Summed item-to-item counts over a catalogue, one sparse row per item, and the number of
/// times each item occurs (for breaking ties).
#[derive(Clone, Debug, PartialEq)]
pub struct ItemCounts {
    rows: Vec<Vec<(ItemIndex, f32)>>,
    popularity: Vec<f32>,
}

impl ItemCounts {
    /// The counts of the training items of `users` (each history without its validation
    /// item; the test item is never in a history) over a catalogue of `catalogue` items.
    pub fn of_training(users: &[&User], catalogue: usize) -> Self {
        let mut pairs: std::collections::HashMap<(ItemIndex, ItemIndex), f32> = Default::default();
        let mut popularity = vec![0.0f32; catalogue];
        for user in users {
            let training = &user.history[..user.history.len().saturating_sub(1)];
            for &item in training {
                popularity[item as usize] += 1.0;
            }
            crate::model::tower::item_pairs(training, |from, to, weight| {
                *pairs.entry((from, to)).or_default() += weight;
            });
        }
        let mut rows = vec![Vec::new(); catalogue];
        for ((from, to), count) in pairs {
            rows[from as usize].push((to, count));
        }
        for row in &mut rows {
            row.sort_unstable_by_key(|&(to, _)| to);
        }
        Self { rows, popularity }
    }

    /// The number of distinct (item, item) pairs with a count.
    pub fn pairs(&self) -> usize {
        self.rows.iter().map(Vec::len).sum()
    }

    /// `history`'s count of every catalogue item: Σ over its last items (weighted by
    /// [`RECENCY`]) of each one's counts with the candidate.
    pub fn history_counts(&self, history: &[ItemIndex]) -> Vec<f32> {
        let mut scores = vec![0.0f32; self.popularity.len()];
        for (&item, weight) in history.iter().rev().zip(RECENCY) {
            for &(to, count) in &self.rows[item as usize] {
                scores[to as usize] += weight * count;
            }
        }
        scores
    }

    /// The count ranker's scores of `histories`, `[batch, catalogue]`: each history's counts,
    /// ties broken by popularity.
    fn ranker_scores(&self, histories: &[&[ItemIndex]]) -> Tensor {
        let most = self.popularity.iter().copied().fold(1.0f32, f32::max);
        let mut flat = Vec::with_capacity(histories.len() * self.popularity.len());
        for history in histories {
            let counts = self.history_counts(history);
            flat.extend(counts.iter().zip(&self.popularity).map(|(c, p)| c + TIE_BREAK * p / most));
        }
        Tensor::from_slice(&flat).reshape([histories.len() as i64, self.popularity.len() as i64])
    }

    /// The counts of `histories` as a prior, `[batch, catalogue]`: `weight · ln(1 + count)`.
    pub fn prior(&self, histories: &[&[ItemIndex]], weight: f64) -> Tensor {
        let mut flat = Vec::with_capacity(histories.len() * self.popularity.len());
        for history in histories {
            flat.extend(self.history_counts(history).iter().map(|c| c.ln_1p()));
        }
        Tensor::from_slice(&flat).reshape([histories.len() as i64, self.popularity.len() as i64]) * weight
    }
}

/// The untrained count ranker on `users`' held-out items of `split`: each user's rank of
/// its target, the history masked as every ranker's is. Its cross-entropy is of raw counts
/// over the evaluation temperature: not comparable with the cosine rankers'.
pub fn evaluate_counts(counts: &ItemCounts, users: &[&User], split: Split) -> (RankingCounts, Vec<u32>) {
    rank_held_out(users, split, |histories| counts.ranker_scores(histories))
}

/// The most-popular ranker on `users`' held-out items of `split`: every history gets the
/// same scores, the number of training interactions of each item over the users the counts
/// were built from (divided by the largest), the history masked as every ranker's is.
pub fn evaluate_most_popular(
    counts: &ItemCounts,
    users: &[&User],
    split: Split,
) -> (RankingCounts, Vec<u32>) {
    let most = counts.popularity.iter().copied().fold(1.0f32, f32::max);
    let row = Tensor::from_slice(&counts.popularity.iter().map(|p| p / most).collect::<Vec<_>>());
    rank_held_out(users, split, |histories| {
        row.unsqueeze(0).expand([histories.len() as i64, -1], false).contiguous()
    })
}

/// Ranks `users`' held-out items of `split` by `scores` of each batch of histories
/// (`[batch, catalogue]`), the history masked.
fn rank_held_out(
    users: &[&User],
    split: Split,
    scores: impl Fn(&[&[ItemIndex]]) -> Tensor,
) -> (RankingCounts, Vec<u32>) {
    let examples = held_out(users, split);
    let mut ranking = RankingCounts::default();
    let mut ranks = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(256) {
        let histories: Vec<&[ItemIndex]> = chunk.iter().map(|e| e.history).collect();
        rank_rows(&scores(&histories), chunk, &mut ranking, &mut ranks);
    }
    (ranking, ranks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(history: &[ItemIndex], test: ItemIndex) -> User {
        User { id: String::new(), history: history.to_vec(), test_target: test }
    }

    #[test]
    fn counts_are_transitions_plus_windowed_co_occurrence_of_training_items_only() {
        // Training items 0, 1, 2, 3 (4 is the validation item, 5 the test item).
        let users = [user(&[0, 1, 2, 3, 4], 5)];
        let counts = ItemCounts::of_training(&users.iter().collect::<Vec<_>>(), 6);
        let row_is = |i: usize, expected: &[(ItemIndex, f32)]| {
            let row = &counts.rows[i];
            row.len() == expected.len()
                && row.iter().zip(expected).all(|(a, b)| a.0 == b.0 && (a.1 - b.1).abs() < 1e-6)
        };
        // 0 → 1: one transition and one co-occurrence; 0 – 2 and 0 – 3 co-occur (window 3).
        assert!(row_is(0, &[(1, 1.3), (2, 0.3), (3, 0.3)]), "{:?}", counts.rows[0]);
        // 1 ← 0 co-occurs; 1 → 2 follows; 1 – 3 co-occurs.
        assert!(row_is(1, &[(0, 0.3), (2, 1.3), (3, 0.3)]), "{:?}", counts.rows[1]);
        // Nothing pairs with the validation or the test item.
        assert!(counts.rows.iter().flatten().all(|&(to, _)| to < 4));
        assert!(counts.rows[4].is_empty() && counts.rows[5].is_empty());
        assert_eq!(counts.pairs(), 12);
    }

    #[test]
    fn a_history_scores_candidates_by_its_last_three_items_by_recency() {
        // Four shoppers, each with one training pair: 0 → 7, 1 → 8, 2 → 9 and 3 → 6.
        let users = [user(&[0, 7, 99], 0), user(&[1, 8, 99], 0), user(&[2, 9, 99], 0), user(&[3, 6, 99], 0)];
        let counts = ItemCounts::of_training(&users.iter().collect::<Vec<_>>(), 100);
        let scores = counts.history_counts(&[3, 2, 1, 0]);
        // The last item (0) weighs 1, then 1 at 0.5, 2 at 0.25; 3 is beyond the last three.
        assert!((scores[7] - 1.3).abs() < 1e-6);
        assert!((scores[8] - 0.65).abs() < 1e-6);
        assert!((scores[9] - 0.325).abs() < 1e-6);
        assert_eq!(scores[6], 0.0);
    }

    #[test]
    fn the_count_ranker_ranks_the_usual_successor_first() {
        // Every shopper who bought 0 bought 1 next, apart from one who bought 2.
        let mut users: Vec<User> = (0..5).map(|_| user(&[0, 1, 99], 0)).collect();
        users.push(user(&[0, 2, 99], 0));
        // The evaluated shopper: 0 last, 1 next (its test item).
        users.push(user(&[5, 0], 1));
        let refs: Vec<&User> = users.iter().collect();
        let counts = ItemCounts::of_training(&refs, 100);
        let (ranking, ranks) = evaluate_counts(&counts, &refs[6..], Split::Test);
        assert_eq!(ranks, vec![1]);
        assert_eq!(ranking.hits_at_10, 1);
        // And 2 ranks second for a shopper whose next item is 2.
        let other = [user(&[5, 0], 2)];
        let (_, ranks) = evaluate_counts(&counts, &other.iter().collect::<Vec<_>>(), Split::Test);
        assert_eq!(ranks, vec![2]);
    }

    #[test]
    fn the_most_popular_ranker_ranks_by_training_interactions_with_the_history_masked() {
        // Training items (each history's last item, 4, is its validation item): 2 three
        // times, 1 twice, 0 and 5 once.
        let users = [user(&[2, 1, 0, 4], 3), user(&[2, 1, 4], 0), user(&[2, 4], 1), user(&[5, 4], 0)];
        let users: Vec<&User> = users.iter().collect();
        let counts = ItemCounts::of_training(&users, 8);
        let (ranking, ranks) = evaluate_most_popular(&counts, &users, Split::Test);
        // 3 is never seen: behind 5 (2, 1 and 0 are masked); 0 ties with 5 (a tie is not
        // ahead); 1 is behind only the masked 2; 0 is behind 2 and 1 where they are not masked.
        assert_eq!(ranks, [2, 1, 1, 3]);
        assert_eq!(ranking.users, 4);
        assert_eq!(ranking.hits_at_10, 4);
    }
}
