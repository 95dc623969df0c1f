//! How a record's original bytes ride in an entity's data, so an export can give them back
//! exactly.
//!
//! An entity's data is a JSON object: a few fields derived from the record (small and
//! bounded: role, type, title...), then the original under one field name `F` (`raw` for a
//! Codex line, `value` for an opencode record):
//!
//! - `"F": <the original, verbatim>` when it is valid JSON with no whitespace around it (the
//!   usual case: JSON inside JSON, byte for byte, readable by anyone pulling the session);
//! - `"F_text": "<the original as a JSON string>"` when it is UTF-8 but not such JSON;
//! - `"F_b64": "<base64>"` when it is not UTF-8;
//! - `"chunks": N` when it is longer than [`Limits::max_inline_bytes`]: the original is then cut
//!   into N pieces of at most [`Limits::chunk_bytes`], each in a chunk entity of its own
//!   (`{"agent", "chunk_of": owner id, "index": i, "count": N, "text" or "b64": piece}`), id
//!   `<owner id>#<i>`. A chunk of a message or of a part is a part of that message (so it goes
//!   with it); of a diff or a model, an entity of the same kind whose parent is the owner; of
//!   the session entity, a message whose parent is the session.

use crate::{Agent, Entity, EntityKind, Limits};
use base64::Engine as _;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// A JSON object written field by field, in order.
#[derive(Clone, Debug)]
pub struct JsonObject {
    out: Vec<u8>,
}

impl Default for JsonObject {
    fn default() -> Self {
        JsonObject::new()
    }
}

impl JsonObject {
    pub fn new() -> JsonObject {
        JsonObject { out: b"{".to_vec() }
    }

    fn key(&mut self, key: &str) {
        if self.out.len() > 1 {
            self.out.push(b',');
        }
        write_str(&mut self.out, key);
        self.out.push(b':');
    }

    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        write_str(&mut self.out, value);
        self
    }

    pub fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        if let Some(value) = value {
            self.str(key, value);
        }
        self
    }

    pub fn int(&mut self, key: &str, value: i64) -> &mut Self {
        self.key(key);
        self.out.extend_from_slice(value.to_string().as_bytes());
        self
    }

    pub fn bool(&mut self, key: &str, value: bool) -> &mut Self {
        self.key(key);
        self.out.extend_from_slice(if value { b"true" } else { b"false" });
        self
    }

    pub fn strs(&mut self, key: &str, values: &[String]) -> &mut Self {
        self.key(key);
        self.out.push(b'[');
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            write_str(&mut self.out, value);
        }
        self.out.push(b']');
        self
    }

    /// `value` must be valid JSON; it is written verbatim.
    pub fn raw(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        self.out.extend_from_slice(value.as_bytes());
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.out.push(b'}');
        self.out
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing a string to a Vec cannot fail");
}

/// `s` cut to at most `max` bytes at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Whether `bytes` is exactly one JSON value with nothing around it: what rides verbatim.
pub fn exact_json(bytes: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(bytes).ok()?;
    let raw: &RawValue = serde_json::from_str(text).ok()?;
    (raw.get().len() == text.len()).then_some(text)
}

/// An entity being built: its key, and its data with the derived fields written so far.
pub struct Draft {
    pub kind: EntityKind,
    pub id: String,
    pub parent_id: String,
    pub data: JsonObject,
}

/// The entities of one record: the owner first, then its chunks (if any), each with the suffix
/// its opId position takes (`""` for the owner, `/chunk:i` for a chunk).
pub fn build(agent: Agent, draft: Draft, field: &str, original: &[u8], limits: &Limits) -> Vec<(Entity, String)> {
    let Draft { kind, id, parent_id, mut data } = draft;
    if original.len() <= limits.max_inline_bytes {
        match (exact_json(original), std::str::from_utf8(original)) {
            (Some(json), _) => data.raw(field, json),
            (None, Ok(text)) => data.str(&format!("{field}_text"), text),
            (None, Err(_)) => data.str(&format!("{field}_b64"), &b64(original)),
        };
        return vec![(Entity { kind, id, parent_id, data: data.finish() }, String::new())];
    }
    let pieces = split(original, limits.chunk_bytes.max(1024));
    data.int("chunks", pieces.len() as i64);
    let (chunk_kind, chunk_parent) = match kind {
        EntityKind::Message => (EntityKind::Part, id.clone()),
        EntityKind::Part => (EntityKind::Part, parent_id.clone()),
        EntityKind::Session => (EntityKind::Message, id.clone()),
        other => (other, id.clone()),
    };
    let count = pieces.len();
    let mut out = Vec::with_capacity(count + 1);
    out.push((Entity { kind, id: id.clone(), parent_id, data: data.finish() }, String::new()));
    for (index, piece) in pieces.into_iter().enumerate() {
        let mut chunk = JsonObject::new();
        chunk.str("agent", agent.name()).str("chunk_of", &id).int("index", index as i64).int("count", count as i64);
        match piece {
            Piece::Text(text) => chunk.str("text", text),
            Piece::Bytes(bytes) => chunk.str("b64", &b64(bytes)),
        };
        let entity = Entity { kind: chunk_kind, id: format!("{id}#{index}"), parent_id: chunk_parent.clone(), data: chunk.finish() };
        out.push((entity, format!("/chunk:{index}")));
    }
    out
}

