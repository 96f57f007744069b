//! The server optimisers as pure functions: FedAvg (the averaged update times a server
//! learning rate) and FedAdam (Reddi et al., ICLR 2021, "Adaptive Federated
//! Optimization"), and the encoding of FedAdam's moments in the store.
//!
//! Both take the decoded noisy sum and a fixed denominator (q·N, the expected cohort),
//! never the realised cohort size, so the released average does not depend on who
//! survived.

use crate::config::ServerOptimizer;

/// FedAdam's β₁.
pub const ADAM_BETA1: f64 = 0.9;
/// FedAdam's β₂.
pub const ADAM_BETA2: f64 = 0.99;
/// FedAdam's adaptivity τ (the ε of Adam), as in Reddi et al.
pub const ADAM_TAU: f64 = 1e-3;

/// FedAdam's first and second moments, one of each per coordinate.
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    pub first: Vec<f64>,
    pub second: Vec<f64>,
}

impl Moments {
    pub fn zeros(dimension: usize) -> Self {
        Self { first: vec![0.0; dimension], second: vec![0.0; dimension] }
    }

    /// The stored form: the first moments then the second, as little-endian f32.
    pub fn to_bytes(&self) -> Vec<u8> {
        let flat: Vec<f32> = self.first.iter().chain(&self.second).map(|&x| x as f32).collect();
        guild_proto::adapter::to_bytes(&flat)
    }

    /// Reads [`Self::to_bytes`]'s form for an adapter of `dimension` parameters.
    pub fn from_bytes(bytes: &[u8], dimension: usize) -> Result<Self, guild_proto::adapter::AdapterError> {
        let values = guild_proto::adapter::from_bytes(bytes, 2 * dimension)?;
        let (first, second) = values.split_at(dimension);
        Ok(Self {
            first: first.iter().map(|&x| f64::from(x)).collect(),
            second: second.iter().map(|&x| f64::from(x)).collect(),
        })
    }
}

/// One server step's result: the new adapter and, for FedAdam, the new moments.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerStep {
    pub values: Vec<f32>,
    pub moments: Option<Moments>,
}

/// FedAvg: `x + η · Δ̄`.
pub fn fed_avg(current: &[f32], mean_update: &[f64], learning_rate: f64) -> Vec<f32> {
    current.iter().zip(mean_update).map(|(&x, &u)| (f64::from(x) + learning_rate * u) as f32).collect()
}

/// FedAdam: `m ← β₁m + (1−β₁)Δ̄`, `v ← β₂v + (1−β₂)Δ̄²`, `x ← x + η·m/(√v + τ)`.
pub fn fed_adam(
    current: &[f32],
    mean_update: &[f64],
    learning_rate: f64,
    moments: &Moments,
) -> (Vec<f32>, Moments) {
    let mut next = moments.clone();
    for (i, &u) in mean_update.iter().enumerate() {
        next.first[i] = ADAM_BETA1 * next.first[i] + (1.0 - ADAM_BETA1) * u;
        next.second[i] = ADAM_BETA2 * next.second[i] + (1.0 - ADAM_BETA2) * u * u;
    }
    let values = current
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            (f64::from(x) + learning_rate * next.first[i] / (next.second[i].sqrt() + ADAM_TAU)) as f32
        })
        .collect();
    (values, next)
}

/// Which coordinates a training round's step moves.
#[derive(Clone, Debug)]
pub enum Trained<'a> {
    /// Every coordinate; those in the range (the sequence tower's statistics) are a running
    /// sum, not trained: they get the mean contribution added as it is, whatever the
    /// optimiser, and FedAdam's moments there stay zero.
    All(Option<std::ops::Range<usize>>),
    /// Only these ranges: every other value, and FedAdam's moments there, kept exactly as
    /// they were (what the sum holds elsewhere is noise, and the statistics are the
    /// releases' to move).
    Part(&'a [std::ops::Range<usize>]),
}

