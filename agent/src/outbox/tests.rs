use super::*;
use crate::config::ValidationConfig;
use crate::transforms::validate::{RejectReason, decode_reading};

const NOW: i64 = 1_790_000_000_000;

/// A batch as the uplink gets it through [`send_pending`], one call per
/// batch; `bytes` is its stored size.
#[derive(Debug, Clone)]
struct Loaded {
    batch_seq: i64,
    bytes: u64,
    records: Vec<OutRecord>,
}

/// Up to `max_batches` batches after `after`, each read back whole.
fn load_batches(
    conn: &Connection,
    mut after: i64,
    max_batches: usize,
) -> Result<Vec<Loaded>, OutboxError> {
    let mut out = Vec::new();
    while out.len() < max_batches {
        let (Some(sent), records, _) = try_send_all(conn, after, 1, u64::MAX)? else {
            break;
        };
        assert_eq!(sent.batches, 1);
        assert_eq!(sent.records, records.len() as u64);
        let bytes: i64 = conn.query_row(
            "SELECT bytes FROM outbox_batch WHERE batch_seq = ?1",
            params![sent.last_batch],
            |r| r.get(0),
        )?;
        out.push(Loaded {
            batch_seq: sent.last_batch,
            bytes: bytes as u64,
            records,
        });
        after = sent.last_batch;
    }
    Ok(out)
}

/// `send_pending` with a sink that keeps the records and counts `begin`.
fn try_send_all(
    conn: &Connection,
    after: i64,
    max_batches: usize,
    max_bytes: u64,
) -> Result<(Option<SentBatches>, Vec<OutRecord>, u32), OutboxError> {
    let mut begun = 0;
    let mut records = Vec::new();
    let sent = send_pending::<()>(
        conn,
        after,
        max_batches,
        max_bytes,
        || {
            begun += 1;
            Ok(())
        },
        |topic, key, value| {
            records.push(OutRecord {
                topic,
                key: key.to_vec(),
                value: value.to_vec(),
            });
            Ok(())
        },
    );
    match sent {
        Ok(sent) => Ok((sent, records, begun)),
        Err(SendError::Outbox(e)) => Err(e),
        Err(SendError::Sink(())) => unreachable!("the sink above never fails"),
    }
}

fn send_all(
    conn: &Connection,
    after: i64,
    max_batches: usize,
    max_bytes: u64,
) -> (Option<SentBatches>, Vec<OutRecord>, u32) {
    try_send_all(conn, after, max_batches, max_bytes).unwrap()
}

fn reading(device: &str, seq: u64) -> Item<'static> {
    let json = serde_json::json!({
        "device_id": device, "seq": seq, "ts": NOW,
        "temperature": 20.0, "humidity": 50.0, "battery": 90.0,
        "lat": 1.0, "lon": 2.0, "speed": 0.0
    });
    Item::Reading(
        decode_reading(
            json.to_string().as_bytes(),
            None,
            NOW,
            &ValidationConfig::default(),
        )
        .unwrap(),
        Raw::None,
    )
}

fn rejected(payload: &[u8]) -> Item<'static> {
    Item::Rejected(RejectedInput {
        source: "mqtt",
        topic: "devices/x/telemetry".into(),
        payload: payload.to_vec(),
        rejection: Rejection::new(RejectReason::MalformedJson, "not valid JSON"),
    })
}

fn open(dir: &tempfile::TempDir) -> Outbox {
    Outbox::open(&dir.path().join("o.db"), SyncMode::Full, "gw-1", 3).unwrap()
}

#[test]
fn batch_is_written_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    let out = outbox
        .write_batch(
            &mut [reading("a", 1), reading("b", 1), rejected(b"{oops")],
            NOW,
        )
        .unwrap();
    assert_eq!((out.valid, out.rejected, out.duplicates), (2, 1, 0));
    assert_eq!(out.batch_seq, Some(1));
    let batches = load_batches(&outbox.conn, 0, 10).unwrap();
    assert_eq!(batches.len(), 1);
    let records = &batches[0].records;
    assert_eq!(records.len(), 3);
    assert_eq!(records[0].topic, TopicId::Data);
    assert_eq!(records[0].key, b"a");
    let v: serde_json::Value = serde_json::from_slice(&records[0].value).unwrap();
    assert_eq!(v["gateway_id"], "gw-1");
    assert_eq!(v["seq"], 1);
    assert_eq!(records[2].topic, TopicId::DeadLetter);
    let dlq: serde_json::Value = serde_json::from_slice(&records[2].value).unwrap();
    assert_eq!(dlq["reason"], "malformed_json");
    assert_eq!(dlq["payload"], "{oops");
    assert_eq!(
        reject_counts(&outbox.conn).unwrap(),
        vec![("malformed_json".to_string(), 1)]
    );
}

#[test]
fn a_new_database_gets_the_page_size_and_an_existing_one_keeps_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let pragma = |outbox: &mut Outbox, name: &str| -> i64 {
        outbox
            .connection()
            .pragma_query_value(None, name, |r| r.get(0))
            .unwrap()
    };
    {
        let mut outbox = Outbox::open_paged(&path, SyncMode::Full, "gw-1", 3, 16384).unwrap();
        assert_eq!(pragma(&mut outbox, "page_size"), 16384);
        // The writer's checkpoints are the thread's, every 2 MiB whatever
        // the page size; other connections checkpoint past 16 MiB.
        assert_eq!(pragma(&mut outbox, "wal_autocheckpoint"), 0);
        assert_eq!(outbox.checkpointer.step(), 128);
        let other = open_connection(&path, SyncMode::Full).unwrap();
        let pages: i64 = other
            .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
            .unwrap();
        assert_eq!(pages, 1024);
        // Bodies larger than a page still go and come back whole.
        let mut items: Vec<_> = (0..10_000).map(|i| reading(&format!("d{i}"), 1)).collect();
        let out = outbox.write_batch(&mut items, NOW).unwrap();
        assert_eq!(out.valid, 10_000);
        assert!(out.bytes > 3 * 16384, "{} bytes", out.bytes);
    }
    let mut outbox = Outbox::open(&path, SyncMode::Full, "gw-1", 3).unwrap();
    assert_eq!(pragma(&mut outbox, "page_size"), 16384);
    assert_eq!(outbox.checkpointer.step(), 128);
    let batches = load_batches(&outbox.conn, 0, 10).unwrap();
    assert_eq!(batches[0].records.len(), 10_000);
    assert_eq!(batches[0].records[9999].key, b"d9999");
    // The default for a new one: 4096.
    let mut other = Outbox::open(&dir.path().join("p.db"), SyncMode::Full, "gw-1", 3).unwrap();
    assert_eq!(pragma(&mut other, "page_size"), 4096);
    assert_eq!(other.checkpointer.step(), 512);
}

/// The disk-full path's truncating checkpoint runs with the thread held
/// back: never refused because the thread is checkpointing (SQLite does
/// not wait for it), whenever it comes.
#[test]
fn a_truncating_checkpoint_waits_for_the_thread() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = Outbox::open(&dir.path().join("o.db"), SyncMode::Normal, "gw-1", 3).unwrap();
    outbox.compression = crate::config::OutboxCompression::None;
    let mut seq = 0;
    for _ in 0..10 {
        // A step of log, so that the thread is asked to checkpoint, and
        // at once the writer's own.
        let before = outbox.checkpointer.completed();
        loop {
            seq += 1;
            let mut items: Vec<_> = (0..5000).map(|i| reading(&format!("d{i}"), seq)).collect();
            outbox.write_batch(&mut items, NOW).unwrap();
            if outbox.checkpointer.pages() >= outbox.checkpointer.step() {
                break;
            }
        }
        let conn = &outbox.conn;
        let (busy, log, copied) = outbox.checkpointer.exclusive(|| {
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .unwrap()
        });
        assert_eq!((busy, log, copied), (0, 0, 0), "after {before} checkpoints");
        assert_eq!(
            std::fs::metadata(dir.path().join("o.db-wal"))
                .unwrap()
                .len(),
            0
        );
    }
}

/// The write-ahead log is checkpointed by the thread while batches go on,
/// and never grows past its bound (plus the batch that crossed it), though
/// the writer commits all the time; nothing written is lost.
#[test]
fn the_log_is_checkpointed_aside_and_stays_within_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let mut outbox = Outbox::open(&path, SyncMode::Normal, "gw-1", 3).unwrap();
    // Uncompressed, so that the log fills fast.
    outbox.compression = crate::config::OutboxCompression::None;
    let wal = dir.path().join("o.db-wal");
    let bound_pages = u64::from(outbox.checkpointer.step() * checkpoint::BOUND_STEPS);
    let (mut written, mut largest_batch, mut most_pages) = (0u64, 0u64, 0u64);
    let mut seq = 0;
    let mut write = |outbox: &mut Outbox| {
        seq += 1;
        let mut items: Vec<_> = (0..5000).map(|i| reading(&format!("d{i}"), seq)).collect();
        let out = outbox.write_batch(&mut items, NOW).unwrap();
        assert_eq!(out.valid, 5000);
        written += out.valid;
        largest_batch = largest_batch.max(out.bytes);
        most_pages = most_pages.max(u64::from(outbox.checkpointer.pages()));
    };
    // About 25 MB through a log bounded by 8 MiB, with the thread held
    // back: the writer keeps the bound itself.
    outbox.checkpointer.hold(true);
    for _ in 0..100 {
        write(&mut outbox);
    }
    assert_eq!(outbox.checkpointer.completed(), 0);
    // Then the thread's turns: write on until it had two (it may be slow to
    // run on a loaded machine), with a deadline.
    outbox.checkpointer.hold(false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while outbox.checkpointer.completed() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint on the thread"
        );
        write(&mut outbox);
    }
    // A batch is its body plus a few pages of tables and indexes.
    let batch_pages = largest_batch / 4096 + 16;
    assert!(
        most_pages <= bound_pages + batch_pages,
        "{most_pages} pages in the log, bound {bound_pages}, a batch about {batch_pages}"
    );
    let wal_bytes = std::fs::metadata(&wal).unwrap().len();
    assert!(
        wal_bytes <= (bound_pages + batch_pages) * (4096 + 24) + 32,
        "log file of {wal_bytes} bytes"
    );
    // Everything is there, in order.
    let mut after = 0;
    let mut records = 0;
    loop {
        let batches = load_batches(&outbox.conn, after, 16).unwrap();
        let Some(last) = batches.last() else { break };
        after = last.batch_seq;
        records += batches.iter().map(|b| b.records.len() as u64).sum::<u64>();
    }
    assert_eq!(records, written);
    assert_eq!(after as u64, seq);
}

