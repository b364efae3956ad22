//! The sink benchmark behind `edge-bench sinks`: how fast the real
//! `cloud-bridge` drains a backlog into MariaDB (exactly-once: rows and
//! offsets in one transaction) and into OpenSearch (alerts, `_bulk`).
//!
//! It pre-fills a data topic and an alerts topic of its own with records in
//! the agent's exact JSON (built with the agent's own encoders), produced in
//! Kafka transactions as the agent produces them, so the bridge reads them
//! with `read_committed` past transaction markers as in production. Then it
//! starts the release bridge as a process, once per sink, and measures the
//! drain:
//!
//! - MariaDB: `SELECT COUNT(*)` once a second for progress; the rate is
//!   taken from `stored_at` (first to last stored row).
//! - OpenSearch: the index's `indexing.index_total` (no forced refresh, which
//!   would slow indexing down) five times a second; the rate is from the
//!   first indexed alert to the last. At the end a refreshed `_count` must
//!   equal the alerts produced.
//!
//! Each run uses a unique topic pair, consumer group, sink name, MariaDB
//! database and OpenSearch index, all removed afterwards.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use edge_agent::registry::DeviceMeta;
use edge_agent::transforms::enrich::Alert;
use edge_agent::transforms::validate::{Reading, enrichment_fragment, write_reading_json};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::{Value, json};

use crate::bench::{Proc, clock_ticks, log_file, proc_usage};
use crate::{TestDatabase, create_topics, delete_topics, kafka_brokers, now_ms, unique};

/// Bridge settings a run overrides; `None` keeps the bridge's default.
#[derive(Debug, Clone, Default)]
pub struct SinkTuning {
    pub mysql_batch_max_records: Option<usize>,
    pub mysql_batch_linger_ms: Option<u64>,
    pub mysql_rows_per_insert: Option<usize>,
    pub opensearch_bulk_max_docs: Option<usize>,
    pub opensearch_batch_linger_ms: Option<u64>,
    /// Extra `[kafka.librdkafka_options]` of the bridge's consumers.
    pub librdkafka_options: Vec<(String, String)>,
}

impl SinkTuning {
    /// The `[mysql]` and `[opensearch]` lines of the bridge's TOML.
    fn toml(&self) -> (String, String) {
        let mut mysql = String::new();
        let mut os = String::new();
        let line = |out: &mut String, key: &str, v: Option<String>| {
            if let Some(v) = v {
                out.push_str(&format!("{key} = {v}\n"));
            }
        };
        let s = |v: Option<usize>| v.map(|v| v.to_string());
        let u = |v: Option<u64>| v.map(|v| v.to_string());
        line(
            &mut mysql,
            "batch_max_records",
            s(self.mysql_batch_max_records),
        );
        line(&mut mysql, "batch_linger_ms", u(self.mysql_batch_linger_ms));
        line(&mut mysql, "rows_per_insert", s(self.mysql_rows_per_insert));
        line(&mut os, "bulk_max_docs", s(self.opensearch_bulk_max_docs));
        line(
            &mut os,
            "batch_linger_ms",
            u(self.opensearch_batch_linger_ms),
        );
        (mysql, os)
    }

    fn json(&self) -> Value {
        json!({
            "mysql.batch_max_records": self.mysql_batch_max_records,
            "mysql.batch_linger_ms": self.mysql_batch_linger_ms,
            "mysql.rows_per_insert": self.mysql_rows_per_insert,
            "opensearch.bulk_max_docs": self.opensearch_bulk_max_docs,
            "opensearch.batch_linger_ms": self.opensearch_batch_linger_ms,
            "kafka.librdkafka_options": self.librdkafka_options.iter().cloned().collect::<BTreeMap<_, _>>(),
        })
    }
}

/// One sink benchmark.
#[derive(Debug, Clone)]
pub struct SinkBenchSpec {
    pub name: String,
    /// Enriched readings for the MariaDB sink; 0 skips it.
    pub metrics: u64,
    /// Alerts for the OpenSearch sink; 0 skips it.
    pub alerts: u64,
    /// Devices the records are spread over.
    pub devices: usize,
    /// Partitions of each topic.
    pub partitions: i32,
    /// Records per Kafka transaction when pre-filling.
    pub per_transaction: usize,
    pub tuning: SinkTuning,
    /// Give up when nothing new is stored for this long.
    pub stall_timeout: Duration,
    /// How often to `SELECT COUNT(*)` the MariaDB table while it fills.
    pub count_every: Duration,
    /// Before each drain, wait up to this long for the machine to be quiet
    /// (under half a core busy): other work on a shared machine skews the
    /// figures. Zero: start at once.
    pub quiet_wait: Duration,
    pub bridge_bin: PathBuf,
    pub out_dir: PathBuf,
}

/// One second of a drain.
#[derive(Debug, Clone, Copy, Default)]
pub struct DrainSample {
    /// Seconds since the bridge started.
    pub t: f64,
    /// Stored as last counted (MariaDB: see `count_every`; between counts,
    /// the offsets the sink committed, at most the records sent).
    pub stored: u64,
    /// Stored per second (MariaDB: Kafka offsets the sink committed per
    /// second, which also count the transaction markers).
    pub per_s: f64,
}

