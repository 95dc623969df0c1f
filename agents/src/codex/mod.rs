//! OpenAI Codex CLI rollouts.
//!
//! Codex writes one file per session, `rollout-<time>-<session id>.jsonl` under
//! `$CODEX_HOME/sessions/YYYY/MM/DD/`, one JSON object a line (`timestamp`, `type`,
//! `payload`), appended as the session goes and flushed line by line; some are kept
//! zstd-compressed as `.jsonl.zst`. Its first line is the `session_meta` (the session id, the
//! working directory, the CLI version).
//!
//! - [`discover`] walks a root for rollouts and yields one [`AgentSession`] per file.
//! - [`CodexReader`] turns one rollout into [`Record`](crate::Record)s, from the start or from a
//!   [`CodexCursor`], yielding only what was appended since.
//! - [`export_codex`] writes a session's entities back as the rollout, byte for byte.
//!
//! Every line becomes exactly one entity (or one entity and its chunks), so the export can give
//! back every line, in order. The mapping is in docs/AGENTS.md; in short:
//!
//! | line | kind | id | parent |
//! | --- | --- | --- | --- |
//! | first `session_meta` | session | the capsync session id | `""` |
//! | `response_item` `message`, `compacted` | message | `line-NNNNNNNN` | session |
//! | `turn_context` | model | `line-NNNNNNNN` | session |
//! | `event_msg` `patch_apply_end` | diff | `line-NNNNNNNN` | session |
//! | any other line | part | `line-NNNNNNNN` | the latest message line before it |
//!
//! (A line before any message that would be a part becomes a message instead.)

mod classify;
mod cursor;
mod export;
mod reader;

pub use classify::{classify, title_of, Kind, Line, Meta, MAX_TITLE};
pub use export::export_codex;
pub use cursor::{CodexCursor, CodexState};
pub use reader::CodexReader;

use crate::lines::{next_line, LineRead};
use crate::safety::{DirItem, SafeRoot, Warning};
use crate::{Agent, AgentError, AgentSession, Limits, SessionSource};
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// The entity id of line `n` of a rollout.
pub fn line_id(n: u64) -> String {
    format!("line-{n:08}")
}

/// Whether a file name is a rollout's (`rollout-*.jsonl` or `rollout-*.jsonl.zst`); `Some(true)`
/// when compressed.
pub fn rollout_name(name: &str) -> Option<bool> {
    if !name.starts_with("rollout-") {
        return None;
    }
    if name.ends_with(".jsonl") {
        Some(false)
    } else if name.ends_with(".jsonl.zst") {
        Some(true)
    } else {
        None
    }
}

/// Whether an agent session id is usable as a key: 1 to 128 of `[A-Za-z0-9._:-]`.
pub fn valid_session_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// Opens a rollout for reading lines, decompressing a `.zst` one.
pub(crate) fn open_lines(root: &SafeRoot, rel: &str, compressed: bool) -> Result<(Box<dyn BufRead>, std::fs::Metadata), AgentError> {
    let (file, meta) = root.open(rel)?;
    let input: Box<dyn BufRead> = if compressed {
        let decoder = zstd::stream::read::Decoder::new(file).map_err(|e| AgentError::io(rel, e))?;
        Box::new(BufReader::with_capacity(64 * 1024, decoder))
    } else {
        Box::new(BufReader::with_capacity(64 * 1024, file))
    };
    Ok((input, meta))
}

/// Reads and drops `n` bytes of `input`.
pub(crate) fn skip(input: &mut dyn BufRead, n: u64) -> std::io::Result<u64> {
    std::io::copy(&mut input.take(n), &mut std::io::sink())
}

/// Walks `root` for rollouts, lazily, in name order; see [`Discovery`].
pub fn discover(root: &Path, limits: Limits) -> Result<Discovery, AgentError> {
    let root = SafeRoot::new(root)?;
    let mut warnings = Vec::new();
    let items = root.list("", &mut warnings)?;
    Ok(Discovery { root, stack: vec![items.into_iter()], warnings, seen: HashSet::new(), limits, known: None })
}

/// Says which rollouts a caller already holds: `(path relative to the root, size, mtime_ns)`
/// to the agent session id read from it before; see [`Discovery::with_known`].
pub type Known = Box<dyn FnMut(&str, u64, i64) -> Option<String>>;

/// Rollouts under a root, one [`AgentSession`] each; a file that cannot be used is a
/// [`Warning`] instead (too large, unreadable, not a rollout, a second file for the same
/// session, a symlink out of the root). Memory stays bounded by one directory listing per
/// level: sessions are not collected.
pub struct Discovery {
    root: SafeRoot,
    stack: Vec<std::vec::IntoIter<DirItem>>,
    warnings: Vec<Warning>,
    seen: HashSet<String>,
    limits: Limits,
    known: Option<Known>,
}

/// How deep under the root rollouts are looked for (`YYYY/MM/DD` is 3).
const MAX_DEPTH: usize = 8;

