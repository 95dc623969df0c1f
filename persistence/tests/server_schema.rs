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

/// A version-3 database (the last one before spaces), made the way a released capsync made it:
/// version 1 upgraded step by step.
fn v3_database(path: &std::path::Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    for sql in schema::CREATE_V1 {
        conn.execute_batch(sql).unwrap();
    }
    for (from, steps) in schema::PLAN.upgrades.iter().filter(|(from, _)| *from < 3) {
        assert!(*from < 3);
        for sql in *steps {
            conn.execute_batch(sql).unwrap();
        }
    }
    conn.pragma_update(None, "user_version", 3).unwrap();
    conn
}

#[test]
fn upgrading_from_v3_adds_spaces_and_keeps_tokens_and_shares() {
    let dir = tempfile::tempdir().unwrap();
    let old_path = dir.path().join("v3.db");
    {
        let conn = v3_database(&old_path);
        conn.execute("INSERT INTO sessions (id, title, created_at) VALUES ('s1', 'kept', 1)", []).unwrap();
        conn.execute(
            "INSERT INTO tokens (hash, target_kind, target_id, minted_epoch, rights, parent, label,
                                 created_at, expires_at)
             VALUES (x'01', 'session', 's1', 0, 7, 'admin', '', 1, 0)",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO shares (id, sid, parent_epoch, rights, label, created_at, expires_at)
             VALUES ('sh1', 1, 0, 1, 'kept share', 2, 0)",
            [],
        )
        .unwrap();
    }
    let upgraded = server::open(&old_path).unwrap();
    let fresh = server::open(&dir.path().join("fresh.db")).unwrap();
    let upgraded_schema = describe(&upgraded).unwrap();
    assert!(upgraded_schema.iter().any(|l| l.starts_with("table spaces")), "upgrade added the spaces table");
    assert!(upgraded_schema.iter().any(|l| l.starts_with("table space_sessions")));
    assert_eq!(upgraded_schema, describe(&fresh).unwrap());
    let version: u32 = upgraded.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, schema::PLAN.current_version);

    // What was there descends from no space.
    let reader = server::ServerReader::open(&old_path).unwrap();
    let (space_id, space_epoch): (Option<String>, i64) =
        upgraded.query_row("SELECT space_id, space_epoch FROM tokens", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert_eq!((space_id, space_epoch), (None, 0));
    let share = reader.share("sh1").unwrap().unwrap();
    assert_eq!((share.label.as_str(), share.space), ("kept share", None));
}

#[test]
fn a_space_key_holds_one_session_whatever_the_writer_does() {
    let dir = tempfile::tempdir().unwrap();
    let conn = server::open(&dir.path().join("a.db")).unwrap();
    conn.execute("INSERT INTO spaces (id, label, created_at) VALUES ('sp', '', 1)", []).unwrap();
    conn.execute("INSERT INTO sessions (id, title, created_at) VALUES ('s1', '', 1), ('s2', '', 1)", []).unwrap();
    conn.execute("INSERT INTO space_sessions (space_id, key, sid, created_at) VALUES ('sp', 'k', 1, 1)", []).unwrap();
    let second = conn.execute("INSERT INTO space_sessions (space_id, key, sid, created_at) VALUES ('sp', 'k', 2, 1)", []);
    assert!(second.is_err(), "the database refuses a second session for one key");
    let again = conn.execute("INSERT INTO space_sessions (space_id, key, sid, created_at) VALUES ('sp', 'other', 1, 1)", []);
    assert!(again.is_err(), "a session belongs to one key of one space");
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
