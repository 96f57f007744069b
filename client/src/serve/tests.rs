//! The serving engine against the tower's own scores, and its HTTP interface over loopback.

use std::io::{Read as _, Write as _};

use guild_proto::domain::AdapterManifest;
use guild_proto::tower::TowerShape;
use rand::{Rng as _, SeedableRng as _};

use super::http::{AppState, serve};
use super::*;
use crate::data::User;

const ITEMS: usize = 40;
const HIDDEN: usize = 12;

fn config() -> TowerConfig {
    TowerConfig {
        shape: TowerShape {
            hidden: HIDDEN,
            history: 6,
            zero_shot_items: 3,
            item_rank: 3,
            width: 8,
            layers: 1,
            heads: 2,
            catalogue: ITEMS,
            neighbours: 3,
            pair_sketch: 0,
            item_ids: 0,
            spectral: 0,
        },
        seed: 5,
    }
}

fn items() -> Tensor {
    tch::manual_seed(3);
    normalise(&Tensor::randn([ITEMS as i64, HIDDEN as i64], (Kind::Float, Device::Cpu)))
}

/// A trained-looking offset: every value moved, the popularity histogram and the
/// item-to-item counts positive.
fn offset(seed: u64) -> Vec<f32> {
    let shape = config().shape;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let mut offset: Vec<f32> =
        (0..guild_proto::tower::parameter_count(&shape)).map(|_| rng.gen_range(-0.2..0.2)).collect();
    if let Some(range) = guild_proto::tower::accumulated_range(&shape) {
        for v in &mut offset[range] {
            *v = rng.gen_range(0.0..50.0);
        }
    }
    offset
}

fn dataset() -> Dataset {
    Dataset {
        name: "shop".into(),
        titles: (0..ITEMS).map(|i| format!("item {i}")).collect(),
        item_ids: (0..ITEMS as u64).map(|i| 1000 + 7 * i).collect(),
        users: vec![User { id: "u".into(), history: vec![1, 2], test_target: 3 }],
    }
}

/// The query encoder of these tests: the title vector of the item named by the query's
/// number ("item 7" encodes as item 7's vector).
struct TitleEncoder(Tensor);

impl QueryEncoder for TitleEncoder {
    fn encode(&self, text: &str) -> Result<Tensor, ModelError> {
        let n: i64 = text.trim_start_matches("item ").parse().unwrap_or(0);
        Ok(self.0.get(n))
    }
}

fn engine(offset: &[f32], personalisation: f64) -> Engine {
    let items = items();
    let model = ServedModel::from_offset(config(), offset, 4, [9; 32], &items).expect("model");
    Engine::new(Arc::new(Catalogue::new(&dataset())), model, Box::new(TitleEncoder(items)), personalisation)
}

fn ids(indices: &[ItemIndex]) -> Vec<u64> {
    indices.iter().map(|&i| 1000 + 7 * u64::from(i)).collect()
}

