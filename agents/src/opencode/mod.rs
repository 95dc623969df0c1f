//! sst/opencode's session storage.
//!
//! opencode keeps its data in `$XDG_DATA_HOME/opencode` (else `~/.local/share/opencode`).
//! Current versions keep sessions in the SQLite database `opencode.db` there (tables `session`
//! with one column per field, `message` and `part` with ids, parent ids, `time_created`,
//! `time_updated` and a JSON `data` column); older ones in a JSON tree under `storage/`:
//!
//! ```text
//! storage/session/<project id>/<session id>.json   Session.Info
//! storage/message/<session id>/<message id>.json   MessageV2.Info (user or assistant)
//! storage/part/<message id>/<part id>.json         MessageV2.Part (text, tool, patch, ...)
//! storage/session_diff/<session id>.json           the session's file diffs (an array)
//! ```
//!
//! Both are read: a session in the database is read from there (the tree may still hold its
//! pre-migration copy, which is then passed over); a session only in the tree from the tree.
//!
//! | record | kind | id | parent |
//! | --- | --- | --- | --- |
//! | session | session | the capsync session id | `""` |
//! | session diffs (`session_diff/<id>.json`, or the `summary_diffs` column) | diff | `session_diff` | session |
//! | message | message | its opencode id | session |
//! | part | part | its opencode id | its message |
//! | a model a message names (`providerID/modelID`) | model | `providerID/modelID` | session |
//!
//! [`OpencodeStore::open`] opens a root; [`OpencodeStore::sessions`] discovers its sessions;
//! [`OpencodeStore::reader`] yields one session's [`Record`]s; [`export_opencode`] writes a
//! session's entities back as the JSON tree.

mod db;
mod export;
mod pretty;
mod tree;

pub use export::export_opencode;
pub use pretty::pretty_json;

use crate::lenient::{LNum, LStr};
use crate::opid::op_id;
use crate::payload::{build, Draft, JsonObject};
use crate::safety::{SafeRoot, Warning};
use crate::{Agent, AgentError, AgentSession, EntityKind, Limits, Record, SessionSource};
use capsync_persistence::agents::OpencodeDb;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::{HashSet, VecDeque};
use std::path::Path;

/// The database file in opencode's data directory.
pub const DB_FILE: &str = "opencode.db";

/// What kind of opencode record a [`Raw`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RawKind {
    Session,
    Diff,
    Message,
    Part,
}

/// One opencode record as read, before it becomes entities.
#[derive(Clone, Debug)]
pub(crate) struct Raw {
    pub kind: RawKind,
    /// The opencode id (the session's, for a diff).
    pub id: String,
    /// For a part: its message's id.
    pub parent: String,
    /// Its path in the JSON tree, relative to `storage/` (where an export writes it).
    pub file: String,
    /// `tree` or `db`.
    pub source: &'static str,
    /// The JSON text of the record.
    pub value: String,
    /// Whitespace around the value in its file (the tree only).
    pub ws: Option<(String, String)>,
    /// The record's time when its value has none (milliseconds).
    pub ts_ms: i64,
    /// A database session's columns that have no place in Session.Info, as a JSON object.
    pub columns: Option<String>,
}

/// A root of opencode data: its `storage/` tree and its `opencode.db`, either or both.
pub struct OpencodeStore {
    root: SafeRoot,
    /// The tree's directory relative to the root (`storage`, or `""` when the root is it).
    storage: Option<String>,
    db: Option<OpencodeDb>,
    limits: Limits,
}

impl OpencodeStore {
    /// Opens opencode's data directory (or its `storage/` directory itself). A database that
    /// cannot be opened is a warning, and the tree is still read.
    pub fn open(root: &Path, limits: Limits) -> Result<(OpencodeStore, Vec<Warning>), AgentError> {
        let root = SafeRoot::new(root)?;
        let mut warnings = Vec::new();
        let is_dir = |rel: &str| root.resolve(rel).map(|p| p.is_dir()).unwrap_or(false);
        let storage = if is_dir("storage/session") {
            Some("storage".to_owned())
        } else if is_dir("session") && (is_dir("message") || is_dir("part")) {
            Some(String::new())
        } else {
            None
        };
        let db = match root.join(DB_FILE) {
            Ok(path) if path.symlink_metadata().is_ok() => match root.resolve(DB_FILE) {
                Err(e) => {
                    warnings.push(Warning::new(DB_FILE, crate::codex::reason_of(&e)));
                    None
                }
                Ok(real) => match OpencodeDb::open_read_only(&real, std::time::Duration::from_secs(5)) {
                    Ok(db) => Some(db),
                    Err(e) => {
                        warnings.push(Warning::new(DB_FILE, format!("cannot be read: {}", scrub(&e.to_string(), &root))));
                        None
                    }
                },
            },
            _ => None,
        };
        Ok((OpencodeStore { root, storage, db, limits }, warnings))
    }

