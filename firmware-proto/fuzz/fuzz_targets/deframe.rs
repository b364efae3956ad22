//! Arbitrary bytes into the receive path of the framing layer:
//! `frame::Deframer::feed` (stream of COBS frames) and `frame::decode_raw`
//! (one unencoded frame: version, address, postcard body, CRC-32C).
//!
//! Besides "never panics", it checks:
//! * the deframer is a pure stream parser: feeding the input at once, split
//!   in two at any point, or byte by byte with `push`, gives the same frames;
//! * COBS round trip: `encode_raw` then the deframer gives exactly what
//!   `decode_raw` gives for the same raw bytes;
//! * whatever decodes re-encodes: a message accepted from a frame that fits
//!   `MAX_RAW_LEN` encodes again with `encode_frame`, and that encoding is a
//!   fixed point (decode then encode gives the same bytes);
//! * the crate's CRC-32C (a slice-by-16 table with the `std` feature, the
//!   default here; a 1 KiB table without it) agrees with the `crc` crate's
//!   reference table: bytes with the reference CRC appended never fail as
//!   `BadCrc`.
#![no_main]

use firmware_proto::frame::{
    Deframer, FrameError, MAX_FRAME_SIZE_BYTES, MAX_RAW_LEN, decode_raw, encode_frame, encode_raw,
};
use firmware_proto::message::Message;
use libfuzzer_sys::fuzz_target;

const REFERENCE_CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

type Frame = Result<(u8, Message), FrameError>;

/// Messages hold floats (NaN != NaN): compare frames by their Debug text,
/// which is exact for floats (shortest round-trip representation).
fn text(frames: &[Frame]) -> Vec<String> {
    frames.iter().map(|f| format!("{f:?}")).collect()
}

fn deframe(chunks: &[&[u8]]) -> Vec<Frame> {
    let mut deframer = Deframer::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        deframer.feed(chunk, |f| frames.push(f));
    }
    frames
}

/// Checks that an accepted message re-encodes to a valid frame, and that
/// its encoding is stable.
fn check_reencode(address: u8, message: &Message) {
    let mut first = [0u8; MAX_FRAME_SIZE_BYTES];
    let n = encode_frame(address, message, &mut first)
        .unwrap_or_else(|e| panic!("accepted message does not re-encode: {e:?} {message:?}"));
    let decoded = deframe(&[&first[..n]]);
    assert_eq!(decoded.len(), 1, "re-encoded frame gives {} frames", decoded.len());
    let (a, m) = decoded[0].as_ref().expect("re-encoded frame does not decode");
    assert_eq!(*a, address);
    let mut second = [0u8; MAX_FRAME_SIZE_BYTES];
    let n2 = encode_frame(*a, m, &mut second).expect("second encoding fails");
    assert_eq!(&first[..n], &second[..n2], "encoding is not a fixed point");
}

fuzz_target!(|data: &[u8]| {
    // 1. The bytes as one raw frame.
    let raw = decode_raw(data);
    if let Ok((address, message)) = &raw
        && data.len() <= MAX_RAW_LEN
    {
        check_reencode(*address, message);
    }

    // 2. The bytes as a stream, at once and split in two.
    let whole = deframe(&[data]);
    let at = if data.is_empty() { 0 } else { data[0] as usize % (data.len() + 1) };
    let split = deframe(&[&data[..at], &data[at..]]);
    assert_eq!(text(&whole), text(&split), "deframer result depends on how the stream is split (at {at})");
    let mut deframer = Deframer::new();
    let pushed: Vec<Frame> = data.iter().filter_map(|&b| deframer.push(b)).collect();
    assert_eq!(text(&whole), text(&pushed), "feed and push disagree");
    // At most one result per delimiter.
    let delimiters = data.iter().filter(|&&b| b == 0).count();
    assert!(whole.len() <= delimiters);
    for (address, message) in whole.iter().flatten() {
        check_reencode(*address, message);
    }

    // 3. COBS round trip of the bytes taken as a raw frame.
    if data.len() <= MAX_RAW_LEN {
        let mut wire = [0u8; MAX_FRAME_SIZE_BYTES];
        let n = encode_raw(data, &mut wire).expect("a MAX_RAW_LEN frame fits MAX_FRAME_SIZE_BYTES");
        assert!(n <= MAX_FRAME_SIZE_BYTES);
        let framed = deframe(&[&wire[..n]]);
        assert_eq!(text(&framed), text(&[raw]), "COBS round trip changes the frame");
    }

    // 4. The bytes as header and body, with the reference CRC appended.
    let mut with_crc = data.to_vec();
    with_crc.extend_from_slice(&REFERENCE_CRC.checksum(data).to_le_bytes());
    assert_ne!(decode_raw(&with_crc), Err(FrameError::BadCrc), "CRC disagrees with the reference");
});
