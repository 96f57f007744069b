//! The Guild coordinator: a long-running daemon at the platform that registers merchants,
//! schedules rounds, runs the server side of secure aggregation, keeps the privacy ledger
//! and stores every adapter version.
//!
//! **Architecture invariant:** the coordinator never links libtorch. It aggregates flat
//! integer vectors and knows the adapter only by its manifest.

pub mod average;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod metrics;
pub mod plan;
pub mod service;
pub mod store;
