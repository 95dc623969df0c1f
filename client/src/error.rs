//! The client's error type.

use capsync_schema::marker::{self, Marker};
use capsync_schema::uri::UriError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {address}")]
    Connect { address: String, #[source] source: std::io::Error },
    /// The TLS handshake failed: a certificate the client does not trust, a name mismatch...
    #[error("TLS with {address} failed")]
    Tls { address: String, #[source] source: std::io::Error },
    #[error("{0}")]
    Uri(#[from] UriError),
    /// The server answered with an exception; `marker` says which kind when it has one.
    #[error("{}", describe(.0))]
    Rpc(capnp::Error),
    #[error("storage: {0}")]
    Storage(#[from] capsync_persistence::StorageError),
    #[error("{0}")]
    Invalid(String),
    /// The ref was refused before (revoked, expired...) and is not used until re-attached.
    #[error("ref {name} is {state}: {reason}")]
    RefStopped { name: String, state: String, reason: String },
}

/// The server's own words: from its marker on, without capnp-rpc's "remote exception" prefix.
fn describe(err: &capnp::Error) -> String {
    match (err.kind, err.extra.find("capsync/")) {
        (_, Some(at)) => err.extra[at..].to_owned(),
        (capnp::ErrorKind::Disconnected, None) => format!("disconnected: {}", err.extra),
        _ => err.extra.clone(),
    }
}

impl From<capnp::Error> for ClientError {
    fn from(err: capnp::Error) -> ClientError {
        ClientError::Rpc(err)
    }
}

impl ClientError {
    /// The `capsync/...` marker of a server refusal, if this is one.
    pub fn marker(&self) -> Option<Marker> {
        match self {
            ClientError::Rpc(err) => marker::of_error(err),
            ClientError::RefStopped { reason, .. } => Marker::find(reason),
            _ => None,
        }
    }

    /// Whether reconnecting may help: the connection failed or dropped (including a cut inside
    /// a frame, which capnp reports as `PrematureEndOfFile`, not `Disconnected`), or the server
    /// is overloaded or failed internally. Refusals such as revoked or denied are final.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. } => true,
            ClientError::Rpc(err) => match marker::of_error(err) {
                Some(m) => matches!(m, Marker::Overloaded | Marker::Internal | Marker::Gap),
                None => matches!(
                    err.kind,
                    capnp::ErrorKind::Disconnected | capnp::ErrorKind::Overloaded | capnp::ErrorKind::PrematureEndOfFile
                ),
            },
            _ => false,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;
