//! The model world every arm shares: the dataset cut into merchants, the base model, the
//! catalogue's embeddings, the seeded evaluation users, and the adapter configuration;
//! training on a set of users and scoring adapter values. Used by `guild-sim run` (every
//! baseline and federated arm) and `guild-sim local`.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use guild_client::data::{Dataset, ItemIndex, Merchant, User, partition};
use guild_client::learner::Shared;
use guild_client::model::lora::{Adapters, LoraConfig};
use guild_client::model::tower::{Tower, TowerConfig, popularity_histogram, statistics_sum};
use guild_client::model::{BaseModel, default_model_dir};
use guild_client::retrieval::{self, ItemCounts, Split, TrainConfig, TrainReport};
use guild_proto::domain::AdapterFamilyName;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;

use crate::early_stopping::Patience;
use crate::results::Scores;
use crate::scenario::{EarlyStopping, Scenario};

/// Seed of the evaluation-user sample, the same for every arm and command.
pub const EVAL_USERS_SEED: u64 = 12_345;

/// What a world is built from.
#[derive(Clone, Debug)]
pub struct WorldSpec {
    /// A RecBole-format dataset folder.
    pub dataset: PathBuf,
    /// Keep only the first users of the dataset (small test runs).
    pub max_users: Option<usize>,
    /// Users per shop when cutting platform families into merchants.
    pub shop_size: usize,
    /// Keep a seeded sample of this many merchants.
    pub max_merchants: Option<usize>,
    /// Seed of the partition and of the merchant sample.
    pub seed: u64,
    pub max_tokens: usize,
    /// Where catalogue embeddings are cached.
    pub cache: PathBuf,
    /// Evaluation users: a seeded sample of the merchants' shoppers.
    pub eval_users: usize,
    /// The adapter family the arms train.
    pub family: AdapterFamilyName,
    pub lora: LoraConfig,
    /// The sequence tower's shape and seed (its `hidden` is the base model's).
    pub tower: TowerConfig,
    /// Give the sequence tower a popularity prior over the whole catalogue (`load` sets
    /// the shape's `catalogue`).
    pub popularity: bool,
}

impl WorldSpec {
    /// The world a scenario runs in.
    pub fn of(scenario: &Scenario) -> Self {
        let d = &scenario.data;
        let rank = scenario.federation.rank;
        Self {
            dataset: d.dataset.clone(),
            max_users: d.max_users,
            shop_size: d.shop_size,
            max_merchants: d.max_merchants,
            seed: d.seed,
            max_tokens: d.max_tokens,
            cache: d.cache.clone(),
            eval_users: d.eval_users,
            family: scenario.federation.family,
            lora: LoraConfig { rank: rank as i64, alpha: 2.0 * rank as f64, ..LoraConfig::default() },
            tower: TowerConfig { shape: scenario.federation.tower, seed: 0 },
            popularity: scenario.federation.family == AdapterFamilyName::SequenceTower
                && scenario.federation.popularity,
        }
    }
}

/// What every arm shares.
#[derive(Debug)]
pub struct World {
    pub spec: WorldSpec,
    pub shared: Arc<Mutex<Shared>>,
    pub merchants: Vec<Merchant>,
    /// Indices into the dataset's users, the same for every arm.
    pub eval_users: Vec<usize>,
}

