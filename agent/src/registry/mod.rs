//! The device registry: device metadata and geofences, kept in SQLite next
//! to the outbox, with a bounded in-memory cache in front.
//!
//! A registry document (from a file today, from the cloud sync later) is
//! parsed and validated as a whole before anything is written: a bad
//! document is refused and the last good copy stays in use. Applying one is
//! a single SQLite transaction that replaces every device and fence and
//! bumps a generation number; the batch writer reads that number inside
//! each batch transaction and reloads its fence index and cache when it
//! changed, so a batch always sees exactly one registry.

use std::collections::BTreeMap;

use foldhash::{HashMap, HashMapExt as _};
use std::path::Path;
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::DeviceKey;
use crate::config::{ValueLimits, is_valid_id};
use crate::transforms::geofence::{Fence, FenceError, fences_from_value};

/// Largest registry document accepted (a million devices fit well inside).
pub const MAX_REGISTRY_BYTES: u64 = 256 * 1024 * 1024;
/// Most devices in one registry.
pub const MAX_DEVICES: usize = 1_000_000;
/// Most tags per device.
pub const MAX_TAGS: usize = 32;
/// Longest name, site or tag value.
pub const MAX_TEXT: usize = 256;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS registry_device (
    device_id TEXT PRIMARY KEY,
    body      TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS registry_info (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    generation   INTEGER NOT NULL,
    version      TEXT NOT NULL,
    source       TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    applied_ms   INTEGER NOT NULL,
    devices      INTEGER NOT NULL,
    fences       INTEGER NOT NULL,
    fences_json  TEXT NOT NULL
);
";

/// One device's registry entry.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMeta {
    pub device_id: String,
    /// Selects the `[device_types.<type>]` defaults of the agent config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Free-form labels copied into every enriched reading.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Valid ranges: override the device type's.
    #[serde(default, skip_serializing_if = "ValueLimits::is_empty")]
    pub ranges: ValueLimits,
    /// Alert thresholds: override the device type's.
    #[serde(default, skip_serializing_if = "ValueLimits::is_empty")]
    pub thresholds: ValueLimits,
    /// Consecutive readings outside a threshold before an alert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_readings: Option<u32>,
}

/// A parsed and validated registry document.
#[derive(Debug, Clone)]
pub struct Registry {
    pub version: String,
    pub devices: Vec<DeviceMeta>,
    pub fences: Vec<Fence>,
    /// The fences as a GeoJSON FeatureCollection, as stored.
    pub fences_json: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    version: String,
    #[serde(default)]
    devices: Vec<DeviceMeta>,
    #[serde(default)]
    fences: Option<Value>,
}

