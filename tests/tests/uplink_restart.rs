//! The exactly-once uplink across restarts, against the real Kafka: an agent
//! commits transactions, stops, starts again with the same gateway id, finds
//! its marker (read_committed, past other transactions' markers) and goes
//! on. Kafka holds every reading exactly once.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context as _;
use edge_tests::*;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

/// The topics of one test (data in 2 partitions, dead letters, compacted
/// offsets), named after `sfx`; `delete` removes them.
struct Topics {
    sfx: String,
    data: String,
    dlq: String,
    offsets: String,
}

impl Topics {
    async fn create(prefix: &str) -> anyhow::Result<Self> {
        let sfx = unique(prefix);
        let t = Topics {
            data: format!("data-{sfx}"),
            dlq: format!("dlq-{sfx}"),
            offsets: format!("offsets-{sfx}"),
            sfx,
        };
        create_topics(&[
            (&t.data, 2, false),
            (&t.dlq, 1, false),
            (&t.offsets, 1, true),
        ])
        .await?;
        Ok(t)
    }

    async fn delete(&self) {
        delete_topics(&[&self.data, &self.dlq, &self.offsets]).await;
    }

    /// Another gateway's transaction, left open, holding its marker on the
    /// offsets topic: read_committed readers stop before it.
    fn other_gateways_open_marker(
        &self,
    ) -> anyhow::Result<ThreadedProducer<DefaultProducerContext>> {
        let other_gateway = format!("gw-{}-other", self.sfx);
        let other = transactional(&format!("edge-agent-{other_gateway}"))?;
        other.begin_transaction()?;
        let other_marker = serde_json::json!({"gateway_id": other_gateway, "batch_seq": 7, "committed_at": now_ms()})
            .to_string();
        send_all(&other, &[(&self.offsets, &other_gateway, &other_marker)])?;
        Ok(other)
    }

    /// The agent of gateway `gw-{sfx}{gateway_suffix}` on these topics,
    /// simulating devices named `{device_prefix}…`.
    fn agent(
        &self,
        gateway_suffix: &str,
        device_prefix: &str,
        data_dir: &Path,
    ) -> anyhow::Result<edge_agent::Config> {
        let toml = format!(
            r#"
gateway_id = "gw-{}{gateway_suffix}"
data_dir = "{}"
[sources.demo]
devices = 50
readings_per_second = 3000
invalid_fraction = 0.01
seed = 3
device_prefix = "{device_prefix}"
[kafka]
brokers = "{}"
topic_data = "{}"
topic_dlq = "{}"
topic_offsets = "{}"
[progress]
interval_seconds = 0
"#,
            self.sfx,
            data_dir.display(),
            kafka_brokers(),
            self.data,
            self.dlq,
            self.offsets,
        );
        Ok(edge_agent::Config::from_toml(&toml, "uplink restart test")?)
    }

