//! Local training behind one trait, [`Learner`], and its two implementations: the real
//! learner, [`ModelLearner`] (MiniLM with FFA-LoRA adapters, trained on one merchant's
//! shoppers), and [`RandomLearner`] (random updates of a given norm, for load tests).
//!
//! Simulated merchants share one loaded base model and one catalogue embedding behind a
//! mutex (libtorch tensors are `Send` but not `Sync`); each merchant has its own adapters,
//! and computes with them outside the lock, at most one merchant per core at a time
//! ([`Permits`]).

use std::sync::{Arc, Mutex};

use guild_proto::domain::{AdapterManifest, RoundTask};
use guild_proto::round::{RoundKind, TrainedPart};
use rand::Rng;
use rand_chacha::ChaCha20Rng;
use tch::Tensor;

use crate::data::{Dataset, User};
use crate::model::BaseModel;
use crate::model::lora::{Adapters, LoraConfig};
use crate::model::tower::{PairSlots, TitleNeighbours, Tower, TowerConfig};
use crate::retrieval::{self, RankingCounts, Split, TrainConfig};

/// Whose updates a learner hands over in a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Units<'a> {
    /// The merchant unit: one update from all of this merchant's shoppers.
    Merchant,
    /// The shopper unit: one update per shopper at these indices (below
    /// [`Learner::shopper_count`]), each computed on its own.
    Shoppers(&'a [usize]),
}

/// One unit's update, unclipped, as the learner has it.
#[derive(Debug, PartialEq)]
pub enum Update<'a> {
    /// Every coordinate of the adapter: a training round's.
    Dense(&'a mut [f32]),
    /// Zero except `values` at `indices` (strictly increasing): a popularity release or a
    /// pooling selection, which touch a unit's few coordinates out of the adapter's millions
    /// and are encoded at the cost of those few (`DdgSum::add_sparse`).
    Sparse { indices: &'a [usize], values: &'a mut [f32] },
}

impl Update<'_> {
    /// The update as a vector of all `dimension` coordinates.
    pub fn to_dense(&self, dimension: usize) -> anyhow::Result<Vec<f32>> {
        match self {
            Update::Dense(x) => {
                anyhow::ensure!(
                    x.len() == dimension,
                    "an update of {} coordinates, not {dimension}",
                    x.len()
                );
                Ok(x.to_vec())
            }
            Update::Sparse { indices, values } => {
                let mut dense = vec![0.0; dimension];
                for (&i, &v) in indices.iter().zip(values.iter()) {
                    *dense.get_mut(i).ok_or_else(|| {
                        anyhow::anyhow!(
                            "a sparse update at coordinate {i} of a {dimension}-coordinate adapter"
                        )
                    })? += v;
                }
                Ok(dense)
            }
        }
    }
}

/// Receives each unit's update, unclipped, one at a time: the caller clips and encodes each
/// on its own, and may reuse nothing of the buffers after it returns.
pub type Each<'a> = dyn FnMut(Update<'_>) -> anyhow::Result<()> + 'a;

/// What a learner is asked for in one round: the task, the global adapter's values it
/// starts from, and whose updates to hand over.
#[derive(Clone, Copy, Debug)]
pub struct RoundInput<'a> {
    pub task: &'a RoundTask,
    /// The adapter the round starts from; empty in a popularity release, which sends the
    /// merchant's own statistics and reads nothing of it (the client does not fetch it).
    pub global: &'a [f32],
    pub units: Units<'a>,
}

/// Local training and evaluation, however it is done: one method per round kind
/// ([`contribute`] picks it), each handing every unit's update to `each`.
pub trait Learner: Send + 'static {
    /// The adapter this learner trains; a task for another adapter is refused.
    fn manifest(&self) -> AdapterManifest;
    /// Evaluates adapter values on this merchant's validation data.
    fn evaluate(&mut self, values: &[f32]) -> anyhow::Result<Option<RankingCounts>>;
    /// Shopper unit: how many shoppers this merchant samples from (indices `0..count`).
    fn shopper_count(&self) -> usize {
        0
    }
    /// A training round: trains from the global adapter `global` on each unit and hands
    /// over its update Δ = B_local − B_global.
    fn train(&mut self, round: RoundInput<'_>, each: &mut Each<'_>) -> anyhow::Result<()>;
    /// A popularity release: each unit's popularity contribution alone, at the whole clip
    /// norm, and nothing trained.
    fn popularity(&mut self, _round: RoundInput<'_>, _each: &mut Each<'_>) -> anyhow::Result<()> {
        anyhow::bail!("this learner's adapter has no popularity histogram to release")
    }
    /// A pooling selection: `c/√k` times each unit's NDCG@10 on its validation items under
    /// each of the `k` settings of `guild_proto::tower::selection_grid`, nothing trained.
    fn selection_scores(&mut self, _round: RoundInput<'_>, _each: &mut Each<'_>) -> anyhow::Result<()> {
        anyhow::bail!("this learner's adapter has no pooling to select")
    }
}

