//! Agent configuration: TOML parsed into serde structs, then validated with
//! errors that name the key, the bad value and what is allowed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The board config used when none is given: a laptop simulation.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../../board-configs/sim.toml");

/// A configuration error, always naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid config: `{key}` = {value}: {allowed}")]
    Invalid {
        key: &'static str,
        value: String,
        allowed: String,
    },
}

fn invalid(key: &'static str, value: impl fmt::Debug, allowed: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: format!("{value:?}"),
        allowed: allowed.into(),
    }
}

/// Top-level agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identity of this gateway. Keys the exactly-once marker in Kafka and
    /// derives the Kafka `transactional.id`: it must be stable across restarts
    /// and unique per gateway.
    pub gateway_id: String,
    /// Folder for the SQLite database (outbox, device state, quarantine).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Where readings come from.
    #[serde(default)]
    pub sources: SourcesConfig,
    /// Input checks.
    #[serde(default)]
    pub validation: ValidationConfig,
    /// The durable store-and-forward buffer.
    #[serde(default)]
    pub outbox: OutboxConfig,
    /// The exactly-once uplink to Kafka.
    pub kafka: KafkaConfig,
    /// Live progress line on stderr.
    #[serde(default)]
    pub progress: ProgressConfig,
    /// The device registry (metadata and geofences) and what happens to
    /// devices not in it.
    #[serde(default)]
    pub registry: RegistryConfig,
    /// Defaults per device type: valid value ranges and alert thresholds,
    /// used when a device's registry entry gives none.
    #[serde(default)]
    pub device_types: BTreeMap<String, DeviceTypeConfig>,
    /// Threshold and geofence alerts.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// Local HTTP endpoint for Prometheus `/metrics`, `/health` and `/status`.
    #[serde(default)]
    pub http: HttpConfig,
    /// Pull the registry from the cloud bridge instead of a file. Off when
    /// absent; excludes `registry.file`.
    pub cloud_sync: Option<CloudSyncConfig>,
}

/// Cloud sync of the registry: `GET {url}/v1/gateways/{gateway_id}/registry`
/// with a bearer token, applied when it changed (see `crate::sync`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudSyncConfig {
    /// Base URL of the cloud bridge, `http://` or `https://`, without
    /// credentials, query or fragment (it is logged).
    pub url: String,
    /// File holding the bearer token, read once at start and trimmed; at
    /// most 4 KiB. The token is never logged.
    pub token_file: PathBuf,
    /// Time between syncs once one succeeded (±20 % jitter). Failures
    /// retry sooner: from 1 s, doubling up to this.
    #[serde(
        default = "default_cloud_sync_interval_seconds",
        alias = "interval_secs"
    )]
    pub interval_seconds: u64,
    /// Bound on one sync request, connect to last byte of the body.
    #[serde(default = "default_cloud_sync_timeout_seconds", alias = "timeout_secs")]
    pub timeout_seconds: u64,
    /// Extra PEM CA certificates trusted for an `https://` URL, on top of
    /// the system's.
    pub ca_file: Option<PathBuf>,
}

const fn default_cloud_sync_interval_seconds() -> u64 {
    60
}
const fn default_cloud_sync_timeout_seconds() -> u64 {
    30
}

/// Largest `cloud_sync.token_file` accepted.
pub const MAX_TOKEN_FILE_BYTES: u64 = 4096;

impl CloudSyncConfig {
    /// The base URL without a trailing `/` (what the sync logs and stores as
    /// the registry's source).
    pub fn base_url(&self) -> &str {
        self.url.trim_end_matches('/')
    }

    /// Reads the bearer token from `token_file` (at start).
    ///
    /// # Errors
    /// Names `cloud_sync.token_file` and the path when the file is missing,
    /// unreadable, larger than 4 KiB, empty, or holds characters that
    /// cannot go in an HTTP header. The token itself is never in the error.
    pub fn read_token(&self) -> Result<String, ConfigError> {
        let path = &self.token_file;
        let bad = |allowed: String| ConfigError::Invalid {
            key: "cloud_sync.token_file",
            value: format!("{:?}", path.display().to_string()),
            allowed,
        };
        let size = std::fs::metadata(path)
            .map_err(|e| {
                bad(format!(
                    "cannot read it ({e}); create it with the bearer token"
                ))
            })?
            .len();
        if size > MAX_TOKEN_FILE_BYTES {
            return Err(bad(format!(
                "the file is {size} bytes; a token file holds only the token, at most {MAX_TOKEN_FILE_BYTES} bytes"
            )));
        }
        let text = std::fs::read(path).map_err(|e| {
            bad(format!(
                "cannot read it ({e}); create it with the bearer token"
            ))
        })?;
        let token = String::from_utf8_lossy(&text).trim().to_string();
        if token.is_empty() {
            return Err(bad("the file is empty; put the bearer token in it".into()));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                "the token must be printable ASCII without spaces or line breaks inside".into(),
            ));
        }
        Ok(token)
    }
}

