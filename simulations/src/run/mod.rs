//! The arms of a scenario: baselines in this process (zero-shot, local-only per merchant,
//! centralised; `baselines`), and each federated arm (`plan`: its schedule and calibrated
//! noise) as a real federation (`federated`: a `guild-coordinator` child process,
//! merchants as clients over loopback mutual TLS) with the scenario's faults; every arm is
//! scored on the same evaluation users against the full catalogue.

mod baselines;
mod federated;
mod plan;
mod search;
mod serving;

pub use search::WEIGHTS as SEARCH_WEIGHTS;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use guild_proto::domain::AdapterFamilyName;

use crate::progress::Progress;
use crate::results::{ArmResult, Comparison, RunResults};
use crate::scenario::Scenario;
use crate::stats::{BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, Metric, PairingError, paired_differences, per_user};
use crate::world::{World, WorldSpec, lock};

use baselines::baselines;
use federated::federated;
use plan::plan;

/// The reference arms every other arm is compared with.
pub const ZERO_SHOT: &str = "zero-shot";
pub const LOCAL_ONLY: &str = "local-only (mean)";
pub const CENTRALISED: &str = "centralised (non-private)";
/// The other untrained ranker of the sequence-tower family, also a reference.
pub const WEAKER_ZERO_SHOT: &str = "zero-shot (the weaker untrained ranker)";
/// The tower's start plus the exact popularity histogram of every merchant's shoppers, no
/// training: how much of a trained arm's gain popularity alone gives.
pub const POPULARITY: &str = "zero-shot + popularity (non-private)";
/// Every history ranked by the items' training interactions over every merchant's shoppers.
pub const MOST_POPULAR: &str = "most popular (non-private)";
/// The untrained item-to-item count ranker over every merchant's shoppers, summed exactly:
/// the strongest simple baseline.
pub const ITEM_COUNTS: &str = "item-to-item counts (non-private)";
/// The zero-shot and the centralised rankers plus the exact counts as a prior.
pub const ZERO_SHOT_WITH_COUNTS: &str = "zero-shot + item-to-item counts (non-private)";
pub const CENTRALISED_WITH_COUNTS: &str = "centralised + item-to-item counts (non-private)";
/// The shopper-level arms' release and selection without noise (ε = ∞), and the same
/// selection on the centralised tower.
pub const EXACT_STATISTICS_SELECTED: &str = "statistics + selection, no noise (non-private)";
pub const CENTRALISED_SELECTED: &str = "centralised + selection (non-private)";
/// The tower's start with every merchant's shoppers' statistics summed exactly and its
/// pooling and priors' weights chosen on validation, nothing trained: what the federation's
/// releases give without a training round (`[arms] statistics_ranker`).
pub const STATISTICS_RANKER: &str = "released statistics, untrained (non-private)";