/// Calls the learner method of the task's round kind.
pub fn contribute(
    learner: &mut dyn Learner,
    round: RoundInput<'_>,
    each: &mut Each<'_>,
) -> anyhow::Result<()> {
    match round.task.training.kind {
        RoundKind::Training => learner.train(round, each),
        RoundKind::PopularityRelease => learner.popularity(round, each),
        RoundKind::PoolingSelection => learner.selection_scores(round, each),
    }
}

/// Random updates of a given norm, whatever the round's kind: for load tests without a
/// model. In the shopper unit each of `shoppers` shoppers gives a random update of that
/// norm.
#[derive(Debug)]
pub struct RandomLearner {
    pub manifest: AdapterManifest,
    pub norm: f64,
    pub rng: ChaCha20Rng,
    pub shoppers: usize,
}

impl RandomLearner {
    fn random_update(&mut self, d: usize) -> Vec<f32> {
        let mut x: Vec<f32> = (0..d).map(|_| self.rng.gen_range(-1.0f32..1.0)).collect();
        let norm = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        x.iter_mut().for_each(|v| *v = (f64::from(*v) * self.norm / norm) as f32);
        x
    }

    fn random_updates(&mut self, round: RoundInput<'_>, each: &mut Each<'_>) -> anyhow::Result<()> {
        let count = match round.units {
            Units::Merchant => 1,
            Units::Shoppers(shoppers) => shoppers.len(),
        };
        for _ in 0..count {
            each(Update::Dense(&mut self.random_update(self.manifest.parameter_count())))?;
        }
        Ok(())
    }
}

impl Learner for RandomLearner {
    fn manifest(&self) -> AdapterManifest {
        self.manifest.clone()
    }

    fn shopper_count(&self) -> usize {
        self.shoppers
    }

    fn train(&mut self, round: RoundInput<'_>, each: &mut Each<'_>) -> anyhow::Result<()> {
        self.random_updates(round, each)
    }

    fn popularity(&mut self, round: RoundInput<'_>, each: &mut Each<'_>) -> anyhow::Result<()> {
        self.random_updates(round, each)
    }

    fn selection_scores(&mut self, round: RoundInput<'_>, each: &mut Each<'_>) -> anyhow::Result<()> {
        self.random_updates(round, each)
    }

    fn evaluate(&mut self, _: &[f32]) -> anyhow::Result<Option<RankingCounts>> {
        Ok(None)
    }
}

/// A bound on how many simulated merchants compute with their own tensors at once (a
/// counting semaphore). Merchants train and score outside the shared lock, side by side;
/// without a bound, every merchant of a round builds its tower at once (26 in a shopper-level
/// selection, each scoring batches against the whole catalogue), for no speed on a machine
/// whose cores the first few already fill, and the process's peak memory grows with the
/// cohort.
#[derive(Debug)]
pub struct Permits {
    free: Mutex<usize>,
    freed: std::sync::Condvar,
}

/// One merchant's permit to compute; returned when dropped.
#[derive(Debug)]
pub struct Permit(Arc<Permits>);

impl Permits {
    /// `n` permits (at least one).
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Self { free: Mutex::new(n.max(1)), freed: std::sync::Condvar::new() })
    }

    /// Waits for a permit.
    pub fn acquire(self: &Arc<Self>) -> Permit {
        let mut free = self.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *free -= 1;
        Permit(Arc::clone(self))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        self.0.freed.notify_one();
    }
}

/// What every simulated merchant shares, read-only.
#[derive(Debug)]
pub struct Shared {
    pub base: BaseModel,
    pub dataset: Dataset,
    /// Catalogue embeddings from the frozen base `[items, hidden]`, on the CPU.
    pub items: Tensor,
    /// The catalogue's title neighbours, computed from `items` when a tower first needs them.
    pub neighbours: Option<TitleNeighbours>,
    /// How many merchants may compute with their own tensors at once: one per core.
    pub permits: Arc<Permits>,
    /// The dataset's catalogue digest (`guild_proto::domain::catalogue_sha256`).
    pub catalogue_sha256: [u8; 32],
}

