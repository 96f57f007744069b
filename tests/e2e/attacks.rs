//! A malicious coordinator against a real client: a scripted gRPC coordinator (mutual TLS,
//! the federation's real certificates) hands an honest merchant's `Participant` one task
//! built to attack it, and records every call the client makes. One test per attack of the
//! threat model that a task can carry; each shows the client refuses the task before
//! anything leaves it (no adapter download, no key advertisement), and a control test shows
//! the same harness lets an honest task through, so a refusal is the guard's doing. The
//! same scripted coordinator streams tampered adapter downloads to the client's real
//! connection, which must refuse each.
//!
//! Attacks that live in the SecAgg+ rounds themselves (split survivor lists, altered share
//! forwards, the roster-derived graph) are driven against the real client state machines in
//! `privacy/tests/secagg_rounds.rs`; the charge-before-release order in `crash.rs`; the
//! evaluation reports in `rounds.rs`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guild_client::identity::Identity;
use guild_client::learner::RandomLearner;
use guild_client::net::{Connection, TlsCredentials};
use guild_client::participant::{ClientLedger, Participant, ParticipantError, ParticipantOptions};
use guild_privacy::secagg::message::ClientIndex;
use guild_privacy::secagg::min_active_threshold;
use guild_privacy::{PrivacyMode, PrivacyUnit};
use guild_proto::domain::{AdapterFamily, AdapterManifest, MerchantId, Registered, RoundTask, Task};
use guild_proto::pki::FederationPki;
use guild_proto::round::RoundKind;
use guild_proto::tower::TowerShape;
use guild_proto::v1;
use guild_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tonic::{Request, Response, Status};

const FEDERATION: [u8; 16] = [0x42; 16];
/// Cohort size of the scripted rounds; the victim is member 1.
const COHORT: u32 = 20;

/// What the scripted coordinator saw the client do.
#[derive(Debug, Default)]
struct Calls {
    registered: u32,
    tasks: u32,
    downloads: u32,
    /// SecAgg+ messages of any phase, and metrics reports.
    sent: u32,
}

/// A coordinator that answers registration honestly, hands out one scripted task (or the
/// same task at every poll, as a real coordinator does while its round is open), and
/// refuses everything else while counting it.
struct Scripted {
    task: Mutex<Option<RoundTask>>,
    /// Hand the task out at every poll instead of once.
    repeat: bool,
    /// Answer this many task polls first with the rate limit's `ResourceExhausted`.
    rate_limited: u32,
    /// The chunks an adapter download streams; none: the download is refused.
    adapter: Vec<v1::AdapterChunk>,
    calls: Arc<Mutex<Calls>>,
}

type Chunks =
    Pin<Box<dyn tonic::codegen::tokio_stream::Stream<Item = Result<v1::AdapterChunk, Status>> + Send>>;

