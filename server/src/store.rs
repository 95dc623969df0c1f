//! The server's store, behind a trait so the protocol layer never writes SQL and a later
//! PostgreSQL backend (DESIGN §10) fits the same shape.
//!
//! [`SqliteStore`] runs every read on a pool of reader threads and every write on the single
//! writer thread (group commit), and answers through futures; nothing here blocks the RPC
//! thread. Writes are submitted to the writer queue when the method is *called*, not when the
//! returned future is first polled, so calls made in order are applied in order.

use crate::error::{Result, ServerError};
use crate::registry::ObjectKey;
use capsync_persistence::server::{
    self, AuditEvent, AuditRow, OpenSession, OpenedSession, ServerReader, SessionRow, ShareRow, SnapshotPage,
    SpaceRow, SpaceSessionRow, StoreStats, TokenRow,
};
use capsync_persistence::readers::Readers;
use capsync_persistence::writer::{GroupObserver, JobOutcome, Txn, WriteJob, Writer};
use capsync_persistence::{BatchAck, EntityKind, IncomingBatch, LoggedOp, Op, OpStatus, StorageError};
use capsync_persistence::failpoint;
use futures::future::LocalBoxFuture;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

pub type Fut<T> = LocalBoxFuture<'static, Result<T>>;

pub use crate::access::Guard;

/// Receives the ops a committed batch applied, for live subscriptions.
pub type Publish = Box<dyn FnOnce(Vec<LoggedOp>) + Send>;

pub use capsync_model::stored::Resolution;

/// Where a write goes in the writer's queue.
#[derive(Clone, Copy, Debug)]
enum Priority {
    Normal,
    /// Runs after everything queued before it and before anything queued after it.
    Barrier,
    /// A revocation: ahead of everything still queued (see `WriteJob::urgent`).
    Urgent,
}

/// Runs a fire-and-forget write (an audit row, a token's last use) to completion in the
/// background; a failure is logged, never silently dropped.
pub fn detach(what: &'static str, write: Fut<()>) {
    tokio::task::spawn_local(async move {
        if let Err(err) = write.await {
            tracing::warn!(error = %err, what, "a background write failed; its row is lost");
        }
    });
}

/// What a store tells the server about other nodes' commits (see [`Store::events`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreEvent {
    /// The stream is (again) complete from here on: re-read epochs and cursors, then trust it.
    Listening,
    /// The stream broke: events may be missed until the next `Listening`.
    Lost,
    /// An object's epoch was bumped (committed) to this value.
    Revoked(ObjectKey, u64),
    /// A session's log reached this cursor (committed).
    Advanced { sid: i64, cursor: u64 },
}

