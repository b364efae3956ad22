//! The end-to-end load benchmark behind `edge-bench`: runs the real agent
//! (and optionally the real bridge) as processes against the test services,
//! drives them at a target rate, and samples once a second what was
//! accepted, committed to Kafka and stored in MariaDB, the latency from the
//! device's send timestamp to a `read_committed` consumer and to the MariaDB
//! row, and the agent's RSS, CPU and outbox backlog.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use hdrhistogram::Histogram;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use serde_json::{Value, json};

use crate::fleet::{FleetConfig, FleetProgress, FleetTracks, run_fleet};
use crate::{TestDatabase, create_topics, delete_topics, kafka_brokers, mqtt_addr, now_ms, unique};

/// The first seconds of a run (connections, consumer group join, first
/// transactions) are shown in the plots but left out of the run's means and
/// percentiles.
pub const WARMUP: Duration = Duration::from_secs(3);

/// How readings reach the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Simulated MQTT devices → Mosquitto → the agent's MQTT source.
    Mqtt,
    /// The agent's in-process `demo` source: no broker in the path.
    Direct,
}

/// One benchmark run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub name: String,
    pub feed: Feed,
    pub devices: usize,
    /// Readings per second; 0 = open loop (as fast as it goes).
    pub rate: f64,
    pub duration: Duration,
    /// Also run the bridge into MariaDB and measure rows.
    pub bridge: bool,
    /// MQTT connections the devices share (MQTT feed).
    pub connections: usize,
    pub agent_bin: PathBuf,
    pub bridge_bin: PathBuf,
    pub out_dir: PathBuf,
    /// Round trip added between the agent and Kafka (0: none), through a
    /// [`crate::delay_proxy`] on the broker's `WAN` listener.
    pub kafka_rtt: Duration,
    /// Registered devices driving through this many geofences (MQTT feed);
    /// `None`: unregistered devices that stay put.
    pub fences: Option<usize>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.50) as f64,
            p99: h.value_at_quantile(0.99) as f64,
            p999: h.value_at_quantile(0.999) as f64,
            max: h.max() as f64,
        }
    }

    fn json(&self) -> Value {
        json!({"count": self.count, "p50_ms": self.p50, "p99_ms": self.p99, "p999_ms": self.p999, "max_ms": self.max})
    }
}

/// One second of a run.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub t: f64,
    pub accepted_per_s: f64,
    pub committed_per_s: f64,
    pub stored_per_s: f64,
    pub kafka_latency: Percentiles,
    /// Latency of the rows MariaDB stored in this second.
    pub mysql_latency: Percentiles,
    pub rss_mb: f64,
    pub cpu_percent: f64,
    pub backlog_bytes: f64,
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    pub name: String,
    pub feed: String,
    pub target_rate: f64,
    pub devices: usize,
    /// Round trip added between the agent and Kafka.
    pub kafka_rtt_ms: u64,
    /// Geofences the registered devices drove through (`None`: no
    /// registry, the devices stayed put).
    pub fences: Option<usize>,
    pub seconds: f64,
    pub sent: u64,
    pub accepted: u64,
    pub committed: u64,
    pub stored: u64,
    /// Mean over the measured window (after the warm-up).
    pub accepted_per_s: f64,
    pub committed_per_s: f64,
    pub stored_per_s: f64,
    pub kafka_latency: Percentiles,
    pub mysql_latency: Percentiles,
    pub rss_max_mb: f64,
    pub cpu_mean_percent: f64,
    pub backlog_max_bytes: f64,
    /// Where the uplink's time went: transactions, and per transaction the
    /// mean milliseconds reading, rendering and queueing batches, committing
    /// the Kafka transaction and trimming the outbox; records per
    /// transaction.
    pub uplink: UplinkBreakdown,
    /// Where the latency goes, after the warm-up.
    pub stages: LatencyStages,
    pub samples: Vec<Sample>,
}

/// The latency to Kafka split by stage, after the warm-up: from the
/// device's timestamp to the agent's `received_at` in the records Kafka
/// holds (stamped when the batch writer takes the reading: the MQTT hop
/// through Mosquitto, the batch's linger and any wait behind the previous
/// outbox write; millisecond clocks), and the agent's own histograms of its
/// two durable steps (outbox writes, Kafka transactions; bucket bounds, not
/// exact values).
#[derive(Debug, Clone, Copy, Default)]
pub struct LatencyStages {
    pub to_agent: Percentiles,
    pub outbox_commit: BucketPercentiles,
    pub kafka_commit: BucketPercentiles,
}

/// Percentiles read off a Prometheus histogram of the agent: each is the
/// upper bound of the bucket it falls in (infinite past the last bound).
#[derive(Debug, Clone, Copy, Default)]
pub struct BucketPercentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Observations above 10 ms.
    pub over_10ms: u64,
}

