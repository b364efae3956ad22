//! MySQL sink for `rich-iot-data`: rows and the consumed Kafka offsets in
//! one MySQL transaction per partition (see [`super::offsets`]). The unique
//! key `(device_id, seq)` is a second guard: a duplicate reaching it is
//! counted and logged.
//!
//! Throughput (see the README's "Cloud bridge sinks"): records are decoded
//! without copying their strings, rows go in primary-key order, and in
//! multi-row INSERTs of a few fixed sizes that stay prepared on the
//! connection.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use edge_agent::config::is_valid_id;
use serde::Deserialize;
use serde_json::value::RawValue;
use sqlx::{MySql, QueryBuilder, Transaction};
use tracing::warn;

pub use super::offsets::KafkaRecord;
use super::offsets::{OffsetTable, PartitionRows, WriteCounts};

/// The `rich-iot-data` record written by the agent. Strings borrow from
/// the payload unless JSON escapes force a copy.
#[derive(Debug, Deserialize)]
pub struct MetricRecord<'a> {
    #[serde(borrow)]
    pub device_id: Cow<'a, str>,
    pub seq: u64,
    pub device_seq: u64,
    #[serde(default)]
    pub epoch: Option<u64>,
    pub ts: i64,
    pub temperature: f64,
    pub humidity: f64,
    pub battery: f64,
    pub lat: f64,
    pub lon: f64,
    pub speed: f64,
    /// Stored as the agent wrote it: a JSON object, or NULL when empty.
    #[serde(default, borrow)]
    pub attributes: Option<&'a RawValue>,
    #[serde(borrow)]
    pub gateway_id: Cow<'a, str>,
    pub received_at: i64,
}

impl MetricRecord<'_> {
    /// The `attributes` column: the object's JSON, NULL for none or `{}`.
    pub fn attributes_json(&self) -> Option<&str> {
        self.attributes
            .map(RawValue::get)
            .filter(|a| !a.trim_start_matches('{').trim_start().starts_with('}'))
    }
}

/// Decodes a record; `Err` names why it cannot become a row.
pub fn decode(payload: Option<&[u8]>) -> Result<MetricRecord<'_>, (&'static str, String)> {
    let payload = payload.ok_or(("empty_payload", "record has no value".to_string()))?;
    let r: MetricRecord = serde_json::from_slice(payload).map_err(|e| {
        (
            "malformed_record",
            format!("not a rich-iot-data record: {e}"),
        )
    })?;
    // The id columns hold these characters only, compared case-sensitively
    // (migration 4), as the agent checks them.
    for (name, id) in [("device_id", &r.device_id), ("gateway_id", &r.gateway_id)] {
        if !is_valid_id(id) {
            return Err((
                "invalid_field",
                format!(
                    "{name} {id:?} is not 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'"
                ),
            ));
        }
    }
    if r.seq > i64::MAX as u64 {
        return Err((
            "invalid_field",
            format!("seq {} exceeds the signed 64-bit range", r.seq),
        ));
    }
    if let Some(a) = r.attributes
        && !a.get().starts_with('{')
    {
        return Err(("invalid_field", "attributes is not a JSON object".into()));
    }
    for (name, v) in [
        ("temperature", r.temperature),
        ("humidity", r.humidity),
        ("battery", r.battery),
        ("lat", r.lat),
        ("lon", r.lon),
        ("speed", r.speed),
    ] {
        if !v.is_finite() {
            return Err(("invalid_field", format!("{name} is not a finite number")));
        }
    }
    Ok(r)
}

/// Counters of the MySQL sink.
#[derive(Debug, Default)]
pub struct MysqlSinkStats {
    pub rows_inserted: AtomicU64,
    /// Records skipped because `bridge_offsets` showed them already written.
    pub records_already_stored: AtomicU64,
    /// Rows refused by the unique key: should stay 0 with exactly-once.
    pub duplicate_rows: AtomicU64,
    pub dead_letters: AtomicU64,
    pub transactions: AtomicU64,
    pub write_errors: AtomicU64,
}

impl MysqlSinkStats {
    pub fn record(&self, c: &WriteCounts) {
        self.rows_inserted.fetch_add(c.inserted, Relaxed);
        self.duplicate_rows.fetch_add(c.duplicates, Relaxed);
        self.records_already_stored.fetch_add(c.skipped, Relaxed);
        self.dead_letters.fetch_add(c.dead, Relaxed);
        self.transactions.fetch_add(c.transactions, Relaxed);
    }
}

