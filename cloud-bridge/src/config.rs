//! Bridge configuration: an optional TOML file, then environment overrides
//! (`CLOUD_BRIDGE_*`), validated at load.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
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

fn invalid(
    key: &'static str,
    value: impl std::fmt::Debug,
    allowed: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: format!("{value:?}"),
        allowed: allowed.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    #[serde(default)]
    pub kafka: KafkaSourceConfig,
    #[serde(default)]
    pub mysql: MysqlSinkConfig,
    /// Alerts into OpenSearch/Elasticsearch; off while `url` is empty.
    #[serde(default)]
    pub opensearch: OpenSearchSinkConfig,
    /// Which topic goes to which sink. Empty: the defaults
    /// ([`BridgeConfig::effective_routes`]).
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// The registry HTTP API, health, readiness and metrics.
    #[serde(default)]
    pub api: ApiConfig,
}

/// Where a sink writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// Readings into MySQL `iot_metrics`, exactly once (offsets in MySQL).
    MysqlMetrics,
    /// Rejected input into MySQL `iot_dlq`, exactly once (offsets in MySQL).
    MysqlDlq,
    /// Documents into an OpenSearch/Elasticsearch index under deterministic
    /// ids (idempotent), offsets committed to Kafka after each bulk.
    Opensearch,
}

/// What the OpenSearch document id is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocumentId {
    /// The alert's `alert_id` (alerts).
    AlertId,
    /// `{device_id}:{seq}` (readings).
    DeviceSeq,
}

/// One route: a topic consumed into a sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub topic: String,
    pub sink: SinkKind,
    /// `opensearch` only: the index (default `opensearch.index`).
    pub index: Option<String>,
    /// `opensearch` only: the document id (default `alert_id`).
    pub document_id: Option<DocumentId>,
    /// Consumer group (defaults: `kafka.group_id` for `mysql_metrics`,
    /// `{kafka.group_id}-alerts` for the alerts index, else
    /// `{kafka.group_id}-{sink}-{topic}`).
    pub group_id: Option<String>,
}

/// A route with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub topic: String,
    pub sink: SinkKind,
    pub index: String,
    pub document_id: DocumentId,
    pub group_id: String,
    /// Name under which a MySQL sink stores its offsets in `bridge_offsets`.
    pub sink_name: String,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address the HTTP API listens on; empty turns it off.
    /// Env: `CLOUD_BRIDGE_API_LISTEN`.
    #[serde(default = "default_api_listen")]
    pub listen: String,
    /// File holding the admin bearer token (only its SHA-256 is kept in
    /// memory). Without it the admin endpoints answer 401.
    /// Env: `CLOUD_BRIDGE_ADMIN_TOKEN_FILE`.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// PEM certificate chain and private key: serve HTTPS instead of HTTP.
    pub tls_cert_file: Option<std::path::PathBuf>,
    pub tls_key_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("admin_token_file", &self.admin_token_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .finish()
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: default_api_listen(),
            admin_token_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

fn default_api_listen() -> String {
    "127.0.0.1:8080".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenSearchSinkConfig {
    /// `http(s)://host:port` of OpenSearch or Elasticsearch; empty turns
    /// the alerts sink off. Env: `CLOUD_BRIDGE_OPENSEARCH_URL`.
    #[serde(default)]
    pub url: String,
    /// Index the alerts go to. Env: `CLOUD_BRIDGE_ALERTS_INDEX`.
    #[serde(default = "default_alerts_index")]
    pub index: String,
    /// Topic the gateways send alerts to. Env: `CLOUD_BRIDGE_TOPIC_ALERTS`.
    #[serde(default = "default_topic_alerts")]
    pub topic: String,
    /// Consumer group of the alerts sink (default: `{kafka.group_id}-alerts`).
    pub group_id: Option<String>,
    /// Basic authentication; the password is read from a file.
    pub username: Option<String>,
    pub password_file: Option<std::path::PathBuf>,
    /// PEM CA certificate to trust for `https` (besides the system's).
    pub ca_file: Option<std::path::PathBuf>,
    /// Most alerts per batch (sent as up to two `_bulk` requests at once).
    #[serde(default = "default_bulk_max_docs")]
    pub bulk_max_docs: usize,
    /// Least time a batch gathers alerts after the first arrives before it
    /// goes to the writer; it goes once the writer is free, and grows
    /// while the writer is busy.
    #[serde(default = "default_batch_linger_ms")]
    pub batch_linger_ms: u64,
}

impl Default for OpenSearchSinkConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            index: default_alerts_index(),
            topic: default_topic_alerts(),
            group_id: None,
            username: None,
            password_file: None,
            ca_file: None,
            bulk_max_docs: default_bulk_max_docs(),
            batch_linger_ms: default_batch_linger_ms(),
        }
    }
}