impl BucketPercentiles {
    /// From the agent's histogram `name`, counting only what was observed
    /// between the scrapes `from` and `to`.
    fn between(name: &str, from: &BTreeMap<String, f64>, to: &BTreeMap<String, f64>) -> Self {
        let prefix = format!("{name}_bucket{{le=\"");
        // (upper bound in ms, cumulative count in the window), ascending.
        let mut buckets: Vec<(f64, u64)> = to
            .iter()
            .filter_map(|(key, &n)| {
                let le = key.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse::<f64>().ok()? * 1000.0
                };
                let before = from.get(key).copied().unwrap_or(0.0);
                Some((bound, (n - before).max(0.0) as u64))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let Some(&(_, total)) = buckets.last() else {
            return Self::default();
        };
        let at = |q| edge_agent::stats::bucket_quantile_ms(&buckets, q).unwrap_or(0.0);
        let within_10ms = buckets
            .iter()
            .find(|(bound, _)| *bound == 10.0)
            .map_or(total, |(_, n)| *n);
        Self {
            count: total,
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            over_10ms: total.saturating_sub(within_10ms),
        }
    }

    fn json(&self) -> Value {
        let ms = |v: f64| if v.is_finite() { json!(v) } else { json!(null) };
        json!({"count": self.count, "p50_ms_at_most": ms(self.p50_ms),
               "p99_ms_at_most": ms(self.p99_ms), "over_10_ms": self.over_10ms})
    }

    /// `≤ 2 ms` style; past the last bound, `> ` it.
    pub fn show(v: f64) -> String {
        if v.is_finite() {
            format!("≤ {v} ms")
        } else {
            let last = edge_agent::stats::LATENCY_BUCKETS_MICROS
                .last()
                .map_or(0, |micros| micros / 1000);
            format!("> {last} ms")
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct UplinkBreakdown {
    pub transactions: f64,
    pub load_ms: f64,
    pub transaction_ms: f64,
    pub trim_ms: f64,
    pub records_per_transaction: f64,
}

impl UplinkBreakdown {
    fn from_metrics(m: &BTreeMap<String, f64>) -> Self {
        let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
        let n = get("edge_kafka_transactions_total").max(1.0);
        Self {
            transactions: get("edge_kafka_transactions_total"),
            load_ms: get("edge_uplink_load_seconds_total") * 1000.0 / n,
            transaction_ms: get("edge_kafka_transaction_seconds_total") * 1000.0 / n,
            trim_ms: get("edge_outbox_trim_seconds_total") * 1000.0 / n,
            records_per_transaction: get("edge_kafka_records_committed_total") / n,
        }
    }
}

impl RunResult {
    pub fn json(&self) -> Value {
        json!({
            "name": self.name, "feed": self.feed, "target_rate": self.target_rate,
            "devices": self.devices, "kafka_rtt_ms": self.kafka_rtt_ms, "fences": self.fences,
            "seconds": self.seconds,
            "sent": self.sent, "accepted": self.accepted, "committed": self.committed, "stored": self.stored,
            "accepted_per_s": self.accepted_per_s.round(), "committed_per_s": self.committed_per_s.round(),
            "stored_per_s": self.stored_per_s.round(),
            "latency_to_kafka_commit": self.kafka_latency.json(),
            "latency_to_mariadb_row": self.mysql_latency.json(),
            "agent_rss_max_mb": (self.rss_max_mb * 10.0).round() / 10.0,
            "agent_cpu_mean_percent": self.cpu_mean_percent.round(),
            "outbox_backlog_max_bytes": self.backlog_max_bytes,
            "uplink": {
                "transactions": self.uplink.transactions,
                "mean_load_ms": self.uplink.load_ms,
                "mean_transaction_ms": self.uplink.transaction_ms,
                "mean_trim_ms": self.uplink.trim_ms,
                "records_per_transaction": self.uplink.records_per_transaction,
            },
            "latency_stages": {
                "device_to_agent": self.stages.to_agent.json(),
                "outbox_commit": self.stages.outbox_commit.json(),
                "kafka_commit": self.stages.kafka_commit.json(),
            },
            "samples": self.samples.iter().map(|s| json!({
                "t": s.t, "accepted_per_s": s.accepted_per_s, "committed_per_s": s.committed_per_s,
                "stored_per_s": s.stored_per_s, "kafka_latency": s.kafka_latency.json(),
                "mysql_latency": s.mysql_latency.json(),
                "rss_mb": s.rss_mb, "cpu_percent": s.cpu_percent, "backlog_bytes": s.backlog_bytes,
            })).collect::<Vec<_>>(),
        })
    }
}

/// A child process, killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first so the agent leaves cleanly; SIGKILL after 10 s.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time (user + system) of a process in clock ticks, and its RSS in MB.
pub fn proc_usage(pid: u32) -> Option<(u64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks, rss_kb / 1024.0))
}

/// Clock ticks per second, the unit of [`proc_usage`]'s CPU time.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Values of the agent's `/metrics`: unlabelled series, and histogram
/// buckets (keyed with their `{le="..."}`).
fn scrape(listen: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    if let Ok(Some((200, body))) = edge_agent::ops::fetch(listen, "/metrics") {
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            if let Some((name, value)) = line.split_once(' ')
                && (!name.contains('{') || name.contains("_bucket{le="))
                && let Ok(v) = value.trim().parse::<f64>()
            {
                out.insert(name.to_string(), v);
            }
        }
    }
    out
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid histogram bounds")
}

/// Reads the data topic with `read_committed` and records, per second of
/// the run, how many readings became visible and how long after their
/// device timestamp.
struct KafkaWatch {
    committed: Arc<AtomicU64>,
    windows: Arc<Mutex<Histogram<u64>>>,
    total: Arc<Mutex<Histogram<u64>>>,
    /// Device timestamp to the agent's `received_at`, after the warm-up.
    to_agent: Arc<Mutex<Histogram<u64>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KafkaWatch {
    /// `measure_from_ms`: readings sent before this (the warm-up) count in
    /// the per-second windows but not in the run's percentiles.
    fn start(topic: &str, group: &str, measure_from_ms: i64) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka_brokers())
            .set("group.id", group)
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "5")
            .set("fetch.min.bytes", "1")
            .create()
            .context("creating the measuring consumer")?;
        consumer.subscribe(&[topic])?;
        let committed = Arc::new(AtomicU64::new(0));
        let windows = Arc::new(Mutex::new(new_histogram()));
        let total = Arc::new(Mutex::new(new_histogram()));
        let to_agent = Arc::new(Mutex::new(new_histogram()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, w, t, a, s) = (
            committed.clone(),
            windows.clone(),
            total.clone(),
            to_agent.clone(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            #[derive(serde::Deserialize)]
            struct Ts {
                ts: i64,
                received_at: Option<i64>,
            }
            while !s.load(Relaxed) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let now = now_ms();
                if let Some(Ok(r)) = m.payload().map(serde_json::from_slice::<Ts>) {
                    let latency = (now - r.ts).max(1) as u64;
                    if let Ok(mut h) = w.lock() {
                        let _ = h.record(latency);
                    }
                    if r.ts >= measure_from_ms {
                        if let Ok(mut h) = t.lock() {
                            let _ = h.record(latency);
                        }
                        // Millisecond clocks: 0 is "within the same ms".
                        if let Some(received) = r.received_at
                            && let Ok(mut h) = a.lock()
                        {
                            let _ = h.record((received - r.ts).max(0) as u64);
                        }
                    }
                }
                c.fetch_add(1, Relaxed);
            }
        });
        Ok(Self {
            committed,
            windows,
            total,
            to_agent,
            stop,
            thread: Some(thread),
        })
    }

    fn take_window(&self) -> Percentiles {
        match self.windows.lock() {
            Ok(mut h) => {
                let p = Percentiles::of(&h);
                h.reset();
                p
            }
            Err(_) => Percentiles::default(),
        }
    }
}