#[test]
fn recommendations_are_the_towers_own_scores_best_first_without_the_history() {
    let offset = offset(1);
    let engine = engine(&offset, 0.0);
    let mut tower = Tower::new(config(), Device::Cpu).expect("tower");
    tower.set_offset(&offset).expect("offset");
    let neighbours = TitleNeighbours::of_items(&items(), 3).expect("neighbours");
    tower.set_neighbours(&neighbours).expect("neighbours");
    let history: Vec<ItemIndex> = vec![3, 9, 12, 3, 30];
    // The served scores carry the item-to-item prior (the counts are positive).
    assert!(
        tower.history_prior(&[&history]).expect("a prior").abs().sum(Kind::Float).double_value(&[]) > 0.0
    );
    let expected = Vec::<f32>::try_from(&tower.scores(&items(), &[&history]).squeeze_dim(0)).expect("scores");
    let ranked = engine.recommend(&ids(&history), 10, true).expect("ranked");
    assert_eq!(ranked.adapter_version, 4);
    assert_eq!(ranked.items.len(), 10);
    let mut best: Vec<(usize, f32)> =
        expected.iter().copied().enumerate().filter(|(i, _)| !history.contains(&(*i as ItemIndex))).collect();
    best.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (hit, (index, score)) in ranked.items.iter().zip(&best) {
        assert_eq!(hit.item_id, 1000 + 7 * *index as u64);
        assert_eq!(hit.title, format!("item {index}"));
        assert!((hit.score - score).abs() < 1e-5, "{} vs {score}", hit.score);
    }
    // Without the exclusion the seen items compete too.
    let all = engine.recommend(&ids(&history), ITEMS, false).expect("ranked");
    assert_eq!(all.items.len(), ITEMS);
    // An empty history ranks by the popularity prior alone.
    let popular = engine.recommend(&[], 3, true).expect("ranked");
    let prior = Vec::<f32>::try_from(&tower.prior().expect("prior")).expect("prior");
    assert!((popular.items[0].score - prior.iter().copied().fold(f32::MIN, f32::max)).abs() < 1e-6);
}

#[test]
fn an_exported_adapter_serves_the_same_scores_as_the_federations_flat_vector() {
    let offset = offset(2);
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = AdapterManifest::sequence_tower([1; 32], config().shape, config().seed);
    guild_proto::adapter::write_tower(dir.path(), &manifest, &offset).expect("export");
    let exported = ServedModel::from_export(dir.path(), &manifest, config(), &items()).expect("import");
    let direct = ServedModel::from_offset(config(), &offset, 0, [0; 32], &items()).expect("model");
    let history = [1, 5, 8];
    let (exported, direct) = (exported.recommend_scores(&history), direct.recommend_scores(&history));
    for (a, b) in exported.expect("scores").iter().zip(direct.expect("scores")) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    // Another shape's export is refused, naming the tensor.
    let other = TowerConfig { shape: TowerShape { item_rank: 4, ..config().shape }, ..config() };
    let other_manifest = AdapterManifest::sequence_tower([1; 32], other.shape, other.seed);
    let error = ServedModel::from_export(dir.path(), &other_manifest, other, &items()).expect_err("shape");
    assert!(error.to_string().contains("item_a"), "{error}");
}

#[test]
fn bad_requests_name_what_is_wrong() {
    let engine = engine(&offset(1), 0.3);
    let error = engine.recommend(&[1000, 5], 10, true).expect_err("unknown id").to_string();
    assert!(error.contains("item 5 is not in this shop's catalogue"), "{error}");
    for k in [0, MAX_K + 1] {
        assert!(
            engine.recommend(&[1000], k, true).expect_err("k").to_string().contains("k must be in 1..=100")
        );
    }
    assert!(engine.search("   ", &[], 10).expect_err("empty").to_string().contains("query must have"));
    let long = "x".repeat(MAX_QUERY_BYTES + 1);
    assert!(engine.search(&long, &[], 10).is_err());
    let history = vec![1000; MAX_HISTORY + 1];
    assert!(engine.recommend(&history, 10, true).expect_err("long").to_string().contains("at most 1000"));
}

