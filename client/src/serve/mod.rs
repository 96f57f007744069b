//! The federation's model served to the merchant's own shop: recommendations from a
//! shopper's history and search by text, personalised by that history.
//!
//! - [`Catalogue`]: the merchant's items (ids, titles) and their frozen MiniLM title vectors.
//! - [`ServedModel`]: one adapter version ready to score: the sequence tower (its adapted item
//!   vectors, normalised once, and its priors), or FFA-LoRA inside MiniLM (a shopper is the
//!   adapted MiniLM's vector of the titles of its last items, against the frozen title
//!   vectors, as the federation evaluates it); [`ModelSpec`] says which, and how to build a
//!   version from the federation's flat vector.
//! - [`Engine`]: the catalogue, the model behind an atomic pointer (a new version is built
//!   beside the one serving and swapped in between batches) and the scoring thread, which
//!   scores the requests queued together as one batch with the query encoder and one product
//!   over the item vectors. Every answer names the adapter version it came from.
//! - [`http`]: the HTTP/JSON interface and the page to try it (`guild-client serve`);
//!   [`grpc`]: the same two calls over gRPC, on the same port.
//!
//! Scores are the ones the federation trained for and evaluates: recommendation is
//! [`Tower::scores`] (cosine of the shopper and adapted item vectors plus the popularity
//! prior; the same function `python/rank_with_tower.py` reproduces). Search scores an item by
//! the cosine of the query's MiniLM vector and the item's MiniLM title vector (the query and
//! the titles share MiniLM's space; the adapted vectors, item IDs included, do not), plus,
//! when a history is given, `personalisation` times the recommendation score.

pub mod grpc;
pub mod http;

use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use guild_proto::domain::AdapterManifest;
use tch::{Device, Kind, Tensor};

use crate::data::{Dataset, ItemIndex};
use crate::model::lora::{Adapters, LoraConfig};
use crate::model::tower::{TitleNeighbours, Tower, TowerConfig, normalise};
use crate::model::{BaseModel, ModelError};

/// Most items one answer may hold.
pub const MAX_K: usize = 100;
/// Most history items one request may carry (the tower reads only its last window).
pub const MAX_HISTORY: usize = 1_000;
/// Longest search query, in bytes.
pub const MAX_QUERY_BYTES: usize = 1_000;

/// Why a request cannot be answered. `BadRequest` is the caller's mistake (HTTP 400, gRPC
/// `INVALID_ARGUMENT`); the others are this server's.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("scoring stopped: {0}")]
    Stopped(String),
    #[error("encoding the query failed: {0}")]
    Encoder(String),
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

/// How to build a served version from the federation's flat vector: the adapter family and
/// what it needs beside the values.
#[derive(Clone, Debug)]
pub enum ModelSpec {
    /// The sequence tower of this shape and seed.
    Tower(TowerConfig),
    /// FFA-LoRA inside the base model.
    Lora(LoraSpec),
}

/// What an FFA-LoRA version needs beside its B values: its settings, where the base model it
/// adapts is (each version loads its own copy: libtorch's tensors are not shared between
/// threads) and the catalogue's titles, from which a shopper's query text is made
/// ([`crate::retrieval::query_text`]: its last [`crate::learner::LORA_HISTORY_ITEMS`]
/// titles, most recent first).
#[derive(Clone, Debug)]
pub struct LoraSpec {
    pub config: LoraConfig,
    pub model_dir: std::path::PathBuf,
    pub max_tokens: usize,
    pub titles: Arc<[String]>,
}

/// What a served version ranks shoppers with.
#[derive(Debug)]
enum Ranker {
    Tower(Tower),
    Lora { base: Box<BaseModel>, adapters: Adapters, titles: Arc<[String]> },
}

