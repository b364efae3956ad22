//! Arbitrary bytes into both ends of the link layer: a
//! `link::GatewayLink` (`handle_bytes`, then `poll_event` / `poll_transmit`
//! drained) and a `link::DeviceLink` (`handle_bytes`), talking to each
//! other while the fuzzer injects traffic.
//!
//! Random bytes almost never carry a valid CRC-32C, so besides raw bytes
//! the input can also carry frame bodies that the harness wraps in a valid
//! header, CRC and COBS (as line noise cannot, but a buggy or hostile peer
//! can): that is what gets the fuzzer past the CRC into the state machines.
//!
//! The input is a sequence of operations, each a header byte `h` followed
//! by its operands:
//! * `h % 4 == 0`: raw bytes — `len`, then `len` bytes, fed as they are;
//! * `h % 4 == 1`: a forged frame — an address (the device's unless
//!   `h & 0x80`, then the next byte), `len`, then `len` body bytes
//!   (postcard of a `Message`, or anything);
//! * `h % 4 == 2`: time passes — `h >> 2` × 50 ms; both links' timers run;
//! * `h % 4 == 3`: the device application queues a reading.
//!
//! Injected bytes go to the gateway when `h & 0x40` is clear, else to the
//! device. After every operation the two links exchange frames for a few
//! rounds, and the gateway application makes every reading durable.
//!
//! Checked besides "never panics": every frame a link transmits decodes;
//! the gateway delivers the readings of a device strictly in sequence (no
//! duplicate, no gap) between two `Hello` events for it; the device never
//! holds more than its window.
#![no_main]

use embassy_time::{Duration, Instant};
use firmware_proto::PROTOCOL_VERSION;
use firmware_proto::frame::{Deframer, MAX_FRAME_SIZE_BYTES, MAX_RAW_LEN, encode_raw};
use firmware_proto::link::{DEFAULT_WINDOW, DeviceLink, GatewayEvent, GatewayLink};
use firmware_proto::message::{Config, Reading};
use libfuzzer_sys::fuzz_target;

const DEVICE_ADDRESS: u8 = 1;
const UNIX_MS: u64 = 1_700_000_000_000;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = (self.byte()? as usize).min(self.0.len());
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(taken)
    }
}

