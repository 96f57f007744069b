//! Hostile or broken phase messages get a gRPC error that says what is wrong, and neither
//! crash the coordinator nor change what it stored.

use std::time::Duration;

use guild_privacy::secagg::{RoundConfig, client as secagg};
use guild_proto::domain::{RoundTask, Task};
use guild_proto::v1;
use guild_sim::federation::Federation;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::harness::small;

fn binding(task: &RoundTask, round_id: u64) -> Option<v1::RoundBinding> {
    Some(v1::RoundBinding {
        federation_id: task.binding.federation_id.to_vec(),
        round_id,
        adapter_sha256: task.binding.adapter_sha256.to_vec(),
        task_sha256: task.binding.task_sha256.to_vec(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_phase_messages_are_refused_with_reasons_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut federation = Federation::init(dir.path(), 3, |c| {
        small(c);
        c.rounds.phase_deadlines_ms = [20_000; 5];
    })
    .expect("init");
    federation.start_in_process().await.expect("start");

    // Three merchants register; the round opens with all of them.
    let mut tasks = Vec::new();
    let mut connections = Vec::new();
    let mut identities = Vec::new();
    for i in 0..3 {
        let mut connection = federation.connect(i).await.expect("connect");
        let identity = federation.identity(i).expect("identity");
        connection.register("Shop", &identity).await.expect("register");
        connections.push(connection);
        identities.push(identity);
    }
    for (i, connection) in connections.iter_mut().enumerate() {
        let id = guild_proto::domain::MerchantId::parse(&format!("merchant-{:03}", i + 1)).expect("id");
        match connection.get_task(&id, Duration::from_secs(10)).await.expect("task") {
            Task::Round(task) => tasks.push(*task),
            Task::Wait { reason, .. } => panic!("no task: {reason}"),
        }
    }
    let store = federation.store().expect("store");
    let before = (
        store.round_counts().expect("counts"),
        store.adapter_count().expect("adapters"),
        store.ledger().expect("ledger"),
    );
    let mut raw = connections[0].raw().max_encoding_message_size(usize::MAX);
    let task = &tasks[0];
    let keys = |round_id: u64, cipher_len: usize| v1::AdvertiseKeysRequest {
        binding: binding(task, round_id),
        keys: Some(v1::SignedKeys {
            sender: task.secagg.my_index.get(),
            cipher_public_key: vec![9; cipher_len],
            mask_public_key: vec![9; 32],
            signature: vec![0; 64],
        }),
    };
    let expect = |result: Result<tonic::Response<v1::AdvertiseKeysResponse>, tonic::Status>,
                  code: tonic::Code,
                  says: &str| {
        let status = result.expect_err("must be refused");
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(says), "{:?} does not say {says:?}", status.message());
    };

    // Malformed: a field of the wrong length is named.
    expect(
        raw.advertise_keys(keys(task.binding.round_id, 31)).await,
        tonic::Code::InvalidArgument,
        "SignedKeys.cipher_public_key",
    );
    // Wrong round: bound to a round that is not open (an old message replayed, say).
    expect(
        raw.advertise_keys(keys(task.binding.round_id + 7, 32)).await,
        tonic::Code::FailedPrecondition,
        "open round is",
    );
    // Forged signature: refused by the SecAgg+ server.
    expect(
        raw.advertise_keys(keys(task.binding.round_id, 32)).await,
        tonic::Code::InvalidArgument,
        "signature",
    );
    // Wrong phase: a masked input while keys are being collected.
    let masked = v1::MaskedInputRequest {
        binding: binding(task, task.binding.round_id),
        sender: task.secagg.my_index.get(),
        masked: vec![0; task.secagg.vector_length as usize],
        complaints: vec![],
    };
    let status = raw.masked_input(masked).await.expect_err("wrong phase");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("phase AdvertiseKeys"), "{}", status.message());
    // Oversized: refused by the size limit before decoding.
    let limit = guild_proto::limits::max_message_bytes(
        task.secagg.vector_length as usize,
        guild_proto::limits::MAX_COHORT,
    );
    let huge = v1::MaskedInputRequest {
        binding: binding(task, task.binding.round_id),
        sender: 1,
        masked: vec![7; limit / 4 + 1],
        complaints: vec![],
    };
    let status = raw.masked_input(huge).await.expect_err("oversized");
    assert!(matches!(status.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted), "{status:?}");

    // Replay: a valid key advertisement is accepted once (it then waits for the phase to
    // close); the same message again is refused.
    let config = RoundConfig {
        binding: task.binding,
        cohort_size: task.secagg.cohort_size,
        threshold: task.secagg.threshold,
        neighbours: task.secagg.neighbours,
        vector_length: task.secagg.vector_length as usize,
        bit_width: task.privacy.bit_width,
    };
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let (_, message) =
        secagg::start(config, task.secagg.my_index, identities[0].key_pair(), &mut rng).expect("start");
    let wire = v1::AdvertiseKeysRequest::from(message);
    let mut first = raw.clone();
    let pending = tokio::spawn({
        let wire = wire.clone();
        async move { first.advertise_keys(wire).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    expect(raw.advertise_keys(wire).await, tonic::Code::InvalidArgument, "second message");
    pending.abort();

    // The coordinator still serves, and its store is as it was.
    let status = connections[1].status().await.expect("still serving");
    assert_eq!(status.rounds_completed, 0);
    let after = (
        store.round_counts().expect("counts"),
        store.adapter_count().expect("adapters"),
        store.ledger().expect("ledger"),
    );
    assert_eq!(before, after);
    let metrics = federation.in_process().expect("running").core.engine().metrics.encode();
    assert!(metrics.contains("guild_rejected_messages_total{rpc=\"AdvertiseKeys\"} 4"), "{metrics}");
}
