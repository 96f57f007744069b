//! `guild-client serve` against a real federation: it follows the committed versions and
//! swaps each in without failing a request, and answers over HTTP/JSON and gRPC on one port.
//! Both adapter families: the sequence tower, and FFA-LoRA inside the real MiniLM (a
//! shopper is the adapted model's vector of its recent titles).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use guild_client::data::{Dataset, User};
use guild_client::model::default_model_dir;
use guild_client::model::lora::LoraConfig;
use guild_client::model::tower::{TowerConfig, normalise};
use guild_client::serve::http::{AppState, serve};
use guild_client::serve::{
    Catalogue, Engine, LoraSpec, ModelSpec, QueryEncoder, ServedModel, fetch_average, fetch_version, follow,
    served_versions,
};
use guild_coordinator::config::Config;
use guild_proto::domain::AdapterFamilyName;
use guild_proto::tower::TowerShape;
use guild_proto::v1::shop_client::ShopClient;
use guild_proto::v1::{RecommendRequest, SearchRequest};
use tch::{Device, Kind, Tensor};

use super::harness::{four_merchants, futures_join, wait_for_rounds};
use super::model::{MAX_TOKENS, base_and_titles};

const ITEMS: usize = 16;
const CATALOGUE: [u64; ITEMS] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// Every query is the same vector of ones, of the item vectors' width.
struct NoQueries(i64);

