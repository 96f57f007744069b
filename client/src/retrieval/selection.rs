//! The pooling selection's scores: each shopper's NDCG@10 on its validation item under
//! every setting of the public grid, as the evaluation would rank it.

use super::*;

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
    let prior =
        Vec::<f32>::try_from(prior.to(tch::Device::Cpu).view([-1])).map_err(|e| bad(&e.to_string()))?;
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
    tch::no_grad(|| -> Result<(), ModelError> {
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
            for ((_, settings), sequence) in poolings.iter().zip(tower.sequences(items, &windows, &recencies))
            {
                let shoppers = normalise(&last_positions(&sequence, &windows));
                // The item-to-item prior does not depend on the setting: it rides with the cosine.
                let cosine = tower
                    .with_history_prior(shoppers.matmul(&adapted), &histories)
                    .masked_fill(&mask, f64::NEG_INFINITY)
                    .to(tch::Device::Cpu);
                let cosine = Vec::<f32>::try_from(cosine.view([-1])).map_err(|e| bad(&e.to_string()))?;
                let betas: Vec<f32> = settings.iter().map(|&j| grid[j].weight).collect();
                for (row, (user, example)) in chunk.iter().enumerate() {
                    let scores = &cosine[row * catalogue as usize..(row + 1) * catalogue as usize];
                    let ranks = ranks_under_weights(scores, &prior, example.target as usize, &betas);
                    for (&j, rank) in settings.iter().zip(ranks) {
                        out[*user][j] = ndcg_at_10(rank) as f32;
                    }
                }
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// The target's rank among `scores + β·prior` for each β of `betas`: one plus the items
/// whose score beats the target's (ties in the target's favour; a masked item's −∞ never
/// does), all weights in one pass over the catalogue. Each sum is the tensor expression
/// `scores + prior * β` in f32, multiplied then added, as the evaluation computes it.
fn ranks_under_weights(scores: &[f32], prior: &[f32], target: usize, betas: &[f32]) -> Vec<i64> {
    let thresholds: Vec<f32> = betas.iter().map(|&b| scores[target] + prior[target] * b).collect();
    let mut above = vec![0i64; betas.len()];
    for (&s, &p) in scores.iter().zip(prior) {
        for ((count, &b), &t) in above.iter_mut().zip(betas).zip(&thresholds) {
            *count += i64::from(s + p * b > t);
        }
    }
    above.into_iter().map(|a| a + 1).collect()
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::super::test_support::*;
    use super::*;
    use crate::model::tower::TowerConfig;

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
}
