//! The sequence-tower adapter family: cheap to train, and exactly zero-shot at
//! initialisation. It works on the frozen MiniLM's embeddings of product titles (the
//! catalogue, computed once and cached) instead of running MiniLM per step:
//!
//! - **item side**: a low-rank residual `v' = v + (v·A)·B` with `B = 0` at start;
//! - **shopper side**: the last `L` items' adapted vectors, pooled with learned recency
//!   weights (initialised to the mean of the last five), plus a small causal transformer
//!   over the same sequence whose output projection starts at zero (the sequence adapters of
//!   UniSRec, KDD 2022, and SASRec, ICDM 2018, over text embeddings);
//! - score: cosine of the shopper and item vectors, plus (when the shape has a catalogue) a
//!   popularity prior `β · ln(1 + v_j / (κ·v̄))`, `v = max(w − 3σ̂, 0)`, from the federation's
//!   running histogram `w` (σ̂: its noise, estimated from its negative entries)
//!   of the items shoppers interacted with (`guild_proto::tower::popularity_prior`); over τ
//!   in the softmax.
//!
//! At initialisation the item residual and the transformer both add exactly zero and the
//! histogram is empty (its prior exactly zero), so the ranking is bit for bit the
//! zero-shot "mean of the last five items" ranking ([`zero_shot_weights`]); a test holds it
//! to that. The histogram is not trained: each contribution adds a unit vector over a
//! shopper's items ([`popularity_contribution`]) and the coordinator sums them.
//!
//! With `neighbours` M in the shape, the tower also carries item-to-item counts: for each
//! item and each of its M title neighbours ([`TitleNeighbours`], public), how often
//! shoppers went from one to the other ([`transitions_contribution`]), summed by the
//! coordinator like the histogram and scored as a prior over a shopper's last three items
//! ([`Tower::history_prior`]): the collaborative signal the frozen title vectors lack,
//! restricted to pairs the federation can sum as a dense vector.

use std::collections::BTreeMap;

use std::sync::Arc;

use guild_proto::tower::{
    CO_OCCURRENCE_WEIGHT, CO_OCCURRENCE_WINDOW, ITEM_IDS, ITEM_IDS_OUT, POPULARITY, POPULARITY_RECENCY,
    POPULARITY_SMOOTHING, POPULARITY_WEIGHT, SPECTRAL_IN, SPECTRAL_RECENCY, SPECTRAL_WEIGHT_TENSOR,
    TRANSITION_WEIGHT, TRANSITIONS, TRANSITIONS_RECENCY, TRANSITIONS_WEIGHT_TENSOR, TowerShape,
    initial_values, tensors,
};
use tch::{Device, Kind, Tensor, nn};

use crate::data::{ItemIndex, User};

pub use guild_proto::tower::zero_shot_weights;

/// The tower's shape and the seed of its initial values.
#[derive(Clone, Debug, PartialEq)]
pub struct TowerConfig {
    pub shape: TowerShape,
    /// Seeds the initial values of everything that does not start at zero or one.
    pub seed: u64,
}

/// The sequence-tower adapter: its own `VarStore` holding every tensor of
/// `guild_proto::tower::tensors`, all trained and aggregated.
#[derive(Debug)]
pub struct Tower {
    config: TowerConfig,
    vs: nn::VarStore,
    /// The variables by name (shallow clones sharing the `VarStore`'s storage).
    vars: BTreeMap<String, Tensor>,
    /// The initial values, flat: the federation aggregates offsets from them.
    initial: Vec<f32>,
    /// The catalogue's title neighbours, `[catalogue, M]` on the tower's device, once set
    /// ([`Self::set_neighbours`]); the item-to-item prior needs them.
    neighbours: Option<Tensor>,
    /// `ln(1 + v/(κ·v̄))` of the item-to-item counts, `[catalogue, M]`, recomputed whenever
    /// the counts are set (they are never trained), so that scoring does not redo it per
    /// batch or per request; `None` without counts.
    transitions_log: Option<Tensor>,
    /// The pair sketch's decoding the neighbours and `transitions_log` come from (a tower
    /// with a pair sketch only): the spectral prior's features are computed from it.
    decoded: Option<Arc<DecodedSketch>>,
    /// The spectral prior's feature rows, `[catalogue, spectral]` on the tower's device, and
    /// their transpose, contiguous (what the prior's scoring multiplies by): computed the
    /// first time an item is adapted ([`SPECTRAL_IN`]) or a history scored with a weight γ
    /// other than zero, and dropped whenever the counts change.
    spectral: std::sync::OnceLock<Option<(Tensor, Tensor)>>,
}

impl Tower {
    /// A tower at its zero-shot initialisation.
    pub fn new(config: TowerConfig, device: Device) -> Result<Self, super::ModelError> {
        config.shape.validate().map_err(super::ModelError::AdapterShape)?;
        let vs = nn::VarStore::new(device);
        let mut vars = BTreeMap::new();
        for t in tensors(&config.shape) {
            let mut path = vs.root();
            let mut segments: Vec<&str> = t.name.split('.').collect();
            let leaf = segments.pop().expect("a name has a segment");
            for segment in segments {
                path = &path / segment;
            }
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            // The histogram and the counts are summed by the coordinator, never trained here;
            // the counts' weight β_t and the spectral prior's γ are chosen on validation, not
            // trained either.
            let untrained = [POPULARITY, TRANSITIONS, TRANSITIONS_WEIGHT_TENSOR, SPECTRAL_WEIGHT_TENSOR];
            let var = if untrained.contains(&t.name.as_str()) {
                path.zeros_no_train(leaf, &shape)
            } else {
                path.zeros(leaf, &shape)
            };
            vars.insert(t.name.clone(), var);
        }
        let initial = initial_values(&config.shape, config.seed);
        let mut tower = Self {
            config,
            vs,
            vars,
            initial,
            neighbours: None,
            transitions_log: None,
            decoded: None,
            spectral: std::sync::OnceLock::new(),
        };
        let initial = tower.initial.clone();
        tower.set_flat(&initial)?;
        Ok(tower)
    }

    pub fn config(&self) -> &TowerConfig {
        &self.config
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn var(&self, name: &str) -> &Tensor {
        self.vars.get(name).unwrap_or_else(|| panic!("the tower has no tensor {name}"))
    }

    fn linear(&self, xs: &Tensor, name: &str) -> Tensor {
        xs.matmul(&self.var(&format!("{name}.weight")).tr()) + self.var(&format!("{name}.bias"))
    }

    fn layer_norm(&self, xs: &Tensor, name: &str) -> Tensor {
        let w = self.config.shape.width as i64;
        xs.layer_norm(
            [w],
            Some(self.var(&format!("{name}.weight"))),
            Some(self.var(&format!("{name}.bias"))),
            1e-5,
            true,
        )
    }

    /// Pre-norm causal self-attention and MLP; `allowed` is `[B, 1, L, L]`, true where a
    /// position may attend to another (earlier or itself, and not padding).
    fn block(&self, i: usize, xs: &Tensor, allowed: &Tensor) -> Tensor {
        let p = |part: &str| format!("block{i}.{part}");
        let heads = self.config.shape.heads as i64;
        let (b, l, w) = xs.size3().expect("[batch, length, width]");
        let qkv = self.linear(&self.layer_norm(xs, &p("attention_norm")), &p("qkv"));
        let split = |t: &Tensor| t.view([b, l, heads, w / heads]).transpose(1, 2);
        let parts = qkv.chunk(3, -1);
        let (q, k, v) = (split(&parts[0]), split(&parts[1]), split(&parts[2]));
        let attended =
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(allowed), 0.0, false, None, false);
        let xs =
            xs + self.linear(&attended.transpose(1, 2).contiguous().view([b, l, w]), &p("attention_out"));
        let hidden = self.linear(&self.layer_norm(&xs, &p("mlp_norm")), &p("mlp_in")).gelu("none");
        &xs + self.linear(&hidden, &p("mlp_out"))
    }

    /// The catalogue's adapted item vectors `v + (v·A)·B [+ e_i·P] [+ F_i·S]`, `[items,
    /// hidden]`: `items` is the whole catalogue, in catalogue order (the item-ID embeddings
    /// and the spectral features, when the shape has them, are added row by row).
    pub fn adapt_items(&self, items: &Tensor) -> Tensor {
        let shape = &self.config.shape;
        if shape.item_ids > 0 || shape.spectral > 0 {
            assert_eq!(
                items.size()[0],
                shape.catalogue as i64,
                "adapt_items takes the whole catalogue; gathered rows go through adapt_rows"
            );
        }
        self.with_item_terms(self.with_residual(items), None)
    }

    /// Adapted vectors of the items at `index` (`[n]`), given their title vectors `vectors`
    /// (`[n, hidden]`, the catalogue's rows at `index`).
    pub fn adapt_rows(&self, vectors: &Tensor, index: &Tensor) -> Tensor {
        self.with_item_terms(self.with_residual(vectors), Some(index))
    }

    /// `adapted` plus each item's own terms: its ID embedding projected (`e_i·P`) and its
    /// spectral features projected (`F_i·S`), where the shape has them (and, for the
    /// features, a decoded sketch); the rows at `index`, or the whole catalogue.
    fn with_item_terms(&self, adapted: Tensor, index: Option<&Tensor>) -> Tensor {
        let rows = |table: &Tensor| match index {
            Some(index) => table.index_select(0, index),
            None => table.shallow_clone(),
        };
        let adapted = match self.config.shape.item_ids {
            0 => adapted,
            _ => adapted + rows(self.var(ITEM_IDS)).matmul(self.var(ITEM_IDS_OUT)),
        };
        match self.spectral_features() {
            Some((features, _)) => adapted + rows(features).matmul(self.var(SPECTRAL_IN)),
            None => adapted,
        }
    }

    /// Title vectors plus the low-rank residual, `v + (v·A)·B`.
    fn with_residual(&self, vectors: &Tensor) -> Tensor {
        vectors + vectors.matmul(self.var("item_a")).matmul(self.var("item_b"))
    }

    /// The shopper vector after every position of each window, `[batch, m, hidden]` with
    /// `m` the longest window (at most `L` items, oldest first, right-padded). Position `p`
    /// of a window sees only positions `0..=p`, so one pass gives the vector of every prefix
    /// of a short history exactly as [`Self::shoppers`] gives it for that prefix alone: a
    /// shopper's whole history trains in one row (SASRec's training, ICDM 2018).
    pub fn sequence(&self, items: &Tensor, windows: &[&[ItemIndex]]) -> Tensor {
        let mut one = self.sequences(items, windows, &[self.var("recency")]);
        one.pop().expect("one sequence per pooling")
    }

