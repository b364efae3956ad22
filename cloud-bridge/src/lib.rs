//! `cloud-bridge`: consumes the gateways' Kafka topics and writes MySQL,
//! exactly once (offsets stored with the rows in the same transaction).

pub mod cli;
pub mod config;
pub mod migrations;
pub mod sinks;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::mysql::MySqlPoolOptions;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tracing::{error, info, warn};

pub use config::BridgeConfig;
use sinks::mysql::{KafkaRecord, MysqlSink, MysqlSinkStats};

/// Connects to MySQL and runs the migrations.
pub async fn connect_and_migrate(config: &BridgeConfig) -> anyhow::Result<sqlx::MySqlPool> {
    let redacted = config::redact_url(&config.mysql.url);
    let pool = MySqlPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&config.mysql.url)
        .await
        .with_context(|| format!("connecting to MySQL at {redacted}"))?;
    migrations::migrate(&pool)
        .await
        .with_context(|| format!("running schema migrations on {redacted}"))?;
    Ok(pool)
}

/// Seeks newly assigned partitions to the offsets stored in MySQL, so the
/// database, not Kafka's group offsets, decides where consumption resumes.
struct BridgeContext {
    sink: Arc<MysqlSink>,
    rt: Handle,
    stop: watch::Receiver<bool>,
}

impl ClientContext for BridgeContext {}