/// Locks the shared model and data (a poisoned lock still holds valid read-only data).
pub fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl World {
    /// Loads the data and the base model, partitions merchants and encodes the catalogue
    /// (or reads it from the cache).
    pub fn load(mut spec: WorldSpec) -> anyhow::Result<Self> {
        let mut dataset = Dataset::load(&spec.dataset)?;
        if let Some(n) = spec.max_users {
            dataset = dataset.first_users(n);
        }
        let mut merchants = partition(&dataset, spec.shop_size, spec.seed);
        if let Some(n) = spec.max_merchants {
            merchants.shuffle(&mut ChaCha20Rng::seed_from_u64(spec.seed));
            merchants.truncate(n);
            merchants.sort_by(|a, b| a.name.cmp(&b.name));
        }
        let device = guild_client::training_device();
        let base = BaseModel::load(&default_model_dir(), spec.max_tokens, device)?;
        let items = retrieval::catalogue_embeddings(&base, &dataset, &spec.cache, spec.max_tokens)?;
        if spec.popularity {
            spec.tower.shape.catalogue = items.size()[0] as usize;
        }
        // The same seeded evaluation users for every arm, drawn from the merchants' shoppers.
        let mut pool: Vec<usize> = merchants.iter().flat_map(|m| m.users.iter().copied()).collect();
        pool.sort_unstable();
        pool.shuffle(&mut ChaCha20Rng::seed_from_u64(EVAL_USERS_SEED));
        pool.truncate(spec.eval_users);
        Ok(Self {
            shared: Arc::new(Mutex::new(Shared::new(base, dataset, items))),
            merchants,
            eval_users: pool,
            spec,
        })
    }

    fn users<'a>(dataset: &'a Dataset, indices: &[usize]) -> Vec<&'a User> {
        indices.iter().map(|&i| &dataset.users[i]).collect()
    }

    /// Fresh adapters (B = 0) of this world's configuration.
    fn adapters(&self, shared: &Shared) -> Adapters {
        Adapters::new(
            self.spec.lora.clone(),
            shared.base.config(),
            shared.base.sha256(),
            shared.base.device(),
        )
    }

    /// The same world evaluated on the first `n` of its evaluation users only (a seeded
    /// random subsample, paired user by user with the whole set's first `n`).
    pub fn evaluated_on_first(&self, n: usize) -> World {
        self.sharing(self.spec.clone(), self.eval_users[..n.min(self.eval_users.len())].to_vec())
    }

    /// The same world with the sequence tower's shape `shape` (its `catalogue` this
    /// world's): the DP arms' world where the scenario sets `federation.dp_tower`.
    pub fn with_tower(&self, mut shape: guild_proto::tower::TowerShape) -> World {
        shape.catalogue = self.spec.tower.shape.catalogue;
        let mut spec = self.spec.clone();
        spec.tower.shape = shape;
        self.sharing(spec, self.eval_users.clone())
    }

    /// A world of `spec` and `eval_users` over this one's data, model and merchants.
    fn sharing(&self, spec: WorldSpec, eval_users: Vec<usize>) -> World {
        World { spec, shared: Arc::clone(&self.shared), merchants: self.merchants.clone(), eval_users }
    }

    /// Scores adapter values of the world's family (none: its zero-shot ranker) on the
    /// evaluation users.
    pub fn score(&self, values: Option<&[f32]>, split: Split) -> anyhow::Result<Scores> {
        Ok(self.score_with_ranks(values, split)?.0)
    }

    /// [`Self::score`], with each evaluation user's rank of its held-out item (for paired
    /// comparisons between arms).
    pub fn score_with_ranks(
        &self,
        values: Option<&[f32]>,
        split: Split,
    ) -> anyhow::Result<(Scores, Vec<u32>)> {
        match self.spec.family {
            AdapterFamilyName::FfaLora => self.score_lora(values, split),
            AdapterFamilyName::SequenceTower => self.score_tower(values, &self.spec.tower, split),
        }
    }

    /// FFA-LoRA values (none: the base model on the last five titles concatenated) on the
    /// evaluation users, with each user's rank.
    pub fn score_lora(&self, values: Option<&[f32]>, split: Split) -> anyhow::Result<(Scores, Vec<u32>)> {
        let shared = lock(&self.shared);
        let mut adapters = self.adapters(&shared);
        if let Some(v) = values {
            adapters.set_flat(v)?;
        }
        let users = Self::users(&shared.dataset, &self.eval_users);
        let (counts, ranks) = retrieval::evaluate_ranks(
            &shared.base,
            values.map(|_| &adapters),
            &shared.dataset,
            &users,
            &shared.items,
            split,
            TrainConfig::default().history_items,
        )?;
        Ok((counts.into(), ranks))
    }

    /// Trains a fresh adapter of the world's family on `users` (indices into the dataset)
    /// and returns its federated values (the sequence tower's: its offset from the start).
    pub fn train_on(&self, users: &[usize], config: &TrainConfig) -> anyhow::Result<(Vec<f32>, TrainReport)> {
        match self.spec.family {
            AdapterFamilyName::FfaLora => self.train_lora(users, config),
            AdapterFamilyName::SequenceTower => {
                let (values, report, _) = self.train_tower(users, config, None)?;
                Ok((values, report))
            }
        }
    }

    /// Trains a sequence tower from the federated values `from` (its offset from the start)
    /// on `users` and returns the new values: one merchant's round, in process.
    pub fn train_from(
        &self,
        from: &[f32],
        users: &[usize],
        config: &TrainConfig,
    ) -> anyhow::Result<(Vec<f32>, TrainReport)> {
        anyhow::ensure!(
            self.spec.family == AdapterFamilyName::SequenceTower,
            "training from given values is for the sequence tower"
        );
        let mut shared = lock(&self.shared);
        let mut model = shared.tower(&self.spec.tower)?;
        model.set_offset(from)?;
        let users = Self::users(&shared.dataset, users);
        let report = retrieval::train_tower(&model, &shared.items, &users, config)?;
        Ok((model.offset(), report))
    }

    /// The shopper unit's local computation in process: each of `users`' update from the
    /// federated values `from` on its own (`retrieval::shopper_updates`), handed to `each`.
    pub fn shopper_updates(
        &self,
        from: &[f32],
        users: &[usize],
        config: &TrainConfig,
        each: &mut dyn FnMut(&mut [f32]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.spec.family == AdapterFamilyName::SequenceTower,
            "per-shopper updates are for the sequence tower"
        );
        let mut shared = lock(&self.shared);
        let mut model = shared.tower(&self.spec.tower)?;
        let users = Self::users(&shared.dataset, users);
        // In process there is no merchant secret: each shopper's negatives are seeded from
        // the run's seed (as key and round) and the shopper's id.
        let key: [u8; 32] = std::array::from_fn(|i| config.seed.to_le_bytes()[i % 8]);
        let seed_of = |user: &User| retrieval::shopper_seed(&key, config.seed, &user.id);
        retrieval::shopper_updates(&mut model, &shared.items, &users, from, config, &seed_of, each)
    }

    /// Trains fresh FFA-LoRA adapters on `users` and returns their values.
    pub fn train_lora(
        &self,
        users: &[usize],
        config: &TrainConfig,
    ) -> anyhow::Result<(Vec<f32>, TrainReport)> {
        let shared = lock(&self.shared);
        let adapters = self.adapters(&shared);
        let users = Self::users(&shared.dataset, users);
        let report =
            retrieval::train(&shared.base, &adapters, &shared.dataset, &users, &shared.items, config)?;
        Ok((adapters.flat(), report))
    }

    /// Trains the scenario's sequence tower on `users` from its start with their
    /// statistics summed exactly (trained in one place, the statistics are exact: the users'
    /// own histogram and item-to-item counts, before training; the prior's weight trains
    /// with it). With `stop`, early stopping: validation NDCG@10 of the first `stop.users`
    /// evaluation users (their validation items) at the start and every `stop.every` steps
    /// (and after the last), stopping once `stop.patience` checks in a row have not beaten
    /// the best, and the best check's values returned. The values, the report of the steps
    /// taken, and the checks (none without `stop`).
    pub fn train_tower(
        &self,
        users: &[usize],
        config: &TrainConfig,
        stop: Option<&EarlyStopping>,
    ) -> anyhow::Result<(Vec<f32>, TrainReport, Patience)> {
        let tower = &self.spec.tower;
        let mut shared = lock(&self.shared);
        let model = Self::tower_with_exact_statistics(&mut shared, tower, users)?;
        let shared = &*shared;
        let training = Self::users(&shared.dataset, users);
        let mut patience = Patience::new(stop.map_or(1, |s| s.patience));
        let Some(stop) = stop else {
            let report = retrieval::train_tower(&model, &shared.items, &training, config)?;
            return Ok((model.offset(), report, patience));
        };
        let k = stop.users.min(self.eval_users.len());
        let validation = Self::users(&shared.dataset, &self.eval_users[..k]);
        let items = shared.items.to(shared.base.device());
        // The selection's early-exit scan where the tower has a popularity prior (the same
        // mean to the bit), the full evaluation otherwise.
        let score = |model: &Tower| match retrieval::validation_ndcg(model, &items, &validation) {
            Ok(Some(mean)) => mean,
            found => {
                if let Err(e) = found {
                    tracing::warn!(error = %e, "the early-exit check failed; ranking in full");
                }
                let (counts, _) = retrieval::evaluate_tower(
                    &tower.shape,
                    Some(model),
                    &validation,
                    &items,
                    Split::Validation,
                    None,
                );
                counts.ndcg_at_10()
            }
        };
        let mut best = model.offset();
        // The start is the first check: a training that never beats it keeps the start.
        let _ = patience.observe(0, score(&model));
        let mut check = |steps: usize, model: &Tower| {
            if !steps.is_multiple_of(stop.every) && steps != config.steps {
                return ControlFlow::Continue(());
            }
            let (improved, flow) = patience.observe(steps, score(model));
            if improved {
                best = model.offset();
            }
            flow
        };
        let report = retrieval::train_tower_with(&model, &shared.items, &training, config, &mut check)?;
        Ok((best, report, patience))
    }

    /// A fresh tower of `config` with `users`' statistics summed exactly (no noise, one
    /// unit vector per shopper, as a shopper-level release sums them), where it has a
    /// catalogue.
    fn tower_with_exact_statistics(
        shared: &mut Shared,
        config: &TowerConfig,
        users: &[usize],
    ) -> anyhow::Result<Tower> {
        let mut model = shared.tower(config)?;
        if config.shape.catalogue > 0 {
            let neighbours = shared.neighbours_for(&config.shape)?;
            let users = Self::users(&shared.dataset, users);
            model.set_statistics(&statistics_sum(&users, config.shape.catalogue, neighbours.as_ref()))?;
        }
        Ok(model)
    }

    /// The tower's start with `users`' statistics summed exactly (no noise, every shopper
    /// at the same unit weight as in a shopper-level release), as an offset; `None` without
    /// a prior. The ε = ∞ end of the shopper-level arms' popularity release.
    pub fn exact_statistics(&self, users: &[usize]) -> anyhow::Result<Option<Vec<f32>>> {
        let tower = &self.spec.tower;
        if tower.shape.catalogue == 0 {
            return Ok(None);
        }
        let mut shared = lock(&self.shared);
        Ok(Some(Self::tower_with_exact_statistics(&mut shared, tower, users)?.offset()))
    }

    /// Each of `candidates` applied to the tower at `values`: its NDCG@10 summed over
    /// `users`' validation items (`retrieval::candidates_ndcg`, as a selection round's
    /// shoppers score the grid), and how many of `users` have a validation item.
    fn candidate_totals(
        &self,
        values: &[f32],
        users: &[usize],
        candidates: &[retrieval::Candidate],
    ) -> anyhow::Result<(Vec<f64>, usize)> {
        let mut shared = lock(&self.shared);
        let mut model = shared.tower(&self.spec.tower)?;
        model.set_offset(values)?;
        let refs = Self::users(&shared.dataset, users);
        let items = shared.items.to(model.var_store().device());
        let scores = retrieval::candidates_ndcg(&model, &items, &refs, candidates)?;
        let mut totals = vec![0f64; candidates.len()];
        for row in &scores {
            for (total, value) in totals.iter_mut().zip(row) {
                *total += f64::from(*value);
            }
        }
        Ok((totals, refs.iter().filter(|u| u.validation_example().is_some()).count()))
    }

    /// The pooling selection without noise: the setting of the public grid
    /// (`guild_proto::tower::selection_grid`) with the highest mean validation NDCG@10 over
    /// `users` for the tower at `values`, and `values` with it applied by the coordinator's
    /// own selection step. The ε = ∞ end of the shopper-level arms' selection (which sums
    /// the same per-shopper scores with noise).
    pub fn exact_selection(&self, values: &[f32], users: &[usize]) -> anyhow::Result<(Vec<f32>, usize)> {
        let tower = &self.spec.tower;
        let grid = guild_proto::tower::selection_grid(&tower.shape);
        let candidates: Vec<_> = grid.into_iter().map(retrieval::Candidate::own).collect();
        let (totals, _) = self.candidate_totals(values, users, &candidates)?;
        let (step, best) =
            guild_coordinator::engine::optimizer::selection_step(&tower.shape, values, &totals, None)
                .ok_or_else(|| anyhow::anyhow!("the selection's setting does not fit the tower"))?;
        Ok((step.values, best))
    }

    /// A trained tower's pooling chosen on validation without noise: its own pooling and
    /// prior weight ([`guild_proto::tower::setting_in`]) and each of the public grid's
    /// settings, scored by mean validation NDCG@10 over `users`; the best (its own on a tie)
    /// applied to `values`. What a non-private arm gets in place of the DP arms' selection
    /// round, where training may have moved the pooling off the grid. Then, for a tower with
    /// item-to-item counts, the counts' weight β_t the same way, with the chosen pooling:
    /// each of [`guild_proto::tower::TRANSITIONS_WEIGHTS`] (its own on a tie); then, for a
    /// tower with a spectral prior, its weight γ with the chosen β_t: its own (zero, unless
    /// chosen before) or each of [`guild_proto::tower::SPECTRAL_WEIGHTS`]. Each of the three
    /// steps scores all its candidates in one scan of `users`.
    pub fn pooling_choice(
        &self,
        values: &[f32],
        users: &[usize],
    ) -> anyhow::Result<(Vec<f32>, PoolingChoice)> {
        let tower = &self.spec.tower;
        let own = guild_proto::tower::setting_in(&tower.shape, values)
            .ok_or_else(|| anyhow::anyhow!("a pooling choice needs a tower with a popularity prior"))?;
        let grid = guild_proto::tower::selection_grid(&tower.shape);
        let candidates: Vec<_> =
            std::iter::once(own).chain(grid.iter().cloned()).map(retrieval::Candidate::own).collect();
        let (totals, ranked) = self.candidate_totals(values, users, &candidates)?;
        // Means over the users with a validation item (the others score zero everywhere).
        let means: Vec<f64> = totals.iter().map(|t| t / ranked.max(1) as f64).collect();
        // The first best: the tower's own pooling wins a tie.
        let best = (1..means.len()).fold(0, |best, j| if means[j] > means[best] { j } else { best });
        let values = match best {
            0 => values.to_vec(),
            j => guild_proto::tower::with_setting(&tower.shape, values, &grid[j - 1])
                .ok_or_else(|| anyhow::anyhow!("the grid's setting does not fit the tower"))?,
        };
        let (values, transitions) =
            self.weight_choice(values, PriorWeight::Transitions, means[best], users)?;
        let own_mean = transitions.map_or(means[best], |t| t.mean);
        let (values, spectral) = self.weight_choice(values, PriorWeight::Spectral, own_mean, users)?;
        Ok((
            values,
            PoolingChoice {
                setting: best.checked_sub(1),
                own: means[0],
                chosen: means[best],
                users: users.len(),
                transitions,
                spectral,
            },
        ))
    }

    /// `prior`'s weight in the tower at `values` (which scores `own_mean` with its own)
    /// chosen on validation: each weight of the prior's grid, on a candidate of the tower's
    /// own pooling and other weight, all scored in one scan by mean validation NDCG@10 over
    /// `users`; the best applied to `values` (its own on a tie). `None` for a tower without
    /// that prior.
    fn weight_choice(
        &self,
        values: Vec<f32>,
        prior: PriorWeight,
        own_mean: f64,
        users: &[usize],
    ) -> anyhow::Result<(Vec<f32>, Option<WeightChoice>)> {
        let shape = &self.spec.tower.shape;
        let Some(own) = prior.weight_in(shape, &values) else {
            return Ok((values, None));
        };
        let setting = guild_proto::tower::setting_in(shape, &values)
            .ok_or_else(|| anyhow::anyhow!("a pooling choice needs a tower with a popularity prior"))?;
        let tried: Vec<f64> = prior.grid().iter().copied().filter(|w| (w - own).abs() >= 1e-9).collect();
        let candidates: Vec<_> = tried.iter().map(|&w| prior.candidate(setting.clone(), w)).collect();
        let (totals, ranked) = self.candidate_totals(&values, users, &candidates)?;
        let mut best = (own, own_mean);
        for (&weight, total) in tried.iter().zip(&totals) {
            let mean = total / ranked.max(1) as f64;
            if mean > best.1 {
                best = (weight, mean);
            }
        }
        let (chosen, mean) = best;
        let values = if chosen == own {
            values
        } else {
            prior
                .with_weight(shape, &values, chosen)
                .ok_or_else(|| anyhow::anyhow!("the weight does not fit the tower"))?
        };
        Ok((values, Some(WeightChoice { own, own_mean, chosen, mean })))
    }

    /// The untrained tower with the exact popularity histogram of `users`, as an offset
    /// (`None` without a prior): zero-shot plus popularity, a reference ranker.
    pub fn popularity_only(&self, users: &[usize]) -> anyhow::Result<Option<Vec<f32>>> {
        let tower = &self.spec.tower;
        if tower.shape.catalogue == 0 {
            return Ok(None);
        }
        let mut shared = lock(&self.shared);
        let mut model = shared.tower(tower)?;
        model.set_popularity(&popularity_histogram(
            &Self::users(&shared.dataset, users),
            tower.shape.catalogue,
        ))?;
        Ok(Some(model.offset()))
    }

    /// The exact item-to-item counts of `users`' training items over the catalogue.
    pub fn item_counts(&self, users: &[usize]) -> ItemCounts {
        let shared = lock(&self.shared);
        ItemCounts::of_training(&Self::users(&shared.dataset, users), shared.dataset.titles.len())
    }

    /// The untrained count ranker on the evaluation users, with each user's rank.
    pub fn score_counts(&self, counts: &ItemCounts, split: Split) -> (Scores, Vec<u32>) {
        let shared = lock(&self.shared);
        let users = Self::users(&shared.dataset, &self.eval_users);
        let (ranking, ranks) = retrieval::evaluate_counts(counts, &users, split);
        (ranking.into(), ranks)
    }

    /// Scores the most-popular ranker of `counts` (its popularity) on the evaluation users,
    /// with each user's rank.
    pub fn score_most_popular(&self, counts: &ItemCounts, split: Split) -> (Scores, Vec<u32>) {
        let shared = lock(&self.shared);
        let users = Self::users(&shared.dataset, &self.eval_users);
        let (ranking, ranks) = retrieval::evaluate_most_popular(counts, &users, split);
        (ranking.into(), ranks)
    }

    /// Scores a sequence tower's offset from its start (none: the zero-shot mean of the last
    /// five item vectors) on the evaluation users, with each user's rank.
    pub fn score_tower(
        &self,
        values: Option<&[f32]>,
        tower: &TowerConfig,
        split: Split,
    ) -> anyhow::Result<(Scores, Vec<u32>)> {
        self.score_tower_with_counts(values, tower, None, split)
    }

    /// [`Self::score_tower`], with item-to-item counts added as a prior at a weight
    /// ([`ItemCounts::prior`]), if given.
    pub fn score_tower_with_counts(
        &self,
        values: Option<&[f32]>,
        tower: &TowerConfig,
        counts: Option<(&ItemCounts, f64)>,
        split: Split,
    ) -> anyhow::Result<(Scores, Vec<u32>)> {
        let mut shared = lock(&self.shared);
        let model = match values {
            Some(v) => {
                let mut model = shared.tower(tower)?;
                model.set_offset(v)?;
                Some(model)
            }
            None => None,
        };
        let users = Self::users(&shared.dataset, &self.eval_users);
        let items = shared.items.to(shared.base.device());
        let prior = counts.map(|(counts, weight)| move |h: &[&[ItemIndex]]| counts.prior(h, weight));
        let (ranking, ranks) = retrieval::evaluate_tower(
            &tower.shape,
            model.as_ref(),
            &users,
            &items,
            split,
            prior.as_ref().map(|p| p as retrieval::HistoryPrior<'_>),
        );
        Ok((ranking.into(), ranks))
    }

    /// The number of trained adapter parameters.
    pub fn parameter_count(&self) -> usize {
        match self.spec.family {
            AdapterFamilyName::FfaLora => self.adapters(&lock(&self.shared)).manifest().parameter_count(),
            AdapterFamilyName::SequenceTower => guild_proto::tower::parameter_count(&self.spec.tower.shape),
        }
    }

    /// How many coordinates of this world's adapter a round of `kind` training `trained`
    /// sums (`guild_proto::round::SummedCoordinates`): the dimension its noise and its
    /// privacy cost are over.
    pub fn summed(
        &self,
        kind: guild_proto::round::RoundKind,
        trained: guild_proto::round::TrainedPart,
    ) -> usize {
        guild_proto::round::SummedCoordinates::of(kind, trained, &self.manifest()).len()
    }

    /// This world's adapter manifest, for its shape and ranges alone (a tower's without the
    /// base model's hash or the initial values' seed).
    pub fn manifest(&self) -> guild_proto::domain::AdapterManifest {
        match self.spec.family {
            AdapterFamilyName::FfaLora => self.adapters(&lock(&self.shared)).manifest(),
            AdapterFamilyName::SequenceTower => {
                guild_proto::domain::AdapterManifest::sequence_tower([0; 32], self.spec.tower.shape, 0)
            }
        }
    }

    /// Every merchant's shoppers, pooled (the centralised arm's data).
    pub fn all_merchant_users(&self) -> Vec<usize> {
        self.merchants.iter().flat_map(|m| m.users.iter().copied()).collect()
    }
}

