//! The durable store-and-forward outbox, in SQLite.
//!
//! The outbox is an append-only log of batches with a monotonically
//! increasing `batch_seq` (AUTOINCREMENT, so a number is never reused even
//! after the log is trimmed empty). One SQLite transaction per batch writes
//! the batch, device state and rejects: a reading is either fully accepted
//! or not at all.
//!
//! Per-device high-water marks (dedupe) follow one invariant: the mark of
//! every accepted reading is either in a batch still in `outbox_batch` or in
//! `device_hwm`. Batches carry their readings' `(device_id, seq)`, so the
//! batch commit itself makes the marks durable; `device_hwm` is written only
//! when batches leave the outbox (trim after Kafka committed them, or
//! drop-oldest), in the same transaction as the delete. At open the marks
//! are `device_hwm` plus a replay of the batches still present. This keeps a
//! per-device write out of every batch commit.

use foldhash::{HashMap, HashMapExt as _};
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::DeviceKey;
use crate::config::SyncMode;
use crate::registry::RegistryError;
use crate::signal::WriteTurn;
use crate::transforms::enrich::{Alert, DataPlane};
use crate::transforms::validate::{
    DeadLetterRecord, Decimals, Enrichment, Reading, RecordFields, Rejection, write_record_json,
};

/// 2: batch bodies may be lz4-compressed (`outbox_batch.codec`).
/// 3: dedupe marks live in the unsent batches, `device_hwm` only holds those
/// of batches that left (an older build would lose the rest: it must refuse).
/// 4: bodies compressed in chunks (`CODEC_LZ4_CHUNKS`), and accepted
/// readings stored in binary (`TAG_READING`): an older build reads neither.
/// 5: readings stored compact (`TAG_CONTEXT`, `TAG_COMPACT`).
/// 6: device states changed by a batch are logged in `device_state_log`
/// and folded into `device_state` later (an older build would miss the
/// logged ones and raise spurious `enter` events).
/// 7: `device_state_log` rows may be lz4-compressed (`codec`).
/// 8: compact readings may hold values as decimals (`COMPACT_DECIMAL`).
const SCHEMA_VERSION: i64 = 8;

/// Body tag of an accepted reading stored in binary, fixed-width
/// ([`encode_reading`]). Read back, it becomes a [`TopicId::Data`] record
/// in JSON: the uplink writes the JSON, not the batch writer. Written by
/// schema 4, read by later builds; written now only for a reading the
/// compact form cannot hold.
const TAG_READING: u8 = 3;

/// Body tag of what the compact readings after it share: the gateway id as
/// the key, `received_at` (i64 LE) as the value. Once per batch, before its
/// first compact reading.
const TAG_CONTEXT: u8 = 4;

/// Body tag of an accepted reading in the compact form
/// ([`encode_compact`]), framed shorter than the other records:
/// `tag | key length u8 | key | value length varint | value`.
const TAG_COMPACT: u8 = 5;

/// Readings of a batch whose map entries are looked up ahead of them
/// (see `write_batch_inner`).
const WARM_AHEAD: usize = 32;

/// Largest decompressed batch body accepted when reading one back.
const MAX_BODY_BYTES: usize = 512 * 1024 * 1024;

/// `outbox_batch.codec` values.
const CODEC_NONE: i64 = 0;
/// One lz4 block with the body's size in front (u32 LE). Read, no longer
/// written.
const CODEC_LZ4: i64 = 1;
/// lz4 blocks of at most [`CHUNK_BYTES`] of body each, every one as
/// `raw length (u32 LE) | compressed length (u32 LE) | block`.
const CODEC_LZ4_CHUNKS: i64 = 2;

/// Body bytes per compressed chunk: lz4 looks back at most 64 KiB anyway,
/// and a chunk this size is still in the CPU cache when it is compressed.
const CHUNK_BYTES: usize = 64 * 1024;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox_batch (
    batch_seq  INTEGER PRIMARY KEY AUTOINCREMENT,
    created_ms INTEGER NOT NULL,
    records    INTEGER NOT NULL,
    bytes      INTEGER NOT NULL,
    body       BLOB NOT NULL,
    codec      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS device_hwm (
    device_id TEXT PRIMARY KEY,
    seq       INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reject_count (
    reason TEXT PRIMARY KEY,
    count  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms INTEGER NOT NULL,
    source      TEXT NOT NULL,
    topic       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    message     TEXT NOT NULL,
    payload     BLOB NOT NULL
);
";

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "outbox database was written by a newer edge-agent (schema {found}, this build knows {SCHEMA_VERSION}); upgrade edge-agent or move the data folder aside"
    )]
    NewerSchema { found: i64 },
    #[error("outbox SQLite error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("outbox batch {batch_seq} is corrupt: {what}")]
    Corrupt { batch_seq: i64, what: &'static str },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(
        "the file system of the data folder ({dir}) is full: input is held back (devices are not acknowledged) \
         until {reserve_mib} MiB are free there again. Free space on it or move the data folder"
    )]
    DiskFull { dir: String, reserve_mib: u64 },
    #[error("cannot allocate the disk reserve {path}: {source}")]
    Reserve {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the outbox's checkpoint thread: {0}")]
    Checkpointer(#[source] std::io::Error),
}

impl OutboxError {
    /// SQLite ran out of room on the file system.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::DiskFull { .. } => true,
            Self::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            _ => false,
        }
    }
}

/// Which Kafka topic a record goes to; the names come from config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TopicId {
    Data = 0,
    DeadLetter = 1,
    Alert = 2,
}

impl TopicId {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Data),
            1 => Some(Self::DeadLetter),
            2 => Some(Self::Alert),
            _ => None,
        }
    }
}

/// One record of a batch as Kafka gets it (tests read bodies back whole).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    pub topic: TopicId,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// A rejected input with where it came from.
#[derive(Debug, Clone)]
pub struct RejectedInput {
    pub source: &'static str,
    pub topic: String,
    pub payload: Vec<u8>,
    pub rejection: Rejection,
}

/// The raw input a reading was decoded from, for the dead-letter record
/// when the data plane rejects it after decoding (unknown device, range).
#[derive(Debug, Clone, Copy)]
pub enum Raw<'a> {
    Bytes {
        source: &'static str,
        topic: &'a str,
        payload: &'a [u8],
    },
    /// A line of an imported file: its origin is spelled out only for a
    /// dead letter.
    Line {
        source: &'static str,
        file: &'a str,
        line: u64,
        payload: &'a [u8],
    },
    Frame {
        port: usize,
        address: u8,
        frame: &'a firmware_proto::message::Reading,
    },
    /// No raw form kept: the dead letter holds the decoded reading.
    None,
}

impl Raw<'_> {
    fn rejected(
        &self,
        reading: &Reading,
        rejection: Rejection,
        max_payload: usize,
    ) -> RejectedInput {
        match *self {
            Raw::Bytes {
                source,
                topic,
                payload,
            } => RejectedInput {
                source,
                topic: topic.chars().take(256).collect(),
                payload: payload[..payload.len().min(max_payload)].to_vec(),
                rejection,
            },
            Raw::Line {
                source,
                file,
                line,
                payload,
            } => RejectedInput {
                source,
                topic: line_origin(source, file, line),
                payload: payload[..payload.len().min(max_payload)].to_vec(),
                rejection,
            },
            Raw::Frame {
                port,
                address,
                frame,
            } => RejectedInput {
                source: "serial",
                topic: format!("serial/{port}/{address}/{}", reading.device_id),
                payload: format!("{frame:?}").into_bytes(),
                rejection,
            },
            Raw::None => RejectedInput {
                source: "reading",
                topic: String::new(),
                payload: serde_json::to_vec(reading).unwrap_or_default(),
                rejection,
            },
        }
    }
}

/// Where an imported line came from, e.g. `import:logs/day1.jsonl:17`, at
/// most 256 characters.
pub fn line_origin(source: &str, file: &str, line: u64) -> String {
    let suffix = format!(":{line}");
    let room = 256usize.saturating_sub(source.len() + 1 + suffix.len());
    let mut origin = format!("{source}:");
    origin.extend(file.chars().take(room));
    origin.push_str(&suffix);
    origin
}

/// What the batch writer hands to [`Outbox::write_batch`].
#[derive(Debug, Clone)]
pub enum Item<'a> {
    Reading(Reading, Raw<'a>),
    Rejected(RejectedInput),
}