/// One adapter version, ready to score.
#[derive(Debug)]
pub struct ServedModel {
    pub version: u64,
    pub sha256: [u8; 32],
    ranker: Ranker,
    /// The catalogue's frozen title vectors `[items, hidden]` (shared storage).
    items: Tensor,
    /// Adapted item vectors, normalised, `[items, hidden]`.
    adapted: Tensor,
    /// The title vectors normalised, `[items, hidden]`, that a query is scored against,
    /// where they are not `adapted` (the tower; FFA-LoRA's items are the title vectors).
    titles: Option<Tensor>,
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
        let (adapted, titles, prior) =
            tch::no_grad(|| (normalise(&tower.adapt_items(&items)), normalise(&items), tower.prior()));
        Ok(Self {
            version,
            sha256,
            ranker: Ranker::Tower(tower),
            items,
            adapted,
            titles: Some(titles),
            prior,
        })
    }

    /// FFA-LoRA at the federation's flat vector `flat` (its B values) over the catalogue's
    /// frozen title vectors `items`: a shopper is the adapted MiniLM's vector of its query
    /// text, an item its frozen title vector, as the federation evaluates the family.
    pub fn from_lora(
        spec: &LoraSpec,
        flat: &[f32],
        version: u64,
        sha256: [u8; 32],
        items: &Tensor,
    ) -> Result<Self, ModelError> {
        let rows = items.size().first().copied().unwrap_or(0) as usize;
        if rows != spec.titles.len() {
            return Err(ModelError::AdapterShape(format!(
                "{rows} title vectors for a catalogue of {} titles",
                spec.titles.len()
            )));
        }
        let base = Box::new(BaseModel::load(&spec.model_dir, spec.max_tokens, Device::Cpu)?);
        let mut adapters = Adapters::new(spec.config.clone(), base.config(), base.sha256(), base.device());
        adapters.set_flat(flat)?;
        let items = items.shallow_clone();
        let adapted = tch::no_grad(|| normalise(&items));
        let ranker = Ranker::Lora { base, adapters, titles: spec.titles.clone() };
        Ok(Self { version, sha256, ranker, items, adapted, titles: None, prior: None })
    }

    /// The version of `spec`'s family at the federation's flat vector `values`.
    pub fn build(
        spec: &ModelSpec,
        values: &[f32],
        version: u64,
        sha256: [u8; 32],
        items: &Tensor,
    ) -> Result<Self, ModelError> {
        match spec {
            ModelSpec::Tower(config) => Self::from_offset(config.clone(), values, version, sha256, items),
            ModelSpec::Lora(lora) => Self::from_lora(lora, values, version, sha256, items),
        }
    }

    /// The shoppers' vectors of `histories` (not normalised), `[histories, hidden]`.
    fn shoppers(&self, histories: &[&[ItemIndex]]) -> Result<Tensor, ModelError> {
        match &self.ranker {
            Ranker::Tower(tower) => Ok(tower.shoppers(&self.items, histories)),
            Ranker::Lora { base, adapters, titles } => {
                let texts: Vec<String> = histories
                    .iter()
                    .map(|h| {
                        // `retrieval::query_text`'s text, from the titles this version holds.
                        h.iter()
                            .rev()
                            .take(crate::learner::LORA_HISTORY_ITEMS)
                            .filter_map(|&i| titles.get(i as usize).map(String::as_str))
                            .collect::<Vec<_>>()
                            .join(" ; ")
                    })
                    .collect();
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                let lora: &dyn crate::model::bert::LowRank = adapters;
                Ok(base.embed_all(&refs, 64, Some(lora))?.to(Device::Cpu))
            }
        }
    }

    /// The item-to-item prior of `histories`, for a tower that has one.
    fn history_prior(&self, histories: &[&[ItemIndex]]) -> Option<Tensor> {
        match &self.ranker {
            Ranker::Tower(tower) => tower.history_prior(histories),
            Ranker::Lora { .. } => None,
        }
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

    /// Each catalogue item's recommendation score for `history`: [`Tower::scores`] (or the
    /// FFA-LoRA shopper's cosine with each title vector); for an empty history the
    /// popularity prior alone (zeros without one).
    pub fn recommend_scores(&self, history: &[ItemIndex]) -> Result<Vec<f32>, ModelError> {
        let scores = self.scores(&[Row { history, query: None }], 0.0)?;
        Ok(Vec::<f32>::try_from(&scores.squeeze_dim(0)).unwrap_or_default())
    }

    /// Each item's search score: the cosine of the query vector (`[hidden]`) and the item's
    /// title vector, plus `personalisation` times the recommendation score when there is a
    /// history.
    pub fn search_scores(
        &self,
        query: &Tensor,
        history: &[ItemIndex],
        personalisation: f64,
    ) -> Result<Vec<f32>, ModelError> {
        let scores = self.scores(&[Row { history, query: Some(query) }], personalisation)?;
        Ok(Vec::<f32>::try_from(&scores.squeeze_dim(0)).unwrap_or_default())
    }

    /// The scores of a batch of rows, `[rows, items]`, each row as
    /// [`Self::recommend_scores`] (no query) or [`Self::search_scores`] (a query) would give
    /// it alone, with one product over each set of item vectors for the whole batch: a row
    /// scores `t·T + w·s·A + w·(prior + item-to-item prior)`, with `t` the normalised query
    /// (zero for a recommendation), `T` the normalised title vectors, `s` the normalised
    /// shopper, `A` the adapted item vectors and `w` the weight of the recommendation score
    /// (1 for a recommendation, `personalisation` for a search with a history, 0 for one
    /// without); where `T` is `A` (FFA-LoRA) that is `(t + w·s)·A`, one product. Reading the
    /// 26 MB of item vectors once for many requests, not once each, is what lets a loaded
    /// server keep up.
    pub fn scores(&self, rows: &[Row<'_>], personalisation: f64) -> Result<Tensor, ModelError> {
        tch::no_grad(|| {
            let (b, hidden) = (rows.len() as i64, self.adapted.size()[1]);
            let weight = |row: &Row<'_>| match row.query {
                None => 1.0,
                Some(_) if row.history.is_empty() => 0.0,
                Some(_) => personalisation as f32,
            };
            let weights: Vec<f32> = rows.iter().map(weight).collect();
            let mut queries = Tensor::zeros([b, hidden], (Kind::Float, Device::Cpu));
            let searched: Vec<i64> = (0..b).filter(|&i| rows[i as usize].query.is_some()).collect();
            // The searched rows' query scores against the title vectors, where those are not `A`.
            let mut text_scores: Option<Tensor> = None;
            if !searched.is_empty() {
                let texts: Vec<Tensor> = searched
                    .iter()
                    .filter_map(|&i| rows[i as usize].query)
                    .map(|q| normalise(&q.view([1, -1])))
                    .collect();
                let texts = Tensor::cat(&texts, 0);
                match &self.titles {
                    None => queries = queries.index_copy(0, &Tensor::from_slice(&searched), &texts),
                    Some(titles) => text_scores = Some(texts.matmul(&titles.tr())),
                }
            }
            // Rows whose shopper counts: a history, at a weight that is not zero.
            let personal: Vec<i64> = (0..b)
                .filter(|&i| !rows[i as usize].history.is_empty() && weights[i as usize] != 0.0)
                .collect();
            let histories: Vec<&[ItemIndex]> = personal.iter().map(|&i| rows[i as usize].history).collect();
            let personal_weights =
                Tensor::from_slice(&personal.iter().map(|&i| weights[i as usize]).collect::<Vec<f32>>())
                    .unsqueeze(1);
            let personal = Tensor::from_slice(&personal);
            if !histories.is_empty() {
                let shoppers = normalise(&self.shoppers(&histories)?) * &personal_weights;
                queries = queries.index_add(0, &personal, &shoppers);
            }
            let mut scores = queries.matmul(&self.adapted.tr());
            if let Some(text) = &text_scores {
                scores = scores.index_add(0, &Tensor::from_slice(&searched), text);
            }
            if let Some(prior) = &self.prior
                && weights.iter().any(|&w| w != 0.0)
            {
                scores += Tensor::from_slice(&weights).unsqueeze(1) * prior.unsqueeze(0);
            }
            if !histories.is_empty()
                && let Some(prior) = self.history_prior(&histories)
            {
                scores = scores.index_add(0, &personal, &(prior * &personal_weights));
            }
            Ok(scores)
        })
    }
}

