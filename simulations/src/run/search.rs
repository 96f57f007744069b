//! Search, evaluated with `guild_client::retrieval::search`'s query protocol on the first
//! `[arms] search_users` evaluation users: text only (the query's MiniLM cosine with the
//! title vectors), personalised by the zero-shot history score, and personalised by each
//! trained tower arm's adapter (the centralised and the federated ones). The
//! personalisation weight is chosen on the validation split from [`WEIGHTS`]; the test split
//! is read once per way of searching, and each is compared with text only on the same users.

use guild_client::model::tower::Tower;
use guild_client::retrieval::{Split, evaluate_search, search_queries};
use guild_proto::tower::TowerShape;

use crate::results::{ArmResult, Scores, SearchResult};
use crate::scenario::Scenario;
use crate::stats::{BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, Metric, paired_difference, per_user};
use crate::world::{World, lock};

/// The personalisation weights tried on validation.
pub const WEIGHTS: [f64; 8] = [0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0];

/// Search on `world`'s evaluation users; a DP arm's adapter (one with an ε) has the shape
/// of `private`'s tower (the scenario's `dp_tower`, or `world`'s).
pub(super) fn search(
    world: &World,
    private: &World,
    s: &Scenario,
    arms: &[ArmResult],
) -> anyhow::Result<Vec<SearchResult>> {
    let mut shared = lock(&world.shared);
    // The adapters' towers first: building one takes the shared state mutably (it computes
    // the title neighbours once, if the tower has item-to-item counts).
    let mut ways: Vec<(String, Option<Tower>, &TowerShape)> = vec![
        ("text only".into(), None, &world.spec.tower.shape),
        ("personalised (zero-shot history score)".into(), None, &world.spec.tower.shape),
    ];
    for arm in arms {
        if let Some(values) = &arm.final_adapter {
            let config = if arm.epsilon.is_some() { &private.spec.tower } else { &world.spec.tower };
            let mut tower = shared.tower(config)?;
            tower.set_offset(values)?;
            ways.push((format!("personalised, {} adapter", arm.arm), Some(tower), &config.shape));
        }
    }
    let n = s.arms.search_users.min(world.eval_users.len());
    let users: Vec<_> = world.eval_users[..n].iter().map(|&i| &shared.dataset.users[i]).collect();
    let encode = |split| -> anyhow::Result<_> {
        let queries = search_queries(&shared.dataset, &users, split);
        let texts: Vec<&str> = queries.iter().map(String::as_str).collect();
        Ok(shared.base.embed_all(&texts, 64, None)?)
    };
    let (validation_queries, test_queries) = (encode(Split::Validation)?, encode(Split::Test)?);
    let items = shared.items.to(shared.base.device());
    let mut results: Vec<SearchResult> = Vec::new();
    let mut text_only: Option<Vec<f64>> = None;
    for (i, (name, tower, shape)) in ways.iter().enumerate() {
        let grid: &[f64] = if i == 0 { &[0.0] } else { &WEIGHTS };
        let validation = evaluate_search(
            shape,
            tower.as_ref(),
            &users,
            &items,
            &validation_queries,
            Split::Validation,
            grid,
        );
        // The weight with the best validation NDCG@10 (the smallest on a tie).
        let (best, validation) = validation
            .into_iter()
            .enumerate()
            .map(|(j, (counts, _))| (j, Scores::from(counts)))
            .fold(None::<(usize, Scores)>, |acc, (j, s)| match acc {
                Some((_, ref a)) if a.ndcg_at_10 >= s.ndcg_at_10 => acc,
                _ => Some((j, s)),
            })
            .ok_or_else(|| anyhow::anyhow!("no validation example"))?;
        let weight = grid[best];
        let (counts, ranks) =
            evaluate_search(shape, tower.as_ref(), &users, &items, &test_queries, Split::Test, &[weight])
                .pop()
                .ok_or_else(|| anyhow::anyhow!("no test example"))?;
        let mine = per_user(Metric::NdcgAt10, std::slice::from_ref(&ranks))?;
        let recall = per_user(Metric::RecallAt10, &[ranks])?;
        let against_text_only = match &text_only {
            None => {
                text_only = Some([mine, recall].concat());
                Vec::new()
            }
            Some(reference) => {
                let (ndcg_ref, recall_ref) = reference.split_at(mine.len());
                vec![
                    paired_difference(
                        Metric::NdcgAt10,
                        &mine,
                        ndcg_ref,
                        BOOTSTRAP_RESAMPLES,
                        BOOTSTRAP_SEED,
                    )?,
                    paired_difference(
                        Metric::RecallAt10,
                        &recall,
                        recall_ref,
                        BOOTSTRAP_RESAMPLES,
                        BOOTSTRAP_SEED,
                    )?,
                ]
            }
        };
        results.push(SearchResult {
            name: name.clone(),
            weight: (i > 0).then_some(weight),
            validation,
            test: counts.into(),
            against_text_only,
        });
    }
    Ok(results)
}