/// What one batch commit did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// The batch written, if any record needed sending.
    pub batch_seq: Option<i64>,
    pub valid: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Alerts raised.
    pub alerts: u64,
    /// Encoded bytes of the batch body.
    pub bytes: u64,
}

/// The outcome of [`send_pending`]: what went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentBatches {
    /// The last batch sent whole.
    pub last_batch: i64,
    pub batches: u64,
    pub records: u64,
    /// Keys and values as Kafka got them.
    pub bytes: u64,
}

/// Why [`send_pending`] stopped early.
#[derive(Debug)]
pub enum SendError<E> {
    /// A batch could not be read back: nothing of it may count as sent.
    Outbox(OutboxError),
    /// The sink refused a record.
    Sink(E),
}

impl<E> From<OutboxError> for SendError<E> {
    fn from(e: OutboxError) -> Self {
        Self::Outbox(e)
    }
}

pub struct Outbox {
    conn: Connection,
    gateway_id: String,
    quarantine_max_rows: u64,
    /// Per-device high-water marks, mirrored from `device_hwm`. A batch
    /// advances them as it goes (one probe per reading);
    /// `marks_before` undoes that if the batch fails.
    hwm: HashMap<DeviceKey, u64>,
    /// The marks the batch being written changed, with their values
    /// before it (`None`: the device had none).
    marks_before: Vec<(DeviceKey, Option<u64>)>,
    /// Registry lookup, ranges, geofences and thresholds.
    plane: DataPlane,
    /// Payload bound for dead letters of readings the data plane rejects.
    max_payload_bytes: usize,
    /// How batch bodies are stored.
    compression: crate::config::OutboxCompression,
    /// Reused between batches: big buffers allocated per batch cost page
    /// faults every time.
    body: BodyWriter,
    /// Room kept free for checkpoints (see `reserve`); `None` when off.
    reserve: Option<reserve::DiskReserve>,
    /// The disk filled up: input is held back until the reserve fits again.
    disk_full: bool,
    /// The database file; the reserve lives next to it.
    db_path: std::path::PathBuf,
    /// Checkpoints the write-ahead log while batches go on.
    checkpointer: checkpoint::Checkpointer,
}

/// Opens the database with the pragmas every connection needs.
pub fn open_connection(path: &Path, sync: SyncMode) -> Result<Connection, OutboxError> {
    open_connection_paged(path, sync, None)
}

/// [`open_connection`]; `page_size` applies if the database is new.
fn open_connection_paged(
    path: &Path,
    sync: SyncMode,
    page_size: Option<u32>,
) -> Result<Connection, OutboxError> {
    let open_err = |source| OutboxError::Open {
        path: path.display().to_string(),
        source,
    };
    let conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(open_err)?;
    // Before anything is written: a database in WAL mode keeps its size.
    if let Some(size) = page_size {
        conn.pragma_update(None, "page_size", size)
            .map_err(open_err)?;
    }
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(open_err)?;
    let sync = match sync {
        SyncMode::Full => "FULL",
        SyncMode::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)
        .map_err(open_err)?;
    // The batch writer's checkpoints run on a thread of their own
    // (`checkpoint`) and keep the log within 8 MiB of pages: sequential
    // enough for SD cards, and small next to outbox.disk_reserve_bytes, so
    // a checkpoint always has room to grow the database. Other connections
    // checkpoint past 16 MiB, only if the writer does not.
    let page: i64 = conn
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .map_err(open_err)?;
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        (2 * WAL_BOUND_BYTES / page.max(512)).max(1),
    )
    .map_err(open_err)?;
    Ok(conn)
}

/// The write-ahead log's bound: the batch writer checkpoints past it.
const WAL_BOUND_BYTES: i64 = checkpoint::STEP_BYTES * checkpoint::BOUND_STEPS as i64;

impl Outbox {
    pub fn open(
        path: &Path,
        sync: SyncMode,
        gateway_id: &str,
        quarantine_max_rows: u64,
    ) -> Result<Self, OutboxError> {
        Self::open_paged(path, sync, gateway_id, quarantine_max_rows, 4096)
    }

