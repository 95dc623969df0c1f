//! SQLite storage for capsync. This is the only crate that names rusqlite, and its API has no
//! Cap'n Proto or tokio types: protocol code calls typed methods and never writes SQL.
//!
//! # Layout
//!
//! - `model`: the `capsync-model` crate (entities, ops, batches, acks, rights), re-exported.
//! - [`agents`]: read-only access to opencode's `opencode.db`, for `capsync-agents`.
//! - [`failpoint`]: crash points for fault-injection tests, armed by `CAPSYNC_FAILPOINTS`.
//! - [`migrate`]: versioned schemas in `user_version`, applied in one transaction.
//! - [`server`]: the server's schema and its reads ([`server::ServerReader`]) and writes
//!   ([`server::ServerWriter`]).
//! - [`client`]: the client's refs, outbox and replicas ([`client::ClientDb`]).
//! - [`writer`]: the single writer thread with group commit.
//! - [`readers`]: a small pool of reader threads.
//! - `rows`: reading entities and ops out of SQL rows (crate-private).
//!
//! Threads, not async: SQLite calls block, so they run on threads of their own and report
//! back through completion callbacks, which the async layers turn into futures.

pub mod agents;
pub mod client;
pub mod failpoint;
pub mod migrate;
pub mod readers;
mod rows;
pub mod server;
pub mod writer;

pub use capsync_model as model;
pub use capsync_model::*;

/// A failure of the storage layer itself (I/O, full disk, corrupt or too-new database).
#[derive(Debug, thiserror::Error, Clone)]
pub enum StorageError {
    #[error("sqlite: {0}")]
    Sqlite(String),
    #[error("the disk is full")]
    Full,
    #[error("the {name} database is at schema version {found}; this capsync supports up to {supported}")]
    NewerSchema { name: &'static str, found: u32, supported: u32 },
    #[error("no upgrade of the {name} database from schema version {from}")]
    NoUpgradePath { name: &'static str, from: u32 },
    #[error("the storage thread has stopped")]
    Stopped,
    #[error("the write was rolled back after another write in its group failed (disk full or I/O error); retry")]
    RolledBack,
}

impl From<rusqlite::Error> for StorageError {
    fn from(err: rusqlite::Error) -> StorageError {
        match err.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StorageError::Full,
            _ => StorageError::Sqlite(err.to_string()),
        }
    }
}
