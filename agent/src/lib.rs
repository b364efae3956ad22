//! `edge-agent`: the gateway daemon.
//!
//! Sources hand raw inputs to the batch writer, which validates them and
//! commits them to the SQLite outbox in group-committed batches; the Kafka
//! uplink ships committed batches in transactions, exactly once.

pub mod cli;
pub mod config;
pub mod doctor;
pub mod fault;
pub mod import;
pub mod lock;
pub mod ops;
pub mod outbox;
pub mod pipeline;
pub mod registry;
pub mod signal;
pub mod sinks;
pub mod sources;
pub mod stats;
pub mod sync;
#[cfg(unix)]
pub mod systemd;
pub mod transforms;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info};

pub use config::Config;

/// A device id kept per device in the gateway's maps (dedupe marks, fence
/// and threshold state, the registry cache). Ids of up to 24 bytes, nearly
/// all of them, are stored inline: a lookup compares the bytes in the
/// probed slot instead of following a pointer to the heap, which with
/// 10,000 devices is a cache miss per map and reading.
pub type DeviceKey = compact_str::CompactString;
pub use stats::Stats;

use crate::pipeline::{AckRouter, BatchWriter};
use crate::signal::OutboxSignals;
use crate::sinks::kafka::{KafkaUplink, UplinkError};

/// Capacity of the queue between the sources and the batch writer: more
/// than a full batch (so group commit can fill one), small enough that
/// queued inputs stay a few MB.
pub(crate) const INPUT_QUEUE: usize = 8 * 1024;

/// How long shutdown waits for the uplink to finish its transaction.
const UPLINK_STOP_GRACE: Duration = Duration::from_secs(5);

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Fenced(UplinkError),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Opens the outbox with the data plane configured, applying the registry
/// file when it changed. Blocking: call it off the async reactor.
pub fn open_outbox(config: &Config) -> anyhow::Result<outbox::Outbox> {
    let mut outbox = outbox::Outbox::open_paged(
        &config.database_path(),
        config.outbox.synchronous,
        &config.gateway_id,
        config.outbox.quarantine_max_rows,
        config.outbox.page_size,
    )?;
    outbox.configure(config)?;
    if let Some(file) = &config.registry.file {
        registry::apply_file_at_start(
            outbox.connection(),
            file,
            config.registry.unknown_device,
            pipeline::now_ms(),
        )?;
    }
    Ok(outbox)
}

