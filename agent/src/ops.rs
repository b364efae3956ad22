//! Operations endpoint: Prometheus `/metrics`, `/health` and `/status` on a
//! local port, plus the recent warnings and errors `edge-agent status` shows.
//!
//! The server is deliberately tiny (GET only, one request per connection,
//! request head bounded to 8 KiB and 5 s): it serves three read-only pages
//! on loopback or a management network, and pulling a full HTTP stack into
//! a Raspberry Pi binary for that is not worth its size.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{Event, Level, Subscriber, warn};
use tracing_subscriber::layer::{Context, Layer};

use crate::pipeline::now_ms;
use crate::stats::{Stats, SyncResult, UplinkState};
use crate::transforms::validate::RejectReason;

const MAX_REQUEST_HEAD: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The batch writer wakes at least once a second; older than this is stuck.
const WRITER_STALE_MS: i64 = 10_000;
const RECENT_CAPACITY: usize = 20;
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;

/// A warning or error logged recently.
#[derive(Debug, Clone, Serialize)]
pub struct RecentEvent {
    pub at_ms: i64,
    pub level: &'static str,
    pub target: String,
    pub message: String,
}

static RECENT: Mutex<VecDeque<RecentEvent>> = Mutex::new(VecDeque::new());

/// The last warnings and errors, oldest first.
pub fn recent_events() -> Vec<RecentEvent> {
    RECENT
        .lock()
        .map(|r| r.iter().cloned().collect())
        .unwrap_or_default()
}

/// A tracing layer keeping the last warnings and errors for `/status`.
pub struct RecentEventsLayer;

impl<S: Subscriber> Layer<S> for RecentEventsLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return;
        }
        let mut text = String::new();
        event.record(&mut FieldWriter(&mut text));
        let entry = RecentEvent {
            at_ms: now_ms(),
            level: if level == Level::ERROR {
                "error"
            } else {
                "warn"
            },
            target: event.metadata().target().to_string(),
            message: text.chars().take(1024).collect(),
        };
        if let Ok(mut r) = RECENT.lock() {
            if r.len() == RECENT_CAPACITY {
                r.pop_front();
            }
            r.push_back(entry);
        }
    }
}

struct FieldWriter<'a>(&'a mut String);

impl tracing::field::Visit for FieldWriter<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

/// Rates over the last ten seconds, sampled once a second.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Rates {
    pub received_per_s: f64,
    pub valid_per_s: f64,
    pub kafka_records_per_s: f64,
}

/// What the endpoint serves besides [`Stats`].
pub struct OpsState {
    pub stats: Arc<Stats>,
    pub gateway_id: String,
    pub started: Instant,
    samples: Mutex<VecDeque<(Instant, u64, u64, u64)>>,
}

impl OpsState {
    pub fn new(stats: Arc<Stats>, gateway_id: &str) -> Self {
        Self {
            stats,
            gateway_id: gateway_id.to_string(),
            started: Instant::now(),
            samples: Mutex::new(VecDeque::new()),
        }
    }

    /// Takes one sample of the counters (called once a second).
    pub fn sample(&self) {
        let s = &self.stats;
        let now = (
            Instant::now(),
            s.received.load(Relaxed),
            s.valid.load(Relaxed),
            s.kafka_records_committed.load(Relaxed),
        );
        if let Ok(mut q) = self.samples.lock() {
            if q.len() == 11 {
                q.pop_front();
            }
            q.push_back(now);
        }
    }

    pub fn rates(&self) -> Rates {
        let Ok(q) = self.samples.lock() else {
            return Rates::default();
        };
        let (Some(first), Some(last)) = (q.front(), q.back()) else {
            return Rates::default();
        };
        let secs = last.0.duration_since(first.0).as_secs_f64();
        if secs <= 0.0 {
            return Rates::default();
        }
        Rates {
            received_per_s: (last.1 - first.1) as f64 / secs,
            valid_per_s: (last.2 - first.2) as f64 / secs,
            kafka_records_per_s: (last.3 - first.3) as f64 / secs,
        }
    }

