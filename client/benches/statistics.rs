//! The shopper-level statistic rounds' local cost at the default scenario's shape (16,859
//! items, 384-dimensional title vectors, history 20, 60 title neighbours; a synthetic
//! catalogue and synthetic shoppers, so it needs neither the model nor the data):
//!
//! - the popularity release's encoding: each shopper's statistics (popularity and
//!   item-to-item counts) added to a `DdgSum` of the adapter's 1,286,468 coordinates, as the
//!   dense vector the release sent before (`DdgSum::add`) and as its non-zeros
//!   (`DdgSum::add_sparse`, what it sends now); both sums are checked equal;
//! - the pooling selection's scoring: each shopper's NDCG@10 under the grid's 12 settings
//!   (`retrieval::selection_ndcg`);
//! - the choice of the item-to-item prior's weight β_t (a tower with the shoppers' exact
//!   statistics): the seven weights of `TRANSITIONS_WEIGHTS` scored in one scan
//!   (`retrieval::candidates_ndcg`) against one scan per weight, each on a tower holding
//!   that weight (how the simulator chose before); both give the same scores;
//! - a pair sketch's decoding (3 rows of 2^20 buckets, the shoppers' pairs summed into it):
//!   each item's 64 neighbours by estimate (`guild_proto::tower::sketch_neighbours`), what
//!   every process does once per sketch it sees.
//!
//! Prints one JSON object. `cargo bench -p guild-client --bench statistics`

use std::time::Instant;

use guild_client::data::User;
use guild_client::learner::{release_update, share_with_popularity};
use guild_client::model::tower::{
    PairSlots, TitleNeighbours, Tower, TowerConfig, normalise, statistics_contribution, statistics_sum,
    transitions_contribution,
};
use guild_client::retrieval::Candidate;
use guild_privacy::dp::{DdgParams, ParamsRequest, RandomRotation};
use guild_proto::tower::TowerShape;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tch::{Device, Kind, Tensor};

