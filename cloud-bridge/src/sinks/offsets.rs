//! Exactly-once bookkeeping shared by the MySQL sinks.
//!
//! Each partition of a batch is written in a transaction of its own that
//! holds both its rows and its next offset in `bridge_offsets`. The
//! transaction first locks the partition's offset row (`SELECT ... FOR
//! UPDATE`) and drops the records below the stored offset: they were
//! written already, by this instance or by another one that owned the
//! partition during a rebalance. Two instances briefly owning one partition
//! therefore serialise on that row lock and never write a record twice.
//!
//! The partitions of a batch are written concurrently, each on its own
//! connection, up to a configured number at a time: MariaDB works on them
//! in parallel. A transaction locks one partition's offset row only, so
//! concurrent transactions cannot deadlock on offsets.

use std::collections::BTreeMap;
use std::future::Future;

use futures_util::StreamExt as _;
use sqlx::{MySql, MySqlPool, Transaction};

/// A Kafka record as consumed.
#[derive(Debug, Clone)]
pub struct KafkaRecord {
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
}

/// What a batch (or one partition of it) wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteCounts {
    /// Rows inserted.
    pub inserted: u64,
    /// Rows refused by a unique key: should stay 0 with exactly-once.
    pub duplicates: u64,
    /// Records skipped because their offset was stored already.
    pub skipped: u64,
    /// Records that cannot become a row, kept as dead letters.
    pub dead: u64,
    /// Transactions committed.
    pub transactions: u64,
}

impl WriteCounts {
    fn add(&mut self, other: WriteCounts) {
        self.inserted += other.inserted;
        self.duplicates += other.duplicates;
        self.skipped += other.skipped;
        self.dead += other.dead;
        self.transactions += other.transactions;
    }
}

/// Writes the rows of one partition's fresh records inside the transaction
/// that also advances the partition's offset.
pub trait PartitionRows: Sync {
    /// `fresh` holds the records not stored yet, in offset order, without
    /// repeats; every one of them must be accounted for in `counts`
    /// (inserted, duplicate or dead).
    fn write_rows(
        &self,
        tx: &mut Transaction<'static, MySql>,
        partition: i32,
        fresh: &[&KafkaRecord],
        counts: &mut WriteCounts,
    ) -> impl Future<Output = Result<(), sqlx::Error>>;
}

/// The `bridge_offsets` rows of one sink and topic.
#[derive(Debug, Clone)]
pub struct OffsetTable {
    pub pool: MySqlPool,
    pub sink_name: String,
    pub topic: String,
    /// Partitions written at the same time, each on its own connection.
    pub concurrency: usize,
}

impl OffsetTable {
    /// The next offset to consume for each partition, as stored. A
    /// partition never written has no entry.
    pub async fn stored(&self, partitions: &[i32]) -> Result<BTreeMap<i32, i64>, sqlx::Error> {
        let mut out = BTreeMap::new();
        for p in partitions {
            let next: Option<i64> = sqlx::query_scalar(
                "SELECT next_offset FROM bridge_offsets WHERE sink = ? AND topic = ? AND kafka_partition = ?",
            )
            .bind(&self.sink_name)
            .bind(&self.topic)
            .bind(p)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(next) = next {
                out.insert(*p, next);
            }
        }
        Ok(out)
    }

    /// Writes a batch, one transaction per partition. Returns the next
    /// offset per partition as committed, and what was written.
    ///
    /// # Errors
    ///
    /// The first error of any partition. The partitions whose transaction
    /// committed stay committed: when the caller writes the batch again,
    /// their records are below the stored offsets and skipped.
    pub async fn write<R: PartitionRows>(
        &self,
        rows: &R,
        records: &[KafkaRecord],
    ) -> Result<(BTreeMap<i32, i64>, WriteCounts), sqlx::Error> {
        let mut by_partition: BTreeMap<i32, Vec<&KafkaRecord>> = BTreeMap::new();
        for r in records {
            by_partition.entry(r.partition).or_default().push(r);
        }
        let outcomes: Vec<_> = futures_util::stream::iter(by_partition)
            .map(|(partition, recs)| async move {
                (partition, self.write_partition(rows, partition, recs).await)
            })
            .buffer_unordered(self.concurrency.max(1))
            .collect()
            .await;
        let mut committed = BTreeMap::new();
        let mut counts = WriteCounts::default();
        let mut first_error = None;
        for (partition, outcome) in outcomes {
            match outcome {
                Ok((next, c)) => {
                    committed.insert(partition, next);
                    counts.add(c);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok((committed, counts)),
        }
    }

    /// One partition's rows and its next offset in one transaction.
    async fn write_partition<R: PartitionRows>(
        &self,
        rows: &R,
        partition: i32,
        mut recs: Vec<&KafkaRecord>,
    ) -> Result<(i64, WriteCounts), sqlx::Error> {
        recs.sort_by_key(|r| r.offset);
        // A partition revoked and assigned back is read again from the
        // stored offset while earlier records are still in the batch.
        recs.dedup_by_key(|r| r.offset);
        let mut tx = self.pool.begin().await?;
        let next = self.lock_next_offset(&mut tx, partition).await?;
        let mut counts = WriteCounts {
            transactions: 1,
            ..WriteCounts::default()
        };
        let unique = recs.len();
        recs.retain(|r| r.offset >= next);
        counts.skipped = (unique - recs.len()) as u64;
        let Some(last) = recs.last().map(|r| r.offset) else {
            tx.commit().await?;
            return Ok((next, counts));
        };
        rows.write_rows(&mut tx, partition, &recs, &mut counts)
            .await?;
        sqlx::query(
            "UPDATE bridge_offsets SET next_offset = ? WHERE sink = ? AND topic = ? AND kafka_partition = ?",
        )
        .bind(last + 1)
        .bind(&self.sink_name)
        .bind(&self.topic)
        .bind(partition)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((last + 1, counts))
    }

    /// Locks the partition's offset row for the transaction and returns the
    /// stored next offset (0 for a partition never written).
    async fn lock_next_offset(
        &self,
        tx: &mut Transaction<'static, MySql>,
        partition: i32,
    ) -> Result<i64, sqlx::Error> {
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
        .execute(&mut **tx)
        .await?;
        sqlx::query_scalar(
            "SELECT next_offset FROM bridge_offsets WHERE sink = ? AND topic = ? AND kafka_partition = ? FOR UPDATE",
        )
        .bind(&self.sink_name)
        .bind(&self.topic)
        .bind(partition)
        .fetch_one(&mut **tx)
        .await
    }
}
