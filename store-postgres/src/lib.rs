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
//! with SQLite). [`PgStore::append`] returns the ops it applied with their seqs; publishing
//! them to live subscriptions and the LISTEN/NOTIFY fan-out of DESIGN §10 are not here yet.
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

const SESSION_COLUMNS: &str = "sid, id, title, epoch, cursor, created_at";
const SHARE_COLUMNS: &str = "s.id, s.sid, x.id, s.parent_share_id, s.parent_epoch, s.rights, s.label, s.epoch,
     s.created_at, s.expires_at,
     (SELECT coalesce(max(last_used_at), 0) FROM tokens t WHERE t.target_kind = 'share' AND t.target_id = s.id),
     s.space_id, s.space_epoch";
/// How many columns [`SHARE_COLUMNS`] has (what follows them in a row starts here).
const SHARE_COLUMN_COUNT: usize = 13;
const SPACE_COLUMNS: &str = "id, label, epoch, created_at";

/// A [`SpaceLink`] from nullable `space_id` and `space_epoch` columns at `at`.
fn space_link(r: &Row, at: usize) -> Option<SpaceLink> {
    let id: Option<String> = r.get(at);
    id.map(|space_id| SpaceLink { space_id, epoch: r.get::<_, i64>(at + 1) as u64 })
}

fn space_row(r: &Row, at: usize) -> SpaceRow {
    SpaceRow {
        id: r.get(at),
        label: r.get(at + 1),
        epoch: r.get::<_, i64>(at + 2) as u64,
        created_at: r.get::<_, i64>(at + 3) as u64,
    }
}

fn session_row(r: &Row, at: usize) -> SessionRow {
    SessionRow {
        sid: r.get(at),
        id: r.get(at + 1),
        title: r.get(at + 2),
        epoch: r.get::<_, i64>(at + 3) as u64,
        cursor: r.get::<_, i64>(at + 4) as u64,
        created_at: r.get::<_, i64>(at + 5) as u64,
    }
}

fn share_row(r: &Row) -> ShareRow {
    ShareRow {
        id: r.get(0),
        sid: r.get(1),
        session_id: r.get(2),
        parent_share_id: r.get(3),
        parent_epoch: r.get::<_, i64>(4) as u64,
        rights: Rights::from_bits(r.get::<_, i32>(5) as i64),
        label: r.get(6),
        epoch: r.get::<_, i64>(7) as u64,
        created_at: r.get::<_, i64>(8) as u64,
        expires_at: r.get::<_, i64>(9) as u64,
        last_used_at: r.get::<_, i64>(10) as u64,
        space: space_link(r, 11),
    }
}

/// An entity from the columns `kind, id, parent_id, data` starting at `at`.
fn entity(r: &Row, at: usize) -> Result<Entity, PgError> {
    let code: i16 = r.get(at);
    Ok(Entity {
        kind: EntityKind::from_code(code as i64)
            .ok_or_else(|| PgError::Other(format!("unknown entity kind {code}")))?,
        id: r.get(at + 1),
        parent_id: r.get(at + 2),
        data: r.get(at + 3),
    })
}

/// Audit text without U+0000, which PostgreSQL text cannot hold.
fn audit_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}").into()
    } else {
        text.into()
    }
}

async fn insert_audit(tx: &Txn<'_>, event: &AuditEvent, at: u64) -> Result<(), PgError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO audit (at, action, target_kind, target_id, session_id, peer, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &(at as i64),
            &audit_text(&event.action),
            &audit_text(&event.target_kind),
            &audit_text(&event.target_id),
            &audit_text(&event.session_id),
            &audit_text(&event.peer),
            &audit_text(&event.detail),
        ],
    )
    .await?;
    Ok(())
}

async fn insert_token(tx: &Txn<'_>, token: &TokenRow) -> Result<(), PgError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO tokens (hash, target_kind, target_id, minted_epoch, rights, parent, label,
                                 created_at, expires_at, space_id, space_epoch)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &&token.hash[..],
            &token.target_kind.name(),
            &token.target_id,
            &(token.minted_epoch as i64),
            &(token.rights.bits() as i32),
            &token.parent,
            &token.label,
            &(token.created_at as i64),
            &(token.expires_at as i64),
            &token.space.as_ref().map(|s| s.space_id.as_str()),
            &token.space.as_ref().map_or(0, |s| s.epoch as i64),
        ],
    )
    .await?;
    Ok(())
}

