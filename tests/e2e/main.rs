//! Guild's cross-crate tests, compiled into one test binary.

mod architecture;
mod model;
mod registration;
