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
    /// Every trained value but the sequence tower's statistics (the popularity histogram and
    /// the item-to-item counts): a federation whose popularity releases sum every merchant's
    /// statistics once (`rounds.popularity_release.partition`) trains the rest without
    /// adding them again, and its training rounds carry the weights alone (a fifth of the
    /// default tower's coordinates).
    Weights,
}

impl TrainedPart {
    /// Lower-case words for logs and messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Whole => "the whole adapter",
            Self::Pooling => "the pooling and prior weight",
            Self::Weights => "the weights without the statistics",
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
            Self::Weights => manifest
                .accumulated_range()
                .is_none()
                .then_some("the adapter has no statistics to leave out of its training"),
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
            Self::Weights => {
                let statistics = manifest.accumulated_range()?;
                let dimension = manifest.parameter_count();
                let ranges: Vec<_> = [0..statistics.start, statistics.end..dimension]
                    .into_iter()
                    .filter(|r| !r.is_empty())
                    .collect();
                Some(ranges)
            }
        }
    }
}

impl std::fmt::Display for TrainedPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// The adapter coordinates a round sums: its SecAgg+ vector, its noise and its privacy cost
/// cover their concatenation, in order, and nothing else. A training round sums what it
/// trains (the whole adapter, or its [`TrainedPart`]); a popularity release the statistics
/// (the popularity histogram and the item-to-item counts); a pooling selection the scores of
/// the public grid's settings, which it carries in the adapter's first coordinates. The
/// client and the coordinator derive it from the task alone (its kind, trained part and
/// manifest, all covered by the task digest), so the wire carries no list of ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SummedCoordinates {
    /// Sorted, disjoint, non-empty ranges of the adapter's flat vector.
    ranges: Vec<std::ops::Range<usize>>,
    /// Where each range starts in the summed vector.
    starts: Vec<usize>,
    len: usize,
    dimension: usize,
}

impl SummedCoordinates {
    /// What a round of `kind` training `trained` sums of `manifest`'s adapter.
    #[allow(clippy::single_range_in_vec_init, reason = "a list of ranges that holds one")]
    pub fn of(kind: RoundKind, trained: TrainedPart, manifest: &AdapterManifest) -> Self {
        let dimension = manifest.parameter_count();
        let ranges = match kind {
            RoundKind::Training => trained.ranges(manifest),
            RoundKind::PopularityRelease => manifest.accumulated_range().map(|r| vec![r]),
            RoundKind::PoolingSelection => {
                manifest.selection_ranges().map(|_| vec![0..crate::tower::SELECTION_SETTINGS.min(dimension)])
            }
        };
        Self::new(ranges.unwrap_or_else(|| vec![0..dimension]), dimension)
    }

    fn new(mut ranges: Vec<std::ops::Range<usize>>, dimension: usize) -> Self {
        ranges.retain(|r| !r.is_empty() && r.end <= dimension);
        ranges.sort_by_key(|r| r.start);
        let mut merged: Vec<std::ops::Range<usize>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        let mut starts = Vec::with_capacity(merged.len());
        let mut len = 0;
        for r in &merged {
            starts.push(len);
            len += r.len();
        }
        Self { ranges: merged, starts, len, dimension }
    }

    /// How many coordinates the round sums: the length of its vector before padding.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The adapter's whole dimension.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Whether the round sums every coordinate of the adapter.
    pub fn is_whole(&self) -> bool {
        self.len == self.dimension
    }

    /// The summed ranges of the adapter's flat vector.
    pub fn ranges(&self) -> &[std::ops::Range<usize>] {
        &self.ranges
    }

    /// Where adapter coordinate `index` sits in the summed vector, if the round sums it.
    pub fn position(&self, index: usize) -> Option<usize> {
        let i = self.ranges.partition_point(|r| r.end <= index);
        let r = self.ranges.get(i)?;
        r.contains(&index).then(|| self.starts[i] + (index - r.start))
    }

    /// The summed coordinates of a vector over the whole adapter.
    pub fn gather<T: Copy>(&self, full: &[T]) -> Vec<T> {
        self.ranges.iter().flat_map(|r| full.get(r.clone()).unwrap_or_default().iter().copied()).collect()
    }

