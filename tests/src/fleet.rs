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

    /// The reading `seq` of device `device`: topic and JSON payload.
    pub fn reading(&self, device: usize, seq: u64) -> (String, Vec<u8>) {
        let id = self.device_id(device);
        let index = (seq - 1) * self.devices as u64 + device as u64;
        let lat = if self.is_invalid(seq) { 123.0 } else { 52.5 };
        let temperature = if self.is_hot(seq) {
            ALERT_TEMPERATURE_LIMIT + 10.0
        } else {
            20.0 + (seq % 7) as f64
        };
        let payload = serde_json::json!({
            "device_id": id, "seq": seq,
            "ts": if self.live_timestamps { crate::now_ms() } else { self.base_ts_ms + index as i64 },
            "temperature": temperature, "humidity": 40.0 + (seq % 20) as f64,
            "battery": 90.0, "lat": lat, "lon": 13.4 + device as f64 * 1e-4, "speed": 3.0
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
