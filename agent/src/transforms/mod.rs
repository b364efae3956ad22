//! Per-reading processing stages.

pub mod validate;
