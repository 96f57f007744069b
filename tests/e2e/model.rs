//! The Rust encoder against Hugging Face transformers and peft (run from the project's
//! virtualenv): same embeddings within 1e-4 on real product titles, with adapters off and
//! with an exported adapter loaded by peft.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use guild_client::model::BaseModel;
use guild_client::model::lora::{Adapters, LoraConfig};
use tch::{Device, Tensor};

pub(super) const MAX_TOKENS: usize = 96;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn model_dir() -> PathBuf {
    guild_client::model::default_model_dir()
}

/// The first `n` product titles of the real catalogue.
fn titles(n: usize) -> Vec<String> {
    let path = workspace().join("../shared/data/amazon-games/Games-6k.item");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().skip(1).filter_map(|l| l.split_once('\t')).map(|(_, t)| t.to_owned()).take(n).collect()
}

/// MiniLM on the CPU and the first `n` titles of the real catalogue.
pub(super) fn base_and_titles(n: usize) -> (BaseModel, Vec<String>) {
    (BaseModel::load(&model_dir(), MAX_TOKENS, Device::Cpu).expect("load model"), titles(n))
}

/// Runs `python/SCRIPT` from the project's virtualenv with `request` as JSON on stdin and
/// returns the JSON it prints.
fn run_python(script: &str, request: &serde_json::Value) -> serde_json::Value {
    let python = workspace().join(".venv/bin/python");
    let mut child = Command::new(&python)
        .arg(workspace().join("python").join(script))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup --test)", python.display()));
    child.stdin.take().expect("stdin").write_all(request.to_string().as_bytes()).expect("write request");
    let out = child.wait_with_output().expect("python run");
    assert!(out.status.success(), "{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}

fn reference(sentences: &[String], adapter_dir: Option<&Path>) -> Vec<Vec<f32>> {
    let request = serde_json::json!({
        "model_dir": model_dir(),
        "sentences": sentences,
        "max_tokens": MAX_TOKENS,
        "adapter_dir": adapter_dir,
    });
    let value = run_python("reference_embeddings.py", &request);
    serde_json::from_value(value["embeddings"].clone()).expect("embeddings")
}

fn max_abs_difference(ours: &Tensor, theirs: &[Vec<f32>]) -> f32 {
    let ours: Vec<Vec<f32>> = Vec::try_from(ours).expect("2-d float tensor");
    assert_eq!(ours.len(), theirs.len());
    ours.iter().zip(theirs).flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs())).fold(0.0, f32::max)
}

#[test]
fn embeddings_match_transformers_and_peft_within_1e_4() {
    let (base, sentences) = base_and_titles(24);
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();

    // Adapters off.
    let ours = base.embed_all(&refs, 8, None).expect("embed");
    let diff = max_abs_difference(&ours, &reference(&sentences, None));
    eprintln!("parity, adapters off: max |Δ| = {diff:e}");
    assert!(diff < 1e-4, "adapters off: max |Δ| = {diff:e}");

    // Adapters on: give B non-zero values, export as PEFT, let peft load it.
    let fresh = || {
        Adapters::new(
            LoraConfig { frozen_a_seed: 7, ..Default::default() },
            base.config(),
            base.sha256(),
            Device::Cpu,
        )
    };
    let mut adapters = fresh();
    let count = adapters.manifest().parameter_count();
    let values: Vec<f32> = (0..count).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1).collect();
    adapters.set_flat(&values).expect("set B");
    let dir = tempfile::tempdir().expect("tempdir");
    adapters.export_peft(dir.path()).expect("export");
    let adapted = base.embed_all(&refs, 8, Some(&adapters)).expect("embed");
    let moved = max_abs_difference(&adapted, &Vec::<Vec<f32>>::try_from(&ours).expect("2-d"));
    assert!(moved > 1e-2, "the adapter must change the embeddings (moved {moved})");
    let diff = max_abs_difference(&adapted, &reference(&sentences, Some(dir.path())));
    eprintln!("parity, adapters on via peft: max |Δ| = {diff:e}");
    assert!(diff < 1e-4, "adapters on (via peft): max |Δ| = {diff:e}");

    // The export round-trips into fresh adapters of the same federation.
    let mut again = fresh();
    again.import_peft(dir.path()).expect("import");
    assert_eq!(again.flat(), values);
    // ...and is refused by a federation with another frozen A.
    let mut other = Adapters::new(
        LoraConfig { frozen_a_seed: 8, ..Default::default() },
        base.config(),
        base.sha256(),
        Device::Cpu,
    );
    let error = other.import_peft(dir.path()).expect_err("another seed");
    assert!(error.to_string().contains("frozen A"), "{error}");
}

