//! Decoding and validation of device readings.
//!
//! Every rejection carries a stable, machine-readable [`RejectReason`] and a
//! message for people; nothing here panics on any input.

use std::borrow::Cow;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::{ValidationConfig, is_valid_id};

/// Why an input was rejected. The codes are a contract: dashboards and the
/// dead-letter topic use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum RejectReason {
    PayloadTooLarge,
    UnknownTopic,
    UnsupportedEncoding,
    MalformedFrame,
    InvalidDeviceId,
    MalformedJson,
    NotAnObject,
    MissingField,
    WrongType,
    OutOfRange,
    DeviceIdMismatch,
    TimestampSkew,
    UnknownDevice,
}

impl RejectReason {
    pub const ALL: [RejectReason; 13] = [
        Self::PayloadTooLarge,
        Self::UnknownTopic,
        Self::UnsupportedEncoding,
        Self::MalformedFrame,
        Self::InvalidDeviceId,
        Self::MalformedJson,
        Self::NotAnObject,
        Self::MissingField,
        Self::WrongType,
        Self::OutOfRange,
        Self::DeviceIdMismatch,
        Self::TimestampSkew,
        Self::UnknownDevice,
    ];

    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnknownTopic => "unknown_topic",
            Self::UnsupportedEncoding => "unsupported_encoding",
            Self::MalformedFrame => "malformed_frame",
            Self::InvalidDeviceId => "invalid_device_id",
            Self::MalformedJson => "malformed_json",
            Self::NotAnObject => "not_an_object",
            Self::MissingField => "missing_field",
            Self::WrongType => "wrong_type",
            Self::OutOfRange => "out_of_range",
            Self::DeviceIdMismatch => "device_id_mismatch",
            Self::TimestampSkew => "timestamp_skew",
            Self::UnknownDevice => "unknown_device",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }
}

/// A rejected input: the reason code and a message naming what was wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Largest device sequence number when the reading also carries a boot
/// epoch: the gateway keys on `epoch << 32 | seq`.
pub const MAX_SEQ_WITH_EPOCH: u64 = u32::MAX as u64;
/// Largest boot epoch (keeps the folded key a positive SQLite integer).
pub const MAX_EPOCH: u64 = i32::MAX as u64;
/// Largest sequence number without an epoch (SQLite integers are i64).
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// A valid reading.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reading {
    pub device_id: String,
    /// The key the gateway deduplicates on: the device's `seq`, with its
    /// boot epoch folded in when one was given.
    pub seq: u64,
    /// `seq` exactly as the device sent it.
    pub device_seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    pub ts: i64,
    pub temperature: f64,
    pub humidity: f64,
    pub battery: f64,
    pub lat: f64,
    pub lon: f64,
    pub speed: f64,
    /// Extra fields the device sent, kept as they were.
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub attributes: Map<String, Value>,
    /// How the six values were written in the text they were read from.
    #[serde(skip)]
    pub decimals: Decimals,
}

/// The number of decimals each of a reading's six values (temperature,
/// humidity, battery, lat, lon, speed) had in its JSON text, when that text
/// was plain (no exponent, at most 19 digits), else [`Decimals::UNKNOWN`].
///
/// A hint for storage: a sensor's `21.53` can be stored as the integer 2153
/// with its two decimals, in three bytes rather than eight. The outbox
/// relies on it only after checking that the integer gives back the value
/// exactly, so a wrong hint costs bytes, never a changed value. Not part of
/// what a reading is: readings with the same fields compare equal whatever
/// their hints.
#[derive(Debug, Clone, Copy)]
pub struct Decimals(pub [u8; 6]);

impl Decimals {
    /// Not known for that value.
    pub const UNKNOWN: u8 = u8::MAX;
}

impl Default for Decimals {
    fn default() -> Self {
        Self([Self::UNKNOWN; 6])
    }
}

impl PartialEq for Decimals {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// What an MQTT topic says about its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicKind<'a> {
    /// `devices/{id}/telemetry`: one JSON reading.
    Telemetry(&'a str),
    /// `devices/{id}/telemetry/bin`: a firmware-proto frame.
    TelemetryBin(&'a str),
}

/// Parses `{prefix}devices/{device_id}/telemetry[/bin]`.
pub fn parse_topic<'a>(prefix: &str, topic: &'a str) -> Result<TopicKind<'a>, Rejection> {
    let unknown = || {
        Rejection::new(
            RejectReason::UnknownTopic,
            format!("topic {topic:?} is not {prefix}devices/{{device_id}}/telemetry"),
        )
    };
    let rest = topic.strip_prefix(prefix).ok_or_else(unknown)?;
    let mut levels = rest.split('/');
    let (Some("devices"), Some(device_id), Some("telemetry")) =
        (levels.next(), levels.next(), levels.next())
    else {
        return Err(unknown());
    };
    let kind = match (levels.next(), levels.next()) {
        (None, _) => TopicKind::Telemetry(device_id),
        (Some("bin"), None) => TopicKind::TelemetryBin(device_id),
        _ => return Err(unknown()),
    };
    if !is_valid_id(device_id) {
        return Err(Rejection::new(
            RejectReason::InvalidDeviceId,
            format!(
                "device id {device_id:?} in topic is not 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'"
            ),
        ));
    }
    Ok(kind)
}

const KNOWN_FIELDS: [&str; 11] = [
    "device_id",
    "seq",
    "ts",
    "temperature",
    "humidity",
    "battery",
    "lat",
    "lon",
    "speed",
    "epoch",
    "attributes",
];

/// Decodes and validates one JSON reading. `topic_device` is the device id
/// from the topic, which the payload must repeat.
///
/// Three paths, each tried when the one before cannot read the input:
///
/// 1. the scanner ([`scan`]): the common shape of a reading (one flat
///    object of the schema's fields, no escapes, no extra fields) read in
///    one pass over the bytes, with no allocation but the device id;
/// 2. one pass of serde over the bytes into typed fields, no intermediate
///    JSON tree: extra fields, attributes, escapes;
/// 3. the general path: a JSON tree, then field by field, naming exactly
///    what is wrong (a missing field, a wrong type, bad JSON).
///
/// All three give the same result for every input (tested).
pub fn decode_reading(
    payload: &[u8],
    topic_device: Option<&str>,
    now_ms: i64,
    limits: &ValidationConfig,
) -> Result<Reading, Rejection> {
    decode_reading_reusing(payload, topic_device, now_ms, limits, &mut Vec::new())
}

