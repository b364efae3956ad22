//! The serial path over a real pseudo-terminal pair: the agent opens the
//! tty with `tokio-serial` like a USB adapter, simulated devices on the
//! other end run the firmware link over a channel that drops and corrupts
//! bytes, and the adapter is unplugged and replugged mid-run. Exactly the
//! 10,000 readings sent must be in the outbox, each once.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context as _;
use edge_agent::outbox::{SendError, TopicId, send_pending};
use edge_tests::sim::{ByteFaults, SerialRunEnd, SerialSim, SerialSimConfig, Track};
use edge_tests::wait_for;

const DEVICES: u8 = 4;
const PER_DEVICE: u32 = 2500;

/// A "USB adapter": a pty pair whose slave is reachable under a stable
/// by-id style symlink, as udev provides for real adapters.
struct Adapter {
    master: tokio_serial::SerialStream,
    _slave: tokio_serial::SerialStream,
}

fn plug(link: &Path) -> anyhow::Result<Adapter> {
    let (master, slave) = tokio_serial::SerialStream::pair().context("creating a pty pair")?;
    let name = tokio_serial::SerialPort::name(&slave).context("pty without a name")?;
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&name, &tmp)?;
    std::fs::rename(&tmp, link)?;
    Ok(Adapter {
        master,
        _slave: slave,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_readings_over_a_lossy_replugged_serial_line_arrive_exactly_once()
-> anyhow::Result<()> {
    edge_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let by_id = dir.path().join("usb-edge-sim-if00");

    let toml = format!(
        r#"
gateway_id = "serial-test"
data_dir = "{data}"
[[sources.serial]]
path = "{port}"
baud_rate = 115200
reopen_backoff_max_seconds = 1
[kafka]
# Nothing listens here: the readings stay in the outbox, which is what
# this test inspects.
brokers = "127.0.0.1:1"
retry_backoff_max_seconds = 1
[progress]
interval_seconds = 0
"#,
        data = dir.path().join("data").display(),
        port = by_id.display()
    );
    let config = edge_agent::Config::from_toml(&toml, "serial test")?;
    let stats = Arc::new(edge_agent::Stats::default());
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut adapter = plug(&by_id)?;
    let agent = tokio::spawn(edge_agent::run(config, stats.clone(), async {
        let _ = agent_stopped.await;
    }));

    let sim_config = SerialSimConfig {
        devices: DEVICES,
        readings_per_device: PER_DEVICE,
        readings_per_second: 0.0,
        invalid_fraction: 0.0,
        seed: 20261126,
        uplink_faults: ByteFaults {
            drop_rate: 0.0005,
            corrupt_rate: 0.0005,
        },
        downlink_faults: ByteFaults {
            drop_rate: 0.0005,
            corrupt_rate: 0.0005,
        },
        boot_epoch: 1_000,
        id_prefix: "pty-dev-".into(),
        track: Track {
            center_lat: 48.1,
            center_lon: 11.5,
            radius_deg: 0.01,
            step_rad: 0.05,
            angle: 0.0,
        },
    };
    let expected = sim_config.expected_keys();
    assert_eq!(expected.len(), 10_000);
    let mut sim = SerialSim::new(sim_config);

    // First half, then the adapter is unplugged.
    let end = tokio::time::timeout(
        Duration::from_secs(180),
        sim.run(&mut adapter.master, |p| p.acked >= 3_000),
    )
    .await?;
    assert!(matches!(end, SerialRunEnd::Stopped), "{end:?}");
    drop(adapter);
    let unplugged_at = sim.progress().acked;
    // Replug: a new tty behind the same stable path.
    let mut adapter = plug(&by_id)?;
    let end = tokio::time::timeout(
        Duration::from_secs(300),
        sim.run(&mut adapter.master, |_| false),
    )
    .await
    .context("the devices did not get every reading acknowledged within 300 s")?;
    assert!(matches!(end, SerialRunEnd::Done), "{end:?}");
    let progress = sim.progress();
    println!(
        "serial: {} readings acknowledged ({} before the unplug), {} retransmission rounds, {} bytes sent",
        progress.acked, unplugged_at, progress.retransmissions, sim.bytes_sent
    );
    assert!(
        progress.retransmissions > 0,
        "the faulty line must have cost retransmissions"
    );

    // Everything acknowledged is durable: stop the agent and read the outbox.
    wait_for(
        "the agent to count every reading",
        Duration::from_secs(30),
        || {
            let stats = stats.clone();
            async move { Ok((stats.valid.load(Relaxed) >= 10_000).then_some(())) }
        },
    )
    .await?;
    // Nothing listens at the configured broker: the uplink fails, counts
    // it, and keeps retrying while the outbox holds the readings.
    wait_for("an uplink failure counted", Duration::from_secs(60), || {
        let stats = stats.clone();
        async move { Ok((stats.uplink_failures.load(Relaxed) >= 1).then_some(())) }
    })
    .await?;
    let _ = stop_agent.send(());
    tokio::time::timeout(Duration::from_secs(30), agent)
        .await
        .context("agent did not stop")??
        .map_err(|e| anyhow::anyhow!("agent failed: {e}"))?;

    let conn = rusqlite::Connection::open(dir.path().join("data/edge-agent.db"))?;
    let mut stored = Vec::new();
    // Every batch, read back as the uplink sends it.
    let sent = send_pending(
        &conn,
        0,
        usize::MAX >> 1,
        u64::MAX,
        || Ok(()),
        |topic, _key, value| {
            assert_eq!(topic, TopicId::Data, "no reading may be rejected");
            let v: serde_json::Value = serde_json::from_slice(value)?;
            stored.push((
                v["device_id"].as_str().unwrap_or_default().to_string(),
                v["seq"].as_u64().unwrap_or_default(),
            ));
            Ok::<(), anyhow::Error>(())
        },
    )
    .map_err(|e| match e {
        SendError::Outbox(e) => anyhow::Error::new(e),
        SendError::Sink(e) => e,
    })?;
    assert_eq!(
        sent.map_or(0, |s| s.records),
        stored.len() as u64,
        "every record counted"
    );
    let unique: BTreeSet<(String, u64)> = stored.iter().cloned().collect();
    assert_eq!(stored.len(), unique.len(), "a reading was stored twice");
    let missing: Vec<_> = expected.difference(&unique).take(5).collect();
    let extra: Vec<_> = unique.difference(&expected).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, unexpected {extra:?}"
    );
    assert_eq!(stats.rejected.load(Relaxed), 0);
    Ok(())
}
