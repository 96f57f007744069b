//! Fault injection for simulations and tests: a client abandons a round before sending a
//! phase's message, or sends it late. Off unless a simulation sets it; a merchant's
//! configuration file has no way to turn it on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use guild_privacy::secagg::Phase;
use rand::Rng;

/// Faults to inject: the client abandons the round before sending phase p's message with
/// probability `drop[p.index()]`, or sleeps `straggle_delay` before sending it with
/// probability `straggle`.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    pub drop: [f64; Phase::COUNT],
    pub straggle: f64,
    pub straggle_delay: Duration,
    /// A hostile merchant: replace the encoded update with uniformly random ring elements
    /// (what a merchant that skips clipping and encoding could send; it carries no data).
    /// The coordinator's norm check must reject the round's sum.
    pub poison_update: bool,
    /// A hostile merchant: seal garbage (under its own valid signature) for this many of
    /// its neighbours. Each complains and the round goes on without their pairwise mask.
    pub garbage_shares: usize,
    /// A hostile merchant: reveal a wrong value of one share at Unmask. The coordinator
    /// refuses it against the owner's commitment and names this merchant.
    pub false_unmask_share: bool,
    /// A hostile merchant: accuse every other cohort member of sealing shares that do not
    /// open (complaints the coordinator cannot check), to get honest merchants quarantined.
    pub false_complaints: bool,
    /// What was injected, per phase; clones of these faults share one tally.
    pub injected: Arc<InjectedFaults>,
}

/// What [`Faults::roll`] decided for one phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injected {
    None,
    /// Abandon the round before this phase.
    Drop,
    /// Send this phase's message after the delay.
    Straggle(Duration),
}

impl Faults {
    /// Decides the fault before `phase`'s message, and counts it.
    pub fn roll(&self, phase: Phase, rng: &mut impl Rng) -> Injected {
        let p = phase.index();
        if self.drop[p] > 0.0 && rng.gen_bool(self.drop[p].min(1.0)) {
            self.injected.dropped[p].fetch_add(1, Ordering::Relaxed);
            return Injected::Drop;
        }
        if self.straggle > 0.0 && rng.gen_bool(self.straggle.min(1.0)) {
            self.injected.straggled[p].fetch_add(1, Ordering::Relaxed);
            return Injected::Straggle(self.straggle_delay);
        }
        Injected::None
    }
}

/// Counts of the faults actually injected, per SecAgg+ phase (indexed by `Phase::index`).
#[derive(Debug, Default)]
pub struct InjectedFaults {
    pub dropped: [AtomicU64; Phase::COUNT],
    pub straggled: [AtomicU64; Phase::COUNT],
}

impl InjectedFaults {
    /// (dropouts, straggles) per phase so far.
    pub fn counts(&self) -> ([u64; Phase::COUNT], [u64; Phase::COUNT]) {
        let read = |a: &[AtomicU64; Phase::COUNT]| std::array::from_fn(|p| a[p].load(Ordering::Relaxed));
        (read(&self.dropped), read(&self.straggled))
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    #[test]
    fn certain_faults_happen_in_their_phase_and_are_tallied_once_across_clones() {
        let faults = Faults {
            drop: [0.0, 0.0, 1.0, 0.0, 0.0],
            straggle: 1.0,
            straggle_delay: Duration::from_millis(7),
            ..Faults::default()
        };
        let clone = faults.clone();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        assert_eq!(faults.roll(Phase::MaskedInput, &mut rng), Injected::Drop);
        assert_eq!(clone.roll(Phase::ShareKeys, &mut rng), Injected::Straggle(Duration::from_millis(7)));
        assert_eq!(faults.injected.counts(), ([0, 0, 1, 0, 0], [0, 1, 0, 0, 0]));
        let none = Faults::default();
        for phase in Phase::ALL {
            assert_eq!(none.roll(phase, &mut rng), Injected::None);
        }
        assert_eq!(none.injected.counts(), ([0; 5], [0; 5]));
    }
}
