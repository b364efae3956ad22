//! Where readings come from.

pub mod demo;
pub mod mqtt;
pub mod serial;
