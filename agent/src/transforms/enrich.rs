//! The stateful part of the data plane, run inside each outbox batch
//! transaction: registry lookup (cache, then SQLite), the unknown-device
//! policy, per-device value ranges, geofence events and threshold alerts.
//!
//! Per-device state (fences the device is in, consecutive readings over a
//! threshold) is written in the batch's transaction for every device whose
//! state the batch changed, so a restart never raises a spurious `enter`.
//! It is changed in place in memory; when a batch fails, the in-memory
//! state is reloaded from SQLite (which rolled back) before the next one.
//!
//! A batch writes the states it changed as one appended row of
//! `device_state_log`, not as rows of `device_state`: updating a device's
//! row rewrites a page of the table for nearly every changed device, while
//! the log row is written in sequence. Once the log holds
//! [`STATE_LOG_FOLD_BYTES`], the next batch that changes a state folds it
//! instead: it writes the current state
//! of every device named in the log to `device_state` (each once, however
//! often it changed) and empties the log, in the batch's transaction. At start
//! the states are `device_state` with the log applied in order.

use std::collections::BTreeMap;

use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};
use std::sync::Arc;

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info};

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
CREATE TABLE IF NOT EXISTS device_state_log (
    id    INTEGER PRIMARY KEY,
    body  BLOB NOT NULL,
    codec INTEGER NOT NULL DEFAULT 0
);
";

/// `device_state_log.codec`: the entry as it is, or one lz4 block with its
/// size in front (states compress to about a sixth).
const LOG_RAW: i64 = 0;
const LOG_LZ4: i64 = 1;

/// Bytes of `device_state_log` after which a batch folds it into
/// `device_state`. Bounds the log (and the work of replaying it at start)
/// while letting a device that changes often be written to `device_state`
/// once per fold rather than once per batch.
const STATE_LOG_FOLD_BYTES: u64 = 8 << 20;

/// Length in a log entry of a device whose state was removed.
const LOG_REMOVED: u32 = u32::MAX;

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
    /// Devices named in `device_state_log`: their row in `device_state`
    /// may be older than their state.
    logged: HashSet<DeviceKey>,
    /// Bytes in `device_state_log`.
    log_bytes: u64,
    /// Log size at which a batch folds it ([`STATE_LOG_FOLD_BYTES`]).
    fold_bytes: u64,
    /// The log entry being written, and compressed (reused).
    log_body: Vec<u8>,
    log_packed: Vec<u8>,
    /// A batch failed after changing states: reload them from SQLite.
    reload: bool,
    unknown: u64,
}

impl DataPlane {
    pub fn new(config: &Config) -> Self {
        Self::with(
            config.registry.cache_capacity,
            config.registry.unknown_device,
            config.device_types.clone(),
            config.alerts.threshold_readings,
        )
    }

    /// No registry, unknown devices pass: what the outbox does on its own.
    pub fn passthrough() -> Self {
        Self::with(1024, UnknownDevice::Pass, BTreeMap::new(), 3)
    }

    fn with(
        cache_capacity: usize,
        policy: UnknownDevice,
        types: BTreeMap<String, DeviceTypeConfig>,
        threshold_readings: u32,
    ) -> Self {
        Self {
            generation: -1,
            cache: DeviceCache::new(cache_capacity),
            fences: FenceIndex::new(Vec::new()),
            policy,
            types,
            threshold_readings,
            states: HashMap::new(),
            dirty: Vec::new(),
            logged: HashSet::new(),
            log_bytes: 0,
            fold_bytes: STATE_LOG_FOLD_BYTES,
            log_body: Vec::new(),
            log_packed: Vec::new(),
            reload: false,
            unknown: 0,
        }
    }

