//! The federation's model served to the merchant's own shop: recommendations from a
//! shopper's history and search by text, personalised by that history.
//!
//! - [`Catalogue`]: the merchant's items (ids, titles) and their frozen MiniLM title vectors.
//! - [`ServedModel`]: one adapter version (the sequence tower) ready to score: its adapted
//!   item vectors, normalised once, and its popularity prior.
//! - [`Engine`]: the catalogue, the model behind an atomic pointer (a new version is built
//!   beside the one serving and swapped in; a request in flight finishes on the version it
//!   started with) and the query encoder. Every answer names the adapter version it came from.
//! - [`http`]: the HTTP/JSON interface (`guild-client serve`).
//!
//! Scores are the ones the federation trained for and evaluates: recommendation is
//! [`Tower::scores`] (cosine of the shopper and adapted item vectors plus the popularity
//! prior; the same function `python/rank_with_tower.py` reproduces). Search scores an item by
//! the cosine of the query's MiniLM vector and the adapted item vector, plus, when a history
//! is given, `personalisation` times the recommendation score.

pub mod grpc;
pub mod http;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use guild_proto::domain::AdapterManifest;
use tch::{Device, Kind, Tensor};

use crate::data::{Dataset, ItemIndex};
use crate::model::tower::{TitleNeighbours, Tower, TowerConfig, normalise};
use crate::model::{BaseModel, ModelError};

/// Most items one answer may hold.
pub const MAX_K: usize = 100;
/// Most history items one request may carry (the tower reads only its last window).
pub const MAX_HISTORY: usize = 1_000;
/// Longest search query, in bytes.
pub const MAX_QUERY_BYTES: usize = 1_000;

/// Why a request cannot be answered. `BadRequest` is the caller's mistake (HTTP 400, gRPC
/// `INVALID_ARGUMENT`); `Model` and `Stopped` are this server's.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("scoring stopped: {0}")]
    Stopped(String),
}

/// The merchant's catalogue: item ids and titles by item index, and the index of each id.
#[derive(Debug)]
pub struct Catalogue {
    pub ids: Vec<u64>,
    pub titles: Vec<String>,
    index: HashMap<u64, ItemIndex>,
}

impl Catalogue {
    pub fn new(dataset: &Dataset) -> Self {
        let index = dataset.item_ids.iter().enumerate().map(|(i, &id)| (id, i as ItemIndex)).collect();
        Self { ids: dataset.item_ids.clone(), titles: dataset.titles.clone(), index }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The item indices of `ids`, or an error naming the first id the catalogue lacks.
    pub fn resolve(&self, ids: &[u64]) -> Result<Vec<ItemIndex>, ServeError> {
        if ids.len() > MAX_HISTORY {
            return Err(ServeError::BadRequest(format!(
                "history has {} items; at most {MAX_HISTORY} are accepted",
                ids.len()
            )));
        }
        ids.iter()
            .map(|id| {
                self.index.get(id).copied().ok_or_else(|| {
                    ServeError::BadRequest(format!("item {id} is not in this shop's catalogue"))
                })
            })
            .collect()
    }
}

/// One adapter version, ready to score.
#[derive(Debug)]
pub struct ServedModel {
    pub version: u64,
    pub sha256: [u8; 32],
    tower: Tower,
    /// The catalogue's frozen title vectors `[items, hidden]` (shared storage).
    items: Tensor,
    /// Adapted item vectors, normalised, `[items, hidden]`.
    adapted: Tensor,
    /// The popularity prior `[items]`, when the tower has one.
    prior: Option<Tensor>,
}

impl ServedModel {
    /// The tower at `initial + offset` (the federation's flat vector for this version) over
    /// the catalogue's title vectors `items`.
    pub fn from_offset(
        config: TowerConfig,
        offset: &[f32],
        version: u64,
        sha256: [u8; 32],
        items: &Tensor,
    ) -> Result<Self, ModelError> {
        let mut tower = Tower::new(config, Device::Cpu)?;
        tower.set_offset(offset)?;
        let catalogue = tower.config().shape.catalogue;
        let rows = items.size().first().copied().unwrap_or(0) as usize;
        if catalogue != 0 && catalogue != rows {
            return Err(ModelError::AdapterShape(format!(
                "the adapter's popularity prior covers {catalogue} items, this catalogue has {rows}"
            )));
        }
        if tower.needs_neighbours() {
            tower.set_neighbours(&title_neighbours(items, tower.config().shape.neighbours)?)?;
        }
        let items = items.shallow_clone();
        let (adapted, prior) = tch::no_grad(|| (normalise(&tower.adapt_items(&items)), tower.prior()));
        Ok(Self { version, sha256, tower, items, adapted, prior })
    }

