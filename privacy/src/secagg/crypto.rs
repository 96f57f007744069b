//! The cryptographic primitives of SecAgg+: X25519 agreement with shareable secrets
//! (x25519-dalek static secrets; ring cannot export a private key), HKDF-SHA256,
//! ChaCha20-Poly1305 and Ed25519 from ring, and AES-256 in counter mode as the mask
//! generator (the PRG of Bonawitz et al.'s implementation; with AES-NI it expands a seed
//! about three times as fast as ChaCha20 did here, and expanding masks is most of a
//! client's and the server's work in a round of millions of coordinates).
//!
//! Every derived key is bound to the round (the HKDF salt is the `RoundBinding`) and to
//! its purpose (the HKDF info), so no key serves two roles or two rounds.

use ctr::cipher::{KeyIvInit, StreamCipher};
use rand_core::{CryptoRng, RngCore};
use ring::{aead, digest, hkdf, signature};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroize;

use super::message::{ClientIndex, RoundBinding};

const SHARE_ENCRYPTION: &[u8] = b"guild secagg+ v1 share encryption";
const PAIRWISE_MASK: &[u8] = b"guild secagg+ v1 pairwise mask";
const SELF_MASK: &[u8] = b"guild secagg+ v1 self mask";

/// An X25519 key pair whose secret can be exported (to be Shamir-shared).
#[derive(Clone)]
pub struct AgreementKey {
    secret: StaticSecret,
    public: [u8; 32],
}

impl std::fmt::Debug for AgreementKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgreementKey").field("public", &self.public).finish_non_exhaustive()
    }
}

impl AgreementKey {
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        Self::from_secret_bytes(random_bytes(rng))
    }

    pub fn from_secret_bytes(bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret).to_bytes();
        Self { secret, public }
    }

    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// HKDF(ECDH(self, peer)) for `purpose`; `None` if the peer's key is of low order
    /// (the shared secret would not depend on our key).
    fn derive(&self, peer: &[u8; 32], binding: &RoundBinding, purpose: &[u8]) -> Option<[u8; 32]> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer));
        if !shared.was_contributory() {
            return None;
        }
        Some(hkdf_32(shared.as_bytes(), binding, purpose))
    }

    /// The key that seals shares between `self` and `peer` (the same from both sides).
    pub fn share_key(&self, peer: &[u8; 32], binding: &RoundBinding) -> Option<[u8; 32]> {
        self.derive(peer, binding, SHARE_ENCRYPTION)
    }

    /// The seed of the pairwise mask between `self` and `peer`.
    pub fn pairwise_seed(&self, peer: &[u8; 32], binding: &RoundBinding) -> Option<[u8; 32]> {
        self.derive(peer, binding, PAIRWISE_MASK)
    }
}

/// Whether `public` is a usable X25519 public key: not of low order. X25519 clamps every
/// secret to a multiple of the cofactor 8, so ECDH with a point of order dividing 8 is all
/// zeros whatever the secret (RFC 7748 §6.1) and with any other point is not; one ECDH with
/// a fixed clamped scalar tells the two apart. The server checks advertised keys with it,
/// so that one merchant's bad key is refused at AdvertiseKeys instead of making each of
/// its neighbours abort.
pub fn is_usable_agreement_key(public: &[u8; 32]) -> bool {
    const PROBE: [u8; 32] = [0x5a; 32];
    StaticSecret::from(PROBE).diffie_hellman(&PublicKey::from(*public)).was_contributory()
}

pub fn random_bytes(rng: &mut (impl RngCore + CryptoRng)) -> [u8; 32] {
    let mut out = [0u8; 32];
    rng.fill_bytes(&mut out);
    out
}

fn hkdf_32(ikm: &[u8], binding: &RoundBinding, info: &[u8]) -> [u8; 32] {
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, &binding.to_bytes());
    let mut out = [0u8; 32];
    salt.extract(ikm)
        .expand(&[info], hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out))
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// Which of a client's two secrets a Shamir share belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedSecret {
    MaskKey,
    SelfMaskSeed,
}