    /// Health verdict: `Err(reasons)` when the agent cannot do its job.
    pub fn health(&self) -> Result<Vec<String>, Vec<String>> {
        let s = &self.stats;
        let mut problems = Vec::new();
        let mut notes = Vec::new();
        let age = now_ms() - s.writer_heartbeat_ms.load(Relaxed);
        if s.writer_heartbeat_ms.load(Relaxed) > 0 && age > WRITER_STALE_MS {
            problems.push(format!("batch writer silent for {} s", age / 1000));
        }
        if s.outbox_full.load(Relaxed) {
            problems.push("outbox full: input is held back".to_string());
        }
        match s.uplink_state() {
            UplinkState::Fenced => {
                problems.push("fenced: another agent runs with this gateway id".to_string())
            }
            UplinkState::Down(why) => notes.push(format!(
                "uplink down ({why}); the outbox is absorbing readings"
            )),
            _ => {}
        }
        if problems.is_empty() {
            Ok(notes)
        } else {
            problems.extend(notes);
            Err(problems)
        }
    }

    /// The `/status` document.
    pub fn status(&self) -> serde_json::Value {
        let s = &self.stats;
        let plane = s.plane();
        let rejects: serde_json::Map<String, serde_json::Value> = s
            .rejects_by_reason()
            .into_iter()
            .map(|(r, n)| (r.code().to_string(), n.into()))
            .collect();
        let registry = s.registry_info();
        let (healthy, notes) = match self.health() {
            Ok(n) => (true, n),
            Err(p) => (false, p),
        };
        let written = s.bytes_written.load(Relaxed);
        let valid = s.valid.load(Relaxed);
        serde_json::json!({
            "gateway_id": self.gateway_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "healthy": healthy,
            "health_notes": notes,
            "uplink": uplink_text(&s.uplink_state()),
            "rates": self.rates(),
            "readings": {
                "received": s.received.load(Relaxed),
                "valid": valid,
                "rejected": s.rejected.load(Relaxed),
                "duplicates": s.duplicates.load(Relaxed),
                "dropped": s.dropped_records.load(Relaxed),
                "rejects_by_reason": rejects,
            },
            "alerts": s.alerts.load(Relaxed),
            "devices_known": s.devices_known.load(Relaxed),
            "outbox": {
                "backlog_batches": s.outbox_batches.load(Relaxed),
                "backlog_bytes": s.outbox_bytes.load(Relaxed),
                "full": s.outbox_full.load(Relaxed),
                "batches_written": s.batches_written.load(Relaxed),
                "bytes_written": written,
                "bytes_per_reading": if valid > 0 { written as f64 / valid as f64 } else { 0.0 },
            },
            "latency_since_start": {
                "outbox_write": latency_json(&s.outbox_commit_latency),
                "kafka_commit": latency_json(&s.kafka_commit_latency),
            },
            "kafka": {
                "committed_batch": s.kafka_committed_batch.load(Relaxed),
                "records_committed": s.kafka_records_committed.load(Relaxed),
                "transactions": s.kafka_transactions.load(Relaxed),
            },
            "registry": {
                "version": registry.as_ref().map(|r| r.version.clone()),
                "source": registry.as_ref().map(|r| r.source.clone()),
                "age_seconds": registry.as_ref().map(|r| (now_ms() - r.applied_ms).max(0) / 1000),
                "devices": registry.as_ref().map(|r| r.devices),
                "generation": plane.registry_generation.max(registry.as_ref().map_or(0, |r| r.generation)),
                "sync_age_seconds": s.registry_sync.age_seconds(now_ms()).map(|a| a as u64),
                "fences": plane.fences,
                "cache_entries": plane.cache_entries,
                "cache_hits": plane.cache_hits,
                "cache_misses": plane.cache_misses,
                "unknown_device_readings": plane.unknown_devices,
            },
            "recent_events": recent_events(),
        })
    }
}

