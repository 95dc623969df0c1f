//! The capsync sync server: sessions and shares served only as Cap'n Proto capabilities,
//! sturdy refs with epoch revocation, durable at-most-once appends, and reads.
//!
//! Start it with [`run`] inside a tokio `LocalSet` (capnp-rpc objects are `!Send`), passing
//! the shutdown signal as a future:
//!
//! ```no_run
//! # async fn demo() -> Result<(), capsync_server::ServerError> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let config = capsync_server::ServerConfig::new("./capsync-data");
//! capsync_server::run(listener, config, |addr| tracing::info!(%addr, "ready"), async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```
//!
//! # Layout
//!
//! - [`listener`]: the accept loop, the connection limit and one `RpcSystem` per connection.
//! - [`frames`]: the frame watchdog that closes connections stuck before or inside a frame.
//! - [`budget`]: byte budgets per connection and server-wide for frames read and not answered.
//! - [`peers`]: per-address connection limits and the share kept for peers that redeemed.
//! - [`throttle`]: failed-redeem accounting per address and the audit cap.
//! - [`connection`]: the state shared by every connection and each connection's own, with the
//!   guards counting calls and capabilities (the capability modules below build on it).
//! - [`gateway`]: `Gateway.redeem`, from token to live capability.
//! - [`session`]: `Session` and `Share` (one implementation, limited by rights).
//! - [`space`]: `Space`: opening sessions by key for ingestion, without the admin URI.
//! - [`subscription`]: `subscribe`: catch-up then live ops to a streaming `Listener`.
//! - [`feed`]: per-session rings of recent ops that the writer publishes after each commit.
//! - [`admin`]: `Admin`: sessions, shares, spaces, revocation, audit, stats.
//! - [`access`]: a grant's rights, expiry and epoch chain, checked on every call.
//! - [`sequencer`]: each client's batches in batchSeq order, whatever the dispatch order.
//! - [`registry`]: in-memory epoch cells that revocation bumps, swept once nothing holds them.
//! - [`fanout`]: other nodes' revocations and appends (from a shared store's events) applied
//!   to the cells and feeds of this one.
//! - [`store`]: the storage trait and its SQLite implementation (threads, group commit).
//! - [`postgres`]: the same trait on PostgreSQL (`--store postgres://...`).
//! - [`convert`]: wire structs to storage model and back, with per-op validation.
//! - [`metrics`]: the Prometheus metrics (fixed label values only).
//! - [`health`]: the HTTP endpoint for `/metrics`, `/healthz` and `/readyz`.
//! - [`datadir`]: the exclusive lock that makes one server the owner of its data dir.
//! - [`bootstrap`]: the admin URI file, `<data-dir>/admin.uri`.
//! - [`tls`]: the TLS server configuration from PEM files.
//! - [`config`]: settings and limits.
//! - [`error`]: [`ServerError`] and its one mapping to `capsync/...` markers.

pub mod access;
pub mod admin;
pub mod bootstrap;
pub mod budget;
pub mod config;
pub mod connection;
pub mod convert;
pub mod datadir;
pub mod error;
pub mod fanout;
pub mod feed;
pub mod frames;
pub mod gateway;
pub mod listener;
pub mod metrics;
pub mod health;
pub mod peers;
pub mod postgres;
pub mod registry;
pub mod sequencer;
pub mod session;
pub mod space;
pub mod store;
pub mod subscription;
pub mod throttle;
pub mod tls;

pub use config::{Limits, ServerConfig};
pub use error::ServerError;
pub use listener::{run, serve_blocking};
