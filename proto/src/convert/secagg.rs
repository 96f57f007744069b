//! The SecAgg+ phase messages and what the server forwards when each phase closes.

use guild_privacy::secagg::message as sa;

use super::*;

fn binding(m: Option<v1::RoundBinding>) -> Result<sa::RoundBinding> {
    let m = required(m, "binding")?;
    Ok(sa::RoundBinding {
        federation_id: fixed(&m.federation_id, "binding.federation_id")?,
        round_id: m.round_id,
        adapter_sha256: fixed(&m.adapter_sha256, "binding.adapter_sha256")?,
        task_sha256: fixed(&m.task_sha256, "binding.task_sha256")?,
    })
}

fn binding_to_wire(b: sa::RoundBinding) -> Option<v1::RoundBinding> {
    Some(v1::RoundBinding {
        federation_id: b.federation_id.to_vec(),
        round_id: b.round_id,
        adapter_sha256: b.adapter_sha256.to_vec(),
        task_sha256: b.task_sha256.to_vec(),
    })
}

impl TryFrom<v1::SignedKeys> for sa::SignedKeys {
    type Error = WireError;
    fn try_from(m: v1::SignedKeys) -> Result<Self> {
        Ok(Self {
            sender: index(m.sender, "SignedKeys.sender")?,
            cipher_public_key: fixed(&m.cipher_public_key, "SignedKeys.cipher_public_key")?,
            mask_public_key: fixed(&m.mask_public_key, "SignedKeys.mask_public_key")?,
            signature: fixed(&m.signature, "SignedKeys.signature")?,
        })
    }
}

impl From<sa::SignedKeys> for v1::SignedKeys {
    fn from(k: sa::SignedKeys) -> Self {
        Self {
            sender: k.sender.get(),
            cipher_public_key: k.cipher_public_key.to_vec(),
            mask_public_key: k.mask_public_key.to_vec(),
            signature: k.signature.to_vec(),
        }
    }
}

impl TryFrom<v1::AdvertiseKeysRequest> for sa::AdvertiseKeys {
    type Error = WireError;
    fn try_from(m: v1::AdvertiseKeysRequest) -> Result<Self> {
        Ok(Self {
            binding: binding(m.binding)?,
            keys: required(m.keys, "AdvertiseKeysRequest.keys")?.try_into()?,
        })
    }
}

impl From<sa::AdvertiseKeys> for v1::AdvertiseKeysRequest {
    fn from(m: sa::AdvertiseKeys) -> Self {
        Self { binding: binding_to_wire(m.binding), keys: Some(m.keys.into()) }
    }
}

/// The key roster the server broadcasts when phase 0 closes.
pub fn roster_from_wire(m: v1::AdvertiseKeysResponse) -> Result<Vec<sa::SignedKeys>> {
    bounded(&m.roster, MAX_COHORT, "AdvertiseKeysResponse.roster")?;
    m.roster.into_iter().map(TryInto::try_into).collect()
}

pub fn roster_to_wire(roster: Vec<sa::SignedKeys>) -> v1::AdvertiseKeysResponse {
    v1::AdvertiseKeysResponse { roster: roster.into_iter().map(Into::into).collect() }
}

impl TryFrom<v1::EncryptedShares> for sa::EncryptedShares {
    type Error = WireError;
    fn try_from(m: v1::EncryptedShares) -> Result<Self> {
        if m.ciphertext.is_empty() || m.ciphertext.len() > MAX_CIPHERTEXT_BYTES {
            return Err(WireError::invalid(
                "EncryptedShares.ciphertext",
                format!("must be 1..={MAX_CIPHERTEXT_BYTES} bytes, got {}", m.ciphertext.len()),
            ));
        }
        Ok(Self {
            sender: index(m.sender, "EncryptedShares.sender")?,
            recipient: index(m.recipient, "EncryptedShares.recipient")?,
            ciphertext: m.ciphertext,
            key_commitment: fixed(&m.key_commitment, "EncryptedShares.key_commitment")?,
            seed_commitment: fixed(&m.seed_commitment, "EncryptedShares.seed_commitment")?,
            signature: fixed(&m.signature, "EncryptedShares.signature")?,
        })
    }
}

impl From<sa::EncryptedShares> for v1::EncryptedShares {
    fn from(s: sa::EncryptedShares) -> Self {
        Self {
            sender: s.sender.get(),
            recipient: s.recipient.get(),
            ciphertext: s.ciphertext,
            key_commitment: s.key_commitment.to_vec(),
            seed_commitment: s.seed_commitment.to_vec(),
            signature: s.signature.to_vec(),
        }
    }
}

