//! The merchant's own privacy ledger: every distributed-DP round it sent a masked update
//! in, with that round's zCDP ρ **without** amplification by sampling. The coordinator
//! chooses who is sampled and knows it, so against the coordinator a merchant's guarantee is
//! the plain composition of its own participations; this ledger keeps that figure where the
//! coordinator cannot touch it, and the participant refuses a round that would take it past
//! `guards.max_epsilon`.
//!
//! On disk it is an append-only text file, one line per participation
//! (`federation_hex round_id rho`), appended and fsynced **before** the masked update leaves
//! (a crash after that can only over-count, never under-count). A line that does not parse is
//! an error naming the line: the ledger is never silently reset.

use std::io::Write;
use std::path::{Path, PathBuf};

use guild_privacy::cost::zcdp_epsilon;

/// One participation.
#[derive(Clone, Debug, PartialEq)]
pub struct Participation {
    pub federation: String,
    pub round_id: u64,
    pub rho: f64,
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
            let [federation, round, rho] = fields[..] else {
                return Err(corrupt("expected three fields: federation, round, rho"));
            };
            let round_id = round.parse().map_err(|_| corrupt("the round id is not an integer"))?;
            let rho: f64 = rho.parse().map_err(|_| corrupt("rho is not a number"))?;
            if rho.is_nan() || rho < 0.0 {
                return Err(corrupt("rho must be non-negative"));
            }
            entries.push(Participation { federation: federation.to_owned(), round_id, rho });
        }
        Ok(Self { path: Some(path.to_owned()), entries })
    }

    pub fn participations(&self) -> &[Participation] {
        &self.entries
    }

    /// Total ρ spent (zCDP composes by addition).
    pub fn rho(&self) -> f64 {
        self.entries.iter().map(|e| e.rho).sum()
    }

    /// ε(δ) against the coordinator so far.
    pub fn epsilon(&self, delta: f64) -> f64 {
        zcdp_epsilon(self.rho(), delta)
    }

    /// ε(δ) if a round of `rho` were added.
    pub fn epsilon_if(&self, rho: f64, delta: f64) -> f64 {
        zcdp_epsilon(self.rho() + rho, delta)
    }

    /// Records a participation, durably when the ledger has a file.
    pub fn record(&mut self, entry: Participation) -> Result<(), LedgerError> {
        if let Some(path) = &self.path {
            let io = |source| LedgerError::Io { path: path.display().to_string(), source };
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
            writeln!(file, "{} {} {:e}", entry.federation, entry.round_id, entry.rho).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        self.entries.push(entry);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn participations_survive_a_reopen_and_compose_by_addition() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger");
        let mut ledger = ClientLedger::open(&path).expect("new ledger");
        assert_eq!(ledger.rho(), 0.0);
        ledger.record(Participation { federation: "ab".into(), round_id: 3, rho: 0.25 }).expect("record");
        ledger.record(Participation { federation: "ab".into(), round_id: 9, rho: 0.5 }).expect("record");
        let reopened = ClientLedger::open(&path).expect("reopen");
        assert_eq!(reopened.participations(), ledger.participations());
        assert!((reopened.rho() - 0.75).abs() < 1e-12);
        // ε = ρ + 2√(ρ ln(1/δ)) at ρ = 0.75, δ = 1e-6.
        let expected = 0.75 + 2.0 * (0.75 * 1e6f64.ln()).sqrt();
        assert!((reopened.epsilon(1e-6) - expected).abs() < 1e-9);
        assert!(reopened.epsilon_if(1.0, 1e-6) > reopened.epsilon(1e-6));
    }

    #[test]
    fn a_damaged_ledger_is_an_error_naming_the_line_not_a_fresh_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger");
        std::fs::write(&path, "ab 1 2.5e-1\nab two 0.1\n").expect("write");
        let error = ClientLedger::open(&path).expect_err("corrupt").to_string();
        assert!(error.contains("line 2") && error.contains("round id"), "{error}");
        std::fs::write(&path, "ab 1 -1\n").expect("write");
        assert!(ClientLedger::open(&path).is_err(), "negative rho");
    }
}
