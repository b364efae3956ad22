//! Demo source: simulated devices, so the agent runs with no hardware.
//!
//! Each run is a new boot epoch for every simulated device (the start time
//! in seconds), so a restarted agent continues with fresh sequence numbers
//! instead of repeating old ones.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};

use crate::config::DemoSourceConfig;
use crate::pipeline::{Envelope, now_ms};
use crate::stats::Stats;

struct Device {
    id: String,
    seq: u64,
    lat: f64,
    lon: f64,
}

pub struct DemoSource {
    pub config: DemoSourceConfig,
    /// Same prefix the MQTT source expects, so both share one topic shape.
    pub topic_prefix: String,
    pub stats: Arc<Stats>,
}

impl DemoSource {
    pub async fn run(
        self,
        tx: mpsc::Sender<Envelope>,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut rng = StdRng::seed_from_u64(self.config.seed);
        let epoch = (now_ms() / 1000).clamp(0, i32::MAX as i64) as u64;
        let mut devices: Vec<Device> = (0..self.config.devices)
            .map(|i| Device {
                id: format!("{}{i:06}", self.config.device_prefix),
                seq: 0,
                lat: 48.0 + rng.random_range(0.0..1.0),
                lon: 11.0 + rng.random_range(0.0..1.0),
            })
            .collect();
        let tick = Duration::from_millis(10);
        let per_tick = self.config.readings_per_second as f64 / 100.0;
        let mut owed = 0.0;
        let mut next = 0usize;
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                _ = interval.tick() => {}
            }
            owed += per_tick;
            while owed >= 1.0 {
                owed -= 1.0;
                let count = devices.len();
                let device = &mut devices[next];
                next = (next + 1) % count;
                device.seq += 1;
                device.lat = (device.lat + rng.random_range(-0.001..0.001)).clamp(-90.0, 90.0);
                device.lon = (device.lon + rng.random_range(-0.001..0.001)).clamp(-180.0, 180.0);
                let mut reading = serde_json::json!({
                    "device_id": device.id,
                    "seq": device.seq,
                    "epoch": epoch,
                    "ts": now_ms(),
                    "temperature": rng.random_range(15.0..30.0),
                    "humidity": rng.random_range(30.0..70.0),
                    "battery": rng.random_range(20.0..100.0),
                    "lat": device.lat,
                    "lon": device.lon,
                    "speed": rng.random_range(0.0..30.0),
                });
                let mut payload = None;
                if rng.random_bool(self.config.invalid_fraction) {
                    match rng.random_range(0..4) {
                        0 => reading["temperature"] = "hot".into(),
                        1 => reading["lat"] = 123.0.into(),
                        2 => {
                            reading.as_object_mut().map(|o| o.remove("battery"));
                        }
                        _ => payload = Some(b"{\"device_id\": \"broken".to_vec()),
                    }
                }
                let payload = payload.unwrap_or_else(|| reading.to_string().into_bytes());
                self.stats.received.fetch_add(1, Relaxed);
                let env = Envelope::Raw {
                    source: "demo",
                    topic: format!("{}devices/{}/telemetry", self.topic_prefix, device.id),
                    payload,
                };
                tokio::select! {
                    _ = shutdown.changed() => return Ok(()),
                    sent = tx.send(env) => if sent.is_err() { return Ok(()) },
                }
            }
        }
    }
}
