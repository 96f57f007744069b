//! The sequence-tower adapter family as data: its shape, the names and shapes of its
//! tensors in flat-vector order, and their initial values, drawn from a ChaCha20 stream
//! seeded with the federation's seed. The client builds its model from these, and the
//! coordinator (which links no tensor library) names the tensors in its manifest and
//! exports `initial + update` without running the model.
//!
//! What is federated is the offset from the initial values: adapter version 0 is all
//! zeros, which is the zero-shot tower (the item residual's B and the transformer's
//! output projection start at zero).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// The tower's shape, as it travels in manifests and as configuration files state it
/// (`[adapter.tower]`; every field has a default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TowerShape {
    /// h: size of the item vectors (the base model's embedding size).
    pub hidden: usize,
    /// L: items of a shopper's history the tower reads (most recent last).
    pub history: usize,
    /// Items whose mean is the zero-shot shopper vector (the initial pooling weights).
    pub zero_shot_items: usize,
    /// Rank of the item residual `v + (v·A)·B`.
    pub item_rank: usize,
    /// Width of the causal transformer (unused when `layers` is 0).
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    /// Items in the catalogue, when the tower carries a popularity prior over them (0: it
    /// does not). The prior is the federation's running, noised histogram of the items
    /// its shoppers interacted with ([`POPULARITY`]), accumulated by the coordinator rather
    /// than trained, and scored as `β · ln(1 + w_j / (κ·w̄))` ([`popularity_prior`]).
    pub catalogue: usize,
    /// M: title neighbours per item whose item-to-item counts the tower carries (0: none; a
    /// catalogue is needed). Item `i`'s neighbours are the `M` catalogue items whose title
    /// vectors are closest to its own by cosine (public: the titles and the base model are),
    /// and the federation sums, for each pair `(i, its j-th neighbour)`, how often shoppers
    /// went from one to the other ([`TRANSITIONS`]); the tower scores them as an
    /// item-to-item prior over a shopper's last items ([`transitions_prior_weights`]).
    pub neighbours: usize,
    /// Buckets per row of the item-pair count sketch (0: none). Without a sketch, each
    /// item's `M` neighbours are its nearest titles and the federation sums a count per
    /// (item, neighbour) pair. With one, the federation sums a count sketch of every pair
    /// of the catalogue instead ([`TRANSITIONS`] is then `[SKETCH_ROWS, pair_sketch]`, a
    /// power of two per row), and each item's neighbours are the `M` items the sketch
    /// estimates its shoppers went to most often ([`sketch_neighbours`]): collaborative
    /// neighbours, where title neighbours miss most of what shoppers buy together.
    pub pair_sketch: usize,
    /// Rank of the learned item-ID embeddings (0: none; a catalogue is needed): each item's
    /// own `[item_ids]` vector ([`ITEM_IDS`], zero at start), projected into the item space
    /// by [`ITEM_IDS_OUT`] and added to its adapted vector, `v' = v + (v·A)·B + e_i·P`.
    /// What the title vectors cannot say about an item and the counts do not reach (the
    /// transductive setting of UniSRec, KDD 2022), learned by the federation like the rest.
    pub item_ids: usize,
    /// Rank of the spectral item prior (0: none; a pair sketch is needed): each item's
    /// feature row from the top eigenvectors of the decoded item-to-item table
    /// ([`crate::spectral`]), and a candidate's prior `γ · F_c · Σ_j ρ^j F_{h_j}` over the
    /// shopper's last items ([`SPECTRAL_RECENCY`]), γ the tower's [`SPECTRAL_WEIGHT_TENSOR`]:
    /// related items the decoded neighbours do not name (post-processing of the summed
    /// sketch, so it costs no privacy). The same features also enter each item's adapted
    /// vector through a trained projection ([`SPECTRAL_IN`], zero at start).
    pub spectral: usize,
}

impl Default for TowerShape {
    /// Over all-MiniLM-L6-v2's 384-dimensional item vectors: L = 20, the mean of the last
    /// five at start, an item residual of rank 32, two transformer layers of width 128.
    fn default() -> Self {
        Self {
            hidden: 384,
            history: 20,
            zero_shot_items: 5,
            item_rank: 32,
            width: 128,
            layers: 2,
            heads: 4,
            catalogue: 0,
            neighbours: 0,
            pair_sketch: 0,
            item_ids: 0,
            spectral: 0,
        }
    }
}

impl TowerShape {
    /// A tiny tower over 16-dimensional item vectors, with no transformer layer, and a
    /// popularity histogram over `catalogue` items if that is not 0: what tests of the
    /// protocol need of a tower (a manifest, a flat vector), not a model.
    pub fn tiny(catalogue: usize) -> Self {
        Self {
            hidden: 16,
            history: 4,
            zero_shot_items: 2,
            item_rank: 2,
            width: 8,
            layers: 0,
            heads: 2,
            catalogue,
            neighbours: 0,
            pair_sketch: 0,
            item_ids: 0,
            spectral: 0,
        }
    }

    /// Checks the shape's consistency, naming the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        let problem = if self.hidden == 0 || self.history == 0 || self.item_rank == 0 {
            Some("hidden, history and item_rank must be at least 1".to_owned())
        } else if self.zero_shot_items == 0 || self.zero_shot_items > self.history {
            Some(format!("zero_shot_items must be in 1..={}", self.history))
        } else if self.layers > 0
            && (self.width == 0 || self.heads == 0 || !self.width.is_multiple_of(self.heads))
        {
            Some(format!("width {} must be a positive multiple of heads {}", self.width, self.heads))
        } else if self.neighbours > 0 && (self.catalogue == 0 || self.neighbours >= self.catalogue) {
            Some(format!(
                "neighbours {} needs a catalogue of more items (catalogue {})",
                self.neighbours, self.catalogue
            ))
        } else if self.pair_sketch > 0 && (self.neighbours == 0 || !self.pair_sketch.is_power_of_two()) {
            Some(format!(
                "pair_sketch {} must be a power of two, and needs neighbours to decode (neighbours {})",
                self.pair_sketch, self.neighbours
            ))
        } else if self.spectral > 0 && (self.pair_sketch == 0 || self.spectral + 1 >= self.catalogue) {
            Some(format!(
                "spectral {} needs a pair sketch (pair_sketch {}) and a catalogue of more items (catalogue {})",
                self.spectral, self.pair_sketch, self.catalogue
            ))
        } else if self.item_ids > 0 && self.catalogue == 0 {
            Some(format!("item_ids {} needs a catalogue (catalogue 0)", self.item_ids))
        } else if self.layers > 16
            || self.item_ids > 4096
            || self.spectral > MAX_SPECTRAL
            || self.neighbours > MAX_NEIGHBOURS
            || self.pair_sketch > MAX_SKETCH_BUCKETS
            || self.width > 4096
            || self.history > 512
            || self.item_rank > 4096
            || self.catalogue > MAX_CATALOGUE
        {
            Some("the tower is larger than any shape this build accepts".to_owned())
        } else {
            None
        };
        problem.map_or(Ok(()), Err)
    }
}

/// The largest catalogue a popularity prior may cover.
pub const MAX_CATALOGUE: usize = 1 << 22;

/// The most title neighbours per item an item-to-item prior may cover.
pub const MAX_NEIGHBOURS: usize = 256;

/// The most buckets per row a pair sketch may have.
pub const MAX_SKETCH_BUCKETS: usize = 1 << 22;

/// The largest rank of the spectral item prior.
pub const MAX_SPECTRAL: usize = 128;

/// Rows of the pair sketch: each pair is counted once in every row, and its estimate is the
/// least of its rows' buckets ([`sketch_estimate`]).
pub const SKETCH_ROWS: usize = 3;

/// Where the pair `(from, to)` falls in row `row` of a sketch of `buckets` buckets per row
/// (a power of two): its index in the sketch tensor's flat values. A fixed, public hash
/// (SplitMix64's finaliser of the row and the pair), so every party places and reads the
/// same buckets.
pub fn sketch_bucket(buckets: usize, row: usize, from: usize, to: usize) -> usize {
    let mut z = ((row as u64) << 56) ^ ((from as u64) << 28) ^ (to as u64);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    row * buckets + ((z >> 1) as usize & (buckets - 1))
}

