//! Tasks an honest coordinator would send, and the test federation's PKI, for the tests
//! of vetting and privatising.

use std::collections::BTreeMap;
use std::time::Duration;

use guild_privacy::cost::RoundPrivacy;
pub(super) use guild_privacy::secagg::Phase;
pub(super) use guild_privacy::secagg::message::{ClientIndex, RoundBinding};
pub(super) use guild_privacy::{PrivacyMode, PrivacyUnit};
pub(super) use guild_proto::domain::{
    AdapterManifest, PrivacyParams, RoundTask, SecAggParams, TrainingParams,
};
pub(super) use guild_proto::round::RoundKind;
use guild_proto::tower::TowerShape;

use super::{ClientLedger, ParticipantOptions, vet_task};
use crate::identity::Identity;

pub(super) const FEDERATION: [u8; 16] = [7; 16];

pub(super) fn manifest() -> AdapterManifest {
    tower(0)
}

/// A small tower; with a popularity histogram over `catalogue` items if not 0.
pub(super) fn tower(catalogue: usize) -> AdapterManifest {
    AdapterManifest::sequence_tower([1; 32], TowerShape::tiny(catalogue), 0)
}

/// The task an honest coordinator would send for a distributed round of `n` clients at
/// threshold `t` (its encoding chosen by the same function the ledger uses).
pub(super) fn task(n: u32, t: u32, noise_multiplier: f64) -> RoundTask {
    task_for(manifest(), n, t, noise_multiplier)
}

pub(super) fn task_for(manifest: AdapterManifest, n: u32, t: u32, noise_multiplier: f64) -> RoundTask {
    let d = manifest.parameter_count();
    let cost = RoundPrivacy {
        mode: PrivacyMode::Distributed,
        unit: PrivacyUnit::Merchant,
        sampling_rate: 0.1,
        noise_multiplier,
        clip_norm: 1.0,
        dimension: d,
        min_survivors: t,
        max_summands: n,
        bit_width: 32,
        wrap_probability: 1e-9,
    }
    .cost()
    .expect("cost");
    let pki = pki();
    let cohort: BTreeMap<ClientIndex, [u8; 32]> = (1..=n)
        .map(|i| (ClientIndex::new(i).expect("1-based"), bound_key(&pki.merchants[i as usize - 1])))
        .collect();
    let certificates: BTreeMap<ClientIndex, Vec<u8>> = (1..=n)
        .map(|i| (ClientIndex::new(i).expect("1-based"), pki.merchants[i as usize - 1].cert_der.clone()))
        .collect();
    let mut task = RoundTask {
        binding: RoundBinding {
            federation_id: FEDERATION,
            round_id: 3,
            adapter_sha256: [2; 32],
            task_sha256: [0; 32],
        },
        adapter_version: 2,
        manifest,
        training: TrainingParams {
            local_steps: 1,
            batch_size: 8,
            learning_rate: 1e-3,
            data_seed: 1,
            negatives: 0,
            kind: RoundKind::Training,
        },
        privacy: PrivacyParams {
            mode: PrivacyMode::Distributed,
            clip_norm: 1.0,
            noise_multiplier,
            gamma: cost.ddg.gamma(),
            bit_width: 32,
            min_survivors: t,
            rotation_seed: 4,
            unit: PrivacyUnit::Merchant,
            shopper_sampling_rate: 0.0,
        },
        secagg: SecAggParams {
            my_index: ClientIndex::new(1).expect("1-based"),
            cohort_size: n,
            threshold: t,
            neighbours: n - 1,
            vector_length: cost.ddg.padded_dimension() as u32,
            phase_deadlines: vec![Duration::from_secs(5); Phase::COUNT],
        },
        cohort,
        certificates,
    };
    task.binding.task_sha256 = guild_proto::convert::task_digest(&task);
    task
}

/// A federation's certificates for 60 merchants, issued once for the whole module.
pub(super) fn pki() -> &'static guild_coordinator::pki::FederationPki {
    static PKI: std::sync::OnceLock<guild_coordinator::pki::FederationPki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| guild_coordinator::pki::issue(60).expect("pki"))
}

pub(super) fn bound_key(merchant: &guild_coordinator::pki::Issued) -> [u8; 32] {
    Identity::from_pkcs8(&merchant.signing_pkcs8).expect("identity").public_key()
}

pub(super) fn vet(
    task: &RoundTask,
    options: &ParticipantOptions,
    ledger: &ClientLedger,
) -> Result<(), String> {
    vet_task(task, &manifest(), FEDERATION, &pki().ca.cert_der, options, ledger)
}

/// The same task in the shopper unit at the merchant's sampling rate `q`.
pub(super) fn shopper_task(n: u32, t: u32, noise_multiplier: f64, q: f64) -> RoundTask {
    let mut task = task(n, t, noise_multiplier);
    (task.privacy.unit, task.privacy.shopper_sampling_rate) = (PrivacyUnit::Shopper, q);
    task.binding.task_sha256 = guild_proto::convert::task_digest(&task);
    task
}
