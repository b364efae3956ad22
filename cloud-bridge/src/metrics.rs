//! The bridge's Prometheus metrics: per route, records consumed, rows or
//! documents written, batch latency, errors by kind, and consumer lag per
//! partition (from librdkafka's statistics); API requests by status.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::config::Route;
use crate::sinks::mysql::MysqlSinkStats;

/// Upper bounds (seconds) of the batch latency histogram.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }
}

/// Counters of one route.
pub struct RouteMetrics {
    pub topic: String,
    pub sink: &'static str,
    /// Records consumed from Kafka.
    pub records: AtomicU64,
    /// Rows inserted or documents indexed.
    pub written: AtomicU64,
    pub batches: AtomicU64,
    batch_seconds: Histogram,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Consumer lag per partition, from librdkafka statistics.
    lag: Mutex<BTreeMap<i32, i64>>,
    /// The route's consumer thread is running.
    pub running: AtomicBool,
    /// The consumer group's state, from librdkafka statistics.
    group: Mutex<GroupState>,
}

/// Whether a route's consumer is a steady member of its group.
#[derive(Debug, Default)]
struct GroupState {
    /// Since when the group has not been steady; `None` while it is.
    unsteady_since: Option<Instant>,
    /// Statistics arrived since the consumer was created (none arrive
    /// when `statistics.interval.ms` is 0: then nothing is known).
    reported: bool,
    /// librdkafka's group state and join state, as last reported.
    state: String,
    join_state: String,
}

impl RouteMetrics {
    pub fn batch_done(&self, took: Duration, written: u64) {
        self.batches.fetch_add(1, Relaxed);
        self.written.fetch_add(written, Relaxed);
        self.batch_seconds.observe(took);
    }

    pub fn error(&self, kind: &'static str) {
        if let Ok(mut e) = self.errors.lock() {
            *e.entry(kind).or_default() += 1;
        }
    }

