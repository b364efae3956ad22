//! The device simulator behind `edge-sim` and the end-to-end tests.
//!
//! Serial devices run the very link state machine of `firmware-proto` that
//! real firmware runs (one bus, several addresses), with a channel that can
//! drop and corrupt bytes. MQTT devices publish JSON or `/bin` frames with
//! QoS 1. Every device follows a GPS track (a circle around a centre, so
//! tracks cross any fence drawn across that circle) and everything is
//! driven by one seeded random generator, so a run can be repeated.

use std::collections::BTreeSet;
use std::time::Duration;

use embassy_time::Instant as LinkInstant;
use firmware_proto::MAX_FRAME_SIZE_BYTES;
use firmware_proto::frame::encode_frame;
use firmware_proto::link::{DeviceEvent, DeviceLink};
use firmware_proto::message::{DeviceId, Extra, Message, Reading};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// A point moving on a circle: the simulated GPS track of a device.
#[derive(Debug, Clone, Copy)]
pub struct Track {
    pub center_lat: f64,
    pub center_lon: f64,
    /// Radius in degrees of latitude (0.01 ≈ 1.1 km).
    pub radius_deg: f64,
    /// Angle advanced per reading, in radians.
    pub step_rad: f64,
    pub angle: f64,
}

impl Track {
    pub fn advance(&mut self) -> (f64, f64) {
        self.angle += self.step_rad;
        let lat = self.center_lat + self.radius_deg * self.angle.sin();
        let lon = self.center_lon
            + self.radius_deg * self.angle.cos() / self.center_lat.to_radians().cos().max(0.1);
        (lat.clamp(-90.0, 90.0), lon.clamp(-180.0, 180.0))
    }
}

/// Faults injected into a byte stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteFaults {
    /// Probability that a byte is lost.
    pub drop_rate: f64,
    /// Probability that a byte is changed.
    pub corrupt_rate: f64,
}

impl ByteFaults {
    fn apply(&self, rng: &mut StdRng, bytes: &[u8], out: &mut Vec<u8>) {
        out.clear();
        for &b in bytes {
            if self.drop_rate > 0.0 && rng.random_bool(self.drop_rate) {
                continue;
            }
            if self.corrupt_rate > 0.0 && rng.random_bool(self.corrupt_rate) {
                out.push(b ^ rng.random_range(1..=255u8));
            } else {
                out.push(b);
            }
        }
    }
}

/// What the serial simulator does.
#[derive(Debug, Clone)]
pub struct SerialSimConfig {
    /// Devices on the bus; they get addresses 1..=devices.
    pub devices: u8,
    /// Readings each device produces.
    pub readings_per_device: u32,
    /// Readings per second over all devices; 0 = as fast as the link allows.
    pub readings_per_second: f64,
    /// Fraction of readings sent with an impossible latitude, which the
    /// gateway stores as rejected and answers with a `Nack`.
    pub invalid_fraction: f64,
    pub seed: u64,
    /// Faults on the device → gateway direction.
    pub uplink_faults: ByteFaults,
    /// Faults on the gateway → device direction.
    pub downlink_faults: ByteFaults,
    /// Boot epoch of device 1 (the others count up from it).
    pub boot_epoch: u32,
    /// Device ids are `{id_prefix}{address:03}`.
    pub id_prefix: String,
    pub track: Track,
}

impl SerialSimConfig {
    /// The `(device_id, key)` pairs the gateway must store, where `key` is
    /// the 64-bit sequence the gateway keys on (`epoch << 32 | seq`).
    pub fn expected_keys(&self) -> BTreeSet<(String, u64)> {
        let mut out = BTreeSet::new();
        for address in 1..=self.devices {
            let epoch = u64::from(self.boot_epoch + u32::from(address) - 1);
            for seq in 1..=u64::from(self.readings_per_device) {
                out.insert((self.device_id(address), (epoch << 32) | seq));
            }
        }
        out
    }

    pub fn device_id(&self, address: u8) -> String {
        format!("{}{address:03}", self.id_prefix)
    }
}

struct SimDevice {
    link: DeviceLink<16>,
    produced: u32,
    acked: u32,
    track: Track,
}

/// The serial devices of one bus. Survives a lost port: devices keep what
/// was not acknowledged and resend it on the next port.
pub struct SerialSim {
    config: SerialSimConfig,
    devices: Vec<SimDevice>,
    rng: StdRng,
    started: Instant,
    tokens: f64,
    last_refill: Instant,
    /// Bytes written towards the gateway.
    pub bytes_sent: u64,
}

