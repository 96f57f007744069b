//! Tail averaging over the coordinator's store: the mean of the last K training versions
//! (`guild_proto::average`, which says why and what is averaged), read from the versions
//! committed, behind `guild-coordinator export-adapter --average-last K` and the simulator.

use std::ops::RangeInclusive;

pub use guild_proto::average::{TailError, tail_average};
use guild_proto::domain::AdapterManifest;
use guild_proto::round::Schedule;

use crate::store::{Store, StoreError};

/// What keeps a tail average from being formed.
#[derive(Debug, thiserror::Error)]
pub enum AverageError {
    #[error(transparent)]
    Tail(#[from] TailError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Adapter(#[from] guild_proto::adapter::AdapterError),
}

/// The training versions a tail of `last` ending at `latest` takes under `schedule`: the
/// versions after its statistic rounds ([`guild_proto::average::tail_versions`]).
pub fn tail_versions(schedule: Schedule, latest: u64, last: u64) -> Result<RangeInclusive<u64>, TailError> {
    guild_proto::average::tail_versions(schedule.first_training_version(), latest, last)
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
            Err(AverageError::Tail(TailError::NotTrained(1)))
        ));
        assert!(matches!(averaged_adapter(&store, &manifest, schedule, 6, 2), Err(AverageError::Store(_))));
    }

    #[test]
    fn the_schedule_s_statistic_rounds_are_never_in_the_tail() {
        let releases = Schedule { popularity_releases: 20, pooling_selection: false };
        assert_eq!(tail_versions(releases, 30, 8), Ok(23..=30));
        assert_eq!(tail_versions(releases, 20, 8), Err(TailError::NotTrained(20)));
        let selected = Schedule { popularity_releases: 0, pooling_selection: true };
        assert_eq!(tail_versions(selected, 4, 10), Ok(2..=4));
    }
}