#[test]
fn search_finds_the_item_named_and_personalises_by_the_recommendation_score() {
    // With a residual, a query is still scored against the title vectors (the query is
    // MiniLM's; the adapted vectors are not in its space): "item 7" scores 1 at item 7.
    let adapted = engine(&offset(3), 0.0);
    let ranked = adapted.search("item 7", &ids(&[1, 2]), 5).expect("search");
    assert_eq!(ranked.items[0].item_id, 1000 + 7 * 7);
    assert!((ranked.items[0].score - 1.0).abs() < 1e-5, "{}", ranked.items[0].score);
    // With the item residual at zero, the adapted vectors are the title vectors: the
    // query "item 7" (item 7's own vector) has cosine 1 with item 7.
    let mut zero_residual = offset(3);
    for name in ["item_a", "item_b"] {
        let range = guild_proto::tower::tensor_range(&config().shape, name).expect(name);
        zero_residual[range].iter_mut().for_each(|v| *v = 0.0);
    }
    let text_only = engine(&zero_residual, 0.0);
    let ranked = text_only.search("item 7", &ids(&[1, 2]), 5).expect("search");
    assert_eq!(ranked.items[0].item_id, 1000 + 7 * 7);
    assert!((ranked.items[0].score - 1.0).abs() < 1e-5);
    // Personalised: the text score plus w times the recommendation score, item by item.
    let personalised = engine(&zero_residual, 0.5);
    let history = [1, 2];
    let text: HashMap<u64, f32> = text_only
        .search("item 7", &ids(&history), ITEMS)
        .expect("search")
        .items
        .into_iter()
        .map(|h| (h.item_id, h.score))
        .collect();
    let recommendation: HashMap<u64, f32> = text_only
        .recommend(&ids(&history), ITEMS, false)
        .expect("ranked")
        .items
        .into_iter()
        .map(|h| (h.item_id, h.score))
        .collect();
    for hit in personalised.search("item 7", &ids(&history), ITEMS).expect("search").items {
        let expected = text[&hit.item_id] + 0.5 * recommendation[&hit.item_id];
        assert!((hit.score - expected).abs() < 1e-5, "{} vs {expected}", hit.score);
    }
}

#[test]
fn a_swapped_model_answers_the_next_request_and_names_its_version() {
    let engine = engine(&offset(1), 0.0);
    assert_eq!(engine.version().0, 4);
    let next = ServedModel::from_offset(config(), &offset(2), 5, [7; 32], &items()).expect("model");
    engine.swap(next);
    assert_eq!(engine.version(), (5, [7; 32]));
    assert_eq!(engine.recommend(&ids(&[1]), 3, true).expect("ranked").adapter_version, 5);
}

