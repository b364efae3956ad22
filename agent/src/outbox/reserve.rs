//! Room kept on the data folder's file system so a full disk never wedges
//! the database.
//!
//! SQLite in WAL mode appends commits to the `-wal` file and copies them
//! into the database at checkpoints; the WAL is only emptied once a
//! checkpoint is complete, and a checkpoint may need to grow the database
//! file. When the disk fills up with a large WAL there is no room for that
//! growth: nothing can be checkpointed, nothing written, and freeing a
//! little space does not help, because the next commits fill it again before
//! a checkpoint comes round.
//!
//! So the outbox keeps a reserve file of `outbox.disk_reserve_bytes`
//! allocated next to the database. At the first "disk full" the reserve is
//! deleted, the WAL is checkpointed into the database and truncated, and
//! input is held back (sources are not acknowledged) until the reserve can
//! be allocated again, that is, until the disk has room for it once more.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

pub struct DiskReserve {
    path: PathBuf,
    bytes: u64,
    held: bool,
}

impl DiskReserve {
    /// A reserve of `bytes` at `path`, not allocated yet.
    pub fn new(path: PathBuf, bytes: u64) -> Self {
        Self {
            path,
            bytes,
            held: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Allocates the reserve (real blocks, not a sparse file). `Ok(false)`
    /// when the file system has no room for it.
    pub fn ensure(&mut self) -> std::io::Result<bool> {
        if self.held {
            return Ok(true);
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&self.path)?;
        let len = i64::try_from(self.bytes).unwrap_or(i64::MAX);
        // SAFETY: posix_fallocate on a file descriptor we own for the
        // duration of the call; no memory is shared with the kernel.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        if rc == 0 {
            file.sync_all()?;
            self.held = true;
            return Ok(true);
        }
        drop(file);
        // A partial allocation would eat the room it waits for.
        let _ = std::fs::remove_file(&self.path);
        match rc {
            libc::ENOSPC | libc::EDQUOT => Ok(false),
            errno => Err(std::io::Error::from_raw_os_error(errno)),
        }
    }

    /// Gives the reserve's room back to the file system.
    pub fn release(&mut self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.held = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn the_reserve_holds_real_blocks_and_goes_away_when_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge-agent.reserve");
        let mut r = DiskReserve::new(path.clone(), 2 << 20);
        assert!(r.ensure().unwrap());
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 2 << 20);
        assert!(
            meta.blocks() * 512 >= 2 << 20,
            "the reserve must not be sparse"
        );
        // A second call keeps it as it is.
        assert!(r.ensure().unwrap());
        r.release().unwrap();
        assert!(!path.exists());
        // Releasing twice is harmless; it can be allocated again.
        r.release().unwrap();
        assert!(r.ensure().unwrap());
        assert!(path.exists());
    }

    #[test]
    fn a_reserve_larger_than_the_disk_does_not_fit_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge-agent.reserve");
        // Far more than any test machine's free space (2^62 bytes).
        let mut r = DiskReserve::new(path.clone(), 1 << 62);
        match r.ensure() {
            Ok(fits) => assert!(!fits),
            // Some file systems refuse the size itself (EFBIG).
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EFBIG), "{e}"),
        }
        assert!(!path.exists());
    }
}
