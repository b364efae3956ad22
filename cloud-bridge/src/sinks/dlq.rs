//! MySQL sink for `iot-dlq`: the gateways' rejected input, one row per
//! record in `iot_dlq`, with the consumed offsets in the same transaction
//! (exactly once, like the metrics sink).
//!
//! Operators query it, e.g. `SELECT reason, COUNT(*) FROM iot_dlq GROUP BY
//! reason`. A record that is not in the dead-letter format is still kept,
//! with reason `unreadable_dead_letter` and its bytes as the payload.

use std::collections::BTreeMap;

use serde::Deserialize;
use sqlx::{MySql, QueryBuilder, Transaction};

use super::offsets::{KafkaRecord, OffsetTable, PartitionRows, WriteCounts};

/// Longest text kept in one column (the table's MEDIUMTEXT holds 16 MiB).
const MAX_TEXT: usize = 1024 * 1024;

/// The dead-letter record the agent writes.
#[derive(Debug, Default, Deserialize)]
struct DeadLetter {
    gateway_id: Option<String>,
    received_at: Option<i64>,
    source: Option<String>,
    topic: Option<String>,
    reason: Option<String>,
    message: Option<String>,
    payload: Option<String>,
    payload_hex: Option<String>,
    payload_bytes: Option<i64>,
}

fn clip(s: Option<String>, max: usize) -> Option<String> {
    s.map(|mut s| {
        if s.len() > max {
            let mut end = max;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
        s
    })
}

fn row(payload: Option<&[u8]>) -> DeadLetter {
    let bytes = payload.unwrap_or_default();
    match serde_json::from_slice::<DeadLetter>(bytes) {
        Ok(d) if d.reason.is_some() => DeadLetter {
            gateway_id: clip(d.gateway_id, 64),
            source: clip(d.source, 64),
            topic: clip(d.topic, 256),
            reason: clip(d.reason, 64),
            message: clip(d.message, MAX_TEXT),
            payload: clip(d.payload, MAX_TEXT),
            payload_hex: clip(d.payload_hex, MAX_TEXT),
            ..d
        },
        _ => DeadLetter {
            reason: Some("unreadable_dead_letter".into()),
            message: Some("the record is not a dead letter of the agent's format".into()),
            payload: clip(Some(String::from_utf8_lossy(bytes).into_owned()), MAX_TEXT),
            payload_bytes: Some(bytes.len() as i64),
            ..DeadLetter::default()
        },
    }
}

pub struct DlqSink {
    pub offsets: OffsetTable,
}

impl DlqSink {
    /// Writes the batch, each partition in one transaction with its offset;
    /// returns the next offset per partition and what was written.
    pub async fn write(
        &self,
        records: &[KafkaRecord],
    ) -> Result<(BTreeMap<i32, i64>, WriteCounts), sqlx::Error> {
        self.offsets.write(self, records).await
    }
}

impl PartitionRows for DlqSink {
    async fn write_rows(
        &self,
        tx: &mut Transaction<'static, MySql>,
        partition: i32,
        fresh: &[&KafkaRecord],
        counts: &mut WriteCounts,
    ) -> Result<(), sqlx::Error> {
        for chunk in fresh.chunks(200) {
            let mut q = QueryBuilder::<MySql>::new(
                "INSERT IGNORE INTO iot_dlq (gateway_id, received_at_ms, source, source_topic, reason, message, \
                 payload, payload_hex, payload_bytes, kafka_topic, kafka_partition, kafka_offset) ",
            );
            q.push_values(chunk, |mut b, r| {
                let d = row(r.payload.as_deref());
                b.push_bind(d.gateway_id)
                    .push_bind(d.received_at)
                    .push_bind(d.source)
                    .push_bind(d.topic)
                    .push_bind(d.reason.unwrap_or_default())
                    .push_bind(d.message.unwrap_or_default())
                    .push_bind(d.payload)
                    .push_bind(d.payload_hex)
                    .push_bind(d.payload_bytes)
                    .push_bind(&self.offsets.topic)
                    .push_bind(partition)
                    .push_bind(r.offset);
            });
            let affected = q.build().execute(&mut **tx).await?.rows_affected();
            counts.inserted += affected;
            counts.duplicates += chunk.len() as u64 - affected;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_are_read_and_anything_else_is_kept_as_unreadable() {
        let d = row(Some(
            br#"{"gateway_id":"gw","received_at":5,"source":"mqtt","topic":"t/x","reason":"out_of_range","message":"m","payload":"{}","payload_bytes":2}"#,
        ));
        assert_eq!(d.reason.as_deref(), Some("out_of_range"));
        assert_eq!(d.gateway_id.as_deref(), Some("gw"));
        assert_eq!(d.payload_bytes, Some(2));
        let d = row(Some(b"\xff garbage"));
        assert_eq!(d.reason.as_deref(), Some("unreadable_dead_letter"));
        assert_eq!(d.payload_bytes, Some(9));
        let d = row(None);
        assert_eq!(d.reason.as_deref(), Some("unreadable_dead_letter"));
        let long = "é".repeat(40);
        assert_eq!(clip(Some(long), 63).unwrap().len(), 62);
    }
}
