//! MySQL sink for `rich-iot-data`: rows and the consumed Kafka offsets in
//! one MySQL transaction.
//!
//! For each partition in a batch the sink locks its `bridge_offsets` row
//! (`SELECT ... FOR UPDATE`), drops records below the stored offset (already
//! written, by this or another instance), inserts the rest and advances the
//! offset, all before COMMIT. Two instances briefly owning one partition
//! during a rebalance therefore serialise on the row lock and never write a
//! record twice. The unique key `(device_id, seq)` is a second guard: a
//! duplicate reaching it is counted and logged.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Deserialize;
use serde_json::{Map, Value};
use sqlx::{MySql, MySqlPool, QueryBuilder, Row, Transaction};
use tracing::warn;

/// A Kafka record as consumed.
#[derive(Debug, Clone)]
pub struct KafkaRecord {
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
}

/// The `rich-iot-data` record written by the agent.
#[derive(Debug, Deserialize)]
pub struct MetricRecord {
    pub device_id: String,
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
    #[serde(default)]
    pub attributes: Option<Map<String, Value>>,
    pub gateway_id: String,
    pub received_at: i64,
}

/// Decodes a record; `Err` names why it cannot become a row.
pub fn decode(payload: Option<&[u8]>) -> Result<MetricRecord, (&'static str, String)> {
    let payload = payload.ok_or(("empty_payload", "record has no value".to_string()))?;
    let r: MetricRecord = serde_json::from_slice(payload).map_err(|e| {
        (
            "malformed_record",
            format!("not a rich-iot-data record: {e}"),
        )
    })?;
    if r.device_id.is_empty() || r.device_id.len() > 64 || r.gateway_id.len() > 64 {
        return Err((
            "invalid_field",
            "device_id or gateway_id longer than 64 characters or empty".into(),
        ));
    }
    if r.seq > i64::MAX as u64 {
        return Err((
            "invalid_field",
            format!("seq {} exceeds the signed 64-bit range", r.seq),
        ));
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

pub struct MysqlSink {
    pub pool: MySqlPool,
    pub sink_name: String,
    pub topic: String,
    pub rows_per_insert: usize,
}

impl MysqlSink {
    /// The next offset to consume for each partition, as stored.
    pub async fn stored_offsets(
        &self,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, i64>, sqlx::Error> {
        let mut out = BTreeMap::new();
        for p in partitions {
            let row = sqlx::query(
                "SELECT next_offset FROM bridge_offsets WHERE sink = ? AND topic = ? AND kafka_partition = ?",
            )
            .bind(&self.sink_name)
            .bind(&self.topic)
            .bind(p)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(row) = row {
                out.insert(*p, row.get::<i64, _>(0));
            }
        }
        Ok(out)
    }

    /// Writes a batch in one transaction. Returns the next offset per
    /// partition as committed.
    pub async fn write(
        &self,
        records: &[KafkaRecord],
        stats: &MysqlSinkStats,
    ) -> Result<BTreeMap<i32, i64>, sqlx::Error> {
        let mut by_partition: BTreeMap<i32, Vec<&KafkaRecord>> = BTreeMap::new();
        for r in records {
            by_partition.entry(r.partition).or_default().push(r);
        }
        let mut tx = self.pool.begin().await?;
        let mut committed = BTreeMap::new();
        let (mut inserted, mut duplicates, mut skipped, mut dead) = (0u64, 0u64, 0u64, 0u64);
        // Partitions in ascending order: instances lock rows in the same
        // order and cannot deadlock each other.
        for (partition, mut recs) in by_partition {
            recs.sort_by_key(|r| r.offset);
            // A partition revoked and assigned back is read again from the
            // stored offset while earlier records are still in the batch.
            recs.dedup_by_key(|r| r.offset);
            // An upsert takes the row's exclusive lock at once; INSERT IGNORE
            // on an existing row would take a shared lock first, and two
            // instances upgrading shared locks deadlock.
            sqlx::query(
                "INSERT INTO bridge_offsets (sink, topic, kafka_partition, next_offset) VALUES (?, ?, ?, 0) \
                 ON DUPLICATE KEY UPDATE next_offset = next_offset",
            )
                .bind(&self.sink_name)
                .bind(&self.topic)
                .bind(partition)
                .execute(&mut *tx)
                .await?;
            let next: i64 = sqlx::query_scalar(
                "SELECT next_offset FROM bridge_offsets WHERE sink = ? AND topic = ? AND kafka_partition = ? FOR UPDATE",
            )
            .bind(&self.sink_name)
            .bind(&self.topic)
            .bind(partition)
            .fetch_one(&mut *tx)
            .await?;
            let unique = recs.len();
            let fresh: Vec<&KafkaRecord> = recs.into_iter().filter(|r| r.offset >= next).collect();
            skipped += (unique - fresh.len()) as u64;
            let Some(last) = fresh.last().map(|r| r.offset) else {
                committed.insert(partition, next);
                continue;
            };
            let mut rows = Vec::with_capacity(fresh.len());
            for r in &fresh {
                match decode(r.payload.as_deref()) {
                    Ok(m) => rows.push((r.offset, m)),
                    Err((reason, message)) => {
                        warn!(
                            partition,
                            offset = r.offset,
                            reason,
                            "dead-lettering a record: {message}"
                        );
                        self.dead_letter(&mut tx, r, reason, &message).await?;
                        dead += 1;
                    }
                }
            }
            for chunk in rows.chunks(self.rows_per_insert) {
                let affected = self.insert_rows(&mut tx, partition, chunk).await?;
                inserted += affected;
                let dups = chunk.len() as u64 - affected;
                if dups > 0 {
                    duplicates += dups;
                    warn!(
                        partition,
                        duplicates = dups,
                        "rows with an existing (device_id, seq) reached iot_metrics and were refused by the unique key; \
                         the exactly-once chain let a duplicate through"
                    );
                }
            }
            sqlx::query("UPDATE bridge_offsets SET next_offset = ? WHERE sink = ? AND topic = ? AND kafka_partition = ?")
                .bind(last + 1)
                .bind(&self.sink_name)
                .bind(&self.topic)
                .bind(partition)
                .execute(&mut *tx)
                .await?;
            committed.insert(partition, last + 1);
        }
        tx.commit().await?;
        stats.rows_inserted.fetch_add(inserted, Relaxed);
        stats.duplicate_rows.fetch_add(duplicates, Relaxed);
        stats.records_already_stored.fetch_add(skipped, Relaxed);
        stats.dead_letters.fetch_add(dead, Relaxed);
        stats.transactions.fetch_add(1, Relaxed);
        Ok(committed)
    }

    async fn insert_rows(
        &self,
        tx: &mut Transaction<'_, MySql>,
        partition: i32,
        rows: &[(i64, MetricRecord)],
    ) -> Result<u64, sqlx::Error> {
        // INSERT IGNORE only ever ignores the unique key here: every value
        // was checked by `decode` and fits its column.
        let mut qb: QueryBuilder<MySql> = QueryBuilder::new(
            "INSERT IGNORE INTO iot_metrics (device_id, seq, device_seq, epoch, ts_ms, temperature, humidity, battery, \
             lat, lon, speed, attributes, gateway_id, received_at_ms, kafka_partition, kafka_offset) ",
        );
        qb.push_values(rows, |mut b, (offset, m)| {
            let attributes = m
                .attributes
                .as_ref()
                .filter(|a| !a.is_empty())
                .map(|a| Value::Object(a.clone()).to_string());
            b.push_bind(&m.device_id)
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
                .push_bind(attributes)
                .push_bind(&m.gateway_id)
                .push_bind(m.received_at)
                .push_bind(partition)
                .push_bind(*offset);
        });
        Ok(qb.build().execute(&mut **tx).await?.rows_affected())
    }

    async fn dead_letter(
        &self,
        tx: &mut Transaction<'_, MySql>,
        r: &KafkaRecord,
        reason: &str,
        message: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT IGNORE INTO bridge_dead_letters (sink, topic, kafka_partition, kafka_offset, reason, message, payload) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&self.sink_name)
        .bind(&self.topic)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_agent_records() {
        let json = br#"{"device_id":"d","seq":5,"device_seq":5,"ts":1,"temperature":1.0,"humidity":2.0,
            "battery":3.0,"lat":4.0,"lon":5.0,"speed":6.0,"attributes":{"fw":"1"},"gateway_id":"g","received_at":9}"#;
        let r = decode(Some(json)).unwrap();
        assert_eq!((r.device_id.as_str(), r.seq, r.received_at), ("d", 5, 9));
        assert_eq!(r.attributes.unwrap()["fw"], "1");
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
    }
}
