//! The first end-to-end path, real at every hop:
//! MQTT (Mosquitto) → edge-agent → Kafka (transactions) → cloud-bridge → MariaDB.
//!
//! Publishes 10,000 readings of which 3% are invalid in eight different ways,
//! then checks that MariaDB holds exactly the valid `(device_id, seq)` set,
//! that every invalid one is counted with its reason (in memory, in the
//! agent's SQLite, and on the dead-letter topic), and that nothing was
//! written twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context as _;
use edge_agent::transforms::validate::RejectReason;
use edge_tests::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rumqttc::QoS;
use sqlx::Row;

const TOTAL: usize = 10_000;
const DEVICES: usize = 100;
const INVALID_EVERY: usize = 33;

/// The kinds of bad input published, and the reason each must be counted under.
const BAD_KINDS: [(&str, RejectReason); 8] = [
    ("malformed json", RejectReason::MalformedJson),
    ("number as string", RejectReason::WrongType),
    ("missing field", RejectReason::MissingField),
    ("latitude out of range", RejectReason::OutOfRange),
    ("payload over the size limit", RejectReason::PayloadTooLarge),
    ("unknown topic shape", RejectReason::UnknownTopic),
    (
        "device id differs from topic",
        RejectReason::DeviceIdMismatch,
    ),
    (
        "binary payload that is not a frame",
        RejectReason::MalformedFrame,
    ),
];

fn now_ms() -> i64 {
    edge_agent::pipeline::now_ms()
}

fn reading(device: &str, seq: u64) -> serde_json::Value {
    serde_json::json!({
        "device_id": device, "seq": seq, "ts": now_ms(),
        "temperature": 21.0 + (seq % 10) as f64, "humidity": 45.0, "battery": 80.0,
        "lat": 52.5, "lon": 13.4, "speed": 1.5, "firmware": "2.1.0"
    })
}

