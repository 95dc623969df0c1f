//! The server's database: sessions, shares, spaces, hashed tokens, the op log and the audit
//! table.
//!
//! Reads go through [`ServerReader`] (one per reader thread); writes are methods on the
//! writer's [`Txn`], so they only ever run on the writer thread inside its transaction.

mod append;
pub mod backup;
pub mod schema;

pub use append::AppendError;

use crate::migrate;
use crate::rows::{read_entity, read_op};
use crate::model::*;
use crate::writer::Txn;
use crate::StorageError;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;

pub use capsync_model::stored::{
    AuditEvent, AuditRow, OpenSession, OpenedSession, SessionRow, ShareRow, SnapshotPage, SpaceLink, SpaceRow,
    SpaceSessionRow, StoreStats, TargetKind, TokenRow,
};


/// Opens (creating if needed) the server database at `path` and brings its schema up to date.
pub fn open(path: &Path) -> Result<Connection, StorageError> {
    make_private(path)?;
    let mut conn = Connection::open(path)?;
    migrate::configure(&conn)?;
    schema::PLAN.apply(&mut conn)?;
    Ok(conn)
}

/// The database's history id (see the `history` table in [`schema`]).
pub fn history(conn: &Connection) -> Result<String, StorageError> {
    Ok(conn.query_row("SELECT history FROM history WHERE id = 1", [], |r| r.get(0))?)
}

