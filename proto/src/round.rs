//! What a round asks of its cohort ([`RoundKind`]) and the federation's one order of round
//! kinds ([`Schedule`]). The coordinator opens each round from the schedule, the wire carries
//! the kind (covered by the task digest), the client calls the learner method of the kind,
//! and the simulator plans and calibrates its arms from the same schedule.
//!
//! A new kind goes here (a variant, what it needs of the adapter, its place in the
//! schedule), in the coordinator's server step for it, in the learner's method for it, and
//! in their tests: see ARCHITECTURE.md, *Adding a round kind*.

use crate::domain::AdapterManifest;

/// What a round asks of its cohort. Every kind's update is clipped, noised and masked the
/// same way; they differ in what a unit (a merchant, or one shopper) puts in it and in what
/// the coordinator does with the noisy sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundKind {
    /// Local training: each sampled unit sends its clipped update to the adapter.
    Training,
    /// Each sampled unit sends only its popularity contribution, at the whole clip norm;
    /// the coordinator adds the mean to the popularity histogram and trains nothing.
    PopularityRelease,
    /// Each sampled unit sends `c/√k` times its NDCG@10 on its validation items under each
    /// of the `k` public settings of [`crate::tower::selection_grid`]; the coordinator sets
    /// the tower's pooling and prior weight to the setting whose noisy sum is largest and
    /// moves nothing else.
    PoolingSelection,
}

impl RoundKind {
    pub const ALL: [Self; 3] = [Self::Training, Self::PopularityRelease, Self::PoolingSelection];

    /// Whether a unit's update is a gradient step (otherwise it is a bounded statistic of
    /// the unit's data, computed without training).
    pub fn trains(self) -> bool {
        matches!(self, Self::Training)
    }

    /// Lower-case words for logs and messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Training => "training",
            Self::PopularityRelease => "popularity release",
            Self::PoolingSelection => "pooling selection",
        }
    }

    /// Why an adapter cannot run a round of this kind, if it cannot.
    pub fn unsupported_by(self, manifest: &AdapterManifest) -> Option<&'static str> {
        match self {
            Self::Training => None,
            Self::PopularityRelease => manifest
                .accumulated_range()
                .is_none()
                .then_some("the adapter has no popularity histogram to release"),
            Self::PoolingSelection => manifest
                .selection_ranges()
                .is_none()
                .then_some("the adapter is not a tower with a popularity prior to select the pooling of"),
        }
    }
}

impl std::fmt::Display for RoundKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// Which of the adapter's values a training round trains. The other kinds train nothing.
///
/// `Pooling` is the part a pooling selection chooses on a grid (the tower's recency
/// weights and its popularity prior's weight: `AdapterManifest::selection_ranges`), here
/// trained by gradient: a few dozen coordinates, where noise of z·c per coordinate is small
/// against the clipped gradients of thousands of shoppers, unlike the whole tower's
/// hundreds of thousands (issue: DP training that adds on top of the releases).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainedPart {
    /// Every trained value of the adapter.
    #[default]
    Whole,
    /// The sequence tower's pooling weights and popularity prior weight alone.
    Pooling,
}

impl TrainedPart {
    /// Lower-case words for logs and messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Whole => "the whole adapter",
            Self::Pooling => "the pooling and prior weight",
        }
    }

    /// Why an adapter cannot train this part, if it cannot.
    pub fn unsupported_by(self, manifest: &AdapterManifest) -> Option<&'static str> {
        match self {
            Self::Whole => None,
            Self::Pooling => manifest
                .selection_ranges()
                .is_none()
                .then_some("the adapter is not a tower with a popularity prior to train the pooling of"),
        }
    }

    /// The flat-vector ranges this part trains in `manifest`'s adapter: `None` for the
    /// whole adapter (or an adapter without the part, which [`Self::unsupported_by`] names).
    pub fn ranges(self, manifest: &AdapterManifest) -> Option<Vec<std::ops::Range<usize>>> {
        match self {
            Self::Whole => None,
            Self::Pooling => {
                let (recency, weight) = manifest.selection_ranges()?;
                Some(vec![recency, weight..weight + 1])
            }
        }
    }
}

impl std::fmt::Display for TrainedPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// The federation's order of round kinds: its first `popularity_releases` adapter versions
/// come from popularity releases, the next from one pooling selection (if asked for), and
/// every later one from training. Kinds the adapter cannot run are left out
/// ([`Self::for_adapter`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    pub popularity_releases: u32,
    pub pooling_selection: bool,
}

