//! Cloud sync of the device registry: a task that pulls the registry from
//! the cloud bridge and applies it when it changed.
//!
//! Every `cloud_sync.interval_seconds` it sends
//! `GET {url}/v1/gateways/{gateway_id}/registry` with the bearer token and,
//! when it has one, the ETag of the copy in use as `If-None-Match`. A `304`
//! means the copy is current. A `200` carries a registry document in the
//! registry file's format; it is read with a size bound, parsed, validated
//! and applied in one SQLite transaction on the sync's own connection, off
//! the reactor. A bad document is refused as a whole: the last good copy
//! stays in use. The batch writer reads the registry generation at the start
//! of every batch transaction and switches to a new registry by itself.
//!
//! The ETag is stored as the registry's `content_hash` (source
//! `cloud:{url}`), so after a restart an unchanged registry is not
//! downloaded again. When the bridge is unreachable or answers an error,
//! the agent keeps the last good copy and retries with a jittered backoff;
//! `edge_registry_sync_age_seconds` says how old the copy is.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rand::Rng as _;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, ETAG, IF_NONE_MATCH, LOCATION};
use rusqlite::Connection;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::config::{Config, ConfigError, SyncMode};
use crate::outbox::{OutboxError, open_connection};
use crate::pipeline::now_ms;
use crate::registry::{self, MAX_REGISTRY_BYTES, RegistryError, RegistryInfo};
use crate::stats::{Stats, SyncResult};

/// First retry delay after a failure; it doubles up to the interval.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Most of an error body read for its message.
const MAX_ERROR_BODY: usize = 4096;
/// Longest ETag kept (they are stored and sent back).
const MAX_ETAG: usize = 256;
/// The copy in use is stale once no sync succeeded for this many intervals.
const STALE_INTERVALS: u32 = 3;
/// Prefix of the `content_hash` stored when the bridge sent no ETag: a
/// hash of the body, never sent as `If-None-Match`.
const BODY_HASH_PREFIX: &str = "fnv:";

/// Why the cloud sync cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncSetupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot set up the HTTP client for cloud_sync.url {url}: {reason}")]
    Client { url: String, reason: String },
}