    /// The tower exported by `guild-coordinator export-adapter` in `dir`
    /// (`tower.safetensors`, every tensor at its value; `version` and the hash of the file
    /// name it).
    pub fn from_export(
        dir: &Path,
        manifest: &AdapterManifest,
        config: TowerConfig,
        items: &Tensor,
    ) -> Result<Self, ModelError> {
        let path = dir.join("tower.safetensors");
        let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| ModelError::AdapterShape(format!("{}: {e}", path.display())))?;
        let mut values = Vec::with_capacity(manifest.parameter_count());
        for t in &manifest.tensors {
            let view = tensors.tensor(&t.name).map_err(|e| {
                ModelError::AdapterShape(format!("{}: tensor {}: {e}", path.display(), t.name))
            })?;
            if view.dtype() != safetensors::Dtype::F32 || view.shape() != t.shape.as_slice() {
                return Err(ModelError::AdapterShape(format!(
                    "{}: tensor {} is {:?} {:?}, the federation's adapter has F32 {:?}",
                    path.display(),
                    t.name,
                    view.dtype(),
                    view.shape(),
                    t.shape
                )));
            }
            values.extend(view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        }
        let initial = guild_proto::tower::initial_values(&config.shape, config.seed);
        if initial.len() != values.len() {
            return Err(ModelError::AdapterShape(format!(
                "{}: {} values where the adapter has {}",
                path.display(),
                values.len(),
                initial.len()
            )));
        }
        let offset: Vec<f32> = values.iter().zip(&initial).map(|(v, i)| v - i).collect();
        Self::from_offset(config, &offset, 0, guild_proto::adapter::sha256(&bytes), items)
    }

    /// The shopper's normalised vector `[1, hidden]`, `None` for an empty history.
    fn shopper(&self, history: &[ItemIndex]) -> Option<Tensor> {
        (!history.is_empty()).then(|| normalise(&self.tower.shoppers(&self.items, &[history])))
    }

    /// Each catalogue item's recommendation score for `history`: [`Tower::scores`]; for an
    /// empty history the popularity prior alone (zeros without one).
    pub fn recommend_scores(&self, history: &[ItemIndex]) -> Vec<f32> {
        tch::no_grad(|| {
            let scores = match self.shopper(history) {
                Some(shopper) => self.with_prior(shopper.matmul(&self.adapted.tr()).squeeze_dim(0), history),
                None => self
                    .with_prior(Tensor::zeros([self.adapted.size()[0]], (Kind::Float, Device::Cpu)), history),
            };
            Vec::<f32>::try_from(&scores).unwrap_or_default()
        })
    }

    /// Each item's search score: the cosine of the query vector (normalised, `[hidden]`)
    /// and the adapted item vector, plus `personalisation` times the recommendation score
    /// when there is a history.
    pub fn search_scores(&self, query: &Tensor, history: &[ItemIndex], personalisation: f64) -> Vec<f32> {
        tch::no_grad(|| {
            let text = self.adapted.matmul(&normalise(&query.view([1, -1])).tr()).squeeze_dim(1);
            let scores = match self.shopper(history) {
                Some(shopper) if personalisation != 0.0 => {
                    text + self.with_prior(shopper.matmul(&self.adapted.tr()).squeeze_dim(0), history)
                        * personalisation
                }
                _ => text,
            };
            Vec::<f32>::try_from(&scores).unwrap_or_default()
        })
    }

