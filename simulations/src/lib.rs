//! Building blocks of the simulation harness: an in-process coordinator on a loopback
//! port that real clients talk to over gRPC.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use guild_coordinator::service::{CoordinatorCore, CoordinatorService};
use guild_coordinator::store::Store;
use tokio::task::JoinHandle;

/// sha256 of all-MiniLM-L6-v2's `model.safetensors`, the federation's base model.
pub fn base_model_sha256() -> [u8; 32] {
    let bytes = hex::decode(guild_client::model::MINILM_SHA256).expect("the constant is hex");
    bytes.try_into().expect("the constant is 32 bytes")
}

/// A coordinator serving on an ephemeral loopback port until dropped.
#[derive(Debug)]
pub struct LoopbackCoordinator {
    pub address: SocketAddr,
    pub core: Arc<CoordinatorCore>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl LoopbackCoordinator {
    pub async fn start(store_path: &Path) -> anyhow::Result<Self> {
        let core = Arc::new(CoordinatorCore::new(Store::open(store_path)?, base_model_sha256())?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let service = CoordinatorService::new(core.clone())
            .into_server(guild_proto::limits::max_message_bytes(1 << 20, 1000));
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Ok(Self { address, core, server })
    }

    pub fn uri(&self) -> String {
        format!("http://{}", self.address)
    }
}

impl Drop for LoopbackCoordinator {
    fn drop(&mut self) {
        self.server.abort();
    }
}
