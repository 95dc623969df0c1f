//! Exclusive ownership of a data dir.
//!
//! Two servers on one data dir would each keep their own in-memory epoch cells, so a
//! revocation through one would leave the other's live capabilities working, and the second
//! would rewrite `admin.uri` to its own address. The server therefore takes an exclusive
//! advisory lock on `<data-dir>/capsync.lock` before it opens the database or touches
//! `admin.uri`, and holds it for the life of the process (the kernel drops it when the process
//! dies, even by SIGKILL, so a crash never leaves a stale lock behind).

use crate::error::{Result, ServerError};
use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

pub const LOCK_FILE: &str = "capsync.lock";

/// Held for as long as the server owns the data dir.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    /// Takes the lock, or fails with [`ServerError::DataDirInUse`] naming the holder's pid.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock> {
        let path = data_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(ServerError::DataDirInUse { dir: data_dir.to_owned(), holder: holder.trim().to_owned() });
            }
            Err(std::fs::TryLockError::Error(err)) => return Err(err.into()),
        }
        // The pid is for the message a second server prints; the lock itself is what counts.
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let err = DataDirLock::acquire(dir.path()).unwrap_err();
        assert!(matches!(&err, ServerError::DataDirInUse { holder, .. } if *holder == std::process::id().to_string()), "{err}");
        drop(first);
        DataDirLock::acquire(dir.path()).unwrap();
    }
}
