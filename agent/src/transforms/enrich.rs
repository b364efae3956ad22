//! The stateful part of the data plane, run inside each outbox batch
//! transaction: registry lookup (cache, then SQLite), the unknown-device
//! policy, per-device value ranges, geofence events and threshold alerts.
//!
//! Per-device state (fences the device is in, consecutive readings over a
//! threshold) is written in the batch's transaction for every device whose
//! state the batch changed, so a restart never raises a spurious `enter`.
//! It is changed in place in memory; when a batch fails, the in-memory
//! state is reloaded from SQLite (which rolled back) before the next one.

use std::collections::BTreeMap;

use foldhash::{HashMap, HashMapExt as _};
use std::sync::Arc;

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::DeviceKey;
use crate::config::{Bounds, Config, DeviceTypeConfig, UnknownDevice};
use crate::registry::{self, CachedDevice, DeviceCache};
use crate::transforms::geofence::{DeviceFences, FenceIndex};
use crate::transforms::validate::{Reading, RejectReason, Rejection};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS device_state (
    device_id TEXT PRIMARY KEY,
    body      BLOB NOT NULL
) WITHOUT ROWID;
";

/// Per-device state that survives restarts (stored with postcard: no
/// `skip_serializing_if` here, the format is not self-describing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    #[serde(default)]
    pub fences: DeviceFences,
    /// Field → consecutive readings outside its alert threshold.
    #[serde(default)]
    pub outside: BTreeMap<String, u32>,
}

impl DeviceState {
    fn is_empty(&self) -> bool {
        self.fences.is_empty() && self.outside.is_empty()
    }
}

/// An alert for `iot-alerts`. `alert_id` is deterministic (device, key of
/// the reading, event, fence or field), so a replay overwrites the same
/// document instead of adding one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    pub alert_id: String,
    /// `geofence` or `threshold`.
    pub kind: &'static str,
    /// `enter`, `exit`, `dwell`, `absent` or `threshold`.
    pub event: &'static str,
    pub device_id: String,
    pub seq: u64,
    pub ts: i64,
    pub lat: f64,
    pub lon: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fence_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<Bounds>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consecutive: Option<u32>,
}

/// Counters of the data plane, cumulative since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlaneCounters {
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_entries: u64,
    pub unknown_devices: u64,
    pub registry_generation: i64,
    pub fences: u64,
}

pub struct DataPlane {
    /// Registry generation the cache and fence index belong to; -1 before
    /// the first batch.
    generation: i64,
    cache: DeviceCache,
    fences: FenceIndex,
    policy: UnknownDevice,
    types: BTreeMap<String, DeviceTypeConfig>,
    threshold_readings: u32,
    states: HashMap<DeviceKey, DeviceState>,
    /// Devices whose state the current batch changed.
    dirty: Vec<DeviceKey>,
    /// A batch failed after changing states: reload them from SQLite.
    reload: bool,
    unknown: u64,
}

impl DataPlane {
    pub fn new(config: &Config) -> Self {
        Self {
            generation: -1,
            cache: DeviceCache::new(config.registry.cache_capacity),
            fences: FenceIndex::new(Vec::new()),
            policy: config.registry.unknown_device,
            types: config.device_types.clone(),
            threshold_readings: config.alerts.threshold_readings,
            states: HashMap::new(),
            dirty: Vec::new(),
            reload: false,
            unknown: 0,
        }
    }

    /// No registry, unknown devices pass: what the outbox does on its own.
    pub fn passthrough() -> Self {
        Self {
            generation: -1,
            cache: DeviceCache::new(1024),
            fences: FenceIndex::new(Vec::new()),
            policy: UnknownDevice::Pass,
            types: BTreeMap::new(),
            threshold_readings: 3,
            states: HashMap::new(),
            dirty: Vec::new(),
            reload: false,
            unknown: 0,
        }
    }

    /// Loads the persisted device states.
    pub fn load_states(&mut self, conn: &Connection) -> Result<(), rusqlite::Error> {
        self.states.clear();
        let mut stmt = conn.prepare("SELECT device_id, body FROM device_state")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        for row in rows {
            let (device, body) = row?;
            match postcard::from_bytes(&body) {
                Ok(state) => {
                    self.states.insert(DeviceKey::from(device), state);
                }
                // Losing one device's fence state costs at most a repeated
                // `enter`; refusing to start would cost every reading.
                Err(e) => error!(device, error = %e, "ignoring unreadable stored device state"),
            }
        }
        Ok(())
    }

