//! Merchants are their certificates: registration over mutual TLS, and refusal of unknown,
//! revoked and foreign certificates and of malformed or oversized messages.

use guild_client::identity::Identity;
use guild_client::net::{Connection, NetError, TlsCredentials};
use guild_proto::v1;
use guild_sim::federation::Federation;

/// Checks that a registration was refused as permission denied with `reason` in its message;
/// `what` names what was registered.
fn refused_naming<T: std::fmt::Debug>(result: Result<T, NetError>, what: &str, reason: &str) {
    let status = match result {
        Err(NetError::Refused(status)) => status,
        other => panic!("{what} must be refused, got {other:?}"),
    };
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(status.message().contains(reason), "{}", status.message());
}

async fn federation(dir: &std::path::Path, merchants: usize) -> Federation {
    let mut federation = Federation::init(dir, merchants, |c| c.rounds.min_cohort = 100).expect("init");
    federation.start_in_process().await.expect("start");
    federation
}

#[tokio::test]
async fn merchant_registers_with_its_certificate_and_the_store_records_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = federation(dir.path(), 2).await;
    let identity = federation.identity(1).expect("identity");
    let mut connection = federation.connect(1).await.expect("connect");
    // A signing key other than the one the certificate binds is refused, and nothing stored.
    refused_naming(
        connection.register("Shop B", &Identity::ephemeral().expect("identity")).await,
        "a key the certificate does not bind",
        "differs from the one its certificate binds",
    );
    assert!(federation.store().expect("store").merchants().expect("merchants").is_empty());
    let registered = connection.register("Shop B", &identity).await.expect("register");

    let core = &federation.in_process().expect("running").core;
    assert_eq!(registered.merchant_id.as_str(), "merchant-002", "the id comes from the certificate");
    assert_eq!(registered.federation_id, core.federation_id());
    assert_eq!(registered.base_model_sha256, guild_sim::base_model_sha256());
    let recorded = core.store().merchants().expect("merchants");
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].display_name, "Shop B");
    assert_eq!(recorded[0].signing_public_key, identity.public_key());
    assert_eq!(
        recorded[0].certificate, federation.pki.merchants[1].cert_der,
        "the certificate is kept for tasks"
    );
    let again = connection.register("Shop B", &identity).await.expect("register again");
    assert_eq!(again.merchant_id, registered.merchant_id);
    assert_eq!(core.store().merchants().expect("merchants").len(), 1);
}

#[tokio::test]
async fn unknown_revoked_and_foreign_certificates_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = federation(dir.path(), 3).await;
    let store = federation.store().expect("store");
    let identity = Identity::ephemeral().expect("identity");

    // Signed by the federation's CA but taken off the allow-list.
    assert!(store.revoke("merchant-003").expect("revoke"));
    let mut revoked = federation.connect(2).await.expect("TLS still completes");
    refused_naming(revoked.register("Shop C", &identity).await, "a revoked certificate", "revoked");

    // Signed by the CA but not on the allow-list: merchant-002's entry now names another
    // certificate, so its own is unknown.
    store.allow("merchant-002", [0xAB; 32]).expect("re-allow");
    let mut unknown = federation.connect(1).await.expect("TLS still completes");
    refused_naming(
        unknown.register("Shop B", &identity).await,
        "an unknown certificate",
        "not on this federation's allow-list",
    );

    // A certificate from another CA fails the TLS handshake (or its first request).
    let other = Federation::init(&dir.path().join("other"), 1, |_| {}).expect("other federation");
    let foreign = TlsCredentials {
        ca_pem: federation.pki.ca.cert_pem.clone().into_bytes(),
        cert_pem: other.pki.merchants[0].cert_pem.clone().into_bytes(),
        key_pem: other.pki.merchants[0].key_pem.clone().into_bytes(),
        server_name: None,
    };
    let refused = match Connection::connect(&federation.uri(), &foreign, 1 << 20).await {
        Err(_) => true,
        Ok(mut connection) => connection.register("Intruder", &identity).await.is_err(),
    };
    assert!(refused, "a certificate from another CA must not get in");
    assert!(store.merchants().expect("merchants").is_empty(), "nothing was recorded");
}