    /// [`Outbox::open`]; a new database gets pages of `page_size` bytes.
    pub fn open_paged(
        path: &Path,
        sync: SyncMode,
        gateway_id: &str,
        quarantine_max_rows: u64,
        page_size: u32,
    ) -> Result<Self, OutboxError> {
        let mut conn = open_connection_paged(path, sync, Some(page_size))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(crate::registry::SCHEMA)?;
        conn.execute_batch(crate::transforms::enrich::SCHEMA)?;
        let version: Option<i64> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        match version {
            Some(v) if v > SCHEMA_VERSION => return Err(OutboxError::NewerSchema { found: v }),
            _ => {}
        }
        // Version 1 had no codec column: every body it wrote is raw.
        add_codec_column(&conn, "outbox_batch")?;
        // Version 6 logged device states uncompressed, without a codec.
        add_codec_column(&conn, "device_state_log")?;
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![SCHEMA_VERSION],
        )?;
        let hwm = load_marks(&conn)?;
        let mut plane = DataPlane::passthrough();
        plane.load_states(&conn)?;
        let page: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
        let checkpointer =
            checkpoint::Checkpointer::start(&mut conn, open_connection(path, sync)?, page)
                .map_err(OutboxError::Checkpointer)?;
        Ok(Self {
            conn,
            gateway_id: gateway_id.to_string(),
            quarantine_max_rows,
            hwm,
            marks_before: Vec::new(),
            plane,
            max_payload_bytes: 4096,
            compression: crate::config::OutboxCompression::Lz4,
            body: BodyWriter::default(),
            reserve: None,
            disk_full: false,
            db_path: path.to_path_buf(),
            checkpointer,
        })
    }

    /// Sets up the data plane (registry policy, device types, alerts).
    pub fn configure(&mut self, config: &crate::config::Config) -> Result<(), OutboxError> {
        let mut plane = DataPlane::new(config);
        plane.load_states(&self.conn)?;
        self.plane = plane;
        self.max_payload_bytes = config.validation.max_payload_bytes;
        self.compression = config.outbox.compression;
        if config.outbox.disk_reserve_bytes > 0 {
            self.reserve = Some(reserve::DiskReserve::new(
                self.db_path.with_file_name("edge-agent.reserve"),
                config.outbox.disk_reserve_bytes,
            ));
            if !self.reserve_fits()? {
                self.disk_full = true;
                tracing::error!(
                    reserve_mib = config.outbox.disk_reserve_bytes >> 20,
                    db = %self.db_path.display(),
                    "the data folder's file system is too full for the disk reserve: input is held back until there is room"
                );
            }
        }
        Ok(())
    }

    fn reserve_fits(&mut self) -> Result<bool, OutboxError> {
        match &mut self.reserve {
            None => Ok(true),
            Some(r) => r.ensure().map_err(|source| OutboxError::Reserve {
                path: r.path().display().to_string(),
                source,
            }),
        }
    }

    fn disk_full_error(&self) -> OutboxError {
        let (dir, reserve_mib) = match &self.reserve {
            Some(r) => (
                r.path()
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                r.bytes() >> 20,
            ),
            None => (String::new(), 0),
        };
        OutboxError::DiskFull { dir, reserve_mib }
    }

    /// The first "disk full": free the reserve so the write-ahead log can
    /// be checkpointed into the database and truncated, then hold input
    /// back until the reserve fits again.
    fn enter_disk_full(&mut self) {
        self.disk_full = true;
        if let Some(r) = &mut self.reserve
            && let Err(e) = r.release()
        {
            tracing::error!(error = %e, path = %r.path().display(), "cannot delete the disk reserve");
        }
        // With the checkpoint thread held back: SQLite does not wait for a
        // checkpoint in progress, it would refuse this one at once.
        let conn = &self.conn;
        match self.checkpointer.exclusive(|| {
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
        }) {
            Ok((busy, log, done)) => tracing::error!(
                busy = busy != 0,
                wal_frames = log,
                checkpointed = done,
                "disk full: released the disk reserve and checkpointed the write-ahead log; holding input back"
            ),
            Err(e) => {
                tracing::error!(error = %e, "disk full: checkpointing the write-ahead log failed; holding input back")
            }
        }
    }

    /// Whether input is held back because the disk is full.
    pub fn disk_full(&self) -> bool {
        self.disk_full
    }

    /// The data plane's counters.
    pub fn plane(&self) -> &DataPlane {
        &self.plane
    }

    #[cfg(test)]
    pub(crate) fn plane_mut(&mut self) -> &mut DataPlane {
        &mut self.plane
    }

    /// The connection (registry apply at start, tests).
    pub fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Batches and bytes waiting for the uplink.
    pub fn backlog(&self) -> Result<(u64, u64), OutboxError> {
        backlog(&self.conn)
    }

    /// Number of devices with a high-water mark.
    pub fn known_devices(&self) -> usize {
        self.hwm.len()
    }

    /// Writes one batch atomically: records to send, dedupe marks, device
    /// state, rejects. A reading the data plane refuses (unknown device,
    /// outside its device's range) is turned into a rejected item in place.
    pub fn write_batch(
        &mut self,
        items: &mut [Item<'_>],
        now_ms: i64,
    ) -> Result<BatchOutcome, OutboxError> {
        if self.disk_full {
            if !self.reserve_fits()? {
                return Err(self.disk_full_error());
            }
            self.disk_full = false;
            tracing::warn!("the data folder has room again: taking input");
        }
        self.marks_before.clear();
        let result = self.write_batch_inner(items, now_ms);
        match &result {
            Ok(_) => {
                self.plane.committed();
                self.checkpointer.committed(&self.conn);
            }
            Err(_) => {
                self.plane.rolled_back();
                // Newest first: a device's first change holds its mark
                // from before the batch.
                for (device, mark) in self.marks_before.drain(..).rev() {
                    match mark {
                        Some(m) => {
                            self.hwm.insert(device, m);
                        }
                        None => {
                            self.hwm.remove(&device);
                        }
                    }
                }
            }
        }
        match result {
            Err(e) if e.is_disk_full() => {
                self.enter_disk_full();
                if self.reserve.is_some() {
                    Err(self.disk_full_error())
                } else {
                    Err(e)
                }
            }
            other => other,
        }
    }

    fn write_batch_inner(
        &mut self,
        items: &mut [Item<'_>],
        now_ms: i64,
    ) -> Result<BatchOutcome, OutboxError> {
        let mut outcome = BatchOutcome::default();
        let mut body = std::mem::take(&mut self.body);
        body.start(self.compression == crate::config::OutboxCompression::Lz4);
        let mut records = 0i64;
        // Readings the data plane refused: turned into rejected items once
        // the loop no longer borrows them.
        let mut late: Vec<(usize, RejectedInput)> = Vec::new();
        let mut alerts: Vec<Alert> = Vec::new();
        let mut value = Vec::with_capacity(512);
        let mut context_written = false;
        let tx = write_transaction(&self.conn)?;
        self.plane.begin(&tx)?;
        {
            let mut quarantine = tx.prepare_cached(
                "INSERT INTO quarantine (received_ms, source, topic, reason, message, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut count = tx.prepare_cached(
                "INSERT INTO reject_count (reason, count) VALUES (?1, 1) ON CONFLICT(reason) DO UPDATE SET count = count + 1",
            )?;
            for (index, item) in items.iter().enumerate() {
                if index % WARM_AHEAD == 0 {
                    // The next readings' map entries, looked up together:
                    // with thousands of devices each lookup misses the CPU
                    // cache, and these misses overlap.
                    for item in items.iter().skip(index).take(WARM_AHEAD) {
                        if let Item::Reading(reading, _) = item {
                            let device = reading.device_id.as_str();
                            std::hint::black_box((
                                self.hwm.contains_key(device),
                                self.plane.warm(device),
                            ));
                        }
                    }
                }
                let input = match item {
                    Item::Rejected(input) => input,
                    Item::Reading(reading, raw) => {
                        let device = reading.device_id.as_str();
                        let mark = self.hwm.get_mut(device);
                        if mark.as_deref().is_some_and(|m| reading.seq <= *m) {
                            outcome.duplicates += 1;
                            continue;
                        }
                        match self.plane.check(&tx, reading)? {
                            Ok(meta) => {
                                match mark {
                                    Some(m) => {
                                        self.marks_before.push((DeviceKey::from(device), Some(*m)));
                                        *m = reading.seq;
                                    }
                                    None => {
                                        self.marks_before.push((DeviceKey::from(device), None));
                                        self.hwm.insert(DeviceKey::from(device), reading.seq);
                                    }
                                }
                                alerts.clear();
                                self.plane.events(reading, meta.as_deref(), &mut alerts);
                                value.clear();
                                let enrichment = Enrichment {
                                    gateway_id: &self.gateway_id,
                                    received_at: now_ms,
                                    registered: meta.is_some(),
                                    fragment: meta
                                        .as_ref()
                                        .map_or(&b""[..], |m| m.enrichment_json.as_bytes()),
                                };
                                if encode_compact(&mut value, reading, &enrichment) {
                                    if !context_written {
                                        encode_tagged(
                                            &mut body,
                                            TAG_CONTEXT,
                                            self.gateway_id.as_bytes(),
                                            &now_ms.to_le_bytes(),
                                        );
                                        context_written = true;
                                    }
                                    put_compact(&mut body, reading.device_id.as_bytes(), &value);
                                } else {
                                    value.clear();
                                    encode_reading(&mut value, reading, &enrichment);
                                    encode_tagged(
                                        &mut body,
                                        TAG_READING,
                                        reading.device_id.as_bytes(),
                                        &value,
                                    );
                                }
                                records += 1;
                                outcome.valid += 1;
                                for alert in &alerts {
                                    alert_json(&mut value, alert, &self.gateway_id, now_ms);
                                    encode_record(
                                        &mut body,
                                        TopicId::Alert,
                                        alert.device_id.as_bytes(),
                                        &value,
                                    );
                                    records += 1;
                                    outcome.alerts += 1;
                                }
                                continue;
                            }
                            Err(rejection) => {
                                late.push((
                                    index,
                                    raw.rejected(reading, rejection, self.max_payload_bytes),
                                ));
                                // Just pushed.
                                match late.last() {
                                    Some((_, input)) => input,
                                    None => continue,
                                }
                            }
                        }
                    }
                };
                let reason = input.rejection.reason.code();
                let (payload, payload_hex) = match std::str::from_utf8(&input.payload) {
                    Ok(s) => (Some(s), None),
                    Err(_) => (None, Some(hex(&input.payload))),
                };
                let value = serde_json::to_vec(&DeadLetterRecord {
                    gateway_id: &self.gateway_id,
                    received_at: now_ms,
                    source: input.source,
                    topic: &input.topic,
                    reason,
                    message: &input.rejection.message,
                    payload,
                    payload_hex,
                    payload_bytes: input.payload.len(),
                })
                .expect("serializing a dead letter to JSON cannot fail");
                encode_record(
                    &mut body,
                    TopicId::DeadLetter,
                    input.topic.as_bytes(),
                    &value,
                );
                records += 1;
                quarantine.execute(params![
                    now_ms,
                    input.source,
                    input.topic,
                    reason,
                    input.rejection.message,
                    input.payload
                ])?;
                count.execute(params![reason])?;
                outcome.rejected += 1;
            }
            if records > 0 {
                let (stored, codec) = body.finish();
                // Cached: under light load a batch commits hundreds of
                // times a second.
                tx.prepare_cached(
                    "INSERT INTO outbox_batch (created_ms, records, bytes, body, codec) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![now_ms, records, stored.len() as i64, stored, codec])?;
                outcome.batch_seq = Some(tx.last_insert_rowid());
                outcome.bytes = stored.len() as u64;
            }
            // The marks need no write here: this batch holds them (see the
            // module documentation).
            self.plane.persist(&tx)?;
            if outcome.rejected > 0 {
                tx.execute(
                    "DELETE FROM quarantine WHERE id <= (SELECT MAX(id) FROM quarantine) - ?1",
                    params![self.quarantine_max_rows as i64],
                )?;
            }
        }
        tx.commit()?;
        self.body = body;
        for (index, input) in late {
            if let Some(item) = items.get_mut(index) {
                *item = Item::Rejected(input);
            }
        }
        Ok(outcome)
    }
}

/// Writes an alert as sent to `iot-alerts` into `out` (cleared first): the
/// alert's fields, then `gateway_id` and `raised_at` (the gateway clock
/// when it was raised, epoch ms): byte for byte what serde gives for the
/// alert flattened into a wrapper with those two fields, without serde's
/// slow path for flattening or its per-field overhead.
fn alert_json(out: &mut Vec<u8>, alert: &Alert, gateway_id: &str, raised_at: i64) {
    use serde_json::ser::{CompactFormatter, Formatter};
    let mut f = CompactFormatter;
    // Geofence events are the most frequent records after readings.
    let float = |out: &mut Vec<u8>, v: f64| {
        if v.is_finite() {
            let _ = CompactFormatter.write_f64(out, v);
        } else {
            out.extend_from_slice(b"null");
        }
    };
    out.clear();
    out.extend_from_slice(b"{\"alert_id\":");
    json_str(out, &alert.alert_id);
    out.extend_from_slice(b",\"kind\":");
    json_str(out, alert.kind);
    out.extend_from_slice(b",\"event\":");
    json_str(out, alert.event);
    out.extend_from_slice(b",\"device_id\":");
    json_str(out, &alert.device_id);
    out.extend_from_slice(b",\"seq\":");
    let _ = f.write_u64(out, alert.seq);
    out.extend_from_slice(b",\"ts\":");
    let _ = f.write_i64(out, alert.ts);
    out.extend_from_slice(b",\"lat\":");
    float(out, alert.lat);
    out.extend_from_slice(b",\"lon\":");
    float(out, alert.lon);
    if let Some(fence_id) = &alert.fence_id {
        out.extend_from_slice(b",\"fence_id\":");
        json_str(out, fence_id);
    }
    if let Some(field) = alert.field {
        out.extend_from_slice(b",\"field\":");
        json_str(out, field);
    }
    if let Some(value) = alert.value {
        out.extend_from_slice(b",\"value\":");
        float(out, value);
    }
    if let Some([low, high]) = alert.threshold {
        out.extend_from_slice(b",\"threshold\":[");
        float(out, low);
        out.push(b',');
        float(out, high);
        out.push(b']');
    }
    if let Some(consecutive) = alert.consecutive {
        out.extend_from_slice(b",\"consecutive\":");
        let _ = f.write_u32(out, consecutive);
    }
    out.extend_from_slice(b",\"gateway_id\":");
    json_str(out, gateway_id);
    out.extend_from_slice(b",\"raised_at\":");
    let _ = f.write_i64(out, raised_at);
    out.push(b'}');
}

/// Appends `s` as a JSON string. Ids are validated to characters that
/// need no escape; anything else goes through serde_json.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// What [`Outbox::drop_oldest`] deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub batches: u64,
    pub records: u64,
    pub bytes: u64,
}

impl Outbox {
    /// Deletes the oldest batches until at most `keep_bytes` remain, and
    /// adds what was dropped to the durable `dropped_records` counter.
    pub fn drop_oldest(&mut self, keep_bytes: u64) -> Result<Dropped, OutboxError> {
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )?;
        let total: i64 = tx.query_row(
            "SELECT COALESCE(SUM(bytes), 0) FROM outbox_batch",
            [],
            |r| r.get(0),
        )?;
        let mut excess = (total as u64).saturating_sub(keep_bytes);
        let mut dropped = Dropped::default();
        let mut upto = None;
        {
            let mut stmt = tx
                .prepare("SELECT batch_seq, records, bytes FROM outbox_batch ORDER BY batch_seq")?;
            let mut rows = stmt.query([])?;
            while excess > 0 {
                let Some(row) = rows.next()? else { break };
                let (seq, records, bytes): (i64, i64, i64) =
                    (row.get(0)?, row.get(1)?, row.get(2)?);
                dropped.batches += 1;
                dropped.records += records as u64;
                dropped.bytes += bytes as u64;
                excess = excess.saturating_sub(bytes as u64);
                upto = Some(seq);
            }
        }
        if let Some(upto) = upto {
            persist_marks_upto(&tx, upto)?;
            tx.execute(
                "DELETE FROM outbox_batch WHERE batch_seq <= ?1",
                params![upto],
            )?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('dropped_records', ?1) \
                 ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                params![dropped.records as i64],
            )?;
        }
        tx.commit()?;
        self.checkpointer.committed(&self.conn);
        Ok(dropped)
    }
}

