//! The client's connection to the coordinator: mutual TLS with the merchant's certificate,
//! one method per RPC, and every answer validated into a domain type.

use std::path::Path;
use std::time::Duration;

use guild_privacy::secagg::message as sa;
use guild_proto::convert;
use guild_proto::domain::{
    AdapterChunk, MerchantId, MetricsReport, Registered, Registration, StatusReport, Task, TaskPoll,
};
use guild_proto::v1;
use guild_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::identity::Identity as SigningIdentity;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("coordinator address {address:?} is not a valid URI: {reason}")]
    BadAddress { address: String, reason: String },
    #[error("reading {path}: {source}")]
    Credentials { path: String, source: std::io::Error },
    #[error("{path} is not a usable {what}: {reason}")]
    BadCredentials { path: String, what: &'static str, reason: String },
    #[error("cannot reach the coordinator at {address}: {source}")]
    Unreachable { address: String, source: tonic::transport::Error },
    /// The TLS handshake failed for a reason retrying will not change (a certificate for
    /// another name, or signed by another CA): named, with what to do.
    #[error("TLS with the coordinator at {address} failed: {reason}")]
    Tls { address: String, reason: String },
    #[error("the coordinator refused the request: {}: {}", .0.code(), .0.message())]
    Refused(tonic::Status),
    /// The connection broke while a request was in flight (the coordinator restarted or went
    /// away, or the network dropped it): nothing was refused, and retrying can help.
    #[error("the connection to the coordinator broke during the request (is it restarting?): {0}")]
    Lost(String),
    /// The coordinator ended the TLS session over this merchant's certificate (TLS 1.3
    /// sends that refusal after the handshake, so the first request receives it).
    #[error("the coordinator refused this connection's TLS: {0}")]
    TlsRefused(String),
    #[error("the coordinator sent a malformed answer: {0}")]
    Malformed(#[from] guild_proto::WireError),
    #[error("the adapter download is inconsistent: {0}")]
    Download(String),
}

impl From<tonic::Status> for NetError {
    fn from(status: tonic::Status) -> Self {
        match tls_problem(&status, None) {
            Some(reason) if status.code() == tonic::Code::Unknown => NetError::TlsRefused(reason),
            _ => match connection_lost(&status) {
                Some(reason) => NetError::Lost(reason),
                None => NetError::Refused(status),
            },
        }
    }
}

/// What a status says about a connection that broke mid-request, `None` for an answer the
/// coordinator gave. Such a status is made on this side, not sent: tonic reports a broken
/// transport as `Unknown` or `Unavailable` with a transport error's text ("transport
/// error", "h2 protocol error: ..."), the coordinator's own refusals use other words.
fn connection_lost(status: &tonic::Status) -> Option<String> {
    if !matches!(status.code(), tonic::Code::Unknown | tonic::Code::Unavailable) {
        return None;
    }
    let mut chain = vec![status.message().to_string()];
    chain.extend(error_chain(std::error::Error::source(status)));
    let text = chain.join(": ");
    let lower = text.to_ascii_lowercase();
    const BROKEN: [&str; 6] = [
        "transport error",
        "h2 protocol error",
        "connection reset",
        "broken pipe",
        "connection closed",
        "error reading a body from connection",
    ];
    BROKEN.iter().any(|needle| lower.contains(needle)).then_some(text)
}

impl NetError {
    /// Whether retrying later can help (the coordinator is down or restarting, or limits
    /// this merchant's request rate), as opposed to a refusal that will not change.
    pub fn is_transient(&self) -> bool {
        match self {
            NetError::Unreachable { .. } | NetError::Lost(_) => true,
            NetError::Refused(status) => matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::ResourceExhausted
            ),
            _ => false,
        }
    }
}

