//! Agent imports: which ref each imported agent session became, and how far its source was read.
//!
//! `capsync import` and `capsync watch` attach each agent session (a Codex rollout, an opencode
//! session) under a ref named `codex:<id>` / `opencode:<id>`, through a session a space opened.
//! A row of `agent_imports` remembers that session and that space, so a re-run needs no new
//! `openSession`, and where the last read of the source stopped (a Codex reader's cursor, an
//! opencode session's fingerprint). [`ClientDb::enqueue_new`] commits the ops read and that
//! position in one transaction: after a crash, a re-run reads again exactly what was not
//! committed.

use super::{BatchLimits, ClientDb};
use crate::model::*;
use crate::StorageError;
use rusqlite::{params, OptionalExtension};
use std::collections::HashSet;

/// One imported agent session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportRow {
    /// `codex:<agent session id>` or `opencode:<agent session id>`.
    pub ref_name: String,
    pub agent: String,
    pub agent_session_id: String,
    /// The capsync session the space opened for it (the readers' target).
    pub session_id: String,
    /// The tag of the space token that opened it (not secret: a prefix of its hash).
    pub space: String,
    /// Where it was last read from, relative to the root it was found under.
    pub source: String,
    /// The source's size and modification time when a read last reached its end (0 if not).
    pub size: u64,
    pub mtime_ns: i64,
    /// Codex: the reader's cursor as JSON; opencode: the session's fingerprint; '' before the
    /// first read.
    pub cursor: String,
    /// Records queued from it so far (not counting those already in the outbox).
    pub records: u64,
}

/// How far a read of an import's source got, committed with the ops it read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportProgress {
    pub source: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub cursor: String,
}

const COLUMNS: &str = "ref_name, agent, agent_session_id, session_id, space, source, size, mtime_ns, cursor, records";

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImportRow> {
    Ok(ImportRow {
        ref_name: r.get(0)?,
        agent: r.get(1)?,
        agent_session_id: r.get(2)?,
        session_id: r.get(3)?,
        space: r.get(4)?,
        source: r.get(5)?,
        size: r.get::<_, i64>(6)? as u64,
        mtime_ns: r.get(7)?,
        cursor: r.get(8)?,
        records: r.get::<_, i64>(9)? as u64,
    })
}

impl ClientDb {
    /// Attaches `uri` under `row.ref_name` and records the import, in one transaction. When the
    /// import was known with another session (another space opened it), its read position is
    /// forgotten: the new session is read from the start.
    pub fn attach_import(&self, row: &ImportRow, uri: &str, new_client_id: Id16) -> Result<(), StorageError> {
        let tx = self.conn.unchecked_transaction()?;
        Self::attach_on(&tx, &row.ref_name, uri, new_client_id)?;
        tx.prepare_cached(
            "INSERT INTO agent_imports (ref_name, agent, agent_session_id, session_id, space, source, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (ref_name) DO UPDATE SET
                 agent = excluded.agent, agent_session_id = excluded.agent_session_id, space = excluded.space,
                 source = excluded.source, updated_at = excluded.updated_at,
                 size = CASE WHEN session_id = excluded.session_id THEN size ELSE 0 END,
                 mtime_ns = CASE WHEN session_id = excluded.session_id THEN mtime_ns ELSE 0 END,
                 cursor = CASE WHEN session_id = excluded.session_id THEN cursor ELSE '' END,
                 session_id = excluded.session_id",
        )?
        .execute(params![
            row.ref_name,
            row.agent,
            row.agent_session_id,
            row.session_id,
            row.space,
            row.source,
            super::now_ms() as i64
        ])?;
        tx.commit()?;
        Ok(())
    }

    /// The import attached under `name`, if any.
    pub fn import_row(&self, name: &str) -> Result<Option<ImportRow>, StorageError> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM agent_imports WHERE ref_name = ?1"))?
            .query_row([name], read_row)
            .optional()?)
    }

    /// The import last read from `source` (relative to its root) of `agent`, if any.
    pub fn import_by_source(&self, agent: &str, source: &str) -> Result<Option<ImportRow>, StorageError> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM agent_imports WHERE agent = ?1 AND source = ?2 ORDER BY updated_at DESC LIMIT 1"))?
            .query_row([agent, source], read_row)
            .optional()?)
    }

    /// Every import, by ref name.
    pub fn imports(&self) -> Result<Vec<ImportRow>, StorageError> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM agent_imports ORDER BY ref_name"))?
            .query_map([], read_row)?
            .collect::<Result<_, _>>()?)
    }

    /// Queues the ops whose opIds the outbox does not hold yet (an op already there, whatever
    /// its state, is left out: deterministic opIds make a re-read all duplicates), and records
    /// `progress` as the import's read position, in one durable transaction. Returns how many
    /// ops were queued.
    pub fn enqueue_new(
        &self,
        name: &str,
        mut ops: Vec<Op>,
        limits: BatchLimits,
        progress: Option<&ImportProgress>,
    ) -> Result<usize, StorageError> {
        let tx = self.conn.unchecked_transaction()?;
        {
            let mut held = tx.prepare_cached("SELECT 1 FROM outbox WHERE op_id = ?1")?;
            let mut seen = HashSet::new();
            let mut keep = Vec::with_capacity(ops.len());
            for op in &ops {
                keep.push(seen.insert(op.op_id) && !held.exists([&op.op_id[..]])?);
            }
            let mut keep = keep.into_iter();
            ops.retain(|_| keep.next().unwrap_or(false));
        }
        Self::enqueue_in(&tx, name, &ops, limits)?;
        if let Some(p) = progress {
            let changed = tx
                .prepare_cached(
                    "UPDATE agent_imports SET source = ?2, size = ?3, mtime_ns = ?4, cursor = ?5, records = records + ?6,
                                              updated_at = ?7
                     WHERE ref_name = ?1",
                )?
                .execute(params![name, p.source, p.size as i64, p.mtime_ns, p.cursor, ops.len() as i64, super::now_ms() as i64])?;
            if changed != 1 {
                return Err(StorageError::Sqlite(format!("no import recorded for ref {name}")));
            }
        }
        crate::failpoint::hit("client-before-import-commit");
        tx.commit()?;
        Ok(ops.len())
    }
}