/// Readings deleted by the drop-oldest policy, since the database exists.
pub fn dropped_records(conn: &Connection) -> Result<u64, OutboxError> {
    Ok(conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'dropped_records'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .unwrap_or(0) as u64)
}

/// Rejections counted per reason, as stored.
pub fn reject_counts(conn: &Connection) -> Result<Vec<(String, u64)>, OutboxError> {
    let mut stmt = conn.prepare("SELECT reason, count FROM reject_count ORDER BY reason")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Batches waiting for the uplink, and their bytes.
pub fn backlog(conn: &Connection) -> Result<(u64, u64), OutboxError> {
    Ok(conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM outbox_batch",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )?)
}

/// Sends the batches after `after` to `send`, in order and whole: at most
/// `max_batches`, stopping after the batch that brings the bytes sent to
/// `max_bytes` or beyond (always at least one batch). `begin` is called
/// once, before the first record, only when a batch waits; `None` means
/// none did.
///
/// Batches are read one at a time and their readings rendered to JSON one
/// at a time as they go out, so the uplink holds one decompressed batch
/// and one rendered record, however large the transaction: rendered JSON
/// is several times its stored size, and a transaction of rendered records
/// held at once (plus the producer's copy of them) was the agent's memory
/// peak whenever a backlog built up.
///
/// On an error, some records may have gone to `send`: the caller must
/// discard them (abort the Kafka transaction).
pub fn send_pending<E>(
    conn: &Connection,
    after: i64,
    max_batches: usize,
    max_bytes: u64,
    mut begin: impl FnMut() -> Result<(), E>,
    mut send: impl FnMut(TopicId, &[u8], &[u8]) -> Result<(), E>,
) -> Result<Option<SentBatches>, SendError<E>> {
    // One read transaction for the whole send: one snapshot, and one
    // WAL read lock instead of one per batch.
    let snapshot = conn.unchecked_transaction().map_err(OutboxError::from)?;
    let mut sent: Option<SentBatches> = None;
    let mut body = Vec::new();
    let mut scratch = Vec::new();
    while sent.is_none_or(|s| s.batches < max_batches as u64 && s.bytes < max_bytes) {
        let from = sent.map_or(after, |s| s.last_batch);
        let Some(batch_seq) = next_batch(conn, from, &mut body)? else {
            break;
        };
        let totals = match &mut sent {
            Some(totals) => totals,
            None => {
                begin().map_err(SendError::Sink)?;
                sent.insert(SentBatches {
                    last_batch: batch_seq,
                    batches: 0,
                    records: 0,
                    bytes: 0,
                })
            }
        };
        render_body(&body, &mut scratch, |topic, key, value| {
            totals.records += 1;
            totals.bytes += (key.len() + value.len()) as u64;
            send(topic, key, value).map_err(Rendered::Sink)
        })
        .map_err(|e| match e {
            Rendered::Corrupt(what) => SendError::Outbox(OutboxError::Corrupt { batch_seq, what }),
            Rendered::Sink(e) => SendError::Sink(e),
        })?;
        totals.batches += 1;
        totals.last_batch = batch_seq;
    }
    snapshot.commit().map_err(OutboxError::from)?;
    Ok(sent)
}

/// Reads the first batch after `after` into `body`, decompressed, and
/// returns its number; `None` when no batch follows.
fn next_batch(
    conn: &Connection,
    after: i64,
    body: &mut Vec<u8>,
) -> Result<Option<i64>, OutboxError> {
    let mut stmt = conn.prepare_cached(
        "SELECT batch_seq, body, codec FROM outbox_batch WHERE batch_seq > ?1 ORDER BY batch_seq LIMIT 1",
    )?;
    let mut rows = stmt.query(params![after])?;
    let Some(row) = rows.next()? else {
        return Ok(None);
    };
    let batch_seq: i64 = row.get(0)?;
    let codec: i64 = row.get(2)?;
    let stored = row.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?;
    let corrupt = |what| OutboxError::Corrupt { batch_seq, what };
    let decoded = match codec {
        CODEC_NONE => {
            body.clear();
            body.extend_from_slice(stored);
            return Ok(Some(batch_seq));
        }
        CODEC_LZ4 => decompress(stored),
        CODEC_LZ4_CHUNKS => decompress_chunks(stored),
        _ => return Err(corrupt("unknown body codec")),
    };
    *body = decoded.map_err(corrupt)?;
    Ok(Some(batch_seq))
}

/// Starts a write transaction that takes the lock up front. A deferred
/// transaction that reads first and then writes fails at once with
/// SQLITE_BUSY in WAL mode when the batch writer holds the lock (the busy
/// timeout never applies to such an upgrade); an immediate one waits.
fn write_transaction(conn: &Connection) -> Result<rusqlite::Transaction<'_>, OutboxError> {
    Ok(rusqlite::Transaction::new_unchecked(
        conn,
        rusqlite::TransactionBehavior::Immediate,
    )?)
}

/// Deletes batches up to and including `upto` (committed to Kafka); returns
/// the bytes freed. With `turn`, the write claims its turn at the write
/// lock there, ahead of the batch writer (see [`WriteTurn`]).
pub fn trim(conn: &Connection, upto: i64, turn: Option<&WriteTurn>) -> Result<u64, OutboxError> {
    // The marks are gathered before taking the write lock, so the batch
    // writer is not held up while they are decoded. Batches up to `upto`
    // cannot change meanwhile: numbers only grow, and a drop-oldest in
    // between saves its own marks (the upsert keeps the higher one).
    let mut marks = HashMap::new();
    marks_of_batches(conn, i64::MIN, upto, &mut marks)?;
    let _claim = turn.map(WriteTurn::claim);
    let tx = write_transaction(conn)?;
    upsert_marks(&tx, marks)?;
    let freed: i64 = tx.query_row(
        "SELECT COALESCE(SUM(bytes), 0) FROM outbox_batch WHERE batch_seq <= ?1",
        params![upto],
        |r| r.get(0),
    )?;
    tx.execute(
        "DELETE FROM outbox_batch WHERE batch_seq <= ?1",
        params![upto],
    )?;
    tx.commit()?;
    Ok(freed as u64)
}

/// Reconciles batch numbers with the marker Kafka holds. When Kafka
/// remembers a higher batch than this database ever numbered (the data
/// folder was lost or replaced), every batch here is unsent under its
/// current number: they are all moved above the marker (keeping their
/// order), and new batches are numbered after them. Without this, batches
/// written since start would be taken for sent and trimmed. Returns how many
/// batches were renumbered, or `None` when nothing was needed.
pub fn ensure_sequence_after(
    conn: &Connection,
    committed: i64,
) -> Result<Option<u64>, OutboxError> {
    let tx = write_transaction(conn)?;
    let current: i64 = tx
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'outbox_batch'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    if current >= committed {
        return Ok(None);
    }
    // Every existing number is <= current < committed, so adding
    // `committed` cannot collide with an existing row.
    let moved = tx.execute(
        "UPDATE outbox_batch SET batch_seq = batch_seq + ?1",
        params![committed],
    )? as u64;
    let next = current + committed;
    let updated = tx.execute(
        "UPDATE sqlite_sequence SET seq = ?1 WHERE name = 'outbox_batch'",
        params![next],
    )?;
    if updated == 0 {
        tx.execute(
            "INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox_batch', ?1)",
            params![next],
        )?;
    }
    tx.commit()?;
    Ok(Some(moved))
}

/// Where encoded records go.
trait BodySink {
    fn put(&mut self, bytes: &[u8]);
}

impl BodySink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// A batch body as it is written: with compression on, records gather in a
/// chunk that is compressed as soon as it holds [`CHUNK_BYTES`], so a
/// batch is never in memory uncompressed.
#[derive(Default)]
struct BodyWriter {
    compress: bool,
    chunk: Vec<u8>,
    /// What is stored: the compressed chunks, or the raw body, in
    /// `out[..len]`. With compression, `out` keeps its length between
    /// batches, so it is zeroed only as it grows.
    out: Vec<u8>,
    len: usize,
}

impl BodyWriter {
    fn start(&mut self, compress: bool) {
        self.compress = compress;
        self.chunk.clear();
        if !compress {
            self.out.clear();
        }
        self.len = 0;
    }

    fn flush_chunk(&mut self) {
        if self.chunk.is_empty() {
            return;
        }
        let bound = lz4_flex::block::get_maximum_output_size(self.chunk.len());
        let at = self.len;
        if self.out.len() < at + 8 + bound {
            self.out.resize(at + 8 + bound, 0);
        }
        let (head, block) = self.out[at..].split_at_mut(8);
        let n = lz4_flex::block::compress_into(&self.chunk, block)
            .expect("lz4 output of the maximum output size always fits");
        head[..4].copy_from_slice(&(self.chunk.len() as u32).to_le_bytes());
        head[4..].copy_from_slice(&(n as u32).to_le_bytes());
        self.len = at + 8 + n;
        self.chunk.clear();
    }

    /// The stored body and its codec.
    fn finish(&mut self) -> (&[u8], i64) {
        if !self.compress {
            return (&self.out, CODEC_NONE);
        }
        self.flush_chunk();
        (&self.out[..self.len], CODEC_LZ4_CHUNKS)
    }
}

impl BodySink for BodyWriter {
    fn put(&mut self, mut bytes: &[u8]) {
        if !self.compress {
            self.out.extend_from_slice(bytes);
            return;
        }
        // The common case: the bytes fit in the chunk and do not fill it.
        if bytes.len() < CHUNK_BYTES - self.chunk.len() {
            self.chunk.extend_from_slice(bytes);
            return;
        }
        while !bytes.is_empty() {
            let room = CHUNK_BYTES - self.chunk.len();
            let (now, rest) = bytes.split_at(bytes.len().min(room));
            self.chunk.extend_from_slice(now);
            bytes = rest;
            if self.chunk.len() == CHUNK_BYTES {
                self.flush_chunk();
            }
        }
    }
}

fn encode_record(out: &mut impl BodySink, topic: TopicId, key: &[u8], value: &[u8]) {
    encode_tagged(out, topic as u8, key, value);
}

fn encode_tagged(out: &mut impl BodySink, tag: u8, key: &[u8], value: &[u8]) {
    let key_len = (key.len() as u32).to_le_bytes();
    let value_len = (value.len() as u32).to_le_bytes();
    // Tag, key and value length in one piece when the key is short (device
    // ids are at most 64 bytes).
    let mut head = [0u8; 1 + 4 + 64 + 4];
    if key.len() <= 64 {
        head[5..5 + key.len()].copy_from_slice(key);
        head[0] = tag;
        head[1..5].copy_from_slice(&key_len);
        head[5 + key.len()..9 + key.len()].copy_from_slice(&value_len);
        out.put(&head[..9 + key.len()]);
    } else {
        out.put(&[tag]);
        out.put(&key_len);
        out.put(key);
        out.put(&value_len);
    }
    out.put(value);
}

/// Frames a compact reading: `tag | key length u8 | key | value length
/// varint | value`, the head in one piece. Keys are at most 255 bytes
/// ([`encode_compact`] refuses longer ones).
fn put_compact(out: &mut impl BodySink, key: &[u8], value: &[u8]) {
    let mut head = [0u8; 2 + 255 + 10];
    head[0] = TAG_COMPACT;
    head[1] = key.len() as u8;
    head[2..2 + key.len()].copy_from_slice(key);
    let mut at = 2 + key.len();
    let mut len = value.len() as u64;
    while len >= 0x80 {
        head[at] = len as u8 | 0x80;
        len >>= 7;
        at += 1;
    }
    head[at] = len as u8;
    out.put(&head[..at + 1]);
    out.put(value);
}

/// The `seq` of an enriched record (the only field needed back).
#[derive(serde::Deserialize)]
struct SeqOnly {
    seq: u64,
}

/// Folds the marks of the readings in batches `after < batch_seq <= upto`
/// into `marks`.
fn marks_of_batches(
    conn: &Connection,
    after: i64,
    upto: i64,
    marks: &mut HashMap<DeviceKey, u64>,
) -> Result<u64, OutboxError> {
    let mut stmt = conn.prepare_cached(
        "SELECT batch_seq, body, codec FROM outbox_batch WHERE batch_seq > ?1 AND batch_seq <= ?2 ORDER BY batch_seq",
    )?;
    let mut rows = stmt.query(params![after, upto])?;
    let mut records = 0u64;
    while let Some(row) = rows.next()? {
        let batch_seq: i64 = row.get(0)?;
        let body: Vec<u8> = row.get(1)?;
        let codec: i64 = row.get(2)?;
        let decoded = match codec {
            CODEC_NONE => Ok(body),
            CODEC_LZ4 => decompress(&body),
            CODEC_LZ4_CHUNKS => decompress_chunks(&body),
            _ => Err("unknown body codec"),
        }
        .and_then(|body| {
            let mut found = Vec::new();
            each_record::<&'static str>(&body, |tag, key, value| {
                let seq = match tag {
                    TAG_COMPACT => compact_seq(value),
                    TAG_READING => reading_seq(value),
                    t if t == TopicId::Data as u8 => {
                        serde_json::from_slice::<SeqOnly>(value).ok().map(|s| s.seq)
                    }
                    _ => return Ok(()),
                };
                match (std::str::from_utf8(key), seq) {
                    (Ok(device), Some(seq)) => found.push((DeviceKey::from(device), seq)),
                    _ => tracing::error!(
                        batch_seq,
                        "outbox record without a device id or seq; skipped for dedupe"
                    ),
                }
                Ok(())
            })?;
            Ok(found)
        });
        // A corrupt batch can never be sent: its readings are lost, and not
        // knowing their marks lets the devices' redeliveries in again.
        let batch = match decoded {
            Ok(b) => b,
            Err(what) => {
                tracing::error!(
                    batch_seq,
                    what,
                    "corrupt outbox batch: its readings cannot be deduplicated against"
                );
                continue;
            }
        };
        for (device, seq) in batch {
            records += 1;
            match marks.get_mut(&device) {
                Some(m) => *m = (*m).max(seq),
                None => {
                    marks.insert(device, seq);
                }
            }
        }
    }
    Ok(records)
}

