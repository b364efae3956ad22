//! A fleet of MQTT devices that behaves like real ones under faults: every
//! reading is published with QoS 1 and kept until the broker acknowledges
//! it; whatever was in flight when a connection broke is published again,
//! in order, after reconnecting. Readings are a pure function of
//! `(device, seq)`, so the set a run must end with is known in advance.
//!
//! The fleet shares one connection. `rumqttc` forgets unacknowledged
//! publishes when a clean session starts, so the fleet tracks them itself:
//! publish requests are matched to packet ids in the order the event loop
//! sends them, and a PUBACK settles one reading.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// What the fleet sends.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Prefix of the MQTT topics (`{topic_prefix}devices/{id}/telemetry`).
    pub topic_prefix: String,
    /// Device ids are `{id_prefix}{index:04}`.
    pub id_prefix: String,
    pub devices: usize,
    pub readings_per_device: u64,
    /// Readings per second over the whole fleet; 0 = as fast as the broker
    /// takes them (open loop).
    pub readings_per_second: f64,
    /// Every reading whose seq is a multiple of this has an impossible
    /// latitude (rejected by the agent); 0 = none.
    pub invalid_every: u64,
    /// Every reading whose seq is a multiple of this has a temperature above
    /// [`ALERT_TEMPERATURE_LIMIT`]; 0 = none.
    pub hot_every: u64,
    /// Timestamps are `base_ts_ms + global index` (deterministic).
    pub base_ts_ms: i64,
    /// Timestamps are the send time instead (latency measurements).
    pub live_timestamps: bool,
    /// Devices drive around a circle (so they cross the fences of
    /// [`FleetConfig::registry_with_fences`]); `None`: each stays put.
    pub tracks: Option<FleetTracks>,
}

/// The circle the devices of a fleet drive around, each starting at its
/// own point of it.
#[derive(Debug, Clone, Copy)]
pub struct FleetTracks {
    pub center_lat: f64,
    pub center_lon: f64,
    /// Radius in degrees of latitude (0.01 is about 1.1 km).
    pub radius_deg: f64,
    /// Readings a device takes to drive once around.
    pub readings_per_lap: u64,
}

impl FleetTracks {
    /// Around Berlin, 1.1 km in radius, a lap in 600 readings.
    pub const BENCH: Self = Self {
        center_lat: 52.5,
        center_lon: 13.4,
        radius_deg: 0.01,
        readings_per_lap: 600,
    };

    fn lon_scale(&self) -> f64 {
        self.center_lat.to_radians().cos().max(0.1)
    }

    /// Where device `device_id` is at reading `seq`, to six decimals
    /// (about 0.1 m), as a GPS receiver reports it. Each device starts at
    /// its own point of the circle (from a hash of its id, so that the
    /// devices of several fleets do not drive in pairs).
    pub fn position(&self, device_id: &str, seq: u64) -> (f64, f64) {
        // FNV-1a.
        let hash = device_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let start = (hash >> 11) as f64 / (1u64 << 53) as f64;
        let lap = (seq % self.readings_per_lap) as f64 / self.readings_per_lap as f64;
        let angle = std::f64::consts::TAU * (start + lap);
        let lat = self.center_lat + self.radius_deg * angle.sin();
        let lon = self.center_lon + self.radius_deg * angle.cos() / self.lon_scale();
        let round = |v: f64| (v * 1e6).round() / 1e6;
        (round(lat), round(lon))
    }
}

/// Upper temperature limit the fault tests register for every device.
pub const ALERT_TEMPERATURE_LIMIT: f64 = 30.0;

impl FleetConfig {
    pub fn device_id(&self, device: usize) -> String {
        format!("{}{device:04}", self.id_prefix)
    }

    pub fn total(&self) -> u64 {
        self.devices as u64 * self.readings_per_device
    }

    fn is_invalid(&self, seq: u64) -> bool {
        self.invalid_every > 0 && seq.is_multiple_of(self.invalid_every)
    }

    fn is_hot(&self, seq: u64) -> bool {
        self.hot_every > 0 && seq.is_multiple_of(self.hot_every) && !self.is_invalid(seq)
    }

    /// The `(device_id, seq)` the agent must accept: every reading but the
    /// invalid ones.
    pub fn expected_valid(&self) -> BTreeSet<(String, u64)> {
        let mut out = BTreeSet::new();
        for d in 0..self.devices {
            let id = self.device_id(d);
            for seq in 1..=self.readings_per_device {
                if !self.is_invalid(seq) {
                    out.insert((id.clone(), seq));
                }
            }
        }
        out
    }

    /// The threshold alert ids the agent must raise when every device has a
    /// temperature limit of [`ALERT_TEMPERATURE_LIMIT`] and alerts after one
    /// reading outside it: one per hot reading (each follows a reading back
    /// inside the limit, which re-arms the alert).
    pub fn expected_alert_ids(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for d in 0..self.devices {
            let id = self.device_id(d);
            for seq in 1..=self.readings_per_device {
                if self.is_hot(seq) {
                    out.insert(format!("{id}:{seq}:threshold:temperature"));
                }
            }
        }
        out
    }

