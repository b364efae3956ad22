use super::*;
use crate::config::ValidationConfig;
use crate::transforms::validate::{RejectReason, decode_reading};

const NOW: i64 = 1_790_000_000_000;

fn reading(device: &str, seq: u64) -> Item {
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
    )
}

fn rejected(payload: &[u8]) -> Item {
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
        .write_batch(&[reading("a", 1), reading("b", 1), rejected(b"{oops")], NOW)
        .unwrap();
    assert_eq!((out.valid, out.rejected, out.duplicates), (2, 1, 0));
    assert_eq!(out.batch_seq, Some(1));
    let batches = load_batches(&outbox.conn, 0, 10, u64::MAX).unwrap();
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
fn duplicates_are_dropped_within_and_across_batches_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut outbox = open(&dir);
        let out = outbox
            .write_batch(&[reading("a", 1), reading("a", 2), reading("a", 2)], NOW)
            .unwrap();
        assert_eq!((out.valid, out.duplicates), (2, 1));
    }
    let mut outbox = open(&dir);
    assert_eq!(outbox.known_devices(), 1);
    let out = outbox
        .write_batch(&[reading("a", 2), reading("a", 1), reading("a", 3)], NOW)
        .unwrap();
    assert_eq!((out.valid, out.duplicates), (1, 2));
    // A batch of only duplicates writes no outbox batch.
    let out = outbox.write_batch(&[reading("a", 3)], NOW).unwrap();
    assert_eq!(out.batch_seq, None);
}

#[test]
fn quarantine_is_bounded_but_counts_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    for i in 0..5 {
        outbox
            .write_batch(&[rejected(format!("bad{i}").as_bytes())], NOW)
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
        .write_batch(&[rejected(&[0xff, 0x00, 0x10])], NOW)
        .unwrap();
    let batches = load_batches(&outbox.conn, 0, 10, u64::MAX).unwrap();
    let dlq: serde_json::Value = serde_json::from_slice(&batches[0].records[0].value).unwrap();
    assert_eq!(dlq["payload_hex"], "ff0010");
    assert!(dlq.get("payload").is_none());
}

#[test]
fn trim_and_sequence_never_reuse_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    outbox.write_batch(&[reading("a", 1)], NOW).unwrap();
    outbox.write_batch(&[reading("a", 2)], NOW).unwrap();
    let freed = trim(&outbox.conn, 2).unwrap();
    assert!(freed > 0);
    assert_eq!(backlog(&outbox.conn).unwrap(), (0, 0));
    let out = outbox.write_batch(&[reading("a", 3)], NOW).unwrap();
    assert_eq!(
        out.batch_seq,
        Some(3),
        "an emptied outbox must not restart at 1"
    );
    // Kafka remembers more than this database: batch 3 (unsent) moves
    // above the marker, new batches follow it.
    assert_eq!(ensure_sequence_after(&outbox.conn, 100).unwrap(), Some(1));
    assert_eq!(ensure_sequence_after(&outbox.conn, 50).unwrap(), None);
    let out = outbox.write_batch(&[reading("a", 4)], NOW).unwrap();
    assert_eq!(out.batch_seq, Some(104));
    let seqs: Vec<i64> = load_batches(&outbox.conn, 100, 10, u64::MAX)
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
    let out = outbox.write_batch(&[reading("a", 1)], NOW).unwrap();
    assert_eq!(out.batch_seq, Some(8));
}

#[test]
fn batches_written_before_the_marker_was_read_survive_a_lost_data_folder() {
    // The data folder was replaced; Kafka's marker for this gateway is 100.
    // The writer already committed (and acknowledged) two batches.
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    outbox.write_batch(&[reading("a", 1)], NOW).unwrap();
    outbox.write_batch(&[reading("b", 1)], NOW).unwrap();
    assert_eq!(ensure_sequence_after(&outbox.conn, 100).unwrap(), Some(2));
    trim(&outbox.conn, 100).unwrap();
    let batches = load_batches(&outbox.conn, 100, 10, u64::MAX).unwrap();
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
    outbox.write_batch(&[reading("a", 1)], NOW).unwrap();
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
    assert!(trim(&outbox.conn, 1).unwrap() > 0);
    holder.join().unwrap();
}

#[test]
fn load_respects_byte_budget_but_returns_at_least_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    for seq in 1..=3 {
        outbox.write_batch(&[reading("a", seq)], NOW).unwrap();
    }
    assert_eq!(load_batches(&outbox.conn, 0, 10, 1).unwrap().len(), 1);
    assert_eq!(
        load_batches(&outbox.conn, 1, 10, u64::MAX).unwrap().len(),
        2
    );
    assert_eq!(load_batches(&outbox.conn, 0, 2, u64::MAX).unwrap().len(), 2);
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
                .write_batch(&[reading("a", seq), reading("b", seq)], NOW)
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
    let left: Vec<i64> = load_batches(&outbox.conn, 0, 10, u64::MAX)
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
