//! Column lists and the mapping of result rows to the model's types, shared by reads and
//! writes.

use super::*;

pub(crate) const SESSION_COLUMNS: &str = "sid, id, title, epoch, cursor, created_at";
pub(crate) const SHARE_COLUMNS: &str =
    "s.id, s.sid, x.id, s.parent_share_id, s.parent_epoch, s.rights, s.label, s.epoch,
     s.created_at, s.expires_at,
     (SELECT coalesce(max(last_used_at), 0) FROM tokens t WHERE t.target_kind = 'share' AND t.target_id = s.id),
     s.space_id, s.space_epoch";
/// How many columns [`SHARE_COLUMNS`] has (what follows them in a row starts here).
pub(crate) const SHARE_COLUMN_COUNT: usize = 13;
pub(crate) const SPACE_COLUMNS: &str = "id, label, epoch, created_at";

/// A [`SpaceLink`] from nullable `space_id` and `space_epoch` columns at `at`.
pub(crate) fn space_link(r: &Row, at: usize) -> Option<SpaceLink> {
    let id: Option<String> = r.get(at);
    id.map(|space_id| SpaceLink { space_id, epoch: r.get::<_, i64>(at + 1) as u64 })
}

pub(crate) fn space_row(r: &Row, at: usize) -> SpaceRow {
    SpaceRow {
        id: r.get(at),
        label: r.get(at + 1),
        epoch: r.get::<_, i64>(at + 2) as u64,
        created_at: r.get::<_, i64>(at + 3) as u64,
    }
}

pub(crate) fn session_row(r: &Row, at: usize) -> SessionRow {
    SessionRow {
        sid: r.get(at),
        id: r.get(at + 1),
        title: r.get(at + 2),
        epoch: r.get::<_, i64>(at + 3) as u64,
        cursor: r.get::<_, i64>(at + 4) as u64,
        created_at: r.get::<_, i64>(at + 5) as u64,
    }
}

pub(crate) fn share_row(r: &Row) -> ShareRow {
    ShareRow {
        id: r.get(0),
        sid: r.get(1),
        session_id: r.get(2),
        parent_share_id: r.get(3),
        parent_epoch: r.get::<_, i64>(4) as u64,
        rights: Rights::from_bits(r.get::<_, i32>(5) as i64),
        label: r.get(6),
        epoch: r.get::<_, i64>(7) as u64,
        created_at: r.get::<_, i64>(8) as u64,
        expires_at: r.get::<_, i64>(9) as u64,
        last_used_at: r.get::<_, i64>(10) as u64,
        space: space_link(r, 11),
    }
}

/// An entity from the columns `kind, id, parent_id, data` starting at `at`.
pub(crate) fn entity(r: &Row, at: usize) -> Result<Entity, PgError> {
    let code: i16 = r.get(at);
    Ok(Entity {
        kind: EntityKind::from_code(code as i64)
            .ok_or_else(|| PgError::Other(format!("unknown entity kind {code}")))?,
        id: r.get(at + 1),
        parent_id: r.get(at + 2),
        data: r.get(at + 3),
    })
}

/// Audit text without U+0000, which PostgreSQL text cannot hold.
pub(crate) fn audit_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}").into()
    } else {
        text.into()
    }
}
