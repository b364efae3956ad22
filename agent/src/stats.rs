//! Counters shared by the pipeline stages and the live progress line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::registry::RegistryInfo;
use crate::transforms::enrich::PlaneCounters;
use crate::transforms::validate::RejectReason;

/// State of the Kafka uplink as shown to people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UplinkState {
    Starting,
    Connecting,
    Up,
    Down(String),
    Fenced,
    Stopped,
}

#[derive(Debug)]
pub struct Stats {
    /// Inputs handed over by sources.
    pub received: AtomicU64,
    /// Readings accepted into the outbox.
    pub valid: AtomicU64,
    /// Inputs rejected (see `rejects`).
    pub rejected: AtomicU64,
    /// Readings already seen (same device and seq), dropped.
    pub duplicates: AtomicU64,
    /// Outbox batches committed to SQLite by this process.
    pub batches_written: AtomicU64,
    /// Bytes of batch bodies written by this process.
    pub bytes_written: AtomicU64,
    /// Batches and bytes waiting for the uplink.
    pub outbox_batches: AtomicU64,
    pub outbox_bytes: AtomicU64,
    /// True while the outbox is at its bound and input is held back.
    pub outbox_full: AtomicBool,
    /// Readings deleted unsent by the drop-oldest policy.
    pub dropped_records: AtomicU64,
    /// Highest outbox batch committed to Kafka (the marker).
    pub kafka_committed_batch: AtomicI64,
    pub kafka_records_committed: AtomicU64,
    pub kafka_transactions: AtomicU64,
    /// Uplink sessions that failed and are retried (Kafka unreachable, a
    /// transaction refused, ...). A stop is none.
    pub uplink_failures: AtomicU64,
    /// Time the uplink spent, in microseconds: reading batches from the
    /// outbox, rendering their records and queueing them to the producer
    /// (load); committing the transaction, from its marker to the commit's
    /// answer (transaction); trimming the outbox after it (trim).
    pub uplink_load_micros: AtomicU64,
    pub kafka_transaction_micros: AtomicU64,
    pub outbox_trim_micros: AtomicU64,
    /// How long each outbox write (a batch, or rejects alone) took to become
    /// durable: encoding, the SQLite transaction and its sync (SQLite's
    /// wait for its write lock included). Input is acknowledged right after.
    pub outbox_commit_latency: LatencyHistogram,
    /// How long each Kafka transaction of outbox batches took to commit,
    /// from its marker to the commit's answer (as `kafka_transaction_micros`);
    /// with overlapping transactions, without the time its commit waited
    /// for the previous one.
    pub kafka_commit_latency: LatencyHistogram,
    pub uplink: Mutex<UplinkState>,
    /// Unix ms of the batch writer's last sign of life (it wakes at least
    /// once a second); feeds the systemd watchdog.
    pub writer_heartbeat_ms: AtomicI64,
    /// Rejections per reason, since start.
    pub rejects: Mutex<BTreeMap<RejectReason, u64>>,
    /// Geofence and threshold alerts raised.
    pub alerts: AtomicU64,
    /// Registry cache and lookup counters, as of the last batch.
    pub plane: Mutex<PlaneCounters>,
    /// Devices with a high-water mark (ever seen by this gateway).
    pub devices_known: AtomicU64,
    /// The registry in use, if any.
    pub registry: Mutex<Option<RegistryInfo>>,
    /// Cloud sync of the registry (all zero while it is off).
    pub registry_sync: RegistrySyncStats,
}

/// Upper bounds of [`LatencyHistogram`]'s buckets, in microseconds: from
/// a quarter of a millisecond (a sync on a fast disk) to 10 s (a stalled
/// one), a few per decade so that a p99 can be told from 10 ms.
pub const LATENCY_BUCKETS_MICROS: [u64; 16] = [
    250, 500, 1_000, 2_000, 3_000, 5_000, 7_500, 10_000, 15_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000, 2_500_000, 10_000_000,
];

/// Quantile `q` of a histogram given as (upper bound in ms, cumulative
/// count) in ascending order, the last bound infinite: the bound of the
/// first bucket that holds it, `None` when the histogram is empty.
pub fn bucket_quantile_ms(cumulative: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = cumulative.last().map_or(0, |&(_, n)| n);
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    cumulative
        .iter()
        .find(|&&(_, n)| n >= rank)
        .map(|&(bound, _)| bound)
}

