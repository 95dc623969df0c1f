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