/// How one sink drained its backlog.
#[derive(Debug, Clone, Default)]
pub struct DrainResult {
    /// `mysql` or `opensearch`.
    pub sink: String,
    pub records: u64,
    pub stored: u64,
    /// From the first stored record to the last.
    pub per_s: f64,
    pub drain_seconds: f64,
    /// From the bridge's start to the last record stored.
    pub wall_seconds: f64,
    /// From the bridge's start to the first record stored (connect,
    /// migrations, group join).
    pub first_after_seconds: f64,
    /// Mean CPU (% of one core) while draining, per process.
    pub cpu_percent: BTreeMap<String, f64>,
    pub bridge_rss_max_mb: f64,
    /// Server counters over the drain (MariaDB `SHOW GLOBAL STATUS`
    /// deltas: whole server, so other clients count too).
    pub server_counters: BTreeMap<String, f64>,
    /// Mean time of the progress `SELECT COUNT(*)` (MariaDB).
    pub poll_query_ms_mean: f64,
    /// Stored per second of wall time, from the sink's own timestamps
    /// where it has them (MariaDB `stored_at`), else from the polls.
    pub per_second: Vec<(i64, u64)>,
    pub samples: Vec<DrainSample>,
}

impl DrainResult {
    fn json(&self) -> Value {
        json!({
            "sink": self.sink, "records": self.records, "stored": self.stored,
            "per_s": self.per_s.round(), "drain_seconds": round3(self.drain_seconds),
            "wall_seconds": round3(self.wall_seconds),
            "first_after_seconds": round3(self.first_after_seconds),
            "cpu_mean_percent": self.cpu_percent.iter().map(|(k, v)| (k.clone(), json!(v.round()))).collect::<serde_json::Map<_, _>>(),
            "bridge_rss_max_mb": (self.bridge_rss_max_mb * 10.0).round() / 10.0,
            "server_counters": self.server_counters,
            "poll_query_ms_mean": (self.poll_query_ms_mean * 10.0).round() / 10.0,
            "stored_per_second": self.per_second.iter().map(|(s, n)| json!([s, n])).collect::<Vec<_>>(),
            "samples": self.samples.iter().map(|s| json!({"t": round3(s.t), "stored": s.stored, "per_s": s.per_s.round()})).collect::<Vec<_>>(),
        })
    }
}

/// What a sink benchmark measured.
#[derive(Debug, Clone, Default)]
pub struct SinkBenchResult {
    pub name: String,
    pub metrics_produce_per_s: f64,
    pub alerts_produce_per_s: f64,
    pub metric_bytes_mean: f64,
    pub alert_bytes_mean: f64,
    pub mysql: Option<DrainResult>,
    pub opensearch: Option<DrainResult>,
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

impl SinkBenchResult {
    pub fn json(&self, spec: &SinkBenchSpec) -> Value {
        json!({
            "name": self.name,
            "bridge_bin": spec.bridge_bin.display().to_string(),
            "machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "cpu": cpu_model()},
            "metrics": spec.metrics, "alerts": spec.alerts, "devices": spec.devices,
            "partitions": spec.partitions, "per_transaction": spec.per_transaction,
            "tuning": spec.tuning.json(),
            "count_every_seconds": spec.count_every.as_secs_f64(),
            "metrics_produce_per_s": self.metrics_produce_per_s.round(),
            "alerts_produce_per_s": self.alerts_produce_per_s.round(),
            "metric_bytes_mean": self.metric_bytes_mean.round(),
            "alert_bytes_mean": self.alert_bytes_mean.round(),
            "mysql": self.mysql.as_ref().map(DrainResult::json),
            "opensearch": self.opensearch.as_ref().map(DrainResult::json),
        })
    }

    /// A few lines for a person.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: pre-filled at {:.0} readings/s ({:.0} bytes each), {:.0} alerts/s ({:.0} bytes each)\n",
            self.name,
            self.metrics_produce_per_s,
            self.metric_bytes_mean,
            self.alerts_produce_per_s,
            self.alert_bytes_mean
        );
        for (what, unit, d) in [
            ("MariaDB (exactly-once)", "rows", &self.mysql),
            ("OpenSearch alerts", "docs", &self.opensearch),
        ] {
            if let Some(d) = d {
                let cpu: Vec<String> = d
                    .cpu_percent
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.0}%"))
                    .collect();
                s += &format!(
                    "  {what}: {:.0} {unit}/s ({} {unit} in {:.2} s, first after {:.2} s, all after {:.2} s); CPU {}; bridge RSS max {:.1} MB\n",
                    d.per_s,
                    d.stored,
                    d.drain_seconds,
                    d.first_after_seconds,
                    d.wall_seconds,
                    cpu.join(", "),
                    d.bridge_rss_max_mb
                );
            }
        }
        s
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Device `d`'s registry entry: the enrichment the agent adds.
fn device_meta(d: usize) -> DeviceMeta {
    let tracker = d.is_multiple_of(3);
    let mut tags = BTreeMap::new();
    if d.is_multiple_of(2) {
        tags.insert("fleet".to_string(), format!("f{}", d % 10));
    }
    DeviceMeta {
        device_id: device_id(d),
        device_type: Some(if tracker { "tracker" } else { "sensor" }.into()),
        name: Some(format!(
            "{} {d:05}",
            if tracker { "Truck" } else { "Sensor" }
        )),
        site: Some(
            if d.is_multiple_of(2) {
                "yard-north"
            } else {
                "yard-south"
            }
            .into(),
        ),
        tags,
        ranges: Default::default(),
        thresholds: Default::default(),
        threshold_readings: None,
    }
}

