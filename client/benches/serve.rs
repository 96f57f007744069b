//! Latency and throughput of `guild-client serve` at the default scenario's size: a
//! catalogue of 16,859 items with 384-dimensional title vectors (synthetic vectors, so the
//! data is not needed; real MiniLM for the search queries, so run `scripts/setup` first),
//! the default scenario's tower (64 neighbours per item decoded from a pair sketch, item-ID
//! values and the spectral prior, over random statistics), served on loopback by
//! the same router `guild-client serve` runs. A Rust client sends `Recommend` and `Search`
//! over the gRPC interface (one HTTP/2 connection per concurrent caller) at concurrency 1,
//! 16 and 64, and measures each request from send to answer: requests per second, p50 and
//! p99. Beside them, the physical floor of one request: one 16,859 × 384 matrix–vector
//! product, timed in the same run. Then the FFA-LoRA family's recommendations (MiniLM with the
//! adapter over a history's last five titles, per request) at concurrency 1 and 16. Prints one
//! JSON object.
//!
//! `cargo bench -p guild-client --bench serve`

use std::sync::Arc;
use std::time::{Duration, Instant};

use guild_client::config::DEFAULT_PERSONALISATION;
use guild_client::data::Dataset;
use guild_client::model::lora::{Adapters, LoraConfig};
use guild_client::model::tower::{TowerConfig, normalise};
use guild_client::model::{BaseModel, default_model_dir};
use guild_client::serve::http::{AppState, serve};
use guild_client::serve::{Catalogue, Engine, LoraSpec, ServedModel};
use guild_proto::tower::TowerShape;
use guild_proto::v1::shop_client::ShopClient;
use guild_proto::v1::{RecommendRequest, SearchRequest};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tch::{Device, Kind, Tensor};

