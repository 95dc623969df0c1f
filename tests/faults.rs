//! Issue 5 scenarios: a server stopped (SIGSTOP) longer than the client's timeouts, a token
//! revoked mid-pipeline, a poison op in the middle of a long queue, crash points (client
//! outbox, server commit, revocation, migration), a full disk, a stale connection. Each is
//! judged by the history checker of the chaos test. Network faults made by a proxy that reads
//! frames are in `network_faults.rs`.

mod common;

use capsync_client::{Client, Connection, SyncOptions};
use capsync_persistence::EntityKind;
use capsync_schema::Marker;
use common::checker;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// Waits (on another thread) until the server has applied something, then runs `act`.
fn when_applying(addr: String, owner: capsync_schema::Token, act: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while server_cursor(&addr, &owner).unwrap_or(0) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        act();
    })
}

on_both_stores! {
    #[test]
    fn a_server_stopped_longer_than_the_client_timeouts_loses_and_doubles_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        let options = SyncOptions {
            ack_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(500),
            max_attempts: 50,
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            max_batch_ops: 100,
            ..SyncOptions::default()
        };
        let client = Client::open(dir.path().join("c.db")).unwrap().with_options(options);
        client.attach("s", &capsync_schema::SturdyUri::new(server.addr.clone(), owner.clone()).expose()).unwrap();
        client.enqueue("s", messages(0..30_000, "m")).unwrap();
        let pid = server.pid().to_string();
        let stopper = when_applying(server.addr.clone(), owner.clone(), move || {
            assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
            std::thread::sleep(Duration::from_secs(3));
            assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
        });
        let report = run_local(async { client.sync("s").await }).expect("the sync rides out the stop");
        stopper.join().unwrap();
        println!("sync after a 3 s SIGSTOP: {} batches, {} ops answered duplicate on replay", report.batches, report.duplicates);
        assert!(report.duplicates > 0, "the ack timeout fired and the client replayed on a new connection");
        let history = checker::history(&dir.path().join("c.db"));
        let verdict = checker::check(&[history], &server_log(&server.addr, &owner), true).unwrap();
        assert_eq!(verdict.logged, 30_000);
    }

    #[test]
    fn a_token_revoked_mid_pipeline_stops_the_ref_and_doubles_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let server = Server::start(&data);
        let (_, owner) = new_session(&server);
        let (share, share_id) = run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            mint(&conn.session(&owner).0, "read,append", "writer", 0).await.unwrap()
        });
        let options = SyncOptions { max_batch_ops: 50, ..SyncOptions::default() };
        let client = Client::open(dir.path().join("c.db")).unwrap().with_options(options);
        client.attach("s", &capsync_schema::SturdyUri::new(server.addr.clone(), share).expose()).unwrap();
        client.enqueue("s", messages(0..40_000, "m")).unwrap();
        let admin_file = data.join("admin.uri").to_str().unwrap().to_owned();
        let revoker = when_applying(server.addr.clone(), owner.clone(), move || {
            let (ok, _, stderr) = cli(&["admin", "--admin-file", &admin_file, "revoke-share", &share_id]);
            assert!(ok, "{stderr}");
        });
        let result = run_local(async { client.sync("s").await });
        revoker.join().unwrap();
        let err = result.expect_err("the sync stops at the revocation");
        assert_eq!(err.marker(), Some(Marker::Revoked), "{err}");
        let status = client.status().unwrap();
        assert_eq!(status[0].state, "revoked");
        let history = checker::history(&dir.path().join("c.db"));
        let verdict = checker::check(&[history], &server_log(&server.addr, &owner), false).unwrap();
        println!("revoked mid-pipeline: {} acked, {} kept queued, {} in the log", verdict.acked, verdict.indeterminate, verdict.logged);
        assert!(verdict.acked > 0 && verdict.indeterminate > 0, "the revocation landed mid-stream");
        assert_eq!(status[0].counts.pending + status[0].counts.sent, verdict.indeterminate as u64, "nothing unacked was dropped");
    }

    #[test]
    fn a_poison_op_in_a_long_queue_is_rejected_and_wedges_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        let options = SyncOptions { max_batch_ops: 100, ..SyncOptions::default() };
        let client = Client::open(dir.path().join("c.db")).unwrap().with_options(options);
        client.attach("s", &capsync_schema::SturdyUri::new(server.addr.clone(), owner.clone()).expose()).unwrap();
        client.enqueue("s", messages(0..3000, "a")).unwrap();
        let poison = client.put("s", EntityKind::Part, "p", "no-such-message", b"{}").unwrap();
        client.enqueue("s", messages(0..3000, "b")).unwrap();
        run_local(async { client.sync("s").await }).unwrap();
        let counts = client.status().unwrap()[0].counts;
        assert_eq!((counts.acked, counts.rejected, counts.pending + counts.sent), (6000, 1, 0));
        let history = checker::history(&dir.path().join("c.db"));
        let rejected: Vec<_> = history.iter().filter(|op| op.state == "rejected").collect();
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].op_id, poison.to_vec());
        let log = server_log(&server.addr, &owner);
        let without_poison: Vec<_> = history.into_iter().filter(|op| op.state != "rejected").collect();
        checker::check(&[without_poison], &log, true).unwrap();
    }

    #[test]
    fn a_client_killed_before_its_outbox_commit_or_before_sending_loses_and_doubles_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        let uri = capsync_schema::SturdyUri::new(server.addr.clone(), owner.clone()).expose();
        let ops = dir.path().join("ops.jsonl");
        write_jsonl(&ops, 2000, "e");
        let outbox = dir.path().join("c.db");

        // Killed inside the outbox transaction: push never said the ops were taken, and none are.
        let out = capsync(&outbox, &["push", &uri, "--file", ops.to_str().unwrap()], &[("CAPSYNC_FAILPOINTS", "client-before-enqueue-commit")]);
        assert!(!out.status.success() && out.stdout.is_empty(), "no success was reported");
        let queued: u64 = status_json(&outbox)["refs"].as_array().unwrap().iter().map(|r| r["pending"].as_u64().unwrap()).sum();
        assert_eq!(queued, 0, "an interrupted enqueue leaves nothing half-queued");
        assert_eq!(server_cursor(&server.addr, &owner), Some(0));

        // Killed after the commit, before the first send: all queued, nothing sent; sync delivers.
        let out = capsync(&outbox, &["push", &uri, "--file", ops.to_str().unwrap()], &[("CAPSYNC_FAILPOINTS", "client-before-send")]);
        assert!(!out.status.success());
        assert_eq!(status_json(&outbox)["refs"][0]["pending"], 2000);
        assert_eq!(server_cursor(&server.addr, &owner), Some(0), "nothing was sent");
        let out = capsync(&outbox, &["sync"], &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let verdict = checker::check(&[checker::history(&outbox)], &server_log(&server.addr, &owner), true).unwrap();
        assert_eq!(verdict.logged, 2000);
    }

    /// Killed right after recording that batches went out (failpoint `client-after-send`, the
    /// third time the client records progress): batches marked sent may or may not have reached
    /// the server; the next sync resends them and the server answers those it has as duplicates.
    #[test]
    fn a_client_killed_right_after_sending_loses_and_doubles_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        let uri = capsync_schema::SturdyUri::new(server.addr.clone(), owner.clone()).expose();
        let ops = dir.path().join("ops.jsonl");
        // 60 batches of 1,000 (push's default): the 16-batch window never runs dry before the
        // third record of progress, so batches are in flight when the client dies.
        write_jsonl(&ops, 60_000, "s");
        let outbox = dir.path().join("c.db");
        let out = capsync(&outbox, &["push", &uri, "--file", ops.to_str().unwrap()], &[("CAPSYNC_FAILPOINTS", "client-after-send=3")]);
        assert!(!out.status.success(), "the failpoint aborted the client");
        let history = checker::history(&outbox);
        let in_flight = history.iter().filter(|op| op.state == "sent").count();
        assert!(in_flight > 0, "some ops were sent but not acked when the client died");
        let at_crash = checker::check(&[history], &server_log(&server.addr, &owner), false).unwrap();
        let out = capsync(&outbox, &["sync"], &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let verdict = checker::check(&[checker::history(&outbox)], &server_log(&server.addr, &owner), true).unwrap();
        println!("client killed after sending: {} acked, {in_flight} sent and unacked at the crash; {} logged after the next sync", at_crash.acked, verdict.logged);
        assert_eq!(verdict.logged, 60_000);
    }

    #[test]
    fn a_server_killed_mid_revocation_revokes_all_or_nothing() {
        for (failpoint, durable) in [("server-revoke-before-commit", false), ("server-revoke-after-commit", true)] {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("data");
            let server = Server::start_with_env(&data, "127.0.0.1:0", &[("CAPSYNC_FAILPOINTS", failpoint)]);
            let addr = server.addr.clone();
            let (_, owner) = new_session(&server);
            let (share, share_id) = run_local(async {
                let conn = Connection::open(&addr).await.unwrap();
                mint(&conn.session(&owner).0, "read", "r", 0).await.unwrap()
            });
            let admin_file = data.join("admin.uri");
            let admin_file = admin_file.to_str().unwrap();
            let (ok, _, _) = cli(&["admin", "--admin-file", admin_file, "revoke-share", &share_id]);
            assert!(!ok, "{failpoint}: the server died before answering");
            drop(server);
            let server = Server::start_at(&data, &addr);
            let after_restart = run_local(async {
                let conn = Connection::open(&server.addr).await.unwrap();
                cursor(&conn.session(&share).0).await
            });
            if durable {
                assert_marker(after_restart, Marker::Revoked);
            } else {
                after_restart.expect("a revocation that never committed changed nothing");
            }
            // The admin retries, as one does after an unanswered revoke: it takes either way.
            let (ok, _, stderr) = cli(&["admin", "--admin-file", admin_file, "revoke-share", &share_id]);
            assert!(ok, "{stderr}");
            run_local(async {
                let conn = Connection::open(&server.addr).await.unwrap();
                assert_marker(cursor(&conn.session(&share).0).await, Marker::Revoked);
            });
        }
    }

    #[test]
    fn a_stale_connection_resuming_after_a_replay_elsewhere_doubles_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        let proxy = std::sync::Arc::new(common::proxy::Proxy::start(&server.addr));
        let options = SyncOptions {
            ack_timeout: Duration::from_millis(500),
            max_attempts: 20,
            max_batch_ops: 50,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
            ..SyncOptions::default()
        };
        let client = Client::open(dir.path().join("c.db")).unwrap().with_options(options);
        client.attach("s", &proxy.uri(&owner)).unwrap();
        client.enqueue("s", messages(0..5000, "m")).unwrap();
        // Mid-stream, the connection goes silent (its requests pile up in the proxy): the client
        // gives up on it, reconnects and finishes on a new one.
        let holder = when_applying(server.addr.clone(), owner.clone(), {
            let proxy = proxy.clone();
            move || proxy.hold_existing()
        });
        let report = run_local(async { client.sync("s").await }).unwrap();
        holder.join().unwrap();
        assert!(proxy.held_chunks() > 0, "requests were held on the stale connection");
        // Now the stale connection's requests reach the server, after everything was replayed.
        proxy.release_held();
        let deadline = Instant::now() + Duration::from_secs(10);
        while proxy.held_chunks() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // The stale requests are replays: watch that none of them applies anything.
        let watch_until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < watch_until {
            assert_eq!(server_cursor(&server.addr, &owner), Some(5000), "a stale request applied an op twice");
            std::thread::sleep(Duration::from_millis(20));
        }
        let verdict = checker::check(&[checker::history(&dir.path().join("c.db"))], &server_log(&server.addr, &owner), true).unwrap();
        println!("stale connection: {} batches replayed on the new connection, {} ops answered duplicate; {} logged", report.batches, report.duplicates, verdict.logged);
        assert_eq!(verdict.logged, 5000);
    }
}

