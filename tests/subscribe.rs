//! Issue 4 acceptance: live subscriptions against a real server on 127.0.0.1.

mod common;

use capsync_client::{Client, Connection, SyncOptions};
use capsync_persistence::EntityKind;
use capsync_schema::capsync_capnp::{listener, session, subscription};
use capsync_schema::SturdyUri;
use common::proxy::Proxy;
use common::*;
use rand::{Rng as _, SeedableRng as _};
use std::cell::RefCell;
use std::path::Path;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// What a test listener saw.
#[derive(Default)]
struct Seen {
    seqs: Vec<u64>,
    ends: Vec<(String, Instant)>,
    /// Arrival time of each seq, for latency figures.
    arrivals: Vec<(u64, Instant)>,
}

struct TestListener {
    seen: Rc<RefCell<Seen>>,
    /// While false, onOps does not return: the listener has stopped reading.
    gate: tokio::sync::watch::Receiver<bool>,
}

impl listener::Server for TestListener {
    async fn on_ops(self: Rc<Self>, params: listener::OnOpsParams) -> Result<(), capnp::Error> {
        let mut gate = self.gate.clone();
        let _ = gate.wait_for(|open| *open).await;
        let now = Instant::now();
        let ops = params.get()?.get_ops()?;
        let mut seen = self.seen.borrow_mut();
        for op in ops.iter() {
            seen.seqs.push(op.get_seq());
            seen.arrivals.push((op.get_seq(), now));
        }
        Ok(())
    }

    async fn on_end(self: Rc<Self>, params: listener::OnEndParams, _: listener::OnEndResults) -> Result<(), capnp::Error> {
        let reason = params.get()?.get_reason()?.to_string()?;
        self.seen.borrow_mut().ends.push((reason, Instant::now()));
        Ok(())
    }
}