impl Shared {
    pub fn new(base: BaseModel, dataset: Dataset, items: Tensor) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let catalogue_sha256 = guild_proto::domain::catalogue_sha256(&dataset.item_ids);
        Self { base, dataset, items, neighbours: None, permits: Permits::new(cores), catalogue_sha256 }
    }

    /// The catalogue's `m` title neighbours per item, computed once.
    pub fn title_neighbours(&mut self, m: usize) -> Result<TitleNeighbours, crate::model::ModelError> {
        match &self.neighbours {
            Some(n) if n.per_item() == m => Ok(n.clone()),
            _ => {
                let n = TitleNeighbours::of_items(&self.items, m)?;
                self.neighbours = Some(n.clone());
                Ok(n)
            }
        }
    }

    /// A tower of `config` on the base model's device, with its title neighbours if it
    /// carries item-to-item counts.
    pub fn tower(&mut self, config: &TowerConfig) -> Result<Tower, crate::model::ModelError> {
        let mut tower = Tower::new(config.clone(), self.base.device())?;
        if let Some(PairSlots::Titles(neighbours)) = self.neighbours_for(&config.shape)? {
            tower.set_neighbours(&neighbours)?;
        }
        Ok(tower)
    }

    /// Where a tower of `shape` counts item pairs: its title neighbours, or its pair sketch
    /// (none without item-to-item counts).
    pub fn neighbours_for(
        &mut self,
        shape: &guild_proto::tower::TowerShape,
    ) -> Result<Option<PairSlots>, crate::model::ModelError> {
        PairSlots::of(shape, || self.title_neighbours(shape.neighbours))
    }
}

/// FFA-LoRA's query text: the titles of a shopper's last this many items, most recent first
/// (`retrieval::query_text`), in training, evaluation and serving alike.
pub const LORA_HISTORY_ITEMS: usize = 5;

/// One merchant's model, data and settings.
#[derive(Debug)]
pub struct ModelLearner {
    shared: Arc<Mutex<Shared>>,
    adapters: Adapters,
    /// Indices into `shared.dataset.users`.
    users: Vec<usize>,
    /// Users whose validation example is evaluated (a seeded sample, to bound the cost).
    eval_users: Vec<usize>,
    history_items: usize,
    temperature: f64,
}

impl ModelLearner {
    pub fn new(
        shared: Arc<Mutex<Shared>>,
        lora: LoraConfig,
        users: Vec<usize>,
        eval_users: usize,
        seed: u64,
    ) -> Self {
        let guard = shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let adapters = Adapters::new(lora, guard.base.config(), guard.base.sha256(), guard.base.device());
        let eval = evaluation_sample(&guard.dataset, &users, eval_users, seed);
        drop(guard);
        Self {
            shared,
            adapters,
            users,
            eval_users: eval,
            history_items: LORA_HISTORY_ITEMS,
            temperature: 0.05,
        }
    }
}

/// The update a merchant sends: its locally trained values minus the global ones.
fn update(local: &[f32], global: &[f32]) -> Vec<f32> {
    local.iter().zip(global).map(|(l, g)| l - g).collect()
}

/// Gives the sequence tower's popularity histogram its share of an update within the
/// round's clip norm `c`: the trained coordinates (everything outside `range`) are scaled
/// down to norm `c·√(1−φ²)` if longer, and the histogram's coordinates are set to `c·φ`
/// times `contribution` (of norm at most 1: one shopper's unit vector, or a merchant's mean
/// of them), so the whole is within `c` and the participant's own clip leaves it as is.
/// φ is `guild_proto::tower::POPULARITY_SHARE` in a training round, 1 in a popularity
/// release (whose trained part is then zero).
pub fn share_with_popularity(
    update: &mut [f32],
    range: std::ops::Range<usize>,
    contribution: &[(usize, f32)],
    clip_norm: f64,
    share: f64,
) {
    let trained_bound = clip_norm * (1.0 - share * share).sqrt();
    let norm = update
        .iter()
        .enumerate()
        .filter(|(i, _)| !range.contains(i))
        .map(|(_, &u)| f64::from(u).powi(2))
        .sum::<f64>()
        .sqrt();
    if norm > trained_bound {
        let scale = (trained_bound / norm) as f32;
        update.iter_mut().for_each(|u| *u *= scale);
    }
    let histogram = &mut update[range];
    histogram.iter_mut().for_each(|h| *h = 0.0);
    let weight = (clip_norm * share) as f32;
    for &(item, value) in contribution {
        if let Some(h) = histogram.get_mut(item) {
            *h += weight * value;
        }
    }
}

/// A pooling selection's update from one unit's NDCG@10 `values` under each of the `k`
/// settings of the grid: `c/√k` times them, for the first `k` coordinates (zeros
/// elsewhere), clipped to `c` (values in [0, 1] never exceed it).
pub fn selection_update(values: &[f32], clip_norm: f64) -> Vec<f32> {
    let k = values.len();
    let norm = values.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
    let scale = clip_norm / (k as f64).sqrt().max(norm);
    values.iter().map(|&v| (f64::from(v) * scale) as f32).collect()
}

