//! The application-facing API: open an outbox, attach sturdy URIs under names, queue changes,
//! sync, pull, and read status.

use crate::error::{ClientError, Result};
use crate::pull::{self, PullReport};
use crate::store::Db;
use crate::sync::{self, SyncOptions, SyncReport};
use capsync_persistence::client::{ClientDb, ImportProgress, ImportRow, OpCounts};
use capsync_persistence::{Entity, EntityKind, Id16, Op, OpBody};
use capsync_persistence::failpoint;
use capsync_schema::SturdyUri;
use std::path::Path;
use std::time::Duration;

/// A change an application makes; [`Client::enqueue`] gives each an opId.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Put { kind: EntityKind, id: String, parent: String, data: Vec<u8> },
    Delete { kind: EntityKind, id: String },
}

/// One ref's state, as `capsync status` shows it. `uri` has its token redacted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefStatus {
    pub name: String,
    pub uri: String,
    pub session_id: String,
    /// ok, unreachable, revoked, expired, unknown-token, denied or diverged.
    pub state: String,
    pub counts: OpCounts,
    /// The server's cursor in the latest ack.
    pub cursor: u64,
    pub last_error: String,
    /// Acked ops re-delivered because the server had lost them (restored from a backup).
    pub healed: u64,
}

/// A local-first capsync client over one SQLite file (outbox, refs and replicas).
#[derive(Clone)]
pub struct Client {
    db: Db,
    options: SyncOptions,
}

/// Largest `data` the client accepts (the server's default limit).
pub const MAX_DATA_BYTES: usize = 1024 * 1024;

