//! Server settings and limits, with the defaults `capsync serve` uses.

use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Holds `capsync.db` (SQLite, WAL) and `admin.uri`.
    pub data_dir: PathBuf,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    pub reader_threads: usize,
    pub limits: Limits,
    /// Serve TLS (`capsyncs://`) with this configuration; plain TCP when `None`.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

/// Limits on what one request may carry (DESIGN §9).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Cap'n Proto reader traversal limit per message, in 8-byte words (bounds message size).
    pub traversal_limit_words: usize,
    pub nesting_limit: i32,
    pub max_batch_ops: usize,
    pub max_batch_bytes: usize,
    /// Size of one entity's `data`.
    pub max_data_bytes: usize,
    /// Length of an entity id or parent id.
    pub max_id_bytes: usize,
    /// Entities or ops one `snapshot`/`changes` page returns at most.
    pub max_page_items: u32,
    /// Bytes of entity data one page returns at most (a page always holds at least one item).
    pub max_page_bytes: usize,
    /// Calls a connection may have in flight at once; more fail with `capsync/overloaded`.
    pub max_calls_in_flight: usize,
    /// A connection that has not completed its first frame, or has been inside one, for this
    /// long is closed.
    pub frame_timeout: std::time::Duration,
    /// Failed redeems one peer address may make per `redeem_window` before its redeems are
    /// refused with `capsync/overloaded` for the rest of the window.
    pub max_failed_redeems: u32,
    pub redeem_window: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            traversal_limit_words: 2 * 1024 * 1024, // 16 MiB
            nesting_limit: 16,
            max_batch_ops: 10_000,
            max_batch_bytes: 8 * 1024 * 1024,
            max_data_bytes: 1024 * 1024,
            max_id_bytes: 256,
            max_page_items: 5_000,
            max_page_bytes: 4 * 1024 * 1024,
            max_calls_in_flight: 256,
            frame_timeout: std::time::Duration::from_secs(10),
            max_failed_redeems: 20,
            redeem_window: std::time::Duration::from_secs(60),
        }
    }
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig { data_dir: data_dir.into(), max_connections: 4096, reader_threads: 2, limits: Limits::default(), tls: None }
    }
}
