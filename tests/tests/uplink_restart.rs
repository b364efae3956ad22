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