/// A latency histogram with fixed buckets, shown as a Prometheus
/// histogram. Lock-free: a relaxed add to one bucket and to the sum.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS_MICROS.len() + 1],
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, elapsed: std::time::Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_MICROS.partition_point(|&bound| bound < micros);
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(micros, Relaxed);
    }

    /// How many were observed.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|n| n.load(Relaxed)).sum()
    }

    /// The upper bound, in milliseconds, of the bucket that holds quantile
    /// `q` of what was observed (infinite past the last bound); `None` when
    /// nothing was.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let (buckets, _) = self.snapshot();
        let in_ms: Vec<(f64, u64)> = buckets
            .into_iter()
            .map(|(bound, n)| (bound.map_or(f64::INFINITY, |seconds| seconds * 1000.0), n))
            .collect();
        bucket_quantile_ms(&in_ms, q)
    }

    /// Cumulative counts per upper bound in seconds (`None`: +Inf, whose
    /// count is the total) and the sum in seconds, as Prometheus shows them.
    pub fn snapshot(&self) -> (Vec<(Option<f64>, u64)>, f64) {
        let mut cumulative = 0;
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                cumulative += n.load(Relaxed);
                let bound = LATENCY_BUCKETS_MICROS.get(i).map(|&b| b as f64 / 1e6);
                (bound, cumulative)
            })
            .collect();
        (buckets, self.sum_micros.load(Relaxed) as f64 / 1e6)
    }
}

/// What one cloud sync attempt ended with (the `result` label of
/// `edge_registry_sync_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncResult {
    /// 200: a new registry was applied.
    Updated,
    /// 304 (or 200 with the ETag in use): the copy in use is current.
    Unchanged,
    /// The document was refused as a whole; the last good copy stays.
    Rejected,
    /// No answer, or an HTTP error: the last good copy stays.
    Failed,
}

impl SyncResult {
    pub const ALL: [SyncResult; 4] = [
        SyncResult::Updated,
        SyncResult::Unchanged,
        SyncResult::Rejected,
        SyncResult::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SyncResult::Updated => "updated",
            SyncResult::Unchanged => "unchanged",
            SyncResult::Rejected => "rejected",
            SyncResult::Failed => "failed",
        }
    }
}

/// Counters of the registry's cloud sync.
#[derive(Debug, Default)]
pub struct RegistrySyncStats {
    /// True once the sync task runs (the sync metrics are shown then).
    pub enabled: AtomicBool,
    /// Unix ms at which the registry in use was last known current: the
    /// last successful sync (200 or 304), or, before one succeeded in this
    /// process, when the registry was applied (when the sync started if no
    /// registry was ever applied).
    pub fresh_ms: AtomicI64,
    results: [AtomicU64; 4],
}

impl RegistrySyncStats {
    pub fn count(&self, result: SyncResult) {
        self.results[result as usize].fetch_add(1, Relaxed);
    }

    pub fn total(&self, result: SyncResult) -> u64 {
        self.results[result as usize].load(Relaxed)
    }

    /// Seconds since the registry was last known current; `None` while the
    /// sync is off.
    pub fn age_seconds(&self, now_ms: i64) -> Option<f64> {
        self.enabled
            .load(Relaxed)
            .then(|| (now_ms - self.fresh_ms.load(Relaxed)).max(0) as f64 / 1000.0)
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            received: AtomicU64::new(0),
            valid: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            batches_written: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            outbox_batches: AtomicU64::new(0),
            outbox_bytes: AtomicU64::new(0),
            outbox_full: AtomicBool::new(false),
            dropped_records: AtomicU64::new(0),
            kafka_committed_batch: AtomicI64::new(0),
            kafka_records_committed: AtomicU64::new(0),
            kafka_transactions: AtomicU64::new(0),
            uplink_failures: AtomicU64::new(0),
            uplink_load_micros: AtomicU64::new(0),
            kafka_transaction_micros: AtomicU64::new(0),
            outbox_trim_micros: AtomicU64::new(0),
            outbox_commit_latency: LatencyHistogram::default(),
            kafka_commit_latency: LatencyHistogram::default(),
            uplink: Mutex::new(UplinkState::Starting),
            writer_heartbeat_ms: AtomicI64::new(0),
            rejects: Mutex::new(BTreeMap::new()),
            alerts: AtomicU64::new(0),
            plane: Mutex::new(PlaneCounters::default()),
            devices_known: AtomicU64::new(0),
            registry: Mutex::new(None),
            registry_sync: RegistrySyncStats::default(),
        }
    }
}