/// The commitment the owner of a secret publishes (inside its signed sealed shares) to the
/// share it deals `holder`: SHA-256 over a domain tag, the binding, both indices, which
/// secret, a 32-byte random salt and the share's field elements. Hiding (the salt is secret
/// until the holder reveals the share) and binding (a holder cannot reveal another share).
pub fn share_commitment(
    binding: &RoundBinding,
    owner: ClientIndex,
    holder: ClientIndex,
    secret: SharedSecret,
    salt: &[u8; 32],
    values: &[u64],
) -> [u8; 32] {
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(b"guild secagg+ v1 share commitment");
    context.update(&binding.to_bytes());
    context.update(&owner.get().to_be_bytes());
    context.update(&holder.get().to_be_bytes());
    context.update(&[match secret {
        SharedSecret::MaskKey => 1,
        SharedSecret::SelfMaskSeed => 2,
    }]);
    context.update(salt);
    for value in values {
        context.update(&value.to_be_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

/// The seed of a client's self mask, derived from its secret b.
pub fn self_mask_seed(b: &[u8; 32], binding: &RoundBinding) -> [u8; 32] {
    hkdf_32(b, binding, SELF_MASK)
}

fn nonce(sender: ClientIndex, recipient: ClientIndex) -> aead::Nonce {
    // Each share key is used once in each direction: (sender, recipient) makes it unique.
    let mut bytes = [0u8; aead::NONCE_LEN];
    bytes[..4].copy_from_slice(&sender.get().to_be_bytes());
    bytes[4..8].copy_from_slice(&recipient.get().to_be_bytes());
    aead::Nonce::assume_unique_for_key(bytes)
}

fn aad(binding: &RoundBinding, sender: ClientIndex, recipient: ClientIndex) -> Vec<u8> {
    let mut out = binding.to_bytes().to_vec();
    out.extend_from_slice(&sender.get().to_be_bytes());
    out.extend_from_slice(&recipient.get().to_be_bytes());
    out
}

/// ChaCha20-Poly1305 seal of `plaintext` from `sender` to `recipient`.
pub fn seal(
    key: &[u8; 32],
    binding: &RoundBinding,
    sender: ClientIndex,
    recipient: ClientIndex,
    plaintext: &[u8],
) -> Vec<u8> {
    let key = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::CHACHA20_POLY1305, key).expect("32-byte ChaCha20-Poly1305 key"),
    );
    let mut buffer = plaintext.to_vec();
    key.seal_in_place_append_tag(
        nonce(sender, recipient),
        aead::Aad::from(aad(binding, sender, recipient)),
        &mut buffer,
    )
    .expect("a short buffer always seals");
    buffer
}

/// Opens what [`seal`] produced; `None` if it was altered, misaddressed or from another
/// round.
pub fn open(
    key: &[u8; 32],
    binding: &RoundBinding,
    sender: ClientIndex,
    recipient: ClientIndex,
    ciphertext: &[u8],
) -> Option<Vec<u8>> {
    let key = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::CHACHA20_POLY1305, key).ok()?);
    let mut buffer = ciphertext.to_vec();
    let plain = key
        .open_in_place(
            nonce(sender, recipient),
            aead::Aad::from(aad(binding, sender, recipient)),
            &mut buffer,
        )
        .ok()?;
    Some(plain.to_vec())
}

/// A merchant's long-term Ed25519 key, which signs its SecAgg+ messages.
pub type SigningKey = signature::Ed25519KeyPair;

/// Checks an Ed25519 signature under a long-term public key.
pub fn verify(public_key: &[u8; 32], message: &[u8], sig: &[u8; 64]) -> bool {
    signature::UnparsedPublicKey::new(&signature::ED25519, public_key).verify(message, sig).is_ok()
}

pub fn sign(key: &SigningKey, message: &[u8]) -> [u8; 64] {
    let mut out = [0u8; 64];
    out.copy_from_slice(key.sign(message).as_ref());
    out
}

/// How a mask is applied to a vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskSign {
    Add,
    Subtract,
}

/// The mask generator: AES-256 keyed by a 32-byte seed, in counter mode from the all-zero
/// 128-bit block, the counter big-endian (NIST SP 800-38A's CTR with `Ctr128BE`).
pub type MaskCipher = ctr::Ctr128BE<aes::Aes256>;

