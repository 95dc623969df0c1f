//! capsync-agents: the on-disk session stores of two AI coding agents, OpenAI's Codex CLI and
//! sst/opencode, as capsync entities, and back.
//!
//! A pure library: no network, no Cap'n Proto, no async. The CLI (`capsync import`, `watch`,
//! `export`) drives it:
//!
//! 1. **Discover** the agent sessions under a root ([`codex::discover`],
//!    [`opencode::OpencodeStore::sessions`]). Each [`AgentSession`] names the agent's own session id (the key
//!    for `Space.openSession`, and the ref name `codex:<id>` / `opencode:<id>`), a title and its
//!    sources. Files that cannot be used come out as [`Warning`]s naming them relative to the
//!    root.
//! 2. **Read** one session's records into the capsync session the space opened for it
//!    ([`codex::CodexReader`], [`opencode::OpencodeStore::reader`]): an iterator of [`Record`]s, each
//!    an entity to put with a deterministic opId ([`opid`]). A Codex reader resumes from a
//!    [`codex::CodexCursor`] (a few integers, serializable) and yields only what was appended;
//!    an opencode session carries a fingerprint that tells whether it changed at all.
//! 3. **Export** a session's entities back to the agent's format ([`codex::export_codex`],
//!    [`opencode::export_opencode`]): an imported Codex rollout comes back byte for byte, line
//!    for line; an imported opencode JSON tree file by file (bytes for files read from the
//!    tree, JSON values for rows read from the database).
//!
//! docs/AGENTS.md has the mapping table by table, the opId derivation, the round-trip
//! guarantee and the safety rules.
//!
//! # Safety
//!
//! These readers walk a user's home directory. Every path is resolved under the chosen root
//! and a symlink that leads outside it is skipped ([`safety`]); files and lines over the
//! [`Limits`] are skipped without being read whole; an unreadable or unparseable file is one
//! warning naming it relative to the root, and the rest go on. Warnings carry no absolute path
//! and no file content, and so do the `tracing` events at the default level.
//!
//! # Layout
//!
//! - [`error`]: the error type, [`AgentError`].
//! - [`opid`]: deterministic, UUIDv7-shaped opIds; RFC 3339 timestamps.
//! - [`safety`]: [`safety::SafeRoot`], the walk under a root, relative names, warnings.
//! - `lenient`: JSON fields that read as absent when of an unexpected type (crate-private).
//! - `lines`: a line reader with a cap on line length (crate-private).
//! - [`payload`]: how a record's original bytes ride in an entity's data, inline or in chunks.
//! - [`codex`]: rollouts — discovery, the line mapping, the incremental reader, export.
//! - [`opencode`]: the JSON tree and `opencode.db` — discovery, readers, export.
//! - [`fixtures`]: deterministic generators of Codex and opencode trees (tests, benchmarks).

pub mod codex;
pub mod error;
pub mod fixtures;
mod lenient;
mod lines;
pub mod opencode;
pub mod opid;
pub mod payload;
pub mod safety;

pub use capsync_model::{Entity, EntityKind, Id16};
pub use error::AgentError;
pub use safety::Warning;

use std::path::PathBuf;

/// The agents whose session stores this crate reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Agent {
    Codex,
    Opencode,
}

impl Agent {
    /// `codex` or `opencode`: the prefix of ref names and the `agent` field of entity data.
    pub fn name(self) -> &'static str {
        match self {
            Agent::Codex => "codex",
            Agent::Opencode => "opencode",
        }
    }

    pub fn from_name(name: &str) -> Option<Agent> {
        match name {
            "codex" => Some(Agent::Codex),
            "opencode" => Some(Agent::Opencode),
            _ => None,
        }
    }

    /// The default root: Codex's `$CODEX_HOME/sessions` (else `~/.codex/sessions`);
    /// opencode's data directory `$XDG_DATA_HOME/opencode` (else `~/.local/share/opencode`),
    /// which holds `opencode.db` and the older `storage/` tree.
    pub fn default_root(self) -> Option<PathBuf> {
        let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        match self {
            Agent::Codex => env("CODEX_HOME")
                .or_else(|| env("HOME").map(|h| h.join(".codex")))
                .map(|home| home.join("sessions")),
            Agent::Opencode => env("XDG_DATA_HOME")
                .or_else(|| env("HOME").map(|h| h.join(".local").join("share")))
                .map(|data| data.join("opencode")),
        }
    }

    /// The client database's ref name for one of this agent's sessions: `codex:<id>`.
    pub fn ref_name(self, agent_session_id: &str) -> String {
        format!("{}:{agent_session_id}", self.name())
    }
}