impl QueryEncoder for NoQueries {
    fn encode(&self, _: &str) -> Result<Tensor, guild_client::model::ModelError> {
        Ok(Tensor::ones([self.0], (Kind::Float, Device::Cpu)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_follows_committed_versions_and_never_drops_a_request() {
    let shape = TowerShape::tiny(ITEMS);
    tch::manual_seed(1);
    let items = normalise(&Tensor::randn([ITEMS as i64, 16], (Kind::Float, Device::Cpu)));
    let titles: Vec<String> = (0..ITEMS).map(|i| format!("item {i}")).collect();
    serve_follows_versions(
        |c| {
            c.adapter.family = AdapterFamilyName::SequenceTower;
            c.adapter.tower = shape;
        },
        |c| ModelSpec::Tower(TowerConfig { shape, seed: c.adapter.frozen_a_seed }),
        items,
        titles,
    )
    .await;
}

/// FFA-LoRA served as `guild-client serve` serves it: every version loads MiniLM with the
/// federation's B values (the lightweight merchants send random updates of them), and each
/// recommendation encodes the shopper's recent titles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_follows_committed_lora_versions_and_never_drops_a_request() {
    let (base, titles) = base_and_titles(ITEMS);
    let refs: Vec<&str> = titles.iter().map(String::as_str).collect();
    let items = base.embed_all(&refs, 16, None).expect("title vectors");
    let spec_titles: Arc<[String]> = titles.clone().into();
    serve_follows_versions(
        |c| {
            // MiniLM's own shape (the harness's default LoRA is a toy one).
            (c.adapter.family, c.adapter.layers, c.adapter.hidden) = (AdapterFamilyName::FfaLora, 6, 384);
        },
        move |c| {
            let a = &c.adapter;
            ModelSpec::Lora(LoraSpec {
                config: LoraConfig {
                    rank: a.rank as i64,
                    alpha: f64::from(a.alpha),
                    frozen_a_seed: a.frozen_a_seed,
                    ..LoraConfig::default()
                },
                model_dir: default_model_dir(),
                max_tokens: MAX_TOKENS,
                titles: spec_titles.clone(),
            })
        },
        items,
        titles,
    )
    .await;
}

/// A federation of four lightweight merchants (configured by `family`) commits three
/// versions while a served engine (of `spec`, over the catalogue's `items` vectors and
/// `titles`) answers requests the whole time: none fails, none is answered by an older
/// version than the one before, version 3 is served bit for bit, and both interfaces answer
/// with its items. A shop of another catalogue never takes a version.
async fn serve_follows_versions(
    family: impl FnOnce(&mut Config),
    spec: impl FnOnce(&Config) -> ModelSpec,
    items: Tensor,
    titles: Vec<String>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = four_merchants(dir.path(), 3, |c| {
        family(c);
        // The lightweight merchants' random updates are no signal: James–Stein would shrink
        // every version back to the start, and serve would swap in identical models. Without
        // it four merchants' noise is far above the clip norm, which the coordinator refuses
        // unless told: these versions are for serving, not for ranking well.
        c.rounds.shrinkage = guild_coordinator::config::Shrinkage::None;
        c.privacy.dangerous_allow_noise_above_clip = true;
        c.adapter.catalogue_sha256 = hex::encode(guild_proto::domain::catalogue_sha256(&CATALOGUE));
    })
    .await;
    let manifest = federation.config.manifest().expect("manifest");
    let spec = spec(&federation.config);
    let width = items.size()[1];
    let dataset = Dataset {
        name: "shop".into(),
        titles,
        item_ids: CATALOGUE.to_vec(),
        users: vec![User { id: "u".into(), history: vec![1], test_target: 2 }],
    };

    // The coordinator states the adapter it trains, catalogue included: what a merchant
    // without an `[adapter]` section learns, and what serve holds every version to.
    let mut connection = federation.connect(0).await.expect("connect");
    let status = connection.status().await.expect("status");
    assert_eq!(status.manifest.as_ref(), Some(&manifest));
    // And where its training versions start: what a shop serving their mean averages from.
    let training_from = federation.config.schedule(&manifest).first_training_version();
    assert_eq!(status.training_from_version, training_from);
    guild_client::config::check_catalogue(&manifest, &dataset.item_ids).expect("the shop's catalogue");
    // The served model starts at version 0, fetched and checked like any other.
    let first = fetch_version(&mut connection, 0, &manifest, &spec, items.shallow_clone()).await.expect("v0");
    let engine =
        Arc::new(Engine::new(Arc::new(Catalogue::new(&dataset)), first, Box::new(NoQueries(width)), 0.5));
    let state = Arc::new(AppState::new(engine.clone()));
    let follower = tokio::spawn(follow(
        connection,
        state.clone(),
        manifest.clone(),
        spec.clone(),
        items.shallow_clone(),
        Duration::from_millis(100),
        1,
    ));
    // A shop serving another catalogue (the same items reordered) never takes a version
    // of this federation: its items would be scored at the wrong positions.
    let reordered: Vec<u64> = CATALOGUE.iter().rev().copied().collect();
    let foreign = manifest.clone().with_catalogue(Some(guild_proto::domain::catalogue_sha256(&reordered)));
    let mut other_connection = federation.connect(1).await.expect("connect");
    let other_first =
        fetch_version(&mut other_connection, 0, &foreign, &spec, items.shallow_clone()).await.expect("v0");
    let other_engine = Arc::new(Engine::new(
        Arc::new(Catalogue::new(&dataset)),
        other_first,
        Box::new(NoQueries(width)),
        0.5,
    ));
    let other_follower = tokio::spawn(follow(
        other_connection,
        Arc::new(AppState::new(other_engine.clone())),
        foreign,
        spec.clone(),
        items.shallow_clone(),
        Duration::from_millis(100),
        1,
    ));

    // Requests run the whole time; each must be answered, by a version never older than the last.
    let stop = Arc::new(AtomicBool::new(false));
    let so_far = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let asking = {
        let (engine, stop, so_far) = (engine.clone(), stop.clone(), so_far.clone());
        tokio::task::spawn_blocking(move || {
            let (mut answered, mut last) = (0u64, 0u64);
            // Past the stop, until one answer comes from version 3: a request in flight when
            // serve swapped to it was answered by version 2 (a loaded machine showed it).
            let began = std::time::Instant::now();
            while (!stop.load(Ordering::Relaxed) || last < 3) && began.elapsed() < Duration::from_secs(180) {
                let ranked = engine.recommend(&[1, 2, 3], 5, true).expect("every request is answered");
                assert_eq!(ranked.items.len(), 5);
                assert!(ranked.adapter_version >= last, "version went back");
                last = ranked.adapter_version;
                answered += 1;
                so_far.store(answered, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
            (answered, last)
        })
    };
    // The rounds start once requests are flowing: three tiny rounds can commit in half a
    // second, which a loaded machine (the suite's other tests beside it) may spend on a
    // handful of requests.
    let started = std::time::Instant::now();
    while so_far.load(Ordering::Relaxed) < 10 {
        assert!(started.elapsed() < Duration::from_secs(20), "requests did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let clients = futures_join(&federation, 4, Default::default(), 3).await;
    wait_for_rounds(&federation, 3, Duration::from_secs(90)).await;
    let store = federation.store().expect("store");
    let started = std::time::Instant::now();
    while engine.version().0 < 3 {
        assert!(started.elapsed() < Duration::from_secs(20), "serve did not pick up version 3");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    // The other shop's follower has seen version 3 by now (the same period) and refused it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(other_engine.version().0, 0, "a version for another catalogue was served");
    other_follower.abort();
    let (answered, last) = asking.await.expect("requests ran");
    assert!(answered > 10, "{answered} requests");
    assert_eq!(last, 3);
    // The version served is the one committed, bit for bit.
    let record = store.adapter(3).expect("version 3");
    assert_eq!(engine.version(), (3, record.sha256));
    let values = guild_proto::adapter::from_bytes(&record.data, manifest.parameter_count()).expect("values");
    let expected = ServedModel::build(&spec, &values, 3, record.sha256, &items).expect("model");
    let served = engine.recommend(&[4, 5], ITEMS - 2, true).expect("ranked");
    let scores = expected.recommend_scores(&[4, 5]).expect("scores");
    for hit in served.items {
        assert!((hit.score - scores[hit.item_id as usize]).abs() < 1e-6);
    }
    // A shop serving the mean of the last two training versions (`[serve] average_last = 2`)
    // builds versions 2 and 3 averaged, each download checked, and names version 3.
    let versions = served_versions(3, training_from, 2);
    assert_eq!(versions, (3 - 1).max(training_from)..=3);
    assert_eq!(served_versions(3, training_from, 1), 3..=3);
    assert_eq!(served_versions(3, 0, 2), 3..=3, "a coordinator that does not say: the newest alone");
    let mut averaging = federation.connect(2).await.expect("connect");
    let mean = fetch_average(&mut averaging, versions.clone(), &manifest, &spec, items.shallow_clone())
        .await
        .expect("the mean of the tail");
    let stored: Vec<Vec<f32>> = versions
        .clone()
        .map(|v| {
            let record = store.adapter(v).expect("stored");
            guild_proto::adapter::from_bytes(&record.data, manifest.parameter_count()).expect("values")
        })
        .collect();
    let averaged =
        guild_proto::average::tail_average(&stored, manifest.accumulated_range()).expect("same lengths");
    assert_ne!(averaged, stored[stored.len() - 1], "two different versions");
    let by_hand = ServedModel::build(&spec, &averaged, 3, [0; 32], &items).expect("model");
    assert_eq!(mean.version, 3);
    assert_eq!(mean.sha256, guild_proto::adapter::sha256(&guild_proto::adapter::to_bytes(&averaged)));
    let (got, want) =
        (mean.recommend_scores(&[4, 5]).expect("scores"), by_hand.recommend_scores(&[4, 5]).expect("scores"));
    assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6), "the served mean is the tail's");

    // And the federation's rounds moved them: the start's scores are not version 3's.
    let start = store.adapter(0).expect("version 0");
    let start_values =
        guild_proto::adapter::from_bytes(&start.data, manifest.parameter_count()).expect("values");
    let start = ServedModel::build(&spec, &start_values, 0, start.sha256, &items).expect("model");
    let start_scores = start.recommend_scores(&[4, 5]).expect("scores");
    let moved = start_scores.iter().zip(&scores).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(moved > 1e-4, "version 3 scores as the start does (max |Δ| {moved:e})");

    // Served over loopback: both interfaces answer with version 3's items, on one port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { serve(listener, state).await });
    let direct: Vec<u64> =
        engine.recommend(&[4, 5], 5, true).expect("ranked").items.iter().map(|h| h.item_id).collect();
    let mut shop = ShopClient::connect(format!("http://{address}")).await.expect("connect");
    let answer = shop
        .recommend(RecommendRequest { history: vec![4, 5], k: Some(5), include_seen: false })
        .await
        .expect("ranked over gRPC")
        .into_inner();
    assert_eq!(answer.adapter_version, 3);
    assert_eq!(answer.items.iter().map(|h| h.item_id).collect::<Vec<_>>(), direct);
    let searched = shop
        .search(SearchRequest { query: "anything".into(), history: vec![4, 5], k: Some(3) })
        .await
        .expect("searched over gRPC")
        .into_inner();
    assert_eq!(searched.items.len(), 3);
    let body = tokio::task::spawn_blocking(move || {
        use std::io::{Read as _, Write as _};
        let json = r#"{"history": [4, 5], "k": 5}"#;
        let mut stream = std::net::TcpStream::connect(address).expect("connect");
        write!(
            stream,
            "POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
            json.len()
        )
        .expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read");
        answer
    })
    .await
    .expect("HTTP exchange");
    let json: serde_json::Value =
        serde_json::from_str(body.split_once("\r\n\r\n").map_or("", |(_, b)| b)).expect("JSON answer");
    assert_eq!(json["adapter_version"], 3);
    let over_http: Vec<u64> =
        json["items"].as_array().expect("items").iter().filter_map(|h| h["item_id"].as_u64()).collect();
    assert_eq!(over_http, direct);
    follower.abort();
    for client in clients {
        client.abort();
    }
}