/// Why one sync attempt did not bring a current registry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// No answer (DNS, connect, TLS, timeout) or the connection broke.
    #[error("{0}")]
    Request(String),
    /// The bridge answered with an error status.
    #[error("HTTP {status}: {message}")]
    Status { status: u16, message: String },
    #[error("the registry response is larger than the {limit}-byte limit{}",
        .declared.map(|n| format!(" (Content-Length {n})")).unwrap_or_default())]
    TooLarge { declared: Option<u64>, limit: u64 },
    #[error("the registry response is not UTF-8: {0}")]
    NotUtf8(#[from] std::str::Utf8Error),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("opening the database for the cloud sync: {0}")]
    Database(#[from] OutboxError),
    #[error("the registry apply task failed: {0}")]
    Task(String),
}

impl SyncError {
    /// True when the document itself was refused (as opposed to the bridge
    /// or the database failing): the same document would be refused again.
    pub fn is_rejection(&self) -> bool {
        match self {
            SyncError::TooLarge { .. } | SyncError::NotUtf8(_) => true,
            SyncError::Registry(e) => !matches!(e, RegistryError::Sqlite(_)),
            _ => false,
        }
    }
}

/// What one sync attempt ended with.
#[derive(Debug)]
pub enum SyncOutcome {
    /// A new registry was applied.
    Updated(RegistryInfo),
    /// The copy in use is current (304, or 200 with its ETag).
    Unchanged,
    /// The document was refused as a whole; the last good copy stays.
    Rejected(SyncError),
    /// The bridge or the database failed; the last good copy stays.
    Failed(SyncError),
}

impl SyncOutcome {
    pub fn result(&self) -> SyncResult {
        match self {
            SyncOutcome::Updated(_) => SyncResult::Updated,
            SyncOutcome::Unchanged => SyncResult::Unchanged,
            SyncOutcome::Rejected(_) => SyncResult::Rejected,
            SyncOutcome::Failed(_) => SyncResult::Failed,
        }
    }

    fn from_error(e: SyncError) -> Self {
        if e.is_rejection() {
            SyncOutcome::Rejected(e)
        } else {
            SyncOutcome::Failed(e)
        }
    }
}

/// What the bridge sent.
enum Fetched {
    NotModified,
    /// A document and its key: the ETag, or a hash of the body without one.
    Document {
        key: String,
        body: Vec<u8>,
    },
}

/// The registry sync task. Build it with [`CloudSync::from_config`] at
/// start (so a bad token or CA file stops the agent with a clear error),
/// then run [`CloudSync::run`] on the runtime.
pub struct CloudSync {
    client: reqwest::Client,
    /// The registry endpoint.
    url: String,
    /// `cloud:{base url}`: the registry's stored source.
    source: String,
    /// Never logged; `Debug` is not derived for this reason.
    token: String,
    gateway_id: String,
    db: PathBuf,
    synchronous: SyncMode,
    stats: Arc<Stats>,
    pub(crate) interval: Duration,
    pub(crate) first_backoff: Duration,
    pub(crate) max_body_bytes: u64,
    /// Key (ETag) of the registry in use when it came from this source;
    /// `None` before the stored state was read.
    key: Option<String>,
    loaded: bool,
    /// Where a registry update claims its turn at the write lock (see
    /// [`WriteTurn`](crate::signal::WriteTurn)); `None` on its own (tests,
    /// tools).
    signals: Option<Arc<crate::signal::OutboxSignals>>,
    /// The sync's own connection, opened on first use. Only used through
    /// `&mut self`; the mutex makes `CloudSync` `Sync`, so `&self` may be
    /// held across awaits in a spawned task (a `Connection` is not `Sync`).
    conn: std::sync::Mutex<Option<Connection>>,
}

impl CloudSync {
    /// The sync task of `config.cloud_sync`, or `None` when it is off.
    /// Reads the token file and the CA file; opens nothing else.
    ///
    /// # Errors
    /// A token or CA file that cannot be used (naming the key and the
    /// path), or an HTTP client that cannot be built.
    pub fn from_config(config: &Config, stats: Arc<Stats>) -> Result<Option<Self>, SyncSetupError> {
        let Some(c) = &config.cloud_sync else {
            return Ok(None);
        };
        let token = c.read_token()?;
        let timeout = Duration::from_secs(c.timeout_seconds);
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            // The token goes with the request: never follow it elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .gzip(true)
            .user_agent(concat!("edge-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &c.ca_file {
            let bad = |allowed: String| ConfigError::Invalid {
                key: "cloud_sync.ca_file",
                value: format!("{:?}", ca.display().to_string()),
                allowed,
            };
            let pem = std::fs::read(ca)
                .map_err(|e| bad(format!("a readable PEM file of CA certificates ({e})")))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| bad(format!("a PEM file of CA certificates ({})", chain(&e))))?;
            if certs.is_empty() {
                return Err(bad(
                    "a PEM file of CA certificates; it holds no CERTIFICATE block".into(),
                )
                .into());
            }
            builder = builder.tls_certs_merge(certs);
        }
        let base = c.base_url();
        let client = builder.build().map_err(|e| SyncSetupError::Client {
            url: base.to_string(),
            reason: chain(&e),
        })?;
        Ok(Some(Self {
            client,
            url: format!("{base}/v1/gateways/{}/registry", config.gateway_id),
            source: format!("cloud:{base}"),
            token,
            gateway_id: config.gateway_id.clone(),
            db: config.database_path(),
            synchronous: config.outbox.synchronous,
            signals: None,
            stats,
            interval: Duration::from_secs(c.interval_seconds),
            first_backoff: FIRST_BACKOFF,
            max_body_bytes: MAX_REGISTRY_BYTES,
            key: None,
            loaded: false,
            conn: std::sync::Mutex::new(None),
        }))
    }

    /// The registry endpoint polled.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Syncs until `stop` turns true (or its sender is dropped): at once,
    /// then every interval after a success, sooner with a jittered backoff
    /// after a failure. A request in flight is abandoned at stop; an apply
    /// in progress completes (it is one transaction either way).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        self.stats.registry_sync.enabled.store(true, Relaxed);
        self.stats.registry_sync.fresh_ms.store(now_ms(), Relaxed);
        info!(
            url = %self.url,
            interval_seconds = self.interval.as_secs(),
            "cloud sync of the registry started"
        );
        let mut backoff = self.first_backoff;
        let mut stale = false;
        loop {
            if *stop.borrow() {
                break;
            }
            let outcome = tokio::select! {
                outcome = self.attempt() => outcome,
                _ = stop.changed() => break,
            };
            let delay = match outcome.result() {
                SyncResult::Updated | SyncResult::Unchanged => {
                    backoff = self.first_backoff;
                    jitter(self.interval)
                }
                // The bridge would send the same document again: no point
                // in asking sooner than usual.
                SyncResult::Rejected => jitter(self.interval),
                SyncResult::Failed => {
                    let delay = jitter(backoff);
                    backoff = (backoff * 2).min(self.interval);
                    delay
                }
            };
            self.record(&outcome, Some(delay));
            self.check_age(&mut stale);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => break,
            }
        }
        info!(url = %self.url, "cloud sync of the registry stopped");
    }

    /// One attempt, counted in the stats and logged.
    pub async fn sync_once(&mut self) -> SyncOutcome {
        let outcome = self.attempt().await;
        self.record(&outcome, None);
        outcome
    }

    /// Fetches the registry and applies it when it changed.
    async fn attempt(&mut self) -> SyncOutcome {
        if !self.loaded
            && let Err(e) = self.load_state().await
        {
            return SyncOutcome::Failed(e);
        }
        let (key, body) = match self.fetch().await {
            Ok(Fetched::NotModified) => return SyncOutcome::Unchanged,
            Ok(Fetched::Document { key, body }) => (key, body),
            Err(e) => return SyncOutcome::from_error(e),
        };
        if self.key.as_deref() == Some(key.as_str()) {
            // The bridge ignored If-None-Match (or sent no ETag and the
            // body is the one in use): nothing to apply.
            return SyncOutcome::Unchanged;
        }
        match self.apply(body, key.clone()).await {
            Ok(info) => {
                self.key = Some(key);
                SyncOutcome::Updated(info)
            }
            Err(e) => SyncOutcome::from_error(e),
        }
    }

    /// Reads the registry in use: its ETag (when it came from this source)
    /// and when it was applied (the age before the first success).
    async fn load_state(&mut self) -> Result<(), SyncError> {
        let info = self
            .blocking(|conn| Ok(registry::current(conn).map_err(RegistryError::from)?))
            .await?;
        // The age before the first success: since the copy was applied.
        if let Some(info) = &info {
            self.stats
                .registry_sync
                .fresh_ms
                .store(info.applied_ms, Relaxed);
            self.stats.set_registry_info(Some(info.clone()));
        }
        self.key = info
            .filter(|i| i.source == self.source)
            .map(|i| i.content_hash);
        self.loaded = true;
        Ok(())
    }

    /// Runs `work` on the sync's connection in a blocking thread.
    async fn blocking<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut Connection) -> Result<T, SyncError> + Send + 'static,
    ) -> Result<T, SyncError> {
        let mut conn = self.conn_slot().take();
        let (db, synchronous) = (self.db.clone(), self.synchronous);
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = (|| {
                if conn.is_none() {
                    let c = open_connection(&db, synchronous)?;
                    // The outbox creates the tables at start; this keeps
                    // the sync usable on its own (tests, tools).
                    c.execute_batch(registry::SCHEMA)
                        .map_err(RegistryError::from)?;
                    conn = Some(c);
                }
                match conn.as_mut() {
                    Some(c) => work(c),
                    None => Err(SyncError::Task("no database connection".into())),
                }
            })();
            (conn, result)
        })
        .await
        .map_err(|e| SyncError::Task(e.to_string()))?;
        *self.conn_slot() = conn;
        result
    }

    fn conn_slot(&mut self) -> &mut Option<Connection> {
        self.conn
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn fetch(&self) -> Result<Fetched, SyncError> {
        let mut request = self
            .client
            .get(&self.url)
            .header(AUTHORIZATION, format!("Bearer {}", self.token));
        if let Some(key) = self
            .key
            .as_deref()
            .filter(|k| !k.starts_with(BODY_HASH_PREFIX))
        {
            request = request.header(IF_NONE_MATCH, key);
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| SyncError::Request(chain(&e)))?;
        let status = response.status();
        if status == StatusCode::NOT_MODIFIED {
            return Ok(Fetched::NotModified);
        }
        if status != StatusCode::OK {
            return Err(self.status_error(response).await);
        }
        let etag = response
            .headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= MAX_ETAG)
            .map(str::to_string);
        let limit = self.max_body_bytes;
        let declared = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if let Some(n) = declared.filter(|&n| n > limit) {
            return Err(SyncError::TooLarge {
                declared: Some(n),
                limit,
            });
        }
        // Chunks come decompressed: the bound applies to what is parsed.
        let mut body = Vec::with_capacity(declared.unwrap_or(0).min(limit) as usize);
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| SyncError::Request(chain(&e)))?
        {
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(SyncError::TooLarge {
                    declared: None,
                    limit,
                });
            }
            body.extend_from_slice(&chunk);
        }
        let key = match etag {
            Some(etag) => etag,
            None => {
                warn!(url = %self.url, "the bridge sent the registry without an ETag; every sync downloads it again");
                format!("{BODY_HASH_PREFIX}{}", registry::content_hash(&body))
            }
        };
        Ok(Fetched::Document { key, body })
    }

    /// The error of a non-200, non-304 answer, with the bridge's message.
    async fn status_error(&self, mut response: reqwest::Response) -> SyncError {
        let status = response.status();
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        while body.len() < MAX_ERROR_BODY {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        body.truncate(MAX_ERROR_BODY);
        let text = String::from_utf8_lossy(&body);
        let said = match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => {
                let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
                match (field("error"), field("message")) {
                    (Some(e), Some(m)) => format!("{m} ({e})"),
                    (None, Some(m)) => m,
                    (Some(e), None) => e,
                    (None, None) => printable(&text),
                }
            }
            Err(_) => printable(&text),
        };
        let hint = match status.as_u16() {
            401 => "the bridge refused the token: check cloud_sync.token_file".to_string(),
            403 => format!(
                "the token is not for gateway {}: check gateway_id and cloud_sync.token_file",
                self.gateway_id
            ),
            404 => format!(
                "the bridge does not know gateway {}: register it on the bridge, or check gateway_id and cloud_sync.url",
                self.gateway_id
            ),
            300..=399 => format!(
                "redirects are not followed (the token would go along): set cloud_sync.url to the final address{}",
                location.map(|l| format!(" ({l})")).unwrap_or_default()
            ),
            _ => "the bridge answered an error".to_string(),
        };
        let message = match said.is_empty() {
            true => hint,
            false => format!("{said}; {hint}"),
        };
        SyncError::Status {
            status: status.as_u16(),
            message,
        }
    }

    /// Registry updates take their turn at the write lock with the
    /// agent's batch writer through `signals`.
    pub fn with_signals(mut self, signals: Arc<crate::signal::OutboxSignals>) -> Self {
        self.signals = Some(signals);
        self
    }

    /// Parses and applies a document off the reactor, in one transaction.
    async fn apply(&mut self, body: Vec<u8>, key: String) -> Result<RegistryInfo, SyncError> {
        let source = self.source.clone();
        let signals = self.signals.clone();
        self.blocking(move |conn| {
            let parsed = registry::parse_registry(std::str::from_utf8(&body)?);
            drop(body);
            let registry = parsed?;
            let claim = signals.as_ref().map(|s| s.write_turn.claim());
            registry::apply(conn, &registry, &source, &key, now_ms())?;
            drop(claim);
            drop(registry);
            registry::release_freed_memory();
            registry::current(conn)
                .map_err(RegistryError::from)?
                .ok_or_else(|| {
                    SyncError::Task("the applied registry is not in the database".into())
                })
        })
        .await
    }

    /// Counts and logs an outcome; `retry_in` is the wait before the next
    /// attempt, when known.
    fn record(&self, outcome: &SyncOutcome, retry_in: Option<Duration>) {
        let s = &self.stats;
        s.registry_sync.count(outcome.result());
        let retry_seconds = retry_in.map(|d| d.as_secs_f64().round() as u64);
        match outcome {
            SyncOutcome::Updated(info) => {
                s.registry_sync.fresh_ms.store(now_ms(), Relaxed);
                s.set_registry_info(Some(info.clone()));
                info!(
                    url = %self.url,
                    version = %info.version,
                    devices = info.devices,
                    fences = info.fences,
                    generation = info.generation,
                    etag = %info.content_hash,
                    "registry from the cloud applied; batches use it from the next one"
                );
            }
            SyncOutcome::Unchanged => {
                s.registry_sync.fresh_ms.store(now_ms(), Relaxed);
                debug!(url = %self.url, "registry unchanged on the cloud bridge");
            }
            SyncOutcome::Rejected(e) => {
                let current = s.registry_info();
                error!(
                    url = %self.url,
                    error = %e,
                    keeping_version = current.as_ref().map(|r| r.version.as_str()).unwrap_or("none"),
                    retry_seconds,
                    "registry from the cloud refused as a whole; keeping the last good registry. Fix it on the bridge"
                );
            }
            SyncOutcome::Failed(e) => {
                let current = s.registry_info();
                let keeping = current
                    .as_ref()
                    .map(|r| r.version.as_str())
                    .unwrap_or("none");
                match e {
                    SyncError::Status { status, .. } if (300..500).contains(status) => error!(
                        url = %self.url,
                        error = %e,
                        keeping_version = keeping,
                        retry_seconds,
                        "registry sync refused by the cloud bridge; keeping the last good registry"
                    ),
                    _ => warn!(
                        url = %self.url,
                        error = %e,
                        keeping_version = keeping,
                        retry_seconds,
                        "registry sync failed; keeping the last good registry"
                    ),
                }
            }
        }
    }

    /// Warns once when the copy in use turns stale, and says when it is
    /// current again.
    fn check_age(&self, stale: &mut bool) {
        let limit = self.interval * STALE_INTERVALS;
        let Some(age) = self.stats.registry_sync.age_seconds(now_ms()) else {
            return;
        };
        let now_stale = age > limit.as_secs_f64();
        if now_stale && !*stale {
            let current = self.stats.registry_info();
            warn!(
                url = %self.url,
                age_seconds = age.round() as u64,
                limit_seconds = limit.as_secs(),
                version = current.as_ref().map(|r| r.version.as_str()).unwrap_or("none"),
                "the registry is stale: no successful cloud sync for more than {STALE_INTERVALS} intervals; \
                 the agent keeps using the last good copy"
            );
        } else if !now_stale && *stale {
            info!(url = %self.url, "registry synced again: no longer stale");
        }
        *stale = now_stale;
    }
}

/// `d` ±20 %, so a fleet of gateways does not call in at the same second.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.8..=1.2))
}

/// An error and its causes on one line (reqwest's Display alone hides the
/// cause, e.g. "connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cause = c.source();
    }
    text
}

/// An error body fit for one log line.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect::<String>()
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests;
