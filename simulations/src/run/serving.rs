//! The federated arm's final version served as a merchant serves it: `guild-client serve`'s
//! router (the same engine, batching and connection settings) on loopback, and a gRPC client
//! sending `Recommend` (k = 10, the history's own items left out) with the test histories of
//! the first `[arms] serve_requests` evaluation users, at each of [`CONCURRENCY`]: requests
//! per second, p50 and p99, measured after the arms on the machine that ran them, in the
//! simulator's process (whose allocator keeps large buffers in its heap,
//! `guild_client::keep_large_buffers_in_heap`, which `guild-client serve` does not: the
//! serving benchmark, `cargo bench -p guild-client --bench serve`, measures the binary's).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use guild_client::serve::http::{AppState, serve};
use guild_client::serve::{Catalogue, Engine, MAX_HISTORY, RecommendOnly, ServedModel};
use guild_proto::v1::RecommendRequest;
use guild_proto::v1::shop_client::ShopClient;

use crate::results::{ArmResult, ServingLoad, ServingResult};
use crate::scenario::Scenario;
use crate::world::{World, lock};

/// The concurrent callers of each measurement.
pub const CONCURRENCY: [usize; 2] = [1, 16];

/// The arm whose final version is served, and that version (offset from the start): the
/// non-private federation's, else the first federated arm's that has one.
fn served_arm(arms: &[ArmResult]) -> Option<(&ArmResult, &[f32])> {
    let federated = arms
        .iter()
        .filter(|a| a.arm.starts_with("federated"))
        .filter_map(|a| Some((a, a.final_adapter.as_deref()?)));
    federated.clone().find(|(a, _)| a.arm == "federated (non-private)").or_else(|| federated.clone().next())
}

pub(super) async fn serving(
    world: &World,
    s: &Scenario,
    arms: &[ArmResult],
) -> anyhow::Result<Option<ServingResult>> {
    let Some((arm, offset)) = served_arm(arms) else { return Ok(None) };
    let (model, catalogue, histories) = tokio::task::block_in_place(|| -> anyhow::Result<_> {
        let shared = lock(&world.shared);
        let model = ServedModel::from_offset(world.spec.tower.clone(), offset, 0, [0; 32], &shared.items)?;
        let n = s.arms.serve_requests.min(world.eval_users.len());
        let histories: Vec<Vec<u64>> = world.eval_users[..n]
            .iter()
            .map(|&i| {
                let history = shared.dataset.users[i].test_example().history;
                let recent = &history[history.len().saturating_sub(MAX_HISTORY)..];
                recent.iter().map(|&j| shared.dataset.item_ids[j as usize]).collect()
            })
            .collect();
        Ok((model, Catalogue::new(&shared.dataset), histories))
    })?;
    if histories.is_empty() {
        return Ok(None);
    }
    let engine = Arc::new(Engine::new(Arc::new(catalogue), model, Box::new(RecommendOnly), 0.0));
    let state = Arc::new(AppState::new(engine));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let server = tokio::spawn(serve(listener, state));
    let histories = Arc::new(histories);
    let mut loads = Vec::new();
    let measured: anyhow::Result<()> = async {
        for concurrency in CONCURRENCY {
            loads.push(load(address, &histories, concurrency).await?);
        }
        Ok(())
    }
    .await;
    server.abort();
    measured?;
    Ok(Some(ServingResult { arm: arm.arm.clone(), requests: histories.len(), loads }))
}

/// Every history sent once, by `concurrency` callers each on its own connection.
async fn load(
    address: SocketAddr,
    histories: &Arc<Vec<Vec<u64>>>,
    concurrency: usize,
) -> anyhow::Result<ServingLoad> {
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        clients.push(ShopClient::connect(format!("http://{address}")).await?);
    }
    let started = Instant::now();
    let mut callers = Vec::with_capacity(concurrency);
    for (caller, mut client) in clients.into_iter().enumerate() {
        let histories = histories.clone();
        callers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for history in histories.iter().skip(caller).step_by(concurrency) {
                let sent = Instant::now();
                let request = RecommendRequest { history: history.clone(), k: Some(10), include_seen: false };
                let answer = client
                    .recommend(request)
                    .await
                    .map_err(|e| anyhow::anyhow!("serving the federated adapter: {e}"))?
                    .into_inner();
                anyhow::ensure!(answer.items.len() == 10, "{} items recommended, not 10", answer.items.len());
                latencies.push(sent.elapsed().as_secs_f64() * 1e3);
            }
            Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(histories.len());
    for caller in callers {
        latencies.extend(caller.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    Ok(ServingLoad {
        concurrency,
        requests_per_s: latencies.len() as f64 / elapsed,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
    })
}
