//! `cloud-bridge`: consumes the gateways' Kafka topics and writes MySQL
//! (metrics and dead letters, exactly once: offsets stored with the rows in
//! the same transaction) and OpenSearch/Elasticsearch (alerts, idempotent
//! ids), and serves the device registry to the gateways over HTTP.

pub mod api;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod migrations;
pub mod registry;
pub mod sinks;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::mysql::MySqlPoolOptions;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tracing::{error, info, warn};

pub use config::BridgeConfig;
use config::{Route, SinkKind};
use metrics::{Metrics, RouteMetrics};
use sinks::dlq::DlqSink;
use sinks::mysql::{MysqlSink, MysqlSinkStats};
use sinks::offsets::{KafkaRecord, OffsetTable};

/// Connects to MySQL and runs the migrations.
pub async fn connect_and_migrate(config: &BridgeConfig) -> anyhow::Result<sqlx::MySqlPool> {
    let redacted = config::redact_url(&config.mysql.url);
    let pool = MySqlPoolOptions::new()
        // Each route writes up to `write_concurrency` partitions at a time,
        // each on a connection of its own; the API and start-up take the rest.
        .max_connections(
            4 + (config.effective_routes().len() * config.mysql.write_concurrency) as u32,
        )
        .acquire_timeout(Duration::from_secs(10))
        .connect(&config.mysql.url)
        .await
        .with_context(|| format!("connecting to MySQL at {redacted}"))?;
    migrations::migrate(&pool)
        .await
        .with_context(|| format!("running schema migrations on {redacted}"))?;
    Ok(pool)
}

/// A MySQL sink that stores its offsets with its rows.
enum OffsetSink {
    Metrics(MysqlSink, Arc<MysqlSinkStats>),
    Dlq(DlqSink),
}

impl OffsetSink {
    /// Where this sink keeps its offsets.
    fn offsets(&self) -> &OffsetTable {
        match self {
            Self::Metrics(s, _) => &s.offsets,
            Self::Dlq(s) => &s.offsets,
        }
    }

    fn topic(&self) -> &str {
        &self.offsets().topic
    }

    /// Writes a batch; the next offset per partition and the rows written.
    async fn write(&self, batch: &[KafkaRecord]) -> Result<(BTreeMap<i32, i64>, u64), sqlx::Error> {
        let (committed, counts) = match self {
            Self::Metrics(s, stats) => s.write(batch, stats).await?,
            Self::Dlq(s) => s.write(batch).await?,
        };
        Ok((committed, counts.inserted))
    }
}

/// Feeds librdkafka's statistics (consumer lag) into a route's metrics.
struct StatsContext {
    metrics: Arc<Metrics>,
    route: usize,
}

impl ClientContext for StatsContext {
    fn stats(&self, statistics: Statistics) {
        self.metrics.routes[self.route].set_statistics(&statistics);
    }
}

impl ConsumerContext for StatsContext {}

/// Seeks newly assigned partitions to the offsets stored in MySQL, so the
/// database, not Kafka's group offsets, decides where consumption resumes.
struct BridgeContext {
    sink: Arc<OffsetSink>,
    rt: Handle,
    stop: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    route: usize,
}

impl ClientContext for BridgeContext {
    fn stats(&self, statistics: Statistics) {
        self.metrics.routes[self.route].set_statistics(&statistics);
    }
}