/// What [`World::pooling_choice`] chose: a grid setting (`None`: the tower's own pooling)
/// and the mean validation NDCG@10 of the tower's own pooling and of the choice, over `users`.
#[derive(Clone, Copy, Debug)]
pub struct PoolingChoice {
    pub setting: Option<usize>,
    pub own: f64,
    pub chosen: f64,
    pub users: usize,
    /// The item-to-item prior's weight chosen after the pooling, for a tower with counts.
    pub transitions: Option<WeightChoice>,
    /// The spectral prior's weight γ chosen after β_t, for a tower with one.
    pub spectral: Option<WeightChoice>,
}

/// What [`World::pooling_choice`] chose for a prior's weight (β_t or γ): the weight
/// the tower held and its mean validation NDCG@10 (with the chosen pooling), and the chosen
/// weight and its mean.
#[derive(Clone, Copy, Debug)]
pub struct WeightChoice {
    pub own: f64,
    pub own_mean: f64,
    pub chosen: f64,
    pub mean: f64,
}

/// The item-to-item prior's two weights a non-private arm chooses on validation after its
/// pooling ([`World::pooling_choice`]): each with its public grid, where it sits in a
/// tower's values, and where it sits in a selection's candidate.
#[derive(Clone, Copy, Debug)]
enum PriorWeight {
    /// β_t, over the item-to-item counts.
    Transitions,
    /// γ, over the counts' spectral features.
    Spectral,
}

