//! The batch writer: takes raw inputs from every source, decodes and
//! validates them, and commits them to the outbox in group-committed
//! batches. Runs on its own OS thread: decoding and SQLite are blocking work
//! that must never stall the async reactor.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::config::{Config, OutboxConfig, ValidationConfig, WhenFull};
use crate::outbox::{Item, Outbox, Raw, RejectedInput};
use crate::signal::OutboxSignals;
use crate::stats::Stats;
use crate::transforms::validate::{
    Rejection, TopicKind, decode_bin_reading, decode_reading_reusing, parse_topic,
    reading_from_frame,
};

/// An MQTT publish that must be acknowledged once durable.
#[derive(Debug)]
pub struct MqttPublish {
    pub publish: rumqttc::Publish,
    /// Which broker connection it arrived on (counts reconnections).
    pub connection: u64,
}

/// One input as a source hands it over.
#[derive(Debug)]
pub enum Envelope {
    /// A message from the MQTT source: acknowledged after its batch commits.
    Mqtt(MqttPublish),
    /// A reading from a serial port, acknowledged over the link once durable.
    Serial {
        port: usize,
        address: u8,
        device_id: String,
        reading: firmware_proto::message::Reading,
    },
    /// JSON readings without a topic (import of a JSON-lines file), a
    /// few lines at a time: the device id comes from each payload.
    Lines(LineChunk),
    /// A message with nothing to acknowledge (demo).
    Raw {
        source: &'static str,
        topic: String,
        payload: Vec<u8>,
    },
}

impl Envelope {
    fn size_hint(&self) -> usize {
        match self {
            Envelope::Mqtt(p) => p.publish.payload.len() + p.publish.topic.len(),
            Envelope::Raw { topic, payload, .. } => payload.len() + topic.len(),
            Envelope::Serial { .. } => 64,
            Envelope::Lines(chunk) => chunk.bytes.len(),
        }
    }

    /// How many readings it holds.
    fn records(&self) -> usize {
        match self {
            Envelope::Lines(chunk) => chunk.ends.len(),
            _ => 1,
        }
    }
}

/// Consecutive lines of an imported file, handed over together: one queue
/// slot and one allocation for many readings.
#[derive(Debug)]
pub struct LineChunk {
    pub source: &'static str,
    /// The file they came from.
    pub file: Arc<str>,
    /// The lines back to back, without their newlines.
    pub bytes: Vec<u8>,
    /// Each line's number (from 1) and where it ends in `bytes`; it starts
    /// where the line before it ends.
    pub ends: Vec<(u64, usize)>,
}

impl LineChunk {
    pub fn new(source: &'static str, file: Arc<str>, bytes: usize, lines: usize) -> Self {
        Self {
            source,
            file,
            bytes: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(lines),
        }
    }

    /// Ends the line whose bytes were appended since the last call.
    pub fn end_line(&mut self, number: u64) {
        self.ends.push((number, self.bytes.len()));
    }

    /// Where the next line starts in `bytes`.
    pub fn next_start(&self) -> usize {
        self.ends.last().map_or(0, |&(_, end)| end)
    }

    /// Each line's number and bytes, in order.
    pub fn lines(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let mut start = 0;
        self.ends.iter().map(move |&(number, end)| {
            let line = &self.bytes[start..end];
            start = end;
            (number, line)
        })
    }
}

/// A serial reading made durable (stored, or rejected and quarantined).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialAck {
    pub address: u8,
    pub boot_epoch: u32,
    pub seq: u32,
    /// Stored as a reject: the device is told with a `Nack`.
    pub refused: bool,
}

/// Where acknowledgements go once a batch is durable.
#[derive(Clone, Default)]
pub struct AckRouter {
    pub mqtt: Option<mpsc::UnboundedSender<Vec<MqttPublish>>>,
    /// One channel per serial port, by port index.
    pub serial: Vec<mpsc::UnboundedSender<Vec<SerialAck>>>,
}

