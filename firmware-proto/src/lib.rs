//! Wire protocol shared by device firmware and the gateway.
//!
//! `no_std` and allocation-free. The serial framing, messages and the link
//! state machine arrive with the serial-path work; this crate already pins
//! the constants both sides must agree on.
#![no_std]

/// Version of the wire protocol spoken by this crate.
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest encoded frame, in bytes, either side accepts. Anything longer is
/// rejected before it is buffered, so a noisy line cannot exhaust memory.
pub const MAX_FRAME_SIZE_BYTES: usize = 512;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_bound_fits_a_reading_with_headroom() {
        // A reading carries ~10 scalar fields; postcard encodes each in at
        // most 10 bytes. The bound must leave room for the frame overhead.
        assert!(MAX_FRAME_SIZE_BYTES >= 10 * 10 + 64);
        assert_eq!(PROTOCOL_VERSION, 1);
    }
}
