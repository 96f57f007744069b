//! Time of the spectral prior's features at the default scenario's size: a table of 16,859
//! items with 64 neighbours each (`guild_proto::spectral::features`, rank 32), the work a
//! client does once per decoded sketch before it scores with the prior, and the coordinator's
//! export once per version. The table is synthetic (no data needed): each item's neighbours
//! drawn with a popularity that falls as a power of the item's rank, as shoppers' pairs do,
//! and log counts between 0 and 3. Prints one JSON object: the seconds of each of three
//! runs and their median, on every core and on one.
//!
//! `cargo bench -p guild-proto --bench spectral`

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

const ITEMS: usize = 16_859;
const NEIGHBOURS: usize = 64;
const RANK: usize = 32;

fn main() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let mut lists = Vec::with_capacity(ITEMS * NEIGHBOURS);
    let mut logs = Vec::with_capacity(ITEMS * NEIGHBOURS);
    for _ in 0..ITEMS {
        for _ in 0..NEIGHBOURS {
            // Item r with probability falling about as 1 / (r + 1): e^(u ln n) − 1, u uniform.
            let u: f64 = rng.gen_range(0.0..1.0);
            lists.push(((ITEMS as f64).powf(u) - 1.0) as u32);
            logs.push(rng.gen_range(0.0f32..3.0));
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut report = serde_json::Map::new();
    for (name, threads) in [("all_cores", threads), ("one_core", 1)] {
        let mut seconds: Vec<f64> = (0..3)
            .map(|_| {
                let started = std::time::Instant::now();
                let features =
                    guild_proto::spectral::features(ITEMS, NEIGHBOURS, &lists, &logs, RANK, threads);
                assert_eq!(features.len(), ITEMS * RANK);
                started.elapsed().as_secs_f64()
            })
            .collect();
        let runs = seconds.clone();
        seconds.sort_by(f64::total_cmp);
        report.insert(
            name.into(),
            serde_json::json!({ "threads": threads, "seconds": runs, "median": seconds[1] }),
        );
    }
    report.insert("items".into(), ITEMS.into());
    report.insert("neighbours".into(), NEIGHBOURS.into());
    report.insert("rank".into(), RANK.into());
    println!("{}", serde_json::Value::Object(report));
}
