//! `cloud-bridge`: consumes the gateways' Kafka topics and writes MySQL,
//! exactly once (offsets stored with the rows in the same transaction).

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
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .context("joining the consumer thread")?
        .map_err(|_| anyhow::anyhow!("the consumer thread panicked"))?
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
        match consumer.poll(Duration::from_millis(if batch.is_empty() {
            100
        } else {
            5
        })) {
            None => {}
            Some(Ok(msg)) => {
                if batch.is_empty() {
                    first_at = Instant::now();
                }
                batch.push(KafkaRecord {
                    partition: msg.partition(),
                    offset: msg.offset(),
                    payload: msg.payload().map(<[u8]>::to_vec),
                });
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => warn!(error = %e, "Kafka consumer error; librdkafka retries by itself"),
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
