//! The RDP accountant against Google's dp_accounting 0.6.0 (40 reference cases in
//! `../shared/fixtures/dp-accounting-reference.json`).

use guild_privacy::accounting::{epsilon_from_rdp, subsampled_gaussian_rdp};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    sampling_probability: f64,
    noise_multiplier: f64,
    steps: u64,
    delta: f64,
    rdp_epsilon_integer_orders: f64,
    rdp_at_orders_2_8_32_64: [f64; 4],
}

fn fixture() -> Fixture {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/dp-accounting-reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture parses")
}

fn relative_error(ours: f64, theirs: f64) -> f64 {
    if theirs == 0.0 { ours.abs() } else { ((ours - theirs) / theirs).abs() }
}

#[test]
fn rdp_accountant_reproduces_dp_accounting_to_1e_6_relative() {
    let fixture = fixture();
    assert_eq!(fixture.cases.len(), 40, "the fixture has 40 cases");
    for case in &fixture.cases {
        let label = format!(
            "q={} z={} T={} δ={}",
            case.sampling_probability, case.noise_multiplier, case.steps, case.delta
        );
        let curve = subsampled_gaussian_rdp(case.sampling_probability, case.noise_multiplier)
            .expect(&label)
            .times(case.steps);
        for (alpha, expected) in [2, 8, 32, 64].into_iter().zip(case.rdp_at_orders_2_8_32_64) {
            let err = relative_error(curve.at(alpha), expected);
            assert!(
                err < 1e-6,
                "{label}: RDP({alpha}) = {} vs {expected} (rel. error {err:e})",
                curve.at(alpha)
            );
        }
        let (epsilon, _) = epsilon_from_rdp(&curve, case.delta).expect(&label);
        let err = relative_error(epsilon, case.rdp_epsilon_integer_orders);
        assert!(
            err < 1e-6,
            "{label}: ε = {epsilon} vs {} (rel. error {err:e})",
            case.rdp_epsilon_integer_orders
        );
    }
}

/// The shopper unit's accountant, as the ledger charges it: a round's cost from
/// `RoundPrivacy` (central mode: the Poisson-subsampled Gaussian at the shoppers' rate),
/// composed over the case's steps in a ledger of shopper entries, against dp_accounting.
#[test]
fn the_shopper_unit_ledger_reproduces_dp_accounting_to_1e_6_relative() {
    use guild_privacy::cost::RoundPrivacy;
    use guild_privacy::ledger::{Budget, Ledger, LedgerEntry};
    use guild_privacy::{PrivacyMode, PrivacyUnit};
    for case in &fixture().cases {
        let round = RoundPrivacy {
            mode: PrivacyMode::Central,
            unit: PrivacyUnit::Shopper,
            sampling_rate: case.sampling_probability,
            noise_multiplier: case.noise_multiplier,
            clip_norm: 1.0,
            dimension: 1024,
            min_survivors: 10,
            tolerated_colluders: 0,
            max_summands: 1000,
            bit_width: 32,
            wrap_probability: 1e-9,
        };
        let cost = round.cost().expect("cost");
        assert_eq!(cost.unit, PrivacyUnit::Shopper);
        let event = cost.event.expect("central mode charges");
        let entries = (0..case.steps)
            .map(|round_id| LedgerEntry { round_id, event, unit: PrivacyUnit::Shopper })
            .collect();
        let ledger = Ledger::new(Budget { epsilon: 1e9, delta: case.delta }, entries).expect("ledger");
        let epsilon = ledger.spent(PrivacyUnit::Shopper).expect("spent").epsilon;
        let err = relative_error(epsilon, case.rdp_epsilon_integer_orders);
        assert!(
            err < 1e-6,
            "q={} z={}: ε = {epsilon} vs {}",
            case.sampling_probability,
            case.noise_multiplier,
            case.rdp_epsilon_integer_orders
        );
        assert_eq!(ledger.spent(PrivacyUnit::Merchant).expect("spent").epsilon, 0.0);
    }
}
