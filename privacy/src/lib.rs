//! Guild's privacy core: differential privacy, privacy accounting and SecAgg+.
//!
//! **Architecture invariant:** this crate does no I/O and depends on no async runtime,
//! no RPC framework and no tensor library. Protocols are state machines fed with
//! messages; randomness is passed in, so tests are seeded and production uses the OS
//! CSPRNG.
#![forbid(unsafe_code)]

pub mod accounting;
pub mod cost;
pub mod dp;
pub mod ledger;
pub mod secagg;

/// How differential-privacy noise is added to a round's aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyMode {
    /// Every client adds a share of discrete Gaussian noise before masking (DDGauss);
    /// the server only ever sees the noisy sum. The default.
    Distributed,
    /// A trusted coordinator adds the noise to the plain sum.
    Central,
    /// Every client adds the full noise itself.
    Local,
    /// No noise at all: for experiments on public data only.
    DangerousNone,
}

impl PrivacyMode {
    /// Whether the round's encoding rotates the update before rounding
    /// ([`dp::DdgParams::rotated`]). The rotation spreads the energy of the update and of
    /// the noise over the coordinates so that a fine γ cannot wrap the modular sum; with no
    /// noise and no privacy claim (`dangerous_none`) a coarser γ bounds every coordinate
    /// outright, and the encoding skips the rotation and its padding to a power of two.
    pub fn rotates(self) -> bool {
        self != Self::DangerousNone
    }
}

/// Whom a round's differential privacy protects: the neighbouring datasets differ in one
/// merchant's whole contribution, or in one shopper's whole history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyUnit {
    /// Client-level DP (DP-FedAvg): the coordinator Poisson-samples merchants, each clips
    /// its whole update to c. Amplification by sampling does not hold against the
    /// coordinator, which knows whom it sampled.
    #[default]
    Merchant,
    /// User-level DP across silos: every merchant takes part, Poisson-samples its own
    /// shoppers with its own randomness, clips each sampled shopper's update to c and encodes
    /// each on its own. The coordinator never learns who was sampled, so the amplification
    /// holds against it too.
    Shopper,
}

impl std::fmt::Display for PrivacyUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Merchant => "merchant",
            Self::Shopper => "shopper",
        })
    }
}

impl std::str::FromStr for PrivacyUnit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "merchant" => Ok(Self::Merchant),
            "shopper" => Ok(Self::Shopper),
            other => Err(format!("unknown privacy unit {other:?}: expected merchant or shopper")),
        }
    }
}
