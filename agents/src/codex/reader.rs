//! Reading one rollout into records, from the start or from where the last read stopped.

use super::classify::{classify, Kind, Meta};
use super::cursor::{digest, CodexCursor, WINDOW};
use super::{line_id, open_lines, skip};
use crate::lines::{next_line, LineRead};
use crate::opid::op_id;
use crate::payload::{build, Draft, JsonObject};
use crate::safety::{SafeRoot, Warning};
use crate::{Agent, AgentError, EntityKind, Limits, Record};
use std::collections::VecDeque;
use std::io::{BufRead, Read, Seek, SeekFrom};

/// Warnings one file may raise before the rest are only counted.
const MAX_WARNINGS: usize = 20;

/// The records of one rollout, in line order: an iterator of [`Record`]s, each a put with a
/// deterministic opId. [`CodexReader::cursor`] tells, at any point, where to go on from.
///
/// A line whose records were not all yielded is not counted in the cursor; a last line without
/// its newline is not read until it is complete; a line over the line cap is skipped with a
/// warning ([`CodexReader::take_warnings`]); a line that is not JSON is kept as it is (and
/// warned about). An I/O error ends the iteration with one `Err`.
pub struct CodexReader {
    root: SafeRoot,
    rel: String,
    compressed: bool,
    target: String,
    limits: Limits,
    input: Option<Box<dyn BufRead>>,
    buf: Vec<u8>,
    size: u64,
    mtime_ns: i64,
    /// Where the records yielded so far end.
    committed: CodexCursor,
    /// Where the records read so far (some maybe still pending) end.
    working: CodexCursor,
    /// The last bytes consumed up to `committed.offset`.
    recent: Vec<u8>,
    /// The bytes the pending records' line adds to `recent` once they are all yielded.
    staged_tail: Vec<u8>,
    pending: VecDeque<Record>,
    meta: Option<(Meta, Vec<u8>)>,
    warnings: Vec<Warning>,
    suppressed: u64,
    error: Option<AgentError>,
    reached_end: bool,
    /// Opened with a cursor of a file that has not changed since: nothing to read.
    unchanged: bool,
}

impl CodexReader {
    /// Opens rollout `rel` (relative to `root`) to import it into capsync session `target`
    /// (the session entity's id), going on from `cursor` when given.
    pub fn open(root: &SafeRoot, rel: &str, target: &str, cursor: Option<CodexCursor>, limits: Limits) -> Result<CodexReader, AgentError> {
        let compressed = super::rollout_name(rel.rsplit('/').next().unwrap_or(rel)).unwrap_or(false);
        let (mut input, meta) = open_lines(root, rel, compressed)?;
        if meta.len() > limits.max_file_bytes {
            return Err(AgentError::Format(format!("{rel}: {} bytes, over the cap of {} bytes; not read", meta.len(), limits.max_file_bytes)));
        }
        let (size, mtime_ns) = (meta.len(), crate::safety::mtime_ns(&meta));
        let mut reader = CodexReader {
            root: root.clone(),
            rel: rel.to_owned(),
            compressed,
            target: target.to_owned(),
            limits,
            input: None,
            buf: Vec::new(),
            size,
            mtime_ns,
            committed: CodexCursor::default(),
            working: CodexCursor::default(),
            recent: Vec::new(),
            staged_tail: Vec::new(),
            pending: VecDeque::new(),
            meta: None,
            warnings: Vec::new(),
            suppressed: 0,
            error: None,
            reached_end: false,
            unchanged: false,
        };
        let cursor = match cursor {
            Some(c) if c.is_current(size, mtime_ns) => {
                // Nothing changed since a read that reached the end.
                reader.committed = c.clone();
                reader.working = c;
                reader.unchanged = true;
                return Ok(reader);
            }
            other => other,
        };
        // The head window: the first bytes of the content, read from a second handle.
        let head_bytes = {
            let (mut head_input, _) = open_lines(root, rel, compressed)?;
            let mut head = Vec::with_capacity(WINDOW);
            head_input.by_ref().take(WINDOW as u64).read_to_end(&mut head).or_else(|e| partial_ok(e, compressed)).map_err(|e| AgentError::io(rel, e))?;
            head
        };
        let resumed = match cursor {
            Some(c) if c.offset > 0 && !c.agent_session_id.is_empty() && reader.verify(&mut input, &head_bytes, &c)? => Some(c),
            _ => None,
        };
        let mut start = resumed.unwrap_or_default();
        start.head_len = head_bytes.len() as u64;
        start.head = digest(&head_bytes);
        reader.committed = start.clone();
        reader.working = start;
        reader.input = Some(input);
        Ok(reader)
    }

