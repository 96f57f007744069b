//! Building blocks of the simulation harness: an in-process coordinator on a loopback
//! port that real clients talk to over gRPC.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use guild_coordinator::service::{CoordinatorCore, CoordinatorService};
use guild_coordinator::store::Store;
use tokio::task::JoinHandle;

/// sha256 of all-MiniLM-L6-v2's `model.safetensors`, the federation's base model.
pub const BASE_MODEL_SHA256: [u8; 32] = [
    0x53, 0xaa, 0x51, 0x17, 0x2d, 0x14, 0x2c, 0x89, 0xd9, 0x01, 0x2c, 0xce, 0x15, 0xae, 0x4d, 0x6c, 0xc0,
    0xca, 0x68, 0x95, 0x89, 0x5a, 0x11, 0x43, 0x79, 0xca, 0xcb, 0x4f, 0xab, 0x12, 0x8d, 0x9d,
];

/// A coordinator serving on an ephemeral loopback port until dropped.
#[derive(Debug)]
pub struct LoopbackCoordinator {
    pub address: SocketAddr,
    pub core: Arc<CoordinatorCore>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl LoopbackCoordinator {
    pub async fn start(store_path: &Path) -> anyhow::Result<Self> {
        let core = Arc::new(CoordinatorCore::new(Store::open(store_path)?, BASE_MODEL_SHA256)?);
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
