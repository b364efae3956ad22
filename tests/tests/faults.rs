//! Exactly-once under real failures. Each scenario runs the real chain:
//! a fleet of MQTT devices → Mosquitto → edge-agent (its own process) →
//! Kafka (transactions) → cloud-bridge (its own process) → MariaDB rows and
//! OpenSearch alerts, breaks something on purpose, and then checks that
//! MariaDB holds exactly the valid readings the devices sent (no missing,
//! no duplicate), that Kafka holds each of them once, and that the alerts
//! index holds exactly the expected alert ids. The devices retransmit what
//! the broker did not acknowledge, as real ones do.
//!
//! Every scenario is seeded and prints one summary line. The short version
//! runs in CI; `EDGE_FAULTS_LONG=1` runs the long one (a 100,000-reading
//! run with hundreds of agent crashes, see the README), `EDGE_FAULTS_SEED`
//! picks the seed.
//!
//! The scenarios stop and start the shared test services, so they run one
//! after another (a lock) and in their own test binary.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use edge_tests::fleet::{FleetConfig, FleetProgress, run_fleet};
use edge_tests::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::Row;

const AGENT: &str = env!("CARGO_BIN_EXE_fault-agent");
const BRIDGE: &str = env!("CARGO_BIN_EXE_fault-bridge");
const SERVICES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/services");

/// The shared services are stopped and started by the scenarios: one at a
/// time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn long_run() -> bool {
    std::env::var("EDGE_FAULTS_LONG").is_ok_and(|v| v == "1")
}

