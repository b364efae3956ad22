//! The fleet's device registry and geofences in MySQL, and the per-gateway
//! registry document the gateways download.
//!
//! Every entry is validated with the agent's own parser before it is
//! stored, and every rendered document is parsed by it again before it is
//! served, so a gateway never receives a registry it would refuse. Every
//! change bumps `registry_revision` in the same transaction; API instances
//! cache rendered documents per (gateway, revision).

use std::fmt::Write as _;

use edge_agent::config::is_valid_id;
use edge_agent::registry::{DeviceMeta, parse_registry};
use edge_agent::transforms::geofence::fences_from_value;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use sqlx::{MySql, MySqlPool, QueryBuilder, Row};

/// Largest single device or fence body the API accepts.
pub const MAX_ENTRY_BYTES: usize = 1024 * 1024;
/// Most entries per page of a listing.
pub const MAX_PAGE: u32 = 1000;
/// Rows per multi-row statement when importing.
const IMPORT_CHUNK: usize = 500;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The input is refused; the message says what to fix.
    #[error("{0}")]
    Invalid(String),
    #[error("MySQL: {0}")]
    Db(#[from] sqlx::Error),
}

fn invalid(message: impl Into<String>) -> StoreError {
    StoreError::Invalid(message.into())
}

/// A device entry as operators send it: the agent's [`DeviceMeta`] plus the
/// gateway it is served to (`None`: every gateway).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceEntry {
    pub gateway_id: Option<String>,
    pub meta: DeviceMeta,
}

impl DeviceEntry {
    /// Parses and validates a device from JSON. `path_id` is the id in the
    /// URL, if any: the body may omit `device_id` or must repeat it.
    pub fn from_json(path_id: Option<&str>, body: &[u8]) -> Result<Self, StoreError> {
        if body.len() > MAX_ENTRY_BYTES {
            return Err(invalid(format!(
                "device body is {} bytes, more than {MAX_ENTRY_BYTES}",
                body.len()
            )));
        }
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| invalid(format!("device body is not JSON: {e}")))?;
        let Value::Object(mut object) = value else {
            return Err(invalid("device body must be a JSON object"));
        };
        Self::from_object(path_id, &mut object)
    }

    fn from_object(
        path_id: Option<&str>,
        object: &mut Map<String, Value>,
    ) -> Result<Self, StoreError> {
        let gateway_id = take_gateway_id(object)?;
        if let Some(id) = path_id {
            match object.get("device_id") {
                None => {
                    object.insert("device_id".into(), Value::String(id.into()));
                }
                Some(Value::String(body_id)) if body_id == id => {}
                Some(other) => {
                    return Err(invalid(format!(
                        "device_id {other} in the body differs from {id:?} in the path"
                    )));
                }
            }
        }
        let meta: DeviceMeta = serde_json::from_value(Value::Object(object.clone()))
            .map_err(|e| invalid(format!("device: {e}")))?;
        check_devices(std::slice::from_ref(&meta))?;
        Ok(Self { gateway_id, meta })
    }

    /// The entry as the API returns it.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(&self.meta).unwrap_or(Value::Null);
        if let (Value::Object(o), Some(g)) = (&mut v, &self.gateway_id) {
            o.insert("gateway_id".into(), Value::String(g.clone()));
        }
        v
    }
}

/// A geofence: a GeoJSON Feature whose `properties.id` is the fence id, and
/// the gateway it is served to (`properties.gateway_id`, absent: every
/// gateway; removed from the feature served).
#[derive(Debug, Clone, PartialEq)]
pub struct FenceEntry {
    pub fence_id: String,
    pub gateway_id: Option<String>,
    pub name: Option<String>,
    pub feature: Value,
}

