//! opencode's SQLite database, read through `capsync-persistence` (read-only, short read
//! transactions, one page of rows at a time).
//!
//! A session row becomes a `Session.Info` JSON value the way opencode's own `fromRow` builds
//! one (`project_id` → `projectID`, `summary_*` → `summary`, `share_url` → `share.url`,
//! `time_*` → `time`, JSON columns parsed); its `summary_diffs` become the session's diff
//! record; columns with no place in `Session.Info` ride along in the entity's `columns`. A
//! message or part row's `data` lacks the ids, which go back in front:
//! `{"id", "sessionID"[, "messageID"], ...data}`, as opencode does when it reads a row.

use super::{scrub, valid_id, Raw, RawKind, DB_FILE};
use crate::payload::{exact_json, JsonObject};
use crate::safety::{SafeRoot, Warning};
use crate::{Agent, AgentError, AgentSession, Limits, SessionSource};
use capsync_persistence::agents::{OpencodeDb, OpencodeRecordRow, OpencodeSessionRow, SqlValue};
use std::collections::VecDeque;

const MESSAGE_PAGE: u32 = 200;
const PART_PAGE: u32 = 500;

/// The columns `Session.Info` has a place for.
const MAPPED: &[&str] = &[
    "id",
    "slug",
    "project_id",
    "workspace_id",
    "directory",
    "path",
    "parent_id",
    "title",
    "agent",
    "model",
    "version",
    "summary_additions",
    "summary_deletions",
    "summary_files",
    "summary_diffs",
    "share_url",
    "revert",
    "permission",
    "time_created",
    "time_updated",
    "time_compacting",
    "time_archived",
];

/// A discovered session of the database, or why it is skipped.
pub(crate) fn describe(db: &OpencodeDb, id: &str, root: &SafeRoot) -> Result<AgentSession, Warning> {
    if !valid_id(id) {
        return Err(Warning::new(DB_FILE, "a session id that is not an opencode id; skipped"));
    }
    let fail = |e: capsync_persistence::StorageError| Warning::new(DB_FILE, format!("session {id} cannot be read: {}", scrub(&e.to_string(), root)));
    let row = db.session(id, 4096).map_err(fail)?.ok_or_else(|| Warning::new(DB_FILE, format!("session {id} vanished")))?;
    let fp = db.fingerprint(id).map_err(fail)?;
    let title = match row.get("title") {
        Some(SqlValue::Text(t)) => crate::payload::truncate(t, 200).to_owned(),
        _ => String::new(),
    };
    let fingerprint = format!("{}-{}-{}-{}-{}", fp.session_updated, fp.messages, fp.messages_updated, fp.parts, fp.parts_updated);
    Ok(AgentSession {
        agent: Agent::Opencode,
        session_id: id.to_owned(),
        title,
        source: SessionSource::OpencodeDb { path: DB_FILE.to_owned(), fingerprint },
    })
}

fn text(v: Option<&SqlValue>) -> Option<&str> {
    match v {
        Some(SqlValue::Text(t)) => Some(t),
        _ => None,
    }
}

fn int(v: Option<&SqlValue>) -> Option<i64> {
    match v {
        Some(SqlValue::Integer(i)) => Some(*i),
        Some(SqlValue::Real(f)) => Some(*f as i64),
        _ => None,
    }
}

/// A column as JSON: numbers as numbers, a JSON-mode column's text as the JSON it holds (or
/// as a string when it is not JSON), other text as a string.
fn json(v: Option<&SqlValue>, json_text: bool) -> Option<String> {
    match v? {
        SqlValue::Integer(i) => Some(i.to_string()),
        SqlValue::Real(f) => Some(serde_json::to_string(f).unwrap_or_else(|_| "null".into())),
        SqlValue::Text(t) if json_text && exact_json(t.as_bytes()).is_some() => Some(t.clone()),
        SqlValue::Text(t) => Some(serde_json::to_string(t).expect("a string serializes")),
        SqlValue::Null | SqlValue::Blob(_) | SqlValue::TooLarge(_) => None,
    }
}

/// `{"k1": "v1", ..., <the members of object>}`; `None` when `object` is not a JSON object.
fn splice(front: &[(&str, &str)], object: &str) -> Option<String> {
    let object = object.trim();
    exact_json(object.as_bytes())?;
    let inner = object.strip_prefix('{')?.strip_suffix('}')?.trim();
    let mut out = JsonObject::new();
    for (k, v) in front {
        out.str(k, v);
    }
    let mut text = String::from_utf8(out.finish()).expect("JSON is UTF-8");
    if !inner.is_empty() {
        text.pop();
        if !front.is_empty() {
            text.push(',');
        }
        text.push_str(inner);
        text.push('}');
    }
    Some(text)
}

