//! Crash points for the fault-injection tests.
//!
//! With the `fault-injection` feature (enabled only by the `edge-tests`
//! crate), `EDGE_FAULT=<point>:<n>` makes the process abort the n-th time it
//! reaches `<point>`, as abruptly as a power cut: no destructor, no flush,
//! no further write. The points sit between the steps of the exactly-once
//! chain:
//!
//! - `outbox_committed`: a batch is durable in SQLite, its sources are not
//!   acknowledged yet;
//! - `kafka_sent`: a transaction's records and marker are in Kafka, the
//!   transaction is not committed (an idle uplink's ownership check is a
//!   transaction of its marker alone, and counts here too);
//! - `kafka_committed`: the transaction is committed, the outbox is not
//!   trimmed yet.
//!
//! One point does not crash: at `kafka_commit_refused` every n-th commit
//! is reported failed instead of being made, as when the coordinator
//! refuses it; the uplink then aborts the transaction.
//!
//! Without the feature every function here is an empty inline function.

/// Every fault point, for the tests and for checking `EDGE_FAULT`.
pub const POINTS: [&str; 4] = [
    "outbox_committed",
    "kafka_sent",
    "kafka_committed",
    "kafka_commit_refused",
];

#[cfg(feature = "fault-injection")]
mod armed {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Plan {
        point: String,
        at: u64,
        seen: AtomicU64,
    }

    fn plan() -> Option<&'static Plan> {
        static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
        PLAN.get_or_init(|| {
            let spec = std::env::var("EDGE_FAULT").ok()?;
            let parsed = spec.split_once(':').and_then(|(point, n)| {
                let at = n.parse::<u64>().ok().filter(|n| *n > 0)?;
                super::POINTS.contains(&point).then(|| Plan {
                    point: point.to_string(),
                    at,
                    seen: AtomicU64::new(0),
                })
            });
            if parsed.is_none() {
                eprintln!(
                    "EDGE_FAULT={spec:?} ignored: expected <point>:<n> with n >= 1 and point one of {:?}",
                    super::POINTS
                );
            }
            parsed
        })
        .as_ref()
    }

    pub fn hit(point: &str) -> bool {
        match plan() {
            Some(p) if p.point == point => {
                let seen = p.seen.fetch_add(1, Ordering::SeqCst) + 1;
                if point == super::REPEATING {
                    seen % p.at == 0
                } else {
                    seen == p.at
                }
            }
            _ => false,
        }
    }

    pub fn crash(point: &str) -> ! {
        eprintln!("fault injection: crashing at {point}");
        std::process::abort()
    }
}

/// The point that fires at every n-th occurrence, not only the n-th.
pub const REPEATING: &str = "kafka_commit_refused";

/// True when this is an occurrence of `point` that `EDGE_FAULT` names.
#[cfg(feature = "fault-injection")]
pub fn hit(point: &str) -> bool {
    armed::hit(point)
}

/// Aborts the process, reporting the point on stderr.
#[cfg(feature = "fault-injection")]
pub fn crash(point: &str) -> ! {
    armed::crash(point)
}

/// Aborts here when `EDGE_FAULT` says so.
#[cfg(feature = "fault-injection")]
pub fn point(point: &str) {
    if hit(point) {
        crash(point)
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn hit(_point: &str) -> bool {
    false
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_point: &str) {}

#[cfg(not(feature = "fault-injection"))]
pub fn crash(point: &str) -> ! {
    unreachable!("fault point {point} reached without the fault-injection feature")
}