impl ConsumerContext for BridgeContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let topic = self.sink.topic().to_string();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                let stored = loop {
                    // Runs on the consumer thread, never on the async runtime.
                    match self.rt.block_on(self.sink.offsets().stored(&partitions)) {
                        Ok(s) => break s,
                        Err(e) => {
                            if *self.stop.borrow() {
                                // Stopping: take nothing rather than guess offsets.
                                let _ = consumer.unassign();
                                return;
                            }
                            self.metrics.routes[self.route].error("offsets_read");
                            warn!(error = %e, topic, "cannot read stored offsets from MySQL on partition assignment; retrying");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                };
                for p in &partitions {
                    let offset = stored
                        .get(p)
                        .map_or(Offset::Beginning, |o| Offset::Offset(*o));
                    let _ = tpl.set_partition_offset(&topic, *p, offset);
                }
                info!(
                    topic,
                    ?partitions,
                    ?stored,
                    "partitions assigned; resuming at the offsets stored in MySQL"
                );
                if let Err(e) = consumer.assign(tpl) {
                    error!(error = %e, "assigning partitions failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                info!(topic, partitions = tpl.count(), "partitions revoked");
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

/// Everything a route's consumer thread needs.
struct RouteRun {
    config: BridgeConfig,
    route: Route,
    index: usize,
    pool: sqlx::MySqlPool,
    metrics: Arc<Metrics>,
    stats: Arc<MysqlSinkStats>,
    rt: Handle,
    stop: watch::Receiver<bool>,
}

impl RouteRun {
    fn run(self) -> anyhow::Result<()> {
        let m = &self.metrics.routes[self.index];
        m.running.store(true, Relaxed);
        let offsets = OffsetTable {
            pool: self.pool.clone(),
            sink_name: self.route.sink_name.clone(),
            topic: self.route.topic.clone(),
            concurrency: self.config.mysql.write_concurrency,
        };
        let result = match self.route.sink {
            SinkKind::MysqlMetrics => {
                let sink = OffsetSink::Metrics(
                    MysqlSink {
                        offsets,
                        rows_per_insert: self.config.mysql.rows_per_insert,
                    },
                    self.stats.clone(),
                );
                consume_mysql(&self, sink)
            }
            SinkKind::MysqlDlq => consume_mysql(&self, OffsetSink::Dlq(DlqSink { offsets })),
            SinkKind::Opensearch => consume_opensearch(&self),
        };
        m.running.store(false, Relaxed);
        if let Err(e) = &result {
            error!(topic = %self.route.topic, error = format!("{e:#}"), "route stopped");
        }
        result
    }

    fn client_config(&self) -> ClientConfig {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &self.config.kafka.brokers)
            .set("group.id", &self.route.group_id)
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "range,roundrobin")
            .set("statistics.interval.ms", "5000");
        for (k, v) in &self.config.kafka.librdkafka_options {
            client.set(k, v);
        }
        client
    }

    fn metrics(&self) -> &RouteMetrics {
        &self.metrics.routes[self.index]
    }
}

/// Runs the bridge until `shutdown` resolves: one consumer thread per
/// route and the HTTP API. Each route settles its batch in progress before
/// its consumer leaves the group.
pub async fn run(
    config: BridgeConfig,
    stats: Arc<MysqlSinkStats>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let pool = connect_and_migrate(&config).await?;
    let routes = config.effective_routes();
    let metrics = Arc::new(Metrics::new(&routes, stats.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let api_task = if config.api.listen.is_empty() {
        None
    } else {
        let server = api::Server::bind(&config.api, pool.clone(), metrics.clone()).await?;
        let mut stop = stop_rx.clone();
        Some(tokio::spawn(server.serve(async move {
            let _ = stop.wait_for(|s| *s).await;
        })))
    };
    let rt = Handle::current();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(routes.len().max(1));
    let mut threads = Vec::new();
    for (index, route) in routes.into_iter().enumerate() {
        info!(topic = %route.topic, sink = ?route.sink, group = %route.group_id, "route");
        let run = RouteRun {
            config: config.clone(),
            route,
            index,
            pool: pool.clone(),
            metrics: metrics.clone(),
            stats: stats.clone(),
            rt: rt.clone(),
            stop: stop_rx.clone(),
        };
        let done = done_tx.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("route-{index}"))
                .spawn(move || {
                    let result = run.run();
                    let _ = done.try_send(());
                    result
                })
                .context("starting a consumer thread")?,
        );
    }
    drop(done_tx);
    tokio::select! {
        _ = shutdown => info!("shutting down: settling the batches in progress"),
        _ = done_rx.recv() => {}
    }
    let _ = stop_tx.send(true);
    let mut result = Ok(());
    for thread in threads {
        let joined = tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("joining a consumer thread")?
            .map_err(|_| anyhow::anyhow!("a consumer thread panicked"))
            .and_then(|r| r);
        if result.is_ok() {
            result = joined;
        }
    }
    if let Some(task) = api_task {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if result.is_ok() => result = Err(e),
            Ok(Err(_)) => {}
            Err(e) => warn!(error = %e, "the API task failed"),
        }
    }
    result
}

/// Indexes a topic into OpenSearch: bulk-indexes each batch under the
/// documents' deterministic ids, dead-letters what can never be indexed,
/// and commits the Kafka offsets only once the whole batch is settled.
fn consume_opensearch(run: &RouteRun) -> anyhow::Result<()> {
    use sinks::opensearch::AlertRecord;
    let mut os = run.config.opensearch.clone();
    os.index = run.route.index.clone();
    let sink = sinks::opensearch::AlertSink::new(&os)?;
    let mut backoff = Duration::from_millis(200);
    loop {
        match run.rt.block_on(sink.ensure_index()) {
            Ok(created) => {
                if created {
                    info!(index = %os.index, "created the index with the bridge's mapping");
                }
                break;
            }
            Err(e) => {
                if *run.stop.borrow() {
                    return Ok(());
                }
                run.metrics().error("opensearch_index");
                warn!(index = %os.index, error = format!("{e:#}"), "cannot check or create the index; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    let batching = Batching {
        max: os.bulk_max_docs,
        linger: Duration::from_millis(os.batch_linger_ms),
    };
    let mut counts = AlertCounts::default();
    loop {
        run.metrics().group_starting();
        let consumer: BaseConsumer<StatsContext> = run
            .client_config()
            .create_with_context(StatsContext {
                metrics: run.metrics.clone(),
                route: run.index,
            })
            .with_context(|| format!("creating the consumer of {}", run.route.topic))?;
        consumer
            .subscribe(&[&run.route.topic])
            .with_context(|| format!("subscribing to {}", run.route.topic))?;
        info!(topic = %run.route.topic, group = %run.route.group_id, index = %os.index, "indexing");
        let ended = pipeline(
            run,
            &consumer,
            batching,
            |partition, offset, payload| AlertRecord {
                partition,
                offset,
                payload: payload.unwrap_or_default(),
            },
            |batch| {
                let started = Instant::now();
                let before = counts.indexed;
                let next = settle_documents(run, &sink, batch, &mut counts);
                if next.is_none() {
                    // Not committed: consumed again after the restart, and
                    // the ids make that harmless.
                    info!(
                        "stopping with documents not yet settled; they are consumed again on restart"
                    );
                } else {
                    run.metrics()
                        .batch_done(started.elapsed(), counts.indexed - before);
                }
                batch.clear();
                next
            },
        )?;
        if ended == Ended::Stopped {
            consumer.unsubscribe();
            return Ok(());
        }
        retire(consumer, &run.route.topic);
    }
}

#[derive(Default)]
struct AlertCounts {
    indexed: u64,
    dead_lettered: u64,
}

/// The document id of a record under the route's rule.
fn document_id(rule: config::DocumentId, payload: &[u8]) -> Result<String, String> {
    match rule {
        config::DocumentId::AlertId => sinks::opensearch::alert_id(payload),
        config::DocumentId::DeviceSeq => {
            #[derive(serde::Deserialize)]
            struct Key<'a> {
                #[serde(borrow)]
                device_id: std::borrow::Cow<'a, str>,
                seq: u64,
            }
            let k: Key = serde_json::from_slice(payload)
                .map_err(|e| format!("no device_id and seq: {e}"))?;
            if !edge_agent::config::is_valid_id(&k.device_id) {
                return Err(format!(
                    "device_id {:?} is not 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
                    k.device_id
                ));
            }
            Ok(format!("{}:{}", k.device_id, k.seq))
        }
    }
}

/// Settles every document of a batch (indexed, or dead-lettered with a
/// reason) and returns the next offset per partition to commit; `None`
/// when asked to stop before the batch was settled.
fn settle_documents(
    run: &RouteRun,
    sink: &sinks::opensearch::AlertSink,
    batch: &[sinks::opensearch::AlertRecord],
    counts: &mut AlertCounts,
) -> Option<BTreeMap<i32, i64>> {
    use sinks::opensearch::ItemOutcome;
    let (rt, stop) = (&run.rt, &run.stop);
    let mut pending: Vec<(String, usize)> = Vec::new();
    let mut letters: Vec<(usize, String, String)> = Vec::new();
    for (i, r) in batch.iter().enumerate() {
        match document_id(run.route.document_id, &r.payload) {
            Ok(id) => pending.push((id, i)),
            Err(why) => {
                let reason = match run.route.document_id {
                    config::DocumentId::AlertId => "not_an_alert",
                    config::DocumentId::DeviceSeq => "no_document_id",
                };
                letters.push((i, reason.into(), why))
            }
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
                            warn!(document_id = %id, why, "document not indexed yet; retrying");
                            run.metrics().error("opensearch_item_retry");
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
                run.metrics().error("opensearch_bulk");
                warn!(
                    error = format!("{e:#}"),
                    documents = pending.len(),
                    "OpenSearch bulk request failed; retrying in {backoff:?}"
                );
                true
            }
        };
        if retry {
            if *stop.borrow() {
                return None;
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
    let mut backoff = Duration::from_millis(200);
    while !letters.is_empty() {
        match rt.block_on(dead_letter(&run.pool, &run.route, batch, &letters)) {
            Ok(()) => {
                for (i, reason, message) in &letters {
                    warn!(
                        partition = batch[*i].partition,
                        offset = batch[*i].offset,
                        reason,
                        message,
                        "document dead-lettered"
                    );
                }
                counts.dead_lettered += letters.len() as u64;
                letters.clear();
            }
            Err(e) => {
                if *stop.borrow() {
                    return None;
                }
                run.metrics().error("dead_letter_write");
                warn!(error = %e, "writing dead letters to MySQL failed; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    for r in batch {
        let e = next.entry(r.partition).or_insert(0);
        *e = (*e).max(r.offset + 1);
    }
    info!(
        topic = %run.route.topic,
        indexed = counts.indexed,
        dead_lettered = counts.dead_lettered,
        "documents settled"
    );
    Some(next)
}

/// Rate-limits a repeated consumer warning (a topic that does not exist
/// yet is reported at every metadata refresh).
#[derive(Default)]
struct Warned {
    last: Option<(String, Instant)>,
    suppressed: u64,
}

/// One record from the consumer, or `None`: nothing yet, the end of a
/// partition, or an error librdkafka retries by itself (logged).
fn poll_record<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    batch_open: bool,
    topic: &str,
    warned: &mut Warned,
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
            let text = e.to_string();
            let repeat = warned
                .last
                .as_ref()
                .is_some_and(|(t, at)| *t == text && at.elapsed() < Duration::from_secs(60));
            if repeat {
                warned.suppressed += 1;
            } else {
                warn!(
                    error = %text,
                    topic,
                    repeated = warned.suppressed,
                    "Kafka consumer error; librdkafka retries by itself"
                );
                warned.last = Some((text, Instant::now()));
                warned.suppressed = 0;
            }
            None
        }
    }
}

async fn dead_letter(
    pool: &sqlx::MySqlPool,
    route: &Route,
    batch: &[sinks::opensearch::AlertRecord],
    letters: &[(usize, String, String)],
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    for (i, reason, message) in letters {
        let r = &batch[*i];
        sqlx::query(
            "INSERT IGNORE INTO bridge_dead_letters (sink, topic, kafka_partition, kafka_offset, reason, message, payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&route.sink_name)
        .bind(&route.topic)
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

/// Consumes a topic into a MySQL sink that stores its offsets with its
/// rows (exactly once).
fn consume_mysql(run: &RouteRun, sink: OffsetSink) -> anyhow::Result<()> {
    let sink = Arc::new(sink);
    let topic = &run.route.topic;
    let batching = Batching {
        max: run.config.mysql.batch_max_records,
        linger: Duration::from_millis(run.config.mysql.batch_linger_ms),
    };
    loop {
        run.metrics().group_starting();
        let consumer: BaseConsumer<BridgeContext> = run
            .client_config()
            .create_with_context(BridgeContext {
                sink: sink.clone(),
                rt: run.rt.clone(),
                stop: run.stop.clone(),
                metrics: run.metrics.clone(),
                route: run.index,
            })
            .with_context(|| {
                format!(
                    "creating the Kafka consumer for {}",
                    run.config.kafka.brokers
                )
            })?;
        consumer
            .subscribe(&[topic])
            .with_context(|| format!("subscribing to {topic}"))?;
        info!(topic, group = %run.route.group_id, "consuming");
        let sink = &*sink;
        let ended = pipeline(
            run,
            &consumer,
            batching,
            |partition, offset, payload| KafkaRecord {
                partition,
                offset,
                payload,
            },
            |batch| write_until_done(run, sink, batch),
        )?;
        if ended == Ended::Stopped {
            info!(topic, "leaving the consumer group");
            consumer.unsubscribe();
            return Ok(());
        }
        retire(consumer, topic);
    }
}

/// Closes a stuck consumer on a thread of its own. Closing waits for the
/// group coordinator to acknowledge the member leaving, which can be never
/// when librdkafka has lost it; the route goes on with a new consumer
/// meanwhile.
fn retire<C: ConsumerContext + 'static>(consumer: BaseConsumer<C>, topic: &str) {
    let topic = topic.to_string();
    let spawned = std::thread::Builder::new()
        .name("retired-consumer".into())
        .spawn(move || {
            drop(consumer);
            info!(topic, "the replaced Kafka consumer is closed");
        });
    if let Err(e) = spawned {
        // The consumer was closed on this thread then (the failed spawn
        // dropped it), however long that took.
        warn!(error = %e, "cannot start a thread to close the replaced Kafka consumer");
    }
}

/// A consumer that has not been a steady member of its group for this long
/// is replaced by a new one. After a broker restart librdkafka (2.12) can
/// lose its group coordinator for good: the session times out, the
/// partitions are revoked, and the consumer never rejoins. A steady member
/// without partitions (more instances than partitions) is left alone.
const GROUP_STUCK_AFTER: Duration = Duration::from_secs(90);

/// Why a route's pipeline ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The bridge is stopping.
    Stopped,
    /// The consumer is stuck outside its group: make a new one.
    GroupStuck,
}

/// How a route cuts its stream into batches.
#[derive(Debug, Clone, Copy)]
struct Batching {
    max: usize,
    linger: Duration,
}

/// Runs a route's two stages until asked to stop: this thread gathers the
/// next batch from Kafka while a writer thread settles the previous one
/// with `settle`, which returns the next offset per partition once the
/// batch is stored (`None` when it gave up because the bridge is stopping).
/// The hand-over is a rendezvous, so at most two batches are in memory and
/// a slow sink holds the consumer back. Order per partition holds: one
/// writer, batches in the order gathered, offsets committed in that order.
fn pipeline<C: ConsumerContext, T: Send>(
    run: &RouteRun,
    consumer: &BaseConsumer<C>,
    batching: Batching,
    record: impl Fn(i32, i64, Option<Vec<u8>>) -> T,
    settle: impl FnMut(&mut Vec<T>) -> Option<BTreeMap<i32, i64>> + Send,
) -> anyhow::Result<Ended> {
    let topic = &run.route.topic;
    let mut settle = settle;
    let (batches, to_settle) = std::sync::mpsc::sync_channel::<Vec<T>>(0);
    let (settled, offsets) = std::sync::mpsc::channel::<BTreeMap<i32, i64>>();
    std::thread::scope(|scope| -> anyhow::Result<Ended> {
        let writer = std::thread::Builder::new()
            .name(format!("route-{}-writer", run.index))
            .spawn_scoped(scope, move || {
                for mut batch in to_settle {
                    match settle(&mut batch) {
                        Some(next) => {
                            let _ = settled.send(next);
                        }
                        // Not stored: consumed again after the restart.
                        None => break,
                    }
                }
            })
            .context("starting a writer thread")?;
        let mut warned = Warned::default();
        let mut batch: Vec<T> = Vec::new();
        let mut first_at = Instant::now();
        let mut checked_at = Instant::now();
        let mut ended = Ended::Stopped;
        loop {
            commit_offsets(consumer, topic, offsets.try_iter());
            let mut stopping = *run.stop.borrow();
            if !stopping && checked_at.elapsed() >= Duration::from_secs(1) {
                checked_at = Instant::now();
                if let Some((unsteady, state, join_state)) = run.metrics().group_unsteady()
                    && unsteady >= GROUP_STUCK_AFTER
                {
                    warn!(
                        topic,
                        group = %run.route.group_id,
                        state,
                        join_state,
                        "the Kafka consumer has not been a steady member of its group for {unsteady:?}; \
                         settling the batch in progress and replacing the consumer"
                    );
                    run.metrics().error("consumer_replaced");
                    ended = Ended::GroupStuck;
                    stopping = true;
                }
            }
            // Group commit: once the linger is over, the batch goes to the
            // writer as soon as the writer is free; while it is busy the
            // batch keeps growing, up to its limit. Under light load a
            // record waits for one write at most, under backlog batches
            // are full.
            if !batch.is_empty()
                && batch.len() < batching.max
                && !stopping
                && first_at.elapsed() >= batching.linger
            {
                match batches.try_send(std::mem::take(&mut batch)) {
                    Ok(()) => {}
                    Err(std::sync::mpsc::TrySendError::Full(back)) => batch = back,
                    // The writer gave up (stopping) or panicked: joined below.
                    Err(std::sync::mpsc::TrySendError::Disconnected(_)) => break,
                }
            }
            let full = !batch.is_empty() && (batch.len() >= batching.max || stopping);
            if full {
                let handed = Instant::now();
                if batches.send(std::mem::take(&mut batch)).is_err() {
                    // The writer gave up (stopping) or panicked: joined below.
                    break;
                }
                if handed.elapsed() >= Duration::from_secs(1) {
                    // A slow sink held this thread, and a consumer that
                    // does not poll drops out of its group by design: it
                    // rejoins now, so the watchdog counts from here.
                    run.metrics().group_restart_clock();
                }
            }
            if stopping {
                break;
            }
            if let Some((partition, offset, payload)) =
                poll_record(consumer, !batch.is_empty(), topic, &mut warned)
            {
                run.metrics().records.fetch_add(1, Relaxed);
                if batch.is_empty() {
                    first_at = Instant::now();
                    batch.reserve(batching.max.min(65_536));
                }
                batch.push(record(partition, offset, payload));
            }
        }
        drop(batches);
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer of {topic} panicked"))?;
        if ended == Ended::Stopped {
            commit_offsets(consumer, topic, offsets.try_iter());
        }
        // A stuck consumer cannot commit; its successor reads the offsets
        // from MySQL, or, for OpenSearch, indexes the last documents again
        // under the same ids.
        Ok(ended)
    })
}

/// Commits the latest settled offsets to Kafka, asynchronously: a
/// synchronous commit waits for the group coordinator, forever when
/// librdkafka has lost it, and would hold the route and its watchdog. For
/// the MySQL routes the commit is a hint only (MySQL holds the truth): it
/// makes a restarted group start near the end instead of at the beginning.
/// For OpenSearch a commit that is lost means a few documents are indexed
/// again under the same ids. Closing the consumer waits for the commits in
/// flight.
fn commit_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    committed: impl Iterator<Item = BTreeMap<i32, i64>>,
) {
    let mut latest: BTreeMap<i32, i64> = BTreeMap::new();
    for c in committed {
        latest.extend(c);
    }
    if latest.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (p, next) in latest {
        let _ = tpl.add_partition_offset(topic, p, Offset::Offset(next));
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        warn!(error = %e, topic, "committing offsets to Kafka failed; records after the last commit may be consumed again (MySQL skips them by its stored offsets, OpenSearch overwrites them under the same ids)");
    }
}

/// Writes the batch, retrying while MySQL is unreachable; the next offset
/// per partition as committed. Gives up only when stopping, leaving the
/// records unwritten (they are consumed again): `None` then.
fn write_until_done(
    run: &RouteRun,
    sink: &OffsetSink,
    batch: &mut Vec<KafkaRecord>,
) -> Option<BTreeMap<i32, i64>> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        match run.rt.block_on(sink.write(batch)) {
            Ok((committed, written)) => {
                run.metrics().batch_done(started.elapsed(), written);
                batch.clear();
                return Some(committed);
            }
            Err(e) => {
                run.stats.write_errors.fetch_add(1, Relaxed);
                run.metrics().error("mysql_write");
                warn!(error = %e, topic = sink.topic(), records = batch.len(), "writing to MySQL failed; retrying in {backoff:?}");
                if *run.stop.borrow() {
                    batch.clear();
                    return None;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_ids_follow_the_route_rule() {
        let reading = br#"{"device_id":"pump-1","seq":42,"temperature":1}"#;
        assert_eq!(
            document_id(config::DocumentId::DeviceSeq, reading).unwrap(),
            "pump-1:42"
        );
        assert!(document_id(config::DocumentId::DeviceSeq, br#"{"device_id":"x"}"#).is_err());
        assert!(document_id(config::DocumentId::AlertId, reading).is_err());
        assert_eq!(
            document_id(config::DocumentId::AlertId, br#"{"alert_id":"a:1"}"#).unwrap(),
            "a:1"
        );
    }
}