impl FenceEntry {
    pub fn from_json(path_id: Option<&str>, body: &[u8]) -> Result<Self, StoreError> {
        if body.len() > MAX_ENTRY_BYTES {
            return Err(invalid(format!(
                "fence body is {} bytes, more than {MAX_ENTRY_BYTES}",
                body.len()
            )));
        }
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| invalid(format!("fence body is not JSON: {e}")))?;
        Self::from_feature(path_id, value)
    }

    /// Validates one GeoJSON Feature.
    pub fn from_feature(path_id: Option<&str>, mut feature: Value) -> Result<Self, StoreError> {
        if feature.get("type").and_then(Value::as_str) != Some("Feature") {
            return Err(invalid(
                "a fence is a GeoJSON Feature: {\"type\": \"Feature\", \"properties\": {\"id\": ...}, \"geometry\": {...}}",
            ));
        }
        let props = match feature.get_mut("properties") {
            Some(Value::Object(p)) => p,
            Some(Value::Null) | None => {
                feature["properties"] = json!({});
                feature
                    .get_mut("properties")
                    .and_then(Value::as_object_mut)
                    .ok_or_else(|| invalid("properties must be an object"))?
            }
            Some(_) => return Err(invalid("fence properties must be an object")),
        };
        let gateway_id = take_gateway_id(props)?;
        if let Some(id) = path_id {
            match props.get("id") {
                None => {
                    props.insert("id".into(), Value::String(id.into()));
                }
                Some(Value::String(body_id)) if body_id == id => {}
                Some(other) => {
                    return Err(invalid(format!(
                        "properties.id {other} differs from {id:?} in the path"
                    )));
                }
            }
        }
        let name = match props.get("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(n)) if n.len() <= 256 => Some(n.clone()),
            Some(_) => {
                return Err(invalid(
                    "properties.name must be a string of at most 256 bytes",
                ));
            }
        };
        let collection = json!({"type": "FeatureCollection", "features": [&feature]});
        let fences = fences_from_value(&collection).map_err(|e| invalid(e.to_string()))?;
        let fence_id = fences
            .first()
            .map(|f| f.id.to_string())
            .ok_or_else(|| invalid("the feature holds no fence"))?;
        Ok(Self {
            fence_id,
            gateway_id,
            name,
            feature,
        })
    }

    pub fn to_json(&self) -> Value {
        let mut v = self.feature.clone();
        if let (Some(p), Some(g)) = (
            v.get_mut("properties").and_then(Value::as_object_mut),
            &self.gateway_id,
        ) {
            p.insert("gateway_id".into(), Value::String(g.clone()));
        }
        v
    }
}

fn take_gateway_id(object: &mut Map<String, Value>) -> Result<Option<String>, StoreError> {
    match object.remove("gateway_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(g)) if is_valid_id(&g) => Ok(Some(g)),
        Some(other) => Err(invalid(format!(
            "gateway_id {other}: must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-', or null for every gateway"
        ))),
    }
}

/// Validates devices with the agent's parser (ids, ranges, thresholds...).
fn check_devices(devices: &[DeviceMeta]) -> Result<(), StoreError> {
    let doc = json!({"version": "check", "devices": devices});
    parse_registry(&doc.to_string())
        .map(|_| ())
        .map_err(|e| invalid(e.to_string()))
}

/// The current registry revision.
pub async fn revision(pool: &MySqlPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT revision FROM registry_revision WHERE id = 1")
        .fetch_one(pool)
        .await
}

async fn bump(tx: &mut sqlx::Transaction<'_, MySql>) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE registry_revision SET revision = revision + 1 WHERE id = 1")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn device_body(d: &DeviceMeta) -> String {
    serde_json::to_string(d).unwrap_or_default()
}

