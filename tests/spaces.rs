//! Spaces (issue 17 point 1), end to end on a real server over TCP, on SQLite and on PostgreSQL
//! (a fresh database in the throwaway cluster of `capsync_store_postgres::testing`): the admin
//! creates a space with the CLI; its URI opens sessions by key (the same key twice is the same
//! session, concurrent opens included); the owner URI it returns pushes; `admin list-spaces`
//! shows it; `admin revoke-space` cuts the space URI, the owner URIs opened through it, the
//! shares minted below those, and their live capabilities, while a share the admin minted of
//! the same session keeps working. No token appears in any log line or error.

mod common;

use capsync_client::space::{open_session, Space};
use capsync_client::Connection;
use capsync_schema::{Marker, SturdyUri, Token};
use common::*;
use std::path::Path;

#[test]
fn spaces_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    spaces_end_to_end(&server, dir.path());
}

#[test]
fn spaces_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let url = capsync_store_postgres::testing::fresh_database();
    let server = Server::start_with_args(&dir.path().join("data"), &["--store", &url]);
    spaces_end_to_end(&server, dir.path());
}

/// Runs `capsync` with `RUST_LOG=trace` and an outbox in `dir`; returns (stdout, stderr) and
/// fails the test on a non-zero exit.
fn ok(dir: &Path, args: &[&str]) -> (String, String) {
    let out = capsync(&dir.join("outbox.db"), args, &[("RUST_LOG", "trace")]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "capsync {}: {stderr}", args.join(" "));
    (stdout, stderr)
}

