//! The HTTP/JSON interface of `guild-client serve`:
//!
//! - `POST /v1/recommend` `{"history": [item ids, oldest first], "k": 10, "exclude_seen": true}`
//! - `POST /v1/search` `{"query": "text", "history": [item ids], "k": 10}`
//! - `GET /healthz`: the adapter version served and its hash
//! - `GET /metrics`: Prometheus latency histograms per endpoint, the served version and
//!   the batches scored
//! - `GET /openapi.json`: the OpenAPI 3 document of the above
//!
//! Answers are `{"adapter_version": V, "items": [{"item_id", "title", "score"}, ...]}`. A
//! malformed body, an unknown item id or a `k` out of range is answered 400 with
//! `{"error": "..."}` naming what is wrong; a body over 64 KiB is answered 413. Scoring runs
//! on the engine's scoring thread, never on the async workers.
//! - `GET /`: a page to try the model (search, build a history, see recommendations).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Deserialize;

use super::{Engine, Query, Ranked, ServeError};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

const OPENAPI: &str = include_str!("openapi.json");
/// The page to try the model: a search box, a history built from the results, and the
/// recommendations after it, over the same two calls (titles set as text, never as markup).
pub const PAGE: &str = include_str!("page.html");

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

/// The server's metrics.
#[derive(Debug)]
pub struct ServeMetrics {
    registry: Registry,
    latency: Family<EndpointLabel, Histogram>,
    adapter_version: Gauge<i64, std::sync::atomic::AtomicI64>,
    requests_refused: Family<EndpointLabel, prometheus_client::metrics::counter::Counter<u64, AtomicU64>>,
}

impl ServeMetrics {
    /// The metrics of a server whose scorer counts its batches in `scored_batches`.
    pub fn new(scored_batches: super::BatchCounter) -> Self {
        let mut registry = Registry::with_prefix("guild_serve");
        let latency = Family::<EndpointLabel, Histogram>::new_with_constructor(|| {
            // 0.5 ms to ~4 s.
            Histogram::new(exponential_buckets(0.0005, 2.0, 14))
        });
        registry.register("request_seconds", "Time to answer a request, by endpoint", latency.clone());
        let adapter_version = Gauge::default();
        registry.register("adapter_version", "The adapter version being served", adapter_version.clone());
        registry.register(
            "scored_batches",
            "Batches of requests scored together (requests over batches: the mean batch)",
            scored_batches,
        );
        let requests_refused = Family::default();
        registry.register(
            "requests_refused",
            "Requests answered with an error, by endpoint",
            requests_refused.clone(),
        );
        Self { registry, latency, adapter_version, requests_refused }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Records the version now served.
    pub fn set_version(&self, version: u64) {
        self.adapter_version.set(i64::try_from(version).unwrap_or(i64::MAX));
    }
}

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub metrics: ServeMetrics,
}

impl AppState {
    /// The state of a server of `engine`, its metrics counting the engine's batches.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { metrics: ServeMetrics::new(engine.batch_counter()), engine }
    }
}

/// An error answer: `{"error": message}` with its status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        match e {
            ServeError::BadRequest(m) => Self(StatusCode::BAD_REQUEST, m),
            ServeError::Model(e) => {
                tracing::error!("serving failed: {e}");
                Self(StatusCode::INTERNAL_SERVER_ERROR, format!("the model failed: {e}"))
            }
            e @ (ServeError::Stopped(_) | ServeError::Encoder(_)) => {
                tracing::error!("serving failed: {e}");
                Self(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        let status =
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE { e.status() } else { StatusCode::BAD_REQUEST };
        Self(status, e.body_text())
    }
}

fn ten() -> usize {
    10
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecommendRequest {
    pub history: Vec<u64>,
    #[serde(default = "ten")]
    pub k: usize,
    #[serde(default = "yes")]
    pub exclude_seen: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    pub query: String,
    #[serde(default)]
    pub history: Vec<u64>,
    #[serde(default = "ten")]
    pub k: usize,
}

/// The router, with its state: the HTTP/JSON endpoints and, on the same port, the gRPC
/// `Shop` service ([`super::grpc`]; HTTP/2 without TLS).
pub fn router(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/v1/recommend", post(recommend))
        .route("/v1/search", post(search))
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state.clone())
        .merge(super::grpc::routes(state))
}

/// Serves `state` on `listener` until the process ends, with `TCP_NODELAY` on every
/// accepted connection: HTTP/2 writes a response as several small frames, and with Nagle's
/// algorithm on, each small frame after the first waits for the peer's delayed
/// acknowledgement (up to 40 ms on Linux; it was the p99 of a lone caller before).
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AppState>) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    let listener = listener.tap_io(|stream| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY on a connection: {e}");
        }
    });
    axum::serve(listener, router(state)).await
}

/// Answers `query` on the engine's scoring thread and records its latency and outcome
/// under `endpoint` (both interfaces' calls).
pub(super) async fn scored(state: &AppState, endpoint: &str, query: Query) -> Result<Ranked, ServeError> {
    let started = Instant::now();
    let result = state.engine.answer(query).await;
    let label = EndpointLabel { endpoint: endpoint.into() };
    state.metrics.latency.get_or_create(&label).observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        state.metrics.requests_refused.get_or_create(&label).inc();
    }
    result
}

fn refused(state: &AppState, endpoint: &str) {
    state.metrics.requests_refused.get_or_create(&EndpointLabel { endpoint: endpoint.into() }).inc();
}

async fn recommend(
    State(state): State<Arc<AppState>>,
    body: Result<Json<RecommendRequest>, JsonRejection>,
) -> Result<Json<Ranked>, ApiError> {
    let Json(request) = body.inspect_err(|_| refused(&state, "recommend"))?;
    let query =
        Query::Recommend { history: request.history, k: request.k, exclude_seen: request.exclude_seen };
    let answer = scored(&state, "recommend", query);
    Ok(Json(answer.await?))
}

async fn search(
    State(state): State<Arc<AppState>>,
    body: Result<Json<SearchRequest>, JsonRejection>,
) -> Result<Json<Ranked>, ApiError> {
    let Json(request) = body.inspect_err(|_| refused(&state, "search"))?;
    let query = Query::Search { text: request.query, history: request.history, k: request.k };
    let answer = scored(&state, "search", query);
    Ok(Json(answer.await?))
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        PAGE,
    )
}

async fn healthz(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let (version, sha256) = state.engine.version();
    Json(serde_json::json!({
        "status": "ok",
        "adapter_version": version,
        "adapter_sha256": hex::encode(sha256),
        "items": state.engine.catalogue().len(),
    }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.encode(),
    )
}