    /// [`Self::sequence`] once for each of `recencies` in place of the tower's own pooling
    /// weights, the items' residual and the transformer computed once for all.
    pub fn sequences(&self, items: &Tensor, windows: &[&[ItemIndex]], recencies: &[&Tensor]) -> Vec<Tensor> {
        let shape = &self.config.shape;
        let (index, valid) = window_index(windows, shape.history as i64, items.device());
        let (b, m) = valid.size2().expect("[batch, m]");
        let hidden = items.size()[1];
        let valid = valid.unsqueeze(-1).to_kind(items.kind());
        let raw = items.index_select(0, &index);
        // Padding (index 0) is zeroed after adapting: its item-ID term would not be zero.
        let sequence = self.adapt_rows(&raw, &index).view([b, m, hidden]) * valid;
        let pooled = recencies.iter().map(|recency| pool(&sequence, recency));
        if shape.layers == 0 {
            return pooled.collect();
        }
        let (_, m, _) = sequence.size3().expect("[batch, length, hidden]");
        let xs = self.linear(&sequence, "input") + self.var("position").narrow(0, 0, m).unsqueeze(0);
        // Causal: padding sits after every item, so no item ever attends to it (padded
        // positions attend to the items and themselves and stay finite; nobody reads them).
        let allowed = Tensor::ones([m, m], (Kind::Bool, sequence.device())).tril(0).view([1, 1, m, m]);
        let xs = (0..shape.layers).fold(xs, |xs, i| self.block(i, &xs, &allowed));
        let transformed = xs.matmul(self.var("output"));
        pooled.map(|p| p + &transformed).collect()
    }

    /// Shopper vectors `[batch, hidden]`: each history's last `L` items (oldest first) over
    /// the catalogue's item vectors `items` (not adapted: the residual is applied to the
    /// gathered items only, which is the same as gathering adapted vectors).
    pub fn shoppers(&self, items: &Tensor, histories: &[&[ItemIndex]]) -> Tensor {
        let windows = last_windows(histories, self.config.shape.history);
        last_positions(&self.sequence(items, &windows), &windows)
    }

    /// Scores `[batch, items]` of each history against the whole catalogue: cosine plus the
    /// popularity prior plus the item-to-item prior.
    pub fn scores(&self, items: &Tensor, histories: &[&[ItemIndex]]) -> Tensor {
        let adapted = normalise(&self.adapt_items(items));
        let prior = self.prior().map(|p| p.unsqueeze(0));
        self.scores_against(items, &adapted, prior.as_ref(), histories)
    }

    /// [`Tower::scores`] with what does not depend on the histories computed once by the
    /// caller: `adapted`, the catalogue's adapted vectors normalised (`[items, hidden]`), and
    /// `prior`, the popularity prior as one row (`[1, items]`).
    pub fn scores_against(
        &self,
        items: &Tensor,
        adapted: &Tensor,
        prior: Option<&Tensor>,
        histories: &[&[ItemIndex]],
    ) -> Tensor {
        let cosine = normalise(&self.shoppers(items, histories)).matmul(&adapted.tr());
        let scores = match prior {
            Some(prior) => cosine + prior,
            None => cosine,
        };
        self.with_history_prior(scores, histories)
    }

    /// `scores` (`[batch, catalogue]`, one row per history) plus the item-to-item prior of
    /// each history, if the tower has one.
    pub fn with_history_prior(&self, scores: Tensor, histories: &[&[ItemIndex]]) -> Tensor {
        match self.history_prior(histories) {
            Some(prior) => {
                let device = scores.device();
                scores + prior.to_device(device)
            }
            None => scores,
        }
    }

    /// Sets the catalogue's title neighbours, which the item-to-item prior indexes; an error
    /// if they are not of the shape's catalogue and neighbour count.
    pub fn set_neighbours(&mut self, neighbours: &TitleNeighbours) -> Result<(), super::ModelError> {
        let shape = &self.config.shape;
        if (neighbours.catalogue(), neighbours.per_item()) != (shape.catalogue, shape.neighbours) {
            return Err(super::ModelError::AdapterShape(format!(
                "title neighbours {} per item over {} items for a tower of {} over {}",
                neighbours.per_item(),
                neighbours.catalogue(),
                shape.neighbours,
                shape.catalogue
            )));
        }
        self.neighbours = Some(neighbours.tensor().to(self.vs.device()));
        Ok(())
    }

    /// Whether the tower carries item-to-item counts over title neighbours (and so needs
    /// them set); a tower with a pair sketch decodes its neighbours from the sketch itself.
    pub fn needs_neighbours(&self) -> bool {
        // A valid shape has a catalogue wherever it has neighbours.
        self.config.shape.neighbours > 0 && self.config.shape.pair_sketch == 0
    }

    /// Recomputes [`Self::transitions_log`] from the counts' variable; with a pair sketch,
    /// first decodes each item's neighbours and their estimated counts from it
    /// ([`decoded_sketch`]).
    fn refresh_transitions_log(&mut self) {
        let shape = self.config.shape;
        let (catalogue, m) = (shape.catalogue as i64, shape.neighbours as i64);
        self.spectral = std::sync::OnceLock::new();
        self.decoded = None;
        let Some(counts) = self.vars.get(TRANSITIONS) else {
            self.transitions_log = None;
            return;
        };
        let device = self.vs.device();
        let counts =
            Vec::<f32>::try_from(counts.detach().to(Device::Cpu).flatten(0, -1)).expect("float32 counts");
        let log = if shape.pair_sketch > 0 {
            let decoded = decoded_sketch(&shape, &counts);
            self.neighbours = Some(Tensor::from_slice(&decoded.lists).view([catalogue, m]).to(device));
            let log = guild_proto::tower::counts_log(&decoded.estimates);
            self.decoded = Some(decoded);
            log
        } else {
            guild_proto::tower::counts_log(&counts)
        };
        self.transitions_log = Some(Tensor::from_slice(&log).view([catalogue, m]).to(device));
    }

    /// The item-to-item prior of each history, `[batch, catalogue]` (no gradient):
    /// `β_t · Σ_k r_k · ln(1 + v_{h_k,c}/(κ·v̄))` over its last three items `h_k`, `v` the
    /// thresholded counts, β_t the tower's `transitions_weight`
    /// (`guild_proto::tower::TRANSITIONS_WEIGHT_TENSOR`, not trained), plus the spectral
    /// prior `γ · F_c · Σ_j ρ_j F_{h_j}` when the tower has one and γ is not zero
    /// ([`HistoryPriorTerms`]); `None` for a tower without counts, or whose neighbours were
    /// not set. Exactly zero while the counts are.
    pub fn history_prior(&self, histories: &[&[ItemIndex]]) -> Option<Tensor> {
        let spectral = self.vars.get(SPECTRAL_WEIGHT_TENSOR).map(Tensor::detach);
        let spectral = spectral.filter(|w| w.double_value(&[0]) != 0.0);
        // `None` for a tower without counts, which has no `transitions_weight` either.
        let terms = self.history_prior_terms(histories, spectral.is_some())?;
        let transitions = self.var(TRANSITIONS_WEIGHT_TENSOR).detach();
        Some(terms.weighted(&transitions, spectral.as_ref()))
    }

    /// The tower's own weights of its item-to-item prior's two terms, `(β_t, γ)` as `f32`
    /// (zero for a term the tower lacks): what [`Self::history_prior`] weights
    /// [`Self::history_prior_terms`] by.
    pub fn history_prior_weights(&self) -> (f32, f32) {
        let value = |name: &str| self.vars.get(name).map_or(0.0, |w| w.double_value(&[0]) as f32);
        (value(TRANSITIONS_WEIGHT_TENSOR), value(SPECTRAL_WEIGHT_TENSOR))
    }

    /// The item-to-item prior's terms at unit weight, each `[batch, catalogue]` (no
    /// gradient): the counts' term, and the spectral term if `spectral` asks for it and the
    /// tower has one (a pair sketch decoded, `shape.spectral > 0`). [`Self::history_prior`]
    /// is these terms at the tower's own weights; a selection scores other weights from the
    /// same terms ([`crate::retrieval::candidates_ndcg`]). `None` where
    /// [`Self::history_prior`] is.
    pub fn history_prior_terms(
        &self,
        histories: &[&[ItemIndex]],
        spectral: bool,
    ) -> Option<HistoryPriorTerms> {
        if self.config.shape.neighbours == 0 {
            return None;
        }
        let Some(neighbours) = &self.neighbours else {
            tracing::warn!("a tower with item-to-item counts scored without its title neighbours");
            return None;
        };
        let (catalogue, m) = (self.config.shape.catalogue as i64, self.config.shape.neighbours as i64);
        let log = self.transitions_log.as_ref()?;
        let depth = TRANSITIONS_RECENCY.len();
        let (rows, weights) = last_items(histories, &TRANSITIONS_RECENCY, catalogue);
        let device = log.device();
        let rows = Tensor::from_slice(&rows).to(device);
        let weights = Tensor::from_slice(&weights).to(device).unsqueeze(1);
        let b = histories.len() as i64;
        let values = (log.index_select(0, &rows) * weights).view([b, depth as i64 * m]);
        let columns = neighbours.index_select(0, &rows).view([b, depth as i64 * m]);
        let transitions =
            Tensor::zeros([b, catalogue], (Kind::Float, device)).scatter_add(1, &columns, &values);
        let spectral = if spectral { self.spectral_term(histories) } else { None };
        Some(HistoryPriorTerms { transitions, spectral })
    }

    /// The spectral features `F` of the decoded table, `[catalogue, spectral]` on the tower's
    /// device, and their transpose (contiguous); `None` for a tower without a spectral prior
    /// or a decoded sketch. Computed when first asked for, dropped whenever the counts change.
    fn spectral_features(&self) -> Option<&(Tensor, Tensor)> {
        let shape = self.config.shape;
        if shape.spectral == 0 {
            return None;
        }
        let decoded = self.decoded.as_ref()?;
        self.spectral
            .get_or_init(|| {
                let values = decoded.spectral(&shape);
                if values.len() != shape.catalogue * shape.spectral {
                    return None;
                }
                let features = Tensor::from_slice(values)
                    .view([shape.catalogue as i64, shape.spectral as i64])
                    .to(self.vs.device());
                let transposed = features.tr().contiguous();
                Some((features, transposed))
            })
            .as_ref()
    }

