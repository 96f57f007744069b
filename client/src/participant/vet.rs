//! A merchant's guards and the checks it makes of every task before it trains or sends
//! anything (`vet_task`), with the privacy cost it recomputes from the task itself.

use std::time::Duration;

use guild_privacy::cost::{noise_shares, round_colluders, round_rho};
use guild_privacy::dp::DdgParams;
use guild_privacy::secagg::graph::share_holders;
use guild_privacy::secagg::min_active_threshold;
use guild_privacy::{PrivacyMode, PrivacyUnit};
use guild_proto::domain::RoundTask;
use guild_proto::round::TrainedPart;

use crate::faults::Faults;
use crate::ledger::{ClientLedger, Participation};

/// The merchant's own guards and settings.
#[derive(Clone, Debug)]
pub struct ParticipantOptions {
    pub display_name: String,
    /// Refuse rounds whose noise multiplier is below this.
    pub min_noise_multiplier: f64,
    /// Take part in rounds whose mode has clients send un-noised (but clipped and masked)
    /// updates: `central` and `dangerous_none`. Off by default.
    pub dangerous_send_unnoised_updates: bool,
    /// Long-poll duration of task requests.
    pub poll: Duration,
    /// Longest pause between reconnection attempts.
    pub max_backoff: Duration,
    pub faults: Faults,
    /// Stop after taking part in this many committed rounds (0: never). A round that
    /// aborts does not count; its privacy cost still goes to the ledger and `max_epsilon`.
    pub max_rounds: u64,
    /// Refuse a distributed-DP round that would take this merchant's own ε against the
    /// coordinator past this, at `delta`: in the merchant unit its participations composed
    /// without amplification; in the shopper unit each of its shoppers' ε, amplified by this
    /// merchant's own sampling.
    pub max_epsilon: f64,
    /// Shopper unit: refuse a training round that asks this merchant to sample its shoppers
    /// at a higher rate (less amplification, and more of its shoppers in every round); a
    /// popularity release is exempt (it sends item sets only) but not from `max_epsilon`.
    pub max_shopper_sampling_rate: f64,
    /// Refuse a round whose neighbour graph gives this merchant fewer share holders than
    /// this (the complete graph of a smaller cohort is accepted): the fewer holders, the
    /// fewer colluders it takes to surround this merchant.
    pub min_share_holders: u32,
    /// Refuse a distributed round that tolerates fewer colluding survivors than this (or,
    /// in a round whose threshold t cannot leave that many, fewer than t allows:
    /// `guild_privacy::cost::round_colluders`). Colluders may add no noise or reveal theirs;
    /// a round that tolerates c has each client add σ²/(t − c) and charges for t − c − 1
    /// honest others, so the ε this merchant is charged holds with up to c of them.
    pub min_tolerated_colluders: u32,
    /// The privacy unit this merchant takes part in; a task in the other unit is refused,
    /// so a coordinator cannot switch a merchant-level federation to shopper-unit rounds (or
    /// back) and difference cohorts of its choosing.
    pub unit: PrivacyUnit,
    pub delta: f64,
    /// Send the per-round evaluation counts on this merchant's validation shoppers to the
    /// coordinator: un-noised, not charged to any ledger, so off by default.
    pub dangerous_report_unnoised_metrics: bool,
    /// Keep the newest committed versions this merchant evaluates, this many, each as an
    /// exported folder `v{version}` in this folder (what `guild-client serve` reads with
    /// `[serve] adapter`); `None`: keep none.
    pub keep_versions: Option<(std::path::PathBuf, usize)>,
}

/// A merchant's default floor on its share holders in a sparse neighbour graph: at the
/// active-security threshold it takes about a third of them, 4 here, colluding with the
/// coordinator to unmask it.
pub const DEFAULT_MIN_SHARE_HOLDERS: u32 = 12;