    pub fn counters(&self) -> PlaneCounters {
        PlaneCounters {
            cache_hits: self.cache.hits,
            cache_misses: self.cache.misses,
            cache_entries: self.cache.len() as u64,
            unknown_devices: self.unknown,
            registry_generation: self.generation.max(0),
            fences: self.fences.len() as u64,
        }
    }

    /// Starts a batch inside its transaction: picks up a registry applied
    /// since the last batch.
    pub fn begin(&mut self, conn: &Connection) -> Result<(), registry::RegistryError> {
        self.dirty.clear();
        if self.reload {
            self.load_states(conn)?;
            self.reload = false;
        }
        let generation = registry::generation(conn)?;
        if generation != self.generation {
            let fences = match registry::load_fences(conn) {
                Ok(f) => f,
                // Stored by a build that validated differently: keep going
                // with the fences in use rather than stop taking input.
                Err(e) => {
                    error!(generation, error = %e, "stored geofences unreadable; keeping the fences in use");
                    self.fences.fences().to_vec()
                }
            };
            if self.generation >= 0 {
                info!(
                    generation,
                    fences = fences.len(),
                    "registry changed: using the new devices and fences"
                );
            }
            self.fences = FenceIndex::new(fences);
            self.cache.clear();
            self.generation = generation;
            let (fences, dirty) = (&self.fences, &mut self.dirty);
            self.states.retain(|device, state| {
                if state.fences.forget_unknown(fences) {
                    dirty.push(device.clone());
                }
                !state.is_empty()
            });
        }
        Ok(())
    }

    /// Looks the device up and applies the unknown-device policy and the
    /// device's value ranges. `Ok(Err(_))` rejects the reading.
    pub fn check(
        &mut self,
        conn: &Connection,
        reading: &Reading,
    ) -> Result<Result<Option<Arc<CachedDevice>>, Rejection>, registry::RegistryError> {
        let meta = match self.cache.get(&reading.device_id) {
            Some(entry) => entry,
            None => {
                let entry = match registry::lookup(conn, &reading.device_id) {
                    Ok(m) => m.map(|m| Arc::new(CachedDevice::new(&m))),
                    // One unreadable entry must not stop every batch: the
                    // device is treated as unknown (policy applies).
                    Err(registry::RegistryError::Json(e)) => {
                        error!(device = %reading.device_id, error = %e, "stored registry entry unreadable; treating the device as unknown");
                        None
                    }
                    Err(e) => return Err(e),
                };
                self.cache.insert(&reading.device_id, entry.clone());
                entry
            }
        };
        let Some(meta) = meta else {
            self.unknown += 1;
            return Ok(match self.policy {
                UnknownDevice::Pass => Ok(None),
                UnknownDevice::Reject => Err(Rejection::new(
                    RejectReason::UnknownDevice,
                    format!(
                        "device {:?} is not in the registry (registry.unknown_device = \"reject\")",
                        reading.device_id
                    ),
                )),
            });
        };
        let type_defaults = meta.device_type.as_ref().and_then(|t| self.types.get(&**t));
        for (field, value) in values(reading) {
            let bounds = meta
                .ranges
                .as_deref()
                .and_then(|r| field_of(r, field))
                .map(|b| (b, "the device's registry entry"))
                .or_else(|| {
                    type_defaults
                        .and_then(|t| field_of(&t.ranges, field))
                        .map(|b| (b, "its device type"))
                });
            if let Some((b, from)) = bounds
                && !(b[0]..=b[1]).contains(&value)
            {
                return Ok(Err(Rejection::new(
                    RejectReason::OutOfRange,
                    format!(
                        "field `{field}` = {value} is outside {} to {} (range from {from})",
                        b[0], b[1]
                    ),
                )));
            }
        }
        Ok(Ok(Some(meta)))
    }