/// Adds (or subtracts) the keystream of [`MaskCipher`] keyed by `seed`, read as
/// little-endian u32 words, to `acc` mod 2^`bit_width`.
pub fn apply_mask(acc: &mut [u32], seed: &[u8; 32], sign: MaskSign, bit_width: u32) {
    const BLOCK_WORDS: usize = 4096;
    let mut cipher = MaskCipher::new(seed.into(), &[0u8; 16].into());
    let mut bytes = [0u8; BLOCK_WORDS * 4];
    let mask = if bit_width == 32 { u32::MAX } else { (1u32 << bit_width) - 1 };
    for chunk in acc.chunks_mut(BLOCK_WORDS) {
        let stream = &mut bytes[..chunk.len() * 4];
        stream.fill(0);
        cipher.apply_keystream(stream);
        for (a, word) in chunk.iter_mut().zip(stream.chunks_exact(4)) {
            let w = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            *a = match sign {
                MaskSign::Add => a.wrapping_add(w),
                MaskSign::Subtract => a.wrapping_sub(w),
            } & mask;
        }
    }
    bytes.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn binding(round_id: u64) -> RoundBinding {
        RoundBinding { federation_id: [1; 16], round_id, adapter_sha256: [2; 32], task_sha256: [3; 32] }
    }

    fn index(i: u32) -> ClientIndex {
        ClientIndex::new(i).expect("non-zero")
    }

    /// RFC 7748 §6.1: Alice's and Bob's X25519 keys and their shared secret.
    #[test]
    fn x25519_known_answer_rfc7748() {
        let alice = AgreementKey::from_secret_bytes(hex32(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        let bob = AgreementKey::from_secret_bytes(hex32(
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        ));
        assert_eq!(alice.public(), hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"));
        assert_eq!(bob.public(), hex32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"));
        let shared = alice.secret.diffie_hellman(&PublicKey::from(bob.public()));
        assert_eq!(
            *shared.as_bytes(),
            hex32("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
        );
    }

    /// NIST SP 800-38A F.5.5 (CTR-AES256.Encrypt): the mask cipher is AES-256 in counter
    /// mode with a big-endian 128-bit counter; then `apply_mask` adds exactly its keystream
    /// from the all-zero counter block, each 16-byte block the AES-256 encryption of its
    /// index (checked block by block with the block cipher itself).
    #[test]
    fn aes256_ctr_mask_known_answer_sp800_38a() {
        use aes::cipher::{BlockEncrypt, KeyInit};
        let key: [u8; 32] = hex_n("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4");
        let mut text: [u8; 64] = hex_n(
            "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51\
             30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710",
        );
        let mut cipher = MaskCipher::new(&key.into(), &hex16("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff").into());
        cipher.apply_keystream(&mut text);
        let expected: [u8; 64] = hex_n(
            "601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5\
             2b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6",
        );
        assert_eq!(text, expected);
        // 48 words: three blocks, the counter carried into the second and third.
        let mut words = vec![0u32; 12];
        apply_mask(&mut words, &key, MaskSign::Add, 32);
        let block_cipher = aes::Aes256::new(&key.into());
        for (i, chunk) in words.chunks_exact(4).enumerate() {
            let mut block = aes::Block::from((i as u128).to_be_bytes());
            block_cipher.encrypt_block(&mut block);
            let expect: Vec<u32> =
                block.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
            assert_eq!(chunk, expect.as_slice(), "block {i}");
        }
        apply_mask(&mut words, &key, MaskSign::Subtract, 32);
        assert!(words.iter().all(|&w| w == 0), "subtracting the same mask restores the input");
    }

    #[test]
    fn both_sides_derive_the_same_keys_bound_to_the_round() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let (a, b) = (AgreementKey::generate(&mut rng), AgreementKey::generate(&mut rng));
        assert_eq!(a.share_key(&b.public(), &binding(1)), b.share_key(&a.public(), &binding(1)));
        assert_ne!(a.share_key(&b.public(), &binding(1)), a.share_key(&b.public(), &binding(2)));
        assert_ne!(a.share_key(&b.public(), &binding(1)), a.pairwise_seed(&b.public(), &binding(1)));
        // A low-order point (here the all-zero key) is refused.
        assert_eq!(a.share_key(&[0u8; 32], &binding(1)), None);
    }

    #[test]
    fn sealed_shares_open_only_for_the_right_pair_and_round() {
        let key = [5u8; 32];
        let sealed = seal(&key, &binding(1), index(1), index(2), b"share");
        assert_eq!(open(&key, &binding(1), index(1), index(2), &sealed).as_deref(), Some(&b"share"[..]));
        assert_eq!(open(&key, &binding(2), index(1), index(2), &sealed), None);
        assert_eq!(open(&key, &binding(1), index(2), index(1), &sealed), None);
        let mut tampered = sealed.clone();
        tampered[0] ^= 1;
        assert_eq!(open(&key, &binding(1), index(1), index(2), &tampered), None);
    }

    fn hex32(s: &str) -> [u8; 32] {
        hex_n(s)
    }
    fn hex16(s: &str) -> [u8; 16] {
        hex_n(s)
    }
    fn hex_n<const N: usize>(s: &str) -> [u8; N] {
        std::array::from_fn(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
    }
}