pub struct MysqlSink {
    pub offsets: OffsetTable,
    /// Rows per INSERT at most (see [`insert_size`]).
    pub rows_per_insert: usize,
}

impl MysqlSink {
    /// Writes a batch, each partition in one transaction with its offset.
    /// Returns the next offset per partition as committed.
    pub async fn write(
        &self,
        records: &[KafkaRecord],
        stats: &MysqlSinkStats,
    ) -> Result<(BTreeMap<i32, i64>, WriteCounts), sqlx::Error> {
        let (committed, counts) = self.offsets.write(self, records).await?;
        stats.record(&counts);
        Ok((committed, counts))
    }

    async fn insert_rows(
        &self,
        tx: &mut Transaction<'static, MySql>,
        partition: i32,
        rows: &[(i64, MetricRecord<'_>)],
    ) -> Result<u64, sqlx::Error> {
        // INSERT IGNORE only ever ignores the unique key here: every value
        // was checked by `decode` and fits its column.
        let mut qb: QueryBuilder<MySql> = QueryBuilder::new(
            "INSERT IGNORE INTO iot_metrics (device_id, seq, device_seq, epoch, ts_ms, temperature, humidity, battery, \
             lat, lon, speed, attributes, gateway_id, received_at_ms, kafka_partition, kafka_offset) ",
        );
        qb.push_values(rows, |mut b, (offset, m)| {
            b.push_bind(m.device_id.as_ref())
                .push_bind(m.seq)
                .push_bind(m.device_seq)
                .push_bind(m.epoch)
                .push_bind(m.ts)
                .push_bind(m.temperature)
                .push_bind(m.humidity)
                .push_bind(m.battery)
                .push_bind(m.lat)
                .push_bind(m.lon)
                .push_bind(m.speed)
                .push_bind(m.attributes_json())
                .push_bind(m.gateway_id.as_ref())
                .push_bind(m.received_at)
                .push_bind(partition)
                .push_bind(*offset);
        });
        Ok(qb.build().execute(&mut **tx).await?.rows_affected())
    }

    async fn dead_letter(
        &self,
        tx: &mut Transaction<'static, MySql>,
        r: &KafkaRecord,
        reason: &str,
        message: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT IGNORE INTO bridge_dead_letters (sink, topic, kafka_partition, kafka_offset, reason, message, payload) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&self.offsets.sink_name)
        .bind(&self.offsets.topic)
        .bind(r.partition)
        .bind(r.offset)
        .bind(reason)
        .bind(message)
        .bind(r.payload.as_deref())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

impl PartitionRows for MysqlSink {
    async fn write_rows(
        &self,
        tx: &mut Transaction<'static, MySql>,
        partition: i32,
        fresh: &[&KafkaRecord],
        counts: &mut WriteCounts,
    ) -> Result<(), sqlx::Error> {
        let mut rows = Vec::with_capacity(fresh.len());
        for r in fresh {
            match decode(r.payload.as_deref()) {
                Ok(m) => rows.push((r.offset, m)),
                Err((reason, message)) => {
                    warn!(
                        partition,
                        offset = r.offset,
                        reason,
                        "dead-lettering a record: {message}"
                    );
                    self.dead_letter(tx, r, reason, &message).await?;
                    counts.dead += 1;
                }
            }
        }
        // In primary-key order: consecutive rows land on the same index
        // pages, so an INSERT touches each page once instead of once per row.
        rows.sort_unstable_by(|(_, a), (_, b)| {
            (a.device_id.as_bytes(), a.seq).cmp(&(b.device_id.as_bytes(), b.seq))
        });
        let mut rest = rows.as_slice();
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(insert_size(rest.len(), self.rows_per_insert));
            rest = tail;
            let affected = self.insert_rows(tx, partition, chunk).await?;
            counts.inserted += affected;
            let dups = chunk.len() as u64 - affected;
            if dups > 0 {
                counts.duplicates += dups;
                warn!(
                    partition,
                    duplicates = dups,
                    "rows with an existing (device_id, seq) reached iot_metrics and were refused by the unique key; \
                     the exactly-once chain let a duplicate through"
                );
            }
        }
        Ok(())
    }
}

/// Columns of one `iot_metrics` row in [`MysqlSink::insert_rows`].
const COLUMNS: usize = 16;

/// MySQL and MariaDB refuse a prepared statement with more placeholders.
const MAX_PLACEHOLDERS: usize = 65_535;

/// Rows in the next INSERT when `remaining` rows are left: `per_insert`
/// (at most what the placeholder limit allows) while that many remain,
/// then the largest power of two that fits. Every statement therefore has
/// one of a few shapes, which the connection's statement cache keeps
/// prepared; a remainder of any size would be prepared anew every batch.
fn insert_size(remaining: usize, per_insert: usize) -> usize {
    let full = per_insert.clamp(1, MAX_PLACEHOLDERS / COLUMNS);
    if remaining >= full {
        full
    } else {
        1 << remaining.ilog2()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_agent_records() {
        let json = br#"{"device_id":"d","seq":5,"device_seq":5,"ts":1,"temperature":1.0,"humidity":2.0,
            "battery":3.0,"lat":4.0,"lon":5.0,"speed":6.0,"attributes":{"fw":"1"},"gateway_id":"g","received_at":9}"#;
        let r = decode(Some(json)).unwrap();
        assert_eq!((r.device_id.as_ref(), r.seq, r.received_at), ("d", 5, 9));
        assert_eq!(r.attributes_json(), Some(r#"{"fw":"1"}"#));
    }

    #[test]
    fn empty_or_odd_attributes() {
        let base = r#"{"device_id":"d\u0041","seq":5,"device_seq":5,"ts":1,"temperature":1.0,"humidity":2.0,
            "battery":3.0,"lat":4.0,"lon":5.0,"speed":6.0,"gateway_id":"g","received_at":9"#;
        let r = decode(Some(format!("{base},\"attributes\":{{ }}}}").as_bytes()))
            .map(|r| r.attributes_json().map(str::to_owned));
        assert_eq!(r.unwrap(), None);
        let owned = format!("{base}}}");
        let r = decode(Some(owned.as_bytes())).unwrap();
        assert_eq!((r.device_id.as_ref(), r.attributes_json()), ("dA", None));
        assert_eq!(
            decode(Some(format!("{base},\"attributes\":[1]}}").as_bytes()))
                .unwrap_err()
                .0,
            "invalid_field"
        );
    }

    #[test]
    fn inserts_have_few_shapes_and_respect_the_placeholder_limit() {
        let sizes = |mut n: usize, per: usize| {
            let mut out = Vec::new();
            while n > 0 {
                let s = insert_size(n, per);
                assert!(s >= 1 && s <= n && s * COLUMNS <= MAX_PLACEHOLDERS);
                out.push(s);
                n -= s;
            }
            out
        };
        assert_eq!(sizes(1300, 500), [500, 500, 256, 32, 8, 4]);
        assert_eq!(sizes(3, 500), [2, 1]);
        assert_eq!(sizes(10_000, 5000), [4095, 4095, 1024, 512, 256, 16, 2]);
        assert_eq!(sizes(7, 1), [1; 7]);
    }

    #[test]
    fn bad_records_have_reasons() {
        assert_eq!(decode(None).unwrap_err().0, "empty_payload");
        assert_eq!(decode(Some(b"{")).unwrap_err().0, "malformed_record");
        assert_eq!(
            decode(Some(br#"{"device_id":"d"}"#)).unwrap_err().0,
            "malformed_record"
        );
        let long = format!(
            r#"{{"device_id":"{}","seq":1,"device_seq":1,"ts":1,"temperature":1,"humidity":1,"battery":1,"lat":1,"lon":1,"speed":1,"gateway_id":"g","received_at":1}}"#,
            "x".repeat(65)
        );
        assert_eq!(
            decode(Some(long.as_bytes())).unwrap_err().0,
            "invalid_field"
        );
        // Ids the agent would never send: not ASCII, a space, a wildcard.
        for (device, gateway) in [("d\u{e9}v", "g"), ("d v", "g"), ("d", "g+"), ("d", "")] {
            let json = format!(
                r#"{{"device_id":"{device}","seq":1,"device_seq":1,"ts":1,"temperature":1,"humidity":1,"battery":1,"lat":1,"lon":1,"speed":1,"gateway_id":"{gateway}","received_at":1}}"#
            );
            let (reason, message) = decode(Some(json.as_bytes())).unwrap_err();
            assert_eq!(reason, "invalid_field", "{json}");
            assert!(message.contains("is not 1 to 64 characters"), "{message}");
        }
    }
}