/// Why a registry document was refused (as a whole).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("registry file {path} is {size} bytes, more than the {MAX_REGISTRY_BYTES}-byte limit")]
    TooLarge { path: String, size: u64 },
    #[error("registry is not valid: {0}")]
    Json(String),
    #[error("registry device {index} ({device_id:?}): {what}")]
    Device {
        index: usize,
        device_id: String,
        what: String,
    },
    #[error("registry fences: {0}")]
    Fences(#[from] FenceError),
    #[error("registry SQLite error: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// Parses and validates a registry document:
/// `{"version": str, "devices": [DeviceMeta...], "fences": FeatureCollection}`.
pub fn parse_registry(text: &str) -> Result<Registry, RegistryError> {
    let doc: Document =
        serde_json::from_str(text).map_err(|e| RegistryError::Json(e.to_string()))?;
    if doc.version.is_empty()
        || doc.version.len() > 128
        || doc.version.chars().any(char::is_control)
    {
        return Err(RegistryError::Json(
            "`version` must be 1 to 128 printable characters".into(),
        ));
    }
    if doc.devices.len() > MAX_DEVICES {
        return Err(RegistryError::Json(format!(
            "{} devices, more than the limit of {MAX_DEVICES}",
            doc.devices.len()
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(doc.devices.len());
    for (index, d) in doc.devices.iter().enumerate() {
        let bad = |what: String| RegistryError::Device {
            index,
            device_id: d.device_id.chars().take(80).collect(),
            what,
        };
        if !is_valid_id(&d.device_id) {
            return Err(bad(
                "device_id must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'".into(),
            ));
        }
        if !seen.insert(d.device_id.as_str()) {
            return Err(bad("listed twice".into()));
        }
        if let Some(t) = &d.device_type
            && !is_valid_id(t)
        {
            return Err(bad(
                "device_type must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'".into(),
            ));
        }
        for (field, text) in [("name", &d.name), ("site", &d.site)] {
            if text.as_ref().is_some_and(|t| t.len() > MAX_TEXT) {
                return Err(bad(format!("{field} is longer than {MAX_TEXT} bytes")));
            }
        }
        if d.tags.len() > MAX_TAGS {
            return Err(bad(format!("more than {MAX_TAGS} tags")));
        }
        for (k, v) in &d.tags {
            if !is_valid_id(k) || v.len() > MAX_TEXT {
                return Err(bad(format!(
                    "tag {k:?}: keys are ids (1 to 64 of A-Z, a-z, 0-9, '.', '_', '-'), values at most {MAX_TEXT} bytes"
                )));
            }
        }
        for (what, limits) in [("ranges", &d.ranges), ("thresholds", &d.thresholds)] {
            if let Err((field, b)) = limits.check() {
                return Err(bad(format!(
                    "{what}.{field} = {b:?}: needs [min, max] with finite numbers and min <= max"
                )));
            }
        }
        if d.threshold_readings
            .is_some_and(|n| !(1..=10_000).contains(&n))
        {
            return Err(bad("threshold_readings must be 1 to 10000".into()));
        }
    }
    let fences_value = doc
        .fences
        .unwrap_or_else(|| serde_json::json!({"type": "FeatureCollection", "features": []}));
    let fences = fences_from_value(&fences_value)?;
    Ok(Registry {
        version: doc.version,
        devices: doc.devices,
        fences,
        fences_json: fences_value.to_string(),
    })
}

/// Reads a registry file, bounded in size; returns its text and a hash of
/// it, so an unchanged file is not parsed and applied again at every start.
pub fn read_registry_text(path: &Path) -> Result<(String, String), RegistryError> {
    let name = path.display().to_string();
    let read_err = |source| RegistryError::Read {
        path: name.clone(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_err)?.len();
    if size > MAX_REGISTRY_BYTES {
        return Err(RegistryError::TooLarge { path: name, size });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    let hash = content_hash(text.as_bytes());
    Ok((text, hash))
}

/// Reads and parses a registry file; also returns the hash of its content.
pub fn read_registry_file(path: &Path) -> Result<(Registry, String), RegistryError> {
    let (text, hash) = read_registry_text(path)?;
    Ok((parse_registry(&text)?, hash))
}

/// A stable 64-bit FNV-1a hash, hex: only used to notice a changed file.
pub fn content_hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// What registry is in use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegistryInfo {
    pub generation: i64,
    pub version: String,
    pub source: String,
    pub content_hash: String,
    pub applied_ms: i64,
    pub devices: u64,
    pub fences: u64,
}

/// The registry in use, if one was ever applied.
pub fn current(conn: &Connection) -> Result<Option<RegistryInfo>, rusqlite::Error> {
    conn.query_row(
        "SELECT generation, version, source, content_hash, applied_ms, devices, fences FROM registry_info WHERE id = 1",
        [],
        |r| {
            Ok(RegistryInfo {
                generation: r.get(0)?,
                version: r.get(1)?,
                source: r.get(2)?,
                content_hash: r.get(3)?,
                applied_ms: r.get(4)?,
                devices: r.get::<_, i64>(5)? as u64,
                fences: r.get::<_, i64>(6)? as u64,
            })
        },
    )
    .optional()
}

/// Generation of the registry in use (0: none yet).
pub fn generation(conn: &Connection) -> Result<i64, rusqlite::Error> {
    conn.prepare_cached("SELECT generation FROM registry_info WHERE id = 1")?
        .query_row([], |r| r.get(0))
        .optional()
        .map(|g| g.unwrap_or(0))
}

/// Replaces the registry in one transaction; returns the new generation.
pub fn apply(
    conn: &mut Connection,
    registry: &Registry,
    source: &str,
    content_hash: &str,
    now_ms: i64,
) -> Result<i64, RegistryError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let generation = generation(&tx)? + 1;
    tx.execute("DELETE FROM registry_device", [])?;
    {
        let mut insert =
            tx.prepare_cached("INSERT INTO registry_device (device_id, body) VALUES (?1, ?2)")?;
        for d in &registry.devices {
            let body = serde_json::to_string(d)
                .map_err(|e| RegistryError::Json(format!("re-encoding {}: {e}", d.device_id)))?;
            insert.execute(params![d.device_id, body])?;
        }
    }
    tx.execute(
        "INSERT INTO registry_info (id, generation, version, source, content_hash, applied_ms, devices, fences, fences_json)
         VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT(id) DO UPDATE SET generation = excluded.generation, version = excluded.version,
           source = excluded.source, content_hash = excluded.content_hash, applied_ms = excluded.applied_ms,
           devices = excluded.devices, fences = excluded.fences, fences_json = excluded.fences_json",
        params![
            generation,
            registry.version,
            source,
            content_hash,
            now_ms,
            registry.devices.len() as i64,
            registry.fences.len() as i64,
            registry.fences_json
        ],
    )?;
    tx.commit()?;
    Ok(generation)
}

/// The stored fences (none before a registry was applied).
pub fn load_fences(conn: &Connection) -> Result<Vec<Fence>, RegistryError> {
    let text: Option<String> = conn
        .query_row(
            "SELECT fences_json FROM registry_info WHERE id = 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match text {
        Some(text) => {
            let value: Value =
                serde_json::from_str(&text).map_err(|e| RegistryError::Json(e.to_string()))?;
            Ok(fences_from_value(&value)?)
        }
        None => Ok(Vec::new()),
    }
}

/// One device from SQLite.
pub fn lookup(conn: &Connection, device_id: &str) -> Result<Option<DeviceMeta>, RegistryError> {
    let body: Option<String> = conn
        .prepare_cached("SELECT body FROM registry_device WHERE device_id = ?1")?
        .query_row([device_id], |r| r.get(0))
        .optional()?;
    body.map(|b| {
        serde_json::from_str(&b)
            .map_err(|e| RegistryError::Json(format!("stored entry of {device_id}: {e}")))
    })
    .transpose()
}

/// Applies the configured registry file at start when it differs from the
/// copy in use. A file that cannot be read or is invalid is refused as a
/// whole: the last good copy stays in use and the log says why.
pub fn apply_file_at_start(
    conn: &mut Connection,
    path: &Path,
    policy: crate::config::UnknownDevice,
    now_ms: i64,
) -> Result<Option<RegistryInfo>, RegistryError> {
    let before = current(conn)?;
    let source = format!("file:{}", path.display());
    let parsed = read_registry_text(path).and_then(|(text, hash)| {
        if before
            .as_ref()
            .is_some_and(|b| b.content_hash == hash && b.source == source)
        {
            return Ok(None);
        }
        Ok(Some((parse_registry(&text)?, hash)))
    });
    match parsed {
        Ok(None) => {
            tracing::info!(file = %path.display(), "registry file unchanged");
        }
        Ok(Some((registry, hash))) => {
            let generation = apply(conn, &registry, &source, &hash, now_ms)?;
            tracing::info!(
                file = %path.display(),
                version = %registry.version,
                devices = registry.devices.len(),
                fences = registry.fences.len(),
                generation,
                "registry applied"
            );
            drop(registry);
            release_freed_memory();
        }
        Err(e) => match &before {
            Some(b) => tracing::error!(
                error = %e,
                version = %b.version,
                source = %b.source,
                applied_ms = b.applied_ms,
                "registry file refused; keeping the last good registry. Fix the file and restart"
            ),
            None => tracing::error!(
                error = %e,
                unknown_device = ?policy,
                "registry file refused and no earlier registry exists: every device is unknown \
                 until a valid file is given (fix it and restart)"
            ),
        },
    }
    Ok(current(conn)?)
}

/// Hands memory freed after a large one-off job (parsing a registry) back
/// to the system, so it does not count against the gateway's footprint.
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; no pointers are
    // involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What the data plane keeps of a device: its limits, and the enrichment
/// fields pre-rendered as a JSON fragment (copied into every reading).
#[derive(Debug, Clone, PartialEq)]
pub struct CachedDevice {
    pub device_type: Option<Box<str>>,
    /// `None` when the entry sets none (most devices: kept small).
    pub ranges: Option<Box<ValueLimits>>,
    pub thresholds: Option<Box<ValueLimits>>,
    pub threshold_readings: Option<u32>,
    /// `,"device_type":…,"device_name":…,"site":…,"tags":{…}` (each only
    /// when set).
    pub enrichment_json: Box<str>,
}

impl CachedDevice {
    pub fn new(meta: &DeviceMeta) -> Self {
        Self {
            device_type: meta.device_type.as_deref().map(Box::from),
            ranges: (!meta.ranges.is_empty()).then(|| Box::new(meta.ranges.clone())),
            thresholds: (!meta.thresholds.is_empty()).then(|| Box::new(meta.thresholds.clone())),
            threshold_readings: meta.threshold_readings,
            enrichment_json: crate::transforms::validate::enrichment_fragment(meta).into(),
        }
    }
}

/// A bounded cache of registry lookups (unknown devices included), with
/// two generations: entries used recently survive, the rest age out. Both
/// lookups and inserts are O(1); at most `capacity` entries are held.
pub struct DeviceCache {
    capacity: usize,
    hot: HashMap<DeviceKey, Option<Arc<CachedDevice>>>,
    cold: HashMap<DeviceKey, Option<Arc<CachedDevice>>>,
    pub hits: u64,
    pub misses: u64,
}

impl DeviceCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(2),
            hot: HashMap::new(),
            cold: HashMap::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// `Some(entry)` on a hit (`entry` is `None` for a known-unknown device).
    pub fn get(&mut self, device_id: &str) -> Option<Option<Arc<CachedDevice>>> {
        if let Some(e) = self.hot.get(device_id) {
            self.hits += 1;
            return Some(e.clone());
        }
        if let Some((k, e)) = self.cold.remove_entry(device_id) {
            self.hits += 1;
            self.insert_hot(k, e.clone());
            return Some(e);
        }
        self.misses += 1;
        None
    }

    /// The cached entry of a known device, if any; no hit or miss is
    /// counted and nothing moves between generations.
    pub fn peek(&self, device_id: &str) -> Option<&CachedDevice> {
        match self.hot.get(device_id) {
            Some(e) => e.as_deref(),
            None => self.cold.get(device_id).and_then(|e| e.as_deref()),
        }
    }

    pub fn insert(&mut self, device_id: &str, entry: Option<Arc<CachedDevice>>) {
        self.insert_hot(device_id.into(), entry);
    }

    fn insert_hot(&mut self, key: DeviceKey, entry: Option<Arc<CachedDevice>>) {
        if self.hot.len() >= self.capacity / 2 {
            self.cold = std::mem::take(&mut self.hot);
        }
        self.hot.insert(key, entry);
    }

    pub fn clear(&mut self) {
        self.hot.clear();
        self.cold.clear();
    }

    pub fn len(&self) -> usize {
        self.hot.len() + self.cold.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
pub(crate) mod tests;
