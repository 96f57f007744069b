//! Privatising a merchant's contribution to a round on the training thread: the learner's
//! updates clipped and DDGauss-encoded with this client's share of the noise, one update
//! (merchant unit) or each sampled shopper's, summed (shopper unit).

use guild_privacy::PrivacyUnit;
use guild_privacy::dp::{DdgEncoding, DdgParams, poisson_sample};
use guild_proto::domain::RoundTask;
use guild_proto::round::SummedCoordinates;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::ParticipantError;
use crate::learner::{Learner, RoundInput, Units, Update, contribute};

/// Trains and privatises this merchant's contribution to a round, on the training thread.
/// Merchant unit: one update, clipped and encoded whole. Shopper unit: shoppers
/// Poisson-sampled here at the task's rate with the OS's randomness (the coordinator never
/// learns who), each one's update clipped to c on its own and summed, the sum scaled,
/// rotated and rounded once (one shopper moves the rounded sum by at most c/γ + √d); a
/// shopper whose update is not finite is left out (as if not sampled, which moves the sum
/// by no more than one shopper may). Then this client's noise share, once, and the
/// reduction mod 2^b.
pub(super) fn privatised_update(
    learner: &mut dyn Learner,
    task: &RoundTask,
    global: &[f32],
    ddg: &DdgParams,
) -> Result<DdgEncoding, ParticipantError> {
    let p = &task.privacy;
    let rotation = ddg.rotation(p.rotation_seed);
    // The learner's updates are over the whole adapter; the round sums only its own
    // coordinates (`SummedCoordinates`), and those alone are clipped, noised and sent.
    let summed = task.summed();
    let mut os_rng = ChaCha20Rng::from_entropy();
    let training = |e: anyhow::Error| ParticipantError::Training(format!("{e:#}"));
    match p.unit {
        PrivacyUnit::Merchant => {
            let mut encoded = None;
            let mut each = |update: Update<'_>| -> anyhow::Result<()> {
                anyhow::ensure!(
                    encoded.is_none(),
                    "the learner handed over more than the merchant's one update"
                );
                encoded = Some(match update {
                    Update::Dense(x) if summed.is_whole() => ddg.encode(x, &rotation, &mut os_rng)?,
                    Update::Dense(x) => ddg.encode(&mut gather(&summed, x)?, &rotation, &mut os_rng)?,
                    Update::Sparse { indices, values } => {
                        let indices = positions(&summed, indices)?;
                        let sparse = Update::Sparse { indices: &indices, values };
                        ddg.encode(&mut sparse.to_dense(ddg.dimension())?, &rotation, &mut os_rng)?
                    }
                });
                Ok(())
            };
            contribute(learner, RoundInput { task, global, units: Units::Merchant }, &mut each)
                .map_err(training)?;
            encoded.ok_or_else(|| ParticipantError::Training("the learner handed over no update".into()))
        }
        PrivacyUnit::Shopper => {
            let sampled = poisson_sample(learner.shopper_count(), p.shopper_sampling_rate, &mut os_rng)?;
            let mut sum = ddg.summands(&rotation);
            let mut left_out = 0usize;
            let mut each = |update: Update<'_>| -> anyhow::Result<()> {
                let added = match update {
                    Update::Dense(x) if summed.is_whole() => sum.add(x),
                    Update::Dense(x) => sum.add(&mut gather(&summed, x)?),
                    Update::Sparse { indices, values } => {
                        sum.add_sparse(&positions(&summed, indices)?, values)
                    }
                };
                match added {
                    Ok(()) => {}
                    Err(guild_privacy::dp::DpError::NonFinite { .. }) => left_out += 1,
                    Err(e) => return Err(e.into()),
                }
                Ok(())
            };
            contribute(learner, RoundInput { task, global, units: Units::Shoppers(&sampled) }, &mut each)
                .map_err(training)?;
            if left_out > 0 {
                tracing::warn!(
                    left_out,
                    sampled = sampled.len(),
                    "shoppers with a non-finite update were left out"
                );
            }
            tracing::debug!(sampled = sampled.len(), encoded = sum.count(), "shopper updates encoded");
            Ok(sum.finish(&mut os_rng)?)
        }
    }
}

/// A dense update over the whole adapter, restricted to the coordinates the round sums.
fn gather(summed: &SummedCoordinates, x: &[f32]) -> anyhow::Result<Vec<f32>> {
    anyhow::ensure!(
        x.len() == summed.dimension(),
        "an update of {} coordinates, not the adapter's {}",
        x.len(),
        summed.dimension()
    );
    Ok(summed.gather(x))
}

/// A sparse update's adapter coordinates as positions in the summed vector (still strictly
/// increasing: the summed ranges keep the adapter's order). A coordinate the round does not
/// sum is the learner's mistake, named rather than dropped.
fn positions(summed: &SummedCoordinates, indices: &[usize]) -> anyhow::Result<Vec<usize>> {
    if summed.is_whole() {
        return Ok(indices.to_vec());
    }
    indices
        .iter()
        .map(|&i| {
            summed.position(i).ok_or_else(|| {
                anyhow::anyhow!("an update at adapter coordinate {i}, which this round does not sum")
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    /// Shopper unit on the training thread: the merchant samples its own shoppers, each
    /// update is encoded on its own; with no noise, the decoded sum is the sum of each
    /// shopper's update clipped to c (not the sum clipped once).
    #[test]
    fn a_shopper_round_sums_each_sampled_shoppers_clipped_update() {
        let mut task = shopper_task(51, 35, 1.0, 1.0);
        task.privacy.mode = PrivacyMode::DangerousNone;
        let d = task.manifest.parameter_count();
        let p = &task.privacy;
        let ddg =
            DdgParams::from_round(d, p.clip_norm, p.gamma, p.bit_width, 0.0, p.min_survivors).expect("ddg");
        // Ten shoppers, each update of norm 5 along a random direction, clipped to 1.
        let mut learner = crate::learner::RandomLearner {
            manifest: manifest(),
            norm: 5.0,
            rng: ChaCha20Rng::seed_from_u64(3),
            shoppers: 10,
        };
        let encoded = privatised_update(&mut learner, &task, &vec![0.0; d], &ddg).expect("encoded");
        let rotation = ddg.rotation(p.rotation_seed);
        let sum = ddg.decode(&encoded.values, &rotation).expect("decode");
        let mut replay = crate::learner::RandomLearner {
            manifest: manifest(),
            norm: 1.0,
            rng: ChaCha20Rng::seed_from_u64(3),
            shoppers: 10,
        };
        let mut expected = vec![0.0f64; d];
        let mut add = |x: Update<'_>| -> anyhow::Result<()> {
            expected.iter_mut().zip(x.to_dense(d)?).for_each(|(e, v)| *e += f64::from(v));
            Ok(())
        };
        replay
            .train(
                RoundInput { task: &task, global: &vec![0.0; d], units: Units::Shoppers(&[0; 10]) },
                &mut add,
            )
            .expect("updates");
        let error: f64 = sum.iter().zip(&expected).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = expected.iter().map(|x| x * x).sum::<f64>().sqrt();
        // Rounding adds about γ/2·√(10·d) of error: far below the norm of the sum (≈ √10).
        assert!(error < 0.01 * norm, "decoded sum off by {error} (norm {norm})");
        assert!(norm > 2.5, "ten clipped unit updates, not one clipped sum: {norm}");
    }
}