/// Wraps `body` in a valid frame for `address`; `None` if it is too long.
fn forge(address: u8, body: &[u8], out: &mut [u8; MAX_FRAME_SIZE_BYTES]) -> Option<usize> {
    let mut raw = [0u8; MAX_RAW_LEN];
    let crc_at = 2 + body.len();
    if crc_at + 4 > MAX_RAW_LEN {
        return None;
    }
    raw[0] = PROTOCOL_VERSION;
    raw[1] = address;
    raw[2..crc_at].copy_from_slice(body);
    let crc = CRC.checksum(&raw[..crc_at]);
    raw[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    encode_raw(&raw[..crc_at + 4], out).ok()
}

/// A frame a link transmitted must decode, to exactly one frame.
fn check_transmitted(frame: &[u8]) {
    assert!(frame.len() <= MAX_FRAME_SIZE_BYTES);
    let mut deframer = Deframer::new();
    let mut count = 0;
    deframer.feed(frame, |f| {
        count += 1;
        if let Err(e) = f {
            panic!("a link transmitted a frame that does not decode: {e:?} {frame:02x?}");
        }
    });
    assert_eq!(count, 1, "a transmitted frame decodes to {count} frames");
}

fn reading() -> Reading {
    Reading {
        seq: 0,
        boot_epoch: 0,
        timestamp_ms: 0,
        temperature: 21.5,
        humidity: 40.0,
        battery: 90.0,
        lat: 48.1,
        lon: 11.5,
        speed: 0.0,
        extras: Default::default(),
    }
}

struct Harness {
    now: Instant,
    device: DeviceLink,
    gateway: GatewayLink,
    /// Last reading delivered per address, as (boot_epoch, seq), since the
    /// last `Hello` event from it.
    delivered: [Option<(u32, u32)>; 256],
    buf: [u8; MAX_FRAME_SIZE_BYTES],
}

impl Harness {
    fn new() -> Self {
        let now = Instant::from_millis(0);
        Self {
            now,
            device: DeviceLink::new(DEVICE_ADDRESS, "pump-7".try_into().unwrap(), 0x010200, 42, now),
            gateway: GatewayLink::new(Config {
                sampling_interval_ms: 1000,
                heartbeat_interval_ms: 5000,
            }),
            delivered: [None; 256],
            buf: [0; MAX_FRAME_SIZE_BYTES],
        }
    }

    fn to_gateway(&mut self, bytes: &[u8]) {
        // In chunks of 64 bytes, events drained after each: a chunk ends at
        // most 33 frames, so the gateway's 64-event queue never overflows
        // and no `Hello` event is lost to the sequence check below.
        for chunk in bytes.chunks(64) {
            self.gateway.handle_bytes(chunk, self.now, UNIX_MS);
            self.drain_gateway_events();
        }
    }

    fn to_device(&mut self, bytes: &[u8]) {
        self.device.handle_bytes(bytes, self.now);
        while self.device.poll_event().is_some() {}
        assert!(self.device.unacked() <= DEFAULT_WINDOW);
    }

    fn drain_gateway_events(&mut self) {
        while let Some(event) = self.gateway.poll_event() {
            match event {
                GatewayEvent::Hello { address, .. } => self.delivered[address as usize] = None,
                GatewayEvent::Reading { address, reading, .. } => {
                    let last = &mut self.delivered[address as usize];
                    if let Some((epoch, seq)) = *last {
                        assert_eq!(reading.boot_epoch, epoch, "reading of another epoch without Hello");
                        assert_eq!(
                            reading.seq,
                            seq.wrapping_add(1),
                            "address {address}: reading {} delivered after {seq}",
                            reading.seq
                        );
                    }
                    *last = Some((reading.boot_epoch, reading.seq));
                    // The application stored it: acknowledge.
                    self.gateway.handle_durable(address, reading.boot_epoch, reading.seq);
                }
                GatewayEvent::FrameError(_) | GatewayEvent::DeviceSilent { .. } => {}
            }
        }
    }

    /// Lets the links talk for a few rounds (bounded: a link may always
    /// have something to say).
    fn exchange(&mut self) {
        for _ in 0..4 {
            let mut quiet = true;
            for _ in 0..DEFAULT_WINDOW + 2 {
                let Some(n) = self.device.poll_transmit(self.now, &mut self.buf) else { break };
                quiet = false;
                let frame = self.buf;
                check_transmitted(&frame[..n]);
                self.to_gateway(&frame[..n]);
            }
            for _ in 0..32 {
                let Some(n) = self.gateway.poll_transmit(&mut self.buf) else { break };
                quiet = false;
                let frame = self.buf;
                check_transmitted(&frame[..n]);
                self.to_device(&frame[..n]);
            }
            if quiet {
                break;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut h = Harness::new();
    let mut input = Input(data);
    let mut frame = [0u8; MAX_FRAME_SIZE_BYTES];
    while let Some(op) = input.byte() {
        let injected: Option<&[u8]> = match op % 4 {
            0 => input.bytes(),
            1 => {
                let address = if op & 0x80 != 0 { input.byte() } else { Some(DEVICE_ADDRESS) };
                let (Some(address), Some(body)) = (address, input.bytes()) else { break };
                forge(address, body, &mut frame).map(|n| &frame[..n])
            }
            2 => {
                h.now = h.now + Duration::from_millis(u64::from(op >> 2) * 50);
                h.device.handle_timeout(h.now);
                h.gateway.handle_timeout(h.now);
                let _ = h.device.poll_timeout();
                let _ = h.gateway.poll_timeout();
                let _ = h.device.unix_time_ms(h.now);
                None
            }
            _ => {
                let _ = h.device.send(reading(), h.now);
                None
            }
        };
        if let Some(bytes) = injected {
            if op & 0x40 == 0 {
                h.to_gateway(bytes);
            } else {
                h.to_device(bytes);
            }
        }
        h.exchange();
    }
});