    /// The spectral prior's term at unit weight, `F_c · Σ_j ρ_j F_{h_j}` over each history's
    /// last items `h_j` (weights `SPECTRAL_RECENCY`), `F` the feature rows of the decoded
    /// table (`guild_proto::spectral`), `[batch, catalogue]`; `None` for a tower without a
    /// spectral prior or a decoded sketch. The features are computed when first asked for.
    fn spectral_term(&self, histories: &[&[ItemIndex]]) -> Option<Tensor> {
        let shape = self.config.shape;
        let (features, transposed) = self.spectral_features()?;
        let (rows, weights) = last_items(histories, &SPECTRAL_RECENCY, shape.catalogue as i64);
        let device = features.device();
        let (b, depth) = (histories.len() as i64, SPECTRAL_RECENCY.len() as i64);
        let rows = Tensor::from_slice(&rows).to(device);
        let weights = Tensor::from_slice(&weights).to(device).view([b, depth, 1]);
        let shoppers = (features.index_select(0, &rows).view([b, depth, -1]) * weights).sum_dim_intlist(
            1,
            false,
            Kind::Float,
        );
        Some(shoppers.matmul(transposed))
    }

    /// The popularity prior of every catalogue item, `β · ln(1 + v_j / (κ·v̄))` with
    /// `v = max(w − 3σ̂, 0)` (`guild_proto::tower::popularity_prior`; `[catalogue]`, in cosine
    /// units; differentiable in β only); `None` when the shape has no catalogue. Exactly
    /// zero while the histogram is.
    pub fn prior(&self) -> Option<Tensor> {
        Some(self.popularity_log()? * self.var(POPULARITY_WEIGHT))
    }

    /// The prior at weight β = 1, `ln(1 + v_j/(κ·v̄))` (`[catalogue]`, no gradient); `None`
    /// when the shape has no catalogue.
    pub fn popularity_log(&self) -> Option<Tensor> {
        if self.config.shape.catalogue == 0 {
            return None;
        }
        Some(accumulated_log(
            &self.var(POPULARITY).detach(),
            guild_proto::tower::noise_threshold(self.config.shape.catalogue),
        ))
    }

    /// Sets the histogram and (if the tower has them) the counts from `sum`, indexed over the
    /// accumulated range as [`statistics_sum`] gives it (what a federation's sums estimate,
    /// up to scale and noise): a reference tower's exact statistics.
    pub fn set_statistics(&mut self, sum: &BTreeMap<usize, f32>) -> Result<(), super::ModelError> {
        let catalogue = self.config.shape.catalogue;
        let counts = self.vars.get(TRANSITIONS).map_or(0, Tensor::numel);
        let mut dense = vec![0.0f32; catalogue + counts];
        for (&index, &value) in sum {
            if let Some(d) = dense.get_mut(index) {
                *d = value;
            }
        }
        self.set_popularity(&dense[..catalogue])?;
        if counts > 0 {
            self.set_transitions(&dense[catalogue..])?;
        }
        Ok(())
    }

    /// Sets the item-to-item counts (`[catalogue · neighbours]` values, or the pair sketch's
    /// `[rows · pair_sketch]`, any scale); an error if the tower has none or the length differs.
    pub fn set_transitions(&mut self, counts: &[f32]) -> Result<(), super::ModelError> {
        let Some(var) = self.vars.get_mut(TRANSITIONS) else {
            return Err(super::ModelError::AdapterShape("the tower has no item-to-item counts".into()));
        };
        let expected = var.numel();
        if counts.len() != expected {
            return Err(super::ModelError::AdapterShape(format!(
                "{} item-to-item counts for a tower of {expected}",
                counts.len()
            )));
        }
        let values = Tensor::from_slice(counts).to(var.device()).view(var.size().as_slice());
        tch::no_grad(|| var.copy_(&values));
        self.refresh_transitions_log();
        Ok(())
    }

    /// Sets the popularity histogram (`[catalogue]` values, any scale); an error if the
    /// tower has none or the length differs.
    pub fn set_popularity(&mut self, histogram: &[f32]) -> Result<(), super::ModelError> {
        let Some(var) = self.vars.get_mut(POPULARITY) else {
            return Err(super::ModelError::AdapterShape("the tower has no popularity prior".into()));
        };
        if histogram.len() != self.config.shape.catalogue {
            return Err(super::ModelError::AdapterShape(format!(
                "a histogram of {} items for a catalogue of {}",
                histogram.len(),
                self.config.shape.catalogue
            )));
        }
        tch::no_grad(|| var.copy_(&Tensor::from_slice(histogram).to(var.device())));
        Ok(())
    }

    /// Every trainable value, in flat-vector (name) order.
    pub fn flat(&self) -> Vec<f32> {
        let parts: Vec<Tensor> =
            self.vars.values().map(|t| t.detach().to(Device::Cpu).flatten(0, -1)).collect();
        Vec::<f32>::try_from(&Tensor::cat(&parts, 0)).expect("float32 variables")
    }

    /// Overwrites every trainable value from a flat vector in [`Self::flat`]'s order.
    pub fn set_flat(&mut self, values: &[f32]) -> Result<(), super::ModelError> {
        let expected = self.parameter_count();
        if values.len() != expected {
            return Err(super::ModelError::AdapterShape(format!(
                "flat vector has {} values, the tower has {expected}",
                values.len()
            )));
        }
        super::copy_flat(self.vars.values_mut(), values);
        self.refresh_transitions_log();
        Ok(())
    }

    /// The gradient of every variable, flat in [`Self::flat`]'s order (zeros where a
    /// variable has none), after a backward pass.
    pub fn flat_gradient(&self) -> Vec<f32> {
        let parts: Vec<Tensor> = self
            .vars
            .values()
            .map(|t| {
                let g = t.grad();
                if g.defined() {
                    g.to(Device::Cpu).flatten(0, -1)
                } else {
                    t.zeros_like().to(Device::Cpu).flatten(0, -1)
                }
            })
            .collect();
        Vec::<f32>::try_from(&Tensor::cat(&parts, 0)).expect("float32 gradients")
    }

    /// Clears every variable's gradient.
    pub fn zero_gradients(&mut self) {
        for t in self.vars.values_mut() {
            t.zero_grad();
        }
    }

    /// The initial values, flat.
    pub fn initial(&self) -> &[f32] {
        &self.initial
    }

    /// The offset of the current values from the initial ones: what the federation
    /// aggregates (all zeros at start).
    pub fn offset(&self) -> Vec<f32> {
        self.flat().iter().zip(&self.initial).map(|(v, i)| v - i).collect()
    }

    /// Sets the values to `initial + offset`.
    pub fn set_offset(&mut self, offset: &[f32]) -> Result<(), super::ModelError> {
        if offset.len() != self.initial.len() {
            return Err(super::ModelError::AdapterShape(format!(
                "offset has {} values, the tower has {}",
                offset.len(),
                self.initial.len()
            )));
        }
        let values: Vec<f32> = self.initial.iter().zip(offset).map(|(i, o)| i + o).collect();
        self.set_flat(&values)
    }

    /// Names and shapes of the trainable tensors, in the flat vector's order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.vars
            .iter()
            .map(|(name, t)| (name.clone(), t.size().iter().map(|&s| s as usize).collect()))
            .collect()
    }

    pub fn parameter_count(&self) -> usize {
        self.initial.len()
    }
}

/// The item-to-item prior's two terms of a batch of histories at unit weight
/// ([`Tower::history_prior_terms`]), `[batch, catalogue]` each.
#[derive(Debug)]
pub struct HistoryPriorTerms {
    /// The counts' term, `Σ_k r_k · ln(1 + v_{h_k,c}/(κ·v̄))`.
    pub transitions: Tensor,
    /// The spectral term, `F_c · Σ_j ρ_j F_{h_j}`, where it was asked for and the tower has one.
    pub spectral: Option<Tensor>,
}

impl HistoryPriorTerms {
    /// `β_t · transitions + γ · spectral` (the spectral term left out where `spectral_weight`
    /// is `None` or the term is absent), each weight a one-value tensor: the same operations,
    /// in the same order, as [`Tower::history_prior`] at those weights.
    pub fn weighted(&self, transitions_weight: &Tensor, spectral_weight: Option<&Tensor>) -> Tensor {
        let device = self.transitions.device();
        let prior = &self.transitions * transitions_weight.to_device(device);
        match (&self.spectral, spectral_weight) {
            (Some(term), Some(weight)) => prior + term * weight.to_device(device),
            _ => prior,
        }
    }

    /// Both terms through the same tensor operation `f` (a range, some rows or columns).
    pub fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> HistoryPriorTerms {
        HistoryPriorTerms { transitions: f(&self.transitions), spectral: self.spectral.as_ref().map(f) }
    }
}

/// Each history's last `recency.len()` items, most recent first, as rows to gather and their
/// weights (`recency`), flat, `recency.len()` per history: a missing item (a short history)
/// or one outside the catalogue is row 0 at weight 0.
fn last_items(histories: &[&[ItemIndex]], recency: &[f64], catalogue: i64) -> (Vec<i64>, Vec<f32>) {
    let (mut rows, mut weights) = (Vec::new(), Vec::new());
    for history in histories {
        for (k, weight) in recency.iter().enumerate() {
            match history.len().checked_sub(k + 1).map(|i| history[i]) {
                Some(item) if i64::from(item) < catalogue => {
                    rows.push(i64::from(item));
                    weights.push(*weight as f32);
                }
                _ => {
                    rows.push(0);
                    weights.push(0.0);
                }
            }
        }
    }
    (rows, weights)
}

/// Each item's neighbours and their estimated counts, decoded from a pair sketch
/// (`guild_proto::tower::sketch_neighbours`), `[catalogue, M]` each, row-major.
#[derive(Debug)]
pub struct DecodedSketch {
    pub lists: Vec<i64>,
    pub estimates: Vec<f32>,
    /// The spectral prior's feature rows of this decoding, computed once, when first asked
    /// for ([`DecodedSketch::spectral`]): every tower at this version shares them.
    spectral: std::sync::OnceLock<Vec<f32>>,
}

impl DecodedSketch {
    fn new(lists: Vec<i64>, estimates: Vec<f32>) -> Self {
        Self { lists, estimates, spectral: std::sync::OnceLock::new() }
    }