/// Progress of a serial simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SerialProgress {
    pub produced: u64,
    pub acked: u64,
    pub total: u64,
    pub retransmissions: u64,
}

/// Why [`SerialSim::run`] returned.
#[derive(Debug)]
pub enum SerialRunEnd {
    /// Every reading was produced and acknowledged.
    Done,
    /// The stop condition asked to return.
    Stopped,
    /// The port failed (unplugged).
    PortLost(std::io::Error),
}

impl SerialSim {
    pub fn new(config: SerialSimConfig) -> Self {
        let started = Instant::now();
        let now = LinkInstant::from_ticks(0);
        let mut rng = StdRng::seed_from_u64(config.seed);
        let devices = (1..=config.devices)
            .map(|address| {
                let id = DeviceId::try_from(config.device_id(address).as_str())
                    .expect("device id fits 32 bytes");
                let mut track = config.track;
                track.angle = rng.random_range(0.0..std::f64::consts::TAU);
                SimDevice {
                    link: DeviceLink::new(
                        address,
                        id,
                        0x0001_0000,
                        config.boot_epoch + u32::from(address) - 1,
                        now,
                    ),
                    produced: 0,
                    acked: 0,
                    track,
                }
            })
            .collect();
        Self {
            config,
            devices,
            rng,
            started,
            tokens: 0.0,
            last_refill: started,
            bytes_sent: 0,
        }
    }

    fn link_now(&self) -> LinkInstant {
        LinkInstant::from_micros(self.started.elapsed().as_micros() as u64)
    }

    pub fn progress(&self) -> SerialProgress {
        let mut p = SerialProgress {
            total: u64::from(self.config.devices) * u64::from(self.config.readings_per_device),
            ..Default::default()
        };
        for d in &self.devices {
            p.produced += u64::from(d.produced);
            p.acked += u64::from(d.acked);
            p.retransmissions += u64::from(d.link.retransmissions);
        }
        p
    }

    fn done(&self) -> bool {
        self.devices.iter().all(|d| {
            d.produced == self.config.readings_per_device
                && d.acked == self.config.readings_per_device
        })
    }

    fn produce(&mut self, now: LinkInstant) {
        if self.config.readings_per_second > 0.0 {
            let t = Instant::now();
            self.tokens += (t - self.last_refill).as_secs_f64() * self.config.readings_per_second;
            self.tokens = self.tokens.min(self.config.readings_per_second.max(1.0));
            self.last_refill = t;
        }
        let limited = self.config.readings_per_second > 0.0;
        let total = self.config.readings_per_device;
        for d in &mut self.devices {
            while d.produced < total && d.link.can_send() && (!limited || self.tokens >= 1.0) {
                let (mut lat, lon) = d.track.advance();
                if self.config.invalid_fraction > 0.0
                    && self.rng.random_bool(self.config.invalid_fraction)
                {
                    lat = 123.0;
                }
                let timestamp_ms = d
                    .link
                    .unix_time_ms(now)
                    .unwrap_or_else(|| crate::now_ms() as u64);
                let mut extras = heapless::Vec::new();
                let _ = extras.push(Extra {
                    key: 1,
                    value: self.rng.random_range(980.0..1040.0),
                });
                let reading = Reading {
                    seq: 0,
                    boot_epoch: 0,
                    timestamp_ms,
                    temperature: self.rng.random_range(15.0..35.0),
                    humidity: self.rng.random_range(20.0..80.0),
                    battery: self.rng.random_range(10.0..100.0),
                    lat,
                    lon,
                    speed: self.rng.random_range(0.0..25.0),
                    extras,
                };
                if d.link.send(reading, now).is_err() {
                    break;
                }
                d.produced += 1;
                if limited {
                    self.tokens -= 1.0;
                }
            }
        }
    }

