//! The merchant's own privacy ledger: every distributed-DP round it sent a masked update
//! in, with that round's zCDP ρ and unit. Merchant unit: ρ counts **without** amplification
//! by sampling — the coordinator chooses who is sampled and knows it, so against the
//! coordinator a merchant's guarantee is the plain composition of its own participations.
//! Shopper unit: the merchant sampled its shoppers itself at rate q, in secret, so each
//! round counts amplified by q (RDP of the Poisson-subsampled zCDP mechanism), for every
//! shopper of this merchant. This ledger keeps both figures where the coordinator cannot
//! touch them, and the participant refuses a round that would take either past
//! `guards.max_epsilon`.
//!
//! On disk it is an append-only text file, one line per participation
//! (`federation_hex round_id rho`, or `federation_hex round_id rho shopper q`), appended
//! and fsynced **before** the masked update leaves (a crash after that can only over-count,
//! never under-count). A line that does not parse is an error naming the line: the ledger is
//! never silently reset.

use std::io::Write;
use std::path::{Path, PathBuf};

use guild_privacy::PrivacyUnit;
use guild_privacy::accounting::{RdpCurve, epsilon_from_rdp, subsampled_zcdp_rdp};
use guild_privacy::cost::zcdp_epsilon;

/// One participation.
#[derive(Clone, Debug, PartialEq)]
pub struct Participation {
    pub federation: String,
    pub round_id: u64,
    pub rho: f64,
    pub unit: PrivacyUnit,
    /// Shopper unit: the rate at which this merchant sampled its shoppers (1 in the
    /// merchant unit, which counts unamplified).
    pub sampling_rate: f64,
}

impl Participation {
    /// A merchant-unit participation of ρ (unamplified).
    pub fn merchant(federation: String, round_id: u64, rho: f64) -> Self {
        Self { federation, round_id, rho, unit: PrivacyUnit::Merchant, sampling_rate: 1.0 }
    }

    /// A shopper-unit participation of ρ with this merchant's own sampling rate q.
    pub fn shopper(federation: String, round_id: u64, rho: f64, sampling_rate: f64) -> Self {
        Self { federation, round_id, rho, unit: PrivacyUnit::Shopper, sampling_rate }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("privacy ledger {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("privacy ledger {path}, line {line}: {reason}")]
    Corrupt { path: String, line: usize, reason: String },
}

/// The merchant's ledger: in memory, and on disk when it has a path.
#[derive(Debug, Default)]
pub struct ClientLedger {
    path: Option<PathBuf>,
    entries: Vec<Participation>,
}

impl ClientLedger {
    /// A ledger kept in memory only (tests, simulations of many merchants in one process).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Opens (or creates) the ledger at `path`, reading every participation recorded.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let name = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(LedgerError::Io { path: name, source }),
        };
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let corrupt = |reason: &str| LedgerError::Corrupt {
                path: name.clone(),
                line: i + 1,
                reason: reason.into(),
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (federation, round, rho, shopper_rate) = match fields[..] {
                [federation, round, rho] => (federation, round, rho, None),
                [federation, round, rho, "shopper", q] => (federation, round, rho, Some(q)),
                _ => {
                    return Err(corrupt(
                        "expected federation, round, rho, and for the shopper unit `shopper q`",
                    ));
                }
            };
            let round_id = round.parse().map_err(|_| corrupt("the round id is not an integer"))?;
            let rho: f64 = rho.parse().map_err(|_| corrupt("rho is not a number"))?;
            if rho.is_nan() || rho < 0.0 {
                return Err(corrupt("rho must be non-negative"));
            }
            let federation = federation.to_owned();
            entries.push(match shopper_rate {
                None => Participation::merchant(federation, round_id, rho),
                Some(q) => {
                    let q: f64 = q.parse().map_err(|_| corrupt("the sampling rate is not a number"))?;
                    if !(q > 0.0 && q <= 1.0) {
                        return Err(corrupt("the sampling rate must be in (0, 1]"));
                    }
                    Participation::shopper(federation, round_id, rho, q)
                }
            });
        }
        Ok(Self { path: Some(path.to_owned()), entries })
    }

    pub fn participations(&self) -> &[Participation] {
        &self.entries
    }

    /// Total merchant-unit ρ spent (zCDP composes by addition).
    pub fn rho(&self) -> f64 {
        self.entries.iter().filter(|e| e.unit == PrivacyUnit::Merchant).map(|e| e.rho).sum()
    }

    /// ε(δ) against the coordinator so far, for this merchant (merchant unit) or for each of
    /// its shoppers (shopper unit).
    pub fn epsilon(&self, unit: PrivacyUnit, delta: f64) -> f64 {
        self.epsilon_with(unit, None, delta)
    }

    /// ε(δ) for the candidate's unit if `candidate` were added.
    pub fn epsilon_if(&self, candidate: &Participation, delta: f64) -> f64 {
        self.epsilon_with(candidate.unit, Some(candidate), delta)
    }

