//! The gRPC service. Handlers are thin: authenticate the caller by its TLS certificate,
//! convert the request into a domain type (which validates it), call the engine or the
//! store, convert the answer back, and map errors to gRPC codes. Nothing here panics on
//! network input, and a refused message changes no state.

use std::sync::Arc;
use std::time::Duration;

use guild_privacy::secagg::Phase;
use guild_proto::WireMessage as Message;
use guild_proto::convert;
use guild_proto::domain::{
    AdapterChunk, MerchantId, MetricsReport, Registered, Registration, StatusReport, Task, TaskPoll,
};
use guild_proto::limits::ADAPTER_CHUNK_BYTES;
use guild_proto::v1;
use guild_proto::v1::coordinator_server::Coordinator;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::InterceptedService;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, EngineError, Outcome, PhaseMessage, PhaseOutput};
use crate::store::{MerchantRecord, Store, StoreError};
use guild_proto::pki::fingerprint;

/// Shared state behind every handler.
#[derive(Debug)]
pub struct CoordinatorCore {
    store: Arc<Store>,
    engine: Arc<Engine>,
    federation_id: [u8; 16],
    base_model_sha256: [u8; 32],
}

impl CoordinatorCore {
    pub fn new(
        store: Arc<Store>,
        engine: Arc<Engine>,
        federation_id: [u8; 16],
        base_model_sha256: [u8; 32],
    ) -> Self {
        Self { store, engine, federation_id, base_model_sha256 }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn federation_id(&self) -> [u8; 16] {
        self.federation_id
    }

    /// Records the merchant's signing key and certificate under the identity its certificate
    /// proved. The caller has checked that the certificate binds that key.
    pub fn register(
        &self,
        merchant_id: &str,
        registration: Registration,
        certificate: Vec<u8>,
    ) -> Result<Registered, StoreError> {
        self.store.upsert_merchant(&MerchantRecord {
            merchant_id: merchant_id.to_owned(),
            display_name: registration.display_name,
            signing_public_key: registration.signing_public_key,
            certificate,
        })?;
        tracing::info!(%merchant_id, "merchant registered");
        self.engine.poke();
        Ok(Registered {
            merchant_id: MerchantId::parse(merchant_id).ok_or_else(|| StoreError::Corrupt {
                what: "merchant id",
                reason: format!("{merchant_id:?} is not a valid id"),
            })?,
            federation_id: self.federation_id,
            base_model_sha256: self.base_model_sha256,
        })
    }

    pub fn status(&self) -> Result<StatusReport, StoreError> {
        let status = self.engine.status();
        Ok(StatusReport {
            federation_id: self.federation_id,
            registered_merchants: self.store.merchant_count()?,
            rounds_completed: status.rounds_completed,
            rounds_aborted: status.rounds_aborted,
            latest_adapter_version: status.latest_adapter_version,
            epsilon_spent: if status.epsilon_spent.is_finite() { status.epsilon_spent } else { f64::MAX },
            delta: status.delta,
            current_phase: status.phase,
            shopper_epsilon_spent: if status.shopper_epsilon_spent.is_finite() {
                status.shopper_epsilon_spent
            } else {
                f64::MAX
            },
            manifest: Some(self.engine.manifest().clone()),
            training_from_version: self.engine.training_from_version(),
        })
    }
}

fn store_status(error: StoreError) -> Status {
    tracing::error!(%error, "store error");
    Status::internal("the coordinator's store failed; the request changed nothing")
}

fn engine_status(error: EngineError) -> Status {
    let message = error.to_string();
    match error {
        EngineError::NoRound | EngineError::WrongRound { .. } | EngineError::WrongPhase { .. } => {
            Status::failed_precondition(message)
        }
        EngineError::NotInCohort(_) => Status::permission_denied(message),
        EngineError::Rejected(_) => Status::invalid_argument(message),
        EngineError::Aborted { .. } => Status::aborted(message),
        EngineError::Store(e) => store_status(e),
        EngineError::Shutdown => Status::unavailable(message),
    }
}

/// The DER of the client certificate that made `request`.
fn client_certificate<T>(request: &Request<T>) -> Result<Vec<u8>, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required (mutual TLS)"))?;
    let leaf =
        certs.first().ok_or_else(|| Status::unauthenticated("the TLS session carries no certificate"))?;
    Ok(leaf.as_ref().to_vec())
}