pub trait Store {
    /// Which store runs: "sqlite" or "postgres" (in `stats`).
    fn name(&self) -> &'static str;
    /// Whether writes apply in the order their methods are called (SQLite's single writer
    /// queue). When not (PostgreSQL: concurrent transactions), a client's next batch is held
    /// until the previous one has committed, so batches still apply in batchSeq order.
    fn applies_in_call_order(&self) -> bool {
        true
    }
    /// Other nodes' revocations and appends, for a store several servers share; `None` (the
    /// default) for a store only this process writes. Taken once, at start.
    fn events(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<StoreEvent>> {
        None
    }
    /// The current epochs of `keys` (objects that no longer exist are left out): re-read when
    /// the event stream comes back. Only stores with events need it.
    fn epochs(&self, _keys: Vec<ObjectKey>) -> Fut<Vec<(ObjectKey, u64)>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// The cursors of the sessions `sids`: a follower's catch-up read when notifications may
    /// have been lost. Only stores with events need it.
    fn cursors(&self, _sids: Vec<i64>) -> Fut<Vec<(i64, u64)>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// Which copy of history this store holds (see `capsync_persistence::server::history`):
    /// sent with every grant.
    fn history(&self) -> String;
    fn resolve_token(&self, hash: [u8; 32]) -> Fut<Option<Resolution>>;
    /// Records a redeem: the token's `last_used_at` and an audit row.
    fn record_redeem(&self, hash: [u8; 32], event: AuditEvent) -> Fut<()>;
    /// Appends an audit row.
    fn audit(&self, event: AuditEvent) -> Fut<()>;
    /// Applies a batch; once it is durable, `publish` gets the ops it applied (in commit order,
    /// on the storage thread), then the ack is returned.
    fn append(&self, sid: i64, session_id: String, batch: IncomingBatch, guard: Guard, publish: Publish) -> Fut<BatchAck>;
    fn snapshot_page(&self, sid: i64, after: Option<(EntityKind, String)>, limit: u32) -> Fut<SnapshotPage>;
    fn changes(&self, sid: i64, after: u64, limit: u32) -> Fut<(Vec<LoggedOp>, u64)>;
    fn session(&self, session_id: String) -> Fut<Option<SessionRow>>;
    /// The last batchSeq of `client` applied to session `sid` (0 if none).
    fn last_batch_seq(&self, sid: i64, client: capsync_persistence::Id16) -> Fut<u64>;
    fn mint_share(&self, share: ShareRow, token: TokenRow, guard: Guard, event: AuditEvent) -> Fut<()>;
    fn create_session(&self, session_id: String, title: String, owner: TokenRow, event: AuditEvent) -> Fut<()>;
    /// Bumps the share's epoch; `on_commit` runs once it is durable, before any later write.
    fn revoke_share(&self, share_id: String, event: AuditEvent, on_commit: Box<dyn FnOnce(u64) + Send>) -> Fut<Option<u64>>;
    fn revoke_session(&self, session_id: String, event: AuditEvent, on_commit: Box<dyn FnOnce(u64) + Send>) -> Fut<Option<u64>>;
    /// Stores a new space, its token and an audit row, if `guard` (the admin's) still holds.
    fn create_space(&self, space: SpaceRow, token: TokenRow, guard: Guard, event: AuditEvent) -> Fut<()>;
    /// `Space.openSession`: if `guard` (the space capability's) still holds, the session of
    /// (space, key), created if new, with `open.owner` stored as a token of it at its current
    /// epoch, and an audit row (`event` completed by [`OpenedSession::audit_event`]); one
    /// transaction. Idempotent by key, concurrent calls included.
    fn open_space_session(&self, open: OpenSession, guard: Guard, event: AuditEvent) -> Fut<OpenedSession>;
    /// Bumps the space's epoch; `on_commit` runs once it is durable, before any later write.
    fn revoke_space(&self, space_id: String, event: AuditEvent, on_commit: Box<dyn FnOnce(u64) + Send>) -> Fut<Option<u64>>;
    /// Every space with the number of sessions opened through it.
    fn list_spaces(&self) -> Fut<Vec<(SpaceRow, u32)>>;
    /// The sessions opened through a space.
    fn space_sessions(&self, space_id: String) -> Fut<Vec<SpaceSessionRow>>;
    /// Stores a new admin token for this server's `admin.uri` and returns the admin epoch it
    /// was minted at, creating the admin object if there is none. SQLite, whose data dir is
    /// this server's alone, bumps the epoch (a lost `admin.uri` rotates the admin: every older
    /// admin token dies); PostgreSQL, shared by nodes, mints at the epoch in force (other
    /// nodes' admin tokens stay valid).
    fn renew_admin(&self, token: TokenRow) -> Fut<u64>;
    fn list_sessions(&self) -> Fut<Vec<(SessionRow, u32)>>;
    fn list_shares(&self, session_id: Option<String>) -> Fut<Vec<ShareRow>>;
    fn audit_page(&self, since: u64, limit: u32) -> Fut<Vec<AuditRow>>;
    fn stats(&self) -> Fut<StoreStats>;
    /// A write-path probe for `/readyz`: an empty write through the same queue and commit as
    /// every append, answered once it has committed.
    fn probe(&self) -> Fut<()>;
    /// Lets every queued write commit and complete, then stops the storage threads.
    fn shutdown(&self) -> Fut<()>;
}

/// The ops of `batch` that `ack` says were applied now, with their seqs.
fn applied_ops(batch: IncomingBatch, ack: &BatchAck) -> Vec<LoggedOp> {
    batch
        .ops
        .into_iter()
        .zip(&ack.results)
        .filter(|(_, r)| r.status == OpStatus::Applied)
        .filter_map(|(op, r)| {
            let op_id = op.op_id.try_into().ok()?;
            Some(LoggedOp { seq: r.seq, op: Op { op_id, body: op.body.ok()? } })
        })
        .collect()
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub struct SqliteStore {
    history: String,
    writer: Mutex<Writer>,
    readers: Mutex<Option<Readers<ServerReader>>>,
}

impl SqliteStore {
    /// Opens `<data_dir>/capsync.db`, migrating it, and starts the writer and reader threads.
    pub fn open(data_dir: &Path, reader_threads: usize, observer: Option<GroupObserver>) -> Result<SqliteStore> {
        let path = data_dir.join("capsync.db");
        let conn = server::open(&path)?;
        let history = server::history(&conn)?;
        let readers = Readers::start("capsync", reader_threads, || ServerReader::open(&path))?;
        Ok(SqliteStore {
            history,
            writer: Mutex::new(Writer::start_observed("capsync", conn, observer)),
            readers: Mutex::new(Some(readers)),
        })
    }

    fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&ServerReader) -> Result<T, StorageError> + Send + 'static,
    ) -> Fut<T> {
        let (tx, rx) = oneshot::channel();
        let submitted = match &*self.readers.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(readers) => readers.submit(move |reader| {
                let _ = tx.send(work(reader));
            }),
            None => Err(StorageError::Stopped),
        };
        Box::pin(async move {
            submitted?;
            Ok(rx.await.map_err(|_| StorageError::Stopped)??)
        })
    }

    /// Queues a write now; the future resolves after its group commits. `after_commit` runs on
    /// the writer thread once the write is durable (and may take what it needs from the value).
    fn write<T: Send + 'static>(
        &self,
        priority: Priority,
        weight: u64,
        work: impl FnOnce(&Txn<'_>) -> Result<T> + Send + 'static,
        after_commit: impl FnOnce(&mut T) + Send + 'static,
    ) -> Fut<T> {
        let (tx, rx) = oneshot::channel();
        let body = move |txn: &Txn<'_>| {
            let result = work(txn);
            JobOutcome {
                keep: result.is_ok(),
                completion: Box::new(move |committed: Result<(), StorageError>| {
                    let outcome = match (committed, result) {
                        (Ok(()), Ok(mut value)) => {
                            after_commit(&mut value);
                            Ok(value)
                        }
                        (Err(storage), Ok(_)) => Err(ServerError::Storage(storage)),
                        (_, Err(err)) => Err(err),
                    };
                    let _ = tx.send(outcome);
                }),
            }
        };
        let job = match priority {
            Priority::Normal => WriteJob::new(body),
            Priority::Barrier => WriteJob::barrier(body),
            Priority::Urgent => WriteJob::urgent(body),
        }
        .with_weight(weight);
        let submitted = self.writer.lock().unwrap_or_else(|p| p.into_inner()).submit(job);
        Box::pin(async move {
            submitted?;
            rx.await.map_err(|_| StorageError::Stopped)?
        })
    }

    fn revoke(
        &self,
        bump: fn(&Txn<'_>, &str) -> Result<Option<u64>, StorageError>,
        id: String,
        event: AuditEvent,
        on_commit: Box<dyn FnOnce(u64) + Send>,
    ) -> Fut<Option<u64>> {
        self.write(
            Priority::Urgent,
            1,
            move |txn| {
                let epoch = bump(txn, &id)?;
                if epoch.is_some() {
                    txn.audit(&event, now_ms())?;
                }
                failpoint::hit("server-revoke-before-commit");
                Ok(epoch)
            },
            move |epoch: &mut Option<u64>| {
                failpoint::hit("server-revoke-after-commit");
                if let Some(epoch) = *epoch {
                    on_commit(epoch)
                }
            },
        )
    }
}