/// `error` and each of its sources, in words, outermost first.
fn error_chain(error: Option<&(dyn std::error::Error + 'static)>) -> Vec<String> {
    std::iter::successors(error, |e| e.source()).map(ToString::to_string).collect()
}

/// What a failed connection's error chain says about TLS, in words a merchant can act on;
/// `None` when the failure is not a certificate problem (the coordinator is down, say).
fn tls_problem(error: &(dyn std::error::Error + 'static), host: Option<&str>) -> Option<String> {
    let host = host.unwrap_or("the coordinator's host");
    let text = error_chain(Some(error)).join(": ");
    let has = |needle: &str| text.to_ascii_lowercase().contains(&needle.to_ascii_lowercase());
    if has("NotValidForName") || has("not valid for name") {
        Some(format!(
            "the coordinator's certificate does not name {host:?}: connect by a name it covers (or set \
             tls.server_name to one), or have the operator issue one that covers it \
             (`guild-coordinator issue-server-cert --name {host}`) ({text})"
        ))
    } else if has("UnknownIssuer") || has("BadSignature") || has("unknown issuer") {
        Some(format!(
            "the coordinator's certificate is not signed by the federation's CA in tls.ca (another \
             federation, or the wrong ca.pem?) ({text})"
        ))
    } else if has("UnknownCA") || has("BadCertificate") || has("CertificateRequired") || has("DecryptError") {
        Some(format!(
            "the coordinator refused this merchant's certificate (tls.cert and tls.key): is it signed by the \
             federation's CA, and is the key the one it was issued for? ({text})"
        ))
    } else if has("InvalidContentType") || has("corrupt message") {
        Some(format!("the address does not answer TLS: is it the coordinator's gRPC port? ({text})"))
    } else if has("certificate") {
        Some(format!("the TLS handshake failed over a certificate ({text})"))
    } else {
        None
    }
}

/// PEM credentials of a merchant: the federation's CA, its certificate and key.
#[derive(Clone, Debug)]
pub struct TlsCredentials {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The name the coordinator's certificate must hold, when it is not the address's host
    /// (a coordinator reached by IP address, or through a proxy); `None`: the host.
    pub server_name: Option<String>,
}

impl TlsCredentials {
    /// Reads the three PEM files and checks that each holds what it should (a certificate,
    /// or a private key), so that a wrong file is named at start rather than surfacing as a
    /// failed TLS handshake.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, NetError> {
        let read = |p: &Path, what: &'static str, tag_ok: fn(&str) -> bool| {
            let bytes = std::fs::read(p)
                .map_err(|source| NetError::Credentials { path: p.display().to_string(), source })?;
            let bad =
                |reason: String| NetError::BadCredentials { path: p.display().to_string(), what, reason };
            let blocks = pem::parse_many(&bytes).map_err(|e| bad(format!("not PEM ({e})")))?;
            match blocks.first() {
                None => Err(bad("no PEM block found".into())),
                Some(b) if !tag_ok(b.tag()) => Err(bad(format!("found a PEM block of type {:?}", b.tag()))),
                Some(_) => Ok(bytes),
            }
        };
        let certificate = |tag: &str| tag == "CERTIFICATE";
        let private_key = |tag: &str| tag.ends_with("PRIVATE KEY");
        Ok(Self {
            ca_pem: read(ca, "CA certificate (PEM)", certificate)?,
            cert_pem: read(cert, "merchant certificate (PEM)", certificate)?,
            key_pem: read(key, "private key (PEM)", private_key)?,
            server_name: None,
        })
    }

    /// These credentials, checking the coordinator's certificate for `name` instead of the
    /// address's host (`None`: the host).
    pub fn with_server_name(mut self, name: Option<String>) -> Self {
        self.server_name = name;
        self
    }
}

/// A connected client of the coordinator service.
#[derive(Clone, Debug)]
pub struct Connection {
    inner: CoordinatorClient<Channel>,
    /// The federation's CA certificate (DER): cohort members' certificates must chain to it.
    federation_ca: std::sync::Arc<[u8]>,
}

fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

