//! Several `capsync serve` nodes on one PostgreSQL (issue 16), as real processes on a fresh
//! database of the binary's throwaway cluster: a share minted on one node is followed on
//! another while writers push through both; a revocation through one node ends a live
//! capability and a subscription on the other; a client whose node is killed (-9) reconnects
//! through a balancer to another node and replays with nothing lost or doubled.

mod common;

use capsync_client::{Client, Connection, SyncOptions};
use capsync_schema::capsync_capnp::listener;
use capsync_schema::capsync_capnp::EntityKind::Message;
use capsync_schema::{Marker, SturdyUri, Token};
use capsync_store_postgres::testing::fresh_database;
use common::checker;
use common::proxy::Proxy;
use common::*;
use std::cell::RefCell;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A node on `url` with its own data dir `<dir>/<name>`.
fn node(dir: &std::path::Path, name: &str, url: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--store", url];
    args.extend_from_slice(extra);
    Server::start_with_args(&dir.join(name), &args)
}

/// `uri` with its address replaced by `addr`: the same token, dialled at another node.
fn at(addr: &str, uri: &str) -> String {
    SturdyUri::new(addr.to_owned(), SturdyUri::parse(uri).unwrap().token).expose()
}

fn run_cli(outbox: &std::path::Path, args: &[&str]) -> String {
    let out = capsync(outbox, args, &[]);
    assert!(out.status.success(), "capsync {}: {}", args[0], String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn a_share_minted_on_one_node_is_followed_on_another_while_writers_push_through_both() {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database();
    let a = node(dir.path(), "a", &url, &[]);
    let b = node(dir.path(), "b", &url, &[]);
    assert_ne!(
        std::fs::read_to_string(dir.path().join("a/admin.uri")).unwrap(),
        std::fs::read_to_string(dir.path().join("b/admin.uri")).unwrap(),
        "each node writes an admin token of its own"
    );
    let admin_b = dir.path().join("b/admin.uri");
    // Created through B, shared through A, followed on B, written through both.
    let owner_b = run_cli(&dir.path().join("x.db"), &["admin", "--admin-file", admin_b.to_str().unwrap(), "create-session", "--title", "two nodes"]);
    let owner_a = at(&a.addr, &owner_b);
    let reader_a = run_cli(&dir.path().join("x.db"), &["share", &owner_a, "--rights", "read", "--label", "follower"]);
    let reader_b = at(&b.addr, &reader_a);

    let (mut tail, lines) = follower(&reader_b, &dir.path().join("tail.db"));

    const EACH: usize = 1500;
    let writers: Vec<_> = [(&owner_a, "a"), (&owner_b, "b")]
        .into_iter()
        .map(|(uri, name)| {
            let ops = dir.path().join(format!("{name}.jsonl"));
            write_jsonl(&ops, EACH, name);
            Command::new(BIN)
                .args(["push", uri, "--file", ops.to_str().unwrap()])
                .env("CAPSYNC_OUTBOX", dir.path().join(format!("{name}.db")))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for writer in writers {
        let out = writer.wait_with_output().unwrap();
        assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
    }

    let mut seqs = Vec::new();
    let mut ids = std::collections::HashSet::new();
    while seqs.len() < 2 * EACH {
        let line = lines.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("the follower on B stopped at {} of {} ops", seqs.len(), 2 * EACH));
        let op: serde_json::Value = serde_json::from_str(&line).unwrap();
        seqs.push(op["seq"].as_u64().unwrap());
        assert!(ids.insert(op["id"].as_str().unwrap().to_owned()), "an op delivered twice: {line}");
    }
    tail.kill().unwrap();
    tail.wait().unwrap();
    assert_eq!(seqs, (1..=2 * EACH as u64).collect::<Vec<_>>(), "every op in seq order, no gap, no duplicate");
    assert!(ids.iter().filter(|id| id.starts_with('a')).count() == EACH && ids.iter().filter(|id| id.starts_with('b')).count() == EACH);
    let tokens = [SturdyUri::parse(&owner_b).unwrap().token, SturdyUri::parse(&reader_a).unwrap().token, a.admin_uri().token, b.admin_uri().token];
    assert_no_tokens(&a.log_text(), &tokens, "node A's log");
    assert_no_tokens(&b.log_text(), &tokens, "node B's log");
}

/// Records how a subscription ended.
struct Ended(Rc<RefCell<Option<String>>>);

impl listener::Server for Ended {
    async fn on_ops(self: Rc<Self>, _: listener::OnOpsParams) -> Result<(), capnp::Error> {
        Ok(())
    }
    async fn on_end(self: Rc<Self>, params: listener::OnEndParams, _: listener::OnEndResults) -> Result<(), capnp::Error> {
        *self.0.borrow_mut() = Some(params.get()?.get_reason()?.to_string()?);
        Ok(())
    }
}

#[test]
fn a_revocation_through_one_node_ends_live_capabilities_and_subscriptions_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database();
    let a = node(dir.path(), "a", &url, &[]);
    let b = node(dir.path(), "b", &url, &[]);
    let (_, owner) = new_session(&a);
    let admin_b = dir.path().join("b/admin.uri").to_str().unwrap().to_owned();
    let (waited, applied_after, reason) = run_local(async {
        let conn = Connection::open(&a.addr).await.unwrap();
        let (session, _) = conn.session(&owner);
        let (writer_token, share_id) = mint(&session, "read,append", "writer", 0).await.unwrap();
        let (share, grant) = conn.session(&writer_token);
        grant.await.unwrap();
        let client = new_client_id();
        append(&share, &client, 1, &[put(Message, "before", "", "{}")]).await.unwrap();
        let ended = Rc::new(RefCell::new(None));
        let mut request = share.subscribe_request();
        request.get().set_after(0);
        request.get().set_listener(capnp_rpc::new_client(Ended(ended.clone())));
        let _subscription = request.send().promise.await.unwrap();

        // Revoked through node B, by another process.
        let revoke = tokio::task::spawn_blocking(move || cli(&["admin", "--admin-file", &admin_b, "revoke-share", &share_id]));
        let (ok, _, stderr) = revoke.await.unwrap();
        assert!(ok, "{stderr}");
        let revoked_at = Instant::now();
        // The live capability on A fails its next call with capsync/revoked ...
        loop {
            match cursor(&share).await {
                Err(err) => {
                    assert_eq!(marker_of(&err), Some(Marker::Revoked), "{err}");
                    break;
                }
                Ok(_) => {
                    assert!(revoked_at.elapsed() < Duration::from_secs(10), "node A never heard of the revocation");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
        let waited = revoked_at.elapsed();
        // ... writes through it are refused, and its subscription ended with onEnd("revoked").
        assert_marker(append(&share, &client, 2, &[put(Message, "after", "", "{}")]).await, Marker::Revoked);
        while ended.borrow().is_none() && revoked_at.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let reason = ended.borrow().clone();
        (waited, cursor(&session).await.unwrap(), reason)
    });
    println!("a revocation through node B reached a live capability on node A in {waited:?}");
    assert_eq!(reason.as_deref(), Some("revoked"));
    assert_eq!(applied_after, 1, "nothing was applied after the revocation's commit");
    assert_no_tokens(&a.log_text(), std::slice::from_ref(&owner), "node A's log");
    assert_no_tokens(&b.log_text(), &[owner], "node B's log");
}

#[test]
fn a_client_whose_node_is_killed_replays_through_the_balancer_on_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database();
    // The balancer comes first, so the nodes can advertise it.
    let balancer = Proxy::start_balancing(&[]);
    let mut a = node(dir.path(), "a", &url, &["--advertise", &balancer.addr]);
    let b = node(dir.path(), "b", &url, &["--advertise", &balancer.addr]);
    balancer.set_upstreams(&[&a.addr, &b.addr]);
    assert_eq!(a.admin_uri().address, balancer.addr, "admin.uri names the address clients should dial");
    let admin_file = dir.path().join("a/admin.uri");
    let owner = run_cli(&dir.path().join("x.db"), &["admin", "--admin-file", admin_file.to_str().unwrap(), "create-session", "--title", "balanced"]);
    assert_eq!(SturdyUri::parse(&owner).unwrap().address, balancer.addr, "URIs made from it name the balancer");
    let token: Token = SturdyUri::parse(&owner).unwrap().token;
    // The client's first connection goes to A, the one that dies.
    balancer.set_upstreams(&[&a.addr, &b.addr]);

    let options = SyncOptions {
        ack_timeout: Duration::from_millis(800),
        connect_timeout: Duration::from_millis(800),
        max_attempts: 100,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        max_batch_ops: 100,
        ..SyncOptions::default()
    };
    let client = Client::open(dir.path().join("c.db")).unwrap().with_options(options);
    client.attach("s", &owner).unwrap();
    client.enqueue("s", messages(0..20_000, "m")).unwrap();
    let (a_addr, b_addr) = (a.addr.clone(), b.addr.clone());
    let killer = {
        let token = token.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while server_cursor(&a_addr, &token).unwrap_or(0) < 2_000 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let (report, killed_mid_sync) = run_local(async {
        let sync = client.sync("s");
        tokio::pin!(sync);
        // Kill node A (-9) while the push runs.
        let killed = tokio::task::spawn_blocking(move || killer.join());
        tokio::select! {
            result = &mut sync => (result, false),
            _ = killed => {
                a.kill();
                (sync.await, true)
            }
        }
    });
    assert!(killed_mid_sync, "node A died while the sync ran");
    let report = report.expect("the sync rides out the node's death through the other node");
    println!("sync with node A killed midway: {} batches, {} duplicates", report.batches, report.duplicates);
    let history = checker::history(&dir.path().join("c.db"));
    let verdict = checker::check(&[history], &server_log(&b_addr, &token), true).unwrap();
    assert_eq!(verdict.logged, 20_000);
    assert_no_tokens(&b.log_text(), &[token], "node B's log");
}

/// The guarantee that does not depend on notifications: an append already past node A's
/// in-memory epoch check when a revocation commits through node B is refused by the epoch
/// check inside its own transaction, and nothing of it is applied.
#[test]
fn an_append_in_flight_when_a_revocation_commits_elsewhere_is_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    // A's second append waits before its transaction begins, until `release` exists.
    let HeldPair { a, b, owner, admin_b, release } = held_pair(dir.path(), "server-append-begin=2:hold");
    let (held, cursor_after) = run_local(async {
        let conn = Connection::open(&a.addr).await.unwrap();
        let (session, _) = conn.session(&owner);
        let (writer_token, share_id) = mint(&session, "read,append", "writer", 0).await.unwrap();
        let (share, _) = conn.session(&writer_token);
        let client = new_client_id();
        append(&share, &client, 1, &[put(Message, "before", "", "{}")]).await.unwrap();
        let held = tokio::task::spawn_local({
            let share = share.clone();
            let client = client.clone();
            async move { append(&share, &client, 2, &[put(Message, "in-flight", "", "{}")]).await }
        });
        let log = a.log.clone();
        tokio::task::spawn_blocking(move || {
            while !std::fs::read_to_string(&log).unwrap_or_default().contains("server-append-begin reached: holding") {
                std::thread::sleep(Duration::from_millis(20));
            }
            let (ok, _, stderr) = cli(&["admin", "--admin-file", &admin_b, "revoke-share", &share_id]);
            assert!(ok, "{stderr}");
            std::fs::write(&release, b"").unwrap();
        })
        .await
        .unwrap();
        (held.await.unwrap(), cursor(&session).await.unwrap())
    });
    assert_eq!(held.err().as_ref().and_then(marker_of), Some(Marker::Revoked), "the in-flight append is refused as revoked");
    assert_eq!(cursor_after, 1, "nothing of it was applied after the revocation's commit");
    drop(b);
}

/// Node A, whose failpoint `spec` (a `hold`) waits until `release` exists, and node B, on one
/// fresh database; the owner token of a session made on A; node B's admin file.
struct HeldPair {
    a: Server,
    b: Server,
    owner: Token,
    admin_b: String,
    release: std::path::PathBuf,
}

fn held_pair(dir: &std::path::Path, spec: &str) -> HeldPair {
    let url = fresh_database();
    let release = dir.join("release");
    let a = Server::start_with(
        &dir.join("a"),
        &[("CAPSYNC_FAILPOINTS", spec), ("CAPSYNC_FAILPOINTS_RELEASE", release.to_str().unwrap())],
        &["--store", &url],
    );
    let b = node(dir, "b", &url, &[]);
    let (_, owner) = new_session(&a);
    let admin_b = dir.join("b/admin.uri").to_str().unwrap().to_owned();
    HeldPair { a, b, owner, admin_b, release }
}

/// Issue 16 point 2, "calls in flight on A fail": an `info` on node A already past its epoch
/// check and waiting on PostgreSQL (its read held by a failpoint) answers `capsync/revoked`
/// once node A hears of a revocation committed through node B, while its read is still held.
#[test]
fn a_call_in_flight_on_one_node_fails_revoked_when_a_revocation_commits_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let HeldPair { a, b, owner, admin_b, release } = held_pair(dir.path(), "server-read-session=1:hold");
    let answer = run_local(async {
        let conn = Connection::open(&a.addr).await.unwrap();
        let (session, _) = conn.session(&owner);
        let (reader_token, share_id) = mint(&session, "read", "reader", 0).await.unwrap();
        let (share, grant) = conn.session(&reader_token);
        grant.await.unwrap();
        let revoke = move || {
            let (ok, _, stderr) = cli(&["admin", "--admin-file", &admin_b, "revoke-share", &share_id]);
            assert!(ok, "{stderr}");
        };
        answer_before_release(&a, "server-read-session", &release, async move { cursor(&share).await }, revoke).await
    });
    assert_marker(answer, Marker::Revoked);
    drop(b);
}