/// Applies `optimizer` to the `trained` coordinates of `current` with the decoded `sum` of
/// the round's updates, divided by the fixed `denominator`. FedAdam starts from zero
/// moments when `moments` is `None` (the first round, or a federation that switched
/// optimiser).
pub fn server_step(
    optimizer: ServerOptimizer,
    current: &[f32],
    sum: &[f64],
    denominator: f64,
    learning_rate: f64,
    moments: Option<&Moments>,
    trained: Trained<'_>,
) -> ServerStep {
    let mut mean: Vec<f64> = sum.iter().map(|s| s / denominator).collect();
    match trained {
        Trained::All(accumulated) => {
            let accumulated = accumulated.filter(|r| r.end <= mean.len()).unwrap_or(0..0);
            let added: Vec<f64> = mean[accumulated.clone()].to_vec();
            mean[accumulated.clone()].iter_mut().for_each(|m| *m = 0.0);
            let mut step = optimizer_step(optimizer, current, &mean, learning_rate, moments);
            for (x, a) in step.values[accumulated].iter_mut().zip(added) {
                *x = (f64::from(*x) + a) as f32;
            }
            step
        }
        Trained::Part(part) => {
            keep_part(&mut mean, part);
            let step = optimizer_step(optimizer, current, &mean, learning_rate, moments);
            let mut values = current.to_vec();
            let mut kept_moments = step.moments.as_ref().map(|_| match moments {
                Some(m) if m.first.len() == current.len() => m.clone(),
                _ => Moments::zeros(current.len()),
            });
            for range in part.iter().filter(|r| r.end <= current.len()) {
                values[range.clone()].copy_from_slice(&step.values[range.clone()]);
                if let (Some(kept), Some(next)) = (kept_moments.as_mut(), step.moments.as_ref()) {
                    kept.first[range.clone()].copy_from_slice(&next.first[range.clone()]);
                    kept.second[range.clone()].copy_from_slice(&next.second[range.clone()]);
                }
            }
            ServerStep { values, moments: kept_moments.or_else(|| moments.cloned()) }
        }
    }
}

/// A popularity release's step: the mean contribution added to the histogram's
/// coordinates `accumulated`, every other value kept as it is (what the sum holds there is
/// noise alone), and the optimiser's `moments` carried over unmoved.
pub fn release_step(
    current: &[f32],
    sum: &[f64],
    denominator: f64,
    moments: Option<&Moments>,
    accumulated: Option<std::ops::Range<usize>>,
) -> ServerStep {
    let mut values = current.to_vec();
    let range = accumulated.filter(|r| r.end <= sum.len().min(values.len())).unwrap_or(0..0);
    for (x, s) in values[range.clone()].iter_mut().zip(&sum[range]) {
        *x = (f64::from(*x) + s / denominator) as f32;
    }
    ServerStep { values, moments: moments.cloned() }
}

/// The pooling selection's step for a tower of `shape`: the setting of the public grid
/// (`guild_proto::tower::selection_grid`) whose noisy sum, in the first `k` coordinates of
/// `sum`, is largest becomes the tower's pooling and prior weight; every other value is kept
/// (what the sum holds elsewhere is noise alone) and the optimiser's `moments` carried over.
/// With the chosen setting's index; `None` for a tower without a popularity prior or a sum
/// shorter than the grid.
pub fn selection_step(
    shape: &guild_proto::tower::TowerShape,
    current: &[f32],
    sum: &[f64],
    moments: Option<&Moments>,
) -> Option<(ServerStep, usize)> {
    let grid = guild_proto::tower::selection_grid(shape);
    let scores = sum.get(..grid.len())?;
    // The first of equal sums; a NaN never reaches here (the decoded sum's bound rejects it).
    let best = (0..grid.len()).fold(0, |best, j| if scores[j] > scores[best] { j } else { best });
    let values = guild_proto::tower::with_setting(shape, current, &grid[best])?;
    Some((ServerStep { values, moments: moments.cloned() }, best))
}

