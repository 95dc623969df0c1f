//! The server database's schema and its upgrades.
//!
//! Version 1 had sessions, shares, tokens and the op log; version 2 added `tokens.last_used_at`
//! and the audit table; version 3 the history id; version 4 spaces.

use crate::migrate::SchemaPlan;

pub const PLAN: SchemaPlan = SchemaPlan {
    name: "server",
    current_version: 4,
    create: &[CORE, TOKENS, AUDIT, HISTORY, SPACES],
    upgrades: &[(1, &[ADD_TOKEN_LAST_USED, AUDIT]), (2, &[HISTORY]), (3, &[SPACES])],
};

/// The first released schema, kept so the migration test can start from it.
pub const CREATE_V1: &[&str] = &[CORE, TOKENS_V1];

const CORE: &str = r#"
CREATE TABLE sessions (
    sid INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,                -- UUID text
    title TEXT NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0,
    cursor INTEGER NOT NULL DEFAULT 0,      -- seq of the last applied op
    created_at INTEGER NOT NULL
);
CREATE TABLE shares (
    id TEXT PRIMARY KEY,                    -- UUID text
    sid INTEGER NOT NULL REFERENCES sessions(sid),
    parent_share_id TEXT REFERENCES shares(id),
    parent_epoch INTEGER NOT NULL,          -- the parent's epoch when this share was minted
    rights INTEGER NOT NULL,
    label TEXT NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL             -- Unix ms, 0 = never
);
CREATE INDEX shares_by_session ON shares(sid);
CREATE TABLE admin (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch INTEGER NOT NULL
);
CREATE TABLE entities (
    sid INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    data BLOB NOT NULL,
    seq INTEGER NOT NULL,                   -- seq of the op that wrote it
    UNIQUE (sid, kind, id)
);
CREATE INDEX parts_by_message ON entities(sid, parent_id) WHERE kind = 2;
-- The op log, append-ordered by (sid, seq).
CREATE TABLE ops (
    sid INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    op_id BLOB NOT NULL,
    is_delete INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    entity_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    data BLOB NOT NULL,
    UNIQUE (sid, seq)
);
-- Permanent dedupe: every applied opId with the hash of its payload. opIds are UUIDv7, so
-- this index grows near-sequentially.
CREATE TABLE op_ids (
    sid INTEGER NOT NULL,
    op_id BLOB NOT NULL,
    payload_hash BLOB NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (sid, op_id)
) WITHOUT ROWID;
-- Every batch a client sent, for replays: its opIds in order and the results it got.
CREATE TABLE client_batches (
    sid INTEGER NOT NULL,
    client_id BLOB NOT NULL,
    batch_seq INTEGER NOT NULL,
    op_ids BLOB NOT NULL,
    results BLOB NOT NULL,
    PRIMARY KEY (sid, client_id, batch_seq)
) WITHOUT ROWID;
"#;

/// Only SHA-256(token) is stored.
const TOKENS: &str = r#"
CREATE TABLE tokens (
    hash BLOB PRIMARY KEY,
    target_kind TEXT NOT NULL,              -- admin, session or share
    target_id TEXT NOT NULL,
    minted_epoch INTEGER NOT NULL,
    rights INTEGER NOT NULL,
    parent TEXT NOT NULL,                   -- who minted it: admin, session:<id>, share:<id>
    label TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    last_used_at INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"#;

const TOKENS_V1: &str = r#"
CREATE TABLE tokens (
    hash BLOB PRIMARY KEY,
    target_kind TEXT NOT NULL,
    target_id TEXT NOT NULL,
    minted_epoch INTEGER NOT NULL,
    rights INTEGER NOT NULL,
    parent TEXT NOT NULL,
    label TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
"#;

const ADD_TOKEN_LAST_USED: &str =
    "ALTER TABLE tokens ADD COLUMN last_used_at INTEGER NOT NULL DEFAULT 0;";

/// Append-only: who minted, redeemed, revoked, was denied or failed to redeem. Never a token.
const AUDIT: &str = r#"
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    action TEXT NOT NULL,
    target_kind TEXT NOT NULL,
    target_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    peer TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
"#;

/// Which copy of history this database is: a random id made with the database and made again
/// by `capsync restore`. Clients see it in every grant; when it changes, the server went back
/// in time, and they re-deliver what it lost.
const HISTORY: &str = r#"
CREATE TABLE history (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    history TEXT NOT NULL
);
INSERT INTO history (id, history) VALUES (1, lower(hex(randomblob(16))));
"#;

/// Spaces (capabilities for ingestion) and the sessions opened through them. The same SQL makes
/// a fresh database and upgrades a version-3 one, so both end with the same columns in the same
/// order.
///
/// A session is opened through a space under a key, at most once: `(space_id, key)` is the
/// primary key of `space_sessions`, so a second session for the same key cannot be stored. A
/// token or share minted through a space records it (`space_id`) with the space's epoch then
/// (`space_epoch`); it holds only while the space is still at that epoch.
const SPACES: &str = r#"
CREATE TABLE spaces (
    id TEXT PRIMARY KEY,                    -- UUID text
    label TEXT NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE space_sessions (
    space_id TEXT NOT NULL REFERENCES spaces(id),
    key TEXT NOT NULL,                      -- chosen by the space's holder, e.g. an agent's session id
    sid INTEGER NOT NULL UNIQUE REFERENCES sessions(sid),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (space_id, key)
) WITHOUT ROWID;
ALTER TABLE tokens ADD COLUMN space_id TEXT;
ALTER TABLE tokens ADD COLUMN space_epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE shares ADD COLUMN space_id TEXT;
ALTER TABLE shares ADD COLUMN space_epoch INTEGER NOT NULL DEFAULT 0;
"#;
