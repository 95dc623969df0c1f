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

#[test]
fn a_second_server_on_a_data_dir_in_use_refuses_to_start_and_leaves_admin_uri_alone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = Server::start(&data);
    let before = std::fs::read_to_string(data.join("admin.uri")).unwrap();
    let second = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .stdin(Stdio::null())
        .output()
        .unwrap();
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