    /// The spectral prior's feature rows of a tower of `shape` with this decoding,
    /// `[catalogue, spectral]` row-major (`guild_proto::tower::spectral_features`); seconds
    /// of work the first time, shared after.
    pub fn spectral(&self, shape: &TowerShape) -> &[f32] {
        self.spectral.get_or_init(|| {
            let started = std::time::Instant::now();
            let lists: Vec<u32> = self.lists.iter().map(|&i| i as u32).collect();
            let threads = std::thread::available_parallelism().map_or(1, usize::from);
            let features = guild_proto::tower::spectral_features(shape, &lists, &self.estimates, threads);
            tracing::debug!(seconds = started.elapsed().as_secs_f64(), "spectral features computed");
            features
        })
    }
}

/// The pair sketch `sketch` of a tower of `shape` decoded, from a cache of the last few
/// sketches decoded in this process: decoding costs seconds, and every tower a process builds
/// at one adapter version (each merchant of a simulation, each evaluation, `serve`'s model)
/// decodes the same sketch. An all-zero sketch (the start) decodes without the work: every
/// estimate is zero, and each item's neighbours are the first `M` other items.
pub fn decoded_sketch(shape: &TowerShape, sketch: &[f32]) -> Arc<DecodedSketch> {
    type Entry = (TowerShape, Vec<f32>, Arc<DecodedSketch>);
    static CACHE: std::sync::Mutex<Vec<Entry>> = std::sync::Mutex::new(Vec::new());
    const KEPT: usize = 2;
    let (n, m) = (shape.catalogue, shape.neighbours);
    if sketch.iter().all(|&v| v == 0.0) {
        let lists = (0..n as i64).flat_map(|i| (0..n as i64).filter(move |&j| j != i).take(m)).collect();
        return Arc::new(DecodedSketch::new(lists, vec![0.0; n * m]));
    }
    let mut cache = CACHE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, _, decoded)) = cache.iter().find(|(s, v, _)| s == shape && v.as_slice() == sketch) {
        return Arc::clone(decoded);
    }
    let started = std::time::Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let (lists, estimates) = guild_proto::tower::sketch_neighbours(shape, sketch, threads);
    let decoded = Arc::new(DecodedSketch::new(lists.into_iter().map(i64::from).collect(), estimates));
    tracing::debug!(
        items = n,
        per_item = m,
        seconds = started.elapsed().as_secs_f64(),
        "pair sketch decoded"
    );
    if cache.len() >= KEPT {
        cache.remove(0);
    }
    cache.push((*shape, sketch.to_vec(), Arc::clone(&decoded)));
    decoded
}

/// `ln(1 + v/(κ·v̄))` of a summed statistic `w` (the histogram or the counts), with
/// `v = max(w − threshold·σ̂, 0)` and σ̂ estimated from its negative entries (noise):
/// `guild_proto::tower::popularity_prior`'s formula, in libtorch (`threshold` the
/// `guild_proto::tower::noise_threshold` of the statistic's length; the counts' own rule is
/// `guild_proto::tower::counts_log`).
fn accumulated_log(sum: &Tensor, threshold: f64) -> Tensor {
    log_above(sum, &noise_deviation(sum), threshold)
}

/// [`accumulated_log`] at a noise deviation `sigma` already estimated.
fn log_above(sum: &Tensor, sigma: &Tensor, threshold: f64) -> Tensor {
    let kept = (sum - sigma * threshold).clamp_min(0.0);
    let scale = (kept.mean(Kind::Float) * POPULARITY_SMOOTHING).clamp_min(1e-30);
    (kept / scale).log1p()
}

/// σ̂ of a summed statistic, a scalar tensor: the root mean square of its negative entries
/// (every contribution is non-negative, so they are noise), 0 when none is negative.
fn noise_deviation(sum: &Tensor) -> Tensor {
    let count = sum.lt(0.0).sum(Kind::Float).clamp_min(1.0);
    (sum.clamp_max(0.0).square().sum(Kind::Float) / count).sqrt()
}

/// Each catalogue item's `M` title neighbours: the items whose title vectors are closest to
/// its own by cosine, itself left out, nearest first. Computed from the public catalogue
/// embeddings alone, so every merchant derives the same lists (up to floating-point ties
/// between near-equal neighbours on different hardware), and cheap to share (the lists sit
/// behind an `Arc`).
#[derive(Clone, Debug, PartialEq)]
pub struct TitleNeighbours {
    per_item: usize,
    lists: Arc<[i64]>,
}

impl TitleNeighbours {
    /// The `m` nearest titles of every row of `items` (`[catalogue, hidden]`).
    pub fn of_items(items: &Tensor, m: usize) -> Result<Self, super::ModelError> {
        let bad = |reason: String| super::ModelError::AdapterShape(reason);
        let (n, _) = items.size2().map_err(|e| bad(format!("catalogue embeddings: {e}")))?;
        if m == 0 || m as i64 >= n {
            return Err(bad(format!("{m} title neighbours in a catalogue of {n} items")));
        }
        let lists = tch::no_grad(|| {
            let unit = normalise(&items.to_kind(Kind::Float).to(Device::Cpu));
            let mut lists = Vec::with_capacity(n as usize * m);
            let chunk = 1024;
            for start in (0..n).step_by(chunk) {
                let len = chunk.min((n - start) as usize) as i64;
                let rows = Tensor::arange_start(start, start + len, (Kind::Int64, Device::Cpu));
                let similarity = unit.narrow(0, start, len).matmul(&unit.tr()).scatter_value(
                    1,
                    &rows.unsqueeze(1),
                    f64::NEG_INFINITY,
                );
                let (_, nearest) = similarity.topk(m as i64, 1, true, true);
                lists.extend(Vec::<i64>::try_from(nearest.flatten(0, -1)).expect("int64 indices"));
            }
            lists
        });
        Ok(Self { per_item: m, lists: lists.into() })
    }

    /// M: neighbours per item.
    pub fn per_item(&self) -> usize {
        self.per_item
    }

    pub fn catalogue(&self) -> usize {
        self.lists.len() / self.per_item.max(1)
    }

    /// Item `item`'s neighbours, nearest first (empty outside the catalogue).
    pub fn of(&self, item: ItemIndex) -> &[i64] {
        let start = item as usize * self.per_item;
        self.lists.get(start..start + self.per_item).unwrap_or(&[])
    }

    /// Where the pair (`from`, `to`) sits in the counts, `from · M + j` for `to` the `j`-th
    /// neighbour of `from`; `None` if `to` is not among them.
    pub fn slot(&self, from: ItemIndex, to: ItemIndex) -> Option<usize> {
        let j = self.of(from).iter().position(|&n| n == i64::from(to))?;
        Some(from as usize * self.per_item + j)
    }

    /// The lists as a `[catalogue, M]` int64 tensor on the CPU.
    pub fn tensor(&self) -> Tensor {
        Tensor::from_slice(&self.lists).view([self.catalogue() as i64, self.per_item as i64])
    }
}

/// Where the item-to-item statistic counts a pair: the slot of a title neighbour
/// ([`TitleNeighbours::slot`]; pairs of items that are not title neighbours are not counted),
/// or the pair sketch's buckets, one a row, over every pair
/// (`guild_proto::tower::sketch_bucket`).
#[derive(Clone, Debug, PartialEq)]
pub enum PairSlots {
    Titles(TitleNeighbours),
    Sketch { buckets: usize },
}

impl PairSlots {
    /// How a tower of `shape` counts pairs, given the catalogue's title neighbours (which
    /// only a shape without a pair sketch needs); `None` without item-to-item counts.
    pub fn of(
        shape: &TowerShape,
        titles: impl FnOnce() -> Result<TitleNeighbours, super::ModelError>,
    ) -> Result<Option<Self>, super::ModelError> {
        Ok(if shape.neighbours == 0 {
            None
        } else if shape.pair_sketch > 0 {
            Some(Self::Sketch { buckets: shape.pair_sketch })
        } else {
            Some(Self::Titles(titles()?))
        })
    }

    /// Adds `weight` for the pair (`from`, `to`) to `counts`.
    fn add(&self, from: ItemIndex, to: ItemIndex, weight: f32, counts: &mut BTreeMap<usize, f64>) {
        match self {
            Self::Titles(neighbours) => {
                if let Some(slot) = neighbours.slot(from, to) {
                    *counts.entry(slot).or_default() += f64::from(weight);
                }
            }
            // An item with itself is never its own neighbour.
            Self::Sketch { .. } if from == to => {}
            Self::Sketch { buckets } => {
                for row in 0..guild_proto::tower::SKETCH_ROWS {
                    let index = guild_proto::tower::sketch_bucket(*buckets, row, from as usize, to as usize);
                    *counts.entry(index).or_default() += f64::from(weight);
                }
            }
        }
    }
}

/// A shopper's contribution to the item-to-item counts: a unit vector over the slots
/// ([`PairSlots`]) of the pairs in its training history (every item but the validation
/// target): each transition counts `guild_proto::tower::TRANSITION_WEIGHT`, each pair within
/// the co-occurrence window `CO_OCCURRENCE_WEIGHT` in both directions, before the scaling;
/// `(slot, value)` pairs in slot order, empty for a shopper with no counted pair.
pub fn transitions_contribution(user: &User, slots: &PairSlots) -> Vec<(usize, f32)> {
    let n = user.history.len();
    let mut counts = BTreeMap::<usize, f64>::new();
    item_pairs(&user.history[..n.saturating_sub(1)], |from, to, weight| {
        slots.add(from, to, weight, &mut counts)
    });
    let norm = counts.values().map(|c| c * c).sum::<f64>().sqrt();
    counts.into_iter().map(|(slot, c)| (slot, (c / norm) as f32)).collect()
}

/// Hands `add` every item-to-item pair of `items` (a history, oldest first) with its weight:
/// each transition (the previous item to the next) `guild_proto::tower::TRANSITION_WEIGHT`,
/// and each pair within `CO_OCCURRENCE_WINDOW` positions `CO_OCCURRENCE_WEIGHT` in both
/// directions (a transition is also a co-occurrence). The federated counts and the exact
/// count ranker (`retrieval::counts`) both count with it.
pub fn item_pairs(items: &[ItemIndex], mut add: impl FnMut(ItemIndex, ItemIndex, f32)) {
    for (k, &item) in items.iter().enumerate() {
        if k >= 1 {
            add(items[k - 1], item, TRANSITION_WEIGHT);
        }
        for &earlier in &items[k.saturating_sub(CO_OCCURRENCE_WINDOW)..k] {
            add(earlier, item, CO_OCCURRENCE_WEIGHT);
            add(item, earlier, CO_OCCURRENCE_WEIGHT);
        }
    }
}