#[tokio::test]
async fn malformed_and_oversized_registrations_are_refused_and_nothing_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = federation(dir.path(), 1).await;
    // No client-side limit: the coordinator's own limit must refuse the oversized message.
    let mut raw = federation.connect(0).await.expect("connect").raw().max_encoding_message_size(usize::MAX);
    let cases = [
        (
            v1::RegisterRequest {
                display_name: "x".into(),
                signing_public_key: vec![1; 31],
                protocol_version: guild_proto::PROTOCOL_VERSION,
            },
            "RegisterRequest.signing_public_key: expected 32 bytes, got 31",
        ),
        (
            v1::RegisterRequest {
                display_name: "".into(),
                signing_public_key: vec![1; 32],
                protocol_version: guild_proto::PROTOCOL_VERSION,
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
    let d = federation.config.manifest().expect("manifest").parameter_count().next_power_of_two();
    let limit = guild_proto::limits::max_message_bytes(d, guild_proto::limits::MAX_COHORT);
    let huge = v1::RegisterRequest {
        display_name: "x".repeat(limit + 1),
        signing_public_key: vec![1; 32],
        protocol_version: guild_proto::PROTOCOL_VERSION,
    };
    let status = raw.register(huge).await.expect_err("must be refused");
    assert!(matches!(status.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted), "{status:?}");
    assert!(federation.store().expect("store").merchants().expect("merchants").is_empty());
}

/// #15.3: a revoked merchant still holds a CA-signed certificate, so TLS lets it in; the
/// allow-list gate refuses it from the request's headers, before the body is read or
/// decoded. A message far above the size limit is therefore refused as revoked (permission
/// denied), not as oversized (which is what an allowed merchant gets for it, because its
/// message is decoded against the limit), however often it tries.
#[tokio::test]
async fn a_revoked_merchant_is_refused_before_its_message_is_decoded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = federation(dir.path(), 2).await;
    let store = federation.store().expect("store");
    assert!(store.revoke("merchant-002").expect("revoke"));
    let d = federation.config.manifest().expect("manifest").parameter_count().next_power_of_two();
    let limit = guild_proto::limits::max_message_bytes(d, guild_proto::limits::MAX_COHORT);
    let huge = || v1::RegisterRequest {
        display_name: "x".repeat(limit + 1),
        signing_public_key: vec![1; 32],
        protocol_version: guild_proto::PROTOCOL_VERSION,
    };
    let mut revoked =
        federation.connect(1).await.expect("TLS still completes").raw().max_encoding_message_size(usize::MAX);
    for _ in 0..20 {
        let status = revoked.register(huge()).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("revoked"), "{}", status.message());
    }
    let mut allowed =
        federation.connect(0).await.expect("connect").raw().max_encoding_message_size(usize::MAX);
    let status = allowed.register(huge()).await.expect_err("oversized");
    assert!(matches!(status.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted), "{status:?}");
    assert!(store.merchants().expect("merchants").is_empty());
}

#[tokio::test]
async fn unreachable_coordinator_gives_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = Federation::init(dir.path(), 1, |_| {}).expect("init");
    // Nothing serves the federation's address: the coordinator was never started.
    let error = federation.connect(0).await.expect_err("must fail");
    let error = error.downcast::<NetError>().expect("a network error");
    assert!(matches!(error, NetError::Unreachable { .. }), "{error}");
    assert!(error.to_string().contains("cannot reach the coordinator"), "{error}");
}

/// TLS problems that retrying cannot fix are named, with what to do, and not retried: a
/// coordinator certificate from another CA, a merchant certificate the coordinator does not
/// trust, and an address without `https://`.
#[tokio::test]
async fn tls_problems_are_named_and_not_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let federation = federation(dir.path(), 1).await;
    let limit = 1 << 20;
    let other = guild_proto::pki::issue(1).expect("another federation");
    let mut wrong_ca = federation.credentials(0);
    wrong_ca.ca_pem = other.ca.cert_pem.clone().into_bytes();
    let error = Connection::connect(&federation.uri(), &wrong_ca, limit).await.expect_err("another CA");
    assert!(matches!(error, NetError::Tls { .. }) && !error.is_transient(), "{error}");
    assert!(error.to_string().contains("not signed by the federation's CA"), "{error}");

    let mut foreign = federation.credentials(0);
    foreign.cert_pem = other.merchants[0].cert_pem.clone().into_bytes();
    foreign.key_pem = other.merchants[0].key_pem.clone().into_bytes();
    // TLS 1.3 completes the client's side of the handshake before the server refuses the
    // certificate: the first request receives the refusal, named, and it is not retried.
    let mut connection = Connection::connect(&federation.uri(), &foreign, limit).await.expect("handshake");
    let identity = federation.identity(0).expect("identity");
    let error = connection.register("x", &identity).await.expect_err("refused");
    assert!(matches!(error, NetError::TlsRefused(_)) && !error.is_transient(), "{error:?}");
    assert!(error.to_string().contains("refused this merchant's certificate"), "{error}");

    let plain = federation.uri().replace("https://", "http://");
    let error = Connection::connect(&plain, &federation.credentials(0), limit).await.expect_err("http");
    assert!(error.to_string().contains("must start with https://"), "{error}");
}