    pub fn root(&self) -> &SafeRoot {
        &self.root
    }

    /// Whether a database and a tree were found.
    pub fn has_db(&self) -> bool {
        self.db.is_some()
    }

    pub fn has_tree(&self) -> bool {
        self.storage.is_some()
    }

    /// The sessions, database first, then those only in the tree; lazily.
    pub fn sessions(&self) -> Sessions<'_> {
        Sessions {
            store: self,
            db_after: None,
            db_page: VecDeque::new(),
            db_done: self.db.is_none(),
            db_ids: HashSet::new(),
            tree: None,
            tree_started: false,
            warnings: Vec::new(),
        }
    }

    /// The records of one session, to go into capsync session `target`.
    pub fn reader(&self, session: &AgentSession, target: &str) -> Result<OpencodeReader<'_>, AgentError> {
        let source = match &session.source {
            SessionSource::OpencodeDb { .. } => {
                let db = self.db.as_ref().ok_or_else(|| AgentError::Format("no opencode database here".into()))?;
                Source::Db(Box::new(db::DbSession::new(db, &self.root, &session.session_id, self.limits)))
            }
            SessionSource::OpencodeTree { path, .. } => {
                let storage = self.storage.clone().ok_or_else(|| AgentError::Format("no opencode storage tree here".into()))?;
                Source::Tree(Box::new(tree::TreeSession::new(&self.root, storage, path.clone(), &session.session_id, self.limits)))
            }
            SessionSource::CodexRollout { .. } => return Err(AgentError::Format("not an opencode session".into())),
        };
        Ok(OpencodeReader {
            source,
            agent_session_id: session.session_id.clone(),
            target: target.to_owned(),
            limits: self.limits,
            models: HashSet::new(),
            pending: VecDeque::new(),
            message_ts: 0,
            session_ts: 0,
        })
    }
}

/// Replaces the root's absolute path in a message (SQLite's errors may name the file).
pub(crate) fn scrub(message: &str, root: &SafeRoot) -> String {
    message.replace(&*root.path().to_string_lossy(), "<root>")
}

/// Whether an opencode id can be an entity id and a file name.
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 200 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The sessions of an [`OpencodeStore`]: `Ok` per session, `Err` per file skipped.
pub struct Sessions<'s> {
    store: &'s OpencodeStore,
    db_after: Option<String>,
    db_page: VecDeque<String>,
    db_done: bool,
    db_ids: HashSet<String>,
    tree: Option<tree::TreeSessions>,
    tree_started: bool,
    warnings: Vec<Warning>,
}

impl Iterator for Sessions<'_> {
    type Item = Result<AgentSession, Warning>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(w) = self.warnings.pop() {
                return Some(Err(w));
            }
            if !self.db_done {
                let db = self.store.db.as_ref().expect("db_done when there is none");
                if self.db_page.is_empty() {
                    match db.session_ids(self.db_after.as_deref(), 500) {
                        Ok(ids) if ids.is_empty() => self.db_done = true,
                        Ok(ids) => {
                            self.db_after = ids.last().cloned();
                            self.db_page.extend(ids);
                        }
                        Err(e) => {
                            self.db_done = true;
                            return Some(Err(Warning::new(DB_FILE, format!("cannot be read: {}", scrub(&e.to_string(), &self.store.root)))));
                        }
                    }
                    continue;
                }
                let id = self.db_page.pop_front().expect("not empty");
                self.db_ids.insert(id.clone());
                return Some(db::describe(db, &id, &self.store.root));
            }
            if !self.tree_started {
                self.tree_started = true;
                if let Some(storage) = &self.store.storage {
                    match tree::TreeSessions::new(&self.store.root, storage, &mut self.warnings) {
                        Ok(t) => self.tree = Some(t),
                        Err(e) => self.warnings.push(Warning::new(storage.clone(), crate::codex::reason_of(&e))),
                    }
                }
                continue;
            }
            let tree = self.tree.as_mut()?;
            let found = tree.next(&self.store.root, &self.store.limits, &mut self.warnings)?;
            match found {
                Ok(session) if self.db_ids.contains(&session.session_id) => continue,
                other => return Some(other),
            }
        }
    }
}

