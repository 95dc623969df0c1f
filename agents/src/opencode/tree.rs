//! opencode's JSON tree (`storage/`): one JSON file per session, message, part and session
//! diff list.

use super::{valid_id, Raw, RawKind};
use crate::codex::reason_of;
use crate::payload::exact_json;
use crate::safety::{DirItem, SafeRoot, Warning};
use crate::{Agent, AgentError, AgentSession, Limits, SessionSource};
use sha2::{Digest, Sha256};
use std::io::Read;

fn join(storage: &str, rest: &str) -> String {
    if storage.is_empty() {
        rest.to_owned()
    } else {
        format!("{storage}/{rest}")
    }
}

/// The entries of directory `rel`, none when it does not exist, a warning when it cannot be
/// listed.
fn list(root: &SafeRoot, rel: &str, warnings: &mut Vec<Warning>) -> Vec<DirItem> {
    match root.join(rel) {
        Ok(path) if path.symlink_metadata().is_ok() => {}
        _ => return Vec::new(),
    }
    match root.list(rel, warnings) {
        Ok(items) => items,
        Err(e) => {
            warnings.push(Warning::new(rel, format!("cannot be listed: {}", reason_of(&e))));
            Vec::new()
        }
    }
}

/// `name` without `.json`, when it is a JSON file's.
fn stem(item: &DirItem) -> Option<String> {
    if item.is_dir {
        return None;
    }
    item.name.to_str()?.strip_suffix(".json").map(str::to_owned)
}

