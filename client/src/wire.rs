//! Between the storage model and the wire structs, on the client side.

use capsync_persistence::client::FormedBatch;
use capsync_persistence::*;
use capsync_schema::capsync_capnp::{applied_op, entity, op_result, session, EntityKind as WireKind};

pub fn kind_to(kind: EntityKind) -> WireKind {
    match kind {
        EntityKind::Session => WireKind::Session,
        EntityKind::Message => WireKind::Message,
        EntityKind::Part => WireKind::Part,
        EntityKind::Diff => WireKind::Diff,
        EntityKind::Model => WireKind::Model,
    }
}

pub fn kind_from(kind: WireKind) -> EntityKind {
    match kind {
        WireKind::Session => EntityKind::Session,
        WireKind::Message => EntityKind::Message,
        WireKind::Part => EntityKind::Part,
        WireKind::Diff => EntityKind::Diff,
        WireKind::Model => EntityKind::Model,
    }
}

/// The `append` call for a formed batch.
pub fn append_request(
    session: &session::Client,
    client_id: &Id16,
    batch: &FormedBatch,
) -> capnp::capability::Request<session::append_params::Owned, session::append_results::Owned> {
    let mut request = session.append_request();
    let mut b = request.get().init_batch();
    b.set_client_id(client_id);
    b.set_batch_seq(batch.batch_seq);
    let mut list = b.init_ops(batch.ops.len() as u32);
    for (i, op) in batch.ops.iter().enumerate() {
        let mut out = list.reborrow().get(i as u32);
        out.set_op_id(&op.op_id);
        match &op.body {
            OpBody::Put(e) => {
                let mut w = out.init_put();
                w.set_kind(kind_to(e.kind));
                w.set_id(e.id.as_str());
                w.set_parent_id(e.parent_id.as_str());
                w.set_data(&e.data);
            }
            OpBody::Delete { kind, id } => {
                let mut k = out.init_delete();
                k.set_kind(kind_to(*kind));
                k.set_id(id.as_str());
            }
        }
    }
    request
}

pub fn read_ack(ack: capsync_schema::capsync_capnp::ack::Reader<'_>) -> capnp::Result<BatchAck> {
    let mut results = Vec::new();
    for r in ack.get_results()?.iter() {
        let status = match r.get_status()? {
            op_result::Status::Applied => OpStatus::Applied,
            op_result::Status::Duplicate => OpStatus::Duplicate,
            op_result::Status::Conflict => OpStatus::Conflict,
            op_result::Status::Rejected => OpStatus::Rejected,
        };
        results.push(OpOutcome { op_id: r.get_op_id()?.to_vec(), status, seq: r.get_seq(), reason: r.get_reason()?.to_string()? });
    }
    Ok(BatchAck { cursor: ack.get_cursor(), batch_seq: ack.get_batch_seq(), results })
}

pub fn read_entity(e: entity::Reader<'_>) -> capnp::Result<Entity> {
    Ok(Entity {
        kind: kind_from(e.get_kind()?),
        id: e.get_id()?.to_string()?,
        parent_id: e.get_parent_id()?.to_string()?,
        data: e.get_data()?.to_vec(),
    })
}

pub fn read_applied_op(a: applied_op::Reader<'_>) -> capnp::Result<LoggedOp> {
    let op = a.get_op()?;
    let op_id: Id16 = op.get_op_id()?.try_into().map_err(|_| capnp::Error::failed("an opId is not 16 bytes".into()))?;
    let body = match op.which()? {
        capsync_schema::capsync_capnp::op::Put(e) => OpBody::Put(read_entity(e?)?),
        capsync_schema::capsync_capnp::op::Delete(k) => {
            let k = k?;
            OpBody::Delete { kind: kind_from(k.get_kind()?), id: k.get_id()?.to_string()? }
        }
    };
    Ok(LoggedOp { seq: a.get_seq(), op: Op { op_id, body } })
}