    /// [`CodexReader::open`] for a session [`super::discover`] found.
    pub fn for_session(
        root: &SafeRoot,
        session: &crate::AgentSession,
        target: &str,
        cursor: Option<CodexCursor>,
        limits: Limits,
    ) -> Result<CodexReader, AgentError> {
        match &session.source {
            crate::SessionSource::CodexRollout { path, .. } => CodexReader::open(root, path, target, cursor, limits),
            _ => Err(AgentError::Format("not a Codex session".into())),
        }
    }

    /// Whether `cursor` still describes this file's content; leaves `input` at its offset.
    fn verify(&mut self, input: &mut Box<dyn BufRead>, head_bytes: &[u8], cursor: &CodexCursor) -> Result<bool, AgentError> {
        let head_len = cursor.head_len as usize;
        if head_len > head_bytes.len() || digest(&head_bytes[..head_len]) != cursor.head {
            return Ok(false);
        }
        if !self.compressed && cursor.offset > self.size {
            return Ok(false);
        }
        let tail_len = cursor.offset.min(WINDOW as u64);
        let tail_start = cursor.offset - tail_len;
        let io = |e| AgentError::io(&self.rel, e);
        if self.compressed {
            if skip(input.as_mut(), tail_start).map_err(io)? != tail_start {
                return Ok(false);
            }
        } else {
            // Seek on a fresh handle: the buffered one is positioned by the BufReader.
            let (mut file, _) = self.root.open(&self.rel)?;
            file.seek(SeekFrom::Start(tail_start)).map_err(io)?;
            *input = Box::new(std::io::BufReader::with_capacity(64 * 1024, file));
        }
        let mut tail = Vec::with_capacity(tail_len as usize);
        input.by_ref().take(tail_len).read_to_end(&mut tail).or_else(|e| partial_ok(e, self.compressed)).map_err(io)?;
        if tail.len() as u64 != tail_len || digest(&tail) != cursor.tail {
            return Ok(false);
        }
        self.recent = tail;
        Ok(true)
    }

    /// Where to go on from: covers exactly the records yielded so far.
    pub fn cursor(&self) -> CodexCursor {
        let mut cursor = self.committed.clone();
        if self.unchanged {
            return cursor;
        }
        cursor.tail = digest(&self.recent);
        (cursor.size, cursor.mtime_ns) =
            if self.reached_end && self.pending.is_empty() { (self.size, self.mtime_ns) } else { (0, 0) };
        cursor
    }

    /// The rollout's path relative to the root.
    pub fn path(&self) -> &str {
        &self.rel
    }

    /// The warnings raised so far (each also logged), emptied.
    pub fn take_warnings(&mut self) -> Vec<crate::Warning> {
        std::mem::take(&mut self.warnings)
    }

    /// The agent session id, once the session_meta was read (or from the cursor).
    pub fn agent_session_id(&self) -> &str {
        &self.working.agent_session_id
    }

