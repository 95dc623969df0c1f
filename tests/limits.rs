//! Issue 7: each limit, violated, gets its marker or a closed connection, and the server goes
//! on serving everyone else.

mod common;

use capsync_client::Connection;
use capsync_schema::capsync_capnp::EntityKind::Message;
use capsync_schema::{Marker, Token};
use common::*;
use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

fn session_on(server: &Server) -> Token {
    let admin = server.admin_uri();
    run_local(async {
        let conn = Connection::open(&server.addr).await.unwrap();
        create_session(&conn, &admin.token, "limits").await.1
    })
}

on_both_stores! {
    #[test]
    fn an_oversized_message_closes_only_its_connection_and_an_oversized_batch_is_too_large() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with_args(&dir.path().join("data"), &["--max-message-bytes", "1048576", "--max-batch-bytes", "100000"]);
        let owner = session_on(&server);
        run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            cursor(&session).await.unwrap();
            let big = format!("\"{}\"", "x".repeat(700_000));
            let result = append(&session, &new_client_id(), 1, &[put(Message, "a", "", &big), put(Message, "b", "", &big)]).await;
            let err = result.expect_err("a 1.4 MB message is over the 1 MiB limit");
            assert!(err.extra.contains("too large"), "the server aborts the connection saying why: {}", err.extra);
            assert!(cursor(&session).await.is_err(), "that connection is closed");

            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            let mid = format!("\"{}\"", "y".repeat(60_000));
            assert_marker(append(&session, &new_client_id(), 1, &[put(Message, "a", "", &mid), put(Message, "b", "", &mid)]).await, Marker::TooLarge);
            let ack = append(&session, &new_client_id(), 1, &[put(Message, "c", "", &mid)]).await.unwrap();
            assert_eq!(ack.cursor, 1, "the server serves on");
        });
    }

    #[test]
    fn calls_beyond_the_in_flight_limit_are_overloaded() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with_args(&dir.path().join("data"), &["--max-calls-in-flight", "4"]);
        let owner = session_on(&server);
        run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, grant) = conn.session(&owner);
            grant.await.unwrap();
            // batchSeqs far ahead wait for predecessors that never come, so they stay in flight.
            let client = new_client_id();
            let calls: Vec<_> = (101..111u64).map(|seq| read_ack(append_request(&session, &client, seq, &[put(Message, "m", "", "{}")]))).collect();
            let results = futures::future::join_all(calls).await;
            let markers: Vec<_> = results.iter().map(|r| r.as_ref().err().and_then(marker_of)).collect();
            let overloaded = markers.iter().filter(|m| **m == Some(Marker::Overloaded)).count();
            let gaps = markers.iter().filter(|m| **m == Some(Marker::Gap)).count();
            assert_eq!((overloaded, gaps), (6, 4), "{markers:?}");
            cursor(&session).await.expect("the connection still works");
        });
    }

    #[test]
    fn connections_stuck_before_or_inside_a_frame_are_closed_and_idle_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with_args(&dir.path().join("data"), &["--frame-timeout", "1s"]);
        let owner = session_on(&server);
        let silent = std::net::TcpStream::connect(&server.addr).unwrap();
        let mut partial = std::net::TcpStream::connect(&server.addr).unwrap();
        partial.write_all(&[0, 0, 0, 0, 16]).unwrap();
        for (name, mut stream) in [("silent", silent), ("partial", partial)] {
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let started = Instant::now();
            let mut buf = [0u8; 64];
            let closed = matches!(stream.read(&mut buf), Ok(0) | Err(_));
            assert!(closed && started.elapsed() < Duration::from_secs(9), "the {name} connection was closed");
        }
        run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            cursor(&session).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2500)).await;
            cursor(&session).await.expect("an idle connection between frames stays open");
        });
    }

    #[test]
    fn connections_beyond_the_limit_wait_for_a_free_slot() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with_args(&dir.path().join("data"), &["--max-connections", "2"]);
        let owner = session_on(&server);
        run_local(async {
            let first = Connection::open(&server.addr).await.unwrap();
            let second = Connection::open(&server.addr).await.unwrap();
            for conn in [&first, &second] {
                cursor(&conn.session(&owner).0).await.unwrap();
            }
            let third = Connection::open(&server.addr).await.unwrap();
            let (session, _) = third.session(&owner);
            let waiting = cursor(&session);
            tokio::pin!(waiting);
            assert!(tokio::time::timeout(Duration::from_millis(300), &mut waiting).await.is_err(), "not served while two are open");
            first.close().await;
            let at = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("served once a slot frees");
            assert_eq!(at.unwrap(), 0);
        });
    }

    #[test]
    fn failed_redeems_are_throttled_per_address_and_audited() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let server = Server::start_with_args(&data, &["--max-failed-redeems", "5"]);
        let owner = session_on(&server);
        run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            for _ in 0..5 {
                assert_marker(cursor(&conn.session(&Token::generate()).0).await, Marker::UnknownToken);
            }
            assert_marker(cursor(&conn.session(&Token::generate()).0).await, Marker::Overloaded);
            assert_marker(cursor(&conn.session(&Token::generate()).0).await, Marker::Overloaded);
            // A correct token from the same address is still honoured: throttling slows guessing
            // down, it never locks out the real owner or admin behind that address.
            let other = Connection::open(&server.addr).await.unwrap();
            assert_eq!(cursor(&other.session(&owner).0).await.unwrap(), 0);
        });
        let (ok, stdout, stderr) = cli(&["admin", "--admin-file", data.join("admin.uri").to_str().unwrap(), "audit", "--json"]);
        assert!(ok, "the admin on the same address is not locked out: {stdout}{stderr}");
        let count = |action: &str| -> String {
            let sql = format!("SELECT count(*) FROM audit WHERE action = '{action}'");
            query_store(&data, &sql, &sql)[0][0].clone().unwrap()
        };
        assert_eq!(count("redeem-failed"), "5", "failures past the budget are not audited one by one");
        assert_eq!(count("redeem-throttled"), "1");
    }
}