/// A merchant's default cap on its own ε against the coordinator.
pub const DEFAULT_MAX_EPSILON: f64 = 10.0;
/// The δ of that cap.
pub const DEFAULT_DELTA: f64 = 1e-6;
/// A merchant's default cap on the rate at which a shopper-unit round has it sample.
pub const DEFAULT_MAX_SHOPPER_SAMPLING_RATE: f64 = 0.1;

impl Default for ParticipantOptions {
    fn default() -> Self {
        Self {
            display_name: "merchant".into(),
            min_noise_multiplier: 0.0,
            dangerous_send_unnoised_updates: false,
            poll: Duration::from_secs(20),
            max_backoff: Duration::from_secs(10),
            faults: Faults::default(),
            max_rounds: 0,
            max_epsilon: DEFAULT_MAX_EPSILON,
            max_shopper_sampling_rate: DEFAULT_MAX_SHOPPER_SAMPLING_RATE,
            min_share_holders: DEFAULT_MIN_SHARE_HOLDERS,
            min_tolerated_colluders: guild_privacy::cost::DEFAULT_TOLERATED_COLLUDERS,
            unit: PrivacyUnit::Merchant,
            delta: DEFAULT_DELTA,
            dangerous_report_unnoised_metrics: false,
            keep_versions: None,
        }
    }
}

/// Every cohort member's signing key must be the one its certificate binds, and every
/// certificate must be one the federation's CA issued for client authentication, valid now,
/// each listed once: a coordinator can neither put a key of its own in a real merchant's
/// place (to impersonate it towards this client) nor list a member the CA never certified.
fn check_cohort(task: &RoundTask, federation_ca: &[u8]) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for (index, key) in &task.cohort {
        let Some(certificate) = task.certificates.get(index) else {
            return Err(format!("cohort member {index} comes without a certificate"));
        };
        let bound = guild_proto::certificate::verify_member(federation_ca, certificate)
            .map_err(|e| format!("cohort member {index}'s certificate is refused: {e}"))?;
        if bound != *key {
            return Err(format!(
                "cohort member {index}'s signing key is not the one its certificate binds \
                 (a coordinator substituting a key?)"
            ));
        }
        if !seen.insert(certificate.as_slice()) {
            return Err(format!("cohort member {index}'s certificate is listed twice"));
        }
    }
    Ok(())
}