/// Runs the agent until `shutdown` resolves (or a fatal error). On shutdown
/// the sources stop, the batch in progress is committed, acknowledgements of
/// committed input are sent, and the uplink finishes its transaction.
pub async fn run(
    config: Config,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data folder {}", config.data_dir.display()))?;
    let _lock = lock::lock_data_dir(&config.data_dir).map_err(anyhow::Error::from)?;
    // Before anything runs: a token or CA file that cannot be used stops
    // the start with the key at fault.
    let cloud_sync =
        sync::CloudSync::from_config(&config, stats.clone()).map_err(anyhow::Error::from)?;
    let db = config.database_path();
    let (outbox, uplink_conn, backlog, registry_info) = {
        let (db, cfg) = (db.clone(), config.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let mut outbox = open_outbox(&cfg)?;
            let registry = registry::current(outbox.connection())?;
            let conn = outbox::open_connection(&db, cfg.outbox.synchronous)?;
            let backlog = outbox.backlog().context("reading the outbox backlog")?;
            Ok((outbox, conn, backlog, registry))
        })
        .await
        .context("opening the outbox")??
    };
    let (batches, bytes) = backlog;
    stats.set_registry_info(registry_info);
    stats
        .devices_known
        .store(outbox.known_devices() as u64, Relaxed);
    stats.outbox_batches.store(batches, Relaxed);
    stats.outbox_bytes.store(bytes, Relaxed);
    info!(
        db = %db.display(),
        backlog_batches = batches,
        backlog_bytes = bytes,
        known_devices = outbox.known_devices(),
        "outbox open"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let signals = Arc::new(OutboxSignals::default());
    let (input_tx, input_rx) = mpsc::channel(INPUT_QUEUE);
    let rt = tokio::runtime::Handle::current();

    // Sources.
    let mut acks = AckRouter::default();
    let mut sources = tokio::task::JoinSet::new();
    if let Some(mqtt) = config.sources.mqtt.clone() {
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        acks.mqtt = Some(ack_tx);
        let source = sources::mqtt::MqttSource {
            config: mqtt,
            stats: stats.clone(),
        };
        source.check()?;
        sources.spawn(source.run(input_tx.clone(), ack_rx, stop_rx.clone()));
    }
    for (index, serial) in config.sources.serial.iter().enumerate() {
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        acks.serial.push(ack_tx);
        let source = sources::serial::SerialSource {
            config: serial.clone(),
            index,
            stats: stats.clone(),
            port_stats: Arc::new(sources::serial::SerialPortStats::default()),
        };
        sources.spawn(source.run(input_tx.clone(), ack_rx, stop_rx.clone()));
    }
    if let Some(demo) = config.sources.demo.clone() {
        let topic_prefix = config
            .sources
            .mqtt
            .as_ref()
            .map(|m| m.topic_prefix.clone())
            .unwrap_or_default();
        let source = sources::demo::DemoSource {
            config: demo,
            topic_prefix,
            stats: stats.clone(),
        };
        sources.spawn(source.run(input_tx.clone(), stop_rx.clone()));
    }
    drop(input_tx);

    // Batch writer thread.
    let writer = BatchWriter::new(&config, outbox, stats.clone(), signals.clone(), acks);
    let (writer_done_tx, writer_done) = oneshot::channel();
    let writer_thread = {
        let (rt, stop) = (rt.clone(), stop_rx.clone());
        std::thread::Builder::new()
            .name("batch-writer".into())
            .spawn(move || {
                writer.run(rt, input_rx, stop);
                let _ = writer_done_tx.send(());
            })
            .context("starting the batch writer thread")?
    };

    // Uplink thread.
    let uplink = KafkaUplink::new(
        config.clone(),
        uplink_conn,
        stats.clone(),
        signals.clone(),
        rt.clone(),
        stop_rx.clone(),
    );
    let (uplink_done_tx, mut uplink_done) = oneshot::channel();
    let uplink_thread = std::thread::Builder::new()
        .name("kafka-uplink".into())
        .spawn(move || {
            let result = uplink.run();
            let _ = uplink_done_tx.send(());
            result
        })
        .context("starting the Kafka uplink thread")?;

    // Registry cloud sync: applies on its own SQLite connection; the batch
    // writer picks a new registry up at its next batch.
    let sync_task = cloud_sync
        .map(|sync| tokio::spawn(sync.with_signals(signals.clone()).run(stop_rx.clone())));

    // Operations endpoint: /metrics, /health, /status.
    let ops_state = Arc::new(ops::OpsState::new(stats.clone(), &config.gateway_id));
    let mut ops_tasks = Vec::new();
    {
        let state = ops_state.clone();
        ops_tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                state.sample();
            }
        }));
    }
    if !config.http.listen.is_empty() {
        match tokio::net::TcpListener::bind(&config.http.listen).await {
            Ok(listener) => {
                info!(listen = %config.http.listen, "serving /metrics, /health and /status");
                ops_tasks.push(tokio::spawn(ops::serve(listener, ops_state.clone())));
            }
            // Readings matter more than metrics: go on without the endpoint.
            Err(e) => error!(
                listen = %config.http.listen,
                error = %e,
                "cannot serve /metrics, /health and /status; is another agent running? \
                 Set http.listen to a free port (or \"\" to turn it off)"
            ),
        }
    }

    // Progress line.
    let progress = (config.progress.interval_seconds > 0).then(|| {
        let stats = stats.clone();
        let every = Duration::from_secs(config.progress.interval_seconds);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!("{}", stats.progress_line());
            }
        })
    });

    // systemd: ready now; the watchdog is fed while the batch writer shows
    // signs of life (it wakes at least once a second, even when idle).
    #[cfg(unix)]
    let notifier = systemd::Notifier::from_env().map(Arc::new);
    #[cfg(unix)]
    let watchdog = notifier.clone().map(|notifier| {
        if let Err(e) = notifier.notify("READY=1") {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
        let stats = stats.clone();
        let interval = systemd::watchdog_interval();
        tokio::spawn(async move {
            let Some(interval) = interval else { return };
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                let age_ms = pipeline::now_ms() - stats.writer_heartbeat_ms.load(Relaxed);
                if age_ms < interval.as_millis() as i64 {
                    let _ = notifier.notify("WATCHDOG=1");
                } else {
                    tracing::error!(
                        age_ms,
                        "the batch writer is stuck; not feeding the systemd watchdog"
                    );
                }
            }
        })
    });

    let mut source_error = None;
    let mut uplink_finished = false;
    tokio::select! {
        _ = shutdown => info!("shutting down: stopping sources, committing the batch in progress"),
        _ = &mut uplink_done => uplink_finished = true,
        Some(result) = sources.join_next() => {
            match result {
                Ok(Err(e)) => {
                    error!(error = format!("{e:#}"), "a source failed");
                    source_error = Some(e);
                }
                Err(e) if e.is_panic() => {
                    error!("a source panicked");
                    source_error = Some(anyhow::anyhow!("a source task panicked: {e}"));
                }
                _ => {}
            }
        }
    }
    #[cfg(unix)]
    if let Some(n) = &notifier {
        let _ = n.notify("STOPPING=1");
    }
    #[cfg(unix)]
    if let Some(w) = watchdog {
        w.abort();
    }
    let _ = stop_tx.send(true);
    while let Some(result) = sources.join_next().await {
        if let Ok(Err(e)) = result {
            error!(error = format!("{e:#}"), "a source failed while stopping");
        }
    }
    if let Some(task) = sync_task
        && let Err(e) = task.await
    {
        error!(error = %e, "the registry cloud sync task failed");
    }
    let _ = writer_done.await;
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    // The uplink finishes a transaction in flight, but a call blocked on an
    // unreachable broker is not worth waiting for: everything is durable in
    // the outbox, and the next start fences and aborts whatever was open.
    let finished = uplink_finished
        || tokio::time::timeout(UPLINK_STOP_GRACE, &mut uplink_done)
            .await
            .is_ok();
    let uplink_result = match finished {
        true => tokio::task::spawn_blocking(move || uplink_thread.join())
            .await
            .map_err(|e| anyhow::anyhow!("uplink thread: {e}"))?
            .map_err(|_| anyhow::anyhow!("the Kafka uplink thread panicked"))?,
        false => {
            info!(
                "the Kafka uplink is still waiting on the broker; leaving it (the outbox keeps the data)"
            );
            Ok(())
        }
    };
    if let Some(p) = progress {
        p.abort();
    }
    for task in ops_tasks {
        task.abort();
    }
    if config.progress.interval_seconds > 0 {
        eprintln!("{}", stats.progress_line());
    }
    if let Err(e) = uplink_result {
        sinks::kafka::report_fatal(&e);
        return Err(match e {
            e @ UplinkError::Fenced { .. } => AgentError::Fenced(e),
            other => AgentError::Other(other.into()),
        });
    }
    if let Some(e) = source_error {
        return Err(AgentError::Other(e));
    }
    info!("stopped cleanly");
    Ok(())
}