impl Client {
    /// Opens (or creates, mode 0600) the client database at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Client> {
        Ok(Client { db: Db::new(ClientDb::open(path.as_ref())?), options: SyncOptions::default() })
    }

    pub fn with_options(mut self, options: SyncOptions) -> Client {
        self.options = options;
        self
    }

    pub fn options(&self) -> &SyncOptions {
        &self.options
    }

    /// Attaches a sturdy URI under `name`. Re-attaching a name (say, with a fresh token after
    /// a revocation) keeps its queued ops and resumes delivering them.
    pub fn attach(&self, name: &str, uri: &str) -> Result<()> {
        SturdyUri::parse(uri)?;
        let client_id = *uuid::Uuid::new_v4().as_bytes();
        self.db.with(|db| db.attach(name, uri, client_id))
    }

    /// The name the CLI gives a URI it was handed directly: stable per token, not secret.
    pub fn default_ref_name(uri: &SturdyUri) -> String {
        format!("ref-{}", uri.token.hash().tag())
    }

    /// Queues changes for `name` in one durable transaction and returns their opIds. Every
    /// change is checked first; if one is invalid, nothing is queued.
    pub fn enqueue(&self, name: &str, changes: impl IntoIterator<Item = Change>) -> Result<Vec<Id16>> {
        let mut ops = Vec::new();
        for (i, change) in changes.into_iter().enumerate() {
            let body = validate(change).map_err(|e| ClientError::Invalid(format!("change {}: {e}", i + 1)))?;
            ops.push(Op { op_id: *uuid::Uuid::now_v7().as_bytes(), body });
        }
        let ids = ops.iter().map(|o| o.op_id).collect();
        self.db.with(|db| {
            if db.ref_row(name)?.is_none() {
                return Ok(Err(ClientError::Invalid(format!("no ref named {name}; attach it first"))));
            }
            db.enqueue(name, &ops, self.options.batch_limits())?;
            Ok(Ok(()))
        })??;
        failpoint::hit("client-after-enqueue");
        Ok(ids)
    }

    /// Queues ops that carry their own opIds (deterministic ones, such as an agent import's)
    /// for `name` in one durable transaction, leaving out any whose opId the outbox already
    /// holds: queueing the same ops again queues nothing. With `progress`, the ref's import
    /// (see [`Client::attach_import`]) records that read position in the same transaction.
    /// Every op is checked first; if one is invalid, nothing is queued. Returns how many ops
    /// were queued.
    pub fn enqueue_ops(&self, name: &str, ops: Vec<Op>, progress: Option<&ImportProgress>) -> Result<usize> {
        for (i, op) in ops.iter().enumerate() {
            check_body(&op.body).map_err(|e| ClientError::Invalid(format!("op {}: {e}", i + 1)))?;
        }
        let queued = self.db.with(|db| {
            if db.ref_row(name)?.is_none() {
                return Ok(Err(ClientError::Invalid(format!("no ref named {name}; attach it first"))));
            }
            Ok(Ok(db.enqueue_new(name, ops, self.options.batch_limits(), progress)?))
        })??;
        failpoint::hit("client-after-enqueue");
        Ok(queued)
    }

    /// Attaches `uri` under `row.ref_name` and records it as an agent import (the session and
    /// space it came from), in one transaction.
    pub fn attach_import(&self, row: &ImportRow, uri: &str) -> Result<()> {
        SturdyUri::parse(uri)?;
        let client_id = *uuid::Uuid::new_v4().as_bytes();
        self.db.with(|db| db.attach_import(row, uri, client_id))
    }

    /// The agent import attached under `name`, if any.
    pub fn import_row(&self, name: &str) -> Result<Option<ImportRow>> {
        self.db.with(|db| db.import_row(name))
    }

    /// The agent import of `agent` last read from `source` (relative to its root), if any.
    pub fn import_by_source(&self, agent: &str, source: &str) -> Result<Option<ImportRow>> {
        self.db.with(|db| db.import_by_source(agent, source))
    }

    /// Whether a ref is attached under `name`.
    pub fn has_ref(&self, name: &str) -> Result<bool> {
        Ok(self.db.with(|db| db.ref_row(name))?.is_some())
    }

    /// Ops of `name` the server has not acknowledged yet.
    pub fn unacked(&self, name: &str) -> Result<u64> {
        self.db.with(|db| db.unacked_count(name))
    }

    /// The sturdy URI attached under `name` (it holds a secret: never print it).
    pub fn ref_uri(&self, name: &str) -> Result<SturdyUri> {
        self.uri(name)
    }

    pub fn put(&self, name: &str, kind: EntityKind, id: &str, parent: &str, data: &[u8]) -> Result<Id16> {
        let change = Change::Put { kind, id: id.into(), parent: parent.into(), data: data.to_vec() };
        Ok(self.enqueue(name, [change])?[0])
    }

    pub fn delete(&self, name: &str, kind: EntityKind, id: &str) -> Result<Id16> {
        Ok(self.enqueue(name, [Change::Delete { kind, id: id.into() }])?[0])
    }

    /// Delivers everything queued for `name` and returns once it is acknowledged. Must run
    /// inside a tokio `LocalSet`.
    pub async fn sync(&self, name: &str) -> Result<SyncReport> {
        sync::sync_once(&self.db, name, &self.options).await
    }

    /// Keeps delivering `name`'s ops as they are queued (by this or another process), across
    /// disconnects, until the ref is refused (revoked, expired...) or `stop` completes.
    pub async fn sync_forever(&self, name: &str, stop: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::pin!(stop);
        let mut failures = 0u32;
        loop {
            match self.sync(name).await {
                Ok(_) => failures = 0,
                Err(err) if err.is_retryable() => {
                    failures += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(sync::backoff(&self.options, failures)) => continue,
                        _ = &mut stop => return Ok(()),
                    }
                }
                Err(err) => return Err(err),
            }
            loop {
                let n = name.to_owned();
                if self.db.call(move |db| db.unacked_count(&n)).await? > 0 {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = &mut stop => return Ok(()),
                }
            }
        }
    }

    /// Pulls `name`'s session into its local replica and returns the replica's cursor.
    pub async fn pull(&self, name: &str) -> Result<PullReport> {
        let uri = self.uri(name)?;
        pull::pull(&self.db, name, &uri, self.options.tls_ca.as_deref()).await
    }

    /// Follows `name`'s session live into its replica, calling `on_ops` with each run of new
    /// ops (in seq order, each exactly once) after it is stored, across disconnects and server
    /// restarts, until `stop` completes or the server refuses the ref (revoked, expired).
    pub async fn follow(
        &self,
        name: &str,
        on_ops: impl FnMut(&[capsync_persistence::LoggedOp]),
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let uri = self.uri(name)?;
        crate::follow::follow(&self.db, name, &uri, &self.options, on_ops, stop).await
    }

    /// The replica of `name`'s session, ordered by (kind, id), and its cursor.
    pub fn replica(&self, name: &str) -> Result<(u64, Vec<Entity>)> {
        self.db.with(|db| {
            let cursor = db.replica_cursor(name)?.map(|(_, c)| c).unwrap_or(0);
            Ok((cursor, db.replica_entities(name)?))
        })
    }

    pub fn status(&self) -> Result<Vec<RefStatus>> {
        self.db.with(|db| {
            let mut out = Vec::new();
            for row in db.refs()? {
                let uri = SturdyUri::parse(&row.uri).map(|u| u.redacted()).unwrap_or_else(|_| "<unparsable>".into());
                out.push(RefStatus {
                    counts: db.counts(&row.name)?,
                    name: row.name,
                    uri,
                    session_id: row.session_id,
                    state: row.state,
                    cursor: row.ack_cursor,
                    last_error: row.last_error,
                    healed: row.healed,
                });
            }
            Ok(out)
        })
    }

    /// Forgets every ack of `name`, so the next sync replays all its batches (see
    /// [`ClientDb::forget_acks`]). Returns how many batches will be replayed.
    pub fn forget_acks(&self, name: &str) -> Result<u64> {
        self.db.with(|db| db.forget_acks(name))
    }

    /// Names of refs that have ops the server has not acknowledged.
    pub fn refs_with_work(&self) -> Result<Vec<String>> {
        self.db.with(|db| db.refs_with_unacked())
    }

    fn uri(&self, name: &str) -> Result<SturdyUri> {
        let row = self.db.with(|db| db.ref_row(name))?.ok_or_else(|| ClientError::Invalid(format!("no ref named {name}")))?;
        Ok(SturdyUri::parse(&row.uri)?)
    }
}