    /// Loads the persisted device states: `device_state`, then the log.
    pub fn load_states(&mut self, conn: &Connection) -> Result<(), rusqlite::Error> {
        self.states.clear();
        self.logged.clear();
        self.log_bytes = 0;
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
        let mut stmt = conn.prepare("SELECT id, body, codec FROM device_state_log ORDER BY id")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let stored = row.get_ref(1)?.as_blob()?;
            let codec: i64 = row.get(2)?;
            let unpacked;
            let body = match codec {
                LOG_RAW => stored,
                LOG_LZ4 => match crate::outbox::decompress(stored) {
                    Ok(b) => {
                        unpacked = b;
                        &unpacked[..]
                    }
                    Err(what) => {
                        error!(
                            id,
                            what,
                            "device state log entry unreadable; the devices it names keep their state from before it"
                        );
                        continue;
                    }
                },
                _ => {
                    error!(
                        id,
                        codec,
                        "device state log entry in an unknown format; the devices it names keep their state from before it"
                    );
                    continue;
                }
            };
            self.log_bytes += body.len() as u64;
            let applied = each_logged_state(body, |device, state| {
                let device = DeviceKey::from(device);
                match state {
                    Some(bytes) => match postcard::from_bytes(bytes) {
                        Ok(state) => {
                            self.states.insert(device.clone(), state);
                        }
                        // As an unreadable row of `device_state`: the device
                        // starts over without state (at most a repeated
                        // `enter`), rather than with an older one.
                        Err(e) => {
                            error!(%device, error = %e, "unreadable logged device state; the device starts without state");
                            self.states.remove(&device);
                        }
                    },
                    None => {
                        self.states.remove(&device);
                    }
                }
                self.logged.insert(device);
            });
            if let Err(what) = applied {
                error!(
                    id,
                    what,
                    "device state log entry cut short; the devices after the cut keep their state from before it"
                );
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

    /// Looks `device_id` up in the registry cache and the device states
    /// without using the answer: run over the next readings of a batch
    /// before they are processed, the lookups' cache misses overlap
    /// instead of each stalling its reading in turn. The entries' parts a
    /// reading reads are touched too: the cached device's enrichment, the
    /// state's fence lists.
    pub fn warm(&self, device_id: &str) -> usize {
        let cached = self.cache.peek(device_id).map_or(0, |m| {
            m.enrichment_json.len().wrapping_add(usize::from(
                m.enrichment_json.as_bytes().first().copied().unwrap_or(0),
            ))
        });
        let state = self.states.get(device_id).map_or(0, |s| {
            s.fences
                .left
                .len()
                .wrapping_add(s.fences.inside.first().map_or(0, |i| i.since as usize))
        });
        cached.wrapping_add(state)
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

    /// Writes the device states the batch changed, in its transaction: as
    /// one row of the log, or, once the log is full, by folding it.
    pub fn persist(&mut self, conn: &Connection) -> Result<(), rusqlite::Error> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        self.dirty.sort_unstable();
        self.dirty.dedup();
        if self.log_bytes >= self.fold_bytes {
            return self.fold(conn);
        }
        let mut body = std::mem::take(&mut self.log_body);
        body.clear();
        let result = self.log_entry(&mut body).and_then(|()| {
            crate::outbox::compress_sized(&body, &mut self.log_packed)
                .map_err(|what| rusqlite::Error::ToSqlConversionFailure(what.into()))?;
            conn.prepare_cached("INSERT INTO device_state_log (body, codec) VALUES (?1, ?2)")?
                .execute(params![&self.log_packed, LOG_LZ4])
        });
        // The fold is due by the states' own size: it bounds the work of
        // replaying the log at start.
        self.log_bytes += body.len() as u64;
        self.logged.extend(self.dirty.iter().cloned());
        self.log_body = body;
        result.map(|_| ())
    }

    /// Appends the log entry of the devices the batch changed to `body`
    /// (the format of [`each_logged_state`]).
    fn log_entry(&self, body: &mut Vec<u8>) -> Result<(), rusqlite::Error> {
        let failed = |e: Box<dyn std::error::Error + Send + Sync>| {
            rusqlite::Error::ToSqlConversionFailure(e)
        };
        for device in &self.dirty {
            let key = device.as_bytes();
            let key_len = u16::try_from(key.len()).map_err(|e| failed(Box::new(e)))?;
            body.extend_from_slice(&key_len.to_le_bytes());
            body.extend_from_slice(key);
            match self.states.get(device.as_str()) {
                Some(state) => {
                    // postcard: compact and cheap to write for every change,
                    // written in place after room for its length.
                    let at = body.len();
                    body.extend_from_slice(&[0; 4]);
                    *body = postcard::to_extend(state, std::mem::take(body))
                        .map_err(|e| failed(Box::new(e)))?;
                    let len = u32::try_from(body.len() - at - 4)
                        .ok()
                        .filter(|&n| n != LOG_REMOVED)
                        .ok_or_else(|| failed("device state over 4 GiB".into()))?;
                    body[at..at + 4].copy_from_slice(&len.to_le_bytes());
                }
                None => body.extend_from_slice(&LOG_REMOVED.to_le_bytes()),
            }
        }
        Ok(())
    }

    /// Writes the state of every device named in the log, or changed by
    /// this batch, to `device_state`, and empties the log.
    fn fold(&mut self, conn: &Connection) -> Result<(), rusqlite::Error> {
        let started = std::time::Instant::now();
        self.logged.extend(self.dirty.iter().cloned());
        let count = self.logged.len();
        let mut devices: Vec<&DeviceKey> = self.logged.iter().collect();
        devices.sort_unstable();
        let mut upsert = conn.prepare_cached(
            "INSERT INTO device_state (device_id, body) VALUES (?1, ?2) ON CONFLICT(device_id) DO UPDATE SET body = excluded.body",
        )?;
        let mut delete = conn.prepare_cached("DELETE FROM device_state WHERE device_id = ?1")?;
        let mut body = Vec::new();
        for device in devices {
            match self.states.get(device.as_str()) {
                Some(state) => {
                    body.clear();
                    body = postcard::to_extend(state, body)
                        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                    upsert.execute(params![device.as_str(), body])?;
                }
                None => {
                    delete.execute([device.as_str()])?;
                }
            }
        }
        conn.execute("DELETE FROM device_state_log", [])?;
        debug!(
            devices = count,
            log_bytes = self.log_bytes,
            ms = started.elapsed().as_millis() as u64,
            "device state log folded into device_state (committed with the batch)"
        );
        // Should the transaction fail, the states are reloaded from SQLite,
        // the log and these two with them.
        self.logged.clear();
        self.log_bytes = 0;
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

    /// Folds the log once it holds `bytes` (tests).
    #[cfg(test)]
    pub(crate) fn set_fold_bytes(&mut self, bytes: u64) {
        self.fold_bytes = bytes;
    }

    /// Bytes in `device_state_log`, and the devices it names (tests).
    #[cfg(test)]
    pub(crate) fn log_size(&self) -> (u64, usize) {
        (self.log_bytes, self.logged.len())
    }

    /// Stored state of a device (tests and `status`).
    pub fn state(&self, device_id: &str) -> Option<&DeviceState> {
        self.states.get(device_id)
    }
}

/// Calls `f` with each device and its state (`None`: removed) of a
/// `device_state_log` entry: `key length u16 LE | key | state length u32
/// LE (u32::MAX: removed) | postcard state`. Errs when the entry is cut
/// short, after the entries before the cut.
fn each_logged_state(
    mut body: &[u8],
    mut f: impl FnMut(&str, Option<&[u8]>),
) -> Result<(), &'static str> {
    fn take<'a>(body: &mut &'a [u8], n: usize) -> Result<&'a [u8], &'static str> {
        if body.len() < n {
            return Err("entry shorter than its lengths say");
        }
        let (head, rest) = body.split_at(n);
        *body = rest;
        Ok(head)
    }
    while !body.is_empty() {
        let key_len = take(&mut body, 2)?;
        let key_len = usize::from(u16::from_le_bytes([key_len[0], key_len[1]]));
        let key = std::str::from_utf8(take(&mut body, key_len)?)
            .map_err(|_| "device id that is not UTF-8")?;
        let len = take(&mut body, 4)?;
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
        if len == LOG_REMOVED {
            f(key, None);
        } else {
            f(key, Some(take(&mut body, len as usize)?));
        }
    }
    Ok(())
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
