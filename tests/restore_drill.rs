//! The restore drill (issue 18, part 4): a server restored from an older backup has lost ops
//! it acknowledged; its clients still hold them. A `capsync sync` from the same outbox notices
//! the server's new history and re-delivers them (same opIds: nothing twice), and a follower
//! that followed before the restore re-pulls and ends with the server's entities.

mod common;

use capsync_schema::SturdyUri;
use common::*;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `capsync pull --json` into a fresh outbox: (kind/id -> data) of every entity, with a check
/// that none appears twice.
fn server_entities(dir: &std::path::Path, uri: &str, tag: &str) -> BTreeMap<String, String> {
    let out = capsync(&dir.join(format!("pull-{tag}.db")), &["pull", uri, "--json"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pulled: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut entities = BTreeMap::new();
    for e in pulled["entities"].as_array().unwrap() {
        let key = format!("{}/{}", e["kind"].as_str().unwrap(), e["id"].as_str().unwrap());
        assert!(entities.insert(key.clone(), e["data"].to_string()).is_none(), "{key} twice");
    }
    entities
}

/// The entities in a client's replica, read straight from its outbox file.
fn replica_entities(outbox: &std::path::Path) -> BTreeMap<String, String> {
    let Ok(db) = rusqlite::Connection::open_with_flags(outbox, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else { return BTreeMap::new() };
    let kinds = ["session", "message", "part", "diff", "model"];
    let Ok(mut stmt) = db.prepare("SELECT kind, id, data FROM replica_entities") else { return BTreeMap::new() };
    stmt.query_map([], |r| {
        let kind: i64 = r.get(0)?;
        let data: Vec<u8> = r.get(2)?;
        Ok((format!("{}/{}", kinds[kind as usize], r.get::<_, String>(1)?), String::from_utf8_lossy(&data).into_owned()))
    })
    .map(|rows| rows.filter_map(Result::ok).map(|(k, d)| (k, canonical(&d))).collect())
    .unwrap_or_default()
}

fn canonical(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json).map(|v| v.to_string()).unwrap_or_else(|_| json.to_owned())
}

fn push(outbox: &std::path::Path, uri: &str, file: &std::path::Path) {
    let out = capsync(outbox, &["push", uri, "--file", file.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_restored_server_is_healed_by_its_clients_and_followers_re_pull() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data);
    let addr = server.addr.clone();
    let (_, owner) = new_session(&server);
    let uri = SturdyUri::new(addr.clone(), owner).expose();
    let outbox = dir.path().join("writer.db");
    let (first, second) = (dir.path().join("first.jsonl"), dir.path().join("second.jsonl"));
    write_jsonl(&first, 100, "before-");
    write_jsonl(&second, 100, "after-");

    push(&outbox, &uri, &first);
    let follower_db = dir.path().join("follower.db");
    let mut follower = Command::new(BIN)
        .args(["tail", &uri, "--json", "--outbox", follower_db.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let backup = dir.path().join("backup.db");
    let (ok, _, err) = cli(&["backup", "--data-dir", data.to_str().unwrap(), "--to", backup.to_str().unwrap()]);
    assert!(ok, "{err}");
    push(&outbox, &uri, &second); // acked, and not in the backup
    let before = server_entities(dir.path(), &uri, "before");
    assert_eq!(before.len(), 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    while replica_entities(&follower_db) != before.iter().map(|(k, v)| (k.clone(), canonical(v))).collect::<BTreeMap<_, _>>() {
        assert!(Instant::now() < deadline, "the follower never caught up before the restore");
        std::thread::sleep(Duration::from_millis(100));
    }

    server.stop();
    let restored = dir.path().join("restored");
    let (ok, _, err) = cli(&["restore", "--from", backup.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()]);
    assert!(ok, "{err}");
    let _server = Server::start_at(&restored, &addr);
    assert_eq!(server_entities(dir.path(), &uri, "lost").len(), 100, "the restored server lost the second push");

    let synced = capsync(&outbox, &["sync"], &[]);
    assert!(synced.status.success(), "{}", String::from_utf8_lossy(&synced.stderr));
    let after = server_entities(dir.path(), &uri, "after");
    assert_eq!(after.len(), 200, "every acked op is back, exactly once");
    assert!(after == before, "every entity is back as it was");
    let status = status_json(&outbox);
    let reference = &status["refs"][0];
    assert_eq!(reference["healed"], 200, "status says what was re-delivered: {status}");
    assert_eq!(reference["pending"], 0);
    assert_eq!(reference["acked"], 200, "acked ops are kept");

    // The follower saw the server change history: it pulled again and follows the healed log.
    let want: BTreeMap<_, _> = after.iter().map(|(k, v)| (k.clone(), canonical(v))).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while replica_entities(&follower_db) != want {
        assert!(Instant::now() < deadline, "the follower did not end with the server's entities");
        assert!(follower.try_wait().unwrap().is_none(), "the follower exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    follower.kill().unwrap();
    follower.wait().unwrap();
}

#[test]
fn acked_ops_are_kept_for_the_keep_time_then_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    let (_, owner) = new_session(&server);
    let uri = SturdyUri::new(server.addr.clone(), owner).expose();
    let outbox = dir.path().join("outbox.db");
    let file = dir.path().join("ops.jsonl");
    write_jsonl(&file, 10, "m");
    push(&outbox, &uri, &file);
    assert_eq!(status_json(&outbox)["refs"][0]["acked"], 10, "kept by default");
    let synced = capsync(&outbox, &["sync", "--keep-acked", "0s"], &[]);
    assert!(synced.status.success(), "{}", String::from_utf8_lossy(&synced.stderr));
    assert_eq!(status_json(&outbox)["refs"][0]["acked"], 0, "pruned past the keep time");
}