/// A small dataset cut from the real one: `n` users and only the items they touched.
fn small_dataset(n: usize) -> guild_client::data::Dataset {
    use std::collections::BTreeMap;
    let full = super::data::amazon_games();
    let users: Vec<_> = full.users.iter().filter(|u| u.history.len() >= 4).take(n).collect();
    let mut remap = BTreeMap::new();
    for u in &users {
        for &i in u.history.iter().chain([&u.test_target]) {
            let next = remap.len() as u32;
            remap.entry(i).or_insert(next);
        }
    }
    let mut titles = vec![String::new(); remap.len()];
    let mut item_ids = vec![0; remap.len()];
    for (&old, &new) in &remap {
        titles[new as usize] = full.titles[old as usize].clone();
        item_ids[new as usize] = full.item_ids[old as usize];
    }
    guild_client::data::Dataset {
        name: format!("games-small-{n}"),
        titles,
        item_ids,
        users: users
            .iter()
            .map(|u| guild_client::data::User {
                id: u.id.clone(),
                history: u.history.iter().map(|i| remap[i]).collect(),
                test_target: remap[&u.test_target],
            })
            .collect(),
    }
}

#[test]
fn training_is_deterministic_trains_only_b_and_lowers_the_loss() {
    use guild_client::retrieval::{TrainConfig, catalogue_embeddings, train};
    let data = small_dataset(40);
    let base = BaseModel::load(&model_dir(), 64, Device::Cpu).expect("load model");
    let cache = tempfile::tempdir().expect("tempdir");
    let items = catalogue_embeddings(&base, &data, cache.path(), 64).expect("items");
    let users: Vec<_> = data.users.iter().collect();
    let config =
        TrainConfig { batch_size: 16, steps: 12, learning_rate: 1e-2, seed: 3, ..Default::default() };
    let run = |seed| {
        let adapters = Adapters::new(LoraConfig::default(), base.config(), base.sha256(), Device::Cpu);
        assert_eq!(adapters.var_store().trainable_variables().len(), 12, "only the 12 B matrices train");
        let report = train(&base, &adapters, &data, &users, &items, &TrainConfig { seed, ..config.clone() })
            .expect("train");
        (adapters.flat(), report)
    };
    let (first, report) = run(3);
    let (again, _) = run(3);
    let (other, _) = run(4);
    assert_eq!(first, again, "same seed, same adapters");
    assert_ne!(first, other, "another seed, other adapters");
    assert!(first.iter().any(|&v| v != 0.0), "B moved from zero");
    assert!(report.last_loss < report.first_loss, "loss {} → {}", report.first_loss, report.last_loss);
    // The cache is reused: a second call reads the file instead of encoding again.
    let cached = catalogue_embeddings(&base, &data, cache.path(), 64).expect("cached");
    assert!(cached.allclose(&items, 0.0, 0.0, false));
}

/// The coordinator knows the adapter only by its configured manifest and regenerates the
/// frozen A matrices from the federation's seed for `export-adapter`: both must be exactly
/// the client's, or merchants could not load the federation's adapters.
#[test]
fn coordinator_manifest_and_exported_adapter_match_the_client_model() {
    use guild_client::model::bert::BertConfig;

    let text = "[server]\nlisten = \"127.0.0.1:1\"\nstore = \"x.db\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[adapter]\nrank = 4\nalpha = 8.0\nfrozen_a_seed = 77\n";
    let config = guild_coordinator::config::Config::parse(text, std::iter::empty()).expect("config");
    let lora = LoraConfig { rank: 4, alpha: 8.0, frozen_a_seed: 77, ..LoraConfig::default() };
    let sha = config.base_model_sha256().expect("sha");
    let mut client = Adapters::new(lora, BertConfig::MINILM_L6, sha, Device::Cpu);
    let manifest = config.manifest().expect("manifest");
    assert_eq!(manifest, client.manifest(), "the coordinator's manifest is the client's");

    let flat: Vec<f32> = (0..manifest.parameter_count()).map(|i| (i % 97) as f32 * 1e-3).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    guild_proto::adapter::write_peft(dir.path(), &manifest, &flat).expect("coordinator-side export");
    // import_peft refuses an adapter whose A differs from the client's own by a single bit.
    client.import_peft(dir.path()).expect("the client accepts the coordinator's export");
    assert_eq!(client.flat(), flat);
}

