//! The Guild merchant client: everything that runs next to a merchant's own data.
//!
//! It connects to the coordinator, trains adapters locally with libtorch, privatises the
//! update and takes part in secure aggregation. Nothing leaves this process except
//! through the protocol in `guild-proto`.

pub mod config;
pub mod data;
pub mod faults;
pub mod identity;
pub mod learner;
pub mod ledger;
pub mod model;
pub mod net;
pub mod participant;
pub mod retrieval;
pub mod serve;

/// The device local training runs on: the first CUDA GPU when there is one, else the CPU.
pub fn training_device() -> tch::Device {
    tch::Device::cuda_if_available()
}

/// Logs to stderr, filtered by `RUST_LOG` (else `default_filter`), with colours only when
/// stderr is a terminal, so that a log piped to a file stays plain text.
pub fn init_logging(default_filter: &str) {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