fn device_id(d: usize) -> String {
    format!("bench-{d:05}")
}

fn gateway_id(d: usize) -> String {
    format!("gw-sinkbench-{}", d % 4)
}

/// The `k`-th reading of the backlog: device `k % devices`, its
/// `k / devices + 1`-th reading; one device in five is a serial device
/// whose key folds in a boot epoch, one in four sends extra attributes.
fn reading(k: u64, devices: usize, base_ts: i64) -> Reading {
    let d = (k % devices as u64) as usize;
    let n = k / devices as u64 + 1;
    let (epoch, seq) = if d % 5 == 4 {
        (Some(3), (3 << 32) | n)
    } else {
        (None, n)
    };
    let angle = d as f64 * 0.618 + n as f64 * 0.01;
    let mut attributes = serde_json::Map::new();
    if d.is_multiple_of(4) {
        attributes.insert("rssi".into(), json!(-50 - (d % 40) as i64));
        attributes.insert("fw".into(), json!("2.3.1"));
    }
    Reading {
        device_id: device_id(d),
        seq,
        device_seq: n,
        epoch,
        ts: base_ts + n as i64 * 1000 + (d % 1000) as i64,
        temperature: 18.0 + ((k * 7919) % 1000) as f64 / 100.0,
        humidity: 35.0 + ((k * 104_729) % 3000) as f64 / 100.0,
        battery: 100.0 - (n % 500) as f64 * 0.17,
        lat: 52.52 + 0.02 * angle.sin(),
        lon: 13.40 + 0.03 * angle.cos(),
        speed: (k % 50) as f64 * 0.3,
        attributes,
        decimals: Default::default(),
    }
}

/// An alert as the agent sends it to `iot-alerts` (the agent's private
/// `AlertRecord`: the alert plus the gateway and when it was raised).
#[derive(serde::Serialize)]
struct AlertRecord<'a> {
    #[serde(flatten)]
    alert: &'a Alert,
    gateway_id: &'a str,
    raised_at: i64,
}

/// The `k`-th alert: two in three are geofence events, one in three a
/// temperature threshold.
fn alert(k: u64, devices: usize, base_ts: i64) -> Alert {
    let r = reading(k, devices, base_ts);
    if k % 3 == 2 {
        Alert {
            alert_id: format!("{}:{}:threshold:temperature", r.device_id, r.seq),
            kind: "threshold",
            event: "threshold",
            device_id: r.device_id,
            seq: r.seq,
            ts: r.ts,
            lat: r.lat,
            lon: r.lon,
            fence_id: None,
            field: Some("temperature"),
            value: Some(30.5 + (k % 10) as f64),
            threshold: Some([-20.0, 30.0]),
            consecutive: Some(3),
        }
    } else {
        let event = ["enter", "exit", "dwell", "absent"][(k / 3 % 4) as usize];
        let fence = format!("fence-{:03}", k % 200);
        Alert {
            alert_id: format!("{}:{}:{fence}:{event}", r.device_id, r.seq),
            kind: "geofence",
            event,
            device_id: r.device_id,
            seq: r.seq,
            ts: r.ts,
            lat: r.lat,
            lon: r.lon,
            fence_id: Some(fence),
            field: None,
            value: None,
            threshold: None,
            consecutive: None,
        }
    }
}

/// Produces `count` records to `topic` in Kafka transactions of
/// `per_transaction`, with the agent's producer settings; `make(k, out)`
/// writes record `k` and returns its key. Returns records per second and
/// the mean record size.
fn produce(
    topic: &str,
    count: u64,
    per_transaction: usize,
    label: &str,
    mut make: impl FnMut(u64, &mut Vec<u8>) -> String,
) -> anyhow::Result<(f64, f64)> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("transactional.id", unique("sinkbench-tx"))
        .set("enable.idempotence", "true")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "262144")
        .set("retry.backoff.ms", "5")
        .set("retry.backoff.max.ms", "1000")
        .create()
        .context("creating the pre-filling producer")?;
    producer
        .init_transactions(Duration::from_secs(30))
        .context("initialising Kafka transactions")?;
    let started = Instant::now();
    let mut last_print = Instant::now();
    let mut value = Vec::with_capacity(1024);
    let mut bytes = 0u64;
    let mut k = 0u64;
    while k < count {
        producer.begin_transaction()?;
        let end = (k + per_transaction as u64).min(count);
        while k < end {
            value.clear();
            let key = make(k, &mut value);
            bytes += value.len() as u64;
            let record = BaseRecord::to(topic)
                .key(key.as_bytes())
                .payload(value.as_slice());
            edge_agent::sinks::kafka::send(&producer, record).context("producing a record")?;
            k += 1;
        }
        edge_agent::sinks::kafka::flush_deliveries(&producer, Duration::from_secs(60));
        producer
            .commit_transaction(Duration::from_secs(60))
            .context("committing a pre-filling transaction")?;
        if last_print.elapsed() >= Duration::from_secs(1) || k == count {
            last_print = Instant::now();
            eprint!(
                "\r[pre-fill {label}] {k:>9}/{count} ({:>3.0}%) {:>8.0}/s   ",
                k as f64 * 100.0 / count as f64,
                k as f64 / started.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        }
    }
    eprintln!();
    let rate = count as f64 / started.elapsed().as_secs_f64();
    Ok((rate, bytes as f64 / count.max(1) as f64))
}

