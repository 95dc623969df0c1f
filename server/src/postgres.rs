//! The server's [`Store`] on PostgreSQL (`capsync serve --store postgres://...`), over
//! [`capsync_store_postgres::PgStore`].
//!
//! Where the SQLite store relies on its single writer thread, this one relies on PostgreSQL:
//! every write checks the capability's epoch chain against the stored epochs inside its own
//! transaction (so no write commits after a revocation has committed), and appends lock their
//! session's row (so seqs have no gap and follow commit order). Within this process the rest
//! works as with SQLite: a committed revocation bumps the in-memory epoch cells, and a
//! committed append publishes its ops to the live feeds.
//!
//! PostgreSQL going away makes calls fail with `capsync/overloaded` (clients retry; a write
//! that may or may not have committed is answered exactly on retry by dedupe and batch
//! replay), never `capsync/revoked`; the pool reconnects by itself when it comes back.
//!
//! One node only for now: revocations and new ops reach other processes on the same database
//! through their next store read, not at once (several nodes are issue 16).

use crate::access::Guard;
use crate::error::{Result, ServerError};
use crate::registry::ObjectKey;
use crate::store::{Fut, Publish, Resolution, Store, StoreEvent};
use capsync_model::stored::{
    AuditEvent, AuditRow, OpenSession, OpenedSession, SessionRow, ShareRow, SnapshotPage, SpaceRow, SpaceSessionRow,
    StoreStats, TokenRow,
};
use capsync_store_postgres::notify::{ListenOptions, Notice, RevokedKind};
use capsync_persistence::{BatchAck, EntityKind, Id16, IncomingBatch, LoggedOp};
use capsync_persistence::failpoint;
use capsync_persistence::writer::{GroupObserver, GroupReport};
use capsync_store_postgres::{GuardLink, Hook, PgError, PgOptions, PgStore};

pub struct PostgresStore {
    pg: PgStore,
    history: String,
    /// Told of every committed append, as the SQLite writer tells of its groups (metrics).
    observer: Option<GroupObserver>,
    /// Appends under way: a graceful shutdown lets them commit and answer.
    appends: tokio_util::task::TaskTracker,
}

impl PostgresStore {
    /// Connects (a clear error if PostgreSQL cannot be reached) and brings the schema up to
    /// date under the migration lock.
    pub async fn connect(url: &str, observer: Option<GroupObserver>) -> Result<PostgresStore> {
        let mut options = PgOptions::default();
        if failpoint::any_armed() {
            let hook: Hook = std::sync::Arc::new(|point| Box::pin(hit_off_thread(point)));
            options.hook = Some(hook);
        }
        let pg = PgStore::connect_with(url, options).await.map_err(unreachable_at_start)?;
        let history = pg.history().await.map_err(unreachable_at_start)?;
        Ok(PostgresStore { pg, history, observer, appends: tokio_util::task::TaskTracker::new() })
    }
}

/// A failpoint hit on a blocking thread, so a `hold` does not stop the RPC thread; nothing
/// at all unless a failpoint is armed.
async fn hit_off_thread(point: &'static str) {
    if failpoint::any_armed() {
        let _ = tokio::task::spawn_blocking(move || failpoint::hit(point)).await;
    }
}

fn unreachable_at_start(err: PgError) -> ServerError {
    ServerError::Database(err.to_string())
}

impl From<PgError> for ServerError {
    fn from(err: PgError) -> ServerError {
        match err {
            PgError::Gap { got, expected } => ServerError::Gap { got, expected },
            PgError::Diverged { batch_seq } => ServerError::Diverged(batch_seq),
            PgError::ZeroBatchSeq => ServerError::Invalid("batchSeq must start at 1".into()),
            PgError::Revoked => ServerError::Revoked,
            PgError::Unavailable(why) => ServerError::Overloaded(format!("the database is unavailable; retry: {why}")),
            other => ServerError::Database(other.to_string()),
        }
    }
}

/// The guard's links as the PostgreSQL store checks them, after the in-memory check (which
/// fails fast on a revocation this process already knows about).
fn links(guard: &Guard) -> Result<Vec<GuardLink>> {
    guard.check()?;
    Ok(guard
        .chain
        .iter()
        .map(|link| match &link.key {
            ObjectKey::Admin => GuardLink::admin(link.expected),
            ObjectKey::Session(id) => GuardLink::session(id.clone(), link.expected),
            ObjectKey::Share(id) => GuardLink::share(id.clone(), link.expected),
            ObjectKey::Space(id) => GuardLink::space(id.clone(), link.expected),
        })
        .collect())
}