/// The merchant whose client certificate made `request`, if the allow-list has it and it
/// is not revoked.
fn allowed_merchant<T>(store: &Store, request: &Request<T>) -> Result<String, Status> {
    let sha = fingerprint(&client_certificate(request)?);
    match store.certificate_owner(&sha).map_err(store_status)? {
        Some((merchant, false)) => Ok(merchant),
        Some((merchant, true)) => {
            Err(Status::permission_denied(format!("the certificate of {merchant} has been revoked")))
        }
        None => Err(Status::permission_denied(format!(
            "certificate {} is not on this federation's allow-list",
            hex::encode(&sha[..8])
        ))),
    }
}

/// Checks the caller's certificate against the allow-list from the request's headers,
/// before tonic reads and decodes its body: an unknown or revoked certificate holder (which
/// the CA once signed, so TLS lets it in) gets a refusal for every request and makes the
/// coordinator decode nothing it sends.
///
/// It also holds each merchant to a request rate across all its connections (a token
/// bucket: `server.requests_per_second_per_merchant` sustained, `request_burst_per_merchant`
/// at once): a flooding merchant's excess is refused here, from its headers, at the cost of
/// one allow-list lookup.
#[derive(Clone)]
pub struct AllowListGate {
    store: Arc<Store>,
    limiter: Arc<governor::DefaultKeyedRateLimiter<String>>,
    rate_limited: prometheus_client::metrics::counter::Counter,
}

impl std::fmt::Debug for AllowListGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllowListGate").finish_non_exhaustive()
    }
}

impl AllowListGate {
    pub fn new(
        store: Arc<Store>,
        config: &crate::config::ServerConfig,
        metrics: &crate::metrics::Metrics,
    ) -> Self {
        let rate = std::num::NonZeroU32::new(config.requests_per_second_per_merchant)
            .unwrap_or(std::num::NonZeroU32::MIN);
        let burst =
            std::num::NonZeroU32::new(config.request_burst_per_merchant).unwrap_or(std::num::NonZeroU32::MIN);
        let quota = governor::Quota::per_second(rate).allow_burst(burst);
        Self {
            store,
            limiter: Arc::new(governor::RateLimiter::keyed(quota)),
            rate_limited: metrics.rate_limited.clone(),
        }
    }
}

impl tonic::service::Interceptor for AllowListGate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let merchant = allowed_merchant(&self.store, &request)?;
        if self.limiter.check_key(&merchant).is_err() {
            self.rate_limited.inc();
            return Err(Status::resource_exhausted(format!(
                "merchant {merchant} is over its request rate; retry later"
            )));
        }
        Ok(request)
    }
}

/// The tonic service wrapping [`CoordinatorCore`].
#[derive(Clone, Debug)]
pub struct CoordinatorService {
    core: Arc<CoordinatorCore>,
}

impl CoordinatorService {
    pub fn new(core: Arc<CoordinatorCore>) -> Self {
        Self { core }
    }

    /// The tonic server for this service, with explicit message-size limits, behind the
    /// allow-list gate: a caller whose certificate is unknown or revoked is refused from the
    /// request's headers, before its message is read or decoded.
    pub fn into_server(
        self,
        max_message_bytes: usize,
        limits: &crate::config::ServerConfig,
    ) -> InterceptedService<v1::coordinator_server::CoordinatorServer<Self>, AllowListGate> {
        let gate = AllowListGate::new(self.core.store.clone(), limits, &self.core.engine.metrics);
        let server = v1::coordinator_server::CoordinatorServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        InterceptedService::new(server, gate)
    }