/// The sketch's estimate of the pair `(from, to)`: a count-min sketch's (Cormode and
/// Muthukrishnan), the least of its rows' buckets. Every row's bucket holds the pair's count
/// plus the counts of the pairs that collide with it, so the least is the tightest; noise
/// added to the sum (DP, or the secure sum's rounding) shifts every estimate alike. On the
/// validation split (4,000 users, 64 neighbours, β_t = 0.2, `python/probe_sketch.py`) the
/// least of 3 × 2^20 buckets scored NDCG@10 0.0668 and of 3 × 2^19 0.0610, a signed count
/// sketch's median 0.0633 and 0.0585, title neighbours with exact counts 0.0552. (The median
/// instead of the least, over sums whose rounding left buckets at −1e-10, cost a federation
/// most of the sketch's gain.)
pub fn sketch_estimate(sketch: &[f32], buckets: usize, from: usize, to: usize) -> f32 {
    (0..SKETCH_ROWS).map(|row| sketch_cell(sketch, buckets, row, from, to)).fold(f32::INFINITY, f32::min)
}

/// The bucket of the pair `(from, to)` in row `row` of `sketch` (0 past its end), a −0 read
/// as +0 so that values order the same under `<` and `total_cmp`.
fn sketch_cell(sketch: &[f32], buckets: usize, row: usize, from: usize, to: usize) -> f32 {
    sketch.get(sketch_bucket(buckets, row, from, to)).copied().unwrap_or(0.0) + 0.0
}

/// Each catalogue item's `M = shape.neighbours` neighbours decoded from the pair sketch
/// `sketch` (the [`TRANSITIONS`] tensor's values when the shape has a `pair_sketch`): the `M`
/// other items with the largest estimates from it ([`sketch_estimate`]), largest first, ties
/// to the lower index, with those estimates: `catalogue × M` item indices and as many
/// estimates, item after item (empty for a shape without a sketch). A function of the sketch
/// alone (post-processing of a DP release costs no privacy), deterministic, so every merchant
/// and every `serve` decodes the same lists. `O(catalogue²)` reads of the first row, and the
/// other rows only where they can matter ([`decode_item`]): about 1.4 s of two cores for
/// 16,859 items, spread over `threads`.
pub fn sketch_neighbours(shape: &TowerShape, sketch: &[f32], threads: usize) -> (Vec<u32>, Vec<f32>) {
    let (n, m, buckets) = (shape.catalogue, shape.neighbours, shape.pair_sketch);
    if n == 0 || m == 0 || buckets == 0 || m >= n || sketch.len() != SKETCH_ROWS * buckets {
        return (Vec::new(), Vec::new());
    }
    let (mut lists, mut estimates) = (vec![0u32; n * m], vec![0f32; n * m]);
    let per = n.div_ceil(threads.max(1));
    std::thread::scope(|scope| {
        let parts = lists.chunks_mut(per * m).zip(estimates.chunks_mut(per * m));
        for (chunk, (lists, estimates)) in parts.enumerate() {
            scope.spawn(move || {
                let mut first = Vec::with_capacity(n);
                for (i, (list, estimate)) in lists.chunks_mut(m).zip(estimates.chunks_mut(m)).enumerate() {
                    decode_item(sketch, buckets, n, chunk * per + i, &mut first, list, estimate);
                }
            });
        }
    });
    (lists, estimates)
}

