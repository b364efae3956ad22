//! The exactly-once uplink: outbox batches to Kafka in transactions.
//!
//! Each transaction carries the records of outbox batches `a..=b` and the
//! marker `{gateway_id -> b}` in the compacted offsets topic. On start,
//! `init_transactions` fences any older incarnation of this gateway and
//! aborts its open transaction; the last committed marker (read with
//! `read_committed`) says which batches Kafka already has. The outbox is
//! trimmed only after a commit. An idle uplink commits its unchanged marker
//! every [`OWNERSHIP_CHECK`], so that it learns when another instance took
//! its transactional id over. Runs on its own OS thread: librdkafka's
//! transactional calls block.
//!
//! Transactions take turns on `kafka.transaction_lanes` transactional
//! producers (lane 0 keeps the historical id): while the coordinator writes
//! one commit's markers, the next transaction runs on the other id instead
//! of waiting librdkafka's fixed 20 ms retry. A transaction's records go
//! out only after the previous transaction's were acknowledged, and it
//! commits only after the previous commit returned, so partitions hold them
//! in outbox order and no marker passes a transaction that failed. With
//! three lanes they overlap: the next transaction is sent while the
//! previous one commits on the committer thread; otherwise each begins
//! after the previous commit returned. A start
//! initialises every lane, lane 0 first; whoever holds lane 0 owns the
//! gateway, and losing another lane only starts the session over.

use std::cell::Cell;
use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::outbox::{self, OutboxError, TopicId};
use crate::signal::OutboxSignals;
use crate::stats::{Stats, UplinkState};

/// A transaction takes no further outbox batch once its records (keys and
/// values as sent) reach this many bytes; batches go whole, so one batch
/// may carry it past. The uplink holds one rendered record at a time, so
/// this bounds what librdkafka holds for an open transaction. 2 MiB rather
/// than 4: at saturation through MQTT with registry and fences the agent's
/// RSS was 31.6 to 33.5 MB instead of 36.3 to 37.7, and the readings/s
/// did not go down (1 MiB took 7 % of them).
const MAX_TRANSACTION_BYTES: u64 = 2 * 1024 * 1024;

/// Under load, committed batches are trimmed from the outbox at most this
/// often (see the uplink loop).
const TRIM_INTERVAL: Duration = Duration::from_millis(250);

/// An idle uplink commits a transaction holding only its unchanged marker
/// on each lane this often: the coordinator refuses it if another instance took the
/// transactional id over, so an agent that was fenced while it had nothing
/// to send learns it and stops, instead of reporting itself up.
const OWNERSHIP_CHECK: Duration = Duration::from_secs(10);

/// Longest the uplink waits for a lingering batch it called for to be
/// committed (a batch's commit with its sync takes about a millisecond).
const LINGER_CALL_WAIT: Duration = Duration::from_millis(5);

/// With this many `kafka.transaction_lanes`, transactions overlap: the next
/// one's records go out while the previous one commits. With two, the next
/// transaction would reuse the committing one's id before its markers are
/// written, and wait librdkafka's fixed 20 ms retry.
const OVERLAP_LANES: usize = 3;

/// A transaction whose records Kafka acknowledged, ready to commit.
#[derive(Debug, Clone, Copy)]
struct Prepared {
    lane: usize,
    sent: outbox::SentBatches,
    marker_sent: Instant,
    /// When every record was acknowledged.
    flushed: Instant,
}

/// When a commit was asked for, its result and when it came.
type CommitAnswer = (Instant, Result<(), KafkaError>, Instant);

/// The thread that commits transactions while the uplink prepares the
/// next: librdkafka's commit blocks until the coordinator answers.
struct Committer {
    asks: mpsc::Sender<usize>,
    answers: mpsc::Receiver<CommitAnswer>,
}