fn default_alerts_index() -> String {
    "iot-alerts".into()
}
fn default_topic_alerts() -> String {
    "iot-alerts".into()
}
const fn default_bulk_max_docs() -> usize {
    5000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap servers. Env: `CLOUD_BRIDGE_KAFKA_BROKERS`.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Consumer group; instances in one group share the partitions.
    /// Env: `CLOUD_BRIDGE_GROUP_ID`.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Topic with the enriched readings. Env: `CLOUD_BRIDGE_TOPIC_DATA`.
    #[serde(default = "default_topic_data")]
    pub topic_data: String,
    /// Topic with the gateways' rejected input. Env: `CLOUD_BRIDGE_TOPIC_DLQ`.
    #[serde(default = "default_topic_dlq")]
    pub topic_dlq: String,
    /// Extra librdkafka properties (security.protocol, sasl.*); never logged.
    #[serde(default)]
    pub librdkafka_options: BTreeMap<String, String>,
}

impl Default for KafkaSourceConfig {
    fn default() -> Self {
        Self {
            brokers: default_brokers(),
            group_id: default_group_id(),
            topic_data: default_topic_data(),
            topic_dlq: default_topic_dlq(),
            librdkafka_options: BTreeMap::new(),
        }
    }
}

fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}
fn default_group_id() -> String {
    "cloud-bridge".into()
}
fn default_topic_data() -> String {
    "rich-iot-data".into()
}
fn default_topic_dlq() -> String {
    "iot-dlq".into()
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlSinkConfig {
    /// `mysql://user:password@host:port/database`. Holds a secret: never
    /// logged. Env: `CLOUD_BRIDGE_MYSQL_URL`.
    #[serde(default = "default_mysql_url")]
    pub url: String,
    /// Name under which this sink stores its Kafka offsets in
    /// `bridge_offsets`.
    #[serde(default = "default_sink_name")]
    pub sink_name: String,
    /// Most Kafka records per batch (one transaction per partition).
    #[serde(default = "default_batch_max_records")]
    pub batch_max_records: usize,
    /// Least time a batch gathers records after the first arrives before it
    /// goes to the writer; it goes once the writer is free, and grows
    /// while the writer is busy. 0 (pure group commit) keeps the latency to
    /// the row low and still fills batches under load.
    #[serde(default = "default_mysql_batch_linger_ms")]
    pub batch_linger_ms: u64,
    /// Rows per multi-row INSERT statement.
    #[serde(default = "default_rows_per_insert")]
    pub rows_per_insert: usize,
    /// Partitions of a batch written at the same time, each in its own
    /// transaction on its own connection.
    #[serde(default = "default_write_concurrency")]
    pub write_concurrency: usize,
}

impl std::fmt::Debug for MysqlSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlSinkConfig")
            .field("url", &redact_url(&self.url))
            .field("sink_name", &self.sink_name)
            .field("batch_max_records", &self.batch_max_records)
            .field("batch_linger_ms", &self.batch_linger_ms)
            .field("rows_per_insert", &self.rows_per_insert)
            .field("write_concurrency", &self.write_concurrency)
            .finish()
    }
}

impl Default for MysqlSinkConfig {
    fn default() -> Self {
        Self {
            url: default_mysql_url(),
            sink_name: default_sink_name(),
            batch_max_records: default_batch_max_records(),
            batch_linger_ms: default_mysql_batch_linger_ms(),
            rows_per_insert: default_rows_per_insert(),
            write_concurrency: default_write_concurrency(),
        }
    }
}

