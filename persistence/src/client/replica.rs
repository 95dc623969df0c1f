//! Replicas: a local copy of a session's entities at a cursor.
//!
//! A first pull writes snapshot pages and records the cursor only with the last page, so a
//! crash mid-snapshot starts the snapshot over. Later pulls apply logged ops after the cursor;
//! applying an op twice is harmless (puts replace whole entities, deletes are idempotent).

use super::ClientDb;
use crate::model::*;
use crate::StorageError;
use rusqlite::{params, OptionalExtension};

impl ClientDb {
    /// The replica's session id and cursor, once a snapshot has completed.
    pub fn replica_cursor(&self, name: &str) -> Result<Option<(String, u64)>, StorageError> {
        Ok(self
            .conn
            .prepare_cached("SELECT session_id, cursor FROM replica_state WHERE ref_name = ?1")?
            .query_row([name], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .optional()?)
    }

    /// Writes one snapshot page. The first page clears whatever an interrupted snapshot left;
    /// the last (`complete` = the cursor of the first page) records the replica's cursor.
    pub fn apply_snapshot_page(
        &self,
        name: &str,
        session_id: &str,
        first: bool,
        entities: &[Entity],
        complete: Option<u64>,
    ) -> Result<(), StorageError> {
        let tx = self.conn.unchecked_transaction()?;
        if first {
            tx.prepare_cached("DELETE FROM replica_entities WHERE ref_name = ?1")?.execute([name])?;
            tx.prepare_cached("DELETE FROM replica_state WHERE ref_name = ?1")?.execute([name])?;
        }
        for e in entities {
            upsert(&tx, name, e, 0)?;
        }
        if let Some(cursor) = complete {
            tx.prepare_cached("INSERT INTO replica_state (ref_name, session_id, cursor) VALUES (?1, ?2, ?3)")?
                .execute(params![name, session_id, cursor as i64])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Applies logged ops in seq order and advances the cursor, in one transaction. Ops at or
    /// below the cursor are skipped, so a page delivered twice changes nothing.
    pub fn apply_changes(&self, name: &str, ops: &[LoggedOp]) -> Result<u64, StorageError> {
        let tx = self.conn.unchecked_transaction()?;
        let mut cursor: u64 = tx
            .prepare_cached("SELECT cursor FROM replica_state WHERE ref_name = ?1")?
            .query_row([name], |r| r.get::<_, i64>(0))? as u64;
        for logged in ops {
            if logged.seq <= cursor {
                continue;
            }
            match &logged.op.body {
                OpBody::Put(e) => upsert(&tx, name, e, logged.seq)?,
                OpBody::Delete { kind, id } => {
                    tx.prepare_cached("DELETE FROM replica_entities WHERE ref_name = ?1 AND kind = ?2 AND id = ?3")?
                        .execute(params![name, kind.code(), id])?;
                    if *kind == EntityKind::Message {
                        tx.prepare_cached("DELETE FROM replica_entities WHERE ref_name = ?1 AND kind = ?2 AND parent_id = ?3")?
                            .execute(params![name, EntityKind::Part.code(), id])?;
                    }
                }
            }
            cursor = logged.seq;
        }
        tx.prepare_cached("UPDATE replica_state SET cursor = ?2 WHERE ref_name = ?1")?.execute(params![name, cursor as i64])?;
        crate::failpoint::hit("client-before-replica-commit");
        tx.commit()?;
        Ok(cursor)
    }

    /// The server history id the replica was pulled from ('' if unknown).
    pub fn replica_history(&self, name: &str) -> Result<String, StorageError> {
        Ok(self
            .conn
            .query_row("SELECT history FROM replica_state WHERE ref_name = ?1", [name], |r| r.get(0))
            .optional()?
            .unwrap_or_default())
    }

    pub fn set_replica_history(&self, name: &str, history: &str) -> Result<(), StorageError> {
        self.conn.execute("UPDATE replica_state SET history = ?2 WHERE ref_name = ?1", params![name, history])?;
        Ok(())
    }

    /// Drops the replica of `name`, so the next pull starts from a snapshot: for a server whose
    /// seqs no longer mean what the replica applied (restored from a backup).
    pub fn reset_replica(&self, name: &str) -> Result<(), StorageError> {
        let tx = self.conn.unchecked_transaction()?;
        tx.execute("DELETE FROM replica_entities WHERE ref_name = ?1", [name])?;
        tx.execute("DELETE FROM replica_state WHERE ref_name = ?1", [name])?;
        tx.commit()?;
        Ok(())
    }

    /// The replica's entities ordered by (kind, id).
    pub fn replica_entities(&self, name: &str) -> Result<Vec<Entity>, StorageError> {
        let rows = self
            .conn
            .prepare_cached("SELECT kind, id, parent_id, data FROM replica_entities WHERE ref_name = ?1 ORDER BY kind, id")?
            .query_map([name], |r| crate::rows::read_entity(r, 0))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }
}

fn upsert(tx: &rusqlite::Transaction<'_>, name: &str, e: &Entity, seq: u64) -> Result<(), StorageError> {
    tx.prepare_cached(
        "INSERT INTO replica_entities (ref_name, kind, id, parent_id, data, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (ref_name, kind, id) DO UPDATE
         SET parent_id = excluded.parent_id, data = excluded.data, seq = excluded.seq",
    )?
    .execute(params![name, e.kind.code(), e.id, e.parent_id, e.data, seq as i64])?;
    Ok(())
}
