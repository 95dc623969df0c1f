//! The capsync client: a local-first outbox that never loses a write.
//!
//! Every change is committed to a local SQLite outbox before the call that made it returns.
//! Syncing sends the queued ops in pipelined batches; after any disconnect or crash the next
//! sync re-redeems the sturdy URI and replays the unacknowledged batches (the same batches,
//! opIds and order), and the server applies each op at most once.
//!
//! ```no_run
//! use capsync_client::{Client, Change};
//! use capsync_persistence::EntityKind;
//!
//! # async fn demo() -> capsync_client::Result<()> {
//! let client = Client::open("outbox.db")?;
//! client.attach("work", "capsync://127.0.0.1:7420/csy_...")?;
//! client.put("work", EntityKind::Message, "m1", "", br#"{"role":"user"}"#)?; // durable now
//! client.sync("work").await?;                                               // acked now
//! client.pull("work").await?;                                               // replica now
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`api`]: [`Client`], the application API.
//! - [`sync`]: the sync engine: pipelined redeem + replay, acks, backoff.
//! - [`follow`]: live subscription into the replica, resuming from its cursor.
//! - [`jsonl`]: the JSON Lines op format of `capsync push`.
//! - [`pull`]: snapshot and changes into the local replica.
//! - [`space`]: opening sessions by key through a space URI ([`space::open_session`]).
//! - [`tls`]: TLS client configuration for `capsyncs://` URIs.
//! - [`connection`]: one Cap'n Proto connection and pipelined redeems.
//! - [`wire`]: storage model to wire structs and back.
//! - [`store`]: the client database, off the RPC thread.
//! - [`error`]: [`ClientError`], with the server's `capsync/...` marker when there is one.

pub mod api;
pub mod connection;
pub mod error;
pub mod follow;
pub mod jsonl;
pub mod pull;
pub mod space;
pub mod store;
pub mod sync;
pub mod tls;
pub mod wire;

pub use api::{Change, Client, RefStatus};
pub use capsync_persistence::client::{ImportProgress, ImportRow};
pub use connection::Connection;
pub use error::{ClientError, Result};
pub use pull::PullReport;
pub use sync::{SyncOptions, SyncReport};
