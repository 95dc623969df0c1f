//! Server settings and limits, with the defaults `capsync serve` uses.

use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Holds `capsync.db` (SQLite, WAL) and `admin.uri`.
    pub data_dir: PathBuf,
    /// Connections served at once; further clients wait in the listen backlog. A quarter of
    /// them is kept for addresses that have redeemed a token.
    pub max_connections: usize,
    pub reader_threads: usize,
    pub limits: Limits,
    /// Serve TLS (`capsyncs://`) with this configuration; plain TCP when `None`.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// A `postgres://` / `postgresql://` URL: keep the server's state in that PostgreSQL
    /// database instead of SQLite in `data_dir` (which then holds only `admin.uri`).
    pub store_url: Option<String>,
    /// The address clients should dial, written into `admin.uri` (and so into every URI the
    /// CLI prints from it): a load balancer's in front of several nodes. `None`: the listen
    /// address (a wildcard one as loopback).
    pub advertise: Option<String>,
    /// Serve `/metrics`, `/healthz` and `/readyz` over HTTP on this address; off when `None`.
    pub metrics_listen: Option<std::net::SocketAddr>,
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
    /// Failed redeems written to the audit table per `redeem_window`, server-wide; the rest
    /// are counted in one summary row.
    pub max_failure_audits: u32,
    /// Bytes of large frames one connection may have read and not yet had answered.
    pub max_connection_bytes_in_flight: usize,
    /// The same over all connections.
    pub max_server_bytes_in_flight: usize,
    pub max_subscriptions_per_connection: usize,
    /// A connection holding no live capability is closed after this long without a frame.
    pub idle_timeout: std::time::Duration,
    /// Connections one peer address may hold open; 0 = no limit (e.g. behind a balancer).
    pub max_connections_per_address: usize,
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
            max_failure_audits: 100,
            max_connection_bytes_in_flight: 64 * 1024 * 1024,
            max_server_bytes_in_flight: 256 * 1024 * 1024,
            max_subscriptions_per_connection: 64,
            idle_timeout: std::time::Duration::from_secs(30),
            max_connections_per_address: 64,
        }
    }
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig { data_dir: data_dir.into(), max_connections: 4096, reader_threads: 2, limits: Limits::default(), tls: None, metrics_listen: None, store_url: None, advertise: None }
    }
}
