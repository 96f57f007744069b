//! The client's connection to the coordinator.

use std::time::Duration;

use guild_proto::domain::{Registered, Registration};
use guild_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::{Channel, Endpoint};

use crate::identity::Identity;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("coordinator address {address:?} is not a valid URI: {reason}")]
    BadAddress { address: String, reason: String },
    #[error("cannot reach the coordinator at {address}: {source}")]
    Unreachable { address: String, source: tonic::transport::Error },
    #[error("the coordinator refused the request: {0}")]
    Refused(#[from] tonic::Status),
    #[error("the coordinator sent a malformed answer: {0}")]
    Malformed(#[from] guild_proto::WireError),
}

/// A connected client of the coordinator service.
#[derive(Clone, Debug)]
pub struct Connection {
    inner: CoordinatorClient<Channel>,
}

impl Connection {
    pub async fn connect(address: &str, max_message_bytes: usize) -> Result<Self, NetError> {
        let endpoint = Endpoint::from_shared(address.to_owned())
            .map_err(|e| NetError::BadAddress { address: address.to_owned(), reason: e.to_string() })?
            .connect_timeout(Duration::from_secs(10));
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| NetError::Unreachable { address: address.to_owned(), source })?;
        let inner = CoordinatorClient::new(channel)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        Ok(Self { inner })
    }

    pub async fn register(
        &mut self,
        display_name: &str,
        identity: &Identity,
    ) -> Result<Registered, NetError> {
        let request =
            Registration { display_name: display_name.to_owned(), signing_public_key: identity.public_key() };
        let response = self.inner.register(guild_proto::v1::RegisterRequest::from(request)).await?;
        Ok(Registered::try_from(response.into_inner())?)
    }
}
