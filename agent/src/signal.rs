//! Wake-ups between the batch writer and the uplink thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
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

/// The uplink's call for the batch that lingers.
///
/// A batch lingers (`outbox.batch_linger_ms`) to take more readings into one
/// commit. Once the uplink starts its next transaction, or has nothing to
/// send, lingering on only makes those readings miss it and wait a whole
/// transaction more. So the uplink calls, and the batch writer commits the
/// batch at once.
#[derive(Debug, Default)]
pub struct LingerCall {
    /// A batch with readings in it lingers now, or is being committed
    /// after it lingered.
    lingering: AtomicBool,
    /// The uplink waits for data: batches go without lingering.
    uplink_waiting: AtomicBool,
    /// Calls so far; a batch that began lingering before the count moved
    /// was called.
    calls: AtomicU64,
    notify: tokio::sync::Notify,
    /// Bumped when a batch that lingered is durable (or its write failed).
    ended: Generation,
}

impl LingerCall {
    /// Calls for the lingering batch; whether one lingered.
    pub fn call(&self) -> bool {
        if !self.lingering.load(SeqCst) {
            return false;
        }
        self.calls.fetch_add(1, SeqCst);
        self.notify.notify_one();
        true
    }

    /// The uplink starts or stops waiting for data. While it waits, batches
    /// do not linger, and one lingering when it starts is called.
    pub fn set_uplink_waiting(&self, waiting: bool) {
        self.uplink_waiting.store(waiting, SeqCst);
        if waiting {
            self.call();
        }
    }

    /// The batch writer begins to linger. `None`: do not, the uplink waits
    /// for data. `Some(mark)` for [`called_since`](Self::called_since).
    pub fn begin(&self) -> Option<u64> {
        // The mark first: a call that sees the flag set comes after it.
        let mark = self.calls.load(SeqCst);
        self.lingering.store(true, SeqCst);
        if self.uplink_waiting.load(SeqCst) {
            self.lingering.store(false, SeqCst);
            return None;
        }
        Some(mark)
    }

    /// The batch that lingered is durable, or its write failed (called or
    /// not). Nothing happens if no batch lingered.
    pub fn end(&self) {
        if self.lingering.swap(false, SeqCst) {
            self.ended.bump();
        }
    }

    /// Where the batches that lingered stand, for [`call_and_wait`](Self::call_and_wait).
    pub fn ended(&self) -> u64 {
        self.ended.current()
    }

    /// Calls for the lingering batch and waits, at most `timeout`, until a
    /// batch that lingered ended since `seen` (taken before). Whether one
    /// lingered.
    pub fn call_and_wait(&self, seen: u64, timeout: Duration) -> bool {
        if !self.call() {
            return false;
        }
        self.ended.wait_past(seen, timeout);
        true
    }

    /// Whether the uplink called since `mark`, or started waiting for data.
    pub fn called_since(&self, mark: u64) -> bool {
        self.calls.load(SeqCst) != mark || self.uplink_waiting.load(SeqCst)
    }

    #[cfg(test)]
    pub fn is_lingering(&self) -> bool {
        self.lingering.load(SeqCst)
    }

    /// Resolves at a call (possibly one made before, for an earlier batch:
    /// check [`called_since`](Self::called_since)).
    pub async fn called(&self) {
        self.notify.notified().await
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
    /// The uplink calls for the batch that lingers here.
    pub linger: LingerCall,
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
    fn a_call_reaches_only_a_lingering_batch() {
        let call = LingerCall::default();
        assert!(!call.call(), "nothing lingers");
        let mark = call.begin().expect("the uplink does not wait");
        assert!(!call.called_since(mark));
        assert!(call.call(), "a batch lingers");
        assert!(call.called_since(mark));
        call.end();
        assert!(!call.call(), "the batch went");
        // A call for an earlier batch does not reach the next one.
        let mark = call.begin().expect("the uplink does not wait");
        assert!(!call.called_since(mark));
        // The uplink waits for data: that one goes, and the next does not
        // linger.
        call.set_uplink_waiting(true);
        assert!(call.called_since(mark));
        call.end();
        assert_eq!(call.begin(), None);
        assert!(!call.is_lingering());
        call.set_uplink_waiting(false);
        assert!(call.begin().is_some());
        // Only a batch that lingered ends: one that did not moves nothing.
        let seen = call.ended();
        call.end();
        assert_eq!(call.ended(), seen + 1);
        call.end();
        assert_eq!(call.ended(), seen + 1);
    }

    /// The uplink's wait ends when the batch it called for is durable.
    #[test]
    fn the_uplink_waits_until_the_called_batch_ended() {
        let call = Arc::new(LingerCall::default());
        let mark = call.begin().expect("the uplink does not wait");
        let writer = {
            let call = call.clone();
            std::thread::spawn(move || {
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while !call.called_since(mark) {
                    assert!(std::time::Instant::now() < deadline, "never called");
                    std::thread::yield_now();
                }
                call.end();
            })
        };
        let seen = call.ended();
        assert!(call.call_and_wait(seen, Duration::from_secs(60)));
        assert_ne!(call.ended(), seen, "the wait ran out instead");
        writer.join().expect("the writer thread");
        assert!(!call.call_and_wait(call.ended(), Duration::from_secs(60)));
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
