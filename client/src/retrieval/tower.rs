//! The sequence-tower family: full-catalogue evaluation, training with the full or a
//! sampled softmax, and the shopper unit's per-shopper updates.

use std::ops::ControlFlow;

use rand::Rng;

use super::*;

/// A history's additive prior over the catalogue, `[batch, catalogue]` on the CPU.
pub type HistoryPrior<'a> = &'a dyn Fn(&[&[ItemIndex]]) -> Tensor;

/// Full-catalogue evaluation of the sequence tower (as [`evaluate_ranks`]), with `extra`
/// (e.g. item-to-item counts) added to every row's scores; `tower` `None`: the zero-shot
/// ranker of `shape`, the mean of the last five item vectors.
pub fn evaluate_tower(
    shape: &TowerShape,
    tower: Option<&Tower>,
    users: &[&User],
    items: &Tensor,
    split: Split,
    extra: Option<HistoryPrior<'_>>,
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
                (Some(t), Some(adapted)) => t.scores_against(items, adapted, prior.as_ref(), &histories),
                _ => zero_shot_scores(items, &histories, shape),
            };
            let scores = match extra {
                Some(extra) => scores.to_kind(Kind::Float).to(tch::Device::Cpu) + extra(&histories),
                None => scores,
            };
            rank_rows(&scores, chunk, &mut counts, &mut ranks);
        }
    });
    (counts, ranks)
}

