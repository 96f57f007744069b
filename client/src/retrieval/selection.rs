//! The pooling selection's scores: each shopper's NDCG@10 on its validation item under
//! every setting of the public grid, as the evaluation would rank it; and the same for
//! candidates that also set the item-to-item prior's weights, which the simulator's
//! non-private arms choose on validation.

use super::*;

/// One candidate a selection scores: a pooling setting (its recency weights and popularity
/// weight β) and the weights of the item-to-item prior's two terms, β_t and γ
/// (`guild_proto::tower::TRANSITIONS_WEIGHT_TENSOR`, `SPECTRAL_WEIGHT_TENSOR`), each `None`
/// for the tower's own; everything else is the tower's own.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub setting: PoolingSetting,
    pub transitions_weight: Option<f32>,
    pub spectral_weight: Option<f32>,
}

impl Candidate {
    /// `setting` with the tower's own prior weights.
    pub fn own(setting: PoolingSetting) -> Self {
        Self { setting, transitions_weight: None, spectral_weight: None }
    }
}

/// What a pooling selection asks of each user: its NDCG@10 on its validation item under
/// every setting of `grid` (`guild_proto::tower::selection_grid` of the tower's shape),
/// ranked as [`evaluate_tower`] ranks (the history's other items masked out, ties in the
/// target's favour), with the tower's own values everywhere else; `[users][settings]`, all
/// zeros for a user without a validation item. [`candidates_ndcg`] with the tower's own
/// prior weights.
pub fn selection_ndcg(
    tower: &Tower,
    items: &Tensor,
    users: &[&User],
    grid: &[PoolingSetting],
) -> Result<Vec<Vec<f32>>, ModelError> {
    let candidates: Vec<Candidate> = grid.iter().cloned().map(Candidate::own).collect();
    candidates_ndcg(tower, items, users, &candidates)
}

/// The tower's mean NDCG@10 over the validation items of `users` (those that have one),
/// equal to the bit to [`evaluate_tower`]'s `ndcg_at_10()` on the validation split: the same
/// ranks, found by [`candidates_ndcg`]'s scan with its early exit at the tower's own
/// pooling and weights, and their NDCG@10 summed in the same order. What an early-stopping
/// check asks, without the full ranking and the full softmax's cross-entropy. `None` for a
/// tower without a popularity prior (the scan needs one; use [`evaluate_tower`]).
pub fn validation_ndcg(tower: &Tower, items: &Tensor, users: &[&User]) -> Result<Option<f64>, ModelError> {
    let shape = tower.config().shape;
    let Some(setting) = guild_proto::tower::setting_in(&shape, &tower.offset()) else {
        return Ok(None);
    };
    let scores = candidates_ndcg(tower, items, users, &[Candidate::own(setting)])?;
    // Each value is some rank's NDCG@10 in f32: summed as that rank's f64 value, in user
    // order, as the evaluation's counts sum them.
    let values: Vec<f64> = (1..=10).map(ndcg_at_10).collect();
    let (mut sum, mut ranked) = (0f64, 0usize);
    for (user, row) in users.iter().zip(&scores) {
        if user.validation_example().is_none() {
            continue;
        }
        ranked += 1;
        if row[0] > 0.0 {
            let rank = values
                .iter()
                .position(|&v| v as f32 == row[0])
                .ok_or_else(|| ModelError::AdapterShape(format!("{} is no rank's NDCG@10", row[0])))?;
            sum += values[rank];
        }
    }
    Ok(Some(sum / ranked.max(1) as f64))
}