    /// The registry file for the fleet: every device with the temperature
    /// limit and a one-reading threshold.
    pub fn registry_json(&self) -> serde_json::Value {
        let devices: Vec<serde_json::Value> = (0..self.devices)
            .map(|d| {
                serde_json::json!({
                    "device_id": self.device_id(d), "device_type": "sensor",
                    "thresholds": {"temperature": [-40.0, ALERT_TEMPERATURE_LIMIT]},
                    "threshold_readings": 1
                })
            })
            .collect();
        serde_json::json!({
            "version": "fleet-1",
            "devices": devices,
            "fences": {"type": "FeatureCollection", "features": []}
        })
    }

    /// A registry for `fleets` driving `tracks`: every device with its
    /// type, name, site and tags (what enrichment adds to its readings),
    /// and `fences` squares scattered within three radii of the circle's
    /// centre, each 0.4 radius wide: some lie across the circle, so the
    /// devices enter and leave them every few dozen readings, while every
    /// position is looked up against all fences.
    pub fn registry_with_fences(
        fleets: &[FleetConfig],
        tracks: &FleetTracks,
        fences: usize,
    ) -> serde_json::Value {
        let devices: Vec<serde_json::Value> = fleets
            .iter()
            .flat_map(|f| (0..f.devices).map(move |d| (f, d)))
            .map(|(f, d)| {
                serde_json::json!({
                    "device_id": f.device_id(d), "device_type": "tracker",
                    "name": format!("Bench tracker {}", f.device_id(d)), "site": "bench",
                    "tags": {"fleet": format!("f{}", d % 10)},
                })
            })
            .collect();
        // A fixed sequence in [-1, 1) per fence (SplitMix64): the same
        // fences every run.
        let unit = |k: u64| {
            let mut z = k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        };
        let (r, scale) = (tracks.radius_deg, tracks.lon_scale());
        let half = r * 0.2;
        let features: Vec<serde_json::Value> = (0..fences as u64)
            .map(|i| {
                let lat = tracks.center_lat + 3.0 * r * unit(2 * i);
                let lon = tracks.center_lon + 3.0 * r * unit(2 * i + 1) / scale;
                crate::sim::square_fence(i, lat, lon, half, scale)
            })
            .collect();
        serde_json::json!({
            "version": format!("fleet-{}-{fences}", devices.len()),
            "devices": devices,
            "fences": {"type": "FeatureCollection", "features": features}
        })
    }

    /// The reading `seq` of device `device`: topic and JSON payload.
    pub fn reading(&self, device: usize, seq: u64) -> (String, Vec<u8>) {
        let id = self.device_id(device);
        let index = (seq - 1) * self.devices as u64 + device as u64;
        let (lat, lon) = match &self.tracks {
            Some(t) => t.position(&id, seq),
            None => (52.5, 13.4 + device as f64 * 1e-4),
        };
        let lat = if self.is_invalid(seq) { 123.0 } else { lat };
        let temperature = if self.is_hot(seq) {
            ALERT_TEMPERATURE_LIMIT + 10.0
        } else {
            20.0 + (seq % 7) as f64
        };
        let payload = serde_json::json!({
            "device_id": id, "seq": seq,
            "ts": if self.live_timestamps { crate::now_ms() } else { self.base_ts_ms + index as i64 },
            "temperature": temperature, "humidity": 40.0 + (seq % 20) as f64,
            "battery": 90.0, "lat": lat, "lon": lon, "speed": 3.0
        });
        (
            format!("{}devices/{id}/telemetry", self.topic_prefix),
            payload.to_string().into_bytes(),
        )
    }
}

/// Live counters of a running fleet.
#[derive(Debug, Default)]
pub struct FleetProgress {
    /// Distinct readings produced so far.
    pub produced: AtomicU64,
    /// Readings the broker acknowledged.
    pub acked: AtomicU64,
    /// Publishes sent again after a broken connection.
    pub retransmitted: AtomicU64,
    /// Connections lost.
    pub disconnects: AtomicU64,
    /// Every reading is produced and acknowledged.
    pub done: AtomicBool,
}