/// The tower's softmax cross-entropy of every target of `rows` (each weighs the same): over
/// the whole catalogue, or (with `config.negatives`) over the target and uniform negatives
/// shared by the batch, drawn from `negatives_from` if given (a shopper's own generator),
/// else from libtorch's.
fn tower_loss(
    tower: &Tower,
    items: &Tensor,
    rows: &[TowerRow<'_>],
    config: &TrainConfig,
    negatives_from: Option<&mut ChaCha20Rng>,
) -> Tensor {
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
    let positives = normalise(&tower.adapt_rows(&items.index_select(0, &targets), &targets));
    let negatives = match negatives_from {
        Some(rng) => {
            let drawn: Vec<i64> = (0..k).map(|_| rng.gen_range(0..catalogue)).collect();
            Tensor::from_slice(&drawn).to(device)
        }
        None => Tensor::randint(catalogue, [k], (Kind::Int64, device)),
    };
    let negative_vectors = normalise(&tower.adapt_rows(&items.index_select(0, &negatives), &negatives));
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
    train_tower_with(tower, items, users, config, &mut |_, _| ControlFlow::Continue(()))
}

/// [`train_tower`], calling `after(steps, tower)` after each step (`steps` taken so far):
/// training stops where it breaks (e.g. early stopping on a validation score), and the
/// report counts the steps taken.
pub fn train_tower_with(
    tower: &Tower,
    items: &Tensor,
    users: &[&User],
    config: &TrainConfig,
    after: &mut dyn FnMut(usize, &Tower) -> ControlFlow<()>,
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
    let mut steps = 0;
    while steps < config.steps {
        let loss = tower_loss(tower, &items, batches.next_batch(), config, None);
        optimizer.backward_step(&loss);
        last = loss.double_value(&[]);
        if steps == 0 {
            first = last;
        }
        steps += 1;
        if after(steps, tower).is_break() {
            break;
        }
    }
    Ok(TrainReport { steps, examples: example_count, first_loss: first, last_loss: last })
}

/// The shopper unit's local computation: for each of `users` on its own, `config.steps`
/// steps of plain SGD at `config.learning_rate` on that shopper's training rows alone
/// (every row of its history at once), starting from the tower's values at `global`
/// (an offset); `each` receives that shopper's update Δ = values − global, unclipped, one
/// shopper at a time (the caller clips and encodes each on its own). One step is DP-SGD's
/// per-example gradient, scaled by −η; several are user-level DP-FedAvg's local training
/// (McMahan et al. 2018) with the shopper as the client. A shopper with no training rows
/// gives a zero update. Leaves the tower at `global`.
///
/// Each shopper's sampled negatives come from its own generator, seeded by `seed_of` (the
/// merchant's secret key and the shopper: [`shopper_seed`]), so that a shopper's update
/// depends on its own data and seed alone: adding or removing a shopper changes no other
/// shopper's update, which the shopper unit's sensitivity bound assumes.
pub fn shopper_updates(
    tower: &mut Tower,
    items: &Tensor,
    users: &[&User],
    global: &[f32],
    config: &TrainConfig,
    seed_of: &dyn Fn(&User) -> u64,
    each: &mut dyn FnMut(&mut [f32]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let length = tower.config().shape.history;
    let items = items.to(tower.var_store().device());
    tch::manual_seed(config.seed as i64);
    tower.set_offset(global)?;
    if config.steps == 1 {
        // One step is −η times the gradient at `global`: no copy of the values, no optimiser.
        let loss = |tower: &Tower, user: &User, rows: &[TowerRow<'_>]| {
            let mut rng = ChaCha20Rng::seed_from_u64(seed_of(user));
            tower_loss(tower, &items, rows, config, Some(&mut rng))
        };
        return each_shoppers_step(tower, users, global.len(), config.learning_rate as f32, &loss, each);
    }
    for user in users {
        tower.set_offset(global)?;
        let rows = tower_rows(user, length);
        if !rows.is_empty() && config.steps > 0 {
            let mut sgd = nn::Sgd::default().build(tower.var_store(), config.learning_rate)?;
            let mut rng = ChaCha20Rng::seed_from_u64(seed_of(user));
            for _ in 0..config.steps {
                let loss = tower_loss(tower, &items, &rows, config, Some(&mut rng));
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

/// The shopper unit's gradient of the pooling part alone (the tower's recency weights and
/// popularity prior weight, `guild_proto::round::TrainedPart::Pooling`): for each of `users`
/// on its own, −η times the gradient at `global` of the full-softmax cross-entropy of its
/// training rows, scored as the tower ranks (cosine against the whole catalogue plus the
/// popularity prior plus the item-to-item prior of each target's history), handed to
/// `each` as a whole-adapter vector (zero outside the part's gradient; the caller keeps
/// the part). The catalogue's adapted vectors do not move in such a round, so they are
/// computed once, without gradient; no negatives are sampled, so no shopper's update
/// depends on anything but its own rows. A shopper with no training rows gives a zero
/// update. Leaves the tower at `global`.
pub fn shopper_part_gradients(
    tower: &mut Tower,
    items: &Tensor,
    users: &[&User],
    global: &[f32],
    config: &TrainConfig,
    each: &mut dyn FnMut(&mut [f32]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let items = items.to(tower.var_store().device());
    tower.set_offset(global)?;
    let catalogue = tch::no_grad(|| normalise(&tower.adapt_items(&items)));
    let loss = |tower: &Tower, _: &User, rows: &[TowerRow<'_>]| {
        ranking_loss(tower, &items, &catalogue, rows, config.temperature)
    };
    each_shoppers_step(tower, users, global.len(), config.learning_rate as f32, &loss, each)
}

/// For each of `users` on its own: −η times the gradient of `loss` on its training rows at
/// the tower's current values (zeros for a shopper without rows), handed to `each`.
fn each_shoppers_step(
    tower: &mut Tower,
    users: &[&User],
    dimension: usize,
    eta: f32,
    loss: &dyn Fn(&Tower, &User, &[TowerRow<'_>]) -> Tensor,
    each: &mut dyn FnMut(&mut [f32]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let length = tower.config().shape.history;
    for user in users {
        let rows = tower_rows(user, length);
        let mut update = if rows.is_empty() {
            vec![0.0; dimension]
        } else {
            tower.zero_gradients();
            loss(tower, user, &rows).backward();
            tower.flat_gradient()
        };
        update.iter_mut().for_each(|g| *g *= -eta);
        each(&mut update)?;
    }
    Ok(())
}

/// The full-softmax cross-entropy of every target of `rows`, each scored as the tower ranks
/// at inference: cosine against `catalogue` (the adapted, normalised item vectors, taken as
/// fixed), plus the popularity prior, plus the item-to-item prior of the target's history.
fn ranking_loss(
    tower: &Tower,
    items: &Tensor,
    catalogue: &Tensor,
    rows: &[TowerRow<'_>],
    temperature: f64,
) -> Tensor {
    let device = items.device();
    let windows: Vec<&[ItemIndex]> = rows.iter().map(|r| r.window).collect();
    let sequence = tower.sequence(items, &windows);
    let (b, m, hidden) = sequence.size3().expect("[batch, length, hidden]");
    let (mut at, mut target, mut histories) = (Vec::new(), Vec::new(), Vec::new());
    for (i, row) in rows.iter().enumerate() {
        for p in row.first_target..row.window.len() {
            at.push(i as i64 * m + p as i64);
            target.push(i64::from(row.next[p]));
            histories.push(&row.window[..=p]);
        }
    }
    let shoppers =
        normalise(&sequence.reshape([b * m, hidden]).index_select(0, &Tensor::from_slice(&at).to(device)));
    let scores = shoppers.matmul(&catalogue.tr());
    let scores = match tower.prior() {
        Some(prior) => scores + prior.unsqueeze(0),
        None => scores,
    };
    let scores = tower.with_history_prior(scores, &histories);
    (scores / temperature).cross_entropy_for_logits(&Tensor::from_slice(&target).to(device))
}

/// A shopper's seed for one round's sampled negatives: SHA-256 of the merchant's secret
/// `key`, the round and the shopper's id. The coordinator, which chooses the round's data
/// seed, cannot choose it, and no other shopper's presence changes it.
pub fn shopper_seed(key: &[u8; 32], round_id: u64, shopper: &str) -> u64 {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(b"guild/v1/shopper-negatives\0");
    hasher.update(key);
    hasher.update(round_id.to_le_bytes());
    hasher.update(shopper.as_bytes());
    let digest = hasher.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::super::test_support::*;
    use super::*;
    use crate::model::tower::TowerConfig;

    #[test]
    fn the_tower_learns_with_the_full_and_the_sampled_softmax() {
        tch::manual_seed(1);
        let items = normalise(&Tensor::randn([200, 16], (Kind::Float, Device::Cpu)));
        let users = shoppers(300, 200);
        let refs: Vec<&User> = users.iter().collect();
        let shape = tower_shape(8, 2, 0);
        let (start, _) = evaluate_tower(&shape, None, &refs, &items, Split::Validation, None);
        // The last run with learned item-ID embeddings, which need the catalogue's size.
        for (negatives, item_ids) in [(0, 0), (32, 0), (32, 4)] {
            let shape = match item_ids {
                0 => shape,
                _ => TowerShape { catalogue: 200, item_ids, ..shape },
            };
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
            let (trained, ranks) =
                evaluate_tower(&shape, Some(&tower), &refs, &items, Split::Validation, None);
            assert_eq!(ranks.len(), 300);
            assert!(
                trained.cross_entropy() < start.cross_entropy() - 0.5 && trained.mrr() > start.mrr(),
                "{negatives} negatives: {trained:?} against the start {start:?}"
            );
            if let Some(range) = guild_proto::tower::tensor_range(&shape, guild_proto::tower::ITEM_IDS) {
                let moved = tower.offset()[range].iter().filter(|v| v.abs() > 1e-4).count();
                assert!(moved > 100, "{moved} of 800 item-ID values trained");
            }
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
            shopper_updates(tower, &items, users, &global, &config, &|u| u.history.len() as u64, &mut |u| {
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
            sgd.backward_step(&tower_loss(&other, &items, &tower_rows(user, 8), &config, None));
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

    /// With sampled negatives (the shopper unit's rounds use 256), adding a shopper changes
    /// no other shopper's update: each draws its negatives from its own seed. Drawn from one
    /// generator in sampled order instead, every later shopper's negatives (and update)
    /// would shift, breaking the sensitivity bound the ledger charges.
    #[test]
    fn adding_a_shopper_changes_no_other_shoppers_update() {
        let items = normalise(&Tensor::randn([50, 16], (Kind::Float, Device::Cpu)));
        let users = shoppers(5, 50);
        let shape = tower_shape(4, 2, 0);
        let mut tower = Tower::new(TowerConfig { shape, seed: 4 }, Device::Cpu).expect("tower");
        let global = vec![0.0f32; tower.parameter_count()];
        let key = [7u8; 32];
        let seed_of = |u: &User| shopper_seed(&key, 3, &u.id);
        let mut collect = |users: &[&User], steps: usize| {
            let config = TrainConfig { steps, learning_rate: 0.5, negatives: 8, ..TrainConfig::default() };
            let mut updates = Vec::new();
            shopper_updates(&mut tower, &items, users, &global, &config, &seed_of, &mut |u| {
                updates.push(u.to_vec());
                Ok(())
            })
            .expect("updates");
            updates
        };
        for steps in [1, 2] {
            let without: Vec<&User> = [0, 2, 3, 4].iter().map(|&i| &users[i]).collect();
            let with: Vec<&User> = users.iter().collect();
            let (a, b) = (collect(&without, steps), collect(&with, steps));
            for (i, &j) in [0usize, 2, 3, 4].iter().enumerate() {
                assert!(a[i] == b[j], "{steps} step(s): shopper {j}'s update moved when shopper 1 joined");
            }
        }
        // The seed is the merchant's secret's, the round's and the shopper's alone.
        assert_ne!(shopper_seed(&key, 3, "a"), shopper_seed(&key, 4, "a"));
        assert_ne!(shopper_seed(&key, 3, "a"), shopper_seed(&[8; 32], 3, "a"));
    }

    /// The pooling part's gradient (recency weights, popularity prior weight) is the
    /// derivative of the loss as the tower ranks, priors included: held to central finite
    /// differences; each shopper's depends on its rows alone.
    #[test]
    fn the_part_gradient_is_the_ranking_losss_derivative_and_each_shoppers_own() {
        use crate::model::tower::TitleNeighbours;
        let items = normalise(&Tensor::randn([50, 16], (Kind::Float, Device::Cpu)));
        let users = shoppers(5, 50);
        let mut shape = tower_shape(4, 2, 50);
        shape.neighbours = 4;
        let mut tower = Tower::new(TowerConfig { shape, seed: 4 }, Device::Cpu).expect("tower");
        tower.set_neighbours(&TitleNeighbours::of_items(&items, 4).expect("neighbours")).expect("set");
        let popularity: Vec<f32> = (0..50).map(|i| (i % 7) as f32).collect();
        tower.set_popularity(&popularity).expect("popularity");
        let counts: Vec<f32> = (0..200).map(|i| (i % 5) as f32).collect();
        tower.set_transitions(&counts).expect("counts");
        let global = tower.offset();
        let manifest = guild_proto::domain::AdapterManifest::sequence_tower([0; 32], shape, 4);
        let (recency, weight) = manifest.selection_ranges().expect("a tower with a prior");
        let config = TrainConfig { learning_rate: 1.0, ..TrainConfig::default() };
        let collect = |tower: &mut Tower, users: &[&User]| {
            let mut updates = Vec::new();
            shopper_part_gradients(tower, &items, users, &global, &config, &mut |u| {
                updates.push(u.to_vec());
                Ok(())
            })
            .expect("gradients");
            updates
        };
        let all: Vec<&User> = users.iter().collect();
        let updates = collect(&mut tower, &all);
        assert_eq!(tower.offset(), global, "the tower is left at the global values");
        let catalogue = tch::no_grad(|| normalise(&tower.adapt_items(&items)));
        let loss_at = |tower: &mut Tower, at: &[f32], user: &User| {
            tower.set_offset(at).expect("offset");
            let loss = ranking_loss(tower, &items, &catalogue, &tower_rows(user, 8), config.temperature);
            loss.double_value(&[])
        };
        let h = 1e-3_f32;
        for (u, user) in all.iter().enumerate() {
            for i in [recency.start, recency.start + 1, weight] {
                let (mut plus, mut minus) = (global.clone(), global.clone());
                plus[i] += h;
                minus[i] -= h;
                let slope = (loss_at(&mut tower, &plus, user) - loss_at(&mut tower, &minus, user))
                    / f64::from(2.0 * h);
                let got = -f64::from(updates[u][i]);
                assert!(
                    (got - slope).abs() <= 2e-2 * slope.abs().max(1e-2),
                    "shopper {u}, coordinate {i}: gradient {got} against finite differences {slope}"
                );
            }
        }
        tower.set_offset(&global).expect("offset");
        let without: Vec<&User> = [0, 2, 3, 4].iter().map(|&i| &users[i]).collect();
        let fewer = collect(&mut tower, &without);
        for (i, &j) in [0usize, 2, 3, 4].iter().enumerate() {
            assert!(fewer[i] == updates[j], "shopper {j}'s gradient moved when shopper 1 left");
        }
    }
}
