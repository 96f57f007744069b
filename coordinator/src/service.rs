//! The gRPC service. Handlers are thin: convert the request into a domain type (which
//! validates it), call the core, convert the answer back, and map errors to gRPC codes.

use std::sync::Arc;
use std::time::Duration;

use guild_proto::domain::{MerchantId, Registered, Registration, StatusReport, Task, TaskPoll};
use guild_proto::v1;
use guild_proto::v1::coordinator_server::Coordinator;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::store::{MerchantRecord, Store, StoreError};

/// Shared state behind every handler.
#[derive(Debug)]
pub struct CoordinatorCore {
    store: Store,
    federation_id: [u8; 16],
    base_model_sha256: [u8; 32],
}

impl CoordinatorCore {
    pub fn new(store: Store, base_model_sha256: [u8; 32]) -> Result<Self, StoreError> {
        let federation_id = store.federation(base_model_sha256, rand::random())?;
        Ok(Self { store, federation_id, base_model_sha256 })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn federation_id(&self) -> [u8; 16] {
        self.federation_id
    }

    /// Until mutual TLS binds a merchant to its certificate, a merchant is named by its
    /// long-term signing key, which every SecAgg+ message it sends must verify under.
    fn register(&self, registration: Registration) -> Result<Registered, StoreError> {
        let merchant_id = format!("m-{}", hex::encode(&registration.signing_public_key[..8]));
        self.store.upsert_merchant(&MerchantRecord {
            merchant_id: merchant_id.clone(),
            display_name: registration.display_name,
            signing_public_key: registration.signing_public_key,
        })?;
        tracing::info!(%merchant_id, "merchant registered");
        Ok(Registered {
            merchant_id: MerchantId::parse(&merchant_id).expect("hex ids are valid merchant ids"),
            federation_id: self.federation_id,
            base_model_sha256: self.base_model_sha256,
        })
    }

    fn status(&self) -> Result<StatusReport, StoreError> {
        Ok(StatusReport {
            federation_id: self.federation_id,
            registered_merchants: self.store.merchant_count()?,
            rounds_completed: 0,
            rounds_aborted: 0,
            latest_adapter_version: 0,
            epsilon_spent: 0.0,
            delta: 0.0,
            current_phase: "idle".into(),
        })
    }
}

/// The one table from core errors to gRPC status codes.
fn to_status(error: StoreError) -> Status {
    tracing::error!(%error, "store error");
    Status::internal("the coordinator's store failed; the request changed nothing")
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

    /// The tonic server for this service, with explicit message-size limits.
    pub fn into_server(self, max_message_bytes: usize) -> v1::coordinator_server::CoordinatorServer<Self> {
        v1::coordinator_server::CoordinatorServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }
}

const ROUNDS_NOT_ENABLED: &str = "this coordinator does not run training rounds yet";

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let registration = Registration::try_from(request.into_inner())?;
        let registered = self.core.register(registration).map_err(to_status)?;
        Ok(Response::new(registered.into()))
    }

    async fn get_task(
        &self,
        request: Request<v1::GetTaskRequest>,
    ) -> Result<Response<v1::GetTaskResponse>, Status> {
        let poll = TaskPoll::try_from(request.into_inner())?;
        if !self.core.store.is_registered(poll.merchant_id.as_str()).map_err(to_status)? {
            return Err(Status::not_found(format!("merchant {} is not registered", poll.merchant_id)));
        }
        let task = Task::Wait { retry_after: Duration::from_secs(5), reason: "no round is open".into() };
        Ok(Response::new(task.into()))
    }

    async fn advertise_keys(
        &self,
        _: Request<v1::AdvertiseKeysRequest>,
    ) -> Result<Response<v1::AdvertiseKeysResponse>, Status> {
        Err(Status::failed_precondition(ROUNDS_NOT_ENABLED))
    }

    async fn share_keys(
        &self,
        _: Request<v1::ShareKeysRequest>,
    ) -> Result<Response<v1::ShareKeysResponse>, Status> {
        Err(Status::failed_precondition(ROUNDS_NOT_ENABLED))
    }

    async fn masked_input(
        &self,
        _: Request<v1::MaskedInputRequest>,
    ) -> Result<Response<v1::MaskedInputResponse>, Status> {
        Err(Status::failed_precondition(ROUNDS_NOT_ENABLED))
    }

    async fn consistency_check(
        &self,
        _: Request<v1::ConsistencyCheckRequest>,
    ) -> Result<Response<v1::ConsistencyCheckResponse>, Status> {
        Err(Status::failed_precondition(ROUNDS_NOT_ENABLED))
    }

    async fn unmask(&self, _: Request<v1::UnmaskRequest>) -> Result<Response<v1::UnmaskResponse>, Status> {
        Err(Status::failed_precondition(ROUNDS_NOT_ENABLED))
    }

    type DownloadAdapterStream = ReceiverStream<Result<v1::AdapterChunk, Status>>;

    async fn download_adapter(
        &self,
        request: Request<v1::DownloadAdapterRequest>,
    ) -> Result<Response<Self::DownloadAdapterStream>, Status> {
        let version = request.into_inner().version;
        Err(Status::not_found(format!("adapter version {version} does not exist")))
    }

    async fn report_metrics(
        &self,
        _: Request<v1::ReportMetricsRequest>,
    ) -> Result<Response<v1::ReportMetricsResponse>, Status> {
        Err(Status::failed_precondition(ROUNDS_NOT_ENABLED))
    }

    async fn status(&self, _: Request<v1::StatusRequest>) -> Result<Response<v1::StatusResponse>, Status> {
        Ok(Response::new(self.core.status().map_err(to_status)?.into()))
    }
}