    pub fn errors_of(&self, kind: &str) -> u64 {
        self.errors
            .lock()
            .map(|e| e.get(kind).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Takes in librdkafka's latest statistics: consumer lag and the
    /// consumer group's state.
    pub fn set_statistics(&self, stats: &rdkafka::Statistics) {
        self.set_lag(stats);
        if let Some(cgrp) = &stats.cgrp
            && let Ok(mut g) = self.group.lock()
        {
            let steady = cgrp.state == "up" && cgrp.join_state == "steady";
            if steady {
                g.unsteady_since = None;
            } else if g.unsteady_since.is_none() {
                g.unsteady_since = Some(Instant::now());
            }
            g.reported = true;
            g.state.clone_from(&cgrp.state);
            g.join_state.clone_from(&cgrp.join_state);
        }
    }

    /// A new consumer: not a steady member of its group until librdkafka
    /// reports it so.
    pub fn group_starting(&self) {
        if let Ok(mut g) = self.group.lock() {
            *g = GroupState {
                unsteady_since: Some(Instant::now()),
                ..GroupState::default()
            };
        }
    }

    /// Counts an unsteady group's time from now on.
    pub fn group_restart_clock(&self) {
        if let Ok(mut g) = self.group.lock()
            && g.unsteady_since.is_some()
        {
            g.unsteady_since = Some(Instant::now());
        }
    }

    /// How long the consumer has not been a steady member of its group,
    /// with librdkafka's last group state and join state; `None` while it
    /// is steady, or when librdkafka reports no statistics.
    pub fn group_unsteady(&self) -> Option<(Duration, String, String)> {
        let g = self.group.lock().ok()?;
        if !g.reported {
            return None;
        }
        g.unsteady_since
            .map(|since| (since.elapsed(), g.state.clone(), g.join_state.clone()))
    }

    /// Replaces the lag figures with librdkafka's latest statistics.
    fn set_lag(&self, stats: &rdkafka::Statistics) {
        let Some(topic) = stats.topics.get(&self.topic) else {
            return;
        };
        let lag: BTreeMap<i32, i64> = topic
            .partitions
            .iter()
            .filter(|(p, part)| **p >= 0 && part.consumer_lag >= 0)
            .map(|(p, part)| (*p, part.consumer_lag))
            .collect();
        if let Ok(mut l) = self.lag.lock() {
            *l = lag;
        }
    }
}

/// Every metric of a bridge process.
pub struct Metrics {
    pub routes: Vec<RouteMetrics>,
    /// The metrics sink's own counters (duplicates refused by the key...).
    pub mysql: std::sync::Arc<MysqlSinkStats>,
    api: Mutex<BTreeMap<(String, u16), u64>>,
}

fn sink_label(sink: crate::config::SinkKind) -> &'static str {
    match sink {
        crate::config::SinkKind::MysqlMetrics => "mysql_metrics",
        crate::config::SinkKind::MysqlDlq => "mysql_dlq",
        crate::config::SinkKind::Opensearch => "opensearch",
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn new(routes: &[Route], mysql: std::sync::Arc<MysqlSinkStats>) -> Self {
        Self {
            routes: routes
                .iter()
                .map(|r| RouteMetrics {
                    topic: r.topic.clone(),
                    sink: sink_label(r.sink),
                    records: AtomicU64::new(0),
                    written: AtomicU64::new(0),
                    batches: AtomicU64::new(0),
                    batch_seconds: Histogram::default(),
                    errors: Mutex::new(BTreeMap::new()),
                    lag: Mutex::new(BTreeMap::new()),
                    running: AtomicBool::new(false),
                    group: Mutex::new(GroupState::default()),
                })
                .collect(),
            mysql,
            api: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn api_request(&self, route: &str, status: u16) {
        if let Ok(mut a) = self.api.lock() {
            *a.entry((route.to_string(), status)).or_default() += 1;
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let family = |name: &str, kind: &str, help: &str, out: &mut String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            "bridge_records_consumed_total",
            "counter",
            "Kafka records consumed, per route.",
            &mut out,
        );
        for r in &self.routes {
            let _ = writeln!(
                out,
                "bridge_records_consumed_total{{topic=\"{}\",sink=\"{}\"}} {}",
                label(&r.topic),
                r.sink,
                r.records.load(Relaxed)
            );
        }
        family(
            "bridge_written_total",
            "counter",
            "Rows inserted or documents indexed, per route (rate() gives rows/s).",
            &mut out,
        );
        for r in &self.routes {
            let _ = writeln!(
                out,
                "bridge_written_total{{topic=\"{}\",sink=\"{}\"}} {}",
                label(&r.topic),
                r.sink,
                r.written.load(Relaxed)
            );
        }
        family(
            "bridge_batch_seconds",
            "histogram",
            "Time to write one batch with its offsets, per route.",
            &mut out,
        );
        for r in &self.routes {
            let l = format!("topic=\"{}\",sink=\"{}\"", label(&r.topic), r.sink);
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "bridge_batch_seconds_bucket{{{l},le=\"{b}\"}} {}",
                    r.batch_seconds.counts[i].load(Relaxed)
                );
            }
            let count = r.batch_seconds.count.load(Relaxed);
            let _ = writeln!(
                out,
                "bridge_batch_seconds_bucket{{{l},le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "bridge_batch_seconds_sum{{{l}}} {}",
                r.batch_seconds.sum_micros.load(Relaxed) as f64 / 1e6
            );
            let _ = writeln!(out, "bridge_batch_seconds_count{{{l}}} {count}");
        }
        family(
            "bridge_errors_total",
            "counter",
            "Errors by route and kind (each is retried or dead-lettered, never dropped).",
            &mut out,
        );
        for r in &self.routes {
            if let Ok(errors) = r.errors.lock() {
                for (kind, n) in errors.iter() {
                    let _ = writeln!(
                        out,
                        "bridge_errors_total{{topic=\"{}\",sink=\"{}\",kind=\"{kind}\"}} {n}",
                        label(&r.topic),
                        r.sink
                    );
                }
            }
        }
        family(
            "bridge_consumer_lag",
            "gauge",
            "Records behind the partition's end, per route and partition (librdkafka statistics).",
            &mut out,
        );
        for r in &self.routes {
            if let Ok(lag) = r.lag.lock() {
                for (p, n) in lag.iter() {
                    let _ = writeln!(
                        out,
                        "bridge_consumer_lag{{topic=\"{}\",sink=\"{}\",partition=\"{p}\"}} {n}",
                        label(&r.topic),
                        r.sink
                    );
                }
            }
        }
        family(
            "bridge_route_up",
            "gauge",
            "1 while the route's consumer runs.",
            &mut out,
        );
        for r in &self.routes {
            let _ = writeln!(
                out,
                "bridge_route_up{{topic=\"{}\",sink=\"{}\"}} {}",
                label(&r.topic),
                r.sink,
                u8::from(r.running.load(Relaxed))
            );
        }
        let m = &self.mysql;
        for (name, help, v) in [
            (
                "bridge_mysql_duplicate_rows_total",
                "Rows refused by the (device_id, seq) key: 0 with exactly-once.",
                &m.duplicate_rows,
            ),
            (
                "bridge_mysql_records_already_stored_total",
                "Records skipped because bridge_offsets showed them written (replays after a rebalance).",
                &m.records_already_stored,
            ),
            (
                "bridge_mysql_dead_letters_total",
                "Metrics records that cannot become rows, kept in bridge_dead_letters.",
                &m.dead_letters,
            ),
        ] {
            family(name, "counter", help, &mut out);
            let _ = writeln!(out, "{name} {}", v.load(Relaxed));
        }
        family(
            "bridge_api_requests_total",
            "counter",
            "Registry API requests by route and status.",
            &mut out,
        );
        if let Ok(api) = self.api.lock() {
            for ((route, status), n) in api.iter() {
                let _ = writeln!(
                    out,
                    "bridge_api_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                    label(route)
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_watch_follows_librdkafka_statistics() {
        let routes = crate::BridgeConfig::load(None, |_| None)
            .unwrap()
            .effective_routes();
        let m = Metrics::new(&routes, Default::default());
        let r = &m.routes[0];
        let stats = |state: &str, join: &str| rdkafka::Statistics {
            cgrp: Some(rdkafka::statistics::ConsumerGroup {
                state: state.into(),
                join_state: join.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        r.group_starting();
        // Nothing known until librdkafka reports (statistics may be off).
        assert!(r.group_unsteady().is_none());
        r.set_statistics(&stats("wait-coord", "init"));
        let (since, state, join) = r.group_unsteady().unwrap();
        assert_eq!((state.as_str(), join.as_str()), ("wait-coord", "init"));
        r.set_statistics(&stats("up", "steady"));
        assert!(r.group_unsteady().is_none());
        // Unsteady again: counted from this report, not from the first
        // one (which is at least `pause` old by now).
        let pause = Duration::from_millis(200);
        std::thread::sleep(pause);
        r.set_statistics(&stats("up", "wait-join"));
        assert!(r.group_unsteady().unwrap().0 < since + pause);
        std::thread::sleep(pause);
        r.group_restart_clock();
        assert!(r.group_unsteady().unwrap().0 < pause);
        r.set_statistics(&stats("up", "steady"));
        r.group_restart_clock();
        assert!(r.group_unsteady().is_none());
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_labels_escaped() {
        let routes = crate::BridgeConfig::load(None, |_| None)
            .unwrap()
            .effective_routes();
        let m = Metrics::new(&routes, Default::default());
        m.routes[0].batch_done(Duration::from_millis(7), 10);
        m.routes[0].batch_done(Duration::from_millis(300), 5);
        m.routes[0].error("mysql_write");
        m.api_request("registry", 304);
        let text = m.render();
        for line in [
            "bridge_batch_seconds_bucket{topic=\"rich-iot-data\",sink=\"mysql_metrics\",le=\"0.005\"} 0",
            "bridge_batch_seconds_bucket{topic=\"rich-iot-data\",sink=\"mysql_metrics\",le=\"0.01\"} 1",
            "bridge_batch_seconds_bucket{topic=\"rich-iot-data\",sink=\"mysql_metrics\",le=\"0.5\"} 2",
            "bridge_batch_seconds_count{topic=\"rich-iot-data\",sink=\"mysql_metrics\"} 2",
            "bridge_written_total{topic=\"rich-iot-data\",sink=\"mysql_metrics\"} 15",
            "bridge_errors_total{topic=\"rich-iot-data\",sink=\"mysql_metrics\",kind=\"mysql_write\"} 1",
            "bridge_api_requests_total{route=\"registry\",status=\"304\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
