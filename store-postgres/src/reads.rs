//! The store's reads: one statement or one read-only round of statements each, on a pooled
//! connection.

use super::*;

impl PgStore {
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
    pub async fn epochs(
        &self,
        sessions: &[String],
        shares: &[String],
        spaces: &[String],
    ) -> Result<CurrentEpochs, PgError> {
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
}
