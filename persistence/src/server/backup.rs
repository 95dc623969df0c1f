//! Online backup and restore of the server database.
//!
//! A backup is `VACUUM INTO` on a read-only connection: it reads one WAL snapshot, so the copy
//! holds exactly the transactions committed when it started (never half a batch), compacted
//! into one self-contained file, while the server goes on committing. Restoring checks the
//! file (integrity, a schema this build knows) before it becomes a data dir's `capsync.db`, and
//! gives the restored database a new history id.

use super::schema;
use crate::StorageError;
use rusqlite::{Connection, OpenFlags};
use std::path::Path;

/// What a backup file holds, for the operator's one-line report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupInfo {
    pub schema_version: u32,
    pub sessions: u64,
    pub ops: u64,
    pub bytes: u64,
}

/// Writes a consistent copy of the server database `db` to `to`, which must not exist (it is
/// created 0600: it holds the op log and token hashes).
pub fn backup(db: &Path, to: &Path) -> Result<BackupInfo, StorageError> {
    if !db.is_file() {
        return Err(StorageError::Sqlite(format!("no server database at {}", db.display())));
    }
    create_private(to)?;
    let done = (|| {
        let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        let target = to.to_str().ok_or_else(|| StorageError::Sqlite(format!("{} is not a UTF-8 path", to.display())))?;
        conn.execute("VACUUM INTO ?1", [target])?;
        inspect(to)
    })();
    if done.is_err() {
        let _ = std::fs::remove_file(to);
    }
    done
}

/// Checks that `file` is an intact capsync server database this build can open, and says
/// what it holds.
pub fn inspect(file: &Path) -> Result<BackupInfo, StorageError> {
    let conn = Connection::open_with_flags(file, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    let not_ours = |why: String| StorageError::Sqlite(format!("{} is not a capsync server backup: {why}", file.display()));
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).map_err(|e| not_ours(e.to_string()))?;
    if check != "ok" {
        return Err(not_ours(format!("integrity check: {check}")));
    }
    let schema_version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if schema_version == 0 {
        return Err(not_ours("no capsync schema".into()));
    }
    if schema_version > schema::PLAN.current_version {
        return Err(StorageError::NewerSchema { name: schema::PLAN.name, found: schema_version, supported: schema::PLAN.current_version });
    }
    let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).map(|n| n as u64).map_err(|e| not_ours(e.to_string()));
    Ok(BackupInfo {
        schema_version,
        sessions: count("SELECT count(*) FROM sessions")?,
        ops: count("SELECT count(*) FROM ops")?,
        bytes: std::fs::metadata(file).map(|m| m.len()).unwrap_or(0),
    })
}

/// Copies the backup `from` to `db` (which must not exist), created 0600, after checking it.
pub fn restore(from: &Path, db: &Path) -> Result<BackupInfo, StorageError> {
    let info = inspect(from)?;
    create_private(db)?;
    let copied = (|| {
        let conn = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        let target = db.to_str().ok_or_else(|| StorageError::Sqlite(format!("{} is not a UTF-8 path", db.display())))?;
        conn.execute("VACUUM INTO ?1", [target])?;
        // A restored server is another copy of history: clients that saw the original must
        // notice and re-deliver what it lost. (A backup older than the history table gets
        // its id from the migration on first start, different from the original's too.)
        let restored = Connection::open(db)?;
        let has_history: bool =
            restored.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'history'", [], |r| r.get(0))?;
        if has_history {
            restored.execute("UPDATE history SET history = lower(hex(randomblob(16)))", [])?;
        }
        drop(restored);
        inspect(db)
    })();
    if copied.is_err() {
        let _ = std::fs::remove_file(db);
    }
    copied.map(|_| info)
}

/// An empty file, 0600, that did not exist (`VACUUM INTO` fills an empty file and keeps its mode).
fn create_private(path: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|e| StorageError::Sqlite(format!("{}: {e}", path.display())))
}