/// A shopper's contribution to the tower's summed statistics, indexed over the accumulated
/// range (`guild_proto::tower::accumulated_range`: the histogram's `catalogue` items, then
/// the counts' slots): its popularity contribution alone without `neighbours`, else that at
/// `√(1 − a)` and its item-to-item contribution at `√a` (a =
/// `guild_proto::tower::COUNTS_SHARE`), so the whole is still a unit vector (either alone at
/// full weight when the other is empty).
pub fn statistics_contribution(
    user: &User,
    catalogue: usize,
    neighbours: Option<&PairSlots>,
) -> Vec<(usize, f32)> {
    let popularity = popularity_contribution(user);
    let Some(neighbours) = neighbours else { return popularity };
    let transitions = transitions_contribution(user, neighbours);
    let share = guild_proto::tower::COUNTS_SHARE;
    let (to_popularity, to_counts) = if popularity.is_empty() || transitions.is_empty() {
        (1.0, 1.0)
    } else {
        ((1.0 - share).sqrt() as f32, share.sqrt() as f32)
    };
    popularity
        .into_iter()
        .map(|(item, v)| (item, v * to_popularity))
        .chain(transitions.into_iter().map(|(slot, v)| (catalogue + slot, v * to_counts)))
        .collect()
}

/// The sum of `users`' statistics contributions ([`statistics_contribution`]), by index.
pub fn statistics_sum(
    users: &[&User],
    catalogue: usize,
    neighbours: Option<&PairSlots>,
) -> BTreeMap<usize, f32> {
    let mut sum = BTreeMap::<usize, f32>::new();
    for user in users {
        for (index, value) in statistics_contribution(user, catalogue, neighbours) {
            *sum.entry(index).or_default() += value;
        }
    }
    sum
}

/// A shopper's contribution to the popularity histogram: a unit vector over the distinct
/// items of its training history (every item but the validation target), each weighted
/// `γ^k` for its `k`-th most recent occurrence (summed over repeats; γ =
/// [`POPULARITY_RECENCY`]) before the scaling, as `(item, value)` pairs in item order;
/// empty for a shopper with no such item.
pub fn popularity_contribution(user: &User) -> Vec<(usize, f32)> {
    let n = user.history.len();
    let training = &user.history[..n.saturating_sub(1)];
    let mut weights = BTreeMap::<usize, f64>::new();
    let mut weight = 1.0;
    for &item in training.iter().rev() {
        *weights.entry(item as usize).or_default() += weight;
        weight *= POPULARITY_RECENCY;
    }
    let norm = weights.values().map(|w| w * w).sum::<f64>().sqrt();
    weights.into_iter().map(|(item, w)| (item, (w / norm) as f32)).collect()
}

/// The sum of `users`' popularity contributions, by item (sparse; summed in `users`' order).
pub fn popularity_sum(users: &[&User]) -> BTreeMap<usize, f32> {
    // Without neighbours a shopper's statistics are its popularity contribution alone.
    statistics_sum(users, 0, None)
}

/// The sum of `users`' popularity contributions over a catalogue of `catalogue` items
/// (what a federation's histogram estimates, up to scale and noise); items outside the
/// catalogue are left out.
pub fn popularity_histogram(users: &[&User], catalogue: usize) -> Vec<f32> {
    let mut histogram = vec![0.0; catalogue];
    for (item, value) in popularity_sum(users) {
        if let Some(h) = histogram.get_mut(item) {
            *h = value;
        }
    }
    histogram
}

/// `x / ‖x‖` row by row.
pub fn normalise(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
}

/// One training row of the tower: a window of consecutive items of one shopper's training
/// history, and the item that followed each of its positions from `first_target` on (the
/// positions before it are context only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TowerRow<'a> {
    pub window: &'a [ItemIndex],
    /// `next[p]` followed `window[..=p]`; `next.len() == window.len()`.
    pub next: &'a [ItemIndex],
    pub first_target: usize,
}

impl TowerRow<'_> {
    /// The targets this row trains on.
    pub fn targets(&self) -> usize {
        self.window.len() - self.first_target
    }
}

/// The rows that cover a user's training examples (`User::training_examples`) exactly once,
/// each prefix seen through the same last-`length` window as at inference: one row for
/// every prefix of up to `length` items, then one row per longer prefix (its last `length`
/// items, trained at the last position only).
pub fn tower_rows(user: &User, length: usize) -> Vec<TowerRow<'_>> {
    let h = &user.history;
    // Training examples: h[..k] → h[k] for 1 ≤ k ≤ n − 2.
    let examples = h.len().saturating_sub(2);
    if examples == 0 || length == 0 {
        return Vec::new();
    }
    let short = examples.min(length);
    let mut rows = vec![TowerRow { window: &h[..short], next: &h[1..=short], first_target: 0 }];
    for k in length + 1..=examples {
        rows.push(TowerRow {
            window: &h[k - length..k],
            next: &h[k - length + 1..=k],
            first_target: length - 1,
        });
    }
    rows
}

/// The last `length` items of each history (all of a shorter one).
pub fn last_windows<'h>(histories: &[&'h [ItemIndex]], length: usize) -> Vec<&'h [ItemIndex]> {
    histories.iter().map(|h| &h[h.len().saturating_sub(length)..]).collect()
}

/// The item vectors of each window (at most `length` items), left-aligned and right-padded
/// with zeros to the longest window, `[batch, m, hidden]`, and which positions hold an item,
/// `[batch, m]`.
pub fn gather_windows(items: &Tensor, windows: &[&[ItemIndex]], length: i64) -> (Tensor, Tensor) {
    let (index, valid) = window_index(windows, length, items.device());
    let (b, m) = valid.size2().expect("[batch, m]");
    let hidden = items.size()[1];
    let sequence =
        items.index_select(0, &index).view([b, m, hidden]) * valid.unsqueeze(-1).to_kind(items.kind());
    (sequence, valid)
}

/// The catalogue index of each window position (at most `length` items a window,
/// left-aligned, right-padded with item 0 to the longest window), flat `[batch · m]`, and
/// which positions hold an item, `[batch, m]`.
pub fn window_index(windows: &[&[ItemIndex]], length: i64, device: Device) -> (Tensor, Tensor) {
    let m = windows.iter().map(|w| w.len()).max().unwrap_or(0).clamp(1, length as usize);
    let mut index = Vec::with_capacity(windows.len() * m);
    let mut valid = Vec::with_capacity(windows.len() * m);
    for w in windows {
        let w = &w[..w.len().min(m)];
        let pad = m - w.len();
        index.extend(w.iter().map(|&i| i64::from(i)).chain(std::iter::repeat_n(0i64, pad)));
        valid.extend(std::iter::repeat_n(true, w.len()).chain(std::iter::repeat_n(false, pad)));
    }
    let (b, m) = (windows.len() as i64, m as i64);
    (Tensor::from_slice(&index).to(device), Tensor::from_slice(&valid).view([b, m]).to(device))
}

/// `pooled_p = Σ_j w_j · v_(p−j)` at every position `p` of `sequence` `[batch, m, hidden]`:
/// recency-weighted pooling of each prefix, `weights[0]` for its most recent item
/// (a lower-triangular Toeplitz matrix of the weights).
pub fn pool(sequence: &Tensor, weights: &Tensor) -> Tensor {
    let m = sequence.size()[1];
    let device = sequence.device();
    let position = Tensor::arange(m, (Kind::Int64, device));
    let lag = position.unsqueeze(1) - position.unsqueeze(0);
    let toeplitz =
        weights.to_kind(sequence.kind()).index_select(0, &lag.clamp_min(0).flatten(0, -1)).view([m, m])
            * lag.ge(0).to_kind(sequence.kind());
    toeplitz.matmul(sequence)
}

/// Row `b` of `[batch, m, hidden]` at window `b`'s last item, `[batch, hidden]`.
pub fn last_positions(sequence: &Tensor, windows: &[&[ItemIndex]]) -> Tensor {
    let (b, m, hidden) = sequence.size3().expect("[batch, length, hidden]");
    let flat: Vec<i64> =
        windows.iter().enumerate().map(|(row, w)| row as i64 * m + (w.len().max(1) as i64 - 1)).collect();
    sequence.reshape([b * m, hidden]).index_select(0, &Tensor::from_slice(&flat).to(sequence.device()))
}

/// The zero-shot ranker's scores: the cosine of the mean of each history's last
/// `zero_shot_items` item vectors with every item, `[batch, items]`.
pub fn zero_shot_scores(items: &Tensor, histories: &[&[ItemIndex]], shape: &TowerShape) -> Tensor {
    let windows = last_windows(histories, shape.history);
    let (sequence, _) = gather_windows(items, &windows, shape.history as i64);
    let weights =
        Tensor::from_slice(&zero_shot_weights(shape.history, shape.zero_shot_items)).to(items.device());
    normalise(&last_positions(&pool(&sequence, &weights), &windows)).matmul(&normalise(items).tr())
}

#[cfg(test)]
mod tests {
    use guild_proto::tower::TRANSITIONS_WEIGHT;

    use super::*;
    use crate::data::Example;

    const CATALOGUE: usize = 60;

    fn catalogue(n: i64, hidden: i64) -> Tensor {
        tch::manual_seed(11);
        normalise(&Tensor::randn([n, hidden], (Kind::Float, Device::Cpu)))
    }

    fn histories() -> Vec<Vec<ItemIndex>> {
        // Short (padding), exactly five, and longer than L.
        vec![vec![3], vec![1, 2], (0..5).collect(), (10..40).collect(), vec![7, 7, 8, 9, 3, 1, 4]]
    }

    fn config() -> TowerConfig {
        TowerConfig {
            shape: TowerShape {
                hidden: 12,
                history: 8,
                zero_shot_items: 5,
                item_rank: 4,
                width: 16,
                layers: 2,
                heads: 4,
                catalogue: CATALOGUE,
                neighbours: 0,
                pair_sketch: 0,
                item_ids: 0,
                spectral: 0,
            },
            seed: 3,
        }
    }

    fn with_neighbours(m: usize) -> TowerConfig {
        let mut config = config();
        config.shape.neighbours = m;
        config
    }

    /// A tower over [`CATALOGUE`] items with 3 neighbours per item from a pair sketch of 1,024
    /// buckets a row and a spectral prior of rank 4, and its shape.
    fn spectral_tower() -> (TowerShape, Tower) {
        let mut config = with_neighbours(3);
        config.shape.pair_sketch = 1024;
        config.shape.spectral = 4;
        (config.shape, Tower::new(config, Device::Cpu).expect("tower"))
    }