/// Checks that the broker holds the `count` records just committed: the
/// end offsets of the topic's partitions, summed, reach at least `count`
/// (they also count one transaction marker per transaction and partition).
fn wait_until_visible(topic: &str, partitions: i32, count: u64) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique("sinkbench-check"))
        .set("isolation.level", "read_committed")
        .create()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut end = 0i64;
        for p in 0..partitions {
            let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
            end += high;
        }
        if end as u64 >= count {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{topic} holds {end} offsets, fewer than the {count} records produced"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Pids of the test services (`tests/services/up` pid files), for CPU.
fn service_pids() -> Vec<(String, u32)> {
    let home = std::env::var("EDGE_SERVICES_HOME").map_or_else(
        |_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/edge-gateway/services")
        },
        PathBuf::from,
    );
    [
        ("mariadb", "mariadbd.pid"),
        ("kafka", "kafka.pid"),
        ("opensearch", "opensearch.pid"),
    ]
    .iter()
    .filter_map(|(name, file)| {
        let pid = std::fs::read_to_string(home.join("run").join(file))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some((name.to_string(), pid))
    })
    .collect()
}

/// The machine's CPU time from `/proc/stat`: (busy, iowait) in ticks,
/// summed over all cores.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
    Some((busy, *v.get(4)?))
}

/// CPU time of several processes and of the whole machine, sampled at the
/// start and the end of a window.
struct CpuMeter {
    pids: Vec<(String, u32)>,
    start: Vec<Option<u64>>,
    machine: Option<(u64, u64)>,
    at: Instant,
}

impl CpuMeter {
    fn start(pids: Vec<(String, u32)>) -> Self {
        let start = pids
            .iter()
            .map(|(_, p)| proc_usage(*p).map(|u| u.0))
            .collect();
        Self {
            pids,
            start,
            machine: machine_ticks(),
            at: Instant::now(),
        }
    }

    /// Mean CPU per process in % of one core; `machine_busy` and
    /// `machine_iowait` are all cores together, and `others` is the busy
    /// time of everything not listed (builds, other tests...).
    fn percent(&self) -> BTreeMap<String, f64> {
        let dt = self.at.elapsed().as_secs_f64().max(1e-3);
        let ticks = clock_ticks();
        let pct = |t: u64| t as f64 / ticks / dt * 100.0;
        let mut out: BTreeMap<String, f64> = self
            .pids
            .iter()
            .zip(&self.start)
            .filter_map(|((name, pid), start)| {
                Some((name.clone(), pct(proc_usage(*pid)?.0 - (*start)?)))
            })
            .collect();
        if let (Some((busy0, wait0)), Some((busy1, wait1))) = (self.machine, machine_ticks()) {
            let listed: f64 = out.values().sum();
            let busy = pct(busy1 - busy0);
            out.insert("machine_busy".into(), busy);
            out.insert("machine_iowait".into(), pct(wait1 - wait0));
            out.insert("others".into(), (busy - listed).max(0.0));
        }
        out
    }
}

/// Waits up to `limit` until the machine is quiet for two seconds (all
/// cores together under half a core busy); says so when it is not.
async fn wait_until_quiet(limit: Duration) {
    if limit.is_zero() {
        return;
    }
    let deadline = Instant::now() + limit;
    let mut quiet_for = 0;
    let mut said = false;
    while Instant::now() < deadline {
        let before = machine_ticks();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let busy = match (before, machine_ticks()) {
            (Some((b0, _)), Some((b1, _))) => (b1 - b0) as f64 / clock_ticks() * 100.0,
            _ => return,
        };
        if busy < 50.0 {
            quiet_for += 1;
            if quiet_for >= 2 {
                if said {
                    eprintln!();
                }
                return;
            }
        } else {
            quiet_for = 0;
            said = true;
            eprint!("\rwaiting for a quiet machine: {busy:>4.0}% busy   ");
            let _ = std::io::stderr().flush();
        }
    }
    eprintln!(
        "\nthe machine is still busy after {limit:?}; measuring anyway (see `others` in the CPU figures)"
    );
}

