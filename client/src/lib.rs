//! The Guild merchant client: everything that runs next to a merchant's own data.
//!
//! It connects to the coordinator, trains adapters locally with libtorch, privatises the
//! update and takes part in secure aggregation. Nothing leaves this process except
//! through the protocol in `guild-proto`.

pub mod config;
pub mod data;
pub mod identity;
pub mod learner;
pub mod model;
pub mod net;
pub mod participant;
pub mod retrieval;

/// The device local training runs on: the first CUDA GPU when there is one, else the CPU.
pub fn training_device() -> tch::Device {
    tch::Device::cuda_if_available()
}
