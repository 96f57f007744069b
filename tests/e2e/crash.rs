//! Crash safety: the real `guild-coordinator` binary is SIGKILLed during each SecAgg+
//! phase and restarted. No committed adapter or ledger entry is lost or duplicated, the
//! open round is aborted, clients reconnect by themselves and the next round completes.

use std::time::{Duration, Instant};

use guild_client::participant::Faults;
use guild_privacy::secagg::Phase;
use guild_sim::federation::{Federation, coordinator_binary};

use crate::harness::{futures_join, small, wait_for_rounds};

/// What the store holds: (adapter versions, ledger round ids, completed round ids).
fn snapshot(federation: &Federation) -> (Vec<u64>, Vec<u64>, u64, u64) {
    let store = federation.store().expect("store");
    let latest = store.latest_adapter().expect("latest").map_or(0, |a| a.version);
    let versions: Vec<u64> = (0..=latest).filter(|&v| store.adapter(v).is_ok()).collect();
    let ledger: Vec<u64> = store.ledger().expect("ledger").into_iter().map(|e| e.round_id).collect();
    let counts = store.round_counts().expect("counts");
    (versions, ledger, counts.completed, counts.aborted)
}

async fn wait_for_phase(federation: &Federation, phase: Phase) -> u64 {
    let store = federation.store().expect("store");
    let started = Instant::now();
    loop {
        if let Some((round, p)) = store.open_round_phase().expect("phase")
            && p == Some(phase)
        {
            return round;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no round reached {phase}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_in_every_phase_loses_and_duplicates_nothing() {
    let binary = coordinator_binary().expect("the coordinator binary is built by `cargo test --workspace`");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut federation = Federation::init(dir.path(), 4, |c| {
        small(c);
        c.rounds.min_cohort = 4;
        c.rounds.phase_deadlines_ms = [10_000; 5];
    })
    .expect("init");
    federation.start_process(&binary).await.expect("start");
    // Clients pause 250 ms before each phase, so that every phase stays open long enough
    // to be killed in.
    let faults = Faults { straggle: 1.0, straggle_delay: Duration::from_millis(250), ..Default::default() };
    let clients = futures_join(&federation, 4, faults, 0).await;
    wait_for_rounds(&federation, 1, Duration::from_secs(60)).await;

    // Rounds killed after their charge (in Unmask): charged, aborted, never refunded.
    let mut charged_and_aborted = 0;
    for phase in Phase::ALL {
        let round = wait_for_phase(&federation, phase).await;
        federation.kill().expect("SIGKILL");
        let (versions, ledger, completed, aborted) = snapshot(&federation);
        // Committed state is whole: one adapter per completed round (plus version 0), one
        // ledger entry per completed round and per round killed after its charge, versions
        // contiguous.
        assert_eq!(versions, (0..=completed).collect::<Vec<_>>(), "killed in {phase}");
        if phase == Phase::Unmask {
            // ConsistencyCheck closed: the signatures that let clients reveal shares were
            // only handed out after the charge was durable.
            assert!(ledger.contains(&round), "round {round}, killed in Unmask, was charged before any share");
            charged_and_aborted += 1;
        } else {
            assert!(
                !ledger.contains(&round),
                "the killed round {round} revealed nothing and spent no budget"
            );
        }
        assert_eq!(ledger.len() as u64, completed + charged_and_aborted, "killed in {phase}");

        federation.start_process(&binary).await.expect("restart");
        // The clients come back by themselves and the next round completes.
        wait_for_rounds(&federation, completed + 1, Duration::from_secs(60)).await;
        let (versions_after, ledger_after, completed_after, aborted_after) = snapshot(&federation);
        assert!(aborted_after > aborted, "the open round {round} was recorded as aborted");
        assert_eq!(versions_after[..versions.len()], versions[..], "no committed adapter lost");
        assert_eq!(ledger_after[..ledger.len()], ledger[..], "no ledger entry lost");
        assert_eq!(
            ledger_after.len() as u64,
            completed_after + charged_and_aborted,
            "no ledger entry duplicated or refunded"
        );
        assert_eq!(versions_after, (0..=completed_after).collect::<Vec<_>>());
    }
    for client in clients {
        assert!(!client.is_finished(), "clients keep running across restarts");
        client.abort();
    }
    let log = std::fs::read_to_string(dir.path().join("coordinator.log")).expect("log");
    assert!(log.contains("aborted rounds left open by a previous run"), "the restart is logged");
}
