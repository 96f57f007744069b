//! Throughput of the model on this machine: training examples per second of the default
//! local-training step (batch 32, last 5 titles, ≤ 96 tokens, LoRA r = 8 on query and
//! value, FFA-LoRA), sentences per second of catalogue encoding, and the peak resident
//! memory of the process. Prints one JSON object; `scripts/bench-model` compares it with
//! the same step in PyTorch + PEFT.
//!
//! `cargo bench -p guild-client --bench model`

use std::path::Path;
use std::time::Instant;

use guild_client::data::Dataset;
use guild_client::model::lora::{Adapters, LoraConfig};
use guild_client::model::{BaseModel, default_model_dir};
use guild_client::retrieval::{TrainConfig, query_text};
use tch::{Device, Kind, Tensor, nn::OptimizerConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = TrainConfig::default();
    let (steps, batch) = (10usize, config.batch_size);
    let data = Dataset::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/amazon-games"))?;
    let base = BaseModel::load(&default_model_dir(), 96, Device::Cpu)?;
    let examples: Vec<_> = data
        .users
        .iter()
        .filter_map(|u| u.validation_example())
        .filter(|e| e.history.len() >= 2)
        .take(batch * (steps + 2))
        .collect();
    let queries: Vec<String> =
        examples.iter().map(|e| query_text(&data, e.history, config.history_items)).collect();
    let targets: Vec<&str> = examples.iter().map(|e| data.title(e.target)).collect();
    let items = base.embed_all(&targets, 64, None)?;

    let adapters = Adapters::new(LoraConfig::default(), base.config(), base.sha256(), Device::Cpu);
    let mut optimizer =
        tch::nn::AdamW { wd: 0.0, ..Default::default() }.build(adapters.var_store(), config.learning_rate)?;
    let mut step = |i: usize| -> Result<(), Box<dyn std::error::Error>> {
        let refs: Vec<&str> = queries[i * batch..(i + 1) * batch].iter().map(String::as_str).collect();
        let q = base.embed(&refs, Some(&adapters))?;
        let logits = q.matmul(&items.narrow(0, (i * batch) as i64, batch as i64).tr()) / config.temperature;
        let loss = logits.cross_entropy_for_logits(&Tensor::arange(batch as i64, (Kind::Int64, Device::Cpu)));
        optimizer.backward_step(&loss);
        Ok(())
    };
    step(0)?;
    step(1)?;
    let start = Instant::now();
    for i in 2..steps + 2 {
        step(i)?;
    }
    let training = (steps * batch) as f64 / start.elapsed().as_secs_f64();

    let titles: Vec<&str> = data.titles.iter().take(2048).map(String::as_str).collect();
    let start = Instant::now();
    let _ = base.embed_all(&titles, 64, None)?;
    let encoding = titles.len() as f64 / start.elapsed().as_secs_f64();

    println!(
        "{}",
        serde_json::json!({
            "implementation": "guild (tch)",
            "threads": tch::get_num_threads(),
            "steps": steps,
            "batch": batch,
            "examples_per_second": training,
            "catalogue_sentences_per_second": encoding,
            "peak_rss_mib": guild_client::peak_rss_mib(),
        })
    );
    Ok(())
}
