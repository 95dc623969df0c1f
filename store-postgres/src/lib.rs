//! capsync's server store on PostgreSQL (DESIGN §10): the reads and writes of the SQLite
//! server store (`capsync-persistence`'s `server` module and the server's `SqliteStore`), async,
//! over a `deadpool-postgres` pool of `tokio-postgres` connections.
//!
//! # What holds across nodes
//!
//! Several stateless servers may share one database. The guarantees of DESIGN §4–§7 are kept
//! by the database, not by a process:
//!
//! - **Appends of one session are serialised, and seqs are commit-ordered with no gap.** An
//!   append locks its session row `FOR UPDATE` first and updates the session's cursor in the
//!   same transaction, so the next append of that session (on any node) waits for this one's
//!   commit and then reads the new cursor. A reader that sees cursor C sees every op ≤ C.
//! - **No write commits after a revocation's commit.** Every guarded write checks its epoch
//!   chain ([`GuardLink`]) inside its transaction: the session row it has locked, the share
//!   rows, the space row (for a capability minted through a space) and the admin row read
//!   `FOR SHARE`. A revocation is an `UPDATE` of one of those
//!   rows: if it committed first, the check reads the new epoch and the write fails with
//!   [`PgError::Revoked`], changing nothing; if the write locked first, the revocation waits
//!   for the write to commit, so the write precedes it.
//! - **A space's key opens one session**: `openSession` relies on the primary key of
//!   `space_sessions (space_id, key)`, with `ON CONFLICT DO NOTHING` for two nodes opening the
//!   same new key at once (see [`PgStore::open_space_session`]).
//! - **Dedupe and `batchSeq` are enforced by the database**: `UNIQUE (sid, op_id)` on the op
//!   log and `PRIMARY KEY (sid, client_id, batch_seq)` on the stored batches, under the session
//!   lock.
//! - **No ack before its commit**: [`PgStore::append`] is one `capsync_append` call in
//!   autocommit and returns only after that implicit transaction committed (PostgreSQL's
//!   default `synchronous_commit = on` flushes the WAL first; see `append.rs` for why the
//!   protocol guarantees the order). If the connection
//!   drops during the commit the outcome is unknown and the error is
//!   [`PgError::Unavailable`]; the client's replay of the same batch then answers exactly.
//!   Dropping a write's future before it finishes rolls its transaction back, unless `COMMIT`
//!   had already been sent, in which case it may have committed: the same unknown outcome.
//!
//! # What the caller does
//!
//! The store checks epochs; it does not check expiry or rights (the protocol layer does, as
//! with SQLite). [`PgStore::append`] returns the ops it applied with their seqs, for the
//! caller to publish to its live subscriptions; other nodes learn of them, and of
//! revocations, through [`notify`] ([`PgStore::listen`]).
//!
//! # Layout
//!
//! - `lib.rs`: the store, its options, the pool and the transaction helpers.
//! - `reads.rs`, `writes.rs`: the store's reads and writes; `rows.rs`: row mappings.
//! - `append.rs` with `v4-append.sql`: a batch's append, one `capsync_append` call.
//! - `migrate.rs`: the versioned schema; `notify.rs`: LISTEN/NOTIFY between nodes.
//! - `error.rs`: [`PgError`] and the mapping of driver errors; `tls.rs`: libpq's `sslmode`.
//! - `testing.rs` (feature `testing`): throwaway clusters for tests and the bench.
//!
//! # Text
//!
//! PostgreSQL `TEXT` cannot hold U+0000, which SQLite can. An op whose entity id or parent id
//! contains it is answered `rejected` (a poison op must never wedge a client's queue); a title,
//! label or other text holding it fails its write with [`PgError::Other`], and audit text has
//! it replaced by U+FFFD. Ids that are ordered (entities, sessions, shares) are stored
//! `COLLATE "C"`, so pages come in byte order, as in SQLite, whatever the database's locale.

#[cfg(feature = "testing")]
pub mod testing;
mod append;
pub mod migrate;
pub use append::{interpret as interpret_append, sql as append_sql, AppendCall};
pub mod notify;
pub mod tls;
mod error;
mod reads;
mod rows;
mod writes;

pub use error::PgError;
use rows::*;

pub use capsync_model as model;

use capsync_model::{BatchAck, Entity, EntityKind, Id16, LoggedOp, Op, OpBody, Rights};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_postgres::Row;

pub use capsync_model::stored::{
    AuditEvent, AuditRow, OpenSession, OpenedSession, Resolution, SessionRow, ShareRow, SnapshotPage, SpaceLink,
    SpaceRow, SpaceSessionRow, StoreStats, TargetKind, TokenRow,
};


/// An object on a capability's epoch chain.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GuardTarget {
    Admin,
    /// By session id (UUID text).
    Session(String),
    /// By share id.
    Share(String),
    /// By space id.
    Space(String),
}

/// One link of the epoch chain a write must still match: the object and the epoch the
/// capability expects it at. A guard is the capability's whole chain (target first, then its
/// parents up to the session); an empty guard checks nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardLink {
    pub target: GuardTarget,
    pub expected: u64,
}

impl GuardLink {
    pub fn session(id: impl Into<String>, expected: u64) -> GuardLink {
        GuardLink { target: GuardTarget::Session(id.into()), expected }
    }

    pub fn share(id: impl Into<String>, expected: u64) -> GuardLink {
        GuardLink { target: GuardTarget::Share(id.into()), expected }
    }