/// One row of a batch to score: a shopper's history (item indices, oldest first; may be
/// empty) and, for a search, the query's vector `[hidden]`.
#[derive(Clone, Copy, Debug)]
pub struct Row<'a> {
    pub history: &'a [ItemIndex],
    pub query: Option<&'a Tensor>,
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

/// Encodes search queries into the item vectors' space.
pub trait QueryEncoder: Send {
    /// The query's normalised vector `[hidden]`.
    fn encode(&self, text: &str) -> Result<Tensor, ModelError>;

    /// The normalised vectors of several queries, `[queries, hidden]` (one pass where the
    /// encoder can batch).
    fn encode_all(&self, texts: &[&str]) -> Result<Tensor, ModelError> {
        let vectors = texts.iter().map(|t| self.encode(t)).collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::stack(&vectors, 0))
    }
}

impl QueryEncoder for BaseModel {
    fn encode(&self, text: &str) -> Result<Tensor, ModelError> {
        tch::no_grad(|| Ok(self.embed(&[text], None)?.squeeze_dim(0).to(Device::Cpu)))
    }

    fn encode_all(&self, texts: &[&str]) -> Result<Tensor, ModelError> {
        tch::no_grad(|| Ok(self.embed(texts, None)?.to(Device::Cpu)))
    }
}

