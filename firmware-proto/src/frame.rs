//! Framing: `0x00 | COBS(version | address | postcard(message) | crc32c) | 0x00`.
//!
//! The leading delimiter flushes whatever partial frame a receiver holds
//! (after line noise or a device reset), so a good frame is never glued to
//! garbage. The CRC (CRC-32C, little endian) covers the header and body.
//! Nothing here allocates; the deframer's memory is one fixed buffer.

use crate::PROTOCOL_VERSION;
use crate::message::Message;

/// Largest frame on the wire, delimiters included. Anything longer is
/// discarded by the receiver before it is buffered.
pub const MAX_FRAME_SIZE_BYTES: usize = 256;

const HEADER_LEN: usize = 2;
const CRC_LEN: usize = 4;
/// Largest unencoded frame (header + body + CRC) that fits the bound after
/// COBS (one overhead byte per 254) and the two delimiters.
pub const MAX_RAW_LEN: usize = MAX_FRAME_SIZE_BYTES - 2 - MAX_FRAME_SIZE_BYTES.div_ceil(254);

// Same CRC either way: a 1 KiB table on firmware, where flash is scarce; a
// 16 KiB slice-by-16 table on the host, where the gateway checks frames of
// many devices.
#[cfg(not(feature = "std"))]
const CRC: crc::Crc<u32, crc::Table<1>> = crc::Crc::<u32, crc::Table<1>>::new(&crc::CRC_32_ISCSI);
#[cfg(feature = "std")]
const CRC: crc::Crc<u32, crc::Table<16>> = crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

/// Why a frame could not be made or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum FrameError {
    /// The message does not fit [`MAX_FRAME_SIZE_BYTES`].
    TooLarge,
    /// The output buffer is smaller than the encoded frame.
    BufferTooSmall,
    /// More than [`MAX_FRAME_SIZE_BYTES`] arrived without a delimiter.
    Oversized,
    /// The COBS encoding is broken (a byte was lost or changed).
    BadEncoding,
    /// Shorter than header and CRC.
    Truncated,
    /// The CRC does not match: the frame was corrupted.
    BadCrc,
    /// A version this build does not speak; the receiver answers with
    /// `Error { UnsupportedVersion }` to `address`.
    UnsupportedVersion { version: u8, address: u8 },
    /// CRC and version are fine but the body is not a valid message.
    Malformed,
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooLarge => write!(
                f,
                "message does not fit a {MAX_FRAME_SIZE_BYTES}-byte frame"
            ),
            Self::BufferTooSmall => write!(f, "output buffer too small for the frame"),
            Self::Oversized => write!(
                f,
                "more than {MAX_FRAME_SIZE_BYTES} bytes without a frame delimiter"
            ),
            Self::BadEncoding => write!(f, "broken COBS encoding"),
            Self::Truncated => write!(f, "frame shorter than header and CRC"),
            Self::BadCrc => write!(f, "CRC mismatch"),
            Self::UnsupportedVersion { version, address } => {
                write!(
                    f,
                    "protocol version {version} from address {address} is not supported (this side speaks {PROTOCOL_VERSION})"
                )
            }
            Self::Malformed => write!(f, "frame body is not a valid message"),
        }
    }
}

#[cfg(feature = "std")]
extern crate std;
#[cfg(feature = "std")]
impl std::error::Error for FrameError {}

