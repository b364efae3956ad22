//! The agent acknowledges every MQTT reading it made durable.
//!
//! 20,000 QoS 1 readings arrive in one burst, more than the agent's input
//! queue holds, and acknowledgements go out while the MQTT source is held
//! back by a full queue as well as while it reads. The agent is stopped as soon
//! as nearly all arrived: the clean stop makes what it holds durable and
//! acknowledges it. A new agent with the same client id then resumes the
//! broker session and gets what the first did not receive, and a marker
//! published after the restart. A reading the first agent had made durable
//! but not acknowledged would come again, as a duplicate: there must be
//! none.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use edge_tests::*;
use rumqttc::QoS;

const READINGS: u64 = 20_000;
const DEVICES: u64 = 50;

fn reading(device: u64, seq: u64) -> String {
    serde_json::json!({
        "device_id": format!("dev-{device:02}"), "seq": seq,
        "ts": edge_agent::pipeline::now_ms(),
        "temperature": 21.5, "humidity": 45.0, "battery": 80.0,
        "lat": 52.5, "lon": 13.4, "speed": 1.5, "firmware": "2.1.0"
    })
    .to_string()
}

struct Agent {
    stats: Arc<edge_agent::Stats>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), edge_agent::AgentError>>,
}

impl Agent {
    fn start(toml: &str) -> anyhow::Result<Self> {
        let config = edge_agent::Config::from_toml(toml, "mqtt acks test")?;
        let stats = Arc::new(edge_agent::Stats::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(edge_agent::run(config, stats.clone(), async {
            let _ = stopped.await;
        }));
        Ok(Self { stats, stop, task })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(60), self.task).await???;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_durable_reading_is_acknowledged_and_none_comes_back() -> anyhow::Result<()> {
    init_logging();
    let (mqtt_host, mqtt_port) = mqtt_addr();
    let sfx = unique("acks");
    let prefix = format!("{sfx}/");
    let data_dir = tempfile::tempdir()?;
    // Kafka is not needed here: the readings stay in the outbox.
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
[outbox]
# Small batches, each synced: the publisher outpaces the agent and fills its
# input queue. A batch not full waits up to a second, so the clean stop
# always finds one.
batch_max_records = 20
batch_linger_ms = 1000
synchronous = "full"
[kafka]
brokers = "127.0.0.1:1"
[progress]
interval_seconds = 0
"#,
        data_dir = data_dir.path().display(),
    );
    let first = Agent::start(&agent_toml)?;

    let (client, publisher) = mqtt_publisher(&format!("pub-{sfx}"));
    let topic = |device: u64| format!("{prefix}devices/dev-{device:02}/telemetry");
    // Probes (device 0, seq 0) sent later than the first that arrives are
    // duplicates.
    wait_subscribed(&client, &first.stats, &topic(0), reading(0, 0)).await?;
    for i in 0..READINGS {
        let device = i % DEVICES;
        let seq = 1 + i / DEVICES;
        client
            .publish(topic(device), QoS::AtLeastOnce, false, reading(device, seq))
            .await?;
    }
    // Stopped once nearly everything arrived, much of it still queued or
    // in a batch: a clean stop makes that durable and acknowledges it. What
    // had not arrived goes to the next agent.
    wait_for("the readings to arrive", Duration::from_secs(120), || {
        let stats = first.stats.clone();
        async move { Ok((stats.received.load(Relaxed) >= READINGS).then_some(())) }
    })
    .await?;
    let stats = first.stats.clone();
    first.stop().await?;
    assert_eq!(stats.rejected.load(Relaxed), 0);
    let (valid_first, received_first) = (stats.valid.load(Relaxed), stats.received.load(Relaxed));

    // The same session again, and a marker after the restart. A reading the
    // first agent made durable but did not acknowledge comes again, as a
    // duplicate, before the marker.
    let second = Agent::start(&agent_toml)?;
    let marker_seq = 1 + READINGS / DEVICES;
    client
        .publish(topic(0), QoS::AtLeastOnce, false, reading(0, marker_seq))
        .await?;
    // The probe, the readings and the marker.
    let distinct = READINGS + 2;
    wait_for(
        "every reading and the marker to be durable",
        Duration::from_secs(60),
        || {
            let stats = second.stats.clone();
            async move { Ok((valid_first + stats.valid.load(Relaxed) >= distinct).then_some(())) }
        },
    )
    .await?;
    let (valid, received, duplicates) = (
        second.stats.valid.load(Relaxed),
        second.stats.received.load(Relaxed),
        second.stats.duplicates.load(Relaxed),
    );
    second.stop().await?;
    publisher.abort();
    assert_eq!(
        duplicates, 0,
        "after a clean stop the broker delivered again {duplicates} readings the first \
         agent had made durable (it received {received_first}, {valid_first} valid)"
    );
    assert_eq!(valid_first + valid, distinct);
    assert_eq!(received, valid);
    Ok(())
}