/// Writes the marks of batches `<= upto` to `device_hwm` (never lowering
/// one), before those batches are deleted in the same transaction.
fn persist_marks_upto(conn: &Connection, upto: i64) -> Result<(), OutboxError> {
    let mut marks = HashMap::new();
    marks_of_batches(conn, i64::MIN, upto, &mut marks)?;
    upsert_marks(conn, marks)
}

fn upsert_marks(conn: &Connection, marks: HashMap<DeviceKey, u64>) -> Result<(), OutboxError> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO device_hwm (device_id, seq) VALUES (?1, ?2) \
         ON CONFLICT(device_id) DO UPDATE SET seq = MAX(seq, excluded.seq)",
    )?;
    let mut marks: Vec<(DeviceKey, u64)> = marks.into_iter().collect();
    marks.sort_unstable();
    for (device, seq) in marks {
        stmt.execute(params![device.as_str(), seq as i64])?;
    }
    Ok(())
}

/// The dedupe marks: `device_hwm` plus the batches still in the outbox.
pub fn load_marks(conn: &Connection) -> Result<HashMap<DeviceKey, u64>, OutboxError> {
    let mut marks = HashMap::new();
    {
        let mut stmt = conn.prepare("SELECT device_id, seq FROM device_hwm")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (device, seq) = row?;
            marks.insert(DeviceKey::from(device), seq as u64);
        }
    }
    let started = std::time::Instant::now();
    let replayed = marks_of_batches(conn, i64::MIN, i64::MAX, &mut marks)?;
    if replayed > 0 {
        tracing::info!(
            readings = replayed,
            ms = started.elapsed().as_millis() as u64,
            "dedupe marks rebuilt from the unsent batches"
        );
    }
    Ok(marks)
}

