//! The exactly-once uplink across restarts, against the real Kafka: an agent
//! commits transactions, stops, starts again with the same gateway id, finds
//! its marker (read_committed, past other transactions' markers) and goes
//! on. Kafka holds every reading exactly once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context as _;
use edge_tests::*;

fn config(
    sfx: &str,
    device_prefix: &str,
    data_dir: &std::path::Path,
    data: &str,
    dlq: &str,
    offsets: &str,
) -> anyhow::Result<edge_agent::Config> {
    let toml = format!(
        r#"
gateway_id = "gw-{sfx}"
data_dir = "{}"
[sources.demo]
devices = 50
readings_per_second = 3000
invalid_fraction = 0.01
seed = 3
device_prefix = "{device_prefix}"
[kafka]
brokers = "{}"
topic_data = "{data}"
topic_dlq = "{dlq}"
topic_offsets = "{offsets}"
[progress]
interval_seconds = 0
"#,
        data_dir.display(),
        kafka_brokers()
    );
    Ok(edge_agent::Config::from_toml(&toml, "uplink restart test")?)
}

/// Runs the agent until `records` are committed to Kafka (at least), then
/// stops it; returns its stats.
async fn run_until_committed(
    config: edge_agent::Config,
    records: u64,
) -> anyhow::Result<Arc<edge_agent::Stats>> {
    let stats = Arc::new(edge_agent::Stats::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(edge_agent::run(config, stats.clone(), async {
        let _ = stopped.await;
    }));
    let s = stats.clone();
    let waited = wait_for(
        "records committed to Kafka",
        Duration::from_secs(120),
        || {
            let s = s.clone();
            async move { Ok((s.kafka_records_committed.load(Relaxed) >= records).then_some(())) }
        },
    )
    .await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(60), agent)
        .await
        .context("agent did not stop")??
        .map_err(|e| anyhow::anyhow!("agent failed: {e}"))?;
    waited.map(|_| stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_agent_resumes_after_its_marker_without_duplicates() -> anyhow::Result<()> {
    init_logging();
    let sfx = unique("restart");
    let (data, dlq, offsets) = (
        format!("data-{sfx}"),
        format!("dlq-{sfx}"),
        format!("offsets-{sfx}"),
    );
    create_topics(&[(&data, 2, false), (&dlq, 1, false), (&offsets, 1, true)]).await?;
    let result = scenario(&sfx, &data, &dlq, &offsets).await;
    delete_topics(&[&data, &dlq, &offsets]).await;
    result
}

async fn scenario(sfx: &str, data: &str, dlq: &str, offsets: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Another gateway's transaction on the shared offsets topic, so our
    // marker is not the only (or last) record there.
    let other_dir = tempfile::tempdir()?;
    // It simulates its own devices: a device belongs to one gateway.
    let other = config(
        &format!("{sfx}-other"),
        "other-",
        other_dir.path(),
        data,
        dlq,
        offsets,
    )?;

    let first =
        run_until_committed(config(sfx, "demo-", dir.path(), data, dlq, offsets)?, 2_000).await?;
    let marker_1 = first.kafka_committed_batch.load(Relaxed);
    assert!(marker_1 > 0);
    let other = run_until_committed(other, 500).await?;

    let second =
        run_until_committed(config(sfx, "demo-", dir.path(), data, dlq, offsets)?, 2_000).await?;
    let marker_2 = second.kafka_committed_batch.load(Relaxed);
    assert!(
        marker_2 > marker_1,
        "the restarted agent went on after its marker: {marker_1} -> {marker_2}"
    );

    // Kafka holds every reading once (read_committed, both gateways).
    let keys: Vec<(String, u64)> = read_topic_to_end(data, 2, &format!("check-{sfx}"))?
        .iter()
        .map(|v| {
            (
                v["device_id"].as_str().unwrap_or_default().to_string(),
                v["seq"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    let unique: BTreeSet<_> = keys.iter().cloned().collect();
    assert_eq!(keys.len(), unique.len(), "duplicates in Kafka");
    let committed: u64 = [&first, &other, &second]
        .iter()
        .map(|s| s.kafka_records_committed.load(Relaxed))
        .sum();
    let rejected: u64 = [&first, &other, &second]
        .iter()
        .map(|s| s.rejected.load(Relaxed))
        .sum();
    // Committed records are the readings plus the dead letters; a session's
    // counters may miss a last transaction that committed while stopping.
    assert!(
        keys.len() as u64 + rejected >= committed,
        "{} readings in Kafka, {committed} records committed",
        keys.len()
    );
    println!(
        "restart: markers {marker_1} -> {marker_2}, {} readings in Kafka, all unique",
        keys.len()
    );
    Ok(())
}

/// A transaction left open on the uplink's second lane (`/lane-1`) by an
/// instance that died mid-transaction: the next start must end it when it
/// initialises that lane, before it reads its marker. Otherwise the open
/// transaction holds the offsets topic's stable offset back and the marker
/// read waits until Kafka times the transaction out (ten minutes here).
/// Its records and its marker must never become visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_transaction_on_the_second_lane_is_ended_at_start() -> anyhow::Result<()> {
    init_logging();
    let sfx = unique("lane");
    let (data, dlq, offsets) = (
        format!("data-{sfx}"),
        format!("dlq-{sfx}"),
        format!("offsets-{sfx}"),
    );
    create_topics(&[(&data, 2, false), (&dlq, 1, false), (&offsets, 1, true)]).await?;
    let result = open_lane_scenario(&sfx, &data, &dlq, &offsets).await;
    delete_topics(&[&data, &dlq, &offsets]).await;
    result
}

async fn open_lane_scenario(sfx: &str, data: &str, dlq: &str, offsets: &str) -> anyhow::Result<()> {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

    let dir = tempfile::tempdir()?;
    let cfg = config(sfx, "demo-", dir.path(), data, dlq, offsets)?;
    assert_eq!(cfg.kafka.transaction_lanes, 2);
    let lane_1 = cfg.lane_transactional_id(1);
    let gateway = cfg.gateway_id.clone();
    let first = run_until_committed(cfg, 500).await?;
    let marker_1 = first.kafka_committed_batch.load(Relaxed);
    assert!(marker_1 > 0);

    // The dead instance's last transaction, on lane 1: a reading and a
    // marker far ahead, sent and never committed or aborted.
    let ghost_marker = 1_000_000_i64;
    {
        let ghost: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", kafka_brokers())
                .set("transactional.id", &lane_1)
                .set("transaction.timeout.ms", "600000")
                .create()?;
        ghost.init_transactions(Duration::from_secs(30))?;
        ghost.begin_transaction()?;
        let reading =
            serde_json::json!({"device_id": "ghost-1", "seq": 1, "ts": now_ms()}).to_string();
        let marker = serde_json::json!({"gateway_id": gateway, "batch_seq": ghost_marker, "committed_at": now_ms()})
            .to_string();
        edge_agent::sinks::kafka::send(
            &ghost,
            BaseRecord::to(data).key("ghost-1").payload(&reading),
        )?;
        edge_agent::sinks::kafka::send(
            &ghost,
            BaseRecord::to(offsets).key(&gateway).payload(&marker),
        )?;
        edge_agent::sinks::kafka::flush_deliveries(&ghost, Duration::from_secs(30));
        anyhow::ensure!(
            ghost.in_flight_count() == 0,
            "the ghost transaction's records were not delivered"
        );
        // Dropped with the transaction open, as by a crash.
    }

    let second =
        run_until_committed(config(sfx, "demo-", dir.path(), data, dlq, offsets)?, 500).await?;
    let marker_2 = second.kafka_committed_batch.load(Relaxed);
    assert!(
        marker_2 > marker_1 && marker_2 < ghost_marker,
        "the restart went on after its own marker {marker_1}, not the open transaction's: got {marker_2}"
    );

    let readings = read_topic_to_end(data, 2, &format!("check-{sfx}"))?;
    assert!(
        !readings.iter().any(|v| v["device_id"] == "ghost-1"),
        "the open transaction's reading became visible"
    );
    let keys: Vec<(String, u64)> = readings
        .iter()
        .map(|v| {
            (
                v["device_id"].as_str().unwrap_or_default().to_string(),
                v["seq"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    let unique: BTreeSet<_> = keys.iter().cloned().collect();
    assert_eq!(keys.len(), unique.len(), "duplicates in Kafka");
    println!(
        "open lane: markers {marker_1} -> {marker_2}, {} readings in Kafka, none of the open transaction",
        keys.len()
    );
    Ok(())
}

/// An agent running in this process; `stop` ends it.
struct Running {
    stats: Arc<edge_agent::Stats>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), edge_agent::AgentError>>,
}

fn start(config: edge_agent::Config) -> Running {
    let stats = Arc::new(edge_agent::Stats::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(edge_agent::run(config, stats.clone(), async {
        let _ = stopped.await;
    }));
    Running { stats, stop, task }
}

impl Running {
    async fn until_committed(&self, records: u64) -> anyhow::Result<()> {
        let s = self.stats.clone();
        wait_for(
            "records committed to Kafka",
            Duration::from_secs(120),
            || {
                let s = s.clone();
                async move { Ok((s.kafka_records_committed.load(Relaxed) >= records).then_some(())) }
            },
        )
        .await
    }

    async fn stop(self) -> anyhow::Result<Arc<edge_agent::Stats>> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .context("agent did not stop")??
            .map_err(|e| anyhow::anyhow!("agent failed: {e}"))?;
        Ok(self.stats)
    }
}

/// Another gateway's transaction left open on the shared offsets topic
/// while this gateway commits markers after it: read_committed readers stop
/// at the open transaction, so a restart that read only that far would find
/// an older marker of its own and send batches again that Kafka already
/// holds. The restart must wait for the open transaction to end, then find
/// its newest marker; Kafka then holds every reading once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_gateways_open_transaction_does_not_hide_the_newest_marker() -> anyhow::Result<()> {
    init_logging();
    let sfx = unique("hidden");
    let (data, dlq, offsets) = (
        format!("data-{sfx}"),
        format!("dlq-{sfx}"),
        format!("offsets-{sfx}"),
    );
    create_topics(&[(&data, 2, false), (&dlq, 1, false), (&offsets, 1, true)]).await?;
    let result = hidden_marker_scenario(&sfx, &data, &dlq, &offsets).await;
    delete_topics(&[&data, &dlq, &offsets]).await;
    result
}

async fn hidden_marker_scenario(
    sfx: &str,
    data: &str,
    dlq: &str,
    offsets: &str,
) -> anyhow::Result<()> {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

    let dir = tempfile::tempdir()?;
    let first = start(config(sfx, "demo-", dir.path(), data, dlq, offsets)?);
    first.until_committed(300).await?;

    // The other gateway opens a transaction with its marker and keeps it
    // open while this gateway goes on committing markers after it.
    let other: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka_brokers())
            .set("transactional.id", format!("edge-agent-gw-{sfx}-other"))
            .set("transaction.timeout.ms", "600000")
            .create()?;
    other.init_transactions(Duration::from_secs(30))?;
    other.begin_transaction()?;
    let other_marker = serde_json::json!({"gateway_id": format!("gw-{sfx}-other"), "batch_seq": 7, "committed_at": now_ms()})
        .to_string();
    edge_agent::sinks::kafka::send(
        &other,
        BaseRecord::to(offsets)
            .key(&format!("gw-{sfx}-other"))
            .payload(&other_marker),
    )?;
    edge_agent::sinks::kafka::flush_deliveries(&other, Duration::from_secs(30));
    anyhow::ensure!(
        other.in_flight_count() == 0,
        "the other gateway's marker was not delivered"
    );

    let before = first.stats.kafka_records_committed.load(Relaxed);
    first.until_committed(before + 1_000).await?;
    let first = first.stop().await?;
    let marker_1 = first.kafka_committed_batch.load(Relaxed);

    // The restart must not start sending while the open transaction hides
    // its newest marker.
    let second = start(config(sfx, "demo-", dir.path(), data, dlq, offsets)?);
    let s = second.stats.clone();
    let came_up =
        wait_for("the uplink up", Duration::from_secs(5), || {
            let s = s.clone();
            async move {
                Ok(matches!(s.uplink_state(), edge_agent::stats::UplinkState::Up).then_some(()))
            }
        })
        .await
        .is_ok();
    assert!(
        !came_up,
        "the restarted uplink came up while another transaction hid its newest marker"
    );
    other.commit_transaction(Duration::from_secs(30))?;
    second.until_committed(500).await?;
    let second = second.stop().await?;
    let marker_2 = second.kafka_committed_batch.load(Relaxed);
    assert!(marker_2 > marker_1, "markers {marker_1} -> {marker_2}");

    let keys: Vec<(String, u64)> = read_topic_to_end(data, 2, &format!("check-{sfx}"))?
        .iter()
        .map(|v| {
            (
                v["device_id"].as_str().unwrap_or_default().to_string(),
                v["seq"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    let unique: BTreeSet<_> = keys.iter().cloned().collect();
    assert_eq!(
        keys.len(),
        unique.len(),
        "duplicates in Kafka: the restart resent batches behind a marker it did not see"
    );
    println!(
        "hidden marker: markers {marker_1} -> {marker_2}, {} readings in Kafka, all unique",
        keys.len()
    );
    Ok(())
}

/// Another instance takes over only the uplink's second lane (as when two
/// instances' inits interleave: one ends up with lane 0, the other with
/// lane 1). Lane 0 decides who owns the gateway: the agent still holding
/// it starts its session over, takes lane 1 back and goes on, instead of
/// stopping as fenced. Kafka holds every reading once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_the_second_lane_starts_the_session_over() -> anyhow::Result<()> {
    init_logging();
    let sfx = unique("lanelost");
    let (data, dlq, offsets) = (
        format!("data-{sfx}"),
        format!("dlq-{sfx}"),
        format!("offsets-{sfx}"),
    );
    create_topics(&[(&data, 2, false), (&dlq, 1, false), (&offsets, 1, true)]).await?;
    let result = lane_lost_scenario(&sfx, &data, &dlq, &offsets).await;
    delete_topics(&[&data, &dlq, &offsets]).await;
    result
}

async fn lane_lost_scenario(sfx: &str, data: &str, dlq: &str, offsets: &str) -> anyhow::Result<()> {
    use rdkafka::producer::{Producer, ThreadedProducer};

    let dir = tempfile::tempdir()?;
    let cfg = config(sfx, "demo-", dir.path(), data, dlq, offsets)?;
    let lane_1 = cfg.lane_transactional_id(1);
    let agent = start(cfg);
    agent.until_committed(300).await?;
    let transactions = agent.stats.kafka_transactions.load(Relaxed);

    let interloper: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka_brokers())
            .set("transactional.id", &lane_1)
            .create()?;
    interloper.init_transactions(Duration::from_secs(30))?;

    // The agent meets the fence at its next transaction on lane 1, starts
    // over and commits again.
    let before = agent.stats.kafka_records_committed.load(Relaxed);
    agent.until_committed(before + 1_000).await?;
    anyhow::ensure!(
        !agent.task.is_finished(),
        "the agent stopped after losing lane 1 only"
    );
    let stats = agent.stop().await?;
    assert!(stats.kafka_transactions.load(Relaxed) > transactions + 2);
    drop(interloper);

    let keys: Vec<(String, u64)> = read_topic_to_end(data, 2, &format!("check-{sfx}"))?
        .iter()
        .map(|v| {
            (
                v["device_id"].as_str().unwrap_or_default().to_string(),
                v["seq"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    let unique: BTreeSet<_> = keys.iter().cloned().collect();
    assert_eq!(keys.len(), unique.len(), "duplicates in Kafka");
    println!(
        "lane lost: {} readings in Kafka, all unique; the agent went on",
        keys.len()
    );
    Ok(())
}
