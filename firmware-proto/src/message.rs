//! The messages exchanged between a device and the gateway.

use heapless::{String, Vec};
use serde::{Deserialize, Serialize};

/// Longest device id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 32;
/// Most extra values a reading can carry.
pub const MAX_EXTRAS: usize = 4;

/// A device id: 1 to [`MAX_DEVICE_ID_LEN`] bytes of `[A-Za-z0-9._-]`.
pub type DeviceId = String<MAX_DEVICE_ID_LEN>;

/// Checks a device id against the rule of [`DeviceId`].
pub fn is_valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// First message of a device after boot, repeated until the gateway answers
/// with [`Message::Config`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Hello {
    pub device_id: DeviceId,
    /// Firmware version, `major << 16 | minor << 8 | patch`.
    pub firmware_version: u32,
    /// [`crate::PROTOCOL_VERSION`] spoken by the device.
    pub protocol_version: u8,
    /// Changes at every boot (a counter in flash, or an RTC-derived value):
    /// sequence numbers restart per epoch.
    pub boot_epoch: u32,
    /// Sequence number of the oldest reading the device still holds (not
    /// yet acknowledged), or of the next one it will send.
    pub next_seq: u32,
}

/// An extra sensor value beyond the fixed schema.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Extra {
    /// Application-defined key (e.g. 1 = pressure).
    pub key: u8,
    pub value: f32,
}

/// One reading, with the sensor values of the JSON schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Reading {
    /// Per boot epoch, starting at 1, increasing by one.
    pub seq: u32,
    pub boot_epoch: u32,
    /// Unix time in ms, from the device clock set by [`Message::TimeSync`].
    pub timestamp_ms: u64,
    pub temperature: f32,
    pub humidity: f32,
    pub battery: f32,
    pub lat: f64,
    pub lon: f64,
    pub speed: f32,
    pub extras: Vec<Extra, MAX_EXTRAS>,
}

/// Why a frame or reading was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame's protocol version is not spoken by the receiver.
    UnsupportedVersion,
    /// A reading arrived from a device the gateway has no `Hello` from (the
    /// gateway restarted, or the device rebooted): send `Hello` again.
    NotIdentified,
    /// The reading was stored but rejected by validation (out of range...).
    Rejected,
    /// The gateway cannot take readings now; retry later.
    Busy,
    /// The gateway saw a gap: readings from `seq` on were lost and must be
    /// sent again (sent once per gap, ahead of the retransmission timer).
    Missing,
}

/// Settings the gateway pushes to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Config {
    pub sampling_interval_ms: u32,
    pub heartbeat_interval_ms: u32,
}

/// Everything that travels in a frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Message {
    Hello(Hello),
    Reading(Reading),
    /// Every reading of `boot_epoch` with `seq <= cumulative` is durable at
    /// the gateway; the device may forget them.
    Ack {
        boot_epoch: u32,
        cumulative: u32,
    },
    /// The reading `seq` was taken (and is covered by an `Ack`) but refused.
    Nack {
        boot_epoch: u32,
        seq: u32,
        code: ErrorCode,
    },
    Error {
        code: ErrorCode,
    },
    Heartbeat {
        uptime_ms: u64,
    },
    Config(Config),
    /// The gateway's Unix time in ms when it sent this.
    TimeSync {
        unix_ms: u64,
    },
}