/// A trained sequence tower exported by the coordinator's writer (initial values
/// regenerated from the seed, plus the federated offset) and loaded by the documented
/// Python snippet (`python/rank_with_tower.py`) ranks items with the same scores as ours,
/// with and without item-to-item counts, over title neighbours or a pair sketch.
#[test]
fn an_exported_sequence_tower_ranks_in_python_as_it_does_here() {
    use guild_client::model::tower::{TitleNeighbours, Tower, TowerConfig};
    use guild_proto::domain::AdapterManifest;
    use guild_proto::tower::TowerShape;

    for (neighbours, pair_sketch, item_ids, spectral) in
        [(0, 0, 0, 0), (4, 0, 0, 0), (4, 64, 0, 0), (4, 0, 3, 0), (4, 64, 0, 5)]
    {
        let shape = TowerShape {
            hidden: 12,
            history: 6,
            zero_shot_items: 5,
            item_rank: 3,
            width: 8,
            layers: 2,
            heads: 2,
            catalogue: 40,
            neighbours,
            pair_sketch,
            item_ids,
            spectral,
        };
        tch::manual_seed(5);
        let items = Tensor::randn([40, 12], (tch::Kind::Float, Device::Cpu));
        let items = &items / items.norm_scalaropt_dim(2, [-1], true);
        let mut tower = Tower::new(TowerConfig { shape, seed: 21 }, Device::Cpu).expect("tower");
        if tower.needs_neighbours() {
            tower
                .set_neighbours(&TitleNeighbours::of_items(&items, neighbours).expect("neighbours"))
                .expect("fit");
        }
        let n = tower.parameter_count();
        let mut offset: Vec<f32> =
            (0..n).map(|i| (((i * 2654435761) % 2001) as f32 / 1000.0 - 1.0) * 0.05).collect();
        // Counts well above their noise (the offsets' negative entries), some of them zero.
        if let Some(range) = guild_proto::tower::transitions_range(&shape) {
            for (k, value) in offset[range].iter_mut().enumerate() {
                *value = (k % 5) as f32 * 2.0;
            }
        }
        let histories: Vec<Vec<u32>> =
            vec![vec![1], vec![3, 4, 5], (0..12).collect(), vec![7, 7, 2, 9, 30, 31, 1]];
        let refs: Vec<&[u32]> = histories.iter().map(Vec::as_slice).collect();
        if spectral > 0 {
            // The spectral prior at a weight that moves the scores (it starts at zero).
            tower.set_offset(&offset).expect("offset");
            let without = guild_proto::tower::with_spectral_weight(&shape, &offset, 0.0).expect("a weight");
            tower.set_offset(&without).expect("offset");
            let before = tower.history_prior(&refs).expect("a prior");
            offset = guild_proto::tower::with_spectral_weight(&shape, &offset, 0.3).expect("a weight");
            tower.set_offset(&offset).expect("offset");
            let moved = (tower.history_prior(&refs).expect("a prior") - before).abs().max().double_value(&[]);
            assert!(moved > 0.01, "the spectral prior moves the scores by {moved}");
        }
        tower.set_offset(&offset).expect("offset");
        let ours = tch::no_grad(|| tower.scores(&items, &refs));
        if neighbours > 0 {
            let prior = tower.history_prior(&refs).expect("a prior");
            assert!(prior.abs().max().double_value(&[]) > 0.1, "the counts move the scores");
        }

        let dir = tempfile::tempdir().expect("tempdir");
        let manifest = AdapterManifest::sequence_tower([0; 32], shape, 21);
        guild_proto::adapter::export(dir.path(), &manifest, &offset).expect("export");
        let request = serde_json::json!({
            "tower_dir": dir.path(),
            "items": Vec::<Vec<f32>>::try_from(&items).expect("items"),
            "histories": histories,
        });
        let value = run_python("rank_with_tower.py", &request);
        let theirs: Vec<Vec<f32>> = serde_json::from_value(value["scores"].clone()).expect("scores");
        let difference = max_abs_difference(&ours, &theirs);
        assert!(
            difference < 1e-5,
            "M = {neighbours}, sketch {pair_sketch}, item ids {item_ids}, spectral {spectral}: max |ours − python| = \
             {difference}"
        );
        // What `guild-client serve` answers from the same exported folder is the same scores.
        let served = guild_client::serve::ServedModel::from_export(
            dir.path(),
            &manifest,
            TowerConfig { shape, seed: 21 },
            &items,
        )
        .expect("served model");
        for (history, row) in refs.iter().zip(&theirs) {
            let scores = served.recommend_scores(history).expect("scores");
            let served_difference = scores.iter().zip(row).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(
                served_difference < 1e-5,
                "M = {neighbours}, sketch {pair_sketch}, item ids {item_ids}: max |served − python| = {served_difference}"
            );
        }
        // The offset moved the ranking away from zero-shot, so the check is not vacuous.
        let start = Tower::new(TowerConfig { shape, seed: 21 }, Device::Cpu).expect("tower");
        assert!(max_abs_difference(&tch::no_grad(|| start.scores(&items, &refs)), &theirs) > 1e-3);
    }
}

