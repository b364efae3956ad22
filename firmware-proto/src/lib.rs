//! Wire protocol shared by device firmware and the gateway.
//!
//! `no_std` and allocation-free: messages ([`message`]) are encoded with
//! postcard, framed with COBS and a CRC-32C ([`frame`]), and carried by a
//! sans-IO link layer ([`link`]) with cumulative acknowledgements,
//! retransmission with backoff, duplicate suppression and resynchronisation.
//! Timing constants are [`embassy_time::Duration`]s so firmware and gateway
//! agree on them.
//!
//! # Driving the link from firmware
//!
//! The link owns no UART and no clock: an embassy task reads bytes, passes
//! them in with the current time, writes whatever frames the link has, and
//! sleeps until [`link::DeviceLink::poll_timeout`]. The same loop, with a
//! plain counter for time, runs on the host:
//!
//! ```
//! use embassy_time::{Duration, Instant};
//! use firmware_proto::frame::MAX_FRAME_SIZE_BYTES;
//! use firmware_proto::link::{DeviceLink, GatewayLink, GatewayEvent};
//! use firmware_proto::message::{Config, Reading};
//!
//! let mut now = Instant::from_millis(0);
//! let mut device: DeviceLink = DeviceLink::new(1, "pump-7".try_into().unwrap(), 0x010200, 42, now);
//! let mut gateway: GatewayLink = GatewayLink::new(Config { sampling_interval_ms: 1000, heartbeat_interval_ms: 5000 });
//! let mut buf = [0u8; MAX_FRAME_SIZE_BYTES];
//! let reading = Reading {
//!     seq: 0, boot_epoch: 0, timestamp_ms: 0, temperature: 21.5, humidity: 40.0,
//!     battery: 90.0, lat: 48.1, lon: 11.5, speed: 0.0, extras: Default::default(),
//! };
//! device.send(reading, now).unwrap();
//! let mut stored = 0;
//! for _ in 0..10 {
//!     // In firmware: `uart.write(&buf[..n]).await` and `uart.read(..)`.
//!     while let Some(n) = device.poll_transmit(now, &mut buf) {
//!         gateway.handle_bytes(&buf[..n], now, 1_700_000_000_000);
//!     }
//!     while let Some(event) = gateway.poll_event() {
//!         if let GatewayEvent::Reading { address, reading, .. } = event {
//!             // The gateway makes it durable, then acknowledges.
//!             gateway.handle_durable(address, reading.boot_epoch, reading.seq);
//!             stored += 1;
//!         }
//!     }
//!     while let Some(n) = gateway.poll_transmit(&mut buf) {
//!         device.handle_bytes(&buf[..n], now);
//!     }
//!     // In firmware: `Timer::at(device.poll_timeout()).await`.
//!     now = now + Duration::from_millis(10);
//!     device.handle_timeout(now);
//! }
//! assert_eq!(stored, 1);
//! assert_eq!(device.unacked(), 0);
//! ```
#![no_std]
#![forbid(unsafe_code)]

// First, so every module can log through it.
mod fmt;

pub mod frame;
pub mod link;
pub mod message;

/// Version of the wire protocol spoken by this crate; the first byte of
/// every frame.
pub const PROTOCOL_VERSION: u8 = 1;

pub use frame::MAX_FRAME_SIZE_BYTES;
