//! The client schema: an outbox from version 1 upgrades to the fresh schema and keeps its ops,
//! refs and replicas; its acked ops count as acked at the upgrade (kept for the keep time).

use capsync_persistence::client::{schema, ClientDb};
use capsync_persistence::migrate::describe;
use rusqlite::Connection;

#[test]
fn upgrading_from_v1_reaches_the_fresh_schema_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let old_path = dir.path().join("old.db");
    {
        let conn = Connection::open(&old_path).unwrap();
        for sql in schema::FIRST {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute("INSERT INTO refs (name, uri, client_id, created_at) VALUES ('r', 'capsync://h:1/x', x'00000000000000000000000000000001', 1)", [])
            .unwrap();
        conn.execute(
            "INSERT INTO outbox (op_id, ref_name, is_delete, kind, entity_id, parent_id, data, state, batch_seq, created_at)
             VALUES (x'01', 'r', 0, 1, 'm1', '', x'7b7d', 'acked', 1, 1)",
            [],
        )
        .unwrap();
    }
    let upgraded = ClientDb::open(&old_path).unwrap();
    drop(ClientDb::open(&dir.path().join("fresh.db")).unwrap());
    let (old, fresh) = (Connection::open(&old_path).unwrap(), Connection::open(dir.path().join("fresh.db")).unwrap());
    assert_eq!(describe(&old).unwrap(), describe(&fresh).unwrap());
    let version: u32 = old.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, schema::PLAN.current_version);
    let row = upgraded.ref_row("r").unwrap().unwrap();
    assert_eq!((row.history.as_str(), row.healed), ("", 0));
    assert_eq!(upgraded.counts("r").unwrap().acked, 1, "the op is kept");
    assert_eq!(upgraded.prune_acked("r", 1_000).unwrap(), 0, "acked at the upgrade, not at its creation");
}

/// Version 3 adds `agent_imports`: an outbox of version 2 upgrades to the fresh schema with its
/// refs and ops kept, and imports can be recorded on it at once.
#[test]
fn upgrading_from_v2_adds_agent_imports() {
    use capsync_persistence::client::{BatchLimits, ImportProgress, ImportRow};
    use capsync_persistence::{Entity, EntityKind, Op, OpBody};
    let dir = tempfile::tempdir().unwrap();
    let old_path = dir.path().join("v2.db");
    {
        let conn = Connection::open(&old_path).unwrap();
        for sql in schema::SECOND {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 2).unwrap();
        conn.execute("INSERT INTO refs (name, uri, client_id, created_at) VALUES ('r', 'capsync://h:1/x', x'00000000000000000000000000000001', 1)", [])
            .unwrap();
        conn.execute(
            "INSERT INTO outbox (op_id, ref_name, is_delete, kind, entity_id, parent_id, data, state, batch_seq, created_at)
             VALUES (x'01', 'r', 0, 1, 'm1', '', x'7b7d', 'pending', NULL, 1)",
            [],
        )
        .unwrap();
    }
    let upgraded = ClientDb::open(&old_path).unwrap();
    drop(ClientDb::open(&dir.path().join("fresh.db")).unwrap());
    let (old, fresh) = (Connection::open(&old_path).unwrap(), Connection::open(dir.path().join("fresh.db")).unwrap());
    assert_eq!(describe(&old).unwrap(), describe(&fresh).unwrap());
    assert_eq!(upgraded.counts("r").unwrap().pending, 1, "the op is kept");

    // An import on the upgraded outbox: attached with its row, ops and cursor in one commit,
    // ops already held left out.
    let row = ImportRow {
        ref_name: "codex:s1".into(),
        agent: "codex".into(),
        agent_session_id: "s1".into(),
        session_id: "sess".into(),
        space: "tag".into(),
        source: "a/rollout.jsonl".into(),
        ..ImportRow::default()
    };
    upgraded.attach_import(&row, "capsync://h:1/y", [2; 16]).unwrap();
    let op = |n: u8| Op {
        op_id: [n; 16],
        body: OpBody::Put(Entity { kind: EntityKind::Message, id: format!("m{n}"), parent_id: String::new(), data: b"{}".to_vec() }),
    };
    let limits = BatchLimits { max_ops: 10, max_bytes: 1 << 20 };
    let progress = ImportProgress { source: "a/rollout.jsonl".into(), size: 10, mtime_ns: 5, cursor: "{}".into() };
    assert_eq!(upgraded.enqueue_new("codex:s1", vec![op(2), op(3), op(2)], limits, Some(&progress)).unwrap(), 2);
    assert_eq!(upgraded.enqueue_new("codex:s1", vec![op(2), op(3), op(4)], limits, Some(&progress)).unwrap(), 1);
    assert_eq!(upgraded.counts("codex:s1").unwrap().pending, 3);
    let stored = upgraded.import_row("codex:s1").unwrap().unwrap();
    assert_eq!((stored.size, stored.mtime_ns, stored.cursor.as_str(), stored.records), (10, 5, "{}", 3));
    assert_eq!(upgraded.import_by_source("codex", "a/rollout.jsonl").unwrap().unwrap().ref_name, "codex:s1");
    // Re-attached through the same session: the position is kept; through another: forgotten.
    upgraded.attach_import(&row, "capsync://h:1/z", [3; 16]).unwrap();
    assert_eq!(upgraded.import_row("codex:s1").unwrap().unwrap().cursor, "{}");
    upgraded.attach_import(&ImportRow { session_id: "other".into(), ..row.clone() }, "capsync://h:1/z", [3; 16]).unwrap();
    assert_eq!(upgraded.import_row("codex:s1").unwrap().unwrap().cursor, "");
    assert!(upgraded.enqueue_new("nope", vec![op(9)], limits, Some(&progress)).is_err(), "an import that was never attached");
}

/// Processes opening a new outbox at the same moment (`capsync watch` creating it while
/// `capsync status` reads it) all succeed: the busy timeout covers the switch to WAL and the
/// schema's creation.
#[test]
fn concurrent_opens_of_a_new_outbox_all_succeed() {
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(6));
        let opens: Vec<_> = (0..6)
            .map(|_| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    ClientDb::open(&path).map(|_| ())
                })
            })
            .collect();
        for open in opens {
            open.join().unwrap().unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
}
