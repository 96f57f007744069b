//! Building blocks of the simulation harness: a federation on loopback with real
//! certificates and a real coordinator, real clients, scenarios and reports.

pub mod early_stopping;
pub mod federation;
pub mod load;
pub mod observe;
pub mod progress;
pub mod report;
pub mod results;
pub mod run;
pub mod scenario;
pub mod stats;
pub mod world;

/// sha256 of all-MiniLM-L6-v2's `model.safetensors`, the federation's base model.
pub fn base_model_sha256() -> [u8; 32] {
    let bytes = hex::decode(guild_client::model::MINILM_SHA256).expect("the constant is hex");
    bytes.try_into().expect("the constant is 32 bytes")
}
