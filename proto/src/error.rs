//! The error every wire → domain conversion returns, naming the offending field.

use std::fmt;

/// A message from the network that is malformed. Each variant names the field, so the
/// peer (and the log) learns exactly what was wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("{field}: missing")]
    Missing { field: Field },
    #[error("{field}: expected {expected} bytes, got {actual}")]
    Length { field: Field, expected: usize, actual: usize },
    #[error("{field}: {actual} items, at most {max} allowed")]
    TooMany { field: Field, max: usize, actual: usize },
    #[error("{field}: {reason}")]
    Invalid { field: Field, reason: String },
}

/// A dotted path into a message, such as `RoundTask.secagg.threshold`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field(pub &'static str);

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl WireError {
    pub(crate) fn missing(field: &'static str) -> Self {
        Self::Missing { field: Field(field) }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid { field: Field(field), reason: reason.into() }
    }
}

impl From<WireError> for tonic::Status {
    fn from(error: WireError) -> Self {
        tonic::Status::invalid_argument(format!("malformed message: {error}"))
    }
}