/// SQLite only: PostgreSQL's migrations are tested in store-postgres/tests (one transaction each,
/// under an advisory lock).
#[test]
fn a_server_killed_mid_migration_keeps_the_old_schema_and_upgrades_next_time() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    {
        let db = rusqlite::Connection::open(data.join("capsync.db")).unwrap();
        for sql in capsync_persistence::server::schema::CREATE_V1 {
            db.execute_batch(sql).unwrap();
        }
        db.pragma_update(None, "user_version", 1).unwrap();
        db.execute("INSERT INTO sessions (id, title, created_at) VALUES ('01940000-0000-7000-8000-000000000001', 'from v1', 1)", []).unwrap();
    }
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("CAPSYNC_FAILPOINTS", "mid-migration")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the server died inside the migration");
    {
        let db = rusqlite::Connection::open(data.join("capsync.db")).unwrap();
        let version: u32 = db.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        let audit: i64 = db.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'audit'", [], |r| r.get(0)).unwrap();
        assert_eq!((version, audit), (1, 0), "the half-done migration was rolled back whole");
    }
    let server = Server::start(&data);
    let (ok, stdout, stderr) = cli(&["admin", "--admin-file", data.join("admin.uri").to_str().unwrap(), "list-sessions", "--json"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("from v1"), "the v1 data survived the upgrade: {stdout}");
    drop(server);
    let db = rusqlite::Connection::open(data.join("capsync.db")).unwrap();
    let version: u32 = db.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, capsync_persistence::server::schema::PLAN.current_version);
}

