//! Registration: a merchant's request and the coordinator's answer.

use super::*;

impl TryFrom<v1::RegisterRequest> for Registration {
    type Error = WireError;
    fn try_from(m: v1::RegisterRequest) -> Result<Self> {
        if m.protocol_version != crate::PROTOCOL_VERSION {
            return Err(WireError::invalid(
                "RegisterRequest.protocol_version",
                format!(
                    "this coordinator speaks version {}, the client {}",
                    crate::PROTOCOL_VERSION,
                    m.protocol_version
                ),
            ));
        }
        let name = m.display_name.trim();
        if name.is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
            return Err(WireError::invalid(
                "RegisterRequest.display_name",
                "must be 1 to 128 bytes of printable text",
            ));
        }
        Ok(Self {
            display_name: name.to_owned(),
            signing_public_key: fixed(&m.signing_public_key, "RegisterRequest.signing_public_key")?,
        })
    }
}

impl From<Registration> for v1::RegisterRequest {
    fn from(r: Registration) -> Self {
        Self {
            display_name: r.display_name,
            signing_public_key: r.signing_public_key.to_vec(),
            protocol_version: crate::PROTOCOL_VERSION,
        }
    }
}

impl TryFrom<v1::RegisterResponse> for Registered {
    type Error = WireError;
    fn try_from(m: v1::RegisterResponse) -> Result<Self> {
        Ok(Self {
            merchant_id: merchant_id(&m.merchant_id, "RegisterResponse.merchant_id")?,
            federation_id: fixed(&m.federation_id, "RegisterResponse.federation_id")?,
            base_model_sha256: fixed(&m.base_model_sha256, "RegisterResponse.base_model_sha256")?,
        })
    }
}

impl From<Registered> for v1::RegisterResponse {
    fn from(r: Registered) -> Self {
        Self {
            merchant_id: r.merchant_id.0,
            federation_id: r.federation_id.to_vec(),
            base_model_sha256: r.base_model_sha256.to_vec(),
        }
    }
}
