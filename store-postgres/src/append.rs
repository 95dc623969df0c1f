//! Applying a batch: dedupe, replay, gap and divergence detection (DESIGN §5), the same rules
//! as the SQLite store's `persistence/src/server/append.rs`, in one PostgreSQL transaction.
//!
//! Round trips are kept few: the reads a batch needs (the session lock and the guard, then the
//! client's last batchSeq, which of its opIds were seen before, which parent messages exist)
//! are pipelined, the per-op decisions are made in memory, and the writes are pipelined in op
//! order (tokio-postgres sends requests in the order their futures are first polled, and the
//! server runs them in that order).

use crate::{check_guard, Appended, GuardLink, PgError, Txn};
use capsync_model::{BatchAck, EntityKind, IncomingBatch, LoggedOp, Op, OpBody, OpOutcome, OpStatus};
use std::collections::{HashMap, HashSet};
use tokio_postgres::types::ToSql;

type Param<'a> = &'a (dyn ToSql + Sync);

/// The statements of an append, in the order it sends them (public so that `capsync bench`'s
/// raw tokio-postgres baseline sends exactly these).
///
/// The reads that take a list (`SEEN`, `PARENTS`) look each element up through a `LATERAL`
/// subquery with `LIMIT 1`, and the last batchSeq is read with `ORDER BY ... LIMIT 1`: forms
/// whose only sensible plan is one unique-index probe per element, whatever the statistics.
/// The plain forms (`op_id = ANY($2)`, `max(batch_seq)`) were planned, on a fresh database
/// whose tables were still nearly empty, as a scan of the session's whole index range with a
/// filter, and a pooled connection kept that generic plan until autovacuum's next ANALYZE:
/// every append read every earlier op of its session (136 ms per 100-op batch at 50,000 ops).
pub mod sql {
    /// Locks the session row: the appends of one session are serialised on every node.
    pub const LOCK: &str = "SELECT id, epoch, cursor FROM sessions WHERE sid = $1 FOR UPDATE";
    /// The client's last stored batchSeq (no row: none yet).
    pub const LAST_BATCH: &str =
        "SELECT batch_seq FROM client_batches WHERE sid = $1 AND client_id = $2 ORDER BY batch_seq DESC LIMIT 1";
    /// Which of the batch's opIds were applied before, with their payload hash and seq.
    pub const SEEN: &str = "SELECT o.op_id, o.payload_hash, o.seq FROM unnest($2::bytea[]) AS x (op_id)
         CROSS JOIN LATERAL (SELECT op_id, payload_hash, seq FROM ops WHERE sid = $1 AND op_id = x.op_id LIMIT 1) o";
    /// Which of the parents named by the batch's parts exist as messages.
    pub const PARENTS: &str = "SELECT e.id FROM unnest($3::text[]) AS x (id)
         CROSS JOIN LATERAL (SELECT id FROM entities WHERE sid = $1 AND kind = $2 AND id = x.id LIMIT 1) e";
    /// The applied ops, into the log in one statement.
    pub const LOG: &str = "INSERT INTO ops (sid, seq, op_id, payload_hash, is_delete, kind, entity_id, parent_id, data)
         SELECT $1, * FROM unnest($2::bigint[], $3::bytea[], $4::bytea[], $5::boolean[], $6::smallint[],
                                  $7::text[], $8::text[], $9::bytea[])";
    /// One put's effect on the current entities.
    pub const PUT: &str = "INSERT INTO entities (sid, kind, id, parent_id, data, seq) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (sid, kind, id) DO UPDATE
         SET parent_id = excluded.parent_id, data = excluded.data, seq = excluded.seq";
    /// One delete's effect.
    pub const DELETE: &str = "DELETE FROM entities WHERE sid = $1 AND kind = $2 AND id = $3";
    /// A message's delete, which takes its parts with it (replicas apply the same rule).
    pub const DELETE_MESSAGE: &str =
        "DELETE FROM entities WHERE sid = $1 AND ((kind = $2 AND id = $3) OR (kind = $4 AND parent_id = $3))";
    /// The session's new cursor.
    pub const CURSOR: &str = "UPDATE sessions SET cursor = $2 WHERE sid = $1";
    /// The batch's opIds and results, for replays.
    pub const BATCH: &str =
        "INSERT INTO client_batches (sid, client_id, batch_seq, op_ids, results) VALUES ($1, $2, $3, $4, $5)";
    /// Other nodes' followers learn of the new ops at the commit: one notice per transaction.
    pub const NOTIFY: &str = "SELECT pg_notify($1, $2)";
}

