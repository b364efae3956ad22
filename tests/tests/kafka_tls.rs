//! The bridge consumes over TLS: the test Kafka's SSL listener (certificate
//! from the throwaway CA tests/services/up makes), verified by librdkafka
//! against that CA, host name included.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use edge_tests::{
    TestDatabase, create_topics, delete_topics, init_logging, kafka_brokers, unique, wait_for,
};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const READINGS: u64 = 50;

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_consumes_over_verified_tls() -> anyhow::Result<()> {
    init_logging();
    let sfx = unique("tls");
    let topic = format!("data-{sfx}");
    create_topics(&[(&topic, 1, false)]).await?;
    let db = TestDatabase::create("edge_kafka_tls").await?;
    let result = scenario(&sfx, &topic, &db.url).await;
    delete_topics(&[&topic]).await;
    db.drop_now().await;
    result
}

async fn scenario(sfx: &str, topic: &str, db_url: &str) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()?;
    for i in 0..READINGS {
        let payload = serde_json::json!({
            "device_id": "tls-1", "seq": i, "device_seq": i, "ts": 1_700_000_000_000i64,
            "temperature": 20.0, "humidity": 40.0, "battery": 3.7, "lat": 1.0, "lon": 2.0, "speed": 0.0,
            "gateway_id": "gw-tls", "received_at": 1_700_000_000_001i64
        })
        .to_string();
        producer
            .send(
                FutureRecord::to(topic).key("tls-1").payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let ca = env_or(
        "EDGE_TEST_TLS_CA",
        &format!(
            "{}/.cache/edge-gateway/services/data/tls/ca.pem",
            env_or("HOME", "")
        ),
    );
    anyhow::ensure!(
        std::path::Path::new(&ca).exists(),
        "{ca} is missing: restart the services with tests/services/up"
    );
    let dir = tempfile::tempdir()?;
    let config_file = dir.path().join("bridge.toml");
    std::fs::write(
        &config_file,
        format!(
            "[kafka]\nbrokers = \"{}\"\ngroup_id = \"g-{sfx}\"\ntopic_data = \"{topic}\"\ntopic_dlq = \"{topic}-dlq\"\n\
             [kafka.librdkafka_options]\n\"security.protocol\" = \"ssl\"\n\"ssl.ca.location\" = \"{ca}\"\n\
             \"ssl.endpoint.identification.algorithm\" = \"https\"\n\
             [mysql]\nurl = \"{db_url}\"\n[api]\nlisten = \"\"\n",
            env_or("EDGE_TEST_KAFKA_SSL", "127.0.0.1:29094"),
        ),
    )?;
    let config = cloud_bridge::BridgeConfig::load(Some(&config_file), |_| None)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let bridge = tokio::spawn(cloud_bridge::run(
        config,
        Arc::new(cloud_bridge::sinks::mysql::MysqlSinkStats::default()),
        async {
            let _ = stopped.await;
        },
    ));
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(1)
        .connect(db_url)
        .await?;
    let waited = wait_for(
        "the readings consumed over TLS in MariaDB",
        Duration::from_secs(60),
        || {
            let q =
                sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM iot_metrics").fetch_one(&pool);
            async move { Ok(q.await.ok().filter(|n| *n as u64 >= READINGS)) }
        },
    )
    .await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(60), bridge)
        .await
        .context("the bridge did not stop")???;
    assert_eq!(waited? as u64, READINGS);
    pool.close().await;
    Ok(())
}