/// Creates or replaces devices (and with `replace`, deletes every device
/// not listed) in one transaction. Returns how many rows were written.
pub async fn put_devices(
    pool: &MySqlPool,
    devices: &[DeviceEntry],
    replace: bool,
    mut progress: impl FnMut(usize),
) -> Result<usize, StoreError> {
    let metas: Vec<DeviceMeta> = devices.iter().map(|d| d.meta.clone()).collect();
    check_devices(&metas)?;
    let mut tx = pool.begin().await?;
    if replace {
        sqlx::query("DELETE FROM device_metadata")
            .execute(&mut *tx)
            .await?;
    }
    let mut done = 0;
    for chunk in devices.chunks(IMPORT_CHUNK) {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO device_metadata (device_id, gateway_id, device_type, name, site, body) ",
        );
        q.push_values(chunk, |mut row, d| {
            row.push_bind(&d.meta.device_id)
                .push_bind(&d.gateway_id)
                .push_bind(&d.meta.device_type)
                .push_bind(&d.meta.name)
                .push_bind(&d.meta.site)
                .push_bind(device_body(&d.meta));
        });
        q.push(
            " ON DUPLICATE KEY UPDATE gateway_id = VALUES(gateway_id), device_type = VALUES(device_type), \
             name = VALUES(name), site = VALUES(site), body = VALUES(body)",
        );
        q.build().execute(&mut *tx).await?;
        done += chunk.len();
        progress(done);
    }
    bump(&mut tx).await?;
    tx.commit().await?;
    Ok(done)
}

/// Creates or replaces one device; true when it was new.
pub async fn put_device(pool: &MySqlPool, device: &DeviceEntry) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let existed: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM device_metadata WHERE device_id = ? FOR UPDATE")
            .bind(&device.meta.device_id)
            .fetch_optional(&mut *tx)
            .await?;
    sqlx::query(
        "INSERT INTO device_metadata (device_id, gateway_id, device_type, name, site, body) VALUES (?, ?, ?, ?, ?, ?) \
         ON DUPLICATE KEY UPDATE gateway_id = VALUES(gateway_id), device_type = VALUES(device_type), \
         name = VALUES(name), site = VALUES(site), body = VALUES(body)",
    )
    .bind(&device.meta.device_id)
    .bind(&device.gateway_id)
    .bind(&device.meta.device_type)
    .bind(&device.meta.name)
    .bind(&device.meta.site)
    .bind(device_body(&device.meta))
    .execute(&mut *tx)
    .await?;
    bump(&mut tx).await?;
    tx.commit().await?;
    Ok(existed.is_none())
}

fn device_from_row(row: &sqlx::mysql::MySqlRow) -> Result<DeviceEntry, StoreError> {
    let id: String = row.try_get("device_id")?;
    let body: String = row.try_get("body")?;
    let meta = serde_json::from_str(&body)
        .map_err(|e| invalid(format!("stored device {id} is not readable: {e}")))?;
    Ok(DeviceEntry {
        gateway_id: row.try_get("gateway_id")?,
        meta,
    })
}

pub async fn get_device(pool: &MySqlPool, id: &str) -> Result<Option<DeviceEntry>, StoreError> {
    let row =
        sqlx::query("SELECT device_id, gateway_id, body FROM device_metadata WHERE device_id = ?")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    row.as_ref().map(device_from_row).transpose()
}