/// Runs the benchmark; writes `<out>/<name>.json`.
pub async fn run(spec: &SinkBenchSpec) -> anyhow::Result<SinkBenchResult> {
    ensure!(
        spec.metrics > 0 || spec.alerts > 0,
        "nothing to do: give --records or --alerts above 0"
    );
    ensure!(spec.devices > 0, "--devices must be at least 1");
    let sfx = unique("sinks");
    let data_topic = format!("sinkbench-data-{sfx}");
    let alerts_topic = format!("sinkbench-alerts-{sfx}");
    // The bridge's dead-letter route reads this one: it stays empty.
    let dlq_topic = format!("sinkbench-dlq-{sfx}");
    let index = format!("sinkbench-alerts-{}", sfx.to_lowercase());
    create_topics(&[
        (&data_topic, spec.partitions, false),
        (&alerts_topic, spec.partitions, false),
        (&dlq_topic, 1, false),
    ])
    .await?;
    let db = match TestDatabase::create("edge_sinkbench").await {
        Ok(db) => db,
        Err(e) => {
            delete_topics(&[&data_topic, &alerts_topic, &dlq_topic]).await;
            return Err(e);
        }
    };
    let http = reqwest::Client::new();
    let names = RunNames {
        sfx: &sfx,
        data_topic: &data_topic,
        alerts_topic: &alerts_topic,
        dlq_topic: &dlq_topic,
        index: &index,
        db: &db,
    };
    let result = run_inner(spec, &names, &http).await;
    eprintln!("cleaning up: topics, database {}, index {index}", db.name);
    delete_topics(&[&data_topic, &alerts_topic, &dlq_topic]).await;
    db.drop_now().await;
    let os = crate::opensearch_url();
    match http.delete(format!("{os}/{index}")).send().await {
        Ok(r) if r.status().is_success() || r.status() == reqwest::StatusCode::NOT_FOUND => {}
        Ok(r) => eprintln!("cleanup: deleting index {index}: HTTP {}", r.status()),
        Err(e) => eprintln!("cleanup: deleting index {index}: {e}"),
    }
    let result = result?;
    std::fs::create_dir_all(&spec.out_dir)?;
    let path = spec.out_dir.join(format!("{}.json", spec.name));
    std::fs::write(&path, serde_json::to_string_pretty(&result.json(spec))?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(result)
}

/// Names one run's topics, group, sink, database and index.
struct RunNames<'a> {
    sfx: &'a str,
    data_topic: &'a str,
    alerts_topic: &'a str,
    dlq_topic: &'a str,
    index: &'a str,
    db: &'a TestDatabase,
}

async fn run_inner(
    spec: &SinkBenchSpec,
    names: &RunNames<'_>,
    http: &reqwest::Client,
) -> anyhow::Result<SinkBenchResult> {
    let mut result = SinkBenchResult {
        name: spec.name.clone(),
        ..Default::default()
    };
    // One reading a second per device, ending a minute ago: the backlog an
    // outage leaves.
    let per_device = (spec.metrics.max(spec.alerts) / spec.devices as u64) as i64;
    let base_ts = now_ms() - per_device * 1000 - 60_000;
    let devices = spec.devices;
    let per_tx = spec.per_transaction;
    let partitions = spec.partitions;
    if spec.metrics > 0 {
        let (topic, n) = (names.data_topic.to_string(), spec.metrics);
        (result.metrics_produce_per_s, result.metric_bytes_mean) =
            tokio::task::spawn_blocking(move || {
                // Computed once per device, as the agent caches them.
                let fragments: Vec<Vec<u8>> = (0..devices)
                    .map(|d| enrichment_fragment(&device_meta(d)).into_bytes())
                    .collect();
                let gateways: Vec<String> = (0..4).map(gateway_id).collect();
                let produced = produce(&topic, n, per_tx, "readings", |k, out| {
                    let d = (k % devices as u64) as usize;
                    let r = reading(k, devices, base_ts);
                    write_reading_json(out, &r, &gateways[d % 4], r.ts + 40, true, &fragments[d]);
                    r.device_id
                })?;
                wait_until_visible(&topic, partitions, n)?;
                Ok::<_, anyhow::Error>(produced)
            })
            .await??;
    }
    if spec.alerts > 0 {
        let (topic, n) = (names.alerts_topic.to_string(), spec.alerts);
        (result.alerts_produce_per_s, result.alert_bytes_mean) =
            tokio::task::spawn_blocking(move || {
                let produced = produce(&topic, n, per_tx, "alerts", |k, out| {
                    let a = alert(k, devices, base_ts);
                    let d = (k % devices as u64) as usize;
                    let record = AlertRecord {
                        alert: &a,
                        gateway_id: &gateway_id(d),
                        raised_at: a.ts + 40,
                    };
                    // Serializing plain data to a Vec cannot fail.
                    let _ = serde_json::to_writer(&mut *out, &record);
                    a.device_id
                })?;
                wait_until_visible(&topic, partitions, n)?;
                Ok::<_, anyhow::Error>(produced)
            })
            .await??;
    }
    if spec.metrics > 0 {
        eprintln!(
            "MariaDB sink: draining {} readings (database {})",
            spec.metrics, names.db.name
        );
        wait_until_quiet(spec.quiet_wait).await;
        let mut bridge = start_bridge(spec, names, false, "mysql")?;
        result.mysql = Some(drain_mysql(spec, &mut bridge, names.db, names.sfx).await?);
        drop(bridge);
    }
    if spec.alerts > 0 {
        eprintln!(
            "OpenSearch sink: draining {} alerts (index {})",
            spec.alerts, names.index
        );
        wait_until_quiet(spec.quiet_wait).await;
        let mut bridge = start_bridge(spec, names, true, "opensearch")?;
        result.opensearch = Some(drain_opensearch(spec, &mut bridge, names.index, http).await?);
        drop(bridge);
    }
    Ok(result)
}