/// What happens to a reading from a device the registry does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownDevice {
    /// Accept it unenriched, flagged `"registered": false`.
    Pass,
    /// Reject it as `unknown_device` (quarantine and `iot-dlq`).
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// JSON registry file (devices and a GeoJSON FeatureCollection of
    /// fences) applied at start when it changed. A file that does not parse
    /// is refused as a whole and the last good copy stays in use.
    pub file: Option<PathBuf>,
    /// Policy for devices not in the registry.
    #[serde(default = "default_unknown_device")]
    pub unknown_device: UnknownDevice,
    /// Most device entries held in memory in front of SQLite.
    #[serde(default = "default_registry_cache_capacity")]
    pub cache_capacity: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            file: None,
            unknown_device: default_unknown_device(),
            cache_capacity: default_registry_cache_capacity(),
        }
    }
}

const fn default_unknown_device() -> UnknownDevice {
    UnknownDevice::Pass
}
const fn default_registry_cache_capacity() -> usize {
    20_000
}

/// `[min, max]` of a value, inclusive.
pub type Bounds = [f64; 2];

/// Limits of the schema's numeric values; a value without limits is only
/// checked against its physical range.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ValueLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<Bounds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub humidity: Option<Bounds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub battery: Option<Bounds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<Bounds>,
}

impl ValueLimits {
    /// Field name and bounds of every limit set, in a fixed order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, Bounds)> + '_ {
        [
            ("temperature", self.temperature),
            ("humidity", self.humidity),
            ("battery", self.battery),
            ("speed", self.speed),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|b| (k, b)))
    }

    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    /// Checks every bound is finite with min ≤ max; names the first bad one.
    pub fn check(&self) -> Result<(), (&'static str, Bounds)> {
        for (field, b) in self.iter() {
            if !(b[0].is_finite() && b[1].is_finite() && b[0] <= b[1]) {
                return Err((field, b));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceTypeConfig {
    /// Valid ranges: a reading outside is rejected as `out_of_range`.
    #[serde(default)]
    pub ranges: ValueLimits,
    /// Alert thresholds: `alerts.threshold_readings` consecutive readings
    /// outside raise a `threshold` alert.
    #[serde(default)]
    pub thresholds: ValueLimits,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Consecutive readings outside a threshold before an alert is raised
    /// (a device's registry entry may override it).
    #[serde(default = "default_threshold_readings")]
    pub threshold_readings: u32,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            threshold_readings: default_threshold_readings(),
        }
    }
}

const fn default_threshold_readings() -> u32 {
    3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `host:port` to serve `/metrics`, `/health` and `/status` on; empty
    /// turns the endpoint off. Keep it on loopback or a management network:
    /// it has no authentication.
    #[serde(default = "default_http_listen")]
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_http_listen(),
        }
    }
}

fn default_http_listen() -> String {
    "127.0.0.1:9464".to_string()
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesConfig {
    /// Devices publishing JSON readings to an MQTT broker.
    pub mqtt: Option<MqttSourceConfig>,
    /// Simulated devices, so the agent runs with no hardware.
    pub demo: Option<DemoSourceConfig>,
    /// Serial ports (UART, RS-485, USB adapters) speaking firmware-proto.
    #[serde(default)]
    pub serial: Vec<SerialSourceConfig>,
}

/// Parity of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Even,
    Odd,
}

/// Flow control of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    None,
    /// XON/XOFF.
    Software,
    /// RTS/CTS.
    Hardware,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSourceConfig {
    /// Device path. Prefer the stable `/dev/serial/by-id/...` names of USB
    /// adapters: `/dev/ttyUSB0` can change after a replug.
    pub path: PathBuf,
    /// Line speed.
    #[serde(default = "default_baud_rate")]
    pub baud_rate: u32,
    #[serde(default = "default_parity")]
    pub parity: Parity,
    /// 1 or 2.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// 7 or 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_flow_control")]
    pub flow_control: FlowControl,
    /// Cap of the backoff between attempts to (re)open the port, e.g. while
    /// a USB adapter is unplugged.
    #[serde(default = "default_reopen_backoff_max_seconds")]
    pub reopen_backoff_max_seconds: u64,
    /// Sampling interval pushed to devices in `Config`.
    #[serde(default = "default_sampling_interval_ms")]
    pub sampling_interval_ms: u32,
}