/// A merchant's pooling-selection update from its shoppers' summed NDCG@10 `sums` under
/// each setting: the sums less their average over the settings (what tells the settings
/// apart; the common level carries no choice), clipped to norm `c`. Scaled as a shopper's
/// values are ([`selection_update`], c/√k times them) nearly all of `c`, and of the noise,
/// would go to the common level. Sums, not means: a merchant's few hits make its own
/// differences mostly sampling noise, and a vote per merchant (its mean's direction at
/// norm `c`) chose by noise in a probe of 127 merchants; summed, the federation's total is
/// every sampled shopper's, as in the shopper unit.
pub fn merchant_selection_update(sums: &[f32], clip_norm: f64) -> Vec<f32> {
    let k = sums.len().max(1) as f64;
    let average = sums.iter().map(|&v| f64::from(v)).sum::<f64>() / k;
    let centred: Vec<f64> = sums.iter().map(|&v| f64::from(v) - average).collect();
    let norm = centred.iter().map(|v| v * v).sum::<f64>().sqrt();
    let scale = if norm > clip_norm { clip_norm / norm } else { 1.0 };
    centred.iter().map(|v| (v * scale) as f32).collect()
}

/// A popularity release's update from one unit's statistics `contribution` (of norm at
/// most 1): `c` times it at the statistics' coordinates `range`, nothing else, as a sparse
/// update (strictly increasing indices; a repeated entry is summed, an entry past the range
/// dropped). What [`share_with_popularity`] gives a zero update at φ = 1.
pub fn release_update(
    range: std::ops::Range<usize>,
    contribution: &[(usize, f32)],
    clip_norm: f64,
) -> (Vec<usize>, Vec<f32>) {
    let weight = clip_norm as f32;
    let mut summed = std::collections::BTreeMap::<usize, f32>::new();
    for &(item, value) in contribution.iter().filter(|(item, _)| *item < range.len()) {
        *summed.entry(range.start + item).or_insert(0.0) += weight * value;
    }
    summed.into_iter().unzip()
}

/// A merchant's contribution to the summed statistics (the popularity histogram and, with
/// `neighbours`, the item-to-item counts): the mean of its shoppers' unit vectors.
fn merchant_statistics(
    users: &[&User],
    catalogue: usize,
    neighbours: Option<&PairSlots>,
) -> Vec<(usize, f32)> {
    let n = users.len().max(1) as f32;
    crate::model::tower::statistics_sum(users, catalogue, neighbours)
        .into_iter()
        .map(|(index, value)| (index, value / n))
        .collect()
}

/// The local training a round's task asks for.
fn round_training(task: &RoundTask, temperature: f64, history_items: usize) -> TrainConfig {
    TrainConfig {
        batch_size: task.training.batch_size as usize,
        steps: task.training.local_steps as usize,
        learning_rate: f64::from(task.training.learning_rate),
        temperature,
        history_items,
        seed: task.training.data_seed,
        negatives: task.training.negatives as usize,
    }
}