impl Store for SqliteStore {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn history(&self) -> String {
        self.history.clone()
    }

    fn resolve_token(&self, hash: [u8; 32]) -> Fut<Option<Resolution>> {
        self.read(move |reader| {
            let Some(token) = reader.token(&hash)? else { return Ok(None) };
            let mut shares: Vec<ShareRow> = Vec::new();
            let mut session = None;
            match token.target_kind {
                server::TargetKind::Share => {
                    let mut next = Some(token.target_id.clone());
                    while let Some(id) = next.take() {
                        let Some(share) = reader.share(&id)? else { return Ok(None) };
                        next = share.parent_share_id.clone();
                        shares.push(share);
                    }
                    if let Some(last) = shares.last() {
                        session = reader.session(&last.session_id)?;
                    }
                }
                server::TargetKind::Session => session = reader.session(&token.target_id)?,
                server::TargetKind::Admin | server::TargetKind::Space => {}
            }
            let admin_epoch = reader.admin_epoch()?;
            let space = match token.space_to_resolve() {
                Some(id) => reader.space(id)?,
                None => None,
            };
            Ok(Some(Resolution { token, shares, session, admin_epoch, space }))
        })
    }

    fn record_redeem(&self, hash: [u8; 32], event: AuditEvent) -> Fut<()> {
        self.write(
            Priority::Normal,
            1,
            move |txn| {
                let now = now_ms();
                txn.touch_token(&hash, now)?;
                txn.audit(&event, now)?;
                Ok(())
            },
            |_| {},
        )
    }

