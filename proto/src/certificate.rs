//! How a merchant's certificate binds its SecAgg+ signing key, and the check a client makes
//! of every cohort member's certificate.
//!
//! A merchant generates its own TLS key and Ed25519 signing key and sends the federation's
//! certificate authority a CSR whose subject alternative names hold one URI,
//! `urn:guild:secagg-signing-key:<64 hex digits>`. The issued certificate therefore names
//! the only key that may sign that merchant's SecAgg+ messages. Every task lists each cohort
//! member's certificate beside its signing key, and a client refuses the task unless every
//! certificate was issued by the federation's CA, is valid now, is for client
//! authentication, and binds exactly the listed key: a coordinator cannot put a key of its
//! own in a real merchant's place, nor add a member without a certificate the CA issued.

use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The URI prefix of the binding, followed by the key's 64 lowercase hex digits.
pub const SIGNING_KEY_URI_PREFIX: &str = "urn:guild:secagg-signing-key:";

/// Largest certificate a task may carry for one member (a P-256 client certificate with the
/// binding is about 550 bytes).
pub const MAX_CERTIFICATE_BYTES: usize = 1024;

/// Why a certificate was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertificateError {
    #[error("not a DER X.509 certificate: {0}")]
    Malformed(String),
    #[error("{0} bytes, above the {MAX_CERTIFICATE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("not issued by the federation's CA")]
    NotIssuedByCa,
    #[error("its signature does not verify under the federation's CA key")]
    BadSignature,
    #[error("not valid at this time")]
    Expired,
    #[error("not a client-authentication certificate")]
    NotClientAuth,
    #[error("binds no SecAgg+ signing key (no {SIGNING_KEY_URI_PREFIX}… name)")]
    NoBinding,
    #[error("binds more than one SecAgg+ signing key")]
    SeveralBindings,
    #[error("its SecAgg+ signing-key name is malformed: {0}")]
    BadBinding(String),
    #[error("no PEM certificate found")]
    NoPem,
    #[error("generating a key or request: {0}")]
    Generate(String),
}

/// A merchant's new TLS key and its certificate signing request, PEM.
#[derive(Clone, Debug)]
pub struct MerchantRequest {
    pub key_pem: String,
    pub csr_pem: String,
}

/// The certificate a merchant asks for and the CA issues: common name `name`, the binding
/// URI of `signing_key` as its only subject alternative name, client authentication only,
/// valid from a day ago for ten years.
pub fn merchant_params(
    name: &str,
    signing_key: &[u8; 32],
) -> Result<rcgen::CertificateParams, CertificateError> {
    let generate = |e: rcgen::Error| CertificateError::Generate(e.to_string());
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let uri = rcgen::string::Ia5String::try_from(signing_key_uri(signing_key)).map_err(generate)?;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    Ok(params)
}

/// What a merchant does before it joins (`guild-client keygen`): a fresh P-256 TLS key and
/// a request, signed with it, for a certificate that binds `signing_key`.
pub fn merchant_request(name: &str, signing_key: &[u8; 32]) -> Result<MerchantRequest, CertificateError> {
    let generate = |e: rcgen::Error| CertificateError::Generate(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(generate)?;
    let mut params = merchant_params(name, signing_key)?;
    // A request carries no issuer-side extension: the CA adds its key identifier.
    params.use_authority_key_identifier_extension = false;
    let csr = params.serialize_request(&key).map_err(generate)?;
    Ok(MerchantRequest { key_pem: key.serialize_pem(), csr_pem: csr.pem().map_err(generate)? })
}

/// The subject-alternative-name URI that binds `key`.
pub fn signing_key_uri(key: &[u8; 32]) -> String {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    format!("{SIGNING_KEY_URI_PREFIX}{hex}")
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CertificateError> {
    if der.len() > MAX_CERTIFICATE_BYTES {
        return Err(CertificateError::TooLarge(der.len()));
    }
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| CertificateError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertificateError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    Ok(cert)
}

fn binding(cert: &X509Certificate<'_>) -> Result<[u8; 32], CertificateError> {
    let mut found = None;
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                let GeneralName::URI(uri) = name else { continue };
                let Some(hex) = uri.strip_prefix(SIGNING_KEY_URI_PREFIX) else { continue };
                if found.is_some() {
                    return Err(CertificateError::SeveralBindings);
                }
                found = Some(parse_signing_key_hex(hex)?);
            }
        }
    }
    found.ok_or(CertificateError::NoBinding)
}

/// The key of a binding URI's hex part (64 lowercase hex digits).
pub fn parse_signing_key_hex(hex: &str) -> Result<[u8; 32], CertificateError> {
    let bad = || CertificateError::BadBinding(format!("{hex:?} is not 64 lowercase hex digits"));
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(bad());
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(key)
}

/// The signing key that the certificate `der` binds (no chain check: the coordinator uses it
/// on a certificate the TLS handshake already verified).
pub fn bound_signing_key(der: &[u8]) -> Result<[u8; 32], CertificateError> {
    binding(&parse(der)?)
}

/// Checks a cohort member's certificate `der` against the federation's CA certificate
/// `ca_der` as a client must: issued and signed by the CA, valid now, for client
/// authentication; returns the signing key it binds.
pub fn verify_member(ca_der: &[u8], der: &[u8]) -> Result<[u8; 32], CertificateError> {
    let (_, ca) =
        X509Certificate::from_der(ca_der).map_err(|e| CertificateError::Malformed(e.to_string()))?;
    let cert = parse(der)?;
    if cert.issuer() != ca.subject() {
        return Err(CertificateError::NotIssuedByCa);
    }
    cert.verify_signature(Some(ca.public_key())).map_err(|_| CertificateError::BadSignature)?;
    if !cert.validity().is_valid() {
        return Err(CertificateError::Expired);
    }
    match cert.extended_key_usage() {
        Ok(Some(eku)) if eku.value.client_auth => {}
        _ => return Err(CertificateError::NotClientAuth),
    }
    binding(&cert)
}

/// The common name a certificate was issued for (a merchant's id, for a merchant's).
pub fn common_name(der: &[u8]) -> Result<String, CertificateError> {
    let cert = parse(der)?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| CertificateError::Malformed("no common name".into()))?;
    Ok(name.to_owned())
}

/// The DER of the first certificate in a PEM file.
pub fn first_pem_certificate(pem: &[u8]) -> Result<Vec<u8>, CertificateError> {
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| CertificateError::Malformed(e.to_string()))?;
        if block.label == "CERTIFICATE" {
            return Ok(block.contents);
        }
    }
    Err(CertificateError::NoPem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binding_uri_round_trips_and_malformed_ones_are_refused() {
        let key: [u8; 32] = std::array::from_fn(|i| (i * 7 + 3) as u8);
        let uri = signing_key_uri(&key);
        assert_eq!(uri.len(), SIGNING_KEY_URI_PREFIX.len() + 64);
        assert_eq!(parse_signing_key_hex(uri.strip_prefix(SIGNING_KEY_URI_PREFIX).expect("prefix")), Ok(key));
        for bad in ["", "00", &"g".repeat(64), &"A".repeat(64), &"0".repeat(66)] {
            assert!(matches!(parse_signing_key_hex(bad), Err(CertificateError::BadBinding(_))), "{bad:?}");
        }
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(bound_signing_key(b"not a certificate"), Err(CertificateError::Malformed(_))));
        assert_eq!(bound_signing_key(&[0u8; 2000]), Err(CertificateError::TooLarge(2000)));
        assert_eq!(first_pem_certificate(b"no pem here"), Err(CertificateError::NoPem));
    }
}