/// An encoder for a server that answers recommendations only: every search is refused
/// with an error naming why.
#[derive(Clone, Copy, Debug, Default)]
pub struct RecommendOnly;

impl QueryEncoder for RecommendOnly {
    fn encode(&self, _: &str) -> Result<Tensor, ModelError> {
        Err(ModelError::Tokenizer("this server answers recommendations only, not searches".into()))
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

/// Most requests scored in one batch.
pub const MAX_BATCH: usize = 64;

/// A request to rank, as the interfaces receive it (item ids, not indices).
#[derive(Clone, Debug)]
pub enum Query {
    /// The `k` best items to show after `history` (oldest first), without the history's
    /// own items when `exclude_seen`.
    Recommend { history: Vec<u64>, k: usize, exclude_seen: bool },
    /// The `k` best items for `text`, personalised by `history` when it is not empty.
    Search { text: String, history: Vec<u64>, k: usize },
}

/// Where a job's answer goes: a caller blocked on a thread, or a task awaiting it.
enum Reply {
    Blocking(std::sync::mpsc::SyncSender<Result<Ranked, ServeError>>),
    Async(tokio::sync::oneshot::Sender<Result<Ranked, ServeError>>),
}

impl Reply {
    fn send(self, answer: Result<Ranked, ServeError>) {
        // A caller that went away (a closed connection) needs no answer.
        match self {
            Self::Blocking(tx) => drop(tx.send(answer)),
            Self::Async(tx) => drop(tx.send(answer)),
        }
    }
}

/// A validated request waiting for the scorer.
struct Job {
    history: Vec<ItemIndex>,
    /// The query's text, for a search.
    text: Option<String>,
    k: usize,
    exclude_seen: bool,
    reply: Reply,
}

/// The version being served, readable without waiting for the scorer.
struct Serving {
    version: u64,
    sha256: [u8; 32],
    model: Mutex<ServedModel>,
}

/// The catalogue, the model being served, and the scoring thread.
///
/// Requests are validated on the caller's thread and queued; one scoring thread takes
/// everything queued (up to [`MAX_BATCH`]) and scores it as one batch against the version
/// being served when the batch starts: one encoder pass for its search queries and one
/// product with the item vectors for all of it ([`ServedModel::scores`]). An idle server
/// answers a lone request at once (no waiting to fill a batch); a loaded one answers many
/// requests for about the price of one read of the item vectors.
pub struct Engine {
    catalogue: Arc<Catalogue>,
    serving: Arc<ArcSwap<Serving>>,
    jobs: std::sync::mpsc::Sender<Job>,
    /// Batches scored so far (with the requests answered, the mean batch size).
    batches: BatchCounter,
}

/// The count of batches the scorer has scored, shared with the server's metrics.
pub type BatchCounter = prometheus_client::metrics::counter::Counter<u64, std::sync::atomic::AtomicU64>;

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

fn stopped() -> ServeError {
    ServeError::Stopped("the scoring thread ended before answering".into())
}

impl Engine {
    /// Serves `model`, searching with `encoder` and weighting the recommendation score by
    /// `personalisation` in search (chosen on validation shoppers). Starts the scoring
    /// thread, which ends when the engine is dropped.
    pub fn new(
        catalogue: Arc<Catalogue>,
        model: ServedModel,
        encoder: Box<dyn QueryEncoder>,
        personalisation: f64,
    ) -> Self {
        let serving = Arc::new(ArcSwap::from_pointee(Serving::new(model)));
        let (jobs, queue) = std::sync::mpsc::channel();
        let batches = BatchCounter::default();
        let scorer = Scorer {
            catalogue: catalogue.clone(),
            serving: serving.clone(),
            encoder,
            personalisation,
            batches: batches.clone(),
        };
        let spawned =
            std::thread::Builder::new().name("guild-serve-scorer".into()).spawn(move || scorer.run(&queue));
        if let Err(e) = spawned {
            // Every request will answer `Stopped`, naming why.
            tracing::error!("cannot start the scoring thread: {e}");
        }
        Self { catalogue, serving, jobs, batches }
    }

    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// How many batches the scorer has scored (requests over batches is the mean batch).
    pub fn batches_scored(&self) -> u64 {
        self.batches.get()
    }

    /// The scorer's batch count itself, to register as a metric.
    pub fn batch_counter(&self) -> BatchCounter {
        self.batches.clone()
    }

    /// The version and hash of the adapter being served.
    pub fn version(&self) -> (u64, [u8; 32]) {
        let serving = self.serving.load();
        (serving.version, serving.sha256)
    }

    /// Serves `model` from now on; a batch already being scored finishes on the old one.
    pub fn swap(&self, model: ServedModel) {
        self.serving.store(Arc::new(Serving::new(model)));
    }

    /// Checks `query` and queues it for the scorer, its answer to go to `reply`.
    fn submit(&self, query: Query, reply: Reply) -> Result<(), ServeError> {
        let job = match query {
            Query::Recommend { history, k, exclude_seen } => {
                check_k(k)?;
                Job { history: self.catalogue.resolve(&history)?, text: None, k, exclude_seen, reply }
            }
            Query::Search { text, history, k } => {
                check_k(k)?;
                let text = text.trim();
                if text.is_empty() || text.len() > MAX_QUERY_BYTES {
                    return Err(ServeError::BadRequest(format!(
                        "query must have 1 to {MAX_QUERY_BYTES} bytes of text, got {}",
                        text.len()
                    )));
                }
                let history = self.catalogue.resolve(&history)?;
                Job { history, text: Some(text.to_owned()), k, exclude_seen: false, reply }
            }
        };
        self.jobs.send(job).map_err(|_| stopped())
    }

    /// Answers `query` (from an async task).
    pub async fn answer(&self, query: Query) -> Result<Ranked, ServeError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(query, Reply::Async(tx))?;
        rx.await.map_err(|_| stopped())?
    }

    /// Answers `query`, blocking this thread until it is scored.
    pub fn answer_blocking(&self, query: Query) -> Result<Ranked, ServeError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(query, Reply::Blocking(tx))?;
        rx.recv().map_err(|_| stopped())?
    }