/// Multiplies a decoded `sum`'s coordinates in `range` by `factor`: the sequence tower's
/// item-ID rows get their own step (`rounds.item_ids_scale`) before the server optimiser.
/// No range (an adapter without item IDs), or one past the sum, changes nothing.
pub fn scale_range(sum: &mut [f64], range: Option<std::ops::Range<usize>>, factor: f64) {
    if let Some(rows) = range.and_then(|r| sum.get_mut(r)) {
        rows.iter_mut().for_each(|s| *s *= factor);
    }
}

/// Sets every coordinate of a decoded `sum` outside `part` to zero: in a round that trains
/// a part, what the sum holds elsewhere is noise alone.
fn keep_part(sum: &mut [f64], part: &[std::ops::Range<usize>]) {
    let mut kept = vec![0.0; sum.len()];
    for range in part.iter().filter(|r| r.end <= sum.len()) {
        kept[range.clone()].copy_from_slice(&sum[range.clone()]);
    }
    sum.copy_from_slice(&kept);
}

fn optimizer_step(
    optimizer: ServerOptimizer,
    current: &[f32],
    mean: &[f64],
    learning_rate: f64,
    moments: Option<&Moments>,
) -> ServerStep {
    match optimizer {
        ServerOptimizer::FedAvg => {
            ServerStep { values: fed_avg(current, mean, learning_rate), moments: None }
        }
        ServerOptimizer::FedAdam => {
            let zeros;
            let moments = match moments {
                Some(m) if m.first.len() == mean.len() => m,
                _ => {
                    zeros = Moments::zeros(mean.len());
                    &zeros
                }
            };
            let (values, moments) = fed_adam(current, mean, learning_rate, moments);
            ServerStep { values, moments: Some(moments) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn fed_avg_adds_the_mean_update_times_the_learning_rate() {
        let step = server_step(
            ServerOptimizer::FedAvg,
            &[1.0, -2.0, 0.5],
            &[4.0, 8.0, -2.0],
            4.0,
            0.5,
            None,
            Trained::All(None),
        );
        assert_eq!(step.values, vec![1.5, -1.0, 0.25]);
        assert_eq!(step.moments, None);
    }

    #[test]
    fn fed_adam_first_step_matches_the_formula_by_hand() {
        // Zero moments, mean update u: m = 0.1u, v = 0.01u², step = η·0.1u/(0.1|u| + τ).
        let step = server_step(
            ServerOptimizer::FedAdam,
            &[0.0, 1.0, 0.0],
            &[2.0, -0.5, 0.0],
            1.0,
            0.1,
            None,
            Trained::All(None),
        );
        let moments = step.moments.expect("FedAdam keeps moments");
        close(&moments.first, &[0.2, -0.05, 0.0]);
        assert!((moments.second[0] - 0.04).abs() < 1e-15 && (moments.second[1] - 0.0025).abs() < 1e-15);
        let expected = [0.1 * 0.2 / (0.2 + ADAM_TAU), 1.0 - 0.1 * 0.05 / (0.05 + ADAM_TAU), 0.0];
        for (got, want) in step.values.iter().zip(expected) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
        }
        // Adam's normalisation: the first step is about η in every moving coordinate,
        // whatever the update's scale.
        assert!((step.values[0] - 0.1).abs() < 1e-3 && (step.values[1] - 0.9).abs() < 3e-3);
    }

    #[test]
    fn fed_adam_accumulates_moments_across_rounds() {
        let d = 2;
        let first = server_step(
            ServerOptimizer::FedAdam,
            &[0.0; 2],
            &[1.0, 1.0],
            1.0,
            0.01,
            None,
            Trained::All(None),
        );
        let second = server_step(
            ServerOptimizer::FedAdam,
            &first.values,
            &[1.0, -1.0],
            1.0,
            0.01,
            first.moments.as_ref(),
            Trained::All(None),
        );
        let m = second.moments.expect("moments");
        assert_eq!(m.first.len(), d);
        // m = 0.9·0.1 + 0.1·u₂: 0.19 where the updates agreed, −0.01 where they did not.
        close(&m.first, &[0.19, -0.01]);
        assert!(second.values[0] > first.values[0] && second.values[1] < first.values[1]);
        // Moments of the wrong length (a changed manifest) restart from zero.
        let restarted = server_step(
            ServerOptimizer::FedAdam,
            &[0.0; 3],
            &[1.0; 3],
            1.0,
            0.01,
            first.moments.as_ref(),
            Trained::All(None),
        );
        close(&restarted.moments.expect("moments").first, &[0.1; 3]);
    }

    #[test]
    fn the_popularity_histogram_is_summed_whatever_the_optimiser() {
        // Coordinates 1..3 accumulate: + sum/denominator, no learning rate, no moments.
        for optimizer in [ServerOptimizer::FedAvg, ServerOptimizer::FedAdam] {
            let step = server_step(
                optimizer,
                &[1.0, 2.0, 3.0, 4.0],
                &[4.0, 8.0, -2.0, 4.0],
                4.0,
                0.1,
                None,
                Trained::All(Some(1..3)),
            );
            assert_eq!(&step.values[1..3], &[4.0, 2.5], "{optimizer:?}");
            assert!(step.values[0] > 1.0 && step.values[3] > 4.0, "the rest is trained: {:?}", step.values);
            if let Some(m) = step.moments {
                assert_eq!((m.first[1], m.first[2], m.second[1], m.second[2]), (0.0, 0.0, 0.0, 0.0));
            }
        }
    }

    #[test]
    fn a_selection_takes_the_setting_with_the_largest_sum_and_moves_nothing_else() {
        use guild_proto::tower::{
            TowerShape, parameter_count, selection_grid, selection_ranges, with_setting,
        };
        let shape = TowerShape::tiny(10);
        let n = parameter_count(&shape);
        let current: Vec<f32> = (0..n).map(|i| i as f32 * 1e-2).collect();
        let grid = selection_grid(&shape);
        let mut sum = vec![-50.0; n];
        sum[..grid.len()].iter_mut().enumerate().for_each(|(j, s)| *s = j as f64);
        sum[4] = 1e3;
        let moments = Moments::zeros(n);
        let (step, best) =
            selection_step(&shape, &current, &sum, Some(&moments)).expect("a tower with a prior");
        assert_eq!(best, 4);
        assert_eq!(step.values, with_setting(&shape, &current, &grid[4]).expect("fits"));
        let (recency, weight) = selection_ranges(&shape).expect("ranges");
        for (i, (&after, &before)) in step.values.iter().zip(&current).enumerate() {
            if !recency.contains(&i) && i != weight {
                assert_eq!(after, before, "{i} moved");
            }
        }
        assert_eq!(step.moments, Some(moments));
        // Ties go to the first; no prior or too short a sum, no selection.
        let (_, first) = selection_step(&shape, &current, &vec![1.0; n], None).expect("fits");
        assert_eq!(first, 0);
        assert!(selection_step(&TowerShape::tiny(0), &current, &sum, None).is_none());
        assert!(selection_step(&shape, &current, &sum[..3], None).is_none());
    }

    #[test]
    fn the_item_id_rows_step_is_scaled_and_nothing_else_moves_more() {
        let current = [1.0_f32, 1.0, 1.0, 1.0];
        let mut sum = vec![4.0, 4.0, 4.0, 4.0];
        scale_range(&mut sum, Some(1..3), 10.0);
        assert_eq!(sum, vec![4.0, 40.0, 40.0, 4.0]);
        // With FedAvg the rows' learning rate is the factor times the server's.
        let step = server_step(ServerOptimizer::FedAvg, &current, &sum, 4.0, 0.5, None, Trained::All(None));
        assert_eq!(step.values, vec![1.5, 6.0, 6.0, 1.5]);
        // No item IDs, or rows that do not fit the sum: nothing scaled.
        let mut unchanged = vec![4.0, 4.0];
        scale_range(&mut unchanged, None, 10.0);
        scale_range(&mut unchanged, Some(1..3), 10.0);
        assert_eq!(unchanged, vec![4.0, 4.0]);
    }

    #[test]
    fn a_release_adds_the_mean_to_the_histogram_and_leaves_the_noise_elsewhere_unused() {
        let moments = Moments { first: vec![0.1, 0.0, 0.0, -0.2], second: vec![0.3, 0.0, 0.0, 0.4] };
        let step =
            release_step(&[1.0, 2.0, 3.0, 4.0], &[400.0, 8.0, -2.0, -400.0], 4.0, Some(&moments), Some(1..3));
        assert_eq!(step.values, vec![1.0, 4.0, 2.5, 4.0]);
        assert_eq!(step.moments, Some(moments), "no moments moved");
        assert!(release_step(&[1.0], &[5.0], 1.0, None, None).moments.is_none(), "none made up");
        // Without a histogram (or one that does not fit) nothing moves at all.
        assert_eq!(release_step(&[1.0, 2.0], &[5.0, 5.0], 1.0, None, None).values, vec![1.0, 2.0]);
        assert_eq!(release_step(&[1.0, 2.0], &[5.0, 5.0], 1.0, None, Some(1..3)).values, vec![1.0, 2.0]);
    }

    #[test]
    fn a_part_step_moves_the_part_alone_and_keeps_every_other_value_and_moment() {
        let current = [1.0_f32, 2.0, 3.0, 4.0, 5.0];
        let sum = [10.0, 20.0, 30.0, 40.0, 50.0];
        let part = [1..2, 3..4];
        let avg = server_step(ServerOptimizer::FedAvg, &current, &sum, 10.0, 0.5, None, Trained::Part(&part));
        assert_eq!(avg.values, vec![1.0, 3.0, 3.0, 6.0, 5.0]);
        assert_eq!(avg.moments, None);
        // FedAdam with moments left by earlier whole-adapter rounds: outside the part, a
        // whole step would keep moving values on their old first moments.
        let mut earlier = Moments::zeros(5);
        earlier.first = vec![0.5; 5];
        earlier.second = vec![0.25; 5];
        let adam = server_step(
            ServerOptimizer::FedAdam,
            &current,
            &sum,
            10.0,
            0.1,
            Some(&earlier),
            Trained::Part(&part),
        );
        let whole = optimizer_step(
            ServerOptimizer::FedAdam,
            &current,
            &[0.0, 2.0, 0.0, 4.0, 0.0],
            0.1,
            Some(&earlier),
        );
        let moments = adam.moments.expect("FedAdam keeps moments");
        for (i, &start) in current.iter().enumerate() {
            let inside = i == 1 || i == 3;
            let want = if inside { whole.values[i] } else { start };
            assert_eq!(adam.values[i], want, "value {i}");
            let next = whole.moments.as_ref().expect("moments");
            let (first, second) =
                if inside { (next.first[i], next.second[i]) } else { (earlier.first[i], earlier.second[i]) };
            assert_eq!((moments.first[i], moments.second[i]), (first, second), "moments {i}");
        }
        assert_ne!(whole.values[0], current[0], "a whole step would have moved coordinate 0");
        let mut noisy = sum.to_vec();
        keep_part(&mut noisy, &part);
        assert_eq!(noisy, vec![0.0, 20.0, 0.0, 40.0, 0.0]);
    }

    #[test]
    fn moments_round_trip_through_their_stored_form_at_f32_precision() {
        let m = Moments { first: vec![0.1, -2.5, 3e-7], second: vec![1e-3, 4.0, 0.0] };
        let back = Moments::from_bytes(&m.to_bytes(), 3).expect("decode");
        for (a, b) in m.first.iter().chain(&m.second).zip(back.first.iter().chain(&back.second)) {
            assert!((a - b).abs() <= a.abs() * 1e-7, "{a} vs {b}");
        }
        assert!(Moments::from_bytes(&m.to_bytes(), 4).is_err(), "a wrong dimension must be refused");
    }
}
