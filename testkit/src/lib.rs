//! Fixtures the workspace's tests share, so that each is written once: the test
//! federation's PKI (issued once per test binary) and the round task an honest coordinator
//! would send. A dev-dependency only: nothing that ships links it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use guild_privacy::cost::{DEFAULT_TOLERATED_COLLUDERS, RoundPrivacy, round_colluders};
use guild_privacy::secagg::Phase;
use guild_privacy::secagg::message::{ClientIndex, RoundBinding};
use guild_privacy::{PrivacyMode, PrivacyUnit};
use guild_proto::domain::{AdapterManifest, PrivacyParams, RoundTask, SecAggParams, TrainingParams};
use guild_proto::pki::{FederationPki, Issued};
use guild_proto::round::RoundKind;

/// A path named `name` inside a fresh temporary directory, which is removed when the
/// returned guard drops: keep the guard alive as long as the path is used.
pub fn scratch_path(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join(name);
    (dir, path)
}

/// Merchants in the test federation's PKI.
pub const PKI_MERCHANTS: usize = 60;

/// The test federation's certificates for [`PKI_MERCHANTS`] merchants (their keys generated
/// on their behalf), issued once per test binary.
pub fn pki() -> &'static FederationPki {
    static PKI: OnceLock<FederationPki> = OnceLock::new();
    PKI.get_or_init(|| guild_proto::pki::issue(PKI_MERCHANTS).expect("the test federation's certificates"))
}

/// The SecAgg+ signing key a merchant's certificate binds.
pub fn signing_key(merchant: &Issued) -> [u8; 32] {
    let pair =
        ring::signature::Ed25519KeyPair::from_pkcs8(&merchant.signing_pkcs8).expect("a PKCS#8 Ed25519 key");
    ring::signature::KeyPair::public_key(&pair).as_ref().try_into().expect("32 bytes")
}

/// Client `i` (1-based).
pub fn index(i: u32) -> ClientIndex {
    ClientIndex::new(i).expect("a 1-based index")
}

/// The task an honest coordinator of federation `federation_id` would send member 1 of a
/// cohort of the PKI's first `n` merchants, for a distributed training round at threshold
/// `t` and noise multiplier `z` over `manifest`: its encoding chosen by the function the
/// ledger charges, its digest sealed. Tests change a field and [`seal`] it again.
pub fn honest_task(manifest: AdapterManifest, federation_id: [u8; 16], n: u32, t: u32, z: f64) -> RoundTask {
    assert!(n as usize <= PKI_MERCHANTS, "the test PKI has {PKI_MERCHANTS} merchants");
    let cost = RoundPrivacy {
        mode: PrivacyMode::Distributed,
        unit: PrivacyUnit::Merchant,
        sampling_rate: 0.1,
        noise_multiplier: z,
        clip_norm: 1.0,
        dimension: manifest.parameter_count(),
        min_survivors: t,
        tolerated_colluders: round_colluders(DEFAULT_TOLERATED_COLLUDERS, t, PrivacyUnit::Merchant),
        max_summands: n,
        bit_width: 32,
        wrap_probability: 1e-9,
    }
    .cost()
    .expect("an honest round's cost");
    let merchants = &pki().merchants;
    let mut task = RoundTask {
        binding: RoundBinding { federation_id, round_id: 3, adapter_sha256: [2; 32], task_sha256: [0; 32] },
        adapter_version: 2,
        manifest,
        training: TrainingParams {
            local_steps: 1,
            batch_size: 8,
            learning_rate: 1e-3,
            data_seed: 1,
            negatives: 0,
            kind: RoundKind::Training,
            trained: guild_proto::round::TrainedPart::Whole,
        },
        privacy: PrivacyParams {
            mode: PrivacyMode::Distributed,
            clip_norm: 1.0,
            noise_multiplier: z,
            gamma: cost.ddg.gamma(),
            bit_width: 32,
            min_survivors: t,
            tolerated_colluders: cost.tolerated_colluders,
            rotation_seed: 4,
            unit: PrivacyUnit::Merchant,
            shopper_sampling_rate: 0.0,
        },
        secagg: SecAggParams {
            my_index: index(1),
            cohort_size: n,
            threshold: t,
            neighbours: n - 1,
            vector_length: cost.ddg.padded_dimension() as u32,
            phase_deadlines: vec![Duration::from_secs(5); Phase::COUNT],
        },
        cohort: (1..=n).map(|i| (index(i), signing_key(&merchants[i as usize - 1]))).collect(),
        certificates: (1..=n)
            .map(|i| (index(i), merchants[i as usize - 1].cert_der.clone()))
            .collect::<BTreeMap<_, _>>(),
    };
    seal(&mut task);
    task
}

/// Recomputes the task's digest after a change: the task is then consistent, and only a
/// client's own checks stand in the way of what changed.
pub fn seal(task: &mut RoundTask) {
    task.binding.task_sha256 = guild_proto::convert::task_digest(task);
}