/// An lz4 block with its decompressed size in front (u32, little endian).
/// Adds `codec INTEGER NOT NULL DEFAULT 0` (0: stored as is) to `table`
/// of a database written before the table had it.
fn add_codec_column(conn: &Connection, table: &str) -> Result<(), rusqlite::Error> {
    let has_codec: bool = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = 'codec'",
        [table],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_codec {
        // `table` is one of this module's own table names, not input.
        conn.execute_batch(&format!(
            "ALTER TABLE {table} ADD COLUMN codec INTEGER NOT NULL DEFAULT 0"
        ))?;
    }
    Ok(())
}

/// Writes `raw` to `out` (cleared first) as [`decompress`] reads it: one
/// lz4 block with the raw size in front (u32, little endian).
pub(crate) fn compress_sized(raw: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
    let size = u32::try_from(raw.len()).map_err(|_| "body over 4 GiB")?;
    out.clear();
    out.resize(4 + lz4_flex::block::get_maximum_output_size(raw.len()), 0);
    out[..4].copy_from_slice(&size.to_le_bytes());
    let n = lz4_flex::block::compress_into(raw, &mut out[4..])
        .map_err(|_| "lz4 output larger than its bound")?;
    out.truncate(4 + n);
    Ok(())
}

pub(crate) fn decompress(stored: &[u8]) -> Result<Vec<u8>, &'static str> {
    let (size, block) = stored
        .split_first_chunk::<4>()
        .ok_or("lz4 body shorter than its size header")?;
    let size = u32::from_le_bytes(*size) as usize;
    if size > MAX_BODY_BYTES {
        return Err("lz4 body claims an impossible size");
    }
    let mut out = vec![0u8; size];
    let n = lz4_flex::block::decompress_into(block, &mut out)
        .map_err(|_| "lz4 body does not decompress")?;
    if n != size {
        return Err("lz4 body shorter than its size header says");
    }
    Ok(out)
}

/// A body stored as lz4 chunks. Each chunk says its size and may not
/// claim more than [`CHUNK_BYTES`]: damaged data cannot ask for more memory
/// than lz4 could expand it to.
fn decompress_chunks(stored: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::new();
    let mut c = Cursor(stored);
    while !c.0.is_empty() {
        let raw = c.u32()? as usize;
        let len = c.u32()? as usize;
        if raw == 0 || raw > CHUNK_BYTES {
            return Err("lz4 chunk claims an impossible size");
        }
        let block = c.take(len)?;
        let at = out.len();
        out.resize(at + raw, 0);
        let n = lz4_flex::block::decompress_into(block, &mut out[at..])
            .map_err(|_| "lz4 chunk does not decompress")?;
        if n != raw {
            return Err("lz4 chunk shorter than its header says");
        }
    }
    Ok(out)
}

/// Calls `f` with each record of a body: its tag, key and value.
fn each_record<'a, E: From<&'static str>>(
    body: &'a [u8],
    mut f: impl FnMut(u8, &'a [u8], &'a [u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut cursor = Cursor(body);
    while !cursor.0.is_empty() {
        let tag = cursor.u8()?;
        let (key, value) = if tag == TAG_COMPACT {
            let key_len = cursor.u8()? as usize;
            let key = cursor.take(key_len)?;
            let value_len = usize::try_from(cursor.varint()?).map_err(|_| "truncated record")?;
            (key, cursor.take(value_len)?)
        } else {
            let key_len = cursor.u32()? as usize;
            let key = cursor.take(key_len)?;
            let value_len = cursor.u32()? as usize;
            (key, cursor.take(value_len)?)
        };
        f(tag, key, value)?;
    }
    Ok(())
}

/// Why a body could not be rendered: it is corrupt, or the sink refused
/// a record.
enum Rendered<E> {
    Corrupt(&'static str),
    Sink(E),
}

impl<E> From<&'static str> for Rendered<E> {
    fn from(what: &'static str) -> Self {
        Self::Corrupt(what)
    }
}

/// Calls `f` with each record of a decompressed body as Kafka gets it: its
/// topic, key and value. Stored readings are rendered to JSON in `scratch`,
/// one at a time.
fn render_body<E>(
    body: &[u8],
    scratch: &mut Vec<u8>,
    mut f: impl FnMut(TopicId, &[u8], &[u8]) -> Result<(), Rendered<E>>,
) -> Result<(), Rendered<E>> {
    let mut context: Option<Context<'_>> = None;
    each_record(body, |tag, key, value| match tag {
        TAG_CONTEXT => {
            context = Some(Context::read(key, value)?);
            Ok(())
        }
        TAG_COMPACT => {
            let context = context.ok_or("a compact reading before its context")?;
            scratch.clear();
            render_compact(key, value, &context, scratch)?;
            f(TopicId::Data, key, scratch)
        }
        TAG_READING => {
            scratch.clear();
            render_reading(key, value, scratch)?;
            f(TopicId::Data, key, scratch)
        }
        _ => {
            let topic = TopicId::from_u8(tag).ok_or("unknown topic id")?;
            f(topic, key, value)
        }
    })
}

/// Every record of a decompressed body, rendered.
#[cfg(test)]
fn decode_body(body: &[u8]) -> Result<Vec<OutRecord>, &'static str> {
    let mut out = Vec::new();
    render_body::<()>(body, &mut Vec::new(), |topic, key, value| {
        out.push(OutRecord {
            topic,
            key: key.to_vec(),
            value: value.to_vec(),
        });
        Ok(())
    })
    .map_err(|e| match e {
        Rendered::Corrupt(what) => what,
        Rendered::Sink(()) => unreachable!("the sink above never fails"),
    })?;
    Ok(out)
}

/// Reads a body's little-endian fields in order.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated record");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, &'static str> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    /// Nothing may follow a stored reading's last field.
    fn end(&self) -> Result<(), &'static str> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err("trailing bytes after a stored reading")
        }
    }

    /// Bytes with their varint length in front when `present`, else none.
    fn optional(&mut self, present: bool) -> Result<&'a [u8], &'static str> {
        if !present {
            return Ok(b"");
        }
        let len = usize::try_from(self.varint()?).map_err(|_| "truncated record")?;
        self.take(len)
    }

    /// An unsigned LEB128 number of at most ten bytes that fits a u64.
    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err("a varint that does not fit 64 bits");
            }
            value |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a varint longer than ten bytes")
    }
}

