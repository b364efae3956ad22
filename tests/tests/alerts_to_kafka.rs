//! The data plane against the real Kafka: readings enriched from the
//! registry file, geofence and threshold alerts on `iot-alerts` with their
//! deterministic ids, an unknown device passed through flagged, all
//! committed exactly once by the transactional uplink.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context as _;
use edge_tests::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alerts_and_enriched_readings_reach_kafka_once() -> anyhow::Result<()> {
    init_logging();
    let sfx = unique("alerts");
    let topics = [
        format!("data-{sfx}"),
        format!("dlq-{sfx}"),
        format!("alerts-{sfx}"),
        format!("offsets-{sfx}"),
    ];
    create_topics(&[
        (&topics[0], 2, false),
        (&topics[1], 1, false),
        (&topics[2], 2, false),
        (&topics[3], 1, true),
    ])
    .await?;
    let result = scenario(&sfx, &topics).await;
    delete_topics(&topics.iter().map(String::as_str).collect::<Vec<_>>()).await;
    result
}

/// Reads a topic to its end (read_committed); returns the JSON values.
fn read_all(topic: &str, partitions: usize, group: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", group)
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut out = Vec::new();
    let mut eof = BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while eof.len() < partitions {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "did not read {topic} to its end"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push(serde_json::from_slice(m.payload().unwrap_or_default())?),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                eof.insert(p);
            }
            _ => {}
        }
    }
    Ok(out)
}

async fn scenario(sfx: &str, topics: &[String; 4]) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let registry = dir.path().join("registry.json");
    std::fs::write(
        &registry,
        serde_json::json!({
            "version": "e2e-1",
            "devices": [{
                "device_id": "trk-1", "device_type": "tracker", "name": "Truck 1",
                "site": "yard-north", "tags": {"fleet": "blue"},
                "thresholds": {"speed": [0.0, 50.0]}, "threshold_readings": 2
            }],
            "fences": {"type": "FeatureCollection", "features": [{
                "type": "Feature", "properties": {"id": "depot"},
                "geometry": {"type": "Polygon", "coordinates": [[
                    [10.0, 10.0], [10.1, 10.0], [10.1, 10.1], [10.0, 10.1], [10.0, 10.0]
                ]]}
            }]}
        })
        .to_string(),
    )?;
    // trk-1 drives into the depot (seq 2), out again (seq 4), then speeds
    // for two readings (threshold after 2 consecutive: seq 6).
    let now = now_ms();
    let reading = |device: &str, seq: u64, lat: f64, lon: f64, speed: f64| {
        serde_json::json!({
            "device_id": device, "seq": seq, "ts": now - 60_000 + seq as i64 * 1000,
            "temperature": 20.0, "humidity": 50.0, "battery": 80.0,
            "lat": lat, "lon": lon, "speed": speed
        })
        .to_string()
    };
    let lines = [
        reading("trk-1", 1, 9.9, 9.9, 10.0),
        reading("trk-1", 2, 10.05, 10.05, 10.0),
        reading("trk-1", 3, 10.06, 10.06, 10.0),
        reading("trk-1", 4, 9.9, 9.9, 10.0),
        reading("trk-1", 5, 9.9, 9.9, 60.0),
        reading("trk-1", 6, 9.9, 9.9, 70.0),
        reading("trk-1", 7, 9.9, 9.9, 75.0),
        reading("ghost-1", 1, 9.9, 9.9, 10.0),
    ];
    let file = dir.path().join("readings.jsonl");
    std::fs::write(&file, lines.join("\n"))?;

    let toml = format!(
        r#"
gateway_id = "gw-{sfx}"
data_dir = "{}"
[sources.demo]
devices = 1
readings_per_second = 5
device_prefix = "bg-{sfx}-"
[registry]
file = "{}"
[http]
listen = ""
[kafka]
brokers = "{}"
topic_data = "{}"
topic_dlq = "{}"
topic_alerts = "{}"
topic_offsets = "{}"
[progress]
interval_seconds = 0
"#,
        dir.path().join("data").display(),
        registry.display(),
        kafka_brokers(),
        topics[0],
        topics[1],
        topics[2],
        topics[3],
    );
    let config = edge_agent::Config::from_toml(&toml, "alerts test")?;
    let imported = edge_agent::import::import(
        config.clone(),
        Arc::new(edge_agent::Stats::default()),
        &file,
        false,
    )
    .await?;
    assert_eq!((imported.valid, imported.rejected), (8, 0));

    // The agent ships the imported batches (and a few demo readings).
    let stats = Arc::new(edge_agent::Stats::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(edge_agent::run(config, stats.clone(), async {
        let _ = stopped.await;
    }));
    let s = stats.clone();
    let waited = wait_for(
        "the imported batch in Kafka",
        Duration::from_secs(120),
        || {
            let s = s.clone();
            async move { Ok((s.kafka_records_committed.load(Relaxed) >= 11).then_some(())) }
        },
    )
    .await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(60), agent)
        .await
        .context("agent did not stop")??
        .map_err(|e| anyhow::anyhow!("agent failed: {e}"))?;
    waited?;

    let alerts = read_all(&topics[2], 2, &format!("check-alerts-{sfx}"))?;
    let ids: Vec<&str> = alerts
        .iter()
        .map(|a| a["alert_id"].as_str().unwrap_or_default())
        .collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "duplicate alerts: {ids:?}");
    assert_eq!(
        unique,
        BTreeSet::from([
            "trk-1:2:depot:enter",
            "trk-1:4:depot:exit",
            "trk-1:6:threshold:speed",
        ])
    );
    let threshold = alerts
        .iter()
        .find(|a| a["event"] == "threshold")
        .context("threshold alert")?;
    assert_eq!(threshold["value"], 70.0);
    assert_eq!(threshold["consecutive"], 2);
    assert_eq!(threshold["gateway_id"], format!("gw-{sfx}"));

    let data = read_all(&topics[0], 2, &format!("check-data-{sfx}"))?;
    let trk: Vec<&serde_json::Value> = data.iter().filter(|r| r["device_id"] == "trk-1").collect();
    assert_eq!(trk.len(), 7);
    for r in &trk {
        assert_eq!(r["registered"], true);
        assert_eq!(r["device_type"], "tracker");
        assert_eq!(r["site"], "yard-north");
        assert_eq!(r["tags"]["fleet"], "blue");
    }
    let ghost: Vec<&serde_json::Value> = data
        .iter()
        .filter(|r| r["device_id"] == "ghost-1")
        .collect();
    assert_eq!(ghost.len(), 1);
    assert_eq!(ghost[0]["registered"], false);
    assert!(ghost[0].get("device_type").is_none());
    let keys: BTreeSet<(String, u64)> = data
        .iter()
        .map(|r| {
            (
                r["device_id"].as_str().unwrap_or_default().to_string(),
                r["seq"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(keys.len(), data.len(), "duplicates on the data topic");
    println!(
        "alerts: {} alerts, {} readings ({} from trk-1), all unique",
        alerts.len(),
        data.len(),
        trk.len()
    );
    Ok(())
}