enum Source<'s> {
    Db(Box<db::DbSession<'s>>),
    Tree(Box<tree::TreeSession<'s>>),
}

/// One opencode session's records: the session entity, its diffs, then each message followed
/// by the models it names (once each) and its parts. An iterator of puts with deterministic
/// opIds; a record that cannot be read is left out with a warning
/// ([`OpencodeReader::take_warnings`]), and so are the parts of a message that cannot be.
pub struct OpencodeReader<'s> {
    source: Source<'s>,
    agent_session_id: String,
    target: String,
    limits: Limits,
    models: HashSet<String>,
    pending: VecDeque<Record>,
    message_ts: i64,
    session_ts: i64,
}

impl OpencodeReader<'_> {
    pub fn take_warnings(&mut self) -> Vec<Warning> {
        match &mut self.source {
            Source::Db(s) => std::mem::take(&mut s.warnings),
            Source::Tree(s) => std::mem::take(&mut s.warnings),
        }
    }

    fn push(&mut self, draft: Draft, original: &[u8], position: &str, ts: i64) {
        for (entity, suffix) in build(Agent::Opencode, draft, "value", original, &self.limits) {
            let op_id = op_id(Agent::Opencode, &self.agent_session_id, &self.target, &format!("{position}{suffix}"), &entity, ts);
            self.pending.push_back(Record { op_id, entity });
        }
    }

    fn map(&mut self, raw: Raw) {
        let fields: ValueFields<'_> = serde_json::from_str(&raw.value).unwrap_or_default();
        let time: TimeFields = fields.time.and_then(|t| serde_json::from_str(t.get()).ok()).unwrap_or_default();
        let mut data = JsonObject::new();
        data.str("agent", "opencode");
        let (kind, parent, position, ts) = match raw.kind {
            RawKind::Session => {
                let model = fields.model.and_then(model_of_session);
                data.str("agent_session_id", &raw.id)
                    .str("title", crate::payload::truncate(fields.title.0.as_deref().unwrap_or(""), 200))
                    .opt_str("directory", fields.directory.0.as_deref())
                    .opt_str("model", model.as_deref())
                    .opt_str("version", fields.version.0.as_deref())
                    .opt_str("project_id", fields.project_id.0.as_deref())
                    .opt_str("parent_session_id", fields.parent_id.0.as_deref());
                let ts = time.created.0.unwrap_or(raw.ts_ms);
                self.session_ts = ts;
                (EntityKind::Session, String::new(), "session".to_owned(), ts)
            }
            RawKind::Diff => {
                let files: Vec<DiffFile> = serde_json::from_str(&raw.value).unwrap_or_default();
                let files: Vec<String> = files.into_iter().filter_map(|f| f.file.0).take(64).collect();
                data.strs("files", &files);
                (EntityKind::Diff, self.target.clone(), "session_diff".to_owned(), self.session_ts.max(raw.ts_ms))
            }
            RawKind::Message => {
                let model = message_model(&fields);
                data.opt_str("role", fields.role.0.as_deref()).opt_str("model", model.as_ref().map(|(p, m)| format!("{p}/{m}")).as_deref());
                data.opt_str("agent_name", fields.agent.0.as_deref());
                let ts = time.created.0.unwrap_or(raw.ts_ms);
                self.message_ts = ts;
                let position = format!("message:{}", raw.id);
                self.finish(raw, data, EntityKind::Message, self.target.clone(), &position, ts);
                if let Some((provider, model)) = model {
                    self.model(&provider, &model, ts);
                }
                return;
            }
            RawKind::Part => {
                let state: StateFields = fields.state.and_then(|s| serde_json::from_str(s.get()).ok()).unwrap_or_default();
                let state_time: TimeFields = state.time.and_then(|t| serde_json::from_str(t.get()).ok()).unwrap_or_default();
                data.opt_str("type", fields.ty.0.as_deref()).opt_str("tool", fields.tool.0.as_deref()).opt_str("status", state.status.0.as_deref());
                let ts = time.start.0.or(state_time.start.0).or(time.created.0).unwrap_or(self.message_ts.max(raw.ts_ms));
                (EntityKind::Part, raw.parent.clone(), format!("part:{}", raw.id), ts)
            }
        };
        self.finish(raw, data, kind, parent, &position, ts);
    }

    fn finish(&mut self, raw: Raw, mut data: JsonObject, kind: EntityKind, parent: String, position: &str, ts: i64) {
        let id = match raw.kind {
            RawKind::Session => self.target.clone(),
            RawKind::Diff => "session_diff".to_owned(),
            _ => raw.id.clone(),
        };
        data.str("source", raw.source).str("file", &raw.file);
        if let Some((lead, trail)) = &raw.ws {
            data.strs("ws", &[lead.clone(), trail.clone()]);
        }
        if let Some(columns) = &raw.columns {
            data.raw("columns", columns);
        }
        let draft = Draft { kind, id, parent_id: parent, data };
        self.push(draft, raw.value.as_bytes(), position, ts);
    }

    fn model(&mut self, provider: &str, model: &str, ts: i64) {
        let id = format!("{provider}/{model}");
        if id.len() > 200 || !self.models.insert(id.clone()) {
            return;
        }
        let mut data = JsonObject::new();
        data.str("agent", "opencode").str("provider_id", provider).str("model_id", model);
        let entity = crate::Entity { kind: EntityKind::Model, id: id.clone(), parent_id: self.target.clone(), data: data.finish() };
        let op_id = op_id(Agent::Opencode, &self.agent_session_id, &self.target, &format!("model:{id}"), &entity, ts);
        self.pending.push_back(Record { op_id, entity });
    }
}

