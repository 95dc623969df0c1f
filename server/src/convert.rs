//! Between the wire structs and the storage model, with the validation that needs no
//! database. Anything wrong with one op makes that op `rejected`; anything wrong with the
//! batch as a whole fails the call.

use crate::config::Limits;
use crate::error::{Result, ServerError};
use capsync_persistence::server::ShareRow;
use capsync_persistence::*;
use capsync_schema::capsync_capnp::{entity, entity_key, op, share_summary, session_summary, space_summary};
use capsync_persistence::server::{SessionRow, SpaceRow};

pub use capsync_schema::wire::{kind_from, kind_to, rights_from, set_ack, set_applied_op, set_entity, set_rights};

/// Reads and validates a batch. Fails the call only for what concerns the whole batch.
pub fn batch(reader: capsync_schema::capsync_capnp::batch::Reader<'_>, limits: &Limits) -> Result<IncomingBatch> {
    let client_id: Id16 = reader
        .get_client_id()?
        .try_into()
        .map_err(|_| ServerError::Invalid("clientId must be 16 bytes".into()))?;
    let ops = reader.get_ops()?;
    if ops.len() as usize > limits.max_batch_ops {
        return Err(ServerError::TooLarge(format!(
            "a batch holds at most {} ops; this one has {}",
            limits.max_batch_ops,
            ops.len()
        )));
    }
    let mut incoming = Vec::with_capacity(ops.len() as usize);
    let mut bytes = 0usize;
    for op in ops.iter() {
        let op_id = op.get_op_id().map(|id| id.to_vec()).unwrap_or_default();
        let body = op_body(op, limits);
        if let Ok(OpBody::Put(e)) = &body {
            bytes += e.data.len() + e.id.len() + e.parent_id.len();
        }
        let body = if op_id.len() == 16 { body } else { Err("opId must be 16 bytes".into()) };
        incoming.push(IncomingOp { op_id, body });
    }
    if bytes > limits.max_batch_bytes {
        return Err(ServerError::TooLarge(format!(
            "a batch carries at most {} bytes of entities; this one has {bytes}",
            limits.max_batch_bytes
        )));
    }
    Ok(IncomingBatch { client_id, batch_seq: reader.get_batch_seq(), ops: incoming })
}

fn op_body(op: op::Reader<'_>, limits: &Limits) -> std::result::Result<OpBody, String> {
    let malformed = |e: capnp::Error| format!("malformed op: {}", e.extra);
    match op.which().map_err(|_| "unknown op type".to_owned())? {
        op::Put(entity) => Ok(OpBody::Put(entity_from(entity.map_err(malformed)?, limits)?)),
        op::Delete(key) => {
            let (kind, id) = key_from(key.map_err(malformed)?, limits)?;
            Ok(OpBody::Delete { kind, id })
        }
    }
}

fn text_field(text: capnp::Result<capnp::text::Reader<'_>>, what: &str, max: usize) -> std::result::Result<String, String> {
    let text = text.map_err(|e| format!("malformed {what}: {}", e.extra))?;
    let text = text.to_str().map_err(|_| format!("{what} is not valid UTF-8"))?;
    if text.len() > max {
        return Err(format!("{what} is longer than {max} bytes"));
    }
    Ok(text.to_owned())
}

fn entity_id(text: capnp::Result<capnp::text::Reader<'_>>, limits: &Limits) -> std::result::Result<String, String> {
    let id = text_field(text, "id", limits.max_id_bytes)?;
    if id.is_empty() {
        return Err("id must not be empty".into());
    }
    Ok(id)
}

fn key_from(key: entity_key::Reader<'_>, limits: &Limits) -> std::result::Result<(EntityKind, String), String> {
    let kind = key.get_kind().map_err(|_| "unknown entity kind".to_owned())?;
    Ok((kind_from(kind), entity_id(key.get_id(), limits)?))
}

fn entity_from(e: entity::Reader<'_>, limits: &Limits) -> std::result::Result<Entity, String> {
    let kind = kind_from(e.get_kind().map_err(|_| "unknown entity kind".to_owned())?);
    let id = entity_id(e.get_id(), limits)?;
    let parent_id = text_field(e.get_parent_id(), "parentId", limits.max_id_bytes)?;
    let data = e.get_data().map_err(|e| format!("malformed data: {}", e.extra))?;
    if data.len() > limits.max_data_bytes {
        return Err(format!("too large: data is {} bytes; the limit is {}", data.len(), limits.max_data_bytes));
    }
    // serde_json skips over strings it ignores without checking their UTF-8, so that is
    // checked on its own: data is UTF-8 JSON, byte for byte.
    if std::str::from_utf8(data).is_err() {
        return Err("data is not valid UTF-8".into());
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(data).is_err() {
        return Err("data is not valid UTF-8 JSON".into());
    }
    Ok(Entity { kind, id, parent_id, data: data.to_vec() })
}

pub fn set_session_summary(mut b: session_summary::Builder<'_>, s: &SessionRow, shares: u32) {
    b.set_session_id(s.id.as_str());
    b.set_title(s.title.as_str());
    b.set_cursor(s.cursor);
    b.set_epoch(s.epoch);
    b.set_created_at(s.created_at);
    b.set_share_count(shares);
}

pub fn set_share_summary(mut b: share_summary::Builder<'_>, s: &ShareRow, revoked: bool) {
    b.set_share_id(s.id.as_str());
    b.set_session_id(s.session_id.as_str());
    b.set_parent_share_id(s.parent_share_id.as_deref().unwrap_or(""));
    b.set_label(s.label.as_str());
    set_rights(b.reborrow().init_rights(), s.rights);
    b.set_epoch(s.epoch);
    b.set_revoked(revoked);
    b.set_created_at(s.created_at);
    b.set_expires_at(s.expires_at);
    b.set_last_used_at(s.last_used_at);
}

pub fn set_space_summary(mut b: space_summary::Builder<'_>, s: &SpaceRow, sessions: u32) {
    b.set_space_id(s.id.as_str());
    b.set_label(s.label.as_str());
    b.set_epoch(s.epoch);
    // A space's only token is minted at epoch 0, so any bump revoked it.
    b.set_revoked(s.epoch != 0);
    b.set_created_at(s.created_at);
    b.set_session_count(sessions);
}