/// Appends `value` as unsigned LEB128: seven bits a byte, low first.
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

const READING_HAS_EPOCH: u8 = 1;
const READING_REGISTERED: u8 = 2;

/// Appends an accepted reading in binary, integers little endian:
/// `seq u64 | device_seq u64 | flags u8 (1: epoch, 2: registered) |
/// [epoch u64] | ts i64 | six f64 (temperature, humidity, battery, lat, lon,
/// speed) | received_at i64 | gateway id (u8 length) | attributes as a JSON
/// object (u32 length, 0 for none) | enrichment fragment (u32 length)`.
/// The device id is the record's key.
fn encode_reading(out: &mut Vec<u8>, r: &Reading, e: &Enrichment<'_>) {
    out.extend_from_slice(&r.seq.to_le_bytes());
    out.extend_from_slice(&r.device_seq.to_le_bytes());
    let mut flags = 0;
    if r.epoch.is_some() {
        flags |= READING_HAS_EPOCH;
    }
    if e.registered {
        flags |= READING_REGISTERED;
    }
    out.push(flags);
    if let Some(epoch) = r.epoch {
        out.extend_from_slice(&epoch.to_le_bytes());
    }
    out.extend_from_slice(&r.ts.to_le_bytes());
    put_values(
        out,
        [r.temperature, r.humidity, r.battery, r.lat, r.lon, r.speed],
    );
    out.extend_from_slice(&e.received_at.to_le_bytes());
    // Gateway ids are validated to at most 64 characters.
    let gateway = &e.gateway_id.as_bytes()[..e.gateway_id.len().min(255)];
    out.push(gateway.len() as u8);
    out.extend_from_slice(gateway);
    let at = out.len();
    out.extend_from_slice(&0u32.to_le_bytes());
    if !r.attributes.is_empty() {
        // A map of JSON values always serializes.
        let _ = serde_json::to_writer(&mut *out, &r.attributes);
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(&(e.fragment.len() as u32).to_le_bytes());
    out.extend_from_slice(e.fragment);
}

/// What the compact readings of a batch share ([`TAG_CONTEXT`]).
#[derive(Clone, Copy)]
struct Context<'a> {
    gateway_id: &'a str,
    received_at: i64,
}

impl<'a> Context<'a> {
    fn read(key: &'a [u8], value: &[u8]) -> Result<Self, &'static str> {
        let gateway_id = std::str::from_utf8(key).map_err(|_| "gateway id is not UTF-8")?;
        let received_at = i64::from_le_bytes(
            value
                .try_into()
                .map_err(|_| "a batch context of the wrong size")?,
        );
        Ok(Self {
            gateway_id,
            received_at,
        })
    }
}

const COMPACT_EPOCH: u8 = 1;
const COMPACT_REGISTERED: u8 = 2;
const COMPACT_ATTRIBUTES: u8 = 4;
const COMPACT_FRAGMENT: u8 = 8;
const COMPACT_DECIMAL: u8 = 16;

/// Appends an accepted reading in the compact form, or returns `false`
/// (and appends nothing) when it cannot hold it: `seq` not derived from
/// `device_seq` and `epoch`, or a device id longer than 255 bytes.
///
/// `flags u8 (1: epoch, 2: registered, 4: attributes, 8: fragment,
/// 16: decimals) | device_seq varint | [epoch varint] | ts - received_at
/// (zigzag varint) | six values (temperature, humidity, battery, lat, lon,
/// speed): [`put_values`], or with flag 16 [`put_decimal_values`] |
/// [attributes: varint length, JSON object] | [enrichment fragment: varint
/// length, bytes]`. The key is the device id; the gateway id and
/// `received_at` are in the batch's [`TAG_CONTEXT`] record.
fn encode_compact(out: &mut Vec<u8>, r: &Reading, e: &Enrichment<'_>) -> bool {
    let folded = match r.epoch {
        Some(epoch) => epoch
            .checked_shl(32)
            .filter(|_| epoch <= u64::from(u32::MAX) && r.device_seq <= u64::from(u32::MAX))
            .map(|high| high | r.device_seq),
        None => Some(r.device_seq),
    };
    if folded != Some(r.seq) || r.device_id.len() > 255 {
        return false;
    }
    let mut flags = 0;
    if r.epoch.is_some() {
        flags |= COMPACT_EPOCH;
    }
    if e.registered {
        flags |= COMPACT_REGISTERED;
    }
    if !r.attributes.is_empty() {
        flags |= COMPACT_ATTRIBUTES;
    }
    if !e.fragment.is_empty() {
        flags |= COMPACT_FRAGMENT;
    }
    let values = [r.temperature, r.humidity, r.battery, r.lat, r.lon, r.speed];
    let decimals = DecimalValues::of(values, &r.decimals);
    if decimals.mask != 0 {
        flags |= COMPACT_DECIMAL;
    }
    out.push(flags);
    put_varint(out, r.device_seq);
    if let Some(epoch) = r.epoch {
        put_varint(out, epoch);
    }
    put_varint(out, zigzag(r.ts.wrapping_sub(e.received_at)));
    if decimals.mask != 0 {
        put_decimal_values(out, values, &decimals);
    } else {
        put_values(out, values);
    }
    if !r.attributes.is_empty() {
        let mut json = Vec::with_capacity(64);
        // A map of JSON values always serializes.
        let _ = serde_json::to_writer(&mut json, &r.attributes);
        put_varint(out, json.len() as u64);
        out.extend_from_slice(&json);
    }
    if !e.fragment.is_empty() {
        put_varint(out, e.fragment.len() as u64);
        out.extend_from_slice(e.fragment);
    }
    true
}

/// Appends the six values of a reading, each its f64 bits (LE): the same
/// layout in both stored forms.
fn put_values(out: &mut Vec<u8>, values: [f64; 6]) {
    let mut bytes = [0u8; 48];
    for (slot, v) in bytes.chunks_exact_mut(8).zip(values) {
        slot.copy_from_slice(&v.to_bits().to_le_bytes());
    }
    out.extend_from_slice(&bytes);
}

/// Exact powers of ten as f64, for the decimals a value can have
/// ([`crate::transforms::validate::Decimals`]: at most 18).
const POWERS_OF_TEN: [f64; 19] = {
    let mut powers = [1.0; 19];
    let mut i = 1;
    while i < powers.len() {
        powers[i] = powers[i - 1] * 10.0;
        i += 1;
    }
    powers
};

/// Mantissas below this are stored as decimals: the code then takes at
/// most seven bytes as a varint, fewer than an f64's eight.
const DECIMAL_MANTISSA_LIMIT: u64 = 1 << 43;

/// Which of a reading's six values can be stored as decimals, and their
/// codes.
struct DecimalValues {
    /// Bit `i` set: value `i` is `codes[i]`.
    mask: u8,
    codes: [u64; 6],
}

impl DecimalValues {
    fn of(values: [f64; 6], decimals: &Decimals) -> Self {
        let mut out = Self {
            mask: 0,
            codes: [0; 6],
        };
        for (i, (v, d)) in values.into_iter().zip(decimals.0).enumerate() {
            if let Some(code) = decimal_code(v, d) {
                out.mask |= 1 << i;
                out.codes[i] = code;
            }
        }
        out
    }
}

/// `v` as the code `m << 6 | decimals << 1 | sign`, when `v` is exactly the
/// f64 nearest to `±m / 10^decimals` with `m` below
/// [`DECIMAL_MANTISSA_LIMIT`]; `None` otherwise, and for a hint of
/// [`Decimals::UNKNOWN`].
///
/// For a value parsed from text with that many decimals, `m` is the text's
/// digits: below 2^43 the product `|v| * 10^decimals` is within 0.01 of
/// them. Both `m` and `10^decimals` are exact f64s, so their IEEE quotient
/// is the nearest f64 to `m / 10^decimals`, as the parser's value was; the
/// comparison checks it, so a wrong hint only means eight bytes stored.
fn decimal_code(v: f64, decimals: u8) -> Option<u64> {
    let scale = *POWERS_OF_TEN.get(usize::from(decimals))?;
    let scaled = v.abs() * scale;
    if scaled.is_nan() || scaled >= DECIMAL_MANTISSA_LIMIT as f64 {
        return None;
    }
    // Below 2^43 adding a half is exact: rounds to the nearest integer,
    // which may be 2^43 itself (`87.96093022208`: 11 decimals).
    let m = (scaled + 0.5) as u64;
    if m >= DECIMAL_MANTISSA_LIMIT || m as f64 / scale != v.abs() {
        return None;
    }
    Some(m << 6 | u64::from(decimals) << 1 | u64::from(v.is_sign_negative()))
}

/// The value of a code from [`decimal_code`].
fn decimal_value(code: u64) -> Result<f64, &'static str> {
    let m = code >> 6;
    let scale = POWERS_OF_TEN
        .get((code >> 1 & 0x1f) as usize)
        .ok_or("a stored decimal with too many decimals")?;
    if m >= DECIMAL_MANTISSA_LIMIT {
        return Err("a stored decimal out of range");
    }
    let v = m as f64 / scale;
    Ok(if code & 1 != 0 { -v } else { v })
}

