//! Tail averaging (Polyak–Ruppert): the adapter a federation hands out for use can be the
//! mean of its last few training versions instead of the last one alone. FedAvg's iterates
//! wander around the optimum by the noise of each round's sample of merchants; their mean
//! sits nearer it. It reads only versions the coordinator already released, so it is
//! post-processing and costs no privacy; the versions the federation trains from are
//! unchanged. The coordinator's `export-adapter --average-last`, the simulator and
//! `guild-client serve`'s `[serve] average_last` all average with these two functions.
//!
//! Only the trained coordinates are averaged: the accumulated statistics (the popularity
//! histogram and item-to-item counts, running sums the coordinator adds to) are taken from
//! the newest version, since an older version's sums are missing what was added since.

use std::ops::{Range, RangeInclusive};

/// What keeps a tail average from being formed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TailError {
    #[error("an average needs at least one version (average_last = 0)")]
    Empty,
    #[error("adapter version {0} was not committed by a training round: there is nothing to average")]
    NotTrained(u64),
    #[error(
        "the adapter at position {position} of the tail has {found} values where the newest has {expected}"
    )]
    Ragged { position: usize, found: usize, expected: usize },
}

/// The mean of `versions` (oldest first, each a whole adapter of the same length), except in
/// `accumulated`, which is the last version's: the average of the trained coordinates,
/// accumulated in f64. One version is returned as it is.
pub fn tail_average(versions: &[Vec<f32>], accumulated: Option<Range<usize>>) -> Result<Vec<f32>, TailError> {
    let newest = versions.last().ok_or(TailError::Empty)?;
    let mut sum = vec![0.0f64; newest.len()];
    for (i, version) in versions.iter().enumerate() {
        if version.len() != newest.len() {
            return Err(TailError::Ragged { position: i, found: version.len(), expected: newest.len() });
        }
        sum.iter_mut().zip(version).for_each(|(s, &v)| *s += f64::from(v));
    }
    let n = versions.len() as f64;
    let mut averaged: Vec<f32> = sum.iter().map(|&s| (s / n) as f32).collect();
    if let Some(range) = accumulated.filter(|r| r.end <= newest.len()) {
        averaged[range.clone()].copy_from_slice(&newest[range]);
    }
    Ok(averaged)
}

/// The training versions a tail of `last` ending at `latest` takes, where training rounds
/// commit every version from `first_trained` on (the versions before it are statistics
/// releases and selections: `Schedule::first_training_version`): the `last` newest, fewer
/// where training has committed fewer. An error where `latest` itself is not a training
/// version.
pub fn tail_versions(first_trained: u64, latest: u64, last: u64) -> Result<RangeInclusive<u64>, TailError> {
    if last == 0 {
        return Err(TailError::Empty);
    }
    // Version 0, the start, is never a training version.
    let first_trained = first_trained.max(1);
    if latest < first_trained {
        return Err(TailError::NotTrained(latest));
    }
    Ok(latest.saturating_sub(last - 1).max(first_trained)..=latest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_average_is_each_trained_coordinate_s_mean_and_the_newest_statistics() {
        let versions = vec![vec![1.0, 2.0, 10.0, 0.5], vec![3.0, -2.0, 20.0, 0.5], vec![5.0, 3.0, 30.0, 2.0]];
        // Coordinates 2..3 are a running sum: the newest version's, not the mean.
        let averaged = tail_average(&versions, Some(2..3)).expect("same lengths");
        assert_eq!(averaged, vec![3.0, 1.0, 30.0, 1.0]);
        // Without statistics every coordinate is averaged.
        assert_eq!(tail_average(&versions, None).expect("same lengths"), vec![3.0, 1.0, 20.0, 1.0]);
    }

    #[test]
    fn one_version_is_itself_and_none_or_mismatched_ones_are_refused() {
        let one = vec![vec![0.1f32, -7.25, 3.0e-8]];
        assert_eq!(tail_average(&one, Some(1..2)).expect("one version"), one[0]);
        assert_eq!(tail_average(&[], None), Err(TailError::Empty));
        let ragged = vec![vec![1.0, 2.0], vec![1.0]];
        assert!(matches!(tail_average(&ragged, None), Err(TailError::Ragged { position: 0, .. })));
    }

    #[test]
    fn the_tail_takes_training_versions_only() {
        // Twenty releases, no selection: versions 1–20 are statistics, 21 on training.
        assert_eq!(tail_versions(21, 30, 8), Ok(23..=30));
        assert_eq!(tail_versions(21, 30, 1), Ok(30..=30));
        // Fewer training versions than asked: only those.
        assert_eq!(tail_versions(21, 22, 8), Ok(21..=22));
        assert_eq!(tail_versions(21, 20, 8), Err(TailError::NotTrained(20)));
        assert_eq!(tail_versions(21, 30, 0), Err(TailError::Empty));
        // Training from the start: version 0, the start, is never averaged.
        assert_eq!(tail_versions(1, 4, 10), Ok(1..=4));
        assert_eq!(tail_versions(0, 4, 10), Ok(1..=4));
        assert_eq!(tail_versions(1, 0, 3), Err(TailError::NotTrained(0)));
    }
}