impl Stats {
    pub fn set_uplink(&self, state: UplinkState) {
        if let Ok(mut s) = self.uplink.lock() {
            *s = state;
        }
    }

    pub fn uplink_state(&self) -> UplinkState {
        self.uplink
            .lock()
            .map(|s| s.clone())
            .unwrap_or(UplinkState::Starting)
    }

    pub fn set_plane(&self, counters: PlaneCounters) {
        if let Ok(mut p) = self.plane.lock() {
            *p = counters;
        }
    }

    pub fn set_registry_info(&self, info: Option<RegistryInfo>) {
        if let Ok(mut r) = self.registry.lock() {
            *r = info;
        }
    }

    pub fn registry_info(&self) -> Option<RegistryInfo> {
        self.registry.lock().ok().and_then(|r| r.clone())
    }

    pub fn plane(&self) -> PlaneCounters {
        self.plane.lock().map(|p| *p).unwrap_or_default()
    }

    pub fn count_reject(&self, reason: RejectReason) {
        self.rejected.fetch_add(1, Relaxed);
        if let Ok(mut map) = self.rejects.lock() {
            *map.entry(reason).or_insert(0) += 1;
        }
    }

    pub fn rejects_by_reason(&self) -> BTreeMap<RejectReason, u64> {
        self.rejects.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// One human-readable progress line.
    pub fn progress_line(&self) -> String {
        let mut line = format!(
            "in {} valid {} rejected {} dup {} | outbox {} batches {} KiB{} | uplink ",
            self.received.load(Relaxed),
            self.valid.load(Relaxed),
            self.rejected.load(Relaxed),
            self.duplicates.load(Relaxed),
            self.outbox_batches.load(Relaxed),
            self.outbox_bytes.load(Relaxed) / 1024,
            if self.outbox_full.load(Relaxed) {
                " FULL (holding input)"
            } else {
                ""
            },
        );
        let _ = match self.uplink_state() {
            UplinkState::Starting => write!(line, "starting"),
            UplinkState::Connecting => write!(line, "connecting"),
            UplinkState::Up => write!(line, "up"),
            UplinkState::Down(why) => write!(line, "DOWN ({why}), outbox absorbing"),
            UplinkState::Fenced => write!(line, "FENCED"),
            UplinkState::Stopped => write!(line, "stopped"),
        };
        let _ = write!(
            line,
            ", {} records in {} transactions, marker batch {}",
            self.kafka_records_committed.load(Relaxed),
            self.kafka_transactions.load(Relaxed),
            self.kafka_committed_batch.load(Relaxed)
        );
        let dropped = self.dropped_records.load(Relaxed);
        if dropped > 0 {
            let _ = write!(
                line,
                " | DROPPED {dropped} readings (outbox.when_full = drop_oldest)"
            );
        }
        let rejects = self.rejects_by_reason();
        if !rejects.is_empty() {
            line.push_str(" | rejects:");
            for (reason, n) in rejects {
                let _ = write!(line, " {}={n}", reason.code());
            }
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_latency_lands_in_the_first_bucket_whose_bound_holds_it() {
        let h = LatencyHistogram::default();
        // On a bound, just past it, past the last bound.
        h.observe(Duration::from_micros(250));
        h.observe(Duration::from_micros(10_001));
        h.observe(Duration::from_secs(60));
        let (buckets, sum) = h.snapshot();
        assert_eq!(buckets.len(), LATENCY_BUCKETS_MICROS.len() + 1);
        let count_at = |bound: Option<f64>| {
            buckets
                .iter()
                .find(|(b, _)| *b == bound)
                .map(|(_, n)| *n)
                .expect("a bucket with this bound")
        };
        assert_eq!(count_at(Some(0.00025)), 1);
        assert_eq!(
            count_at(Some(0.01)),
            1,
            "10.001 ms is above the 10 ms bound"
        );
        assert_eq!(count_at(Some(0.015)), 2);
        assert_eq!(count_at(Some(10.0)), 2);
        assert_eq!(count_at(None), 3);
        assert!(
            (sum - (0.00025 + 0.010001 + 60.0)).abs() < 1e-9,
            "sum {sum}"
        );
        assert_eq!(h.count(), 3);
        // Ranks 1, 2 and 3 of 3.
        assert_eq!(h.quantile_ms(0.2), Some(0.25));
        assert_eq!(h.quantile_ms(0.5), Some(15.0));
        assert_eq!(h.quantile_ms(0.99), Some(f64::INFINITY));
        assert_eq!(LatencyHistogram::default().quantile_ms(0.5), None);
    }
}