    /// The merchant the caller's client certificate belongs to. TLS already checked that
    /// the CA signed it; here the allow-list decides (as [`AllowListGate`] did before the
    /// message was decoded).
    fn caller<T>(&self, request: &Request<T>) -> Result<String, Status> {
        allowed_merchant(&self.core.store, request)
    }

    /// Authenticates, validates and hands a phase message to the engine, then waits for
    /// the phase to close.
    async fn phase<T: Message>(
        &self,
        request: Request<T>,
        phase: Phase,
        convert: impl FnOnce(T) -> Result<PhaseMessage, guild_proto::WireError>,
    ) -> Result<(String, PhaseOutput), Status> {
        let rpc = phase.name();
        let merchant = self.caller(&request)?;
        let message = request.into_inner();
        let metrics = &self.core.engine.metrics;
        metrics.received(rpc, message.encoded_len());
        let refused = |status: Status| {
            metrics.rejected(rpc);
            tracing::info!(%merchant, rpc, reason = status.message(), "message refused");
            status
        };
        let message = convert(message).map_err(|e| refused(e.into()))?;
        let (round, phase) =
            self.core.engine.receive(&merchant, message).map_err(|e| refused(engine_status(e)))?;
        let output = self.core.engine.wait_phase(&merchant, round, phase).await.map_err(engine_status)?;
        Ok((merchant, output))
    }
}