/// The bridge under test, with when it started and where it logs.
struct Bridge {
    proc: Proc,
    started: Instant,
    started_ms: i64,
    log: PathBuf,
}

/// Starts the release bridge with a config file of its own. `alerts`
/// turns the OpenSearch sink on; the data consumer always runs (on its
/// own group and sink name, so a second start resumes where the first
/// stopped and stores nothing twice).
fn start_bridge(
    spec: &SinkBenchSpec,
    names: &RunNames<'_>,
    alerts: bool,
    phase: &str,
) -> anyhow::Result<Bridge> {
    let (mysql_tuning, os_tuning) = spec.tuning.toml();
    let toml = format!(
        "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"sinkbench-{sfx}\"\ntopic_data = \"{data}\"\n\
         [mysql]\nurl = \"{url}\"\nsink_name = \"sinkbench-{sfx}\"\n{mysql_tuning}\
         [opensearch]\nurl = \"{os}\"\nindex = \"{index}\"\ntopic = \"{alerts}\"\n{os_tuning}\
         [kafka.librdkafka_options]\n{librdkafka}",
        brokers = kafka_brokers(),
        sfx = names.sfx,
        data = names.data_topic,
        url = names.db.url,
        os = if alerts {
            crate::opensearch_url()
        } else {
            String::new()
        },
        index = names.index,
        alerts = names.alerts_topic,
        librdkafka = spec
            .tuning
            .librdkafka_options
            .iter()
            .map(|(k, v)| format!("{k:?} = {v:?}\n"))
            .collect::<String>(),
    );
    std::fs::create_dir_all(&spec.out_dir)?;
    let config = spec.out_dir.join(format!("{}-bridge.toml", spec.name));
    std::fs::write(&config, &toml)?;
    let log_name = format!("{}-bridge-{phase}", spec.name);
    let mut command = Command::new(&spec.bridge_bin);
    command
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(&spec.out_dir, &log_name)?);
    // The config file decides, not CLOUD_BRIDGE_* from the caller; the
    // dead-letter topic and the API's port are the run's own.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CLOUD_BRIDGE_") {
            command.env_remove(key);
        }
    }
    command
        .env("CLOUD_BRIDGE_TOPIC_DLQ", names.dlq_topic)
        .env("CLOUD_BRIDGE_API_LISTEN", "127.0.0.1:0");
    let started_ms = now_ms();
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", spec.bridge_bin.display()))?;
    Ok(Bridge {
        proc: Proc(child),
        started: Instant::now(),
        started_ms,
        log: spec.out_dir.join(format!("{log_name}.log")),
    })
}

impl Bridge {
    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.proc.0.try_wait() {
            bail!(
                "the bridge exited ({status}) before the backlog was drained; see {}",
                self.log.display()
            );
        }
        Ok(())
    }
}

fn progress(label: &str, t: f64, stored: u64, total: u64, per_s: f64) {
    eprint!(
        "\r[{label} {t:>6.1} s] {stored:>9}/{total} ({:>3.0}%) {per_s:>8.0}/s   ",
        stored as f64 * 100.0 / total.max(1) as f64
    );
    let _ = std::io::stderr().flush();
}

/// InnoDB counters worth comparing before and after a drain.
const INNODB_COUNTERS: &[&str] = &[
    "Innodb_buffer_pool_read_requests",
    "Innodb_buffer_pool_reads",
    "Innodb_buffer_pool_pages_flushed",
    "Innodb_buffer_pool_wait_free",
    "Innodb_data_read",
    "Innodb_data_written",
    "Innodb_os_log_written",
    "Innodb_log_waits",
    "Innodb_row_lock_waits",
    "Innodb_deadlocks",
    "Com_insert",
    "Com_commit",
    "Com_stmt_prepare",
    "Com_stmt_execute",
    "Bytes_received",
];

async fn innodb_counters(pool: &sqlx::MySqlPool) -> BTreeMap<String, f64> {
    let names: Vec<String> = INNODB_COUNTERS.iter().map(|n| format!("'{n}'")).collect();
    // The names are the constants above: nothing to escape.
    sqlx::query_as::<_, (String, String)>(&format!(
        "SHOW GLOBAL STATUS WHERE Variable_name IN ({})",
        names.join(",")
    ))
    .fetch_all(pool)
    .await
    .unwrap_or_default()
    .into_iter()
    .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
    .collect()
}