/// Deletes a device; false when there was none.
pub async fn delete_device(pool: &MySqlPool, id: &str) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let n = sqlx::query("DELETE FROM device_metadata WHERE device_id = ?")
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if n > 0 {
        bump(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(n > 0)
}

/// A page of devices ordered by id, after `after`, optionally only those
/// of one gateway.
pub async fn list_devices(
    pool: &MySqlPool,
    gateway: Option<&str>,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<DeviceEntry>, StoreError> {
    let mut q = QueryBuilder::<MySql>::new(
        "SELECT device_id, gateway_id, body FROM device_metadata WHERE device_id > ",
    );
    q.push_bind(after.unwrap_or(""));
    if let Some(g) = gateway {
        q.push(" AND gateway_id = ").push_bind(g);
    }
    q.push(" ORDER BY device_id LIMIT ")
        .push_bind(limit.min(MAX_PAGE));
    let rows = q.build().fetch_all(pool).await?;
    rows.iter().map(device_from_row).collect()
}

/// Creates or replaces fences in one transaction (with `replace`, every
/// fence not listed is deleted).
pub async fn put_fences(
    pool: &MySqlPool,
    fences: &[FenceEntry],
    replace: bool,
    mut progress: impl FnMut(usize),
) -> Result<usize, StoreError> {
    let mut ids = std::collections::BTreeSet::new();
    for f in fences {
        if !ids.insert(f.fence_id.as_str()) {
            return Err(invalid(format!("fence {:?} is listed twice", f.fence_id)));
        }
    }
    let mut tx = pool.begin().await?;
    if replace {
        sqlx::query("DELETE FROM geofences")
            .execute(&mut *tx)
            .await?;
    }
    let mut done = 0;
    for chunk in fences.chunks(IMPORT_CHUNK) {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO geofences (fence_id, gateway_id, name, feature) ",
        );
        q.push_values(chunk, |mut row, f| {
            row.push_bind(&f.fence_id)
                .push_bind(&f.gateway_id)
                .push_bind(&f.name)
                .push_bind(f.feature.to_string());
        });
        q.push(
            " ON DUPLICATE KEY UPDATE gateway_id = VALUES(gateway_id), name = VALUES(name), feature = VALUES(feature)",
        );
        q.build().execute(&mut *tx).await?;
        done += chunk.len();
        progress(done);
    }
    bump(&mut tx).await?;
    tx.commit().await?;
    Ok(done)
}

/// Creates or replaces one fence; true when it was new.
pub async fn put_fence(pool: &MySqlPool, fence: &FenceEntry) -> Result<bool, StoreError> {
    let existed = get_fence(pool, &fence.fence_id).await?.is_some();
    put_fences(pool, std::slice::from_ref(fence), false, |_| {}).await?;
    Ok(!existed)
}

fn fence_from_row(row: &sqlx::mysql::MySqlRow) -> Result<FenceEntry, StoreError> {
    let id: String = row.try_get("fence_id")?;
    let text: String = row.try_get("feature")?;
    let feature = serde_json::from_str(&text)
        .map_err(|e| invalid(format!("stored fence {id} is not readable: {e}")))?;
    Ok(FenceEntry {
        fence_id: id,
        gateway_id: row.try_get("gateway_id")?,
        name: row.try_get("name")?,
        feature,
    })
}

pub async fn get_fence(pool: &MySqlPool, id: &str) -> Result<Option<FenceEntry>, StoreError> {
    let row =
        sqlx::query("SELECT fence_id, gateway_id, name, feature FROM geofences WHERE fence_id = ?")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    row.as_ref().map(fence_from_row).transpose()
}

pub async fn delete_fence(pool: &MySqlPool, id: &str) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let n = sqlx::query("DELETE FROM geofences WHERE fence_id = ?")
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if n > 0 {
        bump(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(n > 0)
}

pub async fn list_fences(
    pool: &MySqlPool,
    gateway: Option<&str>,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<FenceEntry>, StoreError> {
    let mut q = QueryBuilder::<MySql>::new(
        "SELECT fence_id, gateway_id, name, feature FROM geofences WHERE fence_id > ",
    );
    q.push_bind(after.unwrap_or(""));
    if let Some(g) = gateway {
        q.push(" AND gateway_id = ").push_bind(g);
    }
    q.push(" ORDER BY fence_id LIMIT ")
        .push_bind(limit.min(MAX_PAGE));
    let rows = q.build().fetch_all(pool).await?;
    rows.iter().map(fence_from_row).collect()
}

/// A registry document rendered for one gateway (or, with `None`, the
/// whole fleet), in the agent's format.
#[derive(Debug, Clone)]
pub struct Document {
    pub revision: i64,
    /// Hash of the content; the document's `version` and its ETag.
    pub version: String,
    pub json: String,
    pub devices: usize,
    pub fences: usize,
}

/// Renders the registry a gateway gets: the devices and fences assigned to
/// it plus those assigned to no gateway, from one consistent snapshot, and
/// checks it with the agent's parser.
pub async fn document(pool: &MySqlPool, gateway: Option<&str>) -> Result<Document, StoreError> {
    let mut tx = pool.begin().await?;
    let revision: i64 = sqlx::query_scalar("SELECT revision FROM registry_revision WHERE id = 1")
        .fetch_one(&mut *tx)
        .await?;
    let (devices, fences) = match gateway {
        Some(g) => (
            sqlx::query_scalar::<_, String>(
                "SELECT body FROM device_metadata WHERE gateway_id = ? OR gateway_id IS NULL ORDER BY device_id",
            )
            .bind(g)
            .fetch_all(&mut *tx)
            .await?,
            sqlx::query_scalar::<_, String>(
                "SELECT feature FROM geofences WHERE gateway_id = ? OR gateway_id IS NULL ORDER BY fence_id",
            )
            .bind(g)
            .fetch_all(&mut *tx)
            .await?,
        ),
        None => (
            sqlx::query_scalar::<_, String>("SELECT body FROM device_metadata ORDER BY device_id")
                .fetch_all(&mut *tx)
                .await?,
            sqlx::query_scalar::<_, String>("SELECT feature FROM geofences ORDER BY fence_id")
                .fetch_all(&mut *tx)
                .await?,
        ),
    };
    tx.commit().await?;
    let mut content = String::with_capacity(
        devices.iter().map(|d| d.len() + 1).sum::<usize>()
            + fences.iter().map(|f| f.len() + 1).sum::<usize>()
            + 64,
    );
    content.push_str("\"devices\":[");
    content.push_str(&devices.join(","));
    content.push_str("],\"fences\":{\"type\":\"FeatureCollection\",\"features\":[");
    content.push_str(&fences.join(","));
    content.push_str("]}}");
    let digest = Sha256::digest(content.as_bytes());
    let mut version = String::with_capacity(32);
    for b in &digest[..16] {
        let _ = write!(version, "{b:02x}");
    }
    let json = format!("{{\"version\":\"{version}\",{content}");
    parse_registry(&json).map_err(|e| {
        invalid(format!(
            "the registry for {} cannot be served: {e}",
            gateway.unwrap_or("the fleet")
        ))
    })?;
    Ok(Document {
        revision,
        version,
        json,
        devices: devices.len(),
        fences: fences.len(),
    })
}

// ---- gateway tokens --------------------------------------------------------

/// SHA-256 of a bearer token: what is stored and compared.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Constant-time comparison of two token hashes.
pub fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.ct_eq(b).into()
}

/// Registers a gateway or rotates its token; returns the new token (shown
/// once; only its hash is stored).
pub async fn issue_token(pool: &MySqlPool, gateway_id: &str) -> Result<String, StoreError> {
    if !is_valid_id(gateway_id) {
        return Err(invalid(format!(
            "gateway id {gateway_id:?}: must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'"
        )));
    }
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut bytes[..]);
    let mut token = String::from("egw_");
    for b in bytes {
        let _ = write!(token, "{b:02x}");
    }
    sqlx::query(
        "INSERT INTO gateways (gateway_id, token_sha256) VALUES (?, ?) \
         ON DUPLICATE KEY UPDATE token_sha256 = VALUES(token_sha256), rotated_at = CURRENT_TIMESTAMP(3)",
    )
    .bind(gateway_id)
    .bind(&token_hash(&token)[..])
    .execute(pool)
    .await?;
    Ok(token)
}

/// The stored token hash of a gateway, `None` when it is not registered.
pub async fn gateway_token_hash(
    pool: &MySqlPool,
    gateway_id: &str,
) -> Result<Option<[u8; 32]>, sqlx::Error> {
    let row: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT token_sha256 FROM gateways WHERE gateway_id = ?")
            .bind(gateway_id)
            .fetch_optional(pool)
            .await?;
    Ok(row.and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok()))
}

