//! `guild-client serve` against a real federation: it follows the committed versions and
//! swaps each in without failing a request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use guild_client::data::{Dataset, User};
use guild_client::model::tower::{TowerConfig, normalise};
use guild_client::serve::http::{AppState, ServeMetrics};
use guild_client::serve::{Catalogue, Engine, QueryEncoder, ServedModel, fetch_version, follow};
use guild_proto::tower::TowerShape;
use tch::{Device, Kind, Tensor};

use super::harness::{four_merchants, futures_join, wait_for_rounds};

const ITEMS: usize = 16;

struct NoQueries;

impl QueryEncoder for NoQueries {
    fn encode(&self, _: &str) -> Result<Tensor, guild_client::model::ModelError> {
        Ok(Tensor::ones([ITEMS as i64], (Kind::Float, Device::Cpu)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_follows_committed_versions_and_never_drops_a_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shape = TowerShape::tiny(ITEMS);
    let federation = four_merchants(dir.path(), 3, |c| {
        c.adapter.family = guild_proto::domain::AdapterFamilyName::SequenceTower;
        c.adapter.tower = shape;
    })
    .await;
    let manifest = federation.config.manifest().expect("manifest");
    let tower = TowerConfig { shape, seed: federation.config.adapter.frozen_a_seed };
    tch::manual_seed(1);
    let items = normalise(&Tensor::randn([ITEMS as i64, 16], (Kind::Float, Device::Cpu)));
    let dataset = Dataset {
        name: "shop".into(),
        titles: (0..ITEMS).map(|i| format!("item {i}")).collect(),
        item_ids: (0..ITEMS as u64).collect(),
        users: vec![User { id: "u".into(), history: vec![1], test_target: 2 }],
    };

    // The served model starts at version 0, fetched and checked like any other.
    let mut connection = federation.connect(0).await.expect("connect");
    let first =
        fetch_version(&mut connection, 0, &manifest, &tower, items.shallow_clone()).await.expect("v0");
    let engine = Arc::new(Engine::new(Arc::new(Catalogue::new(&dataset)), first, Box::new(NoQueries), 0.5));
    let state = Arc::new(AppState { engine: engine.clone(), metrics: ServeMetrics::default() });
    let follower = tokio::spawn(follow(
        connection,
        state.clone(),
        manifest.clone(),
        tower.clone(),
        items.shallow_clone(),
        Duration::from_millis(100),
    ));

    // Requests run the whole time; each must be answered, by a version never older than the last.
    let stop = Arc::new(AtomicBool::new(false));
    let asking = {
        let (engine, stop) = (engine.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let (mut answered, mut last) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let ranked = engine.recommend(&[1, 2, 3], 5, true).expect("every request is answered");
                assert_eq!(ranked.items.len(), 5);
                assert!(ranked.adapter_version >= last, "version went back");
                last = ranked.adapter_version;
                answered += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (answered, last)
        })
    };

    let clients = futures_join(&federation, 4, Default::default(), 3).await;
    wait_for_rounds(&federation, 3, Duration::from_secs(90)).await;
    let store = federation.store().expect("store");
    let started = std::time::Instant::now();
    while engine.version().0 < 3 {
        assert!(started.elapsed() < Duration::from_secs(20), "serve did not pick up version 3");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (answered, last) = asking.await.expect("requests ran");
    assert!(answered > 10, "{answered} requests");
    assert_eq!(last, 3);
    // The version served is the one committed, bit for bit.
    let record = store.adapter(3).expect("version 3");
    assert_eq!(engine.version(), (3, record.sha256));
    let values = guild_proto::adapter::from_bytes(&record.data, manifest.parameter_count()).expect("values");
    let expected = ServedModel::from_offset(tower, &values, 3, record.sha256, &items).expect("model");
    let served = engine.recommend(&[4, 5], ITEMS - 2, true).expect("ranked");
    let scores = expected.recommend_scores(&[4, 5]);
    for hit in served.items {
        assert!((hit.score - scores[hit.item_id as usize]).abs() < 1e-6);
    }
    follower.abort();
    for client in clients {
        client.abort();
    }
}