/// A latency histogram in `/status`: how many, and the bucket bounds (ms)
/// that hold the median and the 99th percentile (`null` past the last
/// bound, or when there is none yet).
fn latency_json(h: &crate::stats::LatencyHistogram) -> serde_json::Value {
    let bound = |q| h.quantile_ms(q).filter(|ms| ms.is_finite());
    serde_json::json!({
        "count": h.count(),
        "p50_ms_at_most": bound(0.5),
        "p99_ms_at_most": bound(0.99),
    })
}

fn uplink_text(state: &UplinkState) -> String {
    match state {
        UplinkState::Starting => "starting".into(),
        UplinkState::Connecting => "connecting".into(),
        UplinkState::Up => "up".into(),
        UplinkState::Down(why) => format!("down: {why}"),
        UplinkState::Fenced => "fenced".into(),
        UplinkState::Stopped => "stopped".into(),
    }
}

/// Prometheus text exposition of the agent's counters.
pub fn metrics_text(state: &OpsState) -> String {
    let s = &state.stats;
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    let plane = s.plane();
    metric(
        "edge_readings_received_total",
        "counter",
        "Inputs handed over by the sources.",
        s.received.load(Relaxed) as f64,
    );
    metric(
        "edge_readings_valid_total",
        "counter",
        "Readings accepted into the outbox.",
        s.valid.load(Relaxed) as f64,
    );
    metric(
        "edge_readings_duplicate_total",
        "counter",
        "Readings dropped as already seen (device, seq).",
        s.duplicates.load(Relaxed) as f64,
    );
    metric(
        "edge_readings_dropped_total",
        "counter",
        "Readings deleted unsent by outbox.when_full = drop_oldest.",
        s.dropped_records.load(Relaxed) as f64,
    );
    metric(
        "edge_alerts_total",
        "counter",
        "Geofence and threshold alerts raised.",
        s.alerts.load(Relaxed) as f64,
    );
    metric(
        "edge_outbox_batches_written_total",
        "counter",
        "Outbox batches committed to SQLite.",
        s.batches_written.load(Relaxed) as f64,
    );
    metric(
        "edge_outbox_bytes_written_total",
        "counter",
        "Bytes of outbox batch bodies written.",
        s.bytes_written.load(Relaxed) as f64,
    );
    metric(
        "edge_outbox_backlog_batches",
        "gauge",
        "Batches waiting for the uplink.",
        s.outbox_batches.load(Relaxed) as f64,
    );
    metric(
        "edge_outbox_backlog_bytes",
        "gauge",
        "Bytes waiting for the uplink.",
        s.outbox_bytes.load(Relaxed) as f64,
    );
    metric(
        "edge_outbox_full",
        "gauge",
        "1 while the outbox is at its bound and input is held back.",
        u8::from(s.outbox_full.load(Relaxed)) as f64,
    );
    metric(
        "edge_kafka_committed_batch",
        "gauge",
        "Highest outbox batch committed to Kafka.",
        s.kafka_committed_batch.load(Relaxed) as f64,
    );
    metric(
        "edge_kafka_records_committed_total",
        "counter",
        "Records committed to Kafka.",
        s.kafka_records_committed.load(Relaxed) as f64,
    );
    metric(
        "edge_kafka_transactions_total",
        "counter",
        "Kafka transactions committed.",
        s.kafka_transactions.load(Relaxed) as f64,
    );
    metric(
        "edge_uplink_failures_total",
        "counter",
        "Uplink sessions that failed and were retried (a stop is none).",
        s.uplink_failures.load(Relaxed) as f64,
    );
    for (name, help, micros) in [
        (
            "edge_uplink_load_seconds_total",
            "Time the uplink spent reading batches from the outbox, rendering their records and queueing them to the Kafka producer.",
            &s.uplink_load_micros,
        ),
        (
            "edge_kafka_transaction_seconds_total",
            "Time spent committing Kafka transactions of outbox batches: the marker, the wait for deliveries and the commit.",
            &s.kafka_transaction_micros,
        ),
        (
            "edge_outbox_trim_seconds_total",
            "Time spent trimming committed batches from the outbox.",
            &s.outbox_trim_micros,
        ),
    ] {
        metric(name, "counter", help, micros.load(Relaxed) as f64 / 1e6);
    }
    metric(
        "edge_uplink_up",
        "gauge",
        "1 while the Kafka uplink is connected.",
        u8::from(s.uplink_state() == UplinkState::Up) as f64,
    );
    metric(
        "edge_devices_known",
        "gauge",
        "Devices with a high-water mark.",
        s.devices_known.load(Relaxed) as f64,
    );
    metric(
        "edge_registry_cache_hits_total",
        "counter",
        "Registry lookups served from memory.",
        plane.cache_hits as f64,
    );
    metric(
        "edge_registry_cache_misses_total",
        "counter",
        "Registry lookups that read SQLite.",
        plane.cache_misses as f64,
    );
    metric(
        "edge_registry_cache_entries",
        "gauge",
        "Registry entries held in memory.",
        plane.cache_entries as f64,
    );
    // The generation applied in SQLite (at start, or by the cloud sync) is
    // the one the next batch uses: the batch writer only reads it at the
    // start of a batch, so an idle writer would show an older one.
    let applied = s.registry_info().map_or(0, |r| r.generation);
    metric(
        "edge_registry_generation",
        "gauge",
        "Registry generation in use: the next batch uses it (0: none).",
        plane.registry_generation.max(applied) as f64,
    );
    if let Some(age) = s.registry_sync.age_seconds(now_ms()) {
        metric(
            "edge_registry_sync_age_seconds",
            "gauge",
            "Seconds since the registry was last known current (last successful cloud sync, 200 or 304; before one, since it was applied).",
            age,
        );
    }
    metric(
        "edge_registry_fences",
        "gauge",
        "Geofences in use.",
        plane.fences as f64,
    );
    metric(
        "edge_unknown_device_readings_total",
        "counter",
        "Readings from devices not in the registry.",
        plane.unknown_devices as f64,
    );
    if s.registry_sync.enabled.load(Relaxed) {
        let _ = writeln!(
            out,
            "# HELP edge_registry_sync_total Cloud syncs of the registry, by result.\n# TYPE edge_registry_sync_total counter"
        );
        for result in SyncResult::ALL {
            let _ = writeln!(
                out,
                "edge_registry_sync_total{{result=\"{}\"}} {}",
                result.as_str(),
                s.registry_sync.total(result)
            );
        }
    }
    let rejects = s.rejects_by_reason();
    let _ = writeln!(
        out,
        "# HELP edge_readings_rejected_total Inputs rejected, by reason.\n# TYPE edge_readings_rejected_total counter"
    );
    for reason in RejectReason::ALL {
        let _ = writeln!(
            out,
            "edge_readings_rejected_total{{reason=\"{}\"}} {}",
            reason.code(),
            rejects.get(&reason).copied().unwrap_or(0)
        );
    }
    for (name, help, histogram) in [
        (
            "edge_outbox_commit_seconds",
            "Time each outbox write took to become durable (encoding, the SQLite transaction and its sync); input is acknowledged after it.",
            &s.outbox_commit_latency,
        ),
        (
            "edge_kafka_commit_seconds",
            "Time each Kafka transaction of outbox batches took to commit, from its marker to the commit's answer.",
            &s.kafka_commit_latency,
        ),
    ] {
        let (buckets, sum) = histogram.snapshot();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut count = 0;
        for (bound, cumulative) in buckets {
            count = cumulative;
            let le = bound.map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
    out
}

/// Serves the endpoint until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<OpsState>) {
    // Bounded: idle connections must never use up the file descriptors the
    // outbox, MQTT and Kafka need.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "ops endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, handle(stream, &state)).await;
            drop(slot);
        });
    }
}