/// Creates the database file 0600 (or narrows an existing one, and its WAL and shared-memory
/// files, to 0600), so it is private whatever the directory's mode. SQLite gives the WAL and
/// shared-memory files it creates the main file's mode.
fn make_private(path: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let io = |e: std::io::Error| StorageError::Sqlite(format!("{}: {e}", path.display()));
    std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(path).map_err(io)?;
    for suffix in ["", "-wal", "-shm"] {
        let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        if file.exists() {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
    }
    Ok(())
}

/// A read-only view for a reader thread.
pub struct ServerReader {
    conn: Connection,
}

const SESSION_COLUMNS: &str = "sid, id, title, epoch, cursor, created_at";
const SHARE_COLUMNS: &str = "s.id, s.sid, x.id, s.parent_share_id, s.parent_epoch, s.rights, s.label, s.epoch,
     s.created_at, s.expires_at,
     (SELECT coalesce(max(last_used_at), 0) FROM tokens t WHERE t.target_kind = 'share' AND t.target_id = s.id),
     s.space_id, s.space_epoch";
const SPACE_COLUMNS: &str = "id, label, epoch, created_at";

/// A [`SpaceLink`] from nullable `space_id` and `space_epoch` columns.
fn space_link(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Option<SpaceLink>> {
    let id: Option<String> = r.get(at)?;
    let epoch = r.get::<_, i64>(at + 1)? as u64;
    Ok(id.map(|space_id| SpaceLink { space_id, epoch }))
}

fn space_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SpaceRow> {
    Ok(SpaceRow {
        id: r.get(0)?,
        label: r.get(1)?,
        epoch: r.get::<_, i64>(2)? as u64,
        created_at: r.get::<_, i64>(3)? as u64,
    })
}

fn session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRow> {
    Ok(SessionRow {
        sid: r.get(0)?,
        id: r.get(1)?,
        title: r.get(2)?,
        epoch: r.get::<_, i64>(3)? as u64,
        cursor: r.get::<_, i64>(4)? as u64,
        created_at: r.get::<_, i64>(5)? as u64,
    })
}

fn share_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ShareRow> {
    Ok(ShareRow {
        id: r.get(0)?,
        sid: r.get(1)?,
        session_id: r.get(2)?,
        parent_share_id: r.get(3)?,
        parent_epoch: r.get::<_, i64>(4)? as u64,
        rights: Rights::from_bits(r.get(5)?),
        label: r.get(6)?,
        epoch: r.get::<_, i64>(7)? as u64,
        created_at: r.get::<_, i64>(8)? as u64,
        expires_at: r.get::<_, i64>(9)? as u64,
        last_used_at: r.get::<_, i64>(10)? as u64,
        space: space_link(r, 11)?,
    })
}


fn session_by(conn: &Connection, column: &str, value: &dyn rusqlite::ToSql) -> Result<Option<SessionRow>, StorageError> {
    let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE {column} = ?1");
    Ok(conn.prepare_cached(&sql)?.query_row([value], session_row).optional()?)
}

impl ServerReader {
    pub fn open(path: &Path) -> Result<ServerReader, StorageError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(ServerReader { conn })
    }

    pub fn token(&self, hash: &[u8; 32]) -> Result<Option<TokenRow>, StorageError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT target_kind, target_id, minted_epoch, rights, parent, label, created_at,
                        expires_at, last_used_at, space_id, space_epoch FROM tokens WHERE hash = ?1",
            )?
            .query_row([&hash[..]], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    TokenRow {
                        hash: *hash,
                        target_kind: TargetKind::Admin,
                        target_id: r.get(1)?,
                        minted_epoch: r.get::<_, i64>(2)? as u64,
                        rights: Rights::from_bits(r.get(3)?),
                        parent: r.get(4)?,
                        label: r.get(5)?,
                        created_at: r.get::<_, i64>(6)? as u64,
                        expires_at: r.get::<_, i64>(7)? as u64,
                        last_used_at: r.get::<_, i64>(8)? as u64,
                        space: space_link(r, 9)?,
                    },
                ))
            })
            .optional()?;
        Ok(row.and_then(|(kind, mut token)| {
            token.target_kind = TargetKind::parse(&kind)?;
            Some(token)
        }))
    }

    pub fn session(&self, id: &str) -> Result<Option<SessionRow>, StorageError> {
        session_by(&self.conn, "id", &id)
    }

    pub fn share(&self, id: &str) -> Result<Option<ShareRow>, StorageError> {
        let sql = format!("SELECT {SHARE_COLUMNS} FROM shares s JOIN sessions x ON x.sid = s.sid WHERE s.id = ?1");
        Ok(self.conn.prepare_cached(&sql)?.query_row([id], share_row).optional()?)
    }

    pub fn admin_epoch(&self) -> Result<Option<u64>, StorageError> {
        admin_epoch(&self.conn)
    }

    pub fn space(&self, id: &str) -> Result<Option<SpaceRow>, StorageError> {
        space(&self.conn, id)
    }

    /// Every space with the number of sessions opened through it, oldest first.
    pub fn list_spaces(&self) -> Result<Vec<(SpaceRow, u32)>, StorageError> {
        let sql = format!(
            "SELECT {SPACE_COLUMNS}, (SELECT count(*) FROM space_sessions ss WHERE ss.space_id = spaces.id)
             FROM spaces ORDER BY created_at, id"
        );
        let rows = self
            .conn
            .prepare_cached(&sql)?
            .query_map([], |r| Ok((space_row(r)?, r.get::<_, i64>(4)? as u32)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// The sessions opened through a space, oldest first.
    pub fn space_sessions(&self, space_id: &str) -> Result<Vec<SpaceSessionRow>, StorageError> {
        let rows = self
            .conn
            .prepare_cached(
                "SELECT ss.key, x.sid, x.id, x.title, x.epoch, x.cursor, x.created_at
                 FROM space_sessions ss JOIN sessions x ON x.sid = ss.sid
                 WHERE ss.space_id = ?1 ORDER BY ss.created_at, ss.key",
            )?
            .query_map([space_id], |r| {
                Ok(SpaceSessionRow {
                    key: r.get(0)?,
                    session: SessionRow {
                        sid: r.get(1)?,
                        id: r.get(2)?,
                        title: r.get(3)?,
                        epoch: r.get::<_, i64>(4)? as u64,
                        cursor: r.get::<_, i64>(5)? as u64,
                        created_at: r.get::<_, i64>(6)? as u64,
                    },
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// The last batchSeq of `client` applied to session `sid` (0 if none).
    pub fn last_batch_seq(&self, sid: i64, client: &Id16) -> Result<u64, StorageError> {
        Ok(self
            .conn
            .prepare_cached("SELECT coalesce(max(batch_seq), 0) FROM client_batches WHERE sid = ?1 AND client_id = ?2")?
            .query_row(params![sid, &client[..]], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Up to `limit` entities ordered by (kind, id) after `after`, with the cursor they
    /// reflect, read in one transaction.
    pub fn snapshot_page(
        &self,
        sid: i64,
        after: Option<(EntityKind, &str)>,
        limit: u32,
    ) -> Result<SnapshotPage, StorageError> {
        let tx = self.conn.unchecked_transaction()?;
        let cursor: i64 = tx.prepare_cached("SELECT cursor FROM sessions WHERE sid = ?1")?.query_row([sid], |r| r.get(0))?;
        let (kind, id) = after.map(|(k, id)| (k.code(), id)).unwrap_or((-1, ""));
        let mut entities: Vec<Entity> = tx
            .prepare_cached(
                "SELECT kind, id, parent_id, data FROM entities
                 WHERE sid = ?1 AND (kind, id) > (?2, ?3) ORDER BY kind, id LIMIT ?4",
            )?
            .query_map(params![sid, kind, id, limit as i64 + 1], |r| read_entity(r, 0))?
            .collect::<Result<_, _>>()?;
        let more = entities.len() > limit as usize;
        entities.truncate(limit as usize);
        tx.finish()?;
        Ok(SnapshotPage { cursor: cursor as u64, entities, more })
    }

    /// Applied ops with seq > `after`, at most `limit`, and the session's cursor.
    pub fn changes(&self, sid: i64, after: u64, limit: u32) -> Result<(Vec<LoggedOp>, u64), StorageError> {
        let tx = self.conn.unchecked_transaction()?;
        let cursor: i64 = tx.prepare_cached("SELECT cursor FROM sessions WHERE sid = ?1")?.query_row([sid], |r| r.get(0))?;
        let ops = tx
            .prepare_cached(
                "SELECT seq, op_id, is_delete, kind, entity_id, parent_id, data FROM ops
                 WHERE sid = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?
            .query_map(params![sid, after as i64, limit as i64], |r| {
                Ok(LoggedOp { seq: r.get::<_, i64>(0)? as u64, op: read_op(r, 1)? })
            })?
            .collect::<Result<_, _>>()?;
        tx.finish()?;
        Ok((ops, cursor as u64))
    }

    /// Every session with the number of shares it has.
    pub fn list_sessions(&self) -> Result<Vec<(SessionRow, u32)>, StorageError> {
        let sql = format!(
            "SELECT {SESSION_COLUMNS}, (SELECT count(*) FROM shares s WHERE s.sid = sessions.sid)
             FROM sessions ORDER BY created_at, id"
        );
        let rows = self
            .conn
            .prepare_cached(&sql)?
            .query_map([], |r| Ok((session_row(r)?, r.get::<_, i64>(6)? as u32)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Shares of one session (by id), or of all sessions.
    pub fn list_shares(&self, session_id: Option<&str>) -> Result<Vec<ShareRow>, StorageError> {
        let sql = format!(
            "SELECT {SHARE_COLUMNS} FROM shares s JOIN sessions x ON x.sid = s.sid
             WHERE ?1 IS NULL OR x.id = ?1 ORDER BY s.created_at, s.id"
        );
        let rows = self.conn.prepare_cached(&sql)?.query_map([session_id], share_row)?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn audit(&self, since: u64, limit: u32) -> Result<Vec<AuditRow>, StorageError> {
        let rows = self
            .conn
            .prepare_cached(
                "SELECT id, at, action, target_kind, target_id, session_id, peer, detail FROM audit
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?
            .query_map(params![since as i64, limit as i64], |r| {
                Ok(AuditRow {
                    id: r.get::<_, i64>(0)? as u64,
                    at: r.get::<_, i64>(1)? as u64,
                    event: AuditEvent {
                        action: r.get(2)?,
                        target_kind: r.get(3)?,
                        target_id: r.get(4)?,
                        session_id: r.get(5)?,
                        peer: r.get(6)?,
                        detail: r.get(7)?,
                    },
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn stats(&self) -> Result<StoreStats, StorageError> {
        Ok(self.conn.prepare_cached(
            "SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM shares),
                    (SELECT coalesce(sum(cursor), 0) FROM sessions)",
        )?
        .query_row([], |r| {
            Ok(StoreStats {
                sessions: r.get::<_, i64>(0)? as u64,
                shares: r.get::<_, i64>(1)? as u64,
                ops: r.get::<_, i64>(2)? as u64,
            })
        })?)
    }
}

fn space(conn: &Connection, id: &str) -> Result<Option<SpaceRow>, StorageError> {
    let sql = format!("SELECT {SPACE_COLUMNS} FROM spaces WHERE id = ?1");
    Ok(conn.prepare_cached(&sql)?.query_row([id], space_row).optional()?)
}

fn admin_epoch(conn: &Connection) -> Result<Option<u64>, StorageError> {
    Ok(conn
        .prepare_cached("SELECT epoch FROM admin WHERE id = 1")?
        .query_row([], |r| r.get::<_, i64>(0))
        .optional()?
        .map(|e| e as u64))
}

/// Writes; they run on the writer thread inside its group transaction.
impl Txn<'_> {
    pub fn session(&self, id: &str) -> Result<Option<SessionRow>, StorageError> {
        session_by(self.conn, "id", &id)
    }

    pub fn create_session(&self, id: &str, title: &str, now: u64) -> Result<i64, StorageError> {
        self.conn
            .prepare_cached("INSERT INTO sessions (id, title, created_at) VALUES (?1, ?2, ?3)")?
            .execute(params![id, title, now as i64])?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn insert_share(&self, share: &ShareRow) -> Result<(), StorageError> {
        self.conn
            .prepare_cached(
                "INSERT INTO shares (id, sid, parent_share_id, parent_epoch, rights, label, epoch,
                                     created_at, expires_at, space_id, space_epoch)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                share.id,
                share.sid,
                share.parent_share_id,
                share.parent_epoch as i64,
                share.rights.bits(),
                share.label,
                share.epoch as i64,
                share.created_at as i64,
                share.expires_at as i64,
                share.space.as_ref().map(|s| s.space_id.as_str()),
                share.space.as_ref().map_or(0, |s| s.epoch as i64)
            ])?;
        Ok(())
    }

    pub fn insert_token(&self, token: &TokenRow) -> Result<(), StorageError> {
        self.conn
            .prepare_cached(
                "INSERT INTO tokens (hash, target_kind, target_id, minted_epoch, rights, parent,
                                     label, created_at, expires_at, space_id, space_epoch)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                &token.hash[..],
                token.target_kind.name(),
                token.target_id,
                token.minted_epoch as i64,
                token.rights.bits(),
                token.parent,
                token.label,
                token.created_at as i64,
                token.expires_at as i64,
                token.space.as_ref().map(|s| s.space_id.as_str()),
                token.space.as_ref().map_or(0, |s| s.epoch as i64)
            ])?;
        Ok(())
    }

    pub fn touch_token(&self, hash: &[u8; 32], now: u64) -> Result<(), StorageError> {
        self.conn
            .prepare_cached("UPDATE tokens SET last_used_at = ?2 WHERE hash = ?1")?
            .execute(params![&hash[..], now as i64])?;
        Ok(())
    }

    /// Bumps a share's epoch; `None` if there is no such share.
    pub fn bump_share_epoch(&self, id: &str) -> Result<Option<u64>, StorageError> {
        self.bump("UPDATE shares SET epoch = epoch + 1 WHERE id = ?1 RETURNING epoch", id)
    }

    /// Bumps a session's epoch; `None` if there is no such session.
    pub fn bump_session_epoch(&self, id: &str) -> Result<Option<u64>, StorageError> {
        self.bump("UPDATE sessions SET epoch = epoch + 1 WHERE id = ?1 RETURNING epoch", id)
    }

    /// Bumps a space's epoch; `None` if there is no such space.
    pub fn bump_space_epoch(&self, id: &str) -> Result<Option<u64>, StorageError> {
        self.bump("UPDATE spaces SET epoch = epoch + 1 WHERE id = ?1 RETURNING epoch", id)
    }

    pub fn space(&self, id: &str) -> Result<Option<SpaceRow>, StorageError> {
        space(self.conn, id)
    }

    pub fn insert_space(&self, space: &SpaceRow) -> Result<(), StorageError> {
        self.conn
            .prepare_cached("INSERT INTO spaces (id, label, epoch, created_at) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![space.id, space.label, space.epoch as i64, space.created_at as i64])?;
        Ok(())
    }

    /// The session of (`open.space_id`, `open.key`), created (with `open.new_session_id` and
    /// `open.title`) if the key is new, and `open.owner` stored as a token of it at its current
    /// epoch. The caller has checked the space's epoch in this transaction. Runs on the single
    /// writer, so a key is looked up and inserted without a race; the primary key of
    /// `space_sessions` refuses a second session for a key whatever happens.
    pub fn open_space_session(&self, open: &OpenSession) -> Result<OpenedSession, StorageError> {
        let existing = self
            .conn
            .prepare_cached(
                "SELECT x.sid, x.id, x.epoch FROM space_sessions ss JOIN sessions x ON x.sid = ss.sid
                 WHERE ss.space_id = ?1 AND ss.key = ?2",
            )?
            .query_row(params![open.space_id, open.key], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)? as u64)))
            .optional()?;
        let now = open.owner.created_at;
        let opened = match existing {
            Some((sid, session_id, epoch)) => OpenedSession { session_id, sid, epoch, created: false },
            None => {
                let sid = self.create_session(&open.new_session_id, &open.title, now)?;
                self.conn
                    .prepare_cached("INSERT INTO space_sessions (space_id, key, sid, created_at) VALUES (?1, ?2, ?3, ?4)")?
                    .execute(params![open.space_id, open.key, sid, now as i64])?;
                OpenedSession { session_id: open.new_session_id.clone(), sid, epoch: 0, created: true }
            }
        };
        self.insert_token(&TokenRow { target_id: opened.session_id.clone(), minted_epoch: opened.epoch, ..open.owner.clone() })?;
        Ok(opened)
    }

    fn bump(&self, sql: &str, id: &str) -> Result<Option<u64>, StorageError> {
        Ok(self.conn.prepare_cached(sql)?.query_row([id], |r| r.get::<_, i64>(0)).optional()?.map(|e| e as u64))
    }

    pub fn admin_epoch(&self) -> Result<Option<u64>, StorageError> {
        admin_epoch(self.conn)
    }

    /// Creates the admin object at epoch 0, or bumps its epoch (invalidating every admin token
    /// minted before); returns the epoch now in force.
    pub fn renew_admin(&self) -> Result<u64, StorageError> {
        self.conn.execute(
            "INSERT INTO admin (id, epoch) VALUES (1, 0) ON CONFLICT (id) DO UPDATE SET epoch = epoch + 1",
            [],
        )?;
        Ok(admin_epoch(self.conn)?.unwrap_or(0))
    }

    pub fn audit(&self, event: &AuditEvent, now: u64) -> Result<(), StorageError> {
        self.conn
            .prepare_cached(
                "INSERT INTO audit (at, action, target_kind, target_id, session_id, peer, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                now as i64,
                event.action,
                event.target_kind,
                event.target_id,
                event.session_id,
                event.peer,
                event.detail
            ])?;
        Ok(())
    }
}