const fn default_baud_rate() -> u32 {
    115_200
}
const fn default_parity() -> Parity {
    Parity::None
}
const fn default_stop_bits() -> u8 {
    1
}
const fn default_data_bits() -> u8 {
    8
}
const fn default_flow_control() -> FlowControl {
    FlowControl::None
}
const fn default_reopen_backoff_max_seconds() -> u64 {
    10
}
const fn default_sampling_interval_ms() -> u32 {
    1000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// Broker host name or address.
    pub host: String,
    /// Broker port (1883 plain, 8883 TLS by convention).
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// MQTT client id. With a persistent session (the default) the broker
    /// keeps unacknowledged readings for this id across agent restarts.
    pub client_id: String,
    /// Topic filters to subscribe to (QoS 1). Topics that do not have the
    /// shape `{topic_prefix}devices/{device_id}/telemetry` are counted as
    /// rejected with reason `unknown_topic`.
    #[serde(default = "default_mqtt_topics")]
    pub topics: Vec<String>,
    /// Prefix in front of `devices/...`, for brokers shared by several sites.
    #[serde(default)]
    pub topic_prefix: String,
    /// Keep the broker session across reconnects and restarts so readings
    /// not yet acknowledged are redelivered.
    #[serde(default = "default_true")]
    pub persistent_session: bool,
    /// Keep-alive interval.
    #[serde(default = "default_keep_alive_seconds")]
    pub keep_alive_seconds: u64,
    /// Largest MQTT packet accepted from the broker. Payloads above
    /// `validation.max_payload_bytes` but below this are counted and rejected;
    /// configure the broker's `message_size_limit` at or below this value.
    #[serde(default = "default_mqtt_max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// Optional user name for broker authentication.
    pub username: Option<String>,
    /// File holding the broker password (never put secrets in the config).
    pub password_file: Option<PathBuf>,
    /// TLS to the broker.
    pub tls: Option<TlsConfig>,
}

/// TLS settings shared by clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the CA certificates that sign the server certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key for `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
}

const fn default_mqtt_port() -> u16 {
    1883
}
fn default_mqtt_topics() -> Vec<String> {
    vec!["devices/#".to_string()]
}
const fn default_true() -> bool {
    true
}
const fn default_keep_alive_seconds() -> u64 {
    30
}
const fn default_mqtt_max_packet_bytes() -> usize {
    256 * 1024
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoSourceConfig {
    /// Number of simulated devices.
    #[serde(default = "default_demo_devices")]
    pub devices: u32,
    /// Readings per second over all devices.
    #[serde(default = "default_demo_rate")]
    pub readings_per_second: u32,
    /// Fraction of readings made deliberately invalid, 0.0 to 1.0.
    #[serde(default = "default_demo_invalid_fraction")]
    pub invalid_fraction: f64,
    /// Seed of the random generator, for reproducible runs.
    #[serde(default)]
    pub seed: u64,
    /// Prefix of the simulated device ids (`{prefix}000042`). Two gateways
    /// simulating devices into one cluster need different prefixes, or they
    /// would report the same devices.
    #[serde(default = "default_demo_device_prefix")]
    pub device_prefix: String,
}

fn default_demo_device_prefix() -> String {
    "demo-".to_string()
}

const fn default_demo_devices() -> u32 {
    300
}
const fn default_demo_rate() -> u32 {
    1000
}
const fn default_demo_invalid_fraction() -> f64 {
    0.02
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Largest accepted payload; larger ones are rejected as `payload_too_large`.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// How far in the future a reading's `ts` may be.
    #[serde(default = "default_max_future_skew_seconds")]
    pub max_future_skew_seconds: u64,
    /// How old a reading's `ts` may be (backfill of offline logs needs days).
    #[serde(default = "default_max_age_seconds")]
    pub max_age_seconds: u64,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: default_max_payload_bytes(),
            max_future_skew_seconds: default_max_future_skew_seconds(),
            max_age_seconds: default_max_age_seconds(),
        }
    }
}

const fn default_max_payload_bytes() -> usize {
    4096
}
const fn default_max_future_skew_seconds() -> u64 {
    300
}
const fn default_max_age_seconds() -> u64 {
    30 * 24 * 3600
}

/// SQLite `synchronous` level of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync on every batch commit: an acknowledged reading survives power
    /// loss. The default, because acknowledging means the device may forget.
    Full,
    /// WAL `NORMAL`: fsync only at checkpoints. Faster on slow SD cards, but
    /// a power cut can lose the last acknowledged batches.
    Normal,
}