/// One session's records from the database.
pub(crate) struct DbSession<'s> {
    db: &'s OpencodeDb,
    root: &'s SafeRoot,
    session_id: String,
    limits: Limits,
    step: u8,
    diff: Option<Raw>,
    messages: VecDeque<OpencodeRecordRow>,
    message_after: Option<(i64, String)>,
    messages_done: bool,
    parts: VecDeque<OpencodeRecordRow>,
    part_after: Option<String>,
    parts_done: bool,
    message: Option<(String, i64)>,
    pub warnings: Vec<Warning>,
}

impl<'s> DbSession<'s> {
    pub fn new(db: &'s OpencodeDb, root: &'s SafeRoot, session_id: &str, limits: Limits) -> DbSession<'s> {
        DbSession {
            db,
            root,
            session_id: session_id.to_owned(),
            limits,
            step: 0,
            diff: None,
            messages: VecDeque::new(),
            message_after: None,
            messages_done: false,
            parts: VecDeque::new(),
            part_after: None,
            parts_done: true,
            message: None,
            warnings: Vec::new(),
        }
    }

    fn warn(&mut self, reason: String) {
        self.warnings.push(Warning::new(DB_FILE, reason));
    }

    fn fail(&self, e: capsync_persistence::StorageError) -> AgentError {
        AgentError::Database { path: DB_FILE.into(), reason: scrub(&e.to_string(), self.root) }
    }

    fn session(&mut self, row: &OpencodeSessionRow) -> Raw {
        let id = self.session_id.clone();
        let get = |name: &str| row.get(name);
        let mut v = JsonObject::new();
        v.str("id", &id);
        v.opt_str("slug", text(get("slug")));
        v.opt_str("projectID", text(get("project_id")));
        v.opt_str("workspaceID", text(get("workspace_id")));
        v.opt_str("directory", text(get("directory")));
        v.opt_str("path", text(get("path")));
        v.opt_str("parentID", text(get("parent_id")));
        v.opt_str("title", text(get("title")));
        v.opt_str("agent", text(get("agent")));
        if let Some(model) = json(get("model"), true) {
            v.raw("model", &model);
        }
        v.opt_str("version", text(get("version")));
        let summary = ["summary_additions", "summary_deletions", "summary_files"].map(|c| int(get(c)));
        if summary.iter().any(Option::is_some) {
            let mut s = JsonObject::new();
            s.int("additions", summary[0].unwrap_or(0)).int("deletions", summary[1].unwrap_or(0)).int("files", summary[2].unwrap_or(0));
            v.raw("summary", std::str::from_utf8(&s.finish()).expect("JSON is UTF-8"));
        }
        if let Some(url) = text(get("share_url")) {
            let mut s = JsonObject::new();
            s.str("url", url);
            v.raw("share", std::str::from_utf8(&s.finish()).expect("JSON is UTF-8"));
        }
        for (column, key) in [("revert", "revert"), ("permission", "permission")] {
            if let Some(value) = json(get(column), true) {
                v.raw(key, &value);
            }
        }
        let created = int(get("time_created")).unwrap_or(0);
        let mut t = JsonObject::new();
        t.int("created", created).int("updated", int(get("time_updated")).unwrap_or(created));
        if let Some(c) = int(get("time_compacting")) {
            t.int("compacting", c);
        }
        if let Some(a) = int(get("time_archived")) {
            t.int("archived", a);
        }
        v.raw("time", std::str::from_utf8(&t.finish()).expect("JSON is UTF-8"));
        let mut columns = JsonObject::new();
        let mut extra = false;
        for (name, value) in &row.columns {
            if let SqlValue::TooLarge(n) = value {
                self.warn(format!("session {id}: column {name} is {n} bytes, over the record cap; left out"));
                continue;
            }
            if MAPPED.contains(&name.as_str()) {
                continue;
            }
            if let Some(json) = json(Some(value), false) {
                columns.raw(name, &json);
                extra = true;
            }
        }
        let project = text(get("project_id")).filter(|p| valid_id(p)).unwrap_or("global");
        match get("summary_diffs") {
            Some(SqlValue::Text(diffs)) if exact_json(diffs.as_bytes()).is_some() => {
                self.diff = Some(Raw {
                    kind: RawKind::Diff,
                    id: id.clone(),
                    parent: String::new(),
                    file: format!("session_diff/{id}.json"),
                    source: "db",
                    value: diffs.clone(),
                    ws: None,
                    ts_ms: created,
                    columns: None,
                });
            }
            Some(SqlValue::Text(_)) => self.warn(format!("session {id}: summary_diffs is not JSON; left out")),
            _ => {}
        }
        Raw {
            kind: RawKind::Session,
            id: id.clone(),
            parent: String::new(),
            file: format!("session/{project}/{id}.json"),
            source: "db",
            value: String::from_utf8(v.finish()).expect("JSON is UTF-8"),
            ws: None,
            ts_ms: created,
            columns: extra.then(|| String::from_utf8(columns.finish()).expect("JSON is UTF-8")),
        }
    }

    fn record(&mut self, row: OpencodeRecordRow, kind: RawKind) -> Option<Raw> {
        let what = if kind == RawKind::Message { "message" } else { "part" };
        let also = if kind == RawKind::Message { " (with its parts)" } else { "" };
        if !valid_id(&row.id) || (kind == RawKind::Part && !valid_id(&row.message_id)) {
            self.warn(format!("a {what} id that is not an opencode id; skipped{also}"));
            return None;
        }
        let Some(data) = row.data.as_deref() else {
            self.warn(format!("{what} {} is {} bytes, over the record cap; skipped{also}", row.id, row.data_bytes));
            return None;
        };
        let value = if kind == RawKind::Message {
            splice(&[("id", &row.id), ("sessionID", &row.session_id)], data)
        } else {
            splice(&[("id", &row.id), ("sessionID", &row.session_id), ("messageID", &row.message_id)], data)
        };
        let Some(value) = value else {
            self.warn(format!("{what} {}: its data is not a JSON object; skipped{also}", row.id));
            return None;
        };
        let file = match kind {
            RawKind::Message => format!("message/{}/{}.json", self.session_id, row.id),
            _ => format!("part/{}/{}.json", row.message_id, row.id),
        };
        Some(Raw { kind, id: row.id, parent: row.message_id, file, source: "db", value, ws: None, ts_ms: row.time_created, columns: None })
    }

    pub fn next(&mut self) -> Option<Result<Raw, AgentError>> {
        loop {
            match self.step {
                0 => {
                    self.step = 1;
                    let row = match self.db.session(&self.session_id, self.limits.max_line_bytes as u64) {
                        Ok(Some(row)) => row,
                        Ok(None) => {
                            self.step = 3;
                            return Some(Err(AgentError::Format(format!("{DB_FILE}: session {} is gone", self.session_id))));
                        }
                        Err(e) => {
                            self.step = 3;
                            return Some(Err(self.fail(e)));
                        }
                    };
                    return Some(Ok(self.session(&row)));
                }
                1 => {
                    self.step = 2;
                    if let Some(diff) = self.diff.take() {
                        return Some(Ok(diff));
                    }
                }
                2 => {
                    if let Some(part) = self.parts.pop_front() {
                        self.part_after = Some(part.id.clone());
                        if let Some(raw) = self.record(part, RawKind::Part) {
                            return Some(Ok(raw));
                        }
                        continue;
                    }
                    if !self.parts_done {
                        let (message, _) = self.message.clone().expect("parts follow a message");
                        let cap = self.limits.max_line_bytes as u64;
                        match self.db.parts(&message, self.part_after.as_deref(), PART_PAGE, cap) {
                            Ok(rows) => {
                                self.parts_done = rows.len() < PART_PAGE as usize;
                                self.parts.extend(rows);
                            }
                            Err(e) => return Some(Err(self.fail(e))),
                        }
                        continue;
                    }
                    if let Some(message) = self.messages.pop_front() {
                        self.message_after = Some((message.time_created, message.id.clone()));
                        let (id, ts) = (message.id.clone(), message.time_created);
                        if let Some(raw) = self.record(message, RawKind::Message) {
                            self.message = Some((id, ts));
                            (self.parts_done, self.part_after) = (false, None);
                            return Some(Ok(raw));
                        }
                        continue;
                    }
                    if self.messages_done {
                        return None;
                    }
                    let after = self.message_after.as_ref().map(|(t, id)| (*t, id.as_str()));
                    match self.db.messages(&self.session_id, after, MESSAGE_PAGE, self.limits.max_line_bytes as u64) {
                        Ok(rows) => {
                            self.messages_done = rows.len() < MESSAGE_PAGE as usize;
                            self.messages.extend(rows);
                        }
                        Err(e) => return Some(Err(self.fail(e))),
                    }
                }
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::splice;

    #[test]
    fn ids_go_in_front() {
        assert_eq!(splice(&[("id", "m1")], r#"{"role":"user"}"#).as_deref(), Some(r#"{"id":"m1","role":"user"}"#));
        assert_eq!(splice(&[("id", "m1")], "{}").as_deref(), Some(r#"{"id":"m1"}"#));
        assert_eq!(splice(&[("id", "m\"1")], r#" { "a" : 1 } "#).as_deref(), Some(r#"{"id":"m\"1","a" : 1}"#));
        assert_eq!(splice(&[("id", "m1")], "[1]"), None);
    }
}