impl Drop for KafkaWatch {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs one benchmark and writes `<out>/<name>.json` and `<name>.svg`.
pub async fn run(spec: &RunSpec) -> anyhow::Result<RunResult> {
    let sfx = unique("bench");
    let topics = [
        format!("data-{sfx}"),
        format!("dlq-{sfx}"),
        format!("alerts-{sfx}"),
        format!("offsets-{sfx}"),
    ];
    create_topics(&[
        (&topics[0], 3, false),
        (&topics[1], 1, false),
        (&topics[2], 1, false),
        (&topics[3], 1, true),
    ])
    .await?;
    let db = if spec.bridge {
        Some(TestDatabase::create("edge_bench").await?)
    } else {
        None
    };
    let result = run_inner(spec, &sfx, &topics, db.as_ref()).await;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    delete_topics(&names).await;
    if spec.feed == Feed::Mqtt
        && let Err(e) = remove_session(&format!("agent-{sfx}")).await
    {
        eprintln!("warning: the agent's MQTT session stays on the broker until it expires: {e:#}");
    }
    if let Some(db) = db {
        db.drop_now().await;
    }
    let result = result?;
    std::fs::create_dir_all(&spec.out_dir)?;
    std::fs::write(
        spec.out_dir.join(format!("{}.json", spec.name)),
        serde_json::to_string_pretty(&result.json())?,
    )?;
    std::fs::write(
        spec.out_dir.join(format!("{}.svg", spec.name)),
        plot(&result),
    )?;
    Ok(result)
}

async fn run_inner(
    spec: &RunSpec,
    sfx: &str,
    topics: &[String; 4],
    db: Option<&TestDatabase>,
) -> anyhow::Result<RunResult> {
    let dir = tempfile::tempdir()?;
    let listen = format!("127.0.0.1:{}", free_port()?);
    let (mqtt_host, mqtt_port) = mqtt_addr();
    // Only the agent goes through the proxy: the bridge and the measuring
    // consumer stay next to Kafka, as in a cloud region.
    let _proxy;
    let agent_brokers = if spec.kafka_rtt.is_zero() {
        kafka_brokers()
    } else {
        let env = |key: &str, default: &str| std::env::var(key).unwrap_or_else(|_| default.into());
        let upstream = env("EDGE_TEST_KAFKA_WAN", "127.0.0.1:29095");
        let listen = env("EDGE_TEST_KAFKA_WAN_PROXY", "127.0.0.1:29096");
        let proxy = crate::delay_proxy::start(&listen, upstream.clone(), spec.kafka_rtt / 2)
            .await
            .with_context(|| {
                format!(
                    "starting the delay proxy to Kafka's WAN listener {upstream} (restart the services with tests/services/up if it has none)"
                )
            })?;
        let addr = proxy.addr.to_string();
        _proxy = proxy;
        addr
    };
    let source = match spec.feed {
        Feed::Mqtt => format!(
            "[sources.mqtt]\nhost = \"{mqtt_host}\"\nport = {mqtt_port}\nclient_id = \"agent-{sfx}\"\n\
             topic_prefix = \"{sfx}/\"\ntopics = [\"{sfx}/devices/#\"]\n"
        ),
        Feed::Direct => format!(
            "[sources.demo]\ndevices = {}\nreadings_per_second = {}\ninvalid_fraction = 0.0\n",
            spec.devices,
            if spec.rate > 0.0 {
                spec.rate as u64
            } else {
                10_000_000
            }
        ),
    };
    // Extra `[kafka]` lines for the agent, one `key = value` per line, to
    // compare settings (`EDGE_BENCH_AGENT_KAFKA="transaction_lanes = 1"`).
    let kafka_extra = match std::env::var("EDGE_BENCH_AGENT_KAFKA") {
        Ok(lines) if !lines.trim().is_empty() => format!("{}\n", lines.trim()),
        _ => String::new(),
    };
    // The simulated devices (MQTT feed), one fleet per connection; with
    // fences they drive around and the agent gets a registry.
    let connections = spec.connections.max(1);
    let fleet_configs: Vec<FleetConfig> = (0..connections)
        .map(|c| FleetConfig {
            topic_prefix: format!("{sfx}/"),
            id_prefix: format!("dev-{c}-"),
            devices: (spec.devices / connections).max(1),
            readings_per_device: 1_000_000_000,
            readings_per_second: spec.rate / connections as f64,
            invalid_every: 0,
            hot_every: 0,
            base_ts_ms: 0,
            live_timestamps: true,
            tracks: spec.fences.map(|_| FleetTracks::BENCH),
        })
        .collect();
    let registry = match spec.fences {
        Some(fences) => {
            ensure!(
                spec.feed == Feed::Mqtt,
                "--fences needs the MQTT feed: the direct feed's demo devices have no registry"
            );
            let path = dir.path().join("registry.json");
            let doc =
                FleetConfig::registry_with_fences(&fleet_configs, &FleetTracks::BENCH, fences);
            std::fs::write(&path, doc.to_string())?;
            format!("[registry]\nfile = \"{}\"\n", path.display())
        }
        None => String::new(),
    };
    let toml = format!(
        "gateway_id = \"gw-{sfx}\"\ndata_dir = \"{}\"\n{source}[http]\nlisten = \"{listen}\"\n\
         [kafka]\nbrokers = \"{}\"\ntopic_data = \"{}\"\ntopic_dlq = \"{}\"\ntopic_alerts = \"{}\"\n\
         topic_offsets = \"{}\"\n{kafka_extra}{registry}[progress]\ninterval_seconds = 0\n",
        dir.path().join("data").display(),
        agent_brokers,
        topics[0],
        topics[1],
        topics[2],
        topics[3],
    );
    edge_agent::Config::from_toml(&toml, "edge-bench")?;
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, &toml)?;
    if spec.feed == Feed::Mqtt {
        create_session(&format!("agent-{sfx}"), &format!("{sfx}/devices/#")).await?;
    }

