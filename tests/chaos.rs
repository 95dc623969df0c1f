//! Issue 5: a seeded chaos run. N clients write M ops each into one session through a proxy
//! while a driver cuts connections, drops replies and kills (-9) and restarts the server; then
//! every outbox is drained, every client pulls its replica, and the history checker judges.
//!
//! `CAPSYNC_CHAOS_SEED` reproduces a run (the seed is printed); `CAPSYNC_CHAOS_SCALE` (default
//! 1) multiplies the ops. `cargo test --release --test chaos` runs it at CI scale.

mod common;

use capsync_client::{Change, Client, Connection, SyncOptions};
use capsync_persistence::EntityKind;
use common::checker;
use common::proxy::Proxy;
use common::*;
use rand::{Rng as _, SeedableRng as _};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn chaos() {
    let seed = env_u64("CAPSYNC_CHAOS_SEED").unwrap_or_else(rand::random);
    let scale = env_u64("CAPSYNC_CHAOS_SCALE").unwrap_or(1).max(1);
    let (clients_n, ops_per_client) = (3usize, 600 * scale as usize);
    println!("chaos seed {seed} scale {scale}: CAPSYNC_CHAOS_SEED={seed} CAPSYNC_CHAOS_SCALE={scale} reproduces it");

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data);
    let addr = server.addr.clone();
    let admin = server.admin_uri();
    let owner = run_local(async {
        let conn = Connection::open(&addr).await.unwrap();
        create_session(&conn, &admin.token, "chaos").await.1
    });
    let proxy = Rc::new(Proxy::start(&addr));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let clients: Vec<Client> = (0..clients_n)
        .map(|i| {
            let options = SyncOptions {
                max_batch_ops: rng.random_range(5..60),
                window: rng.random_range(1..16),
                max_attempts: 2,
                backoff_base: Duration::from_millis(10),
                backoff_max: Duration::from_millis(200),
                connect_timeout: Duration::from_secs(2),
                ack_timeout: Duration::from_secs(2),
                ..SyncOptions::default()
            };
            let client = Client::open(dir.path().join(format!("c{i}.db"))).unwrap().with_options(options);
            client.attach("s", &proxy.uri(&owner)).unwrap();
            client
        })
        .collect();

    let server = Rc::new(RefCell::new(server));
    let (cuts, drops, kills) = run_local(async {
        let done = Rc::new(Cell::new(false));
        let mut writers = Vec::new();
        for (i, client) in clients.iter().enumerate() {
            let client = client.clone();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (i as u64 + 1) * 0x9E37_79B9);
            writers.push(tokio::task::spawn_local(async move {
                let mut created = 0;
                while created < ops_per_client {
                    let chunk = rng.random_range(1..25).min(ops_per_client - created);
                    let changes: Vec<Change> = (0..chunk)
                        .map(|k| {
                            // Own ids and shared ones, so writers overwrite and delete each other's.
                            let id = if rng.random_bool(0.5) { format!("c{i}-{}", created + k) } else { format!("s{}", rng.random_range(0..40)) };
                            if rng.random_bool(0.1) {
                                Change::Delete { kind: EntityKind::Message, id }
                            } else {
                                Change::Put { kind: EntityKind::Message, id, parent: String::new(), data: format!("{{\"c\":{i},\"n\":{}}}", created + k).into_bytes() }
                            }
                        })
                        .collect();
                    client.enqueue("s", changes).unwrap();
                    created += chunk;
                    let _ = client.sync("s").await;
                    tokio::time::sleep(Duration::from_millis(rng.random_range(5..45))).await;
                }
            }));
        }
        let driver = tokio::task::spawn_local({
            let (done, proxy, server, addr, data) = (done.clone(), proxy.clone(), server.clone(), addr.clone(), data.clone());
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xC4A0_5C4A);
            async move {
                let (mut cuts, mut drops, mut kills) = (0, 0, 0);
                while !done.get() {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(20..150))).await;
                    match rng.random_range(0..10) {
                        0..=4 => {
                            proxy.cut();
                            cuts += 1;
                        }
                        5..=7 => {
                            proxy.drop_replies(true);
                            tokio::time::sleep(Duration::from_millis(rng.random_range(20..300))).await;
                            proxy.cut();
                            proxy.drop_replies(false);
                            drops += 1;
                        }
                        _ => {
                            server.borrow_mut().kill();
                            *server.borrow_mut() = Server::start_at(&data, &addr);
                            kills += 1;
                        }
                    }
                }
                (cuts, drops, kills)
            }
        });
        for writer in writers {
            writer.await.unwrap();
        }
        done.set(true);
        let figures = driver.await.unwrap();
        proxy.drop_replies(false);
        for client in &clients {
            let mut attempts = 0;
            while let Err(err) = client.sync("s").await {
                attempts += 1;
                assert!(err.is_retryable() && attempts < 50, "the outbox would not drain: {err}");
            }
            client.pull("s").await.unwrap();
        }
        figures
    });

    // The server's log and snapshot, read directly with the owner token.
    let addr = server.borrow().addr.clone();
    let log = server_log(&addr, &owner);
    let snapshot = run_local(async {
        let conn = Connection::open(&addr).await.unwrap();
        snapshot(&conn.session(&owner).0, 0).await.unwrap()
    });
    let histories: Vec<_> = (0..clients_n).map(|i| checker::history(&dir.path().join(format!("c{i}.db")))).collect();
    let verdict = checker::check(&histories, &log, true).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    for (i, client) in clients.iter().enumerate() {
        let (at, replica) = client.replica("s").unwrap();
        let replica: Vec<_> = replica.iter().map(|e| (e.id.clone(), String::from_utf8(e.data.clone()).unwrap())).collect();
        let expected: Vec<_> = snapshot.1.iter().map(|e| (e.1.clone(), e.3.clone())).collect();
        assert_eq!(at, snapshot.0, "seed {seed}: client {i}'s replica is at the server's cursor");
        assert_eq!(replica, expected, "seed {seed}: client {i}'s replica equals the server snapshot");
    }
    println!(
        "chaos seed {seed}: {} ops created, {} logged once each, {} entities; {cuts} cuts, {drops} reply drops, {kills} server kills",
        verdict.created,
        verdict.logged,
        snapshot.1.len()
    );
}