/// FFA-LoRA as `guild-client serve` serves it: an item's recommendation score for a history
/// is the cosine of the history's query text (its last five titles, most recent first,
/// `retrieval::query_text`) encoded by MiniLM with the adapter and the item's frozen title
/// vector, as the federation evaluates the family. Held to transformers + peft's embedding of
/// the same texts with the exported adapter (within 1e-4), and the adapter moves the scores.
#[test]
fn a_served_lora_version_scores_histories_as_peft_embeds_them() {
    use guild_client::serve::{LoraSpec, ServedModel};
    let (base, titles) = base_and_titles(30);
    let refs: Vec<&str> = titles.iter().map(String::as_str).collect();
    let items = base.embed_all(&refs, 16, None).expect("title vectors");
    let config = LoraConfig { frozen_a_seed: 7, ..Default::default() };
    let mut adapters = Adapters::new(config.clone(), base.config(), base.sha256(), Device::Cpu);
    let count = adapters.manifest().parameter_count();
    let values: Vec<f32> = (0..count).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1).collect();
    adapters.set_flat(&values).expect("set B");
    let dir = tempfile::tempdir().expect("tempdir");
    adapters.export_peft(dir.path()).expect("export");

    let spec =
        LoraSpec { config, model_dir: model_dir(), max_tokens: MAX_TOKENS, titles: titles.clone().into() };
    let served = ServedModel::from_lora(&spec, &values, 1, [0; 32], &items).expect("served model");
    let start = ServedModel::from_lora(&spec, &vec![0.0; count], 0, [0; 32], &items).expect("start");
    let histories: Vec<Vec<u32>> = vec![vec![3], vec![1, 2, 3, 4, 5, 6, 7], vec![29, 0, 14]];
    let dataset = guild_client::data::Dataset {
        name: "titles".into(),
        titles: titles.clone(),
        item_ids: (0..titles.len() as u64).collect(),
        users: Vec::new(),
    };
    let texts: Vec<String> = histories
        .iter()
        .map(|h| guild_client::retrieval::query_text(&dataset, h, guild_client::learner::LORA_HISTORY_ITEMS))
        .collect();
    let queries = reference(&texts, Some(dir.path()));
    let vectors: Vec<Vec<f32>> = Vec::try_from(&items).expect("2-d");
    let mut moved = 0.0f32;
    for ((history, query), text) in histories.iter().zip(&queries).zip(&texts) {
        let ours = served.recommend_scores(history).expect("scores");
        let expected: Vec<f32> =
            vectors.iter().map(|v| v.iter().zip(query).map(|(a, b)| a * b).sum()).collect();
        let difference = ours.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(difference < 1e-4, "{text:?}: max |served − peft| = {difference:e}");
        let unadapted = start.recommend_scores(history).expect("scores");
        moved = moved.max(ours.iter().zip(&unadapted).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max));
    }
    assert!(moved > 1e-2, "the adapter must move the scores (moved {moved})");

    // The serving engine answers with the same scores, batched with other requests.
    let expected = served.recommend_scores(&histories[1]).expect("scores");
    let catalogue = std::sync::Arc::new(guild_client::serve::Catalogue::new(&dataset));
    let engine = std::sync::Arc::new(guild_client::serve::Engine::new(
        catalogue,
        served,
        Box::new(guild_client::serve::RecommendOnly),
        0.0,
    ));
    let ids: Vec<u64> = histories[1].iter().map(|&i| u64::from(i)).collect();
    let askers: Vec<_> = (0..4)
        .map(|_| {
            let (engine, ids) = (engine.clone(), ids.clone());
            std::thread::spawn(move || engine.recommend(&ids, 5, true).expect("ranked"))
        })
        .collect();
    for asker in askers {
        let ranked = asker.join().expect("asker");
        assert_eq!(ranked.adapter_version, 1);
        assert_eq!(ranked.items.len(), 5);
        for hit in ranked.items {
            assert!(!ids.contains(&hit.item_id), "a seen item was recommended");
            assert!((hit.score - expected[hit.item_id as usize]).abs() < 1e-5, "{hit:?}");
        }
    }
}