#[test]
fn duplicates_are_dropped_within_and_across_batches_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut outbox = open(&dir);
        let out = outbox
            .write_batch(
                &mut [reading("a", 1), reading("a", 2), reading("a", 2)],
                NOW,
            )
            .unwrap();
        assert_eq!((out.valid, out.duplicates), (2, 1));
    }
    let mut outbox = open(&dir);
    assert_eq!(outbox.known_devices(), 1);
    let out = outbox
        .write_batch(
            &mut [reading("a", 2), reading("a", 1), reading("a", 3)],
            NOW,
        )
        .unwrap();
    assert_eq!((out.valid, out.duplicates), (1, 2));
    // A batch of only duplicates writes no outbox batch.
    let out = outbox.write_batch(&mut [reading("a", 3)], NOW).unwrap();
    assert_eq!(out.batch_seq, None);
}

#[test]
fn dedupe_marks_hold_for_short_and_long_device_ids() {
    // Ids up to 24 bytes are kept inline in the marks, longer ones on the
    // heap: both sides of the limit, and the longest id allowed (64 bytes).
    let ids = [
        "a".to_string(),
        "i".repeat(24),
        "h".repeat(25),
        "long".repeat(16),
    ];
    let dir = tempfile::tempdir().unwrap();
    {
        let mut outbox = open(&dir);
        let mut items: Vec<_> = ids.iter().map(|id| reading(id, 5)).collect();
        let out = outbox.write_batch(&mut items, NOW).unwrap();
        assert_eq!((out.valid, out.duplicates), (4, 0));
        let mut items: Vec<_> = ids.iter().map(|id| reading(id, 5)).collect();
        let out = outbox.write_batch(&mut items, NOW).unwrap();
        assert_eq!((out.valid, out.duplicates), (0, 4));
    }
    // After a restart the marks come from the stored batches.
    let mut outbox = open(&dir);
    assert_eq!(outbox.known_devices(), 4);
    let mut items: Vec<_> = ids
        .iter()
        .flat_map(|id| [reading(id, 5), reading(id, 6)])
        .collect();
    let out = outbox.write_batch(&mut items, NOW).unwrap();
    assert_eq!((out.valid, out.duplicates), (4, 4));
    let marks = load_marks(&outbox.conn).unwrap();
    for id in &ids {
        assert_eq!(marks.get(id.as_str()), Some(&6), "{id}");
    }
}

#[test]
fn a_failed_batch_leaves_the_dedupe_marks_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    let out = outbox.write_batch(&mut [reading("a", 1)], NOW).unwrap();
    assert_eq!(out.valid, 1);
    // The batch fails when it is stored, after its readings advanced the
    // marks (a's twice, and b's new one).
    outbox
        .connection()
        .execute_batch(
            "CREATE TEMP TRIGGER fail BEFORE INSERT ON outbox_batch BEGIN SELECT RAISE(ABORT, 'injected'); END;",
        )
        .unwrap();
    let err = outbox
        .write_batch(
            &mut [reading("a", 2), reading("a", 3), reading("b", 1)],
            NOW,
        )
        .unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    assert_eq!(outbox.known_devices(), 1);
    outbox
        .connection()
        .execute_batch("DROP TRIGGER fail;")
        .unwrap();
    // The retry takes them all; a's mark is 1 again, not gone.
    let out = outbox
        .write_batch(
            &mut [
                reading("a", 1),
                reading("a", 2),
                reading("a", 3),
                reading("b", 1),
            ],
            NOW,
        )
        .unwrap();
    assert_eq!((out.valid, out.duplicates), (3, 1));
}

#[test]
fn quarantine_is_bounded_but_counts_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    for i in 0..5 {
        outbox
            .write_batch(&mut [rejected(format!("bad{i}").as_bytes())], NOW)
            .unwrap();
    }
    let rows: i64 = outbox
        .conn
        .query_row("SELECT COUNT(*) FROM quarantine", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 3);
    assert_eq!(
        reject_counts(&outbox.conn).unwrap(),
        vec![("malformed_json".to_string(), 5)]
    );
}

#[test]
fn non_utf8_payload_goes_out_as_hex() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    outbox
        .write_batch(&mut [rejected(&[0xff, 0x00, 0x10])], NOW)
        .unwrap();
    let batches = load_batches(&outbox.conn, 0, 10).unwrap();
    let dlq: serde_json::Value = serde_json::from_slice(&batches[0].records[0].value).unwrap();
    assert_eq!(dlq["payload_hex"], "ff0010");
    assert!(dlq.get("payload").is_none());
}

#[test]
fn trim_and_sequence_never_reuse_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    outbox.write_batch(&mut [reading("a", 1)], NOW).unwrap();
    outbox.write_batch(&mut [reading("a", 2)], NOW).unwrap();
    let freed = trim(&outbox.conn, 2, None).unwrap();
    assert!(freed > 0);
    assert_eq!(backlog(&outbox.conn).unwrap(), (0, 0));
    let out = outbox.write_batch(&mut [reading("a", 3)], NOW).unwrap();
    assert_eq!(
        out.batch_seq,
        Some(3),
        "an emptied outbox must not restart at 1"
    );
    // Kafka remembers more than this database: batch 3 (unsent) moves
    // above the marker, new batches follow it.
    assert_eq!(ensure_sequence_after(&outbox.conn, 100).unwrap(), Some(1));
    assert_eq!(ensure_sequence_after(&outbox.conn, 50).unwrap(), None);
    let out = outbox.write_batch(&mut [reading("a", 4)], NOW).unwrap();
    assert_eq!(out.batch_seq, Some(104));
    let seqs: Vec<i64> = load_batches(&outbox.conn, 100, 10)
        .unwrap()
        .iter()
        .map(|b| b.batch_seq)
        .collect();
    assert_eq!(
        seqs,
        vec![103, 104],
        "nothing written before the marker was known is lost"
    );
}

#[test]
fn fresh_database_sequence_can_be_moved() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    assert_eq!(ensure_sequence_after(&outbox.conn, 7).unwrap(), Some(0));
    let out = outbox.write_batch(&mut [reading("a", 1)], NOW).unwrap();
    assert_eq!(out.batch_seq, Some(8));
}

#[test]
fn batches_written_before_the_marker_was_read_survive_a_lost_data_folder() {
    // The data folder was replaced; Kafka's marker for this gateway is 100.
    // The writer already committed (and acknowledged) two batches.
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    outbox.write_batch(&mut [reading("a", 1)], NOW).unwrap();
    outbox.write_batch(&mut [reading("b", 1)], NOW).unwrap();
    assert_eq!(ensure_sequence_after(&outbox.conn, 100).unwrap(), Some(2));
    trim(&outbox.conn, 100, None).unwrap();
    let batches = load_batches(&outbox.conn, 100, 10).unwrap();
    let keys: Vec<&[u8]> = batches
        .iter()
        .map(|b| b.records[0].key.as_slice())
        .collect();
    assert_eq!(keys, vec![b"a".as_slice(), b"b".as_slice()]);
}

#[test]
fn trim_waits_for_the_writer_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    outbox.write_batch(&mut [reading("a", 1)], NOW).unwrap();
    let other = open_connection(&dir.path().join("o.db"), SyncMode::Full).unwrap();
    // Another connection holds the write lock for a moment.
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked_tx.send(()).unwrap();
        // Hold the lock like a batch commit would, a little longer.
        std::thread::sleep(std::time::Duration::from_millis(300));
        other.execute_batch("COMMIT").unwrap();
    });
    locked_rx.recv().unwrap();
    assert!(trim(&outbox.conn, 1, None).unwrap() > 0);
    holder.join().unwrap();
}

#[test]
fn sending_respects_the_budgets_and_sends_whole_batches() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    for seq in 1..=3 {
        outbox
            .write_batch(&mut [reading("a", seq * 10), reading("b", seq * 10)], NOW)
            .unwrap();
    }
    let one_record = {
        let (_, records, _) = send_all(&outbox.conn, 0, 1, u64::MAX);
        (records[0].key.len() + records[0].value.len()) as u64
    };
    // A budget of one byte still sends one batch, whole.
    let (sent, records, begun) = send_all(&outbox.conn, 0, 10, 1);
    let sent = sent.unwrap();
    assert_eq!((sent.last_batch, sent.batches, sent.records), (1, 1, 2));
    assert_eq!((records.len(), begun), (2, 1));
    assert_eq!(
        sent.bytes,
        records
            .iter()
            .map(|r| (r.key.len() + r.value.len()) as u64)
            .sum::<u64>()
    );
    // The batch that reaches the budget is the last one.
    let (sent, _, _) = send_all(&outbox.conn, 0, 10, 2 * one_record + 1);
    assert_eq!(sent.unwrap().last_batch, 2);
    // The batch count bounds it too, and it starts after `after`.
    let (sent, records, _) = send_all(&outbox.conn, 1, 1, u64::MAX);
    assert_eq!(sent.unwrap().last_batch, 2);
    assert_eq!(
        records.iter().map(|r| r.key.as_slice()).collect::<Vec<_>>(),
        [b"a".as_slice(), b"b".as_slice()]
    );
    let (sent, _, _) = send_all(&outbox.conn, 0, 10, u64::MAX);
    assert_eq!(sent.unwrap().last_batch, 3);
    // Nothing waits: no transaction begins.
    assert_eq!(send_all(&outbox.conn, 3, 10, u64::MAX), (None, vec![], 0));
}

