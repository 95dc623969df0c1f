//! Reading the model types out of SQL rows, shared by the server's and the client's queries.

use crate::model::{Entity, EntityKind, Op, OpBody};

/// An entity from the columns `kind, id, parent_id, data` starting at `at`.
pub(crate) fn read_entity(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Entity> {
    let code: i64 = r.get(at)?;
    Ok(Entity {
        kind: EntityKind::from_code(code).ok_or(rusqlite::Error::IntegralValueOutOfRange(at, code))?,
        id: r.get(at + 1)?,
        parent_id: r.get(at + 2)?,
        data: r.get(at + 3)?,
    })
}

/// An op from the columns `op_id, is_delete, kind, entity_id, parent_id, data` starting at `at`.
pub(crate) fn read_op(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Op> {
    let op_id: Vec<u8> = r.get(at)?;
    let entity = read_entity(r, at + 2)?;
    let body = if r.get::<_, bool>(at + 1)? {
        OpBody::Delete { kind: entity.kind, id: entity.id }
    } else {
        OpBody::Put(entity)
    };
    Ok(Op { op_id: op_id.try_into().unwrap_or([0; 16]), body })
}
