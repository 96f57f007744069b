//! The decoder driver shared by the `cargo fuzz` target `decode_wire` and this crate's
//! bounded test: arbitrary bytes are decoded as one of the incoming message types and
//! converted to its domain type. Any outcome but a panic is acceptable; a message that
//! converts must survive the trip back to the wire unchanged in meaning.

use prost::Message;

use crate::domain::*;
use crate::v1;
use guild_privacy::secagg::message as sa;

fn check<W, D>(bytes: &[u8])
where
    W: Message + Default + From<D> + Clone,
    D: TryFrom<W> + Clone + PartialEq + std::fmt::Debug,
{
    let Ok(wire) = W::decode(bytes) else { return };
    if let Ok(domain) = D::try_from(wire) {
        let back = D::try_from(W::from(domain.clone())).ok();
        assert_eq!(back, Some(domain), "a valid message must round-trip");
    }
}

/// Decodes `data[1..]` as the message type selected by `data[0]`.
pub fn decode_wire(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else { return };
    match selector % 10 {
        0 => check::<v1::RegisterRequest, Registration>(bytes),
        1 => check::<v1::GetTaskResponse, Task>(bytes),
        2 => check::<v1::AdvertiseKeysRequest, sa::AdvertiseKeys>(bytes),
        3 => check::<v1::ShareKeysRequest, sa::ShareKeys>(bytes),
        4 => check::<v1::MaskedInputRequest, sa::MaskedInput>(bytes),
        5 => check::<v1::ConsistencyCheckRequest, sa::ConsistencyCheck>(bytes),
        6 => check::<v1::UnmaskRequest, sa::Unmask>(bytes),
        7 => check::<v1::AdapterChunk, AdapterChunk>(bytes),
        8 => check::<v1::ReportMetricsRequest, MetricsReport>(bytes),
        _ => {
            // The server → client answers that have no domain struct of their own.
            if let Ok(m) = v1::AdvertiseKeysResponse::decode(bytes) {
                let _ = crate::convert::roster_from_wire(m);
            }
            if let Ok(m) = v1::ShareKeysResponse::decode(bytes) {
                let _ = crate::convert::inbox_from_wire(m);
            }
            if let Ok(m) = v1::MaskedInputResponse::decode(bytes) {
                let _ = crate::convert::survivors_from_wire(m);
            }
            if let Ok(m) = v1::ConsistencyCheckResponse::decode(bytes) {
                let _ = crate::convert::signatures_from_wire(m);
            }
            if let Ok(m) = v1::StatusResponse::decode(bytes) {
                let _ = StatusReport::try_from(m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bounded fuzzing on stable Rust in every test run: random bytes, and valid
    /// encodings with random bytes flipped (which reach far deeper than noise).
    #[test]
    fn decoders_survive_random_and_mutated_messages() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid: Vec<Vec<u8>> = vec![
            v1::RegisterRequest {
                display_name: "Shop".into(),
                signing_public_key: vec![1; 32],
                protocol_version: crate::PROTOCOL_VERSION,
            }
            .encode_to_vec(),
            v1::MaskedInputRequest {
                binding: seed_binding(),
                sender: 2,
                masked: vec![1, 2, 3],
                complaints: vec![v1::Complaint { accused: 1, pairwise_seed: vec![4; 32] }],
            }
            .encode_to_vec(),
            v1::UnmaskRequest {
                binding: seed_binding(),
                sender: 2,
                self_mask_shares: vec![v1::ShamirShare { owner: 1, x: 2, y: vec![5; 5], salt: vec![6; 32] }],
                mask_key_shares: vec![],
            }
            .encode_to_vec(),
        ];
        for i in 0..20_000u64 {
            let mut data = vec![(next() % 10) as u8];
            if i % 2 == 0 {
                data.extend((0..next() % 200).map(|_| next() as u8));
            } else {
                let mut m = valid[(next() % valid.len() as u64) as usize].clone();
                for _ in 0..1 + next() % 3 {
                    let at = (next() % m.len() as u64) as usize;
                    m[at] ^= next() as u8 | 1;
                }
                data.extend(m);
            }
            decode_wire(&data);
        }
    }

    /// The round binding of the seed messages.
    fn seed_binding() -> Option<v1::RoundBinding> {
        Some(v1::RoundBinding {
            federation_id: vec![0; 16],
            round_id: 3,
            adapter_sha256: vec![0; 32],
            task_sha256: vec![0; 32],
        })
    }
}
