//! The server schema: a fresh database equals one upgraded from version 1, and an upgrade keeps
//! the data it finds.

use capsync_persistence::migrate::describe;
use capsync_persistence::server::{self, schema};
use rusqlite::Connection;

#[test]
fn upgrading_from_v1_reaches_the_fresh_schema_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let old_path = dir.path().join("old.db");
    {
        let conn = Connection::open(&old_path).unwrap();
        for sql in schema::CREATE_V1 {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute("INSERT INTO sessions (id, title, created_at) VALUES ('s1', 'kept', 1)", []).unwrap();
        conn.execute(
            "INSERT INTO tokens (hash, target_kind, target_id, minted_epoch, rights, parent, label,
                                 created_at, expires_at)
             VALUES (x'00', 'session', 's1', 0, 7, 'admin', '', 1, 0)",
            [],
        )
        .unwrap();
    }
    let upgraded = server::open(&old_path).unwrap();
    let fresh = server::open(&dir.path().join("fresh.db")).unwrap();

    let upgraded_schema = describe(&upgraded).unwrap();
    assert!(upgraded_schema.iter().any(|l| l.starts_with("table audit")), "upgrade added the audit table");
    assert_eq!(upgraded_schema, describe(&fresh).unwrap());
    let version: u32 = upgraded.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, schema::PLAN.current_version);
    let title: String = upgraded.query_row("SELECT title FROM sessions WHERE id = 's1'", [], |r| r.get(0)).unwrap();
    assert_eq!(title, "kept");
    let last_used: i64 = upgraded.query_row("SELECT last_used_at FROM tokens", [], |r| r.get(0)).unwrap();
    assert_eq!(last_used, 0);
}

#[test]
fn a_database_from_a_newer_capsync_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.db");
    Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
    let err = server::open(&path).unwrap_err();
    assert!(err.to_string().contains("version 99"), "{err}");
}

#[test]
fn the_audit_table_is_append_only() {
    let dir = tempfile::tempdir().unwrap();
    let conn = server::open(&dir.path().join("a.db")).unwrap();
    conn.execute(
        "INSERT INTO audit (at, action, target_kind, target_id, session_id, peer, detail)
         VALUES (1, 'mint', 'share', 'x', 's', 'p', '')",
        [],
    )
    .unwrap();
    assert!(conn.execute("UPDATE audit SET action = 'y'", []).is_err());
    assert!(conn.execute("DELETE FROM audit", []).is_err());
}