/// Encodes `message` for bus `address` into `out`; returns the bytes used.
pub fn encode_frame(address: u8, message: &Message, out: &mut [u8]) -> Result<usize, FrameError> {
    let mut raw = [0u8; MAX_RAW_LEN];
    raw[0] = PROTOCOL_VERSION;
    raw[1] = address;
    let body_len = postcard::to_slice(message, &mut raw[HEADER_LEN..MAX_RAW_LEN - CRC_LEN])
        .map_err(|_| FrameError::TooLarge)?
        .len();
    let crc_at = HEADER_LEN + body_len;
    let crc = CRC.checksum(&raw[..crc_at]);
    raw[crc_at..crc_at + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    encode_raw(&raw[..crc_at + CRC_LEN], out)
}

/// Wraps already-built raw bytes (header, body, CRC) in COBS and
/// delimiters. Public for tests that need to forge frames.
pub fn encode_raw(raw: &[u8], out: &mut [u8]) -> Result<usize, FrameError> {
    let needed = 2 + raw.len() + raw.len() / 254 + 1;
    if out.len() < needed {
        return Err(FrameError::BufferTooSmall);
    }
    out[0] = 0;
    let n = cobs_encode(raw, &mut out[1..]);
    out[1 + n] = 0;
    Ok(n + 2)
}

/// COBS-encodes `src` into `dst` (which must be large enough); returns the
/// encoded length.
fn cobs_encode(src: &[u8], dst: &mut [u8]) -> usize {
    let mut code_at = 0;
    let mut code: u8 = 1;
    let mut w = 1;
    for &b in src {
        if b == 0 {
            dst[code_at] = code;
            code_at = w;
            w += 1;
            code = 1;
        } else {
            dst[w] = b;
            w += 1;
            code += 1;
            if code == 0xFF {
                dst[code_at] = code;
                code_at = w;
                w += 1;
                code = 1;
            }
        }
    }
    dst[code_at] = code;
    w
}

/// Decodes COBS `src` (no delimiters) into `dst`; `None` if malformed.
fn cobs_decode(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    let (mut r, mut w) = (0, 0);
    while r < src.len() {
        let code = src[r] as usize;
        if code == 0 {
            return None;
        }
        r += 1;
        let end = r + code - 1;
        if end > src.len() {
            return None;
        }
        let chunk = &src[r..end];
        dst.get_mut(w..w + chunk.len())?.copy_from_slice(chunk);
        w += chunk.len();
        r = end;
        if code < 0xFF && r < src.len() {
            *dst.get_mut(w)? = 0;
            w += 1;
        }
    }
    Some(w)
}

/// Checks CRC and version, then decodes the message of one raw frame.
pub fn decode_raw(raw: &[u8]) -> Result<(u8, Message), FrameError> {
    if raw.len() < HEADER_LEN + CRC_LEN + 1 {
        return Err(FrameError::Truncated);
    }
    let (data, crc) = raw.split_at(raw.len() - CRC_LEN);
    let expected = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if CRC.checksum(data) != expected {
        return Err(FrameError::BadCrc);
    }
    let (version, address) = (data[0], data[1]);
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion { version, address });
    }
    match postcard::take_from_bytes::<Message>(&data[HEADER_LEN..]) {
        Ok((message, [])) => Ok((address, message)),
        _ => Err(FrameError::Malformed),
    }
}

/// Accumulates bytes from a stream and yields frames. Resynchronises at
/// every delimiter: garbage, partial and oversized frames give one error
/// each and never disturb the next good frame.
pub struct Deframer {
    buf: [u8; MAX_FRAME_SIZE_BYTES],
    len: usize,
    overflowed: bool,
}

impl Default for Deframer {
    fn default() -> Self {
        Self::new()
    }
}

impl Deframer {
    pub const fn new() -> Self {
        Self {
            buf: [0; MAX_FRAME_SIZE_BYTES],
            len: 0,
            overflowed: false,
        }
    }

    /// Feeds one byte; returns a frame (or its error) when one ends.
    pub fn push(&mut self, byte: u8) -> Option<Result<(u8, Message), FrameError>> {
        if byte != 0 {
            if self.len < self.buf.len() {
                self.buf[self.len] = byte;
                self.len += 1;
            } else {
                self.overflowed = true;
            }
            return None;
        }
        let (len, overflowed) = (self.len, self.overflowed);
        self.len = 0;
        self.overflowed = false;
        if overflowed {
            return Some(Err(FrameError::Oversized));
        }
        if len == 0 {
            return None;
        }
        let mut raw = [0u8; MAX_FRAME_SIZE_BYTES];
        let Some(n) = cobs_decode(&self.buf[..len], &mut raw) else {
            return Some(Err(FrameError::BadEncoding));
        };
        Some(decode_raw(&raw[..n]))
    }

    /// Feeds a slice, calling `on_frame` for each frame that ends in it.
    /// Same result as [`Self::push`] per byte, but copies runs of frame
    /// bytes at once.
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        mut on_frame: impl FnMut(Result<(u8, Message), FrameError>),
    ) {
        while !bytes.is_empty() {
            let run = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            let (body, rest) = bytes.split_at(run);
            let room = self.buf.len() - self.len;
            if body.len() > room {
                self.buf[self.len..].copy_from_slice(&body[..room]);
                self.len = self.buf.len();
                self.overflowed = true;
            } else {
                self.buf[self.len..self.len + body.len()].copy_from_slice(body);
                self.len += body.len();
            }
            match rest.split_first() {
                Some((_, after)) => {
                    if let Some(frame) = self.push(0) {
                        on_frame(frame);
                    }
                    bytes = after;
                }
                None => bytes = rest,
            }
        }
    }
}
