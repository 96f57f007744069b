//! Domain types of the SecAgg+ messages, already validated for shape.
//!
//! The wire decoder in `guild-proto` produces these, checking every length once; the
//! state machines then check what only they can know (who is in the round, signatures).

use std::fmt;
use std::num::NonZeroU32;

/// Length of an X25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Length of a federation id.
pub const FEDERATION_ID_LEN: usize = 16;
/// Length of a SHA-256 digest.
pub const SHA256_LEN: usize = 32;

/// A client's 1-based position in a round's cohort; also its Shamir evaluation point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientIndex(NonZeroU32);

impl ClientIndex {
    /// `None` for 0, which is reserved (it is where Shamir secrets live).
    pub fn new(index: u32) -> Option<Self> {
        NonZeroU32::new(index).map(Self)
    }

    pub fn get(self) -> u32 {
        self.0.get()
    }
}

impl fmt::Display for ClientIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client #{}", self.0)
    }
}

/// What every signed SecAgg+ message is bound to, so that a message cannot be replayed
/// into another round or federation, and a server that shows different clients
/// different adapters is caught when the signatures are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RoundBinding {
    pub federation_id: [u8; FEDERATION_ID_LEN],
    pub round_id: u64,
    pub adapter_sha256: [u8; SHA256_LEN],
    /// SHA-256 of every parameter of the round's task that is the same for all its clients
    /// (privacy, SecAgg+, training, the manifest and the cohort's keys): clients shown
    /// different tasks hold different bindings, so their signatures and keys do not match
    /// and the round aborts instead of running on inconsistent views.
    pub task_sha256: [u8; SHA256_LEN],
}

/// Length of [`RoundBinding::to_bytes`].
pub const BINDING_LEN: usize = FEDERATION_ID_LEN + 8 + 2 * SHA256_LEN;

impl RoundBinding {
    /// Canonical byte encoding, the prefix of every signed payload.
    pub fn to_bytes(&self) -> [u8; BINDING_LEN] {
        let mut out = [0u8; BINDING_LEN];
        out[..FEDERATION_ID_LEN].copy_from_slice(&self.federation_id);
        out[FEDERATION_ID_LEN..FEDERATION_ID_LEN + 8].copy_from_slice(&self.round_id.to_be_bytes());
        out[FEDERATION_ID_LEN + 8..FEDERATION_ID_LEN + 8 + SHA256_LEN].copy_from_slice(&self.adapter_sha256);
        out[FEDERATION_ID_LEN + 8 + SHA256_LEN..].copy_from_slice(&self.task_sha256);
        out
    }
}

/// Phase 0, client → server: the two X25519 public keys, signed with the long-term key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedKeys {
    pub sender: ClientIndex,
    pub cipher_public_key: [u8; PUBLIC_KEY_LEN],
    pub mask_public_key: [u8; PUBLIC_KEY_LEN],
    pub signature: [u8; SIGNATURE_LEN],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdvertiseKeys {
    pub binding: RoundBinding,
    pub keys: SignedKeys,
}

/// Phase 1: Shamir shares of one client's secrets, sealed for one neighbour, with the
/// sender's commitments to the two shares inside and its signature over the lot.
///
/// The signature lets the recipient tell a sender that sealed garbage (it complains, and
/// treats the sender as dropped) from a server that altered what it forwarded (it aborts);
/// the commitments let the server check, at Unmask, that a revealed share is the one the
/// sender dealt, so that one holder's false share is discarded and the holder named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptedShares {
    pub sender: ClientIndex,
    pub recipient: ClientIndex,
    pub ciphertext: Vec<u8>,
    /// [`crate::secagg::crypto::share_commitment`] of the mask-key share.
    pub key_commitment: [u8; SHA256_LEN],
    /// The same for the self-mask-seed share.
    pub seed_commitment: [u8; SHA256_LEN],
    /// The sender's Ed25519 signature over the binding, both indices, the ciphertext's
    /// SHA-256 and both commitments.
    pub signature: [u8; SIGNATURE_LEN],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareKeys {
    pub binding: RoundBinding,
    pub shares: Vec<EncryptedShares>,
}

/// Phase 2: the masked, encoded update in Z_{2^b}.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskedInput {
    pub binding: RoundBinding,
    pub sender: ClientIndex,
    pub masked: Vec<u32>,
    /// Neighbours whose signed shares did not open or did not match their commitments:
    /// the sender treated each as dropped and left out their pairwise mask.
    pub complaints: Vec<Complaint>,
}

/// A client's statement that a neighbour sealed it unusable shares (under the neighbour's
/// own signature, so the server did not alter them). The client left out their pairwise
/// mask; it reveals that one seed so the server can remove the neighbour's half of it.
/// The seed masks nothing else: the neighbour's input stays hidden by its other pairwise
/// masks, and the complainer's own input never carried this one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Complaint {
    pub accused: ClientIndex,
    pub pairwise_seed: [u8; 32],
}

/// Phase 3: a signature over the binding and the set of clients whose input the server
/// says it received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsistencyCheck {
    pub binding: RoundBinding,
    pub sender: ClientIndex,
    pub signature: [u8; SIGNATURE_LEN],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SurvivorSignature {
    pub sender: ClientIndex,
    pub signature: [u8; SIGNATURE_LEN],
}

/// One Shamir share of a secret split into field elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShamirShare {
    /// Whose secret this is a share of.
    pub owner: ClientIndex,
    /// The evaluation point: the index of the client that held this share.
    pub x: ClientIndex,
    pub y: Vec<u64>,
    /// The salt of the owner's commitment to this share ([`EncryptedShares`]), so the
    /// server can check the share is the one the owner dealt.
    pub salt: [u8; 32],
}

/// Phase 4: shares that let the server remove the masks of the sum, and nothing more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unmask {
    pub binding: RoundBinding,
    pub sender: ClientIndex,
    pub self_mask_shares: Vec<ShamirShare>,
    pub mask_key_shares: Vec<ShamirShare>,
}
