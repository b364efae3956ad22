//! Where the bridge writes.

pub mod dlq;
pub mod mysql;
pub mod offsets;
pub mod opensearch;
