//! Search, evaluated with a query protocol built from the data (there is no query log):
//!
//! - **the query** of a held-out example (validation: a shopper's second-to-last item;
//!   test: its last) is [`QUERY_WORDS`] words of the target item's title: the title
//!   lower-cased and cut into runs of letters and digits, runs under two characters and
//!   repeats dropped, that many drawn without replacement by a generator seeded from the
//!   shopper's id (SHA-256), kept in title order (a shorter title is its whole word list);
//! - **the context** is the history before the target;
//! - **the ranking** is over the whole catalogue, the history's items other than the target
//!   masked (as for recommendations), scored as `guild-client serve` scores a search:
//!   the query's MiniLM cosine with each item's MiniLM title vector (not the adapted one: the
//!   query and the titles share MiniLM's space, the adapted vectors and their item IDs do
//!   not), plus `w` times the recommendation score of the history (the tower's, with its
//!   adapted item vectors, or the zero-shot mean of the last items' when there is no adapter).

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::Digest;
use tch::Tensor;

use super::metrics::{RankingCounts, Split, held_out, rank_rows};
use crate::data::{Dataset, ItemIndex, User};
use crate::model::tower::{Tower, normalise, zero_shot_scores};
use guild_proto::tower::TowerShape;

/// Words of the target's title in a query.
pub const QUERY_WORDS: usize = 3;

/// The query for `title`, drawn for the shopper `user_id` ([the protocol](self)).
pub fn query_for(title: &str, user_id: &str) -> String {
    let lower = title.to_lowercase();
    let mut words: Vec<&str> = Vec::new();
    for word in lower.split(|c: char| !c.is_alphanumeric()).filter(|w| w.chars().count() >= 2) {
        if !words.contains(&word) {
            words.push(word);
        }
    }
    if words.len() <= QUERY_WORDS {
        return words.join(" ");
    }
    let digest: [u8; 32] = sha2::Sha256::digest(user_id.as_bytes()).into();
    let mut rng = ChaCha20Rng::from_seed(digest);
    let mut chosen = rand::seq::index::sample(&mut rng, words.len(), QUERY_WORDS).into_vec();
    chosen.sort_unstable();
    chosen.iter().map(|&i| words[i]).collect::<Vec<_>>().join(" ")
}

/// The query of each of `users`' held-out examples of `split`, in the order the
/// evaluation ranks them.
pub fn search_queries(dataset: &Dataset, users: &[&User], split: Split) -> Vec<String> {
    let mut queries = Vec::new();
    for user in users {
        let example = match split {
            Split::Validation => user.validation_example(),
            Split::Test => Some(user.test_example()),
        };
        if let Some(e) = example {
            queries.push(query_for(dataset.title(e.target), &user.id));
        }
    }
    queries
}

/// Ranks and counts of each of `weights` (w) for `users`' held-out examples of `split`:
/// `queries` are the examples' normalised query vectors `[examples, hidden]` in
/// [`search_queries`]' order; `tower` adapts the items and scores the history (none: the
/// raw title vectors and the zero-shot history score of `shape`).
pub fn evaluate_search(
    shape: &TowerShape,
    tower: Option<&Tower>,
    users: &[&User],
    items: &Tensor,
    queries: &Tensor,
    split: Split,
    weights: &[f64],
) -> Vec<(RankingCounts, Vec<u32>)> {
    let examples = held_out(users, split);
    assert_eq!(queries.size()[0] as usize, examples.len(), "one query per held-out example");
    let mut out: Vec<(RankingCounts, Vec<u32>)> =
        weights.iter().map(|_| (RankingCounts::default(), Vec::with_capacity(examples.len()))).collect();
    tch::no_grad(|| {
        // The query is MiniLM's, so its text score is against MiniLM's title vectors; the
        // adapted ones (residual, item IDs) serve the recommendation score alone.
        let titles = normalise(items);
        let tower = tower.map(|t| (t, normalise(&t.adapt_items(items))));
        let prior = tower.as_ref().and_then(|(t, _)| t.prior()).map(|p| p.unsqueeze(0));
        let queries = normalise(&queries.to(items.device()));
        let mut start = 0i64;
        for chunk in examples.chunks(256) {
            let histories: Vec<&[ItemIndex]> = chunk.iter().map(|e| e.history).collect();
            let text = queries.narrow(0, start, chunk.len() as i64).matmul(&titles.tr());
            start += chunk.len() as i64;
            let personal = match &tower {
                Some((t, adapted)) => t.scores_against(items, adapted, prior.as_ref(), &histories),
                None => zero_shot_scores(items, &histories, shape),
            };
            for (w, (counts, ranks)) in weights.iter().zip(out.iter_mut()) {
                let scores = if *w == 0.0 { text.shallow_clone() } else { &text + &personal * *w };
                rank_rows(&scores, chunk, counts, ranks);
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_three_distinct_title_words_in_order_drawn_per_shopper() {
        let title = "Xbox One Wireless Controller - Black (Xbox One, Windows 10)";
        let query = query_for(title, "A1");
        let words: Vec<&str> = query.split(' ').collect();
        assert_eq!(words.len(), 3, "{query}");
        let all = ["xbox", "one", "wireless", "controller", "black", "windows", "10"];
        let positions: Vec<usize> =
            words.iter().map(|w| all.iter().position(|a| a == w).expect("a title word")).collect();
        assert!(positions.windows(2).all(|p| p[0] < p[1]), "{query}: in title order, no repeat");
        assert_eq!(query, query_for(title, "A1"), "the same shopper draws the same words");
        let drawn: std::collections::BTreeSet<String> =
            (0..40).map(|i| query_for(title, &format!("user-{i}"))).collect();
        assert!(drawn.len() > 5, "other shoppers draw other words: {drawn:?}");
        assert_eq!(query_for("Halo 3", "A1"), "halo");
        assert_eq!(query_for("Mario Kart 8", "A1"), "mario kart");
    }
}