#[test]
fn a_corrupt_batch_stops_sending_with_its_number() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    outbox.write_batch(&mut [reading("a", 1)], NOW).unwrap();
    // Batch 2: a data record of a topic id that does not exist.
    let mut body = Vec::new();
    encode_record(&mut body, TopicId::Data, b"k", b"{}");
    body[0] = 9;
    outbox
        .conn
        .execute(
            "INSERT INTO outbox_batch (created_ms, records, bytes, body, codec) VALUES (1, 1, ?1, ?2, ?3)",
            params![body.len() as i64, body, CODEC_NONE],
        )
        .unwrap();
    let mut sent = 0;
    let err = send_pending::<()>(
        &outbox.conn,
        0,
        10,
        u64::MAX,
        || Ok(()),
        |_, _, _| {
            sent += 1;
            Ok(())
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            SendError::Outbox(OutboxError::Corrupt { batch_seq: 2, .. })
        ),
        "{err:?}"
    );
    // Batch 1 went to the sink before: the caller aborts the transaction.
    assert_eq!(sent, 1);
    // The sink's own error comes back as such, and stops at once.
    let mut calls = 0;
    let err = send_pending(
        &outbox.conn,
        0,
        10,
        u64::MAX,
        || Ok(()),
        |_, _, _| {
            calls += 1;
            Err("queue refused")
        },
    )
    .unwrap_err();
    assert!(matches!(err, SendError::Sink("queue refused")), "{err:?}");
    assert_eq!(calls, 1);
}

#[test]
fn corrupt_body_is_an_error_not_a_panic() {
    assert!(decode_body(&[0, 255, 255, 255, 255]).is_err());
    assert!(decode_body(&[9, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    assert_eq!(decode_body(&[]).unwrap(), vec![]);
    let mut body = Vec::new();
    encode_record(&mut body, TopicId::Data, b"k", b"v");
    assert_eq!(
        decode_body(&body).unwrap(),
        vec![OutRecord {
            topic: TopicId::Data,
            key: b"k".to_vec(),
            value: b"v".to_vec()
        }]
    );
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&dir));
    let conn = Connection::open(dir.path().join("o.db")).unwrap();
    conn.execute(
        "UPDATE meta SET value = 99 WHERE key = 'schema_version'",
        [],
    )
    .unwrap();
    drop(conn);
    let err = Outbox::open(&dir.path().join("o.db"), SyncMode::Full, "gw-1", 3)
        .err()
        .unwrap();
    assert!(err.to_string().contains("schema 99"), "{err}");
}

#[test]
fn drop_oldest_deletes_the_oldest_batches_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    let mut sizes = Vec::new();
    for seq in 1..=5 {
        sizes.push(
            outbox
                .write_batch(&mut [reading("a", seq), reading("b", seq)], NOW)
                .unwrap()
                .bytes,
        );
    }
    let total: u64 = sizes.iter().sum();
    // Keep room for about two batches: the three oldest go.
    let dropped = outbox
        .drop_oldest(total - sizes[0] - sizes[1] - sizes[2])
        .unwrap();
    assert_eq!(
        dropped,
        Dropped {
            batches: 3,
            records: 6,
            bytes: sizes[0] + sizes[1] + sizes[2]
        }
    );
    let left: Vec<i64> = load_batches(&outbox.conn, 0, 10)
        .unwrap()
        .iter()
        .map(|b| b.batch_seq)
        .collect();
    assert_eq!(left, vec![4, 5]);
    assert_eq!(dropped_records(&outbox.conn).unwrap(), 6);
    assert_eq!(outbox.drop_oldest(u64::MAX).unwrap(), Dropped::default());
    outbox.drop_oldest(0).unwrap();
    assert_eq!(dropped_records(&outbox.conn).unwrap(), 10);
}

// --- The data plane inside the batch transaction -------------------------

fn plane_config(extra: &str) -> crate::config::Config {
    crate::config::Config::from_toml(
        &format!(
            "gateway_id = \"gw-1\"\n[sources.demo]\n[kafka]\nbrokers = \"127.0.0.1:9092\"\n{extra}"
        ),
        "test",
    )
    .unwrap()
}

fn open_with(dir: &tempfile::TempDir, config: &crate::config::Config) -> Outbox {
    let mut outbox = open(dir);
    outbox.configure(config).unwrap();
    outbox
}

fn apply_registry(outbox: &mut Outbox, doc: &serde_json::Value) {
    let r = crate::registry::parse_registry(&doc.to_string()).unwrap();
    crate::registry::apply(outbox.connection(), &r, "test", "h", NOW).unwrap();
}

struct At {
    seq: u64,
    ts: i64,
    lat: f64,
    lon: f64,
    speed: f64,
    temperature: f64,
}

const BASE: At = At {
    seq: 1,
    ts: NOW,
    lat: 30.0,
    lon: 30.0,
    speed: 10.0,
    temperature: 20.0,
};

fn payload(device: &str, at: &At) -> Vec<u8> {
    serde_json::json!({
        "device_id": device, "seq": at.seq, "ts": at.ts,
        "temperature": at.temperature, "humidity": 50.0, "battery": 90.0,
        "lat": at.lat, "lon": at.lon, "speed": at.speed
    })
    .to_string()
    .into_bytes()
}

/// Writes one reading per payload (each its own batch when `each`), and
/// returns every record written, in order.
fn write(outbox: &mut Outbox, device: &str, at: &[At]) -> Vec<OutRecord> {
    let payloads: Vec<Vec<u8>> = at.iter().map(|a| payload(device, a)).collect();
    let topic = format!("devices/{device}/telemetry");
    let mut items: Vec<Item> = payloads
        .iter()
        .map(|p| {
            Item::Reading(
                decode_reading(p, None, NOW, &ValidationConfig::default()).unwrap(),
                Raw::Bytes {
                    source: "mqtt",
                    topic: &topic,
                    payload: p,
                },
            )
        })
        .collect();
    let before = backlog(&outbox.conn).unwrap().0;
    outbox.write_batch(&mut items, NOW).unwrap();
    let batches = load_batches(&outbox.conn, 0, 1_000_000).unwrap();
    assert!(batches.len() as u64 <= before + 1);
    batches
        .last()
        .map(|b| b.records.clone())
        .unwrap_or_default()
}

fn alerts(records: &[OutRecord]) -> Vec<(String, String)> {
    records
        .iter()
        .filter(|r| r.topic == TopicId::Alert)
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
            assert_eq!(r.key, v["device_id"].as_str().unwrap().as_bytes());
            (
                v["event"].as_str().unwrap().to_string(),
                v["alert_id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn unknown_devices_follow_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open_with(
        &dir,
        &plane_config("[registry]\nunknown_device = \"reject\"\n"),
    );
    apply_registry(&mut outbox, &crate::registry::tests::document());
    let records = write(&mut outbox, "truck-1", &[BASE]);
    let v: serde_json::Value = serde_json::from_slice(&records[0].value).unwrap();
    assert_eq!(v["registered"], true);
    assert_eq!(v["device_type"], "tracker");
    assert_eq!(v["device_name"], "Truck 1");
    assert_eq!(v["tags"]["fleet"], "a");

    let records = write(&mut outbox, "ghost", &[BASE]);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].topic, TopicId::DeadLetter);
    let dlq: serde_json::Value = serde_json::from_slice(&records[0].value).unwrap();
    assert_eq!(dlq["reason"], "unknown_device");
    assert_eq!(dlq["topic"], "devices/ghost/telemetry");
    assert_eq!(
        dlq["payload"].as_str().unwrap().as_bytes(),
        payload("ghost", &BASE)
    );
    // Rejected readings do not advance the high-water mark: once the
    // device is registered, the same reading is accepted.
    assert_eq!(outbox.plane().counters().unknown_devices, 1);

    // Pass policy: accepted unenriched, flagged.
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open_with(&dir, &plane_config(""));
    let records = write(&mut outbox, "ghost", &[BASE]);
    let v: serde_json::Value = serde_json::from_slice(&records[0].value).unwrap();
    assert_eq!(records[0].topic, TopicId::Data);
    assert_eq!(v["registered"], false);
    assert!(v.get("device_type").is_none());
}

#[test]
fn ranges_come_from_the_device_then_its_type() {
    let dir = tempfile::tempdir().unwrap();
    let config = plane_config(
        "[device_types.tracker]\nranges.temperature = [-50.0, 100.0]\nranges.speed = [0.0, 50.0]\n",
    );
    let mut outbox = open_with(&dir, &config);
    apply_registry(&mut outbox, &crate::registry::tests::document());
    // The device's own range (-20..60) wins over its type's (-50..100).
    let hot = At {
        temperature: 70.0,
        ..BASE
    };
    let records = write(&mut outbox, "truck-1", &[hot]);
    let dlq: serde_json::Value = serde_json::from_slice(&records[0].value).unwrap();
    assert_eq!(dlq["reason"], "out_of_range");
    assert!(
        dlq["message"]
            .as_str()
            .unwrap()
            .contains("range from the device's registry entry")
    );
    // Speed has no device range: the type's applies.
    let fast = At {
        speed: 60.0,
        ..BASE
    };
    let records = write(&mut outbox, "truck-1", &[fast]);
    let dlq: serde_json::Value = serde_json::from_slice(&records[0].value).unwrap();
    assert!(dlq["message"].as_str().unwrap().contains("its device type"));
    // A device without a type has only the physical ranges.
    let records = write(
        &mut outbox,
        "sensor-9",
        &[At {
            speed: 60.0,
            ..BASE
        }],
    );
    assert_eq!(records[0].topic, TopicId::Data);
}