/// Runs the fleet until every reading is acknowledged by the broker or
/// `stop` is set. Reconnects on its own, forever: a test bounds it.
pub async fn run_fleet(
    config: FleetConfig,
    mqtt: (String, u16),
    client_id: String,
    progress: Arc<FleetProgress>,
    stop: Arc<AtomicBool>,
) {
    let mut opts = MqttOptions::new(client_id, mqtt.0, mqtt.1);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_session(true);
    opts.set_inflight(200);
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 512);

    let total = config.total();
    // Readings handed to the client, in the order the event loop sends them.
    let mut queued: VecDeque<(usize, u64)> = VecDeque::new();
    // Sent, not yet acknowledged, by packet id.
    let mut inflight: HashMap<u16, (usize, u64)> = HashMap::new();
    // To publish again first, in (device, seq) order.
    let mut resend: VecDeque<(usize, u64)> = VecDeque::new();
    let mut next_index: u64 = 0;
    let mut acked: u64 = 0;
    let mut connected = false;
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    while !stop.load(Relaxed) {
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => connected = true,
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(key) = queued.pop_front() {
                        inflight.insert(pkid, key);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if inflight.remove(&ack.pkid).is_some() {
                        acked += 1;
                        progress.acked.store(acked, Relaxed);
                        if acked == total {
                            progress.done.store(true, Relaxed);
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    if connected {
                        progress.disconnects.fetch_add(1, Relaxed);
                    }
                    connected = false;
                    // Everything handed over and not acknowledged is gone
                    // with the clean session: publish it again.
                    let mut lost: Vec<(usize, u64)> =
                        inflight.drain().map(|(_, k)| k).chain(queued.drain(..)).collect();
                    lost.extend(resend.drain(..));
                    lost.sort_unstable();
                    lost.dedup();
                    progress.retransmitted.fetch_add(lost.len() as u64, Relaxed);
                    resend.extend(lost);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            _ = tick.tick() => {
                if !connected {
                    continue;
                }
                while queued.len() < 256 {
                    let key = if let Some(key) = resend.pop_front() {
                        key
                    } else {
                        let allowed = if config.readings_per_second > 0.0 {
                            (started.elapsed().as_secs_f64() * config.readings_per_second) as u64
                        } else {
                            u64::MAX
                        };
                        if next_index >= total || next_index >= allowed {
                            break;
                        }
                        let key = (
                            (next_index % config.devices as u64) as usize,
                            next_index / config.devices as u64 + 1,
                        );
                        next_index += 1;
                        progress.produced.store(next_index, Relaxed);
                        key
                    };
                    let (topic, payload) = config.reading(key.0, key.1);
                    if client.try_publish(topic, QoS::AtLeastOnce, false, payload).is_err() {
                        resend.push_front(key);
                        break;
                    }
                    queued.push_back(key);
                }
            }
        }
    }
    let _ = client.try_disconnect();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(c: usize, devices: usize) -> FleetConfig {
        FleetConfig {
            topic_prefix: "t/".into(),
            id_prefix: format!("dev-{c}-"),
            devices,
            readings_per_device: 1_000,
            readings_per_second: 0.0,
            invalid_every: 0,
            hot_every: 0,
            base_ts_ms: 0,
            live_timestamps: false,
            tracks: Some(FleetTracks::BENCH),
        }
    }

    /// The registry the agent is given: every device of every fleet, the
    /// fences asked for, all of it valid for the agent; and the devices,
    /// driving around, go in and out of fences many times a lap.
    #[test]
    fn moving_devices_cross_the_fences_of_their_registry() {
        let fleets = [fleet(0, 60), fleet(1, 60)];
        let tracks = FleetTracks::BENCH;
        let doc = FleetConfig::registry_with_fences(&fleets, &tracks, 200);
        let registry = edge_agent::registry::parse_registry(&doc.to_string()).unwrap();
        assert_eq!(registry.devices.len(), 120);
        assert_eq!(registry.devices[61].device_id, "dev-1-0001");
        assert_eq!(registry.fences.len(), 200);
        // The squares, as (lat, lon) bounds.
        let squares: Vec<[f64; 4]> = doc["fences"]["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let ring = f["geometry"]["coordinates"][0].as_array().unwrap();
                let at = |i: usize, k: usize| ring[i][k].as_f64().unwrap();
                [at(0, 1), at(2, 1), at(0, 0), at(2, 0)]
            })
            .collect();
        let inside = |(lat, lon): (f64, f64)| -> Vec<usize> {
            (0..squares.len())
                .filter(|&i| {
                    let [lat0, lat1, lon0, lon1] = squares[i];
                    (lat0..=lat1).contains(&lat) && (lon0..=lon1).contains(&lon)
                })
                .collect()
        };
        let mut enters = 0;
        // Devices of two fleets with the same number start apart.
        assert_ne!(
            tracks.position("dev-0-0001", 1),
            tracks.position("dev-1-0001", 1)
        );
        for device in 0..60 {
            let id = fleets[0].device_id(device);
            let mut was = inside(tracks.position(&id, 0));
            for seq in 1..=tracks.readings_per_lap {
                let (lat, lon) = tracks.position(&id, seq);
                // On the circle, to the rounding of six decimals.
                let dlat = lat - tracks.center_lat;
                let dlon = (lon - tracks.center_lon) * tracks.lon_scale();
                let r = (dlat * dlat + dlon * dlon).sqrt();
                assert!((r - tracks.radius_deg).abs() < 2e-6, "{r}");
                let now = inside((lat, lon));
                enters += now.iter().filter(|f| !was.contains(f)).count();
                was = now;
            }
            // A lap ends where it began.
            assert_eq!(
                tracks.position(&id, tracks.readings_per_lap),
                tracks.position(&id, 0)
            );
        }
        assert!(
            enters >= 60 * 5,
            "{enters} fence entries in a lap of 60 devices"
        );
    }
}