/// Removes a gateway and its token; false when it was not registered.
pub async fn revoke_gateway(pool: &MySqlPool, gateway_id: &str) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query("DELETE FROM gateways WHERE gateway_id = ?")
        .bind(gateway_id)
        .execute(pool)
        .await?
        .rows_affected()
        > 0)
}

// ---- import ----------------------------------------------------------------

const LIMIT_FIELDS: [&str; 4] = ["temperature", "humidity", "battery", "speed"];

/// Parses a devices CSV. Header row required; `device_id` is the one
/// required column. Others: `gateway_id`, `device_type`, `name`, `site`,
/// `threshold_readings`, `tags` (`key=value;key=value`), and
/// `range_<field>_min|max` / `threshold_<field>_min|max` for temperature,
/// humidity, battery and speed. Empty cells mean "not set". Every row is
/// validated; the first bad one is reported with its line.
pub fn devices_from_csv(reader: impl std::io::Read) -> Result<Vec<DeviceEntry>, StoreError> {
    let mut csv = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(reader);
    let headers = csv
        .headers()
        .map_err(|e| invalid(format!("devices CSV header: {e}")))?
        .clone();
    let mut known: Vec<String> = [
        "device_id",
        "gateway_id",
        "device_type",
        "name",
        "site",
        "threshold_readings",
        "tags",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for kind in ["range", "threshold"] {
        for field in LIMIT_FIELDS {
            for end in ["min", "max"] {
                known.push(format!("{kind}_{field}_{end}"));
            }
        }
    }
    for h in &headers {
        if !known.iter().any(|k| k == h) {
            return Err(invalid(format!(
                "devices CSV: unknown column {h:?}; known columns: {}",
                known.join(", ")
            )));
        }
    }
    if !headers.iter().any(|h| h == "device_id") {
        return Err(invalid("devices CSV: the header has no device_id column"));
    }
    let mut out = Vec::new();
    for (i, record) in csv.records().enumerate() {
        let line = i + 2;
        let record = record.map_err(|e| invalid(format!("devices CSV line {line}: {e}")))?;
        let mut object = Map::new();
        let mut limits: [Map<String, Value>; 2] = [Map::new(), Map::new()];
        for (h, cell) in headers.iter().zip(record.iter()) {
            if cell.is_empty() {
                continue;
            }
            let bad =
                |what: String| invalid(format!("devices CSV line {line}, column {h}: {what}"));
            match h {
                "threshold_readings" => {
                    let n: u32 = cell
                        .parse()
                        .map_err(|_| bad(format!("{cell:?} is not a whole number")))?;
                    object.insert(h.into(), json!(n));
                }
                "tags" => {
                    let mut tags = Map::new();
                    for pair in cell.split(';').filter(|p| !p.trim().is_empty()) {
                        let (k, v) = pair
                            .split_once('=')
                            .ok_or_else(|| bad(format!("tag {pair:?} is not key=value")))?;
                        tags.insert(k.trim().into(), Value::String(v.trim().into()));
                    }
                    object.insert("tags".into(), Value::Object(tags));
                }
                _ if h.starts_with("range_") || h.starts_with("threshold_") => {
                    let (kind, rest) = h.split_once('_').unwrap_or_default();
                    let (field, end) = rest.rsplit_once('_').unwrap_or_default();
                    let x: f64 = cell
                        .parse()
                        .map_err(|_| bad(format!("{cell:?} is not a number")))?;
                    let map = &mut limits[usize::from(kind == "threshold")];
                    let bounds = map
                        .entry(field.to_string())
                        .or_insert_with(|| json!([Value::Null, Value::Null]));
                    bounds[usize::from(end == "max")] = json!(x);
                }
                _ => {
                    object.insert(h.into(), Value::String(cell.into()));
                }
            }
        }
        for (key, map) in ["ranges", "thresholds"].iter().zip(limits) {
            for (field, b) in &map {
                if b[0].is_null() || b[1].is_null() {
                    return Err(invalid(format!(
                        "devices CSV line {line}: {key} of {field} needs both _min and _max"
                    )));
                }
            }
            if !map.is_empty() {
                object.insert((*key).into(), Value::Object(map));
            }
        }
        let entry = DeviceEntry::from_object(None, &mut object)
            .map_err(|e| invalid(format!("devices CSV line {line}: {e}")))?;
        out.push(entry);
    }
    Ok(out)
}

/// Parses a GeoJSON FeatureCollection of fences (each with `properties.id`,
/// optionally `properties.gateway_id`).
pub fn fences_from_geojson(text: &str) -> Result<Vec<FenceEntry>, StoreError> {
    let doc: Value =
        serde_json::from_str(text).map_err(|e| invalid(format!("fences file is not JSON: {e}")))?;
    if doc.get("type").and_then(Value::as_str) != Some("FeatureCollection") {
        return Err(invalid("fences file must be a GeoJSON FeatureCollection"));
    }
    let features = doc
        .get("features")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("fences file has no features array"))?;
    features
        .iter()
        .enumerate()
        .map(|(i, f)| {
            FenceEntry::from_feature(None, f.clone())
                .map_err(|e| invalid(format!("fences file, feature {i}: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SQUARE: &str = r#"{"type":"Feature","properties":{"id":"yard","name":"Yard","gateway_id":"gw-1"},
        "geometry":{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1],[0,1],[0,0]]]}}"#;

    #[test]
    fn devices_take_their_id_from_the_path_and_keep_the_gateway_apart() {
        let d =
            DeviceEntry::from_json(Some("pump-7"), br#"{"gateway_id":"gw-1","site":"A"}"#).unwrap();
        assert_eq!(d.meta.device_id, "pump-7");
        assert_eq!(d.gateway_id.as_deref(), Some("gw-1"));
        assert_eq!(d.to_json()["gateway_id"], "gw-1");
        let e = DeviceEntry::from_json(Some("pump-7"), br#"{"device_id":"pump-8"}"#).unwrap_err();
        assert!(e.to_string().contains("differs"), "{e}");
    }

    #[test]
    fn bad_devices_are_refused_with_the_reason() {
        for (body, needle) in [
            (&br#"{"device_id":"a b"}"#[..], "device_id"),
            (
                br#"{"device_id":"x","thresholds":{"temperature":[50,10]}}"#,
                "thresholds.temperature",
            ),
            (br#"{"device_id":"x","colour":"red"}"#, "unknown field"),
            (br#"{"device_id":"x","gateway_id":"no way"}"#, "gateway_id"),
            (br#"[1]"#, "object"),
            (br#"{"#, "not JSON"),
        ] {
            let e = DeviceEntry::from_json(None, body).unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        }
    }

    #[test]
    fn fences_are_validated_polygons() {
        let f = FenceEntry::from_json(None, SQUARE.as_bytes()).unwrap();
        assert_eq!(f.fence_id, "yard");
        assert_eq!(f.gateway_id.as_deref(), Some("gw-1"));
        assert!(f.feature["properties"].get("gateway_id").is_none());
        let bowtie = r#"{"type":"Feature","properties":{"id":"bow"},
            "geometry":{"type":"Polygon","coordinates":[[[0,0],[1,1],[1,0],[0,1],[0,0]]]}}"#;
        let e = FenceEntry::from_json(None, bowtie.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid polygon"), "{e}");
        let e = FenceEntry::from_json(Some("other"), SQUARE.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("differs"), "{e}");
    }

    #[test]
    fn csv_rows_become_devices() {
        let csv = "device_id,gateway_id,device_type,tags,range_temperature_min,range_temperature_max,threshold_readings\n\
                   pump-1,gw-1,pump,zone=north;line=2,-40,85,3\n\
                   pump-2,,,,,,\n";
        let devices = devices_from_csv(csv.as_bytes()).unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].gateway_id.as_deref(), Some("gw-1"));
        assert_eq!(devices[0].meta.tags["zone"], "north");
        assert_eq!(devices[0].meta.ranges.temperature, Some([-40.0, 85.0]));
        assert_eq!(devices[0].meta.threshold_readings, Some(3));
        assert_eq!(devices[1].gateway_id, None);
        let e = devices_from_csv("device_id,colour\nx,red\n".as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown column \"colour\""), "{e}");
        let e = devices_from_csv("device_id,range_speed_min\nx,1\n".as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("_max"), "{e}");
        let e = devices_from_csv("device_id,threshold_readings\nx,lots\n".as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2, column threshold_readings"), "{e}");
    }

    #[test]
    fn token_hashes_compare_equal_only_for_the_same_token() {
        let a = token_hash("egw_1");
        assert!(hashes_equal(&a, &token_hash("egw_1")));
        assert!(!hashes_equal(&a, &token_hash("egw_2")));
    }
}