/// A seeded sample of at most `n` of `users` that have a validation example.
fn evaluation_sample(dataset: &Dataset, users: &[usize], n: usize, seed: u64) -> Vec<usize> {
    let mut eval: Vec<usize> =
        users.iter().copied().filter(|&i| dataset.users[i].validation_example().is_some()).collect();
    rand::seq::SliceRandom::shuffle(
        eval.as_mut_slice(),
        &mut <ChaCha20Rng as rand::SeedableRng>::seed_from_u64(seed),
    );
    eval.truncate(n);
    eval
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Uniform negatives per batch of tower training where the task does not set them (the
/// simulator's centralised and local-only arms; a sampled softmax ten times faster than the
/// full softmax over the Amazon Games catalogue on two cores). Federated rounds take the
/// count from the task (`rounds.negatives`).
pub const TOWER_NEGATIVES: usize = 1024;

/// The simulator's default for the shopper unit's rounds: each shopper is its own batch,
/// and drawing fewer negatives keeps a shopper's step to a few milliseconds; the DP noise,
/// not the sampled softmax, dominates that update's variance.
pub const SHOPPER_NEGATIVES: usize = 256;

/// One merchant's sequence tower (the sequence-tower family), trained on its shoppers over
/// the shared catalogue embeddings with a sampled softmax ([`TOWER_NEGATIVES`]). The
/// federated values are the tower's offset from its seeded initial values. The tower lives
/// only while a round trains or evaluates (a merchant idle between rounds holds no tensors:
/// the simulator runs hundreds in one process).
#[derive(Debug)]
pub struct TowerLearner {
    shared: Arc<Mutex<Shared>>,
    config: TowerConfig,
    base_model_sha256: [u8; 32],
    users: Vec<usize>,
    eval_users: Vec<usize>,
    temperature: f64,
    /// This merchant's secret for its shoppers' sampled negatives (`retrieval::shopper_seed`),
    /// from the OS's randomness; it never leaves the process.
    shopper_key: [u8; 32],
    /// This merchant's catalogue, which its manifest states (checked against the task's).
    catalogue_sha256: [u8; 32],
}

impl TowerLearner {
    pub fn new(
        shared: Arc<Mutex<Shared>>,
        config: TowerConfig,
        users: Vec<usize>,
        eval_users: usize,
        seed: u64,
    ) -> Result<Self, crate::model::ModelError> {
        let guard = lock(&shared);
        config.shape.validate().map_err(crate::model::ModelError::AdapterShape)?;
        let catalogue = guard.items.size()[0] as usize;
        if config.shape.catalogue != 0 && config.shape.catalogue != catalogue {
            return Err(crate::model::ModelError::AdapterShape(format!(
                "the tower's popularity prior covers {} items, the catalogue has {catalogue}",
                config.shape.catalogue
            )));
        }
        let eval = evaluation_sample(&guard.dataset, &users, eval_users, seed);
        let (base_model_sha256, catalogue_sha256) = (guard.base.sha256(), guard.catalogue_sha256);
        drop(guard);
        let mut shopper_key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut <ChaCha20Rng as rand::SeedableRng>::from_entropy(), &mut shopper_key);
        Ok(Self {
            shared,
            config,
            base_model_sha256,
            users,
            eval_users: eval,
            temperature: 0.05,
            shopper_key,
            catalogue_sha256,
        })
    }

    /// The dataset's indices of this merchant's shoppers at `shoppers`.
    fn indices(&self, shoppers: &[usize]) -> anyhow::Result<Vec<usize>> {
        shoppers
            .iter()
            .map(|&s| {
                self.users.get(s).copied().ok_or_else(|| {
                    anyhow::anyhow!("shopper {s} is not among this merchant's {}", self.users.len())
                })
            })
            .collect()
    }

    /// The catalogue's title neighbours, if this merchant's tower carries item-to-item counts.
    fn neighbours(&self) -> Result<Option<PairSlots>, crate::model::ModelError> {
        lock(&self.shared).neighbours_for(&self.config.shape)
    }

    /// The tower at `values` (its offset from the start), on the shared model's device.
    fn tower(&self, shared: &mut Shared, values: &[f32]) -> Result<Tower, crate::model::ModelError> {
        let mut tower = shared.tower(&self.config)?;
        tower.set_offset(values)?;
        Ok(tower)
    }

    /// What training needs, taken under the shared lock and used after it is released, so
    /// that the merchants of one simulation train side by side: the tower at `values`, a
    /// shallow clone of the catalogue embeddings (libtorch's reads of one tensor from several
    /// threads are safe, and nothing writes to it) and copies of the users at `indices`, with
    /// a permit ([`Permits`]) to hold while they are used.
    fn unlocked(
        &self,
        values: &[f32],
        indices: &[usize],
    ) -> Result<(Tower, Tensor, Vec<User>, Permit), crate::model::ModelError> {
        let permit = {
            let permits = Arc::clone(&lock(&self.shared).permits);
            permits.acquire()
        };
        let mut shared = lock(&self.shared);
        let users = indices.iter().map(|&i| shared.dataset.users[i].clone()).collect();
        Ok((self.tower(&mut shared, values)?, shared.items.shallow_clone(), users, permit))
    }

    /// Each of the users at `indices`: its NDCG@10 on its validation item under every
    /// setting of the pooling selection's grid, the tower at `values` otherwise
    /// (`retrieval::selection_ndcg`).
    fn selection_values(&self, values: &[f32], indices: &[usize]) -> anyhow::Result<Vec<Vec<f32>>> {
        let (tower, items, owned, _permit) = self.unlocked(values, indices)?;
        let users: Vec<&User> = owned.iter().collect();
        let items = items.to(tower.var_store().device());
        let grid = guild_proto::tower::selection_grid(&self.config.shape);
        Ok(retrieval::selection_ndcg(&tower, &items, &users, &grid)?)
    }
}

impl Learner for TowerLearner {
    fn manifest(&self) -> AdapterManifest {
        AdapterManifest::sequence_tower(self.base_model_sha256, self.config.shape, self.config.seed)
            .with_catalogue(Some(self.catalogue_sha256))
    }

    fn shopper_count(&self) -> usize {
        self.users.len()
    }

    fn train(&mut self, round: RoundInput<'_>, each: &mut Each<'_>) -> anyhow::Result<()> {
        let RoundInput { task, global, units } = round;
        let config = round_training(task, self.temperature, self.config.shape.history);
        let range = guild_proto::tower::accumulated_range(&self.config.shape);
        let (clip_norm, share) = (task.privacy.clip_norm, guild_proto::tower::POPULARITY_SHARE);
        let (catalogue, neighbours) = (self.config.shape.catalogue, self.neighbours()?);
        // The statistics go into a training round's update only when it trains the whole
        // adapter; with `Weights` the releases carry them, and the weights get the whole clip.
        let trained = task.training.trained;
        let range = range.filter(|_| trained == TrainedPart::Whole);
        let Units::Shoppers(shoppers) = units else {
            if trained == TrainedPart::Pooling {
                anyhow::bail!("training {trained} takes one gradient per shopper: the shopper unit only");
            }
            let (tower, items, owned, _permit) = self.unlocked(global, &self.users)?;
            let users: Vec<&User> = owned.iter().collect();
            retrieval::train_tower(&tower, &items, &users, &config)?;
            let mut update = update(&tower.offset(), global);
            if let Some(range) = range {
                let statistics = merchant_statistics(&users, catalogue, neighbours.as_ref());
                share_with_popularity(&mut update, range, &statistics, clip_norm, share);
            }
            return each(Update::Dense(&mut update));
        };
        // Training the pooling: each shopper's gradient there alone, and no statistics (the
        // releases carry them): `hand_over` sends the part's coordinates and nothing else.
        // The weights are trained as the whole adapter is, less the statistics (the round
        // gathers the coordinates it sums from the dense update).
        let part = match trained {
            TrainedPart::Pooling => trained.ranges(&task.manifest),
            TrainedPart::Whole | TrainedPart::Weights => None,
        };
        let indices = self.indices(shoppers)?;
        let (mut tower, items, owned, _permit) = self.unlocked(global, &indices)?;
        let users: Vec<&User> = owned.iter().collect();
        let (key, round_id) = (self.shopper_key, task.binding.round_id);
        let seed_of = |user: &User| retrieval::shopper_seed(&key, round_id, &user.id);
        // `shopper_updates` hands over one update per user, in order; with statistics, each
        // gets its shopper's share of them.
        let mut next = users.iter();
        // A part's update is its few coordinates, encoded at their cost alone.
        let part_indices: Option<Vec<usize>> = part.as_ref().map(|ranges| {
            let mut indices: Vec<usize> = ranges.iter().flat_map(Clone::clone).collect();
            indices.sort_unstable();
            indices.dedup();
            indices
        });
        let mut hand_over = |update: &mut [f32]| {
            if let Some(indices) = &part_indices {
                let mut values: Vec<f32> =
                    indices.iter().map(|&i| update.get(i).copied().unwrap_or(0.0)).collect();
                return each(Update::Sparse { indices, values: &mut values });
            }
            if let Some(range) = &range {
                let user = next.next().ok_or_else(|| anyhow::anyhow!("more updates than shoppers"))?;
                let contribution =
                    crate::model::tower::statistics_contribution(user, catalogue, neighbours.as_ref());
                share_with_popularity(update, range.clone(), &contribution, clip_norm, share);
            }
            each(Update::Dense(update))
        };
        if part.is_some() {
            return retrieval::shopper_part_gradients(
                &mut tower,
                &items,
                &users,
                global,
                &config,
                &mut hand_over,
            );
        }
        retrieval::shopper_updates(&mut tower, &items, &users, global, &config, &seed_of, &mut hand_over)
    }

    fn popularity(&mut self, round: RoundInput<'_>, each: &mut Each<'_>) -> anyhow::Result<()> {
        let RoundInput { task, units, .. } = round;
        // Nothing trained: each unit's update is its popularity contribution alone, at the
        // whole clip norm, as its non-zeros.
        let range = guild_proto::tower::accumulated_range(&self.config.shape)
            .ok_or_else(|| anyhow::anyhow!("a popularity release for a tower without one"))?;
        let (catalogue, neighbours) = (self.config.shape.catalogue, self.neighbours()?);
        let contributions: Vec<Vec<(usize, f32)>> = {
            let shared = lock(&self.shared);
            match units {
                Units::Merchant => vec![merchant_statistics(
                    &users(&shared.dataset, &self.users),
                    catalogue,
                    neighbours.as_ref(),
                )],
                Units::Shoppers(shoppers) => self
                    .indices(shoppers)?
                    .iter()
                    .map(|&i| {
                        crate::model::tower::statistics_contribution(
                            &shared.dataset.users[i],
                            catalogue,
                            neighbours.as_ref(),
                        )
                    })
                    .collect(),
            }
        };
        for contribution in &contributions {
            let (indices, mut values) = release_update(range.clone(), contribution, task.privacy.clip_norm);
            each(Update::Sparse { indices: &indices, values: &mut values })?;
        }
        Ok(())
    }

    fn selection_scores(&mut self, round: RoundInput<'_>, each: &mut Each<'_>) -> anyhow::Result<()> {
        let RoundInput { task, global, units } = round;
        // Nothing trained: each shopper's NDCG@10 under each setting, or the merchant's
        // sum over its shoppers, centred, in the first k coordinates.
        let clip_norm = task.privacy.clip_norm;
        let indices: Vec<usize> = (0..guild_proto::tower::selection_grid(&self.config.shape).len()).collect();
        let Units::Shoppers(shoppers) = units else {
            // The merchant's shoppers' NDCG@10 summed (not averaged: what the federation
            // sums is then every sampled shopper's, as in the shopper unit), centred, clipped.
            let per_shopper = self.selection_values(global, &self.users)?;
            let k = per_shopper.first().map_or(0, Vec::len);
            let sum: Vec<f32> = (0..k).map(|j| per_shopper.iter().map(|v| v[j]).sum::<f32>()).collect();
            let mut values = merchant_selection_update(&sum, clip_norm);
            return each(Update::Sparse { indices: &indices, values: &mut values });
        };
        for values in self.selection_values(global, &self.indices(shoppers)?)? {
            let mut values = selection_update(&values, clip_norm);
            each(Update::Sparse { indices: &indices, values: &mut values })?;
        }
        Ok(())
    }

    fn evaluate(&mut self, values: &[f32]) -> anyhow::Result<Option<RankingCounts>> {
        if self.eval_users.is_empty() {
            return Ok(None);
        }
        let mut shared = lock(&self.shared);
        let tower = self.tower(&mut shared, values)?;
        let users = users(&shared.dataset, &self.eval_users);
        let items = shared.items.to(tower.var_store().device());
        let (counts, _) = retrieval::evaluate_tower(
            &self.config.shape,
            Some(&tower),
            &users,
            &items,
            Split::Validation,
            None,
        );
        Ok(Some(counts))
    }
}

fn users<'a>(dataset: &'a Dataset, indices: &[usize]) -> Vec<&'a User> {
    indices.iter().map(|&i| &dataset.users[i]).collect()
}