/// Checks `guard` inside the write transaction `tx`: the rows of the chain are read `FOR SHARE`
/// (a concurrent revocation's `UPDATE` then waits for this transaction, or, if it committed
/// first, is seen), shares in id order. Appends check the same inside `capsync_append`.
async fn check_guard(tx: &Txn<'_>, guard: &[GuardLink]) -> Result<(), PgError> {
    let mut share_ids: Vec<&str> = Vec::new();
    for link in guard {
        if let GuardTarget::Share(id) = &link.target {
            share_ids.push(id);
        }
    }
    share_ids.sort_unstable();
    share_ids.dedup();
    let mut shares = std::collections::HashMap::new();
    if !share_ids.is_empty() {
        let stmt = tx.prepare_cached("SELECT id, epoch FROM shares WHERE id = ANY($1) ORDER BY id FOR SHARE").await?;
        for row in tx.query(&stmt, &[&share_ids]).await? {
            shares.insert(row.get::<_, String>(0), row.get::<_, i64>(1) as u64);
        }
    }
    for link in guard {
        let current = match &link.target {
            GuardTarget::Share(id) => shares.get(id.as_str()).copied(),
            GuardTarget::Session(id) => {
                let stmt = tx.prepare_cached("SELECT epoch FROM sessions WHERE id = $1 FOR SHARE").await?;
                tx.query_opt(&stmt, &[id]).await?.map(|r| r.get::<_, i64>(0) as u64)
            }
            GuardTarget::Admin => {
                let stmt = tx.prepare_cached("SELECT epoch FROM admin WHERE id = 1 FOR SHARE").await?;
                tx.query_opt(&stmt, &[]).await?.map(|r| r.get::<_, i64>(0) as u64)
            }
            GuardTarget::Space(id) => {
                let stmt = tx.prepare_cached("SELECT epoch FROM spaces WHERE id = $1 FOR SHARE").await?;
                tx.query_opt(&stmt, &[id]).await?.map(|r| r.get::<_, i64>(0) as u64)
            }
        };
        if current != Some(link.expected) {
            return Err(PgError::Revoked);
        }
    }
    Ok(())
}

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

    // ---- Reads -------------------------------------------------------------------------

    /// Looks a token up by its hash and resolves what judging it needs: the share chain up to
    /// the session (target first), the session, the admin epoch and the space (a space token's
    /// target, or the space the token descends from). `None` for an unknown token or a chain
    /// with a missing link.
    pub async fn resolve_token(&self, hash: &[u8; 32]) -> Result<Option<Resolution>, PgError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT t.target_kind, t.target_id, t.minted_epoch, t.rights, t.parent, t.label, t.created_at,
                        t.expires_at, t.last_used_at, (SELECT epoch FROM admin WHERE id = 1),
                        t.space_id, t.space_epoch,
                        sp.id, sp.label, sp.epoch, sp.created_at
                 FROM tokens t LEFT JOIN spaces sp
                     ON sp.id = CASE WHEN t.target_kind = 'space' THEN t.target_id ELSE t.space_id END
                 WHERE t.hash = $1",
            )
            .await?;
        let Some(row) = client.query_opt(&stmt, &[&&hash[..]]).await? else { return Ok(None) };
        let Some(target_kind) = TargetKind::parse(row.get(0)) else { return Ok(None) };
        let token = TokenRow {
            hash: *hash,
            target_kind,
            target_id: row.get(1),
            minted_epoch: row.get::<_, i64>(2) as u64,
            rights: Rights::from_bits(row.get::<_, i32>(3) as i64),
            parent: row.get(4),
            label: row.get(5),
            created_at: row.get::<_, i64>(6) as u64,
            expires_at: row.get::<_, i64>(7) as u64,
            last_used_at: row.get::<_, i64>(8) as u64,
            space: space_link(&row, 10),
        };
        let admin_epoch = row.get::<_, Option<i64>>(9).map(|e| e as u64);
        let space = row.get::<_, Option<String>>(12).is_some().then(|| space_row(&row, 12));
        let mut shares = Vec::new();
        let mut session = None;
        match target_kind {
            TargetKind::Share => {
                let sql = format!(
                    "WITH RECURSIVE chain (id, parent_share_id, depth) AS (
                         SELECT id, parent_share_id, 0 FROM shares WHERE id = $1
                         UNION ALL
                         SELECT s.id, s.parent_share_id, c.depth + 1
                         FROM shares s JOIN chain c ON s.id = c.parent_share_id
                         WHERE c.depth < 1000
                     )
                     SELECT {SHARE_COLUMNS}, x.sid, x.id, x.title, x.epoch, x.cursor, x.created_at
                     FROM chain c JOIN shares s ON s.id = c.id JOIN sessions x ON x.sid = s.sid
                     ORDER BY c.depth"
                );
                let stmt = client.prepare_cached(&sql).await?;
                let rows = client.query(&stmt, &[&token.target_id]).await?;
                for row in &rows {
                    shares.push(share_row(row));
                }
                // A chain must end at a share whose parent is the session.
                match shares.last() {
                    Some(last) if last.parent_share_id.is_none() => {}
                    _ => return Ok(None),
                }
                session = rows.last().map(|r| session_row(r, SHARE_COLUMN_COUNT));
            }
            TargetKind::Session => session = self.session_on(&client, &token.target_id).await?,
            TargetKind::Admin | TargetKind::Space => {}
        }
        Ok(Some(Resolution { token, shares, session, admin_epoch, space }))
    }

    async fn session_on(&self, client: &deadpool_postgres::Client, id: &str) -> Result<Option<SessionRow>, PgError> {
        let stmt = client.prepare_cached(&format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1")).await?;
        Ok(client.query_opt(&stmt, &[&id]).await?.map(|r| session_row(&r, 0)))
    }

    pub async fn session(&self, id: &str) -> Result<Option<SessionRow>, PgError> {
        let client = self.client().await?;
        self.session_on(&client, id).await
    }

    pub async fn share(&self, id: &str) -> Result<Option<ShareRow>, PgError> {
        let client = self.client().await?;
        let sql = format!("SELECT {SHARE_COLUMNS} FROM shares s JOIN sessions x ON x.sid = s.sid WHERE s.id = $1");
        let stmt = client.prepare_cached(&sql).await?;
        Ok(client.query_opt(&stmt, &[&id]).await?.map(|r| share_row(&r)))
    }

    pub async fn space(&self, id: &str) -> Result<Option<SpaceRow>, PgError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&format!("SELECT {SPACE_COLUMNS} FROM spaces WHERE id = $1")).await?;
        Ok(client.query_opt(&stmt, &[&id]).await?.map(|r| space_row(&r, 0)))
    }

    /// Every space with the number of sessions opened through it, oldest first.
    pub async fn list_spaces(&self) -> Result<Vec<(SpaceRow, u32)>, PgError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {SPACE_COLUMNS}, (SELECT count(*) FROM space_sessions ss WHERE ss.space_id = spaces.id)
             FROM spaces ORDER BY created_at, id"
        );
        let stmt = client.prepare_cached(&sql).await?;
        Ok(client.query(&stmt, &[]).await?.iter().map(|r| (space_row(r, 0), r.get::<_, i64>(4) as u32)).collect())
    }

    /// The sessions opened through a space, oldest first.
    pub async fn space_sessions(&self, space_id: &str) -> Result<Vec<SpaceSessionRow>, PgError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT ss.key, {} FROM space_sessions ss JOIN sessions x ON x.sid = ss.sid
             WHERE ss.space_id = $1 ORDER BY ss.created_at, ss.key",
            SESSION_COLUMNS.split(", ").map(|c| format!("x.{c}")).collect::<Vec<_>>().join(", ")
        );
        let stmt = client.prepare_cached(&sql).await?;
        Ok(client
            .query(&stmt, &[&space_id])
            .await?
            .iter()
            .map(|r| SpaceSessionRow { key: r.get(0), session: session_row(r, 1) })
            .collect())
    }

    pub async fn admin_epoch(&self) -> Result<Option<u64>, PgError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT epoch FROM admin WHERE id = 1").await?;
        Ok(client.query_opt(&stmt, &[]).await?.map(|r| r.get::<_, i64>(0) as u64))
    }

    /// The current epochs of the named sessions and shares, and the admin epoch: what a node
    /// re-reads after its LISTEN connection was lost, before trusting its epoch cells again.
    /// Objects that no longer exist are left out.
    pub async fn epochs(&self, sessions: &[String], shares: &[String], spaces: &[String]) -> Result<CurrentEpochs, PgError> {
        type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
        let client = self.client().await?;
        let (s, h, p, a) = futures::try_join!(
            client.prepare_cached("SELECT id, epoch FROM sessions WHERE id = ANY($1)"),
            client.prepare_cached("SELECT id, epoch FROM shares WHERE id = ANY($1)"),
            client.prepare_cached("SELECT id, epoch FROM spaces WHERE id = ANY($1)"),
            client.prepare_cached("SELECT epoch FROM admin WHERE id = 1"),
        )?;
        let (session_params, share_params, space_params): ([Param<'_>; 1], [Param<'_>; 1], [Param<'_>; 1]) =
            ([&sessions], [&shares], [&spaces]);
        let (s, h, p, a) = futures::try_join!(
            client.query(&s, &session_params),
            client.query(&h, &share_params),
            client.query(&p, &space_params),
            client.query_opt(&a, &[])
        )?;
        let pairs = |rows: Vec<Row>| rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64)).collect();
        Ok(CurrentEpochs {
            sessions: pairs(s),
            shares: pairs(h),
            spaces: pairs(p),
            admin: a.map(|r| r.get::<_, i64>(0) as u64),
        })
    }

    /// The cursors of the given sessions (by internal id), for a follower's catch-up read.
    pub async fn cursors(&self, sids: &[i64]) -> Result<Vec<(i64, u64)>, PgError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT sid, cursor FROM sessions WHERE sid = ANY($1)").await?;
        Ok(client.query(&stmt, &[&sids]).await?.iter().map(|r| (r.get(0), r.get::<_, i64>(1) as u64)).collect())
    }

    /// The last batchSeq of `client_id` applied to session `sid` (0 if none).
    pub async fn last_batch_seq(&self, sid: i64, client_id: &Id16) -> Result<u64, PgError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(append_sql::LAST_BATCH).await?;
        Ok(client.query_opt(&stmt, &[&sid, &&client_id[..]]).await?.map(|r| r.get::<_, i64>(0) as u64).unwrap_or(0))
    }

    /// Up to `limit` entities ordered by (kind, id) after `after`, with the cursor they
    /// reflect: one statement, so one snapshot of the database.
    pub async fn snapshot_page(
        &self,
        sid: i64,
        after: Option<(EntityKind, &str)>,
        limit: u32,
    ) -> Result<SnapshotPage, PgError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT x.cursor, e.kind, e.id, e.parent_id, e.data
                 FROM sessions x LEFT JOIN LATERAL (
                     SELECT kind, id, parent_id, data FROM entities
                     WHERE sid = x.sid AND (kind, id) > ($2, $3) ORDER BY kind, id LIMIT $4
                 ) e ON true
                 WHERE x.sid = $1 ORDER BY e.kind, e.id",
            )
            .await?;
        let (kind, id) = after.map(|(k, id)| (k.code() as i16, id)).unwrap_or((-1, ""));
        let rows = client.query(&stmt, &[&sid, &kind, &id, &(limit as i64 + 1)]).await?;
        let first = rows.first().ok_or_else(|| PgError::Other(format!("no session with sid {sid}")))?;
        let cursor = first.get::<_, i64>(0) as u64;
        let mut entities = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.get::<_, Option<i16>>(1).is_some() {
                entities.push(entity(row, 1)?);
            }
        }
        let more = entities.len() > limit as usize;
        entities.truncate(limit as usize);
        Ok(SnapshotPage { cursor, entities, more })
    }

    /// Applied ops with seq > `after`, at most `limit`, and the session's cursor (one
    /// statement, so one snapshot).
    pub async fn changes(&self, sid: i64, after: u64, limit: u32) -> Result<(Vec<LoggedOp>, u64), PgError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT x.cursor, o.seq, o.op_id, o.is_delete, o.kind, o.entity_id, o.parent_id, o.data
                 FROM sessions x LEFT JOIN LATERAL (
                     SELECT seq, op_id, is_delete, kind, entity_id, parent_id, data FROM ops
                     WHERE sid = x.sid AND seq > $2 ORDER BY seq LIMIT $3
                 ) o ON true
                 WHERE x.sid = $1 ORDER BY o.seq",
            )
            .await?;
        let rows = client.query(&stmt, &[&sid, &(after as i64), &(limit as i64)]).await?;
        let first = rows.first().ok_or_else(|| PgError::Other(format!("no session with sid {sid}")))?;
        let cursor = first.get::<_, i64>(0) as u64;
        let mut ops = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(seq) = row.get::<_, Option<i64>>(1) else { continue };
            let op_id: Vec<u8> = row.get(2);
            let entity = entity(row, 4)?;
            let body = if row.get::<_, bool>(3) {
                OpBody::Delete { kind: entity.kind, id: entity.id }
            } else {
                OpBody::Put(entity)
            };
            ops.push(LoggedOp { seq: seq as u64, op: Op { op_id: op_id.try_into().unwrap_or([0; 16]), body } });
        }
        Ok((ops, cursor))
    }

    /// Every session with the number of shares it has.
    pub async fn list_sessions(&self) -> Result<Vec<(SessionRow, u32)>, PgError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {SESSION_COLUMNS}, (SELECT count(*) FROM shares s WHERE s.sid = sessions.sid)
             FROM sessions ORDER BY created_at, id"
        );
        let stmt = client.prepare_cached(&sql).await?;
        Ok(client.query(&stmt, &[]).await?.iter().map(|r| (session_row(r, 0), r.get::<_, i64>(6) as u32)).collect())
    }

    /// Shares of one session (by id), or of all sessions.
    pub async fn list_shares(&self, session_id: Option<&str>) -> Result<Vec<ShareRow>, PgError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {SHARE_COLUMNS} FROM shares s JOIN sessions x ON x.sid = s.sid
             WHERE $1::text IS NULL OR x.id = $1 ORDER BY s.created_at, s.id"
        );
        let stmt = client.prepare_cached(&sql).await?;
        Ok(client.query(&stmt, &[&session_id]).await?.iter().map(share_row).collect())
    }

    /// Audit rows with id > `since`, at most `limit`, in id order.
    pub async fn audit_page(&self, since: u64, limit: u32) -> Result<Vec<AuditRow>, PgError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT id, at, action, target_kind, target_id, session_id, peer, detail FROM audit
                 WHERE id > $1 ORDER BY id LIMIT $2",
            )
            .await?;
        Ok(client
            .query(&stmt, &[&(since as i64), &(limit as i64)])
            .await?
            .iter()
            .map(|r| AuditRow {
                id: r.get::<_, i64>(0) as u64,
                at: r.get::<_, i64>(1) as u64,
                event: AuditEvent {
                    action: r.get(2),
                    target_kind: r.get(3),
                    target_id: r.get(4),
                    session_id: r.get(5),
                    peer: r.get(6),
                    detail: r.get(7),
                },
            })
            .collect())
    }

    pub async fn stats(&self) -> Result<StoreStats, PgError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM shares),
                        (SELECT coalesce(sum(cursor), 0)::bigint FROM sessions)",
            )
            .await?;
        let row = client.query_one(&stmt, &[]).await?;
        Ok(StoreStats {
            sessions: row.get::<_, i64>(0) as u64,
            shares: row.get::<_, i64>(1) as u64,
            ops: row.get::<_, i64>(2) as u64,
        })
    }

    /// A readiness probe: a connection from the pool answers and the server accepts writes
    /// (is not a standby in recovery).
    /// The database's history id (see `migrate`'s version 2).
    pub async fn history(&self) -> Result<String, PgError> {
        let client = self.pool.get().await?;
        Ok(client.query_one("SELECT history FROM history WHERE id = 1", &[]).await?.get(0))
    }

    pub async fn probe(&self) -> Result<(), PgError> {
        let client = self.client().await?;
        let in_recovery: bool = client.query_one("SELECT pg_is_in_recovery()", &[]).await?.get(0);
        if in_recovery {
            return Err(PgError::Unavailable("the PostgreSQL server is a read-only standby".into()));
        }
        Ok(())
    }

    // ---- Writes ------------------------------------------------------------------------

    /// Records a redeem: the token's `last_used_at` and an audit row, in one transaction.
    pub async fn record_redeem(&self, hash: &[u8; 32], event: &AuditEvent) -> Result<(), PgError> {
        let now = now_ms();
        self.write(async |tx| {
            let stmt = tx.prepare_cached("UPDATE tokens SET last_used_at = $2 WHERE hash = $1").await?;
            tx.execute(&stmt, &[&&hash[..], &(now as i64)]).await?;
            insert_audit(tx, event, now).await
        })
        .await
    }

    /// Appends an audit row.
    pub async fn audit(&self, event: &AuditEvent) -> Result<(), PgError> {
        let now = now_ms();
        self.write(async |tx| insert_audit(tx, event, now).await).await
    }

    /// Applies `batch` to session `sid` (whose id text is `session_id`) in one transaction:
    /// locks the session row, checks `guard` (failing with [`PgError::Revoked`], changing
    /// nothing, if an epoch moved), then applies the batch exactly as the SQLite store does
    /// (dedupe by opId and payload hash, replay of a stored batchSeq, gap and divergence,
    /// rejected ops). Returns once committed.
    pub async fn append(
        &self,
        sid: i64,
        session_id: &str,
        batch: &capsync_model::IncomingBatch,
        guard: &[GuardLink],
    ) -> Result<Appended, PgError> {
        self.hook("server-append-begin").await;
        let call = append::AppendCall::new(sid, session_id, batch, guard);
        let row = if self.hook.is_some() {
            // Failpoints are armed (tests): the same call in an explicit transaction, so that
            // `server-before-commit` falls between the append's work and its COMMIT.
            self.write_at(Some("server-before-commit"), async |tx| {
                let stmt = tx.prepare_cached(append_sql::CALL).await?;
                Ok(tx.query_one(&stmt, &call.params()).await?)
            })
            .await?
        } else {
            // One statement in autocommit: one round trip, answered after its commit.
            let client = self.client().await?;
            let stmt = client.prepare_cached(append_sql::CALL).await?;
            client.query_one(&stmt, &call.params()).await?
        };
        append::interpret(&row, sid, batch)
    }

    /// Stores a new share and its token, and audits the mint (at the share's `created_at`),
    /// if `guard` (the minting capability's chain) still holds.
    pub async fn mint_share(
        &self,
        share: &ShareRow,
        token: &TokenRow,
        guard: &[GuardLink],
        event: &AuditEvent,
    ) -> Result<(), PgError> {
        self.write(async |tx| {
            check_guard(tx, guard).await?;
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO shares (id, sid, parent_share_id, parent_epoch, rights, label, epoch,
                                             created_at, expires_at, space_id, space_epoch)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                )
                .await?;
            tx.execute(
                &stmt,
                &[
                    &share.id,
                    &share.sid,
                    &share.parent_share_id,
                    &(share.parent_epoch as i64),
                    &(share.rights.bits() as i32),
                    &share.label,
                    &(share.epoch as i64),
                    &(share.created_at as i64),
                    &(share.expires_at as i64),
                    &share.space.as_ref().map(|s| s.space_id.as_str()),
                    &share.space.as_ref().map_or(0, |s| s.epoch as i64),
                ],
            )
            .await?;
            insert_token(tx, token).await?;
            insert_audit(tx, event, share.created_at).await
        })
        .await
    }

    /// Creates a session (created at the owner token's `created_at`) with its owner token and
    /// an audit row, if `guard` (e.g. the admin's epoch; may be empty) still holds. Returns the
    /// new session's internal row id.
    pub async fn create_session(
        &self,
        session_id: &str,
        title: &str,
        owner: &TokenRow,
        guard: &[GuardLink],
        event: &AuditEvent,
    ) -> Result<i64, PgError> {
        self.write(async |tx| {
            check_guard(tx, guard).await?;
            let stmt = tx
                .prepare_cached("INSERT INTO sessions (id, title, created_at) VALUES ($1, $2, $3) RETURNING sid")
                .await?;
            let sid: i64 = tx.query_one(&stmt, &[&session_id, &title, &(owner.created_at as i64)]).await?.get(0);
            insert_token(tx, owner).await?;
            insert_audit(tx, event, owner.created_at).await?;
            Ok(sid)
        })
        .await
    }

    /// Stores a new space and its token, and audits it (at the space's `created_at`), if `guard`
    /// (the admin's epoch; may be empty) still holds.
    pub async fn create_space(
        &self,
        space: &SpaceRow,
        token: &TokenRow,
        guard: &[GuardLink],
        event: &AuditEvent,
    ) -> Result<(), PgError> {
        self.write(async |tx| {
            check_guard(tx, guard).await?;
            let stmt = tx
                .prepare_cached("INSERT INTO spaces (id, label, epoch, created_at) VALUES ($1, $2, $3, $4)")
                .await?;
            tx.execute(&stmt, &[&space.id, &space.label, &(space.epoch as i64), &(space.created_at as i64)]).await?;
            insert_token(tx, token).await?;
            insert_audit(tx, event, space.created_at).await
        })
        .await
    }

    /// `Space.openSession` in one transaction: checks `guard` (the space capability's chain:
    /// a concurrent `revoke_space` either committed first and fails this with
    /// [`PgError::Revoked`], or waits for it), finds the session of (`open.space_id`,
    /// `open.key`) or creates it, stores `open.owner` as a token of it at its current epoch,
    /// and audits the call (`event` completed by [`OpenedSession::audit_event`]).
    ///
    /// Two transactions opening the same new key at once (on one node or several) both insert
    /// a session; the key's row goes in with `ON CONFLICT DO NOTHING`, which waits for the other
    /// transaction: if that one committed the key, this one deletes its own session row (no
    /// other row refers to it yet) and takes the committed one. The primary key on
    /// `(space_id, key)` is what makes this exact.
    pub async fn open_space_session(
        &self,
        open: &OpenSession,
        guard: &[GuardLink],
        event: &AuditEvent,
    ) -> Result<OpenedSession, PgError> {
        let now = open.owner.created_at as i64;
        self.write(async |tx| {
            check_guard(tx, guard).await?;
            let find = tx
                .prepare_cached(
                    "SELECT x.sid, x.id, x.epoch FROM space_sessions ss JOIN sessions x ON x.sid = ss.sid
                     WHERE ss.space_id = $1 AND ss.key = $2",
                )
                .await?;
            let found = |row: tokio_postgres::Row| OpenedSession {
                sid: row.get(0),
                session_id: row.get(1),
                epoch: row.get::<_, i64>(2) as u64,
                created: false,
            };
            let opened = match tx.query_opt(&find, &[&open.space_id, &open.key]).await? {
                Some(row) => found(row),
                None => {
                    let stmt = tx
                        .prepare_cached("INSERT INTO sessions (id, title, created_at) VALUES ($1, $2, $3) RETURNING sid")
                        .await?;
                    let sid: i64 = tx.query_one(&stmt, &[&open.new_session_id, &open.title, &now]).await?.get(0);
                    let stmt = tx
                        .prepare_cached(
                            "INSERT INTO space_sessions (space_id, key, sid, created_at) VALUES ($1, $2, $3, $4)
                             ON CONFLICT (space_id, key) DO NOTHING RETURNING sid",
                        )
                        .await?;
                    if tx.query_opt(&stmt, &[&open.space_id, &open.key, &sid, &now]).await?.is_some() {
                        OpenedSession { session_id: open.new_session_id.clone(), sid, epoch: 0, created: true }
                    } else {
                        // Another transaction opened this key first and has committed.
                        let stmt = tx.prepare_cached("DELETE FROM sessions WHERE sid = $1").await?;
                        tx.execute(&stmt, &[&sid]).await?;
                        let row = tx.query_opt(&find, &[&open.space_id, &open.key]).await?.ok_or_else(|| {
                            PgError::Unavailable("a concurrent openSession of the same key rolled back; retry".into())
                        })?;
                        found(row)
                    }
                }
            };
            let owner = TokenRow { target_id: opened.session_id.clone(), minted_epoch: opened.epoch, ..open.owner.clone() };
            insert_token(tx, &owner).await?;
            insert_audit(tx, &opened.audit_event(event), open.owner.created_at).await?;
            Ok(opened)
        })
        .await
    }

    /// Bumps a space's epoch (cutting its token, every session token minted through it and
    /// every share below those) and audits it.
    pub async fn revoke_space(&self, space_id: &str, event: &AuditEvent) -> Result<Option<u64>, PgError> {
        let sql = "UPDATE spaces SET epoch = epoch + 1 WHERE id = $1 RETURNING epoch";
        self.bump(sql, notify::RevokedKind::Space, space_id, event).await
    }

    /// Bumps a share's epoch and audits it, in one transaction; returns the new epoch once
    /// committed, or `None` if there is no such share (nothing is audited then).
    pub async fn revoke_share(&self, share_id: &str, event: &AuditEvent) -> Result<Option<u64>, PgError> {
        let sql = "UPDATE shares SET epoch = epoch + 1 WHERE id = $1 RETURNING epoch";
        self.bump(sql, notify::RevokedKind::Share, share_id, event).await
    }

    /// Bumps a session's epoch (cutting every token of it and of its shares) and audits it.
    pub async fn revoke_session(&self, session_id: &str, event: &AuditEvent) -> Result<Option<u64>, PgError> {
        let sql = "UPDATE sessions SET epoch = epoch + 1 WHERE id = $1 RETURNING epoch";
        self.bump(sql, notify::RevokedKind::Session, session_id, event).await
    }

    /// Bumps one epoch, audits it and tells every node (the notification is delivered at the
    /// commit, so never for a revocation that did not happen).
    async fn bump(
        &self,
        sql: &'static str,
        kind: notify::RevokedKind,
        id: &str,
        event: &AuditEvent,
    ) -> Result<Option<u64>, PgError> {
        let now = now_ms();
        self.write_at(Some("server-revoke-before-commit"), async |tx| {
            let stmt = tx.prepare_cached(sql).await?;
            let epoch = tx.query_opt(&stmt, &[&id]).await?.map(|r| r.get::<_, i64>(0) as u64);
            if let Some(epoch) = epoch {
                insert_audit(tx, event, now).await?;
                let notify = tx.prepare_cached("SELECT pg_notify($1, $2)").await?;
                let payload = notify::revoke_payload(kind, id, epoch);
                tx.execute(&notify, &[&notify::REVOKE_CHANNEL, &payload]).await?;
            }
            Ok(epoch)
        })
        .await
    }

    /// Creates the admin object at epoch 0, or bumps its epoch (invalidating every admin token
    /// minted before), and stores `token` minted at the epoch now in force, which it returns.
    pub async fn renew_admin(&self, token: &TokenRow) -> Result<u64, PgError> {
        self.write(async |tx| {
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO admin (id, epoch) VALUES (1, 0)
                         ON CONFLICT (id) DO UPDATE SET epoch = admin.epoch + 1 RETURNING epoch",
                )
                .await?;
            let epoch = tx.query_one(&stmt, &[]).await?.get::<_, i64>(0) as u64;
            insert_token(tx, &TokenRow { minted_epoch: epoch, ..token.clone() }).await?;
            Ok(epoch)
        })
        .await
    }

    /// For a node joining a shared database: creates the admin object at epoch 0 if there is
    /// none (exactly one of several nodes starting at once does), never bumping it, and stores
    /// `token` minted at the epoch in force, so this node's admin token lives beside every
    /// other node's. Answers `(epoch, created)`.
    pub async fn ensure_admin(&self, token: &TokenRow) -> Result<(u64, bool), PgError> {
        self.write(async |tx| {
            // `DO UPDATE` to itself locks the row, so a revocation cannot commit between
            // reading the epoch and storing a token minted at it; `xmax = 0` tells an insert.
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO admin (id, epoch) VALUES (1, 0)
                         ON CONFLICT (id) DO UPDATE SET epoch = admin.epoch
                         RETURNING epoch, (xmax = 0)",
                )
                .await?;
            let row = tx.query_one(&stmt, &[]).await?;
            let (epoch, created) = (row.get::<_, i64>(0) as u64, row.get::<_, bool>(1));
            insert_token(tx, &TokenRow { minted_epoch: epoch, ..token.clone() }).await?;
            Ok((epoch, created))
        })
        .await
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