    /// Runs the devices over `port` until every reading is acknowledged,
    /// `stop` returns true (checked every few milliseconds), or the port
    /// fails.
    pub async fn run<P>(
        &mut self,
        port: &mut P,
        mut stop: impl FnMut(&SerialProgress) -> bool,
    ) -> SerialRunEnd
    where
        P: AsyncRead + AsyncWrite + Unpin,
    {
        let mut frame = [0u8; MAX_FRAME_SIZE_BYTES];
        let mut faulty = Vec::with_capacity(MAX_FRAME_SIZE_BYTES);
        let mut read_buf = [0u8; 1024];
        let mut out = Vec::with_capacity(4096);
        loop {
            if self.done() {
                return SerialRunEnd::Done;
            }
            if stop(&self.progress()) {
                return SerialRunEnd::Stopped;
            }
            let now = self.link_now();
            self.produce(now);
            out.clear();
            for i in 0..self.devices.len() {
                self.devices[i].link.handle_timeout(now);
                while let Some(n) = self.devices[i].link.poll_transmit(now, &mut frame) {
                    self.config
                        .uplink_faults
                        .apply(&mut self.rng, &frame[..n], &mut faulty);
                    out.extend_from_slice(&faulty);
                }
            }
            if !out.is_empty() {
                if let Err(e) = port.write_all(&out).await {
                    return SerialRunEnd::PortLost(e);
                }
                self.bytes_sent += out.len() as u64;
            }
            let next = self
                .devices
                .iter()
                .map(|d| d.link.poll_timeout())
                .min()
                .map(|at| self.started + Duration::from_micros(at.as_micros()))
                .unwrap_or_else(|| Instant::now() + Duration::from_millis(50));
            // Wake at least every 5 ms to produce and check `stop`.
            let wake = next.min(Instant::now() + Duration::from_millis(5));
            tokio::select! {
                read = port.read(&mut read_buf) => match read {
                    Ok(0) => return SerialRunEnd::PortLost(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "port closed")),
                    Ok(n) => {
                        self.config.downlink_faults.apply(&mut self.rng, &read_buf[..n], &mut faulty);
                        let now = self.link_now();
                        for d in &mut self.devices {
                            d.link.handle_bytes(&faulty, now);
                            while let Some(event) = d.link.poll_event() {
                                if let DeviceEvent::Acked { seq } = event {
                                    d.acked = d.acked.max(seq);
                                }
                            }
                        }
                    }
                    Err(e) => return SerialRunEnd::PortLost(e),
                },
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

/// A reading as JSON for the MQTT `telemetry` topic.
pub fn json_reading(
    device_id: &str,
    seq: u64,
    epoch: u32,
    ts: i64,
    track: &mut Track,
    rng: &mut StdRng,
) -> serde_json::Value {
    let (lat, lon) = track.advance();
    serde_json::json!({
        "device_id": device_id, "seq": seq, "epoch": epoch, "ts": ts,
        "temperature": rng.random_range(15.0..35.0), "humidity": rng.random_range(20.0..80.0),
        "battery": rng.random_range(10.0..100.0), "lat": lat, "lon": lon,
        "speed": rng.random_range(0.0..25.0),
    })
}

/// A reading as one firmware-proto frame for the MQTT `telemetry/bin` topic.
pub fn bin_reading(seq: u32, epoch: u32, ts: u64, track: &mut Track, rng: &mut StdRng) -> Vec<u8> {
    let (lat, lon) = track.advance();
    let message = Message::Reading(Reading {
        seq,
        boot_epoch: epoch,
        timestamp_ms: ts,
        temperature: rng.random_range(15.0..35.0),
        humidity: rng.random_range(20.0..80.0),
        battery: rng.random_range(10.0..100.0),
        lat,
        lon,
        speed: rng.random_range(0.0..25.0),
        extras: heapless::Vec::new(),
    });
    let mut buf = [0u8; MAX_FRAME_SIZE_BYTES];
    let n = encode_frame(0, &message, &mut buf).expect("a reading fits a frame");
    buf[..n].to_vec()
}

/// A square geofence as a registry file's GeoJSON feature: id
/// `fence-{i:04}`, centred on `(lat, lon)`, `half` degrees of latitude from
/// its centre to each side (longitudes divided by `lon_scale`, the cosine
/// of the latitude, so that it is square on the ground); `dwell` after
/// 30 s inside, `absent` 300 s after leaving.
pub fn square_fence(i: u64, lat: f64, lon: f64, half: f64, lon_scale: f64) -> serde_json::Value {
    let (dlat, dlon) = (half, half / lon_scale);
    serde_json::json!({
        "type": "Feature",
        "properties": {"id": format!("fence-{i:04}"), "dwell_seconds": 30, "absent_seconds": 300},
        "geometry": {"type": "Polygon", "coordinates": [[
            [lon - dlon, lat - dlat], [lon + dlon, lat - dlat], [lon + dlon, lat + dlat],
            [lon - dlon, lat + dlat], [lon - dlon, lat - dlat]
        ]]}
    })
}