#[test]
fn geofence_events_are_alerts_and_state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = plane_config("");
    let mut outbox = open_with(&dir, &config);
    apply_registry(&mut outbox, &crate::registry::tests::document());
    let inside = |seq: u64, s: i64| At {
        seq,
        ts: NOW + s * 1000,
        lat: 48.2,
        lon: 11.2,
        ..BASE
    };
    let records = write(&mut outbox, "sensor-9", &[inside(1, 0)]);
    assert_eq!(
        alerts(&records),
        [("enter".into(), "sensor-9:1:yard:enter".into())]
    );
    // Restart: the device is still inside, no second `enter`.
    drop(outbox);
    let mut outbox = open_with(&dir, &config);
    let records = write(&mut outbox, "sensor-9", &[inside(2, 10)]);
    assert_eq!(alerts(&records), []);
    // Inside for 60 s: `dwell`, once.
    let records = write(&mut outbox, "sensor-9", &[inside(3, 61), inside(4, 70)]);
    assert_eq!(
        alerts(&records),
        [("dwell".into(), "sensor-9:3:yard:dwell".into())]
    );
    // Into the hole: `exit`; still out 120 s later: `absent`.
    let hole = |seq: u64, s: i64| At {
        seq,
        ts: NOW + s * 1000,
        lat: 48.5,
        lon: 11.5,
        ..BASE
    };
    let records = write(&mut outbox, "sensor-9", &[hole(5, 80)]);
    assert_eq!(
        alerts(&records),
        [("exit".into(), "sensor-9:5:yard:exit".into())]
    );
    drop(outbox);
    let mut outbox = open_with(&dir, &config);
    let records = write(&mut outbox, "sensor-9", &[hole(6, 150), hole(7, 201)]);
    assert_eq!(
        alerts(&records),
        [("absent".into(), "sensor-9:7:yard:absent".into())]
    );
    // A MultiPolygon part.
    let depot = At {
        seq: 8,
        ts: NOW + 300_000,
        lat: 5.5,
        lon: 5.5,
        ..BASE
    };
    let records = write(&mut outbox, "sensor-9", &[depot]);
    assert_eq!(
        alerts(&records),
        [("enter".into(), "sensor-9:8:depots:enter".into())]
    );
}

#[test]
fn fence_state_survives_a_restart_for_short_and_long_device_ids() {
    // Device state is keyed inline up to 24 bytes, on the heap beyond.
    let dir = tempfile::tempdir().unwrap();
    let config = plane_config("");
    let mut outbox = open_with(&dir, &config);
    apply_registry(&mut outbox, &crate::registry::tests::document());
    let inside = |seq: u64| At {
        seq,
        ts: NOW + seq as i64 * 1000,
        lat: 48.2,
        lon: 11.2,
        ..BASE
    };
    let ids = ["d".repeat(24), "d".repeat(25), "d".repeat(64)];
    for id in &ids {
        let records = write(&mut outbox, id, &[inside(1)]);
        assert_eq!(
            alerts(&records),
            [("enter".into(), format!("{id}:1:yard:enter"))]
        );
    }
    drop(outbox);
    let mut outbox = open_with(&dir, &config);
    for id in &ids {
        assert!(outbox.plane().state(id).is_some(), "{id}");
        let records = write(&mut outbox, id, &[inside(2)]);
        assert_eq!(alerts(&records), [], "{id}");
    }
}

#[test]
fn threshold_alert_after_n_consecutive_readings_then_rearmed() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open_with(&dir, &plane_config(""));
    apply_registry(&mut outbox, &crate::registry::tests::document());
    // truck-1: speed threshold 0..80, two consecutive readings.
    let speed = |seq: u64, speed: f64| At { seq, speed, ..BASE };
    let records = write(&mut outbox, "truck-1", &[speed(1, 90.0)]);
    assert_eq!(alerts(&records), []);
    drop(outbox);
    // The count survives a restart.
    let mut outbox = open_with(&dir, &plane_config(""));
    let records = write(
        &mut outbox,
        "truck-1",
        &[
            speed(2, 95.0),
            speed(3, 99.0),
            speed(4, 50.0),
            speed(5, 85.0),
        ],
    );
    assert_eq!(
        alerts(&records),
        [("threshold".into(), "truck-1:2:threshold:speed".into())]
    );
    let alert = records.iter().find(|r| r.topic == TopicId::Alert).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&alert.value).unwrap();
    assert_eq!(v["value"], 95.0);
    assert_eq!(v["threshold"], serde_json::json!([0.0, 80.0]));
    assert_eq!(v["consecutive"], 2);
    assert_eq!(v["gateway_id"], "gw-1");
    let records = write(&mut outbox, "truck-1", &[speed(6, 86.0)]);
    assert_eq!(
        alerts(&records),
        [("threshold".into(), "truck-1:6:threshold:speed".into())]
    );
}

#[test]
fn a_device_has_stored_state_only_while_it_holds_some() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open_with(&dir, &plane_config(""));
    apply_registry(&mut outbox, &crate::registry::tests::document());
    // What a restart would load: `device_state` with the log applied.
    let stored = |outbox: &Outbox| {
        let mut plane = crate::transforms::enrich::DataPlane::passthrough();
        plane.load_states(&outbox.conn).unwrap();
        plane.state("truck-1").cloned()
    };
    let speed = |seq: u64, speed: f64| At { seq, speed, ..BASE };
    // In range and inside no fence: nothing to remember.
    write(&mut outbox, "truck-1", &[speed(1, 10.0)]);
    assert_eq!(outbox.plane().state("truck-1"), None);
    assert_eq!(stored(&outbox), None);
    // Over the threshold once: the count is kept, in memory and stored.
    write(&mut outbox, "truck-1", &[speed(2, 90.0)]);
    let state = outbox.plane().state("truck-1").expect("a state");
    assert_eq!(state.outside.get("speed"), Some(&1));
    assert_eq!(stored(&outbox).as_ref(), Some(state));
    // Back in range: the state is gone again, from both.
    write(&mut outbox, "truck-1", &[speed(3, 50.0)]);
    assert_eq!(outbox.plane().state("truck-1"), None);
    assert_eq!(stored(&outbox), None);
}

#[test]
fn the_state_log_folds_into_device_state_and_restarts_see_the_same_states() {
    let dir = tempfile::tempdir().unwrap();
    let config = plane_config("");
    let mut outbox = open_with(&dir, &config);
    apply_registry(&mut outbox, &crate::registry::tests::document());
    let count = |outbox: &mut Outbox, sql: &str| -> i64 {
        outbox
            .connection()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    };
    let speed = |seq: u64, speed: f64| At { seq, speed, ..BASE };
    let inside = |seq: u64| At {
        seq,
        ts: NOW + seq as i64 * 1000,
        lat: 48.2,
        lon: 11.2,
        ..BASE
    };
    // Logged, not written to device_state: truck-1 over its threshold,
    // sensor-9 into the yard, then truck-1 back in range (removed).
    write(&mut outbox, "truck-1", &[speed(1, 90.0)]);
    write(&mut outbox, "sensor-9", &[inside(1)]);
    write(&mut outbox, "truck-1", &[speed(2, 91.0)]);
    write(&mut outbox, "truck-1", &[speed(3, 10.0)]);
    assert_eq!(count(&mut outbox, "SELECT COUNT(*) FROM device_state"), 0);
    assert_eq!(
        count(&mut outbox, "SELECT COUNT(*) FROM device_state_log"),
        4
    );
    assert_eq!(outbox.plane().log_size().1, 2);
    let sensor = outbox.plane().state("sensor-9").cloned().expect("a state");
    assert_eq!(outbox.plane().state("truck-1"), None);
    // A restart replays the log in order.
    drop(outbox);
    let mut outbox = open_with(&dir, &config);
    assert_eq!(outbox.plane().state("sensor-9"), Some(&sensor));
    assert_eq!(outbox.plane().state("truck-1"), None);
    let records = write(&mut outbox, "sensor-9", &[inside(2)]);
    assert_eq!(alerts(&records), [], "no second enter");
    // Over the threshold again, and the log is due: this batch folds it.
    outbox.plane_mut().set_fold_bytes(1);
    write(&mut outbox, "truck-1", &[speed(4, 95.0)]);
    assert_eq!(
        count(&mut outbox, "SELECT COUNT(*) FROM device_state_log"),
        0
    );
    assert_eq!(outbox.plane().log_size(), (0, 0));
    assert_eq!(count(&mut outbox, "SELECT COUNT(*) FROM device_state"), 2);
    let truck = outbox.plane().state("truck-1").cloned().expect("a state");
    assert_eq!(truck.outside.get("speed"), Some(&1));
    // Logged again after the fold, then a restart: the same states.
    outbox.plane_mut().set_fold_bytes(u64::MAX);
    write(&mut outbox, "truck-1", &[speed(5, 10.0)]);
    assert_eq!(
        count(&mut outbox, "SELECT COUNT(*) FROM device_state_log"),
        1
    );
    drop(outbox);
    let mut outbox = open_with(&dir, &config);
    assert_eq!(outbox.plane().state("truck-1"), None);
    assert_eq!(outbox.plane().state("sensor-9"), Some(&sensor));
    // The next fold deletes the row of truck-1, whose state is gone.
    outbox.plane_mut().set_fold_bytes(1);
    let out = At {
        seq: 3,
        ts: NOW + 3000,
        ..BASE
    };
    let records = write(&mut outbox, "sensor-9", &[out]);
    assert_eq!(
        alerts(&records),
        [("exit".into(), "sensor-9:3:yard:exit".into())]
    );
    assert_eq!(
        count(&mut outbox, "SELECT COUNT(*) FROM device_state_log"),
        0
    );
    assert_eq!(
        count(
            &mut outbox,
            "SELECT COUNT(*) FROM device_state WHERE device_id = 'truck-1'"
        ),
        0
    );
    let sensor = outbox.plane().state("sensor-9").cloned().expect("a state");
    drop(outbox);
    let outbox = open_with(&dir, &config);
    assert_eq!(outbox.plane().state("sensor-9"), Some(&sensor));
    assert_eq!(outbox.plane().state("truck-1"), None);
}

