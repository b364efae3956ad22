//! Shared helpers for the end-to-end tests: where the real services are
//! (started by `tests/services/up`), unique names so tests never collide,
//! and waiting on conditions with a deadline.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

pub mod bench;
pub mod delay_proxy;
pub mod fleet;
pub mod sim;
pub mod sinkbench;

/// Unix time in milliseconds (the agent's own clock helper).
pub use edge_agent::pipeline::now_ms;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

/// Address of the test Mosquitto (`EDGE_TEST_MQTT`).
pub fn mqtt_addr() -> (String, u16) {
    let addr = std::env::var("EDGE_TEST_MQTT").unwrap_or_else(|_| "127.0.0.1:21883".into());
    let (host, port) = addr.rsplit_once(':').unwrap_or((&addr, "1883"));
    (host.to_string(), port.parse().unwrap_or(1883))
}

/// Bootstrap servers of the test Kafka (`EDGE_TEST_KAFKA`).
pub fn kafka_brokers() -> String {
    std::env::var("EDGE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:29092".into())
}

/// Server URL of the test MariaDB without a database (`EDGE_TEST_MYSQL_URL`).
/// The OpenSearch the test services run (`EDGE_TEST_OPENSEARCH`).
pub fn opensearch_url() -> String {
    std::env::var("EDGE_TEST_OPENSEARCH").unwrap_or_else(|_| "http://127.0.0.1:29200".into())
}

pub fn mysql_server_url() -> String {
    let url = std::env::var("EDGE_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://edge:edge@127.0.0.1:23306/edge".into());
    match url.rfind('/') {
        Some(i) if i > "mysql://".len() => url[..i].to_string(),
        _ => url,
    }
}

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{nanos:09}_{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// A device-side MQTT publisher on the test Mosquitto, its connection
/// driven (and reconnected) by the returned task.
pub fn mqtt_publisher(client_id: &str) -> (rumqttc::AsyncClient, tokio::task::JoinHandle<()>) {
    let (host, port) = mqtt_addr();
    let mut opts = rumqttc::MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 1000);
    let task = tokio::spawn(async move {
        loop {
            if let Err(e) = eventloop.poll().await {
                eprintln!("publisher connection: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    (client, task)
}

/// Waits until the agent is subscribed: publishes `probe` to `topic` every
/// 200 ms until the agent received something (probes sent before the
/// subscription go nowhere; later ones arrive as duplicates).
pub async fn wait_subscribed(
    client: &rumqttc::AsyncClient,
    stats: &std::sync::Arc<edge_agent::Stats>,
    topic: &str,
    probe: String,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    wait_for("the agent to subscribe", Duration::from_secs(60), || {
        let (client, stats, topic, probe) = (
            client.clone(),
            stats.clone(),
            topic.to_string(),
            probe.clone(),
        );
        async move {
            if stats.received.load(Relaxed) > 0 {
                return Ok(Some(()));
            }
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, probe)
                .await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok(None)
        }
    })
    .await
}

/// Polls `check` until it returns `Some`, failing with `what` after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates topics on the test Kafka; fails if Kafka is not there.
pub async fn create_topics(topics: &[(&str, i32, bool)]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .context("creating a Kafka admin client")?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(name, partitions, compacted)| {
            let t = NewTopic::new(name, *partitions, TopicReplication::Fixed(1));
            if *compacted {
                t.set("cleanup.policy", "compact")
            } else {
                t
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin
        .create_topics(new.iter(), &opts)
        .await
        .with_context(|| {
            format!(
                "creating topics on Kafka at {}: is it running? start it with tests/services/up",
                kafka_brokers()
            )
        })?
    {
        r.map_err(|(name, code)| anyhow::anyhow!("creating topic {name}: {code}"))?;
    }
    Ok(())
}

/// Deletes topics (cleanup; errors are reported, not fatal).
pub async fn delete_topics(topics: &[&str]) {
    let admin: Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create();
    if let Ok(admin) = admin
        && let Err(e) = admin.delete_topics(topics, &AdminOptions::new()).await
    {
        eprintln!("cleanup: deleting topics {topics:?}: {e}");
    }
}

/// A database created for one test and dropped by [`TestDatabase::drop_now`].
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    admin: sqlx::MySqlPool,
}

impl TestDatabase {
    pub async fn create(prefix: &str) -> anyhow::Result<Self> {
        let name = unique(prefix);
        let server = mysql_server_url();
        let admin = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(2)
            .connect(&format!("{server}/"))
            .await
            .with_context(|| format!("connecting to MariaDB at {server}: is it running? start it with tests/services/up"))?;
        // The name is generated here from [a-z0-9_]: safe as an identifier.
        sqlx::query(&format!("CREATE DATABASE `{name}`"))
            .execute(&admin)
            .await?;
        Ok(Self {
            url: format!("{server}/{name}"),
            name,
            admin,
        })
    }

    pub async fn drop_now(self) {
        if let Err(e) = sqlx::query(&format!("DROP DATABASE IF EXISTS `{}`", self.name))
            .execute(&self.admin)
            .await
        {
            eprintln!("cleanup: dropping database {}: {e}", self.name);
        }
    }
}

/// Logs for tests, once.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Reads a topic to its end with `read_committed` (all `partitions`);
/// returns the JSON values.
pub fn read_topic_to_end(
    topic: &str,
    partitions: usize,
    group: &str,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", group)
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .create()?;
    rdkafka::consumer::Consumer::subscribe(&consumer, &[topic])?;
    let mut out = Vec::new();
    let mut eof = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while eof.len() < partitions {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "did not read {topic} to its end"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push(serde_json::from_slice(
                rdkafka::message::Message::payload(&m).unwrap_or_default(),
            )?),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                eof.insert(p);
            }
            _ => {}
        }
    }
    Ok(out)
}
