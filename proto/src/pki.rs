//! The federation's certificates: a CA, the coordinator's server certificate, and one
//! client certificate per merchant, issued to the profile [`crate::certificate`] checks. A merchant *is* its certificate: the coordinator
//! requires a client certificate signed by the CA (mutual TLS, rustls) and then looks up
//! the certificate's sha256 in the store's allow-list, so an unknown or revoked
//! certificate is refused even when the CA signed it.
//!
//! A merchant makes its own keys and a CSR (`guild-client keygen`); the CA only signs
//! ([`sign_merchant_request`], `guild-coordinator sign-csr`), keeping the CSR's name and
//! the SecAgg+ signing key it binds ([`crate::certificate`]) and setting everything
//! else itself. [`issue`] builds a whole test federation through the same path, generating
//! the merchants' keys on their behalf (a demonstration convenience: whoever runs it holds
//! those keys).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
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
    #[error("refusing the certificate request: {0}")]
    BadRequest(String),
    #[error("generating a merchant's keys: {0}")]
    Keys(String),
}

/// A PEM certificate and its private key.
#[derive(Clone, Debug)]
pub struct Issued {
    pub name: String,
    pub cert_pem: String,
    /// The private TLS key (empty where the CA signed a request and never saw it).
    pub key_pem: String,
    pub cert_der: Vec<u8>,
    /// A merchant's Ed25519 SecAgg+ signing key (PKCS#8) that the certificate binds, where
    /// [`issue`] generated it; empty otherwise.
    pub signing_pkcs8: Vec<u8>,
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
    issue_for(merchants, &[])
}

fn validity(p: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(3650);
}

/// The names a server certificate covers: `localhost`, `127.0.0.1` and `names` (host
/// names or IP addresses, as merchants write them in their `coordinator` address), each
/// once; an error names one that is neither.
pub fn server_names(names: &[String]) -> Result<Vec<String>, PkiError> {
    let mut all = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    for name in names {
        let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
        let host_name = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if name.parse::<std::net::IpAddr>().is_err() && !host_name {
            return Err(PkiError::BadRequest(format!(
                "server name {name:?} is neither a host name nor an IP address"
            )));
        }
        if !all.contains(&name) {
            all.push(name);
        }
    }
    Ok(all)
}

/// Issues the coordinator's TLS server certificate for [`server_names`]`(names)`, signed by
/// the CA `issuer`: what merchants on other machines need when they connect by a real host
/// name or address (their `coordinator` setting must use one of the names).
pub fn issue_server(issuer: &Issuer<'_, KeyPair>, names: &[String]) -> Result<Issued, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(server_names(names)?)?;
    params.distinguished_name.push(DnType::CommonName, "server");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params);
    let cert = params.signed_by(&key, issuer)?;
    Ok(Issued {
        name: "server".into(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().to_vec(),
        signing_pkcs8: Vec::new(),
    })
}

/// [`issue`], with the server certificate also covering `server_names` ([`issue_server`]).
pub fn issue_for(merchants: usize, server_names: &[String]) -> Result<FederationPki, PkiError> {
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
        signing_pkcs8: Vec::new(),
    };
    let issuer = Issuer::new(ca_params, ca_key);
    let server = issue_server(&issuer, server_names)?;
    let merchants = (1..=merchants)
        .map(|i| {
            // What `guild-client keygen` does at the merchant, then what the CA does.
            let name = merchant_name(i);
            let signing = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .map_err(|_| PkiError::Keys("the OS random source failed".into()))?;
            let pair = ring::signature::Ed25519KeyPair::from_pkcs8(signing.as_ref())
                .map_err(|e| PkiError::Keys(e.to_string()))?;
            let mut public = [0u8; 32];
            public.copy_from_slice(ring::signature::KeyPair::public_key(&pair).as_ref());
            let request = crate::certificate::merchant_request(&name, &public)
                .map_err(|e| PkiError::Keys(e.to_string()))?;
            let mut issued = sign_merchant_request(&request.csr_pem, &issuer)?;
            issued.key_pem = request.key_pem;
            issued.signing_pkcs8 = signing.as_ref().to_vec();
            Ok(issued)
        })
        .collect::<Result<_, PkiError>>()?;
    Ok(FederationPki { ca, server, merchants })
}

