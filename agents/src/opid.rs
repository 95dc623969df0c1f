//! Deterministic opIds.
//!
//! An imported record's opId is a function of what it is, so a re-import mints the very same
//! opIds and the server answers `duplicate`, and an edited record gets a new one:
//!
//! ```text
//! h      = SHA-256( "capsync-agents/opid/v1", agent, agent session id, capsync session id,
//!                   position, payload hash of the put )   (each field length-prefixed)
//! op_id  = UUIDv7 layout: 48-bit big-endian milliseconds = the record's own timestamp,
//!          version 7, variant 0b10, and the 74 other bits from h
//! ```
//!
//! The payload hash is [`capsync_model::OpBody::payload_hash`] of the put (kind, id, parent,
//! data), so "same opId" implies "same payload", which is what the server's dedupe needs: an
//! opId it has seen with another payload would be a conflict. The position names where the
//! record sits in its source (`line:42`, `line:42/chunk:3`, `part:prt_…`), so two records with
//! equal content at different places stay distinct. The timestamp keeps the server's opId index
//! close to sequential for a session imported in order. The capsync session id is in too: the
//! same agent session imported into two capsync sessions (two spaces, two servers) must not
//! share opIds, which a client's outbox holds unique.

use crate::{Agent, Entity, Id16};
use sha2::{Digest, Sha256};

/// The opId of putting `entity` into capsync session `target`, found at `position` in agent
/// session `agent_session_id`, stamped `ts_ms` (milliseconds since the epoch, clamped to 48
/// bits).
pub fn op_id(agent: Agent, agent_session_id: &str, target: &str, position: &str, entity: &Entity, ts_ms: i64) -> Id16 {
    op_id_from_hash(agent, agent_session_id, target, position, &put_hash(entity), ts_ms)
}

/// [`capsync_model::OpBody::payload_hash`] of putting `entity`, without copying it.
pub fn put_hash(entity: &Entity) -> [u8; 32] {
    let mut h = Sha256::new();
    for field in [b"put".as_slice(), &[entity.kind as u8], entity.id.as_bytes(), entity.parent_id.as_bytes(), &entity.data] {
        h.update((field.len() as u64).to_le_bytes());
        h.update(field);
    }
    h.finalize().into()
}

/// [`op_id`] from a payload hash computed already.
pub fn op_id_from_hash(agent: Agent, agent_session_id: &str, target: &str, position: &str, payload: &[u8; 32], ts_ms: i64) -> Id16 {
    let mut h = Sha256::new();
    let fields = [b"capsync-agents/opid/v1".as_slice(), agent.name().as_bytes(), agent_session_id.as_bytes(), target.as_bytes(), position.as_bytes(), payload];
    for field in fields {
        h.update((field.len() as u64).to_le_bytes());
        h.update(field);
    }
    let digest = h.finalize();
    let ms = ts_ms.clamp(0, (1i64 << 48) - 1) as u64;
    let mut id = [0u8; 16];
    id[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    id[6..].copy_from_slice(&digest[..10]);
    id[6] = 0x70 | (id[6] & 0x0f);
    id[8] = 0x80 | (id[8] & 0x3f);
    id
}

/// The 48-bit millisecond timestamp of a UUIDv7-shaped id.
pub fn timestamp_ms(id: &Id16) -> i64 {
    let mut ms = [0u8; 8];
    ms[2..].copy_from_slice(&id[..6]);
    u64::from_be_bytes(ms) as i64
}

/// Parses an RFC 3339 timestamp (`2025-01-02T03:04:05.678Z`, an offset, or no fraction) to
/// milliseconds since the epoch.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(range)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut millis = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        for (i, c) in frac[..digits].bytes().take(3).enumerate() {
            millis += i64::from(c - b'0') * [100, 10, 1][i];
        }
        rest = &frac[digits..];
    }
    let offset_min = match rest {
        "Z" | "z" | "" => 0,
        _ => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let tz = &rest[1..];
            if tz.len() != 5 || tz.as_bytes()[2] != b':' {
                return None;
            }
            let (h, m): (i64, i64) = (tz[..2].parse().ok()?, tz[3..].parse().ok()?);
            sign * (h * 60 + m)
        }
    };
    let days = days_from_civil(year, month, day);
    Some(((days * 24 + hour) * 60 + minute - offset_min) * 60_000 + second * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Formats milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (for generated fixtures).
pub fn format_rfc3339_ms(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EntityKind;
    use capsync_model::OpBody;

    #[test]
    fn timestamps_parse_and_format() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_ms("2025-08-05T12:34:56.789Z"), Some(1_754_397_296_789));
        assert_eq!(parse_rfc3339_ms("2025-08-05T14:34:56.789123+02:00"), Some(1_754_397_296_789));
        assert_eq!(parse_rfc3339_ms("2025-08-05T12:34:56"), Some(1_754_397_296_000));
        assert_eq!(parse_rfc3339_ms("2025-13-05T12:34:56Z"), None);
        assert_eq!(parse_rfc3339_ms("not a time"), None);
        assert_eq!(format_rfc3339_ms(1_754_397_296_789), "2025-08-05T12:34:56.789Z");
        for ms in [0, 951_782_400_000, 1_709_208_000_123, 4_102_444_800_000] {
            assert_eq!(parse_rfc3339_ms(&format_rfc3339_ms(ms)), Some(ms));
        }
    }

    #[test]
    fn op_ids_are_uuidv7_shaped_and_deterministic() {
        let e = Entity { kind: EntityKind::Message, id: "line-1".into(), parent_id: "s".into(), data: b"{}".to_vec() };
        let a = op_id(Agent::Codex, "sid", "t", "line:1", &e, 1_754_397_296_789);
        assert_eq!(a, op_id(Agent::Codex, "sid", "t", "line:1", &e, 1_754_397_296_789));
        assert_eq!(a[6] >> 4, 7);
        assert_eq!(a[8] >> 6, 0b10);
        assert_eq!(timestamp_ms(&a), 1_754_397_296_789);
        let edited = Entity { data: b"{\"x\":1}".to_vec(), ..e.clone() };
        assert_ne!(a, op_id(Agent::Codex, "sid", "t", "line:1", &edited, 1_754_397_296_789));
        assert_ne!(a, op_id(Agent::Codex, "sid", "t", "line:2", &e, 1_754_397_296_789));
        assert_ne!(a, op_id(Agent::Opencode, "sid", "t", "line:1", &e, 1_754_397_296_789));
        assert_ne!(a, op_id(Agent::Codex, "sid", "another", "line:1", &e, 1_754_397_296_789));
        assert_eq!(timestamp_ms(&op_id(Agent::Codex, "s", "t", "p", &e, -5)), 0);
        assert_eq!(put_hash(&e), OpBody::Put(e.clone()).payload_hash());
    }
}