async fn handle(mut stream: TcpStream, state: &OpsState) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST_HEAD {
            return respond(&mut stream, 431, "text/plain", "request head too large\n").await;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(&mut stream, 405, "text/plain", "only GET is served\n").await;
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => {
            let body = metrics_text(state);
            respond(&mut stream, 200, "text/plain; version=0.0.4", &body).await
        }
        "/health" => {
            let (code, body) = match state.health() {
                Ok(notes) => (200, serde_json::json!({"healthy": true, "notes": notes})),
                Err(problems) => (
                    503,
                    serde_json::json!({"healthy": false, "notes": problems}),
                ),
            };
            respond(&mut stream, code, "application/json", &format!("{body}\n")).await
        }
        "/status" => {
            let body = format!("{:#}\n", state.status());
            respond(&mut stream, 200, "application/json", &body).await
        }
        _ => {
            respond(
                &mut stream,
                404,
                "text/plain",
                "not found: try /metrics, /health or /status\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Fetches a page of a running agent's endpoint (for `edge-agent status`):
/// `Ok(None)` when nothing listens there.
pub fn fetch(listen: &str, path: &str) -> anyhow::Result<Option<(u16, String)>> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|e| anyhow::anyhow!("http.listen {listen:?}: {e}"))?;
    let mut stream = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(None),
        Err(e) => return Err(anyhow::anyhow!("connecting to {listen}: {e}")),
    };
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {listen}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.take(16 * 1024 * 1024).read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("{listen} answered something that is not HTTP"))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{listen} answered without a status code"))?;
    Ok(Some((code, body.to_string())))
}

