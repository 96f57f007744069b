//! Observing a running coordinator from outside, as an operator would: its Prometheus
//! metrics (per-phase latency and dropouts) and its store's ledger (ε after each round).

use std::collections::BTreeMap;
use std::time::Duration;

use guild_coordinator::store::Store;
use guild_privacy::PrivacyUnit;
use guild_privacy::ledger::{Budget, Ledger};
use guild_privacy::secagg::Phase;

/// Per-phase sums over one or more metrics scrapes (a restarted coordinator's metrics
/// start again from zero, so each run is scraped before it ends and the scrapes added).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PhaseStats {
    by_phase: BTreeMap<Phase, PhaseTotals>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct PhaseTotals {
    seconds: f64,
    closes: f64,
    dropouts: u64,
}

impl PhaseStats {
    /// Scrapes `address`'s `/metrics` and adds its per-phase sums; an unreachable endpoint
    /// adds nothing.
    pub fn scrape(&mut self, address: std::net::SocketAddr) {
        self.add(&fetch_metrics(address));
    }

    /// Adds one scrape's per-phase latency sums, counts and dropouts.
    pub fn add(&mut self, text: &str) {
        for phase in Phase::ALL {
            let value = |name: &str| {
                let prefix = format!("{name}{{phase=\"{phase}\"}} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(&prefix))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            let entry = self.by_phase.entry(phase).or_default();
            entry.seconds += value("guild_phase_seconds_sum");
            entry.closes += value("guild_phase_seconds_count");
            entry.dropouts += value("guild_dropouts_total") as u64;
        }
    }

    /// Mean seconds from `phase`'s start to its close (0 if it never closed).
    pub fn mean_seconds_of(&self, phase: Phase) -> f64 {
        self.by_phase.get(&phase).map_or(0.0, |t| t.seconds / t.closes.max(1.0))
    }

    /// Mean seconds from a phase's start to its close, by phase name (empty if nothing
    /// was scraped).
    pub fn mean_seconds(&self) -> BTreeMap<String, f64> {
        self.by_phase.keys().map(|&p| (p.name().to_owned(), self.mean_seconds_of(p))).collect()
    }

    /// Clients that missed each phase's deadline, by phase name.
    pub fn dropouts(&self) -> BTreeMap<String, u64> {
        self.by_phase.iter().map(|(p, t)| (p.name().to_owned(), t.dropouts)).collect()
    }
}

fn fetch_metrics(address: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

/// ε spent when adapter `version` was committed (all of the ledger if `None`), from the
/// store's ledger: each committed round has one ledger entry, and so has each round that
/// aborted after its charge (in Unmask).
pub fn epsilon_after(
    store: &Store,
    budget: Budget,
    unit: PrivacyUnit,
    version: Option<u64>,
) -> anyhow::Result<f64> {
    let mut entries = store.ledger()?;
    if let Some(v) = version {
        // Every charge up to the round that committed `v`, aborted rounds' charges included.
        let last = store.round_of_adapter(v)?.unwrap_or(0);
        entries.retain(|e| e.round_id <= last);
    }
    Ok(if entries.is_empty() { 0.0 } else { Ledger::new(budget, entries)?.spent(unit)?.epsilon })
}

/// Ledger entries charged after the round that committed the latest adapter version: rounds
/// that aborted after their charge (in Unmask, or at a kill) with no commit since.
pub fn charged_after_last_version(store: &Store) -> anyhow::Result<u64> {
    let last = match store.latest_adapter()? {
        Some(a) => store.round_of_adapter(a.version)?.unwrap_or(0),
        None => 0,
    };
    Ok(store.ledger()?.iter().filter(|e| e.round_id > last).count() as u64)
}

/// "n before Phase" for each phase with a non-zero count, comma-separated.
pub fn per_phase(counts: [u64; Phase::COUNT]) -> String {
    Phase::ALL
        .into_iter()
        .zip(counts)
        .filter(|(_, n)| *n > 0)
        .map(|(phase, n)| format!("{n} before {phase}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrapes_add_up_per_phase() {
        let text = "guild_phase_seconds_sum{phase=\"MaskedInput\"} 3.0\n\
                    guild_phase_seconds_count{phase=\"MaskedInput\"} 2\n\
                    guild_dropouts_total{phase=\"MaskedInput\"} 1\n\
                    guild_dropouts_total{phase=\"Unmask\"} 4\n";
        let mut stats = PhaseStats::default();
        stats.add(text);
        stats.add(text);
        assert_eq!(stats.mean_seconds()["MaskedInput"], 1.5);
        assert_eq!(stats.mean_seconds()["ShareKeys"], 0.0);
        assert_eq!(stats.dropouts()["MaskedInput"], 2);
        assert_eq!(stats.dropouts()["Unmask"], 8);
        assert!(PhaseStats::default().mean_seconds().is_empty());
        assert_eq!(per_phase([0, 2, 0, 0, 1]), "2 before ShareKeys, 1 before Unmask");
    }
}
