//! Applying a batch: dedupe, replay, gap and divergence detection (DESIGN §5), the same rules
//! as the SQLite store's `persistence/src/server/append.rs`, in one PostgreSQL transaction of
//! one statement.
//!
//! The whole append is the server-side function `capsync_append` (schema version 4,
//! `v4-append.sql`): the session lock, the guard, the batchSeq rules, each op's decision and
//! its writes, the batch record and the advance notice. A node calls it once per batch in
//! autocommit, so a batch costs one round trip plus the commit's WAL flush; the several round
//! trips of a client-driven transaction (BEGIN, the lock, the reads, the writes, COMMIT) were
//! what kept a 1-op append at ~5× PostgreSQL's own single-row insert.
//!
//! **No answer before the commit.** In the extended query protocol an implicit transaction
//! commits when the server processes the Sync that ends the call, and only then sends
//! ReadyForQuery; tokio-postgres ends a query's row stream at ReadyForQuery, so the call's
//! result is not returned before the commit is durable, and a commit that fails fails the
//! call (`append_waits_for_its_commit` in `tests/store.rs` shows it with a check deferred to
//! the commit).
//!
//! What needs no database is decided here, before the call: ops the protocol layer refused,
//! and ids PostgreSQL text cannot hold (U+0000) or a session entity of another id, which the
//! function applies only after the opId's dedupe (as the SQLite store orders its checks).

use crate::{Appended, GuardLink, GuardTarget, PgError};
use capsync_model::{BatchAck, EntityKind, IncomingBatch, LoggedOp, Op, OpBody, OpStatus};
use tokio_postgres::types::ToSql;

type Param<'a> = &'a (dyn ToSql + Sync);

/// Statement texts (public so that `capsync bench`'s raw tokio-postgres baseline sends exactly
/// what the store sends).
pub mod sql {
    /// One batch's append (see `v4-append.sql` for the arguments and the outcomes).
    pub const CALL: &str = "SELECT outcome, head, expected, results FROM capsync_append(
         $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)";
    /// The client's last stored batchSeq (no row: none yet). `ORDER BY ... LIMIT 1` rather
    /// than `max()`: a plan no statistics can turn into a scan of the session's batches.
    pub const LAST_BATCH: &str =
        "SELECT batch_seq FROM client_batches WHERE sid = $1 AND client_id = $2 ORDER BY batch_seq DESC LIMIT 1";
}

/// The arguments of one `capsync_append` call, prepared from a batch: per op one element of
/// each array (an op that cannot apply still has a slot, so indexes match the batch).
pub struct AppendCall<'a> {
    sid: i64,
    guard_kinds: Vec<i16>,
    guard_ids: Vec<&'a str>,
    guard_epochs: Vec<i64>,
    client_id: &'a [u8],
    /// Clamped to i64: a larger batchSeq is a gap whatever was stored.
    batch_seq: i64,
    batch_op_ids: Vec<u8>,
    op_ids: Vec<&'a [u8]>,
    hashes: Vec<Vec<u8>>,
    /// Refused by the protocol layer: rejected before any dedupe.
    pre: Vec<Option<&'a str>>,
    /// Refused without the database, applied only if the opId was not seen before.
    post: Vec<Option<&'static str>>,
    is_delete: Vec<bool>,
    kinds: Vec<i16>,
    entity_ids: Vec<&'a str>,
    parent_ids: Vec<&'a str>,
    datas: Vec<&'a [u8]>,
}

