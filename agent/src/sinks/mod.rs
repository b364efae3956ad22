//! Where the agent sends data.

pub mod kafka;