    fn audit(&self, event: AuditEvent) -> Fut<()> {
        self.write(Priority::Normal, 1, move |txn| Ok(txn.audit(&event, now_ms())?), |_| {})
    }

    fn append(&self, sid: i64, session_id: String, batch: IncomingBatch, guard: Guard, publish: Publish) -> Fut<BatchAck> {
        let weight = batch.ops.len() as u64;
        let written = self.write(
            Priority::Normal,
            weight,
            move |txn| {
                guard.check()?;
                let ack = txn.append(sid, &session_id, &batch)?;
                failpoint::hit("server-before-commit");
                let applied = applied_ops(batch, &ack);
                Ok((ack, applied))
            },
            move |(_, applied)| {
                failpoint::hit("server-after-commit");
                publish(std::mem::take(applied));
            },
        );
        Box::pin(async move { Ok(written.await?.0) })
    }

    fn snapshot_page(&self, sid: i64, after: Option<(EntityKind, String)>, limit: u32) -> Fut<SnapshotPage> {
        self.read(move |reader| reader.snapshot_page(sid, after.as_ref().map(|(k, id)| (*k, id.as_str())), limit))
    }

    fn changes(&self, sid: i64, after: u64, limit: u32) -> Fut<(Vec<LoggedOp>, u64)> {
        self.read(move |reader| reader.changes(sid, after, limit))
    }

    fn session(&self, session_id: String) -> Fut<Option<SessionRow>> {
        self.read(move |reader| {
            // On a reader thread: a test holds a read here without stopping the RPC thread.
            failpoint::hit("server-read-session");
            reader.session(&session_id)
        })
    }

    fn last_batch_seq(&self, sid: i64, client: capsync_persistence::Id16) -> Fut<u64> {
        self.read(move |reader| reader.last_batch_seq(sid, &client))
    }

    fn mint_share(&self, share: ShareRow, token: TokenRow, guard: Guard, event: AuditEvent) -> Fut<()> {
        self.write(
            Priority::Normal,
            1,
            move |txn| {
                guard.check()?;
                txn.insert_share(&share)?;
                txn.insert_token(&token)?;
                txn.audit(&event, share.created_at)?;
                Ok(())
            },
            |_| {},
        )
    }