#[test]
fn a_cut_state_log_entry_keeps_what_came_before_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let config = plane_config("");
    let mut outbox = open_with(&dir, &config);
    apply_registry(&mut outbox, &crate::registry::tests::document());
    let speed = |seq: u64, speed: f64| At { seq, speed, ..BASE };
    write(&mut outbox, "truck-1", &[speed(1, 90.0)]);
    // A second entry, cut in the middle of its state.
    let (stored, codec): (Vec<u8>, i64) = outbox
        .connection()
        .query_row("SELECT body, codec FROM device_state_log", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(codec, 1, "entries are stored compressed");
    let body = decompress(&stored).unwrap();
    let mut cut = body.clone();
    cut.truncate(body.len() - 1);
    outbox
        .connection()
        .execute("INSERT INTO device_state_log (body) VALUES (?1)", [&cut])
        .unwrap();
    drop(outbox);
    let outbox = open_with(&dir, &config);
    let state = outbox
        .plane()
        .state("truck-1")
        .expect("the first entry applied");
    assert_eq!(state.outside.get("speed"), Some(&1));
    // An entry whose framing holds but whose state does not read: the
    // device starts over without state, as for an unreadable row of
    // `device_state`, not with the older one.
    let mut unreadable = Vec::new();
    unreadable.extend_from_slice(&7u16.to_le_bytes());
    unreadable.extend_from_slice(b"truck-1");
    unreadable.extend_from_slice(&3u32.to_le_bytes());
    unreadable.extend_from_slice(&[0xff, 0xff, 0xff]);
    let mut outbox = outbox;
    outbox
        .connection()
        .execute(
            "INSERT INTO device_state_log (body) VALUES (?1)",
            [&unreadable],
        )
        .unwrap();
    drop(outbox);
    let outbox = open_with(&dir, &config);
    assert_eq!(outbox.plane().state("truck-1"), None);
}

#[test]
fn state_log_entries_that_do_not_unpack_are_skipped_and_version_6_entries_still_replay() {
    let dir = tempfile::tempdir().unwrap();
    let config = plane_config("");
    let mut outbox = open_with(&dir, &config);
    apply_registry(&mut outbox, &crate::registry::tests::document());
    let speed = |seq: u64, speed: f64| At { seq, speed, ..BASE };
    write(&mut outbox, "truck-1", &[speed(1, 90.0)]);
    let stored: Vec<u8> = outbox
        .connection()
        .query_row("SELECT body FROM device_state_log", [], |r| r.get(0))
        .unwrap();
    let raw = decompress(&stored).unwrap();
    // Later entries that cannot be read: a damaged lz4 block, an unknown
    // codec. truck-1 keeps the state of the first.
    let mut damaged = stored.clone();
    damaged.truncate(stored.len() / 2);
    outbox
        .connection()
        .execute(
            "INSERT INTO device_state_log (body, codec) VALUES (?1, 1), (?2, 9)",
            params![damaged, raw],
        )
        .unwrap();
    drop(outbox);
    let mut outbox = open_with(&dir, &config);
    let state = outbox.plane().state("truck-1").cloned().expect("a state");
    assert_eq!(state.outside.get("speed"), Some(&1));
    // A database of schema 6: the log table without a codec, entries as
    // they are.
    outbox
        .connection()
        .execute_batch(
            "DROP TABLE device_state_log;
             CREATE TABLE device_state_log (id INTEGER PRIMARY KEY, body BLOB NOT NULL);
             UPDATE meta SET value = 6 WHERE key = 'schema_version';",
        )
        .unwrap();
    outbox
        .connection()
        .execute("INSERT INTO device_state_log (body) VALUES (?1)", [&raw])
        .unwrap();
    outbox
        .connection()
        .execute("DELETE FROM device_state", [])
        .unwrap();
    drop(outbox);
    let mut outbox = open_with(&dir, &config);
    assert_eq!(outbox.plane().state("truck-1"), Some(&state));
    let version: i64 = outbox
        .connection()
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    // New entries go compressed into the upgraded table.
    write(&mut outbox, "truck-1", &[speed(2, 95.0)]);
    let codecs: Vec<i64> = outbox
        .connection()
        .prepare("SELECT codec FROM device_state_log ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(codecs, [0, 1]);
    drop(outbox);
    let outbox = open_with(&dir, &config);
    let state = outbox.plane().state("truck-1").expect("a state");
    assert_eq!(state.outside.get("speed"), Some(&2));
}

#[test]
fn a_new_registry_is_used_from_the_next_batch() {
    let dir = tempfile::tempdir().unwrap();
    let config = plane_config("[registry]\nunknown_device = \"reject\"\n");
    let mut outbox = open_with(&dir, &config);
    apply_registry(&mut outbox, &crate::registry::tests::document());
    assert_eq!(
        write(&mut outbox, "truck-1", &[BASE])[0].topic,
        TopicId::Data
    );
    // Applied from another connection, as the cloud sync will.
    let mut other = open_connection(&dir.path().join("o.db"), SyncMode::Full).unwrap();
    let mut doc = crate::registry::tests::document();
    doc["devices"] = serde_json::json!([{"device_id": "sensor-9"}]);
    let r = crate::registry::parse_registry(&doc.to_string()).unwrap();
    crate::registry::apply(&mut other, &r, "test", "h2", NOW).unwrap();
    let records = write(&mut outbox, "truck-1", &[At { seq: 2, ..BASE }]);
    assert_eq!(records[0].topic, TopicId::DeadLetter);
    assert_eq!(outbox.plane().counters().registry_generation, 2);
}

#[test]
fn bodies_are_stored_compressed_or_raw_and_read_back_alike() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    let many: Vec<Item> = (1..=200).map(|s| reading("a", s)).collect();
    let mut items = many.clone();
    let lz4 = outbox.write_batch(&mut items, NOW).unwrap();
    outbox
        .configure(&plane_config("[outbox]\ncompression = \"none\"\n"))
        .unwrap();
    let mut items: Vec<Item> = (201..=400).map(|s| reading("a", s)).collect();
    let raw = outbox.write_batch(&mut items, NOW).unwrap();
    assert!(
        lz4.bytes * 3 < raw.bytes,
        "lz4 {} bytes, raw {} bytes",
        lz4.bytes,
        raw.bytes
    );
    let batches = load_batches(&outbox.conn, 0, 10).unwrap();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0].bytes, lz4.bytes);
    assert_eq!(batches[1].bytes, raw.bytes);
    for (batch, first) in batches.iter().zip([1, 201]) {
        assert_eq!(batch.records.len(), 200);
        let v: serde_json::Value = serde_json::from_slice(&batch.records[0].value).unwrap();
        assert_eq!(v["seq"], first);
    }
}

#[test]
fn corrupt_compressed_bodies_are_errors_not_panics() {
    assert!(decompress(&[]).is_err());
    assert!(decompress(&[255, 255, 255, 255, 0]).is_err());
    assert!(decompress(&[10, 0, 0, 0, 0xf0, 1, 2]).is_err());
    let body = b"hello hello hello hello".to_vec();
    let mut stored = (body.len() as u32).to_le_bytes().to_vec();
    stored.extend(lz4_flex::block::compress(&body));
    assert_eq!(decompress(&stored).unwrap(), body);
    stored[0] += 1;
    assert!(decompress(&stored).is_err());
}

#[test]
fn corrupt_chunked_bodies_are_errors_not_panics() {
    let body: Vec<u8> = (0..200_000u32)
        .flat_map(|i| (i % 1000).to_le_bytes())
        .collect();
    let mut writer = BodyWriter::default();
    writer.start(true);
    // Uneven pieces, so that some straddle two chunks.
    for piece in body.chunks(7_777) {
        writer.put(piece);
    }
    let (stored, codec) = writer.finish();
    assert_eq!(codec, CODEC_LZ4_CHUNKS);
    let stored = stored.to_vec();
    assert!(stored.len() < body.len() / 2);
    assert_eq!(decompress_chunks(&stored).unwrap(), body);
    assert_eq!(decompress_chunks(&[]).unwrap(), Vec::<u8>::new());
    // Truncated anywhere, a claimed size too big or wrong, a damaged block.
    for cut in [1, 7, 8, 100, stored.len() - 1] {
        assert!(decompress_chunks(&stored[..cut]).is_err(), "cut at {cut}");
    }
    let mut big = stored.clone();
    big[..4].copy_from_slice(&(CHUNK_BYTES as u32 + 1).to_le_bytes());
    assert!(decompress_chunks(&big).is_err());
    let mut short = stored.clone();
    short[0] ^= 1;
    assert!(decompress_chunks(&short).is_err());
    let mut damaged = stored.clone();
    for b in &mut damaged[8..40] {
        *b = 0xff;
    }
    assert!(decompress_chunks(&damaged).is_err());
}

