//! Applying a batch: dedupe, replay, gap and divergence detection (DESIGN §5).

use crate::model::*;
use capsync_model::replay::{decode_results, encode_op_ids, encode_results};
use crate::writer::Txn;
use crate::StorageError;
use rusqlite::{params, OptionalExtension};

#[derive(Debug, thiserror::Error, Clone)]
pub enum AppendError {
    /// `batchSeq` skips ahead of the client's last applied batch + 1.
    #[error("batchSeq {got} skips ahead; the next expected is {expected}")]
    Gap { got: u64, expected: u64 },
    /// A replayed `batchSeq` whose opIds differ from the batch first stored under it.
    #[error("batchSeq {batch_seq} was first sent with other opIds")]
    Diverged { batch_seq: u64 },
    #[error("batchSeq must start at 1")]
    ZeroBatchSeq,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<rusqlite::Error> for AppendError {
    fn from(err: rusqlite::Error) -> AppendError {
        AppendError::Storage(err.into())
    }
}

impl Txn<'_> {
    /// Applies `batch` to session `sid` (whose id text is `session_id`) and returns its ack.
    /// The caller's savepoint makes an `Err` change nothing.
    pub fn append(&self, sid: i64, session_id: &str, batch: &IncomingBatch) -> Result<BatchAck, AppendError> {
        if batch.batch_seq == 0 {
            return Err(AppendError::ZeroBatchSeq);
        }
        let last: u64 = self
            .conn
            .prepare_cached("SELECT coalesce(max(batch_seq), 0) FROM client_batches WHERE sid = ?1 AND client_id = ?2")?
            .query_row(params![sid, &batch.client_id[..]], |r| r.get::<_, i64>(0))? as u64;
        let op_ids = encode_op_ids(batch);
        if batch.batch_seq <= last {
            return self.replay(sid, batch, &op_ids);
        }
        if batch.batch_seq > last + 1 {
            return Err(AppendError::Gap { got: batch.batch_seq, expected: last + 1 });
        }

        let mut cursor = self
            .conn
            .prepare_cached("SELECT cursor FROM sessions WHERE sid = ?1")?
            .query_row([sid], |r| r.get::<_, i64>(0))? as u64;
        let mut results = Vec::with_capacity(batch.ops.len());
        for op in &batch.ops {
            let outcome = self.apply_op(sid, session_id, op, cursor + 1)?;
            if outcome.status == OpStatus::Applied {
                cursor += 1;
            }
            results.push(outcome);
        }
        self.conn
            .prepare_cached("UPDATE sessions SET cursor = ?2 WHERE sid = ?1")?
            .execute(params![sid, cursor as i64])?;
        self.conn
            .prepare_cached(
                "INSERT INTO client_batches (sid, client_id, batch_seq, op_ids, results)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![sid, &batch.client_id[..], batch.batch_seq as i64, op_ids, encode_results(&results)])?;
        Ok(BatchAck { cursor, batch_seq: batch.batch_seq, results })
    }

    fn replay(&self, sid: i64, batch: &IncomingBatch, op_ids: &[u8]) -> Result<BatchAck, AppendError> {
        let (stored_ids, stored_results): (Vec<u8>, Vec<u8>) = self
            .conn
            .prepare_cached(
                "SELECT op_ids, results FROM client_batches WHERE sid = ?1 AND client_id = ?2 AND batch_seq = ?3",
            )?
            .query_row(params![sid, &batch.client_id[..], batch.batch_seq as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if stored_ids != op_ids {
            return Err(AppendError::Diverged { batch_seq: batch.batch_seq });
        }
        let cursor = self
            .conn
            .prepare_cached("SELECT cursor FROM sessions WHERE sid = ?1")?
            .query_row([sid], |r| r.get::<_, i64>(0))? as u64;
        let mut results = decode_results(&stored_results)
            .ok_or_else(|| StorageError::Sqlite("a stored batch result is corrupt".into()))?;
        for (outcome, op) in results.iter_mut().zip(&batch.ops) {
            outcome.op_id = op.op_id.clone();
            if outcome.status == OpStatus::Applied {
                outcome.status = OpStatus::Duplicate;
            }
        }
        Ok(BatchAck { cursor, batch_seq: batch.batch_seq, results })
    }

    fn apply_op(&self, sid: i64, session_id: &str, op: &IncomingOp, seq: u64) -> Result<OpOutcome, StorageError> {
        let outcome = |status, seq, reason: &str| OpOutcome {
            op_id: op.op_id.clone(),
            status,
            seq,
            reason: reason.to_owned(),
        };
        let body = match &op.body {
            Ok(body) => body,
            Err(reason) => return Ok(outcome(OpStatus::Rejected, 0, reason)),
        };
        let hash = body.payload_hash();
        let seen: Option<(Vec<u8>, i64)> = self
            .conn
            .prepare_cached("SELECT payload_hash, seq FROM op_ids WHERE sid = ?1 AND op_id = ?2")?
            .query_row(params![sid, &op.op_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((seen_hash, seen_seq)) = seen {
            return Ok(if seen_hash == hash {
                outcome(OpStatus::Duplicate, seen_seq as u64, "")
            } else {
                outcome(OpStatus::Conflict, 0, "this opId was applied before with a different payload")
            });
        }
        if let OpBody::Put(entity) = body {
            if entity.kind == EntityKind::Session && entity.id != session_id {
                return Ok(outcome(OpStatus::Rejected, 0, "a session entity's id must be the session id"));
            }
            if entity.kind == EntityKind::Part && !self.message_exists(sid, &entity.parent_id)? {
                return Ok(outcome(OpStatus::Rejected, 0, "a part's parent must be an existing message"));
            }
        }
        self.write_op(sid, seq, &op.op_id, body, &hash)?;
        Ok(outcome(OpStatus::Applied, seq, ""))
    }

    fn message_exists(&self, sid: i64, id: &str) -> Result<bool, StorageError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM entities WHERE sid = ?1 AND kind = ?2 AND id = ?3")?
            .query_row(params![sid, EntityKind::Message.code(), id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn write_op(&self, sid: i64, seq: u64, op_id: &[u8], body: &OpBody, hash: &[u8; 32]) -> Result<(), StorageError> {
        let (is_delete, parent_id, data): (bool, &str, &[u8]) = match body {
            OpBody::Put(e) => (false, &e.parent_id, &e.data),
            OpBody::Delete { .. } => (true, "", &[]),
        };
        let (kind, id) = (body.kind().code(), body.entity_id());
        self.conn
            .prepare_cached(
                "INSERT INTO ops (sid, seq, op_id, is_delete, kind, entity_id, parent_id, data)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![sid, seq as i64, op_id, is_delete, kind, id, parent_id, data])?;
        self.conn
            .prepare_cached("INSERT INTO op_ids (sid, op_id, payload_hash, seq) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![sid, op_id, &hash[..], seq as i64])?;
        if is_delete {
            self.conn
                .prepare_cached("DELETE FROM entities WHERE sid = ?1 AND kind = ?2 AND id = ?3")?
                .execute(params![sid, kind, id])?;
            if body.kind() == EntityKind::Message {
                // A message takes its parts with it; replicas apply the same rule.
                self.conn
                    .prepare_cached("DELETE FROM entities WHERE sid = ?1 AND kind = ?2 AND parent_id = ?3")?
                    .execute(params![sid, EntityKind::Part.code(), id])?;
            }
        } else {
            self.conn
                .prepare_cached(
                    "INSERT INTO entities (sid, kind, id, parent_id, data, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (sid, kind, id) DO UPDATE
                     SET parent_id = excluded.parent_id, data = excluded.data, seq = excluded.seq",
                )?
                .execute(params![sid, kind, id, parent_id, data, seq as i64])?;
        }
        Ok(())
    }
}