    fn create_session(&self, session_id: String, title: String, owner: TokenRow, event: AuditEvent) -> Fut<()> {
        self.write(
            Priority::Normal,
            1,
            move |txn| {
                txn.create_session(&session_id, &title, owner.created_at)?;
                txn.insert_token(&owner)?;
                txn.audit(&event, owner.created_at)?;
                Ok(())
            },
            |_| {},
        )
    }

    fn revoke_share(&self, share_id: String, event: AuditEvent, on_commit: Box<dyn FnOnce(u64) + Send>) -> Fut<Option<u64>> {
        self.revoke(|txn, id| txn.bump_share_epoch(id), share_id, event, on_commit)
    }

    fn revoke_session(&self, session_id: String, event: AuditEvent, on_commit: Box<dyn FnOnce(u64) + Send>) -> Fut<Option<u64>> {
        self.revoke(|txn, id| txn.bump_session_epoch(id), session_id, event, on_commit)
    }

    fn create_space(&self, space: SpaceRow, token: TokenRow, guard: Guard, event: AuditEvent) -> Fut<()> {
        self.write(
            Priority::Normal,
            1,
            move |txn| {
                guard.check()?;
                txn.insert_space(&space)?;
                txn.insert_token(&token)?;
                txn.audit(&event, space.created_at)?;
                Ok(())
            },
            |_| {},
        )
    }

    fn open_space_session(&self, open: OpenSession, guard: Guard, event: AuditEvent) -> Fut<OpenedSession> {
        self.write(
            Priority::Normal,
            1,
            move |txn| {
                // On the single writer, after every revocation queued before it has bumped its cell.
                guard.check()?;
                let opened = txn.open_space_session(&open)?;
                txn.audit(&opened.audit_event(&event), open.owner.created_at)?;
                Ok(opened)
            },
            |_| {},
        )
    }

    fn revoke_space(&self, space_id: String, event: AuditEvent, on_commit: Box<dyn FnOnce(u64) + Send>) -> Fut<Option<u64>> {
        self.revoke(|txn, id| txn.bump_space_epoch(id), space_id, event, on_commit)
    }

    fn list_spaces(&self) -> Fut<Vec<(SpaceRow, u32)>> {
        self.read(|reader| reader.list_spaces())
    }

    fn space_sessions(&self, space_id: String) -> Fut<Vec<SpaceSessionRow>> {
        self.read(move |reader| reader.space_sessions(&space_id))
    }

    fn renew_admin(&self, mut token: TokenRow) -> Fut<u64> {
        self.write(
            Priority::Barrier,
            1,
            move |txn| {
                let epoch = txn.renew_admin()?;
                token.minted_epoch = epoch;
                txn.insert_token(&token)?;
                Ok(epoch)
            },
            |_| {},
        )
    }

    fn list_sessions(&self) -> Fut<Vec<(SessionRow, u32)>> {
        self.read(|reader| reader.list_sessions())
    }

    fn list_shares(&self, session_id: Option<String>) -> Fut<Vec<ShareRow>> {
        self.read(move |reader| reader.list_shares(session_id.as_deref()))
    }

    fn audit_page(&self, since: u64, limit: u32) -> Fut<Vec<AuditRow>> {
        self.read(move |reader| reader.audit(since, limit))
    }

    fn stats(&self) -> Fut<StoreStats> {
        self.read(|reader| reader.stats())
    }

    fn probe(&self) -> Fut<()> {
        self.write(Priority::Normal, 0, |_| Ok(()), |_| {})
    }

    fn shutdown(&self) -> Fut<()> {
        // Joining threads blocks: done on a thread of its own, never on the RPC thread.
        let writer = std::mem::replace(&mut *self.writer.lock().unwrap_or_else(|p| p.into_inner()), Writer::stopped());
        let readers = self.readers.lock().unwrap_or_else(|p| p.into_inner()).take();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut writer = writer;
                drop(readers);
                writer.shutdown()
            })
            .await
            .map_err(|_| StorageError::Stopped)??;
            Ok(())
        })
    }
}