enum Piece<'a> {
    Text(&'a str),
    Bytes(&'a [u8]),
}

fn split(original: &[u8], size: usize) -> Vec<Piece<'_>> {
    match std::str::from_utf8(original) {
        Ok(mut text) => {
            let mut pieces = Vec::new();
            while !text.is_empty() {
                let mut end = size.min(text.len());
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                pieces.push(Piece::Text(&text[..end]));
                text = &text[end..];
            }
            pieces
        }
        Err(_) => original.chunks(size).map(Piece::Bytes).collect(),
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The top-level fields of an entity's data, borrowed.
pub struct Fields<'a> {
    map: BTreeMap<String, &'a RawValue>,
}

impl<'a> Fields<'a> {
    /// `None` when the data is not a JSON object.
    pub fn parse(data: &'a [u8]) -> Option<Fields<'a>> {
        serde_json::from_slice(data).ok().map(|map| Fields { map })
    }

    pub fn raw(&self, key: &str) -> Option<&'a RawValue> {
        self.map.get(key).copied()
    }

    pub fn str(&self, key: &str) -> Option<String> {
        self.raw(key).and_then(|v| serde_json::from_str::<String>(v.get()).ok())
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        self.raw(key).and_then(|v| serde_json::from_str::<i64>(v.get()).ok())
    }

    /// The original bytes under `field`, when they ride inline. `Ok(None)` when the data says
    /// they are in chunks (see [`Fields::chunk_count`]) or carries none.
    pub fn inline(&self, field: &str) -> Result<Option<Vec<u8>>, String> {
        if let Some(raw) = self.raw(field) {
            return Ok(Some(raw.get().as_bytes().to_vec()));
        }
        if let Some(text) = self.str(&format!("{field}_text")) {
            return Ok(Some(text.into_bytes()));
        }
        if let Some(encoded) = self.str(&format!("{field}_b64")) {
            return base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map(Some)
                .map_err(|_| format!("{field}_b64 is not base64"));
        }
        Ok(None)
    }

    pub fn chunk_count(&self) -> Option<u64> {
        self.int("chunks").and_then(|n| u64::try_from(n).ok())
    }
}

/// A chunk entity's owner id, index and piece, or `None` when `data` is not a chunk.
pub fn chunk_piece(data: &[u8]) -> Option<(String, u64, Vec<u8>)> {
    let fields = Fields::parse(data)?;
    let owner = fields.str("chunk_of")?;
    let index = u64::try_from(fields.int("index")?).ok()?;
    let piece = match fields.str("text") {
        Some(text) => text.into_bytes(),
        None => base64::engine::general_purpose::STANDARD.decode(fields.str("b64")?).ok()?,
    };
    Some((owner, index, piece))
}

/// Concatenates the pieces of `count` chunks, in index order; `None` when one is missing.
pub fn join_chunks(mut pieces: Vec<(u64, Vec<u8>)>, count: u64) -> Option<Vec<u8>> {
    pieces.sort_by_key(|(i, _)| *i);
    pieces.dedup_by_key(|(i, _)| *i);
    if pieces.len() as u64 != count || pieces.iter().enumerate().any(|(i, (j, _))| i as u64 != *j) {
        return None;
    }
    Some(pieces.into_iter().flat_map(|(_, p)| p).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(kind: EntityKind) -> Draft {
        let mut data = JsonObject::new();
        data.str("agent", "codex").int("line", 3);
        Draft { kind, id: "line-3".into(), parent_id: "m".into(), data }
    }

    #[test]
    fn originals_round_trip_inline_and_in_chunks() {
        let limits = Limits { max_inline_bytes: 64, chunk_bytes: 1024, ..Limits::default() };
        for original in [
            br#"{"a":[1,2,{"b":"c"}]}"#.to_vec(),
            b" {\"a\":1}\r".to_vec(),
            b"not json \xff\xfe".to_vec(),
            "é".repeat(3000).into_bytes(),
            vec![0xffu8; 2500],
            format!("{{\"big\":\"{}\"}}", "x".repeat(5000)).into_bytes(),
        ] {
            let built = build(Agent::Codex, draft(EntityKind::Message), "raw", &original, &limits);
            let fields = Fields::parse(&built[0].0.data).expect("data is a JSON object");
            assert_eq!(fields.int("line"), Some(3));
            let back = match fields.chunk_count() {
                None => fields.inline("raw").unwrap().unwrap(),
                Some(count) => {
                    assert_eq!(built.len() as u64, count + 1);
                    let pieces = built[1..]
                        .iter()
                        .map(|(e, _)| {
                            assert_eq!((e.kind, e.parent_id.as_str()), (EntityKind::Part, "line-3"));
                            assert!(e.data.len() < 8 * 1024);
                            let (owner, i, piece) = chunk_piece(&e.data).unwrap();
                            assert_eq!(owner, "line-3");
                            (i, piece)
                        })
                        .collect();
                    join_chunks(pieces, count).unwrap()
                }
            };
            assert_eq!(back, original);
            for (e, _) in &built {
                serde_json::from_slice::<serde::de::IgnoredAny>(&e.data).expect("every entity's data is JSON");
            }
        }
    }

    #[test]
    fn json_is_verbatim_only_when_exact() {
        assert!(exact_json(br#"{"a": 1}"#).is_some());
        assert!(exact_json(b"{\"a\":1}\n").is_none());
        assert!(exact_json(b"{\"a\":1").is_none());
        assert_eq!(truncate("héllo", 2), "h");
    }
}