/// The order of decoded neighbours: the larger estimate first, ties to the lower index.
fn heavier_first(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Item `from`'s `list.len()` neighbours and their estimates, as [`sketch_neighbours`]
/// defines them, reading the rows past the first only where they can matter. An estimate is
/// the least of the pair's rows, so it is at most its first row's bucket. The `M` items
/// whose first-row buckets are largest have estimates whose least, `L`, bounds the `M`-th
/// largest estimate from below: an item below `L` in the first row cannot be among the `M`;
/// one above it is estimated in full; one at `L` can only tie at `L`, and then enters only
/// ahead of a tied item of a higher index. So the result is the exhaustive decoding's
/// exactly (a test holds the two together). A sparse sketch (one merchant's shoppers), most
/// of whose pairs tie at zero, costs about one read of the first row per pair: its ties are
/// filled by walking up from the lowest index, not by estimating every tied item in full
/// (which cost a local-only merchant's decoding 30 s instead of 2.6 s on two slow cores).
/// `first` is scratch space.
fn decode_item(
    sketch: &[f32],
    buckets: usize,
    n: usize,
    from: usize,
    first: &mut Vec<(f32, u32)>,
    list: &mut [u32],
    estimates: &mut [f32],
) {
    let m = list.len();
    let estimate = |to: u32| (sketch_estimate(sketch, buckets, from, to as usize), to);
    first.clear();
    first.extend(
        (0..n).filter(|&to| to != from).map(|to| (sketch_cell(sketch, buckets, 0, from, to), to as u32)),
    );
    first.select_nth_unstable_by(m - 1, heavier_first);
    let mut scored: Vec<(f32, u32)> = first[..m].iter().map(|&(_, to)| estimate(to)).collect();
    let bound = scored.iter().map(|s| s.0).fold(f32::INFINITY, f32::min);
    // Above the bound in the first row, or NaN there (it bounds nothing: `f32::min` skips it).
    scored.extend(first[m..].iter().filter(|&&(v, _)| v > bound || v.is_nan()).map(|&(_, to)| estimate(to)));
    let keep = |scored: &mut Vec<(f32, u32)>| {
        scored.select_nth_unstable_by(m - 1, heavier_first);
        scored.truncate(m);
    };
    keep(&mut scored);
    // Items at the bound in the first row tie with the kept items at the bound, if they
    // reach it, and come before those of higher indices.
    if let Some(last) = scored.iter().filter(|s| s.0 == bound).map(|s| s.1).max() {
        let at_bound = |&&(v, to): &&(f32, u32)| v == bound && to < last;
        if first[m..].iter().filter(at_bound).count() <= 2 * m {
            let tied: Vec<(f32, u32)> = first[m..]
                .iter()
                .filter(at_bound)
                .map(|&(_, to)| estimate(to))
                .filter(|s| s.0 == bound)
                .collect();
            if !tied.is_empty() {
                scored.extend(tied);
                keep(&mut scored);
            }
        } else {
            // Many ties (a sparse sketch, whose pairs mostly tie at zero): the places the
            // kept items above the bound leave go to the items estimated at the bound,
            // lowest index first, so walk the catalogue up from 0 and stop once they are
            // filled (by `last` at the latest: the kept items at the bound are such items).
            // An item below the bound in the first row is below it in the least too.
            scored.retain(|s| s.0 != bound);
            for to in (0..=last).filter(|&to| to as usize != from) {
                if scored.len() == m {
                    break;
                }
                if sketch_cell(sketch, buckets, 0, from, to as usize) < bound {
                    continue;
                }
                let scored_to = estimate(to);
                if scored_to.0 == bound {
                    scored.push(scored_to);
                }
            }
        }
    }
    scored.sort_by(heavier_first);
    for ((list, estimate), (e, to)) in list.iter_mut().zip(estimates.iter_mut()).zip(&scored) {
        (*list, *estimate) = (*to, *e);
    }
}

/// The item-to-item counts' tensor, `[catalogue, neighbours]`: entry `(i, j)` is the
/// federation's running, noised sum of how often shoppers went from item `i` to its `j`-th
/// title neighbour (transitions, and co-occurrence within a short window); with a
/// `pair_sketch`, a count sketch of those sums over every pair ([`transitions_shape`]). Like
/// [`POPULARITY`] it is summed by the coordinator, never trained, and starts at zero; its
/// name sorts right after it, so that the two are one range of the flat vector
/// ([`accumulated_range`]).
pub const TRANSITIONS: &str = "popularity_next";

/// The learned item-ID embeddings' tensor, `[catalogue, item_ids]`: zero at start, so that
/// the tower starts at the zero-shot ranking whatever [`ITEM_IDS_OUT`] holds.
pub const ITEM_IDS: &str = "item_ids";

/// The item-ID embeddings' projection into the item space, `[item_ids, hidden]`, drawn at
/// random (at zero, no gradient would reach either).
pub const ITEM_IDS_OUT: &str = "item_ids_out";

/// β_t's tensor, `[1]`, in a tower with item-to-item counts: the weight of the item-to-item
/// prior in cosine units. A candidate's prior is `β_t · Σ_k r_k · ln(1 + v_{h_k,c} / (κ·v̄))`
/// over the shopper's last items `h_k` (weights [`TRANSITIONS_RECENCY`]), `v` the
/// thresholded counts as in [`popularity_prior`], 0 for a candidate that is not among
/// `h_k`'s neighbours. It starts at [`TRANSITIONS_WEIGHT`] and no gradient reaches it (the
/// training loss leaves the prior out: with it in, a tower's rows whose own pairs are in the
/// counts teach it to lean on them): a trained tower's β_t is chosen on validation
/// ([`with_transitions_weight`]), since a tower that learned more of the collaborative signal
/// itself wants less of the prior.
pub const TRANSITIONS_WEIGHT_TENSOR: &str = "transitions_weight";

/// β_t's initial value. Chosen on the validation split over the zero-shot ranker with the
/// popularity prior (`python/probe_transitions.py`).
pub const TRANSITIONS_WEIGHT: f64 = 0.2;

/// The values of β_t a trained tower's choice on validation tries
/// ([`with_transitions_weight`]), [`TRANSITIONS_WEIGHT`] among them.
pub const TRANSITIONS_WEIGHTS: [f64; 7] = [0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3];

/// γ's tensor, `[1]`, in a tower with a spectral item prior ([`TowerShape::spectral`]): the
/// prior's weight in cosine units. It starts at zero (the start ranks as it would without
/// the prior) and, like β_t, no gradient reaches it: a trained tower's γ is chosen on
/// validation ([`with_spectral_weight`], [`SPECTRAL_WEIGHTS`]).
pub const SPECTRAL_WEIGHT_TENSOR: &str = "spectral_weight";

/// The spectral features' projection into the item space, `[spectral, hidden]`, in a tower
/// with a spectral prior: each item's feature row `F_i` (computed from the decoded table,
/// never sent) times it is added to the item's adapted vector, `v' = v + (v·A)·B [+ e_i·P] +
/// F_i·S`, so that the history and the candidates carry the items' collaborative position
/// through a few thousand values every merchant trains (where an item's own ID row moves only
/// with the merchants that sold it). Zero at start: the tower starts at the zero-shot ranking.
pub const SPECTRAL_IN: &str = "spectral_in";

/// The values of γ a tower's choice on validation tries besides its own (four: each costs
/// the choice a scoring of its users). Over the untrained
/// exact counts (`python/probe_spectral.py`, validation NDCG@10 of 4,000 users, k = 32) γ =
/// 0.2 / 0.4 / 0.8 scored 0.0773 / 0.0777 / 0.0753 against 0.0720 without; on a trained
/// federated tower 0.1 / 0.2 / 0.3 scored 0.0759 / 0.0751 / 0.0725 against 0.0749.
pub const SPECTRAL_WEIGHTS: [f64; 4] = [0.05, 0.1, 0.2, 0.4];

/// The weights of a shopper's last items on the shopper side of the spectral prior, most
/// recent first: `0.6^j` over the last five (`python/probe_spectral.py`'s `recency_sum`).
pub const SPECTRAL_RECENCY: [f64; 5] = [1.0, 0.6, 0.36, 0.216, 0.1296];

/// The weights of a shopper's last items in the item-to-item prior, most recent first.
pub const TRANSITIONS_RECENCY: [f64; 3] = [1.0, 0.5, 0.25];

/// In item-to-item counts, a transition (the previous item to the next) counts 1.
pub const TRANSITION_WEIGHT: f32 = 1.0;
/// Two items within [`CO_OCCURRENCE_WINDOW`] positions of each other count this much, in
/// both directions (a transition is also a co-occurrence).
pub const CO_OCCURRENCE_WEIGHT: f32 = 0.3;
/// The co-occurrence window: items at most this many positions apart.
pub const CO_OCCURRENCE_WINDOW: usize = 3;

/// The item-to-item statistic's tensor shape: `[catalogue, neighbours]` counts over title
/// neighbours, or the `[SKETCH_ROWS, pair_sketch]` count sketch of every pair.
pub fn transitions_shape(shape: &TowerShape) -> Vec<usize> {
    if shape.pair_sketch > 0 {
        vec![SKETCH_ROWS, shape.pair_sketch]
    } else {
        vec![shape.catalogue, shape.neighbours]
    }
}

/// The flat-vector range of the item-to-item counts, if the tower has them.
pub fn transitions_range(shape: &TowerShape) -> Option<std::ops::Range<usize>> {
    tensor_range(shape, TRANSITIONS)
}

/// The flat-vector range the coordinator sums rather than trains: the popularity histogram
/// and, right after it, the item-to-item counts (if the tower has them).
pub fn accumulated_range(shape: &TowerShape) -> Option<std::ops::Range<usize>> {
    let popularity = popularity_range(shape)?;
    Some(match transitions_range(shape) {
        Some(transitions) => {
            debug_assert_eq!(transitions.start, popularity.end, "the two sort next to each other");
            popularity.start..transitions.end
        }
        None => popularity,
    })
}

/// The popularity histogram's tensor: one value per catalogue item, starting at zero. The
/// coordinator adds each round's mean contribution to it (it is a running sum, whatever
/// the server optimiser), and clients never train it.
pub const POPULARITY: &str = "popularity";

/// The popularity prior's weight β, in cosine units (trained like any other tensor).
pub const POPULARITY_WEIGHT: &str = "popularity_weight";

/// β's initial value: 0.05 (β/τ = 1 at τ = 0.05), chosen with κ and the recency weight γ
/// on the validation split over the zero-shot tower, for the exact histogram and for one
/// with the noise of a shopper-level release at ε = 3 (`python/probe_popularity.py
/// --sweep`): at γ = 0.5 and κ = 1, β = 0.04, 0.05 and 0.06 scored NDCG@10 0.0358, 0.0376
/// and 0.0377 (exact) and 0.0372, 0.0375 and 0.0365 (release noise).
pub const POPULARITY_WEIGHT_INIT: f64 = 0.05;

/// κ: the prior is `ln(1 + w_j / (κ·w̄))`, with `w` the histogram clamped at zero and `w̄`
/// its mean. κ = 1 flattens the prior of the most popular items relative to the rest, and
/// keeps a noisy histogram's prior close to the exact one's: on the validation split (6,000
/// users, start 0.0277), with equal weights over a shopper's items, κ = 1 and β = 0.05
/// scored NDCG@10 0.0359 (exact) and 0.0360 (with release noise z = 1.64) against 0.0355
/// and 0.0348 for κ = 0.1 and β = 0.04, the values before.
pub const POPULARITY_SMOOTHING: f64 = 1.0;

/// γ: a shopper's contribution weighs its `k`-th most recent training item by `γ^k`
/// (`k = 0` for the latest, repeats summed) before it is scaled to a unit vector, so the
/// histogram leans towards what shoppers turn to now. On the validation split, with β and κ
/// as above, γ = 0.5 scored NDCG@10 0.0376 (exact) and 0.0375 (release noise z = 1.64)
/// against 0.0359 and 0.0360 for equal weights (`python/probe_popularity.py --sweep`).
pub const POPULARITY_RECENCY: f64 = 0.5;

/// The share of the clip norm a contribution gives the popularity histogram: a shopper's
/// (or merchant's) contribution is `c·φ` times a unit vector over the items it interacted
/// with, and its trained update is clipped to `c·√(1−φ²)`, so the whole stays within `c`.
pub const POPULARITY_SHARE: f64 = std::f64::consts::FRAC_1_SQRT_2;

/// The probability that a summed statistic that is all noise keeps any entry at all
/// ([`noise_threshold`]): 10⁻³ per tensor, as the server's James–Stein gate moves a block of
/// pure noise (`guild_privacy::dp::shrinkage::SIGNAL_THRESHOLD`).
pub const STATISTIC_FALSE_KEEP: f64 = 1e-3;

/// Entries of a summed statistic of `entries` coordinates (the histogram, the item-to-item
/// counts) below this many noise deviations count as nothing, so that a sum that is all
/// noise gives no prior: `Φ⁻¹(1 − α/d)` with α = [`STATISTIC_FALSE_KEEP`], the level the
/// largest of `d` standard normals passes with probability at most α (5.30 for the
/// 16,859-item histogram, 6.01 for its 16,859 × 64 counts; 3.09 for a single entry). One
/// entry of noise that passes is no small error: the `ln(1 + v/(κ·v̄))` transform divides
/// by the mean of what is kept, so a lone survivor
/// scores about `ln d` (10 to 14) times its weight, above any cosine, for every shopper. The
/// universal threshold `√(2 ln d)` (Donoho and Johnstone; 4.41 and 5.27 here) let one
/// through with probability about 8% per tensor and refresh, and a merchant-level DP run
/// fell to 0.0044 below zero-shot that way; a fixed 3σ̂ keeps about 0.13% of the entries.
pub fn noise_threshold(entries: usize) -> f64 {
    guild_privacy::dp::max_normal_quantile(entries, STATISTIC_FALSE_KEEP)
}

/// The level, in noise deviations, above which the item-to-item counts keep an entry once
/// significantly more of their entries pass it than noise alone would ([`counts_threshold`]).
/// Lower than the histogram's [`noise_threshold`] because an entry of noise costs far less
/// there: it raises one neighbour of one item, for the shoppers with that item among their
/// last three, where one in the histogram raises an item for every shopper. Chosen on the
/// validation split (`python/probe_noisy_statistics.py`, 4,000 users, the ε = 3 release's
/// noise, three draws): 0.0401 against 0.0375 at the strict 6.01 (with [`COUNTS_SHARE`]).
pub const COUNTS_NOISE_THRESHOLD: f64 = 3.5;

/// The share of a shopper's squared statistics norm that its item-to-item counts get when
/// it has both counts and a histogram contribution (the histogram gets the rest; either
/// alone gets it all): the counts are what the release's noise destroys most, and they
/// carry the most. Chosen on the validation split with [`COUNTS_NOISE_THRESHOLD`] (an
/// even split scored 0.0392 there).
pub const COUNTS_SHARE: f64 = 0.8;

/// How many of `entries` counts pure noise puts above [`COUNTS_NOISE_THRESHOLD`] deviations
/// except once in a thousand ([`STATISTIC_FALSE_KEEP`]; 301 of 16,859 × 64).
pub fn counts_noise_exceedances(entries: usize) -> u64 {
    guild_privacy::dp::noise_exceedances(entries, COUNTS_NOISE_THRESHOLD, STATISTIC_FALSE_KEEP)
}

/// The threshold, in noise deviations, of item-to-item counts of `entries` entries of which
/// `exceeding` lie above [`COUNTS_NOISE_THRESHOLD`]·σ̂: that level when more do than
/// [`counts_noise_exceedances`], else the strict [`noise_threshold`]. Counts that are all
/// noise keep an entry at most twice in a thousand (the test's false pass, then the strict
/// level's), as the histogram's do once; counts with signal keep what lies between the two.
pub fn counts_threshold(entries: usize, exceeding: u64) -> f64 {
    if exceeding > counts_noise_exceedances(entries) {
        COUNTS_NOISE_THRESHOLD
    } else {
        noise_threshold(entries)
    }
}

/// The prior of each item from the popularity histogram `w` (any scale: it is divided by
/// its mean): `ln(1 + v_j / (κ·v̄))` with `v_j = max(w_j − t·σ̂, 0)`, `t` the
/// [`noise_threshold`] of its length, all zeros while the histogram is (so a fresh tower
/// ranks exactly as zero-shot).
///
/// σ̂ is the noise's deviation, estimated from the histogram itself: every contribution is
/// non-negative, so its negative entries are noise, and for noise symmetric about zero
/// `σ̂² = mean(w_j²)` over them (0 when none is negative, as in a non-private federation).
/// Without the threshold a DP histogram's thousands of never-seen items would get priors
/// from their noise alone, half of them comparable to popular items'.
pub fn popularity_prior(histogram: &[f32]) -> Vec<f32> {
    statistic_log(histogram, noise_deviation(histogram), noise_threshold(histogram.len()))
}

/// The item-to-item counts' prior values `ln(1 + v / (κ·v̄))`, `v = max(w − t·σ̂, 0)`, as
/// [`popularity_prior`] but at the counts' threshold `t` ([`counts_threshold`], by how many
/// of them exceed [`COUNTS_NOISE_THRESHOLD`]·σ̂): all zeros while the counts are.
pub fn counts_log(counts: &[f32]) -> Vec<f32> {
    let sigma = noise_deviation(counts);
    let level = COUNTS_NOISE_THRESHOLD * sigma;
    let exceeding = counts.iter().filter(|&&w| f64::from(w) > level).count();
    statistic_log(counts, sigma, counts_threshold(counts.len(), exceeding as u64))
}

/// σ̂ of a summed statistic whose contributions are all non-negative: the root mean square
/// of its negative entries (noise), 0 when none is negative.
fn noise_deviation(sum: &[f32]) -> f64 {
    let negatives: Vec<f64> = sum.iter().map(|&w| f64::from(w)).filter(|&w| w < 0.0).collect();
    if negatives.is_empty() {
        return 0.0;
    }
    (negatives.iter().map(|w| w * w).sum::<f64>() / negatives.len() as f64).sqrt()
}

/// `ln(1 + v / (κ·v̄))` with `v = max(w − threshold·σ̂, 0)`: all zeros when nothing is kept.
fn statistic_log(sum: &[f32], sigma: f64, threshold: f64) -> Vec<f32> {
    let kept: Vec<f64> = sum.iter().map(|&w| (f64::from(w) - threshold * sigma).max(0.0)).collect();
    let mean = kept.iter().sum::<f64>() / kept.len().max(1) as f64;
    if mean <= 0.0 {
        return vec![0.0; sum.len()];
    }
    kept.iter().map(|v| (v / (POPULARITY_SMOOTHING * mean)).ln_1p() as f32).collect()
}

/// The flat-vector range of the popularity histogram, if the tower has one.
pub fn popularity_range(shape: &TowerShape) -> Option<std::ops::Range<usize>> {
    tensor_range(shape, POPULARITY)
}

/// The flat-vector range of the tensor `name`, if the tower has it.
pub fn tensor_range(shape: &TowerShape, name: &str) -> Option<std::ops::Range<usize>> {
    let mut start = 0;
    for t in tensors(shape) {
        if t.name == name {
            return Some(start..start + t.len());
        }
        start += t.len();
    }
    None
}

/// The weight β_t of the item-to-item prior that `offset` (a tower's offset from its
/// initial values) holds; `None` for a tower without item-to-item counts.
pub fn transitions_weight_in(shape: &TowerShape, offset: &[f32]) -> Option<f64> {
    let at = tensor_range(shape, TRANSITIONS_WEIGHT_TENSOR)?.start;
    Some(f64::from(*offset.get(at)?) + TRANSITIONS_WEIGHT)
}

/// `offset` with the item-to-item prior's weight β_t set to `weight`, every other value
/// kept; `None` for a tower without item-to-item counts (or an offset too short for one).
pub fn with_transitions_weight(shape: &TowerShape, offset: &[f32], weight: f64) -> Option<Vec<f32>> {
    let at = tensor_range(shape, TRANSITIONS_WEIGHT_TENSOR)?.start;
    let mut values = offset.to_vec();
    *values.get_mut(at)? = (weight - TRANSITIONS_WEIGHT) as f32;
    Some(values)
}

/// The spectral prior's weight γ that `offset` holds; `None` for a tower without one.
pub fn spectral_weight_in(shape: &TowerShape, offset: &[f32]) -> Option<f64> {
    let at = tensor_range(shape, SPECTRAL_WEIGHT_TENSOR)?.start;
    Some(f64::from(*offset.get(at)?))
}

/// `offset` with the spectral prior's weight γ set to `weight`, every other value kept;
/// `None` for a tower without one (or an offset too short for one).
pub fn with_spectral_weight(shape: &TowerShape, offset: &[f32], weight: f64) -> Option<Vec<f32>> {
    let at = tensor_range(shape, SPECTRAL_WEIGHT_TENSOR)?.start;
    let mut values = offset.to_vec();
    *values.get_mut(at)? = weight as f32;
    Some(values)
}

/// The spectral feature rows of a tower with a spectral prior, `[catalogue, spectral]`
/// row-major ([`crate::spectral::features`]), from its decoded neighbours `lists` and their
/// estimated counts `estimates` (`[catalogue, neighbours]` each, [`sketch_neighbours`]):
/// the table is the counts' prior values ([`counts_log`]). Empty for a tower without one.
pub fn spectral_features(shape: &TowerShape, lists: &[u32], estimates: &[f32], threads: usize) -> Vec<f32> {
    if shape.spectral == 0
        || lists.len() != shape.catalogue * shape.neighbours
        || lists.len() != estimates.len()
    {
        return Vec::new();
    }
    let logs = counts_log(estimates);
    crate::spectral::features(shape.catalogue, shape.neighbours, lists, &logs, shape.spectral, threads)
}

/// The pooling decays a pooling selection scores: `Some(r)` weighs a shopper's `k`-th most
/// recent item `r^k` (normalised to sum to one over the `L` items), `None` is the tower's
/// start, the mean of the last `zero_shot_items`.
pub const SELECTION_DECAYS: [Option<f64>; 4] = [None, Some(0.8), Some(0.6), Some(0.4)];

/// The prior weights β a pooling selection scores with each decay.
pub const SELECTION_WEIGHTS: [f64; 3] = [0.035, 0.05, 0.07];

/// k, the settings a pooling selection scores: every decay with every weight.
pub const SELECTION_SETTINGS: usize = SELECTION_DECAYS.len() * SELECTION_WEIGHTS.len();

/// One setting of a pooling selection: the pooling weights (most recent item first, as the
/// `recency` tensor holds them) and the prior weight β.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolingSetting {
    pub recency: Vec<f32>,
    pub weight: f32,
}

