//! Checkpoints of the write-ahead log on a thread of their own.
//!
//! A commit appends pages to SQLite's write-ahead log; a checkpoint copies
//! them into the database file and syncs the log before and the database
//! after, and only once every page in the log is copied can the log start
//! over. SQLite's automatic checkpoint runs on the committing thread: the
//! batch writer would wait for both syncs every few MiB, which is most of
//! the time an import spends neither computing nor in the kernel.
//!
//! Here the writer's commits tell a thread with its own connection to
//! checkpoint each time the log has grown by a step ([`STEP_BYTES`] of
//! pages) since the last checkpoint, and the writer goes on meanwhile. A
//! passive checkpoint copies what was committed when it started, and a
//! writer that commits while every checkpoint runs would never let the log
//! start over. So once the log holds [`BOUND_STEPS`] steps, the writer
//! waits for the thread and copies the rest itself, as SQLite would: the
//! log stays within that bound plus the batch that crossed it (which
//! `outbox.disk_reserve_bytes` covers), unless a reader holds on to older
//! pages, as with SQLite's own checkpoints.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rusqlite::Connection;

/// The log's bound, in steps: past it the writer checkpoints itself.
pub(super) const BOUND_STEPS: u32 = 4;

/// Bytes of log pages per step.
pub(super) const STEP_BYTES: i64 = 2 << 20;

pub(super) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Pages the log grows by between two checkpoints.
    step: u32,
}

struct Shared {
    /// Pages in the log after the writer's last commit (its WAL hook).
    pages: AtomicU32,
    /// The log started over since the writer last looked (it shrank).
    restarted: AtomicBool,
    state: Mutex<State>,
    /// The thread waits here for work, the writer for the thread.
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// The writer asked for a checkpoint the thread has not started.
    requested: bool,
    /// A checkpoint is running on the thread.
    running: bool,
    /// Log pages copied by the last checkpoint (0 after the log started
    /// over): the next one is due a step later.
    copied: u32,
    /// Checkpoints the thread completed, for tests and the debug log.
    completed: u64,
    /// The thread is held back: while the writer runs a checkpoint of its
    /// own ([`Checkpointer::exclusive`]), and in tests (as a slow disk or
    /// a busy core would).
    held: bool,
    stop: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters behind.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Checkpointer {
    /// Starts the thread on `conn`, a second connection to the database
    /// `writer` writes, and hooks the writer's commits. The writer's own
    /// automatic checkpoint is off from now on (the hook replaces it).
    pub(super) fn start(
        writer: &mut Connection,
        conn: Connection,
        page_size: i64,
    ) -> Result<Self, std::io::Error> {
        let step = u32::try_from((STEP_BYTES / page_size.max(512)).max(1)).unwrap_or(u32::MAX);
        let shared = Arc::new(Shared {
            pages: AtomicU32::new(0),
            restarted: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("wal-checkpoint".into())
            .spawn(move || run(&for_thread, &conn))?;
        let hooked = shared.clone();
        let hook = move |_: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
            let pages = u32::try_from(pages).unwrap_or(0);
            if hooked.pages.swap(pages, Ordering::Relaxed) > pages {
                hooked.restarted.store(true, Ordering::Relaxed);
            }
            // An error here would fail a statement whose commit is done.
            Ok(())
        };
        if let Err(e) = writer.wal_hook(Some(hook)) {
            shared.lock().stop = true;
            shared.changed.notify_all();
            let _ = thread.join();
            return Err(std::io::Error::other(e));
        }
        Ok(Self {
            shared,
            thread: Some(thread),
            step,
        })
    }

    /// After one of the writer's commits on `writer`: asks the thread for
    /// a checkpoint when one is due, or copies the log itself when it
    /// reached its bound.
    pub(super) fn committed(&self, writer: &Connection) {
        let pages = self.shared.pages.load(Ordering::Relaxed);
        if pages < self.step {
            return;
        }
        let mut state = self.shared.lock();
        if self.shared.restarted.swap(false, Ordering::Relaxed) || pages < state.copied {
            // The log started over since that checkpoint.
            state.copied = 0;
        }
        if pages >= self.step.saturating_mul(BOUND_STEPS) {
            state.requested = false;
            drop(self.idle(state));
            if let Some(copied) = passive_checkpoint(writer, "the batch writer, at the log's bound")
            {
                self.shared.lock().copied = copied;
            }
            return;
        }
        if pages >= state.copied.saturating_add(self.step) && !state.running && !state.requested {
            state.requested = true;
            self.shared.changed.notify_all();
        }
    }

    /// Waits until no checkpoint runs on the thread. A thread that died (it
    /// cannot, short of a bug) would leave `running` set: this looks every
    /// 100 ms rather than wait forever.
    fn idle<'a>(&self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        while state.running && !self.thread.as_ref().is_none_or(|t| t.is_finished()) {
            state = self
                .shared
                .changed
                .wait_timeout(state, std::time::Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state
    }

    /// Runs `f` (a checkpoint of the writer's own) with the thread held
    /// back and no checkpoint of its in progress.
    pub(super) fn exclusive<T>(&self, f: impl FnOnce() -> T) -> T {
        let mut state = self.shared.lock();
        state.held = true;
        state.requested = false;
        drop(self.idle(state));
        let out = f();
        self.shared.lock().held = false;
        self.shared.changed.notify_all();
        out
    }

    /// Holds the thread back from checkpointing, or lets it go.
    #[cfg(test)]
    pub(super) fn hold(&self, held: bool) {
        self.shared.lock().held = held;
        self.shared.changed.notify_all();
    }

    /// Checkpoints the thread completed.
    #[cfg(test)]
    pub(super) fn completed(&self) -> u64 {
        self.shared.lock().completed
    }

    /// Pages in the log after the writer's last commit.
    #[cfg(test)]
    pub(super) fn pages(&self) -> u32 {
        self.shared.pages.load(Ordering::Relaxed)
    }

    /// Pages per step.
    #[cfg(test)]
    pub(super) fn step(&self) -> u32 {
        self.step
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `PRAGMA wal_checkpoint(PASSIVE)` on `conn`, run by `by` (for the log):
/// how many of the log's pages are in the database now, or `None` when it
/// failed (logged; the next commit asks again).
fn passive_checkpoint(conn: &Connection, by: &str) -> Option<u32> {
    let started = std::time::Instant::now();
    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    });
    match result {
        Ok((log, copied)) => {
            tracing::debug!(
                log_pages = log,
                copied,
                by,
                ms = started.elapsed().as_millis() as u64,
                "write-ahead log checkpointed"
            );
            Some(u32::try_from(copied).unwrap_or(0))
        }
        Err(e) => {
            tracing::warn!(error = %e, by, "checkpointing the write-ahead log failed; the next commit asks again");
            None
        }
    }
}

fn run(shared: &Shared, conn: &Connection) {
    let mut state = shared.lock();
    loop {
        while (!state.requested || state.held) && !state.stop {
            state = shared
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        if state.stop {
            return;
        }
        state.requested = false;
        state.running = true;
        drop(state);
        let result = passive_checkpoint(conn, "the checkpoint thread");
        state = shared.lock();
        state.running = false;
        if let Some(copied) = result {
            state.copied = copied;
            state.completed += 1;
        }
        shared.changed.notify_all();
    }
}