    fn epsilon_with(&self, unit: PrivacyUnit, extra: Option<&Participation>, delta: f64) -> f64 {
        let all = self.entries.iter().chain(extra).filter(|e| e.unit == unit);
        match unit {
            PrivacyUnit::Merchant => zcdp_epsilon(all.map(|e| e.rho).sum(), delta),
            PrivacyUnit::Shopper => {
                let mut curve = RdpCurve::zero();
                for e in all {
                    match subsampled_zcdp_rdp(e.sampling_rate, e.rho) {
                        Ok(c) => curve = curve.compose(&c),
                        Err(_) => return f64::INFINITY,
                    }
                }
                epsilon_from_rdp(&curve, delta).map_or(f64::INFINITY, |(epsilon, _)| epsilon)
            }
        }
    }

    /// Records a participation, durably when the ledger has a file.
    pub fn record(&mut self, entry: Participation) -> Result<(), LedgerError> {
        if let Some(path) = &self.path {
            let io = |source| LedgerError::Io { path: path.display().to_string(), source };
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
            match entry.unit {
                PrivacyUnit::Merchant => {
                    writeln!(file, "{} {} {:e}", entry.federation, entry.round_id, entry.rho)
                }
                PrivacyUnit::Shopper => writeln!(
                    file,
                    "{} {} {:e} shopper {:e}",
                    entry.federation, entry.round_id, entry.rho, entry.sampling_rate
                ),
            }
            .map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        self.entries.push(entry);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The merchant's own record of what it spent is durable: a reopened ledger holds the
    /// same participations, their zCDP ρ adds up, and ε follows from the sum (checked
    /// against the closed form), growing with each round it would take part in.
    #[test]
    fn participations_survive_a_reopen_and_compose_by_addition() {
        let (_dir, path) = guild_testkit::scratch_path("ledger");
        let mut ledger = ClientLedger::open(&path).expect("new ledger");
        assert_eq!(ledger.rho(), 0.0);
        ledger.record(Participation::merchant("ab".into(), 3, 0.25)).expect("record");
        ledger.record(Participation::merchant("ab".into(), 9, 0.5)).expect("record");
        let reopened = ClientLedger::open(&path).expect("reopen");
        assert_eq!(reopened.participations(), ledger.participations());
        assert!((reopened.rho() - 0.75).abs() < 1e-12);
        // ε = ρ + 2√(ρ ln(1/δ)) at ρ = 0.75, δ = 1e-6.
        let expected = 0.75 + 2.0 * (0.75 * 1e6f64.ln()).sqrt();
        let merchant = PrivacyUnit::Merchant;
        assert!((reopened.epsilon(merchant, 1e-6) - expected).abs() < 1e-9);
        let next = Participation::merchant("ab".into(), 10, 1.0);
        assert!(reopened.epsilon_if(&next, 1e-6) > reopened.epsilon(merchant, 1e-6));
    }

    #[test]
    fn shopper_rounds_count_amplified_by_the_merchants_own_rate_and_apart_from_merchant_rounds() {
        let (_dir, path) = guild_testkit::scratch_path("ledger");
        let mut ledger = ClientLedger::open(&path).expect("new ledger");
        ledger.record(Participation::merchant("ab".into(), 1, 0.25)).expect("record");
        for round in 2..12 {
            ledger.record(Participation::shopper("ab".into(), round, 0.5, 0.02)).expect("record");
        }
        let reopened = ClientLedger::open(&path).expect("reopen");
        assert_eq!(reopened.participations(), ledger.participations());
        assert_eq!(reopened.rho(), 0.25, "shopper rounds do not count at the merchant unit");
        let curve = subsampled_zcdp_rdp(0.02, 0.5).expect("curve").times(10);
        let expected = epsilon_from_rdp(&curve, 1e-6).expect("ε").0;
        let shopper = reopened.epsilon(PrivacyUnit::Shopper, 1e-6);
        assert!((shopper - expected).abs() < 1e-12, "{shopper} vs {expected}");
        // Ten unamplified rounds of ρ = 0.5 would be far more.
        assert!(shopper < zcdp_epsilon(5.0, 1e-6) / 3.0, "{shopper}");
        std::fs::write(&path, "ab 1 0.5 shopper 1.5\n").expect("write");
        let error = ClientLedger::open(&path).expect_err("bad rate").to_string();
        assert!(error.contains("line 1") && error.contains("sampling rate"), "{error}");
    }

    #[test]
    fn a_damaged_ledger_is_an_error_naming_the_line_not_a_fresh_start() {
        let (_dir, path) = guild_testkit::scratch_path("ledger");
        std::fs::write(&path, "ab 1 2.5e-1\nab two 0.1\n").expect("write");
        let error = ClientLedger::open(&path).expect_err("corrupt").to_string();
        assert!(error.contains("line 2") && error.contains("round id"), "{error}");
        std::fs::write(&path, "ab 1 -1\n").expect("write");
        assert!(ClientLedger::open(&path).is_err(), "negative rho");
    }
}