    /// The `k` best items to show after `history` (item ids, oldest first), leaving out
    /// the history's own items when `exclude_seen`.
    pub fn recommend(&self, history: &[u64], k: usize, exclude_seen: bool) -> Result<Ranked, ServeError> {
        self.answer_blocking(Query::Recommend { history: history.to_vec(), k, exclude_seen })
    }

    /// The `k` best items for `query`, personalised by `history` when it is not empty.
    pub fn search(&self, query: &str, history: &[u64], k: usize) -> Result<Ranked, ServeError> {
        self.answer_blocking(Query::Search { text: query.to_owned(), history: history.to_vec(), k })
    }
}

impl Serving {
    fn new(model: ServedModel) -> Self {
        Self { version: model.version, sha256: model.sha256, model: Mutex::new(model) }
    }
}

/// The scoring thread's state: it alone touches the model and the encoder.
struct Scorer {
    catalogue: Arc<Catalogue>,
    serving: Arc<ArcSwap<Serving>>,
    encoder: Box<dyn QueryEncoder>,
    personalisation: f64,
    batches: BatchCounter,
}

impl Scorer {
    /// Scores batches until every sender of `queue` is gone.
    fn run(self, queue: &std::sync::mpsc::Receiver<Job>) {
        while let Ok(first) = queue.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            // A panic inside libtorch fails this batch (its callers get `Stopped` as the
            // replies drop), not the server.
            self.batches.inc();
            let scored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.score(batch)));
            if scored.is_err() {
                tracing::error!("scoring a batch panicked; its requests were answered with an error");
            }
        }
    }

    fn score(&self, batch: Vec<Job>) {
        let serving = self.serving.load_full();
        let model = serving.model.lock().unwrap_or_else(PoisonError::into_inner);
        let texts: Vec<&str> = batch.iter().filter_map(|job| job.text.as_deref()).collect();
        let vectors = if texts.is_empty() {
            Ok(Vec::new())
        } else {
            self.encoder.encode_all(&texts).map(|t| (0..texts.len() as i64).map(|i| t.get(i)).collect())
        };
        let vectors: Vec<Tensor> = match vectors {
            Ok(vectors) => vectors,
            Err(e) => {
                // The searches fail with the encoder's error; the recommendations go on.
                let message = e.to_string();
                let (searches, rest): (Vec<Job>, Vec<Job>) =
                    batch.into_iter().partition(|j| j.text.is_some());
                for job in searches {
                    job.reply.send(Err(ServeError::Encoder(message.clone())));
                }
                drop(model);
                return self.score(rest);
            }
        };
        let mut searched = vectors.iter();
        let rows: Vec<Row<'_>> = batch
            .iter()
            .map(|job| Row {
                history: &job.history,
                query: if job.text.is_some() { searched.next() } else { None },
            })
            .collect();
        let scores = if rows.is_empty() { None } else { Some(model.scores(&rows, self.personalisation)) };
        drop(model);
        let scores = match scores {
            None => return,
            Some(Ok(scores)) => scores,
            Some(Err(e)) => {
                // The shoppers' encoder failed (FFA-LoRA runs the base model per request).
                let message = e.to_string();
                for job in batch {
                    job.reply.send(Err(ServeError::Model(ModelError::Tokenizer(message.clone()))));
                }
                return;
            }
        };
        let scores = Vec::<f32>::try_from(&scores.flatten(0, -1)).unwrap_or_default();
        let items = self.catalogue.len();
        for (i, job) in batch.into_iter().enumerate() {
            let row = scores.get(i * items..(i + 1) * items).unwrap_or(&[]);
            let excluded =
                if job.exclude_seen { job.history.iter().copied().collect() } else { HashSet::new() };
            job.reply.send(Ok(ranked(&self.catalogue, serving.version, row, job.k, &excluded)));
        }
    }
}