    let _bridge = match db {
        Some(db) => Some(Proc(
            Command::new(&spec.bridge_bin)
                .arg("run")
                .env("RUST_LOG", "warn")
                .env("CLOUD_BRIDGE_KAFKA_BROKERS", kafka_brokers())
                .env("CLOUD_BRIDGE_GROUP_ID", format!("bridge-{sfx}"))
                .env("CLOUD_BRIDGE_TOPIC_DATA", &topics[0])
                .env("CLOUD_BRIDGE_MYSQL_URL", &db.url)
                .env("CLOUD_BRIDGE_OPENSEARCH_URL", "")
                .env("CLOUD_BRIDGE_TOPIC_DLQ", &topics[1])
                .env("CLOUD_BRIDGE_API_LISTEN", "127.0.0.1:0")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file(&spec.out_dir, &format!("{}-bridge", spec.name))?)
                .spawn()
                .with_context(|| format!("starting {}", spec.bridge_bin.display()))?,
        )),
        None => None,
    };
    let agent = Proc(
        Command::new(&spec.agent_bin)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&spec.out_dir, &format!("{}-agent", spec.name))?)
            .spawn()
            .with_context(|| format!("starting {}", spec.agent_bin.display()))?,
    );
    let pid = agent.0.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(
        edge_agent::ops::fetch(&listen, "/health"),
        Ok(Some((200, _)))
    ) {
        ensure!(
            Instant::now() < deadline,
            "the agent did not become healthy within 60 s; see {}",
            spec.out_dir
                .join(format!("{}-agent.log", spec.name))
                .display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let watch = KafkaWatch::start(
        &topics[0],
        &format!("measure-{sfx}"),
        now_ms() + WARMUP.as_millis() as i64,
    )?;

    // The devices.
    let fleet_stop = Arc::new(AtomicBool::new(false));
    let mut fleets = Vec::new();
    if spec.feed == Feed::Mqtt {
        for config in fleet_configs {
            let progress = Arc::new(FleetProgress::default());
            let c = fleets.len();
            tokio::spawn(run_fleet(
                config,
                mqtt_addr(),
                format!("bench-{sfx}-{c}"),
                progress.clone(),
                fleet_stop.clone(),
            ));
            fleets.push(progress);
        }
    }
    let sent = || -> u64 { fleets.iter().map(|f| f.acked.load(Relaxed)).sum() };

    let pool = match db {
        Some(db) => Some(
            sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(1)
                .connect(&db.url)
                .await?,
        ),
        None => None,
    };
    let stored_count = async |pool: &Option<sqlx::MySqlPool>| -> u64 {
        match pool {
            Some(p) => sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM iot_metrics")
                .fetch_one(p)
                .await
                .map(|n| n as u64)
                .unwrap_or(0),
            None => 0,
        }
    };

    let ticks = clock_ticks();
    let started = Instant::now();
    let run_started_ms = now_ms();
    let mut samples: Vec<Sample> = Vec::new();
    let (mut last_accepted, mut last_committed, mut last_stored) = (0.0, 0u64, 0u64);
    let mut last_cpu = proc_usage(pid).map(|u| u.0).unwrap_or(0);
    let mut last_t = 0.0;
    // The agent's histograms as the warm-up ended.
    let mut warm_metrics: Option<BTreeMap<String, f64>> = None;
    let total_secs = spec.duration.as_secs_f64();
    let mut next = started + Duration::from_secs(1);
    while started.elapsed() < spec.duration {
        tokio::time::sleep_until(next.into()).await;
        next += Duration::from_secs(1);
        let t = started.elapsed().as_secs_f64();
        let dt = t - last_t;
        last_t = t;
        let m = scrape(&listen);
        if warm_metrics.is_none() && t >= WARMUP.as_secs_f64() {
            warm_metrics = Some(m.clone());
        }
        let accepted = m.get("edge_readings_valid_total").copied().unwrap_or(0.0);
        let committed = watch.committed.load(Relaxed);
        let stored = stored_count(&pool).await;
        let (cpu, rss) = proc_usage(pid).unwrap_or((last_cpu, 0.0));
        if rss == 0.0 {
            bail!(
                "the agent exited during the run; see {}",
                spec.out_dir
                    .join(format!("{}-agent.log", spec.name))
                    .display()
            );
        }
        let s = Sample {
            t,
            accepted_per_s: (accepted - last_accepted) / dt,
            committed_per_s: (committed - last_committed) as f64 / dt,
            stored_per_s: (stored - last_stored) as f64 / dt,
            kafka_latency: watch.take_window(),
            mysql_latency: Percentiles::default(),
            rss_mb: rss,
            cpu_percent: (cpu - last_cpu) as f64 / ticks / dt * 100.0,
            backlog_bytes: m.get("edge_outbox_backlog_bytes").copied().unwrap_or(0.0),
        };
        (last_accepted, last_committed, last_stored, last_cpu) = (accepted, committed, stored, cpu);
        eprint!(
            "\r[{name} {t:>4.0}/{total_secs:.0} s] accepted {a:>9.0}/s  committed {c:>9.0}/s  stored {st:>9.0}/s  \
             p99 to Kafka {p99:>5.0} ms  rss {rss:>5.1} MB  cpu {cpu:>4.0}%  backlog {b:>6.1} MB   ",
            name = spec.name,
            a = s.accepted_per_s,
            c = s.committed_per_s,
            st = s.stored_per_s,
            p99 = s.kafka_latency.p99,
            rss = s.rss_mb,
            cpu = s.cpu_percent,
            b = s.backlog_bytes / 1e6,
        );
        let _ = std::io::stderr().flush();
        samples.push(s);
    }
    eprintln!();
    fleet_stop.store(true, Relaxed);
    let sent_total = sent();
    let seconds = started.elapsed().as_secs_f64();

    // Let what was accepted reach Kafka and MariaDB (bounded wait).
    let end_metrics = scrape(&listen);
    let uplink = UplinkBreakdown::from_metrics(&end_metrics);
    eprintln!(
        "uplink: {:.0} transactions, {:.0} records each; per transaction {:.1} ms reading and queueing batches, \
         {:.1} ms committing, {:.1} ms trimming",
        uplink.transactions,
        uplink.records_per_transaction,
        uplink.load_ms,
        uplink.transaction_ms,
        uplink.trim_ms
    );
    let warm_metrics = warm_metrics.unwrap_or_default();
    let mut stages = LatencyStages {
        to_agent: Percentiles::default(),
        outbox_commit: BucketPercentiles::between(
            "edge_outbox_commit_seconds",
            &warm_metrics,
            &end_metrics,
        ),
        kafka_commit: BucketPercentiles::between(
            "edge_kafka_commit_seconds",
            &warm_metrics,
            &end_metrics,
        ),
    };
    let accepted_total = end_metrics
        .get("edge_readings_valid_total")
        .copied()
        .unwrap_or(last_accepted) as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let committed = watch.committed.load(Relaxed);
        let stored = stored_count(&pool).await;
        if committed >= accepted_total && (pool.is_none() || stored >= accepted_total) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mysql_latency = match &pool {
        Some(p) => {
            let rows: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT ts_ms, CAST(UNIX_TIMESTAMP(stored_at) * 1000 AS SIGNED) FROM iot_metrics",
            )
            .fetch_all(p)
            .await?;
            let mut h = new_histogram();
            // Per second of the run, by the time the row was stored.
            let mut windows: BTreeMap<usize, Histogram<u64>> = BTreeMap::new();
            for (ts, stored_at) in rows {
                let latency = (stored_at - ts).max(1) as u64;
                if ts >= run_started_ms + WARMUP.as_millis() as i64 {
                    let _ = h.record(latency);
                }
                let second = ((stored_at - run_started_ms).max(0) / 1000) as usize;
                let _ = windows
                    .entry(second)
                    .or_insert_with(new_histogram)
                    .record(latency);
            }
            for (second, w) in windows {
                if let Some(s) = samples.get_mut(second) {
                    s.mysql_latency = Percentiles::of(&w);
                }
            }
            Percentiles::of(&h)
        }
        None => Percentiles::default(),
    };
    let committed_total = watch.committed.load(Relaxed);
    let stored_total = stored_count(&pool).await;
    let kafka_latency = watch
        .total
        .lock()
        .map(|h| Percentiles::of(&h))
        .unwrap_or_default();
    stages.to_agent = watch
        .to_agent
        .lock()
        .map(|h| Percentiles::of(&h))
        .unwrap_or_default();
    eprintln!(
        "latency stages after the warm-up: device to agent p50 / p99 {:.0} / {:.0} ms; \
         outbox writes ({}) p50 {}, p99 {}, {} over 10 ms; Kafka commits ({}) p50 {}, p99 {}, {} over 10 ms",
        stages.to_agent.p50,
        stages.to_agent.p99,
        stages.outbox_commit.count,
        BucketPercentiles::show(stages.outbox_commit.p50_ms),
        BucketPercentiles::show(stages.outbox_commit.p99_ms),
        stages.outbox_commit.over_10ms,
        stages.kafka_commit.count,
        BucketPercentiles::show(stages.kafka_commit.p50_ms),
        BucketPercentiles::show(stages.kafka_commit.p99_ms),
        stages.kafka_commit.over_10ms,
    );
    drop(watch);
    drop(agent);

    let measured: Vec<&Sample> = samples.iter().skip(WARMUP.as_secs() as usize).collect();
    let mean = |f: fn(&Sample) -> f64| {
        if measured.is_empty() {
            0.0
        } else {
            measured.iter().map(|s| f(s)).sum::<f64>() / measured.len() as f64
        }
    };
    Ok(RunResult {
        name: spec.name.clone(),
        feed: match spec.feed {
            Feed::Mqtt => "mqtt".into(),
            Feed::Direct => "direct".into(),
        },
        target_rate: spec.rate,
        devices: spec.devices,
        kafka_rtt_ms: spec.kafka_rtt.as_millis() as u64,
        fences: spec.fences,
        seconds,
        sent: if spec.feed == Feed::Mqtt {
            sent_total
        } else {
            accepted_total
        },
        accepted: accepted_total,
        committed: committed_total,
        stored: stored_total,
        accepted_per_s: mean(|s| s.accepted_per_s),
        committed_per_s: mean(|s| s.committed_per_s),
        stored_per_s: mean(|s| s.stored_per_s),
        kafka_latency,
        mysql_latency,
        rss_max_mb: samples.iter().map(|s| s.rss_mb).fold(0.0, f64::max),
        cpu_mean_percent: mean(|s| s.cpu_percent),
        backlog_max_bytes: samples.iter().map(|s| s.backlog_bytes).fold(0.0, f64::max),
        uplink,
        stages,
        samples,
    })
}