impl Committer {
    fn spawn<'scope, 'env>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        producers: &'env [ThreadedProducer<DefaultProducerContext>],
        timeout: Duration,
    ) -> std::io::Result<Self> {
        let (asks, lanes) = mpsc::channel::<usize>();
        let (answer, answers) = mpsc::channel();
        std::thread::Builder::new()
            .name("kafka-commit".into())
            .spawn_scoped(scope, move || {
                for lane in lanes {
                    let asked = Instant::now();
                    // A panic in librdkafka's binding must reach the
                    // uplink as a failed commit, not end this thread.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        commit(&producers[lane], timeout)
                    }))
                    .unwrap_or(Err(KafkaError::Canceled));
                    if answer.send((asked, result, Instant::now())).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self { asks, answers })
    }

    /// Asks for the commit of the transaction open on `lane`.
    fn ask(&self, lane: usize) {
        // A committer gone is reported by `answer`.
        let _ = self.asks.send(lane);
    }

    /// Waits for the answer to the oldest commit asked for.
    fn answer(&self) -> CommitAnswer {
        self.answers.recv().unwrap_or_else(|_| {
            error!(
                "the Kafka committer thread is gone; the commit's outcome is left to the marker"
            );
            let now = Instant::now();
            (now, Err(KafkaError::Canceled), now)
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error(
        "this agent was fenced: another edge-agent with the same gateway_id ({gateway_id}) started and took over the Kafka \
         transactional id {transactional_id}. Stop one of them; gateway_id must be unique per gateway"
    )]
    Fenced {
        gateway_id: String,
        transactional_id: String,
    },
    /// Another instance initialised one of this agent's other lanes: not
    /// fatal. Lane 0 decides who owns the gateway; the session starts over,
    /// and its init takes every lane back, or finds lane 0 lost and stops.
    #[error(
        "Kafka transactional id {transactional_id} (uplink lane {lane}) was taken over by another instance with \
         this gateway_id; starting over on all lanes"
    )]
    LaneTaken {
        lane: usize,
        transactional_id: String,
    },
    #[error("Kafka ({brokers}): {what}: {source}")]
    Kafka {
        brokers: String,
        what: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("reading the offsets marker from {topic}: {what}")]
    Marker { topic: String, what: String },
    /// The agent is stopping: the session ends without being done.
    #[error("the agent is stopping")]
    Stopping,
    /// An overlapping transaction, aborted because the one before it failed
    /// to commit (never the error a session ends with, unless fenced).
    #[error("aborted with the transaction before it, whose commit failed")]
    AbortedWithPrevious,
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

/// The exactly-once marker stored in the offsets topic.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Marker {
    pub gateway_id: String,
    /// Highest outbox batch whose records are committed to Kafka.
    pub batch_seq: i64,
    pub committed_at: i64,
}

pub struct KafkaUplink {
    config: Config,
    conn: Connection,
    stats: Arc<Stats>,
    signals: Arc<OutboxSignals>,
    rt: Handle,
    stop: watch::Receiver<bool>,
    /// Whether the current session committed batches to Kafka: a failure
    /// after that retries with the shortest backoff again (a failure that
    /// recurs before any commit keeps backing off).
    went_up: Cell<bool>,
}