    fn warn(&mut self, reason: String) {
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(Warning::new(self.rel.clone(), reason));
        } else {
            self.suppressed += 1;
        }
    }

    fn commit(&mut self) {
        self.recent.append(&mut self.staged_tail);
        if self.recent.len() > WINDOW {
            let drop = self.recent.len() - WINDOW;
            self.recent.drain(..drop);
        }
        self.committed = self.working.clone();
    }

    fn finish(&mut self) {
        self.input = None;
        if self.suppressed > 0 {
            let n = self.suppressed;
            self.suppressed = 0;
            self.warnings.push(Warning::new(self.rel.clone(), format!("and {n} more lines like the above")));
        }
    }

    /// Reads the next line and turns it into pending records. `false` at the end.
    fn advance(&mut self) -> bool {
        let Some(input) = self.input.as_mut() else { return false };
        let read = next_line(input, &mut self.buf, self.limits.max_line_bytes);
        let n = self.working.line;
        match read {
            Ok(LineRead::Line { consumed }) => {
                let line = std::mem::take(&mut self.buf);
                let result = self.process(n, &line);
                self.buf = line;
                if let Err(e) = result {
                    self.error = Some(e);
                    self.finish();
                    return false;
                }
                self.stage(consumed);
            }
            Ok(LineRead::TooLong { .. }) if n == 0 => {
                self.error = Some(AgentError::Format(format!("{}: its first line (the session_meta) is over the line cap; not read", self.rel)));
                self.finish();
                return false;
            }
            Ok(LineRead::TooLong { consumed }) => {
                self.warn(format!("line {} is {consumed} bytes, over the line cap; skipped", n + 1));
                self.stage(consumed);
            }
            Ok(LineRead::Partial) | Ok(LineRead::Eof) => {
                self.reached_end = true;
                self.finish();
                return false;
            }
            Err(_) if self.compressed => {
                self.warn("the compressed stream breaks off; read up to the last complete line before it".into());
                self.reached_end = true;
                self.finish();
                return false;
            }
            Err(e) => {
                self.error = Some(AgentError::io(&self.rel, e));
                self.finish();
                return false;
            }
        }
        if self.working.offset > self.limits.max_file_bytes {
            self.warn(format!("decompresses to more than the cap of {} bytes; read no further", self.limits.max_file_bytes));
            self.reached_end = true;
            self.finish();
        }
        true
    }

    /// Moves the working position past the line in `buf`; commits at once when it made no
    /// records.
    fn stage(&mut self, consumed: u64) {
        self.working.offset += consumed;
        self.working.line += 1;
        let keep = self.buf.len().min(WINDOW);
        self.staged_tail.clear();
        self.staged_tail.extend_from_slice(&self.buf[self.buf.len() - keep..]);
        self.staged_tail.push(b'\n');
        if self.pending.is_empty() {
            self.commit();
        }
    }

    fn process(&mut self, n: u64, bytes: &[u8]) -> Result<(), AgentError> {
        let info = classify(bytes, n == 0);
        let state = &mut self.working.state;
        if let Some(ts) = info.ts_ms {
            state.last_ts_ms = ts;
        }
        let ts = state.last_ts_ms;
        if n == 0 {
            let Kind::SessionMeta(meta) = info.kind else {
                return Err(AgentError::Format(format!("{}: not a Codex rollout: its first line is not a session_meta", self.rel)));
            };
            if !super::valid_session_id(&meta.id) {
                return Err(AgentError::Format(format!("{}: the session id in its session_meta is not usable", self.rel)));
            }
            self.working.agent_session_id = meta.id.clone();
            self.meta = Some((meta, bytes.to_vec()));
            return self.emit_session(ts, "line:0", true);
        }
        let mut session_changed = false;
        if state.title.is_none() && info.title.is_some() {
            state.title = info.title.clone();
            session_changed = true;
        }
        if let Kind::TurnContext { model: Some(model), .. } = &info.kind {
            if state.model.is_none() {
                state.model = Some(model.clone());
                session_changed = true;
            }
        }
        let mut data = JsonObject::new();
        data.str("agent", "codex").int("line", n as i64).opt_str("ts", info.timestamp.as_deref());
        let (kind, parent) = match &info.kind {
            Kind::Message { role, phase } => {
                data.str("type", "response_item").str("item", "message").opt_str("role", role.as_deref()).opt_str("phase", phase.as_deref());
                (EntityKind::Message, self.target.clone())
            }
            Kind::Compacted => {
                data.str("type", "compacted").str("role", "assistant");
                (EntityKind::Message, self.target.clone())
            }
            Kind::TurnContext { model, effort } => {
                data.str("type", "turn_context").opt_str("model", model.as_deref()).opt_str("effort", effort.as_deref());
                (EntityKind::Model, self.target.clone())
            }
            Kind::PatchApplyEnd { call_id, success, files } => {
                data.str("type", "event_msg").str("event", "patch_apply_end").opt_str("call_id", call_id.as_deref());
                if let Some(success) = success {
                    data.bool("success", *success);
                }
                data.strs("files", files);
                (EntityKind::Diff, self.target.clone())
            }
            other => {
                match other {
                    Kind::ResponseItem { item, name, call_id } => {
                        data.str("type", "response_item").opt_str("item", item.as_deref()).opt_str("name", name.as_deref()).opt_str("call_id", call_id.as_deref())
                    }
                    Kind::Event { event } => data.str("type", "event_msg").opt_str("event", event.as_deref()),
                    Kind::SessionMeta(_) => data.str("type", "session_meta"),
                    Kind::Other { ty } => data.opt_str("type", ty.as_deref()),
                    _ => data.str("type", "invalid"),
                };
                match state.last_message {
                    Some(m) => (EntityKind::Part, line_id(m)),
                    None => (EntityKind::Message, self.target.clone()),
                }
            }
        };
        if kind == EntityKind::Message {
            state.last_message = Some(n);
        }
        if info.kind == Kind::Invalid {
            self.warn(format!("line {} is not valid JSON; kept as it is", n + 1));
        }
        let draft = Draft { kind, id: line_id(n), parent_id: parent, data };
        self.push(draft, bytes, &format!("line:{n}"), ts, true);
        if session_changed {
            self.emit_session(ts, &format!("session@line:{n}"), false)?;
        }
        Ok(())
    }

    /// Queues the session entity: from the session_meta line, with the title and model known
    /// so far. `with_chunks` is false when it is re-sent for a new title or model (its chunks,
    /// if any, went with the first).
    fn emit_session(&mut self, ts: i64, position: &str, with_chunks: bool) -> Result<(), AgentError> {
        if self.meta.is_none() {
            self.meta = Some(self.reread_meta()?);
        }
        let (meta, raw) = self.meta.take().expect("read above");
        let state = &self.working.state;
        let mut data = JsonObject::new();
        data.str("agent", "codex")
            .str("agent_session_id", &meta.id)
            .str("title", state.title.as_deref().unwrap_or(""))
            .opt_str("directory", meta.cwd.as_deref())
            .opt_str("model", state.model.as_deref())
            .opt_str("cli_version", meta.cli_version.as_deref())
            .opt_str("originator", meta.originator.as_deref())
            .opt_str("model_provider", meta.model_provider.as_deref())
            .opt_str("started_at", meta.started_at.as_deref())
            .str("file", &self.rel)
            .bool("compressed", self.compressed)
            .int("line", 0)
            .str("type", "session_meta");
        let draft = Draft { kind: EntityKind::Session, id: self.target.clone(), parent_id: String::new(), data };
        self.push(draft, &raw, position, ts, with_chunks);
        self.meta = Some((meta, raw));
        Ok(())
    }

    fn reread_meta(&self) -> Result<(Meta, Vec<u8>), AgentError> {
        let (mut input, _) = open_lines(&self.root, &self.rel, self.compressed)?;
        let mut buf = Vec::new();
        match next_line(&mut input, &mut buf, self.limits.max_line_bytes).map_err(|e| AgentError::io(&self.rel, e))? {
            LineRead::Line { .. } => match classify(&buf, true).kind {
                Kind::SessionMeta(meta) if meta.id == self.working.agent_session_id => Ok((meta, buf)),
                _ => Err(AgentError::Format(format!("{}: its session_meta changed", self.rel))),
            },
            _ => Err(AgentError::Format(format!("{}: its session_meta cannot be read again", self.rel))),
        }
    }

    fn push(&mut self, draft: Draft, original: &[u8], position: &str, ts: i64, with_chunks: bool) {
        let sid = &self.working.agent_session_id;
        for (i, (entity, suffix)) in build(Agent::Codex, draft, "raw", original, &self.limits).into_iter().enumerate() {
            if i > 0 && !with_chunks {
                break;
            }
            let op_id = op_id(Agent::Codex, sid, &self.target, &format!("{position}{suffix}"), &entity, ts);
            self.pending.push_back(Record { op_id, entity });
        }
    }
}

/// A zstd stream that breaks off (truncated, or corrupt past some point) reads as ending
/// there: what came before it is still good.
fn partial_ok(e: std::io::Error, compressed: bool) -> std::io::Result<usize> {
    if compressed {
        Ok(0)
    } else {
        Err(e)
    }
}

impl Iterator for CodexReader {
    type Item = Result<Record, AgentError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(record) = self.pending.pop_front() {
                if self.pending.is_empty() {
                    self.commit();
                }
                return Some(Ok(record));
            }
            if let Some(e) = self.error.take() {
                return Some(Err(e));
            }
            if !self.advance() && self.pending.is_empty() {
                if let Some(e) = self.error.take() {
                    return Some(Err(e));
                }
                return None;
            }
        }
    }
}

impl std::fmt::Debug for CodexReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodexReader").field("path", &self.rel).field("cursor", &self.committed).finish_non_exhaustive()
    }
}

