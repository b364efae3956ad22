//! Wake-ups between the batch writer and the uplink thread.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// A generation counter with a condition variable: waiters wake when it
/// moves or their timeout passes, so no wake-up is ever lost.
#[derive(Debug, Default)]
pub struct Generation {
    value: Mutex<u64>,
    changed: Condvar,
}

impl Generation {
    pub fn current(&self) -> u64 {
        self.value.lock().map(|v| *v).unwrap_or(0)
    }

    pub fn bump(&self) {
        if let Ok(mut v) = self.value.lock() {
            *v += 1;
        }
        self.changed.notify_all();
    }

    /// Waits until the generation differs from `seen` or `timeout` passes.
    pub fn wait_past(&self, seen: u64, timeout: Duration) {
        let Ok(guard) = self.value.lock() else { return };
        let _ = self
            .changed
            .wait_timeout_while(guard, timeout, |v| *v == seen);
    }
}

/// Signals around the outbox.
#[derive(Debug, Default)]
pub struct OutboxSignals {
    /// Bumped after a batch is committed to SQLite.
    pub new_batch: Generation,
    /// Bumped after the uplink trimmed the outbox.
    pub space_freed: Generation,
}