/// `edge-agent status` output for a running agent's `/status` document.
pub fn render_status(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let n = |p: &str| {
        v.pointer(p)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    };
    let _ = writeln!(
        out,
        "gateway {} (edge-agent {}), up {} s: {}",
        v["gateway_id"].as_str().unwrap_or("?"),
        v["version"].as_str().unwrap_or("?"),
        n("/uptime_seconds"),
        if v["healthy"].as_bool() == Some(true) {
            "healthy"
        } else {
            "UNHEALTHY"
        }
    );
    for note in v["health_notes"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  ! {}", note.as_str().unwrap_or_default());
    }
    let _ = writeln!(
        out,
        "rates (10 s): {:.0} in/s, {:.0} valid/s, {:.0} to Kafka/s",
        n("/rates/received_per_s"),
        n("/rates/valid_per_s"),
        n("/rates/kafka_records_per_s")
    );
    let _ = writeln!(
        out,
        "readings: {} received, {} valid, {} rejected, {} duplicates, {} dropped; {} alerts",
        n("/readings/received"),
        n("/readings/valid"),
        n("/readings/rejected"),
        n("/readings/duplicates"),
        n("/readings/dropped"),
        n("/alerts"),
    );
    if let Some(r) = v
        .pointer("/readings/rejects_by_reason")
        .and_then(|r| r.as_object())
        && !r.is_empty()
    {
        let list: Vec<String> = r.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "rejects: {}", list.join(" "));
    }
    let _ = writeln!(
        out,
        "outbox: {} batches / {} KiB waiting{}, {:.0} bytes written per reading",
        n("/outbox/backlog_batches"),
        (n("/outbox/backlog_bytes") / 1024.0).round(),
        if v.pointer("/outbox/full").and_then(|f| f.as_bool()) == Some(true) {
            " (FULL: input held back)"
        } else {
            ""
        },
        n("/outbox/bytes_per_reading"),
    );
    let _ = writeln!(
        out,
        "uplink: {}; marker batch {}, {} records in {} transactions",
        v["uplink"].as_str().unwrap_or("?"),
        n("/kafka/committed_batch"),
        n("/kafka/records_committed"),
        n("/kafka/transactions"),
    );
    let latency = |what: &str, key: &str| {
        let count = n(&format!("/latency_since_start/{key}/count"));
        if count == 0.0 {
            return format!("{what}: none yet");
        }
        let at = |q: &str| match v
            .pointer(&format!("/latency_since_start/{key}/{q}_ms_at_most"))
            .and_then(serde_json::Value::as_f64)
        {
            Some(ms) => format!("≤ {ms} ms"),
            None => format!(
                "over {} s",
                crate::stats::LATENCY_BUCKETS_MICROS
                    .last()
                    .copied()
                    .unwrap_or(0)
                    / 1_000_000
            ),
        };
        format!("{what} p50 {}, p99 {} (of {count})", at("p50"), at("p99"))
    };
    // An older agent's document has no latency.
    if v.get("latency_since_start").is_some() {
        let _ = writeln!(
            out,
            "latency since start: {}; {}",
            latency("outbox writes", "outbox_write"),
            latency("Kafka commits", "kafka_commit")
        );
    }
    let _ = writeln!(out, "devices known: {}", n("/devices_known"));
    match v.pointer("/registry/version").and_then(|x| x.as_str()) {
        Some(version) => {
            let _ = writeln!(
                out,
                "registry: version {version} from {}, {} devices, {} fences, age {} s; cache {} entries, {} hits / {} misses; {} readings from unknown devices",
                v.pointer("/registry/source")
                    .and_then(|x| x.as_str())
                    .unwrap_or("?"),
                n("/registry/devices"),
                n("/registry/fences"),
                n("/registry/age_seconds"),
                n("/registry/cache_entries"),
                n("/registry/cache_hits"),
                n("/registry/cache_misses"),
                n("/registry/unknown_device_readings"),
            );
        }
        None => {
            let _ = writeln!(
                out,
                "registry: none applied; {} readings from unknown devices",
                n("/registry/unknown_device_readings")
            );
        }
    }
    let events = v["recent_events"].as_array().cloned().unwrap_or_default();
    if events.is_empty() {
        let _ = writeln!(out, "recent warnings/errors: none");
    } else {
        let _ = writeln!(out, "recent warnings/errors (oldest first):");
        let now = now_ms();
        for e in events {
            let _ = writeln!(
                out,
                "  {} s ago {} {}: {}",
                (now - e["at_ms"].as_i64().unwrap_or(now)) / 1000,
                e["level"].as_str().unwrap_or("?"),
                e["target"].as_str().unwrap_or("?"),
                e["message"].as_str().unwrap_or("")
            );
        }
    }
    out
}