impl Scripted {
    fn count(&self, what: impl FnOnce(&mut Calls)) {
        what(&mut self.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    fn sent<T>(&self) -> Result<Response<T>, Status> {
        self.count(|c| c.sent += 1);
        Err(Status::unavailable("the scripted coordinator ends the round here"))
    }
}

#[tonic::async_trait]
impl Coordinator for Scripted {
    async fn register(
        &self,
        _: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        self.count(|c| c.registered += 1);
        let merchant_id = MerchantId::parse("merchant-001").ok_or_else(|| Status::internal("id"))?;
        Ok(Response::new(
            Registered { merchant_id, federation_id: FEDERATION, base_model_sha256: base_model() }.into(),
        ))
    }

    async fn get_task(
        &self,
        _: Request<v1::GetTaskRequest>,
    ) -> Result<Response<v1::GetTaskResponse>, Status> {
        let mut polls = 0;
        self.count(|c| {
            c.tasks += 1;
            polls = c.tasks;
        });
        if polls <= self.rate_limited {
            return Err(Status::resource_exhausted(
                "merchant merchant-001 is over its request rate; retry later",
            ));
        }
        let mut slot = self.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let task = if self.repeat { slot.clone() } else { slot.take() };
        let task = match task {
            Some(task) => Task::Round(Box::new(task)),
            None => Task::Wait { retry_after: Duration::from_secs(1), reason: "no more rounds".into() },
        };
        Ok(Response::new(task.into()))
    }

    async fn advertise_keys(
        &self,
        _: Request<v1::AdvertiseKeysRequest>,
    ) -> Result<Response<v1::AdvertiseKeysResponse>, Status> {
        self.sent()
    }

    async fn share_keys(
        &self,
        _: Request<v1::ShareKeysRequest>,
    ) -> Result<Response<v1::ShareKeysResponse>, Status> {
        self.sent()
    }

    async fn masked_input(
        &self,
        _: Request<v1::MaskedInputRequest>,
    ) -> Result<Response<v1::MaskedInputResponse>, Status> {
        self.sent()
    }

    async fn consistency_check(
        &self,
        _: Request<v1::ConsistencyCheckRequest>,
    ) -> Result<Response<v1::ConsistencyCheckResponse>, Status> {
        self.sent()
    }

    async fn unmask(&self, _: Request<v1::UnmaskRequest>) -> Result<Response<v1::UnmaskResponse>, Status> {
        self.sent()
    }

    type DownloadAdapterStream = Chunks;

    async fn download_adapter(
        &self,
        _: Request<v1::DownloadAdapterRequest>,
    ) -> Result<Response<Self::DownloadAdapterStream>, Status> {
        self.count(|c| c.downloads += 1);
        if self.adapter.is_empty() {
            return Err(Status::unavailable("the scripted coordinator serves no adapter"));
        }
        let chunks: Vec<Result<v1::AdapterChunk, Status>> = self.adapter.iter().cloned().map(Ok).collect();
        Ok(Response::new(Box::pin(tonic::codegen::tokio_stream::iter(chunks))))
    }

    async fn report_metrics(
        &self,
        _: Request<v1::ReportMetricsRequest>,
    ) -> Result<Response<v1::ReportMetricsResponse>, Status> {
        self.sent()
    }

    async fn status(&self, _: Request<v1::StatusRequest>) -> Result<Response<v1::StatusResponse>, Status> {
        Err(Status::unimplemented("status"))
    }
}

fn base_model() -> [u8; 32] {
    let hex = guild_proto::domain::BASE_MODEL_SHA256;
    std::array::from_fn(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
}

/// A tiny sequence tower (the item residual and pooling only: 36 parameters).
fn manifest() -> AdapterManifest {
    let shape = TowerShape {
        hidden: 8,
        history: 4,
        zero_shot_items: 2,
        item_rank: 2,
        width: 8,
        layers: 0,
        heads: 1,
        catalogue: 0,
        neighbours: 0,
        pair_sketch: 0,
        item_ids: 0,
        spectral: 0,
    };
    AdapterManifest::sequence_tower(base_model(), shape, 7)
}

/// The federation's certificates (the merchants' keys generated on their behalf), once.
fn pki() -> &'static FederationPki {
    guild_testkit::pki()
}

fn identity(i: usize) -> Identity {
    Identity::from_pkcs8(&pki().merchants[i].signing_pkcs8).expect("identity")
}

/// An honest task for a cohort of the federation's first `COHORT` merchants, at the
/// active-security threshold, noise multiplier `z`; the victim is member 1.
fn honest_task(z: f64) -> RoundTask {
    guild_testkit::honest_task(manifest(), FEDERATION, COHORT, min_active_threshold(COHORT - 1), z)
}

use guild_testkit::seal;

/// What became of the scripted round at an honest client with `options`.
struct Outcome {
    result: Result<(), String>,
    calls: Calls,
}

/// Serves `service` over mutual TLS with the federation's server certificate.
async fn serve(
    service: Scripted,
) -> (SocketAddr, tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) {
    let pki = pki();
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(&pki.server.cert_pem, &pki.server.key_pem))
        .client_ca_root(tonic::transport::Certificate::from_pem(&pki.ca.cert_pem));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address: SocketAddr = listener.local_addr().expect("address");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .expect("tls")
            .add_service(CoordinatorServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (address, server)
}

/// Merchant-001's real connection to the coordinator at `address`.
async fn connection(address: SocketAddr) -> Connection {
    let pki = pki();
    let credentials = TlsCredentials {
        ca_pem: pki.ca.cert_pem.clone().into_bytes(),
        cert_pem: pki.merchants[0].cert_pem.clone().into_bytes(),
        key_pem: pki.merchants[0].key_pem.clone().into_bytes(),
        server_name: None,
    };
    let uri = format!("https://localhost:{}", address.port());
    Connection::connect(&uri, &credentials, 1 << 22).await.expect("connect")
}

/// Merchant-001's real `Participant`, with a random learner, connected to `address`.
async fn merchant(address: SocketAddr, options: ParticipantOptions) -> Participant {
    merchant_of(address, options, manifest()).await
}

/// As [`merchant`], its learner's adapter `manifest`.
async fn merchant_of(
    address: SocketAddr,
    options: ParticipantOptions,
    manifest: AdapterManifest,
) -> Participant {
    let connection = connection(address).await;
    let learner = RandomLearner { manifest, norm: 0.5, rng: ChaCha20Rng::seed_from_u64(1), shoppers: 0 };
    Participant::new(connection, Arc::new(identity(0)), Box::new(learner), options, ClientLedger::in_memory())
}

/// Serves `task` from a scripted coordinator over mutual TLS and runs merchant-001's real
/// `Participant` against it for one round.
async fn attack(task: RoundTask, options: ParticipantOptions) -> Outcome {
    one_round(task, 0, options).await
}

/// As [`attack`], the first `rate_limited` task polls answered with the rate limit.
async fn one_round(task: RoundTask, rate_limited: u32, options: ParticipantOptions) -> Outcome {
    one_round_of(task, rate_limited, options, manifest()).await
}

/// As [`one_round`], the client's learner training the adapter of `manifest`.
async fn one_round_of(
    task: RoundTask,
    rate_limited: u32,
    options: ParticipantOptions,
    manifest: AdapterManifest,
) -> Outcome {
    let calls = Arc::new(Mutex::new(Calls::default()));
    let service = Scripted {
        task: Mutex::new(Some(task)),
        repeat: false,
        rate_limited,
        adapter: Vec::new(),
        calls: calls.clone(),
    };
    let (address, server) = serve(service).await;
    let mut participant =
        merchant_of(address, ParticipantOptions { poll: Duration::from_secs(1), ..options }, manifest).await;
    // The client's one round: its outcome is all this harness wants, so the client stops
    // once it is known (a refused task is no committed round, which would stop it itself).
    let mut result = Ok(());
    let decided = tokio::sync::Notify::new();
    let run = participant.run(|round| {
        result = match round {
            Ok(_) => Ok(()),
            Err(ParticipantError::Refused(reason)) => Err(reason.clone()),
            Err(other) => Err(format!("not a refusal: {other}")),
        };
        decided.notify_one();
    });
    tokio::time::timeout(Duration::from_secs(30), async {
        tokio::select! {
            ran = run => ran.expect("the client runs"),
            () = decided.notified() => {}
        }
    })
    .await
    .expect("the client finishes its one round");
    server.abort();
    let calls = std::mem::take(&mut *calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    Outcome { result, calls }
}

/// The client refused the task with a reason containing `expected`, having registered and
/// polled, and sent nothing further: no adapter download, no SecAgg+ message.
fn assert_refused(outcome: &Outcome, expected: &str) {
    match &outcome.result {
        Err(reason) => assert!(reason.contains(expected), "refused for another reason: {reason}"),
        Ok(()) => panic!("the client took part"),
    }
    let c = &outcome.calls;
    assert_eq!((c.registered, c.tasks), (1, 1), "{c:?}");
    assert_eq!((c.downloads, c.sent), (0, 0), "the client acted on a refused task: {c:?}");
}

fn options() -> ParticipantOptions {
    ParticipantOptions { min_noise_multiplier: 0.5, max_epsilon: 1e6, ..ParticipantOptions::default() }
}

#[tokio::test]
async fn the_harness_lets_an_honest_task_through_to_the_adapter_download() {
    let outcome = attack(honest_task(1.0), options()).await;
    let reason = outcome.result.expect_err("the scripted coordinator serves no adapter");
    assert!(reason.starts_with("not a refusal"), "{reason}");
    assert_eq!(outcome.calls.downloads, 1, "the vetted task went on to the adapter: {:?}", outcome.calls);
}

/// A popularity release sends the merchant's own statistics and reads nothing of the adapter
/// the round starts from: the client goes from the vetted task to its key advertisement
/// without downloading it (16 MB a merchant with a pair sketch); the same task as a training
/// round downloads it first.
#[tokio::test]
async fn a_popularity_release_does_not_fetch_the_adapter() {
    let AdapterFamily::SequenceTower(shape) = manifest().family else { panic!("a tower") };
    let with_catalogue =
        AdapterManifest::sequence_tower(base_model(), TowerShape { catalogue: 6, ..shape }, 7);
    let task_of = |kind: RoundKind| {
        let t = min_active_threshold(COHORT - 1);
        let mut task = guild_testkit::honest_task(with_catalogue.clone(), FEDERATION, COHORT, t, 1.0);
        task.training.kind = kind;
        task.secagg.vector_length =
            guild_privacy::dp::encoded_length(task.privacy.mode, task.summed().len()) as u32;
        seal(&mut task);
        task
    };
    let release =
        one_round_of(task_of(RoundKind::PopularityRelease), 0, options(), with_catalogue.clone()).await;
    let reason = release.result.expect_err("the scripted coordinator ends the round at its keys");
    assert!(reason.starts_with("not a refusal"), "{reason}");
    assert_eq!((release.calls.downloads, release.calls.sent), (0, 1), "{:?}", release.calls);
    let training = one_round_of(task_of(RoundKind::Training), 0, options(), with_catalogue).await;
    assert_eq!((training.calls.downloads, training.calls.sent), (1, 0), "{:?}", training.calls);
}

/// Attack 1: a threshold below Bonawitz et al.'s active bound lets a coordinator that shows
/// different survivor lists collect both of a victim's shares.
#[tokio::test]
async fn a_threshold_below_the_active_security_bound_is_refused() {
    let mut task = honest_task(1.0);
    task.secagg.threshold -= 1;
    task.privacy.min_survivors = task.secagg.threshold;
    seal(&mut task);
    assert_refused(&attack(task, options()).await, "below the active-security bound");
}

/// The bound is taken on the graph the round builds: asked for an odd k = 17 in a cohort of
/// 20, the graph gives each client 18 share holders (k rounded up to even), whose bound is
/// 13; a threshold of 12, the bound for the 17 the task names, lets one more colluder in.
#[tokio::test]
async fn a_threshold_below_the_bound_of_the_graph_actually_built_is_refused() {
    assert_refused(&attack(sparse_task(17), options()).await, "bound 13 for 18 share holders");
}

/// A sparse graph with few share holders (6 here, at its own active-security threshold) is
/// easier to surround with colluders by grinding rosters: below the merchant's floor it is
/// refused.
#[tokio::test]
async fn a_neighbourhood_below_the_merchants_floor_is_refused() {
    assert_refused(&attack(sparse_task(6), options()).await, "below this merchant's minimum of 12");
}

/// An honest task but for its graph: `k` neighbours, at the threshold the bound gives for
/// `k` taken at its word.
fn sparse_task(k: u32) -> RoundTask {
    let mut task = guild_testkit::honest_task(manifest(), FEDERATION, COHORT, min_active_threshold(k), 1.0);
    task.secagg.neighbours = k;
    seal(&mut task);
    task
}

/// A coordinator switching a merchant-level federation to shopper-unit rounds (a release
/// at q = 1, say, whose cohorts it differences) is refused: the merchant pins its unit.
#[tokio::test]
async fn a_switch_of_the_privacy_unit_is_refused() {
    let mut task = honest_task(1.0);
    (task.privacy.unit, task.privacy.shopper_sampling_rate) = (PrivacyUnit::Shopper, 0.05);
    seal(&mut task);
    assert_refused(&attack(task, options()).await, "takes part in merchant-unit rounds only");
}

/// Attack 3: each client adds σ²/min_survivors; min_survivors above the threshold lets a
/// round complete with a fraction of the noise.
#[tokio::test]
async fn a_task_that_cuts_every_clients_noise_share_is_refused() {
    let mut task = honest_task(1.0);
    task.privacy.min_survivors = 10_000;
    seal(&mut task);
    assert_refused(&attack(task, options()).await, "min_survivors 10000 is above the threshold");
}

/// Colluding survivors who add no noise (or reveal theirs) leave a merchant only the honest
/// survivors' shares. A task that spreads σ² over all t survivors (tolerating no colluders)
/// would let the merchant's floor of 3 colluders take its ε to ~(t − 1)/(t − 4) times the
/// charge: refused. (That the charge of a tolerating task covers such colluders is tested
/// on the ledger's cost function, `cost::tests::colluders_who_withhold_their_noise_stay_within_the_charged_cost`.)
#[tokio::test]
async fn a_task_that_does_not_tolerate_the_merchants_colluders_is_refused() {
    let mut task = honest_task(1.0);
    assert_eq!(task.privacy.tolerated_colluders, guild_privacy::cost::DEFAULT_TOLERATED_COLLUDERS);
    task.privacy.tolerated_colluders = 0;
    seal(&mut task);
    assert_refused(
        &attack(task, options()).await,
        "tolerates 0 colluding survivors, below this merchant's minimum of 3",
    );
}

/// Attack 3, the plain form: less noise than the merchant's floor.
#[tokio::test]
async fn noise_below_the_merchants_floor_is_refused() {
    let mut task = honest_task(1.0);
    task.privacy.noise_multiplier = 0.1;
    seal(&mut task);
    assert_refused(&attack(task, options()).await, "below this merchant's minimum 0.5");
}

/// Attack 4: a task whose parameters differ from what the digest (and so every other
/// client's signatures) commits to.
#[tokio::test]
async fn a_task_unlike_the_one_shown_to_the_others_is_refused() {
    let mut task = honest_task(1.0);
    task.training.learning_rate *= 10.0;
    assert_refused(&attack(task, options()).await, "digest does not match");
}

/// Attack 5: a round that would take the merchant past its own ε against the coordinator.
#[tokio::test]
async fn a_round_past_the_merchants_own_epsilon_cap_is_refused() {
    let options = ParticipantOptions { max_epsilon: 0.5, delta: 1e-6, ..options() };
    assert_refused(&attack(honest_task(1.0), options).await, "past its cap of 0.5");
}

/// Attack 8's cousin: a mode in which clients send un-noised updates.
#[tokio::test]
async fn a_mode_without_client_noise_is_refused_unless_opted_in() {
    for mode in [PrivacyMode::Central, PrivacyMode::DangerousNone] {
        let mut task = honest_task(1.0);
        task.privacy.mode = mode;
        // A well-formed task of that mode: without noise the encoding is not padded (else the
        // wire would refuse the task before the client's own vetting could).
        task.secagg.vector_length = guild_privacy::dp::encoded_length(mode, task.summed().len()) as u32;
        seal(&mut task);
        assert_refused(&attack(task, options()).await, "set dangerous_send_unnoised_updates");
    }
}

/// Attack 9: the coordinator puts a signing key of its own in a real merchant's place (to
/// impersonate it towards the victim in the key agreement).
#[tokio::test]
async fn a_substituted_cohort_key_is_refused() {
    let mut task = honest_task(1.0);
    task.cohort
        .insert(ClientIndex::new(2).expect("1-based"), Identity::ephemeral().expect("key").public_key());
    seal(&mut task);
    assert_refused(&attack(task, options()).await, "not the one its certificate binds");
}

/// Attack 9: a sybil member with a certificate the federation's CA did not issue.
#[tokio::test]
async fn a_sybil_member_without_the_cas_certificate_is_refused() {
    let other = guild_proto::pki::issue(1).expect("another CA");
    let sybil = Identity::from_pkcs8(&other.merchants[0].signing_pkcs8).expect("identity");
    let mut task = honest_task(1.0);
    let second = ClientIndex::new(2).expect("1-based");
    task.cohort.insert(second, sybil.public_key());
    task.certificates.insert(second, other.merchants[0].cert_der.clone());
    seal(&mut task);
    assert_refused(&attack(task, options()).await, "does not verify under the federation's CA key");
}

/// A merchant that refuses a task does not poll it again and again: the coordinator keeps
/// offering the open round's task, and the merchant waits it out (a refusal storm would trip
/// the coordinator's rate limit and, before, took every merchant down). Without the memory
/// of the refused task, this client refuses it hundreds of times in three seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_task_is_waited_out_not_polled_in_a_storm() {
    let mut task = honest_task(1.0);
    task.secagg.threshold = 2;
    seal(&mut task);
    let calls = Arc::new(Mutex::new(Calls::default()));
    let service = Scripted {
        task: Mutex::new(Some(task)),
        repeat: true,
        rate_limited: 0,
        adapter: Vec::new(),
        calls: calls.clone(),
    };
    let (address, server) = serve(service).await;
    let mut participant =
        merchant(address, ParticipantOptions { poll: Duration::from_secs(1), ..options() }).await;
    let mut refusals = 0u32;
    let ran = tokio::time::timeout(
        Duration::from_secs(3),
        participant.run(|round| {
            if matches!(round, Err(ParticipantError::Refused(_))) {
                refusals += 1;
            }
        }),
    )
    .await;
    assert!(ran.is_err(), "the client keeps running: {ran:?}");
    server.abort();
    let calls = std::mem::take(&mut *calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    assert_eq!(refusals, 1, "the same task refused again: {calls:?}");
    // One poll a second while the refused task stays open (and the first).
    assert!(calls.tasks <= 5, "{calls:?}");
    assert_eq!((calls.downloads, calls.sent), (0, 0), "{calls:?}");
}

/// The coordinator's rate limit is a back-off, not an exit: a client whose first polls are
/// refused with `ResourceExhausted` retries and takes the task when the limit lets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limiting_is_a_back_off_not_an_exit() {
    let outcome = one_round(honest_task(1.0), 3, options()).await;
    let reason = outcome.result.expect_err("the scripted coordinator serves no adapter");
    assert!(reason.starts_with("not a refusal"), "{reason}");
    // Three refused polls, then the one that took the task; the client may poll once more
    // (for the next round) before the harness stops it, so the count is a lower bound. An
    // exit on the rate limit would download nothing.
    assert!(outcome.calls.tasks >= 4, "{:?}", outcome.calls);
    assert_eq!(outcome.calls.downloads, 1, "{:?}", outcome.calls);
}

/// Complaints as a weapon: two colluding merchants accuse every other cohort member of
/// sealing shares that do not open. A complaint cannot be checked (the shares are sealed
/// under the pair's key), but an honest merchant accuses at most the k − t neighbours a round
/// can survive without: the two liars, past that bound, are quarantined themselves, their
/// complaints are not counted, and no honest merchant is quarantined; the honest six go on
/// to commit a round without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_complaint_quarantines_the_accusers_and_no_honest_merchant() {
    use super::harness::{eight_merchants, spawn_eight};
    use guild_client::participant::Faults;
    let dir = tempfile::tempdir().expect("tempdir");
    // Eight merchants, seven share holders each, t = 5: at most 2 accusations each.
    let federation = eight_merchants(dir.path(), 0, 6).await;
    let liars = [6, 7];
    let clients = spawn_eight(&federation, |i| {
        (Faults { false_complaints: liars.contains(&i), ..Faults::default() }, 0)
    })
    .await;
    let store = federation.store().expect("store");
    let started = std::time::Instant::now();
    loop {
        let quarantined = store.quarantined().expect("quarantine");
        if quarantined.len() >= 2 && store.round_counts().expect("counts").completed >= 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "quarantined {quarantined:?}, rounds {:?}",
            store.round_counts()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for client in clients {
        client.abort();
    }
    let mut quarantined: Vec<String> =
        store.quarantined().expect("quarantine").into_iter().map(|q| q.merchant_id).collect();
    quarantined.sort();
    let mut expected: Vec<String> = liars.iter().map(|&i| federation.pki.merchants[i].name.clone()).collect();
    expected.sort();
    assert_eq!(quarantined, expected, "only the accusers are quarantined");
    for q in store.quarantined().expect("quarantine") {
        // (k − t is 2 in a cohort of all eight; a round that opened without one of them has
        // a smaller bound.)
        assert!(q.reason.contains("a round can survive (k − t)"), "{}", q.reason);
    }
}

/// The adapter a tampering coordinator (or anything on the path) streams, in chunks of
/// `chunk` bytes, each naming `version`, `total` bytes and hash `sha`.
fn chunks(version: u64, bytes: &[u8], chunk: usize, total: u64, sha: [u8; 32]) -> Vec<v1::AdapterChunk> {
    bytes
        .chunks(chunk)
        .enumerate()
        .map(|(i, data)| v1::AdapterChunk {
            version,
            offset: (i * chunk) as u64,
            total_bytes: total,
            sha256: sha.to_vec(),
            data: data.to_vec(),
        })
        .collect()
}

/// Merchant-001's real connection downloads version 7 of the adapter from a coordinator
/// that streams `adapter`.
async fn download(adapter: Vec<v1::AdapterChunk>) -> Result<(Vec<u8>, [u8; 32]), String> {
    let calls = Arc::new(Mutex::new(Calls::default()));
    let service = Scripted { task: Mutex::new(None), repeat: false, rate_limited: 0, adapter, calls };
    let (address, server) = serve(service).await;
    let downloaded = connection(address).await.download_adapter(7).await.map_err(|e| e.to_string());
    server.abort();
    downloaded
}

/// The reason a download was refused; `what` names the tampering when it went through.
fn refusal(downloaded: Result<(Vec<u8>, [u8; 32]), String>, what: &str) -> String {
    match downloaded {
        Ok((bytes, _)) => panic!("{what}: {} bytes accepted", bytes.len()),
        Err(reason) => reason,
    }
}

/// Every version a merchant trains from or serves arrives through
/// `Connection::download_adapter`, whose only check of the bytes against what the coordinator
/// committed is the SHA-256 each chunk names (the store's hash of the version). A coordinator
/// that streams other bytes under the committed hash (a flipped value, a substituted
/// adapter) is refused by name, as are chunks that disagree, overlap, leave a gap or stop
/// short; an honest stream of the same bytes arrives whole (the control).
#[tokio::test]
async fn an_adapter_whose_bytes_do_not_match_its_hash_is_refused() {
    let adapter: Vec<u8> = (0..10_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let sha = guild_proto::adapter::sha256(&adapter);
    let total = adapter.len() as u64;

    let (bytes, hash) = download(chunks(7, &adapter, 4096, total, sha)).await.expect("the honest stream");
    assert_eq!((bytes, hash), (adapter.clone(), sha));

    let mut tampered = adapter.clone();
    tampered[5_000] ^= 1;
    let refused = refusal(download(chunks(7, &tampered, 4096, total, sha)).await, "a flipped bit");
    assert!(refused.contains("sha256 mismatch"), "{refused}");

    // Another adapter of the same length, streamed under the committed version's hash.
    let substituted: Vec<u8> = adapter.iter().rev().copied().collect();
    let refused = refusal(download(chunks(7, &substituted, 4096, total, sha)).await, "substituted");
    assert!(refused.contains("sha256 mismatch"), "{refused}");

    let mut other_hash = chunks(7, &adapter, 4096, total, sha);
    other_hash[1].sha256 = guild_proto::adapter::sha256(&tampered).to_vec();
    let refused = refusal(download(other_hash).await, "chunks naming two hashes");
    assert!(refused.contains("disagree"), "{refused}");

    let refused = refusal(download(chunks(8, &adapter, 4096, total, sha)).await, "another version");
    assert!(refused.contains("disagree"), "{refused}");

    let mut gap = chunks(7, &adapter, 4096, total, sha);
    gap.remove(1);
    let refused = refusal(download(gap).await, "a missing middle chunk");
    assert!(refused.contains("chunk at 8192 where 4096 was expected"), "{refused}");

    let mut short = chunks(7, &adapter, 4096, total, sha);
    short.pop();
    let refused = refusal(download(short).await, "the last chunk withheld");
    assert!(refused.contains("8192 of 10000 bytes arrived"), "{refused}");

    let mut bad_hash = chunks(7, &adapter, 4096, total, sha);
    bad_hash.iter_mut().for_each(|c| c.sha256.truncate(31));
    let refused = refusal(download(bad_hash).await, "a 31-byte hash");
    assert!(refused.contains("AdapterChunk.sha256"), "{refused}");
}