/// [`decode_reading`], taking the device id's `String` from `spare` when it
/// holds one: a caller that gives the ids of readings it is done with back
/// to `spare` saves an allocation and a free per reading.
pub fn decode_reading_reusing(
    payload: &[u8],
    topic_device: Option<&str>,
    now_ms: i64,
    limits: &ValidationConfig,
    spare: &mut Vec<String>,
) -> Result<Reading, Rejection> {
    if payload.len() > limits.max_payload_bytes {
        return decode_reading_general(payload, topic_device, now_ms, limits);
    }
    if let Some(parts) = scan::parts(payload) {
        return parts.finish(topic_device, now_ms, limits, spare);
    }
    if let Ok(wire) = serde_json::from_slice::<fast::Wire<'_>>(payload)
        && let Some(reading) = wire.complete()
    {
        return reading.finish(topic_device, now_ms, limits, spare);
    }
    decode_reading_general(payload, topic_device, now_ms, limits)
}

/// Parsed, not yet checked fields of a JSON reading.
struct Parts<'a> {
    device_id: Cow<'a, str>,
    device_seq: u64,
    epoch: Option<u64>,
    ts: i64,
    temperature: f64,
    humidity: f64,
    battery: f64,
    lat: f64,
    lon: f64,
    speed: f64,
    attributes: Map<String, Value>,
    decimals: Decimals,
}

impl Parts<'_> {
    /// The checks on values, in the general path's order. The device id
    /// goes into a `String` of `spare` if it has one.
    fn finish(
        self,
        topic_device: Option<&str>,
        now_ms: i64,
        limits: &ValidationConfig,
        spare: &mut Vec<String>,
    ) -> Result<Reading, Rejection> {
        check_device_id(&self.device_id, topic_device)?;
        let seq = fold_seq(self.device_seq, self.epoch)?;
        check_timestamp(self.ts, now_ms, limits)?;
        check_ranges(
            self.temperature,
            self.humidity,
            self.battery,
            self.lat,
            self.lon,
            self.speed,
        )?;
        let device_id = match (self.device_id, spare.pop()) {
            (Cow::Borrowed(id), Some(mut reused)) => {
                reused.clear();
                reused.push_str(id);
                reused
            }
            (id, reused) => {
                spare.extend(reused);
                id.into_owned()
            }
        };
        Ok(Reading {
            device_id,
            seq,
            device_seq: self.device_seq,
            epoch: self.epoch,
            ts: self.ts,
            temperature: self.temperature,
            humidity: self.humidity,
            battery: self.battery,
            lat: self.lat,
            lon: self.lon,
            speed: self.speed,
            attributes: self.attributes,
            decimals: self.decimals,
        })
    }
}

/// The payload's device id is well formed and the one its topic names.
fn check_device_id(device_id: &str, topic_device: Option<&str>) -> Result<(), Rejection> {
    if !is_valid_id(device_id) {
        return Err(Rejection::new(
            RejectReason::InvalidDeviceId,
            format!(
                "device_id {device_id:?} is not 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'"
            ),
        ));
    }
    if let Some(expected) = topic_device
        && expected != device_id
    {
        return Err(Rejection::new(
            RejectReason::DeviceIdMismatch,
            format!("payload device_id {device_id:?} differs from topic device {expected:?}"),
        ));
    }
    Ok(())
}

/// The key the gateway dedupes on: `epoch << 32 | seq` with an epoch.
fn fold_seq(device_seq: u64, epoch: Option<u64>) -> Result<u64, Rejection> {
    match epoch {
        Some(epoch) => {
            if epoch > MAX_EPOCH {
                return Err(out_of_range(
                    "epoch",
                    epoch as f64,
                    &format!("0 to {MAX_EPOCH}"),
                ));
            }
            if device_seq > MAX_SEQ_WITH_EPOCH {
                return Err(out_of_range(
                    "seq",
                    device_seq as f64,
                    &format!("0 to {MAX_SEQ_WITH_EPOCH} when an epoch is given"),
                ));
            }
            Ok((epoch << 32) | device_seq)
        }
        None => {
            if device_seq > MAX_SEQ {
                return Err(out_of_range(
                    "seq",
                    device_seq as f64,
                    &format!("0 to {MAX_SEQ}"),
                ));
            }
            Ok(device_seq)
        }
    }
}

/// The fast path's single-pass reader.
mod fast {
    use std::borrow::Cow;
    use std::fmt;

    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
    use serde_json::{Map, Value};

    use super::{KNOWN_FIELDS, Parts};

    /// A string borrowed from the input when it has no escapes.
    struct Str<'a>(Cow<'a, str>);

    impl<'de> Deserialize<'de> for Str<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Str<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Str<'de>, E> {
                    Ok(Str(Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> Result<Str<'de>, E> {
                    Ok(Str(Cow::Owned(v.to_string())))
                }
                fn visit_string<E>(self, v: String) -> Result<Str<'de>, E> {
                    Ok(Str(Cow::Owned(v)))
                }
            }
            d.deserialize_str(V)
        }
    }

    #[derive(Default)]
    pub(super) struct Wire<'a> {
        device_id: Option<Cow<'a, str>>,
        seq: Option<u64>,
        epoch: Option<u64>,
        ts: Option<i64>,
        temperature: Option<f64>,
        humidity: Option<f64>,
        battery: Option<f64>,
        lat: Option<f64>,
        lon: Option<f64>,
        speed: Option<f64>,
        attributes: Option<Map<String, Value>>,
        extra: Map<String, Value>,
    }

    impl<'a> Wire<'a> {
        /// All required fields, or `None` (the general path explains).
        pub(super) fn complete(self) -> Option<Parts<'a>> {
            let mut attributes = self.attributes.unwrap_or_default();
            for (key, value) in self.extra {
                attributes.insert(key, value);
            }
            Some(Parts {
                device_id: self.device_id?,
                device_seq: self.seq?,
                epoch: self.epoch,
                ts: self.ts?,
                temperature: self.temperature?,
                humidity: self.humidity?,
                battery: self.battery?,
                lat: self.lat?,
                lon: self.lon?,
                speed: self.speed?,
                attributes,
                decimals: super::Decimals::default(),
            })
        }
    }

    impl<'de> Deserialize<'de> for Wire<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Wire<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a reading object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Wire<'de>, A::Error> {
                    let mut w = Wire::default();
                    while let Some(Str(key)) = map.next_key::<Str<'de>>()? {
                        match key.as_ref() {
                            "device_id" => w.device_id = Some(map.next_value::<Str<'de>>()?.0),
                            "seq" => w.seq = Some(map.next_value()?),
                            "epoch" => w.epoch = map.next_value()?,
                            "ts" => w.ts = Some(map.next_value()?),
                            "temperature" => w.temperature = Some(map.next_value()?),
                            "humidity" => w.humidity = Some(map.next_value()?),
                            "battery" => w.battery = Some(map.next_value()?),
                            "lat" => w.lat = Some(map.next_value()?),
                            "lon" => w.lon = Some(map.next_value()?),
                            "speed" => w.speed = Some(map.next_value()?),
                            "attributes" => w.attributes = map.next_value()?,
                            other => {
                                debug_assert!(!KNOWN_FIELDS.contains(&other));
                                let value = map.next_value::<Value>()?;
                                // A repeated key: the last one counts, as in
                                // the general path.
                                w.extra.insert(other.to_string(), value);
                            }
                        }
                    }
                    Ok(w)
                }
            }
            d.deserialize_map(V)
        }
    }
}

