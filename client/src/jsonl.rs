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

/// Parses one line.
pub fn parse_line(line: &str) -> Result<Change, LineError> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| LineError::NotJson(e.to_string()))?;
    let field = |name: &'static str| value.get(name).and_then(|v| v.as_str()).ok_or(LineError::Missing(name));
    let op = field("op")?;
    let kind_name = field("kind")?;
    let kind = EntityKind::from_name(kind_name).ok_or_else(|| LineError::Kind(kind_name.to_owned()))?;
    let id = field("id")?.to_owned();
    match op {
        "put" => {
            let data = value.get("data").ok_or(LineError::Missing("data"))?;
            let parent = value.get("parent").and_then(|v| v.as_str()).unwrap_or("").to_owned();
            let data = serde_json::to_vec(data).map_err(|e| LineError::NotJson(e.to_string()))?;
            Ok(Change::Put { kind, id, parent, data })
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
    }
}
