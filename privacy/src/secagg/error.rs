//! The one error type of SecAgg+, saying who misbehaved.

use super::Phase;
use super::message::ClientIndex;

/// Why a SecAgg+ message was refused or a round cannot go on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecAggError {
    #[error("{who} misbehaved: {fault}")]
    Peer { who: ClientIndex, fault: PeerMisbehaved },
    #[error("the server misbehaved: {0}")]
    Server(ServerMisbehaved),
    #[error(
        "message for round {got} of another federation or adapter, or another round (this is round {expected})"
    )]
    WrongRound { expected: u64, got: u64 },
    #[error("a {got} message arrived while the round is {}", match phase {
        Some(phase) => format!("in phase {phase}"),
        None => "over".to_owned(),
    })]
    WrongPhase {
        /// The phase the round is in; `None` once it finished or aborted.
        phase: Option<Phase>,
        got: Phase,
    },
    #[error("round aborted in {phase}: {survivors} survivors where {needed} are needed; nothing is revealed")]
    TooFewSurvivors { phase: Phase, survivors: usize, needed: usize },
    #[error("invalid round configuration: {0}")]
    Config(String),
}

/// What a client did wrong, as seen by the server or by another client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerMisbehaved {
    #[error("it is not in this round's cohort")]
    NotInCohort,
    #[error("it sent a second message in the same phase")]
    Duplicate,
    #[error("its signature does not verify")]
    BadSignature,
    #[error("it has no registered signing key")]
    UnknownIdentity,
    #[error("its public key is of low order")]
    WeakKey,
    #[error("it addressed shares to {0}, who is not its neighbour")]
    NotANeighbour(ClientIndex),
    #[error("it claimed to be {claimed} in a message it sent")]
    ForgedSender { claimed: ClientIndex },
    #[error("its vector has {actual} words, expected {expected}")]
    WrongLength { expected: usize, actual: usize },
    #[error("a value is outside Z_2^{bit_width}")]
    OutOfRange { bit_width: u32 },
    #[error("its sealed shares do not open")]
    UndecryptableShares,
    #[error("its shares are malformed or inconsistent")]
    BadShares,
    #[error("it took part in a phase it had dropped out of before")]
    NotASurvivor,
    #[error("it revealed a share that honest clients never reveal")]
    ForbiddenReveal,
    #[error("it sealed no shares for its neighbour {0}")]
    IncompleteShares(ClientIndex),
    #[error("the share of {owner}'s secret it revealed is not the one {owner} dealt it")]
    ShareMismatch { owner: ClientIndex },
    #[error("its complaint names {0}, who sent it no shares")]
    BadComplaint(ClientIndex),
}

impl PeerMisbehaved {
    /// Whether only a client that deviates from the protocol sends this: an honest client,
    /// however late, slow or restarted, never does (duplicates, late messages and unknown
    /// identities can come from retries and reconfiguration, so they are not counted).
    pub fn is_protocol_violation(&self) -> bool {
        !matches!(self, Self::Duplicate | Self::UnknownIdentity | Self::NotASurvivor | Self::NotInCohort)
    }
}

/// What the server did wrong, as seen by an honest client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServerMisbehaved {
    #[error("the key roster does not contain this client's own keys as sent")]
    RosterAltered,
    #[error("the key roster lists {0} twice")]
    DuplicateInRoster(ClientIndex),
    #[error("it forwarded shares not addressed to this client")]
    Misaddressed,
    #[error("it reports survivors that had already dropped out")]
    SurvivorsNotSubset,
    #[error("this client is missing from the survivors")]
    LeftOutOfSurvivors,
    #[error("{0}'s signature does not match this client's survivor list: the server showed different lists")]
    InconsistentSurvivors(ClientIndex),
    #[error("it forwarded shares from {0} that {0} did not sign")]
    AlteredShares(ClientIndex),
}