const SHOPPERS: usize = 2_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let catalogue = 16_859;
    // The default scenario's tower: one layer, 60 title neighbours.
    let shape = TowerShape { layers: 1, catalogue, neighbours: 60, ..TowerShape::default() };
    tch::manual_seed(1);
    let items = normalise(&Tensor::randn([catalogue as i64, 384], (Kind::Float, Device::Cpu)));
    let neighbours = TitleNeighbours::of_items(&items, shape.neighbours)?;
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    // Histories of 3 to 22 items (the last two are the validation and test items), each item
    // a neighbour of the one before half the time, as real sessions often are.
    let lists = neighbours.tensor();
    let users: Vec<User> = (0..SHOPPERS)
        .map(|u| {
            let length = rng.gen_range(3..=22);
            let mut history = vec![rng.gen_range(0..catalogue as u32)];
            while history.len() < length {
                let last = i64::from(*history.last().expect("non-empty"));
                history.push(if rng.gen_bool(0.5) {
                    lists.int64_value(&[last, rng.gen_range(0..shape.neighbours as i64)]) as u32
                } else {
                    rng.gen_range(0..catalogue as u32)
                });
            }
            let test_target = history.pop().expect("non-empty");
            User { id: format!("u{u}"), history, test_target }
        })
        .collect();
    let refs: Vec<&User> = users.iter().collect();

    let mut tower = Tower::new(TowerConfig { shape, seed: 3 }, Device::Cpu)?;
    tower.set_neighbours(&neighbours)?;
    let histogram: Vec<f32> = (0..catalogue).map(|i| ((i * 37) % 101) as f32).collect();
    tower.set_popularity(&histogram)?;
    let d = tower.parameter_count();
    let range = guild_proto::tower::accumulated_range(&shape).ok_or("the shape has no statistics")?;

    // The release's encoding, dense then sparse, into sums of the same parameters.
    let params = DdgParams::select(&ParamsRequest {
        dimension: d,
        clip_norm: 1.0,
        noise_stddev: 1.0,
        noise_shares: 20,
        max_summands: 100_000,
        bit_width: 32,
        wrap_probability: 1e-9,
    })?;
    let rotation = RandomRotation::new(params.padded_dimension(), 4);
    let slots = PairSlots::Titles(neighbours.clone());
    let contributions: Vec<Vec<(usize, f32)>> =
        refs.iter().map(|u| statistics_contribution(u, catalogue, Some(&slots))).collect();
    let nonzeros = contributions.iter().map(Vec::len).sum::<usize>() as f64 / SHOPPERS as f64;
    let mut dense = params.summands(&rotation);
    let started = Instant::now();
    for contribution in &contributions {
        let mut x = vec![0.0f32; d];
        share_with_popularity(&mut x, range.clone(), contribution, 1.0, 1.0);
        dense.add(&mut x)?;
    }
    let dense_s = started.elapsed().as_secs_f64();
    let mut sparse = params.summands(&rotation);
    let started = Instant::now();
    for contribution in &contributions {
        let (indices, mut values) = release_update(range.clone(), contribution, 1.0);
        sparse.add_sparse(&indices, &mut values)?;
    }
    let sparse_s = started.elapsed().as_secs_f64();
    let same = dense.rounded(&mut ChaCha20Rng::seed_from_u64(5))
        == sparse.rounded(&mut ChaCha20Rng::seed_from_u64(5));
    if !same {
        return Err("the dense and sparse release sums differ".into());
    }

    // The selection's scoring.
    let grid = guild_proto::tower::selection_grid(&shape);
    let started = Instant::now();
    let scores = guild_client::retrieval::selection_ndcg(&tower, &items, &refs, &grid)?;
    let selection_s = started.elapsed().as_secs_f64();
    let mean: f64 = scores.iter().map(|s| f64::from(s[0])).sum::<f64>() / SHOPPERS as f64;

    // The choice of β_t: one scan of seven candidates against seven scans.
    let mut counted = Tower::new(TowerConfig { shape, seed: 3 }, Device::Cpu)?;
    counted.set_neighbours(&neighbours)?;
    counted.set_statistics(&statistics_sum(&refs, catalogue, Some(&slots)))?;
    let values = counted.offset();
    let setting = guild_proto::tower::setting_in(&shape, &values).ok_or("the shape has no pooling")?;
    let weights = guild_proto::tower::TRANSITIONS_WEIGHTS;
    let started = Instant::now();
    let mut apart = Vec::new();
    for &weight in &weights {
        let mut alone = Tower::new(TowerConfig { shape, seed: 3 }, Device::Cpu)?;
        alone.set_neighbours(&neighbours)?;
        let with = guild_proto::tower::with_transitions_weight(&shape, &values, weight).ok_or("no weight")?;
        alone.set_offset(&with)?;
        let scores =
            guild_client::retrieval::selection_ndcg(&alone, &items, &refs, std::slice::from_ref(&setting))?;
        apart.push(scores.iter().map(|s| s[0]).collect::<Vec<f32>>());
    }
    let apart_s = started.elapsed().as_secs_f64();
    let candidates: Vec<Candidate> = weights
        .iter()
        .map(|&w| Candidate {
            setting: setting.clone(),
            transitions_weight: Some(w as f32),
            spectral_weight: Some(0.0),
        })
        .collect();
    let started = Instant::now();
    let together = guild_client::retrieval::candidates_ndcg(&counted, &items, &refs, &candidates)?;
    let together_s = started.elapsed().as_secs_f64();
    for (k, scores) in apart.iter().enumerate() {
        if together.iter().zip(scores).any(|(row, &s)| row[k] != s) {
            return Err(format!("weight {}: one scan and its own scan differ", weights[k]).into());
        }
    }

    // A pair sketch's decoding.
    // The collaborative scenario's sketch: 64 neighbours an item.
    let sketched = TowerShape { pair_sketch: 1 << 20, neighbours: 64, ..shape };
    let slots = PairSlots::Sketch { buckets: sketched.pair_sketch };
    let mut sketch = vec![0f32; guild_proto::tower::SKETCH_ROWS * sketched.pair_sketch];
    for user in &refs {
        for (index, value) in transitions_contribution(user, &slots) {
            sketch[index] += value;
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let started = Instant::now();
    let (lists, _) = guild_proto::tower::sketch_neighbours(&sketched, &sketch, threads);
    let decode_s = started.elapsed().as_secs_f64();
    if lists.len() != catalogue * sketched.neighbours {
        return Err("the sketch decoded to the wrong number of neighbours".into());
    }

    println!(
        "{}",
        serde_json::json!({
            "shoppers": SHOPPERS,
            "adapter_coordinates": d,
            "release_nonzeros_per_shopper": nonzeros,
            "release_dense_us_per_shopper": 1e6 * dense_s / SHOPPERS as f64,
            "release_sparse_us_per_shopper": 1e6 * sparse_s / SHOPPERS as f64,
            "release_speedup": dense_s / sparse_s,
            "selection_settings": grid.len(),
            "selection_us_per_shopper": 1e6 * selection_s / SHOPPERS as f64,
            "selection_shoppers_per_s": SHOPPERS as f64 / selection_s,
            "selection_mean_ndcg_setting_0": mean,
            "weight_choice_weights": weights.len(),
            "weight_choice_apart_s": apart_s,
            "weight_choice_one_scan_s": together_s,
            "weight_choice_speedup": apart_s / together_s,
            "sketch_decode_s": decode_s,
            "sketch_decode_threads": threads,
            "threads": tch::get_num_threads(),
        })
    );
    Ok(())
}