impl ConsumerContext for BridgeContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                let stored = loop {
                    // Runs on the consumer thread, never on the async runtime.
                    match self.rt.block_on(self.sink.stored_offsets(&partitions)) {
                        Ok(s) => break s,
                        Err(e) => {
                            if *self.stop.borrow() {
                                // Stopping: take nothing rather than guess offsets.
                                let _ = consumer.unassign();
                                return;
                            }
                            warn!(error = %e, "cannot read stored offsets from MySQL on partition assignment; retrying");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                };
                for p in &partitions {
                    let offset = stored
                        .get(p)
                        .map_or(Offset::Beginning, |o| Offset::Offset(*o));
                    let _ = tpl.set_partition_offset(&self.sink.topic, *p, offset);
                }
                info!(
                    ?partitions,
                    ?stored,
                    "partitions assigned; resuming at the offsets stored in MySQL"
                );
                if let Err(e) = consumer.assign(tpl) {
                    error!(error = %e, "assigning partitions failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                info!(partitions = tpl.count(), "partitions revoked");
                if let Err(e) = consumer.unassign() {
                    error!(error = %e, "unassigning partitions failed");
                }
            }
            other => {
                error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, _rebalance: &Rebalance<'_>) {}
}

/// Runs the bridge until `shutdown` resolves. The batch in progress is
/// committed to MySQL before the consumer leaves its group.
pub async fn run(
    config: BridgeConfig,
    stats: Arc<MysqlSinkStats>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let pool = connect_and_migrate(&config).await?;
    let sink = Arc::new(MysqlSink {
        pool,
        sink_name: config.mysql.sink_name.clone(),
        topic: config.kafka.topic_data.clone(),
        rows_per_insert: config.mysql.rows_per_insert,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let rt = Handle::current();
    let alerts_thread = if config.opensearch.url.is_empty() {
        None
    } else {
        let alert_sink = sinks::opensearch::AlertSink::new(&config.opensearch)?;
        let (config, pool, rt, stop) = (
            config.clone(),
            sink.pool.clone(),
            rt.clone(),
            stop_rx.clone(),
        );
        Some(
            std::thread::Builder::new()
                .name("alerts-consumer".into())
                .spawn(move || consume_alerts(config, alert_sink, pool, rt, stop))
                .context("starting the alerts consumer thread")?,
        )
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("kafka-consumer".into())
        .spawn(move || {
            let result = consume(config, sink, stats, rt, stop_rx);
            let _ = done_tx.send(());
            result
        })
        .context("starting the consumer thread")?;
    tokio::select! {
        _ = shutdown => info!("shutting down: finishing the batch in progress"),
        _ = done_rx => {}
    }
    let _ = stop_tx.send(true);
    if let Some(alerts) = alerts_thread {
        tokio::task::spawn_blocking(move || alerts.join())
            .await
            .context("joining the alerts consumer thread")?
            .map_err(|_| anyhow::anyhow!("the alerts consumer thread panicked"))??;
    }
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .context("joining the consumer thread")?
        .map_err(|_| anyhow::anyhow!("the consumer thread panicked"))?
}

/// Consumes `iot-alerts` into OpenSearch: bulk-indexes each batch under the
/// alerts' deterministic ids, dead-letters what can never be indexed, and
/// commits the Kafka offsets only once the whole batch is settled.
fn consume_alerts(
    config: BridgeConfig,
    sink: sinks::opensearch::AlertSink,
    pool: sqlx::MySqlPool,
    rt: Handle,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use sinks::opensearch::AlertRecord;
    let os = &config.opensearch;
    let group = os
        .group_id
        .clone()
        .unwrap_or_else(|| format!("{}-alerts", config.kafka.group_id));
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &group)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    for (k, v) in &config.kafka.librdkafka_options {
        client.set(k, v);
    }
    let consumer: BaseConsumer = client
        .create()
        .with_context(|| format!("creating the alerts consumer for {}", config.kafka.brokers))?;
    consumer
        .subscribe(&[&os.topic])
        .with_context(|| format!("subscribing to {}", os.topic))?;
    info!(topic = %os.topic, group = %group, index = %os.index, "indexing alerts");
    let linger = Duration::from_millis(os.batch_linger_ms);
    let mut batch: Vec<AlertRecord> = Vec::new();
    let mut first_at = Instant::now();
    let mut counts = AlertCounts::default();
    loop {
        let stopping = *stop.borrow();
        if !batch.is_empty()
            && (batch.len() >= os.bulk_max_docs || first_at.elapsed() >= linger || stopping)
        {
            if !settle_alerts(
                &sink,
                &pool,
                &config,
                &rt,
                &consumer,
                &batch,
                &stop,
                &mut counts,
            ) {
                // Not committed: consumed again after the restart, and the
                // ids make that harmless.
                info!("stopping with alerts not yet settled; they are consumed again on restart");
                consumer.unsubscribe();
                return Ok(());
            }
            batch.clear();
        }
        if stopping {
            break;
        }
        if let Some((partition, offset, payload)) =
            poll_record(&consumer, !batch.is_empty(), "alerts")
        {
            if batch.is_empty() {
                first_at = Instant::now();
            }
            batch.push(AlertRecord {
                partition,
                offset,
                payload: payload.unwrap_or_default(),
            });
        }
    }
    consumer.unsubscribe();
    Ok(())
}

#[derive(Default)]
struct AlertCounts {
    indexed: u64,
    dead_lettered: u64,
}

/// Settles every alert of a batch (indexed, or dead-lettered with a
/// reason), then commits its offsets. Returns false when asked to stop
/// before the batch was settled (nothing is committed then).
#[allow(clippy::too_many_arguments)]
fn settle_alerts(
    sink: &sinks::opensearch::AlertSink,
    pool: &sqlx::MySqlPool,
    config: &BridgeConfig,
    rt: &Handle,
    consumer: &BaseConsumer,
    batch: &[sinks::opensearch::AlertRecord],
    stop: &watch::Receiver<bool>,
    counts: &mut AlertCounts,
) -> bool {
    use sinks::opensearch::{ItemOutcome, alert_id};
    let os = &config.opensearch;
    let mut pending: Vec<(String, usize)> = Vec::new();
    let mut letters: Vec<(usize, String, String)> = Vec::new();
    for (i, r) in batch.iter().enumerate() {
        match alert_id(&r.payload) {
            Ok(id) => pending.push((id, i)),
            Err(why) => letters.push((i, "not_an_alert".into(), why)),
        }
    }
    let mut backoff = Duration::from_millis(200);
    while !pending.is_empty() {
        let docs: Vec<(String, &[u8])> = pending
            .iter()
            .map(|(id, i)| (id.clone(), batch[*i].payload.as_slice()))
            .collect();
        let retry = match rt.block_on(sink.bulk(&docs)) {
            Ok(outcomes) => {
                let mut again = Vec::new();
                for ((id, i), outcome) in pending.drain(..).zip(outcomes) {
                    match outcome {
                        ItemOutcome::Indexed => counts.indexed += 1,
                        ItemOutcome::Retry(why) => {
                            warn!(alert_id = %id, why, "alert not indexed yet; retrying");
                            again.push((id, i));
                        }
                        ItemOutcome::Permanent { reason, message } => {
                            letters.push((i, reason, message))
                        }
                    }
                }
                pending = again;
                !pending.is_empty()
            }
            Err(e) => {
                warn!(
                    error = format!("{e:#}"),
                    alerts = pending.len(),
                    "OpenSearch bulk request failed; retrying in {backoff:?}"
                );
                true
            }
        };
        if retry {
            if *stop.borrow() {
                return false;
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
    let mut backoff = Duration::from_millis(200);
    while !letters.is_empty() {
        match rt.block_on(dead_letter(&pool, &config, &batch, &letters)) {
            Ok(()) => {
                for (i, reason, message) in &letters {
                    warn!(
                        partition = batch[*i].partition,
                        offset = batch[*i].offset,
                        reason,
                        message,
                        "alert dead-lettered"
                    );
                }
                counts.dead_lettered += letters.len() as u64;
                letters.clear();
            }
            Err(e) => {
                if *stop.borrow() {
                    return false;
                }
                warn!(error = %e, "writing alert dead letters to MySQL failed; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    let mut next: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
    for r in batch {
        let e = next.entry(r.partition).or_insert(0);
        *e = (*e).max(r.offset + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in next {
        let _ = tpl.add_partition_offset(&os.topic, p, Offset::Offset(o));
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
        // The alerts are indexed: a replay only overwrites them.
        warn!(error = %e, "committing alert offsets failed; they may be indexed again (same ids)");
    }
    info!(
        indexed = counts.indexed,
        dead_lettered = counts.dead_lettered,
        "alerts settled"
    );
    true
}

/// One record from the consumer, or `None`: nothing yet, the end of a
/// partition, or an error librdkafka retries by itself (logged).
fn poll_record<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    batch_open: bool,
    what: &str,
) -> Option<(i32, i64, Option<Vec<u8>>)> {
    let wait = Duration::from_millis(if batch_open { 5 } else { 100 });
    match consumer.poll(wait) {
        None | Some(Err(KafkaError::PartitionEOF(_))) => None,
        Some(Ok(msg)) => Some((
            msg.partition(),
            msg.offset(),
            msg.payload().map(<[u8]>::to_vec),
        )),
        Some(Err(e)) => {
            warn!(error = %e, what, "Kafka consumer error; librdkafka retries by itself");
            None
        }
    }
}

async fn dead_letter(
    pool: &sqlx::MySqlPool,
    config: &BridgeConfig,
    batch: &[sinks::opensearch::AlertRecord],
    letters: &[(usize, String, String)],
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    for (i, reason, message) in letters {
        let r = &batch[*i];
        sqlx::query(
            "INSERT IGNORE INTO bridge_dead_letters (sink, topic, kafka_partition, kafka_offset, reason, message, payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind("opensearch-alerts")
        .bind(&config.opensearch.topic)
        .bind(r.partition)
        .bind(r.offset)
        .bind(reason.chars().take(64).collect::<String>())
        .bind(message)
        .bind(&r.payload)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

fn consume(
    config: BridgeConfig,
    sink: Arc<MysqlSink>,
    stats: Arc<MysqlSinkStats>,
    rt: Handle,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &config.kafka.group_id)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "range,roundrobin");
    for (k, v) in &config.kafka.librdkafka_options {
        client.set(k, v);
    }
    let consumer: BaseConsumer<BridgeContext> = client
        .create_with_context(BridgeContext {
            sink: sink.clone(),
            rt: rt.clone(),
            stop: stop.clone(),
        })
        .with_context(|| format!("creating the Kafka consumer for {}", config.kafka.brokers))?;
    consumer
        .subscribe(&[&config.kafka.topic_data])
        .with_context(|| format!("subscribing to {}", config.kafka.topic_data))?;
    info!(topic = %config.kafka.topic_data, group = %config.kafka.group_id, "consuming");

    let linger = Duration::from_millis(config.mysql.batch_linger_ms);
    let max = config.mysql.batch_max_records;
    let mut batch: Vec<KafkaRecord> = Vec::new();
    let mut first_at = Instant::now();
    loop {
        let stopping = *stop.borrow();
        let due =
            !batch.is_empty() && (batch.len() >= max || first_at.elapsed() >= linger || stopping);
        if due {
            write_until_done(&sink, &stats, &rt, &consumer, &config, &mut batch, &stop)?;
        }
        if stopping {
            break;
        }
        if let Some((partition, offset, payload)) =
            poll_record(&consumer, !batch.is_empty(), "data")
        {
            if batch.is_empty() {
                first_at = Instant::now();
            }
            batch.push(KafkaRecord {
                partition,
                offset,
                payload,
            });
        }
    }
    info!("leaving the consumer group");
    consumer.unsubscribe();
    Ok(())
}

/// Writes the batch, retrying while MySQL is unreachable. Gives up only when
/// stopping, leaving the records unwritten (they are consumed again).
fn write_until_done(
    sink: &MysqlSink,
    stats: &MysqlSinkStats,
    rt: &Handle,
    consumer: &BaseConsumer<BridgeContext>,
    config: &BridgeConfig,
    batch: &mut Vec<KafkaRecord>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match rt.block_on(sink.write(batch, stats)) {
            Ok(committed) => {
                batch.clear();
                // A hint only: MySQL holds the truth. It makes a restarted
                // group start near the end instead of at the beginning.
                let mut tpl = TopicPartitionList::new();
                for (p, next) in committed {
                    let _ =
                        tpl.add_partition_offset(&config.kafka.topic_data, p, Offset::Offset(next));
                }
                if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                    warn!(error = %e, "committing the offsets hint to Kafka failed (harmless: MySQL holds the offsets)");
                }
                return Ok(());
            }
            Err(e) => {
                stats
                    .write_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(error = %e, records = batch.len(), "writing to MySQL failed; retrying in {backoff:?}");
                if *stop.borrow() {
                    batch.clear();
                    return Ok(());
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}
