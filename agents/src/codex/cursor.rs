//! Where a read of a rollout stopped, and what it carries on to the next read.

use crate::AgentError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How many bytes the head and tail checks of a cursor cover.
pub(crate) const WINDOW: usize = 1024;

/// What a reader carries from one line to the next, kept in the cursor so a later read goes on
/// as if it had read the whole file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodexState {
    /// The line of the latest message entity: the parent of the parts after it.
    pub last_message: Option<u64>,
    /// The title and model the session entity carries so far.
    pub title: Option<String>,
    pub model: Option<String>,
    /// The latest line timestamp, for lines that have none.
    pub last_ts_ms: i64,
}

/// Where a read of a rollout stopped: a few integers and strings, serializable (to JSON with
/// [`CodexCursor::to_json`]) for the CLI's client database.
///
/// A reader given a cursor reads only what comes after `offset`. It starts over from the
/// beginning when the file shrank below `offset` or its bytes around the start or just before
/// `offset` changed (the `head` and `tail` checks); that re-reads lines already imported, which
/// is harmless, since their opIds are the same.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodexCursor {
    pub agent_session_id: String,
    /// The file's size and modification time when a read last reached its end (0 when it
    /// did not): unchanged, there is nothing new to read.
    pub size: u64,
    pub mtime_ns: i64,
    /// Bytes (of the decompressed content) consumed: up to the end of the last complete line
    /// whose records were all yielded.
    pub offset: u64,
    /// The number of the next line.
    pub line: u64,
    /// A digest of the content's first `head_len` bytes.
    pub head: String,
    pub head_len: u64,
    /// A digest of the `min(offset, 1024)` bytes before `offset`.
    pub tail: String,
    pub state: CodexState,
}

impl CodexCursor {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a cursor serializes")
    }

    /// Whether a file of this size and modification time holds nothing new for this cursor
    /// (what [`crate::SessionSource::CodexRollout`] carries): the caller may skip opening it.
    pub fn is_current(&self, size: u64, mtime_ns: i64) -> bool {
        self.size > 0 && self.size == size && self.mtime_ns == mtime_ns
    }

    pub fn from_json(text: &str) -> Result<CodexCursor, AgentError> {
        serde_json::from_str(text).map_err(|e| AgentError::Format(format!("not a Codex cursor: {e}")))
    }
}

pub(crate) fn digest(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