    /// A summed vector placed back over the whole adapter, zero elsewhere.
    pub fn scatter(&self, summed: &[f64]) -> Vec<f64> {
        let mut full = vec![0.0; self.dimension];
        for (r, &start) in self.ranges.iter().zip(&self.starts) {
            if let Some(values) = summed.get(start..start + r.len()) {
                full[r.clone()].copy_from_slice(values);
            }
        }
        full
    }
}

impl crate::domain::RoundTask {
    /// The coordinates this task's round sums ([`SummedCoordinates::of`]).
    pub fn summed(&self) -> SummedCoordinates {
        SummedCoordinates::of(self.training.kind, self.training.trained, &self.manifest)
    }
}

/// The members of part `part` (of `parts`) of a partitioned release among `merchant_ids`
/// (the federation's eligible merchants), as indices into it: the merchants are ordered by
/// SHA-256 over a domain tag, the federation and the id, and the `i`-th of `parts` runs of
/// that order is part `i`. The parts of one set of merchants are disjoint, cover it and
/// differ in size by at most one; the order is fixed by the ids alone, so a merchant cannot
/// choose its part without choosing another id. (A merchant that joins between two of the
/// releases shifts the runs' bounds: a neighbour in the order may then be summed twice or
/// not at all.)
pub fn release_part(federation_id: &[u8; 16], merchant_ids: &[&str], part: u32, parts: u32) -> Vec<usize> {
    use sha2::{Digest, Sha256};
    let (part, parts) = (part as usize, parts.max(1) as usize);
    if part >= parts {
        return Vec::new();
    }
    let key = |id: &str| -> [u8; 32] {
        Sha256::new()
            .chain_update(b"guild release partition v1\0")
            .chain_update(federation_id)
            .chain_update(id.as_bytes())
            .finalize()
            .into()
    };
    let mut order: Vec<([u8; 32], usize)> =
        merchant_ids.iter().enumerate().map(|(i, id)| (key(id), i)).collect();
    order.sort_unstable();
    let n = order.len();
    let mut members: Vec<usize> =
        order[part * n / parts..(part + 1) * n / parts].iter().map(|&(_, i)| i).collect();
    members.sort_unstable();
    members
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

    /// The adapter version the first training round commits (the statistic rounds' come
    /// before it).
    pub fn first_training_version(&self) -> u64 {
        self.statistic_rounds() + 1
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
            RoundKind::Training => Some(self.first_training_version()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{RoundKind, Schedule, SummedCoordinates, TrainedPart, release_part};
    use crate::domain::AdapterManifest;
    use crate::tower::TowerShape;

    /// Known answer, computed independently with Python's hashlib (the ids sorted by
    /// `sha256(b"guild release partition v1\0" + bytes([7]*16) + id)`, cut into runs of
    /// `i*n//parts`): the parts are fixed by the federation and the ids alone.
    #[test]
    fn a_release_partition_is_fixed_by_the_federation_and_the_ids() {
        let ids = ["merchant-001", "merchant-002", "merchant-003", "shop-42", "shop-7"];
        let parts: Vec<Vec<usize>> = (0..2).map(|p| release_part(&[7u8; 16], &ids, p, 2)).collect();
        expect_test::expect!["[[0, 3], [1, 2, 4]]"].assert_eq(&format!("{parts:?}"));
        assert_eq!(
            release_part(&[7u8; 16], &ids, 0, 1),
            vec![0, 1, 2, 3, 4],
            "one part holds every merchant"
        );
        assert!(release_part(&[7u8; 16], &ids, 2, 2).is_empty(), "no part past the last");
    }

    /// The parts of one set of merchants are disjoint, cover it, and differ in size by at
    /// most one, whatever the set's order.
    #[test]
    fn release_parts_split_the_merchants_evenly_and_once() {
        let owned: Vec<String> = (0..508).map(|i| format!("merchant-{i:03}")).collect();
        let mut ids: Vec<&str> = owned.iter().map(String::as_str).collect();
        for parts in [1, 3, 10, 20] {
            let mut seen = vec![0u32; ids.len()];
            let mut sizes = Vec::new();
            for part in 0..parts {
                let members = release_part(&[3u8; 16], &ids, part, parts);
                sizes.push(members.len());
                members.iter().for_each(|&i| seen[i] += 1);
            }
            assert!(seen.iter().all(|&c| c == 1), "{parts} parts: each merchant in exactly one");
            let (min, max) = (sizes.iter().min().expect("parts"), sizes.iter().max().expect("parts"));
            assert!(max - min <= 1, "{parts} parts: sizes {sizes:?}");
        }
        // The same merchants in another order: the same parts.
        let before: Vec<&str> = release_part(&[3u8; 16], &ids, 4, 10).iter().map(|&i| ids[i]).collect();
        ids.reverse();
        let mut after: Vec<&str> = release_part(&[3u8; 16], &ids, 4, 10).iter().map(|&i| ids[i]).collect();
        after.sort_unstable();
        let mut before = before;
        before.sort_unstable();
        assert_eq!(before, after);
    }

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

    #[test]
    fn the_weights_are_every_coordinate_but_the_statistics() {
        let tower = AdapterManifest::sequence_tower([0; 32], TowerShape::tiny(10), 0);
        let (d, statistics) = (tower.parameter_count(), tower.accumulated_range().expect("a prior"));
        let weights = SummedCoordinates::of(RoundKind::Training, TrainedPart::Weights, &tower);
        let release = SummedCoordinates::of(RoundKind::PopularityRelease, TrainedPart::Whole, &tower);
        // Together a training round of the weights and a release sum each coordinate once.
        assert_eq!(weights.len() + release.len(), d);
        for i in 0..d {
            assert_eq!(weights.position(i).is_some(), !statistics.contains(&i), "coordinate {i}");
            assert_ne!(weights.position(i).is_some(), release.position(i).is_some(), "coordinate {i}");
        }
        let plain = AdapterManifest::sequence_tower([0; 32], TowerShape::tiny(0), 0);
        assert!(TrainedPart::Weights.unsupported_by(&plain).is_some());
        assert_eq!(TrainedPart::Weights.ranges(&plain), None);
    }

    #[test]
    fn each_kind_sums_its_own_coordinates_and_they_go_back_where_they_came_from() {
        let tower = AdapterManifest::sequence_tower([0; 32], TowerShape::tiny(10), 0);
        let d = tower.parameter_count();
        let whole = SummedCoordinates::of(RoundKind::Training, TrainedPart::Whole, &tower);
        assert!(whole.is_whole() && whole.len() == d);
        let release = SummedCoordinates::of(RoundKind::PopularityRelease, TrainedPart::Whole, &tower);
        let statistics = tower.accumulated_range().expect("a prior");
        assert_eq!(release.ranges(), std::slice::from_ref(&statistics));
        let selection = SummedCoordinates::of(RoundKind::PoolingSelection, TrainedPart::Whole, &tower);
        let grid = 0..crate::tower::SELECTION_SETTINGS;
        assert_eq!(selection.ranges(), std::slice::from_ref(&grid));
        let pooling = SummedCoordinates::of(RoundKind::Training, TrainedPart::Pooling, &tower);
        let (recency, weight) = tower.selection_ranges().expect("a prior");
        assert_eq!(pooling.len(), recency.len() + 1);
        // Positions follow the adapter's order; coordinates outside have none.
        let (first, second) =
            if weight < recency.start { (weight, recency.start) } else { (recency.start, weight) };
        assert_eq!(pooling.position(first), Some(0));
        assert_eq!(pooling.position(second), Some(if first == weight { 1 } else { recency.len() }));
        assert_eq!(pooling.position(d - 1).is_some(), weight == d - 1 || recency.contains(&(d - 1)));
        assert_eq!(release.position(statistics.start - 1), None);
        assert_eq!(release.position(d), None);
        // Gathering then scattering keeps the summed coordinates and zeroes the rest.
        let full: Vec<f64> = (0..d).map(|i| i as f64 + 1.0).collect();
        for summed in [&whole, &release, &selection, &pooling] {
            let back = summed.scatter(&summed.gather(&full));
            for (i, (&b, &f)) in back.iter().zip(&full).enumerate() {
                assert_eq!(b, if summed.position(i).is_some() { f } else { 0.0 }, "coordinate {i}");
            }
        }
        // An adapter without the statistics or the selection sums everything.
        let plain = AdapterManifest::sequence_tower([0; 32], TowerShape::tiny(0), 0);
        for kind in RoundKind::ALL {
            assert!(SummedCoordinates::of(kind, TrainedPart::Whole, &plain).is_whole(), "{kind}");
        }
    }
}
