//! The store's error type and how driver and pool errors map to it.

/// Errors of the PostgreSQL store. The first three are the SQLite store's `AppendError`s;
/// [`PgError::Revoked`] is what a failed admission check gives there.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PgError {
    /// `batchSeq` skips ahead of the client's last applied batch + 1.
    #[error("batchSeq {got} skips ahead; the next expected is {expected}")]
    Gap { got: u64, expected: u64 },
    /// A replayed `batchSeq` whose opIds differ from the batch first stored under it.
    #[error("batchSeq {batch_seq} was first sent with other opIds")]
    Diverged { batch_seq: u64 },
    #[error("batchSeq must start at 1")]
    ZeroBatchSeq,
    /// An object on the write's epoch chain is no longer at the expected epoch (or is gone);
    /// the write changed nothing.
    #[error("an object on this capability's epoch chain was revoked")]
    Revoked,
    /// The database cannot be reached or the transaction was cut short by the server
    /// (connection lost, pool timeout, shutdown, too many connections, serialization failure,
    /// deadlock). Retryable: a write that fails this way may or may not have committed, and
    /// its retry is answered exactly (dedupe and batch replay).
    #[error("PostgreSQL is unavailable: {0}")]
    Unavailable(String),
    #[error("the PostgreSQL database is at schema version {found}; this capsync supports up to {supported}")]
    NewerSchema { found: u32, supported: u32 },
    /// Anything else: a constraint violation, bad data, a bug.
    #[error("postgres: {0}")]
    Other(String),
}

impl PgError {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, PgError::Unavailable(_))
    }
}

/// SQLSTATEs that mean "try again": connection exceptions (08), insufficient resources (53),
/// operator intervention such as shutdown (57P01-57P05), serialization failure and deadlock.
fn retryable_sqlstate(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("53") || code.starts_with("57P") || code == "40001" || code == "40P01"
}

impl From<tokio_postgres::Error> for PgError {
    fn from(err: tokio_postgres::Error) -> PgError {
        if let Some(db) = err.as_db_error() {
            let text = format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
            return if retryable_sqlstate(db.code().code()) {
                PgError::Unavailable(text)
            } else {
                PgError::Other(text)
            };
        }
        let text = match std::error::Error::source(&err) {
            Some(source) => format!("{err}: {source}"),
            None => err.to_string(),
        };
        let io = std::error::Error::source(&err).is_some_and(|s| s.is::<std::io::Error>());
        let transport =
            ["error communicating", "connection closed", "error connecting", "timeout", "error performing TLS"]
                .iter()
                .any(|prefix| text.starts_with(prefix));
        if io || err.is_closed() || transport {
            PgError::Unavailable(text)
        } else {
            PgError::Other(text)
        }
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(err: deadpool_postgres::PoolError) -> PgError {
        match err {
            deadpool_postgres::PoolError::Backend(err) => match PgError::from(err) {
                PgError::Other(text) => PgError::Other(text),
                other => other,
            },
            other => PgError::Unavailable(other.to_string()),
        }
    }
}
