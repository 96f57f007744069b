//! A real client registers with a real coordinator over loopback gRPC.

use guild_client::identity::Identity;
use guild_client::net::{Connection, NetError};
use guild_proto::limits::max_message_bytes;
use guild_proto::v1;
use guild_sim::LoopbackCoordinator;

#[tokio::test]
async fn client_registers_over_loopback_and_coordinator_records_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator =
        LoopbackCoordinator::start(&dir.path().join("guild.db")).await.expect("start coordinator");
    let identity = Identity::load_or_create(&dir.path().join("shop.key")).expect("identity");

    let mut connection =
        Connection::connect(&coordinator.uri(), max_message_bytes(1 << 16, 10)).await.expect("connect");
    let registered = connection.register("Shop A", &identity).await.expect("register");

    assert_eq!(registered.federation_id, coordinator.core.federation_id());
    assert_eq!(registered.base_model_sha256, guild_sim::base_model_sha256());
    let recorded = coordinator.core.store().merchants().expect("merchants");
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].merchant_id, registered.merchant_id.as_str());
    assert_eq!(recorded[0].display_name, "Shop A");
    assert_eq!(recorded[0].signing_public_key, identity.public_key());

    // Registering again with the same identity is idempotent.
    let again = connection.register("Shop A", &identity).await.expect("register again");
    assert_eq!(again.merchant_id, registered.merchant_id);
    assert_eq!(coordinator.core.store().merchants().expect("merchants").len(), 1);
}

#[tokio::test]
async fn malformed_registration_is_refused_with_the_field_named_and_nothing_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator =
        LoopbackCoordinator::start(&dir.path().join("guild.db")).await.expect("start coordinator");
    let mut raw =
        v1::coordinator_client::CoordinatorClient::connect(coordinator.uri()).await.expect("connect");

    let cases = [
        (
            v1::RegisterRequest {
                display_name: "x".into(),
                signing_public_key: vec![1; 31],
                protocol_version: 1,
            },
            "RegisterRequest.signing_public_key: expected 32 bytes, got 31",
        ),
        (
            v1::RegisterRequest {
                display_name: "".into(),
                signing_public_key: vec![1; 32],
                protocol_version: 1,
            },
            "RegisterRequest.display_name",
        ),
        (
            v1::RegisterRequest {
                display_name: "x".into(),
                signing_public_key: vec![1; 32],
                protocol_version: 9,
            },
            "RegisterRequest.protocol_version",
        ),
    ];
    for (request, expected) in cases {
        let status = raw.register(request).await.expect_err("must be refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(expected), "{:?} does not name {expected:?}", status.message());
    }
    assert!(coordinator.core.store().merchants().expect("merchants").is_empty());
}

#[tokio::test]
async fn oversized_message_is_refused_before_it_is_decoded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator =
        LoopbackCoordinator::start(&dir.path().join("guild.db")).await.expect("start coordinator");
    let mut raw =
        v1::coordinator_client::CoordinatorClient::connect(coordinator.uri()).await.expect("connect");
    let huge = v1::RegisterRequest {
        display_name: "x".repeat(max_message_bytes(1 << 20, 1000) + 1),
        signing_public_key: vec![1; 32],
        protocol_version: 1,
    };
    let status = raw.register(huge).await.expect_err("must be refused");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(coordinator.core.store().merchants().expect("merchants").is_empty());
}

#[tokio::test]
async fn unreachable_coordinator_gives_a_clear_error() {
    // Bind and drop a listener to get a loopback port that nobody serves.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let error =
        Connection::connect(&format!("http://127.0.0.1:{port}"), 1 << 20).await.expect_err("must fail");
    assert!(matches!(error, NetError::Unreachable { .. }), "{error}");
    assert!(error.to_string().contains("cannot reach the coordinator"), "{error}");
}
