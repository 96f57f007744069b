//! Guild's wire protocol (`guild.v1`) and the one place where wire types become domain
//! types.
//!
//! **Architecture invariant:** only this crate knows protobuf types. Everything the
//! network hands us is validated exactly once, here, by a `TryFrom` into a domain type
//! from [`domain`] or `guild_privacy::secagg::message`; the rest of the workspace never
//! sees an unchecked field.

pub mod adapter;
pub mod average;
pub mod certificate;
pub mod config_file;
pub mod convert;
pub mod domain;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod limits;
pub mod pki;
pub mod round;
pub mod spectral;
pub mod tower;

pub use error::WireError;

/// What every wire message is (for size accounting and generic handlers); callers name
/// it through this crate rather than depending on the protobuf library.
pub use prost::Message as WireMessage;

/// Generated protobuf messages and tonic stubs.
#[allow(missing_debug_implementations, unused_qualifications, clippy::all)]
pub mod v1 {
    tonic::include_proto!("guild.v1");
}

/// The protocol version this build speaks. 2: SecAgg+ masks are expanded with AES-256-CTR
/// (ChaCha20 in 1), and a round without noise is encoded without rotation or padding; a
/// client of another version would mask with a different generator, so registration refuses it.
pub const PROTOCOL_VERSION: u32 = 2;