    /// Forty shoppers in two groups, each buying six of its own ten items (0..10 for the even
    /// ones, 30..40 for the odd ones).
    fn two_groups() -> Vec<User> {
        (0..40u32)
            .map(|u| {
                let base = if u % 2 == 0 { 0 } else { 30 };
                User {
                    id: format!("u{u}"),
                    history: (0..6).map(|j| base + (u * 3 + j * 7) % 10).collect(),
                    test_target: 0,
                }
            })
            .collect()
    }

    #[test]
    fn title_neighbours_are_the_nearest_other_items_by_cosine() {
        // Four items on a circle, 0 and 1 close, 2 and 3 close, the pairs far apart.
        let angles = [0.0f32, 0.1, 2.0, 2.3, 4.0];
        let flat: Vec<f32> = angles.iter().flat_map(|a| [a.cos() * 3.0, a.sin() * 3.0]).collect();
        let items = Tensor::from_slice(&flat).view([5, 2]);
        let neighbours = TitleNeighbours::of_items(&items, 2).expect("neighbours");
        assert_eq!((neighbours.catalogue(), neighbours.per_item()), (5, 2));
        assert_eq!(neighbours.of(0), &[1, 2], "nearest first, itself left out");
        assert_eq!(neighbours.of(2), &[3, 1]);
        assert_eq!(neighbours.slot(2, 1), Some(2 * 2 + 1));
        assert_eq!(neighbours.slot(2, 4), None, "not a neighbour");
        assert!(neighbours.of(9).is_empty(), "outside the catalogue");
        assert!(TitleNeighbours::of_items(&items, 5).is_err(), "as many neighbours as items");
        assert!(TitleNeighbours::of_items(&items, 0).is_err());
    }

    #[test]
    fn a_shoppers_item_to_item_contribution_is_a_unit_vector_over_its_neighbouring_pairs() {
        // Items 0..6 on a line: each item's two neighbours are the items next to it.
        let flat: Vec<f32> = (0..6).flat_map(|i| [(i as f32 * 0.3).cos(), (i as f32 * 0.3).sin()]).collect();
        let items = Tensor::from_slice(&flat).view([6, 2]);
        let titles = TitleNeighbours::of_items(&items, 2).expect("neighbours");
        assert_eq!(titles.of(2), &[1, 3]);
        let neighbours = PairSlots::Titles(titles.clone());
        // Training items 1, 2, 4 (5 is the validation item): 1 → 2 is a transition and a
        // co-occurrence, 2 – 4 and 1 – 4 co-occur but are not neighbours, and nothing pairs
        // with 5.
        let user = User { id: "u".into(), history: vec![1, 2, 4, 5], test_target: 0 };
        let contribution = transitions_contribution(&user, &neighbours);
        let slot_12 = titles.slot(1, 2).expect("neighbours");
        let slot_21 = titles.slot(2, 1).expect("neighbours");
        let raw = [(slot_12, 1.3f64), (slot_21, 0.3)];
        let norm = raw.iter().map(|(_, v)| v * v).sum::<f64>().sqrt();
        let mut expected: Vec<(usize, f32)> = raw.iter().map(|&(s, v)| (s, (v / norm) as f32)).collect();
        expected.sort_by_key(|&(s, _)| s);
        assert_eq!(contribution.len(), 2, "{contribution:?}");
        for ((s, v), (es, ev)) in contribution.iter().zip(&expected) {
            assert_eq!(s, es);
            assert!((v - ev).abs() < 1e-6);
        }
        // With the histogram: one unit vector, the counts' share of its square in the counts.
        let both = statistics_contribution(&user, 6, Some(&neighbours));
        let (histogram, counts): (Vec<_>, Vec<_>) = both.iter().partition(|(i, _)| *i < 6);
        let square = |part: &[&(usize, f32)]| part.iter().map(|(_, v)| f64::from(*v).powi(2)).sum::<f64>();
        assert!((square(&histogram) - 0.2).abs() < 1e-6 && (square(&counts) - 0.8).abs() < 1e-6);
        assert!(counts.iter().all(|(i, _)| *i >= 6 && *i < 6 + 12));
        // A shopper with no neighbouring pair gives its histogram alone, at full weight.
        let far = User { id: "f".into(), history: vec![0, 5, 1], test_target: 0 };
        let alone = statistics_contribution(&far, 6, Some(&neighbours));
        assert_eq!(alone, popularity_contribution(&far));
        assert_eq!(statistics_contribution(&user, 6, None), popularity_contribution(&user));
    }

    /// `guild_proto::tower::counts_log`, the counts' rule, over a tensor.
    fn counts_log(counts: &Tensor) -> Tensor {
        let values = Vec::<f32>::try_from(counts).expect("float32 counts");
        Tensor::from_slice(&guild_proto::tower::counts_log(&values))
    }

    #[test]
    fn counts_that_are_all_noise_give_no_prior_and_strong_counts_survive_it() {
        // 16,859 × 32 counts of pure Gaussian noise (σ = 2), as a merchant-level DP sum of
        // counts is: above the threshold (Φ⁻¹(1 − 10⁻³/d) deviations) no entry survives
        // (any survives with probability at most 10⁻³ for an unseeded draw; the seed makes
        // it exact). A fixed 3σ̂ would have kept about 0.13% of them (~730), each scored as
        // a prior larger than any cosine.
        let d = 16_859 * 32;
        tch::manual_seed(11);
        let noise = Tensor::randn([d as i64], (Kind::Float, Device::Cpu)) * 2.0;
        let threshold = guild_proto::tower::noise_threshold(d);
        assert!(threshold > 5.8, "{threshold}");
        let survivors = |t: &Tensor| t.gt(0.0).sum(Kind::Int64).int64_value(&[]);
        let thresholded = accumulated_log(&noise, threshold);
        assert_eq!(survivors(&thresholded), 0, "{} noise entries kept", survivors(&thresholded));
        let three_sigma = accumulated_log(&noise, 3.0);
        assert!(survivors(&three_sigma) > 500, "3σ̂ keeps {}", survivors(&three_sigma));
        assert!(three_sigma.max().double_value(&[]) > 5.0, "and scores them far above a cosine");
        // The counts' own rule keeps nothing of it either: about 126 entries pass the lower
        // level, not significantly more than noise gives (at most 162 but once in a
        // thousand), so the strict threshold applies.
        assert_eq!(
            survivors(&counts_log(&noise)),
            0,
            "{} noise entries kept",
            survivors(&counts_log(&noise))
        );
        // A thousand counts at 4.5σ, between the two levels: the counts' rule keeps about 84%
        // of them (with the noise entries above 3.5σ̂, about 126), the strict level about 8%.
        let mut moderate = vec![0.0f32; d];
        for k in 0..1_000 {
            moderate[k * 500 + 7] = 9.0;
        }
        let summed = &noise + Tensor::from_slice(&moderate);
        let rows = Tensor::from_slice(&(0..1_000).map(|k| k * 500 + 7i64).collect::<Vec<_>>());
        let lenient = counts_log(&summed);
        let found = lenient.index_select(0, &rows).gt(0.0).sum(Kind::Int64).int64_value(&[]);
        assert!(found > 800, "{found} of the 1,000 moderate counts kept");
        assert!(survivors(&lenient) < found + 250, "{} kept in all", survivors(&lenient));
        let strict = accumulated_log(&summed, threshold);
        assert!(survivors(&strict) < 200, "the strict level keeps {}", survivors(&strict));
        // Twenty counts at 20σ on top of the noise are kept, and rank first.
        let mut signal = vec![0.0f32; d];
        for k in 0..20 {
            signal[k * 1_000] = 40.0;
        }
        let summed = &noise + Tensor::from_slice(&signal);
        let kept = accumulated_log(&summed, threshold);
        let strong = Tensor::from_slice(&(0..20).map(|k| k * 1_000i64).collect::<Vec<_>>());
        assert!(
            kept.index_select(0, &strong).gt(0.0).all().int64_value(&[]) == 1,
            "the strong counts survive"
        );
        assert_eq!(survivors(&kept), 20, "the strong counts alone");
        // Exact counts (no negative entry, so σ̂ = 0) are kept whatever the threshold.
        let exact = Tensor::from_slice(&signal);
        assert!(accumulated_log(&exact, threshold).equal(&accumulated_log(&exact, 3.0)));
    }

    #[test]
    fn the_item_to_item_prior_is_zero_at_start_and_adds_its_formula_to_the_scores() {
        let items = catalogue(CATALOGUE as i64, 12);
        let neighbours = TitleNeighbours::of_items(&items, 4).expect("neighbours");
        let mut tower = Tower::new(with_neighbours(4), Device::Cpu).expect("tower");
        tower.set_neighbours(&neighbours).expect("neighbours fit");
        let owned = histories();
        let histories: Vec<&[ItemIndex]> = owned.iter().map(Vec::as_slice).collect();
        // At start the counts are empty: still exactly zero-shot.
        let start = tch::no_grad(|| tower.scores(&items, &histories));
        assert!(start.equal(&zero_shot_scores(&items, &histories, &config().shape)));
        // One count: item 4 to its first neighbour. A history ending in 4 (weight 1) and one
        // with 4 two items back (weight 0.25) gain β_t·ln(1 + v/v̄)·r on that neighbour only.
        let mut counts = vec![0.0f32; CATALOGUE * 4];
        counts[4 * 4] = 2.0;
        tower.set_transitions(&counts).expect("counts");
        let target = neighbours.of(4)[0];
        let histories: [&[ItemIndex]; 3] = [&[9, 4], &[4, 7, 8], &[7, 8, 9]];
        let prior = tower.history_prior(&histories).expect("a prior");
        let mean = 2.0 / (CATALOGUE * 4) as f64;
        let expected = TRANSITIONS_WEIGHT * (2.0 / mean).ln_1p();
        let value = |row: i64, item: i64| prior.double_value(&[row, item]);
        assert!((value(0, target) - expected).abs() < 1e-5, "{} against {expected}", value(0, target));
        assert!((value(1, target) - 0.25 * expected).abs() < 1e-5);
        let total = prior.abs().sum(Kind::Float).double_value(&[]);
        assert!((total - value(0, target) - value(1, target)).abs() < 1e-5, "nothing else: {total}");
        // The scores carry it; a tower without neighbours set adds none (and says so).
        let scores = tch::no_grad(|| tower.scores(&items, &histories));
        let mut plain = Tower::new(with_neighbours(4), Device::Cpu).expect("tower");
        plain.set_transitions(&counts).expect("counts");
        let without = tch::no_grad(|| plain.scores(&items, &histories));
        assert!(((scores - without) - prior).abs().max().double_value(&[]) < 1e-6);
        // Neighbours of another shape are refused.
        let other = TitleNeighbours::of_items(&items, 3).expect("neighbours");
        assert!(tower.set_neighbours(&other).is_err());
        // The counts are never trained: a backward pass leaves no gradient on them.
        assert!(!tower.vars[TRANSITIONS].requires_grad());
        // β_t is the tower's own value (chosen on validation, never trained): doubled, it
        // doubles the prior and moves nothing else.
        assert!(!tower.vars[TRANSITIONS_WEIGHT_TENSOR].requires_grad());
        let once = tower.history_prior(&histories).expect("a prior");
        let shape = tower.config().shape;
        let doubled =
            guild_proto::tower::with_transitions_weight(&shape, &tower.offset(), 2.0 * TRANSITIONS_WEIGHT)
                .expect("a tower with counts has β_t");
        tower.set_offset(&doubled).expect("offset");
        let twice = tower.history_prior(&histories).expect("a prior");
        assert!((twice - once * 2.0).abs().max().double_value(&[]) < 1e-6);
    }