async fn drain_mysql(
    spec: &SinkBenchSpec,
    bridge: &mut Bridge,
    db: &TestDatabase,
    sfx: &str,
) -> anyhow::Result<DrainResult> {
    // The bridge creates the tables; the count reads 0 until it has.
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .with_context(|| format!("connecting to {}", db.name))?;
    let total = spec.metrics;
    let bridge_pid = bridge.proc.0.id();
    let mut pids = vec![("bridge".to_string(), bridge_pid)];
    pids.extend(service_pids());
    let counters_before = innodb_counters(&pool).await;
    // The progress query costs MariaDB time too: it is reported.
    let mut count_seconds = 0f64;
    let mut counts = 0u32;
    let mut cpu: Option<CpuMeter> = None;
    let mut samples = Vec::new();
    let mut rss_max = 0f64;
    // Progress from the sink's own offsets (a primary-key read), and a
    // `COUNT(*)` every `count_every` (or when the offsets stopped moving):
    // on a buffer pool smaller than the table, counting scans an index
    // from disk and slows the sink down.
    let sink_name = format!("sinkbench-{sfx}");
    let (mut stored, mut committed) = (0u64, 0u64);
    let mut counted_at: Option<Instant> = None;
    let mut last_change = Instant::now();
    let mut next = Instant::now() + Duration::from_secs(1);
    loop {
        tokio::time::sleep_until(next.into()).await;
        next += Duration::from_secs(1);
        bridge.ensure_running()?;
        // Before the bridge created the table this fails: nothing yet.
        let now_committed = sqlx::query_scalar::<_, i64>(
            "SELECT CAST(COALESCE(SUM(next_offset), 0) AS SIGNED) FROM bridge_offsets WHERE sink = ?",
        )
        .bind(&sink_name)
        .fetch_one(&pool)
        .await
        .map_or(0, |n| n as u64);
        let moving = now_committed != committed;
        if !moving || counted_at.is_none_or(|c| c.elapsed() >= spec.count_every) {
            let asked = Instant::now();
            let now_stored = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM iot_metrics")
                .fetch_one(&pool)
                .await
                .map_or(0, |n| n as u64);
            count_seconds += asked.elapsed().as_secs_f64();
            counts += 1;
            counted_at = Some(Instant::now());
            if now_stored != stored {
                last_change = Instant::now();
            }
            stored = now_stored;
        }
        if moving {
            last_change = Instant::now();
        }
        let t = bridge.started.elapsed().as_secs_f64();
        // Offsets per second: rows plus the few transaction markers.
        let per_s = samples
            .last()
            .map_or(now_committed as f64 / t, |s: &DrainSample| {
                (now_committed - committed) as f64 / (t - s.t)
            });
        committed = now_committed;
        // Between counts, the offsets committed with the rows (a few
        // transaction markers included) show the progress.
        let shown = stored.max(committed.min(total));
        samples.push(DrainSample {
            t,
            stored: shown,
            per_s,
        });
        if let Some((_, rss)) = proc_usage(bridge_pid) {
            rss_max = rss_max.max(rss);
        }
        progress("MariaDB", t, shown, total, per_s);
        if committed > 0 && cpu.is_none() {
            cpu = Some(CpuMeter::start(pids.clone()));
        }
        if stored >= total {
            break;
        }
        ensure!(
            last_change.elapsed() < spec.stall_timeout,
            "nothing stored for {:?} ({stored} of {total}); see {}",
            spec.stall_timeout,
            bridge.log.display()
        );
    }
    eprintln!();
    let cpu_percent = cpu.map(|c| c.percent()).unwrap_or_default();
    let server_counters: BTreeMap<String, f64> = innodb_counters(&pool)
        .await
        .into_iter()
        .map(|(k, v)| {
            let before = counters_before.get(&k).copied().unwrap_or(0.0);
            (k, v - before)
        })
        .collect();
    let (first_ms, last_ms): (i64, i64) = sqlx::query_as(
        "SELECT CAST(UNIX_TIMESTAMP(MIN(stored_at)) * 1000 AS SIGNED), \
         CAST(UNIX_TIMESTAMP(MAX(stored_at)) * 1000 AS SIGNED) FROM iot_metrics",
    )
    .fetch_one(&pool)
    .await?;
    // stored_at is when each INSERT statement began: the rows of the last
    // statement landed after last_ms, so they are left out of the rate.
    let at_last: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM iot_metrics WHERE stored_at = (SELECT MAX(stored_at) FROM iot_metrics)",
    )
    .fetch_one(&pool)
    .await?;
    let per_second: Vec<(i64, u64)> = sqlx::query_as::<_, (i64, i64)>(
        "SELECT CAST(FLOOR(UNIX_TIMESTAMP(stored_at)) AS SIGNED) s, COUNT(*) FROM iot_metrics GROUP BY s ORDER BY s",
    )
    .fetch_all(&pool)
    .await?
    .into_iter()
    .map(|(s, n)| (s, n as u64))
    .collect();
    let (stored, duplicates): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(*) - COUNT(DISTINCT device_id, seq) FROM iot_metrics",
    )
    .fetch_one(&pool)
    .await?;
    ensure!(
        stored as u64 == total && duplicates == 0,
        "iot_metrics holds {stored} rows ({duplicates} duplicated) for {total} readings"
    );
    pool.close().await;
    let drain_seconds = (last_ms - first_ms) as f64 / 1000.0;
    Ok(DrainResult {
        sink: "mysql".into(),
        records: total,
        stored: stored as u64,
        per_s: (stored - at_last) as f64 / drain_seconds.max(1e-3),
        drain_seconds,
        wall_seconds: (last_ms - bridge.started_ms) as f64 / 1000.0,
        first_after_seconds: (first_ms - bridge.started_ms) as f64 / 1000.0,
        cpu_percent,
        bridge_rss_max_mb: rss_max,
        server_counters,
        poll_query_ms_mean: count_seconds * 1000.0 / f64::from(counts.max(1)),
        per_second,
        samples,
    })
}