/// A size-limited tmpfs for the server's data; unmounted on drop.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(path).output().unwrap();
        assert!(out.status.success(), "this test needs to mount a tmpfs (root): {}", String::from_utf8_lossy(&out.stderr));
        SmallDisk { path: path.to_owned() }
    }

    fn free_bytes(&self) -> u64 {
        let out = Command::new("df").args(["--output=avail", "-B1"]).arg(&self.path).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// SQLite only: the disk filling is the data dir's (PostgreSQL's disk is the operator's).
#[test]
fn a_full_disk_fails_appends_clearly_loses_nothing_acked_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    // The tmpfs is the data dir itself, so the server's log (beside it) is not on it.
    let disk = SmallDisk::mount(&dir.path().join("data"), "64m");
    let data = disk.path.clone();
    let mut server = Server::start(&data);
    let (_, owner) = new_session(&server);
    let uri = capsync_schema::SturdyUri::new(server.addr.clone(), owner.clone()).expose();
    // Leave the server ~2 MiB: room for a few batches, not for all.
    let filler = disk.path.join("filler.bin");
    let room = disk.free_bytes().saturating_sub(2 * 1024 * 1024);
    std::fs::write(&filler, vec![0u8; room as usize]).unwrap();

    let ops = dir.path().join("ops.jsonl");
    write_jsonl(&ops, 20_000, "f");
    let outbox = dir.path().join("c.db");
    let out = capsync(&outbox, &["push", &uri, "--file", ops.to_str().unwrap()], &[]);
    assert!(!out.status.success(), "the push cannot finish on a full disk");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("capsync/internal") && stderr.contains("full"), "a clear error: {stderr}");
    let before = checker::check(&[checker::history(&outbox)], &server_log(&server.addr, &owner), false).unwrap();
    println!("disk full after {} of 20000 ops acked ({} logged)", before.acked, before.logged);
    assert!(before.acked > 0 && before.acked < 20_000, "the disk filled mid-stream");

    // Space returns; the same server process takes the rest.
    std::fs::remove_file(&filler).unwrap();
    let out = capsync(&outbox, &["sync"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = checker::check(&[checker::history(&outbox)], &server_log(&server.addr, &owner), true).unwrap();
    assert_eq!(after.logged, 20_000);
    server.kill();
}

/// "No ack precedes its commit", checked at the one moment it matters: the writer is parked
/// just before a group's COMMIT (its batches applied inside the open transaction), the client
/// gives up waiting for their acks, and the server is killed there. After a restart, every op
/// the client holds an ack for must be in the log at the seq the ack named.
/// SQLite only: the group commit is the SQLite writer's (on PostgreSQL each batch commits on
/// its own; `server-before-commit` covers that).
#[test]
fn a_server_killed_just_before_a_group_commit_had_acked_nothing_of_that_group() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data);
    let (_, owner) = new_session(&server);
    let addr = server.addr.clone();
    server.stop();
    // Groups 1 to 3 after the restart commit (the redeem and the first appends); the 4th parks.
    let mut server = Server::start_with_env(&data, &addr, &[("CAPSYNC_FAILPOINTS", "writer-before-commit=4:pause")]);
    let options = SyncOptions {
        ack_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        max_attempts: 1,
        max_batch_ops: 100,
        ..SyncOptions::default()
    };
    let outbox = dir.path().join("c.db");
    let client = Client::open(&outbox).unwrap().with_options(options);
    client.attach("s", &capsync_schema::SturdyUri::new(addr.clone(), owner.clone()).expose()).unwrap();
    client.enqueue("s", messages(0..5000, "m")).unwrap();
    let err = run_local(async { client.sync("s").await }).expect_err("no ack comes while the writer is parked");
    assert!(err.is_retryable(), "{err}");
    assert!(server.log_text().contains("failpoint writer-before-commit reached: pausing"), "the writer parked before a commit");
    server.kill();

    let server = Server::start_at(&data, &addr);
    let history = checker::history(&outbox);
    let parked = checker::check(&[history], &server_log(&server.addr, &owner), false)
        .unwrap_or_else(|violation| panic!("an op acked before its commit was lost: {violation}"));
    println!("killed before a group commit: {} acked before it, {} unacked, {} logged", parked.acked, parked.indeterminate, parked.logged);
    assert!(parked.acked > 0 && parked.indeterminate > 0, "the kill landed mid-stream");
    run_local(async { client.sync("s").await }).unwrap();
    let verdict = checker::check(&[checker::history(&outbox)], &server_log(&server.addr, &owner), true).unwrap();
    assert_eq!(verdict.logged, 5000);
}
