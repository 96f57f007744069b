//! Wire ↔ domain conversions, one module per message family. Wire → domain is a `TryFrom`
//! that validates every field and names the first bad one; domain → wire is a plain `From`.

mod registration;
mod secagg;
mod task;
mod transfer;

pub use secagg::{
    inbox_from_wire, inbox_to_wire, roster_from_wire, roster_to_wire, signatures_from_wire,
    signatures_to_wire, survivors_from_wire, survivors_to_wire,
};
pub use task::task_digest;

use std::time::Duration;

use guild_privacy::secagg::message as sa;
use guild_privacy::{PrivacyMode, PrivacyUnit};

use crate::domain::*;
use crate::error::{Field, WireError};
use crate::limits::*;
use crate::round::{RoundKind, TrainedPart};
use crate::tower::TowerShape;
use crate::v1;

type Result<T> = std::result::Result<T, WireError>;

fn fixed<const N: usize>(bytes: &[u8], field: &'static str) -> Result<[u8; N]> {
    bytes.try_into().map_err(|_| WireError::Length { field: Field(field), expected: N, actual: bytes.len() })
}

fn index(value: u32, field: &'static str) -> Result<sa::ClientIndex> {
    sa::ClientIndex::new(value).ok_or_else(|| WireError::invalid(field, "client index 0 is reserved"))
}

fn bounded<T>(items: &[T], max: usize, field: &'static str) -> Result<()> {
    if items.len() > max {
        return Err(WireError::TooMany { field: Field(field), max, actual: items.len() });
    }
    Ok(())
}

fn required<T>(value: Option<T>, field: &'static str) -> Result<T> {
    value.ok_or(WireError::missing(field))
}

fn positive_finite(value: f64, field: &'static str) -> Result<f64> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(WireError::invalid(field, format!("must be a positive finite number, got {value}")))
    }
}

fn non_negative_finite(value: f64, field: &'static str) -> Result<f64> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(WireError::invalid(field, format!("must be a finite number ≥ 0, got {value}")))
    }
}

fn merchant_id(id: &str, field: &'static str) -> Result<MerchantId> {
    MerchantId::parse(id)
        .ok_or_else(|| WireError::invalid(field, "must be 1 to 128 ASCII letters, digits, '-', '_' or '.'"))
}