/// Each user's NDCG@10 on its validation item under each of `candidates`, as
/// [`evaluate_tower`] ranks it for the tower with the candidate's pooling, popularity
/// weight and prior weights set (the history's other items masked out, ties in the
/// target's favour); `[users][candidates]`, all zeros for a user without a validation item.
///
/// NDCG@10 is zero once ten items beat the target, so a user's ranking stops there: the
/// catalogue is scanned in chunks of growing size, most popular items first (they are the
/// likeliest to beat it), and a user leaves a pooling's scan as soon as every candidate of
/// that pooling has ten items above its target; the ranks are the full ranking's (ties
/// within [`TIE_TOLERANCE`] go to the target, as exact ties do there).
/// Per batch of users the items' residual, the transformer, the item-to-item prior's terms
/// and the masks are computed once, the cosines once per distinct pooling and still-ranked
/// user, the prior's weighted sum once per distinct pair of prior weights and chunk (over
/// the users still ranked there), the counts once per candidate in one pass over each
/// chunk: seven weights of a prior cost about 1.1 scans, not seven
/// (`cargo bench -p guild-client --bench statistics`).
pub fn candidates_ndcg(
    tower: &Tower,
    items: &Tensor,
    users: &[&User],
    candidates: &[Candidate],
) -> Result<Vec<Vec<f32>>, ModelError> {
    let shape = tower.config().shape;
    let bad = |what: &str| ModelError::AdapterShape(format!("a pooling selection {what}"));
    let prior = tower.popularity_log().ok_or_else(|| bad("needs a tower with a popularity prior"))?;
    if candidates.iter().any(|c| c.setting.recency.len() != shape.history) {
        return Err(bad("setting does not fit the tower's history length"));
    }
    let device = items.device();
    // Distinct prior weights, and distinct poolings in candidate order, each with its
    // candidates grouped by prior weights: `(recency, [(weights, [candidate])])`.
    let (own_transitions, own_spectral) = tower.history_prior_weights();
    let mut weights: Vec<(f32, f32)> = Vec::new();
    let mut poolings: Vec<(&[f32], Vec<WeightGroup>)> = Vec::new();
    for (j, c) in candidates.iter().enumerate() {
        let pair =
            (c.transitions_weight.unwrap_or(own_transitions), c.spectral_weight.unwrap_or(own_spectral));
        let w = match weights.iter().position(|&p| p == pair) {
            Some(w) => w,
            None => {
                weights.push(pair);
                weights.len() - 1
            }
        };
        let recency = c.setting.recency.as_slice();
        let groups = match poolings.iter().position(|(r, _)| *r == recency) {
            Some(p) => &mut poolings[p].1,
            None => {
                poolings.push((recency, Vec::new()));
                &mut poolings.last_mut().expect("just pushed").1
            }
        };
        match groups.iter_mut().find(|(g, _)| *g == w) {
            Some((_, members)) => members.push(j),
            None => groups.push((w, vec![j])),
        }
    }
    // How many poolings score each pair of prior weights.
    let uses: Vec<usize> = (0..weights.len())
        .map(|w| poolings.iter().filter(|(_, g)| g.iter().any(|(v, _)| *v == w)).count())
        .collect();
    let weight_tensors: Vec<(Tensor, Option<Tensor>)> = weights
        .iter()
        .map(|&(t, g)| (Tensor::from_slice(&[t]), (g != 0.0).then(|| Tensor::from_slice(&[g]))))
        .collect();
    let spectral = weights.iter().any(|&(_, g)| g != 0.0);
    let recencies: Vec<Tensor> = poolings.iter().map(|(r, _)| Tensor::from_slice(r).to(device)).collect();
    let recencies: Vec<&Tensor> = recencies.iter().collect();
    let mut out = vec![vec![0.0f32; candidates.len()]; users.len()];
    let examples: Vec<(usize, Example<'_>)> =
        users.iter().enumerate().filter_map(|(i, u)| Some((i, u.validation_example()?))).collect();
    let catalogue = items.size()[0];
    // The scan's order: most popular first (ties by index), and each item's place in it.
    let prior = prior.to(tch::Device::Cpu).view([-1]);
    let scan = prior.argsort(0, true);
    let prior = Vec::<f32>::try_from(prior.index_select(0, &scan)).map_err(|e| bad(&e.to_string()))?;
    let scan_items = Vec::<i64>::try_from(&scan).map_err(|e| bad(&e.to_string()))?;
    let order = scan.to(device);
    let mut place = vec![0i64; catalogue as usize];
    for (k, &item) in scan_items.iter().enumerate() {
        place[item as usize] = k as i64;
    }
    let chunks = scan_chunks(catalogue);
    tch::no_grad(|| -> Result<(), ModelError> {
        // Normalised adapted items, `[hidden, catalogue]` in scan order.
        let adapted = normalise(&tower.adapt_items(items)).index_select(0, &order).tr().contiguous();
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
                .view([b, catalogue])
                .index_select(1, &order);
            // The item-to-item prior's terms at unit weight, `[b, catalogue]` in scan order.
            let terms =
                tower.history_prior_terms(&histories, spectral).map(|t| t.map(|t| t.index_select(1, &order)));
            // What the candidates of prior weights `w` add to the cosine over `[start, start
            // + width)` of the scan, for the still-ranked `rows` (`None`: all): the prior at
            // those weights, and the mask; computed for those rows alone, so a chunk late in
            // the scan, which few users reach, costs little.
            let base = |w: usize, start: i64, width: i64, rows: Option<&Tensor>| -> Tensor {
                let pick = |t: Tensor| match rows {
                    None => t,
                    Some(rows) => t.index_select(0, rows),
                };
                let mask = pick(mask.narrow(1, start, width));
                match &terms {
                    Some(terms) => {
                        let (t, g) = &weight_tensors[w];
                        terms.map(|t| pick(t.narrow(1, start, width))).weighted(t, g.as_ref())
                    }
                    None => Tensor::zeros(mask.size(), (Kind::Float, device)),
                }
                .masked_fill(&mask, f64::NEG_INFINITY)
            };
            let targets: Vec<i64> = chunk.iter().map(|(_, e)| place[e.target as usize]).collect();
            let target_columns = Tensor::from_slice(&targets).to(device);
            let target_terms =
                terms.as_ref().map(|t| t.map(|t| t.gather(1, &target_columns.unsqueeze(1), false)));
            let target_bases: Vec<Tensor> = weight_tensors
                .iter()
                .map(|(t, g)| match &target_terms {
                    Some(terms) => terms.weighted(t, g.as_ref()).squeeze_dim(1),
                    None => Tensor::zeros([b], (Kind::Float, device)),
                })
                .collect();
            let target_items = adapted.index_select(1, &target_columns).tr();
            // The chunks' bases for every user, `[weights][chunk]`, kept for the next pooling:
            // for a chunk every user reaches (the first, always), and for every chunk of
            // prior weights that several poolings share (a grid's); prior weights of one
            // pooling alone (a weight's choice) get each chunk's base for the rows still
            // ranked there, and nothing more.
            let mut whole: Vec<Vec<Option<Tensor>>> =
                weights.iter().map(|_| chunks.iter().map(|_| None).collect()).collect();
            for ((_, groups), sequence) in poolings.iter().zip(tower.sequences(items, &windows, &recencies)) {
                let shoppers = normalise(&last_positions(&sequence, &windows));
                let cosines = (&shoppers * &target_items).sum_dim_intlist(1, false, Kind::Float);
                // Per group of prior weights: each candidate's popularity weight and, per
                // user, its threshold (the target's score raised by the tie tolerance, see
                // `TIE_TOLERANCE`) and how many items beat it so far.
                let mut scans: Vec<GroupScan> = Vec::with_capacity(groups.len());
                for (w, members) in groups {
                    let target_scores =
                        Vec::<f32>::try_from((&cosines + &target_bases[*w]).to(tch::Device::Cpu))
                            .map_err(|e| bad(&e.to_string()))?;
                    let betas: Vec<f32> = members.iter().map(|&j| candidates[j].setting.weight).collect();
                    let thresholds = (0..chunk.len())
                        .map(|row| {
                            let t = targets[row] as usize;
                            betas
                                .iter()
                                .map(|&beta| {
                                    let score = target_scores[row] + prior[t] * beta;
                                    score + TIE_TOLERANCE * (score.abs() + 1.0)
                                })
                                .collect()
                        })
                        .collect();
                    let above = vec![vec![0i64; betas.len()]; chunk.len()];
                    scans.push(GroupScan { weights: *w, betas, thresholds, above });
                }
                let mut ranked: Vec<usize> = (0..chunk.len()).collect();
                for (c, &(start, end)) in chunks.iter().enumerate() {
                    if ranked.is_empty() {
                        break;
                    }
                    let width = end - start;
                    let everyone = ranked.len() == chunk.len();
                    let rows = (!everyone).then(|| {
                        Tensor::from_slice(&ranked.iter().map(|&r| r as i64).collect::<Vec<_>>()).to(device)
                    });
                    let who = match &rows {
                        None => shoppers.shallow_clone(),
                        Some(rows) => shoppers.index_select(0, rows),
                    };
                    let products = who.matmul(&adapted.narrow(1, start, width));
                    let window = &prior[start as usize..end as usize];
                    for group in &mut scans {
                        let w = group.weights;
                        let added = match &rows {
                            Some(rows) if uses[w] == 1 => base(w, start, width, Some(rows)),
                            _ => {
                                let all = whole[w][c].get_or_insert_with(|| base(w, start, width, None));
                                match &rows {
                                    None => all.shallow_clone(),
                                    Some(rows) => all.index_select(0, rows),
                                }
                            }
                        };
                        let scores = (&products + added).to(tch::Device::Cpu);
                        let scores =
                            Vec::<f32>::try_from(scores.view([-1])).map_err(|e| bad(&e.to_string()))?;
                        for (k, &row) in ranked.iter().enumerate() {
                            let row_scores = &scores[k * width as usize..(k + 1) * width as usize];
                            // The target never counts against itself.
                            let own =
                                usize::try_from(targets[row] - start).ok().filter(|&o| o < width as usize);
                            count_above(
                                row_scores,
                                window,
                                own,
                                &group.betas,
                                &group.thresholds[row],
                                &mut group.above[row],
                            );
                        }
                    }
                    ranked.retain(|&row| scans.iter().any(|g| g.above[row].iter().any(|&a| a < 10)));
                }
                for (row, (user, _)) in chunk.iter().enumerate() {
                    for ((_, members), group) in groups.iter().zip(&scans) {
                        for (&j, &a) in members.iter().zip(&group.above[row]) {
                            out[*user][j] = ndcg_at_10(a + 1) as f32;
                        }
                    }
                }
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// A pooling's candidates that share prior weights: the weights' index and the candidates'.
type WeightGroup = (usize, Vec<usize>);

/// One group of a pooling's candidates (those sharing prior weights) during a scan.
struct GroupScan {
    /// Index of the group's prior weights.
    weights: usize,
    /// Each candidate's popularity weight β.
    betas: Vec<f32>,
    /// `[user][candidate]`: the score an item must beat to count above the target.
    thresholds: Vec<Vec<f32>>,
    /// `[user][candidate]`: the items that beat the target so far.
    above: Vec<Vec<i64>>,
}

/// The scan's chunks over a catalogue: `[start, end)` ranges of 1,024 items, then four
/// times as many each time, to the end.
fn scan_chunks(catalogue: i64) -> Vec<(i64, i64)> {
    let (mut chunks, mut start, mut width) = (Vec::new(), 0i64, 1024i64);
    while start < catalogue {
        let end = (start + width).min(catalogue);
        chunks.push((start, end));
        start = end;
        width *= 4;
    }
    chunks
}

/// How far above the target's score (relative to its magnitude plus one) an item must
/// score to count above it: eight f32 roundings. The full ranking scores every item in one
/// product, so an item with the target's own vector and prior (a duplicate title, both
/// unseen) ties with it exactly and the tie goes to the target; here the target's score
/// comes from a product of its own, which may round differently, so ties are taken within
/// this tolerance instead.
const TIE_TOLERANCE: f32 = 8.0 * f32::EPSILON;

/// Adds to `above[s]` the items of one chunk whose score beats the target under the
/// setting of weight `betas[s]`: `scores + β·prior > threshold`, the threshold the
/// target's own score raised by [`TIE_TOLERANCE`] (ties in the target's favour; a masked
/// item's −∞ never beats it), except the target's own column `own`.
/// Each sum is the tensor expression `scores + prior * β` in f32, multiplied then added,
/// as the evaluation computes it.
fn count_above(
    scores: &[f32],
    prior: &[f32],
    own: Option<usize>,
    betas: &[f32],
    thresholds: &[f32],
    above: &mut [i64],
) {
    for ((count, &b), &t) in above.iter_mut().zip(betas).zip(thresholds) {
        let mut n = scores.iter().zip(prior).filter(|&(&x, &p)| x + p * b > t).count() as i64;
        if let Some(o) = own {
            n -= i64::from(scores[o] + prior[o] * b > t);
        }
        *count += n;
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::super::test_support::*;
    use super::*;
    use crate::model::tower::{TitleNeighbours, TowerConfig};

    /// The oracle: each setting applied to a tower of `offset` on its own and scored by
    /// `evaluate_tower`, which the reports use. Returns whether the settings differ somewhere.
    fn assert_as_the_evaluation(
        shape: TowerShape,
        offset: &[f32],
        neighbours: Option<&TitleNeighbours>,
        items: &Tensor,
        refs: &[&User],
        selected: &[Vec<f32>],
    ) -> bool {
        let grid = guild_proto::tower::selection_grid(&shape);
        let mut differ = false;
        for (j, setting) in grid.iter().enumerate() {
            let mut alone = Tower::new(TowerConfig { shape, seed: 5 }, Device::Cpu).expect("tower");
            if let Some(neighbours) = neighbours {
                alone.set_neighbours(neighbours).expect("neighbours fit");
            }
            alone
                .set_offset(&guild_proto::tower::with_setting(&shape, offset, setting).expect("fits"))
                .expect("set");
            let (_, ranks) = evaluate_tower(&shape, Some(&alone), refs, items, Split::Validation, None);
            let with_item: Vec<&Vec<f32>> = refs
                .iter()
                .zip(selected)
                .filter(|(u, _)| u.validation_example().is_some())
                .map(|(_, v)| v)
                .collect();
            assert_eq!(ranks.len(), with_item.len());
            for (rank, values) in ranks.iter().zip(&with_item) {
                assert!((f64::from(values[j]) - ndcg_at_10(i64::from(*rank))).abs() < 1e-6, "setting {j}");
                differ |= values[j] != values[0];
            }
        }
        differ
    }

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
        assert!(
            assert_as_the_evaluation(shape, &offset, None, &items, &refs, &selected),
            "the grid's settings rank differently somewhere"
        );
    }

    /// A catalogue of several scan chunks with an item-to-item prior: users whose target
    /// ranks high under some settings and nowhere under others, so that some leave the scan
    /// early, some in the middle and some never, and targets with a twin of the same vector
    /// and prior (a tie the full ranking gives the target; fails without `TIE_TOLERANCE`):
    /// every NDCG@10 is still the full ranking's.
    #[test]
    fn a_selection_that_stops_ranking_early_scores_as_the_full_catalogue_would() {
        tch::manual_seed(3);
        let catalogue = 3_000usize;
        assert!(scan_chunks(catalogue as i64).len() >= 2, "several chunks");
        // Title vectors as wide as MiniLM's, where a product's rounding depends on its shape.
        let items = normalise(&Tensor::randn([catalogue as i64, 384], (Kind::Float, Device::Cpu)));
        // A few very popular items spread over the catalogue's index range: a target among
        // them ranks near the top under the heavier prior weights and anywhere under the
        // lightest; the others rank wherever their cosine puts them. Items 2,000..2,012
        // repeat them (duplicate titles) with the same popularity: a target among them ties
        // with its twin, and the tie is the target's.
        let popular: Vec<u32> = (0..12).map(|k| k * 241 + 17).collect();
        let twins = Tensor::arange_start(2_000, 2_012, (Kind::Int64, Device::Cpu));
        let sources = Tensor::from_slice(&popular.iter().map(|&i| i64::from(i)).collect::<Vec<_>>());
        let items = items.index_copy(0, &twins, &items.index_select(0, &sources));
        let twin_of = |i: u32| if (2_000..2_012).contains(&i) { popular[(i - 2_000) as usize] } else { i };
        let neighbours = TitleNeighbours::of_items(&items, 4).expect("neighbours");
        let mut shape = tower_shape(4, 4, catalogue);
        (shape.hidden, shape.neighbours) = (384, 4);
        let mut tower = Tower::new(TowerConfig { shape, seed: 5 }, Device::Cpu).expect("tower");
        tower.set_neighbours(&neighbours).expect("neighbours fit");
        let histogram: Vec<f32> = (0..catalogue as u32)
            .map(twin_of)
            .map(|i| if popular.contains(&i) { 5_000.0 + i as f32 } else { (i % 13) as f32 })
            .collect();
        tower.set_popularity(&histogram).expect("histogram");
        // Item-to-item counts from each item to its first neighbour.
        let counts: Vec<f32> = (0..catalogue * 4).map(|k| if k % 4 == 0 { 40.0 } else { 0.0 }).collect();
        tower.set_transitions(&counts).expect("counts");
        let offset = tower.offset();
        let mut users = shoppers(90, catalogue as u32);
        for (u, user) in users.iter_mut().enumerate() {
            user.history.truncate(2 + u % 5);
            let last = *user.history.last().expect("non-empty");
            // The validation target (the history's last item): popular, a neighbour of the
            // item before it, one of a duplicated pair, or any item.
            let target = match u % 4 {
                0 => popular[u % popular.len()],
                1 => neighbours.of(last)[0] as u32,
                2 if u % 8 < 4 => popular[u % popular.len()],
                2 => 2_000 + (u % popular.len()) as u32,
                _ => ((u * 997) % catalogue) as u32,
            };
            user.history.push(target);
        }
        let refs: Vec<&User> = users.iter().collect();
        let grid = guild_proto::tower::selection_grid(&shape);
        let selected = selection_ndcg(&tower, &items, &refs, &grid).expect("selection");
        let scored = selected.iter().flatten().filter(|&&v| v > 0.0).count();
        let unscored = selected.iter().flatten().filter(|&&v| v == 0.0).count();
        assert!(scored > 20 && unscored > 20, "targets in and out of the top ten: {scored} and {unscored}");
        assert!(
            assert_as_the_evaluation(shape, &offset, Some(&neighbours), &items, &refs, &selected),
            "the grid's settings rank differently somewhere"
        );
    }

    /// Candidates that set the item-to-item prior's two weights (β_t over the counts of a
    /// pair sketch, γ over its spectral features) beside the pooling, all scored in one scan
    /// over a catalogue of two chunks: each candidate's NDCG@10 is the full ranking's of a
    /// tower with that pooling and those weights set in its values (the weights change
    /// who ranks where, or the test could not fail).
    #[test]
    fn candidates_with_other_prior_weights_score_as_a_tower_holding_those_weights() {
        use crate::model::tower::{PairSlots, statistics_sum};
        use guild_proto::tower::{with_setting, with_spectral_weight, with_transitions_weight};
        tch::manual_seed(4);
        let catalogue = 2_500usize;
        assert_eq!(scan_chunks(catalogue as i64).len(), 2, "two chunks");
        let items = normalise(&Tensor::randn([catalogue as i64, 16], (Kind::Float, Device::Cpu)));
        let mut shape = tower_shape(4, 4, catalogue);
        (shape.neighbours, shape.pair_sketch, shape.spectral) = (4, 1 << 14, 4);
        // Shoppers in five groups of 40 items spread over the catalogue, each walking its
        // group one item at a time from a start of its own, so that the counts know each
        // item's successor.
        let users: Vec<User> = (0..600u32)
            .map(|u| {
                let (group, start) = (u % 5, (u * 37) % 40);
                let len = 3 + u % 5;
                let history = (0..len).map(|k| group * 500 + (start + k) % 40).collect();
                User { id: format!("u{u}"), history, test_target: 0 }
            })
            .collect();
        let refs: Vec<&User> = users.iter().collect();
        let mut tower = Tower::new(TowerConfig { shape, seed: 5 }, Device::Cpu).expect("tower");
        let slots = PairSlots::Sketch { buckets: shape.pair_sketch };
        tower.set_statistics(&statistics_sum(&refs, catalogue, Some(&slots))).expect("statistics");
        let offset = tower.offset();
        let grid = guild_proto::tower::selection_grid(&shape);
        let weights = [(0.025f32, 0.0f32), (0.1, 0.0), (0.3, 0.0), (0.1, 0.2), (0.1, 0.4), (0.025, 0.4)];
        let candidates: Vec<Candidate> = grid[..2]
            .iter()
            .flat_map(|setting| {
                weights.iter().map(|&(t, g)| Candidate {
                    setting: setting.clone(),
                    transitions_weight: Some(t),
                    spectral_weight: Some(g),
                })
            })
            .collect();
        let scored = candidates_ndcg(&tower, &items, &refs, &candidates).expect("candidates");
        assert_eq!(scored.len(), refs.len());
        for (j, candidate) in candidates.iter().enumerate() {
            let values = with_setting(&shape, &offset, &candidate.setting).expect("fits");
            let (t, g) =
                (candidate.transitions_weight.expect("set"), candidate.spectral_weight.expect("set"));
            let values = with_transitions_weight(&shape, &values, f64::from(t)).expect("a weight");
            let values = with_spectral_weight(&shape, &values, f64::from(g)).expect("a weight");
            let mut alone = Tower::new(TowerConfig { shape, seed: 5 }, Device::Cpu).expect("tower");
            alone.set_offset(&values).expect("set");
            let (_, ranks) = evaluate_tower(&shape, Some(&alone), &refs, &items, Split::Validation, None);
            assert_eq!(ranks.len(), refs.len(), "every shopper has a validation item");
            for (user, rank) in ranks.iter().enumerate() {
                let expected = ndcg_at_10(i64::from(*rank));
                assert!((f64::from(scored[user][j]) - expected).abs() < 1e-6, "candidate {j}, user {user}");
            }
        }
        // Every pair of weights ranks differently from the first somewhere, under both
        // poolings, and the two poolings differ somewhere too.
        let w = weights.len();
        let differs = |a: usize, b: usize| scored.iter().any(|row| row[a] != row[b]);
        for (k, pair) in weights.iter().enumerate().skip(1) {
            assert!(differs(k, 0) && differs(w + k, w), "weights {pair:?}");
        }
        assert!((0..w).any(|k| differs(k, w + k)), "the poolings");
        // The tower's own weights (`None`) are what `selection_ndcg` scores, and they are
        // the tower's values spelled out.
        let own = selection_ndcg(&tower, &items, &refs, &grid[..2]).expect("selection");
        let (t, g) = tower.history_prior_weights();
        let spelled: Vec<Candidate> = grid[..2]
            .iter()
            .map(|s| Candidate { setting: s.clone(), transitions_weight: Some(t), spectral_weight: Some(g) })
            .collect();
        assert_eq!(own, candidates_ndcg(&tower, &items, &refs, &spelled).expect("candidates"));
        // The mean at the tower's own pooling and weights is the evaluation's to the bit.
        let (counts, _) = evaluate_tower(&shape, Some(&tower), &refs, &items, Split::Validation, None);
        assert!(counts.ndcg_at_10() > 0.0, "some targets in the top ten");
        let mean = validation_ndcg(&tower, &items, &refs).expect("scan").expect("a popularity prior");
        assert_eq!(mean.to_bits(), counts.ndcg_at_10().to_bits(), "{mean} against {}", counts.ndcg_at_10());
    }
}