    /// The readings in the data topic (read_committed), after checking
    /// that no `(device_id, seq)` is there twice.
    fn readings_once(&self, duplicates: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let readings = read_topic_to_end(&self.data, 2, &format!("check-{}", self.sfx))?;
        let keys: BTreeSet<(String, u64)> = readings
            .iter()
            .map(|v| {
                (
                    v["device_id"].as_str().unwrap_or_default().to_string(),
                    v["seq"].as_u64().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(readings.len(), keys.len(), "{duplicates}");
        Ok(readings)
    }
}

/// Runs a test body on fresh topics and deletes them afterwards.
async fn with_topics<F>(prefix: &str, body: F) -> anyhow::Result<()>
where
    F: AsyncFnOnce(&Topics) -> anyhow::Result<()>,
{
    init_logging();
    let topics = Topics::create(prefix).await?;
    let result = body(&topics).await;
    topics.delete().await;
    result
}

/// An initialised transactional producer with id `id`, standing for
/// another instance; its transactions may stay open for ten minutes.
fn transactional(id: &str) -> anyhow::Result<ThreadedProducer<DefaultProducerContext>> {
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("transactional.id", id)
        .set("transaction.timeout.ms", "600000")
        .create()?;
    producer.init_transactions(Duration::from_secs(30))?;
    Ok(producer)
}

/// Sends `(topic, key, payload)` records in the producer's open
/// transaction and waits until Kafka has them.
fn send_all(
    producer: &ThreadedProducer<DefaultProducerContext>,
    records: &[(&str, &str, &str)],
) -> anyhow::Result<()> {
    for (topic, key, payload) in records {
        edge_agent::sinks::kafka::send(
            producer,
            BaseRecord::to(topic).key(*key).payload(*payload),
        )?;
    }
    edge_agent::sinks::kafka::flush_deliveries(producer, Duration::from_secs(30));
    anyhow::ensure!(
        producer.in_flight_count() == 0,
        "the open transaction's records were not delivered"
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

/// Runs the agent until `records` are committed to Kafka (at least), then
/// stops it; returns its stats.
async fn run_until_committed(
    config: edge_agent::Config,
    records: u64,
) -> anyhow::Result<Arc<edge_agent::Stats>> {
    let agent = start(config);
    let waited = agent.until_committed(records).await;
    let stats = agent.stop().await?;
    waited.map(|()| stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_agent_resumes_after_its_marker_without_duplicates() -> anyhow::Result<()> {
    with_topics("restart", async |t| {
        let dir = tempfile::tempdir()?;
        // Another gateway's transaction on the shared offsets topic, so our
        // marker is not the only (or last) record there.
        let other_dir = tempfile::tempdir()?;
        // It simulates its own devices: a device belongs to one gateway.
        let other = t.agent("-other", "other-", other_dir.path())?;

        let first = run_until_committed(t.agent("", "demo-", dir.path())?, 2_000).await?;
        let marker_1 = first.kafka_committed_batch.load(Relaxed);
        assert!(marker_1 > 0);
        let other = run_until_committed(other, 500).await?;

        let second = run_until_committed(t.agent("", "demo-", dir.path())?, 2_000).await?;
        let marker_2 = second.kafka_committed_batch.load(Relaxed);
        assert!(
            marker_2 > marker_1,
            "the restarted agent went on after its marker: {marker_1} -> {marker_2}"
        );

        // Kafka holds every reading once (read_committed, both gateways).
        let readings = t.readings_once("duplicates in Kafka")?;
        let committed: u64 = [&first, &other, &second]
            .iter()
            .map(|s| s.kafka_records_committed.load(Relaxed))
            .sum();
        let rejected: u64 = [&first, &other, &second]
            .iter()
            .map(|s| s.rejected.load(Relaxed))
            .sum();
        // Committed records are the readings plus the dead letters; a
        // session's counters may miss a last transaction that committed
        // while stopping.
        assert!(
            readings.len() as u64 + rejected >= committed,
            "{} readings in Kafka, {committed} records committed",
            readings.len()
        );
        println!(
            "restart: markers {marker_1} -> {marker_2}, {} readings in Kafka, all unique",
            readings.len()
        );
        Ok(())
    })
    .await
}

/// A transaction left open on the uplink's second lane (`/lane-1`) by an
/// instance that died mid-transaction: the next start must end it when it
/// initialises that lane, before it reads its marker. Otherwise the open
/// transaction holds the offsets topic's stable offset back and the marker
/// read waits until Kafka times the transaction out (ten minutes here).
/// Its records and its marker must never become visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_transaction_on_the_second_lane_is_ended_at_start() -> anyhow::Result<()> {
    with_topics("lane", async |t| {
        let dir = tempfile::tempdir()?;
        let cfg = t.agent("", "demo-", dir.path())?;
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
            let ghost = transactional(&lane_1)?;
            ghost.begin_transaction()?;
            let reading =
                serde_json::json!({"device_id": "ghost-1", "seq": 1, "ts": now_ms()}).to_string();
            let marker = serde_json::json!({"gateway_id": gateway, "batch_seq": ghost_marker, "committed_at": now_ms()})
                .to_string();
            send_all(
                &ghost,
                &[(&t.data, "ghost-1", &reading), (&t.offsets, &gateway, &marker)],
            )?;
            // Dropped with the transaction open, as by a crash.
        }

        let second = run_until_committed(t.agent("", "demo-", dir.path())?, 500).await?;
        let marker_2 = second.kafka_committed_batch.load(Relaxed);
        assert!(
            marker_2 > marker_1 && marker_2 < ghost_marker,
            "the restart went on after its own marker {marker_1}, not the open transaction's: got {marker_2}"
        );

        let readings = t.readings_once("duplicates in Kafka")?;
        assert!(
            !readings.iter().any(|v| v["device_id"] == "ghost-1"),
            "the open transaction's reading became visible"
        );
        println!(
            "open lane: markers {marker_1} -> {marker_2}, {} readings in Kafka, none of the open transaction",
            readings.len()
        );
        Ok(())
    })
    .await
}

/// Another gateway's transaction left open on the shared offsets topic
/// while this gateway commits markers after it: read_committed readers stop
/// at the open transaction, so a restart that read only that far would find
/// an older marker of its own and send batches again that Kafka already
/// holds. The restart must wait for the open transaction to end, then find
/// its newest marker; Kafka then holds every reading once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_gateways_open_transaction_does_not_hide_the_newest_marker() -> anyhow::Result<()> {
    with_topics("hidden", async |t| {
        let dir = tempfile::tempdir()?;
        let first = start(t.agent("", "demo-", dir.path())?);
        first.until_committed(300).await?;

        // The other gateway opens a transaction with its marker and keeps it
        // open while this gateway goes on committing markers after it.
        let other = t.other_gateways_open_marker()?;

        let before = first.stats.kafka_records_committed.load(Relaxed);
        first.until_committed(before + 1_000).await?;
        let first = first.stop().await?;
        let marker_1 = first.kafka_committed_batch.load(Relaxed);

        // The restart must not start sending while the open transaction
        // hides its newest marker.
        let second = start(t.agent("", "demo-", dir.path())?);
        let s = second.stats.clone();
        let came_up = wait_for("the uplink up", Duration::from_secs(5), || {
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

        let readings = t.readings_once(
            "duplicates in Kafka: the restart resent batches behind a marker it did not see",
        )?;
        println!(
            "hidden marker: markers {marker_1} -> {marker_2}, {} readings in Kafka, all unique",
            readings.len()
        );
        Ok(())
    })
    .await
}

/// Stopped while its start waits for another gateway's open transaction on
/// the offsets topic, the uplink stops quietly: no failure counted, and no
/// "uplink down" warning that blames a marker it never failed to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_while_the_marker_read_waits_is_no_uplink_failure() -> anyhow::Result<()> {
    with_topics("stopwait", async |t| {
        let other = t.other_gateways_open_marker()?;

        let dir = tempfile::tempdir()?;
        let agent = start(t.agent("", "demo-", dir.path())?);
        // The demo devices' readings are durable while the uplink waits.
        let s = agent.stats.clone();
        wait_for(
            "readings in the outbox while the uplink waits",
            Duration::from_secs(60),
            || {
                let s = s.clone();
                async move { Ok((s.valid.load(Relaxed) >= 1_000).then_some(())) }
            },
        )
        .await?;
        assert_eq!(
            agent.stats.uplink_state(),
            edge_agent::stats::UplinkState::Connecting,
            "the uplink got going although the open transaction hides the marker"
        );
        let stats = agent.stop().await?;
        assert_eq!(
            stats.uplink_state(),
            edge_agent::stats::UplinkState::Stopped
        );
        assert_eq!(
            stats.uplink_failures.load(Relaxed),
            0,
            "stopping was counted (and logged) as an uplink failure"
        );
        let metrics =
            edge_agent::ops::metrics_text(&edge_agent::ops::OpsState::new(stats.clone(), "gw"));
        assert!(
            metrics.contains("\nedge_uplink_failures_total 0\n"),
            "{metrics}"
        );
        other.abort_transaction(Duration::from_secs(30))?;
        Ok(())
    })
    .await
}

/// Another instance takes over only the uplink's second lane (as when two
/// instances' inits interleave: one ends up with lane 0, the other with
/// lane 1). Lane 0 decides who owns the gateway: the agent still holding
/// it starts its session over, takes lane 1 back and goes on, instead of
/// stopping as fenced. Kafka holds every reading once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_the_second_lane_starts_the_session_over() -> anyhow::Result<()> {
    with_topics("lanelost", async |t| {
        let dir = tempfile::tempdir()?;
        let cfg = t.agent("", "demo-", dir.path())?;
        let lane_1 = cfg.lane_transactional_id(1);
        let agent = start(cfg);
        agent.until_committed(300).await?;
        let transactions = agent.stats.kafka_transactions.load(Relaxed);

        let interloper = transactional(&lane_1)?;

        // The agent meets the fence at its next transaction on lane 1,
        // starts over and commits again.
        let before = agent.stats.kafka_records_committed.load(Relaxed);
        agent.until_committed(before + 1_000).await?;
        anyhow::ensure!(
            !agent.task.is_finished(),
            "the agent stopped after losing lane 1 only"
        );
        let stats = agent.stop().await?;
        assert!(stats.kafka_transactions.load(Relaxed) > transactions + 2);
        drop(interloper);

        let readings = t.readings_once("duplicates in Kafka")?;
        println!(
            "lane lost: {} readings in Kafka, all unique; the agent went on",
            readings.len()
        );
        Ok(())
    })
    .await
}