/// Caps that keep a scan of someone's home directory bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A file larger than this is skipped without being read (for a `.zst` rollout, this caps
    /// both the compressed file and what it decompresses to).
    pub max_file_bytes: u64,
    /// A line (or an opencode record) longer than this is skipped without being buffered.
    pub max_line_bytes: usize,
    /// A record's original bytes up to this size ride inline in its entity's data; longer
    /// ones are split into chunk entities (the server caps one entity's data, 1 MiB by
    /// default).
    pub max_inline_bytes: usize,
    /// The size of one chunk (before JSON string escaping, which can grow it up to 6x).
    pub chunk_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_file_bytes: 256 * 1024 * 1024,
            max_line_bytes: 16 * 1024 * 1024,
            max_inline_bytes: 512 * 1024,
            chunk_bytes: 128 * 1024,
        }
    }
}

/// One agent session found under a root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSession {
    pub agent: Agent,
    /// The agent's own session id: the key of the capsync session it becomes.
    pub session_id: String,
    /// Best effort: the first user prompt (Codex) or the session's title (opencode).
    pub title: String,
    /// Where its records come from.
    pub source: SessionSource,
}

impl AgentSession {
    /// `codex:<id>` or `opencode:<id>`.
    pub fn ref_name(&self) -> String {
        self.agent.ref_name(&self.session_id)
    }
}

/// The source of one agent session's records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionSource {
    /// A rollout file, relative to the root (`/`-separated), its size and modification time
    /// in nanoseconds since the epoch.
    CodexRollout { path: String, size: u64, mtime_ns: i64, compressed: bool },
    /// opencode's JSON tree: the session file relative to the root.
    OpencodeTree { path: String, fingerprint: String },
    /// opencode's database, relative to the root.
    OpencodeDb { path: String, fingerprint: String },
}

impl SessionSource {
    /// The source's path relative to the root.
    pub fn path(&self) -> &str {
        match self {
            SessionSource::CodexRollout { path, .. }
            | SessionSource::OpencodeTree { path, .. }
            | SessionSource::OpencodeDb { path, .. } => path,
        }
    }

    /// For opencode: a short digest of everything the session's records depend on; equal
    /// between two scans means nothing changed and the session need not be read again.
    /// For Codex the [`codex::CodexCursor`] plays this part.
    pub fn fingerprint(&self) -> Option<&str> {
        match self {
            SessionSource::CodexRollout { .. } => None,
            SessionSource::OpencodeTree { fingerprint, .. } | SessionSource::OpencodeDb { fingerprint, .. } => {
                Some(fingerprint)
            }
        }
    }
}

/// One entity to put, with its deterministic opId.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub op_id: Id16,
    pub entity: Entity,
}

impl Record {
    /// The op to enqueue.
    pub fn into_op(self) -> capsync_model::Op {
        capsync_model::Op { op_id: self.op_id, body: capsync_model::OpBody::Put(self.entity) }
    }
}

/// What an export wrote and what it could not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportReport {
    /// Records (rollout lines, or opencode files) written.
    pub written: u64,
    /// Rollout line numbers missing from the entities (gaps), or record ids whose chunks are
    /// incomplete: the export is short of those.
    pub missing: Vec<String>,
    /// Entities that carry nothing of this agent's format (not imported from it), skipped.
    pub skipped: u64,
    /// Codex: the rollout's original path relative to its root, from the session entity.
    pub file: Option<String>,
}