impl Iterator for OpencodeReader<'_> {
    type Item = Result<Record, AgentError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(record) = self.pending.pop_front() {
                return Some(Ok(record));
            }
            let raw = match &mut self.source {
                Source::Db(s) => s.next(),
                Source::Tree(s) => s.next(),
            };
            match raw? {
                Ok(raw) => self.map(raw),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

#[derive(Deserialize, Default)]
struct ValueFields<'a> {
    #[serde(default)]
    title: LStr,
    #[serde(default)]
    directory: LStr,
    #[serde(default)]
    version: LStr,
    #[serde(default, rename = "projectID")]
    project_id: LStr,
    #[serde(default, rename = "parentID")]
    parent_id: LStr,
    #[serde(default)]
    role: LStr,
    #[serde(default)]
    agent: LStr,
    #[serde(default, rename = "providerID")]
    provider_id: LStr,
    #[serde(default, rename = "modelID")]
    model_id: LStr,
    #[serde(default, borrow)]
    model: Option<&'a RawValue>,
    #[serde(default, rename = "type")]
    ty: LStr,
    #[serde(default)]
    tool: LStr,
    #[serde(default, borrow)]
    time: Option<&'a RawValue>,
    #[serde(default, borrow)]
    state: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct TimeFields {
    #[serde(default)]
    created: LNum,
    #[serde(default)]
    start: LNum,
}

#[derive(Deserialize, Default)]
struct StateFields<'a> {
    #[serde(default)]
    status: LStr,
    #[serde(default, borrow)]
    time: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct ModelFields {
    #[serde(default, rename = "providerID")]
    provider_id: LStr,
    #[serde(default, rename = "modelID")]
    model_id: LStr,
    #[serde(default)]
    id: LStr,
}

#[derive(Deserialize, Default)]
struct DiffFile {
    #[serde(default)]
    file: LStr,
}

/// The model a message names: a user message's `model {providerID, modelID}`, an assistant
/// message's `providerID` and `modelID`.
fn message_model(fields: &ValueFields<'_>) -> Option<(String, String)> {
    if let (Some(p), Some(m)) = (&fields.provider_id.0, &fields.model_id.0) {
        return Some((p.clone(), m.clone()));
    }
    let model: ModelFields = serde_json::from_str(fields.model?.get()).ok()?;
    Some((model.provider_id.0?, model.model_id.0?))
}

/// A session's `model {id, providerID}` (newer versions) as `providerID/id`.
fn model_of_session(model: &RawValue) -> Option<String> {
    let model: ModelFields = serde_json::from_str(model.get()).ok()?;
    Some(format!("{}/{}", model.provider_id.0?, model.id.0.or(model.model_id.0)?))
}