/// The scanner: a reading in its common shape, read without serde. It
/// accepts only what the serde paths accept with the same result, and
/// returns `None` for anything else: the next path decides.
mod scan {
    use std::borrow::Cow;

    use serde_json::Map;

    use super::Parts;

    struct Cursor<'a> {
        bytes: &'a [u8],
        at: usize,
    }

    impl<'a> Cursor<'a> {
        fn skip_ws(&mut self) {
            // Most bytes here are not whitespace: one comparison for them.
            while let Some(&b) = self.bytes.get(self.at)
                && b <= b' '
                && matches!(b, b' ' | b'\t' | b'\n' | b'\r')
            {
                self.at += 1;
            }
        }

        /// Consumes `byte` if it comes next, after any whitespace. The
        /// common case, no whitespace, tests one byte.
        fn eat(&mut self, byte: u8) -> bool {
            if self.bytes.get(self.at) != Some(&byte) {
                self.skip_ws();
                if self.bytes.get(self.at) != Some(&byte) {
                    return false;
                }
            }
            self.at += 1;
            true
        }

        /// The next byte after whitespace, consumed.
        fn next(&mut self) -> Option<u8> {
            self.skip_ws();
            let b = *self.bytes.get(self.at)?;
            self.at += 1;
            Some(b)
        }

        /// A string without escapes or control characters, ASCII only,
        /// after its opening quote: eight bytes at a time, then one by one.
        fn plain_string(&mut self) -> Option<&'a [u8]> {
            let rest = self.bytes.get(self.at..)?;
            let mut len = 0;
            let end = loop {
                let Some(chunk) = rest.get(len..len + 8) else {
                    break len + rest[len..].iter().position(|&b| !plain(b))?;
                };
                let stops = not_plain(u64::from_le_bytes(chunk.try_into().ok()?));
                if stops != 0 {
                    break len + (stops.trailing_zeros() / 8) as usize;
                }
                len += 8;
            };
            if rest[end] != b'"' {
                return None;
            }
            self.at += end + 1;
            Some(&rest[..end])
        }

        /// A key of the schema with its closing quote, after its opening
        /// quote: its field number (see [`parts`]). `None` for any other
        /// key, and for a key spelled with escapes.
        fn key(&mut self) -> Option<usize> {
            let rest = self.bytes.get(self.at..)?;
            let second = rest.get(1).copied();
            // Each literal has its own length, so each comparison is a
            // fixed-size one the compiler unrolls.
            let (field, len) = match rest.first()? {
                b'd' if starts(rest, b"device_id\"") => (0, 10),
                b's' if second == Some(b'e') && starts(rest, b"seq\"") => (1, 4),
                b'e' if starts(rest, b"epoch\"") => (2, 6),
                b't' if second == Some(b's') && starts(rest, b"ts\"") => (3, 3),
                b't' if starts(rest, b"temperature\"") => (4, 12),
                b'h' if starts(rest, b"humidity\"") => (5, 9),
                b'b' if starts(rest, b"battery\"") => (6, 8),
                b'l' if starts(rest, b"lat\"") => (7, 4),
                b'l' if starts(rest, b"lon\"") => (8, 4),
                b's' if starts(rest, b"speed\"") => (9, 6),
                _ => return None,
            };
            self.at += len;
            Some(field)
        }

        /// Digits (JSON's grammar: no sign, no leading zero, no fraction or
        /// exponent after) as a u64, or `None` when they are no integer or
        /// do not fit. The first eight at once when there are eight.
        fn digits(&mut self) -> Option<u64> {
            let bytes = self.bytes;
            let start = self.at;
            let mut i = start;
            let mut n = 0u64;
            if let Some(chunk) = bytes.get(i..i + 8) {
                let word = u64::from_le_bytes(chunk.try_into().ok()?);
                if eight_digits(word) {
                    n = value_of_eight_digits(word);
                    i += 8;
                }
            }
            while let Some(&b @ b'0'..=b'9') = bytes.get(i) {
                n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
                i += 1;
            }
            if !integer_ends_at(bytes, start, i) {
                return None;
            }
            self.at = i;
            Some(n)
        }

        /// A non-negative integer that fits a u64. A fraction or exponent
        /// after the digits makes it no integer: `None`, like a sign or a
        /// leading zero.
        fn unsigned(&mut self) -> Option<u64> {
            self.skip_ws();
            self.digits()
        }

        /// An integer that fits an i64 (as [`Cursor::unsigned`], with an
        /// optional minus).
        fn signed(&mut self) -> Option<i64> {
            self.skip_ws();
            let negative = self.bytes.get(self.at) == Some(&b'-');
            self.at += usize::from(negative);
            let magnitude = self.digits()?;
            if !negative {
                return i64::try_from(magnitude).ok();
            }
            // JSON parsers read `-0` as a float: so do the serde paths.
            if magnitude == 0 || magnitude > 1 << 63 {
                return None;
            }
            // 2^63 wraps to i64::MIN, which is its negation.
            Some((magnitude as i64).wrapping_neg())
        }

        /// Any number as a finite f64, correctly rounded, in one pass over
        /// its text: the fast path of [`Cursor::scan_float`], else the
        /// standard library's parser on the text just checked.
        ///
        /// With the value, its number of decimals when it came from the fast
        /// path (see [`super::Decimals`]), else [`super::Decimals::UNKNOWN`].
        fn float(&mut self) -> Option<(f64, u8)> {
            self.skip_ws();
            let start = self.at;
            if let Some(value) = self.scan_float()? {
                return Some(value);
            }
            // SAFETY: `scan_float` accepted `start..self.at` as JSON's
            // number grammar, which is ASCII only: digits, '-', '+', '.',
            // 'e' and 'E'.
            let text = unsafe { std::str::from_utf8_unchecked(&self.bytes[start..self.at]) };
            let value: f64 = text.parse().ok()?;
            value
                .is_finite()
                .then_some((value, super::Decimals::UNKNOWN))
        }

        /// Reads a number in JSON's grammar (`-? int frac? exp?`) and
        /// consumes it. `Some(Some((value, decimals)))`, correctly rounded,
        /// when it has no exponent and at most 19 digits (so at most 18
        /// after the point; [`scaled_down`]). `Some(None)` for any other
        /// number, `None` for no number.
        fn scan_float(&mut self) -> Option<Option<(f64, u8)>> {
            let bytes = self.bytes;
            let mut i = self.at;
            let negative = bytes.get(i) == Some(&b'-');
            if negative {
                i += 1;
            }
            let mut mantissa = 0u64;
            let int_start = i;
            while let Some(&b @ b'0'..=b'9') = bytes.get(i) {
                mantissa = mantissa.wrapping_mul(10).wrapping_add(u64::from(b - b'0'));
                i += 1;
            }
            let int_digits = i - int_start;
            // No digits, or a leading zero (not JSON).
            if int_digits == 0 || (int_digits > 1 && bytes[int_start] == b'0') {
                return None;
            }
            let mut decimals = 0;
            if bytes.get(i) == Some(&b'.') {
                i += 1;
                let frac_start = i;
                // Up to eight digits at a time while eight bytes remain,
                // then one by one.
                loop {
                    let Some(chunk) = bytes.get(i..i + 8) else {
                        while let Some(&b @ b'0'..=b'9') = bytes.get(i) {
                            mantissa = mantissa.wrapping_mul(10).wrapping_add(u64::from(b - b'0'));
                            i += 1;
                        }
                        break;
                    };
                    let (count, value) = digit_run(u64::from_le_bytes(chunk.try_into().ok()?));
                    mantissa = mantissa.wrapping_mul(TENS[count]).wrapping_add(value);
                    i += count;
                    if count < 8 {
                        break;
                    }
                }
                decimals = i - frac_start;
                if decimals == 0 {
                    return None;
                }
            }
            let mut exponent = false;
            if let Some(b'e' | b'E') = bytes.get(i) {
                exponent = true;
                i += 1;
                if let Some(b'+' | b'-') = bytes.get(i) {
                    i += 1;
                }
                let exp_start = i;
                while let Some(b'0'..=b'9') = bytes.get(i) {
                    i += 1;
                }
                if i == exp_start {
                    return None;
                }
            }
            self.at = i;
            // At most 19 digits cannot have wrapped around.
            // (19 digits leave at most 18 decimals; the table's bound is
            // checked all the same.)
            if exponent || int_digits + decimals > 19 || decimals >= RECIPROCALS_OF_FIVE.len() {
                return Some(None);
            }
            let value = if decimals == 0 || mantissa == 0 {
                // Integer to float conversion rounds to nearest, ties to even.
                mantissa as f64
            } else {
                scaled_down(mantissa, decimals)
            };
            // At most 18 decimals: fits a u8.
            Some(Some((
                if negative { -value } else { value },
                decimals as u8,
            )))
        }
    }

    /// Whether the digits `start..end` of `bytes` are a whole JSON integer:
    /// at least one, no leading zero, and no fraction or exponent after.
    fn integer_ends_at(bytes: &[u8], start: usize, end: usize) -> bool {
        end > start
            && (end - start == 1 || bytes[start] != b'0')
            && !matches!(bytes.get(end), Some(b'.' | b'e' | b'E'))
    }

    /// Whether `bytes` starts with `literal`.
    fn starts<const N: usize>(bytes: &[u8], literal: &[u8; N]) -> bool {
        bytes.get(..N) == Some(&literal[..])
    }

    /// A byte a plain string may hold: ASCII, no control character, no
    /// quote and no backslash.
    pub(super) fn plain(b: u8) -> bool {
        (0x20..0x80).contains(&b) && b != b'"' && b != b'\\'
    }

    /// A word whose lowest set bit is the top bit of the first byte (in
    /// little-endian order) that is not [`plain`], 0 when all eight are.
    /// Each test below flags exactly its first match, and only bytes after
    /// a match may be flagged wrongly (by a borrow): the lowest flag of
    /// their union is exact.
    pub(super) fn not_plain(word: u64) -> u64 {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
        let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
        let quote = zero_byte(word ^ (ONES * u64::from(b'"')));
        let backslash = zero_byte(word ^ (ONES * u64::from(b'\\')));
        control | quote | backslash | (word & HIGH)
    }

    /// Whether all eight bytes of `word` (little-endian) are ASCII digits:
    /// adding 0x46 carries into the top bit of a byte above b'9', and
    /// subtracting 0x30 borrows into it for a byte below b'0' (the borrow
    /// of a byte below b'0' only makes its neighbours fail too).
    pub(super) fn eight_digits(word: u64) -> bool {
        let above = word.wrapping_add(0x4646_4646_4646_4646);
        let below = word.wrapping_sub(0x3030_3030_3030_3030);
        (above | below) & 0x8080_8080_8080_8080 == 0
    }

    /// How many of the eight bytes of `word` (little-endian) are ASCII
    /// digits before the first that is not, and the number they spell. The
    /// flags are [`eight_digits`]'s, per byte: a carry or borrow only
    /// reaches the bytes after a non-digit, so the first flag is exact.
    #[inline(always)]
    pub(super) fn digit_run(word: u64) -> (usize, u64) {
        let above = word.wrapping_add(0x4646_4646_4646_4646);
        let below = word.wrapping_sub(0x3030_3030_3030_3030);
        let stops = (above | below) & 0x8080_8080_8080_8080;
        let count = stops.trailing_zeros() / 8;
        if count == 0 {
            return (0, 0);
        }
        // The digits moved to the top bytes, with '0's below them, spell
        // the same number.
        let shift = 64 - 8 * count;
        let padded = (word << shift) | (0x3030_3030_3030_3030 & ((1 << shift) - 1));
        (count as usize, value_of_eight_digits(padded))
    }

    /// 10^0 to 10^8.
    const TENS: [u64; 9] = [
        1,
        10,
        100,
        1_000,
        10_000,
        100_000,
        1_000_000,
        10_000_000,
        100_000_000,
    ];

    /// The number eight ASCII digits spell, the first (lowest) byte the
    /// most significant: pairs, then quadruples, then the whole, each step
    /// one multiply-add of adjacent lanes.
    pub(super) fn value_of_eight_digits(word: u64) -> u64 {
        let digits = word - 0x3030_3030_3030_3030;
        // Each 16-bit lane: 10 * first + second.
        let pairs = (digits.wrapping_mul(10) + (digits >> 8)) & 0x00ff_00ff_00ff_00ff;
        // Each 32-bit lane: 100 * first pair + second pair.
        let quads = (pairs.wrapping_mul(100) + (pairs >> 16)) & 0x0000_ffff_0000_ffff;
        // 10,000 * first quadruple + second.
        (quads & 0xffff_ffff) * 10_000 + (quads >> 32)
    }

    /// `mantissa / 10^decimals` correctly rounded (to nearest, ties to
    /// even), for a mantissa other than 0 and 1 to 22 decimals, without a
    /// division: the mantissa, shifted to fill 64 bits, is multiplied by a
    /// 128-bit reciprocal of 5^decimals ([`RECIPROCALS_OF_FIVE`]), and the
    /// top bits of the product are the result's significand with its
    /// rounding bit (the method of Eisel and Lemire). The reciprocal is one
    /// unit above the truncated value, so the product errs upwards by less
    /// than one unit in the 64 bits under the significand; where those bits
    /// leave the rounding open, the low half of the reciprocal is added in.
    /// With at most 22 decimals the product is always close enough to
    /// decide (the method is exact for powers of ten from 10^-27 to 10^55),
    /// and every result is a normal number.
    pub(super) fn scaled_down(mantissa: u64, decimals: usize) -> f64 {
        debug_assert!(mantissa != 0 && (1..RECIPROCALS_OF_FIVE.len()).contains(&decimals));
        let shift = mantissa.leading_zeros();
        let w = u128::from(mantissa << shift);
        let reciprocal = RECIPROCALS_OF_FIVE[decimals];
        let first = w * (reciprocal >> 64);
        let (mut hi, mut lo) = ((first >> 64) as u64, first as u64);
        // Below the 53 significand bits, the rounding bit and the bit the
        // product's top may lack: all ones means a carry from the low half
        // of the reciprocal could still change the result.
        const OPEN: u64 = u64::MAX >> 55;
        if hi & OPEN == OPEN {
            let second = ((w * (reciprocal as u64 as u128)) >> 64) as u64;
            let (sum, carry) = lo.overflowing_add(second);
            lo = sum;
            hi += u64::from(carry);
        }
        let top = (hi >> 63) as u32;
        let mut significand = hi >> (top + 9);
        // The binary exponent: floor(-decimals * log2(10)) from a fixed-point
        // log2(10) (217706 / 2^16), the product's scale and the bias.
        let q = -(decimals as i64);
        let mut exponent = ((q * 217_706) >> 16) + 63 + i64::from(top) - i64::from(shift) + 1023;
        // Exactly halfway between two floats (only possible for up to four
        // decimals): round to even instead of up.
        if lo <= 1 && decimals <= 4 && significand & 3 == 1 && (significand << (top + 9)) == hi {
            significand &= !1;
        }
        significand += significand & 1;
        significand >>= 1;
        if significand >= 2 << 52 {
            significand = 1 << 52;
            exponent += 1;
        }
        f64::from_bits((significand & !(1 << 52)) | ((exponent as u64) << 52))
    }

    /// For each d from 1 to 22: floor(2^(z + 127) / 5^d) + 1, where 2^z is
    /// the least power of two above 5^d, so that the top bit is set. Entry
    /// 0 is unused.
    const RECIPROCALS_OF_FIVE: [u128; 23] = {
        let mut table = [0u128; 23];
        let mut d = 1;
        while d < table.len() {
            let five = 5u64.pow(d as u32) as u128;
            let z = 128 - (five - 1).leading_zeros();
            // Long division of 2^(z + 127) by 5^d, one bit at a time.
            let bits = z + 127;
            let mut remainder = 0u128;
            let mut quotient = 0u128;
            let mut i = 0;
            while i <= bits {
                remainder = (remainder << 1) | (i == 0) as u128;
                quotient <<= 1;
                if remainder >= five {
                    remainder -= five;
                    quotient |= 1;
                }
                i += 1;
            }
            table[d] = quotient + 1;
            d += 1;
        }
        table
    };

    /// The exact path alone on a whole number text (for tests).
    #[cfg(test)]
    pub(super) fn exact_float(text: &[u8]) -> Option<f64> {
        let mut c = Cursor { bytes: text, at: 0 };
        let (value, _) = c.scan_float()??;
        (c.at == text.len()).then_some(value)
    }

    impl Cursor<'_> {
        fn literal(&mut self, word: &[u8]) -> bool {
            self.skip_ws();
            if self.bytes.get(self.at..self.at + word.len()) == Some(word) {
                self.at += word.len();
                true
            } else {
                false
            }
        }
    }

    /// The fields of a reading in its common shape, or `None`. Fields by
    /// number: 0 device_id, 1 seq, 2 epoch, 3 ts, 4 to 9 temperature,
    /// humidity, battery, lat, lon and speed.
    pub(super) fn parts(payload: &[u8]) -> Option<Parts<'_>> {
        let mut c = Cursor {
            bytes: payload,
            at: 0,
        };
        if c.next()? != b'{' {
            return None;
        }
        let mut device_id: &[u8] = &[];
        let (mut seq, mut epoch, mut ts) = (0, None, 0);
        let mut values = [0.0; 6];
        let mut decimals = [super::Decimals::UNKNOWN; 6];
        // Which fields were seen: a repeated key goes to the serde paths.
        let mut seen = 0u16;
        loop {
            if !c.eat(b'"') {
                return None;
            }
            let field = c.key()?;
            if seen & (1 << field) != 0 {
                return None;
            }
            seen |= 1 << field;
            if !c.eat(b':') {
                return None;
            }
            match field {
                0 => {
                    if !c.eat(b'"') {
                        return None;
                    }
                    device_id = c.plain_string()?;
                }
                1 => seq = c.unsigned()?,
                2 => {
                    epoch = if c.literal(b"null") {
                        None
                    } else {
                        Some(c.unsigned()?)
                    }
                }
                3 => ts = c.signed()?,
                slot => (values[slot - 4], decimals[slot - 4]) = c.float()?,
            }
            if c.eat(b',') {
                continue;
            }
            if c.eat(b'}') {
                break;
            }
            return None;
        }
        c.skip_ws();
        // Every field but the epoch, and nothing after the object.
        if seen | 1 << 2 != (1 << 10) - 1 || c.at != payload.len() {
            return None;
        }
        // SAFETY: `plain_string` returned bytes in 0x20..0x80 only: ASCII,
        // so valid UTF-8.
        let device_id = unsafe { std::str::from_utf8_unchecked(device_id) };
        let [temperature, humidity, battery, lat, lon, speed] = values;
        Some(Parts {
            device_id: Cow::Borrowed(device_id),
            device_seq: seq,
            epoch,
            ts,
            temperature,
            humidity,
            battery,
            lat,
            lon,
            speed,
            attributes: Map::new(),
            decimals: super::Decimals(decimals),
        })
    }
}