impl Schedule {
    /// This schedule less the kinds `manifest` cannot run.
    pub fn for_adapter(self, manifest: &AdapterManifest) -> Self {
        let can = |kind: RoundKind| kind.unsupported_by(manifest).is_none();
        Self {
            popularity_releases: if can(RoundKind::PopularityRelease) { self.popularity_releases } else { 0 },
            pooling_selection: self.pooling_selection && can(RoundKind::PoolingSelection),
        }
    }

    /// The kind of the round that would follow adapter version `version` (version 0 is
    /// the federation's start).
    pub fn kind_after(&self, version: u64) -> RoundKind {
        let releases = u64::from(self.popularity_releases);
        if version < releases {
            RoundKind::PopularityRelease
        } else if self.pooling_selection && version == releases {
            RoundKind::PoolingSelection
        } else {
            RoundKind::Training
        }
    }

    /// The rounds before the first training round.
    pub fn statistic_rounds(&self) -> u64 {
        u64::from(self.popularity_releases) + u64::from(self.pooling_selection)
    }

    /// The kinds of the first `rounds` rounds, in order.
    pub fn plan(&self, rounds: u64) -> impl Iterator<Item = RoundKind> + '_ {
        (0..rounds).map(|v| self.kind_after(v))
    }

    /// How many of the first `rounds` rounds are of `kind`.
    pub fn count(&self, kind: RoundKind, rounds: u64) -> u64 {
        self.plan(rounds).filter(|&k| k == kind).count() as u64
    }

    /// The adapter version the (first) round of `kind` commits, if the schedule has one.
    pub fn version_of(&self, kind: RoundKind) -> Option<u64> {
        match kind {
            RoundKind::PopularityRelease => (self.popularity_releases > 0).then_some(1),
            RoundKind::PoolingSelection => {
                self.pooling_selection.then(|| u64::from(self.popularity_releases) + 1)
            }
            RoundKind::Training => Some(self.statistic_rounds() + 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{RoundKind, Schedule, TrainedPart};
    use crate::domain::AdapterManifest;
    use crate::tower::TowerShape;

    #[test]
    fn releases_come_first_then_the_selection_then_training() {
        let s = Schedule { popularity_releases: 2, pooling_selection: true };
        let plan: Vec<RoundKind> = s.plan(5).collect();
        use RoundKind::*;
        assert_eq!(plan, [PopularityRelease, PopularityRelease, PoolingSelection, Training, Training]);
        assert_eq!(s.statistic_rounds(), 3);
        assert_eq!(
            (s.count(PopularityRelease, 5), s.count(PoolingSelection, 5), s.count(Training, 5)),
            (2, 1, 2)
        );
        assert_eq!(s.version_of(PopularityRelease), Some(1));
        assert_eq!(s.version_of(PoolingSelection), Some(3));
        assert_eq!(s.version_of(Training), Some(4));
        // Without releases the selection is the first round; with neither, training is.
        let selection_only = Schedule { popularity_releases: 0, pooling_selection: true };
        assert_eq!(selection_only.plan(2).collect::<Vec<_>>(), [PoolingSelection, Training]);
        assert_eq!(selection_only.version_of(PopularityRelease), None);
        assert_eq!(Schedule::default().plan(2).collect::<Vec<_>>(), [Training, Training]);
    }

    #[test]
    fn an_adapter_runs_only_the_kinds_it_supports() {
        let s = Schedule { popularity_releases: 2, pooling_selection: true };
        let with_prior = AdapterManifest::sequence_tower([0; 32], TowerShape::tiny(10), 0);
        assert_eq!(s.for_adapter(&with_prior), s);
        let plain = AdapterManifest::sequence_tower([0; 32], TowerShape::tiny(0), 0);
        assert_eq!(s.for_adapter(&plain), Schedule::default());
        for kind in RoundKind::ALL {
            assert_eq!(kind.unsupported_by(&with_prior), None, "{kind}");
            assert_eq!(kind.unsupported_by(&plain).is_none(), kind.trains(), "{kind}");
        }
    }

    #[test]
    fn the_pooling_part_is_the_coordinates_a_selection_sets() {
        let tower = AdapterManifest::sequence_tower([0; 32], TowerShape::tiny(10), 0);
        let (recency, weight) = tower.selection_ranges().expect("a tower with a prior");
        let ranges = TrainedPart::Pooling.ranges(&tower).expect("the pooling part");
        assert_eq!(ranges, vec![recency.clone(), weight..weight + 1]);
        assert_eq!(TrainedPart::Whole.ranges(&tower), None);
        let plain = AdapterManifest::sequence_tower([0; 32], TowerShape::tiny(0), 0);
        assert!(TrainedPart::Pooling.unsupported_by(&plain).is_some());
        assert_eq!(TrainedPart::Whole.unsupported_by(&plain), None);
    }
}