/// `init-federation --server-name`: the server certificate covers the name merchants on other
/// machines connect by, and their sample configurations use it.
#[test]
fn init_federation_issues_the_server_certificate_for_the_names_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen: std::net::SocketAddr = "0.0.0.0:50124".parse().expect("address");
    let names = ["Coord.Example.com".to_owned(), "10.1.2.3".to_owned()];
    guild_coordinator::daemon::init_federation(dir.path(), 1, listen, &names).expect("init");
    let config =
        guild_client::config::ClientConfig::load(&dir.path().join("merchants").join("merchant-001.toml"))
            .expect("config");
    assert_eq!(config.coordinator, "https://coord.example.com:50124");
    let der = guild_proto::pki::read_cert_der(&dir.path().join("server.pem")).expect("server certificate");
    let text = String::from_utf8_lossy(&der);
    assert!(text.contains("coord.example.com"), "the name is in the certificate");
    let bad = tempfile::tempdir().expect("tempdir");
    let error = guild_coordinator::daemon::init_federation(bad.path(), 1, listen, &["not a name".to_owned()])
        .expect_err("refused");
    assert!(error.to_string().contains("neither a host name nor an IP address"), "{error}");
}

/// The coordinator cannot link the client crate (it would pull in libtorch), so the merchant
/// configs that `init-federation` writes are a commented template: this keeps the template
/// a valid `ClientConfig` that points at the federation's files.
#[test]
fn init_federation_writes_merchant_configs_the_client_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen: std::net::SocketAddr = "127.0.0.1:50123".parse().expect("address");
    guild_coordinator::daemon::init_federation(dir.path(), 2, listen, &[]).expect("init");
    let path = dir.path().join("merchants").join("merchant-002.toml");
    let config =
        guild_client::config::ClientConfig::load(&path).expect("the template parses as a client config");
    assert_eq!(config.coordinator, "https://localhost:50123");
    assert_eq!(config.display_name, "merchant-002");
    assert_eq!(config.tls.ca, dir.path().join("merchants").join("../ca.pem"));
    assert!(config.tls.cert.ends_with("merchant-002.pem") && config.tls.key.ends_with("merchant-002.key"));
    assert!(!config.guards.dangerous_send_unnoised_updates, "unnoised updates stay off by default");
    // What the client would write back is the same configuration.
    let text = toml::to_string(&config).expect("serialise");
    let back: guild_client::config::ClientConfig = toml::from_str(&text).expect("parse back");
    assert_eq!(back, config);
}

/// #15.3: the decode limit is sized from this federation (its dimension and
/// `rounds.max_cohort`), far below what the wire's largest cohort would need; and one
/// merchant is held to its request rate across all its connections (refused from the
/// headers, before its message is read), while the others are served.
#[tokio::test]
async fn the_decode_limit_fits_the_federation_and_a_flooding_merchant_is_held_to_its_rate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut federation = Federation::init(dir.path(), 2, |c| {
        c.rounds.min_cohort = 100;
        c.server.requests_per_second_per_merchant = 1;
        c.server.request_burst_per_merchant = 5;
    })
    .expect("init");
    federation.start_in_process().await.expect("start");
    let d = federation.config.manifest().expect("manifest").parameter_count().next_power_of_two();
    let own = guild_proto::limits::max_message_bytes(d, federation.config.rounds.max_cohort as usize);
    let wire = guild_proto::limits::max_message_bytes(d, guild_proto::limits::MAX_COHORT);
    assert!(own * 4 < wire, "{own} is not far below {wire}");
    let mut honest =
        federation.connect(0).await.expect("connect").raw().max_encoding_message_size(usize::MAX);
    let between = v1::RegisterRequest {
        display_name: "x".repeat(own + 1),
        signing_public_key: vec![1; 32],
        protocol_version: guild_proto::PROTOCOL_VERSION,
    };
    assert!(between.display_name.len() < wire);
    let status = honest.register(between).await.expect_err("above this federation's limit");
    assert!(matches!(status.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted), "{status:?}");
    assert!(!status.message().contains("request rate"), "{status:?}");

    let started = std::time::Instant::now();
    let mut flooding = Vec::new();
    for _ in 0..2 {
        flooding.push(federation.connect(1).await.expect("connect").raw());
    }
    let (mut served, mut refused) = (0u32, 0u32);
    for i in 0..30 {
        match flooding[i % 2].status(v1::StatusRequest {}).await {
            Ok(_) => served += 1,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("request rate"), "{}", status.message());
                refused += 1;
            }
        }
    }
    // A burst of 5, then one a second, whichever connection the requests come on.
    let allowed = 5 + started.elapsed().as_secs() as u32 + 1;
    assert!(served <= allowed, "{served} served, at most {allowed} allowed");
    assert!(refused >= 30 - allowed, "{refused} refused");
    for _ in 0..3 {
        honest.status(v1::StatusRequest {}).await.expect("another merchant is served");
    }
    let metrics = federation.in_process().expect("running").core.engine().metrics.encode();
    assert!(metrics.contains(&format!("guild_requests_rate_limited_total {refused}")), "{metrics}");
}