/// Batches written by the previous build (one lz4 block) still read.
#[test]
fn single_block_lz4_bodies_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir);
    let mut body = Vec::new();
    encode_record(&mut body, TopicId::Data, b"k", b"{\"seq\":3}");
    let mut stored = (body.len() as u32).to_le_bytes().to_vec();
    stored.extend(lz4_flex::block::compress(&body));
    outbox
        .conn
        .execute(
            "INSERT INTO outbox_batch (created_ms, records, bytes, body, codec) VALUES (1, 1, ?1, ?2, ?3)",
            params![stored.len() as i64, stored, CODEC_LZ4],
        )
        .unwrap();
    let batches = load_batches(&outbox.conn, 0, 10).unwrap();
    assert_eq!(batches[0].records[0].key, b"k");
    assert_eq!(load_marks(&outbox.conn).unwrap().get("k"), Some(&3));
}

#[test]
fn a_version_1_outbox_is_upgraded_and_its_batches_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO meta VALUES ('schema_version', 1);
             CREATE TABLE outbox_batch (batch_seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 created_ms INTEGER NOT NULL, records INTEGER NOT NULL,
                 bytes INTEGER NOT NULL, body BLOB NOT NULL);",
        )
        .unwrap();
        let mut body = Vec::new();
        encode_record(&mut body, TopicId::Data, b"k", b"{\"seq\":1}");
        conn.execute(
            "INSERT INTO outbox_batch (created_ms, records, bytes, body) VALUES (1, 1, ?1, ?2)",
            params![body.len() as i64, body],
        )
        .unwrap();
    }
    let mut outbox = open(&dir);
    outbox.write_batch(&mut [reading("a", 1)], NOW).unwrap();
    let batches = load_batches(&outbox.conn, 0, 10).unwrap();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0].records[0].key, b"k");
    assert_eq!(batches[1].records[0].key, b"a");
    let version: i64 = outbox
        .conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
}

#[test]
fn the_transaction_budget_counts_bytes_as_sent() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    for round in 0..2u64 {
        let mut items: Vec<Item> = (1..=200).map(|s| reading("a", round * 1000 + s)).collect();
        outbox.write_batch(&mut items, NOW).unwrap();
    }
    let all = load_batches(&outbox.conn, 0, 10).unwrap();
    let stored: u64 = all.iter().map(|b| b.bytes).sum();
    let sent_first: u64 = all[0]
        .records
        .iter()
        .map(|r| (r.key.len() + r.value.len()) as u64)
        .sum();
    // Both batches fit the budget as stored (compressed), not as sent.
    assert!(stored < sent_first);
    let (sent, _, _) = send_all(&outbox.conn, 0, 10, sent_first);
    assert_eq!(sent.unwrap().batches, 1);
    let (sent, _, _) = send_all(&outbox.conn, 0, 10, sent_first + 1);
    assert_eq!(sent.unwrap().batches, 2);
}

#[test]
fn a_failed_batch_after_a_registry_change_redoes_the_change() {
    use crate::transforms::enrich::DataPlane;
    let dir = tempfile::tempdir().unwrap();
    let config = plane_config("");
    let mut outbox = open_with(&dir, &config);
    apply_registry(&mut outbox, &crate::registry::tests::document());
    // sensor-9 enters and leaves the yard: an absent timer (120 s) runs.
    let at = |seq: u64, s: i64, lat: f64| At {
        seq,
        ts: NOW + s * 1000,
        lat,
        lon: 11.2,
        ..BASE
    };
    write(&mut outbox, "sensor-9", &[at(1, 0, 48.2), at(2, 10, 30.0)]);
    drop(outbox);
    // A new registry without the yard; the first batch using it fails.
    let mut conn = open_connection(&dir.path().join("o.db"), SyncMode::Full).unwrap();
    let mut doc = crate::registry::tests::document();
    doc["fences"]["features"] = serde_json::json!([]);
    let r = crate::registry::parse_registry(&doc.to_string()).unwrap();
    crate::registry::apply(&mut conn, &r, "test", "h2", NOW).unwrap();
    let mut plane = DataPlane::new(&config);
    plane.load_states(&conn).unwrap();
    assert_eq!(plane.state("sensor-9").unwrap().fences.left.len(), 1);
    plane.begin(&conn).unwrap();
    assert!(
        plane.state("sensor-9").is_none(),
        "timer of the removed fence dropped"
    );
    plane.rolled_back();
    // The retry reloads the old state from SQLite and drops the timer again.
    plane.begin(&conn).unwrap();
    assert!(plane.state("sensor-9").is_none());
    let reading = decode_reading(
        &payload("sensor-9", &at(3, 500, 30.0)),
        None,
        NOW + 500_000,
        &ValidationConfig::default(),
    )
    .unwrap();
    let mut alerts = Vec::new();
    plane.events(&reading, None, &mut alerts);
    assert!(alerts.is_empty(), "{alerts:?}");
}

#[test]
fn an_unreadable_registry_entry_makes_the_device_unknown_not_a_stall() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open_with(&dir, &plane_config(""));
    apply_registry(&mut outbox, &crate::registry::tests::document());
    outbox
        .connection()
        .execute(
            "UPDATE registry_device SET body = '{\"device_id\": \"truck-1\", \"colour\": 1}' WHERE device_id = 'truck-1'",
            [],
        )
        .unwrap();
    let records = write(&mut outbox, "truck-1", &[BASE]);
    assert_eq!(records[0].topic, TopicId::Data);
    let v: serde_json::Value = serde_json::from_slice(&records[0].value).unwrap();
    assert_eq!(v["registered"], false);
}

#[test]
fn marks_survive_trim_drop_and_restart_and_never_go_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    for seq in 1..=6 {
        outbox
            .write_batch(&mut [reading("a", seq), reading("b", seq * 10)], NOW)
            .unwrap();
    }
    // No mark is written per batch: the batches hold them.
    let rows: i64 = outbox
        .conn
        .query_row("SELECT COUNT(*) FROM device_hwm", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0);
    // Sent batches 1..=4 leave; their marks move to device_hwm.
    trim(&outbox.conn, 4, None).unwrap();
    let marks: Vec<(String, i64)> = outbox
        .conn
        .prepare("SELECT device_id, seq FROM device_hwm ORDER BY device_id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(marks, [("a".to_string(), 4), ("b".to_string(), 40)]);
    // Drop-oldest takes batch 5 the same way.
    let dropped = outbox.drop_oldest(0).unwrap();
    assert_eq!(dropped.batches, 2);
    drop(outbox);
    // After a restart, everything ever accepted is still a duplicate.
    let mut outbox = open(&dir);
    assert_eq!(load_batches(&outbox.conn, 0, 10).unwrap().len(), 0);
    let out = outbox
        .write_batch(
            &mut [
                reading("a", 3),
                reading("a", 6),
                reading("b", 60),
                reading("b", 61),
            ],
            NOW,
        )
        .unwrap();
    assert_eq!((out.valid, out.duplicates), (1, 3));
    // Trimming an older batch never lowers a mark.
    trim(&outbox.conn, i64::MAX, None).unwrap();
    let b: i64 = outbox
        .conn
        .query_row(
            "SELECT seq FROM device_hwm WHERE device_id = 'b'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(b, 61);
}

#[test]
fn marks_are_rebuilt_from_unsent_batches_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    outbox.write_batch(&mut [reading("a", 5)], NOW).unwrap();
    // A crash: nothing but the committed batch is left.
    drop(outbox);
    let mut outbox = open(&dir);
    assert_eq!(outbox.known_devices(), 1);
    let out = outbox
        .write_batch(
            &mut [reading("a", 5), reading("a", 4), reading("a", 6)],
            NOW,
        )
        .unwrap();
    assert_eq!((out.valid, out.duplicates), (1, 2));
}

