//! The client database's schema: refs, the outbox, replicas and agent imports.

use crate::migrate::SchemaPlan;

pub const PLAN: SchemaPlan = SchemaPlan {
    name: "client",
    current_version: 3,
    create: &[CREATE_V1, HISTORY, AGENT_IMPORTS],
    upgrades: &[(1, &[HISTORY, HISTORY_BACKFILL]), (2, &[AGENT_IMPORTS])],
};

/// The first released schema, kept so the migration test can start from it.
pub const FIRST: &[&str] = &[CREATE_V1];

/// Version 2 as released, for the test that upgrades it.
pub const SECOND: &[&str] = &[CREATE_V1, HISTORY];

const CREATE_V1: &str = r#"
-- A sturdy URI attached under a name. The URI is a secret: the file is created 0600.
CREATE TABLE refs (
    name TEXT PRIMARY KEY,
    uri TEXT NOT NULL,
    client_id BLOB NOT NULL,                -- 16 bytes; batchSeqs count per (client, session)
    next_batch_seq INTEGER NOT NULL DEFAULT 1,
    session_id TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'ok',       -- ok, unreachable, revoked, expired, unknown-token, denied, diverged
    last_error TEXT NOT NULL DEFAULT '',
    ack_cursor INTEGER NOT NULL DEFAULT 0,  -- the server's cursor in the latest ack
    created_at INTEGER NOT NULL
);
-- Every op the application made, in the order it made them.
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op_id BLOB NOT NULL UNIQUE,             -- UUIDv7, minted once
    ref_name TEXT NOT NULL REFERENCES refs(name),
    is_delete INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    entity_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    data BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',  -- pending, sent, acked, rejected, conflict
    batch_seq INTEGER,                      -- NULL until grouped; then fixed forever
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    ack_seq INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE INDEX outbox_by_batch ON outbox(ref_name, batch_seq);
CREATE INDEX outbox_unbatched ON outbox(ref_name, seq) WHERE batch_seq IS NULL;
-- Batches as formed, so a replay resends the very same ones.
CREATE TABLE batches (
    ref_name TEXT NOT NULL,
    batch_seq INTEGER NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (ref_name, batch_seq)
) WITHOUT ROWID;
-- Local copies of sessions, each at a cursor.
CREATE TABLE replica_state (
    ref_name TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    cursor INTEGER NOT NULL
);
CREATE TABLE replica_entities (
    ref_name TEXT NOT NULL,
    kind INTEGER NOT NULL,
    id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    data BLOB NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (ref_name, kind, id)
);
CREATE INDEX replica_parts ON replica_entities(ref_name, parent_id) WHERE kind = 2;
"#;

/// Version 2: which copy of the server's history each ref and replica last saw (see
/// `ClientDb::heal`), how many ops a ref re-delivered after it changed, and when each op was
/// acknowledged (acked ops are kept for a while so a restored server can be healed).
const HISTORY: &str = r#"
ALTER TABLE refs ADD COLUMN history TEXT NOT NULL DEFAULT '';
ALTER TABLE refs ADD COLUMN healed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN acked_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE replica_state ADD COLUMN history TEXT NOT NULL DEFAULT '';
"#;

/// Ops acked before version 2 count as acked at the upgrade: kept for the whole keep time.
const HISTORY_BACKFILL: &str =
    "UPDATE outbox SET acked_at = CAST(strftime('%s', 'now') AS INTEGER) * 1000 WHERE state = 'acked';";

/// Version 3: agent sessions brought in by `capsync import` and `capsync watch`. One row per
/// ref (`codex:<id>`, `opencode:<id>`): the capsync session the space opened for it, which space
/// that was (its token's tag, not the token), and how far the source was read. The cursor is
/// written in the same transaction as the ops read up to it, so a crash never loses or doubles
/// records.
const AGENT_IMPORTS: &str = r#"
CREATE TABLE agent_imports (
    ref_name TEXT PRIMARY KEY REFERENCES refs(name),
    agent TEXT NOT NULL,                    -- codex, opencode
    agent_session_id TEXT NOT NULL,
    session_id TEXT NOT NULL,               -- the capsync session the space opened
    space TEXT NOT NULL,                    -- the space URI's token tag (never the token)
    source TEXT NOT NULL DEFAULT '',        -- the file read, relative to the root it was found under
    size INTEGER NOT NULL DEFAULT 0,        -- the source's size and mtime when a read reached its end
    mtime_ns INTEGER NOT NULL DEFAULT 0,
    cursor TEXT NOT NULL DEFAULT '',        -- Codex: the reader's cursor (JSON); opencode: the fingerprint
    records INTEGER NOT NULL DEFAULT 0,     -- records queued from it
    updated_at INTEGER NOT NULL
);
CREATE INDEX agent_imports_by_source ON agent_imports(agent, source);
"#;