/// The general path: a JSON tree, then field by field with precise errors.
pub(crate) fn decode_reading_general(
    payload: &[u8],
    topic_device: Option<&str>,
    now_ms: i64,
    limits: &ValidationConfig,
) -> Result<Reading, Rejection> {
    if payload.len() > limits.max_payload_bytes {
        return Err(Rejection::new(
            RejectReason::PayloadTooLarge,
            format!(
                "payload of {} bytes exceeds validation.max_payload_bytes ({})",
                payload.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| Rejection::new(RejectReason::MalformedJson, format!("not valid JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(Rejection::new(
            RejectReason::NotAnObject,
            format!("expected a JSON object, got {}", type_name(&value)),
        ));
    };

    let device_id = match obj.remove("device_id") {
        Some(Value::String(s)) => s,
        Some(other) => return Err(wrong_type("device_id", "a string", &other)),
        None => return Err(missing("device_id")),
    };
    check_device_id(&device_id, topic_device)?;

    let device_seq = take_u64(&obj, "seq")?;
    let epoch = match obj.get("epoch") {
        None | Some(Value::Null) => None,
        Some(_) => Some(take_u64(&obj, "epoch")?),
    };
    let seq = fold_seq(device_seq, epoch)?;

    let ts = match obj.get("ts") {
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| {
            wrong_type(
                "ts",
                "integer epoch milliseconds",
                &Value::Number(n.clone()),
            )
        })?,
        Some(other) => return Err(wrong_type("ts", "integer epoch milliseconds", other)),
        None => return Err(missing("ts")),
    };
    check_timestamp(ts, now_ms, limits)?;

    let temperature = take_f64(&obj, "temperature")?;
    let humidity = take_f64(&obj, "humidity")?;
    let battery = take_f64(&obj, "battery")?;
    let lat = take_f64(&obj, "lat")?;
    let lon = take_f64(&obj, "lon")?;
    let speed = take_f64(&obj, "speed")?;
    check_ranges(temperature, humidity, battery, lat, lon, speed)?;

    let mut attributes = match obj.remove("attributes") {
        Some(Value::Object(map)) => map,
        Some(Value::Null) | None => Map::new(),
        Some(other) => return Err(wrong_type("attributes", "an object", &other)),
    };
    for (key, value) in obj {
        if !KNOWN_FIELDS.contains(&key.as_str()) {
            attributes.insert(key, value);
        }
    }

    Ok(Reading {
        device_id,
        seq,
        device_seq,
        epoch,
        ts,
        temperature,
        humidity,
        battery,
        lat,
        lon,
        speed,
        attributes,
        decimals: Decimals::default(),
    })
}

fn take_u64(obj: &Map<String, Value>, field: &str) -> Result<u64, Rejection> {
    match obj.get(field) {
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| wrong_type(field, "a non-negative integer", &Value::Number(n.clone()))),
        Some(other) => Err(wrong_type(field, "a non-negative integer", other)),
        None => Err(missing(field)),
    }
}

fn take_f64(obj: &Map<String, Value>, field: &str) -> Result<f64, Rejection> {
    match obj.get(field) {
        Some(Value::Number(n)) => n
            .as_f64()
            .ok_or_else(|| wrong_type(field, "a number", &Value::Number(n.clone()))),
        Some(other) => Err(wrong_type(field, "a number", other)),
        None => Err(missing(field)),
    }
}

fn check_timestamp(ts: i64, now_ms: i64, limits: &ValidationConfig) -> Result<(), Rejection> {
    let future_limit =
        now_ms.saturating_add(limits.max_future_skew_seconds.saturating_mul(1000) as i64);
    let past_limit = now_ms.saturating_sub(limits.max_age_seconds.saturating_mul(1000) as i64);
    if ts > future_limit || ts < past_limit {
        return Err(Rejection::new(
            RejectReason::TimestampSkew,
            format!(
                "ts {ts} is more than {} s in the future or {} s in the past of the gateway clock ({now_ms})",
                limits.max_future_skew_seconds, limits.max_age_seconds
            ),
        ));
    }
    Ok(())
}

/// Physical ranges of the schema's values. NaN and infinities are outside
/// every range.
fn check_ranges(
    temperature: f64,
    humidity: f64,
    battery: f64,
    lat: f64,
    lon: f64,
    speed: f64,
) -> Result<(), Rejection> {
    let checks = [
        ("temperature", temperature, -100.0, 200.0),
        ("humidity", humidity, 0.0, 100.0),
        ("battery", battery, 0.0, 100.0),
        ("lat", lat, -90.0, 90.0),
        ("lon", lon, -180.0, 180.0),
        ("speed", speed, 0.0, 1000.0),
    ];
    // All six at once, without a branch each: the common case.
    if checks.iter().fold(true, |ok, &(_, value, min, max)| {
        ok & (value >= min) & (value <= max)
    }) {
        return Ok(());
    }
    for (field, value, min, max) in checks {
        if !(min..=max).contains(&value) {
            return Err(out_of_range(field, value, &format!("{min} to {max}")));
        }
    }
    Ok(())
}

/// Builds a reading from a firmware-proto frame (serial line or the MQTT
/// `/bin` topic) and checks it like a JSON one.
pub fn reading_from_frame(
    device_id: &str,
    frame: &firmware_proto::message::Reading,
    now_ms: i64,
    limits: &ValidationConfig,
) -> Result<Reading, Rejection> {
    if !is_valid_id(device_id) {
        return Err(Rejection::new(
            RejectReason::InvalidDeviceId,
            format!(
                "device id {device_id:?} is not 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'"
            ),
        ));
    }
    let epoch = u64::from(frame.boot_epoch);
    if epoch > MAX_EPOCH {
        return Err(out_of_range(
            "boot_epoch",
            epoch as f64,
            &format!("0 to {MAX_EPOCH}"),
        ));
    }
    let ts = i64::try_from(frame.timestamp_ms).map_err(|_| {
        out_of_range(
            "timestamp_ms",
            frame.timestamp_ms as f64,
            "a 63-bit epoch millisecond value",
        )
    })?;
    check_timestamp(ts, now_ms, limits)?;
    let (temperature, humidity, battery, speed) = (
        f64::from(frame.temperature),
        f64::from(frame.humidity),
        f64::from(frame.battery),
        f64::from(frame.speed),
    );
    check_ranges(temperature, humidity, battery, frame.lat, frame.lon, speed)?;
    let mut attributes = Map::new();
    for extra in &frame.extras {
        let value = serde_json::Number::from_f64(f64::from(extra.value))
            .map(Value::Number)
            .ok_or_else(|| out_of_range("extras", f64::from(extra.value), "finite numbers"))?;
        attributes.insert(format!("x{}", extra.key), value);
    }
    Ok(Reading {
        device_id: device_id.to_string(),
        seq: (epoch << 32) | u64::from(frame.seq),
        device_seq: u64::from(frame.seq),
        epoch: Some(epoch),
        ts,
        temperature,
        humidity,
        battery,
        lat: frame.lat,
        lon: frame.lon,
        speed,
        attributes,
        decimals: Decimals::default(),
    })
}

/// Decodes an MQTT `/bin` payload: exactly one firmware-proto frame holding
/// a `Reading`.
pub fn decode_bin_reading(
    payload: &[u8],
    topic_device: &str,
    now_ms: i64,
    limits: &ValidationConfig,
) -> Result<Reading, Rejection> {
    use firmware_proto::message::Message;
    if payload.len() > firmware_proto::MAX_FRAME_SIZE_BYTES {
        return Err(Rejection::new(
            RejectReason::PayloadTooLarge,
            format!(
                "binary payload of {} bytes exceeds the {}-byte frame limit",
                payload.len(),
                firmware_proto::MAX_FRAME_SIZE_BYTES
            ),
        ));
    }
    let mut deframer = firmware_proto::frame::Deframer::new();
    let mut first = None;
    let mut frames = 0;
    // A trailing delimiter may be missing in a payload: add one.
    deframer.feed(payload, |f| {
        frames += 1;
        first.get_or_insert(f);
    });
    if let Some(f) = deframer.push(0) {
        frames += 1;
        first.get_or_insert(f);
    }
    match first {
        None => Err(Rejection::new(
            RejectReason::MalformedFrame,
            "binary payload holds no frame",
        )),
        Some(Err(e)) => Err(Rejection::new(
            RejectReason::MalformedFrame,
            format!("binary payload is not a valid frame: {e}"),
        )),
        Some(Ok(_)) if frames > 1 => Err(Rejection::new(
            RejectReason::MalformedFrame,
            "binary payload must hold exactly one frame",
        )),
        Some(Ok((_, Message::Reading(r)))) => reading_from_frame(topic_device, &r, now_ms, limits),
        Some(Ok(_)) => Err(Rejection::new(
            RejectReason::UnsupportedEncoding,
            "binary payload holds a frame that is not a Reading",
        )),
    }
}

fn missing(field: &str) -> Rejection {
    Rejection::new(
        RejectReason::MissingField,
        format!("required field `{field}` is missing"),
    )
}

fn wrong_type(field: &str, expected: &str, got: &Value) -> Rejection {
    Rejection::new(
        RejectReason::WrongType,
        format!("field `{field}` must be {expected}, got {}", type_name(got)),
    )
}

fn out_of_range(field: &str, value: f64, allowed: &str) -> Rejection {
    Rejection::new(
        RejectReason::OutOfRange,
        format!("field `{field}` = {value} is outside {allowed}"),
    )
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The enriched record sent to `rich-iot-data`.
#[derive(Serialize)]
pub struct EnrichedRecord<'a> {
    #[serde(flatten)]
    pub reading: &'a Reading,
    pub gateway_id: &'a str,
    /// Gateway clock when the reading was accepted, epoch ms.
    pub received_at: i64,
    /// Whether the device is in the registry (an unknown device passes
    /// unenriched when `registry.unknown_device = "pass"`).
    pub registered: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<&'a std::collections::BTreeMap<String, String>>,
}

impl<'a> EnrichedRecord<'a> {
    /// Appends the record as JSON: the same document serde would write
    /// (tested), without the generic serializer's per-field overhead.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut fragment = Vec::new();
        write_enrichment(
            &mut fragment,
            self.device_type,
            self.device_name,
            self.site,
            self.tags,
        );
        write_reading_json(
            out,
            self.reading,
            self.gateway_id,
            self.received_at,
            self.registered,
            &fragment,
        );
    }

    pub fn new(
        reading: &'a Reading,
        meta: Option<&'a crate::registry::DeviceMeta>,
        gateway_id: &'a str,
        received_at: i64,
    ) -> Self {
        Self {
            reading,
            gateway_id,
            received_at,
            registered: meta.is_some(),
            device_type: meta.and_then(|m| m.device_type.as_deref()),
            device_name: meta.and_then(|m| m.name.as_deref()),
            site: meta.and_then(|m| m.site.as_deref()),
            tags: meta.map(|m| &m.tags).filter(|t| !t.is_empty()),
        }
    }
}