impl PriorWeight {
    fn grid(self) -> &'static [f64] {
        match self {
            Self::Transitions => &guild_proto::tower::TRANSITIONS_WEIGHTS,
            Self::Spectral => &guild_proto::tower::SPECTRAL_WEIGHTS,
        }
    }

    fn weight_in(self, shape: &guild_proto::tower::TowerShape, values: &[f32]) -> Option<f64> {
        match self {
            Self::Transitions => guild_proto::tower::transitions_weight_in(shape, values),
            Self::Spectral => guild_proto::tower::spectral_weight_in(shape, values),
        }
    }

    fn with_weight(
        self,
        shape: &guild_proto::tower::TowerShape,
        values: &[f32],
        weight: f64,
    ) -> Option<Vec<f32>> {
        match self {
            Self::Transitions => guild_proto::tower::with_transitions_weight(shape, values, weight),
            Self::Spectral => guild_proto::tower::with_spectral_weight(shape, values, weight),
        }
    }

    /// `setting` with this weight at `weight` and the other the tower's own.
    fn candidate(self, setting: guild_proto::tower::PoolingSetting, weight: f64) -> retrieval::Candidate {
        let mut candidate = retrieval::Candidate::own(setting);
        match self {
            Self::Transitions => candidate.transitions_weight = Some(weight as f32),
            Self::Spectral => candidate.spectral_weight = Some(weight as f32),
        }
        candidate
    }
}

