//! The results of a scenario run, as the report reads them (`results.json`).

use std::collections::BTreeMap;

use guild_client::retrieval::RankingCounts;
use serde::{Deserialize, Serialize};

use crate::stats::PairedDifference;

/// Ranking quality of one arm on one split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub users: u64,
    pub recall_at_10: f64,
    pub ndcg_at_10: f64,
    pub mrr: f64,
    /// Mean full-catalogue cross-entropy of the held-out item (`RankingCounts::cross_entropy`).
    #[serde(default)]
    pub cross_entropy: f64,
}

impl From<RankingCounts> for Scores {
    fn from(c: RankingCounts) -> Self {
        Self {
            users: c.users,
            recall_at_10: c.recall_at_10(),
            ndcg_at_10: c.ndcg_at_10(),
            mrr: c.mrr(),
            cross_entropy: c.cross_entropy(),
        }
    }
}

/// The validation score of the adapter after one round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundPoint {
    pub round: u64,
    pub validation: Scores,
    pub epsilon: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ArmResult {
    pub arm: String,
    pub test: Scores,
    pub validation: Scores,
    /// Local-only: the worst merchant's test scores (by MRR).
    pub worst: Option<Scores>,
    /// Model-level ε: what the coordinator's ledger charges, amplified by sampling (against
    /// whoever sees the released adapters).
    pub epsilon: Option<f64>,
    /// Whom `epsilon` protects (DP arms): one merchant, or one shopper.
    #[serde(default)]
    pub unit: Option<guild_privacy::PrivacyUnit>,
    /// ε against the coordinator, which knows whom it sampled: each merchant's own ledger
    /// (its participations composed, no amplification) at the same δ; the largest over
    /// merchants and the mean over those that took part.
    #[serde(default)]
    pub epsilon_against_coordinator_max: Option<f64>,
    #[serde(default)]
    pub epsilon_against_coordinator_mean: Option<f64>,
    pub delta: Option<f64>,
    pub noise_multiplier: Option<f64>,
    /// Distributed DP arms: the colluding survivors (who add no noise, or reveal theirs)
    /// that `epsilon` and the merchants' own figures hold against.
    #[serde(default)]
    pub tolerated_colluders: Option<u32>,
    pub rounds: u64,
    pub rounds_aborted: u64,
    /// Rounds charged to the ledger after the last committed version (they aborted in
    /// Unmask or at the coordinator's kill, after their charge): why `epsilon` may exceed
    /// the last curve point's.
    #[serde(default)]
    pub charged_after_last_version: u64,
    pub wall_seconds: f64,
    pub bytes_per_client_round: Option<f64>,
    pub curve: Vec<RoundPoint>,
    /// Mean seconds per SecAgg+ phase and dropouts per phase, from the coordinator's metrics.
    pub phase_seconds: BTreeMap<String, f64>,
    pub dropouts: BTreeMap<String, u64>,
    pub events: Vec<String>,
    /// Each evaluation user's test rank of its held-out item, one list per model the arm
    /// trained (several for local-only: one per merchant), users in the same order in
    /// every arm.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test_ranks: Vec<Vec<u32>>,
    /// Paired differences of this arm's test metrics against the reference arms, with
    /// 95% bootstrap intervals.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub comparisons: Vec<Comparison>,
    /// The arm's final adapter (offset from the start, flat), kept in memory for the search
    /// evaluation; never written.
    #[serde(skip)]
    pub final_adapter: Option<Vec<f32>>,
}

/// One way of searching, evaluated with `guild_client::retrieval::search`'s query protocol.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SearchResult {
    pub name: String,
    /// The personalisation weight, chosen on validation (none: text only).
    pub weight: Option<f64>,
    pub validation: Scores,
    pub test: Scores,
    /// Paired differences against text-only search on the same test users.
    pub against_text_only: Vec<PairedDifference>,
}

/// One arm against one reference arm, on the same users.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub against: String,
    pub differences: Vec<PairedDifference>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResults {
    pub scenario: String,
    pub description: String,
    pub machine: String,
    pub merchants: usize,
    pub dataset_users: usize,
    pub catalogue: usize,
    pub eval_users: usize,
    pub expected_cohort: f64,
    pub adapter_parameters: usize,
    pub wall_seconds: f64,
    pub arms: Vec<ArmResult>,
    /// Search (`[arms] search_users`), with the query protocol stated in the report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<SearchResult>,
    /// The federated arm's final version served on loopback (`[arms] serve_requests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<ServingResult>,
    /// Why the paired comparisons could not be made, if they could not: every arm's scores
    /// are kept and the report written all the same (a run is many minutes of work), and
    /// `guild-sim run` then exits with this error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparisons_failed: Option<String>,
}

/// `guild-client serve`'s router answering `Recommend` over gRPC on loopback with one arm's
/// final version.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServingResult {
    pub arm: String,
    /// Requests sent at each concurrency: one per evaluation user's test history.
    pub requests: usize,
    pub loads: Vec<ServingLoad>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServingLoad {
    pub concurrency: usize,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}
