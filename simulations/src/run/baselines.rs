//! The reference arms, run in this process on the same evaluation users as every
//! federated arm.

use std::time::Instant;

use guild_client::data::Merchant;
use guild_client::retrieval::{Split, TrainConfig};
use guild_proto::domain::AdapterFamilyName;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;

use crate::early_stopping::Patience;
use crate::progress::Progress;
use crate::results::{ArmResult, Scores};
use crate::scenario::{EarlyStopping, Scenario};
use crate::world::World;

use super::{
    CENTRALISED, CENTRALISED_SELECTED, CENTRALISED_WITH_COUNTS, EXACT_STATISTICS_SELECTED, ITEM_COUNTS,
    LOCAL_ONLY, MOST_POPULAR, POPULARITY, STATISTICS_RANKER, WEAKER_ZERO_SHOT, ZERO_SHOT,
    ZERO_SHOT_WITH_COUNTS, with_pooling_choice,
};

/// How the in-process baselines train.
/// The sequence tower trains with the same sampled softmax as the merchants' clients.
fn baseline_training(
    world: &World,
    steps: usize,
    batch_size: usize,
    learning_rate: f64,
    seed: u64,
) -> TrainConfig {
    let negatives = match world.spec.family {
        AdapterFamilyName::FfaLora => 0,
        AdapterFamilyName::SequenceTower => guild_client::learner::TOWER_NEGATIVES,
    };
    TrainConfig { batch_size, steps, learning_rate, seed, negatives, ..TrainConfig::default() }
}

