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

/// A turn at SQLite's write lock for the uplink's trims and the cloud
/// sync's registry updates.
///
/// The batch writer takes the write lock again right after each commit.
/// A connection that finds it taken retries only after sleeping (1, 2, 5,
/// up to 100 ms), and under load it kept losing the race: trims waited
/// from 0.1 s to 3.7 s, and the uplink, which trims between transactions,
/// sent nothing meanwhile. A trim (or a registry update) now claims its
/// turn first, and the batch writer holds its next transaction back until
/// every claim is released.
#[derive(Debug, Default)]
pub struct WriteTurn {
    state: Mutex<TurnState>,
    released: Condvar,
}

#[derive(Debug, Default)]
struct TurnState {
    /// Claims held.
    claims: u32,
    /// Writers waiting for the claim to go (for tests).
    waiting: u32,
}

impl WriteTurn {
    /// Claims the next turn until the returned claim is dropped.
    pub fn claim(&self) -> TurnClaim<'_> {
        if let Ok(mut state) = self.state.lock() {
            state.claims += 1;
        }
        TurnClaim(self)
    }

    /// Waits while a claim is held, or until `timeout` passes.
    pub fn wait_unclaimed(&self, timeout: Duration) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if state.claims == 0 {
            return;
        }
        state.waiting += 1;
        if let Ok((mut state, _)) = self
            .released
            .wait_timeout_while(state, timeout, |state| state.claims > 0)
        {
            state.waiting -= 1;
        }
    }

    #[cfg(test)]
    fn waiting(&self) -> u32 {
        self.state.lock().map(|s| s.waiting).unwrap_or(0)
    }
}

/// A claimed turn (see [`WriteTurn::claim`]); released when dropped.
pub struct TurnClaim<'a>(&'a WriteTurn);

impl Drop for TurnClaim<'_> {
    fn drop(&mut self) {
        if let Ok(mut state) = self.0.state.lock() {
            state.claims -= 1;
        }
        self.0.released.notify_all();
    }
}

/// Signals around the outbox.
#[derive(Debug, Default)]
pub struct OutboxSignals {
    /// Bumped after a batch is committed to SQLite.
    pub new_batch: Generation,
    /// Bumped after the uplink trimmed the outbox.
    pub space_freed: Generation,
    /// The uplink's trims and the cloud sync's registry updates claim the
    /// write lock's next turn here.
    pub write_turn: WriteTurn,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

    use super::*;

    /// Returns once a writer waits on `turn`; fails with `failure` after 30 s.
    fn until_waiting(turn: &WriteTurn, failure: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while turn.waiting() == 0 {
            assert!(std::time::Instant::now() < deadline, "{failure}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_writer_waits_until_the_claim_is_released() {
        let turn = Arc::new(WriteTurn::default());
        let released = Arc::new(AtomicBool::new(false));
        let claim = turn.claim();
        let waiter = {
            let (turn, released) = (turn.clone(), released.clone());
            std::thread::spawn(move || {
                turn.wait_unclaimed(Duration::from_secs(60));
                released.load(SeqCst)
            })
        };
        // Release only once the writer is waiting: a writer that went on
        // regardless would never be counted, and the test fails here.
        until_waiting(&turn, "the writer never waited for the claim");
        released.store(true, SeqCst);
        drop(claim);
        assert!(
            waiter.join().unwrap(),
            "the writer went on while the claim was held"
        );
        // Two claims: the writer waits for both.
        let first = turn.claim();
        let second = turn.claim();
        drop(first);
        let waiter = {
            let turn = turn.clone();
            std::thread::spawn(move || turn.wait_unclaimed(Duration::from_secs(60)))
        };
        until_waiting(&turn, "the writer went on while a second claim was held");
        drop(second);
        waiter.join().unwrap();
        // Unclaimed: no wait at all (a 60 s wait would hang the test).
        turn.wait_unclaimed(Duration::from_secs(60));
        assert_eq!(turn.waiting(), 0);
    }
}