/// Adds to every arm its paired differences in NDCG@10 and Recall@10 (with 95% bootstrap
/// intervals) against each reference arm present: zero-shot (and, for the sequence tower,
/// the weaker untrained ranker), the local-only mean (each user's metric averaged over the
/// local merchants' models) and centralised.
pub fn compare_arms(arms: &mut [ArmResult]) -> anyhow::Result<()> {
    let metrics = [Metric::NdcgAt10, Metric::RecallAt10];
    let references: Vec<(String, Vec<Vec<f64>>)> = arms
        .iter()
        .filter(|a| {
            [ZERO_SHOT, WEAKER_ZERO_SHOT, POPULARITY, ITEM_COUNTS, STATISTICS_RANKER, LOCAL_ONLY, CENTRALISED]
                .contains(&a.arm.as_str())
                && !a.test_ranks.is_empty()
        })
        .map(|a| {
            Ok((
                a.arm.clone(),
                metrics.iter().map(|&m| per_user(m, &a.test_ranks)).collect::<Result<_, _>>()?,
            ))
        })
        .collect::<Result<_, PairingError>>()?;
    // The zero-shot reference is what every other arm is measured against; it is not
    // compared with the trained references itself (their comparisons show the same pairs).
    // Every comparison over the same users draws the same resamples, so they are drawn once
    // per metric and number of users (an arm scored on the first n evaluation users only, a
    // seeded subsample, pairs with the others' first n).
    let compared: Vec<usize> =
        (0..arms.len()).filter(|&i| !arms[i].test_ranks.is_empty() && arms[i].arm != ZERO_SHOT).collect();
    let mine: Vec<Vec<Vec<f64>>> = compared
        .iter()
        .map(|&i| metrics.iter().map(|&m| per_user(m, &arms[i].test_ranks)).collect::<Result<_, _>>())
        .collect::<Result<_, PairingError>>()?;
    // (compared arm, reference, metric, users)
    let mut jobs: Vec<(usize, usize, usize, usize)> = Vec::new();
    for (k, &i) in compared.iter().enumerate() {
        for (r, (name, theirs)) in references.iter().enumerate() {
            if *name != arms[i].arm {
                for (m, (a, b)) in mine[k].iter().zip(theirs).enumerate() {
                    jobs.push((k, r, m, a.len().min(b.len())));
                }
            }
        }
    }
    let mut results = vec![None; jobs.len()];
    let mut groups: Vec<(usize, usize)> = jobs.iter().map(|&(_, _, m, n)| (m, n)).collect();
    groups.sort_unstable();
    groups.dedup();
    for (metric, n) in groups {
        let members: Vec<usize> =
            (0..jobs.len()).filter(|&j| (jobs[j].2, jobs[j].3) == (metric, n)).collect();
        let pairs: Vec<(&[f64], &[f64])> = members
            .iter()
            .map(|&j| {
                let (k, r, m, n) = jobs[j];
                (&mine[k][m][..n], &references[r].1[m][..n])
            })
            .collect();
        let differences = paired_differences(metrics[metric], &pairs, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)?;
        for (j, d) in members.into_iter().zip(differences) {
            results[j] = Some(d);
        }
    }
    // Each (arm, reference) pair's jobs are its metrics, in order.
    let mut comparisons = vec![Vec::new(); compared.len()];
    for (pair, differences) in jobs.chunks(metrics.len()).zip(results.chunks(metrics.len())) {
        let (k, r, _, _) = pair[0];
        let differences = differences.iter().map(|d| d.expect("every job's group was compared")).collect();
        comparisons[k].push(Comparison { against: references[r].0.clone(), differences });
    }
    for (&i, comparisons) in compared.iter().zip(comparisons) {
        arms[i].comparisons = comparisons;
    }
    Ok(())
}

/// Writes `arm`'s final adapter, if it has one, as the exported folder
/// `out/adapters/ARM/v0` (`[arms] keep_adapters`), named as a federated arm's `out/arms/ARM`
/// is; an earlier run's folder there is replaced.
fn keep_adapter(world: &World, arm: &ArmResult, out: &Path) -> anyhow::Result<()> {
    let Some(values) = &arm.final_adapter else { return Ok(()) };
    let kept = replace_kept(&out.join("adapters").join(&arm.arm), &world.manifest(), values)
        .with_context(|| format!("keeping the adapter of {}", arm.arm))?;
    tracing::info!(arm = %arm.arm, folder = %kept.display(), "kept the arm's final adapter");
    Ok(())
}

/// `values` of `manifest` kept as the export `dir/v0` (`guild_client::participant::keep_version`),
/// whatever an earlier run left in `dir`.
fn replace_kept(
    dir: &Path,
    manifest: &guild_proto::domain::AdapterManifest,
    values: &[f32],
) -> anyhow::Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("removing an earlier run's {}", dir.display()))?;
    }
    guild_client::participant::keep_version(dir, 0, manifest, values)
}

/// Runs `scenario`, writing stores and logs under `out`; returns every arm's results.
pub async fn run(scenario: Scenario, out: &Path) -> anyhow::Result<RunResults> {
    let started = Instant::now();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let world = tokio::task::block_in_place(|| World::load(WorldSpec::of(&scenario)))?;
    let s = &scenario;
    let n = world.merchants.len();
    let d = world.parameter_count();
    // The DP arms' world: the scenario's `dp_tower` shape, if it sets one.
    let dp_world = s.federation.dp_tower.map(|shape| world.with_tower(shape));
    let private = dp_world.as_ref().unwrap_or(&world);
    // Every round of every federated arm, its statistic rounds included.
    let (plan, expected) = plan(&world, private, s)?;
    let progress = Progress::new(plan.iter().map(|arm| arm.rounds).sum());
    let mut arms = baselines(&world, s, &progress)?;
    if s.arms.keep_adapters {
        for arm in &arms {
            keep_adapter(&world, arm, out)?;
        }
    }
    for arm in &plan {
        progress.message(arm.name.clone());
        let dp_arm = arm.mode != guild_privacy::PrivacyMode::DangerousNone;
        let arm_world = if dp_arm { private } else { &world };
        let mut result = federated(arm_world, s, arm, out, &progress)
            .await
            .with_context(|| format!("arm {}", arm.name))?;
        if s.arms.keep_adapters {
            keep_adapter(arm_world, &result, out)?;
        }
        if dp_arm && dp_world.is_some() {
            result.events.push(format!(
                "the DP arms' tower (`federation.dp_tower`): {} coordinates against the non-private arms' {d}",
                private.parameter_count()
            ));
        }
        arms.push(result);
    }
    let search = if s.arms.search_users > 0 && world.spec.family == AdapterFamilyName::SequenceTower {
        progress.message("search");
        tokio::task::block_in_place(|| search::search(&world, private, s, &arms))?
    } else {
        Vec::new()
    };
    let serving = if s.arms.serve_requests > 0 && world.spec.family == AdapterFamilyName::SequenceTower {
        progress.message("serving");
        serving::serving(&world, s, &arms).await?
    } else {
        None
    };
    progress.message("paired comparisons");
    let comparisons_failed = compare_or_keep(&mut arms);
    progress.finish();
    let shared = lock(&world.shared);
    Ok(RunResults {
        scenario: s.name.clone(),
        description: s.description.clone(),
        machine: machine(),
        merchants: n,
        dataset_users: shared.dataset.users.len(),
        catalogue: shared.dataset.titles.len(),
        eval_users: world.eval_users.len(),
        expected_cohort: expected,
        adapter_parameters: d,
        wall_seconds: started.elapsed().as_secs_f64(),
        arms,
        search,
        serving,
        comparisons_failed,
    })
}

