//! The JSON Lines format `capsync push` reads: one op per line,
//! `{"op":"put","kind":"part","id":"p1","parent":"m1","data":{...}}` or
//! `{"op":"delete","kind":"message","id":"m1"}`. `data` may be any JSON value; it is stored as
//! its serialized bytes.

use crate::api::Change;
use capsync_persistence::EntityKind;

/// Why a line is not an op.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LineError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("missing \"{0}\"")]
    Missing(&'static str),
    #[error("unknown kind `{0}`; use session, message, part, diff or model")]
    Kind(String),
    #[error("unknown op `{0}`; use put or delete")]
    Op(String),
}

/// One line as written. `data` stays the text it was given, never parsed into a value and
/// printed again: a parser would refuse JSON nested deeper than its recursion limit and
/// rewrite numbers and spacing, and the server stores data as the client sent it.
#[derive(serde::Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    op: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
    id: Option<String>,
    parent: Option<String>,
    #[serde(borrow)]
    data: Option<&'a serde_json::value::RawValue>,
}

/// Parses one line.
pub fn parse_line(line: &str) -> Result<Change, LineError> {
    let value: Line<'_> = serde_json::from_str(line).map_err(|e| LineError::NotJson(e.to_string()))?;
    let op = value.op.ok_or(LineError::Missing("op"))?;
    let kind_name = value.kind.ok_or(LineError::Missing("kind"))?;
    let kind = EntityKind::from_name(&kind_name).ok_or_else(|| LineError::Kind(kind_name.clone().into_owned()))?;
    let id = value.id.ok_or(LineError::Missing("id"))?;
    match op.as_ref() {
        "put" => {
            let data = value.data.ok_or(LineError::Missing("data"))?;
            Ok(Change::Put { kind, id, parent: value.parent.unwrap_or_default(), data: data.get().as_bytes().to_vec() })
        }
        "delete" => Ok(Change::Delete { kind, id }),
        other => Err(LineError::Op(other.to_owned())),
    }
}

/// Parses a whole file's text; the first bad line fails it all, with its (1-based) number.
/// Blank lines are skipped.
pub fn parse(text: &str) -> Result<Vec<Change>, (usize, LineError)> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| parse_line(line).map_err(|e| (i + 1, e)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_puts_and_deletes_and_numbers_bad_lines() {
        let text = "{\"op\":\"put\",\"kind\":\"part\",\"id\":\"p1\",\"parent\":\"m1\",\"data\":{\"a\":[1,2]}}\n\n{\"op\":\"delete\",\"kind\":\"message\",\"id\":\"m1\"}\n";
        let changes = parse(text).unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!(
            changes[0],
            Change::Put { kind: EntityKind::Part, id: "p1".into(), parent: "m1".into(), data: br#"{"a":[1,2]}"#.to_vec() }
        );
        let bad = format!("{text}{{\"op\":\"put\",\"kind\":\"blob\",\"id\":\"x\",\"data\":1}}\n");
        assert_eq!(parse(&bad).unwrap_err(), (4, LineError::Kind("blob".into())));
        assert_eq!(parse_line("{\"op\":\"put\",\"kind\":\"message\",\"id\":\"x\"}"), Err(LineError::Missing("data")));
        assert!(matches!(parse_line("{"), Err(LineError::NotJson(_))));
        // Data is kept as written, at any depth: no parser's recursion limit, no reformatting.
        let deep = format!("{}1.50{}", "[".repeat(300), "]".repeat(300));
        let line = format!("{{\"op\":\"put\",\"kind\":\"message\",\"id\":\"d\",\"data\":{deep}}}");
        assert!(matches!(parse_line(&line), Ok(Change::Put { data, .. }) if data == deep.as_bytes()));
    }
}