impl TryFrom<v1::ShareKeysRequest> for sa::ShareKeys {
    type Error = WireError;
    fn try_from(m: v1::ShareKeysRequest) -> Result<Self> {
        bounded(&m.shares, MAX_COHORT, "ShareKeysRequest.shares")?;
        Ok(Self {
            binding: binding(m.binding)?,
            shares: m.shares.into_iter().map(TryInto::try_into).collect::<Result<_>>()?,
        })
    }
}

impl From<sa::ShareKeys> for v1::ShareKeysRequest {
    fn from(m: sa::ShareKeys) -> Self {
        Self { binding: binding_to_wire(m.binding), shares: m.shares.into_iter().map(Into::into).collect() }
    }
}

/// The sealed shares addressed to one client, forwarded when phase 1 closes.
pub fn inbox_from_wire(m: v1::ShareKeysResponse) -> Result<Vec<sa::EncryptedShares>> {
    bounded(&m.inbox, MAX_COHORT, "ShareKeysResponse.inbox")?;
    m.inbox.into_iter().map(TryInto::try_into).collect()
}

pub fn inbox_to_wire(inbox: Vec<sa::EncryptedShares>) -> v1::ShareKeysResponse {
    v1::ShareKeysResponse { inbox: inbox.into_iter().map(Into::into).collect() }
}