/// The enrichment fields of a registered device as a JSON fragment, for
/// [`write_reading_json`]; computed once per device and cached.
pub fn enrichment_fragment(meta: &crate::registry::DeviceMeta) -> String {
    let mut out = Vec::new();
    write_enrichment(
        &mut out,
        meta.device_type.as_deref(),
        meta.name.as_deref(),
        meta.site.as_deref(),
        Some(&meta.tags).filter(|t| !t.is_empty()),
    );
    // serde_json writes UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

fn write_enrichment(
    out: &mut Vec<u8>,
    device_type: Option<&str>,
    name: Option<&str>,
    site: Option<&str>,
    tags: Option<&std::collections::BTreeMap<String, String>>,
) {
    if let Some(t) = device_type {
        // A device type is a validated id: nothing to escape.
        out.extend_from_slice(b",\"device_type\":\"");
        out.extend_from_slice(t.as_bytes());
        out.push(b'"');
    }
    for (key, text) in [(&b",\"device_name\":"[..], name), (b",\"site\":", site)] {
        if let Some(text) = text {
            out.extend_from_slice(key);
            let _ = serde_json::to_writer(&mut *out, text);
        }
    }
    if let Some(tags) = tags {
        out.extend_from_slice(b",\"tags\":");
        let _ = serde_json::to_writer(&mut *out, tags);
    }
}

/// Appends an enriched reading as JSON; `enrichment` is a fragment from
/// [`enrichment_fragment`] (empty for an unregistered device).
pub fn write_reading_json(
    out: &mut Vec<u8>,
    r: &Reading,
    gateway_id: &str,
    received_at: i64,
    registered: bool,
    enrichment: &[u8],
) {
    let attributes = if r.attributes.is_empty() {
        Vec::new()
    } else {
        // A map of JSON values always serializes.
        serde_json::to_vec(&r.attributes).unwrap_or_default()
    };
    write_record_json(
        out,
        &RecordFields::of(r, &attributes),
        &Enrichment {
            gateway_id,
            received_at,
            registered,
            fragment: enrichment,
        },
    );
}

/// The fields of an accepted reading as its record carries them: what the
/// outbox stores, and renders as JSON when the batch is sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordFields<'a> {
    pub device_id: &'a str,
    pub seq: u64,
    pub device_seq: u64,
    pub epoch: Option<u64>,
    pub ts: i64,
    /// temperature, humidity, battery, lat, lon, speed.
    pub values: [f64; 6],
    /// The extra fields as a JSON object, empty when there are none.
    pub attributes: &'a [u8],
}

