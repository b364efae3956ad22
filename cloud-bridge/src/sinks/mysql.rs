//! MySQL sink for `rich-iot-data`: rows and the consumed Kafka offsets in
//! one MySQL transaction per partition.
//!
//! For each partition in a batch the sink locks its `bridge_offsets` row
//! (`SELECT ... FOR UPDATE`), drops records below the stored offset (already
//! written, by this or another instance), inserts the rest and advances the
//! offset, all before COMMIT. Two instances briefly owning one partition
//! during a rebalance therefore serialise on the row lock and never write a
//! record twice. The unique key `(device_id, seq)` is a second guard: a
//! duplicate reaching it is counted and logged.
//!
//! Throughput (see the README's "Cloud bridge sinks"): the partitions of a
//! batch are written concurrently, each in its own transaction on its own
//! connection; rows go in primary-key order, in multi-row INSERTs of a few
//! fixed sizes that stay prepared on the connection.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::Poll;

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

    /// Writes a batch. Each partition of the batch is written in its own
    /// transaction holding both its rows and its new offset, and the
    /// partitions' transactions run concurrently on separate connections
    /// (MariaDB works on them in parallel). Returns the next offset per
    /// partition as committed.
    ///
    /// # Errors
    ///
    /// The first error of any partition. Partitions whose transaction
    /// committed stay committed: when the caller writes the batch again,
    /// their records are below the stored offsets and skipped.
    pub async fn write(
        &self,
        records: &[KafkaRecord],
        stats: &MysqlSinkStats,
    ) -> Result<BTreeMap<i32, i64>, sqlx::Error> {
        let mut by_partition: BTreeMap<i32, Vec<&KafkaRecord>> = BTreeMap::new();
        for r in records {
            by_partition.entry(r.partition).or_default().push(r);
        }
        let outcomes = join_all(
            by_partition
                .into_iter()
                .map(|(partition, recs)| self.write_partition(partition, recs)),
        )
        .await;
        let mut committed = BTreeMap::new();
        let mut first_error = None;
        for outcome in outcomes {
            match outcome {
                Ok((partition, next, counts)) => {
                    committed.insert(partition, next);
                    stats.rows_inserted.fetch_add(counts.inserted, Relaxed);
                    stats.duplicate_rows.fetch_add(counts.duplicates, Relaxed);
                    stats
                        .records_already_stored
                        .fetch_add(counts.skipped, Relaxed);
                    stats.dead_letters.fetch_add(counts.dead, Relaxed);
                    stats.transactions.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(committed),
        }
    }

    /// One partition's records and its offset in one transaction. Returns
    /// the partition, its next offset as committed, and what was written.
    async fn write_partition(
        &self,
        partition: i32,
        mut recs: Vec<&KafkaRecord>,
    ) -> Result<(i32, i64, WriteCounts), sqlx::Error> {
        let mut counts = WriteCounts::default();
        recs.sort_by_key(|r| r.offset);
        // A partition revoked and assigned back is read again from the
        // stored offset while earlier records are still in the batch.
        recs.dedup_by_key(|r| r.offset);
        let mut tx = self.pool.begin().await?;
        // An upsert takes the row's exclusive lock at once; INSERT IGNORE
        // on an existing row would take a shared lock first, and two
        // instances upgrading shared locks deadlock. Each transaction locks
        // one partition's row only, so instances cannot deadlock on them.
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
        counts.skipped = (unique - fresh.len()) as u64;
        let Some(last) = fresh.last().map(|r| r.offset) else {
            tx.commit().await?;
            return Ok((partition, next, counts));
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
                    counts.dead += 1;
                }
            }
        }
        // In primary key order: consecutive rows land on the same index
        // pages, so a batch touches each page once instead of once per row.
        rows.sort_unstable_by(|(_, a), (_, b)| {
            (a.device_id.as_str(), a.seq).cmp(&(b.device_id.as_str(), b.seq))
        });
        let mut rest = rows.as_slice();
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(insert_size(rest.len(), self.rows_per_insert));
            rest = tail;
            let affected = self.insert_rows(&mut tx, partition, chunk).await?;
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
        sqlx::query("UPDATE bridge_offsets SET next_offset = ? WHERE sink = ? AND topic = ? AND kafka_partition = ?")
            .bind(last + 1)
            .bind(&self.sink_name)
            .bind(&self.topic)
            .bind(partition)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((partition, last + 1, counts))
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

/// What one partition's transaction wrote.
#[derive(Debug, Default)]
struct WriteCounts {
    inserted: u64,
    duplicates: u64,
    skipped: u64,
    dead: u64,
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

/// Runs futures concurrently on the current task and returns their
/// outputs in order (a few futures: each wake polls all that are pending).
pub(crate) async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(v) => *output = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
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
    fn join_all_keeps_the_order_of_its_futures() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let out = rt.block_on(join_all([30u64, 10, 20].map(|ms| async move {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            ms
        })));
        assert_eq!(out, [30, 10, 20]);
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
