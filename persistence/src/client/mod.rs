//! The client's database: attached refs, the outbox of ops not yet acknowledged, and replicas.
//!
//! Every method is one transaction; `enqueue` returns only after its commit is durable
//! (`synchronous=FULL`), so an op the application was told about survives a crash.

pub mod schema;
mod replica;

use crate::migrate;
use crate::rows::read_op;
use crate::model::*;
use crate::StorageError;
use rusqlite::{params, Connection, OptionalExtension};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// An attached sturdy URI and its sync state. `uri` holds a secret; never print it.
#[derive(Clone, PartialEq, Eq)]
pub struct RefRow {
    pub name: String,
    pub uri: String,
    pub client_id: Id16,
    pub session_id: String,
    pub state: String,
    pub last_error: String,
    pub ack_cursor: u64,
}

impl std::fmt::Debug for RefRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefRow").field("name", &self.name).field("state", &self.state).finish_non_exhaustive()
    }
}

/// How many ops of a ref are in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpCounts {
    pub pending: u64,
    pub sent: u64,
    pub acked: u64,
    pub rejected: u64,
    pub conflict: u64,
}

/// A batch as formed: its seq and its ops in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormedBatch {
    pub batch_seq: u64,
    pub ops: Vec<Op>,
}

pub struct ClientDb {
    conn: Connection,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl ClientDb {
    /// Opens or creates the database at `path`; a new file is created with mode 0600 because
    /// it holds sturdy URIs.
    pub fn open(path: &Path) -> Result<ClientDb, StorageError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StorageError::Sqlite(format!("creating {}: {e}", dir.display())))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| StorageError::Sqlite(format!("opening {}: {e}", path.display())))?;
        let mut conn = Connection::open(path)?;
        migrate::configure(&conn)?;
        schema::PLAN.apply(&mut conn)?;
        Ok(ClientDb { conn })
    }

    /// Attaches `uri` under `name`. Re-attaching a name replaces its URI (a rotated token)
    /// but keeps its client id, batches and queued ops, and clears a terminal state.
    pub fn attach(&self, name: &str, uri: &str, new_client_id: Id16) -> Result<(), StorageError> {
        self.conn
            .prepare_cached(
                "INSERT INTO refs (name, uri, client_id, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET uri = excluded.uri, state = 'ok', last_error = ''",
            )?
            .execute(params![name, uri, &new_client_id[..], now_ms() as i64])?;
        Ok(())
    }

    pub fn refs(&self) -> Result<Vec<RefRow>, StorageError> {
        self.query_refs("SELECT name, uri, client_id, session_id, state, last_error, ack_cursor FROM refs ORDER BY name", None)
    }

    pub fn ref_row(&self, name: &str) -> Result<Option<RefRow>, StorageError> {
        Ok(self
            .query_refs(
                "SELECT name, uri, client_id, session_id, state, last_error, ack_cursor FROM refs WHERE name = ?1",
                Some(name),
            )?
            .pop())
    }

    fn query_refs(&self, sql: &str, name: Option<&str>) -> Result<Vec<RefRow>, StorageError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let map = |r: &rusqlite::Row<'_>| {
            let client_id: Vec<u8> = r.get(2)?;
            Ok(RefRow {
                name: r.get(0)?,
                uri: r.get(1)?,
                client_id: client_id.try_into().unwrap_or([0; 16]),
                session_id: r.get(3)?,
                state: r.get(4)?,
                last_error: r.get(5)?,
                ack_cursor: r.get::<_, i64>(6)? as u64,
            })
        };
        let rows = match name {
            Some(name) => stmt.query_map([name], map)?.collect::<Result<_, _>>()?,
            None => stmt.query_map([], map)?.collect::<Result<_, _>>()?,
        };
        Ok(rows)
    }

    pub fn set_ref_state(&self, name: &str, state: &str, last_error: &str) -> Result<(), StorageError> {
        self.conn
            .prepare_cached("UPDATE refs SET state = ?2, last_error = ?3 WHERE name = ?1")?
            .execute(params![name, state, last_error])?;
        Ok(())
    }

    pub fn set_session_id(&self, name: &str, session_id: &str) -> Result<(), StorageError> {
        self.conn
            .prepare_cached("UPDATE refs SET session_id = ?2 WHERE name = ?1 AND session_id <> ?2")?
            .execute(params![name, session_id])?;
        Ok(())
    }

    /// Commits `ops` to the outbox of `name` in one durable transaction.
    pub fn enqueue(&self, name: &str, ops: &[Op]) -> Result<(), StorageError> {
        let tx = self.conn.unchecked_transaction()?;
        let now = now_ms() as i64;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO outbox (op_id, ref_name, is_delete, kind, entity_id, parent_id, data, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for op in ops {
                let (is_delete, parent, data): (bool, &str, &[u8]) = match &op.body {
                    OpBody::Put(e) => (false, &e.parent_id, &e.data),
                    OpBody::Delete { .. } => (true, "", &[]),
                };
                insert.execute(params![
                    &op.op_id[..],
                    name,
                    is_delete,
                    op.body.kind().code(),
                    op.body.entity_id(),
                    parent,
                    data,
                    now
                ])?;
            }
        }
        crate::failpoint::hit("client-before-enqueue-commit");
        tx.commit()?;
        Ok(())
    }

    /// Groups the ref's unbatched ops, in enqueue order, into batches of at most `max_ops`
    /// ops and about `max_bytes` bytes, and fixes that grouping for good. Returns how many
    /// batches it formed.
    pub fn form_batches(&self, name: &str, max_ops: usize, max_bytes: usize) -> Result<usize, StorageError> {
        let tx = self.conn.unchecked_transaction()?;
        let unbatched: Vec<(i64, usize)> = tx
            .prepare_cached(
                "SELECT seq, length(data) + length(entity_id) + length(parent_id) FROM outbox
                 WHERE ref_name = ?1 AND batch_seq IS NULL ORDER BY seq",
            )?
            .query_map([name], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as usize)))?
            .collect::<Result<_, _>>()?;
        if unbatched.is_empty() {
            return Ok(0);
        }
        let mut next: i64 = tx.query_row("SELECT next_batch_seq FROM refs WHERE name = ?1", [name], |r| r.get(0))?;
        let mut formed = 0;
        let mut start = 0;
        while start < unbatched.len() {
            let (mut end, mut bytes) = (start, 0usize);
            while end < unbatched.len() && end - start < max_ops && (end == start || bytes + unbatched[end].1 <= max_bytes) {
                bytes += unbatched[end].1;
                end += 1;
            }
            tx.prepare_cached("UPDATE outbox SET batch_seq = ?1 WHERE ref_name = ?2 AND seq BETWEEN ?3 AND ?4 AND batch_seq IS NULL")?
                .execute(params![next, name, unbatched[start].0, unbatched[end - 1].0])?;
            tx.prepare_cached("INSERT INTO batches (ref_name, batch_seq) VALUES (?1, ?2)")?.execute(params![name, next])?;
            next += 1;
            formed += 1;
            start = end;
        }
        tx.prepare_cached("UPDATE refs SET next_batch_seq = ?2 WHERE name = ?1")?.execute(params![name, next])?;
        tx.commit()?;
        Ok(formed)
    }

    /// Every formed batch not yet acknowledged, in batchSeq order, with its ops in order.
    pub fn unacked_batches(&self, name: &str) -> Result<Vec<FormedBatch>, StorageError> {
        let rows: Vec<(i64, Op)> = self
            .conn
            .prepare_cached(
                "SELECT o.batch_seq, o.op_id, o.is_delete, o.kind, o.entity_id, o.parent_id, o.data
                 FROM batches b JOIN outbox o ON o.ref_name = b.ref_name AND o.batch_seq = b.batch_seq
                 WHERE b.ref_name = ?1 AND b.acked = 0 ORDER BY o.batch_seq, o.seq",
            )?
            .query_map([name], |r| Ok((r.get(0)?, read_op(r, 1)?)))?
            .collect::<Result<_, _>>()?;
        let mut batches: Vec<FormedBatch> = Vec::new();
        for (batch_seq, op) in rows {
            match batches.last_mut() {
                Some(b) if b.batch_seq == batch_seq as u64 => b.ops.push(op),
                _ => batches.push(FormedBatch { batch_seq: batch_seq as u64, ops: vec![op] }),
            }
        }
        Ok(batches)
    }

    /// Applies an ack: each op's outcome, the batch, and the server's cursor, in one transaction.
    pub fn record_ack(&self, name: &str, ack: &BatchAck) -> Result<(), StorageError> {
        self.record_progress(name, &[], std::slice::from_ref(ack))
    }

    /// Records, in one transaction, that `sent` batches went out and what `acks` said: many
    /// batches' progress shares one commit, and each ack's ops, batch and cursor still change
    /// together.
    pub fn record_progress(&self, name: &str, sent: &[u64], acks: &[BatchAck]) -> Result<(), StorageError> {
        let tx = self.conn.unchecked_transaction()?;
        for seq in sent {
            tx.prepare_cached(
                "UPDATE outbox SET state = CASE state WHEN 'pending' THEN 'sent' ELSE state END,
                                   attempts = attempts + 1
                 WHERE ref_name = ?1 AND batch_seq = ?2",
            )?
            .execute(params![name, *seq as i64])?;
        }
        for ack in acks {
            Self::apply_ack(&tx, name, ack)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn apply_ack(tx: &rusqlite::Transaction<'_>, name: &str, ack: &BatchAck) -> Result<(), StorageError> {
        for r in &ack.results {
            let state = match r.status {
                OpStatus::Applied | OpStatus::Duplicate => "acked",
                OpStatus::Conflict => "conflict",
                OpStatus::Rejected => "rejected",
            };
            tx.prepare_cached(
                "UPDATE outbox SET state = ?3, ack_seq = ?4, last_error = ?5 WHERE op_id = ?1 AND ref_name = ?2",
            )?
            .execute(params![&r.op_id, name, state, r.seq as i64, r.reason])?;
        }
        tx.prepare_cached("UPDATE batches SET acked = 1 WHERE ref_name = ?1 AND batch_seq = ?2")?
            .execute(params![name, ack.batch_seq as i64])?;
        tx.prepare_cached("UPDATE refs SET ack_cursor = max(ack_cursor, ?2), state = 'ok', last_error = '' WHERE name = ?1")?
            .execute(params![name, ack.cursor as i64])?;
        Ok(())
    }

    pub fn counts(&self, name: &str) -> Result<OpCounts, StorageError> {
        let mut counts = OpCounts::default();
        let mut stmt = self.conn.prepare_cached("SELECT state, count(*) FROM outbox WHERE ref_name = ?1 GROUP BY state")?;
        let rows = stmt.query_map([name], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
        for row in rows {
            let (state, n) = row?;
            match state.as_str() {
                "pending" => counts.pending = n,
                "sent" => counts.sent = n,
                "acked" => counts.acked = n,
                "rejected" => counts.rejected = n,
                "conflict" => counts.conflict = n,
                _ => {}
            }
        }
        Ok(counts)
    }

    /// Ops of `name` the server has not acknowledged yet (pending or sent).
    pub fn unacked_count(&self, name: &str) -> Result<u64, StorageError> {
        let c = self.counts(name)?;
        Ok(c.pending + c.sent)
    }

    /// Marks every acked batch of `name` unacknowledged again, as if its acks had been lost:
    /// the next sync replays them all (the server answers `duplicate`). For benchmarks and
    /// recovery drills.
    pub fn forget_acks(&self, name: &str) -> Result<u64, StorageError> {
        let tx = self.conn.unchecked_transaction()?;
        let n = tx.execute("UPDATE batches SET acked = 0 WHERE ref_name = ?1 AND acked = 1", [name])?;
        tx.execute("UPDATE outbox SET state = 'sent' WHERE ref_name = ?1 AND state = 'acked'", [name])?;
        tx.commit()?;
        Ok(n as u64)
    }

    /// Changes whenever another connection (another process) commits: cheap change polling.
    pub fn data_version(&self) -> Result<u64, StorageError> {
        Ok(self.conn.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// An op by id, with its state, for applications that track what they wrote.
    pub fn op_state(&self, op_id: &Id16) -> Result<Option<(String, u64, String)>, StorageError> {
        Ok(self
            .conn
            .prepare_cached("SELECT state, ack_seq, last_error FROM outbox WHERE op_id = ?1")?
            .query_row([&op_id[..]], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?)))
            .optional()?)
    }
}
