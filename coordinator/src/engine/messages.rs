//! The engine's side facing the gRPC handlers: a merchant's task, its phase messages
//! handed to the SecAgg+ server, and the wait for the phase's close.

use std::time::Duration;

use guild_privacy::secagg::message::{
    AdvertiseKeys, ConsistencyCheck, MaskedInput, RoundBinding, ShareKeys, Unmask,
};
use guild_privacy::secagg::{Phase, SecAggError};
use guild_proto::domain::RoundTask;

use super::{Engine, EngineError, Outcome, PhaseOutput};

/// A SecAgg+ message of any phase, validated at the wire boundary.
#[derive(Debug)]
pub enum PhaseMessage {
    Keys(AdvertiseKeys),
    Shares(ShareKeys),
    Input(MaskedInput),
    Consistency(ConsistencyCheck),
    Unmask(Unmask),
}

impl PhaseMessage {
    /// The phase this message answers.
    pub fn phase(&self) -> Phase {
        match self {
            Self::Keys(_) => Phase::AdvertiseKeys,
            Self::Shares(_) => Phase::ShareKeys,
            Self::Input(_) => Phase::MaskedInput,
            Self::Consistency(_) => Phase::ConsistencyCheck,
            Self::Unmask(_) => Phase::Unmask,
        }
    }

    fn binding(&self) -> RoundBinding {
        match self {
            Self::Keys(m) => m.binding,
            Self::Shares(m) => m.binding,
            Self::Input(m) => m.binding,
            Self::Consistency(m) => m.binding,
            Self::Unmask(m) => m.binding,
        }
    }
}

impl Engine {
    /// The caller's task if it is in the open round's cohort and AdvertiseKeys is
    /// collecting; otherwise waits for one up to `wait`, then returns `Err(reason)`.
    pub async fn task_for(&self, merchant: &str, wait: Duration) -> Result<RoundTask, String> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            {
                let state = self.lock();
                if let Some(round) = &state.round
                    && round.phase == Some(Phase::AdvertiseKeys)
                    && let Some(index) = round.members.get(merchant)
                    && !round.received.contains(index)
                    && let Some(task) = round.tasks.get(index)
                {
                    return Ok(task.clone());
                }
                if tokio::time::Instant::now() >= deadline {
                    drop(state);
                    if let Ok(quarantined) = self.store.quarantined()
                        && let Some(q) = quarantined.iter().find(|q| q.merchant_id == merchant)
                    {
                        return Err(format!(
                            "this merchant is quarantined since round {} ({}); an operator lifts it with \
                             `guild-coordinator quarantine lift`",
                            q.round_id, q.reason
                        ));
                    }
                    let state = self.lock();
                    return Err(match &state.round {
                        Some(r) => format!("round {} is running without this merchant", r.id),
                        None => state.status.clone(),
                    });
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_ok_and(|r| r.is_err()) {
                return Err("coordinator is shutting down".into());
            }
        }
    }

    /// Hands a phase message from `merchant` (its authenticated identity) to the SecAgg+
    /// server. Returns the round id and phase to wait on.
    pub fn receive(&self, merchant: &str, message: PhaseMessage) -> Result<(u64, Phase), EngineError> {
        self.busy(|| self.receive_inner(merchant, message))
    }

    fn receive_inner(&self, merchant: &str, message: PhaseMessage) -> Result<(u64, Phase), EngineError> {
        let mut state = self.lock();
        let round = state.round.as_mut().ok_or(EngineError::NoRound)?;
        let binding = message.binding();
        if binding != round.binding {
            return Err(EngineError::WrongRound { open: round.id, got: binding.round_id });
        }
        let from =
            *round.members.get(merchant).ok_or_else(|| EngineError::NotInCohort(merchant.to_owned()))?;
        let phase = message.phase();
        if round.phase != Some(phase) {
            return Err(EngineError::WrongPhase { round: round.id, phase: round.phase, got: phase });
        }
        let result = match message {
            PhaseMessage::Keys(m) => round.server.receive_keys(from, m),
            PhaseMessage::Shares(m) => round.server.receive_shares(from, m),
            PhaseMessage::Input(m) => round.server.receive_masked_input(from, m),
            PhaseMessage::Consistency(m) => round.server.receive_consistency(from, m),
            PhaseMessage::Unmask(m) => round.server.receive_unmask(from, m),
        };
        if let Err(error) = result {
            // Only a merchant that deviates from the protocol sends this (not a late, retried
            // or restarted one): the server saw it on the merchant's own authenticated
            // channel, so it is named and kept out of later cohorts.
            if let SecAggError::Peer { who, fault } = &error
                && *who == from
                && fault.is_protocol_violation()
            {
                let reason = format!("round {}, {}: {fault}", round.id, phase.name());
                let id = round.id;
                drop(state);
                self.quarantine(merchant, id, &reason);
            }
            return Err(EngineError::Rejected(error));
        }
        round.received.insert(from);
        let all_in = round.expected.is_subset(&round.received);
        let id = round.id;
        drop(state);
        // The driver looks again when the phase may close: all in, or (with an early-close
        // policy) at each arrival, which may complete its quorum.
        if all_in || self.config.rounds.early_close.is_some() {
            self.arrivals.notify_one();
        }
        Ok((id, phase))
    }

    /// Waits until `phase` of round `round_id` closes and returns what `merchant` gets.
    pub async fn wait_phase(
        &self,
        merchant: &str,
        round_id: u64,
        phase: Phase,
    ) -> Result<PhaseOutput, EngineError> {
        let mut rx = self.changed.subscribe();
        loop {
            {
                let state = self.lock();
                match &state.round {
                    Some(round) if round.id == round_id && round.closed(phase) && !phase.is_last() => {
                        let me = round.members.get(merchant).copied();
                        return Ok(match phase {
                            Phase::AdvertiseKeys => PhaseOutput::Roster(round.roster.clone()),
                            Phase::ShareKeys => PhaseOutput::Inbox(
                                me.and_then(|i| round.inboxes.get(&i).cloned()).unwrap_or_default(),
                            ),
                            Phase::MaskedInput => PhaseOutput::Survivors(round.survivors.clone()),
                            Phase::ConsistencyCheck | Phase::Unmask => {
                                PhaseOutput::Signatures(round.signatures.clone())
                            }
                        });
                    }
                    Some(round) if round.id == round_id => {}
                    _ => {
                        let outcome =
                            state.outcomes.iter().find(|(id, _)| *id == round_id).map(|(_, o)| o.clone());
                        return match outcome {
                            Some(Outcome::Aborted { reason }) => {
                                Err(EngineError::Aborted { round: round_id, reason })
                            }
                            Some(outcome) if phase.is_last() => Ok(PhaseOutput::Finished(outcome)),
                            _ => Err(EngineError::Aborted {
                                round: round_id,
                                reason: "the round is over".into(),
                            }),
                        };
                    }
                }
            }
            if rx.changed().await.is_err() {
                return Err(EngineError::Shutdown);
            }
        }
    }
}