pub(crate) async fn append(
    tx: &Txn<'_>,
    sid: i64,
    session_id: &str,
    batch: &IncomingBatch,
    guard: &[GuardLink],
) -> Result<Appended, PgError> {
    // The session lock serialises the appends of this session on every node; it is taken
    // before any other row lock, so lock order is always session, then shares.
    let lock = tx.prepare_cached(sql::LOCK).await?;
    let row =
        tx.query_opt(&lock, &[&sid]).await?.ok_or_else(|| PgError::Other(format!("no session with sid {sid}")))?;
    let (locked_id, epoch, mut cursor): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
    check_guard(tx, guard, Some((&locked_id, epoch as u64))).await?;

    if batch.batch_seq == 0 {
        return Err(PgError::ZeroBatchSeq);
    }
    let client_id = &batch.client_id[..];
    let op_ids = capsync_model::replay::encode_op_ids(batch);
    let batch_seq = batch.batch_seq as i64;

    // What the per-op decisions need, in one pipelined round trip.
    let seen_ids: Vec<&[u8]> = batch.ops.iter().filter(|op| op.body.is_ok()).map(|op| &op.op_id[..]).collect();
    let parents: Vec<&str> = batch
        .ops
        .iter()
        .filter_map(|op| match &op.body {
            Ok(OpBody::Put(e)) if e.kind == EntityKind::Part && !e.parent_id.contains('\0') => {
                Some(e.parent_id.as_str())
            }
            _ => None,
        })
        .collect();
    let last_stmt = tx.prepare_cached(sql::LAST_BATCH).await?;
    let seen_stmt = tx.prepare_cached(sql::SEEN).await?;
    let parents_stmt = tx.prepare_cached(sql::PARENTS).await?;
    let message_kind = EntityKind::Message.code() as i16;
    let (last_params, seen_params, parents_params): ([Param<'_>; 2], [Param<'_>; 2], [Param<'_>; 3]) =
        ([&sid, &client_id], [&sid, &seen_ids], [&sid, &message_kind, &parents]);
    let parents_read = async {
        if parents.is_empty() {
            Ok(Vec::new())
        } else {
            tx.query(&parents_stmt, &parents_params).await
        }
    };
    let (last, seen_rows, parent_rows) = futures::try_join!(
        tx.query_opt(&last_stmt, &last_params),
        tx.query(&seen_stmt, &seen_params),
        parents_read,
    )?;
    let last = last.map(|r| r.get::<_, i64>(0) as u64).unwrap_or(0);
    if batch.batch_seq <= last {
        return replay(tx, sid, batch, &op_ids, cursor as u64).await;
    }
    if batch.batch_seq > last + 1 {
        return Err(PgError::Gap { got: batch.batch_seq, expected: last + 1 });
    }

    // opId -> (payload hash, seq), kept up to date as ops of this batch apply, so a repeated
    // opId inside one batch answers as it would in a later one.
    let mut seen: HashMap<Vec<u8>, (Vec<u8>, u64)> = seen_rows
        .iter()
        .map(|r| (r.get::<_, Vec<u8>>(0), (r.get::<_, Vec<u8>>(1), r.get::<_, i64>(2) as u64)))
        .collect();
    // Which messages exist, as of the op being decided: the database's answer, then this
    // batch's puts and deletes of messages.
    let mut messages: HashSet<String> = parent_rows.iter().map(|r| r.get::<_, String>(0)).collect();

    let mut results = Vec::with_capacity(batch.ops.len());
    let mut applied: Vec<Applied<'_>> = Vec::new();
    for op in &batch.ops {
        let outcome =
            |status, seq, reason: &str| OpOutcome { op_id: op.op_id.clone(), status, seq, reason: reason.to_owned() };
        let body = match &op.body {
            Ok(body) => body,
            Err(reason) => {
                results.push(outcome(OpStatus::Rejected, 0, reason));
                continue;
            }
        };
        let hash = body.payload_hash();
        if let Some((seen_hash, seen_seq)) = seen.get(&op.op_id) {
            results.push(if seen_hash[..] == hash[..] {
                outcome(OpStatus::Duplicate, *seen_seq, "")
            } else {
                outcome(OpStatus::Conflict, 0, "this opId was applied before with a different payload")
            });
            continue;
        }
        if let Some(reason) = refuse(session_id, body, &messages) {
            results.push(outcome(OpStatus::Rejected, 0, reason));
            continue;
        }
        cursor += 1;
        let seq = cursor as u64;
        seen.insert(op.op_id.clone(), (hash.to_vec(), seq));
        match body {
            OpBody::Put(e) if e.kind == EntityKind::Message => {
                messages.insert(e.id.clone());
            }
            OpBody::Delete { kind: EntityKind::Message, id } => {
                messages.remove(id);
            }
            _ => {}
        }
        applied.push(Applied { seq: cursor, op_id: &op.op_id, body, hash });
        results.push(outcome(OpStatus::Applied, seq, ""));
    }

    write_ops(tx, sid, &applied).await?;
    let results_blob = capsync_model::replay::encode_results(&results);
    let cursor_stmt = tx.prepare_cached(sql::CURSOR).await?;
    let batch_stmt = tx.prepare_cached(sql::BATCH).await?;
    let cursor_params: [Param<'_>; 2] = [&sid, &cursor];
    let batch_params: [Param<'_>; 5] = [&sid, &client_id, &batch_seq, &op_ids, &results_blob];
    // Other nodes' followers learn of the new ops at this commit: one notice per transaction.
    let notify_stmt = tx.prepare_cached(sql::NOTIFY).await?;
    let payload = crate::notify::advance_payload(sid, cursor);
    let notify_params: [Param<'_>; 2] = [&crate::notify::ADVANCE_CHANNEL, &payload];
    let notify = async {
        if applied.is_empty() {
            Ok(0)
        } else {
            tx.execute(&notify_stmt, &notify_params).await
        }
    };
    futures::try_join!(
        tx.execute(&cursor_stmt, &cursor_params),
        tx.execute(&batch_stmt, &batch_params),
        notify
    )?;

    let logged = applied
        .iter()
        .filter_map(|a| {
            Some(LoggedOp { seq: a.seq as u64, op: Op { op_id: a.op_id.try_into().ok()?, body: a.body.clone() } })
        })
        .collect();
    Ok(Appended { ack: BatchAck { cursor: cursor as u64, batch_seq: batch.batch_seq, results }, applied: logged })
}

/// Why an op that is new cannot apply, if it cannot (the SQLite store's rules, plus U+0000,
/// which PostgreSQL text cannot hold).
fn refuse(session_id: &str, body: &OpBody, messages: &HashSet<String>) -> Option<&'static str> {
    let parent = match body {
        OpBody::Put(e) => e.parent_id.as_str(),
        OpBody::Delete { .. } => "",
    };
    if body.entity_id().contains('\0') || parent.contains('\0') {
        return Some("ids must not contain U+0000");
    }
    if let OpBody::Put(entity) = body {
        if entity.kind == EntityKind::Session && entity.id != session_id {
            return Some("a session entity's id must be the session id");
        }
        if entity.kind == EntityKind::Part && !messages.contains(&entity.parent_id) {
            return Some("a part's parent must be an existing message");
        }
    }
    None
}

/// An op this batch applies.
struct Applied<'a> {
    seq: i64,
    op_id: &'a [u8],
    body: &'a OpBody,
    hash: [u8; 32],
}

/// Writes the applied ops: the log rows in one statement, then each op's effect on the current
/// entities, pipelined in op order.
async fn write_ops(tx: &Txn<'_>, sid: i64, applied: &[Applied<'_>]) -> Result<(), PgError> {
    if applied.is_empty() {
        return Ok(());
    }
    let log = tx.prepare_cached(sql::LOG).await?;
    let put = tx.prepare_cached(sql::PUT).await?;
    let delete = tx.prepare_cached(sql::DELETE).await?;
    let delete_message = tx.prepare_cached(sql::DELETE_MESSAGE).await?;

    let seqs: Vec<i64> = applied.iter().map(|a| a.seq).collect();
    let op_ids: Vec<&[u8]> = applied.iter().map(|a| a.op_id).collect();
    let hashes: Vec<&[u8]> = applied.iter().map(|a| &a.hash[..]).collect();
    let deletes: Vec<bool> = applied.iter().map(|a| matches!(a.body, OpBody::Delete { .. })).collect();
    let kinds: Vec<i16> = applied.iter().map(|a| a.body.kind().code() as i16).collect();
    let ids: Vec<&str> = applied.iter().map(|a| a.body.entity_id()).collect();
    let parents: Vec<&str> = applied
        .iter()
        .map(|a| match a.body {
            OpBody::Put(e) => e.parent_id.as_str(),
            OpBody::Delete { .. } => "",
        })
        .collect();
    let datas: Vec<&[u8]> = applied
        .iter()
        .map(|a| match a.body {
            OpBody::Put(e) => &e.data[..],
            OpBody::Delete { .. } => &[][..],
        })
        .collect();
    let part_kind = EntityKind::Part.code() as i16;

    let params: Vec<(&tokio_postgres::Statement, Vec<Param<'_>>)> = applied
        .iter()
        .enumerate()
        .map(|(i, a)| match a.body {
            OpBody::Put(_) => (&put, vec![&sid as Param<'_>, &kinds[i], &ids[i], &parents[i], &datas[i], &seqs[i]]),
            OpBody::Delete { kind: EntityKind::Message, .. } => {
                (&delete_message, vec![&sid as Param<'_>, &kinds[i], &ids[i], &part_kind])
            }
            OpBody::Delete { .. } => (&delete, vec![&sid as Param<'_>, &kinds[i], &ids[i]]),
        })
        .collect();
    let log_params: [Param<'_>; 9] = [&sid, &seqs, &op_ids, &hashes, &deletes, &kinds, &ids, &parents, &datas];
    let log_write = tx.execute(&log, &log_params);
    let entity_writes = futures::future::try_join_all(params.iter().map(|(stmt, p)| tx.execute(*stmt, p)));
    futures::try_join!(log_write, entity_writes)?;
    Ok(())
}

async fn replay(
    tx: &Txn<'_>,
    sid: i64,
    batch: &IncomingBatch,
    op_ids: &[u8],
    cursor: u64,
) -> Result<Appended, PgError> {
    let stmt = tx
        .prepare_cached(
            "SELECT op_ids, results FROM client_batches WHERE sid = $1 AND client_id = $2 AND batch_seq = $3",
        )
        .await?;
    let row = tx
        .query_opt(&stmt, &[&sid, &&batch.client_id[..], &(batch.batch_seq as i64)])
        .await?
        .ok_or_else(|| PgError::Other(format!("batch {} of this client is missing", batch.batch_seq)))?;
    let (stored_ids, stored_results): (Vec<u8>, Vec<u8>) = (row.get(0), row.get(1));
    if stored_ids != op_ids {
        return Err(PgError::Diverged { batch_seq: batch.batch_seq });
    }
    let mut results =
        capsync_model::replay::decode_results(&stored_results).ok_or_else(|| PgError::Other("a stored batch result is corrupt".into()))?;
    for (outcome, op) in results.iter_mut().zip(&batch.ops) {
        outcome.op_id = op.op_id.clone();
        if outcome.status == OpStatus::Applied {
            outcome.status = OpStatus::Duplicate;
        }
    }
    Ok(Appended { ack: BatchAck { cursor, batch_seq: batch.batch_seq, results }, applied: Vec::new() })
}
