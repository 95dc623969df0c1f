//! The store's writes: each in one transaction, guarded writes checking their epoch chain
//! inside it (see the crate docs for what holds across nodes).

use super::*;

pub(crate) async fn insert_audit(tx: &Txn<'_>, event: &AuditEvent, at: u64) -> Result<(), PgError> {
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

pub(crate) async fn insert_token(tx: &Txn<'_>, token: &TokenRow) -> Result<(), PgError> {
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
pub(crate) async fn check_guard(tx: &Txn<'_>, guard: &[GuardLink]) -> Result<(), PgError> {
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
            let stmt =
                tx.prepare_cached("INSERT INTO spaces (id, label, epoch, created_at) VALUES ($1, $2, $3, $4)").await?;
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
                        .prepare_cached(
                            "INSERT INTO sessions (id, title, created_at) VALUES ($1, $2, $3) RETURNING sid",
                        )
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
            let owner =
                TokenRow { target_id: opened.session_id.clone(), minted_epoch: opened.epoch, ..open.owner.clone() };
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
