//! Guild's cross-crate tests, compiled into one test binary.

mod architecture;
mod data;
mod model;
mod registration;
mod rounds;