impl Discovery {
    /// Passes over the files `known` recognizes without opening them: for a rollout of that
    /// path, size and modification time `known` returns the agent session id read from it
    /// before, and the session is yielded with that id and an empty title, unread. A re-scan
    /// of a large unchanged tree (`capsync import` again, `capsync watch`) then costs one
    /// directory listing per level instead of a read of every rollout's head.
    pub fn with_known(mut self, known: impl FnMut(&str, u64, i64) -> Option<String> + 'static) -> Discovery {
        self.known = Some(Box::new(known));
        self
    }

    /// The root, to open the sessions' files with ([`CodexReader::open`]).
    pub fn root(&self) -> &SafeRoot {
        &self.root
    }

    fn examine(&mut self, item: DirItem) -> Option<Result<AgentSession, Warning>> {
        let compressed = rollout_name(&item.name.to_string_lossy())?;
        if item.size > self.limits.max_file_bytes {
            return Some(Err(Warning::new(
                item.rel,
                format!("{} bytes, over the cap of {} bytes; not read", item.size, self.limits.max_file_bytes),
            )));
        }
        if let Some(id) = self.known.as_mut().and_then(|known| known(&item.rel, item.size, item.mtime_ns)) {
            if valid_session_id(&id) && self.seen.insert(id.clone()) {
                return Some(Ok(AgentSession {
                    agent: Agent::Codex,
                    session_id: id,
                    title: String::new(),
                    source: SessionSource::CodexRollout { path: item.rel, size: item.size, mtime_ns: item.mtime_ns, compressed },
                }));
            }
        }
        Some(match head(&self.root, &item.rel, compressed, &self.limits) {
            Err(reason) => Err(Warning::new(item.rel, reason)),
            Ok((meta, title)) => {
                if !self.seen.insert(meta.id.clone()) {
                    Err(Warning::new(item.rel, "another rollout of the same session was found first; skipped"))
                } else {
                    Ok(AgentSession {
                        agent: Agent::Codex,
                        session_id: meta.id,
                        title: title.unwrap_or_default(),
                        source: SessionSource::CodexRollout { path: item.rel, size: item.size, mtime_ns: item.mtime_ns, compressed },
                    })
                }
            }
        })
    }
}

impl Iterator for Discovery {
    type Item = Result<AgentSession, Warning>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(warning) = self.warnings.pop() {
                return Some(Err(warning));
            }
            let item = self.stack.last_mut()?.next();
            let Some(item) = item else {
                self.stack.pop();
                continue;
            };
            if item.is_dir {
                if self.stack.len() < MAX_DEPTH {
                    match self.root.list(&item.rel, &mut self.warnings) {
                        Ok(items) => self.stack.push(items.into_iter()),
                        Err(e) => self.warnings.push(Warning::new(item.rel, format!("cannot be listed: {}", reason_of(&e)))),
                    }
                }
                continue;
            }
            if let Some(found) = self.examine(item) {
                return Some(found);
            }
        }
    }
}

/// An error's reason without the path it names (the warning names it).
pub(crate) fn reason_of(e: &AgentError) -> String {
    match e {
        AgentError::Io { source, .. } => source.to_string(),
        AgentError::Escape(_) => "the path leads outside the root; refused".into(),
        other => other.to_string(),
    }
}

/// How far into a rollout discovery looks for a title.
const TITLE_LINES: usize = 400;
const TITLE_BYTES: u64 = 8 * 1024 * 1024;

/// The session_meta of a rollout's first line, and a title from its first user prompt.
fn head(root: &SafeRoot, rel: &str, compressed: bool, limits: &Limits) -> Result<(Meta, Option<String>), String> {
    let (mut input, _) = open_lines(root, rel, compressed).map_err(|e| reason_of(&e))?;
    let mut buf = Vec::new();
    let read_err = |e: std::io::Error| format!("cannot be read: {}", reason_of(&AgentError::io(rel, e)));
    let meta = match next_line(&mut input, &mut buf, limits.max_line_bytes).map_err(read_err)? {
        LineRead::Line { .. } => match classify(&buf, true).kind {
            Kind::SessionMeta(meta) if valid_session_id(&meta.id) => meta,
            Kind::SessionMeta(_) => return Err("the session id in its session_meta is not usable".into()),
            _ => return Err("not a Codex rollout: its first line is not a session_meta".into()),
        },
        LineRead::TooLong { .. } => return Err("its first line is over the line cap; not read".into()),
        LineRead::Partial | LineRead::Eof => return Err("no complete line yet".into()),
    };
    let mut read = 0u64;
    for _ in 0..TITLE_LINES {
        match next_line(&mut input, &mut buf, limits.max_line_bytes) {
            Ok(LineRead::Line { consumed }) => {
                read += consumed;
                if let Some(title) = classify(&buf, false).title {
                    return Ok((meta, Some(title)));
                }
            }
            Ok(LineRead::TooLong { consumed }) => read += consumed,
            _ => break,
        }
        if read > TITLE_BYTES {
            break;
        }
    }
    Ok((meta, None))
}