/// What happens when the outbox reaches `max_size_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Stop taking input (and so stop acknowledging): devices and the broker
    /// keep the data until the uplink drains the outbox.
    Block,
    /// Delete the oldest unsent batches to make room (down to 90 % of the
    /// bound), counting every dropped reading and logging it as an error.
    /// For sites where fresh data matters more than complete history.
    DropOldest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Durability of each batch commit.
    #[serde(default = "default_sync_mode")]
    pub synchronous: SyncMode,
    /// Most readings per outbox batch (one SQLite transaction).
    #[serde(default = "default_batch_max_records")]
    pub batch_max_records: usize,
    /// Most encoded bytes per outbox batch.
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// Longest a batch waits for more readings before it is committed (it
    /// goes at once when full). 0 means group commit only: a batch holds
    /// what arrived while the previous one was being written. The default,
    /// 2 ms, saves most commits (and their syncs) under steady load, which
    /// on a gateway that also runs the MQTT broker leaves the broker its
    /// CPU (see the README's performance section). The linger ends early
    /// when the Kafka uplink starts its next transaction (lingering on
    /// would make the readings miss it), and batches do not linger while
    /// the uplink has nothing to send (it would only delay the next
    /// transaction).
    #[serde(default = "default_batch_linger_ms")]
    pub batch_linger_ms: u64,
    /// Whether the Kafka uplink may end a batch's linger: it calls for the
    /// lingering batch when it starts a transaction, and batches do not
    /// linger while it has nothing to send. Lower latency for about a
    /// third more commits under steady load; `false` keeps every linger
    /// whole (fewer writes, for SD cards).
    #[serde(default = "default_true")]
    pub uplink_ends_linger: bool,
    /// Bound on the outbox size (records not yet committed to Kafka).
    #[serde(default = "default_outbox_max_size_bytes")]
    pub max_size_bytes: u64,
    /// Overflow policy when `max_size_bytes` is reached.
    #[serde(default = "default_when_full")]
    pub when_full: WhenFull,
    /// Rejected inputs kept for inspection in the quarantine table; the
    /// oldest are deleted beyond this (they are still counted and sent to
    /// the dead-letter topic).
    #[serde(default = "default_quarantine_max_rows")]
    pub quarantine_max_rows: u64,
    /// Compression of batch bodies on disk: `lz4` (the default) writes
    /// about a third of the bytes, which spares SD cards and speeds commits;
    /// `none` stores them as they go to Kafka.
    #[serde(default = "default_outbox_compression")]
    pub compression: OutboxCompression,
    /// Room kept allocated next to the database (`edge-agent.reserve`) so a
    /// full disk never wedges it: at the first "disk full" the reserve is
    /// freed, the write-ahead log is checkpointed and truncated, and input
    /// is held back until the reserve fits again. 0 turns it off.
    #[serde(default = "default_disk_reserve_bytes")]
    pub disk_reserve_bytes: u64,
    /// SQLite page size of a new outbox database (an existing one keeps
    /// its own): 4096 to 65536, a power of two. Larger pages mean fewer
    /// pages, writes and checkpoint steps for the same batch bodies (an
    /// import with 16384 ran about 10 % faster, see the README), but every
    /// commit writes at least a few whole pages, so small batches at low
    /// rates write more bytes: 4096 suits SD cards.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
}

const fn default_page_size() -> u32 {
    4096
}

const fn default_disk_reserve_bytes() -> u64 {
    16 * 1024 * 1024
}

/// How outbox batch bodies are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxCompression {
    None,
    Lz4,
}

const fn default_outbox_compression() -> OutboxCompression {
    OutboxCompression::Lz4
}

const fn default_batch_linger_ms() -> u64 {
    2
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            synchronous: default_sync_mode(),
            batch_max_records: default_batch_max_records(),
            batch_max_bytes: default_batch_max_bytes(),
            batch_linger_ms: default_batch_linger_ms(),
            uplink_ends_linger: true,
            max_size_bytes: default_outbox_max_size_bytes(),
            when_full: default_when_full(),
            quarantine_max_rows: default_quarantine_max_rows(),
            compression: default_outbox_compression(),
            disk_reserve_bytes: default_disk_reserve_bytes(),
            page_size: default_page_size(),
        }
    }
}