    pub fn admin(expected: u64) -> GuardLink {
        GuardLink { target: GuardTarget::Admin, expected }
    }

    pub fn space(id: impl Into<String>, expected: u64) -> GuardLink {
        GuardLink { target: GuardTarget::Space(id.into()), expected }
    }
}

/// What a committed append did: the ack, and the ops it applied now with their seqs (in seq
/// order), for publishing to live subscriptions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub ack: BatchAck,
    pub applied: Vec<LoggedOp>,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Pool settings for [`PgStore::connect_with`].
#[derive(Clone)]
pub struct PgOptions {
    /// Most connections the pool holds.
    pub max_connections: usize,
    /// How long opening one connection may take (used when the URL sets no `connect_timeout`).
    pub connect_timeout: Duration,
    /// How long a call waits for a free connection before failing with `Unavailable`.
    pub wait_timeout: Duration,
    /// Bring the schema up to date on connect.
    pub migrate: bool,
    /// Awaited at named points of a write, where the server's fault-injection tests crash or
    /// wait: `"server-append-begin"` before an append's transaction starts,
    /// `"server-before-commit"` and `"server-revoke-before-commit"` inside an append's or a
    /// revocation's transaction just before its COMMIT. None by default.
    pub hook: Option<Hook>,
}

/// See [`PgOptions::hook`].
pub type Hook = std::sync::Arc<dyn Fn(&'static str) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

impl Default for PgOptions {
    fn default() -> PgOptions {
        PgOptions {
            max_connections: 16,
            connect_timeout: Duration::from_secs(10),
            wait_timeout: Duration::from_secs(30),
            migrate: true,
            hook: None,
        }
    }
}

/// What [`PgStore::epochs`] read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CurrentEpochs {
    pub sessions: Vec<(String, u64)>,
    pub shares: Vec<(String, u64)>,
    pub spaces: Vec<(String, u64)>,
    pub admin: Option<u64>,
}

/// The PostgreSQL server store. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// For connections of its own outside the pool (LISTEN), with the pool's TLS.
    config: tokio_postgres::Config,
    tls: tls::PgConnector,
    hook: Option<Hook>,
}

type Txn<'a> = deadpool_postgres::Transaction<'a>;

impl PgStore {
    /// Connects to `url` (a libpq-style `postgres://user:pass@host:port/db` or `key=value`
    /// string, with libpq's `sslmode` and `sslrootcert`: see [`tls`]), checks that the server
    /// answers, and brings the schema up to date. An unreachable server fails with
    /// [`PgError::Unavailable`] naming the host and port (never the password).
    pub async fn connect(url: &str) -> Result<PgStore, PgError> {
        PgStore::connect_with(url, PgOptions::default()).await
    }

    pub async fn connect_with(url: &str, options: PgOptions) -> Result<PgStore, PgError> {
        let (mut config, tls) = tls::parse(url)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("capsync");
        }
        let target = describe_target(&config);
        let manager =
            Manager::from_connect(config.clone(), tls.clone(), ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(options.max_connections.max(1))
            .wait_timeout(Some(options.wait_timeout))
            .create_timeout(Some(options.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| PgError::Other(format!("cannot build the PostgreSQL pool: {e}")))?;
        let store = PgStore { pool, config, tls, hook: options.hook };
        let mut client = store.pool.get().await.map_err(|e| {
            // A certificate `sslmode` refuses is a setting to fix, not a database that is down.
            let refused = matches!(&e, deadpool_postgres::PoolError::Backend(err) if tls::certificate_refused(err));
            match PgError::from(e) {
                PgError::Unavailable(why) if refused => {
                    PgError::Other(format!("cannot connect to PostgreSQL at {target}: {why}"))
                }
                PgError::Unavailable(why) => PgError::Unavailable(format!("cannot reach PostgreSQL at {target}: {why}")),
                PgError::Other(why) => PgError::Other(format!("cannot connect to PostgreSQL at {target}: {why}")),
                other => other,
            }
        })?;
        if options.migrate {
            migrate::run(&mut client).await?;
        }
        drop(client);
        Ok(store)
    }

    /// Starts listening for what every node commits (see [`notify`]).
    pub fn listen(&self, options: notify::ListenOptions) -> tokio::sync::mpsc::UnboundedReceiver<notify::Notice> {
        notify::listen(self.config.clone(), self.tls.clone(), options)
    }

    /// The pool, for tools and tests.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, PgError> {
        Ok(self.pool.get().await?)
    }

    /// Runs `work` in one read-write transaction and commits it if it returns `Ok` (an `Err`
    /// drops the transaction, which rolls it back).
    async fn write<T>(&self, work: impl AsyncFnOnce(&Txn<'_>) -> Result<T, PgError>) -> Result<T, PgError> {
        self.write_at(None, work).await
    }

    /// [`PgStore::write`], awaiting the hook at `point` just before the COMMIT.
    async fn write_at<T>(
        &self,
        point: Option<&'static str>,
        work: impl AsyncFnOnce(&Txn<'_>) -> Result<T, PgError>,
    ) -> Result<T, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let value = work(&tx).await?;
        if let Some(point) = point {
            self.hook(point).await;
        }
        tx.commit().await?;
        Ok(value)
    }

    async fn hook(&self, point: &'static str) {
        if let Some(hook) = &self.hook {
            hook(point).await;
        }
    }

}

/// "host:port" of the first host in `config`, for error messages (never the password).
fn describe_target(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().map(|d| format!("/{d}")).unwrap_or_default();
    format!("{host}:{port}{db}")
}
