//! The data plane against the real Kafka and OpenSearch: readings enriched
//! from the registry file, geofence and threshold alerts on `iot-alerts`
//! with their deterministic ids, an unknown device passed through flagged,
//! all committed exactly once by the transactional uplink; then the bridge
//! indexes the alerts into OpenSearch once (a full replay changes nothing)
//! and dead-letters what can never be indexed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context as _;
use edge_tests::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

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
    let db = TestDatabase::create("edge_alerts").await?;
    let http = reqwest::Client::new();
    let index = format!("alerts_{}", sfx.to_lowercase());
    let result = async {
        scenario(&sfx, &topics).await?;
        bridge_to_opensearch(&sfx, &topics, &index, &db.url, &http).await
    }
    .await;
    let _ = http
        .delete(format!("{}/{index}", opensearch_url()))
        .send()
        .await;
    delete_topics(&topics.iter().map(String::as_str).collect::<Vec<_>>()).await;
    db.drop_now().await;
    result
}

const EXPECTED: [&str; 3] = [
    "trk-1:2:depot:enter",
    "trk-1:4:depot:exit",
    "trk-1:6:threshold:speed",
];

/// Runs the bridge's alerts sink until `done` holds (or fails after 60 s).
async fn run_bridge_until<F, Fut>(
    data: &str,
    group: &str,
    topic: &str,
    index: &str,
    db_url: &str,
    what: &str,
    done: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<()>>>,
{
    let (data_topic, group, topic, index, db_url) = (
        data.to_string(),
        group.to_string(),
        topic.to_string(),
        index.to_string(),
        db_url.to_string(),
    );
    let config = cloud_bridge::BridgeConfig::load(None, |k| match k {
        "CLOUD_BRIDGE_KAFKA_BROKERS" => Some(kafka_brokers()),
        "CLOUD_BRIDGE_GROUP_ID" => Some(group.clone()),
        "CLOUD_BRIDGE_TOPIC_DATA" => Some(data_topic.clone()),
        "CLOUD_BRIDGE_MYSQL_URL" => Some(db_url.clone()),
        "CLOUD_BRIDGE_OPENSEARCH_URL" => Some(opensearch_url()),
        "CLOUD_BRIDGE_ALERTS_INDEX" => Some(index.clone()),
        "CLOUD_BRIDGE_TOPIC_ALERTS" => Some(topic.clone()),
        "CLOUD_BRIDGE_TOPIC_DLQ" => Some(format!("{topic}-dlq")),
        "CLOUD_BRIDGE_API_LISTEN" => Some("127.0.0.1:0".into()),
        _ => None,
    })?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let bridge = tokio::spawn(cloud_bridge::run(
        config,
        Arc::new(cloud_bridge::sinks::mysql::MysqlSinkStats::default()),
        async {
            let _ = stopped.await;
        },
    ));
    let waited = wait_for(what, Duration::from_secs(60), done).await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(60), bridge)
        .await
        .context("bridge did not stop")??
        .context("bridge failed")?;
    waited
}

/// Ids in the index (after a refresh).
async fn indexed_ids(http: &reqwest::Client, index: &str) -> anyhow::Result<Vec<String>> {
    let base = opensearch_url();
    let refresh = http.post(format!("{base}/{index}/_refresh")).send().await?;
    if refresh.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(Vec::new());
    }
    let body = http
        .get(format!("{base}/{index}/_search?size=100"))
        .send()
        .await?
        .bytes()
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    let mut ids: Vec<String> = v["hits"]["hits"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["_id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    Ok(ids)
}

/// Offsets a group committed on the two partitions of `topic`.
fn committed(group: &str, topic: &str) -> anyhow::Result<Vec<rdkafka::Offset>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", group)
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    tpl.add_partition(topic, 1);
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(5))?;
    Ok(committed.elements().iter().map(|e| e.offset()).collect())
}

async fn dead_letters(db_url: &str) -> anyhow::Result<Vec<(String, String)>> {
    let pool = sqlx::MySqlPool::connect(db_url).await?;
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT reason, CAST(payload AS CHAR) FROM bridge_dead_letters WHERE sink = 'opensearch-alerts' ORDER BY kafka_offset",
    )
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    Ok(rows)
}

async fn bridge_to_opensearch(
    sfx: &str,
    topics: &[String; 4],
    index: &str,
    db_url: &str,
    http: &reqwest::Client,
) -> anyhow::Result<()> {
    let (data, topic) = (topics[0].as_str(), topics[2].as_str());
    let expected: Vec<String> = EXPECTED.iter().map(|s| s.to_string()).collect();
    let group = format!("bridge-{sfx}");
    run_bridge_until(
        data,
        &group,
        topic,
        index,
        db_url,
        "the three alerts indexed",
        || async { Ok((indexed_ids(http, index).await? == expected).then_some(())) },
    )
    .await?;

    // Two records that can never be indexed: not JSON, and a document the
    // index mapping refuses (lat is a number there).
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()?;
    for payload in [
        "not json".to_string(),
        serde_json::json!({"alert_id": "bad-1", "lat": "far north"}).to_string(),
    ] {
        producer
            .send(BaseRecord::to(topic).key("x").payload(&payload))
            .map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(10))?;
    run_bridge_until(
        data,
        &group,
        topic,
        index,
        db_url,
        "two dead letters",
        || async { Ok((dead_letters(db_url).await?.len() == 2).then_some(())) },
    )
    .await?;
    let letters = dead_letters(db_url).await?;
    assert_eq!(letters[0].0, "not_an_alert");
    assert_eq!(letters[0].1, "not json");
    assert_eq!(letters[1].0, "mapper_parsing_exception", "{letters:?}");

    // A new group replays the whole topic: nothing is added anywhere.
    let replay = format!("replay-{sfx}");
    run_bridge_until(
        data,
        &replay,
        topic,
        index,
        db_url,
        "the replay settled",
        || async {
            // Settled once the replay's group (the alerts sink uses
            // `{group_id}-alerts`) committed what the first group did.
            let first = committed(&format!("{group}-alerts"), topic)?;
            Ok((committed(&format!("{replay}-alerts"), topic)? == first).then_some(()))
        },
    )
    .await?;
    assert_eq!(indexed_ids(http, index).await?, expected);
    assert_eq!(dead_letters(db_url).await?.len(), 2);
    println!(
        "opensearch: {} alerts indexed once, 2 dead letters, replay changed nothing",
        expected.len()
    );
    Ok(())
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

    let alerts = read_topic_to_end(&topics[2], 2, &format!("check-alerts-{sfx}"))?;
    let ids: Vec<&str> = alerts
        .iter()
        .map(|a| a["alert_id"].as_str().unwrap_or_default())
        .collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "duplicate alerts: {ids:?}");
    assert_eq!(unique, BTreeSet::from(EXPECTED));
    let threshold = alerts
        .iter()
        .find(|a| a["event"] == "threshold")
        .context("threshold alert")?;
    assert_eq!(threshold["value"], 70.0);
    assert_eq!(threshold["consecutive"], 2);
    assert_eq!(threshold["gateway_id"], format!("gw-{sfx}"));

    let data = read_topic_to_end(&topics[0], 2, &format!("check-data-{sfx}"))?;
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