/// A merchant's checks of a task, before it trains or sends anything: the federation and
/// the model; the SecAgg+ threshold against the active-security bound; `min_survivors` ≤
/// threshold (else a round could complete with less noise than σ²); in distributed mode
/// the noise multiplier and the round's own privacy cost (recomputed from the task, without
/// amplification) against this merchant's ledger and cap; un-noised modes only when opted in.
/// `Err` says why the task is refused.
pub fn vet_task(
    task: &RoundTask,
    manifest: &guild_proto::domain::AdapterManifest,
    federation_id: [u8; 16],
    federation_ca: &[u8],
    options: &ParticipantOptions,
    ledger: &ClientLedger,
) -> Result<(), String> {
    let refuse = |m: String| Err(m);
    if task.binding.federation_id != federation_id {
        return refuse("the task is for another federation".into());
    }
    if task.binding.task_sha256 != guild_proto::convert::task_digest(task) {
        return refuse(
            "the task's digest does not match its parameters (a coordinator showing clients different tasks?)".into(),
        );
    }
    check_cohort(task, federation_ca)?;
    // The catalogue first, by name: a federation that states its catalogue is refused by a
    // merchant whose own differs (its shoppers would be added to the wrong items); one that
    // does not state it is not checked.
    let ours = manifest.catalogue_sha256;
    if let (Some(theirs), Some(ours)) = (task.manifest.catalogue_sha256, ours)
        && theirs != ours
    {
        return refuse(format!(
            "the federation's catalogue (sha256 {}) differs from this merchant's (sha256 {}): every merchant \
             must hold the federation's items in the same order (guild-client catalogue prints a data \
             folder's digest)",
            hex::encode(theirs),
            hex::encode(ours)
        ));
    }
    let manifest = &manifest.clone().with_catalogue(task.manifest.catalogue_sha256);
    if task.manifest != *manifest {
        return refuse("the task's adapter manifest differs from this client's model".into());
    }
    if let Some(why) = task.training.kind.unsupported_by(manifest) {
        return refuse(format!("a {}, but {why}", task.training.kind));
    }
    if let Some(why) = task.training.trained.unsupported_by(manifest) {
        return refuse(format!("training {}, but {why}", task.training.trained));
    }
    if task.training.trained == TrainedPart::Pooling
        && (task.privacy.unit != PrivacyUnit::Shopper || task.training.local_steps != 1)
    {
        return refuse(format!(
            "training {} takes one gradient per shopper (the shopper unit, one local step), \
             got a {}-unit round of {} local steps",
            task.training.trained, task.privacy.unit, task.training.local_steps
        ));
    }
    if task.privacy.unit != options.unit {
        return refuse(format!(
            "a {}-unit round, but this merchant takes part in {}-unit rounds only (guards.unit)",
            task.privacy.unit, options.unit
        ));
    }
    let s = &task.secagg;
    // The bound is taken on the graph the round will build (`k` rounded up to even), not
    // on the `k` the task names.
    let holders = share_holders(s.cohort_size, s.neighbours);
    // A small neighbourhood lets a coordinator grind rosters until colluders surround a
    // victim: a sparse graph must give this merchant at least `min_share_holders`.
    let floor = options.min_share_holders.min(s.cohort_size.saturating_sub(1));
    if holders < floor {
        return refuse(format!(
            "{holders} share holders is below this merchant's minimum of {floor} \
             (a small neighbourhood is easier to surround with colluders)"
        ));
    }
    if s.threshold < min_active_threshold(holders) {
        return refuse(format!(
            "threshold {} is below the active-security bound {} for {holders} share holders \
             (a coordinator showing different survivor lists could unmask this merchant)",
            s.threshold,
            min_active_threshold(holders)
        ));
    }
    // Each client adds σ²/min_survivors; at least `threshold` must survive to unmask, so
    // the sum carries σ² only if min_survivors ≤ threshold.
    if task.privacy.min_survivors > s.threshold {
        return refuse(format!(
            "min_survivors {} is above the threshold {}: a round could complete with less noise than σ²",
            task.privacy.min_survivors, s.threshold
        ));
    }
    match task.privacy.mode {
        PrivacyMode::Distributed => {
            if task.privacy.noise_multiplier < options.min_noise_multiplier {
                return refuse(format!(
                    "noise multiplier {} is below this merchant's minimum {}",
                    task.privacy.noise_multiplier, options.min_noise_multiplier
                ));
            }
            let unit = task.privacy.unit;
            // Colluding survivors may withhold their noise: the task must spread σ² over
            // few enough shares that the honest rest still carry what is charged.
            let required = round_colluders(options.min_tolerated_colluders, task.privacy.min_survivors, unit);
            if task.privacy.tolerated_colluders < required {
                return refuse(format!(
                    "the round tolerates {} colluding survivors, below this merchant's minimum of {required} \
                     (colluders who withhold their noise would take its ε past the charge)",
                    task.privacy.tolerated_colluders
                ));
            }
            // A popularity release or a pooling selection may sample every shopper: what it
            // sends of each is a bounded statistic (the shopper's item set, or its NDCG@10
            // under each public setting), no gradient, and its whole cost, unamplified at
            // q = 1, goes through the ε cap below like any round's.
            if unit == PrivacyUnit::Shopper
                && task.training.kind.trains()
                && task.privacy.shopper_sampling_rate > options.max_shopper_sampling_rate
            {
                return refuse(format!(
                    "shopper sampling rate {} is above this merchant's maximum {}",
                    task.privacy.shopper_sampling_rate, options.max_shopper_sampling_rate
                ));
            }
            let participation = shown_participation(task).map_err(|e| e.to_string())?;
            let after = ledger.epsilon_if(&participation, options.delta);
            if after > options.max_epsilon {
                let whose = match unit {
                    PrivacyUnit::Merchant => {
                        "this merchant's ε against the coordinator (without amplification)"
                    }
                    PrivacyUnit::Shopper => "its shoppers' ε (amplified by its own sampling)",
                };
                return refuse(format!(
                    "this round (ρ = {:.4}) would take {whose} from {:.3} to {after:.3}, past its cap of {} at δ = {:e}",
                    participation.rho,
                    ledger.epsilon(unit, options.delta),
                    options.max_epsilon,
                    options.delta
                ));
            }
        }
        PrivacyMode::Central | PrivacyMode::DangerousNone => {
            if !options.dangerous_send_unnoised_updates {
                return refuse(format!(
                    "mode {:?} has clients send un-noised updates; set dangerous_send_unnoised_updates to take part",
                    task.privacy.mode
                ));
            }
        }
        PrivacyMode::Local => return refuse("local mode is not offered over the network".into()),
    }
    Ok(())
}