/// A reading stored in binary renders to the JSON the batch writer used to
/// store: with and without epoch, attributes, registration, enrichment; in
/// the compact form the batch writer uses now and in the fixed-width form
/// of schema 4, which later builds still read.
#[test]
fn stored_readings_render_the_json_of_the_reading() {
    let limits = ValidationConfig::default();
    let payloads = [
        r#"{"device_id":"dev-1","seq":7,"ts":1789999999000,"temperature":21.5,"humidity":40.0,"battery":88.25,"lat":48.13908938715199,"lon":-11.5,"speed":0}"#,
        r#"{"device_id":"dev-2","seq":9,"epoch":1790000000,"ts":1789999999001,"temperature":-0.0,"humidity":0.1,"battery":100,"lat":-90,"lon":180,"speed":999.999,"firmware":"1.2","attributes":{"rssi":-70,"note":"a \"quoted\" é"}}"#,
        // A timestamp far from the gateway's clock, either way.
        r#"{"device_id":"dev-3","seq":18446744073709551,"ts":0,"temperature":1e-300,"humidity":0,"battery":0,"lat":0,"lon":0,"speed":0}"#,
    ];
    let fragments: [&[u8]; 2] = [b"", br#","device_type":"tracker","tags":{"fleet":"a"}"#];
    let mut limits = limits;
    limits.max_age_seconds = u64::MAX / 4000;
    for payload in payloads {
        let r = decode_reading(payload.as_bytes(), None, NOW, &limits).unwrap();
        for (registered, fragment) in [(false, fragments[0]), (true, fragments[1])] {
            for gateway_id in [
                "gw-1",
                "a-gateway-id-of-sixty-four-characters-0123456789-abcdefghijklmn",
            ] {
                let mut expected = Vec::new();
                crate::transforms::validate::write_reading_json(
                    &mut expected,
                    &r,
                    gateway_id,
                    NOW + 5,
                    registered,
                    fragment,
                );
                let e = Enrichment {
                    gateway_id,
                    received_at: NOW + 5,
                    registered,
                    fragment,
                };

                let mut stored = Vec::new();
                encode_reading(&mut stored, &r, &e);
                let mut rendered = Vec::new();
                render_reading(r.device_id.as_bytes(), &stored, &mut rendered).unwrap();
                assert_eq!(
                    String::from_utf8(rendered).unwrap(),
                    String::from_utf8(expected.clone()).unwrap()
                );
                assert_eq!(reading_seq(&stored), Some(r.seq));
                // Smaller than its JSON, before compression.
                assert!(stored.len() < expected.len());
                // Damaged: cut anywhere, a value that is not finite, bytes after.
                for cut in 0..stored.len() {
                    assert!(render_reading(b"dev", &stored[..cut], &mut Vec::new()).is_err());
                }
                let mut longer = stored.clone();
                longer.push(0);
                assert!(render_reading(b"dev", &longer, &mut Vec::new()).is_err());
                let mut nan = stored.clone();
                let at = 17 + if r.epoch.is_some() { 8 } else { 0 } + 8;
                nan[at..at + 8].copy_from_slice(&f64::NAN.to_bits().to_le_bytes());
                assert!(render_reading(b"dev", &nan, &mut Vec::new()).is_err());

                let mut compact = Vec::new();
                assert!(encode_compact(&mut compact, &r, &e));
                let context = Context {
                    gateway_id,
                    received_at: NOW + 5,
                };
                let mut rendered = Vec::new();
                render_compact(r.device_id.as_bytes(), &compact, &context, &mut rendered).unwrap();
                assert_eq!(
                    String::from_utf8(rendered).unwrap(),
                    String::from_utf8(expected.clone()).unwrap()
                );
                assert_eq!(compact_seq(&compact), Some(r.seq));
                // Smaller than the fixed-width form.
                assert!(
                    compact.len() < stored.len(),
                    "{} {}",
                    compact.len(),
                    stored.len()
                );
                for cut in 0..compact.len() {
                    assert!(
                        render_compact(b"dev", &compact[..cut], &context, &mut Vec::new()).is_err()
                    );
                }
                let mut longer = compact.clone();
                longer.push(0);
                assert!(render_compact(b"dev", &longer, &context, &mut Vec::new()).is_err());
                let mut flags = compact.clone();
                flags[0] |= 0x80;
                assert!(render_compact(b"dev", &flags, &context, &mut Vec::new()).is_err());
            }
        }
    }
}

/// A reading of `payload` (valid at [`NOW`]) and the enrichment of an
/// unregistered device on gateway `gateway_id`, received at [`NOW`].
fn reading_and_enrichment<'a>(payload: &[u8], gateway_id: &'a str) -> (Reading, Enrichment<'a>) {
    let r = decode_reading(payload, None, NOW, &ValidationConfig::default()).unwrap();
    let e = Enrichment {
        gateway_id,
        received_at: NOW,
        registered: false,
        fragment: b"",
    };
    (r, e)
}

/// A compact reading's values are the f64 bits after the head: a value
/// that is not finite there is refused, like in the fixed-width form.
#[test]
fn a_compact_reading_with_a_value_that_is_not_finite_is_refused() {
    let (r, e) = reading_and_enrichment(
        br#"{"device_id":"d","seq":3,"ts":1789999999000,"temperature":1,"humidity":2,"battery":3,"lat":4,"lon":5,"speed":6}"#,
        "gw",
    );
    // Without decimals, all six values are stored as f64 bits.
    let r = Reading {
        decimals: Decimals::default(),
        ..r
    };
    let mut compact = Vec::new();
    assert!(encode_compact(&mut compact, &r, &e));
    assert_eq!(compact[0] & COMPACT_DECIMAL, 0);
    let context = Context {
        gateway_id: "gw",
        received_at: NOW,
    };
    // flags, seq (one byte), ts delta (varint), then the six values.
    let head = compact.len() - 48;
    for i in 0..6 {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut damaged = compact.clone();
            damaged[head + 8 * i..head + 8 * i + 8].copy_from_slice(&bad.to_bits().to_le_bytes());
            assert!(render_compact(b"d", &damaged, &context, &mut Vec::new()).is_err());
        }
    }
}

/// A small deterministic generator for the property tests below.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `m` written with `decimals` digits after the point, and a sign.
fn decimal_text(m: u64, decimals: usize, negative: bool) -> String {
    let digits = format!("{m:0>width$}", width = decimals + 1);
    let (int, frac) = digits.split_at(digits.len() - decimals);
    let sign = if negative { "-" } else { "" };
    if decimals == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

/// Every plain decimal text of up to 19 digits whose digits are below
/// 2^43 is stored as a decimal, and reads back as the very f64 the
/// standard library parses from the text; above that, never.
#[test]
fn decimal_codes_give_back_the_parsed_value() {
    let mut rng = SplitMix(7);
    let limit = DECIMAL_MANTISSA_LIMIT;
    let mut edges = vec![0, 1, 9, 10, limit - 1, limit, limit + 1, u64::MAX / 1000];
    for _ in 0..400_000 {
        // Mantissas of every length, most of them below the limit.
        let bits = rng.next() % 50;
        edges.push(rng.next() >> (64 - bits.max(1)));
    }
    for (n, &m) in edges.iter().enumerate() {
        for decimals in [n % 19, 0, 2, 6, 18] {
            let text = decimal_text(m, decimals, n % 3 == 0);
            if text.trim_start_matches('-').replace('.', "").len() > 19 {
                continue;
            }
            let v: f64 = text.parse().unwrap();
            let code = decimal_code(v, decimals as u8);
            if m < limit {
                let code = code.unwrap_or_else(|| panic!("{text} not stored as a decimal"));
                assert!(code < 1 << 49, "{text}: a code of more than seven bytes");
                let back = decimal_value(code).unwrap();
                assert_eq!(back.to_bits(), v.to_bits(), "{text}");
            } else {
                assert_eq!(code, None, "{text}");
            }
        }
    }
    // Around the limit with every count of decimals: `87.96093022208` is
    // just below 2^43 once scaled, and rounds to it.
    for m in limit - 3..=limit + 3 {
        for decimals in 0..=18usize {
            for negative in [false, true] {
                let text = decimal_text(m, decimals, negative);
                let v: f64 = text.parse().unwrap();
                match decimal_code(v, decimals as u8) {
                    Some(code) => {
                        assert!(m < limit, "{text} stored as a decimal");
                        assert_eq!(decimal_value(code).unwrap().to_bits(), v.to_bits());
                    }
                    None => assert!(m >= limit, "{text} not stored as a decimal"),
                }
            }
        }
    }
}

/// A hint that does not fit the value (a wrong count of decimals, or a
/// value changed after it was parsed) stores the value as f64 bits: it
/// reads back unchanged.
#[test]
fn a_wrong_decimal_hint_costs_bytes_not_the_value() {
    for (v, decimals) in [
        (21.53, 1),
        (21.53, 0),
        (21.537, 2),
        (0.1 + 0.2, 1),
        (1e-300, 18),
        (f64::NAN, 2),
        (48.13908938715199, 14),
    ] {
        match decimal_code(v, decimals) {
            None => {}
            Some(code) => panic!("{v} with {decimals} decimals gave {code}"),
        }
    }
    assert_eq!(decimal_code(21.53, Decimals::UNKNOWN), None);
    // Through a whole reading: the hint says two decimals for values that
    // have none, or more.
    let (mut r, e) = reading_and_enrichment(
        br#"{"device_id":"d","seq":3,"ts":1789999999000,"temperature":21.53,"humidity":40.25,"battery":3,"lat":48.1,"lon":11.5,"speed":6}"#,
        "gw",
    );
    assert_eq!(r.decimals.0, [2, 2, 0, 1, 1, 0]);
    r.temperature = 21.537;
    r.lat = 48.13908938715199;
    let mut compact = Vec::new();
    assert!(encode_compact(&mut compact, &r, &e));
    assert_ne!(compact[0] & COMPACT_DECIMAL, 0);
    let context = Context {
        gateway_id: "gw",
        received_at: NOW,
    };
    let mut rendered = Vec::new();
    render_compact(b"d", &compact, &context, &mut rendered).unwrap();
    let mut expected = Vec::new();
    crate::transforms::validate::write_reading_json(&mut expected, &r, "gw", NOW, false, b"");
    assert_eq!(
        String::from_utf8(rendered).unwrap(),
        String::from_utf8(expected).unwrap()
    );
}

/// Sensor values are stored as decimals: fewer bytes than f64 bits, the
/// same JSON when sent; and a damaged decimal is refused.
#[test]
fn sensor_values_are_stored_as_decimals() {
    let (r, e) = reading_and_enrichment(
        br#"{"device_id":"d","seq":3,"ts":1789999999000,"temperature":-21.53,"humidity":-0.0,"battery":100,"lat":48.139089,"lon":11.589654,"speed":1.2919902700222363}"#,
        "gw",
    );
    let mut compact = Vec::new();
    assert!(encode_compact(&mut compact, &r, &e));
    let plain = Reading {
        decimals: Decimals::default(),
        ..r.clone()
    };
    let mut as_bits = Vec::new();
    assert!(encode_compact(&mut as_bits, &plain, &e));
    // Five values of 2 to 5 bytes and the speed's 8, with a mask byte,
    // against six times 8 bytes.
    assert!(
        compact.len() + 20 <= as_bits.len(),
        "{} {}",
        compact.len(),
        as_bits.len()
    );
    let context = Context {
        gateway_id: "gw",
        received_at: NOW,
    };
    let mut rendered = Vec::new();
    render_compact(b"d", &compact, &context, &mut rendered).unwrap();
    let mut from_bits = Vec::new();
    render_compact(b"d", &as_bits, &context, &mut from_bits).unwrap();
    assert_eq!(rendered, from_bits);
    let json: serde_json::Value = serde_json::from_slice(&rendered).unwrap();
    assert_eq!(json["temperature"], -21.53);
    assert_eq!(
        json["humidity"].as_f64().map(f64::is_sign_negative),
        Some(true)
    );
    assert_eq!(json["lat"], 48.139089);

    // flags, seq and ts delta, then the mask.
    let mask_at = {
        let mut c = Cursor(&compact);
        c.u8().unwrap();
        c.varint().unwrap();
        c.varint().unwrap();
        compact.len() - c.0.len()
    };
    assert_eq!(compact[mask_at], 0b01_1111);
    for bad_mask in [0u8, 0b100_0000, 0xff] {
        let mut damaged = compact.clone();
        damaged[mask_at] = bad_mask;
        assert!(render_compact(b"d", &damaged, &context, &mut Vec::new()).is_err());
    }
    // The temperature's code, replaced by one of 19 or 31 decimals, or by
    // a mantissa of 2^43 (a code that still takes its three bytes would
    // shift the rest: write whole varints instead).
    for bad_code in [
        2153 << 6 | 19 << 1,
        2153 << 6 | 31 << 1,
        DECIMAL_MANTISSA_LIMIT << 6 | 2 << 1,
    ] {
        let mut damaged = compact[..=mask_at].to_vec();
        put_varint(&mut damaged, bad_code);
        let first = {
            let mut c = Cursor(&compact[mask_at + 1..]);
            c.varint().unwrap();
            compact.len() - c.0.len()
        };
        damaged.extend_from_slice(&compact[first..]);
        assert!(
            render_compact(b"d", &damaged, &context, &mut Vec::new()).is_err(),
            "{bad_code:#x}"
        );
    }
}

/// What the compact form cannot hold is left to the fixed-width form: a
/// `seq` that is not `device_seq` with the epoch folded in, a device id
/// longer than its one-byte length.
#[test]
fn the_compact_form_declines_what_it_cannot_hold() {
    let (r, e) = reading_and_enrichment(
        br#"{"device_id":"d","seq":3,"epoch":9,"ts":1789999999000,"temperature":1,"humidity":2,"battery":3,"lat":4,"lon":5,"speed":6}"#,
        "gw",
    );
    let mut out = Vec::new();
    assert!(encode_compact(&mut out, &r, &e));
    let mut unfolded = r.clone();
    unfolded.seq = 3;
    out.clear();
    assert!(!encode_compact(&mut out, &unfolded, &e));
    assert!(out.is_empty());
    let mut long = r.clone();
    long.device_id = "x".repeat(256);
    assert!(!encode_compact(&mut out, &long, &e));
    assert!(out.is_empty());
}

/// A body decodes its compact readings with the context before them, and
/// refuses one without: a body cut or spliced wrongly is corrupt.
#[test]
fn compact_readings_need_their_context() {
    let (r, e) = reading_and_enrichment(
        br#"{"device_id":"dev-9","seq":3,"ts":1789999999000,"temperature":1,"humidity":2,"battery":3,"lat":4,"lon":5,"speed":6}"#,
        "gw-7",
    );
    let mut value = Vec::new();
    assert!(encode_compact(&mut value, &r, &e));
    let mut reading_only = Vec::new();
    put_compact(&mut reading_only, r.device_id.as_bytes(), &value);
    assert!(decode_body(&reading_only).is_err());

    let mut body = Vec::new();
    encode_tagged(&mut body, TAG_CONTEXT, b"gw-7", &NOW.to_le_bytes());
    body.extend_from_slice(&reading_only);
    let records = decode_body(&body).unwrap();
    let mut expected = Vec::new();
    crate::transforms::validate::write_reading_json(&mut expected, &r, "gw-7", NOW, false, b"");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].key, b"dev-9");
    assert_eq!(records[0].value, expected);

    // Readings in the fixed-width form of schema 4 read alike, with or
    // without a context.
    let mut old = Vec::new();
    encode_reading(&mut old, &r, &e);
    let mut schema_4 = Vec::new();
    encode_tagged(&mut schema_4, TAG_READING, r.device_id.as_bytes(), &old);
    let records = decode_body(&schema_4).unwrap();
    assert_eq!(records[0].value, expected);
    body.extend_from_slice(&schema_4);
    let records = decode_body(&body).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].value, expected);

    // A context of the wrong size.
    let mut bad = Vec::new();
    encode_tagged(&mut bad, TAG_CONTEXT, b"gw-7", &[0u8; 7]);
    bad.extend_from_slice(&reading_only);
    assert!(decode_body(&bad).is_err());
}