    #[test]
    fn a_sketched_tower_is_zero_shot_at_start_then_finds_the_items_shoppers_go_to_next() {
        let items = catalogue(CATALOGUE as i64, 12);
        let mut sketched = with_neighbours(4);
        sketched.shape.pair_sketch = 256;
        let mut tower = Tower::new(sketched.clone(), Device::Cpu).expect("tower");
        assert!(!tower.needs_neighbours(), "its neighbours come from its own sketch");
        let owned = histories();
        let histories: Vec<&[ItemIndex]> = owned.iter().map(Vec::as_slice).collect();
        let start = tch::no_grad(|| tower.scores(&items, &histories));
        assert!(start.equal(&zero_shot_scores(&items, &histories, &config().shape)));
        // Shoppers who all go 10 → 50 → 20 (items far apart by title, as far as the
        // catalogue's random vectors go): after the sketch of their pairs is summed, 50 is
        // item 10's first neighbour and 20 item 50's, and a history ending in 10 ranks 50
        // above where zero-shot put it.
        let slots = PairSlots::Sketch { buckets: 256 };
        let users: Vec<User> = (0..30)
            .map(|u| User { id: format!("u{u}"), history: vec![10, 50, 20, 59], test_target: 0 })
            .collect();
        let refs: Vec<&User> = users.iter().collect();
        let one = transitions_contribution(&users[0], &slots);
        let norm: f64 = one.iter().map(|(_, v)| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-6, "a unit vector: {norm}");
        assert!(one.iter().all(|(i, _)| *i < guild_proto::tower::SKETCH_ROWS * 256));
        tower.set_statistics(&statistics_sum(&refs, CATALOGUE, Some(&slots))).expect("statistics");
        let lists = tower.neighbours.as_ref().expect("decoded neighbours");
        assert_eq!(lists.int64_value(&[10, 0]), 50);
        assert_eq!(lists.int64_value(&[50, 0]), 20);
        let after: [&[ItemIndex]; 1] = [&[3, 10]];
        let prior = tower.history_prior(&after).expect("a prior");
        let best = prior.argmax(1, false).int64_value(&[0]);
        assert!(best == 50 || best == 20, "the prior's top item after 10 is {best}");
        assert!(prior.double_value(&[0, 50]) > 0.0);
        // The same sketch decodes the same lists in another tower (the cache, or not).
        let mut again = Tower::new(sketched, Device::Cpu).expect("tower");
        again.set_offset(&tower.offset()).expect("offset");
        assert!(again.neighbours.as_ref().expect("decoded").equal(lists));
    }

    #[test]
    fn the_spectral_prior_is_zero_at_start_and_lifts_items_that_share_neighbours() {
        use guild_proto::tower::with_spectral_weight;
        let items = catalogue(CATALOGUE as i64, 12);
        let (shape, mut tower) = spectral_tower();
        let owned = histories();
        let histories: Vec<&[ItemIndex]> = owned.iter().map(Vec::as_slice).collect();
        // At start, even at a weight γ other than zero, the features are all zero: zero-shot.
        tower
            .set_offset(&with_spectral_weight(&shape, &tower.offset(), 0.5).expect("a weight"))
            .expect("offset");
        let start = tch::no_grad(|| tower.scores(&items, &histories));
        assert!(start.equal(&zero_shot_scores(&items, &histories, &shape)));
        // Two groups of shoppers, each buying six of its own ten items (0..10 or 30..40), and
        // two who bridge them, so that the table is one connected graph: each item's three
        // decoded neighbours are in its own group, and so are most items it shares them with.
        let mut users = two_groups();
        for (k, history) in [vec![9, 30], vec![39, 0]].into_iter().enumerate() {
            users.push(User { id: format!("b{k}"), history, test_target: 0 });
        }
        let refs: Vec<&User> = users.iter().collect();
        let slots = PairSlots::Sketch { buckets: 1024 };
        let at = |gamma: f64, tower: &mut Tower| {
            let offset = with_spectral_weight(&shape, &tower.offset(), gamma).expect("a weight");
            tower.set_offset(&offset).expect("offset");
        };
        tower.set_statistics(&statistics_sum(&refs, CATALOGUE, Some(&slots))).expect("statistics");
        at(0.0, &mut tower);
        let last: [&[ItemIndex]; 1] = [&[0]];
        let without = tower.history_prior(&last).expect("a prior");
        assert!(tower.spectral.get().is_none(), "γ = 0: the features are not computed");
        at(0.5, &mut tower);
        let with = tower.history_prior(&last).expect("a prior");
        let added = &with - &without;
        // The term is γ · F_c · F_0 (a one-item history), F the decoding's features.
        let features = tower.decoded.as_ref().expect("a decoding").spectral(&shape).to_vec();
        let f = |i: usize| &features[i * 4..i * 4 + 4];
        for c in [0usize, 5, 35, 50] {
            let expected: f32 = 0.5 * f(c).iter().zip(f(0)).map(|(a, b)| a * b).sum::<f32>();
            assert!((added.double_value(&[0, c as i64]) as f32 - expected).abs() < 1e-5, "item {c}");
        }
        // The items of item 0's group that are not among its decoded neighbours: the prior
        // lifts each of them above every item of the other group, and leaves items no
        // shopper touched alone.
        let lists = tower.neighbours.as_ref().expect("lists");
        let neighbours: Vec<i64> = (0..3).map(|j| lists.int64_value(&[0, j])).collect();
        assert!(neighbours.iter().all(|&n| n < 10), "{neighbours:?}");
        let other = (30..40).map(|c| added.double_value(&[0, c])).fold(f64::MIN, f64::max);
        for c in (1..10).filter(|c| !neighbours.contains(c)) {
            assert!(
                added.double_value(&[0, c]) > other + 0.05,
                "{c}: {} against {other}",
                added.double_value(&[0, c])
            );
        }
        assert_eq!(added.double_value(&[0, 50]), 0.0);
    }

    #[test]
    fn at_initialisation_the_tower_ranks_exactly_as_the_zero_shot_mean_of_the_last_five() {
        let items = catalogue(60, 12);
        let owned = histories();
        let histories: Vec<&[ItemIndex]> = owned.iter().map(Vec::as_slice).collect();
        let tower = Tower::new(config(), Device::Cpu).expect("tower");
        let ours = tch::no_grad(|| tower.scores(&items, &histories));
        let zero_shot = zero_shot_scores(&items, &histories, &config().shape);
        assert!(ours.equal(&zero_shot), "scores differ by {}", (&ours - &zero_shot).abs().max());
        // The zero-shot vector is the mean of the last five items: check one by hand.
        let mean =
            items.index_select(0, &Tensor::from_slice(&[9i64, 3, 1, 4, 8])).mean_dim(0, false, Kind::Float);
        let by_hand = normalise(&mean.unsqueeze(0)).matmul(&items.tr());
        assert!(by_hand.allclose(&zero_shot.get(4).unsqueeze(0), 1e-6, 1e-6, false));
    }

