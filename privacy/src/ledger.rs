//! The privacy ledger: an append-only list of every round's privacy event, from which
//! the spent ε(δ) is recomputed on every question (never read from a cached counter),
//! and a budget that refuses the event that would cross the federation's cap.
//!
//! The ledger is pure: the coordinator persists its entries in the same transaction as
//! the adapter the round produced, and rebuilds the ledger from them at start.

use serde::{Deserialize, Serialize};

use crate::PrivacyUnit;
use crate::accounting::{
    AccountingError, RdpCurve, epsilon_from_rdp, subsampled_gaussian_rdp, subsampled_zcdp_rdp,
    zero_out_sampled_zcdp_rdp,
};

/// What one round revealed, in the terms the accountant needs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mechanism", rename_all = "snake_case")]
pub enum PrivacyEvent {
    /// Poisson sampling at `sampling_rate`, then the Gaussian mechanism with
    /// `noise_multiplier` = noise std / clip norm (central and local modes).
    SubsampledGaussian { sampling_rate: f64, noise_multiplier: f64 },
    /// Poisson sampling at `sampling_rate`, then a ρ-zCDP mechanism (the distributed
    /// discrete Gaussian, whose ρ comes from `dp::ddgauss_zcdp_rho`), add/remove
    /// neighbours: the shopper unit, whose merchant adds its noise share whether or not the
    /// shopper is sampled.
    SubsampledZcdp { sampling_rate: f64, rho: f64 },
    /// Poisson sampling at `sampling_rate`, then a ρ-zCDP mechanism, zero-out neighbours
    /// with nothing assumed of the round without the unit
    /// (`accounting::zero_out_sampled_zcdp_rdp`): the merchant unit when the participants
    /// add the noise (distributed and local modes), since a merchant that is not sampled
    /// adds no noise share either.
    ZeroOutSampledZcdp { sampling_rate: f64, rho: f64 },
}

impl PrivacyEvent {
    /// The same mechanism without amplification by sampling: what it costs a participant
    /// against the sampler (the coordinator), which knows who was sampled.
    pub fn unamplified(&self) -> Self {
        match *self {
            Self::SubsampledGaussian { noise_multiplier, .. } => {
                Self::SubsampledGaussian { sampling_rate: 1.0, noise_multiplier }
            }
            Self::SubsampledZcdp { rho, .. } => Self::SubsampledZcdp { sampling_rate: 1.0, rho },
            Self::ZeroOutSampledZcdp { rho, .. } => Self::ZeroOutSampledZcdp { sampling_rate: 1.0, rho },
        }
    }

    /// The event's RDP curve at the accountant's orders.
    pub fn curve(&self) -> Result<RdpCurve, AccountingError> {
        match *self {
            Self::SubsampledGaussian { sampling_rate, noise_multiplier } => {
                subsampled_gaussian_rdp(sampling_rate, noise_multiplier)
            }
            Self::SubsampledZcdp { sampling_rate, rho } => subsampled_zcdp_rdp(sampling_rate, rho),
            Self::ZeroOutSampledZcdp { sampling_rate, rho } => zero_out_sampled_zcdp_rdp(sampling_rate, rho),
        }
    }
}

/// One committed round's entry.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub round_id: u64,
    pub event: PrivacyEvent,
    /// Whom the round's ε protects (entries written before the shopper unit existed are
    /// merchant-level).
    #[serde(default)]
    pub unit: PrivacyUnit,
}

/// What a store keeps for a charged round: the event and its unit, as one JSON object
/// (`{"unit": "shopper", "mechanism": ..., ...}`; a missing unit reads as merchant).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    #[serde(default)]
    pub unit: PrivacyUnit,
    #[serde(flatten)]
    pub event: PrivacyEvent,
}

/// The federation's cap: at most `epsilon` at `delta`, over its whole life.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    pub epsilon: f64,
    pub delta: f64,
}

/// ε(δ) spent, and the Rényi order that gave the bound.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spent {
    pub epsilon: f64,
    pub delta: f64,
    pub order: u32,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    #[error(
        "round {round_id} refused: it would raise ε from {spent:.4} to {asked:.4}, past the budget of {cap} at δ = {delta:e}"
    )]
    BudgetExceeded { round_id: u64, spent: f64, asked: f64, cap: f64, delta: f64 },
    #[error("round {round_id} is already in the ledger")]
    DuplicateRound { round_id: u64 },
    #[error("invalid privacy event: {0}")]
    Accounting(#[from] AccountingError),
    #[error("invalid budget: ε must be positive and δ in (0, 1), got ε = {epsilon}, δ = {delta}")]
    InvalidBudget { epsilon: f64, delta: f64 },
}

