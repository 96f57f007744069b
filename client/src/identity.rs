//! A merchant's long-term Ed25519 signing identity, kept in a PKCS#8 file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("identity file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("identity file {path} is not an Ed25519 PKCS#8 key: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("could not generate a key: the OS random source failed")]
    Random,
}

/// The merchant's signing key pair.
#[derive(Debug)]
pub struct Identity {
    key_pair: Ed25519KeyPair,
}

impl Identity {
    /// Loads the key at `path`, creating it (readable by the owner only) if absent.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        let io = |source| IdentityError::Io { path: path.to_owned(), source };
        let pkcs8 = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| IdentityError::Random)?;
                let mut options = fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut file = options.open(path).map_err(io)?;
                file.write_all(doc.as_ref()).and_then(|()| file.sync_all()).map_err(io)?;
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(io(e)),
        };
        let key_pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|e| IdentityError::Malformed { path: path.to_owned(), reason: e.to_string() })?;
        Ok(Self { key_pair })
    }

    /// The key in a PKCS#8 document (a simulated merchant's, as its certificate binds it).
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, IdentityError> {
        let key_pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|e| IdentityError::Malformed {
            path: PathBuf::from("(in memory)"),
            reason: e.to_string(),
        })?;
        Ok(Self { key_pair })
    }

    /// A fresh key that lives only in memory (tests of merchants the coordinator must refuse).
    pub fn ephemeral() -> Result<Self, IdentityError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| IdentityError::Random)?;
        let key_pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| IdentityError::Random)?;
        Ok(Self { key_pair })
    }

    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.key_pair.public_key().as_ref());
        out
    }

    /// The key pair SecAgg+ signs with.
    pub fn key_pair(&self) -> &Ed25519KeyPair {
        &self.key_pair
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.key_pair.sign(message).as_ref());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first start makes the key; every later one reads the same key back.
    #[test]
    fn key_is_created_once_then_reloaded() {
        let (_dir, path) = guild_testkit::scratch_path("merchant.key");
        let first = Identity::load_or_create(&path).expect("create");
        let again = Identity::load_or_create(&path).expect("load");
        assert_eq!(first.public_key(), again.public_key());
        let signature = again.sign(b"round 1");
        let verifier = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, first.public_key());
        assert!(verifier.verify(b"round 1", &signature).is_ok());
        assert!(verifier.verify(b"round 2", &signature).is_err());
    }

    #[test]
    fn corrupt_key_file_is_named_in_the_error() {
        let (_dir, path) = guild_testkit::scratch_path("merchant.key");
        fs::write(&path, b"not a key").expect("write");
        let error = Identity::load_or_create(&path).expect_err("must refuse");
        assert!(error.to_string().contains("merchant.key"), "{error}");
    }
}
