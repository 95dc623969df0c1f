//! Issue 14: the server under a hostile peer. Each test reproduces one attack that once
//! worked and checks that it no longer does, within bounded time and memory.

mod common;

use capsync_client::Connection;
use capsync_schema::capsync_capnp::{listener, EntityKind::Message};
use common::*;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The server's own view of itself: (connections, live capabilities, subscriptions).
fn server_counts(server: &Server) -> (u64, u64, u64) {
    let admin = server.admin_uri();
    run_local(async {
        let conn = Connection::open(&server.addr).await.unwrap();
        let response = admin_cap(&conn, &admin.token).stats_request().send().promise.await.unwrap();
        let stats = response.get().unwrap().get_stats().unwrap();
        (stats.get_connections(), stats.get_live_capabilities(), stats.get_subscriptions())
    })
}

/// Polls `cond` every 100 ms for at most `limit`.
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

on_both_stores! {
    #[test]
    fn a_second_server_on_a_data_dir_in_use_refuses_to_start_and_leaves_admin_uri_alone() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = Server::start(&data);
        let before = std::fs::read_to_string(data.join("admin.uri")).unwrap();
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let exited = eventually(Duration::from_secs(30), || child.try_wait().unwrap().is_some());
        if !exited {
            let _ = child.kill();
        }
        let second = child.wait_with_output().unwrap();
        assert!(exited, "the second server kept running on a data dir in use");
        let stderr = String::from_utf8_lossy(&second.stderr);
        assert!(!second.status.success(), "the second server must not start");
        assert!(String::from_utf8_lossy(&second.stdout).is_empty(), "it never announces a listening address");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one clear line: {stderr}");
        assert!(lines[0].contains("in use"), "{stderr}");
        assert_eq!(std::fs::read_to_string(data.join("admin.uri")).unwrap(), before, "admin.uri untouched");
        // The first server still owns the dir and serves with the unchanged admin token.
        let (_, owner) = new_session(&first);
        assert_eq!(server_cursor(&first.addr, &owner), Some(0));
    }

    #[test]
    fn a_closed_connection_releases_its_stalled_subscriptions() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        let (addr, token) = (server.addr.clone(), owner.clone());
        // The hostile client: 80 subscriptions on one connection that never read what they get,
        // while a writer fills the session; then the client goes away without a word (its runtime,
        // and with it the socket, is dropped as a process exit would).
        let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
        let (exit_tx, exit_rx) = std::sync::mpsc::channel::<()>();
        let client = std::thread::spawn(move || {
            run_local(async move {
                let conn = Connection::open(&addr).await.unwrap();
                let (session, _) = conn.session(&token);
                let mut subscriptions = Vec::new();
                let mut refused = Vec::new();
                for _ in 0..80 {
                    let mut request = session.subscribe_request();
                    request.get().set_after(0);
                    request.get().set_listener(capnp_rpc::new_client(StuckListener));
                    match request.send().promise.await {
                        Ok(subscription) => subscriptions.push(subscription),
                        Err(err) => refused.push(marker_of(&err)),
                    }
                }
                subscribed_tx.send((subscriptions.len(), refused)).unwrap();
                tokio::task::spawn_blocking(move || exit_rx.recv()).await.unwrap().ok();
                drop(subscriptions);
                conn.close().await;
            })
        });
        let (held, refused) = subscribed_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(held, 64, "a connection holds at most 64 subscriptions (the default cap)");
        assert_eq!(refused, vec![Some(capsync_schema::Marker::Overloaded); 16]);
        let data = format!("\"{}\"", "z".repeat(20_000));
        run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            let client_id = new_client_id();
            for seq in 1..=40u64 {
                let ops: Vec<TestOp> = (0..10).map(|i| put(Message, &format!("m{seq}-{i}"), "", &data)).collect();
                append(&session, &client_id, seq, &ops).await.unwrap();
            }
        });
        let (_, _, subscriptions) = server_counts(&server);
        assert_eq!(subscriptions, 64, "the subscriptions are stalled, not ended");
        exit_tx.send(()).unwrap();
        client.join().unwrap();
        let released = eventually(Duration::from_secs(20), || {
            let (connections, _, subscriptions) = server_counts(&server);
            connections == 1 && subscriptions == 0
        });
        assert!(released, "the server still holds the closed connection: {:?}", server_counts(&server));
    }

    #[test]
    fn one_connection_pipelining_large_appends_cannot_take_the_servers_memory() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with_args(&dir.path().join("data"), &["--max-connection-bytes", "16777216", "--max-server-bytes", "33554432"]);
        let (_, owner) = new_session(&server);
        let base = rss_kib(server.pid());
        let pid = server.pid();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    peak = peak.max(rss_kib(pid));
                    std::thread::sleep(Duration::from_millis(10));
                }
                peak
            })
        };
        // 40 batches of 4 x ~1 MB, all sent at once: 160 MB in flight without a budget.
        let data = format!("\"{}\"", "x".repeat(1_000_000));
        let acked = run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            let client_id = new_client_id();
            let calls: Vec<_> = (1..=40u64)
                .map(|seq| {
                    let ops: Vec<TestOp> = (0..4).map(|i| put(Message, &format!("m{seq}-{i}"), "", &data)).collect();
                    read_ack(append_request(&session, &client_id, seq, &ops))
                })
                .collect();
            let results = futures::future::join_all(calls).await;
            for r in results.iter().filter_map(|r| r.as_ref().err()).take(3) {
                eprintln!("append failed: {}", r.extra);
            }
            results.iter().filter(|r| r.is_ok()).count()
        });
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let grown_mib = (sampler.join().unwrap().saturating_sub(base)) / 1024;
        if acked != 40 {
            let log = server.log_text();
            for line in log.lines().filter(|l| !l.contains("TRACE")).rev().take(15) {
                eprintln!("{line}");
            }
        }
        eprintln!("server RSS grew by {grown_mib} MiB");
        assert_eq!(acked, 40, "every batch is applied, only later");
        assert!(grown_mib < 110, "server RSS grew by {grown_mib} MiB for 160 MB of pipelined appends with a 32 MiB budget");
    }

    #[test]
    fn a_connection_flood_from_one_address_locks_nobody_else_out_and_quiet_sockets_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with_args(&dir.path().join("data"), &["--max-connections", "100", "--idle-timeout", "1s"]);
        let (_, owner) = new_session(&server);
        run_local(async {
            // 150 sockets from 127.0.0.2 that bootstrap and go quiet: more than the whole limit.
            let mut flood = Vec::new();
            for _ in 0..150 {
                flood.push(quiet_bootstrapped_socket("127.0.0.2", &server.addr).await);
            }
            // A real client from 127.0.0.1 still connects and redeems.
            let real = tokio::time::timeout(Duration::from_secs(10), async {
                let conn = Connection::open(&server.addr).await.unwrap();
                cursor(&conn.session(&owner).0).await
            })
            .await;
            assert!(matches!(real, Ok(Ok(0))), "a legitimate client was locked out: {real:?}");
            // Every flood socket is closed by the server: refused beyond the per-address cap, or
            // closed after the idle timeout because it holds no capability.
            let all_closed = tokio::time::timeout(Duration::from_secs(20), async {
                for mut stream in flood {
                    use tokio::io::AsyncReadExt as _;
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                }
            })
            .await;
            assert!(all_closed.is_ok(), "quiet sockets without a capability stay open");
        });
    }

    #[test]
    fn data_that_is_not_utf8_inside_a_json_string_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            let mut op = put(Message, "bad", "", "");
            op.data = Some(b"{\"text\":\"\xff\xfe\"}".to_vec());
            let ack = append(&session, &new_client_id(), 1, &[op, put(Message, "good", "", "{}")]).await.unwrap();
            assert_eq!(ack.results[0].status, capsync_schema::capsync_capnp::op_result::Status::Rejected);
            assert!(ack.results[0].reason.contains("UTF-8"), "{}", ack.results[0].reason);
            assert_eq!(ack.results[1].status, capsync_schema::capsync_capnp::op_result::Status::Applied);
        });
    }

    #[test]
    fn a_mint_denied_for_a_longer_ttl_is_audited() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let server = Server::start(&data);
        let (_, owner) = new_session(&server);
        run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            let (short, _) = mint(&session, "read,mint", "short", 60).await.unwrap();
            let (share, _) = conn.session(&short);
            let denied = mint(&share, "read", "longer", 3600).await;
            assert_eq!(denied.err().as_ref().and_then(marker_of), Some(capsync_schema::Marker::Denied));
        });
        let sql = "SELECT count(*) FROM audit WHERE action = 'denied' AND detail LIKE '%outlive%'";
        let found = eventually(Duration::from_secs(10), || query_store(&data, sql, sql)[0][0].as_deref() == Some("1"));
        assert!(found, "no audit row for the denied mint");
    }

    #[test]
    fn a_catch_up_from_the_op_log_is_cut_to_what_a_client_reads() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut server = Server::start(&data);
        let (_, owner) = new_session(&server);
        // 1,000 ops of 80 KB: 80 MB, more than a client reads in one message (64 MiB).
        let blob = format!("\"{}\"", "c".repeat(80_000));
        run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            let client_id = new_client_id();
            for seq in 1..=10u64 {
                let ops: Vec<TestOp> = (0..100).map(|i| put(Message, &format!("m{seq}-{i}"), "", &blob)).collect();
                append(&session, &client_id, seq, &ops).await.unwrap();
            }
        });
        // A restart empties the in-memory feed: the subscription catches up from the op log.
        let addr = server.addr.clone();
        server.stop();
        let server = Server::start_at(&data, &addr);
        let seen = Rc::new(std::cell::RefCell::new(Vec::new()));
        let complete = run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            let mut request = session.subscribe_request();
            request.get().set_after(0);
            request.get().set_listener(capnp_rpc::new_client(Collect(seen.clone())));
            let _subscription = request.send().promise.await.unwrap();
            tokio::time::timeout(Duration::from_secs(60), async {
                while seen.borrow().len() < 1000 {
                    tokio::select! {
                        _ = conn.closed() => return false,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
                true
            })
            .await
            .unwrap_or(false)
        });
        assert!(complete, "the follower got {} of 1000 ops before its connection dropped or time ran out", seen.borrow().len());
        assert_eq!(*seen.borrow(), (1..=1000).collect::<Vec<u64>>());
    }

    #[test]
    fn an_owner_uri_passed_as_the_admin_uri_is_named_for_what_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let _server = Server::start(&data);
        let (ok, owner_uri, stderr) = cli(&["admin", "--admin-file", data.join("admin.uri").to_str().unwrap(), "create-session"]);
        assert!(ok, "{stderr}");
        let (ok, stdout, stderr) = cli(&["admin", "--admin", owner_uri.trim(), "stats"]);
        assert!(!ok && stdout.is_empty());
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("not an admin URI") && stderr.contains("session"), "{stderr}");
    }

    #[test]
    fn push_refuses_an_over_long_line_with_its_number_in_bounded_memory() {
        let dir = tempfile::tempdir().unwrap();
        let uri = capsync_schema::SturdyUri::new("127.0.0.1:1".to_string(), capsync_schema::Token::generate()).expose();
        let long = dir.path().join("long.jsonl");
        let mut text = String::from("{\"op\":\"delete\",\"kind\":\"message\",\"id\":\"m1\"}\n");
        text.push_str(&format!("{{\"op\":\"put\",\"kind\":\"message\",\"id\":\"m2\",\"data\":\"{}\"}}\n", "x".repeat(5_000_000)));
        std::fs::write(&long, text).unwrap();
        for (file, line) in [(long.as_path(), "line 2"), (std::path::Path::new("/dev/zero"), "line 1")] {
            let mut child = Command::new(BIN)
                .args(["push", &uri, "--file"])
                .arg(file)
                .arg("--outbox")
                .arg(dir.path().join("outbox.db"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let exited = eventually(Duration::from_secs(30), || child.try_wait().unwrap().is_some());
            if !exited {
                let _ = child.kill();
            }
            let out = child.wait_with_output().unwrap();
            assert!(exited, "push kept reading {}", file.display());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success());
            assert!(stderr.contains(line) && stderr.contains("longer than"), "{stderr}");
        }
    }

    #[test]
    fn a_failed_audit_write_is_logged_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let server = Server::start(&data);
        let (_, owner) = new_session(&server);
        // The real database refuses audit rows from now on (a full disk or a broken table would too).
        query_store(
            &data,
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'audit refused'); END;",
            "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'audit refused'; END $$; \
             CREATE TRIGGER refuse_audit BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION refuse_audit();",
        );
        // A redeem writes its audit row in the background.
        assert!(server_cursor(&server.addr, &owner).is_some());
        assert!(
            eventually(Duration::from_secs(30), || server.log_text().contains("a background write failed")),
            "the lost audit row left no trace in the log"
        );
    }
}