/// The public grid a pooling selection scores, decay by decay ([`SELECTION_DECAYS`]) and,
/// within each, weight by weight ([`SELECTION_WEIGHTS`]). It is fixed here, not sent by
/// the coordinator, so a round cannot ask merchants for statistics of any other shape.
pub fn selection_grid(shape: &TowerShape) -> Vec<PoolingSetting> {
    let mut grid = Vec::with_capacity(SELECTION_SETTINGS);
    for decay in SELECTION_DECAYS {
        let recency = match decay {
            None => zero_shot_weights(shape.history, shape.zero_shot_items),
            Some(r) => {
                let raw: Vec<f64> = (0..shape.history).map(|k| r.powi(k as i32)).collect();
                let total: f64 = raw.iter().sum();
                raw.iter().map(|w| (w / total) as f32).collect()
            }
        };
        for weight in SELECTION_WEIGHTS {
            grid.push(PoolingSetting { recency: recency.clone(), weight: weight as f32 });
        }
    }
    grid
}

/// The index of the grid's setting that `offset` holds (its pooling weights and prior
/// weight within 1e-6 of the setting's), if any.
pub fn setting_of(shape: &TowerShape, offset: &[f32]) -> Option<usize> {
    let (recency, weight) = selection_ranges(shape)?;
    let (pooling, beta) = (offset.get(recency)?, *offset.get(weight)?);
    let start = zero_shot_weights(shape.history, shape.zero_shot_items);
    let close = |a: f32, b: f32| (a - b).abs() < 1e-6;
    selection_grid(shape).iter().position(|s| {
        close(beta + POPULARITY_WEIGHT_INIT as f32, s.weight)
            && pooling.iter().zip(&start).zip(&s.recency).all(|((o, i), w)| close(o + i, *w))
    })
}