/// Reads a record file: its JSON text (without the whitespace around it) and that
/// whitespace. The reason when it cannot be used.
fn read_json(root: &SafeRoot, rel: &str, limits: &Limits) -> Result<(String, Option<(String, String)>), String> {
    let (file, meta) = root.open(rel).map_err(|e| format!("cannot be read: {}", reason_of(&e)))?;
    let cap = limits.max_line_bytes as u64;
    if meta.len() > cap {
        return Err(format!("{} bytes, over the record cap of {cap} bytes; not read", meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(cap + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot be read: {}", reason_of(&AgentError::io(rel, e))))?;
    if bytes.len() as u64 > cap {
        return Err(format!("over the record cap of {cap} bytes; not read"));
    }
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())?;
    let is_ws = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r');
    let start = text.len() - text.trim_start_matches(is_ws).len();
    let end = text.trim_end_matches(is_ws).len().max(start);
    let value = &text[start..end];
    if exact_json(value.as_bytes()).is_none() {
        return Err("not valid JSON".into());
    }
    let ws = (start > 0 || end < text.len()).then(|| (text[..start].to_owned(), text[end..].to_owned()));
    Ok((value.to_owned(), ws))
}

fn is_object(value: &str) -> bool {
    value.starts_with('{')
}

/// The sessions of the tree: `storage/session/<project>/<id>.json`.
pub(crate) struct TreeSessions {
    storage: String,
    projects: std::vec::IntoIter<DirItem>,
    files: std::vec::IntoIter<DirItem>,
}

impl TreeSessions {
    pub fn new(root: &SafeRoot, storage: &str, warnings: &mut Vec<Warning>) -> Result<TreeSessions, AgentError> {
        let projects = root.list(&join(storage, "session"), warnings)?;
        Ok(TreeSessions { storage: storage.to_owned(), projects: projects.into_iter(), files: Vec::new().into_iter() })
    }

    pub fn next(&mut self, root: &SafeRoot, limits: &Limits, warnings: &mut Vec<Warning>) -> Option<Result<AgentSession, Warning>> {
        loop {
            let Some(item) = self.files.next() else {
                let project = self.projects.next()?;
                if project.is_dir {
                    self.files = list(root, &project.rel, warnings).into_iter();
                }
                continue;
            };
            let Some(id) = stem(&item) else { continue };
            if !valid_id(&id) {
                return Some(Err(Warning::new(item.rel, "not an opencode session id; skipped")));
            }
            let title = match read_json(root, &item.rel, limits) {
                Err(reason) => return Some(Err(Warning::new(item.rel, reason))),
                Ok((value, _)) if !is_object(&value) => return Some(Err(Warning::new(item.rel, "not a JSON object"))),
                Ok((value, _)) => {
                    #[derive(serde::Deserialize, Default)]
                    struct Title {
                        #[serde(default)]
                        title: crate::lenient::LStr,
                    }
                    let t: Title = serde_json::from_str(&value).unwrap_or_default();
                    crate::payload::truncate(t.title.0.as_deref().unwrap_or(""), 200).to_owned()
                }
            };
            let fingerprint = self.fingerprint(root, &item, &id, warnings);
            return Some(Ok(AgentSession {
                agent: Agent::Opencode,
                session_id: id,
                title,
                source: SessionSource::OpencodeTree { path: item.rel, fingerprint },
            }));
        }
    }

    /// Names, sizes and times of every file of the session.
    fn fingerprint(&self, root: &SafeRoot, session: &DirItem, id: &str, warnings: &mut Vec<Warning>) -> String {
        let mut h = Sha256::new();
        let mut add = |item: &DirItem| {
            h.update(item.rel.as_bytes());
            h.update(item.size.to_le_bytes());
            h.update(item.mtime_ns.to_le_bytes());
        };
        add(session);
        let mut quiet = Vec::new();
        for diff in list(root, &join(&self.storage, "session_diff"), &mut quiet).iter().filter(|d| stem(d).as_deref() == Some(id)) {
            add(diff);
        }
        for message in list(root, &join(&self.storage, &format!("message/{id}")), warnings) {
            add(&message);
            if let Some(mid) = stem(&message).filter(|m| valid_id(m)) {
                for part in list(root, &join(&self.storage, &format!("part/{mid}")), warnings) {
                    add(&part);
                }
            }
        }
        h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// One session's records from the tree.
pub(crate) struct TreeSession<'s> {
    root: &'s SafeRoot,
    storage: String,
    session_file: String,
    session_id: String,
    limits: Limits,
    step: u8,
    messages: std::vec::IntoIter<DirItem>,
    parts: std::vec::IntoIter<DirItem>,
    message_id: String,
    pub warnings: Vec<Warning>,
}

impl<'s> TreeSession<'s> {
    pub fn new(root: &'s SafeRoot, storage: String, session_file: String, session_id: &str, limits: Limits) -> TreeSession<'s> {
        TreeSession {
            root,
            storage,
            session_file,
            session_id: session_id.to_owned(),
            limits,
            step: 0,
            messages: Vec::new().into_iter(),
            parts: Vec::new().into_iter(),
            message_id: String::new(),
            warnings: Vec::new(),
        }
    }

    /// The path relative to `storage/`.
    fn in_storage<'a>(&self, rel: &'a str) -> &'a str {
        if self.storage.is_empty() {
            rel
        } else {
            rel.strip_prefix(&format!("{}/", self.storage)).unwrap_or(rel)
        }
    }

    fn raw(&self, kind: RawKind, id: String, parent: String, rel: &str, value: String, ws: Option<(String, String)>) -> Raw {
        Raw { kind, id, parent, file: self.in_storage(rel).to_owned(), source: "tree", value, ws, ts_ms: 0, columns: None }
    }

    pub fn next(&mut self) -> Option<Result<Raw, AgentError>> {
        loop {
            match self.step {
                0 => {
                    self.step = 1;
                    let rel = self.session_file.clone();
                    let result = match read_json(self.root, &rel, &self.limits) {
                        Ok((value, ws)) if is_object(&value) => Ok(self.raw(RawKind::Session, self.session_id.clone(), String::new(), &rel, value, ws)),
                        Ok(_) => Err(AgentError::Format(format!("{rel}: not a JSON object"))),
                        Err(reason) => Err(AgentError::Format(format!("{rel}: {reason}"))),
                    };
                    if result.is_err() {
                        self.step = 3;
                    }
                    return Some(result);
                }
                1 => {
                    self.step = 2;
                    let messages = list(self.root, &join(&self.storage, &format!("message/{}", self.session_id)), &mut self.warnings);
                    self.messages = messages.into_iter();
                    let rel = join(&self.storage, &format!("session_diff/{}.json", self.session_id));
                    if self.root.join(&rel).map(|p| p.symlink_metadata().is_ok()).unwrap_or(false) {
                        match read_json(self.root, &rel, &self.limits) {
                            Ok((value, ws)) => return Some(Ok(self.raw(RawKind::Diff, self.session_id.clone(), String::new(), &rel, value, ws))),
                            Err(reason) => self.warnings.push(Warning::new(rel, reason)),
                        }
                    }
                }
                2 => {
                    if let Some(part) = self.parts.next() {
                        let Some(id) = stem(&part) else { continue };
                        if !valid_id(&id) {
                            self.warnings.push(Warning::new(part.rel, "not an opencode part id; skipped"));
                            continue;
                        }
                        match read_json(self.root, &part.rel, &self.limits) {
                            Ok((value, ws)) if is_object(&value) => {
                                return Some(Ok(self.raw(RawKind::Part, id, self.message_id.clone(), &part.rel, value, ws)));
                            }
                            Ok(_) => self.warnings.push(Warning::new(part.rel, "not a JSON object")),
                            Err(reason) => self.warnings.push(Warning::new(part.rel, reason)),
                        }
                        continue;
                    }
                    let message = self.messages.next()?;
                    let Some(id) = stem(&message) else { continue };
                    if !valid_id(&id) {
                        self.warnings.push(Warning::new(message.rel, "not an opencode message id; skipped"));
                        continue;
                    }
                    let read = read_json(self.root, &message.rel, &self.limits);
                    let parts_dir = join(&self.storage, &format!("part/{id}"));
                    match read {
                        Ok((value, ws)) if is_object(&value) => {
                            self.parts = list(self.root, &parts_dir, &mut self.warnings).into_iter();
                            self.message_id = id.clone();
                            return Some(Ok(self.raw(RawKind::Message, id, String::new(), &message.rel, value, ws)));
                        }
                        Ok(_) => self.warnings.push(Warning::new(message.rel, "not a JSON object; its parts are skipped too")),
                        Err(reason) => self.warnings.push(Warning::new(message.rel, format!("{reason}; its parts are skipped too"))),
                    }
                }
                _ => return None,
            }
        }
    }
}