/// Creates `<dir>/<name>.log` for a child process's stderr.
pub fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    Ok(std::fs::File::create(dir.join(format!("{name}.log")))?)
}

/// Ends the persistent MQTT session of `client_id` with whatever the broker
/// still queues for it: connecting with a clean session discards it.
pub async fn remove_session(client_id: &str) -> anyhow::Result<()> {
    visit_broker(client_id, None, Duration::from_secs(10), "removing").await
}

/// Creates a persistent MQTT session with a subscription, so readings
/// published before its owner connects are queued for it.
pub async fn create_session(client_id: &str, filter: &str) -> anyhow::Result<()> {
    visit_broker(client_id, Some(filter), Duration::from_secs(30), "creating").await
}

/// Connects as `client_id` and disconnects once the broker answered. With
/// `subscribe`, the session is persistent and the answer awaited is the
/// subscription's; without, the session is clean (the broker drops any it
/// kept) and the connection's answer is enough.
async fn visit_broker(
    client_id: &str,
    subscribe: Option<&str>,
    limit: Duration,
    what: &str,
) -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (host, port) = mqtt_addr();
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_clean_session(subscribe.is_none());
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    if let Some(filter) = subscribe {
        client.subscribe(filter, QoS::AtLeastOnce).await?;
    }
    tokio::time::timeout(limit, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) if subscribe.is_none() => return Ok(()),
                Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => bail!("{what} the MQTT session {client_id}: {e}"),
            }
        }
    })
    .await
    .with_context(|| format!("{what} the MQTT session {client_id} timed out"))??;
    client.disconnect().await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    Ok(())
}

