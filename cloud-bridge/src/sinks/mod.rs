//! Where the bridge writes.

pub mod mysql;