const fn default_sync_mode() -> SyncMode {
    SyncMode::Full
}
const fn default_batch_max_records() -> usize {
    5000
}
const fn default_batch_max_bytes() -> usize {
    4 * 1024 * 1024
}
const fn default_outbox_max_size_bytes() -> u64 {
    256 * 1024 * 1024
}
const fn default_when_full() -> WhenFull {
    WhenFull::Block
}
const fn default_quarantine_max_rows() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated `host:port`.
    pub brokers: String,
    /// Topic for valid, enriched readings.
    #[serde(default = "default_topic_data")]
    pub topic_data: String,
    /// Topic for rejected input with its reason.
    #[serde(default = "default_topic_dlq")]
    pub topic_dlq: String,
    /// Topic for geofence and threshold alerts.
    #[serde(default = "default_topic_alerts")]
    pub topic_alerts: String,
    /// Compacted topic holding each gateway's exactly-once marker.
    #[serde(default = "default_topic_offsets")]
    pub topic_offsets: String,
    /// Producer compression.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Producer linger: how long librdkafka waits to fill a request.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Most outbox batches carried by one Kafka transaction (it also takes
    /// no further batch once its records reach 2 MiB, which bounds what the
    /// producer holds). A transaction takes every batch waiting, so transactions
    /// stay small when idle and grow under load; a small bound caps the
    /// uplink at this many batches per transaction round trip.
    #[serde(default = "default_max_batches_per_transaction")]
    pub max_batches_per_transaction: usize,
    /// Transactional producers the uplink takes turns with (1 to 3). After
    /// a commit the coordinator still writes its markers, and a transaction
    /// started on the same transactional id meanwhile waits a fixed 20 ms
    /// in librdkafka; with 2, the next transaction runs on the other id.
    /// With 3, transactions also overlap: the next one's records go out
    /// while the previous one commits.
    #[serde(default = "default_transaction_lanes")]
    pub transaction_lanes: usize,
    /// Kafka `transaction.timeout.ms`: the broker aborts a transaction left
    /// open longer than this.
    #[serde(default = "default_transaction_timeout_seconds")]
    pub transaction_timeout_seconds: u64,
    /// Cap of the reconnect backoff while Kafka is unreachable.
    #[serde(default = "default_retry_backoff_max_seconds")]
    pub retry_backoff_max_seconds: u64,
    /// Extra librdkafka properties (for example `security.protocol`,
    /// `sasl.mechanisms`, `sasl.username`). Values are never logged.
    #[serde(default)]
    pub librdkafka_options: BTreeMap<String, String>,
    /// File holding the SASL password (librdkafka's `sasl.password`), so the
    /// secret stays out of the config file.
    pub sasl_password_file: Option<PathBuf>,
}

fn default_topic_data() -> String {
    "rich-iot-data".into()
}
fn default_topic_dlq() -> String {
    "iot-dlq".into()
}
fn default_topic_alerts() -> String {
    "iot-alerts".into()
}
fn default_topic_offsets() -> String {
    "edge-offsets".into()
}
fn default_compression() -> String {
    "lz4".into()
}
const fn default_linger_ms() -> u64 {
    2
}
const fn default_transaction_lanes() -> usize {
    2
}
const fn default_max_batches_per_transaction() -> usize {
    4096
}
const fn default_transaction_timeout_seconds() -> u64 {
    60
}
const fn default_retry_backoff_max_seconds() -> u64 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgressConfig {
    /// Seconds between progress lines; 0 turns them off.
    #[serde(default = "default_progress_interval_seconds")]
    pub interval_seconds: u64,
}

impl Default for ProgressConfig {
    fn default() -> Self {
        Self {
            interval_seconds: default_progress_interval_seconds(),
        }
    }
}

const fn default_progress_interval_seconds() -> u64 {
    1
}

/// Checks a device or gateway identifier: 1 to 64 characters of
/// `[A-Za-z0-9._-]`, so it is safe in MQTT topics, file names and SQL.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| ID_BYTES[usize::from(b)])
}

/// The bytes an id may hold, by value: one lookup per byte (checked for
/// every reading).
const ID_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-';
        b += 1;
    }
    table
};

const ID_RULE: &str = "1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'";