/// A listener that never finishes an `onOps`: the server's stream window fills and stays full.
struct StuckListener;

impl listener::Server for StuckListener {
    async fn on_ops(self: Rc<Self>, _: listener::OnOpsParams) -> Result<(), capnp::Error> {
        std::future::pending().await
    }
    async fn on_end(self: Rc<Self>, _: listener::OnEndParams, _: listener::OnEndResults) -> Result<(), capnp::Error> {
        Ok(())
    }
}

/// A raw socket from `source` (an address of 127.0.0.0/8) that sends one bootstrap frame.
async fn quiet_bootstrapped_socket(source: &str, server: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(server.parse().unwrap()).await.unwrap();
    let mut message = capnp::message::Builder::new_default();
    message.init_root::<capnp_rpc::rpc_capnp::message::Builder>().init_bootstrap().set_question_id(0);
    stream.write_all(&capnp::serialize::write_message_to_words(&message)).await.unwrap();
    stream
}

/// SQLite only: the files are the store's (PostgreSQL's files are its own).
#[test]
fn database_files_are_private_even_in_a_world_readable_dir() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = Server::start(&data);
    new_session(&server);
    for name in ["capsync.db", "capsync.db-wal", "capsync.db-shm"] {
        let mode = std::fs::metadata(data.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name} is {mode:o}");
    }
}