fn ranked(
    catalogue: &Catalogue,
    version: u64,
    scores: &[f32],
    k: usize,
    excluded: &HashSet<ItemIndex>,
) -> Ranked {
    let items = top_k(scores, k, excluded)
        .into_iter()
        .map(|i| Hit {
            item_id: catalogue.ids[i as usize],
            title: catalogue.titles[i as usize].clone(),
            score: scores[i as usize],
        })
        .collect();
    Ranked { adapter_version: version, items }
}

/// Fetches committed version `version` from the coordinator (its hash checked over the
/// bytes received) and builds it over `items` (a shallow clone of the title vectors), off
/// the async workers.
pub async fn fetch_version(
    connection: &mut crate::net::Connection,
    version: u64,
    manifest: &AdapterManifest,
    spec: &ModelSpec,
    items: Tensor,
) -> Result<ServedModel, anyhow::Error> {
    let (offset, sha256) = download_values(connection, version, manifest).await?;
    build_off_the_workers(spec, offset, version, sha256, items).await
}

/// Committed version `version`'s flat values (its hash checked over the bytes received by
/// `download_adapter`, its length against `manifest`) and that hash.
async fn download_values(
    connection: &mut crate::net::Connection,
    version: u64,
    manifest: &AdapterManifest,
) -> Result<(Vec<f32>, [u8; 32]), anyhow::Error> {
    let (bytes, sha256) = connection.download_adapter(version).await?;
    let values = guild_proto::adapter::from_bytes(&bytes, manifest.parameter_count())
        .map_err(|e| anyhow::anyhow!("adapter version {version}: {e}"))?;
    Ok((values, sha256))
}

