//! Versioned migrations of the PostgreSQL schema.
//!
//! The applied versions are rows of `capsync_schema_versions`. Each pending version is applied
//! in a transaction of its own that first takes `pg_advisory_xact_lock(MIGRATION_LOCK)`, then
//! re-reads the applied versions, so several servers starting at once against one database
//! are safe: one applies a version, the others wait on the lock and then find it applied. A
//! failure leaves the database at the last version that committed.
//!
//! A database at a version newer than [`LATEST`] is refused ([`PgError::NewerSchema`]): an
//! older node must not write to a schema it does not know.

use crate::PgError;
use tokio_postgres::Client;

/// One schema version: the SQL that takes the database from `version - 1` to `version`.
pub struct Migration {
    pub version: i32,
    pub description: &'static str,
    pub sql: &'static str,
}

/// Every version, in order. Append new versions at the end; never edit a released one.
pub const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, description: "initial schema", sql: V1 },
    Migration { version: 2, description: "history id", sql: V2 },
    Migration { version: 3, description: "spaces", sql: V3 },
    Migration { version: 4, description: "append in one call", sql: include_str!("v4-append.sql") },
];

/// The version this build brings a database to.
pub const LATEST: i32 = 4;

/// Spaces (capabilities for ingestion) and the sessions opened through them, as in the SQLite
/// store's schema version 4.
///
/// A session is opened through a space under a key at most once: `(space_id, key)` is the
/// primary key of `space_sessions`, so the database refuses a second session for a key even
/// when two nodes open it at once. A token or share minted through a space records it
/// (`space_id`) with the space's epoch then (`space_epoch`); it holds only while the space is
/// still at that epoch, which every write checks in its transaction (the space row `FOR SHARE`,
/// as for shares).
const V3: &str = r#"
CREATE TABLE spaces (
    id TEXT COLLATE "C" PRIMARY KEY,           -- UUID text
    label TEXT NOT NULL,
    epoch BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE TABLE space_sessions (
    space_id TEXT COLLATE "C" NOT NULL REFERENCES spaces (id),
    key TEXT COLLATE "C" NOT NULL,             -- chosen by the space's holder
    sid BIGINT NOT NULL UNIQUE REFERENCES sessions (sid),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (space_id, key)
);
ALTER TABLE tokens
    ADD COLUMN space_id TEXT COLLATE "C" REFERENCES spaces (id),
    ADD COLUMN space_epoch BIGINT NOT NULL DEFAULT 0,
    DROP CONSTRAINT tokens_target_kind_check,
    ADD CONSTRAINT tokens_target_kind_check CHECK (target_kind IN ('admin', 'session', 'share', 'space'));
ALTER TABLE shares
    ADD COLUMN space_id TEXT COLLATE "C" REFERENCES spaces (id),
    ADD COLUMN space_epoch BIGINT NOT NULL DEFAULT 0;
"#;

/// Which copy of history this database is (as the SQLite store's `history` table): made with
/// the database; a restore from a backup must give it a new one so clients heal the server.
const V2: &str = "
CREATE TABLE history (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    history TEXT NOT NULL
);
INSERT INTO history (id, history) VALUES (1, md5(random()::text || clock_timestamp()::text));
";

/// The advisory lock key the migrations run under (an arbitrary constant: "capsync" in ASCII,
/// so it is recognisable in `pg_locks`).
pub const MIGRATION_LOCK: i64 = 0x0063_6170_7379_6e63;

const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS capsync_schema_versions (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)";

/// Brings the database to [`LATEST`]; returns the versions this call applied (empty when it
/// was up to date). Idempotent and safe to run concurrently from several connections.
pub async fn run(client: &mut Client) -> Result<Vec<i32>, PgError> {
    run_to(client, LATEST).await
}

/// Brings the database to `target` (≤ [`LATEST`]); for tests of upgrades.
pub async fn run_to(client: &mut Client, target: i32) -> Result<Vec<i32>, PgError> {
    let mut applied = Vec::new();
    loop {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        // Under the lock, so concurrent migrators never race on creating it.
        tx.batch_execute(VERSION_TABLE).await?;
        let current: i32 =
            tx.query_one("SELECT coalesce(max(version), 0) FROM capsync_schema_versions", &[]).await?.get(0);
        if current > LATEST {
            return Err(PgError::NewerSchema { found: current as u32, supported: LATEST as u32 });
        }
        let Some(next) = MIGRATIONS.iter().find(|m| m.version == current + 1).filter(|m| m.version <= target) else {
            tx.commit().await?;
            return Ok(applied);
        };
        tx.batch_execute(next.sql).await?;
        tx.execute(
            "INSERT INTO capsync_schema_versions (version, description) VALUES ($1, $2)",
            &[&next.version, &next.description],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version = next.version, description = next.description, "applied a PostgreSQL schema migration");
        applied.push(next.version);
    }
}

/// The version the database is at (0 for an empty one).
pub async fn current_version(client: &Client) -> Result<i32, PgError> {
    let exists: bool = client.query_one("SELECT to_regclass('capsync_schema_versions') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client.query_one("SELECT coalesce(max(version), 0) FROM capsync_schema_versions", &[]).await?.get(0))
}

/// Version 1: the SQLite server schema (persistence/src/server/schema.rs, version 2) in
/// PostgreSQL terms.
///
/// - u64 values (epochs, cursors, seqs, Unix-ms times) are BIGINT holding the same bits.
/// - Text ids that are ordered or paged on are `COLLATE "C"`: byte order, as SQLite compares,
///   whatever the database's locale, so a snapshot pages the same on every node.
/// - The op log and the permanent dedupe set are one table: `ops` is keyed by (sid, seq) and
///   carries each op's payload hash under a UNIQUE (sid, op_id), so the database itself refuses
///   a second application of an opId.
/// - `client_batches` keeps each batch's opIds and results in the SQLite store's byte
///   encodings (see `append.rs`), so a replay compares and answers exactly as there.
const V1: &str = r#"
CREATE TABLE sessions (
    sid BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT COLLATE "C" NOT NULL UNIQUE,       -- UUID text
    title TEXT NOT NULL,
    epoch BIGINT NOT NULL DEFAULT 0,
    cursor BIGINT NOT NULL DEFAULT 0,          -- seq of the last applied op
    created_at BIGINT NOT NULL
);

CREATE TABLE shares (
    id TEXT COLLATE "C" PRIMARY KEY,           -- UUID text
    sid BIGINT NOT NULL REFERENCES sessions (sid),
    parent_share_id TEXT COLLATE "C" REFERENCES shares (id),
    parent_epoch BIGINT NOT NULL,              -- the parent's epoch when this share was minted
    rights INTEGER NOT NULL,
    label TEXT NOT NULL,
    epoch BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL                 -- Unix ms, 0 = never
);
CREATE INDEX shares_by_session ON shares (sid);
CREATE INDEX shares_by_parent ON shares (parent_share_id);

CREATE TABLE admin (
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL
);

-- Only SHA-256(token) is stored.
CREATE TABLE tokens (
    hash BYTEA PRIMARY KEY CHECK (length(hash) = 32),
    target_kind TEXT NOT NULL CHECK (target_kind IN ('admin', 'session', 'share')),
    target_id TEXT COLLATE "C" NOT NULL,
    minted_epoch BIGINT NOT NULL,
    rights INTEGER NOT NULL,
    parent TEXT NOT NULL,                      -- who minted it: admin, session:<id>, share:<id>
    label TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    last_used_at BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX tokens_by_target ON tokens (target_kind, target_id);

-- Current entities of each session.
CREATE TABLE entities (
    sid BIGINT NOT NULL,
    kind SMALLINT NOT NULL,
    id TEXT COLLATE "C" NOT NULL,
    parent_id TEXT COLLATE "C" NOT NULL,
    data BYTEA NOT NULL,
    seq BIGINT NOT NULL,                       -- seq of the op that wrote it
    PRIMARY KEY (sid, kind, id)
);
CREATE INDEX parts_by_message ON entities (sid, parent_id) WHERE kind = 2;

-- The op log, append-ordered by (sid, seq), and the permanent dedupe set: every applied opId
-- of a session with the hash of its payload (opIds are UUIDv7, so that index grows
-- near-sequentially).
CREATE TABLE ops (
    sid BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    op_id BYTEA NOT NULL,
    payload_hash BYTEA NOT NULL,
    is_delete BOOLEAN NOT NULL,
    kind SMALLINT NOT NULL,
    entity_id TEXT COLLATE "C" NOT NULL,
    parent_id TEXT COLLATE "C" NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (sid, seq),
    UNIQUE (sid, op_id)
);

-- Every batch a client sent, for replays: its opIds in order and the results it got.
CREATE TABLE client_batches (
    sid BIGINT NOT NULL,
    client_id BYTEA NOT NULL,
    batch_seq BIGINT NOT NULL CHECK (batch_seq > 0),
    op_ids BYTEA NOT NULL,
    results BYTEA NOT NULL,
    PRIMARY KEY (sid, client_id, batch_seq)
);

-- Append-only: who minted, redeemed, revoked, was denied or failed to redeem. Never a token.
-- Ids come from a sequence, so they are unique and increasing in insertion order, but rows of
-- concurrent transactions may become visible out of id order.
CREATE TABLE audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at BIGINT NOT NULL,
    action TEXT NOT NULL,
    target_kind TEXT NOT NULL,
    target_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    peer TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE FUNCTION capsync_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit is append-only';
END;
$$;
CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION capsync_audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION capsync_audit_append_only();
"#;
