//! Tail averaging (Polyak–Ruppert): the adapter a federation hands out for use can be the
//! mean of its last few training versions instead of the last one alone. FedAvg's
//! iterates wander around the optimum by the noise of each round's sample of merchants; their
//! mean sits nearer it. It reads only versions the coordinator already released, so it is
//! post-processing and costs no privacy; the versions the federation trains from are
//! unchanged.
//!
//! Only the trained coordinates are averaged: the accumulated statistics (the popularity
//! histogram and item-to-item counts, running sums the coordinator adds to) are taken from
//! the newest version, since an older version's sums are missing what was added since.

use std::ops::{Range, RangeInclusive};

use guild_proto::domain::AdapterManifest;
use guild_proto::round::Schedule;

use crate::store::{Store, StoreError};

/// What keeps a tail average from being formed.
#[derive(Debug, thiserror::Error)]
pub enum AverageError {
    #[error("an average needs at least one version (average_last = 0)")]
    Empty,
    #[error("adapter version {0} was not committed by a training round: there is nothing to average")]
    NotTrained(u64),
    #[error(
        "the adapter at position {position} of the tail has {found} values where the newest has {expected}"
    )]
    Ragged { position: usize, found: usize, expected: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Adapter(#[from] guild_proto::adapter::AdapterError),
}

/// The mean of `versions` (oldest first, each a whole adapter of the same length), except in
/// `accumulated`, which is the last version's: the average of the trained coordinates,
/// accumulated in f64. One version is returned as it is.
pub fn tail_average(
    versions: &[Vec<f32>],
    accumulated: Option<Range<usize>>,
) -> Result<Vec<f32>, AverageError> {
    let newest = versions.last().ok_or(AverageError::Empty)?;
    let mut sum = vec![0.0f64; newest.len()];
    for (i, version) in versions.iter().enumerate() {
        if version.len() != newest.len() {
            return Err(AverageError::Ragged { position: i, found: version.len(), expected: newest.len() });
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

/// The training versions a tail of `last` ending at `latest` takes: the `last` newest
/// versions that training rounds committed (by `schedule`: the versions after its statistic
/// rounds), fewer where training has committed fewer. An error where `latest` itself is not
/// a training version.
pub fn tail_versions(
    schedule: Schedule,
    latest: u64,
    last: u64,
) -> Result<RangeInclusive<u64>, AverageError> {
    if last == 0 {
        return Err(AverageError::Empty);
    }
    let first_trained = schedule.statistic_rounds() + 1;
    if latest < first_trained {
        return Err(AverageError::NotTrained(latest));
    }
    Ok(latest.saturating_sub(last - 1).max(first_trained)..=latest)
}

/// The tail average of the `last` training versions ending at `latest`, read from `store`
/// (see [`tail_average`]), and the versions it took.
pub fn averaged_adapter(
    store: &Store,
    manifest: &AdapterManifest,
    schedule: Schedule,
    latest: u64,
    last: u64,
) -> Result<(Vec<f32>, RangeInclusive<u64>), AverageError> {
    let versions = tail_versions(schedule, latest, last)?;
    // (`from_bytes` refuses a stored version of another length than the manifest's.)
    let count = manifest.parameter_count();
    let mut values = Vec::new();
    for version in versions.clone() {
        values.push(guild_proto::adapter::from_bytes(&store.adapter(version)?.data, count)?);
    }
    Ok((tail_average(&values, manifest.accumulated_range())?, versions))
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
        assert!(matches!(tail_average(&[], None), Err(AverageError::Empty)));
        let ragged = vec![vec![1.0, 2.0], vec![1.0]];
        assert!(matches!(tail_average(&ragged, None), Err(AverageError::Ragged { position: 0, .. })));
    }

    /// Versions from a store: the trained coordinates averaged over the tail's versions, the
    /// histogram the newest version's, and the versions taken named.
    #[test]
    fn a_stored_tail_averages_the_weights_and_keeps_the_newest_statistics() {
        use guild_proto::tower::TowerShape;

        use crate::store::{AdapterRecord, RoundCommit};
        let manifest = AdapterManifest::sequence_tower([0; 32], TowerShape::tiny(10), 0);
        let (count, statistics) =
            (manifest.parameter_count(), manifest.accumulated_range().expect("a histogram"));
        let store = Store::open_in_memory().expect("open");
        let version = |v: u64| -> Vec<f32> {
            (0..count)
                .map(|i| if statistics.contains(&i) { 100.0 * v as f32 } else { v as f32 + i as f32 })
                .collect()
        };
        let bytes = |v: u64| guild_proto::adapter::to_bytes(&version(v));
        store.ensure_initial_adapter(&bytes(0), [0; 32]).expect("v0");
        for v in 1..=4 {
            let round_id = store.open_round(3).expect("open");
            let adapter =
                AdapterRecord { version: v, sha256: [v as u8; 32], data: bytes(v), optimizer_state: None };
            store
                .commit_round(&RoundCommit { round_id, survivors: 3, adapter, ledger_event: None })
                .expect("commit");
        }
        // One release (version 1), then training: a tail of 8 ending at 4 takes 2, 3 and 4.
        let schedule = Schedule { popularity_releases: 1, pooling_selection: false };
        let (averaged, versions) = averaged_adapter(&store, &manifest, schedule, 4, 8).expect("averaged");
        assert_eq!(versions, 2..=4);
        for (i, &value) in averaged.iter().enumerate() {
            let want = if statistics.contains(&i) { 400.0 } else { 3.0 + i as f32 };
            assert_eq!(value, want, "coordinate {i}");
        }
        // Averaging a release is refused, and a missing version is the store's error.
        assert!(matches!(
            averaged_adapter(&store, &manifest, schedule, 1, 2),
            Err(AverageError::NotTrained(1))
        ));
        assert!(matches!(averaged_adapter(&store, &manifest, schedule, 6, 2), Err(AverageError::Store(_))));
    }

    #[test]
    fn the_tail_takes_training_versions_only() {
        // Twenty releases, no selection: versions 1–20 are statistics, 21 on training.
        let schedule = Schedule { popularity_releases: 20, pooling_selection: false };
        assert_eq!(tail_versions(schedule, 30, 8).expect("trained"), 23..=30);
        assert_eq!(tail_versions(schedule, 30, 1).expect("trained"), 30..=30);
        // Fewer training versions than asked: only those.
        assert_eq!(tail_versions(schedule, 22, 8).expect("trained"), 21..=22);
        assert!(matches!(tail_versions(schedule, 20, 8), Err(AverageError::NotTrained(20))));
        assert!(matches!(tail_versions(schedule, 30, 0), Err(AverageError::Empty)));
        let selected = Schedule { popularity_releases: 0, pooling_selection: true };
        assert_eq!(tail_versions(selected, 4, 10).expect("trained"), 2..=4);
    }
}
