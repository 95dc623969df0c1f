//! Faults of PostgreSQL itself under a server on it (issue 15): the database restarted with
//! `pg_ctl restart -m immediate` (a crash and recovery) in the middle of a push, and the
//! database stopped for longer than the client's timeouts. Each run is judged by the history
//! checker: nothing acked is lost, nothing is applied twice, seqs have no gap; and the outage
//! is reported as `capsync/overloaded` (retried), never as a revocation.
//!
//! These tests restart the binary's one throwaway cluster, so they take turns (`EXCLUSIVE`).

mod common;

use capsync_client::{Client, Connection, SyncOptions};
use capsync_schema::{Marker, SturdyUri};
use capsync_store_postgres::testing::cluster;
use common::checker;
use common::*;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static EXCLUSIVE: Mutex<()> = Mutex::new(());

/// Patient enough to outlast the outages below, short enough that each one fires the ack and
/// connect timeouts many times.
fn patient() -> SyncOptions {
    SyncOptions {
        ack_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        max_attempts: 200,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(250),
        max_batch_ops: 100,
        ..SyncOptions::default()
    }
}

/// Runs `act` on another thread once the server has applied something of `owner`'s session.
fn when_applying(addr: String, owner: capsync_schema::Token, act: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while server_cursor(&addr, &owner).unwrap_or(0) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        act();
    })
}

#[test]
fn postgres_restarted_immediately_during_a_push_loses_and_doubles_nothing() {
    let _turn = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    on_store(StoreKind::Postgres, || {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        let client = Client::open(dir.path().join("c.db")).unwrap().with_options(patient());
        client.attach("s", &SturdyUri::new(server.addr.clone(), owner.clone()).expose()).unwrap();
        client.enqueue("s", messages(0..20_000, "m")).unwrap();
        let restarter = when_applying(server.addr.clone(), owner.clone(), || {
            let out = cluster().pg_ctl(&["restart", "-m", "immediate"]);
            assert!(out.status.success(), "pg_ctl restart: {}", String::from_utf8_lossy(&out.stderr));
        });
        let report = run_local(async { client.sync("s").await }).expect("the sync rides out the restart");
        restarter.join().unwrap();
        println!("sync across an immediate PostgreSQL restart: {} batches, {} duplicates", report.batches, report.duplicates);
        let history = checker::history(&dir.path().join("c.db"));
        let verdict = checker::check(&[history], &server_log(&server.addr, &owner), true).unwrap();
        assert_eq!(verdict.logged, 20_000);
        let log = server.log_text();
        assert!(!log.contains("capsync/revoked"), "an outage is never a revocation");
        assert_no_tokens(&log, &[owner], "the server log");
    });
}

#[test]
fn postgres_stopped_longer_than_the_client_timeouts_loses_and_doubles_nothing() {
    let _turn = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    on_store(StoreKind::Postgres, || {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with_args(&dir.path().join("data"), &["--metrics-listen", "127.0.0.1:0"]);
        let http = metrics_addr(&server);
        let (_, owner) = new_session(&server);
        let client = Client::open(dir.path().join("c.db")).unwrap().with_options(patient());
        client.attach("s", &SturdyUri::new(server.addr.clone(), owner.clone()).expose()).unwrap();
        client.enqueue("s", messages(0..20_000, "m")).unwrap();
        let (addr, token) = (server.addr.clone(), owner.clone());
        let stopper = when_applying(server.addr.clone(), owner.clone(), move || {
            let out = cluster().pg_ctl(&["stop", "-m", "fast"]);
            assert!(out.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
            // While it is down: not ready, and a call fails with a marker clients retry.
            assert_eq!(get(&http, "/readyz").0, 503, "not ready while PostgreSQL is down");
            assert_eq!(get(&http, "/healthz").0, 200, "alive all the same");
            let marker = run_local(async {
                let conn = Connection::open(&addr).await.unwrap();
                marker_of(&cursor(&conn.session(&token).0).await.unwrap_err())
            });
            assert_eq!(marker, Some(Marker::Overloaded), "an outage is answered overloaded, never revoked");
            // Longer than the client's ack and connect timeouts, many times over.
            std::thread::sleep(Duration::from_secs(4));
            cluster().start_again();
            let ready = (0..200).any(|_| {
                std::thread::sleep(Duration::from_millis(50));
                get(&http, "/readyz").0 == 200
            });
            assert!(ready, "ready again once PostgreSQL is back");
        });
        let report = run_local(async { client.sync("s").await }).expect("the sync rides out the outage");
        stopper.join().unwrap();
        println!("sync across a 4 s PostgreSQL outage: {} batches, {} duplicates", report.batches, report.duplicates);
        let history = checker::history(&dir.path().join("c.db"));
        let verdict = checker::check(&[history], &server_log(&server.addr, &owner), true).unwrap();
        assert_eq!(verdict.logged, 20_000);
        assert_no_tokens(&server.log_text(), &[owner], "the server log");
    });
}