/// Appends the six values of a compact reading with [`COMPACT_DECIMAL`]:
/// `mask u8 | per value, the varint of its decimal code if its bit is set
/// in the mask, else its f64 bits (LE)`.
fn put_decimal_values(out: &mut Vec<u8>, values: [f64; 6], decimals: &DecimalValues) {
    out.push(decimals.mask);
    for (i, v) in values.into_iter().enumerate() {
        if decimals.mask & 1 << i != 0 {
            put_varint(out, decimals.codes[i]);
        } else {
            out.extend_from_slice(&v.to_bits().to_le_bytes());
        }
    }
}

/// Reads the values of a compact reading with the given flags.
fn read_compact_values(c: &mut Cursor<'_>, flags: u8) -> Result<[f64; 6], &'static str> {
    if flags & COMPACT_DECIMAL == 0 {
        return read_values(c);
    }
    let mask = c.u8()?;
    if mask == 0 || mask >= 1 << 6 {
        return Err("a stored reading with a wrong decimal mask");
    }
    let mut values = [0f64; 6];
    for (i, v) in values.iter_mut().enumerate() {
        *v = if mask & 1 << i != 0 {
            decimal_value(c.varint()?)?
        } else {
            f64::from_bits(c.u64()?)
        };
        if !v.is_finite() {
            return Err("a stored value is not a finite number");
        }
    }
    Ok(values)
}

/// Reads the values written by [`put_values`]: always finite.
fn read_values(c: &mut Cursor<'_>) -> Result<[f64; 6], &'static str> {
    let mut values = [0f64; 6];
    for v in &mut values {
        *v = f64::from_bits(c.u64()?);
        if !v.is_finite() {
            return Err("a stored value is not a finite number");
        }
    }
    Ok(values)
}

/// A compact reading's fields up to its values.
struct CompactHead {
    flags: u8,
    device_seq: u64,
    epoch: Option<u64>,
}

impl CompactHead {
    fn read(c: &mut Cursor<'_>) -> Result<Self, &'static str> {
        let flags = c.u8()?;
        if flags
            & !(COMPACT_EPOCH
                | COMPACT_REGISTERED
                | COMPACT_ATTRIBUTES
                | COMPACT_FRAGMENT
                | COMPACT_DECIMAL)
            != 0
        {
            return Err("a stored reading with unknown flags");
        }
        let device_seq = c.varint()?;
        let epoch = if flags & COMPACT_EPOCH != 0 {
            Some(c.varint()?)
        } else {
            None
        };
        Ok(Self {
            flags,
            device_seq,
            epoch,
        })
    }

    /// The dedupe key, as the validator folds it.
    fn seq(&self) -> Result<u64, &'static str> {
        match self.epoch {
            None => Ok(self.device_seq),
            Some(epoch)
                if epoch <= u64::from(u32::MAX) && self.device_seq <= u64::from(u32::MAX) =>
            {
                Ok(epoch << 32 | self.device_seq)
            }
            Some(_) => Err("a stored epoch or seq out of range"),
        }
    }
}

/// The dedupe key of a compact reading.
fn compact_seq(value: &[u8]) -> Option<u64> {
    CompactHead::read(&mut Cursor(value)).ok()?.seq().ok()
}

/// Appends the JSON record of a reading stored by [`encode_compact`]:
/// byte for byte what [`render_reading`] gives for the same reading.
fn render_compact(
    key: &[u8],
    value: &[u8],
    context: &Context<'_>,
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    let device_id = std::str::from_utf8(key).map_err(|_| "device id is not UTF-8")?;
    let mut c = Cursor(value);
    let head = CompactHead::read(&mut c)?;
    let seq = head.seq()?;
    let ts = context.received_at.wrapping_add(unzigzag(c.varint()?));
    let values = read_compact_values(&mut c, head.flags)?;
    let attributes = c.optional(head.flags & COMPACT_ATTRIBUTES != 0)?;
    let fragment = c.optional(head.flags & COMPACT_FRAGMENT != 0)?;
    c.end()?;
    write_record_json(
        out,
        &RecordFields {
            device_id,
            seq,
            device_seq: head.device_seq,
            epoch: head.epoch,
            ts,
            values,
            attributes,
        },
        &Enrichment {
            gateway_id: context.gateway_id,
            received_at: context.received_at,
            registered: head.flags & COMPACT_REGISTERED != 0,
            fragment,
        },
    );
    Ok(())
}

/// The dedupe key of a reading stored in binary: its first field.
fn reading_seq(value: &[u8]) -> Option<u64> {
    Cursor(value).u64().ok()
}

/// Appends the JSON record of a reading stored by [`encode_reading`].
fn render_reading(key: &[u8], value: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
    let device_id = std::str::from_utf8(key).map_err(|_| "device id is not UTF-8")?;
    let mut c = Cursor(value);
    let seq = c.u64()?;
    let device_seq = c.u64()?;
    let flags = c.u8()?;
    let epoch = if flags & READING_HAS_EPOCH != 0 {
        Some(c.u64()?)
    } else {
        None
    };
    let ts = c.i64()?;
    let values = read_values(&mut c)?;
    let received_at = c.i64()?;
    let gateway_len = c.u8()? as usize;
    let gateway_id =
        std::str::from_utf8(c.take(gateway_len)?).map_err(|_| "gateway id is not UTF-8")?;
    let attributes_len = c.u32()? as usize;
    let attributes = c.take(attributes_len)?;
    let fragment_len = c.u32()? as usize;
    let fragment = c.take(fragment_len)?;
    c.end()?;
    write_record_json(
        out,
        &RecordFields {
            device_id,
            seq,
            device_seq,
            epoch,
            ts,
            values,
            attributes,
        },
        &Enrichment {
            gateway_id,
            received_at,
            registered: flags & READING_REGISTERED != 0,
            fragment,
        },
    );
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

mod checkpoint;
mod reserve;
#[cfg(test)]
mod tests;