/// The in-process reference arms: zero-shot (for the sequence tower, both untrained
/// rankers, the stronger on validation named zero-shot), the tower's start with the exact
/// popularity histogram, local-only per merchant, and centralised.
pub(super) fn baselines(world: &World, s: &Scenario, progress: &Progress) -> anyhow::Result<Vec<ArmResult>> {
    let mut arms = Vec::new();
    if s.arms.zero_shot {
        progress.message("zero-shot");
        let t = Instant::now();
        let ((test, ranks), validation) = tokio::task::block_in_place(|| {
            anyhow::Ok((world.score_with_ranks(None, Split::Test)?, world.score(None, Split::Validation)?))
        })?;
        let mut zero_shot = baseline(ZERO_SHOT, test, validation, t.elapsed().as_secs_f64(), vec![ranks]);
        let k = s.arms.titles_zero_shot_users.unwrap_or(world.eval_users.len()).min(world.eval_users.len());
        if world.spec.family == AdapterFamilyName::SequenceTower && k > 0 {
            // Two untrained rankers: the tower's own start (the mean of the last five item
            // vectors) and MiniLM on the last five titles concatenated, the latter on the
            // first `titles_zero_shot_users` evaluation users. The stronger on validation
            // (on those users) is the zero-shot every arm is compared with.
            let t = Instant::now();
            let subsample = world.evaluated_on_first(k);
            progress.message(format!("zero-shot: MiniLM on titles, {k} users"));
            let ((test, ranks), validation, mean_of_five) = tokio::task::block_in_place(|| {
                anyhow::Ok((
                    subsample.score_lora(None, Split::Test)?,
                    subsample.score_lora(None, Split::Validation)?.0,
                    subsample.score(None, Split::Validation)?,
                ))
            })?;
            let mut titles = baseline(ZERO_SHOT, test, validation, t.elapsed().as_secs_f64(), vec![ranks]);
            zero_shot.events.push("ranker: the mean of the last five item vectors".into());
            titles.events.push(format!(
                "ranker: MiniLM on the last five titles concatenated, on the first {k} evaluation users \
                 (validation NDCG@10 {:.4} against {:.4} for the mean of the last five on them)",
                titles.validation.ndcg_at_10, mean_of_five.ndcg_at_10
            ));
            if titles.validation.ndcg_at_10 > mean_of_five.ndcg_at_10 {
                std::mem::swap(&mut titles, &mut zero_shot);
            }
            titles.arm = WEAKER_ZERO_SHOT.into();
            arms.push(zero_shot);
            arms.push(titles);
        } else {
            if world.spec.family == AdapterFamilyName::SequenceTower {
                zero_shot.events.push(
                    "ranker: the mean of the last five item vectors (the titles-concatenated ranker not run: \
                     titles_zero_shot_users = 0)"
                        .into(),
                );
            }
            arms.push(zero_shot);
        }
        let t = Instant::now();
        if let Some(values) = world.popularity_only(&world.all_merchant_users())? {
            progress.message("zero-shot + popularity");
            let ((test, ranks), validation) = tokio::task::block_in_place(|| {
                anyhow::Ok((
                    world.score_with_ranks(Some(&values), Split::Test)?,
                    world.score(Some(&values), Split::Validation)?,
                ))
            })?;
            let mut arm = baseline(POPULARITY, test, validation, t.elapsed().as_secs_f64(), vec![ranks]);
            arm.events.push(
                "the tower's start with the exact histogram of every merchant's shoppers and the prior's \
                 initial weight; nothing trained"
                    .into(),
            );
            arms.push(arm);
        }
    }
    let counts = (s.arms.item_counts && world.spec.family == AdapterFamilyName::SequenceTower).then(|| {
        progress.message("item-to-item counts");
        let t = Instant::now();
        let counts = world.item_counts(&world.all_merchant_users());
        (counts, t.elapsed().as_secs_f64())
    });
    if let Some((counts, seconds)) = &counts {
        let t = Instant::now();
        let ((test, ranks), (validation, _)) = tokio::task::block_in_place(|| {
            (world.score_counts(counts, Split::Test), world.score_counts(counts, Split::Validation))
        });
        let mut arm =
            baseline(ITEM_COUNTS, test, validation, seconds + t.elapsed().as_secs_f64(), vec![ranks]);
        arm.events.push(format!(
            "untrained: a candidate's score is the sum over the history's last three items (weights {:?} \
             from the most recent) of the count of transitions from that item to it plus {} times their \
             co-occurrences within {} positions, over every merchant's shoppers' training items ({} \
             pairs); ties broken by popularity",
            guild_client::retrieval::RECENCY,
            guild_client::retrieval::CO_OCCURRENCE_WEIGHT,
            guild_client::retrieval::WINDOW,
            counts.pairs()
        ));
        arms.push(arm);
        let t = Instant::now();
        let ((test, ranks), (validation, _)) = tokio::task::block_in_place(|| {
            (
                world.score_most_popular(counts, Split::Test),
                world.score_most_popular(counts, Split::Validation),
            )
        });
        let mut arm = baseline(MOST_POPULAR, test, validation, t.elapsed().as_secs_f64(), vec![ranks]);
        arm.events.push(
            "untrained: every history ranks the catalogue by each item's training interactions over every \
             merchant's shoppers (the counts' popularity), its own items masked"
                .into(),
        );
        arms.push(arm);
        progress.message("zero-shot + item-to-item counts");
        arms.push(with_counts(world, ZERO_SHOT_WITH_COUNTS, None, counts, "the zero-shot ranker")?);
    }
    if let Some(local) = &s.arms.local_only {
        let t = Instant::now();
        let mut sample: Vec<&Merchant> = world.merchants.iter().collect();
        sample.shuffle(&mut ChaCha20Rng::seed_from_u64(s.data.seed + 1));
        sample.truncate(local.merchants);
        let (mut scores, mut choices) = (Vec::new(), Vec::new());
        for (i, m) in sample.iter().enumerate() {
            progress.message(format!("local-only: {} ({}/{})", m.name, i + 1, sample.len()));
            let training =
                baseline_training(world, local.steps, local.batch_size, local.learning_rate, s.data.seed);
            let (values, _) = tokio::task::block_in_place(|| world.train_on(&m.users, &training))?;
            let (values, choice) = with_pooling_choice(world, s, values, Some(&m.users), "its own shoppers")?;
            choices.extend(choice.map(|c| format!("{}: {c}", m.name)));
            let trained = score_trained(world, values)?;
            scores.push((trained.test, trained.validation));
        }
        let ranks: Vec<Vec<u32>> = scores.iter_mut().map(|((_, r), _)| std::mem::take(r)).collect();
        let scores: Vec<(Scores, Scores)> = scores.into_iter().map(|((t, _), v)| (t, v)).collect();
        let mean = |f: &dyn Fn(&(Scores, Scores)) -> Scores| {
            let k = scores.len().max(1) as f64;
            let all: Vec<Scores> = scores.iter().map(f).collect();
            Scores {
                users: all.first().map_or(0, |s| s.users),
                recall_at_10: all.iter().map(|s| s.recall_at_10).sum::<f64>() / k,
                ndcg_at_10: all.iter().map(|s| s.ndcg_at_10).sum::<f64>() / k,
                mrr: all.iter().map(|s| s.mrr).sum::<f64>() / k,
                cross_entropy: all.iter().map(|s| s.cross_entropy).sum::<f64>() / k,
            }
        };
        let mut arm = baseline(LOCAL_ONLY, mean(&|p| p.0), mean(&|p| p.1), t.elapsed().as_secs_f64(), ranks);
        arm.worst = scores.iter().map(|p| p.0).min_by(|a, b| a.mrr.total_cmp(&b.mrr));
        arm.events.push(format!("{} merchants, {} steps each", scores.len(), local.steps));
        arm.events.extend(choices);
        arms.push(arm);
    }
    if let Some(central) = &s.arms.centralised {
        progress.message("centralised");
        let t = Instant::now();
        let users = world.all_merchant_users();
        let training =
            baseline_training(world, central.steps, central.batch_size, central.learning_rate, s.data.seed);
        let (values, taken) = match &central.early_stopping {
            None => {
                let (values, _) = tokio::task::block_in_place(|| world.train_on(&users, &training))?;
                (values, format!("{} steps", central.steps))
            }
            Some(stop) => {
                anyhow::ensure!(
                    world.spec.family == AdapterFamilyName::SequenceTower,
                    "early stopping is for the sequence tower"
                );
                let (values, report, checks) =
                    tokio::task::block_in_place(|| world.train_tower(&users, &training, Some(stop)))?;
                (values, early_stopping_note(central.steps, stop, report.steps, &checks))
            }
        };
        let (values, choice) = with_pooling_choice(world, s, values, None, "the first evaluation users")?;
        let Trained { values, test: (test, ranks), validation } = score_trained(world, values)?;
        let mut arm = baseline(CENTRALISED, test, validation, t.elapsed().as_secs_f64(), vec![ranks]);
        arm.events.push(format!("{taken} of batch {} on {} users", central.batch_size, users.len()));
        arm.events.extend(choice);
        if world.spec.family == AdapterFamilyName::SequenceTower {
            arm.final_adapter = Some(values.clone());
        }
        arms.push(arm);
        if s.arms.exact_selection && world.spec.family == AdapterFamilyName::SequenceTower {
            progress.message("centralised + selection");
            arms.push(selected(world, CENTRALISED_SELECTED, &values, "the centralised tower")?);
        }
        if let Some((counts, _)) = counts.as_ref().filter(|_| s.arms.centralised_with_counts) {
            progress.message("centralised + item-to-item counts");
            arms.push(with_counts(
                world,
                CENTRALISED_WITH_COUNTS,
                Some(&values),
                counts,
                "the centralised tower",
            )?);
        }
    }
    if s.arms.statistics_ranker && world.spec.family == AdapterFamilyName::SequenceTower {
        progress.message("released statistics, untrained");
        let t = Instant::now();
        let exact = tokio::task::block_in_place(|| world.exact_statistics(&world.all_merchant_users()))?;
        if let Some(values) = exact {
            let (values, choice) = with_pooling_choice(world, s, values, None, "the first evaluation users")?;
            let Trained { values, test: (test, ranks), validation } = score_trained(world, values)?;
            let mut arm =
                baseline(STATISTICS_RANKER, test, validation, t.elapsed().as_secs_f64(), vec![ranks]);
            arm.events.push(
                "the tower's start with every merchant's shoppers' statistics summed exactly (one unit \
                 vector per shopper: the popularity histogram and the item-to-item pairs), nothing trained; \
                 its pooling and its priors' weights chosen on validation as the trained arms' are"
                    .into(),
            );
            arm.events.extend(choice);
            arm.final_adapter = Some(values);
            arms.push(arm);
        }
    }
    if s.arms.exact_selection && world.spec.family == AdapterFamilyName::SequenceTower {
        progress.message("statistics + selection, no noise");
        let t = Instant::now();
        let exact = tokio::task::block_in_place(|| world.exact_statistics(&world.all_merchant_users()))?;
        if let Some(values) = exact {
            let mut arm = selected(world, EXACT_STATISTICS_SELECTED, &values, "the tower's start")?;
            arm.wall_seconds = t.elapsed().as_secs_f64();
            arm.events.insert(
                0,
                "the shopper-level arms' popularity release without noise: every merchant's shoppers' \
                 statistics (popularity and item-to-item counts, one unit vector per shopper) summed \
                 exactly into the tower's start; nothing trained"
                    .into(),
            );
            arms.push(arm);
        }
    }
    Ok(arms)
}