impl<'a> RecordFields<'a> {
    pub fn of(r: &'a Reading, attributes: &'a [u8]) -> Self {
        Self {
            device_id: &r.device_id,
            seq: r.seq,
            device_seq: r.device_seq,
            epoch: r.epoch,
            ts: r.ts,
            values: [r.temperature, r.humidity, r.battery, r.lat, r.lon, r.speed],
            attributes,
        }
    }
}

/// What the gateway adds to a reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Enrichment<'a> {
    pub gateway_id: &'a str,
    /// Gateway clock when the reading was accepted, epoch ms.
    pub received_at: i64,
    pub registered: bool,
    /// From [`enrichment_fragment`]; empty for an unregistered device.
    pub fragment: &'a [u8],
}

/// Appends an enriched reading as JSON.
pub fn write_record_json(out: &mut Vec<u8>, r: &RecordFields<'_>, e: &Enrichment<'_>) {
    use serde_json::ser::{CompactFormatter, Formatter};
    let mut f = CompactFormatter;
    // Ids are validated to [A-Za-z0-9._-]: nothing to escape.
    out.extend_from_slice(b"{\"device_id\":\"");
    out.extend_from_slice(r.device_id.as_bytes());
    out.extend_from_slice(b"\",\"seq\":");
    let _ = f.write_u64(out, r.seq);
    out.extend_from_slice(b",\"device_seq\":");
    let _ = f.write_u64(out, r.device_seq);
    if let Some(epoch) = r.epoch {
        out.extend_from_slice(b",\"epoch\":");
        let _ = f.write_u64(out, epoch);
    }
    out.extend_from_slice(b",\"ts\":");
    let _ = f.write_i64(out, r.ts);
    for (key, value) in [
        &b",\"temperature\":"[..],
        b",\"humidity\":",
        b",\"battery\":",
        b",\"lat\":",
        b",\"lon\":",
        b",\"speed\":",
    ]
    .into_iter()
    .zip(r.values)
    {
        out.extend_from_slice(key);
        // Validated values are finite.
        let _ = f.write_f64(out, value);
    }
    if !r.attributes.is_empty() {
        out.extend_from_slice(b",\"attributes\":");
        out.extend_from_slice(r.attributes);
    }
    out.extend_from_slice(b",\"gateway_id\":\"");
    out.extend_from_slice(e.gateway_id.as_bytes());
    out.extend_from_slice(b"\",\"received_at\":");
    let _ = f.write_i64(out, e.received_at);
    out.extend_from_slice(if e.registered {
        b",\"registered\":true"
    } else {
        b",\"registered\":false"
    });
    out.extend_from_slice(e.fragment);
    out.push(b'}');
}

/// The record sent to `iot-dlq` for a rejected input.
#[derive(Serialize)]
pub struct DeadLetterRecord<'a> {
    pub gateway_id: &'a str,
    pub received_at: i64,
    pub source: &'a str,
    pub topic: &'a str,
    pub reason: &'static str,
    pub message: &'a str,
    /// The raw payload when it is UTF-8 (truncated to the payload limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<&'a str>,
    /// The raw payload as hex when it is not UTF-8 (truncated likewise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_hex: Option<String>,
    /// Bytes of the original payload.
    pub payload_bytes: usize,
}

#[cfg(test)]
mod tests;
