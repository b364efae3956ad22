//! Where the bridge writes.

pub mod mysql;
pub mod opensearch;
