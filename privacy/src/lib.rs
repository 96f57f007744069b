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
