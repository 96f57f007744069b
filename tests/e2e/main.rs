//! Guild's cross-crate tests, compiled into one test binary.

mod architecture;
mod attacks;
mod bad_input;
mod crash;
mod data;
mod deployment;
mod harness;
mod model;
mod registration;
mod rounds;
mod serving;
mod simulation;
