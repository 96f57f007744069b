//! Prometheus metrics, served as text at `/metrics` (prometheus-client's OpenMetrics
//! encoding) on a plain-HTTP port of their own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use guild_privacy::PrivacyUnit;
use guild_privacy::ledger::{Ledger, LedgerError};
use guild_privacy::secagg::Phase;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabel {
    pub rpc: String,
}

/// Every metric the coordinator exports. Cloning shares the underlying values.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub rounds_completed: Counter,
    pub rounds_aborted: Counter,
    pub rounds_skipped: Counter,
    pub rounds_refused: Counter,
    /// Rounds whose decoded sum was rejected as poisoned (above an honest sum's norm bound).
    pub rounds_poisoned: Counter,
    pub participants: Gauge,
    pub dropouts: Family<PhaseLabel, Counter>,
    pub phase_seconds: Family<PhaseLabel, Histogram>,
    pub epsilon_spent: Gauge<f64, AtomicU64>,
    /// ε against the coordinator for a merchant in every charged round (no amplification).
    pub epsilon_against_coordinator_bound: Gauge<f64, AtomicU64>,
    /// Shopper-level ε (the same against the coordinator: merchants sample shoppers in secret).
    pub shopper_epsilon_spent: Gauge<f64, AtomicU64>,
    pub bytes_received: Family<RpcLabel, Counter>,
    pub rejected_messages: Family<RpcLabel, Counter>,
    /// Seconds the engine spent working (sampling, checking and summing messages, closing
    /// phases, unmasking, decoding, committing): the coordinator's own cost of rounds.
    pub engine_busy_seconds: Counter<f64, AtomicU64>,
    /// Merchants now quarantined (named as misbehaving, kept out of cohorts until lifted).
    pub merchants_quarantined: Gauge,
    /// Complaints about a neighbour's sealed shares, from the survivors' masked inputs.
    pub complaints: Counter,
    /// Requests refused because their merchant was over its request rate.
    pub rate_limited: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut metrics = Self {
            registry: Arc::default(),
            rounds_completed: Counter::default(),
            rounds_aborted: Counter::default(),
            rounds_skipped: Counter::default(),
            rounds_refused: Counter::default(),
            rounds_poisoned: Counter::default(),
            participants: Gauge::default(),
            dropouts: Family::default(),
            phase_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 20))
            }),
            epsilon_spent: Gauge::default(),
            epsilon_against_coordinator_bound: Gauge::default(),
            shopper_epsilon_spent: Gauge::default(),
            bytes_received: Family::default(),
            rejected_messages: Family::default(),
            engine_busy_seconds: Counter::default(),
            merchants_quarantined: Gauge::default(),
            complaints: Counter::default(),
            rate_limited: Counter::default(),
        };
        let m = &metrics;
        let mut registry = Registry::with_prefix("guild");
        let counters = [
            ("rounds_completed", "Rounds whose adapter was committed", &m.rounds_completed),
            ("rounds_aborted", "Rounds aborted (too few survivors, or a restart)", &m.rounds_aborted),
            ("rounds_skipped", "Samples smaller than the minimum cohort", &m.rounds_skipped),
            ("rounds_refused", "Rounds refused by the privacy budget", &m.rounds_refused),
            (
                "rounds_poisoned",
                "Rounds whose decoded sum exceeded what clipped updates and the noise reach",
                &m.rounds_poisoned,
            ),
            ("complaints", "Complaints by cohort members about a neighbour's sealed shares", &m.complaints),
            (
                "requests_rate_limited",
                "Requests refused because their merchant was over its request rate",
                &m.rate_limited,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        let gauges = [
            ("participants", "Cohort size of the latest round", &m.participants),
            (
                "merchants_quarantined",
                "Merchants named as misbehaving and kept out of cohorts until an operator lifts it",
                &m.merchants_quarantined,
            ),
        ];
        for (name, help, gauge) in gauges {
            registry.register(name, help, gauge.clone());
        }
        let epsilons = [
            (
                "epsilon_spent",
                "Merchant-level privacy spent, model-level (amplified by sampling), ε at the configured δ",
                &m.epsilon_spent,
            ),
            (
                "epsilon_against_coordinator_bound",
                "Merchant-level ε against this coordinator for a merchant in every charged round (no amplification), at the configured δ",
                &m.epsilon_against_coordinator_bound,
            ),
            (
                "shopper_epsilon_spent",
                "Shopper-level privacy spent, ε at the configured δ (amplification by merchants' own sampling holds against the coordinator too)",
                &m.shopper_epsilon_spent,
            ),
        ];
        for (name, help, gauge) in epsilons {
            registry.register(name, help, gauge.clone());
        }
        registry.register("dropouts", "Clients that missed a phase's deadline", m.dropouts.clone());
        let by_rpc = [
            ("received_bytes", "Protobuf bytes received, by RPC", &m.bytes_received),
            ("rejected_messages", "Messages refused, by RPC", &m.rejected_messages),
        ];
        for (name, help, family) in by_rpc {
            registry.register(name, help, family.clone());
        }
        registry.register("phase_seconds", "Time from a phase's start to its close", m.phase_seconds.clone());
        registry.register(
            "engine_busy_seconds",
            "Seconds the round engine spent working",
            m.engine_busy_seconds.clone(),
        );
        metrics.registry = Arc::new(registry);
        metrics
    }

    /// Publishes the ε figures of `ledger`: merchant-level model-level and against the
    /// coordinator, and shopper-level.
    pub fn publish_privacy(&self, ledger: &Ledger) -> Result<(), LedgerError> {
        self.epsilon_spent.set(ledger.spent(PrivacyUnit::Merchant)?.epsilon);
        self.epsilon_against_coordinator_bound
            .set(ledger.spent_against_sampler(PrivacyUnit::Merchant)?.epsilon);
        self.shopper_epsilon_spent.set(ledger.spent(PrivacyUnit::Shopper)?.epsilon);
        Ok(())
    }

    pub fn observe_phase(&self, phase: Phase, latency: Duration, dropped: usize) {
        let label = PhaseLabel { phase: phase.name().to_owned() };
        self.phase_seconds.get_or_create(&label).observe(latency.as_secs_f64());
        self.dropouts.get_or_create(&label).inc_by(dropped as u64);
    }

    /// Adds the time since `started` to the engine's busy time.
    pub fn busy_since(&self, started: std::time::Instant) {
        self.engine_busy_seconds.inc_by(started.elapsed().as_secs_f64());
    }

    pub fn received(&self, rpc: &str, bytes: usize) {
        self.bytes_received.get_or_create(&RpcLabel { rpc: rpc.to_owned() }).inc_by(bytes as u64);
    }

    pub fn rejected(&self, rpc: &str) {
        self.rejected_messages.get_or_create(&RpcLabel { rpc: rpc.to_owned() }).inc();
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Serves `/metrics` on `address` until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = self.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        );
        axum::serve(listener, app).await
    }

    pub async fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
        tokio::net::TcpListener::bind(address).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let metrics = Metrics::new();
        metrics.rounds_completed.inc();
        metrics.observe_phase(Phase::MaskedInput, Duration::from_millis(20), 2);
        metrics.epsilon_spent.set(1.5);
        metrics.received("MaskedInput", 1024);
        let text = metrics.encode();
        for needle in [
            "guild_rounds_completed_total 1",
            "guild_dropouts_total{phase=\"MaskedInput\"} 2",
            "guild_epsilon_spent 1.5",
            "guild_received_bytes_total{rpc=\"MaskedInput\"} 1024",
            "guild_phase_seconds_count{phase=\"MaskedInput\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }
}