    /// `scores` plus the popularity prior and `history`'s item-to-item prior (what the
    /// tower has of them).
    fn with_prior(&self, scores: Tensor, history: &[ItemIndex]) -> Tensor {
        let scores = match &self.prior {
            Some(prior) => scores + prior,
            None => scores,
        };
        if history.is_empty() {
            return scores;
        }
        self.tower.with_history_prior(scores.unsqueeze(0), &[history]).squeeze_dim(0)
    }
}

/// The catalogue's `m` title neighbours, computed once per catalogue and neighbour count in
/// this process (a new adapter version over the same catalogue reuses them).
fn title_neighbours(items: &Tensor, m: usize) -> Result<TitleNeighbours, ModelError> {
    type Key = (usize, usize, u64);
    static CACHE: Mutex<Option<(Key, TitleNeighbours)>> = Mutex::new(None);
    let rows = items.size().first().copied().unwrap_or(0) as usize;
    // The catalogue's fingerprint: the sum of its vectors (a different catalogue of the same
    // size does not reuse another's lists).
    let sum = tch::no_grad(|| items.sum(Kind::Double).double_value(&[]));
    let key = (m, rows, sum.to_bits());
    let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((cached, neighbours)) = cache.as_ref()
        && *cached == key
    {
        return Ok(neighbours.clone());
    }
    let neighbours = TitleNeighbours::of_items(items, m)?;
    *cache = Some((key, neighbours.clone()));
    Ok(neighbours)
}

/// Encodes a search query into the item vectors' space.
pub trait QueryEncoder: Send {
    /// The query's normalised vector `[hidden]`.
    fn encode(&self, text: &str) -> Result<Tensor, ModelError>;
}

impl QueryEncoder for BaseModel {
    fn encode(&self, text: &str) -> Result<Tensor, ModelError> {
        tch::no_grad(|| Ok(self.embed(&[text], None)?.squeeze_dim(0).to(Device::Cpu)))
    }
}

/// One ranked item of an answer.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Hit {
    pub item_id: u64,
    pub title: String,
    pub score: f32,
}

/// An answer: the items, best first, and the adapter version that ranked them.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Ranked {
    pub adapter_version: u64,
    pub items: Vec<Hit>,
}

/// The top `k` indices of `scores`, best first (ties by index), leaving out `excluded`.
pub fn top_k(scores: &[f32], k: usize, excluded: &HashSet<ItemIndex>) -> Vec<ItemIndex> {
    let mut candidates: Vec<ItemIndex> = (0..scores.len() as ItemIndex)
        .filter(|i| !excluded.contains(i) && scores[*i as usize].is_finite())
        .collect();
    let order =
        |a: &ItemIndex, b: &ItemIndex| scores[*b as usize].total_cmp(&scores[*a as usize]).then(a.cmp(b));
    let k = k.min(candidates.len());
    if k == 0 {
        return Vec::new();
    }
    candidates.select_nth_unstable_by(k - 1, order);
    candidates.truncate(k);
    candidates.sort_unstable_by(order);
    candidates
}

/// The catalogue, the model being served and the query encoder.
pub struct Engine {
    catalogue: Arc<Catalogue>,
    model: ArcSwap<Mutex<ServedModel>>,
    encoder: Mutex<Box<dyn QueryEncoder>>,
    /// The weight of the recommendation score in search (chosen on validation shoppers).
    personalisation: f64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("items", &self.catalogue.len())
            .field("version", &self.version())
            .finish()
    }
}

fn check_k(k: usize) -> Result<(), ServeError> {
    if k == 0 || k > MAX_K {
        return Err(ServeError::BadRequest(format!("k must be in 1..={MAX_K}, got {k}")));
    }
    Ok(())
}

impl Engine {
    pub fn new(
        catalogue: Arc<Catalogue>,
        model: ServedModel,
        encoder: Box<dyn QueryEncoder>,
        personalisation: f64,
    ) -> Self {
        Self {
            catalogue,
            model: ArcSwap::from_pointee(Mutex::new(model)),
            encoder: Mutex::new(encoder),
            personalisation,
        }
    }

    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// The version and hash of the adapter being served.
    pub fn version(&self) -> (u64, [u8; 32]) {
        let model = self.model.load();
        let model = model.lock().unwrap_or_else(PoisonError::into_inner);
        (model.version, model.sha256)
    }