/// (topic, payload) of a bad input of the given kind.
fn bad_input(prefix: &str, kind: usize, n: usize) -> (String, Vec<u8>) {
    let device = format!("bad-{n}");
    let topic = format!("{prefix}devices/{device}/telemetry");
    match kind {
        0 => (topic, b"{\"device_id\": \"bad\", \"seq\": ".to_vec()),
        1 => {
            let mut v = reading(&device, 1);
            v["temperature"] = "21.5".into();
            (topic, v.to_string().into_bytes())
        }
        2 => {
            let mut v = reading(&device, 1);
            v.as_object_mut().unwrap().remove("humidity");
            (topic, v.to_string().into_bytes())
        }
        3 => {
            let mut v = reading(&device, 1);
            v["lat"] = 123.4.into();
            (topic, v.to_string().into_bytes())
        }
        4 => {
            let mut v = reading(&device, 1);
            v["padding"] = "x".repeat(5000).into();
            (topic, v.to_string().into_bytes())
        }
        5 => (
            format!("{prefix}devices/{device}/status"),
            reading(&device, 1).to_string().into_bytes(),
        ),
        6 => (topic, reading("someone-else", 1).to_string().into_bytes()),
        _ => (format!("{topic}/bin"), vec![0x00, 0x01, 0xff]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt_to_mysql_exactly_the_valid_readings() -> anyhow::Result<()> {
    init_logging();
    let sfx = unique("e2e");
    let (data_topic, dlq_topic, offsets_topic) = (
        format!("rich-iot-data-{sfx}"),
        format!("iot-dlq-{sfx}"),
        format!("edge-offsets-{sfx}"),
    );
    create_topics(&[
        (&data_topic, 3, false),
        (&dlq_topic, 1, false),
        (&offsets_topic, 1, true),
    ])
    .await?;
    let db = TestDatabase::create("edge_e2e").await?;
    let result = run_scenario(&sfx, &data_topic, &dlq_topic, &offsets_topic, &db.url).await;
    delete_topics(&[&data_topic, &dlq_topic, &offsets_topic]).await;
    db.drop_now().await;
    // The agent's session is persistent (the default): end it, or the
    // broker keeps it for a day.
    if let Err(e) = edge_tests::bench::remove_session(&format!("agent-{sfx}")).await {
        eprintln!("warning: the agent's MQTT session stays on the broker: {e:#}");
    }
    result
}

async fn run_scenario(
    sfx: &str,
    data_topic: &str,
    dlq_topic: &str,
    offsets_topic: &str,
    db_url: &str,
) -> anyhow::Result<()> {
    let (mqtt_host, mqtt_port) = mqtt_addr();
    let prefix = format!("{sfx}/");
    let data_dir = tempfile::tempdir()?;

    // The bridge.
    let bridge_config = cloud_bridge::BridgeConfig::load(None, |k| match k {
        "CLOUD_BRIDGE_KAFKA_BROKERS" => Some(kafka_brokers()),
        "CLOUD_BRIDGE_GROUP_ID" => Some(format!("bridge-{sfx}")),
        "CLOUD_BRIDGE_TOPIC_DATA" => Some(data_topic.to_string()),
        "CLOUD_BRIDGE_TOPIC_DLQ" => Some(dlq_topic.to_string()),
        "CLOUD_BRIDGE_API_LISTEN" => Some("127.0.0.1:0".into()),
        "CLOUD_BRIDGE_MYSQL_URL" => Some(db_url.to_string()),
        _ => None,
    })?;
    let bridge_stats = Arc::new(cloud_bridge::sinks::mysql::MysqlSinkStats::default());
    let (bridge_stop, bridge_stopped) = tokio::sync::oneshot::channel::<()>();
    let bridge = tokio::spawn(cloud_bridge::run(
        bridge_config,
        bridge_stats.clone(),
        async {
            let _ = bridge_stopped.await;
        },
    ));

    // The agent.
    let agent_toml = format!(
        r#"
gateway_id = "gw-{sfx}"
data_dir = "{data_dir}"
[sources.mqtt]
host = "{mqtt_host}"
port = {mqtt_port}
client_id = "agent-{sfx}"
topic_prefix = "{prefix}"
topics = ["{prefix}devices/#"]
[kafka]
brokers = "{brokers}"
topic_data = "{data_topic}"
topic_dlq = "{dlq_topic}"
topic_offsets = "{offsets_topic}"
[progress]
interval_seconds = 0
"#,
        data_dir = data_dir.path().display(),
        brokers = kafka_brokers(),
    );
    let agent_config = edge_agent::Config::from_toml(&agent_toml, "e2e test")?;
    let agent_stats = Arc::new(edge_agent::Stats::default());
    let (agent_stop, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(edge_agent::run(agent_config, agent_stats.clone(), async {
        let _ = agent_stopped.await;
    }));

    // A device-side publisher, and the agent subscribed.
    let (client, publisher_loop) = mqtt_publisher(&format!("pub-{sfx}"));
    let probe_topic = format!("{prefix}devices/probe/telemetry");
    wait_subscribed(
        &client,
        &agent_stats,
        &probe_topic,
        reading("probe", 0).to_string(),
    )
    .await?;

    let mut expected: BTreeSet<(String, u64)> = BTreeSet::new();
    expected.insert(("probe".into(), 0));
    let mut expected_rejects: BTreeMap<RejectReason, u64> = BTreeMap::new();
    let mut next_seq = vec![0u64; DEVICES];
    for i in 0..TOTAL {
        if i % INVALID_EVERY == INVALID_EVERY - 1 {
            let kind = (i / INVALID_EVERY) % BAD_KINDS.len();
            let (topic, payload) = bad_input(&prefix, kind, i);
            *expected_rejects.entry(BAD_KINDS[kind].1).or_default() += 1;
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await?;
        } else {
            let d = i % DEVICES;
            next_seq[d] += 1;
            let device = format!("dev-{d:03}");
            expected.insert((device.clone(), next_seq[d]));
            let topic = format!("{prefix}devices/{device}/telemetry");
            if i % 10 == 3 {
                // Every tenth valid reading as a firmware-proto frame on
                // /bin (boot epoch 0: the same key space as the JSON ones).
                let mut track = edge_tests::sim::Track {
                    center_lat: 52.5,
                    center_lon: 13.4,
                    radius_deg: 0.01,
                    step_rad: 0.1,
                    angle: 0.0,
                };
                let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(i as u64);
                let frame = edge_tests::sim::bin_reading(
                    next_seq[d] as u32,
                    0,
                    now_ms() as u64,
                    &mut track,
                    &mut rng,
                );
                client
                    .publish(format!("{topic}/bin"), QoS::AtLeastOnce, false, frame)
                    .await?;
            } else {
                client
                    .publish(
                        topic,
                        QoS::AtLeastOnce,
                        false,
                        reading(&device, next_seq[d]).to_string(),
                    )
                    .await?;
            }
        }
    }
    let invalid_total: u64 = expected_rejects.values().sum();
    assert_eq!(expected.len() as u64 - 1 + invalid_total, TOTAL as u64);
    assert!(
        invalid_total >= TOTAL as u64 / 40,
        "a few percent must be invalid"
    );

    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(2)
        .connect(db_url)
        .await?;
    let expected_rows = expected.len() as i64;
    let stored = wait_for(
        "MariaDB to hold every valid reading",
        Duration::from_secs(240),
        || {
            let pool = pool.clone();
            async move {
                // The table appears once the bridge ran its migrations.
                let count: Result<i64, _> = sqlx::query_scalar("SELECT COUNT(*) FROM iot_metrics")
                    .fetch_one(&pool)
                    .await;
                Ok(match count {
                    Ok(n) if n >= expected_rows => Some(n),
                    _ => None,
                })
            }
        },
    )
    .await?;
    assert_eq!(stored, expected_rows, "more rows than valid readings");

    wait_for(
        "every reject to be counted",
        Duration::from_secs(30),
        || {
            let stats = agent_stats.clone();
            async move { Ok((stats.rejected.load(Relaxed) >= invalid_total).then_some(())) }
        },
    )
    .await?;

    // Exactly the valid set: compare keys, not only counts.
    let rows = sqlx::query("SELECT device_id, seq FROM iot_metrics")
        .fetch_all(&pool)
        .await?;
    let actual: BTreeSet<(String, u64)> = rows
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<u64, _>(1)))
        .collect();
    assert_eq!(actual.len(), rows.len(), "duplicate keys in iot_metrics");
    let missing: Vec<_> = expected.difference(&actual).take(5).collect();
    let extra: Vec<_> = actual.difference(&expected).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, unexpected {extra:?}"
    );

    // Every invalid input counted under its reason.
    assert_eq!(agent_stats.rejects_by_reason(), expected_rejects);
    assert_eq!(agent_stats.rejected.load(Relaxed), invalid_total);
    assert_eq!(bridge_stats.duplicate_rows.load(Relaxed), 0);
    assert_eq!(bridge_stats.dead_letters.load(Relaxed), 0);

    // The dead-letter topic carries each reject with its reason, committed.
    let dlq: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", format!("dlq-check-{sfx}"))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    dlq.subscribe(&[dlq_topic])?;
    let mut dlq_reasons: BTreeMap<RejectReason, u64> = BTreeMap::new();
    let mut seen = 0u64;
    while seen < invalid_total {
        let msg = tokio::time::timeout(Duration::from_secs(30), dlq.recv())
            .await
            .with_context(|| format!("only {seen} of {invalid_total} dead letters arrived"))??;
        let v: serde_json::Value = serde_json::from_slice(msg.payload().unwrap_or_default())?;
        let reason = RejectReason::from_code(v["reason"].as_str().unwrap_or_default())
            .with_context(|| format!("unknown reason in {v}"))?;
        *dlq_reasons.entry(reason).or_default() += 1;
        seen += 1;
    }
    assert_eq!(dlq_reasons, expected_rejects);

    // The bridge's default iot-dlq route keeps each reject once in MySQL's
    // iot_dlq table, queryable by reason.
    let dlq_rows = wait_for(
        "every dead letter in iot_dlq",
        Duration::from_secs(60),
        || {
            let pool = pool.clone();
            async move {
                let rows = sqlx::query("SELECT reason, COUNT(*) FROM iot_dlq GROUP BY reason")
                    .fetch_all(&pool)
                    .await?;
                let mut by_reason: BTreeMap<RejectReason, u64> = BTreeMap::new();
                for r in &rows {
                    let code: String = r.get(0);
                    let reason = RejectReason::from_code(&code)
                        .with_context(|| format!("unknown reason {code:?} in iot_dlq"))?;
                    by_reason.insert(reason, r.get::<i64, _>(1) as u64);
                }
                let total: u64 = by_reason.values().sum();
                Ok((total >= invalid_total).then_some(by_reason))
            }
        },
    )
    .await?;
    assert_eq!(dlq_rows, expected_rejects);
    let distinct: i64 =
        sqlx::query_scalar("SELECT COUNT(DISTINCT kafka_partition, kafka_offset) FROM iot_dlq")
            .fetch_one(&pool)
            .await?;
    assert_eq!(
        distinct as u64, invalid_total,
        "a dead letter was stored twice"
    );

    // Shut down cleanly, then check the agent's durable counters.
    let _ = agent_stop.send(());
    tokio::time::timeout(Duration::from_secs(60), agent)
        .await
        .context("agent did not stop within 60 s")??
        .map_err(|e| anyhow::anyhow!("agent failed: {e}"))?;
    let _ = bridge_stop.send(());
    tokio::time::timeout(Duration::from_secs(60), bridge)
        .await
        .context("bridge did not stop within 60 s")???;
    publisher_loop.abort();

    let conn = rusqlite::Connection::open(data_dir.path().join("edge-agent.db"))?;
    let durable: BTreeMap<RejectReason, u64> = edge_agent::outbox::reject_counts(&conn)?
        .into_iter()
        .map(|(code, n)| (RejectReason::from_code(&code).expect("known reason"), n))
        .collect();
    assert_eq!(durable, expected_rejects);
    let (batches_left, _) = edge_agent::outbox::backlog(&conn)?;
    assert_eq!(
        batches_left, 0,
        "the outbox must be drained after every batch was committed"
    );
    // The latency histograms saw every outbox write and every Kafka
    // transaction of batches.
    let metrics =
        edge_agent::ops::metrics_text(&edge_agent::ops::OpsState::new(agent_stats.clone(), "gw"));
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in\n{metrics}"))
    };
    assert_eq!(
        value("edge_kafka_commit_seconds_count"),
        agent_stats.kafka_transactions.load(Relaxed) as f64
    );
    assert_eq!(
        value("edge_kafka_commit_seconds_bucket{le=\"+Inf\"}"),
        value("edge_kafka_commit_seconds_count")
    );
    assert!(
        value("edge_outbox_commit_seconds_count")
            >= agent_stats.batches_written.load(Relaxed) as f64
            && agent_stats.batches_written.load(Relaxed) > 0,
        "{metrics}"
    );
    assert!(value("edge_kafka_commit_seconds_sum") > 0.0, "{metrics}");
    println!(
        "e2e: published {TOTAL} (+probes), stored {stored}, rejected {invalid_total}, bridge transactions {}, agent transactions {}",
        bridge_stats.transactions.load(Relaxed),
        agent_stats.kafka_transactions.load(Relaxed)
    );
    Ok(())
}