fn default_mysql_url() -> String {
    "mysql://edge@127.0.0.1:3306/edge".into()
}
fn default_sink_name() -> String {
    "mysql-metrics".into()
}
const fn default_batch_max_records() -> usize {
    20_000
}
const fn default_batch_linger_ms() -> u64 {
    20
}
const fn default_mysql_batch_linger_ms() -> u64 {
    0
}
const fn default_write_concurrency() -> usize {
    4
}
const fn default_rows_per_insert() -> usize {
    500
}

/// `mysql://user:secret@host/db` → `mysql://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Kafka's own rule for topic names; `bridge_offsets.topic` is latin1.
fn topic_name_ok(topic: &str) -> bool {
    (1..=249).contains(&topic.len())
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

const TOPIC_RULE: &str =
    "a Kafka topic name: 1 to 249 characters of A-Z, a-z, 0-9, '.', '_' or '-'";

const RESERVED_KAFKA_KEYS: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "isolation.level",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "partition.assignment.strategy",
];

impl BridgeConfig {
    /// Loads the file if given (else defaults), applies `CLOUD_BRIDGE_*`
    /// environment overrides, validates.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut config: BridgeConfig = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    origin: path.display().to_string(),
                    message: e.to_string(),
                })?
            }
            None => toml::from_str("").map_err(|e| ConfigError::Parse {
                origin: "defaults".into(),
                message: e.to_string(),
            })?,
        };
        if let Some(v) = env("CLOUD_BRIDGE_KAFKA_BROKERS") {
            config.kafka.brokers = v;
        }
        if let Some(v) = env("CLOUD_BRIDGE_GROUP_ID") {
            config.kafka.group_id = v;
        }
        if let Some(v) = env("CLOUD_BRIDGE_TOPIC_DATA") {
            config.kafka.topic_data = v;
        }
        if let Some(v) = env("CLOUD_BRIDGE_TOPIC_DLQ") {
            config.kafka.topic_dlq = v;
        }
        if let Some(v) = env("CLOUD_BRIDGE_API_LISTEN") {
            config.api.listen = v;
        }
        if let Some(v) = env("CLOUD_BRIDGE_ADMIN_TOKEN_FILE") {
            config.api.admin_token_file = (!v.is_empty()).then(|| v.into());
        }
        if let Some(v) = env("CLOUD_BRIDGE_MYSQL_URL") {
            config.mysql.url = v;
        }
        if let Some(v) = env("CLOUD_BRIDGE_OPENSEARCH_URL") {
            config.opensearch.url = v;
        }
        if let Some(v) = env("CLOUD_BRIDGE_ALERTS_INDEX") {
            config.opensearch.index = v;
        }
        if let Some(v) = env("CLOUD_BRIDGE_TOPIC_ALERTS") {
            config.opensearch.topic = v;
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid(
                "kafka.brokers",
                &self.kafka.brokers,
                "comma-separated host:port list",
            ));
        }
        if self.kafka.group_id.trim().is_empty() {
            return Err(invalid(
                "kafka.group_id",
                &self.kafka.group_id,
                "a non-empty consumer group name",
            ));
        }
        let os = &self.opensearch;
        if !os.url.is_empty() {
            if !(os.url.starts_with("http://") || os.url.starts_with("https://")) {
                return Err(invalid(
                    "opensearch.url",
                    redact_url(&os.url),
                    "http://host:port or https://host:port, or empty to turn the alerts sink off",
                ));
            }
            if !index_name_ok(&os.index) {
                return Err(invalid(
                    "opensearch.index",
                    &os.index,
                    "an index name: lowercase letters, digits, '-', '_', '.', not starting with '_', '-' or '+'",
                ));
            }
            if !topic_name_ok(&os.topic) {
                return Err(invalid("opensearch.topic", &os.topic, TOPIC_RULE));
            }
            if !(1..=10_000).contains(&os.bulk_max_docs) {
                return Err(invalid(
                    "opensearch.bulk_max_docs",
                    os.bulk_max_docs,
                    "1 to 10000",
                ));
            }
            if os.password_file.is_some() && os.username.is_none() {
                return Err(invalid(
                    "opensearch.password_file",
                    "set",
                    "give opensearch.username too",
                ));
            }
        }
        if !topic_name_ok(&self.kafka.topic_data) {
            return Err(invalid(
                "kafka.topic_data",
                &self.kafka.topic_data,
                TOPIC_RULE,
            ));
        }
        if !topic_name_ok(&self.kafka.topic_dlq) {
            return Err(invalid(
                "kafka.topic_dlq",
                &self.kafka.topic_dlq,
                TOPIC_RULE,
            ));
        }
        self.validate_routes()?;
        self.validate_api()?;
        for key in self.kafka.librdkafka_options.keys() {
            if RESERVED_KAFKA_KEYS.contains(&key.as_str()) {
                return Err(invalid(
                    "kafka.librdkafka_options",
                    key,
                    "any librdkafka property except those exactly-once depends on (bootstrap.servers, group.id, \
                     isolation.level, enable.auto.commit, enable.auto.offset.store, partition.assignment.strategy); \
                     please delete it",
                ));
            }
        }
        if !self.mysql.url.starts_with("mysql://") && !self.mysql.url.starts_with("mariadb://") {
            return Err(invalid(
                "mysql.url",
                redact_url(&self.mysql.url),
                "mysql://user:password@host:port/database",
            ));
        }
        let name_ok = !self.mysql.sink_name.is_empty()
            && self.mysql.sink_name.len() <= 64
            && self
                .mysql
                .sink_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(invalid(
                "mysql.sink_name",
                &self.mysql.sink_name,
                "1 to 64 characters of A-Z, a-z, 0-9, '-' or '_'",
            ));
        }
        if !(1..=100_000).contains(&self.mysql.batch_max_records) {
            return Err(invalid(
                "mysql.batch_max_records",
                self.mysql.batch_max_records,
                "1 to 100000",
            ));
        }
        if self.mysql.batch_linger_ms > 10_000 {
            return Err(invalid(
                "mysql.batch_linger_ms",
                self.mysql.batch_linger_ms,
                "0 to 10000",
            ));
        }
        if !(1..=64).contains(&self.mysql.write_concurrency) {
            return Err(invalid(
                "mysql.write_concurrency",
                self.mysql.write_concurrency,
                "1 to 64",
            ));
        }
        // 16 placeholders per row, at most 65,535 per statement.
        if !(1..=4095).contains(&self.mysql.rows_per_insert) {
            return Err(invalid(
                "mysql.rows_per_insert",
                self.mysql.rows_per_insert,
                "1 to 4095",
            ));
        }
        Ok(())
    }
}