/// Subscribes after `after`; returns what it sees, the gate's sender and the subscription.
async fn subscribe(
    session: &session::Client,
    after: u64,
    open: bool,
) -> (Rc<RefCell<Seen>>, tokio::sync::watch::Sender<bool>, subscription::Client) {
    let seen = Rc::new(RefCell::new(Seen::default()));
    let (gate_tx, gate) = tokio::sync::watch::channel(open);
    let listener: listener::Client = capnp_rpc::new_client(TestListener { seen: seen.clone(), gate });
    let mut request = session.subscribe_request();
    request.get().set_after(after);
    request.get().set_listener(listener);
    let response = request.send().promise.await.unwrap();
    let sub = response.get().unwrap().get_subscription().unwrap();
    (seen, gate_tx, sub)
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

on_both_stores! {
    #[test]
    fn a_follower_prints_every_seq_once_in_order_across_a_server_kill() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut server = Server::start(&data);
        let addr = server.addr.clone();
        let (_, owner) = new_session(&server);
        let uri = SturdyUri::new(addr.clone(), owner.clone()).expose();
        let tail_out = dir.path().join("tail.jsonl");
        let mut tail = Command::new(BIN)
            .args(["tail", &uri, "--json", "--outbox"])
            .arg(dir.path().join("tail.db"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&tail_out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The follower is subscribed once the server counts a subscription.
        let admin_file = data.join("admin.uri");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (ok, stdout, _) = cli(&["admin", "--admin-file", admin_file.to_str().unwrap(), "stats", "--json"]);
            if ok && serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["subscriptions"] == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "the follower never subscribed");
            std::thread::sleep(Duration::from_millis(20));
        }

        let ops = dir.path().join("ops.jsonl");
        write_jsonl(&ops, 5000, "t");
        let outbox = dir.path().join("push.db");
        let mut push = Command::new(BIN)
            .args(["push", &uri, "--file", ops.to_str().unwrap(), "--outbox", outbox.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while server_cursor(&addr, &owner).unwrap_or(0) < 1000 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        server.kill();
        let _ = push.wait();
        let _server = Server::start_at(&data, &addr);
        let sync = Command::new(BIN).args(["sync", "--outbox", outbox.to_str().unwrap()]).output().unwrap();
        assert!(sync.status.success(), "{}", String::from_utf8_lossy(&sync.stderr));

        let deadline = Instant::now() + Duration::from_secs(60);
        let seqs = loop {
            let text = std::fs::read_to_string(&tail_out).unwrap();
            let seqs: Vec<u64> = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .map(|v| v["seq"].as_u64().unwrap())
                .collect();
            if seqs.len() >= 5000 || Instant::now() > deadline {
                break seqs;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        tail.kill().unwrap();
        tail.wait().unwrap();
        assert_eq!(seqs, (1..=5000).collect::<Vec<u64>>(), "every seq exactly once, in order");
    }

    #[test]
    fn a_stalled_listener_costs_bounded_memory_does_not_slow_the_writer_and_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        let uri = SturdyUri::new(server.addr.clone(), owner.clone()).expose();
        let n = 100_000;
        let base = dir.path().to_owned();
        let push = move |name: &str| -> f64 {
            let ops = base.join(format!("{name}.jsonl"));
            write_jsonl(&ops, n, name);
            let started = Instant::now();
            let out = Command::new(BIN)
                .args(["push", &uri, "--file", ops.to_str().unwrap(), "--outbox"])
                .arg(base.join(format!("{name}.db")))
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            n as f64 / started.elapsed().as_secs_f64()
        };
        let unobstructed = push("free");
        run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            let (seen, gate, _sub) = subscribe(&session, n as u64, false).await;
            let rss_before = rss_kib(server.pid());
            let stalled_at = Instant::now();
            let pushed = tokio::task::spawn_blocking({
                let push = push.clone();
                move || push("stalled")
            });
            let obstructed = pushed.await.unwrap();
            let rss_after = rss_kib(server.pid());
            tokio::time::sleep(Duration::from_secs(10).saturating_sub(stalled_at.elapsed())).await;
            let growth_mib = rss_after.saturating_sub(rss_before) as f64 / 1024.0;
            println!(
                "stalled listener: server RSS {} -> {} KiB (+{growth_mib:.1} MiB); writer {obstructed:.0} ops/s vs {unobstructed:.0} ops/s unobstructed ({:.2}x)",
                rss_before,
                rss_after,
                obstructed / unobstructed
            );
            assert!(growth_mib < 64.0, "server memory grew {growth_mib:.1} MiB");
            assert!(obstructed >= 0.5 * unobstructed, "the stalled listener slowed the writer to {obstructed:.0} ops/s");
            assert!(seen.borrow().seqs.is_empty(), "the listener was stalled");
            gate.send(true).unwrap();
            wait_until("the listener caught up", Duration::from_secs(120), || seen.borrow().seqs.len() >= n).await;
            let expected: Vec<u64> = (n as u64 + 1..=2 * n as u64).collect();
            assert_eq!(seen.borrow().seqs, expected, "nothing missing, nothing doubled, in order");
        });
    }

    #[test]
    fn revoking_a_share_ends_its_subscriptions_with_on_end_revoked_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let admin = server.admin_uri();
        run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (_, owner) = create_session(&conn, &admin.token, "revoke live").await;
            let (session, _) = conn.session(&owner);
            let (share, share_id) = mint(&session, "read,mint", "follower", 0).await.unwrap();
            let (shared_session, _) = conn.session(&share);
            let (child, _) = mint(&shared_session, "read", "grandchild", 0).await.unwrap();
            let other = Connection::open(&server.addr).await.unwrap();
            let (follower, _) = other.session(&share);
            let (below, _) = other.session(&child);
            let (seen, _gate, _sub) = subscribe(&follower, 0, true).await;
            let (seen_below, _gate2, _sub2) = subscribe(&below, 0, true).await;
            let (seen_owner, _gate3, _sub3) = subscribe(&session, 0, true).await;
            append(&session, &new_client_id(), 1, &[put(capsync_schema::capsync_capnp::EntityKind::Message, "m1", "", "{}")]).await.unwrap();
            wait_until("the op reached the followers", Duration::from_secs(10), || seen.borrow().seqs == [1] && seen_below.borrow().seqs == [1]).await;

            let admin_cap = admin_cap(&conn, &admin.token);
            let mut request = admin_cap.revoke_share_request();
            request.get().set_share_id(share_id.as_str());
            let started = Instant::now();
            request.send().promise.await.unwrap();
            wait_until("onEnd arrived", Duration::from_secs(5), || !seen.borrow().ends.is_empty() && !seen_below.borrow().ends.is_empty()).await;
            let latency = seen.borrow().ends[0].1 - started;
            let latency_below = seen_below.borrow().ends[0].1 - started;
            println!("onEnd(\"revoked\") {latency:?} after revokeShare was called ({latency_below:?} for the share below)");
            assert_eq!(seen.borrow().ends[0].0, "revoked");
            assert_eq!(seen_below.borrow().ends[0].0, "revoked");
            assert!(latency < Duration::from_millis(100) && latency_below < Duration::from_millis(100));
            assert!(seen_owner.borrow().ends.is_empty(), "the owner's subscription goes on");
        });
    }

    #[test]
    fn three_writers_through_a_cutting_proxy_converge_with_the_server() {
        let seed: u64 = std::env::var("CAPSYNC_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
        println!("seed {seed} (CAPSYNC_TEST_SEED={seed} reproduces the cut schedule)");
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        let proxy = Proxy::start(&server.addr);
        let options = SyncOptions { max_batch_ops: 20, max_attempts: 3, backoff_max: Duration::from_millis(200), ..SyncOptions::default() };
        let clients: Vec<Client> = (0..3)
            .map(|i| {
                let client = Client::open(dir.path().join(format!("c{i}.db"))).unwrap().with_options(options.clone());
                client.attach("s", &proxy.uri(&owner)).unwrap();
                client
            })
            .collect();
        run_local(async {
            let writing_done = Rc::new(std::cell::Cell::new(false));
            let (stop_followers, stopped) = tokio::sync::watch::channel(false);
            let mut followers = Vec::new();
            for client in &clients {
                let client = client.clone();
                let mut stopped = stopped.clone();
                followers.push(tokio::task::spawn_local(async move {
                    client.follow("s", |_| {}, async move { let _ = stopped.wait_for(|s| *s).await; }).await
                }));
            }
            let cutter = tokio::task::spawn_local({
                let done = writing_done.clone();
                let proxy_cut = move || proxy.cut();
                async move {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                    let mut cuts = 0;
                    while !done.get() {
                        tokio::time::sleep(Duration::from_millis(rng.random_range(20..120))).await;
                        proxy_cut();
                        cuts += 1;
                    }
                    cuts
                }
            });
            let mut writers = Vec::new();
            for (i, client) in clients.iter().enumerate() {
                let client = client.clone();
                writers.push(tokio::task::spawn_local(async move {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (i as u64 + 1));
                    for round in 0..15 {
                        let changes: Vec<_> = (0..40)
                            .map(|k| {
                                // Shared ids, so writers overwrite and delete each other's entities.
                                let id = format!("e{}", rng.random_range(0..60));
                                if rng.random_bool(0.15) {
                                    capsync_client::Change::Delete { kind: EntityKind::Message, id }
                                } else {
                                    let data = format!("{{\"writer\":{i},\"round\":{round},\"k\":{k}}}");
                                    capsync_client::Change::Put { kind: EntityKind::Message, id, parent: String::new(), data: data.into_bytes() }
                                }
                            })
                            .collect();
                        client.enqueue("s", changes).unwrap();
                        let _ = client.sync("s").await;
                    }
                    loop {
                        match client.sync("s").await {
                            Ok(_) => break,
                            Err(err) => assert!(err.is_retryable(), "{err}"),
                        }
                    }
                }));
            }
            for writer in writers {
                writer.await.unwrap();
            }
            writing_done.set(true);
            let cuts = cutter.await.unwrap();
            let server_conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = server_conn.session(&owner);
            let (server_at, entities) = snapshot(&session, 0).await.unwrap();
            assert_eq!(server_at, 3 * 15 * 40, "every op applied exactly once");
            for (i, client) in clients.iter().enumerate() {
                wait_until("the replica reached the server's cursor", Duration::from_secs(60), || client.replica("s").unwrap().0 == server_at).await;
                let (_, replica) = client.replica("s").unwrap();
                let replica: Vec<_> = replica.iter().map(|e| (e.id.clone(), String::from_utf8(e.data.clone()).unwrap())).collect();
                let expected: Vec<_> = entities.iter().map(|e| (e.1.clone(), e.3.clone())).collect();
                assert_eq!(replica, expected, "client {i}'s replica equals the server snapshot");
            }
            stop_followers.send(true).unwrap();
            for follower in followers {
                follower.await.unwrap().unwrap();
            }
            println!("{cuts} connection cuts; {} entities converged", entities.len());
        });
    }

    #[test]
    fn a_hundred_subscribers_each_receive_every_op() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        run_local(async {
            let mut conns = Vec::new();
            let mut subs = Vec::new();
            for i in 0..100 {
                if i % 10 == 0 {
                    conns.push(Connection::open(&server.addr).await.unwrap());
                }
                let (session, _) = conns.last().unwrap().session(&owner);
                subs.push(subscribe(&session, 0, true).await);
            }
            let writer = Connection::open(&server.addr).await.unwrap();
            let (session, _) = writer.session(&owner);
            let client = new_client_id();
            let mut sent_at = Vec::new();
            for b in 0..100u64 {
                let ops: Vec<_> = (0..10).map(|k| put(capsync_schema::capsync_capnp::EntityKind::Message, &format!("m{b}-{k}"), "", "{}")).collect();
                let started = Instant::now();
                append(&session, &client, b + 1, &ops).await.unwrap();
                sent_at.push(started);
            }
            wait_until("all subscribers got all ops", Duration::from_secs(60), || subs.iter().all(|s| s.0.borrow().seqs.len() >= 1000)).await;
            let expected: Vec<u64> = (1..=1000).collect();
            let mut latencies = Vec::new();
            for (seen, _, _) in &subs {
                assert_eq!(seen.borrow().seqs, expected);
                for (seq, at) in &seen.borrow().arrivals {
                    latencies.push(*at - sent_at[((seq - 1) / 10) as usize]);
                }
            }
            latencies.sort();
            let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
            println!("100 subscribers x 1000 ops: delivery latency from append start p50 {:?} p99 {:?}", p(0.5), p(0.99));
        });
    }

    #[test]
    fn dropping_the_subscription_ends_it_and_shutdown_ends_the_rest_with_on_end() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let server = Server::start(&data);
        let (_, owner) = new_session(&server);
        let seen = run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            let (_, _gate, dropped) = subscribe(&session, 0, true).await;
            let (kept, _gate2, _sub) = subscribe(&session, 0, true).await;
            assert_eq!(admin_stats(&data)["subscriptions"], 2);
            drop(dropped);
            wait_until("the dropped subscription ended", Duration::from_secs(10), || admin_stats(&data)["subscriptions"] == 1).await;

            // SIGTERM: the remaining subscription gets onEnd("shutdown") before the server exits.
            let pid = server.pid().to_string();
            assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
            wait_until("onEnd arrived", Duration::from_secs(10), || !kept.borrow().ends.is_empty()).await;
            let ends = kept.borrow().ends.iter().map(|e| e.0.clone()).collect::<Vec<_>>();
            ends
        });
        assert_eq!(seen, ["shutdown"]);
    }
}

fn admin_stats(data: &Path) -> serde_json::Value {
    let (ok, stdout, stderr) = cli(&["admin", "--admin-file", data.join("admin.uri").to_str().unwrap(), "stats", "--json"]);
    assert!(ok, "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}