/// [`compare_arms`], or, where it fails, every arm as it was with no comparisons and the
/// error in words: the arms' scores are the run's work, and are written all the same.
pub fn compare_or_keep(arms: &mut [ArmResult]) -> Option<String> {
    let error = format!("{:#}", compare_arms(arms).err()?);
    tracing::error!(error, "paired comparisons failed; the arms' scores are kept");
    arms.iter_mut().for_each(|arm| arm.comparisons.clear());
    Some(error)
}

/// A one-line description of this machine.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let device = guild_client::training_device();
    format!("{cpus} CPU threads, {} training device {device:?}", std::env::consts::ARCH)
}

/// The report folder for a scenario run.
pub fn default_out(scenario: &Scenario) -> PathBuf {
    PathBuf::from("reports").join(&scenario.name)
}

/// A non-private trained arm's `values` with its pooling chosen on validation
/// (`[arms] pooling_choice_users`, [`World::pooling_choice`]) over `users` (default: the
/// first that many evaluation users), and the choice in words naming `whose` users; `values`
/// as they are (and no words) when the scenario asks for no choice or the adapter has no
/// pooling to choose.
fn with_pooling_choice(
    world: &World,
    s: &Scenario,
    values: Vec<f32>,
    users: Option<&[usize]>,
    whose: &str,
) -> anyhow::Result<(Vec<f32>, Option<String>)> {
    let n = s.arms.pooling_choice_users;
    if n == 0
        || world.spec.family != AdapterFamilyName::SequenceTower
        || world.spec.tower.shape.catalogue == 0
    {
        return Ok((values, None));
    }
    let users = users.unwrap_or(&world.eval_users[..n.min(world.eval_users.len())]);
    let (values, choice) = tokio::task::block_in_place(|| world.pooling_choice(&values, users))?;
    Ok((values, Some(choice.describe(whose))))
}

#[cfg(test)]
mod tests {
    use guild_proto::domain::AdapterManifest;
    use guild_proto::tower::{TowerShape, parameter_count};

    #[test]
    fn a_kept_adapter_replaces_an_earlier_runs() {
        let shape = TowerShape {
            hidden: 4,
            history: 3,
            zero_shot_items: 2,
            item_rank: 2,
            width: 4,
            layers: 1,
            heads: 2,
            catalogue: 5,
            neighbours: 2,
            pair_sketch: 0,
            item_ids: 0,
            spectral: 0,
        };
        let manifest = AdapterManifest::sequence_tower([7; 32], shape, 3);
        let d = parameter_count(&shape);
        let (first, second) = (vec![0.25f32; d], vec![-0.5f32; d]);
        let out = tempfile::tempdir().expect("tempdir");
        let dir = out.path().join("adapters").join("arm");
        super::replace_kept(&dir, &manifest, &first).expect("the first run's");
        let kept = super::replace_kept(&dir, &manifest, &second).expect("the second run's");
        // What a fresh export of the second run's values holds, byte for byte.
        let fresh = tempfile::tempdir().expect("tempdir");
        guild_proto::adapter::export(fresh.path(), &manifest, &second).expect("export");
        let read = |p: &std::path::Path| std::fs::read(p.join("tower.safetensors")).expect("tensors");
        assert_eq!(read(&kept), read(fresh.path()));
        assert_ne!(read(&kept), {
            let old = tempfile::tempdir().expect("tempdir");
            guild_proto::adapter::export(old.path(), &manifest, &first).expect("export");
            read(old.path())
        });
    }
}