fn index_name_ok(index: &str) -> bool {
    !index.is_empty()
        && index.len() <= 255
        && !index.starts_with(['_', '-', '+'])
        && index.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

impl BridgeConfig {
    /// The routes in effect: the configured ones, or the defaults
    /// `topic_data` → `mysql_metrics`, `topic_dlq` → `mysql_dlq`, and (when
    /// `opensearch.url` is set) `opensearch.topic` → the alerts index.
    pub fn effective_routes(&self) -> Vec<Route> {
        let configured: Vec<RouteConfig> = if self.routes.is_empty() {
            let mut r = vec![RouteConfig {
                topic: self.kafka.topic_data.clone(),
                sink: SinkKind::MysqlMetrics,
                index: None,
                document_id: None,
                group_id: None,
            }];
            if !self.opensearch.url.is_empty() {
                r.push(RouteConfig {
                    topic: self.opensearch.topic.clone(),
                    sink: SinkKind::Opensearch,
                    index: None,
                    document_id: None,
                    group_id: self.opensearch.group_id.clone(),
                });
            }
            r.push(RouteConfig {
                topic: self.kafka.topic_dlq.clone(),
                sink: SinkKind::MysqlDlq,
                index: None,
                document_id: None,
                group_id: None,
            });
            r
        } else {
            self.routes.clone()
        };
        let group = &self.kafka.group_id;
        configured
            .into_iter()
            .map(|r| {
                let index = r
                    .index
                    .clone()
                    .unwrap_or_else(|| self.opensearch.index.clone());
                let is_alerts = r.sink == SinkKind::Opensearch && index == self.opensearch.index;
                let group_id = r.group_id.clone().unwrap_or_else(|| match r.sink {
                    SinkKind::MysqlMetrics => group.clone(),
                    SinkKind::Opensearch if is_alerts => format!("{group}-alerts"),
                    SinkKind::Opensearch => format!("{group}-opensearch-{index}"),
                    SinkKind::MysqlDlq => format!("{group}-dlq"),
                });
                let sink_name = match r.sink {
                    SinkKind::MysqlMetrics => self.mysql.sink_name.clone(),
                    SinkKind::MysqlDlq => "mysql-dlq".into(),
                    // The alerts index keeps the name its dead letters
                    // always had.
                    SinkKind::Opensearch if is_alerts => "opensearch-alerts".into(),
                    SinkKind::Opensearch => format!("opensearch-{index}"),
                };
                Route {
                    topic: r.topic,
                    sink: r.sink,
                    index,
                    document_id: r.document_id.unwrap_or(DocumentId::AlertId),
                    group_id,
                    sink_name,
                }
            })
            .collect()
    }

    fn validate_routes(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::BTreeSet::new();
        for r in &self.routes {
            if !topic_name_ok(&r.topic) {
                return Err(invalid("routes.topic", &r.topic, TOPIC_RULE));
            }
            if r.sink != SinkKind::Opensearch && (r.index.is_some() || r.document_id.is_some()) {
                return Err(invalid(
                    "routes.index",
                    &r.topic,
                    "index and document_id only apply to sink = \"opensearch\"",
                ));
            }
            if r.sink == SinkKind::Opensearch {
                if self.opensearch.url.is_empty() {
                    return Err(invalid(
                        "routes.sink",
                        &r.topic,
                        "an opensearch route needs opensearch.url",
                    ));
                }
                if let Some(index) = &r.index
                    && !index_name_ok(index)
                {
                    return Err(invalid(
                        "routes.index",
                        index,
                        "an index name: lowercase letters, digits, '-', '_', '.', not starting with '_', '-' or '+'",
                    ));
                }
            }
            if let Some(g) = &r.group_id
                && g.trim().is_empty()
            {
                return Err(invalid(
                    "routes.group_id",
                    g,
                    "a non-empty consumer group name",
                ));
            }
        }
        for r in self.effective_routes() {
            if !seen.insert((r.sink_name.clone(), r.topic.clone())) {
                return Err(invalid(
                    "routes",
                    format!("{} -> {:?}", r.topic, r.sink),
                    "the same topic is routed twice to the same sink; remove one",
                ));
            }
        }
        Ok(())
    }

    fn validate_api(&self) -> Result<(), ConfigError> {
        let api = &self.api;
        if !api.listen.is_empty() && api.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "api.listen",
                &api.listen,
                "ip:port (for example 0.0.0.0:8080), or empty to turn the API off",
            ));
        }
        if api.tls_cert_file.is_some() != api.tls_key_file.is_some() {
            return Err(invalid(
                "api.tls_cert_file",
                "one of two",
                "give both api.tls_cert_file and api.tls_key_file, or neither",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_follow_the_topics_and_routes_are_checked() {
        let c = BridgeConfig::load(None, |k| {
            (k == "CLOUD_BRIDGE_OPENSEARCH_URL").then(|| "http://os:9200".into())
        })
        .unwrap();
        let routes = c.effective_routes();
        let summary: Vec<(&str, SinkKind, &str)> = routes
            .iter()
            .map(|r| (r.topic.as_str(), r.sink, r.group_id.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                ("rich-iot-data", SinkKind::MysqlMetrics, "cloud-bridge"),
                ("iot-alerts", SinkKind::Opensearch, "cloud-bridge-alerts"),
                ("iot-dlq", SinkKind::MysqlDlq, "cloud-bridge-dlq"),
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        std::fs::write(
            &path,
            "[opensearch]\nurl = \"http://os:9200\"\n\
             [[routes]]\ntopic = \"rich-iot-data\"\nsink = \"mysql_metrics\"\n\
             [[routes]]\ntopic = \"rich-iot-data\"\nsink = \"opensearch\"\nindex = \"readings\"\ndocument_id = \"device_seq\"\n",
        )
        .unwrap();
        let c = BridgeConfig::load(Some(&path), |_| None).unwrap();
        let r = &c.effective_routes()[1];
        assert_eq!(
            (r.index.as_str(), r.document_id),
            ("readings", DocumentId::DeviceSeq)
        );
        assert_eq!(r.group_id, "cloud-bridge-opensearch-readings");
        std::fs::write(&path, "[[routes]]\ntopic = \"t\"\nsink = \"opensearch\"\n").unwrap();
        let err = BridgeConfig::load(Some(&path), |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs opensearch.url"), "{err}");
        std::fs::write(&path, "[[routes]]\ntopic = \"t\"\nsink = \"kafka\"\n").unwrap();
        let err = BridgeConfig::load(Some(&path), |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `kafka`"), "{err}");
        for topic in ["t\u{e9}", "a b", "a/b", "..", &"t".repeat(250)] {
            std::fs::write(
                &path,
                format!("[[routes]]\ntopic = \"{topic}\"\nsink = \"mysql_metrics\"\n"),
            )
            .unwrap();
            let err = BridgeConfig::load(Some(&path), |_| None)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("invalid config: `routes.topic`")
                    && err.contains("a Kafka topic name: 1 to 249"),
                "{err}"
            );
        }
        let err = BridgeConfig::load(None, |k| {
            (k == "CLOUD_BRIDGE_API_LISTEN").then(|| "localhost".into())
        })
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("invalid config: `api.listen`"), "{err}");
    }

    #[test]
    fn defaults_and_env_overrides() {
        let c = BridgeConfig::load(None, |k| match k {
            "CLOUD_BRIDGE_KAFKA_BROKERS" => Some("kafka:9092".into()),
            "CLOUD_BRIDGE_MYSQL_URL" => Some("mysql://u:p@db:3306/x".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.kafka.brokers, "kafka:9092");
        assert_eq!(c.kafka.topic_data, "rich-iot-data");
        assert_eq!(c.mysql.url, "mysql://u:p@db:3306/x");
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(
            redact_url("mysql://edge:s3cret@h:1/db"),
            "mysql://edge:***@h:1/db"
        );
        assert_eq!(redact_url("mysql://h/db"), "mysql://h/db");
        let c = BridgeConfig::load(None, |k| {
            (k == "CLOUD_BRIDGE_MYSQL_URL").then(|| "mysql://a:topsecret@h/d".into())
        })
        .unwrap();
        assert!(!format!("{c:?}").contains("topsecret"));
    }

    #[test]
    fn bad_values_are_named() {
        let err = BridgeConfig::load(None, |k| {
            (k == "CLOUD_BRIDGE_MYSQL_URL").then(|| "postgres://a:pw@h/d".into())
        })
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "invalid config: `mysql.url` = \"postgres://a:***@h/d\": mysql://user:password@host:port/database"
        );
    }

    #[test]
    fn the_alerts_sink_is_off_until_given_a_url_and_checked_then() {
        let c = BridgeConfig::load(None, |_| None).unwrap();
        assert!(c.opensearch.url.is_empty());
        let c = BridgeConfig::load(None, |k| match k {
            "CLOUD_BRIDGE_OPENSEARCH_URL" => Some("https://os:9200".into()),
            "CLOUD_BRIDGE_ALERTS_INDEX" => Some("site-a.alerts".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.opensearch.index, "site-a.alerts");
        let err = |k: &'static str, v: &'static str| {
            BridgeConfig::load(None, move |key| match key {
                "CLOUD_BRIDGE_OPENSEARCH_URL" if k != key => Some("http://os:9200".into()),
                _ if key == k => Some(v.into()),
                _ => None,
            })
            .unwrap_err()
            .to_string()
        };
        assert!(
            err("CLOUD_BRIDGE_OPENSEARCH_URL", "os:9200")
                .starts_with("invalid config: `opensearch.url`")
        );
        assert!(
            err("CLOUD_BRIDGE_ALERTS_INDEX", "Alerts")
                .starts_with("invalid config: `opensearch.index` = \"Alerts\"")
        );
        assert!(
            err("CLOUD_BRIDGE_ALERTS_INDEX", "_x")
                .starts_with("invalid config: `opensearch.index`")
        );
    }

    #[test]
    fn exactly_once_settings_cannot_be_overridden() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        std::fs::write(
            &path,
            "[kafka.librdkafka_options]\n\"isolation.level\" = \"read_uncommitted\"\n",
        )
        .unwrap();
        let err = BridgeConfig::load(Some(&path), |_| None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid config: `kafka.librdkafka_options` = \"isolation.level\""),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        std::fs::write(&path, "[kafka]\nbroker = \"x\"\n").unwrap();
        let err = BridgeConfig::load(Some(&path), |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `broker`"), "{err}");
    }
}