impl Store for PostgresStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn applies_in_call_order(&self) -> bool {
        false
    }

    fn history(&self) -> String {
        self.history.clone()
    }

    fn events(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<StoreEvent>> {
        let mut notices = self.pg.listen(ListenOptions::default());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(notice) = notices.recv().await {
                let event = match notice {
                    Notice::Listening => StoreEvent::Listening,
                    Notice::Lost => StoreEvent::Lost,
                    Notice::Advanced { sid, cursor } => StoreEvent::Advanced { sid, cursor },
                    Notice::Revoked { kind: RevokedKind::Session, id, epoch } => StoreEvent::Revoked(ObjectKey::Session(id), epoch),
                    Notice::Revoked { kind: RevokedKind::Share, id, epoch } => StoreEvent::Revoked(ObjectKey::Share(id), epoch),
                    Notice::Revoked { kind: RevokedKind::Space, id, epoch } => StoreEvent::Revoked(ObjectKey::Space(id), epoch),
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        Some(rx)
    }

    fn epochs(&self, keys: Vec<ObjectKey>) -> Fut<Vec<(ObjectKey, u64)>> {
        let pg = self.pg.clone();
        Box::pin(async move {
            let (mut sessions, mut shares, mut spaces, mut admin) = (Vec::new(), Vec::new(), Vec::new(), false);
            for key in keys {
                match key {
                    ObjectKey::Admin => admin = true,
                    ObjectKey::Session(id) => sessions.push(id),
                    ObjectKey::Share(id) => shares.push(id),
                    ObjectKey::Space(id) => spaces.push(id),
                }
            }
            let current = pg.epochs(&sessions, &shares, &spaces).await?;
            let mut epochs: Vec<(ObjectKey, u64)> = Vec::new();
            epochs.extend(current.sessions.into_iter().map(|(id, e)| (ObjectKey::Session(id), e)));
            epochs.extend(current.shares.into_iter().map(|(id, e)| (ObjectKey::Share(id), e)));
            epochs.extend(current.spaces.into_iter().map(|(id, e)| (ObjectKey::Space(id), e)));
            if let (true, Some(epoch)) = (admin, current.admin) {
                epochs.push((ObjectKey::Admin, epoch));
            }
            Ok(epochs)
        })
    }

    fn cursors(&self, sids: Vec<i64>) -> Fut<Vec<(i64, u64)>> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.cursors(&sids).await?) })
    }

    fn resolve_token(&self, hash: [u8; 32]) -> Fut<Option<Resolution>> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.resolve_token(&hash).await?) })
    }

    fn record_redeem(&self, hash: [u8; 32], event: AuditEvent) -> Fut<()> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.record_redeem(&hash, &event).await?) })
    }

    fn audit(&self, event: AuditEvent) -> Fut<()> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.audit(&event).await?) })
    }

    fn append(&self, sid: i64, session_id: String, batch: IncomingBatch, guard: Guard, publish: Publish) -> Fut<BatchAck> {
        let pg = self.pg.clone();
        let observer = self.observer.clone();
        // On a task of its own: a batch that commits is published to live subscriptions even
        // if the caller has gone away meanwhile.
        let (done, answer) = tokio::sync::oneshot::channel();
        self.appends.spawn_local(async move {
            let outcome = async {
                let links = links(&guard)?;
                let started = std::time::Instant::now();
                let appended = pg.append(sid, &session_id, &batch, &links).await?;
                if let Some(observer) = &observer {
                    // Each append is its own transaction: a group of one.
                    let weight = appended.applied.len() as u64;
                    observer(&GroupReport { jobs: 1, weight, took: started.elapsed(), queued: 0, committed: true });
                }
                failpoint::hit("server-after-commit");
                publish(appended.applied);
                Ok(appended.ack)
            }
            .await;
            let _ = done.send(outcome);
        });
        Box::pin(async move { answer.await.map_err(|_| ServerError::Overloaded("the append was cut short; retry".into()))? })
    }

    fn snapshot_page(&self, sid: i64, after: Option<(EntityKind, String)>, limit: u32) -> Fut<SnapshotPage> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.snapshot_page(sid, after.as_ref().map(|(k, id)| (*k, id.as_str())), limit).await?) })
    }

    fn changes(&self, sid: i64, after: u64, limit: u32) -> Fut<(Vec<LoggedOp>, u64)> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.changes(sid, after, limit).await?) })
    }

    fn session(&self, session_id: String) -> Fut<Option<SessionRow>> {
        let pg = self.pg.clone();
        Box::pin(async move {
            hit_off_thread("server-read-session").await;
            Ok(pg.session(&session_id).await?)
        })
    }

    fn last_batch_seq(&self, sid: i64, client: Id16) -> Fut<u64> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.last_batch_seq(sid, &client).await?) })
    }

    fn mint_share(&self, share: ShareRow, token: TokenRow, guard: Guard, event: AuditEvent) -> Fut<()> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.mint_share(&share, &token, &links(&guard)?, &event).await?) })
    }

    fn create_session(&self, session_id: String, title: String, owner: TokenRow, event: AuditEvent) -> Fut<()> {
        let pg = self.pg.clone();
        Box::pin(async move { pg.create_session(&session_id, &title, &owner, &[], &event).await.map(drop).map_err(Into::into) })
    }

    fn revoke_share(&self, share_id: String, event: AuditEvent, on_commit: Box<dyn FnOnce(u64) + Send>) -> Fut<Option<u64>> {
        let pg = self.pg.clone();
        Box::pin(async move {
            let epoch = pg.revoke_share(&share_id, &event).await?;
            failpoint::hit("server-revoke-after-commit");
            if let Some(epoch) = epoch {
                on_commit(epoch);
            }
            Ok(epoch)
        })
    }

    fn revoke_session(&self, session_id: String, event: AuditEvent, on_commit: Box<dyn FnOnce(u64) + Send>) -> Fut<Option<u64>> {
        let pg = self.pg.clone();
        Box::pin(async move {
            let epoch = pg.revoke_session(&session_id, &event).await?;
            failpoint::hit("server-revoke-after-commit");
            if let Some(epoch) = epoch {
                on_commit(epoch);
            }
            Ok(epoch)
        })
    }

    fn create_space(&self, space: SpaceRow, token: TokenRow, guard: Guard, event: AuditEvent) -> Fut<()> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.create_space(&space, &token, &links(&guard)?, &event).await?) })
    }

    fn open_space_session(&self, open: OpenSession, guard: Guard, event: AuditEvent) -> Fut<OpenedSession> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.open_space_session(&open, &links(&guard)?, &event).await?) })
    }

    fn revoke_space(&self, space_id: String, event: AuditEvent, on_commit: Box<dyn FnOnce(u64) + Send>) -> Fut<Option<u64>> {
        let pg = self.pg.clone();
        Box::pin(async move {
            let epoch = pg.revoke_space(&space_id, &event).await?;
            failpoint::hit("server-revoke-after-commit");
            if let Some(epoch) = epoch {
                on_commit(epoch);
            }
            Ok(epoch)
        })
    }

    fn list_spaces(&self) -> Fut<Vec<(SpaceRow, u32)>> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.list_spaces().await?) })
    }

    fn space_sessions(&self, space_id: String) -> Fut<Vec<SpaceSessionRow>> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.space_sessions(&space_id).await?) })
    }

    fn renew_admin(&self, token: TokenRow) -> Fut<u64> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.ensure_admin(&token).await?.0) })
    }

    fn list_sessions(&self) -> Fut<Vec<(SessionRow, u32)>> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.list_sessions().await?) })
    }

    fn list_shares(&self, session_id: Option<String>) -> Fut<Vec<ShareRow>> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.list_shares(session_id.as_deref()).await?) })
    }

    fn audit_page(&self, since: u64, limit: u32) -> Fut<Vec<AuditRow>> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.audit_page(since, limit).await?) })
    }

    fn stats(&self) -> Fut<StoreStats> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.stats().await?) })
    }

    fn probe(&self) -> Fut<()> {
        let pg = self.pg.clone();
        Box::pin(async move { Ok(pg.probe().await?) })
    }

    fn shutdown(&self) -> Fut<()> {
        // Every write is its own transaction: nothing is queued here, but appends under way
        // finish (commit and answer), as the SQLite writer drains its queue. The pool closes
        // its connections when dropped.
        let appends = self.appends.clone();
        Box::pin(async move {
            appends.close();
            appends.wait().await;
            Ok(())
        })
    }
}