/// Signs a merchant's certificate request as the CA `issuer`: keeps the request's common
/// name (a valid merchant id) and the one SecAgg+ signing key it binds, and sets the rest
/// (client authentication only, not a CA, ten years). Refuses a request whose signature
/// does not verify, that binds no key or several, or whose name is not a merchant id.
pub fn sign_merchant_request(csr_pem: &str, issuer: &Issuer<'_, KeyPair>) -> Result<Issued, PkiError> {
    let bad = |m: String| PkiError::BadRequest(m);
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| bad(e.to_string()))?;
    let name = match csr.params.distinguished_name.get(&DnType::CommonName) {
        Some(value) => dn_text(value).ok_or_else(|| bad("its common name is not text".into()))?,
        None => return Err(bad("it has no common name".into())),
    };
    if crate::domain::MerchantId::parse(&name).is_none() {
        return Err(bad(format!(
            "its common name {name:?} is not a merchant id (1 to 128 ASCII letters, digits, '-', '_' or '.')"
        )));
    }
    let mut keys = csr.params.subject_alt_names.iter().filter_map(|san| match san {
        SanType::URI(uri) => uri.as_str().strip_prefix(crate::certificate::SIGNING_KEY_URI_PREFIX),
        _ => None,
    });
    let key = match (keys.next(), keys.next()) {
        (Some(hex), None) => {
            crate::certificate::parse_signing_key_hex(hex).map_err(|e| bad(e.to_string()))?
        }
        (None, _) => {
            return Err(bad("it binds no SecAgg+ signing key (make it with `guild-client keygen`)".into()));
        }
        (Some(_), Some(_)) => return Err(bad("it binds more than one SecAgg+ signing key".into())),
    };
    let params = crate::certificate::merchant_params(&name, &key).map_err(|e| bad(e.to_string()))?;
    let cert = params.signed_by(&csr.public_key, issuer)?;
    Ok(Issued {
        name,
        cert_pem: cert.pem(),
        key_pem: String::new(),
        cert_der: cert.der().to_vec(),
        signing_pkcs8: Vec::new(),
    })
}

