//! The one mapping between the data model (`capsync-model`) and the wire structs, used by the
//! server, the client, the CLI and the tests alike. Validation of what a peer sent stays with
//! the side that receives it (the server's `convert`); this is the plain mapping.

use crate::capsync_capnp::{ack, applied_op, entity, op, op_result, rights, EntityKind as WireKind};
use capsync_model::{BatchAck, Entity, EntityKind, Id16, LoggedOp, Op, OpBody, OpOutcome, OpStatus, Rights};

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

pub fn rights_from(reader: rights::Reader<'_>) -> Rights {
    Rights { read: reader.get_read(), append: reader.get_append(), mint: reader.get_mint() }
}

pub fn set_rights(mut builder: rights::Builder<'_>, rights: Rights) {
    builder.set_read(rights.read);
    builder.set_append(rights.append);
    builder.set_mint(rights.mint);
}

pub fn status_to(status: OpStatus) -> op_result::Status {
    match status {
        OpStatus::Applied => op_result::Status::Applied,
        OpStatus::Duplicate => op_result::Status::Duplicate,
        OpStatus::Conflict => op_result::Status::Conflict,
        OpStatus::Rejected => op_result::Status::Rejected,
    }
}

pub fn status_from(status: op_result::Status) -> OpStatus {
    match status {
        op_result::Status::Applied => OpStatus::Applied,
        op_result::Status::Duplicate => OpStatus::Duplicate,
        op_result::Status::Conflict => OpStatus::Conflict,
        op_result::Status::Rejected => OpStatus::Rejected,
    }
}

pub fn set_entity(mut b: entity::Builder<'_>, e: &Entity) {
    b.set_kind(kind_to(e.kind));
    b.set_id(e.id.as_str());
    b.set_parent_id(e.parent_id.as_str());
    b.set_data(&e.data);
}

pub fn read_entity(e: entity::Reader<'_>) -> capnp::Result<Entity> {
    Ok(Entity {
        kind: kind_from(e.get_kind()?),
        id: e.get_id()?.to_string()?,
        parent_id: e.get_parent_id()?.to_string()?,
        data: e.get_data()?.to_vec(),
    })
}

pub fn set_op(mut b: op::Builder<'_>, op_id: &Id16, body: &OpBody) {
    b.set_op_id(op_id);
    match body {
        OpBody::Put(e) => set_entity(b.init_put(), e),
        OpBody::Delete { kind, id } => {
            let mut key = b.init_delete();
            key.set_kind(kind_to(*kind));
            key.set_id(id.as_str());
        }
    }
}

pub fn set_applied_op(mut b: applied_op::Builder<'_>, logged: &LoggedOp) {
    b.set_seq(logged.seq);
    set_op(b.init_op(), &logged.op.op_id, &logged.op.body);
}

pub fn read_applied_op(a: applied_op::Reader<'_>) -> capnp::Result<LoggedOp> {
    let op = a.get_op()?;
    let op_id: Id16 = op.get_op_id()?.try_into().map_err(|_| capnp::Error::failed("an opId is not 16 bytes".into()))?;
    let body = match op.which()? {
        op::Put(e) => OpBody::Put(read_entity(e?)?),
        op::Delete(k) => {
            let k = k?;
            OpBody::Delete { kind: kind_from(k.get_kind()?), id: k.get_id()?.to_string()? }
        }
    };
    Ok(LoggedOp { seq: a.get_seq(), op: Op { op_id, body } })
}

pub fn set_ack(mut b: ack::Builder<'_>, ack: &BatchAck) {
    b.set_cursor(ack.cursor);
    b.set_batch_seq(ack.batch_seq);
    let mut list = b.init_results(ack.results.len() as u32);
    for (i, r) in ack.results.iter().enumerate() {
        let mut out = list.reborrow().get(i as u32);
        out.set_op_id(&r.op_id);
        out.set_status(status_to(r.status));
        out.set_seq(r.seq);
        out.set_reason(r.reason.as_str());
    }
}

pub fn read_ack(ack: ack::Reader<'_>) -> capnp::Result<BatchAck> {
    let mut results = Vec::new();
    for r in ack.get_results()?.iter() {
        let status = status_from(r.get_status()?);
        results.push(OpOutcome { op_id: r.get_op_id()?.to_vec(), status, seq: r.get_seq(), reason: r.get_reason()?.to_string()? });
    }
    Ok(BatchAck { cursor: ack.get_cursor(), batch_seq: ack.get_batch_seq(), results })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_and_status_maps_both_ways() {
        for kind in [EntityKind::Session, EntityKind::Message, EntityKind::Part, EntityKind::Diff, EntityKind::Model] {
            assert_eq!(kind_from(kind_to(kind)), kind);
        }
        for status in [OpStatus::Applied, OpStatus::Duplicate, OpStatus::Conflict, OpStatus::Rejected] {
            assert_eq!(status_from(status_to(status)), status);
        }
    }
}