fn unexpected(output: &PhaseOutput) -> Status {
    Status::internal(format!("the coordinator produced {output:?} out of order"))
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let merchant = self.caller(&request)?;
        let certificate = client_certificate(&request)?;
        let registration = Registration::try_from(request.into_inner())?;
        // The signing key must be the one the merchant's certificate binds: clients check
        // every cohort member's key against its certificate, so no other key could sign.
        match guild_proto::certificate::bound_signing_key(&certificate) {
            Ok(key) if key == registration.signing_public_key => {}
            Ok(_) => {
                return Err(Status::permission_denied(format!(
                    "{merchant}: the signing key differs from the one its certificate binds"
                )));
            }
            Err(e) => {
                return Err(Status::failed_precondition(format!(
                    "{merchant}: the client certificate {e}; issue it from a CSR made by `guild-client keygen`"
                )));
            }
        }
        let registered = self.core.register(&merchant, registration, certificate).map_err(store_status)?;
        Ok(Response::new(registered.into()))
    }

    async fn get_task(
        &self,
        request: Request<v1::GetTaskRequest>,
    ) -> Result<Response<v1::GetTaskResponse>, Status> {
        let merchant = self.caller(&request)?;
        let poll = TaskPoll::try_from(request.into_inner())?;
        if poll.merchant_id.as_str() != merchant {
            return Err(Status::permission_denied(format!(
                "the certificate belongs to {merchant}, not {}",
                poll.merchant_id
            )));
        }
        if !self.core.store.is_registered(&merchant).map_err(store_status)? {
            return Err(Status::not_found(format!("merchant {merchant} is not registered")));
        }
        let task = match self.core.engine.task_for(&merchant, poll.wait).await {
            Ok(task) => Task::Round(Box::new(task)),
            Err(reason) => Task::Wait { retry_after: Duration::from_millis(200), reason },
        };
        Ok(Response::new(task.into()))
    }

    async fn advertise_keys(
        &self,
        request: Request<v1::AdvertiseKeysRequest>,
    ) -> Result<Response<v1::AdvertiseKeysResponse>, Status> {
        match self.phase(request, Phase::AdvertiseKeys, |m| m.try_into().map(PhaseMessage::Keys)).await? {
            (_, PhaseOutput::Roster(roster)) => Ok(Response::new(convert::roster_to_wire(roster))),
            (_, other) => Err(unexpected(&other)),
        }
    }

    async fn share_keys(
        &self,
        request: Request<v1::ShareKeysRequest>,
    ) -> Result<Response<v1::ShareKeysResponse>, Status> {
        match self.phase(request, Phase::ShareKeys, |m| m.try_into().map(PhaseMessage::Shares)).await? {
            (_, PhaseOutput::Inbox(inbox)) => Ok(Response::new(convert::inbox_to_wire(inbox))),
            (_, other) => Err(unexpected(&other)),
        }
    }

    async fn masked_input(
        &self,
        request: Request<v1::MaskedInputRequest>,
    ) -> Result<Response<v1::MaskedInputResponse>, Status> {
        match self.phase(request, Phase::MaskedInput, |m| m.try_into().map(PhaseMessage::Input)).await? {
            (_, PhaseOutput::Survivors(survivors)) => {
                Ok(Response::new(convert::survivors_to_wire(&survivors)))
            }
            (_, other) => Err(unexpected(&other)),
        }
    }

    async fn consistency_check(
        &self,
        request: Request<v1::ConsistencyCheckRequest>,
    ) -> Result<Response<v1::ConsistencyCheckResponse>, Status> {
        match self
            .phase(request, Phase::ConsistencyCheck, |m| m.try_into().map(PhaseMessage::Consistency))
            .await?
        {
            (_, PhaseOutput::Signatures(signatures)) => {
                Ok(Response::new(convert::signatures_to_wire(signatures)))
            }
            (_, other) => Err(unexpected(&other)),
        }
    }

    async fn unmask(
        &self,
        request: Request<v1::UnmaskRequest>,
    ) -> Result<Response<v1::UnmaskResponse>, Status> {
        match self.phase(request, Phase::Unmask, |m| m.try_into().map(PhaseMessage::Unmask)).await? {
            (_, PhaseOutput::Finished(Outcome::Committed { .. })) => {
                Ok(Response::new(v1::UnmaskResponse { accepted: true }))
            }
            (_, PhaseOutput::Finished(Outcome::Aborted { .. })) => {
                Ok(Response::new(v1::UnmaskResponse { accepted: false }))
            }
            (_, other) => Err(unexpected(&other)),
        }
    }

    type DownloadAdapterStream = ReceiverStream<Result<v1::AdapterChunk, Status>>;

    async fn download_adapter(
        &self,
        request: Request<v1::DownloadAdapterRequest>,
    ) -> Result<Response<Self::DownloadAdapterStream>, Status> {
        self.caller(&request)?;
        let version = request.into_inner().version;
        let latest = self.core.engine.latest_adapter();
        let (sha256, bytes) = if latest.version == version {
            (latest.sha256, latest.bytes.clone())
        } else {
            match self.core.store.adapter(version) {
                Ok(record) => (record.sha256, record.data),
                Err(StoreError::NoSuchAdapter(v)) => {
                    return Err(Status::not_found(format!("adapter version {v} does not exist")));
                }
                Err(e) => return Err(store_status(e)),
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let total_bytes = bytes.len() as u64;
            for (i, chunk) in bytes.chunks(ADAPTER_CHUNK_BYTES).enumerate() {
                let chunk = AdapterChunk {
                    version,
                    offset: (i * ADAPTER_CHUNK_BYTES) as u64,
                    total_bytes,
                    sha256,
                    data: chunk.to_vec(),
                };
                if tx.send(Ok(chunk.into())).await.is_err() {
                    return; // the client went away
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_metrics(
        &self,
        request: Request<v1::ReportMetricsRequest>,
    ) -> Result<Response<v1::ReportMetricsResponse>, Status> {
        let merchant = self.caller(&request)?;
        let report = MetricsReport::try_from(request.into_inner())?;
        if report.merchant_id.as_str() != merchant {
            return Err(Status::permission_denied(format!(
                "the certificate belongs to {merchant}, not {}",
                report.merchant_id
            )));
        }
        self.core.store.record_evaluation(&report).map_err(store_status)?;
        Ok(Response::new(v1::ReportMetricsResponse {}))
    }

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        self.caller(&request)?;
        Ok(Response::new(self.core.status().map_err(store_status)?.into()))
    }
}
