//! Explicit size limits for everything that crosses the wire.
//!
//! gRPC's decoder refuses a message larger than [`max_message_bytes`] before it is
//! allocated; the converters then bound every repeated field.

/// Largest cohort a round may have.
pub const MAX_COHORT: usize = 10_000;
/// Longest masked vector (u32 coordinates): 2^24, i.e. 64 MiB on the wire.
pub const MAX_VECTOR_LENGTH: usize = 1 << 24;
/// Longest sealed-shares ciphertext: two secrets of a few field elements, plus tag.
pub const MAX_CIPHERTEXT_BYTES: usize = 1024;
/// Most field elements one Shamir share of a 32-byte secret may have.
pub const MAX_SHARE_WORDS: usize = 16;
/// Longest display name or merchant id.
pub const MAX_NAME_BYTES: usize = 128;
/// Most tensors an adapter manifest may list.
pub const MAX_MANIFEST_TENSORS: usize = 1024;
/// Most uniform negatives a task may ask a client to sample per batch.
pub const MAX_NEGATIVES: u32 = 1 << 20;
/// Size of one streamed adapter chunk.
pub const ADAPTER_CHUNK_BYTES: usize = 1 << 20;

/// Room for the fields around the biggest payload of a message.
const ENVELOPE_BYTES: usize = 64 * 1024;

/// Wire bytes of one sealed-shares entry besides its ciphertext: two indices, two
/// commitments, a signature and field tags.
const SEALED_SHARES_OVERHEAD: usize = 8 + 2 * 32 + 64 + 24;

/// The gRPC message-size limit for a federation whose masked vectors have
/// `vector_length` coordinates and whose rounds have at most `cohort` clients: large
/// enough for the masked input (4 bytes a coordinate, plus a complaint per neighbour),
/// the key roster, the task (a certificate per member) and the share inbox, and no larger.
pub fn max_message_bytes(vector_length: usize, cohort: usize) -> usize {
    let masked_input = 4 * vector_length + cohort * (32 + 12);
    let roster = cohort * (2 * 32 + 64 + 16);
    let task = cohort * (32 + crate::certificate::MAX_CERTIFICATE_BYTES + 16);
    let inbox = cohort * (MAX_CIPHERTEXT_BYTES + SEALED_SHARES_OVERHEAD);
    masked_input.max(roster).max(task).max(inbox).max(ADAPTER_CHUNK_BYTES) + ENVELOPE_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_fits_the_masked_input_and_not_much_more() {
        let d = 1 << 18;
        let limit = max_message_bytes(d, 200);
        assert!(limit >= 4 * d);
        assert!(limit <= 4 * d + 128 * 1024, "limit {limit} is far above the payload");
    }

    #[test]
    fn limit_fits_large_cohorts_share_inbox() {
        let limit = max_message_bytes(16, MAX_COHORT);
        assert!(limit >= MAX_COHORT * MAX_CIPHERTEXT_BYTES);
    }
}