/// Setting `index` of the grid in words: its pooling and its prior weight.
pub fn describe_setting(index: usize) -> String {
    let (decay, weight) = (index / SELECTION_WEIGHTS.len(), index % SELECTION_WEIGHTS.len());
    let pooling = match SELECTION_DECAYS.get(decay).copied().flatten() {
        Some(r) => format!("pooling decaying by {r} per item back"),
        None if decay < SELECTION_DECAYS.len() => {
            "the start's pooling (the mean of the last items)".to_owned()
        }
        None => return format!("no setting {index}"),
    };
    format!("setting {index}: {pooling}, prior weight β = {}", SELECTION_WEIGHTS[weight])
}

/// Where a pooling selection writes in the flat vector: the pooling weights' range and the
/// prior weight's index; `None` for a tower without a popularity prior.
pub fn selection_ranges(shape: &TowerShape) -> Option<(std::ops::Range<usize>, usize)> {
    let recency = tensor_range(shape, "recency")?;
    let weight = tensor_range(shape, POPULARITY_WEIGHT)?;
    Some((recency, weight.start))
}

/// The pooling weights and prior weight that `offset` holds (a trained tower's own, which
/// need not be on the grid), as a setting that [`with_setting`] puts back; `None` for a
/// tower without a popularity prior.
pub fn setting_in(shape: &TowerShape, offset: &[f32]) -> Option<PoolingSetting> {
    let (recency, weight) = selection_ranges(shape)?;
    let start = zero_shot_weights(shape.history, shape.zero_shot_items);
    let pooling = offset.get(recency)?;
    Some(PoolingSetting {
        recency: pooling.iter().zip(start).map(|(o, i)| o + i).collect(),
        weight: offset.get(weight)? + POPULARITY_WEIGHT_INIT as f32,
    })
}

/// `offset` (a tower's offset from its initial values) with the pooling weights and prior
/// weight of `setting` in place of its own, every other value kept; `None` for a tower
/// without a popularity prior or a setting of another history length. The initial
/// values of both tensors do not depend on the seed, so neither does this.
pub fn with_setting(shape: &TowerShape, offset: &[f32], setting: &PoolingSetting) -> Option<Vec<f32>> {
    let (recency, weight) = selection_ranges(shape)?;
    if setting.recency.len() != recency.len() || offset.len() <= weight || offset.len() < recency.end {
        return None;
    }
    let mut out = offset.to_vec();
    let start = zero_shot_weights(shape.history, shape.zero_shot_items);
    for ((o, s), i) in out[recency].iter_mut().zip(&setting.recency).zip(start) {
        *o = s - i;
    }
    out[weight] = setting.weight - POPULARITY_WEIGHT_INIT as f32;
    Some(out)
}

/// How a tensor starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    /// U(−b, b), b = 1/√fan_in: PyTorch's default for linear layers.
    Uniform {
        fan_in: usize,
    },
    Normal {
        stdev: f64,
    },
    /// The zero-shot pooling weights: 1/k for the k most recent items, 0 before them.
    ZeroShotWeights,
    Constant(f64),
}

