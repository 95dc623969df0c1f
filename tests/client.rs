//! Issue 3 acceptance: the client's outbox, replay and CLI against real processes on 127.0.0.1.

mod common;

use capsync_client::{Client, Connection, SyncOptions};
use capsync_persistence::EntityKind;
use capsync_schema::{SturdyUri, Token};
use common::proxy::Proxy;
use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn spawn_capsync(outbox: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(BIN)
        .args(args)
        .env("CAPSYNC_OUTBOX", outbox)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn owner_uri(server: &Server, token: &Token) -> String {
    SturdyUri::new(server.addr.clone(), token.clone()).expose()
}

/// The server's cursor and the ids of its entities, read with the owner token.
fn server_state(addr: &str, owner: &Token) -> (u64, Vec<String>) {
    run_local(async {
        let conn = Connection::open(addr).await.unwrap();
        let (session, _) = conn.session(owner);
        let (cursor, entities) = snapshot(&session, 0).await.unwrap();
        (cursor, entities.into_iter().map(|e| e.1).collect())
    })
}

/// Every op `{prefix}0..n` applied exactly once: the cursor counts applied ops, and every
/// entity is there.
#[track_caller]
fn assert_exactly_once(addr: &str, owner: &Token, n: usize, prefix: &str) {
    let (cursor, ids) = server_state(addr, owner);
    assert_eq!(cursor, n as u64, "the server applied each op once: cursor == number of ops");
    let mut expected: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    expected.sort();
    let mut got: Vec<String> = ids.into_iter().filter(|id| id.starts_with(prefix)).collect();
    got.sort();
    assert_eq!(got.len(), expected.len(), "no entity is missing");
    assert!(got == expected);
}

on_both_stores! {
    #[test]
    fn ops_queued_while_the_server_is_down_are_delivered_by_a_later_sync() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let outbox = dir.path().join("outbox.db");
        let mut server = Server::start(&data);
        let (_, owner) = new_session(&server);
        let uri = owner_uri(&server, &owner);
        let addr = server.addr.clone();
        assert!(server.stop().success());

        let out = capsync(&outbox, &["put", &uri, "--kind", "message", "--id", "m0", "--data", r#"{"role":"user"}"#], &[]);
        assert!(!out.status.success(), "put fails while the server is down");
        let stderr = text(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("kept in the outbox"), "{stderr}");
        let before = status_json(&outbox);
        let r = &before["refs"][0];
        assert_eq!((r["pending"].as_u64(), r["acked"].as_u64()), (Some(1), Some(0)), "{before}");
        assert_eq!(r["state"], "unreachable");
        assert!(r["uri"].as_str().unwrap().ends_with("csy_<redacted>"));

        let server = Server::start_at(&data, &addr);
        let out = capsync(&outbox, &["sync"], &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let after = status_json(&outbox);
        let r = &after["refs"][0];
        assert_eq!((r["pending"].as_u64(), r["sent"].as_u64(), r["acked"].as_u64()), (Some(0), Some(0), Some(1)), "{after}");
        assert_eq!(r["state"], "ok");
        assert_eq!(r["cursor"], 1);
        assert_exactly_once(&server.addr, &owner, 1, "m");
        assert_no_tokens(&format!("{before}{after}{stderr}"), &[owner.clone()], "status and errors");
        assert_no_tokens(&server.log_text(), &[owner], "the server log");
    }

    #[test]
    fn a_client_killed_after_enqueue_or_mid_stream_delivers_every_op_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        let uri = owner_uri(&server, &owner);

        // Crash right after the outbox commit, before anything is sent.
        let outbox = dir.path().join("a.db");
        let ops = dir.path().join("a.jsonl");
        write_jsonl(&ops, 3000, "a");
        let out = capsync(&outbox, &["push", &uri, "--file", ops.to_str().unwrap()], &[("CAPSYNC_FAILPOINTS", "client-after-enqueue")]);
        assert!(!out.status.success(), "the failpoint aborted the client");
        assert_eq!(server_cursor(&server.addr, &owner), Some(0), "nothing was sent before the crash");
        assert_eq!(status_json(&outbox)["refs"][0]["pending"], 3000);
        let out = capsync(&outbox, &["sync"], &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_exactly_once(&server.addr, &owner, 3000, "a");

        // Crash mid-stream: after the 5th ack, with more batches in flight.
        let outbox = dir.path().join("b.db");
        let ops = dir.path().join("b.jsonl");
        write_jsonl(&ops, 40_000, "b");
        let out = capsync(&outbox, &["push", &uri, "--file", ops.to_str().unwrap()], &[("CAPSYNC_FAILPOINTS", "client-after-ack=5")]);
        assert!(!out.status.success());
        let at_crash = server_cursor(&server.addr, &owner).unwrap() - 3000;
        assert!(at_crash >= 5000 && at_crash < 40_000, "the crash came mid-stream ({at_crash} applied)");
        let out = capsync(&outbox, &["sync"], &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let (cursor, _) = server_state(&server.addr, &owner);
        assert_eq!(cursor, 43_000, "each op applied once");
        let counts = &status_json(&outbox)["refs"][0];
        assert_eq!((&counts["acked"], &counts["sent"], &counts["pending"]), (&40_000.into(), &0.into(), &0.into()), "the client holds an ack for every op");

        // A real kill -9 from outside while the push streams.
        let outbox = dir.path().join("c.db");
        let ops = dir.path().join("c.jsonl");
        write_jsonl(&ops, 60_000, "c");
        let mut push = spawn_capsync(&outbox, &["push", &uri, "--file", ops.to_str().unwrap()], &[]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while server_cursor(&server.addr, &owner).unwrap() <= 43_000 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        push.kill().unwrap();
        push.wait().unwrap();
        let at_kill = server_cursor(&server.addr, &owner).unwrap() - 43_000;
        println!("client killed with {at_kill} of 60000 ops applied");
        let out = capsync(&outbox, &["sync"], &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let (cursor, ids) = server_state(&server.addr, &owner);
        assert_eq!(cursor, 103_000);
        assert_eq!(ids.iter().filter(|id| id.starts_with('c')).count(), 60_000);
    }

    #[test]
    fn a_server_killed_mid_stream_or_between_commit_and_reply_loses_and_doubles_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let server = Server::start(&data);
        let (_, owner) = new_session(&server);
        let addr = server.addr.clone();
        let uri = owner_uri(&server, &owner);
        drop(server);
        let mut total = 0;

        for (round, failpoint) in ["server-before-commit=3", "server-after-commit=3"].into_iter().enumerate() {
            let mut server = Server::start_with_env(&data, &addr, &[("CAPSYNC_FAILPOINTS", failpoint)]);
            let prefix = format!("f{round}-");
            let outbox = dir.path().join(format!("f{round}.db"));
            let ops = dir.path().join(format!("f{round}.jsonl"));
            write_jsonl(&ops, 20_000, &prefix);
            let out = capsync(&outbox, &["push", &uri, "--file", ops.to_str().unwrap()], &[]);
            assert!(!out.status.success(), "the server died under the push");
            server.kill();
            let server = Server::start_at(&data, &addr);
            let applied_before = server_cursor(&server.addr, &owner).unwrap() - total;
            assert!(applied_before < 20_000, "{failpoint}: the crash came mid-stream");
            let out = capsync(&outbox, &["sync"], &[]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            let summary = text(&out.stdout);
            if failpoint.starts_with("server-after-commit") {
                assert!(!summary.contains("(0 already applied)"), "the committed-but-unacked batch replayed as duplicates: {summary}");
            }
            total += 20_000;
            let (cursor, ids) = server_state(&server.addr, &owner);
            assert_eq!(cursor, total as u64, "{failpoint}: each op applied exactly once");
            assert_eq!(ids.iter().filter(|id| id.starts_with(&prefix)).count(), 20_000);
        }

        // A real kill -9 of the server while a push streams.
        let mut server = Server::start_at(&data, &addr);
        let outbox = dir.path().join("k.db");
        let ops = dir.path().join("k.jsonl");
        write_jsonl(&ops, 60_000, "k");
        let mut push = spawn_capsync(&outbox, &["push", &uri, "--file", ops.to_str().unwrap()], &[]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while server_cursor(&server.addr, &owner).unwrap() <= total as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        server.kill();
        let _ = push.wait();
        let server = Server::start_at(&data, &addr);
        let out = capsync(&outbox, &["sync"], &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let (cursor, ids) = server_state(&server.addr, &owner);
        assert_eq!(cursor, total as u64 + 60_000);
        assert_eq!(ids.iter().filter(|id| id.starts_with('k')).count(), 60_000);
        assert_no_tokens(&server.log_text(), &[owner], "the server log");
    }

    #[test]
    fn dropped_replies_then_a_cut_replay_as_duplicates_without_double_effect() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        let proxy = Proxy::start(&server.addr);
        let outbox = dir.path().join("outbox.db");
        let ops = dir.path().join("ops.jsonl");
        write_jsonl(&ops, 5000, "d");
        // Queue without delivering (the proxy refuses), then deliver with replies dropped.
        proxy.refuse(true);
        let out = capsync(&outbox, &["push", &proxy.uri(&owner), "--file", ops.to_str().unwrap()], &[]);
        assert!(!out.status.success());
        proxy.refuse(false);
        proxy.drop_replies(true);
        let sync = spawn_capsync(&outbox, &["sync"], &[]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while server_cursor(&server.addr, &owner) != Some(5000) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(server_cursor(&server.addr, &owner), Some(5000), "the server applied everything");
        assert_eq!(status_json(&outbox)["refs"][0]["acked"], 0, "but no ack reached the client");
        proxy.drop_replies(false);
        proxy.cut();
        let out = sync.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains("(5000 already applied)"), "{}", text(&out.stdout));
        assert_exactly_once(&server.addr, &owner, 5000, "d");
        assert_eq!(status_json(&outbox)["refs"][0]["acked"], 5000);
    }

    #[test]
    fn reconnect_and_replay_of_ten_batches_costs_about_one_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        let proxy = Proxy::start(&server.addr);
        let options = SyncOptions { max_batch_ops: 10, max_attempts: 1, window: 16, ..SyncOptions::default() };
        let client = Client::open(dir.path().join("outbox.db")).unwrap().with_options(options);
        client.attach("s", &proxy.uri(&owner)).unwrap();
        let changes = (0..100).map(|i| capsync_client::Change::Put {
            kind: EntityKind::Message,
            id: format!("r{i}"),
            parent: String::new(),
            data: br#"{"role":"user"}"#.to_vec(),
        });
        client.enqueue("s", changes).unwrap();
        proxy.refuse(true);
        run_local(async { assert!(client.sync("s").await.is_err()) });
        proxy.refuse(false);
        let one_way = 50;
        proxy.set_delay(one_way);
        let rtt = Duration::from_millis(2 * one_way);
        let (elapsed, report) = run_local(async {
            let started = Instant::now();
            let report = client.sync("s").await.unwrap();
            (started.elapsed(), report)
        });
        assert_eq!(report.batches, 10, "ten pending batches were replayed");
        let round_trips = elapsed.as_secs_f64() / rtt.as_secs_f64();
        println!("reconnect + replay of 10 batches: {elapsed:?} = {round_trips:.2} round trips of {rtt:?}");
        assert!(round_trips < 3.0, "redeem and replay are pipelined ({round_trips:.2} round trips)");
        assert_exactly_once(&server.addr, &owner, 100, "r");
    }

    #[test]
    fn a_revoked_ref_stops_and_makes_at_most_one_connection_attempt_in_ten_seconds() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let server = Server::start(&data);
        let (_, owner) = new_session(&server);
        let (share, share_id) = run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            mint(&session, "read,append", "writer", 0).await.unwrap()
        });
        let proxy = Proxy::start(&server.addr);
        let outbox = dir.path().join("outbox.db");
        let uri = proxy.uri(&share);
        let out = capsync(&outbox, &["put", &uri, "--kind", "message", "--id", "m1", "--data", "{}"], &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let (ok, _, stderr) = cli(&["admin", "--admin-file", data.join("admin.uri").to_str().unwrap(), "revoke-share", &share_id]);
        assert!(ok, "{stderr}");

        // Queue more, then run a follower for ten seconds.
        let out = capsync(&outbox, &["put", &uri, "--kind", "message", "--id", "m2", "--data", "{}"], &[]);
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains("capsync/revoked"), "{}", text(&out.stderr));
        let before = proxy.accepted();
        let mut follow = spawn_capsync(&outbox, &["sync", "--follow"], &[]);
        std::thread::sleep(Duration::from_secs(10));
        follow.kill().unwrap();
        follow.wait().unwrap();
        let attempts = proxy.accepted() - before;
        println!("connection attempts in 10 s after revocation: {attempts}");
        assert!(attempts <= 1, "{attempts} connection attempts");
        let status = status_json(&outbox);
        let r = &status["refs"][0];
        assert_eq!(r["state"], "revoked", "{status}");
        assert_eq!(r["pending"].as_u64().unwrap() + r["sent"].as_u64().unwrap(), 1, "the refused op stays queued: {status}");
        assert_eq!(r["acked"], 1);
        assert!(r["last_error"].as_str().unwrap().contains("capsync/revoked"));
        assert_no_tokens(&status.to_string(), &[share], "status");
    }

    #[test]
    fn push_of_100k_ops_prints_a_summary_and_a_malformed_line_queues_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        let uri = owner_uri(&server, &owner);
        let outbox = dir.path().join("outbox.db");

        let bad = dir.path().join("bad.jsonl");
        write_jsonl(&bad, 10, "bad");
        let mut lines = std::fs::read_to_string(&bad).unwrap();
        lines.push_str("{\"op\":\"put\",\"kind\":\"message\",\"id\":\"x\",\"data\":{}\n");
        lines.push_str("{\"op\":\"put\",\"kind\":\"message\",\"id\":\"y\",\"data\":{}}\n");
        std::fs::write(&bad, lines).unwrap();
        let out = capsync(&outbox, &["push", &uri, "--file", bad.to_str().unwrap()], &[]);
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        assert!(stderr.contains("line 11"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1);
        let status = status_json(&outbox);
        let queued: u64 = status["refs"].as_array().unwrap().iter().map(|r| r["pending"].as_u64().unwrap()).sum();
        assert_eq!(queued, 0, "nothing from the file was queued");

        let ops = dir.path().join("ops.jsonl");
        write_jsonl(&ops, 100_000, "p");
        let out = capsync(&outbox, &["push", &uri, "--file", ops.to_str().unwrap()], &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let summary = text(&out.stdout);
        println!("{}", summary.trim());
        assert!(summary.starts_with("pushed 100000 ops in ") && summary.contains(" ops/s)"), "{summary}");
        assert_exactly_once(&server.addr, &owner, 100_000, "p");
    }

    #[test]
    fn pull_builds_a_replica_equal_to_the_server_snapshot_and_resumes_from_its_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (session_id, owner) = new_session(&server);
        let uri = owner_uri(&server, &owner);
        let client = Client::open(dir.path().join("outbox.db")).unwrap();
        client.attach("s", &uri).unwrap();
        let mut changes = vec![capsync_client::Change::Put {
            kind: EntityKind::Session,
            id: session_id,
            parent: String::new(),
            data: br#"{"title":"t"}"#.to_vec(),
        }];
        for i in 0..2500 {
            changes.push(capsync_client::Change::Put { kind: EntityKind::Message, id: format!("m{i}"), parent: String::new(), data: b"{}".to_vec() });
            changes.push(capsync_client::Change::Put { kind: EntityKind::Part, id: format!("p{i}"), parent: format!("m{i}"), data: b"[1]".to_vec() });
        }
        client.enqueue("s", changes).unwrap();
        let reader = Client::open(dir.path().join("reader.db")).unwrap();
        reader.attach("r", &uri).unwrap();
        run_local(async {
            client.sync("s").await.unwrap();
            let first = reader.pull("r").await.unwrap();
            assert_eq!(first.snapshot_entities, 5001, "a first pull takes a (paged) snapshot");
            assert_eq!(first.cursor, 5001);
            client.enqueue("s", (0..100).map(|i| capsync_client::Change::Delete { kind: EntityKind::Message, id: format!("m{i}") })).unwrap();
            client.sync("s").await.unwrap();
            let second = reader.pull("r").await.unwrap();
            assert_eq!((second.snapshot_entities, second.ops_applied, second.cursor), (0, 100, 5101), "later pulls resume from the cursor");
        });
        let (cursor, replica) = reader.replica("r").unwrap();
        let (server_at, entities) = run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            snapshot(&session, 0).await.unwrap()
        });
        assert_eq!(cursor, server_at);
        assert_eq!(replica.len(), 4801, "deleting a message deleted its part in the replica too");
        let server_ids: Vec<&str> = entities.iter().map(|e| e.1.as_str()).collect();
        let replica_ids: Vec<&str> = replica.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(replica_ids, server_ids);
    }
}