/// An append-only ledger under a budget.
#[derive(Clone, Debug, PartialEq)]
pub struct Ledger {
    budget: Budget,
    entries: Vec<LedgerEntry>,
}

impl Ledger {
    /// A ledger rebuilt from stored entries. Entries already committed are kept even if
    /// they exceed a budget that was lowered since: the ledger then refuses every new
    /// event, and [`Self::spent`] tells the truth.
    pub fn new(budget: Budget, entries: Vec<LedgerEntry>) -> Result<Self, LedgerError> {
        if !(budget.epsilon > 0.0 && budget.delta > 0.0 && budget.delta < 1.0) {
            return Err(LedgerError::InvalidBudget { epsilon: budget.epsilon, delta: budget.delta });
        }
        for entry in &entries {
            entry.event.curve()?;
        }
        Ok(Self { budget, entries })
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    pub fn entries(&self) -> &[LedgerEntry] {
        &self.entries
    }

    fn spent_with(&self, unit: PrivacyUnit, extra: Option<&PrivacyEvent>) -> Result<Spent, LedgerError> {
        // Rounds usually repeat the same event: compute each distinct curve once and scale
        // it by its count (the same composition, far fewer exponentials).
        let mut distinct: Vec<(&PrivacyEvent, u64)> = Vec::new();
        let of_unit = self.entries.iter().filter(|e| e.unit == unit).map(|e| &e.event);
        for event in of_unit.chain(extra) {
            match distinct.iter_mut().find(|(e, _)| *e == event) {
                Some((_, count)) => *count += 1,
                None => distinct.push((event, 1)),
            }
        }
        let mut curve = RdpCurve::zero();
        for (event, count) in distinct {
            curve = curve.compose(&event.curve()?.times(count));
        }
        let (epsilon, order) = epsilon_from_rdp(&curve, self.budget.delta)?;
        Ok(Spent { epsilon, delta: self.budget.delta, order })
    }

    /// ε(δ) for `unit` spent by every entry of that unit, recomputed from the entries now.
    /// The budget caps each unit's ε on its own.
    pub fn spent(&self, unit: PrivacyUnit) -> Result<Spent, LedgerError> {
        self.spent_with(unit, None)
    }

    /// ε(δ) for `unit` against the coordinator. Merchant unit: the bound for a merchant that
    /// took part in every charged round, every entry unamplified
    /// ([`PrivacyEvent::unamplified`]), composed — an upper bound on any merchant's ε against
    /// the coordinator (a merchant's own ledger gives its exact figure). Shopper unit: the
    /// same as [`Self::spent`], since merchants sample their own shoppers in secret and the
    /// amplification holds against the coordinator too. Not checked against the budget,
    /// which caps the model-level ε.
    pub fn spent_against_sampler(&self, unit: PrivacyUnit) -> Result<Spent, LedgerError> {
        if unit == PrivacyUnit::Shopper {
            return self.spent(unit);
        }
        let unamplified = Ledger {
            budget: self.budget,
            entries: self
                .entries
                .iter()
                .map(|e| LedgerEntry { event: e.event.unamplified(), ..*e })
                .collect(),
        };
        unamplified.spent(unit)
    }

    /// What ε(δ) for `unit` would be after a round of that unit with `event`, without
    /// recording it.
    pub fn spent_if(&self, unit: PrivacyUnit, event: &PrivacyEvent) -> Result<Spent, LedgerError> {
        self.spent_with(unit, Some(event))
    }

    /// Checks that `entry` stays within the budget and appends it; otherwise refuses it
    /// with the spent and the asked amounts and leaves the ledger as it was.
    pub fn append(&mut self, entry: LedgerEntry) -> Result<Spent, LedgerError> {
        if self.entries.iter().any(|e| e.round_id == entry.round_id) {
            return Err(LedgerError::DuplicateRound { round_id: entry.round_id });
        }
        let after = self.spent_if(entry.unit, &entry.event)?;
        if after.epsilon > self.budget.epsilon {
            return Err(LedgerError::BudgetExceeded {
                round_id: entry.round_id,
                spent: self.spent(entry.unit)?.epsilon,
                asked: after.epsilon,
                cap: self.budget.epsilon,
                delta: self.budget.delta,
            });
        }
        self.entries.push(entry);
        Ok(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GAUSSIAN: PrivacyEvent =
        PrivacyEvent::SubsampledGaussian { sampling_rate: 0.1, noise_multiplier: 1.8 };

    fn entry(round_id: u64) -> LedgerEntry {
        LedgerEntry { round_id, event: GAUSSIAN, unit: PrivacyUnit::Merchant }
    }

    #[test]
    fn spent_epsilon_is_the_composition_of_the_entries() {
        let mut ledger = Ledger::new(Budget { epsilon: 3.0, delta: 1e-5 }, vec![]).expect("valid");
        assert_eq!(ledger.spent(PrivacyUnit::Merchant).expect("ok").epsilon, 0.0);
        for round in 0..100 {
            ledger.append(entry(round)).expect("within budget");
        }
        let direct =
            epsilon_from_rdp(&subsampled_gaussian_rdp(0.1, 1.8).expect("ok").times(100), 1e-5).expect("ok");
        assert!((ledger.spent(PrivacyUnit::Merchant).expect("ok").epsilon - direct.0).abs() < 1e-9);
        // z = 1.80 at q = 0.1 for 100 rounds gives ε just under 3 (DESIGN.md).
        assert!(direct.0 < 3.0 && direct.0 > 2.9, "{}", direct.0);
    }

    #[test]
    fn the_round_that_would_cross_the_cap_is_refused_and_nothing_changes() {
        let mut ledger = Ledger::new(Budget { epsilon: 1.0, delta: 1e-5 }, vec![]).expect("valid");
        let mut round = 0;
        let error = loop {
            match ledger.append(entry(round)) {
                Ok(_) => round += 1,
                Err(e) => break e,
            }
        };
        let before = ledger.clone();
        let LedgerError::BudgetExceeded { round_id, spent, asked, cap, .. } = error else {
            panic!("unexpected {error:?}")
        };
        assert_eq!(round_id, round);
        assert!(spent <= 1.0 && asked > 1.0 && cap == 1.0, "{spent} {asked}");
        assert_eq!(ledger.entries().len() as u64, round);
        assert!(error.to_string().contains("past the budget of 1"), "{error}");
        // Refusing again is stable and leaves the ledger untouched.
        assert!(ledger.append(entry(round)).is_err());
        assert_eq!(ledger, before);
    }

    #[test]
    fn a_replayed_round_is_refused() {
        let mut ledger = Ledger::new(Budget { epsilon: 10.0, delta: 1e-5 }, vec![entry(1)]).expect("valid");
        assert_eq!(ledger.append(entry(1)), Err(LedgerError::DuplicateRound { round_id: 1 }));
    }

    #[test]
    fn a_ledger_rebuilt_from_its_entries_spends_the_same() {
        let mut ledger = Ledger::new(Budget { epsilon: 8.0, delta: 1e-5 }, vec![]).expect("valid");
        ledger.append(entry(0)).expect("ok");
        ledger
            .append(LedgerEntry {
                round_id: 1,
                event: PrivacyEvent::SubsampledZcdp { sampling_rate: 0.1, rho: 0.05 },
                unit: PrivacyUnit::Merchant,
            })
            .expect("ok");
        let json = serde_json::to_string(ledger.entries()).expect("serialise");
        let entries: Vec<LedgerEntry> = serde_json::from_str(&json).expect("deserialise");
        let rebuilt = Ledger::new(ledger.budget(), entries).expect("valid");
        assert_eq!(rebuilt.spent(PrivacyUnit::Merchant), ledger.spent(PrivacyUnit::Merchant));
    }

    #[test]
    fn against_the_sampler_every_round_counts_whole() {
        let rho = 0.05;
        let entries: Vec<LedgerEntry> = (0..10)
            .map(|round_id| LedgerEntry {
                round_id,
                event: PrivacyEvent::SubsampledZcdp { sampling_rate: 0.1, rho },
                unit: PrivacyUnit::Merchant,
            })
            .collect();
        let ledger = Ledger::new(Budget { epsilon: 100.0, delta: 1e-5 }, entries).expect("valid");
        let model = ledger.spent(PrivacyUnit::Merchant).expect("spent").epsilon;
        let sampler = ledger.spent_against_sampler(PrivacyUnit::Merchant).expect("spent").epsilon;
        // Unamplified, ten rounds of ρ-zCDP are 10ρ-zCDP: RDP 10ρα, converted at δ by the
        // accountant's (tighter than ρ + 2√(ρ ln 1/δ)) conversion.
        let plain = subsampled_zcdp_rdp(1.0, rho).expect("curve").times(10);
        let direct = epsilon_from_rdp(&plain, 1e-5).expect("ε").0;
        assert!((sampler - direct).abs() < 1e-12, "{sampler} vs {direct}");
        assert!(sampler > 2.0 * model, "amplification by q = 0.1 is large here: {sampler} vs {model}");
        let zcdp_bound = 10.0 * rho + 2.0 * (10.0 * rho * 1e5f64.ln()).sqrt();
        assert!(sampler <= zcdp_bound + 1e-9, "{sampler} above the zCDP conversion {zcdp_bound}");
    }

    #[test]
    fn invalid_budgets_and_events_are_refused() {
        assert!(Ledger::new(Budget { epsilon: 0.0, delta: 1e-5 }, vec![]).is_err());
        assert!(Ledger::new(Budget { epsilon: 1.0, delta: 1.0 }, vec![]).is_err());
        let bad = LedgerEntry {
            round_id: 0,
            event: PrivacyEvent::SubsampledGaussian { sampling_rate: 1.5, noise_multiplier: 1.0 },
            unit: PrivacyUnit::Merchant,
        };
        assert!(Ledger::new(Budget { epsilon: 1.0, delta: 1e-5 }, vec![bad]).is_err());
    }

    #[test]
    fn each_unit_composes_its_own_rounds_and_shopper_rounds_stay_amplified_against_the_coordinator() {
        let shopper = PrivacyEvent::SubsampledZcdp { sampling_rate: 0.02, rho: 0.3 };
        let mut ledger = Ledger::new(Budget { epsilon: 5.0, delta: 1e-6 }, vec![]).expect("valid");
        for round_id in 0..5 {
            ledger.append(entry(round_id)).expect("merchant round");
        }
        let merchant_only = ledger.spent(PrivacyUnit::Merchant).expect("ok");
        assert_eq!(ledger.spent(PrivacyUnit::Shopper).expect("ok").epsilon, 0.0);
        for round_id in 5..25 {
            ledger
                .append(LedgerEntry { round_id, event: shopper, unit: PrivacyUnit::Shopper })
                .expect("shopper");
        }
        assert_eq!(ledger.spent(PrivacyUnit::Merchant).expect("ok"), merchant_only);
        let direct =
            epsilon_from_rdp(&subsampled_zcdp_rdp(0.02, 0.3).expect("ok").times(20), 1e-6).expect("ok");
        let spent = ledger.spent(PrivacyUnit::Shopper).expect("ok");
        assert!((spent.epsilon - direct.0).abs() < 1e-12);
        assert_eq!(ledger.spent_against_sampler(PrivacyUnit::Shopper).expect("ok"), spent);
        assert!(
            ledger.spent_against_sampler(PrivacyUnit::Merchant).expect("ok").epsilon > merchant_only.epsilon
        );
        // The cap applies per unit: a shopper round is refused once shoppers' ε would cross it.
        let heavy = PrivacyEvent::SubsampledZcdp { sampling_rate: 1.0, rho: 10.0 };
        let refused = ledger.append(LedgerEntry { round_id: 99, event: heavy, unit: PrivacyUnit::Shopper });
        assert!(matches!(refused, Err(LedgerError::BudgetExceeded { round_id: 99, .. })), "{refused:?}");
    }

    #[test]
    fn a_stored_charge_names_its_unit_and_old_rows_read_as_merchant() {
        let charge = Charge { unit: PrivacyUnit::Shopper, event: GAUSSIAN };
        let json = serde_json::to_string(&charge).expect("serialise");
        assert!(
            json.contains(r#""unit":"shopper""#) && json.contains(r#""mechanism":"subsampled_gaussian""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Charge>(&json).expect("parse"), charge);
        let old = r#"{"mechanism":"subsampled_zcdp","sampling_rate":0.1,"rho":0.5}"#;
        let read: Charge = serde_json::from_str(old).expect("old row");
        assert_eq!(read.unit, PrivacyUnit::Merchant);
        assert_eq!(read.event, PrivacyEvent::SubsampledZcdp { sampling_rate: 0.1, rho: 0.5 });
        assert!(
            serde_json::from_str::<Charge>(
                r#"{"unit":"shop","mechanism":"subsampled_zcdp","sampling_rate":0.1,"rho":0.5}"#
            )
            .is_err()
        );
    }
}