/// `values` with the pooling selection applied without noise (every merchant's shoppers'
/// validation NDCG@10 under the grid's settings, the best mean chosen), scored.
fn selected(world: &World, name: &str, values: &[f32], what: &str) -> anyhow::Result<ArmResult> {
    let t = Instant::now();
    tokio::task::block_in_place(|| {
        let (values, best) = world.exact_selection(values, &world.all_merchant_users())?;
        let (test, ranks) = world.score_with_ranks(Some(&values), Split::Test)?;
        let validation = world.score(Some(&values), Split::Validation)?;
        let mut arm = baseline(name, test, validation, t.elapsed().as_secs_f64(), vec![ranks]);
        arm.events.push(format!(
            "{what} with the pooling selection without noise: the grid's {} with the best mean \
             validation NDCG@10 over every merchant's shoppers",
            guild_proto::tower::describe_setting(best)
        ));
        arm.final_adapter = Some(values);
        Ok(arm)
    })
}

/// The weights of the counts' prior tried on the validation split: from a tenth of the
/// cosine's scale to ten times it (a trained tower's scores spread wider than zero-shot's,
/// and with it the best weight was the top of a grid that stopped at 1).
const COUNT_PRIOR_WEIGHTS: [f64; 5] = [0.1, 0.3, 1.0, 3.0, 10.0];

