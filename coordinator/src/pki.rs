//! The federation's certificates: a CA, the coordinator's server certificate, and one
//! client certificate per merchant. A merchant *is* its certificate: the coordinator
//! requires a client certificate signed by the CA (mutual TLS, rustls) and then looks up
//! the certificate's sha256 in the store's allow-list, so an unknown or revoked
//! certificate is refused even when the CA signed it.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
}

/// A PEM certificate and its private key.
#[derive(Clone, Debug)]
pub struct Issued {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
}

impl Issued {
    /// The identity the allow-list knows this certificate by.
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.cert_der)
    }
}

/// Everything a test federation needs.
#[derive(Clone, Debug)]
pub struct FederationPki {
    pub ca: Issued,
    pub server: Issued,
    pub merchants: Vec<Issued>,
}

/// sha256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// The name of merchant `i` (1-based) of a test federation.
pub fn merchant_name(i: usize) -> String {
    format!("merchant-{i:03}")
}

/// Issues a CA, a server certificate for `localhost`/`127.0.0.1`, and `merchants` client
/// certificates (ECDSA P-256, valid for ten years).
pub fn issue(merchants: usize) -> Result<FederationPki, PkiError> {
    let validity = |p: &mut CertificateParams| {
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(3650);
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.distinguished_name.push(DnType::CommonName, "Guild federation CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca_params);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = Issued {
        name: "ca".into(),
        cert_pem: ca_cert.pem(),
        key_pem: ca_key.serialize_pem(),
        cert_der: ca_cert.der().to_vec(),
    };
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            name: name.to_owned(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
        })
    };
    let server =
        leaf("server", vec!["localhost".into(), "127.0.0.1".into()], ExtendedKeyUsagePurpose::ServerAuth)?;
    let merchants = (1..=merchants)
        .map(|i| {
            let name = merchant_name(i);
            leaf(&name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
        })
        .collect::<Result<_, _>>()?;
    Ok(FederationPki { ca, server, merchants })
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io { path: path.to_owned(), source };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(io)?;
    std::io::Write::write_all(&mut file, contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

impl FederationPki {
    /// Writes `ca.pem`, `ca.key`, `server.pem`, `server.key` and
    /// `merchants/merchant-NNN.{pem,key}` under `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), PkiError> {
        let merchants = dir.join("merchants");
        std::fs::create_dir_all(&merchants)
            .map_err(|source| PkiError::Io { path: merchants.clone(), source })?;
        for (issued, folder) in [(&self.ca, dir), (&self.server, dir)]
            .into_iter()
            .chain(self.merchants.iter().map(|m| (m, merchants.as_path())))
        {
            write(&folder.join(format!("{}.pem", issued.name)), &issued.cert_pem, false)?;
            write(&folder.join(format!("{}.key", issued.name)), &issued.key_pem, true)?;
        }
        Ok(())
    }
}

/// The DER of the first certificate in a PEM file.
pub fn read_cert_der(path: &Path) -> Result<Vec<u8>, PkiError> {
    let text = std::fs::read(path).map_err(|source| PkiError::Io { path: path.to_owned(), source })?;
    pem::parse_many(&text)
        .ok()
        .and_then(|blocks| blocks.into_iter().find(|b| b.tag() == "CERTIFICATE"))
        .map(|b| b.into_contents())
        .ok_or_else(|| PkiError::NoCertificate { path: path.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_distinct_certificates_and_writes_them() {
        let pki = issue(3).expect("issue");
        assert_eq!(pki.merchants.len(), 3);
        let fingerprints: std::collections::BTreeSet<_> =
            pki.merchants.iter().map(Issued::fingerprint).collect();
        assert_eq!(fingerprints.len(), 3);
        let dir = tempfile::tempdir().expect("tempdir");
        pki.write(dir.path()).expect("write");
        let der = read_cert_der(&dir.path().join("merchants/merchant-002.pem")).expect("read back");
        assert_eq!(fingerprint(&der), pki.merchants[1].fingerprint());
        assert!(matches!(
            read_cert_der(&dir.path().join("merchants/merchant-002.key")),
            Err(PkiError::NoCertificate { .. })
        ));
    }
}
