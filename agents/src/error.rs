//! Errors. Every path in them is relative to the root the caller chose (or `<root>` itself),
//! so an error is safe to log.

/// What stops an operation as a whole (a single unusable file is a [`crate::Warning`]).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The root itself cannot be used.
    #[error("the root directory cannot be used: {0}")]
    Root(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// Relative to the root.
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A path is outside the root, or is not a plain relative path.
    #[error("{0}: refused: the path leaves the root")]
    Escape(String),
    /// opencode's database could not be read.
    #[error("{path}: {reason}")]
    Database { path: String, reason: String },
    /// An entity or a file does not have the shape it must have.
    #[error("{0}")]
    Format(String),
}

impl AgentError {
    pub(crate) fn io(path: &str, source: std::io::Error) -> AgentError {
        AgentError::Io { path: path.to_owned(), source: strip_io(source) }
    }
}

/// An `io::Error` keeps only its kind and a message without a path: some wrapped errors name
/// the file they failed on, absolutely.
fn strip_io(err: std::io::Error) -> std::io::Error {
    if let Some(code) = err.raw_os_error() {
        return std::io::Error::from_raw_os_error(code);
    }
    if err.get_ref().is_none() {
        return err;
    }
    let message = err.to_string();
    if message.contains('/') || message.contains('\\') {
        std::io::Error::new(err.kind(), err.kind().to_string())
    } else {
        std::io::Error::new(err.kind(), message)
    }
}