impl KafkaUplink {
    pub fn new(
        config: Config,
        conn: Connection,
        stats: Arc<Stats>,
        signals: Arc<OutboxSignals>,
        rt: Handle,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            config,
            conn,
            stats,
            signals,
            rt,
            stop,
            went_up: Cell::new(false),
        }
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Runs until asked to stop. Returns an error only when it must not go
    /// on (fenced by another agent, or the outbox is unreadable).
    pub fn run(mut self) -> Result<(), UplinkError> {
        let max_backoff = Duration::from_secs(self.config.kafka.retry_backoff_max_seconds);
        let min_backoff = Duration::from_millis(500);
        let mut backoff = min_backoff;
        while !self.stopping() {
            self.stats.set_uplink(UplinkState::Connecting);
            self.went_up.set(false);
            match self.session() {
                Ok(()) => break,
                Err(
                    e @ (UplinkError::Fenced { .. }
                    | UplinkError::Outbox(
                        OutboxError::Corrupt { .. } | OutboxError::NewerSchema { .. },
                    )),
                ) => {
                    self.stats
                        .set_uplink(if matches!(e, UplinkError::Fenced { .. }) {
                            UplinkState::Fenced
                        } else {
                            UplinkState::Down(e.to_string())
                        });
                    return Err(e);
                }
                // Asked to stop before the session got going: not a
                // failure, nothing to report or retry.
                Err(UplinkError::Stopping) => break,
                Err(e) => {
                    if self.went_up.get() {
                        backoff = min_backoff;
                    }
                    self.stats.uplink_failures.fetch_add(1, Relaxed);
                    let summary = short_error(&e);
                    self.stats.set_uplink(UplinkState::Down(summary));
                    warn!(error = %e, "Kafka uplink down; the outbox keeps the data, retrying in {backoff:?}");
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !self.stopping() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        }
        self.stats.set_uplink(UplinkState::Stopped);
        Ok(())
    }

    fn kafka_err(&self, what: &'static str) -> impl Fn(KafkaError) -> UplinkError + '_ {
        move |source| {
            if is_fenced(&source) {
                UplinkError::Fenced {
                    gateway_id: self.config.gateway_id.clone(),
                    transactional_id: self.config.transactional_id(),
                }
            } else {
                UplinkError::Kafka {
                    brokers: self.config.kafka.brokers.clone(),
                    what,
                    source,
                }
            }
        }
    }

    fn base_client_config(&self) -> ClientConfig {
        client_config(&self.config.kafka)
    }

    /// A transactional producer for uplink lane `lane`, initialised: this
    /// fences an older instance's producer of the same id and ends its open
    /// transaction (aborted, or its commit completed).
    fn lane_producer(
        &self,
        lane: usize,
    ) -> Result<ThreadedProducer<DefaultProducerContext>, UplinkError> {
        let k = &self.config.kafka;
        let producer: ThreadedProducer<DefaultProducerContext> = self
            .base_client_config()
            .set("transactional.id", self.config.lane_transactional_id(lane))
            .set("enable.idempotence", "true")
            .set("compression.type", &k.compression)
            .set("linger.ms", k.linger_ms.to_string())
            .set(
                "transaction.timeout.ms",
                (k.transaction_timeout_seconds * 1000).to_string(),
            )
            // Deliveries must settle well inside the transaction timeout.
            .set(
                "message.timeout.ms",
                (k.transaction_timeout_seconds * 1000 / 2).to_string(),
            )
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "262144")
            // Short first retries of failed requests, still backing off
            // exponentially to 1 s (the default starts at 100 ms).
            .set("retry.backoff.ms", "5")
            .set("retry.backoff.max.ms", "1000")
            .create()
            .map_err(self.kafka_err("creating the producer"))?;
        producer
            .init_transactions(Duration::from_secs(30))
            .map_err(self.kafka_err("initialising transactions (fencing older instances)"))?;
        Ok(producer)
    }

    /// One connected session: init, recover the marker, then ship batches.
    fn session(&mut self) -> Result<(), UplinkError> {
        let k = self.config.kafka.clone();
        self.ensure_offsets_topic()?;

        // Lane 0 is the gateway's claim: an older instance loses it here
        // and stops at its next transaction on it. The other lanes follow.
        // Kafka may refuse one of those inits as fenced when it races a
        // commit of the instance just fenced on lane 0 (seen with Kafka
        // 4.1); that instance is on its way out, so the init is retried.
        let mut producers = vec![self.lane_producer(0)?];
        for lane in 1..k.transaction_lanes {
            let mut attempt = 1;
            let producer = loop {
                match self.lane_producer(lane) {
                    Err(UplinkError::Fenced { .. }) if attempt < 5 && !self.stopping() => {
                        warn!(
                            lane,
                            attempt,
                            "Kafka refused this lane's init as fenced while an older instance was being fenced; retrying"
                        );
                        std::thread::sleep(Duration::from_millis(200 * attempt));
                        attempt += 1;
                    }
                    Err(UplinkError::Fenced { .. }) => return Err(self.lane_taken(lane)),
                    other => break other?,
                }
            };
            producers.push(producer);
        }

        let mut committed = self.read_marker()?;
        if let Some(moved) = outbox::ensure_sequence_after(&self.conn, committed)? {
            warn!(
                marker = committed,
                renumbered_batches = moved,
                "Kafka holds a marker beyond this outbox (was the data folder replaced?); unsent batches moved after it"
            );
        }
        self.trim(committed)?;
        self.stats.kafka_committed_batch.store(committed, Relaxed);
        self.stats.set_uplink(UplinkState::Up);
        info!(brokers = %k.brokers, marker = committed, "Kafka uplink up");

        // Trimming (one SQLite write transaction with its fsync, and the
        // dedupe marks of the trimmed batches) costs about as much as a
        // Kafka transaction. Under load it runs at most every TRIM_INTERVAL,
        // when idle right away. Deferring it is safe: what Kafka holds is
        // decided by the marker, and a start trims up to it first.
        let mut trimmed = committed;
        let mut last_trim = Instant::now();
        let mut last_commit = Instant::now();
        // Transactions take turns on the lanes: while the coordinator writes
        // one transaction's commit markers, the next runs on another
        // transactional id. With three lanes they also overlap: the next
        // transaction's records go out while the previous one commits (on
        // the committer thread). Either way a transaction's records go out
        // only after the previous transaction's records were delivered, and
        // it commits only after the previous commit returned: every
        // partition holds them in outbox order, and no marker can pass a
        // transaction that failed.
        let mut next_lane = 0usize;
        let commit_timeout = Duration::from_secs(k.transaction_timeout_seconds);
        let producers = &producers;
        std::thread::scope(|scope| {
            let mut committer = None;
            if k.transaction_lanes >= OVERLAP_LANES {
                match Committer::spawn(scope, producers, commit_timeout) {
                    Ok(c) => committer = Some(c),
                    Err(e) => warn!(
                        error = %e,
                        "cannot start the Kafka committer thread; transactions will not overlap"
                    ),
                }
            }
            let mut in_flight: Option<Prepared> = None;
            let ends_linger = self.config.outbox.uplink_ends_linger;
            loop {
                if self.stopping() {
                    if let (Some(f), Some(c)) = (in_flight.take(), committer.as_ref()) {
                        self.settle(producers, f, c.answer())?;
                        committed = f.sent.last_batch;
                    }
                    if trimmed < committed {
                        self.timed_trim(committed)?;
                    }
                    return Ok(());
                }
                // A batch that lingers: its commit is quick, and without it
                // its readings would wait for the transaction after this one.
                if ends_linger {
                    let ended = self.signals.linger.ended();
                    self.signals.linger.call_and_wait(ended, LINGER_CALL_WAIT);
                }
                let seen = self.signals.new_batch.current();
                let after = in_flight.map_or(committed, |f| f.sent.last_batch);
                let prepared = self.prepare(next_lane, &producers[next_lane], after, true);
                if let (Some(f), Some(c)) = (in_flight.take(), committer.as_ref()) {
                    // The next transaction may commit only if this one did.
                    if let Err(e) = self.settle(producers, f, c.answer()) {
                        let next = match prepared {
                            Ok(Some(p)) => {
                                warn!(
                                    lane = p.lane,
                                    "a commit failed: aborting the transaction that was sent after it"
                                );
                                let after = self.abort_after(
                                    &producers[p.lane],
                                    UplinkError::AbortedWithPrevious,
                                    commit_timeout,
                                );
                                Some(self.on_lane(p.lane, after))
                            }
                            Ok(None) => None,
                            Err(next) => Some(next),
                        };
                        // Losing the gateway (fenced on lane 0) outranks
                        // the commit's own failure: the session must stop,
                        // not start over and fence the newer instance.
                        return Err(match next {
                            Some(next @ UplinkError::Fenced { .. }) => {
                                warn!(commit_error = %e, "and this agent was fenced meanwhile");
                                next
                            }
                            Some(next) => {
                                debug!(error = %next, "the transaction sent after the failed commit ended too");
                                e
                            }
                            None => e,
                        });
                    }
                    committed = f.sent.last_batch;
                }
                let Some(p) = prepared? else {
                    if trimmed < committed {
                        self.timed_trim(committed)?;
                        trimmed = committed;
                        last_trim = Instant::now();
                        continue;
                    }
                    if last_commit.elapsed() >= OWNERSHIP_CHECK {
                        debug!(
                            marker = committed,
                            "idle: committing the unchanged marker to check that this agent still owns its transactional id"
                        );
                        // Every lane: another instance may hold any of them.
                        for (lane, producer) in producers.iter().enumerate() {
                            if let Some(p) = self.prepare(lane, producer, committed, false)? {
                                self.commit_now(producers, p)?;
                            }
                        }
                        // Lane 0 committed longest ago: its markers are
                        // written by now.
                        next_lane = 0;
                        last_commit = Instant::now();
                        continue;
                    }
                    // Nothing to send: a reading that comes now goes
                    // without lingering.
                    if ends_linger {
                        self.signals.linger.set_uplink_waiting(true);
                    }
                    self.signals
                        .new_batch
                        .wait_past(seen, Duration::from_millis(250));
                    self.signals.linger.set_uplink_waiting(false);
                    continue;
                };
                next_lane = (next_lane + 1) % producers.len();
                last_commit = Instant::now();
                match committer.as_ref() {
                    Some(c) => {
                        c.ask(p.lane);
                        in_flight = Some(p);
                    }
                    None => {
                        self.commit_now(producers, p)?;
                        committed = p.sent.last_batch;
                    }
                }
                let more_waiting = self.signals.new_batch.current() != seen;
                if trimmed < committed && (!more_waiting || last_trim.elapsed() >= TRIM_INTERVAL) {
                    self.timed_trim(committed)?;
                    trimmed = committed;
                    last_trim = Instant::now();
                }
            }
        })
    }

    fn timed_trim(&self, upto: i64) -> Result<(), UplinkError> {
        let started = Instant::now();
        self.trim(upto)?;
        add_micros(&self.stats.outbox_trim_micros, started);
        Ok(())
    }

    fn lane_taken(&self, lane: usize) -> UplinkError {
        UplinkError::LaneTaken {
            lane,
            transactional_id: self.config.lane_transactional_id(lane),
        }
    }

    /// Fenced on lane 0, this agent lost its gateway id: fatal. Fenced on
    /// another lane, it may still hold lane 0, which decides: the session
    /// starts over (two instances whose inits interleaved could otherwise
    /// each hold a lane and both stop).
    fn on_lane(&self, lane: usize, e: UplinkError) -> UplinkError {
        match e {
            UplinkError::Fenced { .. } if lane > 0 => self.lane_taken(lane),
            other => other,
        }
    }

    /// Commits a prepared transaction on this thread.
    fn commit_now(
        &self,
        producers: &[ThreadedProducer<DefaultProducerContext>],
        p: Prepared,
    ) -> Result<(), UplinkError> {
        let timeout = Duration::from_secs(self.config.kafka.transaction_timeout_seconds);
        let asked = Instant::now();
        let result = commit(&producers[p.lane], timeout);
        self.settle(producers, p, (asked, result, Instant::now()))
    }

    /// Takes a prepared transaction's commit answer: counts it, or aborts
    /// the transaction and returns why it failed. `answer` is when the
    /// commit was asked for, its result and when it came.
    fn settle(
        &self,
        producers: &[ThreadedProducer<DefaultProducerContext>],
        p: Prepared,
        (asked, result, answered): CommitAnswer,
    ) -> Result<(), UplinkError> {
        let producer = &producers[p.lane];
        if let Err(e) = result {
            let timeout = Duration::from_secs(self.config.kafka.transaction_timeout_seconds);
            let err = self.kafka_err("committing a transaction")(e);
            return Err(self.on_lane(p.lane, self.abort_after(producer, err, timeout)));
        }
        if p.sent.batches > 0 {
            // From the marker to the commit's answer, without the time an
            // overlapped commit waited for the previous one.
            let took =
                p.flushed.duration_since(p.marker_sent) + answered.saturating_duration_since(asked);
            self.stats
                .kafka_transaction_micros
                .fetch_add(took.as_micros() as u64, Relaxed);
            self.stats.kafka_commit_latency.observe(took);
            crate::fault::point("kafka_committed");
            self.stats
                .kafka_committed_batch
                .store(p.sent.last_batch, Relaxed);
            self.stats
                .kafka_records_committed
                .fetch_add(p.sent.records, Relaxed);
            self.stats.kafka_transactions.fetch_add(1, Relaxed);
            self.went_up.set(true);
        }
        Ok(())
    }

    /// Opens a transaction on lane `lane` and sends it whole, but for the
    /// commit: the batches after `after` (with `with_batches`; `None` and
    /// no transaction when none waits) and the marker of the last one, or
    /// the unchanged marker alone. Returns once Kafka acknowledged every
    /// record. On failure the transaction is aborted.
    fn prepare(
        &self,
        lane: usize,
        producer: &ThreadedProducer<DefaultProducerContext>,
        after: i64,
        with_batches: bool,
    ) -> Result<Option<Prepared>, UplinkError> {
        self.prepare_inner(lane, producer, after, with_batches)
            .map_err(|e| self.on_lane(lane, e))
    }

    fn prepare_inner(
        &self,
        lane: usize,
        producer: &ThreadedProducer<DefaultProducerContext>,
        after: i64,
        with_batches: bool,
    ) -> Result<Option<Prepared>, UplinkError> {
        let k = &self.config.kafka;
        let commit_timeout = Duration::from_secs(k.transaction_timeout_seconds);
        let begun = Cell::new(false);
        let begin = || {
            producer
                .begin_transaction()
                .map_err(self.kafka_err("beginning a transaction"))?;
            begun.set(true);
            Ok(())
        };
        let sent = if with_batches {
            let started = Instant::now();
            let sent = outbox::send_pending(
                &self.conn,
                after,
                k.max_batches_per_transaction,
                MAX_TRANSACTION_BYTES,
                begin,
                |topic, key, value| {
                    let topic = match topic {
                        TopicId::Data => &k.topic_data,
                        TopicId::DeadLetter => &k.topic_dlq,
                        TopicId::Alert => &k.topic_alerts,
                    };
                    send(producer, BaseRecord::to(topic).key(key).payload(value))
                        .map_err(self.kafka_err("queueing a record of the transaction"))
                },
            );
            add_micros(&self.stats.uplink_load_micros, started);
            match sent {
                Ok(Some(sent)) => sent,
                Ok(None) => return Ok(None),
                Err(e) => {
                    let e = match e {
                        outbox::SendError::Outbox(e) => UplinkError::Outbox(e),
                        outbox::SendError::Sink(e) => e,
                    };
                    // Not begun (the first batch did not read back, or
                    // the begin failed): nothing to abort.
                    if !begun.get() {
                        return Err(e);
                    }
                    return Err(self.abort_after(producer, e, commit_timeout));
                }
            }
        } else {
            begin()?;
            outbox::SentBatches {
                last_batch: after,
                batches: 0,
                records: 0,
                bytes: 0,
            }
        };
        let marker = serde_json::to_vec(&Marker {
            gateway_id: self.config.gateway_id.clone(),
            batch_seq: sent.last_batch,
            committed_at: crate::pipeline::now_ms(),
        })
        .expect("serializing the marker cannot fail");
        let marker_sent = Instant::now();
        let queued = send(
            producer,
            BaseRecord::to(&k.topic_offsets)
                .key(self.config.gateway_id.as_bytes())
                .payload(marker.as_slice()),
        );
        if let Err(e) = queued {
            let err = self.kafka_err("queueing the transaction's marker")(e);
            return Err(self.abort_after(producer, err, commit_timeout));
        }
        if crate::fault::hit("kafka_sent") {
            // Make sure the records really sit in the open transaction.
            let _ = producer.flush(commit_timeout);
            crate::fault::crash("kafka_sent");
        }
        // Every record acknowledged before the next transaction sends any:
        // the two run on different producers, whose requests to a
        // partition are not ordered otherwise. A delivery that failed
        // fails the commit; one still in flight fails the transaction here.
        if !flush_deliveries(producer, commit_timeout) {
            let err = self.kafka_err("Kafka did not acknowledge the transaction's records in time")(
                KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut),
            );
            return Err(self.abort_after(producer, err, commit_timeout));
        }
        Ok(Some(Prepared {
            lane,
            sent,
            marker_sent,
            flushed: Instant::now(),
        }))
    }

    /// After a failure inside an open transaction: aborts it, so its
    /// records are never visible to read_committed consumers (the batches
    /// stay in the outbox and go out again in the next transaction), and
    /// returns the error to report.
    fn abort_after(
        &self,
        producer: &ThreadedProducer<DefaultProducerContext>,
        err: UplinkError,
        commit_timeout: Duration,
    ) -> UplinkError {
        let fenced = || UplinkError::Fenced {
            gateway_id: self.config.gateway_id.clone(),
            transactional_id: self.config.transactional_id(),
        };
        // Once fenced, librdkafka reports later calls as a generic fatal
        // error; the fatal error itself says why.
        if let Some((code, _)) = producer.client().fatal_error()
            && is_fenced_code(code)
        {
            return fenced();
        }
        if matches!(err, UplinkError::Fenced { .. }) {
            return err;
        }
        if let Err(abort) = producer.abort_transaction(commit_timeout) {
            // The abort is refused with a fencing error when another
            // instance took the transactional id over while the commit
            // failed for some other reason (Kafka 4.1 answers a commit
            // racing a newcomer's init with UNKNOWN_SERVER_ERROR). Starting
            // a new session then would fence the newcomer in turn.
            let fenced_now = producer
                .client()
                .fatal_error()
                .is_some_and(|(code, _)| is_fenced_code(code));
            if is_fenced(&abort) || fenced_now {
                warn!(commit_error = %err, "the transaction's abort was refused: another instance took over");
                return fenced();
            }
            warn!(error = %abort, "aborting the failed transaction failed; a new producer session will fence it");
        }
        err
    }

    fn trim(&self, upto: i64) -> Result<(), UplinkError> {
        outbox::trim(&self.conn, upto, Some(&self.signals.write_turn))?;
        let (batches, bytes) = outbox::backlog(&self.conn)?;
        self.stats.outbox_batches.store(batches, Relaxed);
        self.stats.outbox_bytes.store(bytes, Relaxed);
        self.signals.space_freed.bump();
        Ok(())
    }

    /// Creates the compacted offsets topic if it does not exist.
    fn ensure_offsets_topic(&self) -> Result<(), UplinkError> {
        let admin: AdminClient<DefaultClientContext> = self
            .base_client_config()
            .create()
            .map_err(self.kafka_err("creating the admin client"))?;
        admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(5))
            .map_err(
                self.kafka_err("cannot reach any broker (check kafka.brokers and the network)"),
            )?;
        let topic = NewTopic::new(
            &self.config.kafka.topic_offsets,
            1,
            TopicReplication::Fixed(-1),
        )
        .set("cleanup.policy", "compact");
        // Bounded: an unreachable broker must surface as "down" quickly.
        let opts = AdminOptions::new()
            .request_timeout(Some(Duration::from_secs(10)))
            .operation_timeout(Some(Duration::from_secs(10)));
        let results = self
            .rt
            .block_on(admin.create_topics([&topic], &opts))
            .map_err(self.kafka_err("creating the offsets topic"))?;
        for r in results {
            match r {
                Ok(_) => {
                    info!(topic = %self.config.kafka.topic_offsets, "created the compacted offsets topic")
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(UplinkError::Marker {
                        topic: name,
                        what: format!(
                            "cannot create it ({code}); create it as a compacted topic or grant CreateTopics"
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Reads the last committed marker of this gateway (0 if none).
    fn read_marker(&self) -> Result<i64, UplinkError> {
        let topic = self.config.kafka.topic_offsets.clone();
        let consumer: BaseConsumer<QuietEof> = self
            .base_client_config()
            .set(
                "group.id",
                format!("edge-agent-marker-{}", self.config.gateway_id),
            )
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .create_with_context(QuietEof)
            .map_err(self.kafka_err("creating the marker reader"))?;
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(20))
            .map_err(self.kafka_err("fetching offsets topic metadata"))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(UplinkError::Marker {
                topic,
                what: "the topic has no partitions (does it exist?)".into(),
            });
        }
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition_offset(&topic, *p, Offset::Beginning)
                .map_err(self.kafka_err("assigning offsets partitions"))?;
        }
        // Read up to the high watermark as of now, not just to the first
        // end-of-partition: read_committed stops at the last stable offset,
        // and another gateway's open transaction on this shared topic could
        // hide our newest marker behind it (reading an older marker would
        // send batches again that Kafka already holds). The watermarks come
        // from a read_uncommitted client: asked by a read_committed one,
        // Kafka answers with the last stable offset instead. Open
        // transactions end within their timeout, so the stable offset
        // passes this snapshot.
        let watermarks: BaseConsumer<QuietEof> = self
            .base_client_config()
            .set("isolation.level", "read_uncommitted")
            .create_with_context(QuietEof)
            .map_err(self.kafka_err("creating the watermark reader"))?;
        let mut targets = std::collections::HashMap::new();
        for p in &partitions {
            let (_, high) = watermarks
                .fetch_watermarks(&topic, *p, Duration::from_secs(20))
                .map_err(self.kafka_err("fetching offsets topic watermarks"))?;
            targets.insert(*p, high);
        }
        drop(watermarks);
        consumer
            .assign(&tpl)
            .map_err(self.kafka_err("assigning offsets partitions"))?;
        let mut pending: HashSet<i32> = partitions
            .into_iter()
            .filter(|p| targets.get(p).is_some_and(|h| *h > 0))
            .collect();
        let mut marker = 0i64;
        let wait = Duration::from_secs(self.config.kafka.transaction_timeout_seconds + 30);
        let started = Instant::now();
        let deadline = started + wait;
        let mut told = false;
        while !pending.is_empty() {
            if !told && started.elapsed() > Duration::from_secs(5) {
                info!(
                    topic = %topic,
                    "waiting for open transactions on the offsets topic to end before reading this gateway's marker \
                     (another gateway's transaction, or one of a crashed instance, holds the stable offset back)"
                );
                told = true;
            }
            if self.stopping() {
                return Err(UplinkError::Stopping);
            }
            if Instant::now() > deadline {
                return Err(UplinkError::Marker {
                    topic,
                    what: format!(
                        "did not reach the end of the topic within {wait:?} (a transaction left open?)"
                    ),
                });
            }
            if let Ok(positions) = consumer.position() {
                for e in positions.elements() {
                    if let (Offset::Offset(at), Some(high)) =
                        (e.offset(), targets.get(&e.partition()))
                        && at >= *high
                    {
                        pending.remove(&e.partition());
                    }
                }
            }
            if pending.is_empty() {
                break;
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Ok(msg)) => {
                    if msg.key() == Some(self.config.gateway_id.as_bytes())
                        && let Some(payload) = msg.payload()
                    {
                        match serde_json::from_slice::<Marker>(payload) {
                            Ok(m) => marker = m.batch_seq,
                            Err(e) => {
                                return Err(UplinkError::Marker {
                                    topic,
                                    what: format!(
                                        "marker at offset {} is not valid: {e}",
                                        msg.offset()
                                    ),
                                });
                            }
                        }
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => return Err(self.kafka_err("reading the offsets topic")(e)),
            }
        }
        Ok(marker)
    }
}

/// Client context of the marker reader: reaching the end of a partition is
/// what it waits for, not an error worth logging.
struct QuietEof;

impl rdkafka::ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_)) {
            warn!(error = %error, reason, "Kafka client error while reading the marker");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for QuietEof {}

/// Commits the transaction open on `producer`. Where `EDGE_FAULT` names
/// this commit (`kafka_commit_refused:n`, every n-th commit; fault
/// injection), reports it failed instead, as when the coordinator refuses
/// a commit; the caller then aborts the transaction.
fn commit(
    producer: &ThreadedProducer<DefaultProducerContext>,
    timeout: Duration,
) -> Result<(), KafkaError> {
    if crate::fault::hit("kafka_commit_refused") {
        warn!("fault injection: refusing the commit");
        return Err(KafkaError::Canceled);
    }
    producer.commit_transaction(timeout)
}

/// Queues a record, waiting while librdkafka's local queue is full.
pub fn send<C: rdkafka::producer::ProducerContext + 'static, K, V>(
    producer: &ThreadedProducer<C>,
    mut record: BaseRecord<'_, K, V, C::DeliveryOpaque>,
) -> Result<(), KafkaError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    V: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                // The local queue drains as the background thread delivers.
                record = back;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Sends every queued record now and waits (up to `limit`) until
/// librdkafka has no message in flight.
///
/// `commit_transaction` flushes first, but rust-rdkafka's flush polls the
/// producer's event queue in 100 ms steps, and with a `ThreadedProducer`
/// the delivery events are served by the producer's own thread: every
/// commit waited the full 100 ms. librdkafka's own flush is used instead:
/// while it runs, the broker threads treat `linger.ms` as over, so the last
/// records of a transaction do not wait out the linger (waiting for the
/// in-flight count alone did, and every transaction paid it). Returns
/// whether every message was delivered (or failed) within `limit`.
pub fn flush_deliveries<C: rdkafka::producer::ProducerContext + 'static>(
    producer: &ThreadedProducer<C>,
    limit: Duration,
) -> bool {
    let ms = i32::try_from(limit.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the pointer is the producer's live librdkafka handle, which
    // `producer` keeps alive for the whole call, and rd_kafka_flush may be
    // called from any thread. rust-rdkafka's producers use the event API,
    // so this flush serves no callbacks here: it waits until the message
    // count is zero while the producer's own thread serves the delivery
    // reports.
    let err = unsafe { rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), ms) };
    err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
}

fn add_micros(counter: &std::sync::atomic::AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_micros() as u64, Relaxed);
}

fn is_fenced(e: &KafkaError) -> bool {
    let code = match e {
        KafkaError::Transaction(t) => t.code(),
        other => match other.rdkafka_error_code() {
            Some(c) => c,
            None => return false,
        },
    };
    is_fenced_code(code)
}

fn is_fenced_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::Fenced
    )
}

fn short_error(e: &UplinkError) -> String {
    let text = e.to_string();
    let mut short: String = text.chars().take(120).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

/// librdkafka settings shared by every client of the agent: brokers, the
/// user's options and the SASL password read from its file. Values are never
/// logged.
pub fn client_config(k: &crate::config::KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers);
    for (key, value) in &k.librdkafka_options {
        c.set(key, value);
    }
    if let Some(path) = &k.sasl_password_file {
        match std::fs::read_to_string(path) {
            Ok(password) => {
                c.set("sasl.password", password.trim_end_matches(['\r', '\n']));
            }
            Err(e) => {
                error!(path = %path.display(), error = %e, "cannot read kafka.sasl_password_file; connecting without a password")
            }
        }
    }
    c
}

/// Logs a fatal uplink error once, with what to do.
pub fn report_fatal(e: &UplinkError) {
    error!(error = %e, "Kafka uplink stopped");
}
