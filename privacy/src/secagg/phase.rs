//! The five phases of a SecAgg+ round, as one type shared by the state machines, the
//! coordinator's engine, its store and metrics, the client and the simulator.

use std::fmt;
use std::str::FromStr;

/// A phase of a SecAgg+ round, in protocol order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// (0) Clients sign and advertise their two public keys.
    AdvertiseKeys,
    /// (1) Clients send their neighbours sealed Shamir shares.
    ShareKeys,
    /// (2) Clients send their masked inputs.
    MaskedInput,
    /// (3) Survivors sign the survivor list.
    ConsistencyCheck,
    /// (4) Survivors reveal the shares the server needs to remove the masks.
    Unmask,
}

impl Phase {
    /// Every phase, in protocol order.
    pub const ALL: [Phase; 5] =
        [Phase::AdvertiseKeys, Phase::ShareKeys, Phase::MaskedInput, Phase::ConsistencyCheck, Phase::Unmask];
    /// How many phases a round has.
    pub const COUNT: usize = Self::ALL.len();

    /// The phase's name, as it appears in logs, metrics labels and the store.
    pub const fn name(self) -> &'static str {
        match self {
            Phase::AdvertiseKeys => "AdvertiseKeys",
            Phase::ShareKeys => "ShareKeys",
            Phase::MaskedInput => "MaskedInput",
            Phase::ConsistencyCheck => "ConsistencyCheck",
            Phase::Unmask => "Unmask",
        }
    }

    /// The phase's number, 0..=4.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The phase after this one; `None` after Unmask.
    pub fn next(self) -> Option<Phase> {
        Self::ALL.get(self.index() + 1).copied()
    }

    /// Whether this is the last phase of a round.
    pub fn is_last(self) -> bool {
        self.next().is_none()
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A phase name that is not one of the five.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{0}' is not a SecAgg+ phase (expected one of AdvertiseKeys, ShareKeys, MaskedInput, ConsistencyCheck, Unmask)"
)]
pub struct UnknownPhase(pub String);

impl FromStr for Phase {
    type Err = UnknownPhase;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| UnknownPhase(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_in_protocol_order_and_round_trip_through_their_names() {
        for (i, phase) in Phase::ALL.into_iter().enumerate() {
            assert_eq!(phase.index(), i);
            assert_eq!(phase.name().parse::<Phase>(), Ok(phase));
            assert_eq!(phase.to_string(), phase.name());
        }
        assert_eq!(Phase::AdvertiseKeys.next(), Some(Phase::ShareKeys));
        assert_eq!(Phase::Unmask.next(), None);
        assert!(Phase::Unmask.is_last() && !Phase::ConsistencyCheck.is_last());
        assert!(Phase::ShareKeys < Phase::MaskedInput);
        assert!("Finished".parse::<Phase>().is_err());
    }
}