/// What the data folder says when the agent is not running.
pub fn offline_status(config: &crate::config::Config) -> anyhow::Result<String> {
    use rusqlite::OpenFlags;
    let path = config.database_path();
    if !path.exists() {
        return Ok(format!(
            "no database at {}: the agent has not run with this config yet\n",
            path.display()
        ));
    }
    let conn = rusqlite::Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    let mut out = String::new();
    let (batches, bytes) = crate::outbox::backlog(&conn)?;
    let _ = writeln!(
        out,
        "outbox {}: {batches} batches / {} KiB waiting for Kafka",
        path.display(),
        bytes / 1024
    );
    // One snapshot for both reads: a trim by a running agent moves marks
    // from batches to device_hwm.
    conn.execute_batch("BEGIN")?;
    let devices = crate::outbox::load_marks(&conn)?.len();
    conn.execute_batch("COMMIT")?;
    let _ = writeln!(out, "devices known: {devices}");
    match crate::registry::current(&conn) {
        Ok(Some(r)) => {
            let _ = writeln!(
                out,
                "registry: version {} from {}, {} devices, {} fences, age {} s",
                r.version,
                r.source,
                r.devices,
                r.fences,
                (now_ms() - r.applied_ms).max(0) / 1000
            );
        }
        Ok(None) => {
            let _ = writeln!(out, "registry: none applied");
        }
        // An older database without the registry tables.
        Err(_) => {
            let _ = writeln!(out, "registry: none applied");
        }
    }
    let rejects = crate::outbox::reject_counts(&conn)?;
    if !rejects.is_empty() {
        let list: Vec<String> = rejects.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "rejects (all time): {}", list.join(" "));
    }
    let mut stmt = conn
        .prepare("SELECT received_ms, reason, message FROM quarantine ORDER BY id DESC LIMIT 5")?;
    let rows: Vec<(i64, String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    if !rows.is_empty() {
        let _ = writeln!(out, "last quarantined inputs (newest first):");
        for (at, reason, message) in rows {
            let _ = writeln!(
                out,
                "  {} s ago {reason}: {message}",
                (now_ms() - at).max(0) / 1000
            );
        }
    }
    Ok(out)
}