impl<'a> AppendCall<'a> {
    /// `session_id` is the id text of session `sid` (a session entity must carry it).
    pub fn new(sid: i64, session_id: &str, batch: &'a IncomingBatch, guard: &'a [GuardLink]) -> AppendCall<'a> {
        let n = batch.ops.len();
        let mut call = AppendCall {
            sid,
            guard_kinds: Vec::with_capacity(guard.len()),
            guard_ids: Vec::with_capacity(guard.len()),
            guard_epochs: Vec::with_capacity(guard.len()),
            client_id: &batch.client_id[..],
            batch_seq: i64::try_from(batch.batch_seq).unwrap_or(i64::MAX),
            batch_op_ids: capsync_model::replay::encode_op_ids(batch),
            op_ids: Vec::with_capacity(n),
            hashes: Vec::with_capacity(n),
            pre: Vec::with_capacity(n),
            post: Vec::with_capacity(n),
            is_delete: Vec::with_capacity(n),
            kinds: Vec::with_capacity(n),
            entity_ids: Vec::with_capacity(n),
            parent_ids: Vec::with_capacity(n),
            datas: Vec::with_capacity(n),
        };
        for link in guard {
            let (kind, id) = match &link.target {
                GuardTarget::Admin => (0, ""),
                GuardTarget::Session(id) => (1, id.as_str()),
                GuardTarget::Share(id) => (2, id.as_str()),
                GuardTarget::Space(id) => (3, id.as_str()),
            };
            call.guard_kinds.push(kind);
            call.guard_ids.push(id);
            call.guard_epochs.push(link.expected as i64);
        }
        for op in &batch.ops {
            call.op_ids.push(&op.op_id);
            let body = match &op.body {
                Ok(body) => body,
                Err(reason) => {
                    call.pre.push(Some(reason.as_str()));
                    call.post.push(None);
                    call.hashes.push(Vec::new());
                    call.is_delete.push(false);
                    call.kinds.push(0);
                    call.entity_ids.push("");
                    call.parent_ids.push("");
                    call.datas.push(&[]);
                    continue;
                }
            };
            let (parent, data): (&str, &[u8]) = match body {
                OpBody::Put(e) => (&e.parent_id, &e.data),
                OpBody::Delete { .. } => ("", &[]),
            };
            let refusal = refuse(session_id, body);
            // Text PostgreSQL cannot hold is never written: such an op is refused.
            let text_ok = refusal != Some(NUL);
            call.pre.push(None);
            call.post.push(refusal);
            call.hashes.push(body.payload_hash().to_vec());
            call.is_delete.push(matches!(body, OpBody::Delete { .. }));
            call.kinds.push(body.kind().code() as i16);
            call.entity_ids.push(if text_ok { body.entity_id() } else { "" });
            call.parent_ids.push(if text_ok { parent } else { "" });
            call.datas.push(data);
        }
        call
    }

    /// The call's parameters, in `sql::CALL`'s order.
    pub fn params(&self) -> [Param<'_>; 16] {
        [
            &self.sid,
            &self.guard_kinds,
            &self.guard_ids,
            &self.guard_epochs,
            &self.client_id,
            &self.batch_seq,
            &self.batch_op_ids,
            &self.op_ids,
            &self.hashes,
            &self.pre,
            &self.post,
            &self.is_delete,
            &self.kinds,
            &self.entity_ids,
            &self.parent_ids,
            &self.datas,
        ]
    }
}

const NUL: &str = "ids must not contain U+0000";

/// Why an op that is new cannot apply, when that needs no database: the SQLite store's rules
/// plus U+0000, which PostgreSQL text cannot hold. (A part whose parent message does not exist
/// is refused by the function, which knows the session's messages.)
fn refuse(session_id: &str, body: &OpBody) -> Option<&'static str> {
    let parent = match body {
        OpBody::Put(e) => e.parent_id.as_str(),
        OpBody::Delete { .. } => "",
    };
    if body.entity_id().contains('\0') || parent.contains('\0') {
        return Some(NUL);
    }
    match body {
        OpBody::Put(entity) if entity.kind == EntityKind::Session && entity.id != session_id => {
            Some("a session entity's id must be the session id")
        }
        _ => None,
    }
}

/// What the call's row says about `batch`: the ack and the ops applied now, or the error.
pub fn interpret(row: &tokio_postgres::Row, sid: i64, batch: &IncomingBatch) -> Result<Appended, PgError> {
    let outcome: &str = row.try_get(0)?;
    let replay = match outcome {
        "applied" => false,
        "replay" => true,
        "revoked" => return Err(PgError::Revoked),
        "zero" => return Err(PgError::ZeroBatchSeq),
        "gap" => return Err(PgError::Gap { got: batch.batch_seq, expected: row.try_get::<_, i64>(2)? as u64 }),
        "diverged" => return Err(PgError::Diverged { batch_seq: batch.batch_seq }),
        "no-session" => return Err(PgError::Other(format!("no session with sid {sid}"))),
        "no-batch" => return Err(PgError::Other(format!("batch {} of this client is missing", batch.batch_seq))),
        other => return Err(PgError::Other(format!("capsync_append answered an unknown outcome {other:?}"))),
    };
    let cursor = row.try_get::<_, i64>(1)? as u64;
    let blob: Vec<u8> = row.try_get(3)?;
    let mut results = capsync_model::replay::decode_results(&blob)
        .filter(|r| r.len() == batch.ops.len())
        .ok_or_else(|| PgError::Other("a stored batch result is corrupt".into()))?;
    let mut applied = Vec::new();
    for (outcome, op) in results.iter_mut().zip(&batch.ops) {
        outcome.op_id = op.op_id.clone();
        if outcome.status != OpStatus::Applied {
            continue;
        }
        if replay {
            outcome.status = OpStatus::Duplicate;
        } else if let (Ok(body), Ok(op_id)) = (&op.body, op.op_id.as_slice().try_into()) {
            applied.push(LoggedOp { seq: outcome.seq, op: Op { op_id, body: body.clone() } });
        }
    }
    Ok(Appended { ack: BatchAck { cursor, batch_seq: batch.batch_seq, results }, applied })
}