fn seed() -> u64 {
    std::env::var("EDGE_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261126)
}

/// Stops or starts one of the test services with the project's scripts.
fn service(action: &str, name: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let status = Command::new(format!("{SERVICES}/{action}"))
        .arg(name)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running tests/services/{action} {name}"))?;
    ensure!(
        status.success(),
        "tests/services/{action} {name} failed ({status})"
    );
    eprintln!(
        "[faults] {name} {action} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A process under test; killed (SIGKILL) when dropped.
struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    fn exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("checking on {}", self.what))
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the process with SIGTERM, so that it finishes what it sent
    /// (a bridge's bulk request in flight would otherwise be indexed after
    /// the cleanup deleted the index, and create it again); SIGKILL if it
    /// is not gone within `grace`.
    async fn terminate(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + grace;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.kill9();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One scenario's world: its own topics, database, index, data folder,
/// gateway id and devices.
struct World {
    name: &'static str,
    sfx: String,
    topics: [String; 4],
    db: Option<TestDatabase>,
    index: String,
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    agent_config: PathBuf,
    fleet: FleetConfig,
    agent: Option<Proc>,
    agent_starts: u32,
    bridges: Vec<Option<Proc>>,
    bridge_starts: u32,
    http: reqwest::Client,
    rng: StdRng,
    mount: Option<PathBuf>,
}

impl World {
    async fn new(
        name: &'static str,
        devices: usize,
        readings_per_device: u64,
        rate: f64,
        data_dir: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        Self::with_lanes(name, devices, readings_per_device, rate, data_dir, 2).await
    }

    /// [`World::new`] with the agent's `kafka.transaction_lanes`.
    async fn with_lanes(
        name: &'static str,
        devices: usize,
        readings_per_device: u64,
        rate: f64,
        data_dir: Option<PathBuf>,
        lanes: usize,
    ) -> anyhow::Result<Self> {
        let sfx = unique(name);
        let topics = [
            format!("data-{sfx}"),
            format!("dlq-{sfx}"),
            format!("alerts-{sfx}"),
            format!("offsets-{sfx}"),
        ];
        create_topics(&[
            (&topics[0], 3, false),
            (&topics[1], 1, false),
            (&topics[2], 2, false),
            (&topics[3], 1, true),
        ])
        .await?;
        let db = TestDatabase::create("edge_faults").await?;
        let dir = tempfile::tempdir()?;
        let fleet = FleetConfig {
            topic_prefix: format!("{sfx}/"),
            id_prefix: format!("{name}-"),
            devices,
            readings_per_device,
            readings_per_second: rate,
            invalid_every: 97,
            hot_every: 10,
            base_ts_ms: now_ms() - 60_000,
            live_timestamps: false,
            tracks: None,
        };
        let registry = dir.path().join("registry.json");
        std::fs::write(&registry, fleet.registry_json().to_string())?;
        let data_dir = data_dir.unwrap_or_else(|| dir.path().join("data"));
        let (mqtt_host, mqtt_port) = mqtt_addr();
        let toml = format!(
            r#"
gateway_id = "gw-{sfx}"
data_dir = "{data}"
[sources.mqtt]
host = "{mqtt_host}"
port = {mqtt_port}
client_id = "agent-{sfx}"
topic_prefix = "{sfx}/"
topics = ["{sfx}/devices/#"]
[registry]
file = "{registry}"
[http]
listen = ""
[kafka]
brokers = "{brokers}"
topic_data = "{t0}"
topic_dlq = "{t1}"
topic_alerts = "{t2}"
topic_offsets = "{t3}"
transaction_lanes = {lanes}
[progress]
interval_seconds = 0
"#,
            data = data_dir.display(),
            registry = registry.display(),
            brokers = kafka_brokers(),
            t0 = topics[0],
            t1 = topics[1],
            t2 = topics[2],
            t3 = topics[3],
        );
        // Fails here, with the agent's own message, if the config is wrong.
        edge_agent::Config::from_toml(&toml, "fault test")?;
        let agent_config = dir.path().join("agent.toml");
        std::fs::write(&agent_config, toml)?;
        Ok(Self {
            name,
            index: format!("alerts-{}", sfx.to_lowercase()),
            sfx,
            topics,
            db: Some(db),
            dir,
            data_dir,
            agent_config,
            fleet,
            agent: None,
            agent_starts: 0,
            bridges: Vec::new(),
            bridge_starts: 0,
            http: reqwest::Client::new(),
            rng: StdRng::seed_from_u64(seed() ^ fnv(name)),
            mount: None,
        })
    }

    fn db_url(&self) -> String {
        self.db.as_ref().map(|d| d.url.clone()).unwrap_or_default()
    }

    fn log(&self, what: &str) -> anyhow::Result<std::fs::File> {
        Ok(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{what}.log")))?)
    }

    fn log_text(&self, what: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{what}.log"))).unwrap_or_default()
    }

    /// Creates the agent's persistent MQTT session and its subscription
    /// before any device publishes, as a deployed gateway has: readings
    /// published before the agent first connects are queued for it.
    async fn create_agent_session(&self) -> anyhow::Result<()> {
        edge_tests::bench::create_session(
            &format!("agent-{}", self.sfx),
            &format!("{}/devices/#", self.sfx),
        )
        .await
    }

    /// Removes the agent's MQTT session (cleanup).
    async fn remove_agent_session(&self) {
        if let Err(e) = edge_tests::bench::remove_session(&format!("agent-{}", self.sfx)).await {
            eprintln!("warning: the agent's MQTT session stays on the broker: {e:#}");
        }
    }

    fn start_agent(&mut self, fault: Option<String>) -> anyhow::Result<()> {
        let log = self.log("agent")?;
        let mut cmd = Command::new(AGENT);
        cmd.arg("--config")
            .arg(&self.agent_config)
            .arg("run")
            .env("RUST_LOG", "info,rdkafka=warn")
            .env_remove("EDGE_FAULT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(f) = &fault {
            cmd.env("EDGE_FAULT", f);
        }
        let child = cmd.spawn().context("starting the agent")?;
        self.agent_starts += 1;
        self.agent = Some(Proc {
            child,
            what: "the agent".into(),
        });
        Ok(())
    }

    fn start_bridge(&mut self, slot: usize) -> anyhow::Result<()> {
        let log = self.log(&format!("bridge-{slot}"))?;
        let child = Command::new(BRIDGE)
            .arg("run")
            .env("RUST_LOG", "info,rdkafka=warn,sqlx=warn")
            .env("CLOUD_BRIDGE_KAFKA_BROKERS", kafka_brokers())
            .env("CLOUD_BRIDGE_GROUP_ID", format!("bridge-{}", self.sfx))
            .env("CLOUD_BRIDGE_TOPIC_DATA", &self.topics[0])
            .env("CLOUD_BRIDGE_TOPIC_ALERTS", &self.topics[2])
            .env("CLOUD_BRIDGE_TOPIC_DLQ", &self.topics[1])
            .env("CLOUD_BRIDGE_API_LISTEN", "127.0.0.1:0")
            .env("CLOUD_BRIDGE_MYSQL_URL", self.db_url())
            .env("CLOUD_BRIDGE_OPENSEARCH_URL", opensearch_url())
            .env("CLOUD_BRIDGE_ALERTS_INDEX", &self.index)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the bridge")?;
        self.bridge_starts += 1;
        if self.bridges.len() <= slot {
            self.bridges.resize_with(slot + 1, || None);
        }
        self.bridges[slot] = Some(Proc {
            child,
            what: format!("bridge {slot}"),
        });
        Ok(())
    }

    /// Fails if a process that should be running has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(a) = self.agent.as_mut()
            && let Some(status) = a.exited()?
        {
            bail!(
                "the agent exited ({status}) when no fault asked it to; its log:\n{}",
                tail(&self.log_text("agent"), 40)
            );
        }
        for (slot, b) in self.bridges.iter_mut().enumerate() {
            if let Some(b) = b.as_mut()
                && let Some(status) = b.exited()?
            {
                bail!(
                    "bridge {slot} exited ({status}); its log:\n{}",
                    tail(&self.log_text(&format!("bridge-{slot}")), 40)
                );
            }
        }
        Ok(())
    }

    fn spawn_fleet(&self) -> (Arc<FleetProgress>, Arc<AtomicBool>) {
        let progress = Arc::new(FleetProgress::default());
        let stop = Arc::new(AtomicBool::new(false));
        tokio::spawn(run_fleet(
            self.fleet.clone(),
            mqtt_addr(),
            format!("fleet-{}", self.sfx),
            progress.clone(),
            stop.clone(),
        ));
        (progress, stop)
    }

    /// Waits until the fleet has produced `n` readings (the running
    /// processes must stay up meanwhile).
    async fn until_produced(
        &mut self,
        progress: &FleetProgress,
        n: u64,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while progress.produced.load(Relaxed) < n {
            self.check_running()?;
            ensure!(
                Instant::now() < deadline,
                "{}: the fleet produced {} of {n} readings in {limit:?}",
                self.name,
                progress.produced.load(Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Waits for the end of the run and checks the outcome: every valid
    /// reading stored once, nothing else; Kafka holding each once; the
    /// alerts index holding exactly the expected ids. Prints the summary.
    async fn verify(
        &mut self,
        progress: &FleetProgress,
        stop: &AtomicBool,
        crashes: u32,
    ) -> anyhow::Result<()> {
        let limit = Duration::from_secs(if long_run() { 1800 } else { 300 });
        let deadline = Instant::now() + limit;
        while !progress.done.load(Relaxed) {
            self.check_running()?;
            ensure!(
                Instant::now() < deadline,
                "{}: the broker acknowledged {} of {} readings in {limit:?}",
                self.name,
                progress.acked.load(Relaxed),
                self.fleet.total()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, Relaxed);
        let expected = self.fleet.expected_valid();
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(1)
            .connect(&self.db_url())
            .await?;
        let mut stored = 0i64;
        loop {
            self.check_running()?;
            // The bridge creates the table at start: until then there is
            // nothing stored.
            if let Ok(row) = sqlx::query("SELECT COUNT(*) AS n FROM iot_metrics")
                .fetch_one(&pool)
                .await
            {
                stored = row.try_get("n")?;
            }
            if stored as usize >= expected.len() {
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let rows = sqlx::query("SELECT device_id, seq FROM iot_metrics")
            .fetch_all(&pool)
            .await?;
        // Dead letters: iot_dlq holds each committed iot-dlq record once.
        let dead_letters =
            read_topic_to_end(&self.topics[1], 1, &format!("dlq-check-{}", self.sfx))?.len();
        let dlq_rows = wait_for("the dead letters in iot_dlq", limit, || {
            let pool = pool.clone();
            async move {
                let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM iot_dlq")
                    .fetch_one(&pool)
                    .await?;
                Ok((n as usize >= dead_letters).then_some(n as usize))
            }
        })
        .await
        .unwrap_or(0);
        pool.close().await;
        let mut got = BTreeSet::new();
        for r in &rows {
            got.insert((r.try_get::<String, _>(0)?, r.try_get::<u64, _>(1)?));
        }
        let missing = expected.difference(&got).count();
        let unexpected = got.difference(&expected).count();

        // Kafka: each valid reading in exactly one committed record.
        let records = read_topic_to_end(&self.topics[0], 3, &format!("check-{}", self.sfx))?;
        let mut keys = BTreeSet::new();
        for r in &records {
            keys.insert((
                r["device_id"].as_str().unwrap_or_default().to_string(),
                r["seq"].as_u64().unwrap_or_default(),
            ));
        }
        let kafka_duplicates = records.len() - keys.len();
        let bridge_duplicates: u64 = (0..self.bridges.len())
            .map(|slot| count_duplicate_rows(&self.log_text(&format!("bridge-{slot}"))))
            .sum();

        // Alerts: exactly the expected ids in the index.
        let expected_alerts = self.fleet.expected_alert_ids();
        let alerts = wait_for("the alerts index", limit, || {
            let (http, index, n) = (self.http.clone(), self.index.clone(), expected_alerts.len());
            async move {
                let ids = indexed_ids(&http, &index).await?;
                Ok((ids.len() >= n).then_some(ids))
            }
        })
        .await
        .unwrap_or_default();
        let alert_set: BTreeSet<String> = alerts.iter().cloned().collect();
        let alerts_missing = expected_alerts.difference(&alert_set).count();
        let alerts_extra = alert_set.difference(&expected_alerts).count();

        println!(
            "fault scenario {name} (seed {seed}): sent {sent} readings ({valid} valid, {retx} retransmitted, \
             {disc} device disconnects), agent starts {starts}, crashes {crashes}, bridge starts {bstarts} / \
             stored {stored} / missing {missing} / duplicated {dup} (Kafka {kafka_duplicates}, \
             at MySQL's unique key {bridge_duplicates}, unexpected {unexpected}) / alerts expected {ea}, \
             indexed {ia}, missing {alerts_missing}, extra {alerts_extra} / dead letters {dead_letters}, in iot_dlq {dlq_rows}",
            name = self.name,
            seed = seed(),
            sent = self.fleet.total(),
            valid = expected.len(),
            retx = progress.retransmitted.load(Relaxed),
            disc = progress.disconnects.load(Relaxed),
            starts = self.agent_starts,
            bstarts = self.bridge_starts,
            stored = rows.len(),
            dup = kafka_duplicates as u64 + bridge_duplicates,
            ea = expected_alerts.len(),
            ia = alerts.len(),
        );
        ensure!(
            missing == 0 && unexpected == 0 && rows.len() == expected.len(),
            "{}: MariaDB holds {} rows, {missing} valid readings missing, {unexpected} not expected; agent log:\n{}",
            self.name,
            rows.len(),
            tail(&self.log_text("agent"), 30)
        );
        ensure!(
            kafka_duplicates == 0 && bridge_duplicates == 0 && keys == expected,
            "{}: Kafka holds {} records for {} readings ({} expected); {bridge_duplicates} duplicates reached MySQL's unique key",
            self.name,
            records.len(),
            keys.len(),
            expected.len()
        );
        ensure!(
            dlq_rows == dead_letters,
            "{}: iot_dlq holds {dlq_rows} rows for {dead_letters} committed dead letters",
            self.name
        );
        ensure!(
            alerts_missing == 0 && alerts_extra == 0 && alerts.len() == expected_alerts.len(),
            "{}: alerts index holds {} ids, {alerts_missing} missing, {alerts_extra} not expected",
            self.name,
            alerts.len()
        );
        Ok(())
    }

    async fn cleanup(mut self) {
        self.agent = None;
        for bridge in self.bridges.iter_mut().flatten() {
            bridge.terminate(Duration::from_secs(30)).await;
        }
        self.bridges.clear();
        self.remove_agent_session().await;
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        delete_topics(&topics).await;
        if let Some(db) = self.db.take() {
            db.drop_now().await;
        }
        let _ = self
            .http
            .delete(format!("{}/{}", opensearch_url(), self.index))
            .send()
            .await;
        if let Some(mount) = self.mount.take() {
            let _ = Command::new("umount").arg(&mount).status();
        }
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Duplicates the bridge reported at MySQL's unique key (from its log).
fn count_duplicate_rows(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("let a duplicate through"))
        .filter_map(|l| {
            let rest = &l[l.find("duplicates=")? + "duplicates=".len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Ids in the index (after a refresh); empty while it does not exist.
async fn indexed_ids(http: &reqwest::Client, index: &str) -> anyhow::Result<Vec<String>> {
    let base = opensearch_url();
    let Ok(refresh) = http.post(format!("{base}/{index}/_refresh")).send().await else {
        return Ok(Vec::new());
    };
    if !refresh.status().is_success() {
        return Ok(Vec::new());
    }
    let mut ids = Vec::new();
    let mut page = post_json(
        http,
        format!("{base}/{index}/_search?scroll=1m"),
        serde_json::json!({"size": 5000, "_source": false, "query": {"match_all": {}}}),
    )
    .await?;
    loop {
        let hits = page["hits"]["hits"].as_array().cloned().unwrap_or_default();
        if hits.is_empty() {
            break;
        }
        ids.extend(
            hits.iter()
                .filter_map(|h| h["_id"].as_str().map(str::to_string)),
        );
        let Some(scroll_id) = page["_scroll_id"].as_str().map(str::to_string) else {
            break;
        };
        page = post_json(
            http,
            format!("{base}/_search/scroll"),
            serde_json::json!({"scroll": "1m", "scroll_id": scroll_id}),
        )
        .await?;
    }
    ids.sort();
    Ok(ids)
}

async fn post_json(
    http: &reqwest::Client,
    url: String,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let response = http
        .post(&url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?;
    let status = response.status();
    let bytes = response.bytes().await?;
    ensure!(
        status.is_success(),
        "POST {url}: {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    Ok(serde_json::from_slice(&bytes)?)
}

/// Runs `body` with the world, then cleans the world up whatever happened.
async fn scenario<F>(world: World, body: F) -> anyhow::Result<()>
where
    F: AsyncFnOnce(&mut World) -> anyhow::Result<()>,
{
    let mut world = world;
    let result = body(&mut world).await;
    if result.is_err() {
        eprintln!(
            "[faults] {} failed; agent log tail:\n{}",
            world.name,
            tail(&world.log_text("agent"), 20)
        );
        for slot in 0..world.bridges.len() {
            let name = format!("bridge-{slot}");
            // Without librdkafka's connection errors, which flood an outage.
            let text: String = world
                .log_text(&name)
                .lines()
                .filter(|l| !l.contains("Global error"))
                .map(|l| format!("{l}\n"))
                .collect();
            eprintln!("[faults] {name} log tail:\n{}", tail(&text, 80));
        }
    }
    world.cleanup().await;
    result
}

/// Starts the bridge, the agent and the fleet.
async fn start_all(w: &mut World) -> anyhow::Result<(Arc<FleetProgress>, Arc<AtomicBool>)> {
    w.create_agent_session().await?;
    w.start_bridge(0)?;
    w.start_agent(None)?;
    Ok(w.spawn_fleet())
}

// ---------------------------------------------------------------------------
// Agent crashes: kill -9 at random moments, and power cuts at the seams of
// the exactly-once chain.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_crashes_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    agent_crashes("agent_crashes", 2).await
}

/// The same with three lanes, where transactions overlap: a crash may hit
/// while one transaction commits and the next is open on another lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_crashes_with_overlapping_transactions_lose_and_duplicate_nothing()
-> anyhow::Result<()> {
    agent_crashes("overlap_crashes", 3).await
}

async fn agent_crashes(name: &'static str, lanes: u64) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    init_logging();
    let (devices, per_device, crashes) = if long_run() {
        (100, 1000, 200)
    } else {
        (50, 300, 8)
    };
    // Slow enough that the crashes (a couple of seconds each, with the
    // restart) happen while the devices are still sending.
    let rate = (devices as u64 * per_device) as f64 / (f64::from(crashes) * 2.0);
    let world = World::with_lanes(name, devices, per_device, rate, None, lanes as usize).await?;
    scenario(world, async |w| {
        let (progress, stop) = start_all(w).await?;
        let mut crashed = 0u32;
        let mut kinds = std::collections::BTreeMap::<&str, u32>::new();
        // Where the lanes of each Kafka point's crashes start, so that
        // short runs (two crashes per point) reach every lane over seeds.
        let lane_offset = w.rng.random_range(0..lanes);
        while crashed < crashes && !progress.done.load(Relaxed) {
            // Cycle through the ways to die; moments and occurrences random.
            let kind = [
                "kill -9",
                "outbox_committed",
                "kafka_sent",
                "kafka_committed",
            ][crashed as usize % 4];
            let deadline = Instant::now() + Duration::from_secs(60);
            if kind == "kill -9" {
                let after = Duration::from_millis(w.rng.random_range(100..2500));
                let until = Instant::now() + after;
                while Instant::now() < until {
                    w.check_running()?;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if let Some(a) = w.agent.as_mut() {
                    a.kill9();
                }
            } else {
                // The current agent runs until the planned point; restart it
                // armed with the next fault.
                if let Some(a) = w.agent.as_mut() {
                    a.kill9();
                }
                // The uplink's transactions take turns on the lanes and a
                // start begins on lane 0, so transaction n runs on lane
                // (n - 1) % lanes: the crashes of each Kafka kind take the
                // lanes in turn.
                let n = if kind.starts_with("kafka_") {
                    let earlier = u64::from(kinds.get(kind).copied().unwrap_or(0));
                    lanes * w.rng.random_range(1..3) + (earlier + lane_offset) % lanes
                } else {
                    w.rng.random_range(1..6)
                };
                w.start_agent(Some(format!("{kind}:{n}")))?;
                loop {
                    if let Some(status) =
                        w.agent.as_mut().map(|a| a.exited()).transpose()?.flatten()
                    {
                        ensure!(
                            !status.success(),
                            "the agent armed with {kind}:{n} exited cleanly instead of crashing"
                        );
                        break;
                    }
                    if progress.done.load(Relaxed) && Instant::now() > deadline {
                        // Nothing left to send: the point is not reached.
                        break;
                    }
                    ensure!(
                        Instant::now() < deadline + Duration::from_secs(60),
                        "the agent armed with {kind}:{n} neither crashed nor finished"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            crashed += 1;
            *kinds.entry(kind).or_default() += 1;
            w.agent = None;
            w.start_agent(None)?;
        }
        let faults_hit = w
            .log_text("agent")
            .matches("fault injection: crashing at")
            .count();
        eprintln!("[faults] agent crashes: {kinds:?}, {faults_hit} crash points reached");
        ensure!(
            faults_hit > 0 || long_run(),
            "no crash point was reached: is the fault-injection feature compiled in?"
        );
        w.verify(&progress, &stop, crashed).await
    })
    .await
}

/// With three lanes a transaction is sent while the previous one commits.
/// When that commit is refused, the transaction sent after it must not
/// commit either (its marker would pass the refused one's readings): the
/// agent aborts it, starts its session over and sends both again. Every
/// fifth commit is refused (as the coordinator would); a refusal meets a
/// transaction sent after it whenever readings wait, which they do while
/// the devices send and the backlog of each restart drains. The run waits
/// until that happened, and then nothing may be lost or stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_commit_takes_the_transaction_sent_after_it_along() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    init_logging();
    let world = World::with_lanes("refused_commit", 40, 1000, 4000.0, None, 3).await?;
    scenario(world, async |w| {
        w.create_agent_session().await?;
        w.start_bridge(0)?;
        w.start_agent(Some("kafka_commit_refused:5".into()))?;
        let (progress, stop) = w.spawn_fleet();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            w.check_running()?;
            let log = w.log_text("agent");
            if log.contains("aborting the transaction that was sent after it") {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "no refused commit met a transaction sent after it within 120 s ({} refusals); agent log:\n{}",
                log.matches("fault injection: refusing the commit").count(),
                tail(&log, 40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        w.verify(&progress, &stop, 0).await?;
        let log = w.log_text("agent");
        eprintln!(
            "[faults] refused commits: {}, of which met a transaction sent after them: {}",
            log.matches("fault injection: refusing the commit").count(),
            log.matches("aborting the transaction that was sent after it")
                .count()
        );
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------
// Service outages.
// ---------------------------------------------------------------------------

/// Stops `service` when the fleet is a third through, keeps it down while
/// the fleet goes on, starts it again and checks the outcome.
async fn outage(name: &'static str, service_name: &'static str) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    init_logging();
    let world = World::new(name, 40, 250, 2000.0, None).await?;
    let result = scenario(world, async |w| {
        let (progress, stop) = start_all(w).await?;
        let total = w.fleet.total();
        w.until_produced(&progress, total / 3, Duration::from_secs(60))
            .await?;
        service("down", service_name)?;
        let down = Instant::now();
        if service_name != "mosquitto" {
            // The rest of the chain keeps taking readings meanwhile.
            w.until_produced(&progress, total * 2 / 3, Duration::from_secs(60))
                .await?;
        }
        service("up", service_name)?;
        eprintln!(
            "[faults] {service_name} was down for {:.1}s",
            down.elapsed().as_secs_f64()
        );
        w.verify(&progress, &stop, 0).await
    })
    .await;
    // Whatever happened, leave the service running for the next test.
    service("up", service_name)?;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_outage_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    outage("kafka_outage", "kafka").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_outage_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    outage("mariadb_outage", "mariadb").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn opensearch_outage_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    outage("opensearch_outage", "opensearch").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_restart_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    outage("mosquitto_restart", "mosquitto").await
}

// ---------------------------------------------------------------------------
// Bridge crashes and scale-out.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bridge_crashes_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    init_logging();
    let (devices, per_device, rate, kills) = if long_run() {
        (100, 500, 1000.0, 40)
    } else {
        (40, 250, 2000.0, 4)
    };
    let world = World::new("bridge_crashes", devices, per_device, rate, None).await?;
    scenario(world, async |w| {
        let (progress, stop) = start_all(w).await?;
        let total = w.fleet.total();
        for k in 1..=kills {
            // Spread over the run, each at a random point of its slot.
            let slot = total / (kills + 1);
            let at = slot * k + w.rng.random_range(0..slot / 2);
            w.until_produced(&progress, at, Duration::from_secs(60))
                .await?;
            if let Some(b) = w.bridges[0].as_mut() {
                b.kill9();
            }
            w.start_bridge(0)?;
        }
        w.verify(&progress, &stop, kills as u32).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_bridges_one_killed_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    init_logging();
    let world = World::new("two_bridges", 40, 250, 2000.0, None).await?;
    scenario(world, async |w| {
        let (progress, stop) = start_all(w).await?;
        let total = w.fleet.total();
        // Scale out mid-run: the second instance joins the group while
        // readings flow, and takes partitions from the offsets in MySQL.
        w.until_produced(&progress, total / 4, Duration::from_secs(60))
            .await?;
        w.start_bridge(1)?;
        w.until_produced(&progress, total / 2, Duration::from_secs(60))
            .await?;
        // Both hold partitions before one of them dies for good; the
        // other takes its partitions over.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(holds_partitions(&w.log_text("bridge-0"), &w.topics[0])
            && holds_partitions(&w.log_text("bridge-1"), &w.topics[0]))
        {
            w.check_running()?;
            ensure!(
                Instant::now() < deadline,
                "the two bridges did not share the partitions; bridge 1 log:\n{}",
                tail(&w.log_text("bridge-1"), 20)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(mut b) = w.bridges[1].take() {
            b.kill9();
        }
        w.verify(&progress, &stop, 1).await
    })
    .await
}

/// True when the last assignment a bridge logged holds partitions.
fn holds_partitions(log: &str, topic: &str) -> bool {
    log.lines()
        .rev()
        .filter(|l| l.contains(topic))
        .find(|l| l.contains("partitions assigned") || l.contains("partitions revoked"))
        .is_some_and(|l| l.contains("partitions assigned") && !l.contains("partitions=[]"))
}

// ---------------------------------------------------------------------------
// Two agents with one gateway id: one of them is fenced, normally the older.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_agents_with_one_gateway_id_leave_one_producer() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    init_logging();
    let world = World::new("zombie", 40, 250, 2000.0, None).await?;
    scenario(world, async |w| {
        let (progress, stop) = start_all(w).await?;
        let total = w.fleet.total();
        w.until_produced(&progress, total / 3, Duration::from_secs(60))
            .await?;
        // A second agent with the same gateway id (its own data folder and
        // MQTT session; no device talks to it) takes the Kafka
        // transactional id over.
        let toml = std::fs::read_to_string(&w.agent_config)?
            .replace(
                &format!("data_dir = \"{}\"", w.data_dir.display()),
                &format!("data_dir = \"{}\"", w.dir.path().join("twin").display()),
            )
            .replace(&format!("\"{}/", w.sfx), &format!("\"{}-twin/", w.sfx))
            .replace(
                &format!("\"agent-{}\"", w.sfx),
                &format!("\"twin-{}\"", w.sfx),
            );
        let twin_config = w.dir.path().join("twin.toml");
        std::fs::write(&twin_config, toml)?;
        let twin = Command::new(AGENT)
            .arg("--config")
            .arg(&twin_config)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(w.log("twin")?)
            .spawn()
            .context("starting the second agent")?;
        let mut twin = Proc {
            child: twin,
            what: "the second agent".into(),
        };
        // Exactly one of the two must give way, exit with code 3 and say
        // why. Normally that is the first: the second one's init fenced
        // it. But when the second one's init races a commit of the first,
        // Kafka 4.1 may answer that commit with UNKNOWN_SERVER_ERROR and
        // then refuse the second one's init as fenced: the second one
        // exits and the first goes on; or the first one's next session
        // fences the second, which, idle, learns it at its next ownership
        // check (an idle uplink commits its marker every 10 s). Either way
        // one producer is left.
        let deadline = Instant::now() + Duration::from_secs(90);
        let (loser, status) = loop {
            if let Some(status) = w.agent.as_mut().map(|a| a.exited()).transpose()?.flatten() {
                break ("agent", status);
            }
            if let Some(status) = twin.exited()? {
                break ("twin", status);
            }
            ensure!(
                Instant::now() < deadline,
                "neither agent was fenced within 90 s; the first one's log:\n{}",
                tail(&w.log_text("agent"), 20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let log = w.log_text(loser);
        ensure!(
            status.code() == Some(3) && log.contains("this agent was fenced"),
            "the fenced agent ({loser}) must exit with code 3 and say why; it exited with {status}, log:\n{}",
            tail(&log, 20)
        );
        if loser == "agent" {
            eprintln!("[faults] the first agent was fenced and exited with code 3");
            w.agent = None;
            // The operator stops the impostor and starts the gateway again:
            // it fences the second one in turn and ships what it holds,
            // once.
            w.until_produced(&progress, total * 2 / 3, Duration::from_secs(60))
                .await?;
            // The second one was not fenced: it still runs, and stops
            // cleanly when asked.
            ensure!(
                twin.exited()?.is_none(),
                "the second agent exited too; its log:\n{}",
                tail(&w.log_text("twin"), 20)
            );
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(twin.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(60);
            let status = loop {
                if let Some(status) = twin.exited()? {
                    break status;
                }
                ensure!(
                    Instant::now() < deadline,
                    "the second agent did not stop on SIGTERM"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            ensure!(
                status.success(),
                "the second agent exited with {status} on SIGTERM; its log:\n{}",
                tail(&w.log_text("twin"), 20)
            );
            w.start_agent(None)?;
        } else {
            eprintln!(
                "[faults] the second agent was fenced (its init raced a commit of the first): \
                 it exited with code 3 and the first one goes on"
            );
            // The first one keeps shipping: it was not fenced.
            w.until_produced(&progress, total * 2 / 3, Duration::from_secs(60))
                .await?;
            ensure!(
                w.agent.as_mut().map(|a| a.exited()).transpose()?.flatten().is_none(),
                "the first agent exited although the second one gave way; its log:\n{}",
                tail(&w.log_text("agent"), 20)
            );
        }
        w.verify(&progress, &stop, 1).await
    })
    .await
}

// ---------------------------------------------------------------------------
// The gateway's disk fills up.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_disk_holds_input_back_and_loses_nothing() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    init_logging();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("[faults] full_disk SKIPPED: mounting a small tmpfs needs root");
        return Ok(());
    }
    let mount = tempfile::tempdir()?.keep();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&mount)
        .status()
        .context("running mount")?;
    ensure!(
        status.success(),
        "mounting a 48 MiB tmpfs on {mount:?} failed"
    );
    let world = World::new("full_disk", 40, 250, 2000.0, Some(mount.join("data"))).await;
    let mut world = match world {
        Ok(w) => w,
        Err(e) => {
            let _ = Command::new("umount").arg(&mount).status();
            return Err(e);
        }
    };
    world.mount = Some(mount.clone());
    scenario(world, async |w| {
        w.create_agent_session().await?;
        w.start_bridge(0)?;
        w.start_agent(None)?;
        // Wait for the agent to create its database, then fill the disk.
        let db = w.data_dir.join("edge-agent.db");
        wait_for("the agent's database", Duration::from_secs(60), || {
            let db = db.clone();
            async move { Ok(db.exists().then_some(())) }
        })
        .await?;
        // The disk is full before the devices send: the first batches need
        // room the file system no longer has. (Filling it mid-run is not
        // deterministic: SQLite reuses its free pages and WAL space.)
        let ballast = mount.join("ballast");
        fill(&ballast)?;
        let (progress, stop) = w.spawn_fleet();
        let log_has = |w: &World, s: &str| w.log_text("agent").contains(s);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !log_has(w, "is full: input is held back") {
            w.check_running()?;
            ensure!(
                Instant::now() < deadline,
                "the agent never reported the full disk; its log:\n{}",
                tail(&w.log_text("agent"), 30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("[faults] full disk reported; freeing space");
        std::fs::remove_file(&ballast)?;
        w.verify(&progress, &stop, 0).await?;
        ensure!(
            log_has(w, "has room again: taking input"),
            "the agent did not say it resumed"
        );
        for line in w.log_text("agent").lines().filter(|l| {
            l.contains("disk full") || l.contains("room again") || l.contains("disk reserve")
        }) {
            eprintln!("[faults] agent: {line}");
        }
        Ok(())
    })
    .await
}

/// Fills the file system `path` is on, leaving a few KiB.
fn fill(path: &Path) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path)?;
    let block = vec![0u8; 64 * 1024];
    loop {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => return Err(e.into()),
        }
    }
    let mut small = [0u8; 4096];
    small.fill(1);
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    Ok(())
}