    #[test]
    fn one_row_gives_every_training_prefix_exactly_its_own_shopper_vector() {
        let items = catalogue(60, 12);
        let mut tower = Tower::new(config(), Device::Cpu).expect("tower");
        // Non-zero everywhere, so that the transformer and the residual take part.
        let n = tower.parameter_count();
        let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1e4 - 0.05).collect();
        tower.set_flat(&values).expect("set");
        let length = config().shape.history;
        for (id, history) in histories().into_iter().chain([(20..33).collect(), vec![5, 6, 7]]).enumerate() {
            let user = User { id: id.to_string(), history, test_target: 0 };
            let rows = tower_rows(&user, length);
            let examples: Vec<Example<'_>> = user.training_examples().collect();
            assert_eq!(rows.iter().map(TowerRow::targets).sum::<usize>(), examples.len(), "user {id}");
            let windows: Vec<&[ItemIndex]> = rows.iter().map(|r| r.window).collect();
            let sequence = tch::no_grad(|| tower.sequence(&items, &windows));
            let mut covered = Vec::new();
            for (r, row) in rows.iter().enumerate() {
                assert!(row.window.len() <= length);
                for p in row.first_target..row.window.len() {
                    covered.push((
                        row.window[..=p].to_vec(),
                        row.next[p],
                        sequence.get(r as i64).get(p as i64),
                    ));
                }
            }
            for (example, (window, target, vector)) in examples.iter().zip(covered) {
                assert_eq!(target, example.target, "user {id}");
                assert!(example.history.ends_with(&window), "user {id}: the window is the prefix's tail");
                let alone = tch::no_grad(|| tower.shoppers(&items, &[example.history])).get(0);
                assert!(
                    vector.allclose(&alone, 1e-5, 1e-6, false),
                    "user {id}, prefix of {}: {}",
                    example.history.len(),
                    (&vector - &alone).abs().max()
                );
            }
        }
    }

    #[test]
    fn the_popularity_histogram_adds_its_prior_to_every_score_and_is_never_trained() {
        let items = catalogue(CATALOGUE as i64, 12);
        let owned = histories();
        let histories: Vec<&[ItemIndex]> = owned.iter().map(Vec::as_slice).collect();
        let mut tower = Tower::new(config(), Device::Cpu).expect("tower");
        let before = tch::no_grad(|| tower.scores(&items, &histories));
        let histogram: Vec<f32> = (0..CATALOGUE).map(|i| ((i * 37) % 11) as f32 - 2.0).collect();
        tower.set_popularity(&histogram).expect("histogram");
        let after = tch::no_grad(|| tower.scores(&items, &histories));
        // Every row moves by the same prior: β · guild_proto's formula.
        let expected: Vec<f32> = guild_proto::tower::popularity_prior(&histogram)
            .iter()
            .map(|p| p * guild_proto::tower::POPULARITY_WEIGHT_INIT as f32)
            .collect();
        let expected = Tensor::from_slice(&expected).unsqueeze(0);
        assert!((&after - &before).allclose(&expected.expand_as(&after), 1e-5, 1e-6, false));
        assert!(tower.set_popularity(&histogram[1..]).is_err(), "a wrong length is refused");
        // A training step moves β but not the histogram.
        let flat = tower.flat();
        let mut opt = nn::OptimizerConfig::build(nn::Sgd::default(), tower.var_store(), 0.1).expect("sgd");
        let loss = tower.scores(&items, &histories).square().mean(Kind::Float);
        opt.backward_step(&loss);
        let range = guild_proto::tower::popularity_range(&config().shape).expect("range");
        let moved = tower.flat();
        assert_eq!(&moved[range.clone()], &flat[range.clone()], "the histogram is summed, not trained");
        assert_ne!(moved[range.end], flat[range.end], "β trains");
    }

    #[test]
    fn a_shoppers_popularity_contribution_is_a_unit_vector_over_its_training_items_weighted_to_recent_ones() {
        let user = User { id: "u".into(), history: vec![4, 9, 4, 7, 2], test_target: 8 };
        let contribution = popularity_contribution(&user);
        // Distinct items, the validation target (2) and the test target (8) excluded.
        assert_eq!(contribution.iter().map(|&(i, _)| i).collect::<Vec<_>>(), vec![4, 7, 9]);
        let norm: f32 = contribution.iter().map(|(_, v)| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-6, "{norm}");
        // Before scaling, 7 (the latest) weighs 1, 4 weighs γ + γ³ (second and fourth most
        // recent), 9 weighs γ².
        let g = POPULARITY_RECENCY as f32;
        let raw = [g + g * g * g, 1.0, g * g];
        let raw_norm = raw.iter().map(|w| w * w).sum::<f32>().sqrt();
        for ((_, value), w) in contribution.iter().zip(raw) {
            assert!((value - w / raw_norm).abs() < 1e-6, "{value} vs {}", w / raw_norm);
        }
        assert!(contribution[1].1 > contribution[0].1 && contribution[0].1 > contribution[2].1);
        assert!(
            popularity_contribution(&User { id: "v".into(), history: vec![3], test_target: 1 }).is_empty()
        );
        let h = popularity_histogram(&[&user, &user], 10);
        assert!((h[4] - 2.0 * contribution[0].1).abs() < 1e-6 && h[2] == 0.0 && h[8] == 0.0);
    }

    #[test]
    fn spectral_features_enter_each_item_through_a_projection_that_starts_at_zero() {
        let items = catalogue(CATALOGUE as i64, 12);
        let (shape, mut tower) = spectral_tower();
        // Two groups of shoppers: a table whose features are not zero.
        let users = two_groups();
        let refs: Vec<&User> = users.iter().collect();
        let slots = PairSlots::Sketch { buckets: 1024 };
        tower.set_statistics(&statistics_sum(&refs, CATALOGUE, Some(&slots))).expect("statistics");
        let owned = histories();
        let histories: Vec<&[ItemIndex]> = owned.iter().map(Vec::as_slice).collect();
        // S = 0: the items are the title vectors (plus a zero residual), the ranking zero-shot's.
        let before = tch::no_grad(|| tower.adapt_items(&items));
        assert!(before.allclose(&items, 1e-6, 1e-6, false));
        let unmoved = tch::no_grad(|| tower.scores(&items, &histories));
        let features = tower.decoded.as_ref().expect("a decoding").spectral(&shape).to_vec();
        assert!(features.iter().any(|&f| f != 0.0), "the table has features");
        // S set: each item moves by exactly F_i·S, and gathered rows are the catalogue's.
        let range = guild_proto::tower::tensor_range(&shape, SPECTRAL_IN).expect("spectral_in");
        assert_eq!(range.len(), 4 * 12);
        let s: Vec<f32> = (0..range.len()).map(|k| ((k * 37) % 11) as f32 / 10.0 - 0.5).collect();
        let mut offset = tower.offset();
        offset[range.clone()].copy_from_slice(&s);
        tower.set_offset(&offset).expect("offset");
        let after = tch::no_grad(|| tower.adapt_items(&items));
        for (i, c) in [(5usize, 2usize), (33, 7), (50, 0)] {
            let expected: f32 = (0..4).map(|k| features[i * 4 + k] * s[k * 12 + c]).sum();
            let moved =
                after.double_value(&[i as i64, c as i64]) - before.double_value(&[i as i64, c as i64]);
            assert!(
                (moved as f32 - expected).abs() < 1e-5,
                "item {i}, coordinate {c}: {moved} against {expected}"
            );
        }
        let index = Tensor::from_slice(&[5i64, 33, 5, 50]);
        let gathered = tch::no_grad(|| tower.adapt_rows(&items.index_select(0, &index), &index));
        assert!(gathered.allclose(&after.index_select(0, &index), 1e-6, 1e-6, false));
        let moved = tch::no_grad(|| tower.scores(&items, &histories));
        assert!(!moved.allclose(&unmoved, 1e-6, 1e-6, false), "S does not reach the scores");
        // Training reaches S: its gradient is not zero.
        tower.zero_gradients();
        tower.scores(&items, &histories).select(1, 5).sum(Kind::Float).backward();
        let gradient = tower.flat_gradient();
        assert!(gradient[range].iter().any(|&g| g.abs() > 1e-6), "no gradient reaches S");
    }

    #[test]
    fn item_id_embeddings_start_at_zero_shot_and_move_only_their_own_item() {
        let items = catalogue(CATALOGUE as i64, 12);
        let owned = histories();
        let histories: Vec<&[ItemIndex]> = owned.iter().map(Vec::as_slice).collect();
        let mut config = config();
        config.shape.item_ids = 3;
        let mut tower = Tower::new(config.clone(), Device::Cpu).expect("tower");
        let zero_shot = zero_shot_scores(&items, &histories, &config.shape);
        let ours = tch::no_grad(|| tower.scores(&items, &histories));
        assert!(ours.equal(&zero_shot), "scores differ by {}", (&ours - &zero_shot).abs().max());
        // Item 7's own embedding set: its adapted vector moves and no other item's does, and
        // the catalogue's rows are what the gathered rows give.
        let before = tch::no_grad(|| tower.adapt_items(&items));
        let range = guild_proto::tower::tensor_range(&config.shape, ITEM_IDS).expect("item ids");
        let mut offset = vec![0f32; tower.parameter_count()];
        offset[range.start + 7 * 3..range.start + 8 * 3].copy_from_slice(&[0.5, -0.3, 0.2]);
        tower.set_offset(&offset).expect("offset");
        let after = tch::no_grad(|| tower.adapt_items(&items));
        let moved = (&after - &before).abs().sum_dim_intlist(1, false, Kind::Float).gt(1e-6);
        let moved: Vec<bool> = Vec::try_from(moved).expect("rows");
        assert_eq!(
            moved.iter().enumerate().filter(|&(_, &m)| m).map(|(i, _)| i).collect::<Vec<_>>(),
            vec![7]
        );
        let index = Tensor::from_slice(&[7i64, 2, 7, 59]);
        let gathered = tch::no_grad(|| tower.adapt_rows(&items.index_select(0, &index), &index));
        assert!(gathered.allclose(&after.index_select(0, &index), 1e-6, 1e-6, false));
        // Item 7's score moves; for the histories without item 7, no other item's does.
        let scores = tch::no_grad(|| tower.scores(&items, &histories));
        let column = |s: &Tensor| s.select(1, 7);
        assert!(!column(&scores).allclose(&column(&zero_shot), 1e-6, 1e-6, false), "item 7 scores as before");
        let others = Tensor::from_slice(&[0i64, 1, 2, 3]);
        let keep: Vec<i64> = (0..CATALOGUE as i64).filter(|&i| i != 7).collect();
        let keep = Tensor::from_slice(&keep);
        let unchanged = |s: &Tensor| s.index_select(0, &others).index_select(1, &keep);
        assert!(unchanged(&scores).allclose(&unchanged(&zero_shot), 1e-6, 1e-6, false));
    }

    #[test]
    fn trained_values_survive_the_flat_vector_and_change_the_ranking() {
        let items = catalogue(60, 12);
        let owned = histories();
        let histories: Vec<&[ItemIndex]> = owned.iter().map(Vec::as_slice).collect();
        let mut tower = Tower::new(config(), Device::Cpu).expect("tower");
        let n = tower.parameter_count();
        assert_eq!(tower.flat().len(), n);
        assert_eq!(tower.tensors().iter().map(|(_, s)| s.iter().product::<usize>()).sum::<usize>(), n);
        let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1e4 - 0.05).collect();
        tower.set_flat(&values).expect("set");
        assert_eq!(tower.flat(), values);
        let other = Tower::new(config(), Device::Cpu).expect("tower");
        let moved = tch::no_grad(|| tower.scores(&items, &histories));
        assert!(
            !moved.equal(&tch::no_grad(|| other.scores(&items, &histories))),
            "non-zero values change scores"
        );
        assert!(tower.set_flat(&values[1..]).is_err(), "a wrong length is refused");
        // Same seed, same initialisation; the offset from it is what is federated.
        assert_eq!(Tower::new(config(), Device::Cpu).expect("tower").flat(), other.flat());
        assert!(other.offset().iter().all(|&o| o == 0.0));
        let names: Vec<String> = other.tensors().into_iter().map(|(n, _)| n).collect();
        let spec: Vec<String> = tensors(&config().shape).into_iter().map(|t| t.name).collect();
        assert_eq!(names, spec, "the model holds exactly the tensors the coordinator's manifest names");
        let mut shifted = Tower::new(config(), Device::Cpu).expect("tower");
        shifted.set_offset(&values).expect("offset");
        let back: Vec<f32> = shifted.offset();
        assert!(back.iter().zip(&values).all(|(a, b)| (a - b).abs() < 1e-6));
    }
}
