//! The client's database: attached refs, the outbox of ops not yet acknowledged, and replicas.
//!
//! Every method is one transaction; `enqueue` returns only after its commit is durable
//! (`synchronous=FULL`), so an op the application was told about survives a crash.

pub mod schema;
mod imports;
mod replica;

pub use imports::{ImportProgress, ImportRow};

use crate::migrate;
use crate::rows::read_op;
use crate::model::*;
use crate::StorageError;
use rusqlite::{params, Connection, OptionalExtension};
use std::ops::Range;
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
    /// The server's history id in the latest grant ('' before the first).
    pub history: String,
    /// Ops re-delivered because the server had lost them (its history changed).
    pub healed: u64,
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

/// How big a batch may grow: at most `max_ops` ops and about `max_bytes` bytes (an op
/// bigger than `max_bytes` still goes, alone in its batch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_ops: usize,
    pub max_bytes: usize,
}

/// What an op weighs against [`BatchLimits::max_bytes`]: its data and ids, in bytes.
fn op_size(op: &Op) -> usize {
    match &op.body {
        OpBody::Put(e) => e.data.len() + e.id.len() + e.parent_id.len(),
        OpBody::Delete { .. } => op.body.entity_id().len(),
    }
}

/// Splits ops of these sizes, in order, into batches greedily from the front. With
/// `close_last` false, a last batch that another op could still join is not returned.
fn split_into_batches(sizes: &[usize], limits: BatchLimits, close_last: bool) -> Vec<Range<usize>> {
    let max_ops = limits.max_ops.max(1);
    let mut batches = Vec::new();
    let mut start = 0;
    while start < sizes.len() {
        let (mut end, mut bytes) = (start, 0usize);
        while end < sizes.len() && end - start < max_ops && (end == start || bytes + sizes[end] <= limits.max_bytes) {
            bytes += sizes[end];
            end += 1;
        }
        let full = end < sizes.len() || end - start == max_ops;
        if !full && !close_last {
            break;
        }
        batches.push(start..end);
        start = end;
    }
    batches
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
        // Processes opening a new file at the same moment (`capsync status` while `capsync
        // watch` creates it) can meet SQLITE_BUSY where SQLite does not wait (switching to WAL,
        // a lock upgrade it would deadlock on): such an open is tried again, for up to 10 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut pause = 5;
        loop {
            match migrate::configure(&conn).and_then(|()| schema::PLAN.apply(&mut conn)) {
                Ok(()) => return Ok(ClientDb { conn }),
                Err(StorageError::Sqlite(message)) if message.contains("database is locked") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(pause));
                    pause = (pause * 2).min(200);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Attaches `uri` under `name`. Re-attaching a name replaces its URI (a rotated token)
    /// but keeps its client id, batches and queued ops, and clears a terminal state.
    pub fn attach(&self, name: &str, uri: &str, new_client_id: Id16) -> Result<(), StorageError> {
        Self::attach_on(&self.conn, name, uri, new_client_id)
    }

    fn attach_on(conn: &Connection, name: &str, uri: &str, new_client_id: Id16) -> Result<(), StorageError> {
        conn
            .prepare_cached(
                "INSERT INTO refs (name, uri, client_id, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET uri = excluded.uri, state = 'ok', last_error = ''",
            )?
            .execute(params![name, uri, &new_client_id[..], now_ms() as i64])?;
        Ok(())
    }

    pub fn refs(&self) -> Result<Vec<RefRow>, StorageError> {
        self.query_refs("SELECT name, uri, client_id, session_id, state, last_error, ack_cursor, history, healed FROM refs ORDER BY name", None)
    }

    pub fn ref_row(&self, name: &str) -> Result<Option<RefRow>, StorageError> {
        Ok(self
            .query_refs(
                "SELECT name, uri, client_id, session_id, state, last_error, ack_cursor, history, healed FROM refs WHERE name = ?1",
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
                // A corrupt id must not silently become another client's (all zeroes would
                // be one id shared by every corrupt ref): the ref is unusable until re-attached.
                client_id: client_id.try_into().map_err(|bad: Vec<u8>| {
                    rusqlite::Error::FromSqlConversionFailure(
                        2,
                        rusqlite::types::Type::Blob,
                        format!("the ref's client id is {} bytes, not 16: the outbox is corrupt; re-attach the ref", bad.len()).into(),
                    )
                })?,
                session_id: r.get(3)?,
                state: r.get(4)?,
                last_error: r.get(5)?,
                ack_cursor: r.get::<_, i64>(6)? as u64,
                history: r.get(7)?,
                healed: r.get::<_, i64>(8)? as u64,
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
    ///
    /// Batches that are already full are formed here, in the same transaction, so their rows
    /// are written once with their `batch_seq` instead of being rewritten when `sync` groups
    /// them. Grouping is the same greedy split [`ClientDb::form_batches`] makes, over the ref's
    /// unbatched ops followed by `ops`; only the open batch at the end (one that the next op
    /// could still join) is left for `form_batches`. Batch order stays enqueue order.
    pub fn enqueue(&self, name: &str, ops: &[Op], limits: BatchLimits) -> Result<(), StorageError> {
        let tx = self.conn.unchecked_transaction()?;
        Self::enqueue_in(&tx, name, ops, limits)?;
        crate::failpoint::hit("client-before-enqueue-commit");
        tx.commit()?;
        Ok(())
    }

    /// [`ClientDb::enqueue`]'s work inside a transaction the caller commits.
    fn enqueue_in(tx: &rusqlite::Transaction<'_>, name: &str, ops: &[Op], limits: BatchLimits) -> Result<(), StorageError> {
        if ops.is_empty() {
            return Ok(());
        }
        let unbatched = Self::unbatched(tx, name)?;
        let sizes: Vec<usize> = unbatched.iter().map(|u| u.1).chain(ops.iter().map(op_size)).collect();
        let full = split_into_batches(&sizes, limits, false);
        let mut batch_of_new: Vec<Option<i64>> = vec![None; ops.len()];
        if !full.is_empty() {
            let first = Self::assign_batches(tx, name, &unbatched, &full)?;
            for (batch_seq, range) in (first..).zip(&full) {
                for i in range.start.max(unbatched.len())..range.end {
                    batch_of_new[i - unbatched.len()] = Some(batch_seq);
                }
            }
        }
        let now = now_ms() as i64;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO outbox (op_id, ref_name, is_delete, kind, entity_id, parent_id, data, batch_seq, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for (op, batch_seq) in ops.iter().zip(batch_of_new) {
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
                    batch_seq,
                    now
                ])?;
            }
        }
        Ok(())
    }

    /// Groups every unbatched op of the ref, in enqueue order, into batches within `limits`
    /// (the last one too, however small) and fixes that grouping for good. Returns how many
    /// batches it formed.
    pub fn form_batches(&self, name: &str, limits: BatchLimits) -> Result<usize, StorageError> {
        let tx = self.conn.unchecked_transaction()?;
        let unbatched = Self::unbatched(&tx, name)?;
        if unbatched.is_empty() {
            return Ok(0);
        }
        let sizes: Vec<usize> = unbatched.iter().map(|u| u.1).collect();
        let batches = split_into_batches(&sizes, limits, true);
        Self::assign_batches(&tx, name, &unbatched, &batches)?;
        tx.commit()?;
        Ok(batches.len())
    }

    /// The ref's ops not yet in a batch: (outbox seq, size as [`op_size`] counts it).
    fn unbatched(tx: &rusqlite::Transaction<'_>, name: &str) -> Result<Vec<(i64, usize)>, StorageError> {
        Ok(tx
            .prepare_cached(
                "SELECT seq, length(data) + length(CAST(entity_id AS BLOB)) + length(CAST(parent_id AS BLOB))
                 FROM outbox WHERE ref_name = ?1 AND batch_seq IS NULL ORDER BY seq",
            )?
            .query_map([name], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as usize)))?
            .collect::<Result<_, _>>()?)
    }

    /// Records `batches` (index ranges into the ref's unbatched ops followed by ops about to
    /// be inserted) under the ref's next batchSeqs: the rows of `unbatched` they cover get their
    /// batchSeq now. Returns the first batchSeq used.
    fn assign_batches(
        tx: &rusqlite::Transaction<'_>,
        name: &str,
        unbatched: &[(i64, usize)],
        batches: &[Range<usize>],
    ) -> Result<i64, StorageError> {
        let first: i64 = tx.query_row("SELECT next_batch_seq FROM refs WHERE name = ?1", [name], |r| r.get(0))?;
        for (batch_seq, range) in (first..).zip(batches) {
            if range.start < unbatched.len() {
                let last = unbatched[range.end.min(unbatched.len()) - 1].0;
                tx.prepare_cached(
                    "UPDATE outbox SET batch_seq = ?1 WHERE ref_name = ?2 AND seq BETWEEN ?3 AND ?4 AND batch_seq IS NULL",
                )?
                .execute(params![batch_seq, name, unbatched[range.start].0, last])?;
            }
            tx.prepare_cached("INSERT INTO batches (ref_name, batch_seq) VALUES (?1, ?2)")?.execute(params![name, batch_seq])?;
        }
        tx.prepare_cached("UPDATE refs SET next_batch_seq = ?2 WHERE name = ?1")?
            .execute(params![name, first + batches.len() as i64])?;
        Ok(first)
    }

    /// Up to `max_batches` formed batches not yet acknowledged whose batchSeq is above
    /// `after`, in batchSeq order, each with its ops in order. A sync reads them a few at a
    /// time, so the first ones are on the wire while the rest are still being read.
    pub fn unacked_batches(&self, name: &str, after: u64, max_batches: usize) -> Result<Vec<FormedBatch>, StorageError> {
        // CROSS JOIN keeps the (small) set of unacked batches as the outer loop; otherwise the
        // planner may walk the whole outbox to find them.
        let rows: Vec<(i64, Op)> = self
            .conn
            .prepare_cached(
                "SELECT o.batch_seq, o.op_id, o.is_delete, o.kind, o.entity_id, o.parent_id, o.data
                 FROM (SELECT batch_seq FROM batches WHERE ref_name = ?1 AND acked = 0 AND batch_seq > ?2
                       ORDER BY batch_seq LIMIT ?3) AS b
                 CROSS JOIN outbox o ON o.ref_name = ?1 AND o.batch_seq = b.batch_seq
                 ORDER BY o.batch_seq, o.seq",
            )?
            .query_map(params![name, after as i64, max_batches.min(i64::MAX as usize) as i64], |r| {
                Ok((r.get(0)?, read_op(r, 1)?))
            })?
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
    /// together. The results of an ack are in the order of its batch's ops (the sync engine
    /// checks their opIds against the batch before recording them).
    pub fn record_progress(&self, name: &str, sent: &[u64], acks: &[BatchAck]) -> Result<(), StorageError> {
        let tx = self.conn.unchecked_transaction()?;
        for seq in sent {
            // A batch acked in this same transaction goes from pending to its outcome directly:
            // its attempt is counted with the ack instead of rewriting its rows twice.
            if acks.iter().any(|a| a.batch_seq == *seq) {
                continue;
            }
            tx.prepare_cached(
                "UPDATE outbox SET state = CASE state WHEN 'pending' THEN 'sent' ELSE state END,
                                   attempts = attempts + 1
                 WHERE ref_name = ?1 AND batch_seq = ?2",
            )?
            .execute(params![name, *seq as i64])?;
        }
        for ack in acks {
            Self::apply_ack(&tx, name, ack, sent.contains(&ack.batch_seq))?;
        }
        tx.commit()?;
        Ok(())
    }

    fn apply_ack(tx: &rusqlite::Transaction<'_>, name: &str, ack: &BatchAck, sent_now: bool) -> Result<(), StorageError> {
        let attempt = i64::from(sent_now);
        if !Self::apply_plain_ack(tx, name, ack, attempt)? {
            for r in &ack.results {
                let state = match r.status {
                    OpStatus::Applied | OpStatus::Duplicate => "acked",
                    OpStatus::Conflict => "conflict",
                    OpStatus::Rejected => "rejected",
                };
                tx.prepare_cached(
                    "UPDATE outbox SET state = ?3, ack_seq = ?4, last_error = ?5, attempts = attempts + ?6, acked_at = ?7
                     WHERE op_id = ?1 AND ref_name = ?2",
                )?
                .execute(params![&r.op_id, name, state, r.seq as i64, r.reason, attempt, now_ms() as i64])?;
            }
        }
        tx.prepare_cached("UPDATE batches SET acked = 1 WHERE ref_name = ?1 AND batch_seq = ?2")?
            .execute(params![name, ack.batch_seq as i64])?;
        tx.prepare_cached("UPDATE refs SET ack_cursor = max(ack_cursor, ?2), state = 'ok', last_error = '' WHERE name = ?1")?
            .execute(params![name, ack.cursor as i64])?;
        Ok(())
    }

    /// The common ack in one statement: every op applied or duplicate at consecutive seqs, and
    /// the batch's rows at consecutive outbox seqs, so the n-th row (in outbox order, the order
    /// the batch was sent in) gets the n-th seq. False, changing nothing, for any other ack.
    fn apply_plain_ack(tx: &rusqlite::Transaction<'_>, name: &str, ack: &BatchAck, attempt: i64) -> Result<bool, StorageError> {
        let Some(first) = ack.results.first() else { return Ok(false) };
        let plain = ack.results.iter().enumerate().all(|(i, r)| {
            matches!(r.status, OpStatus::Applied | OpStatus::Duplicate) && r.seq == first.seq + i as u64
        });
        if !plain {
            return Ok(false);
        }
        let (low, high, rows): (i64, i64, i64) = tx
            .prepare_cached("SELECT min(seq), max(seq), count(*) FROM outbox WHERE ref_name = ?1 AND batch_seq = ?2")?
            .query_row(params![name, ack.batch_seq as i64], |r| {
                Ok((r.get::<_, Option<i64>>(0)?.unwrap_or(0), r.get::<_, Option<i64>>(1)?.unwrap_or(-1), r.get(2)?))
            })?;
        if rows != ack.results.len() as i64 || high - low + 1 != rows {
            return Ok(false);
        }
        tx.prepare_cached(
            "UPDATE outbox SET state = 'acked', ack_seq = ?3 + (seq - ?4), last_error = '', attempts = attempts + ?5,
                               acked_at = ?6
             WHERE ref_name = ?1 AND batch_seq = ?2",
        )?
        .execute(params![name, ack.batch_seq as i64, first.seq as i64, low, attempt, now_ms() as i64])?;
        Ok(true)
    }

    /// Records the server history id a grant carried. Returns whether it differs from the one
    /// seen before (never on the first: there is nothing to compare with).
    pub fn note_history(&self, name: &str, history: &str) -> Result<bool, StorageError> {
        let seen: String = self.conn.query_row("SELECT history FROM refs WHERE name = ?1", [name], |r| r.get(0))?;
        if seen.is_empty() && !history.is_empty() {
            self.conn.execute("UPDATE refs SET history = ?2 WHERE name = ?1", params![name, history])?;
        }
        Ok(!seen.is_empty() && !history.is_empty() && seen != history)
    }

    /// Heals a server that lost acknowledged ops (restored from a backup): every op of `name`
    /// still kept (acked, sent or pending) goes back to the queue, in the order it was made,
    /// to be re-batched under `new_client_id` from batchSeq 1 (the server's record of the old
    /// client id's batches no longer matches the client's). The server dedupes by opId, so an
    /// op it still has answers `duplicate` and one it lost is applied: nothing twice. Rejected
    /// and conflicting ops stay out of it. `history` (if given) becomes the ref's. Returns how
    /// many acked ops go out again.
    pub fn heal(&self, name: &str, new_client_id: Id16, history: Option<&str>) -> Result<u64, StorageError> {
        let tx = self.conn.unchecked_transaction()?;
        let acked: i64 = tx.query_row("SELECT count(*) FROM outbox WHERE ref_name = ?1 AND state = 'acked'", [name], |r| r.get(0))?;
        tx.execute(
            "UPDATE outbox SET state = 'pending', batch_seq = NULL WHERE ref_name = ?1 AND state IN ('acked', 'sent', 'pending')",
            [name],
        )?;
        // Batch 0 is never formed: these rows stay out of every batch from now on.
        tx.execute("UPDATE outbox SET batch_seq = 0 WHERE ref_name = ?1 AND state IN ('rejected', 'conflict')", [name])?;
        tx.execute("DELETE FROM batches WHERE ref_name = ?1", [name])?;
        tx.execute(
            "UPDATE refs SET client_id = ?2, next_batch_seq = 1, healed = healed + ?3, history = coalesce(?4, history)
             WHERE name = ?1",
            params![name, &new_client_id[..], acked, history],
        )?;
        tx.commit()?;
        Ok(acked as u64)
    }

    /// The highest batchSeq of `name` the server has acknowledged (0 if none).
    pub fn last_acked_batch(&self, name: &str) -> Result<u64, StorageError> {
        Ok(self
            .conn
            .query_row("SELECT coalesce(max(batch_seq), 0) FROM batches WHERE ref_name = ?1 AND acked = 1", [name], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// Forgets acked ops of `name` acknowledged before `cutoff_ms` (they can no longer heal a
    /// restored server). Returns how many were removed.
    pub fn prune_acked(&self, name: &str, cutoff_ms: u64) -> Result<u64, StorageError> {
        Ok(self.conn.execute(
            "DELETE FROM outbox WHERE ref_name = ?1 AND state = 'acked' AND acked_at < ?2",
            params![name, cutoff_ms as i64],
        )? as u64)
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

    /// Names of the refs that have ops the server has not acknowledged (in a batch not acked
    /// yet, or in none yet), by name. One query over the unacked batches and the unbatched ops,
    /// whatever the number of refs.
    pub fn refs_with_unacked(&self) -> Result<Vec<String>, StorageError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT ref_name FROM batches WHERE acked = 0
                 UNION SELECT ref_name FROM outbox WHERE batch_seq IS NULL
                 ORDER BY ref_name",
            )?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?)
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

    /// How many times an op was sent, counting replays.
    pub fn op_attempts(&self, op_id: &Id16) -> Result<u64, StorageError> {
        Ok(self.conn.query_row("SELECT attempts FROM outbox WHERE op_id = ?1", [&op_id[..]], |r| r.get::<_, i64>(0))? as u64)
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