/// What the uplink reads is the JSON of each reading, and the marks come
/// back from the binary records after a restart.
#[test]
fn batches_of_binary_readings_send_json_and_keep_their_marks() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    let mut items: Vec<Item> = (1..=300).map(|s| reading("a", s)).collect();
    items.push(reading("b", 42));
    outbox.write_batch(&mut items, NOW).unwrap();
    let batches = load_batches(&outbox.conn, 0, 10).unwrap();
    let records = &batches[0].records;
    assert_eq!(records.len(), 301);
    for (record, item) in records.iter().zip(&items) {
        let Item::Reading(r, _) = item else {
            unreachable!()
        };
        let mut expected = Vec::new();
        crate::transforms::validate::write_reading_json(
            &mut expected,
            r,
            &outbox.gateway_id,
            NOW,
            false,
            b"",
        );
        assert_eq!(record.topic, TopicId::Data);
        assert_eq!(record.key, r.device_id.as_bytes());
        assert_eq!(record.value, expected);
    }
    let marks = load_marks(&outbox.conn).unwrap();
    assert_eq!(marks.get("a"), Some(&300));
    assert_eq!(marks.get("b"), Some(&42));
}

/// The alert JSON is byte for byte what serde gives for the alert
/// flattened into a wrapper with the two gateway fields.
#[test]
fn alert_json_equals_the_flattened_record() {
    #[derive(serde::Serialize)]
    struct Flattened<'a> {
        #[serde(flatten)]
        alert: &'a Alert,
        gateway_id: &'a str,
        raised_at: i64,
    }
    let fence = Alert {
        alert_id: "dev-1:7:depot:enter".into(),
        kind: "geofence",
        event: "enter",
        device_id: "dev-1".into(),
        seq: 7,
        ts: 1_789_999_999_000,
        // More digits than an f64 holds: serde and the writer round alike.
        #[allow(clippy::excessive_precision)]
        lat: 52.520_000_000_000_003,
        lon: -13.4,
        fence_id: Some("depot \"north\"".into()),
        field: None,
        value: None,
        threshold: None,
        consecutive: None,
    };
    let threshold = Alert {
        alert_id: "dev-1:8:threshold:temperature".into(),
        kind: "threshold",
        event: "threshold",
        fence_id: None,
        field: Some("temperature"),
        value: Some(-0.5),
        threshold: Some([0.0, 85.5]),
        consecutive: Some(3),
        ..fence.clone()
    };
    // Not produced by validated input, but written as serde would.
    let odd = Alert {
        alert_id: "a\u{1}b".into(),
        device_id: "tab\there".into(),
        value: Some(f64::INFINITY),
        threshold: Some([f64::NEG_INFINITY, 1e300]),
        lat: f64::NAN,
        ..threshold.clone()
    };
    let mut out = b"left over".to_vec();
    for alert in [&fence, &threshold, &odd] {
        for (gateway_id, raised_at) in [("gw-1", 1_790_000_000_000), ("gw\\\u{7f}é", -1)] {
            alert_json(&mut out, alert, gateway_id, raised_at);
            let expected = serde_json::to_vec(&Flattened {
                alert,
                gateway_id,
                raised_at,
            })
            .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&expected)
            );
        }
    }
}

/// Records of every key length around the short-key layout, and values that
/// cross chunk boundaries, come back as written, compressed or not.
#[test]
fn records_of_every_key_length_round_trip() {
    for compress in [false, true] {
        let mut body = BodyWriter::default();
        body.start(compress);
        let mut written = Vec::new();
        for key_len in 0..300usize {
            let key: Vec<u8> = (0..key_len).map(|i| b'a' + (i % 26) as u8).collect();
            // Now and then a value longer than a chunk.
            let value_len = if key_len % 97 == 0 {
                CHUNK_BYTES + 17
            } else {
                key_len * 3
            };
            let value: Vec<u8> = (0..value_len).map(|i| (i * 7 + key_len) as u8).collect();
            if key_len <= 255 && key_len % 2 == 1 {
                put_compact(&mut body, &key, &value);
                written.push((TAG_COMPACT, key, value));
            } else {
                encode_record(&mut body, TopicId::DeadLetter, &key, &value);
                written.push((TopicId::DeadLetter as u8, key, value));
            }
        }
        let (stored, codec) = body.finish();
        let plain = if codec == CODEC_LZ4_CHUNKS {
            decompress_chunks(stored).unwrap()
        } else {
            stored.to_vec()
        };
        let mut read = Vec::new();
        each_record::<&str>(&plain, |tag, key, value| {
            read.push((tag, key.to_vec(), value.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(read, written, "compress = {compress}");
    }
}