/// A tower (`values`; none: zero-shot) plus the counts' prior `w · ln(1 + count)`, `w` the
/// best of [`COUNT_PRIOR_WEIGHTS`] on the validation split; the test split read once, at it.
fn with_counts(
    world: &World,
    name: &str,
    values: Option<&[f32]>,
    counts: &guild_client::retrieval::ItemCounts,
    ranker: &str,
) -> anyhow::Result<ArmResult> {
    let t = Instant::now();
    let tower = &world.spec.tower;
    tokio::task::block_in_place(|| {
        let mut tried = Vec::new();
        for weight in COUNT_PRIOR_WEIGHTS {
            let (validation, _) =
                world.score_tower_with_counts(values, tower, Some((counts, weight)), Split::Validation)?;
            tried.push((weight, validation));
        }
        let (weight, validation) = tried
            .iter()
            .copied()
            .max_by(|a, b| a.1.ndcg_at_10.total_cmp(&b.1.ndcg_at_10))
            .expect("weights to try");
        let (test, ranks) =
            world.score_tower_with_counts(values, tower, Some((counts, weight)), Split::Test)?;
        let mut arm = baseline(name, test, validation, t.elapsed().as_secs_f64(), vec![ranks]);
        let grid: Vec<String> = tried.iter().map(|(w, v)| format!("{w}: {:.4}", v.ndcg_at_10)).collect();
        arm.events.push(format!(
            "{ranker} plus w·ln(1 + count) of the item-to-item counts, w = {weight} chosen on validation \
             NDCG@10 ({}); an upper reference for a tower with the counts summed exactly, no noise",
            grid.join(", ")
        ));
        Ok(arm)
    })
}

/// An in-process arm's trained values and their scores: test (with each user's rank) and
/// validation.
struct Trained {
    values: Vec<f32>,
    test: (Scores, Vec<u32>),
    validation: Scores,
}

/// Trained `values`, scored on the test split (once) and on validation.
fn score_trained(world: &World, values: Vec<f32>) -> anyhow::Result<Trained> {
    tokio::task::block_in_place(|| {
        let test = world.score_with_ranks(Some(&values), Split::Test)?;
        let validation = world.score(Some(&values), Split::Validation)?;
        anyhow::Ok(Trained { values, test, validation })
    })
}

/// What early stopping did, in words: the steps taken of at most `most`, the rule, the
/// best check and every check.
fn early_stopping_note(most: usize, stop: &EarlyStopping, taken: usize, checks: &Patience) -> String {
    let (best_step, best) = checks.best().unwrap_or((0, f64::NAN));
    let all: Vec<String> = checks.checks().iter().map(|(step, ndcg)| format!("{step}: {ndcg:.4}")).collect();
    let ended = if taken < most { "stopped early" } else { "ran to the most" };
    format!(
        "{taken} steps of at most {most} ({ended}: validation NDCG@10 of the first {} evaluation \
         users, on their validation items, checked every {} steps, patience {}); kept the best check, \
         step {best_step} ({best:.4}; checks {})",
        stop.users,
        stop.every,
        stop.patience,
        all.join(", ")
    )
}

/// A reference arm's result.
fn baseline(name: &str, test: Scores, validation: Scores, wall: f64, ranks: Vec<Vec<u32>>) -> ArmResult {
    ArmResult {
        arm: name.to_owned(),
        test,
        validation,
        wall_seconds: wall,
        test_ranks: ranks,
        ..ArmResult::default()
    }
}