/// Reference point: what Mosquitto alone passes from the same simulated
/// devices to one QoS 1 subscriber, per second.
pub async fn mosquitto_alone(
    devices: usize,
    connections: usize,
    duration: Duration,
    rate: f64,
) -> anyhow::Result<(f64, Percentiles)> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let sfx = unique("mqref");
    let (host, port) = mqtt_addr();
    let mut opts = MqttOptions::new(format!("sub-{sfx}"), host, port);
    opts.set_clean_session(true);
    opts.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    client
        .subscribe(format!("{sfx}/devices/#"), QoS::AtLeastOnce)
        .await?;
    let received = Arc::new(AtomicU64::new(0));
    let subscribed = Arc::new(AtomicBool::new(false));
    // Device timestamp to the subscriber's receipt, once measuring.
    let latency = Arc::new(Mutex::new(new_histogram()));
    let measure_from_ms = Arc::new(AtomicI64::new(i64::MAX));
    let (r, s, l, from) = (
        received.clone(),
        subscribed.clone(),
        latency.clone(),
        measure_from_ms.clone(),
    );
    let sub = tokio::spawn(async move {
        #[derive(serde::Deserialize)]
        struct Ts {
            ts: i64,
        }
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    r.fetch_add(1, Relaxed);
                    if let Ok(reading) = serde_json::from_slice::<Ts>(&p.payload)
                        && reading.ts >= from.load(Relaxed)
                        && let Ok(mut h) = l.lock()
                    {
                        let _ = h.record((now_ms() - reading.ts).max(0) as u64);
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => s.store(true, Relaxed),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !subscribed.load(Relaxed) {
        ensure!(
            Instant::now() < deadline,
            "the reference subscriber did not subscribe"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for c in 0..connections.max(1) {
        let config = FleetConfig {
            topic_prefix: format!("{sfx}/"),
            id_prefix: format!("ref-{c}-"),
            devices: (devices / connections.max(1)).max(1),
            readings_per_device: 1_000_000_000,
            readings_per_second: rate / connections.max(1) as f64,
            invalid_every: 0,
            hot_every: 0,
            base_ts_ms: 0,
            live_timestamps: true,
            tracks: None,
        };
        tokio::spawn(run_fleet(
            config,
            mqtt_addr(),
            format!("ref-{sfx}-{c}"),
            Arc::new(FleetProgress::default()),
            stop.clone(),
        ));
    }
    // One second of warm-up, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (t0, n0) = (Instant::now(), received.load(Relaxed));
    measure_from_ms.store(now_ms(), Relaxed);
    tokio::time::sleep(duration).await;
    let passed = (received.load(Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    sub.abort();
    let latency = latency
        .lock()
        .map(|h| Percentiles::of(&h))
        .unwrap_or_default();
    Ok((passed, latency))
}

/// Reference point: what a transactional Kafka producer alone commits per
/// second, with records the size of the agent's and `per_transaction` per
/// transaction; also the mean milliseconds per transaction.
pub fn kafka_alone(duration: Duration, per_transaction: usize) -> anyhow::Result<(f64, f64)> {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let sfx = unique("kref");
    let topic = format!("kref-{sfx}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(create_topics(&[(&topic, 3, false)]))?;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", kafka_brokers())
        .set("transactional.id", format!("kref-{sfx}"))
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    // librdkafka's own trace of the transaction protocol, for profiling.
    if let Ok(debug) = std::env::var("EDGE_BENCH_KAFKA_DEBUG") {
        config
            .set("debug", debug)
            .set_log_level(rdkafka::config::RDKafkaLogLevel::Debug);
    }
    let producer: ThreadedProducer<StderrLog> = config.create_with_context(StderrLog)?;
    producer.init_transactions(Duration::from_secs(30))?;
    let payload = json!({
        "device_id": "dev-0-0001", "seq": 1, "ts": now_ms(), "temperature": 21.5, "humidity": 40.0,
        "battery": 90.0, "lat": 52.5, "lon": 13.4, "speed": 3.0, "gateway_id": "gw-reference",
        "received_ms": now_ms(), "enrichment": {"site": "yard-north", "device_type": "sensor"}
    })
    .to_string();
    let mut committed = 0u64;
    let mut key = 0u64;
    let mut transactions = 0u64;
    producer
        .client()
        .fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let started = Instant::now();
    while started.elapsed() < duration {
        producer.begin_transaction()?;
        for _ in 0..per_transaction {
            key += 1;
            let k = key.to_string();
            let record = BaseRecord::to(&topic)
                .key(k.as_str())
                .payload(payload.as_str());
            edge_agent::sinks::kafka::send(&producer, record)?;
        }
        edge_agent::sinks::kafka::flush_deliveries(&producer, Duration::from_secs(60));
        producer.commit_transaction(Duration::from_secs(60))?;
        committed += per_transaction as u64;
        transactions += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(producer);
    rt.block_on(delete_topics(&[&topic]));
    Ok((
        committed as f64 / elapsed,
        elapsed * 1000.0 / transactions.max(1) as f64,
    ))
}

/// librdkafka's log lines on stderr with a millisecond clock.
struct StderrLog;

impl rdkafka::ClientContext for StderrLog {
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        eprintln!("{} {fac} {log_message}", now_ms() % 100_000);
    }
}

impl rdkafka::producer::ProducerContext for StderrLog {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// One panel of the plot: its unit, and each series' name, colour and values.
type SeriesSet<'a> = (&'a str, Vec<(&'a str, &'a str, Vec<f64>)>);

/// Throughput (top) and latency percentiles (bottom) over the run, as an
/// SVG a person can look at.
pub fn plot(r: &RunResult) -> String {
    let (w, h, left, right) = (900.0, 560.0, 80.0, 20.0);
    let panel_h = 200.0;
    let tops = [50.0, 320.0];
    let t_max = r.samples.last().map(|s| s.t).unwrap_or(1.0).max(1.0);
    let x = |t: f64| left + (w - left - right) * t / t_max;
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/>\
         <text x='{left}' y='22' font-size='15'>{} — {} feed, target {} readings/s, {} devices</text>",
        xml(&r.name),
        r.feed,
        if r.target_rate > 0.0 {
            format!("{:.0}", r.target_rate)
        } else {
            "open loop".into()
        },
        r.devices
    );
    let series_sets: [SeriesSet<'_>; 2] = [
        (
            "readings/s",
            vec![
                (
                    "accepted",
                    "#1f77b4",
                    r.samples.iter().map(|s| s.accepted_per_s).collect(),
                ),
                (
                    "committed to Kafka",
                    "#2ca02c",
                    r.samples.iter().map(|s| s.committed_per_s).collect(),
                ),
                (
                    "stored in MariaDB",
                    "#d62728",
                    r.samples.iter().map(|s| s.stored_per_s).collect(),
                ),
            ],
        ),
        (
            "ms to Kafka commit",
            vec![
                (
                    "p50",
                    "#1f77b4",
                    r.samples.iter().map(|s| s.kafka_latency.p50).collect(),
                ),
                (
                    "p99",
                    "#ff7f0e",
                    r.samples.iter().map(|s| s.kafka_latency.p99).collect(),
                ),
                (
                    "p99.9",
                    "#d62728",
                    r.samples.iter().map(|s| s.kafka_latency.p999).collect(),
                ),
            ],
        ),
    ];
    for ((label, series), top) in series_sets.iter().zip(tops) {
        let y_max = series
            .iter()
            .flat_map(|(_, _, v)| v.iter().copied())
            .fold(0.0, f64::max)
            .max(1.0)
            * 1.1;
        let y = |v: f64| top + panel_h - panel_h * v / y_max;
        svg += &format!(
            "<rect x='{left}' y='{top}' width='{}' height='{panel_h}' fill='none' stroke='#999'/>\
             <text x='10' y='{}' transform='rotate(-90 10 {})' >{label}</text>",
            w - left - right,
            top + panel_h / 2.0,
            top + panel_h / 2.0
        );
        for i in 0..=4 {
            let v = y_max * f64::from(i) / 4.0;
            svg += &format!(
                "<text x='{}' y='{}' text-anchor='end'>{}</text><line x1='{left}' x2='{}' y1='{}' y2='{}' stroke='#eee'/>",
                left - 5.0,
                y(v) + 4.0,
                human(v),
                w - right,
                y(v),
                y(v)
            );
        }
        for (i, (name, color, values)) in series.iter().enumerate() {
            if values.iter().all(|v| *v == 0.0) {
                continue;
            }
            let points: Vec<String> = r
                .samples
                .iter()
                .zip(values)
                .map(|(s, v)| format!("{:.1},{:.1}", x(s.t), y(*v)))
                .collect();
            svg += &format!(
                "<polyline fill='none' stroke='{color}' stroke-width='2' points='{}'/>\
                 <text x='{}' y='{}' fill='{color}'>{name}</text>",
                points.join(" "),
                left + 10.0 + 170.0 * i as f64,
                top + 15.0
            );
        }
        svg += &format!(
            "<text x='{}' y='{}' text-anchor='middle'>seconds</text>",
            left + (w - left - right) / 2.0,
            top + panel_h + 28.0
        );
        for i in 0..=5 {
            let t = t_max * f64::from(i) / 5.0;
            svg += &format!(
                "<text x='{}' y='{}' text-anchor='middle'>{t:.0}</text>",
                x(t),
                top + panel_h + 14.0
            );
        }
    }
    svg += "</svg>\n";
    svg
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(counts: &[(&str, f64)]) -> BTreeMap<String, f64> {
        counts
            .iter()
            .map(|(le, n)| (format!("h_bucket{{le=\"{le}\"}}"), *n))
            .collect()
    }

    #[test]
    fn bucket_percentiles_count_only_the_window_and_give_upper_bounds() {
        // Before the window: 100 fast observations, which must not count.
        let from = buckets(&[
            ("0.001", 100.0),
            ("0.01", 100.0),
            ("0.05", 100.0),
            ("+Inf", 100.0),
        ]);
        // In the window: 90 more at most 1 ms, 8 up to 10 ms, 1 up to 50 ms
        // and 1 past the last bound.
        let to = buckets(&[
            ("0.001", 190.0),
            ("0.01", 198.0),
            ("0.05", 199.0),
            ("+Inf", 200.0),
        ]);
        let p = BucketPercentiles::between("h", &from, &to);
        assert_eq!(p.count, 100);
        assert_eq!(p.p50_ms, 1.0);
        assert_eq!(p.p99_ms, 50.0);
        assert_eq!(p.over_10ms, 2);
        // Past the last bound, the percentile is unbounded.
        let to = buckets(&[
            ("0.001", 100.0),
            ("0.01", 100.0),
            ("0.05", 100.0),
            ("+Inf", 200.0),
        ]);
        let p = BucketPercentiles::between("h", &from, &to);
        assert!(p.p50_ms.is_infinite());
        assert_eq!(BucketPercentiles::show(p.p50_ms), "> 10000 ms");
        // No histogram: nothing measured.
        let p = BucketPercentiles::between("other", &from, &to);
        assert_eq!(p.count, 0);
    }
}