    /// Advances the device's fence and threshold state with an accepted
    /// reading; pushes the alerts it raises.
    pub fn events(
        &mut self,
        reading: &Reading,
        meta: Option<&CachedDevice>,
        alerts: &mut Vec<Alert>,
    ) {
        let type_defaults = meta
            .and_then(|m| m.device_type.as_ref())
            .and_then(|t| self.types.get(&**t));
        let has_thresholds = meta.is_some_and(|m| m.thresholds.is_some())
            || type_defaults.is_some_and(|t| !t.thresholds.is_empty());
        let id = reading.device_id.as_str();
        if self.fences.is_empty() && !has_thresholds && !self.states.contains_key(id) {
            return;
        }
        // A device without state gets a fresh one here, kept only if the
        // reading leaves something in it: most readings change nothing, and
        // an entry made and removed again would cost a key allocation and
        // two hash probes each time.
        let mut fresh = None;
        let state = match self.states.get_mut(id) {
            Some(s) => s,
            None => fresh.insert(DeviceState::default()),
        };
        let before = alerts.len();
        let mut changed = false;
        for e in state.fences.step(
            &self.fences,
            id,
            reading.seq,
            reading.ts,
            reading.lat,
            reading.lon,
        ) {
            alerts.push(Alert {
                alert_id: e.id,
                kind: "geofence",
                event: e.kind.as_str(),
                device_id: e.device_id,
                seq: e.seq,
                ts: e.ts,
                lat: e.lat,
                lon: e.lon,
                fence_id: Some(e.fence_id),
                field: None,
                value: None,
                threshold: None,
                consecutive: None,
            });
        }
        let needed = meta
            .and_then(|m| m.threshold_readings)
            .unwrap_or(self.threshold_readings);
        for (field, value) in values(reading) {
            let bounds = meta
                .and_then(|m| m.thresholds.as_deref())
                .and_then(|t| field_of(t, field))
                .or_else(|| type_defaults.and_then(|t| field_of(&t.thresholds, field)));
            match bounds {
                Some(b) if !(b[0]..=b[1]).contains(&value) => {
                    changed = true;
                    let count = match state.outside.get_mut(field) {
                        Some(count) => {
                            *count = count.saturating_add(1);
                            *count
                        }
                        None => {
                            state.outside.insert(field.to_string(), 1);
                            1
                        }
                    };
                    if count == needed {
                        alerts.push(Alert {
                            alert_id: format!("{id}:{}:threshold:{field}", reading.seq),
                            kind: "threshold",
                            event: "threshold",
                            device_id: id.to_string(),
                            seq: reading.seq,
                            ts: reading.ts,
                            lat: reading.lat,
                            lon: reading.lon,
                            fence_id: None,
                            field: Some(field),
                            value: Some(value),
                            threshold: Some(b),
                            consecutive: Some(needed),
                        });
                    }
                }
                _ => {
                    changed |= state.outside.remove(field).is_some();
                }
            }
        }
        if changed || alerts.len() > before {
            // A device is listed once per batch at most when it changes
            // often; the persist step skips repeats.
            if self.dirty.last().map(DeviceKey::as_str) != Some(id) {
                self.dirty.push(DeviceKey::from(id));
            }
        }
        let empty = state.is_empty();
        match fresh {
            Some(state) if !empty => {
                self.states.insert(DeviceKey::from(id), state);
            }
            None if empty => {
                self.states.remove(id);
            }
            _ => {}
        }
    }

    /// Writes the device states the batch changed, in its transaction.
    pub fn persist(&mut self, conn: &Connection) -> Result<(), rusqlite::Error> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        self.dirty.sort_unstable();
        self.dirty.dedup();
        let mut upsert = conn.prepare_cached(
            "INSERT INTO device_state (device_id, body) VALUES (?1, ?2) ON CONFLICT(device_id) DO UPDATE SET body = excluded.body",
        )?;
        let mut delete = conn.prepare_cached("DELETE FROM device_state WHERE device_id = ?1")?;
        for device in &self.dirty {
            match self.states.get(device.as_str()) {
                Some(state) => {
                    // postcard: compact and cheap to write for every change.
                    let body = postcard::to_allocvec(state)
                        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                    upsert.execute(params![device.as_str(), body])?;
                }
                None => {
                    delete.execute([device.as_str()])?;
                }
            }
        }
        Ok(())
    }

    /// The batch committed.
    pub fn committed(&mut self) {
        self.dirty.clear();
    }

    /// The batch failed: its changes to device states are void. The
    /// registry switch it may have made is redone by the next batch too
    /// (its clean-up of state for removed fences was rolled back as well).
    pub fn rolled_back(&mut self) {
        self.dirty.clear();
        self.reload = true;
        self.generation = -1;
    }

    /// Stored state of a device (tests and `status`).
    pub fn state(&self, device_id: &str) -> Option<&DeviceState> {
        self.states.get(device_id)
    }
}

fn values(r: &Reading) -> [(&'static str, f64); 4] {
    [
        ("temperature", r.temperature),
        ("humidity", r.humidity),
        ("battery", r.battery),
        ("speed", r.speed),
    ]
}

fn field_of(limits: &crate::config::ValueLimits, field: &str) -> Option<Bounds> {
    match field {
        "temperature" => limits.temperature,
        "humidity" => limits.humidity,
        "battery" => limits.battery,
        "speed" => limits.speed,
        _ => None,
    }
}