fn validate(change: Change) -> std::result::Result<OpBody, String> {
    let body = match change {
        Change::Put { kind, id, parent, data } => OpBody::Put(Entity { kind, id, parent_id: parent, data }),
        Change::Delete { kind, id } => OpBody::Delete { kind, id },
    };
    check_body(&body)?;
    Ok(body)
}

/// What the client checks before queueing an op (the server checks it again).
fn check_body(body: &OpBody) -> std::result::Result<(), String> {
    let check_id = |id: &str| {
        if id.is_empty() || id.len() > 256 {
            Err("an id is 1 to 256 bytes".to_owned())
        } else {
            Ok(())
        }
    };
    match body {
        OpBody::Put(Entity { kind, id, parent_id, data }) => {
            check_id(id)?;
            if parent_id.len() > 256 {
                return Err("a parent id is at most 256 bytes".into());
            }
            if data.len() > MAX_DATA_BYTES {
                return Err(format!("data is {} bytes; the limit is {MAX_DATA_BYTES}", data.len()));
            }
            if serde_json::from_slice::<serde::de::IgnoredAny>(data).is_err() {
                return Err("data is not valid JSON".into());
            }
            if *kind == EntityKind::Part && parent_id.is_empty() {
                return Err("a part needs its parent message's id".into());
            }
            Ok(())
        }
        OpBody::Delete { id, .. } => check_id(id),
    }
}