/// Like [`ok`], for a command that must fail; returns its stderr.
fn refused(dir: &Path, outbox: &str, args: &[&str]) -> String {
    let out = capsync(&dir.join(outbox), args, &[("RUST_LOG", "trace")]);
    assert!(!out.status.success(), "capsync {} succeeded", args[0]);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn spaces_end_to_end(server: &Server, dir: &Path) {
    let admin_file = server.data_dir.join("admin.uri");
    let admin = ["admin", "--admin-file", admin_file.to_str().unwrap()];
    let admin_cmd = |rest: &[&str]| -> Vec<String> { admin.iter().chain(rest).map(|s| s.to_string()).collect() };
    // Everything the CLI wrote to stderr (its trace-level logs and errors).
    let logs = std::cell::RefCell::new(String::new());
    let run = |args: Vec<String>| -> String {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (stdout, stderr) = ok(dir, &args);
        logs.borrow_mut().push_str(&stderr);
        stdout
    };

    // The admin creates a space; its URI is the only line on stdout.
    let space_uri = SturdyUri::parse(run(admin_cmd(&["create-space", "--label", "laptop"])).trim()).unwrap();
    let spaces: serde_json::Value = serde_json::from_str(&run(admin_cmd(&["list-spaces", "--json"]))).unwrap();
    let space_id = spaces[0]["space_id"].as_str().unwrap().to_owned();
    assert_eq!((spaces[0]["label"].as_str(), spaces[0]["sessions"].as_u64()), (Some("laptop"), Some(0)));

    // The same key twice: the same session, two different owner tokens; another key, another
    // session; concurrent opens of one new key on one connection: one session.
    let (first, again, other, concurrent, listed) = run_local(async {
        let first = open_session(&space_uri, "codex:abc", "first title", None).await.unwrap();
        let again = open_session(&space_uri, "codex:abc", "another title", None).await.unwrap();
        let space = Space::connect(&space_uri, None).await.unwrap();
        let other = space.open_session("codex:def", "second").await.unwrap();
        let opens = (0..4).map(|_| space.open_session("codex:concurrent", "raced"));
        let concurrent: Vec<_> = futures::future::join_all(opens).await.into_iter().map(Result::unwrap).collect();
        let listed = space.list_sessions().await.unwrap();
        space.close().await;
        (first, again, other, concurrent, listed)
    });
    assert!(first.created && !again.created);
    assert_eq!(first.session_id, again.session_id, "the same key is the same session");
    assert_ne!(first.owner.token, again.owner.token, "each open mints a fresh owner token");
    assert_eq!(first.owner.address, server.addr);
    assert_ne!(other.session_id, first.session_id);
    assert!(concurrent.iter().all(|o| o.session_id == concurrent[0].session_id));
    assert_eq!(concurrent.iter().filter(|o| o.created).count(), 1, "{concurrent:?}");
    let keys: Vec<(&str, &str)> = listed.iter().map(|s| (s.key.as_str(), s.title.as_str())).collect();
    assert_eq!(keys, [("codex:abc", "first title"), ("codex:def", "second"), ("codex:concurrent", "raced")]);

    let spaces: serde_json::Value = serde_json::from_str(&run(admin_cmd(&["list-spaces", "--json"]))).unwrap();
    assert_eq!((spaces[0]["sessions"].as_u64(), spaces[0]["revoked"].as_bool(), spaces[0]["epoch"].as_u64()), (Some(3), Some(false), Some(0)));
    let text = run(admin_cmd(&["list-spaces"]));
    assert!(text.starts_with("SPACE") && text.contains(&space_id) && text.contains("active") && text.contains("laptop"), "{text}");

    // Push through the owner URI openSession returned; read it back through the other one.
    let owner = first.owner.expose();
    let ops = dir.join("ops.jsonl");
    write_jsonl(&ops, 50, "m");
    assert!(run(vec!["push".into(), owner.clone(), "--file".into(), ops.to_str().unwrap().into()]).contains("pushed 50 ops"));
    let pulled = capsync(&dir.join("reader.db"), &["pull", &again.owner.expose(), "--json"], &[]);
    assert!(pulled.status.success(), "{}", String::from_utf8_lossy(&pulled.stderr));
    let pulled: serde_json::Value = serde_json::from_slice(&pulled.stdout).unwrap();
    assert_eq!(pulled["cursor"], 50);

    // A share minted from the space's owner URI descends from the space; one the admin mints
    // of the same session does not.
    let below = run(vec!["share".into(), owner.clone(), "--rights".into(), "read".into(), "--label".into(), "from-owner".into()]);
    let below = SturdyUri::parse(below.trim()).unwrap();
    let by_admin = run(admin_cmd(&["mint-share", &first.session_id, "--rights", "read,append", "--label", "operator"]));
    let by_admin = SturdyUri::parse(by_admin.trim()).unwrap();

    // Live capabilities held across the revocation: the owner's session, the share below it,
    // the space, and the admin-minted share.
    let admin_uri = server.admin_uri();
    run_local(async {
        let conn = Connection::open(&server.addr).await.unwrap();
        let (owner_cap, _) = conn.session(&first.owner.token);
        let (below_cap, _) = conn.session(&below.token);
        let (admin_share_cap, _) = conn.session(&by_admin.token);
        let (space_cap, grant) = conn.space(&space_uri.token);
        let grant = grant.await.unwrap();
        assert_eq!((grant.kind.as_str(), grant.id.as_str(), grant.session_id.as_str()), ("space", space_id.as_str(), ""));
        assert_eq!(cursor(&owner_cap).await.unwrap(), 50);
        assert_eq!(cursor(&below_cap).await.unwrap(), 50);
        assert_eq!(cursor(&admin_share_cap).await.unwrap(), 50);
        assert!(space_cap.list_sessions_request().send().promise.await.is_ok());

        let (stdout, stderr) = ok(dir, &[admin[0], admin[1], admin[2], "revoke-space", &space_id]);
        assert!(stdout.contains(&format!("revoked space {space_id} (epoch 1)")), "{stdout}");
        assert_no_tokens(&stderr, &[space_uri.token.clone(), admin_uri.token.clone()], "revoke-space's log");

        // Every capability descending from the space breaks on its next call.
        assert_marker(cursor(&owner_cap).await, Marker::Revoked);
        assert_marker(cursor(&below_cap).await, Marker::Revoked);
        assert_marker(append(&owner_cap, &new_client_id(), 1, &[put(capsync_schema::capsync_capnp::EntityKind::Message, "late", "", "{}")]).await, Marker::Revoked);
        assert_marker(space_cap.list_sessions_request().send().promise.await, Marker::Revoked);
        let mut open = space_cap.open_session_request();
        open.get().set_key("codex:after");
        assert_marker(open.send().promise.await, Marker::Revoked);
        // The admin's share of the same session is untouched, and writes.
        assert_eq!(cursor(&admin_share_cap).await.unwrap(), 50);
        let ack = append(&admin_share_cap, &new_client_id(), 1, &[put(capsync_schema::capsync_capnp::EntityKind::Message, "by-admin", "", "{}")]).await.unwrap();
        assert_eq!(ack.cursor, 51);
    });

    // Redeeming afresh: the space URI, both owner URIs and the share below fail with
    // capsync/revoked; the admin-minted share works.
    run_local(async {
        let conn = Connection::open(&server.addr).await.unwrap();
        for token in [&first.owner.token, &again.owner.token, &below.token] {
            let (cap, grant) = conn.session(token);
            assert_marker(cursor(&cap).await, Marker::Revoked);
            assert_eq!(grant.await.unwrap_err().marker(), Some(Marker::Revoked));
        }
        let (_, grant) = conn.space(&space_uri.token);
        assert_eq!(grant.await.unwrap_err().marker(), Some(Marker::Revoked));
        let err = open_session(&space_uri, "codex:abc", "", None).await.unwrap_err();
        assert_eq!(err.marker(), Some(Marker::Revoked), "{err}");
        let (cap, _) = conn.session(&by_admin.token);
        assert_eq!(cursor(&cap).await.unwrap(), 51);
    });
    let stderr = refused(dir, "revoked.db", &["pull", &owner]);
    assert!(stderr.contains("capsync/revoked"), "{stderr}");
    logs.borrow_mut().push_str(&stderr);
    let pulled = capsync(&dir.join("admin-share.db"), &["pull", &by_admin.expose(), "--json"], &[]);
    assert!(pulled.status.success(), "{}", String::from_utf8_lossy(&pulled.stderr));

    // The admin still sees everything: the space revoked, its sessions kept, the share below
    // the owner revoked and the admin's active, and the audit trail.
    let spaces: serde_json::Value = serde_json::from_str(&run(admin_cmd(&["list-spaces", "--json"]))).unwrap();
    assert_eq!((spaces[0]["revoked"].as_bool(), spaces[0]["epoch"].as_u64(), spaces[0]["sessions"].as_u64()), (Some(true), Some(1), Some(3)));
    let sessions: serde_json::Value = serde_json::from_str(&run(admin_cmd(&["list-sessions", "--json"]))).unwrap();
    assert_eq!(sessions.as_array().unwrap().len(), 3, "revoking a space deletes no session");
    let shares: serde_json::Value = serde_json::from_str(&run(admin_cmd(&["list-shares", "--json"]))).unwrap();
    let state = |label: &str| shares.as_array().unwrap().iter().find(|s| s["label"] == label).unwrap()["revoked"].as_bool();
    assert_eq!((state("from-owner"), state("operator")), (Some(true), Some(false)));
    let audit = run(admin_cmd(&["audit", "--json", "--limit", "1000"]));
    let rows: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let count = |action: &str, kind: &str| rows.iter().filter(|r| r["action"] == action && r["target_kind"] == kind).count();
    assert_eq!(count("create-space", "space"), 1);
    assert_eq!(count("open-session", "session"), 7, "2 + 1 + 4 opens");
    assert_eq!(count("revoke", "space"), 1);
    assert!(rows.iter().any(|r| r["action"] == "open-session" && r["detail"].as_str().unwrap().ends_with("created")));

    let mut tokens: Vec<Token> = vec![space_uri.token, admin_uri.token, below.token, by_admin.token];
    tokens.extend([first, again, other].into_iter().chain(concurrent).map(|o| o.owner.token));
    assert_no_tokens(&server.log_text(), &tokens, "the server log");
    assert_no_tokens(&logs.borrow(), &tokens, "the CLI's logs and errors");
    assert_no_tokens(&audit, &tokens, "the audit log");
}