impl Connection {
    /// Connects over mutual TLS; the server must present a certificate signed by the
    /// federation's CA for the address's host (or `tls.server_name`, when set).
    pub async fn connect(
        address: &str,
        tls: &TlsCredentials,
        max_message_bytes: usize,
    ) -> Result<Self, NetError> {
        let bad = |reason: String| NetError::BadAddress { address: address.to_owned(), reason };
        let federation_ca: std::sync::Arc<[u8]> =
            guild_proto::certificate::first_pem_certificate(&tls.ca_pem)
                .map_err(|e| bad(format!("the federation's CA certificate: {e}")))?
                .into();
        let uri = address.parse::<tonic::transport::Uri>().map_err(|e| bad(e.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad(
                "it must start with https:// (the coordinator speaks only mutual TLS), e.g. https://coordinator.example:50051"
                    .into(),
            ));
        }
        let host = match &tls.server_name {
            Some(name) => name.clone(),
            None => uri.host().unwrap_or("localhost").trim_matches(|c| c == '[' || c == ']').to_owned(),
        };
        let tls_config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&tls.ca_pem))
            .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
            .domain_name(host.clone());
        let endpoint = Endpoint::from_shared(address.to_owned())
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls_config)
            .map_err(|source| NetError::Unreachable { address: address.to_owned(), source })?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect().await.map_err(|source| match tls_problem(&source, Some(&host)) {
            Some(reason) => NetError::Tls { address: address.to_owned(), reason },
            None => NetError::Unreachable { address: address.to_owned(), source },
        })?;
        let inner = CoordinatorClient::new(channel)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        Ok(Self { inner, federation_ca })
    }

    /// The federation's CA certificate (DER) this connection trusts.
    pub fn federation_ca(&self) -> &[u8] {
        &self.federation_ca
    }

    /// The raw gRPC stub, for tests that send hand-made messages.
    pub fn raw(&self) -> CoordinatorClient<Channel> {
        self.inner.clone()
    }

    pub async fn register(
        &mut self,
        display_name: &str,
        identity: &SigningIdentity,
    ) -> Result<Registered, NetError> {
        let request =
            Registration { display_name: display_name.to_owned(), signing_public_key: identity.public_key() };
        let response = self.inner.register(v1::RegisterRequest::from(request)).await?;
        Ok(Registered::try_from(response.into_inner())?)
    }

    pub async fn get_task(&mut self, merchant_id: &MerchantId, wait: Duration) -> Result<Task, NetError> {
        let poll = TaskPoll { merchant_id: merchant_id.clone(), wait };
        let response = self
            .inner
            .get_task(with_timeout(v1::GetTaskRequest::from(poll), wait + Duration::from_secs(10)))
            .await?;
        Ok(Task::try_from(response.into_inner())?)
    }

    pub async fn advertise_keys(
        &mut self,
        m: sa::AdvertiseKeys,
        timeout: Duration,
    ) -> Result<Vec<sa::SignedKeys>, NetError> {
        let response =
            self.inner.advertise_keys(with_timeout(v1::AdvertiseKeysRequest::from(m), timeout)).await?;
        Ok(convert::roster_from_wire(response.into_inner())?)
    }

    pub async fn share_keys(
        &mut self,
        m: sa::ShareKeys,
        timeout: Duration,
    ) -> Result<Vec<sa::EncryptedShares>, NetError> {
        let response = self.inner.share_keys(with_timeout(v1::ShareKeysRequest::from(m), timeout)).await?;
        Ok(convert::inbox_from_wire(response.into_inner())?)
    }

    pub async fn masked_input(
        &mut self,
        m: sa::MaskedInput,
        timeout: Duration,
    ) -> Result<Vec<sa::ClientIndex>, NetError> {
        let response =
            self.inner.masked_input(with_timeout(v1::MaskedInputRequest::from(m), timeout)).await?;
        Ok(convert::survivors_from_wire(response.into_inner())?)
    }

    pub async fn consistency_check(
        &mut self,
        m: sa::ConsistencyCheck,
        timeout: Duration,
    ) -> Result<Vec<sa::SurvivorSignature>, NetError> {
        let response =
            self.inner.consistency_check(with_timeout(v1::ConsistencyCheckRequest::from(m), timeout)).await?;
        Ok(convert::signatures_from_wire(response.into_inner())?)
    }

    pub async fn unmask(&mut self, m: sa::Unmask, timeout: Duration) -> Result<bool, NetError> {
        let response = self.inner.unmask(with_timeout(v1::UnmaskRequest::from(m), timeout)).await?;
        Ok(response.into_inner().accepted)
    }

    /// Downloads adapter `version` and checks its chunks, length and sha256.
    pub async fn download_adapter(&mut self, version: u64) -> Result<(Vec<u8>, [u8; 32]), NetError> {
        let mut stream =
            self.inner.download_adapter(v1::DownloadAdapterRequest { version }).await?.into_inner();
        let mut bytes = Vec::new();
        let mut expected: Option<(u64, [u8; 32])> = None;
        while let Some(chunk) = stream.message().await? {
            let chunk = AdapterChunk::try_from(chunk)?;
            let (total, sha) = *expected.get_or_insert((chunk.total_bytes, chunk.sha256));
            if chunk.version != version || chunk.total_bytes != total || chunk.sha256 != sha {
                return Err(NetError::Download("chunks disagree on version, length or hash".into()));
            }
            if chunk.offset != bytes.len() as u64 {
                return Err(NetError::Download(format!(
                    "chunk at {} where {} was expected",
                    chunk.offset,
                    bytes.len()
                )));
            }
            bytes.extend_from_slice(&chunk.data);
        }
        let (total, sha) = expected.ok_or_else(|| NetError::Download("no chunks".into()))?;
        if bytes.len() as u64 != total {
            return Err(NetError::Download(format!("{} of {total} bytes arrived", bytes.len())));
        }
        if guild_proto::adapter::sha256(&bytes) != sha {
            return Err(NetError::Download("sha256 mismatch".into()));
        }
        Ok((bytes, sha))
    }

    pub async fn report_metrics(&mut self, report: MetricsReport) -> Result<(), NetError> {
        self.inner.report_metrics(v1::ReportMetricsRequest::from(report)).await?;
        Ok(())
    }

    pub async fn status(&mut self) -> Result<StatusReport, NetError> {
        let response = self.inner.status(v1::StatusRequest {}).await?;
        Ok(StatusReport::try_from(response.into_inner())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status tonic makes for a connection that broke mid-request reads as lost and
    /// transient, not as the coordinator's refusal; the coordinator's own answers, even
    /// `Unknown` or `Unavailable` ones, stay refusals.
    #[test]
    fn a_broken_connection_is_lost_not_refused() {
        for message in ["transport error", "h2 protocol error: error reading a body from connection"] {
            let error = NetError::from(tonic::Status::unknown(message));
            assert!(matches!(error, NetError::Lost(_)), "{message}: {error}");
            assert!(error.is_transient());
            assert!(error.to_string().contains("broke during the request"), "{error}");
        }
        let lost = NetError::from(tonic::Status::unavailable("connection reset by peer"));
        assert!(matches!(lost, NetError::Lost(_)), "{lost}");
        for status in [
            tonic::Status::unavailable("the coordinator is shutting down"),
            tonic::Status::unknown("the round is closed"),
            tonic::Status::invalid_argument("transport error in the request's payload"),
        ] {
            let error = NetError::from(status);
            assert!(matches!(error, NetError::Refused(_)), "{error}");
        }
    }
}