pub struct BatchWriter {
    pub outbox: Outbox,
    pub outbox_config: OutboxConfig,
    pub validation: ValidationConfig,
    pub topic_prefix: String,
    pub stats: Arc<Stats>,
    pub signals: Arc<OutboxSignals>,
    pub acks: AckRouter,
    /// Stop instead of waiting when the outbox is full (import: no uplink
    /// runs in the same process to make room).
    pub stop_when_full: bool,
    /// Device id strings of committed readings, reused by the next batch's
    /// (at most a batch's worth).
    spare_ids: Vec<String>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl BatchWriter {
    pub fn new(
        config: &Config,
        outbox: Outbox,
        stats: Arc<Stats>,
        signals: Arc<OutboxSignals>,
        acks: AckRouter,
    ) -> Self {
        Self {
            outbox,
            outbox_config: config.outbox.clone(),
            validation: config.validation.clone(),
            topic_prefix: config
                .sources
                .mqtt
                .as_ref()
                .map(|m| m.topic_prefix.clone())
                .unwrap_or_default(),
            stats,
            signals,
            acks,
            stop_when_full: false,
            spare_ids: Vec::new(),
        }
    }

    /// Runs until every sender is gone (sources stopped) and the queue is
    /// drained, or until `stop` is set while the writer cannot make progress.
    pub fn run(
        mut self,
        rt: Handle,
        mut rx: mpsc::Receiver<Envelope>,
        stop: watch::Receiver<bool>,
    ) {
        let max_records = self.outbox_config.batch_max_records;
        let max_bytes = self.outbox_config.batch_max_bytes;
        let linger = Duration::from_millis(self.outbox_config.batch_linger_ms);
        // An input that would have taken its batch past `max_records`: it
        // starts the next one.
        let mut carried: Option<Envelope> = None;
        let mut batch = Vec::new();
        loop {
            if !self.wait_for_space(&stop) {
                info!(
                    "batch writer stopping while the outbox is full; unacknowledged input stays with its source"
                );
                return;
            }
            self.stats.writer_heartbeat_ms.store(now_ms(), Relaxed);
            let first = match carried.take() {
                Some(first) => first,
                // The timer must be created inside the runtime: build it in
                // the async block that block_on runs.
                None => match rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(1), rx.recv()).await
                }) {
                    Ok(Some(first)) => first,
                    Ok(None) => return,
                    Err(_) => continue,
                },
            };
            let mut bytes = first.size_hint();
            let mut records = first.records();
            batch.push(first);
            let deadline = Instant::now() + linger;
            // Set once the batch waits for more: the uplink may then call
            // for it (see `LingerCall`).
            let mut lingering = None;
            while records < max_records && bytes < max_bytes {
                let env = match rx.try_recv() {
                    Ok(env) => env,
                    Err(_) => {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        let mark = match lingering {
                            Some(mark) => mark,
                            None => match self.signals.linger.begin() {
                                Some(mark) => *lingering.insert(mark),
                                None => break,
                            },
                        };
                        if self.signals.linger.called_since(mark) {
                            break;
                        }
                        let call = &self.signals.linger;
                        match rt.block_on(async {
                            tokio::select! {
                                got = tokio::time::timeout(deadline - now, rx.recv()) => Some(got),
                                () = call.called() => None,
                            }
                        }) {
                            Some(Ok(Some(env))) => env,
                            Some(Ok(None) | Err(_)) => break,
                            // Called, perhaps for an earlier batch: checked
                            // above.
                            None => continue,
                        }
                    }
                };
                if records + env.records() > max_records {
                    carried = Some(env);
                    break;
                }
                bytes += env.size_hint();
                records += env.records();
                batch.push(env);
            }
            // A batch that lingered stays marked until it is durable (or
            // its write fails): an uplink that calls during its commit
            // waits for it.
            if !self.commit(&mut batch, records, &stop) {
                self.signals.linger.end();
                return;
            }
        }
    }

    /// Blocks while the outbox is at its bound. Returns false if asked to stop.
    fn wait_for_space(&mut self, stop: &watch::Receiver<bool>) -> bool {
        let max = self.outbox_config.max_size_bytes;
        let mut warned = false;
        loop {
            let used = self.stats.outbox_bytes.load(Relaxed);
            if used >= max
                && self.outbox_config.when_full == WhenFull::DropOldest
                && !self.stop_when_full
            {
                match self.outbox.drop_oldest(max / 10 * 9) {
                    // Nothing to drop: the counter ran ahead of the table;
                    // wait for the uplink's next trim to correct it.
                    Ok(d) if d.batches == 0 => {}
                    Ok(d) => {
                        self.stats.dropped_records.fetch_add(d.records, Relaxed);
                        let _ = self
                            .stats
                            .outbox_bytes
                            .fetch_update(Relaxed, Relaxed, |b| Some(b.saturating_sub(d.bytes)));
                        let _ = self
                            .stats
                            .outbox_batches
                            .fetch_update(Relaxed, Relaxed, |b| Some(b.saturating_sub(d.batches)));
                        error!(
                            dropped_readings = d.records,
                            dropped_batches = d.batches,
                            dropped_bytes = d.bytes,
                            "outbox full: DROPPED the oldest unsent readings (outbox.when_full = drop_oldest); \
                             they will never reach Kafka"
                        );
                        continue;
                    }
                    Err(e) => {
                        error!(error = %e, "outbox full and dropping the oldest batches failed; holding input back")
                    }
                }
            }
            if used < max {
                if warned {
                    info!(used_bytes = used, "outbox has room again; taking input");
                }
                self.stats.outbox_full.store(false, Relaxed);
                return true;
            }
            if self.stop_when_full {
                error!(
                    used_bytes = used,
                    max_size_bytes = max,
                    "the outbox is full: stopping here. Start the agent to ship the backlog (or raise \
                     outbox.max_size_bytes), then run the import again: lines already imported are skipped as duplicates"
                );
                self.stats.outbox_full.store(true, Relaxed);
                return false;
            }
            if !warned {
                warn!(
                    used_bytes = used,
                    max_size_bytes = max,
                    "outbox is full: holding input back (sources are not acknowledged) until the uplink drains it"
                );
                warned = true;
                self.stats.outbox_full.store(true, Relaxed);
            }
            if *stop.borrow() {
                return false;
            }
            self.stats.writer_heartbeat_ms.store(now_ms(), Relaxed);
            let seen = self.signals.space_freed.current();
            self.signals
                .space_freed
                .wait_past(seen, Duration::from_millis(200));
        }
    }

    /// Decodes, writes and acknowledges one batch. Retries a failing write
    /// (a full disk, say) until it succeeds or the agent stops; returns false
    /// when stopping.
    fn commit(
        &mut self,
        batch: &mut Vec<Envelope>,
        records: usize,
        stop: &watch::Receiver<bool>,
    ) -> bool {
        let now = now_ms();
        let mut items = Vec::with_capacity(records);
        let mut spare = std::mem::take(&mut self.spare_ids);
        for env in batch.iter() {
            let item = match env {
                Envelope::Lines(chunk) => {
                    self.decode_lines(chunk, now, &mut spare, &mut items);
                    continue;
                }
                Envelope::Serial {
                    port,
                    address,
                    device_id,
                    reading,
                } => match reading_from_frame(device_id, reading, now, &self.validation) {
                    Ok(r) => Item::Reading(
                        r,
                        Raw::Frame {
                            port: *port,
                            address: *address,
                            frame: reading,
                        },
                    ),
                    Err(rejection) => Item::Rejected(RejectedInput {
                        source: "serial",
                        topic: format!("serial/{port}/{address}/{device_id}"),
                        payload: format!("{reading:?}").into_bytes(),
                        rejection,
                    }),
                },
                Envelope::Mqtt(delivery) => self.decode(
                    "mqtt",
                    &delivery.publish.topic,
                    &delivery.publish.payload,
                    now,
                    &mut spare,
                ),
                Envelope::Raw {
                    source,
                    topic,
                    payload,
                } => self.decode(source, topic, payload, now, &mut spare),
            };
            items.push(item);
        }
        let mut backoff = Duration::from_millis(100);
        let outcome = loop {
            // A trim that claimed the write lock's turn goes first. The bound
            // only guards against a claim never released; SQLite's own
            // locking still decides.
            self.signals
                .write_turn
                .wait_unclaimed(Duration::from_secs(2));
            let writing = Instant::now();
            match self.outbox.write_batch(&mut items, now) {
                Ok(outcome) => {
                    self.stats.outbox_commit_latency.observe(writing.elapsed());
                    crate::fault::point("outbox_committed");
                    // Durable: an uplink waiting for this batch may take it.
                    self.signals.linger.end();
                    break outcome;
                }
                Err(e) => {
                    // Not while this retries: the uplink need not wait.
                    self.signals.linger.end();
                    error!(
                        error = %e,
                        "cannot write to the outbox; input is held back and not acknowledged. \
                         Check free space and permissions of the data folder; retrying in {backoff:?}"
                    );
                    if *stop.borrow() {
                        return false;
                    }
                    self.stats.writer_heartbeat_ms.store(now_ms(), Relaxed);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let s = &self.stats;
        s.valid.fetch_add(outcome.valid, Relaxed);
        s.duplicates.fetch_add(outcome.duplicates, Relaxed);
        s.alerts.fetch_add(outcome.alerts, Relaxed);
        // Whether each input was refused, by input: an input of several
        // readings (lines) needs no acknowledgement.
        let mut at = 0;
        let refused: Vec<bool> = batch
            .iter()
            .map(|env| {
                let n = env.records();
                let refused = n == 1 && matches!(items.get(at), Some(Item::Rejected(_)));
                at += n;
                refused
            })
            .collect();
        for item in &items {
            if let Item::Rejected(r) = item {
                s.count_reject(r.rejection.reason);
            }
        }
        let keep = self.outbox_config.batch_max_records;
        for item in items {
            if let Item::Reading(reading, _) = item
                && spare.len() < keep
            {
                spare.push(reading.device_id);
            }
        }
        self.spare_ids = spare;
        s.set_plane(self.outbox.plane().counters());
        s.devices_known
            .store(self.outbox.known_devices() as u64, Relaxed);
        if outcome.batch_seq.is_some() {
            s.batches_written.fetch_add(1, Relaxed);
            s.bytes_written.fetch_add(outcome.bytes, Relaxed);
            s.outbox_batches.fetch_add(1, Relaxed);
            s.outbox_bytes.fetch_add(outcome.bytes, Relaxed);
            self.signals.new_batch.bump();
        }
        let mut mqtt_acks = Vec::new();
        let mut serial_acks: Vec<Vec<SerialAck>> = vec![Vec::new(); self.acks.serial.len()];
        for (env, refused) in batch.drain(..).zip(refused) {
            match env {
                Envelope::Mqtt(delivery) => mqtt_acks.push(delivery),
                Envelope::Serial {
                    port,
                    address,
                    reading,
                    ..
                } => {
                    if let Some(acks) = serial_acks.get_mut(port) {
                        acks.push(SerialAck {
                            address,
                            boot_epoch: reading.boot_epoch,
                            seq: reading.seq,
                            refused,
                        });
                    }
                }
                Envelope::Raw { .. } | Envelope::Lines(_) => {}
            }
        }
        if !mqtt_acks.is_empty()
            && let Some(tx) = &self.acks.mqtt
        {
            // The batch is durable: the broker may forget these now. If the
            // MQTT task is gone, the broker redelivers and dedupe drops them.
            let _ = tx.send(mqtt_acks);
        }
        for (port, acks) in serial_acks.into_iter().enumerate() {
            if !acks.is_empty()
                && let Some(tx) = self.acks.serial.get(port)
            {
                let _ = tx.send(acks);
            }
        }
        true
    }

    /// A rejected input, its payload cut to the payload limit.
    fn rejected(
        &self,
        source: &'static str,
        topic: &str,
        payload: &[u8],
        rejection: Rejection,
    ) -> Item<'static> {
        let keep = payload.len().min(self.validation.max_payload_bytes);
        Item::Rejected(RejectedInput {
            source,
            topic: topic.chars().take(256).collect(),
            payload: payload[..keep].to_vec(),
            rejection,
        })
    }

    /// Decodes the lines of an imported chunk into `items`.
    fn decode_lines<'a>(
        &self,
        chunk: &'a LineChunk,
        now: i64,
        spare: &mut Vec<String>,
        items: &mut Vec<Item<'a>>,
    ) {
        for (line, payload) in chunk.lines() {
            items.push(
                match decode_reading_reusing(payload, None, now, &self.validation, spare) {
                    Ok(reading) => Item::Reading(
                        reading,
                        Raw::Line {
                            source: chunk.source,
                            file: &chunk.file,
                            line,
                            payload,
                        },
                    ),
                    Err(rejection) => self.rejected(
                        chunk.source,
                        &crate::outbox::line_origin(chunk.source, &chunk.file, line),
                        payload,
                        rejection,
                    ),
                },
            );
        }
    }

    fn decode<'a>(
        &self,
        source: &'static str,
        topic: &'a str,
        payload: &'a [u8],
        now: i64,
        spare: &mut Vec<String>,
    ) -> Item<'a> {
        let reject = |rejection: Rejection| self.rejected(source, topic, payload, rejection);
        let raw = Raw::Bytes {
            source,
            topic,
            payload,
        };
        let device = match parse_topic(&self.topic_prefix, topic) {
            Ok(TopicKind::Telemetry(device)) => device,
            Ok(TopicKind::TelemetryBin(device)) => {
                return match decode_bin_reading(payload, device, now, &self.validation) {
                    Ok(reading) => Item::Reading(reading, raw),
                    Err(rejection) => reject(rejection),
                };
            }
            Err(rejection) => return reject(rejection),
        };
        match decode_reading_reusing(payload, Some(device), now, &self.validation, spare) {
            Ok(reading) => Item::Reading(reading, raw),
            Err(rejection) => reject(rejection),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits for `ready` with a deadline.
    fn wait_until(what: &str, ready: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    /// A batch writer on its own thread, as the agent runs it.
    struct Writer {
        tx: mpsc::Sender<Envelope>,
        stats: Arc<Stats>,
        signals: Arc<OutboxSignals>,
        thread: std::thread::JoinHandle<()>,
        _stop: watch::Sender<bool>,
        // Drives the writer's timers.
        _rt: tokio::runtime::Runtime,
    }

    impl Writer {
        fn start(config: &Config) -> Self {
            let outbox = crate::open_outbox(config).expect("the outbox opens");
            let stats = Arc::new(Stats::default());
            let signals = Arc::new(OutboxSignals::default());
            let writer = BatchWriter::new(
                config,
                outbox,
                stats.clone(),
                signals.clone(),
                AckRouter::default(),
            );
            // The writer blocks on the runtime's handle from its own thread:
            // only a multi-thread runtime drives the linger's timer then.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("a runtime");
            let (tx, rx) = mpsc::channel(4);
            let (stop, stop_rx) = watch::channel(false);
            let handle = rt.handle().clone();
            let thread = std::thread::spawn(move || writer.run(handle, rx, stop_rx));
            Self {
                tx,
                stats,
                signals,
                thread,
                _stop: stop,
                _rt: rt,
            }
        }
    }

    fn linger_config(dir: &std::path::Path, linger_ms: u64) -> Config {
        let text = format!(
            "gateway_id = \"gw-linger\"\ndata_dir = \"{}\"\n[sources.demo]\n[kafka]\nbrokers = \"127.0.0.1:1\"\n\
             [outbox]\nbatch_linger_ms = {linger_ms}\n",
            dir.display()
        );
        Config::from_toml(&text, "test.toml").expect("a valid config")
    }

    /// The uplink calls for a batch that lingers: it goes at once, long
    /// before its linger of a second is over.
    #[test]
    fn a_lingering_batch_goes_when_the_uplink_calls() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let w = Writer::start(&linger_config(dir.path(), 1000));
        let sent = Instant::now();
        w.tx.try_send(reading(1)).expect("room in the queue");
        wait_until("the batch to linger", || w.signals.linger.call());
        wait_until("the batch", || w.stats.valid.load(Relaxed) >= 1);
        let took = sent.elapsed();
        assert!(
            took < Duration::from_millis(900),
            "the called batch went after {took:?}, as if its linger had run out"
        );
        // Not called, the next one lingers on its own.
        w.tx.try_send(reading(2)).expect("room in the queue");
        wait_until("the second batch", || w.stats.valid.load(Relaxed) >= 2);
        drop(w.tx);
        w.thread
            .join()
            .expect("the writer ends when its queue closes");
        assert_eq!(w.stats.batches_written.load(Relaxed), 2);
    }

    /// While the uplink waits for data, a batch does not linger at all; one
    /// lingering when it starts waiting goes.
    #[test]
    fn batches_do_not_linger_while_the_uplink_waits() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let w = Writer::start(&linger_config(dir.path(), 1000));
        let sent = Instant::now();
        w.tx.try_send(reading(1)).expect("room in the queue");
        wait_until("the batch to linger", || w.signals.linger.is_lingering());
        w.signals.linger.set_uplink_waiting(true);
        wait_until("the first batch", || w.stats.valid.load(Relaxed) >= 1);
        w.tx.try_send(reading(2)).expect("room in the queue");
        wait_until("the second batch", || w.stats.valid.load(Relaxed) >= 2);
        let took = sent.elapsed();
        assert!(
            took < Duration::from_millis(900),
            "both batches went after {took:?}: at least one lingered"
        );
        drop(w.tx);
        w.thread
            .join()
            .expect("the writer ends when its queue closes");
        // Counted once the writer is done: it counts a batch's readings
        // before the batch itself.
        assert_eq!(w.stats.batches_written.load(Relaxed), 2);
    }

    fn reading(seq: u64) -> Envelope {
        let payload = format!(
            r#"{{"device_id":"dev-1","seq":{seq},"ts":{},"temperature":20.0,"humidity":40.0,"battery":90.0,"lat":52.5,"lon":13.4,"speed":1.0}}"#,
            now_ms()
        );
        Envelope::Raw {
            source: "test",
            topic: "devices/dev-1/telemetry".into(),
            payload: payload.into_bytes(),
        }
    }

    /// A reading that arrives while the batch before it lingers joins that
    /// batch; a lone reading still goes once the linger is over.
    #[test]
    fn a_lingering_batch_takes_what_arrives_and_then_goes_alone() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let config = linger_config(dir.path(), 1000);
        assert_eq!(
            Config::from_toml(
                &format!(
                    "gateway_id = \"g\"\ndata_dir = \"{}\"\n[sources.demo]\n[kafka]\nbrokers = \"127.0.0.1:1\"\n",
                    dir.path().display()
                ),
                "t"
            )
            .expect("a valid config")
            .outbox
            .batch_linger_ms,
            2,
            "the default linger"
        );
        let w = Writer::start(&config);
        let (tx, stats) = (&w.tx, &w.stats);
        tx.try_send(reading(1)).expect("room in the queue");
        // The writer took the first reading and lingers for 1 s. The second
        // comes 100 ms later (the arrival pattern under test, not a wait for
        // a condition): long after a batch without linger would have been
        // committed, well inside the linger. It joins the first's batch.
        wait_until("the writer to take the first reading", || {
            tx.capacity() == tx.max_capacity()
        });
        std::thread::sleep(Duration::from_millis(100));
        tx.try_send(reading(2)).expect("room in the queue");
        wait_until("both readings", || stats.valid.load(Relaxed) >= 2);
        // Nothing follows the third: it goes alone once the linger is over.
        tx.try_send(reading(3)).expect("room in the queue");
        wait_until("the third reading", || stats.valid.load(Relaxed) >= 3);
        let stats = w.stats.clone();
        drop(w.tx);
        w.thread
            .join()
            .expect("the writer ends when its queue closes");
        // Two batches: the first two readings, then the third.
        assert_eq!(stats.batches_written.load(Relaxed), 2);
        let conn = rusqlite::Connection::open(config.database_path()).expect("the outbox");
        let (batches, _) = crate::outbox::backlog(&conn).expect("the backlog");
        assert_eq!(batches, 2, "batches in the outbox");
    }
}