/// [`ServedModel::build`] on a blocking thread, off the async workers.
async fn build_off_the_workers(
    spec: &ModelSpec,
    values: Vec<f32>,
    version: u64,
    sha256: [u8; 32],
    items: Tensor,
) -> Result<ServedModel, anyhow::Error> {
    let spec = spec.clone();
    Ok(tokio::task::spawn_blocking(move || ServedModel::build(&spec, &values, version, sha256, &items))
        .await??)
}

/// The versions a shop serves for the federation's `latest`: `latest` alone, or, with
/// `average_last` > 1 (`[serve] average_last`), the tail of training versions ending at it
/// (`guild_proto::average::tail_versions`; `training_from` is the first training version the
/// coordinator's status states). `latest` alone where the coordinator does not say
/// (`training_from` 0) or `latest` is not a training version (a release, a selection).
pub fn served_versions(latest: u64, training_from: u64, average_last: u64) -> RangeInclusive<u64> {
    if average_last <= 1 || training_from == 0 {
        return latest..=latest;
    }
    guild_proto::average::tail_versions(training_from, latest, average_last).unwrap_or(latest..=latest)
}

/// Fetches `versions` (each one's hash checked over the bytes received, as
/// [`fetch_version`] does) and builds their tail average (`guild_proto::average::tail_average`:
/// the trained coordinates' mean, the accumulated statistics the newest's) over `items`; the
/// model names the newest version and the SHA-256 of the averaged values. One version is
/// [`fetch_version`].
pub async fn fetch_average(
    connection: &mut crate::net::Connection,
    versions: RangeInclusive<u64>,
    manifest: &AdapterManifest,
    spec: &ModelSpec,
    items: Tensor,
) -> Result<ServedModel, anyhow::Error> {
    let latest = *versions.end();
    if *versions.start() == latest {
        return fetch_version(connection, latest, manifest, spec, items).await;
    }
    let mut values = Vec::new();
    for version in versions.clone() {
        values.push(download_values(connection, version, manifest).await?.0);
    }
    let averaged = guild_proto::average::tail_average(&values, manifest.accumulated_range())
        .map_err(|e| anyhow::anyhow!("the mean of adapter versions {} to {latest}: {e}", versions.start()))?;
    drop(values);
    let sha256 = guild_proto::adapter::sha256(&guild_proto::adapter::to_bytes(&averaged));
    build_off_the_workers(spec, averaged, latest, sha256, items).await
}

