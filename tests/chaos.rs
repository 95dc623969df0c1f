//! Issue 5: a seeded chaos run. N clients write M ops each into one session through a proxy
//! while a driver cuts connections, drops replies and kills (-9) and restarts the server; then
//! every outbox is drained, every client pulls its replica, and the history checker judges.
//! It runs on each store, and (issue 16) on three nodes sharing one PostgreSQL behind the
//! proxy acting as a balancer, where the driver kills and restarts random nodes and restarts
//! PostgreSQL itself (`pg_ctl restart -m immediate`) once per run.
//!
//! `CAPSYNC_CHAOS_SEED` reproduces a run (the seed is printed); `CAPSYNC_CHAOS_SCALE`
//! (default 1) multiplies the ops; `CAPSYNC_CHAOS_SEEDS` (default 5) is how many seeds the
//! three-node test runs. The runs take turns: the three-node one restarts the binary's one cluster.

mod common;

use capsync_client::{Change, Client, Connection, SyncOptions};
use capsync_persistence::EntityKind;
use common::checker;
use common::proxy::Proxy;
use common::*;
use rand::{Rng as _, SeedableRng as _};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Mutex;
use std::time::Duration;

static TURNS: Mutex<()> = Mutex::new(());

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

on_both_stores! {
    #[test]
    fn chaos() {
        let _turn = TURNS.lock().unwrap_or_else(|e| e.into_inner());
        let seed = env_u64("CAPSYNC_CHAOS_SEED").unwrap_or_else(rand::random);
        run(seed, 1);
    }
}

#[test]
fn chaos_on_three_nodes() {
    let _turn = TURNS.lock().unwrap_or_else(|e| e.into_inner());
    let seeds: Vec<u64> = match env_u64("CAPSYNC_CHAOS_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("CAPSYNC_CHAOS_SEEDS").unwrap_or(5)).map(|_| rand::random()).collect(),
    };
    on_store(StoreKind::Postgres, || {
        for seed in seeds {
            run(seed, 3);
        }
    });
}

/// One seeded run against `nodes` servers (more than one: on one PostgreSQL database).
fn run(seed: u64, nodes: usize) {
    let scale = env_u64("CAPSYNC_CHAOS_SCALE").unwrap_or(1).max(1);
    let (clients_n, ops_per_client) = (3usize, 600 * scale as usize);
    println!("chaos seed {seed} scale {scale} nodes {nodes}: CAPSYNC_CHAOS_SEED={seed} CAPSYNC_CHAOS_SCALE={scale} reproduces it");

    let dir = tempfile::tempdir().unwrap();
    let data: Vec<_> = (0..nodes).map(|i| dir.path().join(format!("data{i}"))).collect();
    if nodes > 1 {
        let url = capsync_store_postgres::testing::fresh_database();
        for d in &data {
            share_database(d, &url);
        }
    }
    let servers: Vec<Server> = data.iter().map(|d| Server::start(d)).collect();
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let addr = addrs[0].clone();
    let admin = servers[0].admin_uri();
    let owner = run_local(async {
        let conn = Connection::open(&addr).await.unwrap();
        create_session(&conn, &admin.token, "chaos").await.1
    });
    let proxy = Rc::new(Proxy::start_balancing(&addrs.iter().map(String::as_str).collect::<Vec<_>>()));
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

    let servers = Rc::new(RefCell::new(servers));
    let (cuts, drops, kills, pg_restarts) = run_local(async {
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
            let (done, proxy, servers, addrs, data) = (done.clone(), proxy.clone(), servers.clone(), addrs.clone(), data.clone());
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xC4A0_5C4A);
            async move {
                let (mut cuts, mut drops, mut kills, mut pg_restarts) = (0, 0, 0, 0);
                while !done.get() {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(20..150))).await;
                    match rng.random_range(0..if nodes > 1 { 11 } else { 10 }) {
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
                        10 if pg_restarts == 0 => {
                            let cluster = capsync_store_postgres::testing::cluster();
                            let out = tokio::task::spawn_blocking(|| cluster.pg_ctl(&["restart", "-m", "immediate"])).await.unwrap();
                            assert!(out.status.success(), "pg_ctl restart: {}", String::from_utf8_lossy(&out.stderr));
                            pg_restarts += 1;
                        }
                        10 => {}
                        _ => {
                            let i = rng.random_range(0..nodes);
                            servers.borrow_mut()[i].kill();
                            servers.borrow_mut()[i] = Server::start_at(&data[i], &addrs[i]);
                            kills += 1;
                        }
                    }
                }
                (cuts, drops, kills, pg_restarts)
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
        }
        // Pulled once every outbox is drained, so every replica can be at the final cursor.
        for client in &clients {
            client.pull("s").await.unwrap();
        }
        figures
    });

    // The server's log and snapshot, read directly with the owner token.
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
        "chaos seed {seed} nodes {nodes}: {} ops created, {} logged once each, {} entities; {cuts} cuts, {drops} reply drops, {kills} server kills, {pg_restarts} PostgreSQL restarts",
        verdict.created,
        verdict.logged,
        snapshot.1.len()
    );
}