/// The zCDP ρ of a distributed round as the task shows it, before amplification: the same
/// function the coordinator's ledger charges (`guild_privacy::cost::round_rho`), on the
/// encoding rebuilt from the task's own parameters.
pub fn shown_round_rho(task: &RoundTask) -> Result<f64, guild_privacy::cost::CostError> {
    let p = &task.privacy;
    let ddg = DdgParams::from_round(
        task.summed().len(),
        p.clip_norm,
        p.gamma,
        p.bit_width,
        p.noise_multiplier * p.clip_norm,
        noise_shares(p.min_survivors, p.tolerated_colluders),
    )?;
    round_rho(&ddg, p.min_survivors, p.tolerated_colluders, p.unit)
}

/// What this merchant's own ledger records for a distributed round as the task shows it:
/// ρ ([`shown_round_rho`]), with no amplification in the merchant unit and with the
/// merchant's own sampling rate in the shopper unit.
pub fn shown_participation(task: &RoundTask) -> Result<Participation, guild_privacy::cost::CostError> {
    let rho = shown_round_rho(task)?;
    let federation = hex::encode(task.binding.federation_id);
    let round = task.binding.round_id;
    Ok(match task.privacy.unit {
        PrivacyUnit::Merchant => Participation::merchant(federation, round, rho),
        PrivacyUnit::Shopper => {
            Participation::shopper(federation, round, rho, task.privacy.shopper_sampling_rate)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    /// The attacks a coordinator could make on the cohort list, each refused: a key of its
    /// own in a real merchant's place, a member certified by another CA (of the same name:
    /// only the signature tells them apart), a server certificate, a certificate
    /// binding no key, a missing or duplicated certificate. Each task carries a matching
    /// digest, so only the certificate check stands in the way.
    #[test]
    fn a_cohort_member_whose_key_its_certificate_does_not_bind_is_refused() {
        let options = ParticipantOptions::default();
        let ledger = ClientLedger::in_memory();
        let other = guild_proto::pki::issue(1).expect("another federation's CA");
        let second = ClientIndex::new(2).expect("1-based");
        type Attack = (Box<dyn Fn(&mut RoundTask)>, &'static str);
        let attacks: Vec<Attack> = vec![
            (
                Box::new(move |t| {
                    t.cohort.insert(second, [0xee; 32]);
                }),
                "signing key is not the one its certificate binds",
            ),
            (
                Box::new(move |t| {
                    let sybil = &other.merchants[0];
                    t.cohort.insert(second, bound_key(sybil));
                    t.certificates.insert(second, sybil.cert_der.clone());
                }),
                "does not verify under the federation's CA key",
            ),
            (
                Box::new(move |t| {
                    t.certificates.insert(second, pki().server.cert_der.clone());
                }),
                "not a client-authentication certificate",
            ),
            (
                Box::new(move |t| {
                    t.certificates.remove(&second);
                }),
                "comes without a certificate",
            ),
            (
                Box::new(move |t| {
                    let first = t.certificates[&ClientIndex::new(1).expect("1-based")].clone();
                    t.certificates.insert(second, first.clone());
                    t.cohort.insert(second, t.cohort[&ClientIndex::new(1).expect("1-based")]);
                }),
                "listed twice",
            ),
            (
                Box::new(move |t| {
                    let mut forged = t.certificates[&second].clone();
                    let last = forged.len() - 1;
                    forged[last] ^= 1; // the signature's last byte
                    t.certificates.insert(second, forged);
                }),
                "certificate is refused",
            ),
        ];
        for (i, (attack, expected)) in attacks.iter().enumerate() {
            let mut shown = task(20, 14, 1.0);
            attack(&mut shown);
            shown.binding.task_sha256 = guild_proto::convert::task_digest(&shown);
            let error = vet(&shown, &options, &ledger).expect_err("refused");
            assert!(error.contains(expected), "attack {i}: {error}");
        }
        vet(&task(20, 14, 1.0), &options, &ledger).expect("the honest cohort passes");
    }

    #[test]
    fn an_honest_task_passes() {
        vet(&task(51, 35, 1.0), &ParticipantOptions::default(), &ClientLedger::in_memory()).expect("honest");
    }

    #[test]
    fn a_task_that_differs_from_its_digest_is_refused_and_the_digest_ignores_only_per_client_fields() {
        let honest = task(51, 35, 1.0);
        let mut other_client = honest.clone();
        other_client.secagg.my_index = ClientIndex::new(7).expect("1-based");
        other_client.training.data_seed = 99;
        assert_eq!(guild_proto::convert::task_digest(&other_client), honest.binding.task_sha256);
        let options = ParticipantOptions::default();
        let ledger = ClientLedger::in_memory();
        vet(&other_client, &options, &ledger).expect("same round, another client");
        // Each common parameter is covered: a coordinator that shows one client other values
        // without a matching digest is refused; with a matching digest, the bindings differ.
        type Change = Box<dyn Fn(&mut RoundTask)>;
        let changes: Vec<Change> = vec![
            Box::new(|t| t.secagg.neighbours -= 1),
            Box::new(|t| t.secagg.threshold += 1),
            Box::new(|t| t.privacy.noise_multiplier *= 0.5),
            Box::new(|t| t.privacy.min_survivors -= 1),
            Box::new(|t| t.privacy.tolerated_colluders -= 1),
            Box::new(|t| t.privacy.rotation_seed ^= 1),
            Box::new(|t| (t.privacy.unit, t.privacy.shopper_sampling_rate) = (PrivacyUnit::Shopper, 0.05)),
            Box::new(|t| t.training.learning_rate *= 2.0),
            Box::new(|t| {
                t.cohort.insert(ClientIndex::new(2).expect("1-based"), [0xee; 32]);
            }),
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut shown = honest.clone();
            change(&mut shown);
            let error = vet(&shown, &options, &ledger).expect_err("changed");
            assert!(error.contains("digest"), "change {i}: {error}");
            assert_ne!(guild_proto::convert::task_digest(&shown), honest.binding.task_sha256, "change {i}");
        }
    }

    #[test]
    fn a_threshold_below_the_active_security_bound_is_refused() {
        // The split-survivor-list attack needs 2t ≤ k + colluders: with 51 clients (50 share
        // holders) and t = 20 it needs none. The bound is ⌊2·50/3⌋ + 1 = 34.
        let options = ParticipantOptions::default();
        let ledger = ClientLedger::in_memory();
        let error = vet(&task(51, 20, 1.0), &options, &ledger).expect_err("t = 20 of 50");
        assert!(error.contains("active-security bound 34"), "{error}");
        assert!(vet(&task(51, 33, 1.0), &options, &ledger).is_err());
        vet(&task(51, 34, 1.0), &options, &ledger).expect("t = 34 is at the bound");
    }

    /// The merchant requires its floor of tolerated colluders, or as many as a round with a
    /// threshold too small for it can tolerate (t − 2 in the merchant unit); its own ledger
    /// charges the task's ρ, which counts only the other honest survivors' shares.
    #[test]
    fn a_task_that_tolerates_fewer_colluders_than_the_merchants_floor_is_refused() {
        let options = ParticipantOptions { min_tolerated_colluders: 5, ..ParticipantOptions::default() };
        let ledger = ClientLedger::in_memory();
        let mut shown = task(51, 35, 1.0);
        shown.privacy.tolerated_colluders = 4;
        shown.binding.task_sha256 = guild_proto::convert::task_digest(&shown);
        let error = vet(&shown, &options, &ledger).expect_err("4 < 5");
        assert!(
            error.contains("tolerates 4 colluding survivors, below this merchant's minimum of 5"),
            "{error}"
        );
        shown.privacy.tolerated_colluders = 5;
        shown.binding.task_sha256 = guild_proto::convert::task_digest(&shown);
        vet(&shown, &options, &ledger).expect("5 tolerated");
        // More colluders tolerated: more noise from each client, fewer shares counted.
        let fewer = shown_round_rho(&shown).expect("rho");
        shown.privacy.tolerated_colluders = 10;
        assert!(shown_round_rho(&shown).expect("rho") < fewer * 1.1);
        // A cohort of 4 (threshold 3) can leave at most one colluder and one honest other.
        let mut small = task(4, 3, 1.0);
        assert_eq!(small.privacy.tolerated_colluders, 1);
        vet(&small, &options, &ledger).expect("as many as t = 3 allows");
        small.privacy.tolerated_colluders = 0;
        small.binding.task_sha256 = guild_proto::convert::task_digest(&small);
        assert!(vet(&small, &options, &ledger).expect_err("0 < 1").contains("minimum of 1"));
    }

    #[test]
    fn a_task_that_cuts_every_clients_noise_share_is_refused() {
        // min_survivors = 10⁴ would have each client add σ²/10⁴: the noise multiplier alone
        // passes the guard, the survivors check does not.
        let mut cut = task(51, 35, 1.0);
        cut.privacy.min_survivors = 10_000;
        let error = vet(&cut, &ParticipantOptions::default(), &ClientLedger::in_memory()).expect_err("cut");
        assert!(error.contains("digest"), "a task changed after its digest is refused first: {error}");
        cut.binding.task_sha256 = guild_proto::convert::task_digest(&cut);
        let error = vet(&cut, &ParticipantOptions::default(), &ClientLedger::in_memory()).expect_err("cut");
        assert!(error.contains("min_survivors 10000 is above the threshold 35"), "{error}");
    }

    #[test]
    fn the_merchants_own_cap_refuses_a_round_that_costs_too_much_and_counts_its_ledger() {
        let options = ParticipantOptions { max_epsilon: 5.0, ..ParticipantOptions::default() };
        let honest = task(51, 35, 2.0);
        let rho = shown_round_rho(&honest).expect("rho");
        // Each round adds ρ ≈ 1/(2z²) · (t−1)/t: a few rounds fit under ε = 5 at δ = 1e-6.
        assert!(rho > 0.1 && rho < 0.13, "ρ = {rho}");
        let mut ledger = ClientLedger::in_memory();
        let mut taken = 0;
        while vet(&honest, &options, &ledger).is_ok() {
            ledger.record(Participation::merchant("f".into(), taken, rho)).expect("record");
            taken += 1;
            assert!(taken < 100, "the cap never bites");
        }
        let next = Participation::merchant("f".into(), taken, rho);
        assert!(ledger.epsilon(PrivacyUnit::Merchant, options.delta) <= 5.0);
        assert!(ledger.epsilon_if(&next, options.delta) > 5.0);
        // A coordinator that shows a low noise multiplier (still above the merchant's minimum)
        // is refused on cost at once.
        let cheap = task(51, 35, 0.5);
        let error = vet(&cheap, &options, &ClientLedger::in_memory()).expect_err("one round too costly");
        assert!(error.contains("past its cap of 5"), "{error}");
    }

    /// A shopper-unit merchant's options with its shoppers' ε capped at `max_epsilon`, and
    /// an empty ledger.
    fn shopper_merchant_capped_at(max_epsilon: f64) -> (ParticipantOptions, ClientLedger) {
        let options =
            ParticipantOptions { max_epsilon, unit: PrivacyUnit::Shopper, ..ParticipantOptions::default() };
        (options, ClientLedger::in_memory())
    }

    #[test]
    fn shopper_rounds_are_vetted_on_the_merchants_own_rate_and_its_shoppers_amplified_epsilon() {
        let (options, ledger) = shopper_merchant_capped_at(3.0);
        vet(&shopper_task(51, 35, 1.0, 0.02), &options, &ledger).expect("honest shopper round");
        let error = vet(&shopper_task(51, 35, 1.0, 0.5), &options, &ledger).expect_err("rate above the cap");
        assert!(error.contains("shopper sampling rate 0.5 is above this merchant's maximum 0.1"), "{error}");
        // The shopper unit counts every survivor's share (t, not t − 1) and the merchant's
        // own sampling amplifies it: ρ-zCDP rounds at q = 0.02 cost far less than unamplified.
        let task = shopper_task(51, 35, 1.0, 0.02);
        let participation = shown_participation(&task).expect("participation");
        assert_eq!((participation.unit, participation.sampling_rate), (PrivacyUnit::Shopper, 0.02));
        assert!(participation.rho < shown_round_rho(&self::task(51, 35, 1.0)).expect("rho"));
        let mut ledger = ClientLedger::in_memory();
        let mut taken = 0u64;
        while vet(&task, &options, &ledger).is_ok() {
            ledger.record(Participation { round_id: taken, ..participation.clone() }).expect("record");
            taken += 1;
            assert!(taken < 10_000, "the cap never bites");
        }
        assert!(taken > 20, "amplified rounds are cheap: only {taken} fit");
        let error = vet(&task, &options, &ledger).expect_err("over the cap");
        assert!(error.contains("its shoppers' ε"), "{error}");
        assert!(ledger.epsilon(PrivacyUnit::Shopper, options.delta) <= 3.0);
        assert_eq!(ledger.epsilon(PrivacyUnit::Merchant, options.delta), 0.0);
        // The merchant's unit is pinned: a merchant-unit round is refused whatever its cost.
        let error = vet(&self::task(51, 35, 2.0), &options, &ledger).expect_err("the other unit");
        assert!(
            error.contains("a merchant-unit round, but this merchant takes part in shopper-unit"),
            "{error}"
        );
    }

    #[test]
    fn a_popularity_release_or_selection_may_sample_every_shopper_but_pays_its_unamplified_cost() {
        let (options, ledger) = shopper_merchant_capped_at(3.0);
        let release = |z: f64| {
            let mut task = task_for(tower(5), 51, 35, z);
            (task.privacy.unit, task.privacy.shopper_sampling_rate) = (PrivacyUnit::Shopper, 1.0);
            task.training.kind = RoundKind::PopularityRelease;
            task.binding.task_sha256 = guild_proto::convert::task_digest(&task);
            task
        };
        let vet_release =
            |task: &RoundTask| vet_task(task, &tower(5), FEDERATION, &pki().ca.cert_der, &options, &ledger);
        // q = 1 is above the training rounds' cap of 0.1, and allowed for a release…
        vet_release(&release(2.0)).expect("a release at q = 1 within the ε cap");
        // …whose ε, at q = 1 (no amplification), is what the cap judges.
        let error = vet_release(&release(0.6)).expect_err("over the cap");
        assert!(error.contains("its shoppers' ε"), "{error}");
        // A training round at q = 1 is still refused, and a release needs a histogram.
        let mut training = release(2.0);
        training.training.kind = RoundKind::Training;
        training.binding.task_sha256 = guild_proto::convert::task_digest(&training);
        let error = vet_release(&training).expect_err("rate above the cap");
        assert!(error.contains("above this merchant's maximum"), "{error}");
        let mut lora = shopper_task(51, 35, 2.0, 1.0);
        lora.training.kind = RoundKind::PopularityRelease;
        lora.binding.task_sha256 = guild_proto::convert::task_digest(&lora);
        let error = vet(&lora, &options, &ledger).expect_err("no histogram");
        assert!(error.contains("has no popularity histogram"), "{error}");
        // So may a pooling selection, which needs a tower with a prior too.
        let mut selection = release(2.0);
        selection.training.kind = RoundKind::PoolingSelection;
        selection.binding.task_sha256 = guild_proto::convert::task_digest(&selection);
        vet_release(&selection).expect("a selection at q = 1 within the ε cap");
        lora.training.kind = RoundKind::PoolingSelection;
        lora.binding.task_sha256 = guild_proto::convert::task_digest(&lora);
        let error = vet(&lora, &options, &ledger).expect_err("no tower");
        assert!(error.contains("not a tower with a popularity prior"), "{error}");
    }

    #[test]
    fn training_the_pooling_part_is_taken_as_one_gradient_per_shopper_of_a_tower_only() {
        let ledger = ClientLedger::in_memory();
        let check = |unit: PrivacyUnit, steps: u32, manifest: AdapterManifest| {
            let options = ParticipantOptions { max_epsilon: 100.0, unit, ..ParticipantOptions::default() };
            let mut task = task_for(manifest.clone(), 51, 35, 2.0);
            if unit == PrivacyUnit::Shopper {
                (task.privacy.unit, task.privacy.shopper_sampling_rate) = (unit, 0.05);
            }
            (task.training.trained, task.training.local_steps) = (TrainedPart::Pooling, steps);
            task.binding.task_sha256 = guild_proto::convert::task_digest(&task);
            vet_task(&task, &manifest, FEDERATION, &pki().ca.cert_der, &options, &ledger)
        };
        check(PrivacyUnit::Shopper, 1, tower(5)).expect("one gradient per shopper of a tower");
        let error = check(PrivacyUnit::Shopper, 2, tower(5)).expect_err("two local steps");
        assert!(error.contains("one gradient per shopper"), "{error}");
        let error = check(PrivacyUnit::Merchant, 1, tower(5)).expect_err("the merchant unit");
        assert!(error.contains("one gradient per shopper"), "{error}");
        let error = check(PrivacyUnit::Shopper, 1, tower(0)).expect_err("no prior");
        assert!(error.contains("not a tower with a popularity prior"), "{error}");
    }

    #[test]
    fn a_merchant_whose_catalogue_differs_from_the_federations_is_refused_by_name() {
        let (options, ledger) = (ParticipantOptions::default(), ClientLedger::in_memory());
        let ours = tower(5).with_catalogue(Some([7; 32]));
        let stating = |catalogue: Option<[u8; 32]>| {
            let mut task = task_for(tower(5).with_catalogue(catalogue), 51, 35, 1.0);
            task.binding.task_sha256 = guild_proto::convert::task_digest(&task);
            vet_task(&task, &ours, FEDERATION, &pki().ca.cert_der, &options, &ledger)
        };
        stating(Some([7; 32])).expect("the same catalogue");
        stating(None).expect("a federation that states no catalogue is not checked");
        let error = stating(Some([8; 32])).expect_err("another catalogue");
        assert!(error.contains("the federation's catalogue (sha256 0808"), "{error}");
        assert!(error.contains("this merchant's (sha256 0707"), "{error}");
    }
}
