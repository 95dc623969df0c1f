//! `capsync backup` of a running server and `capsync restore` into a new data dir (issue 18,
//! part 3): the server keeps serving during the backup; after a restore, tokens redeem, revoked
//! ones stay revoked, every op of the backup answers `duplicate`, and cursors continue.

mod common;

use capsync_client::Connection;
use capsync_schema::capsync_capnp::op_result::Status;
use capsync_schema::capsync_capnp::EntityKind::Message;
use capsync_schema::marker::Marker;
use common::*;
use std::os::unix::fs::PermissionsExt as _;

#[test]
fn a_backup_taken_while_serving_restores_tokens_revocations_dedupe_and_cursors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data);
    let (_, owner) = new_session(&server);
    let client = new_client_id();
    let ops: Vec<TestOp> = (0..50).map(|i| put(Message, &format!("m{i}"), "", "{}")).collect();
    let (revoked_share, kept_share, cursor) = run_local(async {
        let conn = Connection::open(&server.addr).await.unwrap();
        let (session, _) = conn.session(&owner);
        let ack = append(&session, &client, 1, &ops).await.unwrap();
        assert!(ack.results.iter().all(|r| r.status == Status::Applied));
        let (revoked, revoked_id) = mint(&session, "read", "to-revoke", 0).await.unwrap();
        let (kept, _) = mint(&session, "read", "kept", 0).await.unwrap();
        let admin = admin_cap(&conn, &server.admin_uri().token);
        let mut request = admin.revoke_share_request();
        request.get().set_share_id(revoked_id.as_str());
        request.send().promise.await.unwrap();
        (revoked, kept, ack.cursor)
    });

    let file = dir.path().join("backup.db");
    let (ok, out, err) = cli(&["backup", "--data-dir", data.to_str().unwrap(), "--to", file.to_str().unwrap()]);
    assert!(ok, "backup failed: {err}");
    assert!(out.contains("1 sessions, 50 ops"), "{out}");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(server_cursor(&server.addr, &owner), Some(cursor), "the server kept serving");

    // Refused: a data dir in use, and one that is not empty.
    let (ok, _, err) = cli(&["restore", "--from", file.to_str().unwrap(), "--data-dir", data.to_str().unwrap()]);
    assert!(!ok && err.contains("in use"), "{err}");
    let cluttered = dir.path().join("cluttered");
    std::fs::create_dir(&cluttered).unwrap();
    std::fs::write(cluttered.join("notes.txt"), "mine").unwrap();
    let (ok, _, err) = cli(&["restore", "--from", file.to_str().unwrap(), "--data-dir", cluttered.to_str().unwrap()]);
    assert!(!ok && err.contains("not empty"), "{err}");
    assert_eq!(std::fs::read_dir(&cluttered).unwrap().count(), 1, "a refused restore writes nothing");
    let (ok, _, err) = cli(&["restore", "--from", data.join("admin.uri").to_str().unwrap(), "--data-dir", dir.path().join("x").to_str().unwrap()]);
    assert!(!ok && err.contains("not a capsync server backup"), "{err}");

    let restored = dir.path().join("restored");
    let (ok, _, err) = cli(&["restore", "--from", file.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()]);
    assert!(ok, "restore failed: {err}");
    assert_eq!(std::fs::metadata(restored.join("capsync.db")).unwrap().permissions().mode() & 0o777, 0o600);
    drop(server);
    let server = Server::start(&restored);
    run_local(async {
        let conn = Connection::open(&server.addr).await.unwrap();
        let (session, _) = conn.session(&owner);
        assert_eq!(cursor_of(&session).await, cursor, "the cursor is the backup's");
        // Every op of the backup is known: sent again by another client, each is a duplicate
        // with its original seq.
        let again = append(&session, &new_client_id(), 1, &ops).await.unwrap();
        assert!(again.results.iter().all(|r| r.status == Status::Duplicate), "{:?}", again.results);
        assert_eq!(again.results.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=50).collect::<Vec<_>>());
        // The first client's next batch continues its batchSeq, and the log continues.
        let next = append(&session, &client, 2, &[put(Message, "after", "", "{}")]).await.unwrap();
        assert_eq!(next.cursor, cursor + 1);
        let (kept, _) = conn.session(&kept_share);
        assert_eq!(cursor_of(&kept).await, cursor + 1, "a share's token redeems");
        let (revoked, _) = conn.session(&revoked_share);
        assert_marker(common::cursor(&revoked).await, Marker::Revoked);
    });
    let (ok, _, err) = cli(&["admin", "--admin-file", restored.join("admin.uri").to_str().unwrap(), "list-sessions"]);
    assert!(ok, "the restored server's new admin.uri works: {err}");
}

async fn cursor_of(session: &capsync_schema::capsync_capnp::session::Client) -> u64 {
    common::cursor(session).await.unwrap()
}
