//! How `pull` and `tail` show entities and ops: the data exactly as the server stored it.
//!
//! An entity's data is JSON text the server accepted. It is written out as that text, never
//! parsed into a value and printed again: re-parsing would turn what a parser refuses (JSON
//! nested deeper than its recursion limit, say) into `null`, and would renumber or reorder
//! what it accepts. serde_json's `RawValue` checks the text is one JSON value without
//! recursing, so any depth passes. Data that is not JSON at all (which a capsync server never
//! stores) is shown as a JSON string of its text, marked with `"data_is_text": true`, so a
//! line is always valid JSON and never hides what is there.

use capsync_persistence::{Entity, LoggedOp, OpBody};
use serde::Serialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// An entity's data, ready to be serialized as it was stored.
pub enum Data<'a> {
    Json(Box<RawValue>),
    Text(Cow<'a, str>),
}

impl<'a> Data<'a> {
    pub fn of(bytes: &'a [u8]) -> Data<'a> {
        match std::str::from_utf8(bytes).ok().and_then(|text| RawValue::from_string(text.to_owned()).ok()) {
            Some(raw) => Data::Json(raw),
            None => Data::Text(String::from_utf8_lossy(bytes)),
        }
    }

    fn is_text(&self) -> bool {
        matches!(self, Data::Text(_))
    }

    /// The data for a human: the JSON text as stored.
    pub fn text(&self) -> &str {
        match self {
            Data::Json(raw) => raw.get(),
            Data::Text(text) => text,
        }
    }
}

impl Serialize for Data<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Data::Json(raw) => raw.serialize(serializer),
            Data::Text(text) => text.serialize(serializer),
        }
    }
}

#[derive(Serialize)]
pub struct EntityLine<'a> {
    kind: &'static str,
    id: &'a str,
    parent: &'a str,
    data: Data<'a>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    data_is_text: bool,
}

impl<'a> EntityLine<'a> {
    pub fn of(entity: &'a Entity) -> EntityLine<'a> {
        let data = Data::of(&entity.data);
        EntityLine { kind: entity.kind.name(), id: &entity.id, parent: &entity.parent_id, data_is_text: data.is_text(), data }
    }
}

/// `capsync pull --json`: the replica's cursor and its entities.
#[derive(Serialize)]
pub struct Replica<'a> {
    pub cursor: u64,
    pub entities: Vec<EntityLine<'a>>,
}

#[derive(Serialize)]
struct OpLine<'a> {
    seq: u64,
    op: &'static str,
    kind: &'static str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Data<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    data_is_text: bool,
}

/// One line of `capsync tail`: JSON (`{"seq", "op", "kind", "id", "parent", "data"}`) or text.
pub fn op_line(logged: &LoggedOp, json: bool) -> String {
    let seq = logged.seq;
    match (&logged.op.body, json) {
        (OpBody::Put(e), true) => {
            let data = Data::of(&e.data);
            let data_is_text = data.is_text();
            to_json(&OpLine { seq, op: "put", kind: e.kind.name(), id: &e.id, parent: Some(&e.parent_id), data: Some(data), data_is_text })
        }
        (OpBody::Delete { kind, id }, true) => {
            to_json(&OpLine { seq, op: "delete", kind: kind.name(), id, parent: None, data: None, data_is_text: false })
        }
        (OpBody::Put(e), false) => format!("{seq:>8}  put     {:<8} {}  {}", e.kind.name(), e.id, Data::of(&e.data).text()),
        (OpBody::Delete { kind, id }, false) => format!("{seq:>8}  delete  {:<8} {}", kind.name(), id),
    }
}

pub fn to_json(value: &impl Serialize) -> String {
    // Serializing these types cannot fail: every field is a string, a number or checked JSON.
    serde_json::to_string(value).unwrap_or_else(|err| format!("{{\"error\":\"{err}\"}}"))
}