/// A listener that records every op it is given.
struct Collect(Rc<std::cell::RefCell<Vec<u64>>>);

impl listener::Server for Collect {
    async fn on_ops(self: Rc<Self>, params: listener::OnOpsParams) -> Result<(), capnp::Error> {
        for op in params.get()?.get_ops()?.iter() {
            self.0.borrow_mut().push(op.get_seq());
        }
        Ok(())
    }
    async fn on_end(self: Rc<Self>, _: listener::OnEndParams, _: listener::OnEndResults) -> Result<(), capnp::Error> {
        Ok(())
    }
}

/// SQLite only: on PostgreSQL, tests/postgres.rs starts a server on a database it cannot reach.
#[test]
fn serve_announces_listening_only_once_its_database_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("capsync.db")).unwrap(); // a directory: SQLite cannot open it
    let out = Command::new(BIN).args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(&data).stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).is_empty(), "announced before failing: {}", String::from_utf8_lossy(&out.stdout));
}

/// SQLite only: the revocation jumps the single writer's queue. On PostgreSQL no such queue
/// exists; the append transaction's own epoch check (store-postgres/tests: revocation racing
/// appends) and tests/multinode.rs cover the same guarantee.
#[test]
fn a_revocation_commits_ahead_of_queued_appends_and_no_revoked_append_was_applied() {
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release");
    let data = dir.path().join("data");
    // The first append holds the writer inside its transaction until `release` exists.
    let server = Server::start_with_env(&data, "127.0.0.1:0", &[
        ("CAPSYNC_FAILPOINTS", "server-before-commit=1:hold"),
        ("CAPSYNC_FAILPOINTS_RELEASE", release.to_str().unwrap()),
    ]);
    let (_, owner) = new_session(&server);
    let admin = server.admin_uri();
    let log = server.log.clone();
    let outcomes = run_local(async {
        let conn = Connection::open(&server.addr).await.unwrap();
        let (session, _) = conn.session(&owner);
        let (share_token, share_id) = mint(&session, "read,append", "writer", 0).await.unwrap();
        let (share, grant) = conn.session(&share_token);
        grant.await.unwrap();
        let client_id = new_client_id();
        let batches: Vec<Vec<TestOp>> = (1..=20).map(|b| vec![put(Message, &format!("b{b}"), "", "{}")]).collect();
        let log_has = |text: &str| std::fs::read_to_string(&log).unwrap_or_default().contains(text);
        let waited = Instant::now();
        let wait_for = |text: &'static str| {
            let log_has = &log_has;
            async move {
                while !log_has(text) {
                    assert!(waited.elapsed() < Duration::from_secs(30), "never logged: {text}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        // Batch 1 first: the writer holds it, alone in its group.
        let first = read_ack(append_request(&share, &client_id, 1, &batches[0]));
        let first = async move { first.await };
        let first = tokio::task::spawn_local(first);
        wait_for("failpoint server-before-commit reached").await;
        // Batches 2..=20 queue up behind it.
        let calls: Vec<_> = batches[1..].iter().enumerate().map(|(i, ops)| read_ack(append_request(&share, &client_id, i as u64 + 2, ops))).collect();
        let appends = futures::future::join_all(calls);
        let revoke = async {
            wait_for("write queued barrier=false urgent=false waiting=19").await;
            let barriers = || std::fs::read_to_string(&log).unwrap_or_default().matches("write queued barrier=true").count();
            let before = barriers();
            let mut request = admin_cap(&conn, &admin.token).revoke_share_request();
            request.get().set_share_id(share_id.as_str());
            let revoked = request.send().promise;
            while barriers() == before {
                assert!(waited.elapsed() < Duration::from_secs(30), "the revocation never reached the writer");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            std::fs::write(&release, b"").unwrap();
            revoked.await.unwrap();
        };
        let (rest, ()) = futures::join!(appends, revoke);
        let mut outcomes = vec![first.await.unwrap()];
        outcomes.extend(rest);
        outcomes.into_iter().zip(batches).collect::<Vec<_>>()
    });
    let applied: std::collections::HashSet<Vec<u8>> = server_log(&server.addr, &owner).into_iter().map(|(_, id)| id).collect();
    let mut revoked = 0;
    for (outcome, ops) in &outcomes {
        let was_applied = applied.contains(&ops[0].op_id);
        match outcome {
            Ok(_) => assert!(was_applied, "an acked batch is applied"),
            Err(err) => {
                assert_eq!(marker_of(err), Some(capsync_schema::Marker::Revoked), "{}", err.extra);
                assert!(!was_applied, "a batch answered capsync/revoked was applied");
                revoked += 1;
            }
        }
    }
    assert!(revoked >= 18, "the revocation waited behind the queued appends: only {revoked} of 20 were refused");
}