/// Documents indexed into `index` so far (primaries' `index_total`, which
/// counts without waiting for a refresh); 0 before the index exists.
async fn indexed_total(http: &reqwest::Client, os: &str, index: &str) -> anyhow::Result<u64> {
    let response = http
        .get(format!("{os}/{index}/_stats/indexing"))
        .send()
        .await
        .with_context(|| {
            format!("asking OpenSearch at {os}: is it running? start it with tests/services/up")
        })?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(0);
    }
    let status = response.status();
    let body = response.bytes().await?;
    ensure!(
        status.is_success(),
        "{index}/_stats answered HTTP {status}: {}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    let v: Value = serde_json::from_slice(&body)?;
    Ok(v["_all"]["primaries"]["indexing"]["index_total"]
        .as_u64()
        .unwrap_or(0))
}

async fn drain_opensearch(
    spec: &SinkBenchSpec,
    bridge: &mut Bridge,
    index: &str,
    http: &reqwest::Client,
) -> anyhow::Result<DrainResult> {
    let os = crate::opensearch_url();
    let total = spec.alerts;
    let bridge_pid = bridge.proc.0.id();
    let mut pids = vec![("bridge".to_string(), bridge_pid)];
    pids.extend(service_pids());
    let mut cpu: Option<CpuMeter> = None;
    let mut samples: Vec<DrainSample> = Vec::new();
    let mut per_second: BTreeMap<i64, u64> = BTreeMap::new();
    let mut rss_max = 0f64;
    // The first poll that saw documents, and the first that saw them all.
    let mut first: Option<(f64, u64)> = None;
    let mut first_ms = 0i64;
    let (mut last, mut last_change) = (0u64, Instant::now());
    let poll = Duration::from_millis(200);
    let mut next = Instant::now() + poll;
    let mut shown = Instant::now();
    let done_at = loop {
        tokio::time::sleep_until(next.into()).await;
        next += poll;
        bridge.ensure_running()?;
        let indexed = indexed_total(http, &os, index).await?;
        let t = bridge.started.elapsed().as_secs_f64();
        let now = now_ms();
        if indexed > last {
            *per_second.entry(now.div_euclid(1000)).or_default() += indexed - last;
            if first.is_none() {
                first = Some((t, indexed));
                first_ms = now;
                cpu = Some(CpuMeter::start(pids.clone()));
            }
            (last, last_change) = (indexed, Instant::now());
        }
        if let Some((_, rss)) = proc_usage(bridge_pid) {
            rss_max = rss_max.max(rss);
        }
        if shown.elapsed() >= Duration::from_secs(1) || indexed >= total {
            shown = Instant::now();
            let per_s = samples
                .last()
                .map_or(indexed as f64 / t, |s: &DrainSample| {
                    (indexed - s.stored) as f64 / (t - s.t)
                });
            samples.push(DrainSample {
                t,
                stored: indexed,
                per_s,
            });
            progress("OpenSearch", t, indexed, total, per_s);
        }
        if indexed >= total {
            break (t, now);
        }
        ensure!(
            last_change.elapsed() < spec.stall_timeout,
            "nothing indexed for {:?} ({indexed} of {total}); see {}",
            spec.stall_timeout,
            bridge.log.display()
        );
    };
    eprintln!();
    let cpu_percent = cpu.map(|c| c.percent()).unwrap_or_default();
    // Every alert once: a refreshed count equals what was produced.
    http.post(format!("{os}/{index}/_refresh"))
        .send()
        .await?
        .error_for_status()?;
    let body = http
        .get(format!("{os}/{index}/_count"))
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let count = serde_json::from_slice::<Value>(&body)?["count"]
        .as_u64()
        .unwrap_or(0);
    ensure!(
        count == total,
        "{index} holds {count} documents for {total} alerts"
    );
    let (t_first, at_first) = first.unwrap_or((done_at.0, 0));
    let drain_seconds = done_at.0 - t_first;
    Ok(DrainResult {
        sink: "opensearch".into(),
        records: total,
        stored: count,
        // Polls are 200 ms apart: the documents the first poll saw were
        // indexed before the measured window.
        per_s: (total - at_first) as f64 / drain_seconds.max(1e-3),
        drain_seconds,
        wall_seconds: done_at.0,
        first_after_seconds: (first_ms - bridge.started_ms) as f64 / 1000.0,
        cpu_percent,
        bridge_rss_max_mb: rss_max,
        server_counters: BTreeMap::new(),
        poll_query_ms_mean: 0.0,
        per_second: per_second.into_iter().collect(),
        samples,
    })
}