impl Config {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The built-in default (`board-configs/sim.toml`).
    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::from_toml(DEFAULT_CONFIG_TOML, "board-configs/sim.toml (built in)")
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value against what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_valid_id(&self.gateway_id) {
            return Err(invalid("gateway_id", &self.gateway_id, ID_RULE));
        }
        if self.sources.mqtt.is_none()
            && self.sources.demo.is_none()
            && self.sources.serial.is_empty()
        {
            return Err(invalid(
                "sources",
                "{}",
                "configure at least one of [sources.mqtt], [sources.demo] or [[sources.serial]]",
            ));
        }
        let mut paths = std::collections::BTreeSet::new();
        for serial in &self.sources.serial {
            if serial.path.as_os_str().is_empty() {
                return Err(invalid(
                    "sources.serial.path",
                    &serial.path,
                    "a device path such as /dev/ttyUSB0",
                ));
            }
            if !paths.insert(serial.path.clone()) {
                return Err(invalid(
                    "sources.serial.path",
                    &serial.path,
                    "each port only once; please delete the duplicate",
                ));
            }
            if !(300..=4_000_000).contains(&serial.baud_rate) {
                return Err(invalid(
                    "sources.serial.baud_rate",
                    serial.baud_rate,
                    "300 to 4000000",
                ));
            }
            if !matches!(serial.stop_bits, 1 | 2) {
                return Err(invalid(
                    "sources.serial.stop_bits",
                    serial.stop_bits,
                    "1 or 2",
                ));
            }
            if !matches!(serial.data_bits, 7 | 8) {
                return Err(invalid(
                    "sources.serial.data_bits",
                    serial.data_bits,
                    "7 or 8 (frames are binary: use 8 unless the line forces 7)",
                ));
            }
            if !(1..=3600).contains(&serial.reopen_backoff_max_seconds) {
                return Err(invalid(
                    "sources.serial.reopen_backoff_max_seconds",
                    serial.reopen_backoff_max_seconds,
                    "1 to 3600",
                ));
            }
            if !(10..=86_400_000).contains(&serial.sampling_interval_ms) {
                return Err(invalid(
                    "sources.serial.sampling_interval_ms",
                    serial.sampling_interval_ms,
                    "10 to 86400000",
                ));
            }
        }
        if let Some(mqtt) = &self.sources.mqtt {
            if mqtt.host.trim().is_empty() {
                return Err(invalid(
                    "sources.mqtt.host",
                    &mqtt.host,
                    "a host name or address",
                ));
            }
            if mqtt.port == 0 {
                return Err(invalid("sources.mqtt.port", mqtt.port, "1 to 65535"));
            }
            if mqtt.client_id.is_empty() || mqtt.client_id.len() > 128 {
                return Err(invalid(
                    "sources.mqtt.client_id",
                    &mqtt.client_id,
                    "1 to 128 characters",
                ));
            }
            if mqtt.topics.is_empty() {
                return Err(invalid(
                    "sources.mqtt.topics",
                    &mqtt.topics,
                    "at least one topic filter",
                ));
            }
            for topic in &mqtt.topics {
                if !valid_topic_filter(topic) {
                    return Err(invalid(
                        "sources.mqtt.topics",
                        topic,
                        "an MQTT topic filter: '+' and '#' only as whole levels, '#' last",
                    ));
                }
            }
            if !mqtt.topic_prefix.is_empty() && !mqtt.topic_prefix.ends_with('/') {
                return Err(invalid(
                    "sources.mqtt.topic_prefix",
                    &mqtt.topic_prefix,
                    "empty, or ending with '/'",
                ));
            }
            if !(5..=3600).contains(&mqtt.keep_alive_seconds) {
                return Err(invalid(
                    "sources.mqtt.keep_alive_seconds",
                    mqtt.keep_alive_seconds,
                    "5 to 3600",
                ));
            }
            if !(1024..=16 * 1024 * 1024).contains(&mqtt.max_packet_bytes) {
                return Err(invalid(
                    "sources.mqtt.max_packet_bytes",
                    mqtt.max_packet_bytes,
                    "1024 to 16777216",
                ));
            }
            if mqtt.max_packet_bytes < self.validation.max_payload_bytes {
                return Err(invalid(
                    "sources.mqtt.max_packet_bytes",
                    mqtt.max_packet_bytes,
                    format!(
                        "at least validation.max_payload_bytes ({})",
                        self.validation.max_payload_bytes
                    ),
                ));
            }
            if mqtt.password_file.is_some() && mqtt.username.is_none() {
                return Err(invalid(
                    "sources.mqtt.username",
                    "none",
                    "set a username when password_file is given",
                ));
            }
            if let Some(tls) = &mqtt.tls
                && tls.client_cert_file.is_some() != tls.client_key_file.is_some()
            {
                return Err(invalid(
                    "sources.mqtt.tls.client_key_file",
                    &tls.client_key_file,
                    "give both client_cert_file and client_key_file, or neither",
                ));
            }
        }
        if let Some(demo) = &self.sources.demo {
            if !(1..=1_000_000).contains(&demo.devices) {
                return Err(invalid(
                    "sources.demo.devices",
                    demo.devices,
                    "1 to 1000000",
                ));
            }
            if !(1..=10_000_000).contains(&demo.readings_per_second) {
                return Err(invalid(
                    "sources.demo.readings_per_second",
                    demo.readings_per_second,
                    "1 to 10000000",
                ));
            }
            if !(0.0..=1.0).contains(&demo.invalid_fraction) {
                return Err(invalid(
                    "sources.demo.invalid_fraction",
                    demo.invalid_fraction,
                    "0.0 to 1.0",
                ));
            }
            // The prefix plus six digits must still be a valid device id.
            if demo.device_prefix.len() > 58 || !is_valid_id(&format!("{}0", demo.device_prefix)) {
                return Err(invalid(
                    "sources.demo.device_prefix",
                    &demo.device_prefix,
                    "0 to 58 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
                ));
            }
        }
        let v = &self.validation;
        if !(256..=1024 * 1024).contains(&v.max_payload_bytes) {
            return Err(invalid(
                "validation.max_payload_bytes",
                v.max_payload_bytes,
                "256 to 1048576",
            ));
        }
        let o = &self.outbox;
        if !(1..=100_000).contains(&o.batch_max_records) {
            return Err(invalid(
                "outbox.batch_max_records",
                o.batch_max_records,
                "1 to 100000",
            ));
        }
        if !(4096..=64 * 1024 * 1024).contains(&o.batch_max_bytes) {
            return Err(invalid(
                "outbox.batch_max_bytes",
                o.batch_max_bytes,
                "4096 to 67108864",
            ));
        }
        if o.disk_reserve_bytes != 0 && !(1 << 20..=1 << 30).contains(&o.disk_reserve_bytes) {
            return Err(invalid(
                "outbox.disk_reserve_bytes",
                o.disk_reserve_bytes,
                "0 (off) or 1048576 to 1073741824",
            ));
        }
        if !(4096..=65536).contains(&o.page_size) || !o.page_size.is_power_of_two() {
            return Err(invalid(
                "outbox.page_size",
                o.page_size,
                "4096, 8192, 16384, 32768 or 65536",
            ));
        }
        if o.batch_linger_ms > 1000 {
            return Err(invalid(
                "outbox.batch_linger_ms",
                o.batch_linger_ms,
                "0 to 1000",
            ));
        }
        if o.max_size_bytes < 4 * o.batch_max_bytes as u64 {
            return Err(invalid(
                "outbox.max_size_bytes",
                o.max_size_bytes,
                format!(
                    "at least 4 x outbox.batch_max_bytes ({})",
                    4 * o.batch_max_bytes
                ),
            ));
        }
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            return Err(invalid(
                "kafka.brokers",
                &k.brokers,
                "comma-separated host:port list",
            ));
        }
        for (key, topic) in [
            ("kafka.topic_data", &k.topic_data),
            ("kafka.topic_dlq", &k.topic_dlq),
            ("kafka.topic_alerts", &k.topic_alerts),
            ("kafka.topic_offsets", &k.topic_offsets),
        ] {
            if !valid_kafka_topic(topic) {
                return Err(invalid(
                    key,
                    topic,
                    "1 to 249 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
                ));
            }
        }
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&k.compression.as_str()) {
            return Err(invalid(
                "kafka.compression",
                &k.compression,
                "one of none, gzip, snappy, lz4, zstd",
            ));
        }
        if k.linger_ms > 1000 {
            return Err(invalid("kafka.linger_ms", k.linger_ms, "0 to 1000"));
        }
        if !(1..=100_000).contains(&k.max_batches_per_transaction) {
            return Err(invalid(
                "kafka.max_batches_per_transaction",
                k.max_batches_per_transaction,
                "1 to 100000",
            ));
        }
        if !(1..=3).contains(&k.transaction_lanes) {
            return Err(invalid(
                "kafka.transaction_lanes",
                k.transaction_lanes,
                "1, 2 or 3",
            ));
        }
        if !(10..=900).contains(&k.transaction_timeout_seconds) {
            return Err(invalid(
                "kafka.transaction_timeout_seconds",
                k.transaction_timeout_seconds,
                "10 to 900",
            ));
        }
        if !(1..=3600).contains(&k.retry_backoff_max_seconds) {
            return Err(invalid(
                "kafka.retry_backoff_max_seconds",
                k.retry_backoff_max_seconds,
                "1 to 3600",
            ));
        }
        for key in k.librdkafka_options.keys() {
            if key == "sasl.password" {
                return Err(invalid(
                    "kafka.librdkafka_options",
                    key,
                    "secrets do not belong in the config: put the password in a file and set kafka.sasl_password_file",
                ));
            }
            if RESERVED_KAFKA_KEYS.contains(&key.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "kafka.librdkafka_options",
                    value: format!("{key:?}"),
                    allowed: "any librdkafka property except those the exactly-once uplink sets itself \
                              (transactional.id, enable.idempotence, isolation.level, bootstrap.servers); \
                              please delete it"
                        .into(),
                });
            }
        }
        if self.progress.interval_seconds > 3600 {
            return Err(invalid(
                "progress.interval_seconds",
                self.progress.interval_seconds,
                "0 to 3600",
            ));
        }
        let r = &self.registry;
        if !(1..=10_000_000).contains(&r.cache_capacity) {
            return Err(invalid(
                "registry.cache_capacity",
                r.cache_capacity,
                "1 to 10000000",
            ));
        }
        if r.file.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
            return Err(invalid(
                "registry.file",
                "",
                "a path to a registry JSON file, or leave the key out",
            ));
        }
        if let Some(c) = &self.cloud_sync {
            if r.file.is_some() {
                return Err(invalid(
                    "registry.file",
                    r.file.as_deref().unwrap_or(Path::new("")),
                    "not together with [cloud_sync], which manages the registry: remove \
                     registry.file to sync from the cloud, or remove [cloud_sync] to keep the file",
                ));
            }
            const URL_RULE: &str =
                "an http:// or https:// URL such as https://bridge.example.com:8080";
            let url = reqwest::Url::parse(&c.url)
                .map_err(|e| invalid("cloud_sync.url", &c.url, format!("{URL_RULE} ({e})")))?;
            if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
                return Err(invalid("cloud_sync.url", &c.url, URL_RULE));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(invalid(
                    "cloud_sync.url",
                    "(not shown: it holds credentials)",
                    "a URL without user or password (it is logged); put the token in cloud_sync.token_file",
                ));
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(invalid(
                    "cloud_sync.url",
                    &c.url,
                    "the bridge's base URL, without ?query or #fragment",
                ));
            }
            if c.token_file.as_os_str().is_empty() {
                return Err(invalid(
                    "cloud_sync.token_file",
                    "",
                    "the path of a file holding the bearer token",
                ));
            }
            if !(5..=86_400).contains(&c.interval_seconds) {
                return Err(invalid(
                    "cloud_sync.interval_seconds",
                    c.interval_seconds,
                    "5 to 86400",
                ));
            }
            if !(1..=600).contains(&c.timeout_seconds) {
                return Err(invalid(
                    "cloud_sync.timeout_seconds",
                    c.timeout_seconds,
                    "1 to 600",
                ));
            }
            if let Some(ca) = &c.ca_file {
                if ca.as_os_str().is_empty() {
                    return Err(invalid(
                        "cloud_sync.ca_file",
                        "",
                        "a PEM file of CA certificates, or leave the key out",
                    ));
                }
                if url.scheme() != "https" {
                    return Err(invalid(
                        "cloud_sync.ca_file",
                        ca,
                        "only used with an https:// cloud_sync.url: remove it or switch the URL to https",
                    ));
                }
            }
        }
        for (name, t) in &self.device_types {
            if !is_valid_id(name) {
                return Err(invalid("device_types", name, ID_RULE));
            }
            for (what, limits) in [("ranges", &t.ranges), ("thresholds", &t.thresholds)] {
                if let Err((field, b)) = limits.check() {
                    return Err(ConfigError::Invalid {
                        key: "device_types",
                        value: format!("{name}.{what}.{field} = {b:?}"),
                        allowed: "[min, max] with finite numbers and min <= max".into(),
                    });
                }
            }
        }
        if !(1..=10_000).contains(&self.alerts.threshold_readings) {
            return Err(invalid(
                "alerts.threshold_readings",
                self.alerts.threshold_readings,
                "1 to 10000",
            ));
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "http.listen",
                &self.http.listen,
                "an IP:port such as 127.0.0.1:9464, or \"\" to turn the endpoint off",
            ));
        }
        Ok(())
    }

    /// Path of the agent's SQLite database.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("edge-agent.db")
    }

    /// Kafka `transactional.id`: stable per gateway, so a restarted agent
    /// fences its previous incarnation.
    pub fn transactional_id(&self) -> String {
        format!("edge-agent-{}", self.gateway_id)
    }

    /// The transactional id of uplink lane `lane` (see
    /// `kafka.transaction_lanes`). Lane 0 keeps the historical id; the
    /// others add `/lane-N`, and `/` never occurs in a gateway id, so no
    /// two gateways share an id.
    pub fn lane_transactional_id(&self, lane: usize) -> String {
        if lane == 0 {
            self.transactional_id()
        } else {
            format!("{}/lane-{lane}", self.transactional_id())
        }
    }
}

const RESERVED_KAFKA_KEYS: &[&str] = &[
    "transactional.id",
    "enable.idempotence",
    "isolation.level",
    "bootstrap.servers",
];

fn valid_kafka_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > 1024 {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == levels.len() - 1,
        "+" => true,
        other => !other.contains(['+', '#']),
    })
}

#[cfg(test)]
mod tests;