#[test]
fn a_batch_scores_every_row_exactly_as_that_row_alone() {
    let model = ServedModel::from_offset(config(), &offset(4), 1, [0; 32], &items()).expect("model");
    let (q7, q20) = (items().get(7), items().get(20));
    let (long, short, longest): (Vec<ItemIndex>, Vec<ItemIndex>, Vec<ItemIndex>) =
        (vec![3, 9, 12, 3, 30], vec![8, 1], (0..11).collect());
    // Histories of different lengths (padded in the batch; one longer than the tower's
    // window), an empty one, searches with and without a history.
    let rows = [
        Row { history: &long, query: None },
        Row { history: &[], query: None },
        Row { history: &short, query: Some(&q7) },
        Row { history: &[], query: Some(&q20) },
        Row { history: &longest, query: None },
        Row { history: &short, query: None },
        Row { history: &long, query: Some(&q20) },
    ];
    let batch = model.scores(&rows, 0.4).expect("scores");
    assert_eq!(batch.size(), [rows.len() as i64, ITEMS as i64]);
    for (i, row) in rows.iter().enumerate() {
        let alone = match row.query {
            None => model.recommend_scores(row.history),
            Some(query) => model.search_scores(query, row.history, 0.4),
        }
        .expect("scores");
        let batched = Vec::<f32>::try_from(&batch.get(i as i64)).expect("row");
        for (a, b) in batched.iter().zip(&alone) {
            assert!((a - b).abs() < 1e-5, "row {i}: {a} vs {b}");
        }
    }
    // A search without a history is the query's cosine with the title vectors alone: no
    // prior, and not the adapted vectors.
    let text = Vec::<f32>::try_from(&batch.get(3)).expect("row");
    let titles = normalise(&model.items);
    let cosine = Vec::<f32>::try_from(&titles.matmul(&normalise(&q20.view([1, -1])).tr()).squeeze_dim(1))
        .expect("cosine");
    for (a, b) in text.iter().zip(&cosine) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn requests_queued_while_the_scorer_is_busy_are_scored_as_one_batch_with_their_own_answers() {
    let engine = engine(&offset(1), 0.3);
    let queries: Vec<Query> = (0..12u32)
        .map(|i| {
            let history = ids(&(i..i + 1 + i % 4).collect::<Vec<ItemIndex>>());
            if i % 3 == 0 {
                Query::Search { text: format!("item {i}"), history, k: 5 }
            } else {
                Query::Recommend { history, k: 5, exclude_seen: i % 2 == 0 }
            }
        })
        .collect();
    let alone: Vec<Ranked> =
        queries.iter().map(|q| engine.answer_blocking(q.clone()).expect("answered")).collect();
    let before = engine.batches_scored();
    // Hold the model so the scorer waits: everything submitted meanwhile queues up.
    let serving = engine.serving.load_full();
    let held = serving.model.lock().expect("model");
    let replies: Vec<_> = queries
        .iter()
        .map(|q| {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            engine.submit(q.clone(), Reply::Blocking(tx)).expect("queued");
            rx
        })
        .collect();
    drop(held);
    for (rx, expected) in replies.into_iter().zip(&alone) {
        let answer = rx.recv().expect("a reply").expect("ranked");
        assert_eq!(answer.adapter_version, expected.adapter_version);
        assert_eq!(
            answer.items.iter().map(|h| h.item_id).collect::<Vec<_>>(),
            expected.items.iter().map(|h| h.item_id).collect::<Vec<_>>()
        );
        for (a, b) in answer.items.iter().zip(&expected.items) {
            assert!((a.score - b.score).abs() < 1e-5);
        }
    }
    // The first request may have been taken alone before the others arrived; the rest
    // waited together.
    let batches = engine.batches_scored() - before;
    assert!(batches <= 2, "{batches} batches for 12 requests queued together");
}

#[test]
fn a_recommend_only_server_refuses_searches_with_the_reason_and_still_recommends() {
    let model = ServedModel::from_offset(config(), &offset(1), 4, [9; 32], &items()).expect("model");
    let engine = Engine::new(Arc::new(Catalogue::new(&dataset())), model, Box::new(RecommendOnly), 0.3);
    let error = engine.search("item 7", &[], 5).expect_err("no searches");
    assert!(matches!(error, ServeError::Encoder(_)), "{error}");
    assert!(error.to_string().contains("recommendations only"), "{error}");
    assert_eq!(engine.recommend(&ids(&[1, 2]), 5, true).expect("ranked").items.len(), 5);
}

#[test]
fn top_k_keeps_the_best_in_order_and_skips_what_is_excluded_or_not_finite() {
    let scores = [0.1, 0.9, f32::NAN, 0.5, 0.9, 0.3];
    let excluded: HashSet<ItemIndex> = [3].into_iter().collect();
    assert_eq!(top_k(&scores, 3, &excluded), vec![1, 4, 5]);
    assert_eq!(top_k(&scores, 10, &HashSet::new()), vec![1, 4, 3, 5, 0]);
    assert!(top_k(&scores, 0, &HashSet::new()).is_empty());
}

/// One HTTP/1.1 exchange with the server at `address`: the status and the body.
fn exchange(address: std::net::SocketAddr, request: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream.write_all(request.as_bytes()).expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status line");
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

fn post(address: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    exchange(
        address,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// The test engine served over HTTP and gRPC on a loopback port: the runtime serving it,
/// the engine, the server's state (its metrics; version 4 set) and the address.
fn served() -> (tokio::runtime::Runtime, Arc<Engine>, Arc<AppState>, std::net::SocketAddr) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let engine = Arc::new(engine(&offset(1), 0.2));
    let state = Arc::new(AppState::new(engine.clone()));
    state.metrics.set_version(4);
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let address = listener.local_addr().expect("address");
    let serving = state.clone();
    runtime.spawn(async move { serve(listener, serving).await });
    (runtime, engine, state, address)
}

#[test]
fn the_http_interface_answers_json_and_refuses_bad_input_with_a_reason() {
    let (_runtime, engine, _, address) = served();

    let (status, body) = post(address, "/v1/recommend", r#"{"history": [1007, 1014], "k": 3}"#);
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(answer["adapter_version"], 4);
    let direct = engine.recommend(&[1007, 1014], 3, true).expect("ranked");
    let served: Vec<u64> = answer["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|h| h["item_id"].as_u64().expect("id"))
        .collect();
    assert_eq!(served, direct.items.iter().map(|h| h.item_id).collect::<Vec<_>>());

    let (status, body) = post(address, "/v1/search", r#"{"query": "item 7", "k": 2}"#);
    assert_eq!(status, 200, "{body}");

    for (path, body, expected) in [
        ("/v1/recommend", r#"{"history": [1007, 3]}"#, "item 3 is not in this shop's catalogue"),
        ("/v1/recommend", r#"{"history": [1007], "k": 0}"#, "k must be in 1..=100"),
        ("/v1/recommend", r#"{"history": "1007"}"#, "history"),
        ("/v1/recommend", r#"{"history": [1007], "colour": 1}"#, "colour"),
        ("/v1/recommend", "{not json", "JSON"),
        ("/v1/search", r#"{"query": ""}"#, "query must have"),
    ] {
        let (status, answer) = post(address, path, body);
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer.contains(expected), "{body}: {answer}");
    }
    let huge = format!(r#"{{"history": [{}]}}"#, vec!["1007"; 20_000].join(","));
    assert_eq!(post(address, "/v1/recommend", &huge).0, 413);

    let (status, body) = exchange(address, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 200);
    assert!(body.contains(r#""adapter_version":4"#), "{body}");
    let (_, body) = exchange(address, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(body.contains("guild_serve_request_seconds_count{endpoint=\"recommend\"}"), "{body}");
    assert!(body.contains("guild_serve_adapter_version 4"), "{body}");
    let batches = format!("guild_serve_scored_batches_total {}", engine.batches_scored());
    assert!(engine.batches_scored() > 0 && body.contains(&batches), "{body}");
    assert!(body.contains("# TYPE guild_serve_scored_batches counter"), "{body}");
    assert!(body.contains("guild_serve_requests_refused_total{endpoint=\"recommend\"}"), "{body}");
    // The page to try it: served as HTML, calling the two endpoints this router answers, and
    // putting titles on the page as text only.
    let (status, page) = exchange(address, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 200);
    assert!(
        page.contains("fetch(path") && page.contains("\"/v1/search\"") && page.contains("\"/v1/recommend\"")
    );
    assert!(!page.contains("innerHTML"), "titles are shop data: never parsed as markup");
    let (status, body) =
        exchange(address, "GET /openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 200);
    let document: serde_json::Value = serde_json::from_str(&body).expect("the OpenAPI document is JSON");
    assert!(document["paths"]["/v1/recommend"].is_object() && document["paths"]["/v1/search"].is_object());
}

/// The same two calls over gRPC, on the HTTP interface's port: the engine's answers, the
/// defaults (`k` 10, the history left out), and bad requests refused `INVALID_ARGUMENT`
/// with the same reasons; both interfaces' latencies are recorded.
#[test]
fn the_grpc_interface_answers_on_the_same_port_and_refuses_bad_input_with_a_reason() {
    use guild_proto::v1::shop_client::ShopClient;
    use guild_proto::v1::{RecommendRequest, SearchRequest};
    let (runtime, engine, metrics, address) = served();

    let mut client = runtime.block_on(ShopClient::connect(format!("http://{address}"))).expect("connect");
    let ids_of = |items: &[guild_proto::v1::RankedItem]| items.iter().map(|h| h.item_id).collect::<Vec<_>>();
    let recommend = |client: &mut ShopClient<_>, history: Vec<u64>, k, include_seen| {
        runtime.block_on(client.recommend(RecommendRequest { history, k, include_seen }))
    };
    let answer = recommend(&mut client, vec![1007, 1014], Some(3), false).expect("ranked").into_inner();
    let direct = engine.recommend(&[1007, 1014], 3, true).expect("ranked");
    assert_eq!(answer.adapter_version, 4);
    assert_eq!(ids_of(&answer.items), direct.items.iter().map(|h| h.item_id).collect::<Vec<_>>());
    assert_eq!(answer.items[0].title, direct.items[0].title);
    assert!((answer.items[0].score - direct.items[0].score).abs() < 1e-6);
    // Defaults: ten items, the history's own left out unless asked for.
    let answer = recommend(&mut client, vec![1007], None, false).expect("ranked").into_inner();
    assert_eq!(answer.items.len(), 10);
    assert!(!ids_of(&answer.items).contains(&1007));
    let seen = recommend(&mut client, vec![1007], Some(ITEMS as u32), true).expect("ranked").into_inner();
    assert!(ids_of(&seen.items).contains(&1007));

    let search = |client: &mut ShopClient<_>, query: &str, k| {
        runtime.block_on(client.search(SearchRequest { query: query.into(), history: vec![1007], k }))
    };
    let answer = search(&mut client, "item 7", Some(2)).expect("ranked").into_inner();
    let direct = engine.search("item 7", &[1007], 2).expect("ranked");
    assert_eq!(ids_of(&answer.items), direct.items.iter().map(|h| h.item_id).collect::<Vec<_>>());

    for (status, expected) in [
        (recommend(&mut client, vec![1007, 3], None, false), "item 3 is not in this shop's catalogue"),
        (recommend(&mut client, vec![1007], Some(0), false), "k must be in 1..=100"),
        (recommend(&mut client, vec![1007], Some(101), false), "k must be in 1..=100"),
        (search(&mut client, "  ", None), "query must have"),
    ] {
        let status = status.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(expected), "{status:?}");
    }
    // The JSON interface answers on the same port.
    assert_eq!(post(address, "/v1/recommend", r#"{"history": [1007], "k": 2}"#).0, 200);
    let text = metrics.metrics.encode();
    assert!(text.contains("guild_serve_request_seconds_count{endpoint=\"grpc_recommend\"} 6"), "{text}");
    assert!(text.contains("guild_serve_requests_refused_total{endpoint=\"grpc_search\"} 1"), "{text}");
    assert!(text.contains("guild_serve_request_seconds_count{endpoint=\"recommend\"} 1"), "{text}");
}

#[test]
fn a_change_of_the_federations_adapter_is_named_and_an_unchanged_one_is_not() {
    let serving =
        AdapterManifest::sequence_tower([1; 32], config().shape, config().seed).with_catalogue(Some([2; 32]));
    assert_eq!(manifest_change(&serving, &serving.clone()), None);
    let recatalogued = serving.clone().with_catalogue(Some([3; 32]));
    let change = manifest_change(&serving, &recatalogued).expect("changed");
    assert!(change.contains(&hex::encode([3; 32])) && change.contains(&hex::encode([2; 32])), "{change}");
    let unstated = serving.clone().with_catalogue(None);
    assert!(manifest_change(&serving, &unstated).expect("changed").contains("none stated"));
    let reseeded = AdapterManifest::sequence_tower([1; 32], config().shape, config().seed + 1)
        .with_catalogue(Some([2; 32]));
    let change = manifest_change(&serving, &reseeded).expect("changed");
    assert!(change.contains("frozen_a_seed") && change.contains("stated now"), "{change}");
    let rebased = AdapterManifest { base_model_sha256: [9; 32], ..serving.clone() };
    assert!(manifest_change(&serving, &rebased).expect("changed").contains("base model"));
}

/// Debian's Chromium, driven over WebDriver by Debian's chromedriver (`scripts/setup --test`
/// installs both; `GUILD_CHROMIUM` and `GUILD_CHROMEDRIVER` name other binaries).
mod browser {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use fantoccini::{Client, ClientBuilder, Locator};

    use super::*;

    /// The chromedriver process, stopped when dropped.
    struct Driver(Child);

    impl Drop for Driver {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn binary(variable: &str, default: &str) -> String {
        let path = std::env::var(variable).unwrap_or_else(|_| default.to_owned());
        assert!(
            Command::new(&path).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok(),
            "{path} does not run: this test drives Debian's chromium with its chromium-driver \
             (`scripts/setup --test` installs both; {variable} names another binary)"
        );
        path
    }

    async fn start(profile: &Path) -> (Driver, Client) {
        let chromium = binary("GUILD_CHROMIUM", "/usr/bin/chromium");
        let chromedriver = binary("GUILD_CHROMEDRIVER", "chromedriver");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = Driver(
            Command::new(chromedriver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver"),
        );
        // Headless, and without the background connections a closed network refuses.
        let capabilities = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let serde_json::Value::Object(capabilities) = capabilities else { unreachable!("an object literal") };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let started = Instant::now();
        loop {
            match ClientBuilder::new(connector.clone())
                .capabilities(capabilities.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(client) => return (driver, client),
                Err(_) if started.elapsed() < Duration::from_secs(30) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no WebDriver session within 30 s: {e}"),
            }
        }
    }

    /// Waits until the text of `#id` contains `wanted`; returns it.
    async fn text_of(client: &Client, id: &str, wanted: &str) -> String {
        let started = Instant::now();
        loop {
            let text = client.find(Locator::Id(id)).await.expect(id).text().await.expect("text");
            if text.contains(wanted) {
                return text;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "#{id} says {text:?}, waited for {wanted:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks the first element `css` selects.
    async fn click(client: &Client, css: &str) {
        client.find(Locator::Css(css)).await.expect(css).click().await.expect("click");
    }

    /// The ids in the results table, in order (each row's item cell ends "(id)").
    async fn shown(client: &Client) -> Vec<u64> {
        let mut ids = Vec::new();
        for row in client.find_all(Locator::Css("#results tbody tr td:nth-child(2)")).await.expect("rows") {
            let text = row.text().await.expect("text");
            let id = text.rsplit('(').next().and_then(|t| t.trim_end_matches(')').parse().ok());
            ids.push(id.unwrap_or_else(|| panic!("no item id in {text:?}")));
        }
        ids
    }

    /// The page in a real browser: it shows the served version, searches, adds a result to
    /// the shopper's history and recommends after it, each list the engine's own answer.
    #[test]
    fn the_page_searches_builds_a_history_and_recommends_in_chromium() {
        let (runtime, engine, _, address) = served();
        let profile = tempfile::tempdir().expect("tempdir");

        let searched = engine.search("item 7", &[], 10).expect("ranked");
        let searched: Vec<u64> = searched.items.iter().map(|h| h.item_id).collect();
        let first = searched[0];
        let recommended = engine.recommend(&[first], 10, true).expect("ranked");
        let recommended: Vec<u64> = recommended.items.iter().map(|h| h.item_id).collect();

        runtime.block_on(async {
            let (_driver, client) = start(profile.path()).await;
            client.goto(&format!("http://{address}/")).await.expect("the page loads");
            text_of(&client, "version", &format!("adapter version 4 over {ITEMS} items")).await;

            client.find(Locator::Id("query")).await.expect("query").send_keys("item 7").await.expect("typed");
            click(&client, "#search-form button").await;
            text_of(&client, "status", "Search: 10 items, ranked by adapter version 4").await;
            assert_eq!(shown(&client).await, searched);

            click(&client, "#results tbody tr button").await;
            let history = text_of(&client, "history", &format!("({first})")).await;
            assert_eq!(history.lines().count(), 1, "{history}");

            click(&client, "#recommend").await;
            text_of(&client, "status", "Recommendations: 10 items").await;
            assert_eq!(shown(&client).await, recommended);
            assert!(!recommended.contains(&first), "the history's own item is left out");
            client.close().await.expect("close the session");
        });
    }
}
