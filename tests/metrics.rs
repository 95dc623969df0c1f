//! `capsync serve --metrics-listen` (issue 18, part 1): the Prometheus exposition counts what
//! happened, with fixed label values and never a token or a session id; `/healthz` answers;
//! `/readyz` says not ready while the store cannot take a write, and ready again after.

mod common;

use capsync_client::Connection;
use capsync_schema::capsync_capnp::EntityKind::Message;
use capsync_schema::{Marker, Token};
use common::*;
use std::io::{Read as _, Write as _};
use std::time::Duration;

/// The value of the sample named exactly `series` (name and labels), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

on_both_stores! {
    #[test]
    fn metrics_count_calls_ops_redeems_and_revocations_with_fixed_labels_only() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with_args(&dir.path().join("data"), &["--metrics-listen", "127.0.0.1:0"]);
        let http = metrics_addr(&server);
        let (session_id, owner) = new_session(&server);
        let forged = Token::generate();
        let share = run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            let client = new_client_id();
            let first = [put(Message, "m1", "", "{}")];
            append(&session, &client, 1, &first).await.unwrap();
            for seq in 2..=3 {
                append(&session, &client, seq, &[put(Message, &format!("m{seq}"), "", "{}")]).await.unwrap();
            }
            // The first op again from another client: a duplicate.
            append(&session, &new_client_id(), 1, &first).await.unwrap();
            let (share, share_id) = mint(&session, "read", "metrics", 0).await.unwrap();
            let admin = admin_cap(&conn, &server.admin_uri().token);
            let mut request = admin.revoke_share_request();
            request.get().set_share_id(share_id.as_str());
            request.send().promise.await.unwrap();
            let (bad, _) = conn.session(&forged);
            assert!(cursor(&bad).await.is_err());
            share
        });

        let (status, text) = get(&http, "/metrics");
        assert_eq!(status, 200);
        assert_eq!(sample(&text, "capsync_calls_total{method=\"append\",outcome=\"ok\"}"), Some(4.0), "{text}");
        assert_eq!(sample(&text, "capsync_ops_total{status=\"applied\"}"), Some(3.0), "{text}");
        assert_eq!(sample(&text, "capsync_ops_total{status=\"duplicate\"}"), Some(1.0), "{text}");
        assert_eq!(sample(&text, "capsync_redeems_total{outcome=\"capsync/unknown-token\"}"), Some(1.0), "{text}");
        assert_eq!(sample(&text, "capsync_revocations_total{kind=\"share\"}"), Some(1.0), "{text}");
        assert!(sample(&text, "capsync_commit_seconds_count").is_some_and(|n| n >= 4.0), "{text}");
        assert!(sample(&text, "capsync_ops_per_commit_sum").is_some_and(|n| n >= 3.0), "{text}");
        assert!(sample(&text, "capsync_connections").is_some(), "{text}");
        // Bounded labels: no id, no token.
        assert!(!text.contains(&session_id), "a session id in a label");
        assert_no_tokens(&text, &[owner, share, forged, server.admin_uri().token], "the metrics");

        // A frame over the message limit: capnp closes the connection; the limit is counted.
        let mut raw = std::net::TcpStream::connect(&server.addr).unwrap();
        raw.write_all(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0x0f]).unwrap();
        let mut sink = Vec::new();
        let _ = raw.read_to_end(&mut sink);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while sample(&get(&http, "/metrics").1, "capsync_limit_refusals_total{reason=\"frame-too-large\"}") != Some(1.0) {
            assert!(std::time::Instant::now() < deadline, "the refused frame was not counted");
            std::thread::sleep(Duration::from_millis(50));
        }

        assert_eq!(get(&http, "/healthz").0, 200);
        assert_eq!(get(&http, "/readyz"), (200, "ready\n".to_owned()));
        assert_eq!(get(&http, "/nothing").0, 404);
    }

    #[test]
    fn epoch_cells_stay_bounded_while_share_tokens_are_redeemed_and_dropped() {
        // Each redeem makes a cell for the share (and its session); closing the connection
        // releases them. Without pruning the gauge ends above SHARES.
        const SHARES: usize = 400;
        const PER_CONNECTION: usize = 25;
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with_args(&dir.path().join("data"), &["--metrics-listen", "127.0.0.1:0"]);
        let http = metrics_addr(&server);
        let cells = || sample(&get(&http, "/metrics").1, "capsync_epoch_cells").expect("capsync_epoch_cells is exposed");
        let (_, owner) = new_session(&server);
        let shares = run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            let mut shares = Vec::new();
            // In rounds: a connection may have 256 calls in flight.
            for _ in 0..SHARES / 100 {
                let minted = futures::future::join_all((0..100).map(|_| mint(&session, "read", "cells", 0))).await;
                shares.extend(minted.into_iter().map(Result::unwrap));
            }
            conn.close().await;
            shares
        });
        let mut most = 0.0f64;
        for chunk in shares.chunks(PER_CONNECTION) {
            run_local(async {
                let conn = Connection::open(&server.addr).await.unwrap();
                let caps: Vec<_> = chunk.iter().map(|(token, _)| conn.session(token).0).collect();
                for read in futures::future::join_all(caps.iter().map(cursor)).await {
                    read.unwrap();
                }
                conn.close().await;
            });
            most = most.max(cells());
        }
        assert!(most < (SHARES / 2) as f64, "{most} epoch cells after {SHARES} redeems, at most {PER_CONNECTION} of them live at once");

        // The first share's cell was swept long ago: redeemed again it gets a fresh one, which
        // its revocation still reaches at once.
        let (token, share_id) = &shares[0];
        run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (share, _) = conn.session(token);
            cursor(&share).await.unwrap();
            let admin = admin_cap(&conn, &server.admin_uri().token);
            let mut request = admin.revoke_share_request();
            request.get().set_share_id(share_id.as_str());
            request.send().promise.await.unwrap();
            assert_marker(cursor(&share).await, Marker::Revoked);
            let other = Connection::open(&server.addr).await.unwrap();
            assert_marker(cursor(&other.session(token).0).await, Marker::Revoked);
        });
    }

    #[test]
    fn readyz_is_not_ready_once_shutdown_begins() {
        let dir = tempfile::tempdir().unwrap();
        // The held write keeps the shutdown from finishing (it drains the writer), so the endpoint
        // is still up to be asked.
        let (mut server, http, release, writer) = held_writer(dir.path());
        let status = std::process::Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap();
        assert!(status.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let seen = loop {
            let (status, body) = get(&http, "/readyz");
            if status == 503 && body.contains("shutting down") {
                break true;
            }
            if std::time::Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        std::fs::write(&release, b"").unwrap();
        let _ = writer.join().unwrap();
        assert!(seen, "/readyz never said it was shutting down");
        assert!(server.stop_wait().success(), "the server finished its shutdown");
    }

    #[test]
    fn applied_ops_in_the_metrics_equal_what_a_push_acked() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with_args(&dir.path().join("data"), &["--metrics-listen", "127.0.0.1:0"]);
        let http = metrics_addr(&server);
        let (_, owner) = new_session(&server);
        let uri = capsync_schema::SturdyUri::new(server.addr.clone(), owner).expose();
        let applied = |text: &str| sample(text, "capsync_ops_total{status=\"applied\"}").unwrap_or(0.0);
        let mut seen = vec![applied(&get(&http, "/metrics").1)];
        let file = dir.path().join("ops.jsonl");
        write_jsonl(&file, 5000, "m");
        let mut push = std::process::Command::new(BIN)
            .args(["push", &uri, "--file", file.to_str().unwrap()])
            .env("CAPSYNC_OUTBOX", dir.path().join("outbox.db"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Scraped while the push runs (how many scrapes land mid-push depends on the machine).
        while push.try_wait().unwrap().is_none() {
            seen.push(applied(&get(&http, "/metrics").1));
        }
        let mut printed = String::new();
        push.stdout.take().unwrap().read_to_string(&mut printed).unwrap();
        assert!(push.wait().unwrap().success());
        assert!(printed.contains("pushed 5000 ops"), "{printed}");
        seen.push(applied(&get(&http, "/metrics").1));
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "the counter only grows: {seen:?}");
        assert_eq!((seen[0], *seen.last().unwrap()), (0.0, 5000.0), "applied ops = what the push acked");
    }
}

/// A server whose first append holds the writer inside its transaction until `release` exists,
/// with an append in flight that is held there.
fn held_writer(dir: &std::path::Path) -> (Server, String, std::path::PathBuf, std::thread::JoinHandle<Result<u64, capnp::Error>>) {
    let release = dir.join("release");
    let release_text = release.to_str().unwrap().to_owned();
    let server = Server::start_with(
        &dir.join("data"),
        &[("CAPSYNC_FAILPOINTS", "server-before-commit=1:hold"), ("CAPSYNC_FAILPOINTS_RELEASE", &release_text)],
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let http = metrics_addr(&server);
    assert_eq!(get(&http, "/readyz").0, 200);
    let (_, owner) = new_session(&server);
    let addr = server.addr.clone();
    let writer = std::thread::spawn(move || {
        run_local(async {
            let conn = Connection::open(&addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            append(&session, &new_client_id(), 1, &[put(Message, "m", "", "{}")]).await.map(|ack| ack.cursor)
        })
    });
    while !server.log_text().contains("server-before-commit reached: holding") {
        std::thread::sleep(Duration::from_millis(50));
    }
    (server, http, release, writer)
}

/// SQLite only: a write held on the writer thread (on PostgreSQL, see tests/postgres_faults.rs).
#[test]
fn readyz_is_not_ready_while_the_store_cannot_take_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, http, release, writer) = held_writer(dir.path());
    let (status, body) = get(&http, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("write probe"), "{body}");
    assert_eq!(get(&http, "/healthz").0, 200, "alive all the same");
    std::fs::write(&release, b"").unwrap();
    assert_eq!(writer.join().unwrap().unwrap(), 1);
    assert_eq!(get(&http, "/readyz").0, 200);
    server.stop();
}