impl TryFrom<v1::MaskedInputRequest> for sa::MaskedInput {
    type Error = WireError;
    fn try_from(m: v1::MaskedInputRequest) -> Result<Self> {
        if m.masked.is_empty() {
            return Err(WireError::missing("MaskedInputRequest.masked"));
        }
        bounded(&m.masked, MAX_VECTOR_LENGTH, "MaskedInputRequest.masked")?;
        bounded(&m.complaints, MAX_COHORT, "MaskedInputRequest.complaints")?;
        let complaints = m
            .complaints
            .into_iter()
            .map(|c| {
                Ok(sa::Complaint {
                    accused: index(c.accused, "Complaint.accused")?,
                    pairwise_seed: fixed(&c.pairwise_seed, "Complaint.pairwise_seed")?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            binding: binding(m.binding)?,
            sender: index(m.sender, "MaskedInputRequest.sender")?,
            masked: m.masked,
            complaints,
        })
    }
}

impl From<sa::MaskedInput> for v1::MaskedInputRequest {
    fn from(m: sa::MaskedInput) -> Self {
        Self {
            binding: binding_to_wire(m.binding),
            sender: m.sender.get(),
            masked: m.masked,
            complaints: m
                .complaints
                .into_iter()
                .map(|c| v1::Complaint { accused: c.accused.get(), pairwise_seed: c.pairwise_seed.to_vec() })
                .collect(),
        }
    }
}

fn indices(values: &[u32], field: &'static str) -> Result<Vec<sa::ClientIndex>> {
    bounded(values, MAX_COHORT, field)?;
    values.iter().map(|&v| index(v, field)).collect()
}

/// The survivors of phase 2, announced when it closes.
pub fn survivors_from_wire(m: v1::MaskedInputResponse) -> Result<Vec<sa::ClientIndex>> {
    indices(&m.survivors, "MaskedInputResponse.survivors")
}

pub fn survivors_to_wire(survivors: &[sa::ClientIndex]) -> v1::MaskedInputResponse {
    v1::MaskedInputResponse { survivors: survivors.iter().map(|i| i.get()).collect() }
}

impl TryFrom<v1::ConsistencyCheckRequest> for sa::ConsistencyCheck {
    type Error = WireError;
    fn try_from(m: v1::ConsistencyCheckRequest) -> Result<Self> {
        Ok(Self {
            binding: binding(m.binding)?,
            sender: index(m.sender, "ConsistencyCheckRequest.sender")?,
            signature: fixed(&m.signature, "ConsistencyCheckRequest.signature")?,
        })
    }
}

impl From<sa::ConsistencyCheck> for v1::ConsistencyCheckRequest {
    fn from(m: sa::ConsistencyCheck) -> Self {
        Self { binding: binding_to_wire(m.binding), sender: m.sender.get(), signature: m.signature.to_vec() }
    }
}

/// The survivors' signatures, forwarded when phase 3 closes.
pub fn signatures_from_wire(m: v1::ConsistencyCheckResponse) -> Result<Vec<sa::SurvivorSignature>> {
    bounded(&m.signatures, MAX_COHORT, "ConsistencyCheckResponse.signatures")?;
    m.signatures
        .into_iter()
        .map(|s| {
            Ok(sa::SurvivorSignature {
                sender: index(s.sender, "SurvivorSignature.sender")?,
                signature: fixed(&s.signature, "SurvivorSignature.signature")?,
            })
        })
        .collect()
}

pub fn signatures_to_wire(signatures: Vec<sa::SurvivorSignature>) -> v1::ConsistencyCheckResponse {
    v1::ConsistencyCheckResponse {
        signatures: signatures
            .into_iter()
            .map(|s| v1::SurvivorSignature { sender: s.sender.get(), signature: s.signature.to_vec() })
            .collect(),
    }
}

fn shares(values: Vec<v1::ShamirShare>, field: &'static str) -> Result<Vec<sa::ShamirShare>> {
    bounded(&values, MAX_COHORT, field)?;
    values
        .into_iter()
        .map(|s| {
            if s.y.is_empty() || s.y.len() > MAX_SHARE_WORDS {
                return Err(WireError::invalid(
                    field,
                    format!("a share has {} words, expected 1..={MAX_SHARE_WORDS}", s.y.len()),
                ));
            }
            Ok(sa::ShamirShare {
                owner: index(s.owner, field)?,
                x: index(s.x, field)?,
                y: s.y,
                salt: fixed(&s.salt, "ShamirShare.salt")?,
            })
        })
        .collect()
}

fn shares_to_wire(values: Vec<sa::ShamirShare>) -> Vec<v1::ShamirShare> {
    values
        .into_iter()
        .map(|s| v1::ShamirShare { owner: s.owner.get(), x: s.x.get(), y: s.y, salt: s.salt.to_vec() })
        .collect()
}

impl TryFrom<v1::UnmaskRequest> for sa::Unmask {
    type Error = WireError;
    fn try_from(m: v1::UnmaskRequest) -> Result<Self> {
        Ok(Self {
            binding: binding(m.binding)?,
            sender: index(m.sender, "UnmaskRequest.sender")?,
            self_mask_shares: shares(m.self_mask_shares, "UnmaskRequest.self_mask_shares")?,
            mask_key_shares: shares(m.mask_key_shares, "UnmaskRequest.mask_key_shares")?,
        })
    }
}

impl From<sa::Unmask> for v1::UnmaskRequest {
    fn from(m: sa::Unmask) -> Self {
        Self {
            binding: binding_to_wire(m.binding),
            sender: m.sender.get(),
            self_mask_shares: shares_to_wire(m.self_mask_shares),
            mask_key_shares: shares_to_wire(m.mask_key_shares),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secagg_messages_check_every_length() {
        let binding = Some(v1::RoundBinding {
            federation_id: vec![0; 16],
            round_id: 1,
            adapter_sha256: vec![0; 32],
            task_sha256: vec![0; 32],
        });
        let keys = |sig: usize| v1::AdvertiseKeysRequest {
            binding: binding.clone(),
            keys: Some(v1::SignedKeys {
                sender: 1,
                cipher_public_key: vec![0; 32],
                mask_public_key: vec![0; 32],
                signature: vec![0; sig],
            }),
        };
        assert!(sa::AdvertiseKeys::try_from(keys(64)).is_ok());
        let error = sa::AdvertiseKeys::try_from(keys(63)).expect_err("short signature");
        assert_eq!(error.to_string(), "SignedKeys.signature: expected 64 bytes, got 63");

        let masked =
            v1::MaskedInputRequest { binding: None, sender: 1, masked: vec![1, 2], complaints: vec![] };
        assert_eq!(
            sa::MaskedInput::try_from(masked).expect_err("no binding").to_string(),
            "binding: missing"
        );

        let unmask = v1::UnmaskRequest {
            binding,
            sender: 2,
            self_mask_shares: vec![v1::ShamirShare {
                owner: 1,
                x: 2,
                y: vec![0; MAX_SHARE_WORDS + 1],
                salt: vec![0; 32],
            }],
            mask_key_shares: vec![],
        };
        let error = sa::Unmask::try_from(unmask).expect_err("long share");
        assert!(error.to_string().contains("UnmaskRequest.self_mask_shares"), "{error}");
    }
}
