//! Tasks an honest coordinator would send, and the test federation's PKI, for the tests
//! of vetting and privatising.

pub(super) use guild_privacy::secagg::message::ClientIndex;
pub(super) use guild_privacy::{PrivacyMode, PrivacyUnit};
pub(super) use guild_proto::domain::{AdapterManifest, RoundTask};
pub(super) use guild_proto::round::RoundKind;
use guild_proto::tower::TowerShape;

use super::{ClientLedger, ParticipantOptions, vet_task};

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
    guild_testkit::honest_task(manifest, FEDERATION, n, t, noise_multiplier)
}

/// The test federation's certificates.
pub(super) fn pki() -> &'static guild_proto::pki::FederationPki {
    guild_testkit::pki()
}

pub(super) fn bound_key(merchant: &guild_proto::pki::Issued) -> [u8; 32] {
    guild_testkit::signing_key(merchant)
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