impl Learner for ModelLearner {
    fn manifest(&self) -> AdapterManifest {
        self.adapters.manifest()
    }

    fn train(&mut self, round: RoundInput<'_>, each: &mut Each<'_>) -> anyhow::Result<()> {
        let RoundInput { task, global, units } = round;
        if units != Units::Merchant {
            anyhow::bail!(
                "this learner does not train per shopper, so it cannot take part in shopper-unit rounds"
            );
        }
        self.adapters.set_flat(global)?;
        let config = round_training(task, self.temperature, self.history_items);
        let shared = lock(&self.shared);
        let users = users(&shared.dataset, &self.users);
        retrieval::train(&shared.base, &self.adapters, &shared.dataset, &users, &shared.items, &config)?;
        let local = self.adapters.flat();
        each(Update::Dense(&mut update(&local, global)))
    }

    fn evaluate(&mut self, values: &[f32]) -> anyhow::Result<Option<RankingCounts>> {
        if self.eval_users.is_empty() {
            return Ok(None);
        }
        self.adapters.set_flat(values)?;
        let shared = lock(&self.shared);
        let users = users(&shared.dataset, &self.eval_users);
        let (counts, _) = retrieval::evaluate_ranks(
            &shared.base,
            Some(&self.adapters),
            &shared.dataset,
            &users,
            &shared.items,
            Split::Validation,
            self.history_items,
        )?;
        Ok(Some(counts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Permits bound how many hold one at once, and every waiter gets one in the end.
    #[test]
    fn permits_bound_concurrency_and_every_waiter_is_served() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let permits = Permits::new(2);
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let workers: Vec<_> = (0..6)
            .map(|_| {
                let (permits, now, most) = (Arc::clone(&permits), Arc::clone(&now), Arc::clone(&most));
                std::thread::spawn(move || {
                    let _permit = permits.acquire();
                    let holding = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(holding, Ordering::SeqCst);
                    // Hold until a second holder shows up (or 5 s pass), so that a bound of
                    // one would show, then a little longer, so that a third would.
                    let started = std::time::Instant::now();
                    while now.load(Ordering::SeqCst) < 2 && started.elapsed().as_secs() < 5 {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    most.fetch_max(now.load(Ordering::SeqCst), Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    now.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("worker");
        }
        assert_eq!(most.load(Ordering::SeqCst), 2, "two at once, never more");
        assert_eq!(*permits.free.lock().expect("lock"), 2, "every permit returned");
    }

    #[test]
    fn a_merchants_selection_update_is_its_centred_sums_within_the_clip_norm() {
        let means = [0.030_f32, 0.034, 0.031, 0.029];
        // Within the clip norm: the means less their average, as they are.
        let update = merchant_selection_update(&means, 0.02);
        let expected = [-0.001, 0.003, 0.0, -0.002];
        for (u, e) in update.iter().zip(expected) {
            assert!((f64::from(*u) - e).abs() < 1e-7, "{update:?}");
        }
        // Above it: the same direction at norm c, so the best setting stays the best.
        let clipped = merchant_selection_update(&means, 0.001);
        let norm = clipped.iter().map(|&u| f64::from(u).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 0.001).abs() < 1e-7, "norm {norm}");
        let best = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).expect("settings");
        assert_eq!((best(&update), best(&clipped)), (best(&means), best(&means)));
        // Centred, the differences get the clip norm the common level would take: scaling
        // the values leaves a difference of 0.004 a few ten-thousandths at c = 0.02.
        let scaled = selection_update(&means, 0.02);
        assert!(update[1] - update[3] > 0.004 && scaled[1] - scaled[3] < 0.0005, "{update:?} {scaled:?}");
        // A merchant whose settings all score the same sends nothing.
        assert_eq!(merchant_selection_update(&[0.02; 4], 0.1), vec![0.0; 4]);
    }

    #[test]
    fn a_selection_update_is_the_scaled_values_within_the_clip_norm_and_nothing_else() {
        let c = 3.0;
        // Values in [0, 1] are scaled by c/√k.
        assert_eq!(selection_update(&[1.0, 0.5, 0.0, 1.0], c), vec![1.5, 0.75, 0.0, 1.5]);
        // Every setting at NDCG 1: exactly the clip norm.
        let norm: f64 =
            selection_update(&[1.0; 4], c).iter().map(|&u| f64::from(u).powi(2)).sum::<f64>().sqrt();
        assert!((norm - c).abs() < 1e-6, "{norm}");
        // Out-of-range values (a corrupted score) are clipped, not passed on.
        let update = selection_update(&[100.0, 0.0, 0.0, 0.0], c);
        let norm: f64 = update.iter().map(|&u| f64::from(u).powi(2)).sum::<f64>().sqrt();
        assert!(norm <= c * (1.0 + 1e-6), "{norm}");
    }

    /// A release's sparse update is, coordinate for coordinate, the dense update the
    /// shared-with-popularity path gives at φ = 1 (repeated entries summed in order, entries
    /// past the catalogue dropped), and densifies back to it.
    #[test]
    fn a_release_update_is_the_dense_release_at_its_nonzero_coordinates() {
        let c = 2.0;
        let contribution = [(3, 0.5f32), (1, 0.6), (3, 0.3), (9, 5.0), (0, 0.1)];
        let mut dense = vec![7.0f32; 10];
        share_with_popularity(&mut dense, 4..9, &contribution, c, 1.0);
        let (indices, mut values) = release_update(4..9, &contribution, c);
        assert_eq!(indices, vec![4, 5, 7]);
        let sparse = Update::Sparse { indices: &indices, values: &mut values };
        assert_eq!(sparse.to_dense(10).expect("fits"), dense);
        assert!(sparse.to_dense(6).is_err(), "a coordinate past the adapter is an error");
    }

    #[test]
    fn an_update_shared_with_the_popularity_histogram_stays_within_the_clip_norm() {
        let c = 2.0;
        let share = guild_proto::tower::POPULARITY_SHARE;
        // An adversarial shopper: a huge trained update, and a stale histogram part that
        // must be overwritten, not added to.
        let mut update = vec![1e6f32; 10];
        share_with_popularity(&mut update, 6..10, &[(0, 0.6), (3, 0.8), (9, 5.0)], c, share);
        let trained: f64 = update[..6].iter().map(|&u| f64::from(u).powi(2)).sum::<f64>().sqrt();
        assert!((trained - c * (1.0 - share * share).sqrt()).abs() < 1e-3, "{trained}");
        let w = (c * share) as f32;
        assert_eq!(&update[6..], &[0.6 * w, 0.0, 0.0, 0.8 * w], "item 9 is outside the catalogue");
        let total: f64 = update.iter().map(|&u| f64::from(u).powi(2)).sum::<f64>().sqrt();
        assert!(total <= c * (1.0 + 1e-6), "{total}");
        // A small trained update is left as it is.
        let mut small = vec![0.01f32; 4];
        share_with_popularity(&mut small, 2..4, &[], c, share);
        assert_eq!(small, vec![0.01, 0.01, 0.0, 0.0]);
        // A popularity release (φ = 1): nothing trained survives, the histogram gets all of c.
        let mut release = vec![1e6f32; 10];
        share_with_popularity(&mut release, 6..10, &[(1, 0.6), (2, 0.8)], c, 1.0);
        assert_eq!(release, vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.2, 1.6, 0.0]);
    }
}
