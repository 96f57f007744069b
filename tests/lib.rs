//! Holds nothing: this package exists for its test binary `e2e` (see `e2e/main.rs`).