impl PoolingChoice {
    /// The choice in words, for the report.
    pub fn describe(&self, whose: &str) -> String {
        let mut text = self.describe_pooling(whose);
        let priors = [
            (
                self.transitions,
                "the item-to-item prior's weight β_t",
                &guild_proto::tower::TRANSITIONS_WEIGHTS[..],
            ),
            (self.spectral, "the spectral prior's weight γ", &guild_proto::tower::SPECTRAL_WEIGHTS[..]),
        ];
        for (choice, what, grid) in priors {
            let Some(c) = choice else { continue };
            text += &if (c.chosen - c.own).abs() < 1e-9 {
                format!("; {what} kept at {} (no weight of {grid:?} above it)", c.own)
            } else {
                format!(
                    "; then {what} {} of {grid:?} (NDCG@10 {:.4} against {:.4} at its {})",
                    c.chosen, c.mean, c.own_mean, c.own
                )
            };
        }
        text
    }

    fn describe_pooling(&self, whose: &str) -> String {
        match self.setting {
            None => format!(
                "pooling chosen on validation ({whose}, {} users): kept its trained pooling (NDCG@10 {:.4}, no \
                 setting of the grid above it)",
                self.users, self.own
            ),
            Some(j) => format!(
                "pooling chosen on validation ({whose}, {} users): the grid's {} (NDCG@10 {:.4} against its \
                 trained pooling's {:.4})",
                self.users,
                guild_proto::tower::describe_setting(j),
                self.chosen,
                self.own
            ),
        }
    }
}