/// The versions `guild-client run` keeps in `dir` (folders `v{N}`), with their numbers.
pub fn kept_versions(dir: &Path) -> std::io::Result<Vec<(u64, std::path::PathBuf)>> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.strip_prefix('v')?.parse().ok()?;
            Some((version, e.path()))
        })
        .collect())
}

/// The folder to serve for `[serve] adapter = dir`: `dir` itself when it holds an exported
/// tower, else its newest kept version `v{N}` (what `guild-client run` keeps), else `dir`
/// (whose missing files are then named when it is read).
pub fn newest_kept(dir: &Path) -> std::path::PathBuf {
    if dir.join("tower.json").is_file() {
        return dir.to_owned();
    }
    kept_versions(dir)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, path)| path.join("tower.json").is_file())
        .max_by_key(|(version, _)| *version)
        .map_or_else(|| dir.to_owned(), |(_, path)| path)
}

/// How the federation's manifest (`stated`, from its status) differs from the one serving,
/// or `None` when every version it commits can be served by this shop: its catalogue digest
/// (naming both), then the adapter's settings, then its base model.
pub fn manifest_change(serving: &AdapterManifest, stated: &AdapterManifest) -> Option<String> {
    if serving == stated {
        return None;
    }
    let hexed = |d: Option<[u8; 32]>| d.map_or_else(|| "none stated".to_owned(), hex::encode);
    if serving.catalogue_sha256 != stated.catalogue_sha256 {
        return Some(format!(
            "catalogue {} where this shop serves {}",
            hexed(stated.catalogue_sha256),
            hexed(serving.catalogue_sha256)
        ));
    }
    let settings = crate::config::AdapterSettings::from_manifest;
    let differences = settings(stated).compare(&settings(serving), "stated now", "serving");
    if !differences.is_empty() {
        return Some(differences.join("; "));
    }
    Some(format!(
        "base model {} where this shop serves {}",
        hexed(Some(stated.base_model_sha256)),
        hexed(Some(serving.base_model_sha256))
    ))
}

/// Keeps `state` serving the latest committed version: every `period`, asks the coordinator
/// for its latest version and, when it is newer, builds it beside the one serving and swaps
/// it in. With `average_last` > 1 what is built is the mean of the last training versions
/// ending at it ([`served_versions`], [`fetch_average`]). A failure is logged and retried at
/// the next tick; the old version keeps serving.
pub async fn follow(
    mut connection: crate::net::Connection,
    state: Arc<http::AppState>,
    manifest: AdapterManifest,
    spec: ModelSpec,
    items: Tensor,
    period: std::time::Duration,
    average_last: u64,
) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let (latest, stated, training_from) = match connection.status().await {
            Ok(status) => (status.latest_adapter_version, status.manifest, status.training_from_version),
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
        if let Some(change) = stated.as_ref().and_then(|stated| manifest_change(&manifest, stated)) {
            tracing::warn!(
                "adapter version {latest} follows another adapter than the one serving ({change}); serving the current one (restart `guild-client serve` to take the new adapter)"
            );
            continue;
        }
        let versions = served_versions(latest, training_from, average_last);
        match fetch_average(&mut connection, versions.clone(), &manifest, &spec, items.shallow_clone()).await
        {
            Ok(model) => {
                state.engine.swap(model);
                state.metrics.set_version(latest);
                if versions.start() == versions.end() {
                    tracing::info!("now serving adapter version {latest}");
                } else {
                    tracing::info!(
                        "now serving the mean of adapter versions {} to {latest}",
                        versions.start()
                    );
                }
            }
            Err(e) => tracing::warn!("cannot load adapter version {latest}: {e:#}; serving the current one"),
        }
    }
}

#[cfg(test)]
mod tests;
