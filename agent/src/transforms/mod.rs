//! Per-reading processing stages.

pub mod geofence;
pub mod validate;