fn dn_text(value: &DnValue) -> Option<String> {
    match value {
        DnValue::Utf8String(s) => Some(s.clone()),
        DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
        DnValue::Ia5String(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The CA of `ca_cert_pem` with its key `ca_key_pem`, to sign requests with; refused when
/// the key is not the certificate's (a certificate signed with another key, the server's
/// say, would verify for no one).
pub fn issuer_from_pem(ca_cert_pem: &str, ca_key_pem: &str) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key = KeyPair::from_pem(ca_key_pem)?;
    let der = crate::certificate::first_pem_certificate(ca_cert_pem.as_bytes())
        .map_err(|e| PkiError::BadRequest(format!("the CA certificate: {e}")))?;
    let (_, ca) = x509_parser::prelude::FromDer::from_der(&der)
        .map_err(|e: x509_parser::nom::Err<_>| PkiError::BadRequest(format!("the CA certificate: {e}")))?;
    let ca: x509_parser::prelude::X509Certificate<'_> = ca;
    if ca.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(PkiError::BadRequest(
            "the key is not the CA certificate's key (is it the server's or a merchant's key?)".into(),
        ));
    }
    if !ca.is_ca() {
        return Err(PkiError::BadRequest("the certificate is not a CA certificate (ca.pem?)".into()));
    }
    Ok(Issuer::from_ca_cert_pem(ca_cert_pem, key)?)
}

fn write(path: &Path, contents: &[u8], private: bool) -> Result<(), PkiError> {
    write_file(path, contents, private, false)
}

/// Writes a key or certificate a person asked for to `path`, which must not exist yet
/// (`private`: readable by its owner only), and syncs it to disk.
pub fn write_new(path: &Path, contents: &[u8], private: bool) -> Result<(), PkiError> {
    write_file(path, contents, private, true)
}

fn write_file(path: &Path, contents: &[u8], private: bool, create_new: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io { path: path.to_owned(), source };
    let mut options = std::fs::OpenOptions::new();
    if create_new {
        options.write(true).create_new(true);
    } else {
        options.write(true).create(true).truncate(true);
    }
    #[cfg(unix)]
    if private {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(io)?;
    std::io::Write::write_all(&mut file, contents).map_err(io)?;
    file.sync_all().map_err(io)
}

impl FederationPki {
    /// Writes `ca.pem`, `ca.key`, `server.pem`, `server.key` and
    /// `merchants/merchant-NNN.{pem,key,signing}` under `dir` (`.signing`: the merchant's
    /// Ed25519 SecAgg+ signing key, PKCS#8, which its certificate binds).
    pub fn write(&self, dir: &Path) -> Result<(), PkiError> {
        let merchants = dir.join("merchants");
        std::fs::create_dir_all(&merchants)
            .map_err(|source| PkiError::Io { path: merchants.clone(), source })?;
        for (issued, folder) in [(&self.ca, dir), (&self.server, dir)]
            .into_iter()
            .chain(self.merchants.iter().map(|m| (m, merchants.as_path())))
        {
            write(&folder.join(format!("{}.pem", issued.name)), issued.cert_pem.as_bytes(), false)?;
            write(&folder.join(format!("{}.key", issued.name)), issued.key_pem.as_bytes(), true)?;
            if !issued.signing_pkcs8.is_empty() {
                write(&folder.join(format!("{}.signing", issued.name)), &issued.signing_pkcs8, true)?;
            }
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

    /// The subject alternative names of a certificate, as text (`dns:` or `ip:`).
    fn alternative_names(der: &[u8]) -> Vec<String> {
        use x509_parser::extensions::{GeneralName, ParsedExtension};
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der).expect("a certificate");
        let mut names = Vec::new();
        for ext in cert.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for name in &san.general_names {
                    match name {
                        GeneralName::DNSName(d) => names.push(format!("dns:{d}")),
                        GeneralName::IPAddress(ip) => names.push(format!("ip:{ip:?}")),
                        _ => {}
                    }
                }
            }
        }
        names
    }

    #[test]
    fn a_server_certificate_names_the_hosts_merchants_connect_to() {
        let names = ["coord.example.com".to_owned(), "10.0.0.5".to_owned(), "LOCALHOST".to_owned()];
        let pki = issue_for(0, &names).expect("issue");
        let sans = alternative_names(&pki.server.cert_der);
        assert!(sans.contains(&"dns:localhost".to_owned()), "{sans:?}");
        assert!(sans.contains(&"dns:coord.example.com".to_owned()), "{sans:?}");
        assert!(sans.contains(&"ip:[10, 0, 0, 5]".to_owned()), "an IP address SAN, not a DNS one: {sans:?}");
        assert_eq!(sans.len(), 4, "localhost once: {sans:?}");
        // Reissued later by the CA alone, for another name.
        let issuer = issuer_from_pem(&pki.ca.cert_pem, &pki.ca.key_pem).expect("issuer");
        let again = issue_server(&issuer, &["shop-coordinator.internal".to_owned()]).expect("issue");
        assert!(alternative_names(&again.cert_der).contains(&"dns:shop-coordinator.internal".to_owned()));
        for bad in ["", "has space.example", "-lead.example", "a..b"] {
            let error = server_names(&[bad.to_owned()]).expect_err(bad).to_string();
            assert!(error.contains("neither a host name nor an IP address"), "{bad}: {error}");
        }
    }

    #[test]
    fn a_ca_key_that_is_not_the_certificates_is_refused() {
        let pki = issue(1).expect("issue");
        assert!(issuer_from_pem(&pki.ca.cert_pem, &pki.ca.key_pem).is_ok());
        let Err(error) = issuer_from_pem(&pki.ca.cert_pem, &pki.server.key_pem) else {
            panic!("the server's key was taken for the CA's")
        };
        assert!(error.to_string().contains("not the CA certificate's key"), "{error}");
        let Err(error) = issuer_from_pem(&pki.server.cert_pem, &pki.server.key_pem) else {
            panic!("the server certificate was taken for a CA")
        };
        assert!(error.to_string().contains("not a CA certificate"), "{error}");
    }

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