const ITEMS: usize = 16_859;
const WORDS: [&str; 12] = [
    "wireless",
    "controller",
    "racing",
    "wheel",
    "zelda",
    "mario",
    "headset",
    "charger",
    "case",
    "memory",
    "card",
    "keyboard",
];

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `concurrency` callers, each on its own connection, sending `call` until `duration` has
/// passed: (requests per second, p50 ms, p99 ms).
async fn load(
    address: std::net::SocketAddr,
    concurrency: usize,
    duration: Duration,
    search: bool,
) -> Result<(f64, f64, f64), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let mut callers = Vec::new();
    for caller in 0..concurrency {
        let mut client = ShopClient::connect(format!("http://{address}")).await?;
        callers.push(tokio::spawn(async move {
            let mut rng = ChaCha20Rng::seed_from_u64(caller as u64);
            let mut latencies = Vec::new();
            while started.elapsed() < duration {
                let history: Vec<u64> = (0..5).map(|_| rng.gen_range(0..ITEMS as u64)).collect();
                let sent = Instant::now();
                let answered = if search {
                    let query = format!("{} {}", WORDS[rng.gen_range(0..12)], WORDS[rng.gen_range(0..12)]);
                    client.search(SearchRequest { query, history, k: Some(10) }).await.map(|r| r.into_inner())
                } else {
                    client
                        .recommend(RecommendRequest { history, k: Some(10), include_seen: false })
                        .await
                        .map(|r| r.into_inner())
                };
                let answer = answered.map_err(|e| e.to_string())?;
                if answer.items.len() != 10 {
                    return Err(format!("{} items, not 10", answer.items.len()));
                }
                latencies.push(sent.elapsed().as_secs_f64() * 1e3);
            }
            Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for caller in callers {
        latencies.extend(caller.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    Ok((latencies.len() as f64 / elapsed, percentile(&latencies, 0.5), percentile(&latencies, 0.99)))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The default scenario's tower: one layer, 64 neighbours decoded from a pair sketch of
    // 3 × 2^20 buckets, 32 item-ID values per item and a spectral prior of rank 32.
    let shape = TowerShape {
        layers: 1,
        catalogue: ITEMS,
        neighbours: 64,
        pair_sketch: 1 << 20,
        item_ids: 32,
        spectral: 32,
        ..TowerShape::default()
    };
    tch::manual_seed(1);
    let items = normalise(&Tensor::randn([ITEMS as i64, 384], (Kind::Float, Device::Cpu)));
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let mut offset: Vec<f32> =
        (0..guild_proto::tower::parameter_count(&shape)).map(|_| rng.gen_range(-0.01..0.01)).collect();
    if let Some(range) = guild_proto::tower::accumulated_range(&shape) {
        offset[range]
            .iter_mut()
            .for_each(|v| *v = if rng.gen_bool(0.05) { rng.gen_range(0.0..50.0) } else { 0.0 });
    }
    // The spectral prior at the weight the default's federated arm chose on validation.
    let offset = guild_proto::tower::with_spectral_weight(&shape, &offset, 0.1).ok_or("a spectral weight")?;
    let model = ServedModel::from_offset(TowerConfig { shape, seed: 3 }, &offset, 1, [0; 32], &items)?;
    let dataset = Dataset {
        name: "bench".into(),
        titles: (0..ITEMS).map(|i| format!("product {i}")).collect(),
        item_ids: (0..ITEMS as u64).collect(),
        users: Vec::new(),
    };
    let base = BaseModel::load(&default_model_dir(), 96, Device::Cpu)?;
    // FFA-LoRA over the same catalogue, B drawn small.
    let lora = LoraConfig::default();
    let count =
        Adapters::new(lora.clone(), base.config(), base.sha256(), Device::Cpu).manifest().parameter_count();
    let b: Vec<f32> = (0..count).map(|_| rng.gen_range(-0.01..0.01)).collect();
    let spec = LoraSpec {
        config: lora,
        model_dir: default_model_dir(),
        max_tokens: 96,
        titles: dataset.titles.clone().into(),
    };
    let lora_model = ServedModel::from_lora(&spec, &b, 1, [0; 32], &items)?;
    let lora_engine = Arc::new(Engine::new(
        Arc::new(Catalogue::new(&dataset)),
        lora_model,
        Box::new(guild_client::serve::RecommendOnly),
        0.0,
    ));
    let engine = Arc::new(Engine::new(
        Arc::new(Catalogue::new(&dataset)),
        model,
        Box::new(base),
        DEFAULT_PERSONALISATION,
    ));

    // The floor: one matrix–vector product over the catalogue, median of 500.
    let query = items.get(7);
    let mut floor: Vec<f64> = (0..500)
        .map(|_| {
            let started = Instant::now();
            let _ = tch::no_grad(|| items.mv(&query)).double_value(&[0]);
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    floor.sort_by(f64::total_cmp);

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let state = Arc::new(AppState::new(engine));
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let address = listener.local_addr()?;
    runtime.spawn(async move { serve(listener, state).await });

    let mut rows = Vec::new();
    for (name, search) in [("recommend", false), ("search", true)] {
        for concurrency in [1, 16, 64] {
            let (rps, p50, p99) =
                runtime.block_on(load(address, concurrency, Duration::from_secs(8), search))?;
            rows.push(serde_json::json!({
                "call": name, "concurrency": concurrency,
                "requests_per_s": rps, "p50_ms": p50, "p99_ms": p99,
            }));
        }
    }
    let state = Arc::new(AppState::new(lora_engine));
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let lora_address = listener.local_addr()?;
    runtime.spawn(async move { serve(listener, state).await });
    for concurrency in [1, 16] {
        let (rps, p50, p99) =
            runtime.block_on(load(lora_address, concurrency, Duration::from_secs(8), false))?;
        rows.push(serde_json::json!({
            "call": "recommend (FFA-LoRA)", "concurrency": concurrency,
            "requests_per_s": rps, "p50_ms": p50, "p99_ms": p99,
        }));
    }
    println!(
        "{}",
        serde_json::json!({
            "items": ITEMS,
            "floor_matvec_ms_p50": percentile(&floor, 0.5),
            "threads": tch::get_num_threads(),
            "peak_rss_mib": guild_client::peak_rss_mib(),
            "load": rows,
        })
    );
    Ok(())
}