    /// Serves `model` from now on; requests already running finish on the old one.
    pub fn swap(&self, model: ServedModel) {
        self.model.store(Arc::new(Mutex::new(model)));
    }

    /// The `k` best items to show after `history` (item ids, oldest first), leaving out
    /// the history's own items when `exclude_seen`.
    pub fn recommend(&self, history: &[u64], k: usize, exclude_seen: bool) -> Result<Ranked, ServeError> {
        check_k(k)?;
        let history = self.catalogue.resolve(history)?;
        let model = self.model.load_full();
        let model = model.lock().unwrap_or_else(PoisonError::into_inner);
        let scores = model.recommend_scores(&history);
        let excluded = if exclude_seen { history.iter().copied().collect() } else { HashSet::new() };
        Ok(self.ranked(model.version, &scores, k, &excluded))
    }

    /// The `k` best items for `query`, personalised by `history` when it is not empty.
    pub fn search(&self, query: &str, history: &[u64], k: usize) -> Result<Ranked, ServeError> {
        check_k(k)?;
        let query = query.trim();
        if query.is_empty() || query.len() > MAX_QUERY_BYTES {
            return Err(ServeError::BadRequest(format!(
                "query must have 1 to {MAX_QUERY_BYTES} bytes of text, got {}",
                query.len()
            )));
        }
        let history = self.catalogue.resolve(history)?;
        let vector = self.encoder.lock().unwrap_or_else(PoisonError::into_inner).encode(query)?;
        let model = self.model.load_full();
        let model = model.lock().unwrap_or_else(PoisonError::into_inner);
        let scores = model.search_scores(&vector, &history, self.personalisation);
        Ok(self.ranked(model.version, &scores, k, &HashSet::new()))
    }

    fn ranked(&self, version: u64, scores: &[f32], k: usize, excluded: &HashSet<ItemIndex>) -> Ranked {
        let items = top_k(scores, k, excluded)
            .into_iter()
            .map(|i| Hit {
                item_id: self.catalogue.ids[i as usize],
                title: self.catalogue.titles[i as usize].clone(),
                score: scores[i as usize],
            })
            .collect();
        Ranked { adapter_version: version, items }
    }
}

/// Fetches committed version `version` from the coordinator (its hash checked over the
/// bytes received) and builds it over `items` (a shallow clone of the title vectors), off
/// the async workers.
pub async fn fetch_version(
    connection: &mut crate::net::Connection,
    version: u64,
    manifest: &AdapterManifest,
    config: &TowerConfig,
    items: Tensor,
) -> Result<ServedModel, anyhow::Error> {
    let (bytes, sha256) = connection.download_adapter(version).await?;
    let offset = guild_proto::adapter::from_bytes(&bytes, manifest.parameter_count())
        .map_err(|e| anyhow::anyhow!("adapter version {version}: {e}"))?;
    let config = config.clone();
    let model = tokio::task::spawn_blocking(move || {
        ServedModel::from_offset(config, &offset, version, sha256, &items)
    })
    .await??;
    Ok(model)
}

/// Keeps `state` serving the latest committed version: every `period`, asks the coordinator
/// for its latest version and, when it is newer, builds it beside the one serving and swaps
/// it in. A failure is logged and retried at the next tick; the old version keeps serving.
pub async fn follow(
    mut connection: crate::net::Connection,
    state: Arc<http::AppState>,
    manifest: AdapterManifest,
    config: TowerConfig,
    items: Tensor,
    period: std::time::Duration,
) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let latest = match connection.status().await {
            Ok(status) => status.latest_adapter_version,
            Err(e) => {
                tracing::warn!(
                    "cannot ask the coordinator for its latest version: {e}; serving the current one"
                );
                continue;
            }
        };
        if latest <= state.engine.version().0 {
            continue;
        }
        match fetch_version(&mut connection, latest, &manifest, &config, items.shallow_clone()).await {
            Ok(model) => {
                state.engine.swap(model);
                state.metrics.set_version(latest);
                tracing::info!("now serving adapter version {latest}");
            }
            Err(e) => tracing::warn!("cannot load adapter version {latest}: {e:#}; serving the current one"),
        }
    }
}

#[cfg(test)]
mod tests;