/// One tensor of the tower.
#[derive(Clone, Debug, PartialEq)]
pub struct TowerTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl TowerTensor {
    fn new(name: impl Into<String>, shape: &[usize], init: Init) -> Self {
        Self { name: name.into(), shape: shape.to_vec(), init }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every tensor of the tower, in flat-vector order (sorted by name).
pub fn tensors(shape: &TowerShape) -> Vec<TowerTensor> {
    let (h, l, w, r) = (shape.hidden, shape.history, shape.width, shape.item_rank);
    let linear = |name: &str, out: usize, input: usize| {
        [
            TowerTensor::new(format!("{name}.bias"), &[out], Init::Uniform { fan_in: input }),
            TowerTensor::new(format!("{name}.weight"), &[out, input], Init::Uniform { fan_in: input }),
        ]
    };
    let norm = |name: &str| {
        [
            TowerTensor::new(format!("{name}.bias"), &[w], Init::Zeros),
            TowerTensor::new(format!("{name}.weight"), &[w], Init::Ones),
        ]
    };
    let mut all = Vec::new();
    for i in 0..shape.layers {
        let p = |part: &str| format!("block{i}.{part}");
        all.extend(norm(&p("attention_norm")));
        all.extend(linear(&p("attention_out"), w, w));
        all.extend(linear(&p("mlp_in"), 2 * w, w));
        all.extend(norm(&p("mlp_norm")));
        all.extend(linear(&p("mlp_out"), w, 2 * w));
        all.extend(linear(&p("qkv"), 3 * w, w));
    }
    if shape.layers > 0 {
        all.extend(linear("input", w, h));
    }
    all.push(TowerTensor::new("item_a", &[h, r], Init::Normal { stdev: 1.0 / (h as f64).sqrt() }));
    all.push(TowerTensor::new("item_b", &[r, h], Init::Zeros));
    if shape.layers > 0 {
        all.push(TowerTensor::new("output", &[w, h], Init::Zeros));
        // Row p: the p-th item of the window, oldest first (so that one causal pass over a
        // short history gives every prefix its own vector).
        all.push(TowerTensor::new("position", &[l, w], Init::Normal { stdev: 0.02 }));
    }
    all.push(TowerTensor::new("recency", &[l], Init::ZeroShotWeights));
    if shape.catalogue > 0 {
        all.push(TowerTensor::new(POPULARITY, &[shape.catalogue], Init::Zeros));
        all.push(TowerTensor::new(POPULARITY_WEIGHT, &[1], Init::Constant(POPULARITY_WEIGHT_INIT)));
        if shape.neighbours > 0 {
            all.push(TowerTensor::new(TRANSITIONS, &transitions_shape(shape), Init::Zeros));
            all.push(TowerTensor::new(TRANSITIONS_WEIGHT_TENSOR, &[1], Init::Constant(TRANSITIONS_WEIGHT)));
            if shape.spectral > 0 {
                all.push(TowerTensor::new(SPECTRAL_WEIGHT_TENSOR, &[1], Init::Zeros));
                all.push(TowerTensor::new(SPECTRAL_IN, &[shape.spectral, h], Init::Zeros));
            }
        }
        if shape.item_ids > 0 {
            all.push(TowerTensor::new(ITEM_IDS, &[shape.catalogue, shape.item_ids], Init::Zeros));
            let stdev = 1.0 / (shape.item_ids as f64).sqrt();
            all.push(TowerTensor::new(ITEM_IDS_OUT, &[shape.item_ids, h], Init::Normal { stdev }));
        }
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

/// The length of the tower's flat vector.
pub fn parameter_count(shape: &TowerShape) -> usize {
    tensors(shape).iter().map(TowerTensor::len).sum()
}

/// The pooling weights of the zero-shot ranker, most recent item first.
pub fn zero_shot_weights(history: usize, zero_shot_items: usize) -> Vec<f32> {
    (0..history).map(|j| if j < zero_shot_items { 1.0 / zero_shot_items as f32 } else { 0.0 }).collect()
}

/// The tower's initial values in flat-vector order, from a ChaCha20 stream seeded with
/// `seed` (tensor after tensor, in that order).
pub fn initial_values(shape: &TowerShape, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(parameter_count(shape));
    for t in tensors(shape) {
        let n = t.len();
        match t.init {
            Init::Zeros => out.extend(std::iter::repeat_n(0.0, n)),
            Init::Ones => out.extend(std::iter::repeat_n(1.0, n)),
            Init::Uniform { fan_in } => {
                let bound = 1.0 / (fan_in as f64).sqrt();
                out.extend((0..n).map(|_| rng.gen_range(-bound..bound) as f32));
            }
            Init::Normal { stdev } => out.extend((0..n).map(|_| (standard_normal(&mut rng) * stdev) as f32)),
            Init::ZeroShotWeights => out.extend(zero_shot_weights(shape.history, shape.zero_shot_items)),
            Init::Constant(value) => out.extend(std::iter::repeat_n(value as f32, n)),
        }
    }
    out
}

/// A standard normal draw (Box–Muller).
fn standard_normal(rng: &mut ChaCha20Rng) -> f64 {
    let u1: f64 = 1.0 - rng.r#gen::<f64>();
    let u2: f64 = rng.r#gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;

    fn shape(layers: usize) -> TowerShape {
        TowerShape {
            hidden: 12,
            history: 8,
            zero_shot_items: 5,
            item_rank: 4,
            width: 16,
            layers,
            heads: 4,
            catalogue: 0,
            neighbours: 0,
            pair_sketch: 0,
            item_ids: 0,
            spectral: 0,
        }
    }

    /// β_t is a tensor of a tower with item-to-item counts alone, starting at
    /// [`TRANSITIONS_WEIGHT`], outside the accumulated statistics; setting it touches its
    /// coordinate alone and reads back.
    #[test]
    fn the_item_to_item_prior_s_weight_is_one_coordinate_set_and_read_by_value() {
        let plain = TowerShape { catalogue: 30, ..shape(1) };
        assert!(tensor_range(&plain, TRANSITIONS_WEIGHT_TENSOR).is_none());
        assert!(transitions_weight_in(&plain, &vec![0.0; parameter_count(&plain)]).is_none());
        assert!(with_transitions_weight(&plain, &vec![0.0; parameter_count(&plain)], 0.1).is_none());
        let counted = TowerShape { neighbours: 4, ..plain };
        assert_eq!(parameter_count(&counted), parameter_count(&plain) + 30 * 4 + 1);
        let at = tensor_range(&counted, TRANSITIONS_WEIGHT_TENSOR).expect("a weight").start;
        let accumulated = accumulated_range(&counted).expect("statistics");
        assert!(!accumulated.contains(&at), "β_t is not summed like the counts");
        assert_eq!(initial_values(&counted, 3)[at], TRANSITIONS_WEIGHT as f32);
        let offset: Vec<f32> = (0..parameter_count(&counted)).map(|i| i as f32 * 1e-3).collect();
        let start = vec![0.0; offset.len()];
        assert_eq!(transitions_weight_in(&counted, &start), Some(TRANSITIONS_WEIGHT));
        let set = with_transitions_weight(&counted, &offset, 0.05).expect("fits");
        assert!((transitions_weight_in(&counted, &set).expect("a weight") - 0.05).abs() < 1e-7);
        let changed: Vec<usize> = (0..offset.len()).filter(|&i| set[i] != offset[i]).collect();
        assert_eq!(changed, [at]);
        assert!(with_transitions_weight(&counted, &offset[..at], 0.05).is_none(), "too short");
        assert!(TRANSITIONS_WEIGHTS.contains(&TRANSITIONS_WEIGHT), "the start is among the choices");
    }

    /// Every other item estimated and the `M` heaviest kept: the decoding's definition.
    fn exhaustive_neighbours(shape: &TowerShape, sketch: &[f32]) -> (Vec<u32>, Vec<f32>) {
        let (n, m, buckets) = (shape.catalogue, shape.neighbours, shape.pair_sketch);
        let (mut lists, mut estimates) = (Vec::new(), Vec::new());
        for from in 0..n {
            let mut scored: Vec<(f32, u32)> = (0..n)
                .filter(|&to| to != from)
                .map(|to| (sketch_estimate(sketch, buckets, from, to), to as u32))
                .collect();
            scored.sort_by(heavier_first);
            lists.extend(scored[..m].iter().map(|s| s.1));
            estimates.extend(scored[..m].iter().map(|s| s.0));
        }
        (lists, estimates)
    }

    #[test]
    fn the_pruned_decoding_is_the_exhaustive_one() {
        // Sketches where the first row's bound prunes most items, where it prunes none (all
        // equal), with ties everywhere (small integers), with negative noise, with a NaN,
        // sparse (most pairs tied at zero), and with more neighbours than most items have
        // pairs.
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        for (case, (catalogue, neighbours, buckets)) in
            [(120, 5, 256), (60, 10, 64), (300, 40, 1024), (40, 39, 16)].into_iter().enumerate()
        {
            let shape = TowerShape { catalogue, neighbours, pair_sketch: buckets, ..shape(0) };
            let len = SKETCH_ROWS * buckets;
            let sketches: Vec<Vec<f32>> = vec![
                (0..len).map(|_| f32::from(rng.gen_range(0u8..4))).collect(),
                vec![1.0; len],
                (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect(),
                (0..len).map(|i| if i == 3 { f32::NAN } else { f32::from(rng.gen_range(0u8..50)) }).collect(),
                // Sparse, as a sum of few shoppers' pairs: most pairs tie at zero (some −0).
                (0..len)
                    .map(|i| match (rng.gen_bool(0.05), i % 7) {
                        (true, _) => f32::from(rng.gen_range(1u8..9)),
                        (false, 0) => -0.0,
                        (false, _) => 0.0,
                    })
                    .collect(),
            ];
            for (k, sketch) in sketches.iter().enumerate() {
                let expected = exhaustive_neighbours(&shape, sketch);
                for threads in [1, 3] {
                    let (lists, estimates) = sketch_neighbours(&shape, sketch, threads);
                    assert_eq!(lists, expected.0, "case {case}, sketch {k}, {threads} threads");
                    let same = estimates.iter().zip(&expected.1).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "case {case}, sketch {k}: estimates differ");
                }
            }
        }
    }

    #[test]
    fn the_pair_sketch_hashes_to_fixed_buckets_and_decodes_the_heaviest_pairs() {
        // Known answers: the hash is part of the protocol (every party places and reads the
        // same buckets), so it may not drift.
        let fixed: Vec<usize> = (0..SKETCH_ROWS).map(|row| sketch_bucket(1 << 20, row, 12, 345)).collect();
        assert_eq!(fixed, KNOWN_BUCKETS);
        for row in 0..SKETCH_ROWS {
            assert!((row * 1024..(row + 1) * 1024).contains(&sketch_bucket(1024, row, 7, 9)));
        }
        // 50 items, each going to the next with weight 5, two on with 3 and three on with 1:
        // every item's neighbours, heaviest first, are those three, whatever the threads (with
        // 8,192 buckets a row, a non-pair's median reaches a weight-5 pair's for about 0.06 of
        // the 2,350 non-pairs in expectation; the hash is fixed, so this either holds or not).
        let shape = TowerShape { catalogue: 50, neighbours: 3, pair_sketch: 8192, ..shape(0) };
        assert!(shape.validate().is_ok());
        let mut sketch = vec![0f32; SKETCH_ROWS * 8192];
        for i in 0..50 {
            for (step, weight) in [(1, 5.0), (2, 3.0), (3, 1.0)] {
                for row in 0..SKETCH_ROWS {
                    sketch[sketch_bucket(8192, row, i, (i + step) % 50)] += weight;
                }
            }
        }
        let (lists, estimates) = sketch_neighbours(&shape, &sketch, 1);
        let mut exact = 0;
        for i in 0..50 {
            let list = &lists[i * 3..i * 3 + 3];
            assert_eq!(list[0] as usize, (i + 1) % 50, "item {i}: {list:?}");
            exact += usize::from(list[1] as usize == (i + 2) % 50);
            assert!(estimates[i * 3] >= estimates[i * 3 + 1] && estimates[i * 3 + 1] >= estimates[i * 3 + 2]);
            // Without noise the least bucket never falls below the pair's count.
            assert!(estimates[i * 3] >= 5.0, "item {i}: {}", estimates[i * 3]);
        }
        assert!(exact >= 45, "the second neighbour decoded for {exact} of 50 items");
        assert_eq!(sketch_neighbours(&shape, &sketch, 4), (lists.clone(), estimates.clone()));
        assert_eq!((lists.clone(), estimates), exhaustive_neighbours(&shape, &sketch));
        // Noised (a deterministic ±0.5 on every bucket), the heaviest pairs still come first.
        let noised: Vec<f32> =
            sketch.iter().enumerate().map(|(i, v)| v + if i % 2 == 0 { 0.5 } else { -0.5 }).collect();
        let (noisy_lists, _) = sketch_neighbours(&shape, &noised, 2);
        let first = (0..50).filter(|&i| noisy_lists[i * 3] == lists[i * 3]).count();
        assert!(first >= 48, "the first neighbour survived the noise for {first} of 50 items");
        // Not a power of two, or without neighbours: refused; a wrong length decodes nothing.
        assert!(TowerShape { pair_sketch: 300, ..shape }.validate().is_err());
        assert!(TowerShape { neighbours: 0, ..shape }.validate().is_err());
        assert_eq!(sketch_neighbours(&shape, &sketch[1..], 1).0.len(), 0);
        // The sketch replaces the counts' tensor in the flat vector, right after the histogram.
        let range = transitions_range(&shape).expect("counts");
        assert_eq!(range.len(), SKETCH_ROWS * 8192);
        assert_eq!(accumulated_range(&shape).expect("statistics").len(), 50 + SKETCH_ROWS * 8192);
    }

    #[test]
    fn item_id_embeddings_need_a_catalogue_and_start_at_zero() {
        assert!(
            TowerShape { item_ids: 4, ..shape(0) }
                .validate()
                .expect_err("no catalogue")
                .contains("item_ids 4")
        );
        let shape = TowerShape { catalogue: 30, item_ids: 4, ..shape(1) };
        assert!(shape.validate().is_ok());
        let ids = tensor_range(&shape, ITEM_IDS).expect("item ids");
        let out = tensor_range(&shape, ITEM_IDS_OUT).expect("their projection");
        assert_eq!((ids.len(), out.len()), (30 * 4, 4 * 12));
        let values = initial_values(&shape, 7);
        assert!(values[ids].iter().all(|&v| v == 0.0), "the tower starts at zero-shot");
        // Drawn, not zero: with both at zero no gradient would reach either.
        assert!(values[out].iter().all(|&v| v != 0.0));
        assert_eq!(
            parameter_count(&shape),
            parameter_count(&TowerShape { item_ids: 0, ..shape }) + 30 * 4 + 4 * 12
        );
    }

    // Computed independently (SplitMix64 in Python) for buckets 2^20 and the pair (12, 345).
    const KNOWN_BUCKETS: [usize; SKETCH_ROWS] = [954_585, 1_424_636, 2_681_695];

    #[test]
    fn item_to_item_counts_follow_the_histogram_and_form_one_accumulated_range_with_it() {
        let s = TowerShape { catalogue: 30, neighbours: 4, ..shape(1) };
        // The histogram, its weight β, the counts and their weight β_t.
        assert_eq!(parameter_count(&s), parameter_count(&shape(1)) + 30 + 1 + 30 * 4 + 1);
        let (popularity, transitions) =
            (popularity_range(&s).expect("histogram"), transitions_range(&s).expect("counts"));
        assert_eq!((popularity.len(), transitions.len()), (30, 120));
        assert_eq!(transitions.start, popularity.end);
        assert_eq!(accumulated_range(&s), Some(popularity.start..transitions.end));
        assert!(initial_values(&s, 3)[transitions].iter().all(|&v| v == 0.0), "the counts start empty");
        // Without neighbours the accumulated range is the histogram's.
        let plain = TowerShape { catalogue: 30, ..shape(1) };
        assert_eq!(accumulated_range(&plain), popularity_range(&plain));
        assert_eq!(transitions_range(&plain), None);
        // Neighbours need a catalogue larger than them.
        assert!(TowerShape { neighbours: 4, ..shape(1) }.validate().is_err());
        assert!(TowerShape { catalogue: 4, neighbours: 4, ..shape(1) }.validate().is_err());
        assert!(
            TowerShape { catalogue: 300, neighbours: MAX_NEIGHBOURS + 1, ..shape(1) }.validate().is_err()
        );
    }

    #[test]
    fn tensors_are_in_name_order_and_count_every_parameter() {
        for layers in [0, 2] {
            let all = tensors(&shape(layers));
            let names: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
            let mut sorted = names.clone();
            sorted.sort_unstable();
            assert_eq!(names, sorted);
            assert_eq!(initial_values(&shape(layers), 1).len(), parameter_count(&shape(layers)));
        }
        // Without layers: the item residual and the pooling weights only.
        assert_eq!(parameter_count(&shape(0)), 2 * 12 * 4 + 8);
        // Each block: two norms, attention (qkv, out) and a 2× MLP: 8w² + 11w.
        assert_eq!(
            parameter_count(&shape(2)) - parameter_count(&shape(0)),
            2 * (8 * 256 + 11 * 16) + 16 * 12 + 16 + 16 * 12 + 8 * 16
        );
    }

    #[test]
    fn initial_values_are_seeded_and_start_at_zero_shot() {
        let s = shape(2);
        let a = initial_values(&s, 7);
        assert_eq!(a, initial_values(&s, 7));
        assert_ne!(a, initial_values(&s, 8));
        let mut offset = 0;
        for t in tensors(&s) {
            let values = &a[offset..offset + t.len()];
            match t.name.as_str() {
                "item_b" | "output" => assert!(values.iter().all(|&v| v == 0.0), "{} starts at zero", t.name),
                "recency" => assert_eq!(values, &[0.2, 0.2, 0.2, 0.2, 0.2, 0.0, 0.0, 0.0]),
                "item_a" => {
                    let var = values.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / values.len() as f64;
                    assert!((var * 12.0 - 1.0).abs() < 0.35, "item_a variance {var} is about 1/h");
                }
                _ => {}
            }
            offset += t.len();
        }
    }

    #[test]
    fn a_catalogue_adds_the_popularity_histogram_at_zero_and_its_weight() {
        let s = TowerShape { catalogue: 30, ..shape(1) };
        assert_eq!(parameter_count(&s), parameter_count(&shape(1)) + 30 + 1);
        let range = popularity_range(&s).expect("a histogram");
        assert_eq!(range.len(), 30);
        let values = initial_values(&s, 3);
        assert!(values[range.clone()].iter().all(|&v| v == 0.0), "the histogram starts empty");
        assert_eq!(values[range.end], POPULARITY_WEIGHT_INIT as f32, "its weight follows it in name order");
        assert_eq!(popularity_range(&shape(1)), None);
        assert!(TowerShape { catalogue: MAX_CATALOGUE + 1, ..shape(0) }.validate().is_err());
    }

    #[test]
    fn the_popularity_prior_is_zero_for_an_empty_histogram_and_follows_its_formula() {
        assert_eq!(popularity_prior(&[0.0; 4]), vec![0.0; 4]);
        assert_eq!(popularity_prior(&[-1.0, 0.0, -3.0]), vec![0.0; 3], "negative noise counts as nothing");
        // No negative entry, no noise: v = w = (3, 1, 0, 0), v̄ = 1, prior = ln(1 + v / κ).
        assert_eq!(POPULARITY_SMOOTHING, 1.0, "the expected values below are for κ = 1");
        let prior = popularity_prior(&[3.0, 1.0, 0.0, 0.0]);
        let expected = [4f64.ln(), 2f64.ln(), 0.0, 0.0];
        for (p, e) in prior.iter().zip(expected) {
            assert!((f64::from(*p) - e).abs() < 1e-6, "{prior:?}");
        }
        // Scale-free: the histogram's unit does not matter.
        let scaled = popularity_prior(&[300.0, 100.0, 0.0, 0.0]);
        assert!(prior.iter().zip(&scaled).all(|(a, b)| (a - b).abs() < 1e-6));
        // Negative entries give σ̂: here √((1 + 1)/2) = 1, so t·σ̂ = t = Φ⁻¹(1 − 10⁻³/6) =
        // 3.5879 is taken off every entry: v = (10 − t, 0, 0, 0, 0, 0), v̄ = v₀/6.
        let t = noise_threshold(6);
        assert!((t - 3.5879).abs() < 1e-3, "{t}");
        let prior = popularity_prior(&[10.0, 2.0, 0.5, -1.0, 1.0, -1.0]);
        let v: [f64; 6] = [10.0 - t, 0.0, 0.0, 0.0, 0.0, 0.0];
        let mean: f64 = (10.0 - t) / 6.0;
        for (p, v) in prior.iter().zip(v) {
            assert!((f64::from(*p) - (v / mean).ln_1p()).abs() < 1e-6, "{prior:?}");
        }
    }

    /// A DP histogram over many items: the noise-only items get no prior (up to the
    /// threshold's tail), the popular ones keep theirs. Seeded; for another seed a noise item
    /// keeps a prior with probability at most 10⁻³ (Φ⁻¹(1 − 10⁻³/5000) = 5.07 deviations).
    #[test]
    fn noise_alone_gives_almost_no_item_a_prior() {
        let mut rng = ChaCha20Rng::seed_from_u64(17);
        let mut histogram: Vec<f32> = (0..5000).map(|_| standard_normal(&mut rng) as f32).collect();
        for h in &mut histogram[..20] {
            *h += 40.0;
        }
        let prior = popularity_prior(&histogram);
        assert!(prior[..20].iter().all(|&p| p > 3.0), "{:?}", &prior[..20]);
        let noisy = prior[20..].iter().filter(|&&p| p > 0.0).count();
        assert_eq!(noisy, 0, "{noisy} noise-only items have a prior");
        assert!((noise_threshold(5000) - 5.0690).abs() < 1e-3, "{}", noise_threshold(5000));
        assert!((noise_threshold(1) - 3.0902).abs() < 1e-3, "one entry: its own 10⁻³ tail");
    }

    #[test]
    fn the_counts_keep_the_lower_level_only_when_more_entries_pass_it_than_noise_would() {
        let d = 16_859 * 64;
        assert_eq!(counts_noise_exceedances(d), 301);
        assert_eq!(counts_threshold(d, 301), noise_threshold(d));
        assert!((counts_threshold(d, 301) - 6.0101).abs() < 1e-3);
        assert_eq!(counts_threshold(d, 302), COUNTS_NOISE_THRESHOLD);
        assert_eq!(counts_threshold(d, 0), noise_threshold(d));
    }

    #[test]
    fn inconsistent_shapes_are_refused() {
        assert!(shape(2).validate().is_ok());
        assert!(TowerShape { heads: 5, ..shape(2) }.validate().is_err());
        assert!(TowerShape { zero_shot_items: 9, ..shape(2) }.validate().is_err());
        assert!(TowerShape { heads: 5, ..shape(0) }.validate().is_ok(), "no transformer, no heads to check");
    }

    #[test]
    fn the_selection_grid_is_normalised_pooling_decays_with_the_start_among_them() {
        let shape = TowerShape { catalogue: 30, ..shape(1) };
        let grid = selection_grid(&shape);
        assert_eq!(grid.len(), SELECTION_SETTINGS);
        for setting in &grid {
            let total: f32 = setting.recency.iter().sum();
            assert!((total - 1.0).abs() < 1e-6, "{total}");
            assert!(
                setting.recency.windows(2).all(|w| w[0] >= w[1]),
                "most recent first: {:?}",
                setting.recency
            );
        }
        // Decay 0.6: each weight 0.6 times the one after it (more recent).
        let decay = &grid[2 * SELECTION_WEIGHTS.len()].recency;
        assert!((decay[3] / decay[2] - 0.6).abs() < 1e-6);
        // The tower's start is one of the settings: applying it to a zero offset keeps it zero.
        let start = grid.iter().position(|s| {
            s.recency == zero_shot_weights(shape.history, shape.zero_shot_items)
                && s.weight == POPULARITY_WEIGHT_INIT as f32
        });
        let start = start.expect("the start is in the grid");
        let zeros = vec![0.0; parameter_count(&shape)];
        assert_eq!(with_setting(&shape, &zeros, &grid[start]), Some(zeros.clone()));
        assert_eq!(setting_of(&shape, &zeros), Some(start));
        for (j, setting) in grid.iter().enumerate() {
            assert_eq!(setting_of(&shape, &with_setting(&shape, &zeros, setting).expect("fits")), Some(j));
        }
        assert!(describe_setting(2 * SELECTION_WEIGHTS.len() + 2).contains("decaying by 0.6"));
    }

    #[test]
    fn a_setting_replaces_the_pooling_and_prior_weight_and_nothing_else() {
        let without = shape(1);
        let shape = TowerShape { catalogue: 30, ..without };
        let n = parameter_count(&shape);
        let offset: Vec<f32> = (0..n).map(|i| i as f32 * 1e-3).collect();
        let setting = &selection_grid(&shape)[SELECTION_WEIGHTS.len() + 2];
        let chosen = with_setting(&shape, &offset, setting).expect("a tower with a prior");
        let (recency, weight) = selection_ranges(&shape).expect("ranges");
        let initial = initial_values(&shape, 7);
        for i in 0..n {
            let value = initial[i] + chosen[i];
            if recency.contains(&i) {
                assert!((value - setting.recency[i - recency.start]).abs() < 1e-6, "{i}");
            } else if i == weight {
                assert!((value - setting.weight).abs() < 1e-6);
            } else {
                assert_eq!(chosen[i], offset[i], "{i} moved");
            }
        }
        // No prior, nothing to select; a setting of another history length is refused.
        assert!(with_setting(&without, &offset[..parameter_count(&without)], setting).is_none());
        let short = PoolingSetting { recency: vec![1.0], weight: 0.05 };
        assert!(with_setting(&shape, &offset, &short).is_none());
    }

    #[test]
    fn a_towers_own_setting_is_read_back_as_with_setting_wrote_it() {
        let without = shape(1);
        let shape = TowerShape { catalogue: 30, ..without };
        let offset: Vec<f32> = (0..parameter_count(&shape)).map(|i| (i % 17) as f32 * 1e-3).collect();
        // A trained offset's own setting puts back exactly what it holds.
        let own = setting_in(&shape, &offset).expect("a tower with a prior");
        let back = with_setting(&shape, &offset, &own).expect("fits");
        assert!(back.iter().zip(&offset).all(|(a, b)| (a - b).abs() < 1e-6));
        // A grid setting written in is read back.
        let setting = &selection_grid(&shape)[2 * SELECTION_WEIGHTS.len() + 1];
        let read = setting_in(&shape, &with_setting(&shape, &offset, setting).expect("fits")).expect("read");
        assert!(read.recency.iter().zip(&setting.recency).all(|(a, b)| (a - b).abs() < 1e-6));
        assert!((read.weight - setting.weight).abs() < 1e-6);
        assert!(setting_in(&without, &offset[..parameter_count(&without)]).is_none());
    }
}
