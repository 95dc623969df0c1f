//! The server's error type and its one mapping to wire markers.

use capsync_persistence::server::AppendError;
use capsync_persistence::StorageError;
use capsync_schema::Marker;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("this capability was revoked")]
    Revoked,
    #[error("this capability has expired")]
    Expired,
    #[error("no such token")]
    UnknownToken,
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("batchSeq {got} skips ahead; the next expected is {expected}")]
    Gap { got: u64, expected: u64 },
    #[error("batchSeq {0} was first sent with other opIds; the client's outbox diverged from what the server applied")]
    Diverged(u64),
    #[error("{0}")]
    Overloaded(String),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The PostgreSQL store failed in a way no retry fixes (or could not be reached at start).
    #[error("database: {0}")]
    Database(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("the data dir {} is in use by another capsync server (pid {holder}); stop it first or choose another --data-dir", dir.display())]
    DataDirInUse { dir: std::path::PathBuf, holder: String },
}

impl ServerError {
    pub fn marker(&self) -> Marker {
        match self {
            ServerError::Revoked => Marker::Revoked,
            ServerError::Expired => Marker::Expired,
            ServerError::UnknownToken => Marker::UnknownToken,
            ServerError::Denied(_) => Marker::Denied,
            ServerError::Invalid(_) => Marker::Invalid,
            ServerError::TooLarge(_) => Marker::TooLarge,
            ServerError::Gap { .. } => Marker::Gap,
            ServerError::Diverged(_) => Marker::Diverged,
            ServerError::Overloaded(_) => Marker::Overloaded,
            ServerError::Storage(_) | ServerError::Database(_) | ServerError::Io(_) | ServerError::DataDirInUse { .. } => Marker::Internal,
        }
    }
}

impl From<AppendError> for ServerError {
    fn from(err: AppendError) -> ServerError {
        match err {
            AppendError::Gap { got, expected } => ServerError::Gap { got, expected },
            AppendError::Diverged { batch_seq } => ServerError::Diverged(batch_seq),
            AppendError::ZeroBatchSeq => ServerError::Invalid("batchSeq starts at 1".into()),
            AppendError::Storage(e) => ServerError::Storage(e),
        }
    }
}

impl From<capnp::Error> for ServerError {
    /// A request the server could not even read (bad pointers, invalid UTF-8, traversal limit).
    fn from(err: capnp::Error) -> ServerError {
        ServerError::Invalid(format!("malformed request: {}", err.extra))
    }
}

/// The single mapping from the server's errors to Cap'n Proto exceptions on the wire.
impl From<ServerError> for capnp::Error {
    fn from(err: ServerError) -> capnp::Error {
        err.marker().error(&err)
    }
}

pub type Result<T, E = ServerError> = std::result::Result<T, E>;
