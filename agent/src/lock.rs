//! One agent per data folder: an exclusive `flock` on `edge-agent.lock`.
//! Two processes writing one outbox would each trust a stale copy of the
//! per-device high-water marks and fence each other's Kafka producer.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Held for the life of the process; the kernel releases it on exit, even
/// after `kill -9`.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open lock file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another edge-agent is using the data folder {data_dir} (lock {path} is held); \
         stop it first (`systemctl stop edge-agent`), or give this one its own data_dir"
    )]
    Busy { data_dir: PathBuf, path: PathBuf },
}

/// Takes the lock of `data_dir` without waiting.
pub fn lock_data_dir(data_dir: &Path) -> Result<DataDirLock, LockError> {
    let path = data_dir.join("edge-agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| LockError::Open {
            path: path.clone(),
            source,
        })?;
    // SAFETY: flock on a descriptor we own; no memory is shared.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(LockError::Busy {
                data_dir: data_dir.to_path_buf(),
                path,
            });
        }
        return Err(LockError::Open { path, source: err });
    }
    Ok(DataDirLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_data_dir(dir.path()).unwrap();
        let err = lock_data_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("another edge-agent is using the data folder"),
            "{err}"
        );
        drop(first);
        lock_data_dir(dir.path()).unwrap();
    }
}
