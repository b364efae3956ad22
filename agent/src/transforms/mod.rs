//! Per-reading processing stages.

pub mod enrich;
pub mod geofence;
pub mod validate;
