//! Issue 2 acceptance: the sync server against a real `capsync serve` on 127.0.0.1.

mod common;

use capsync_client::Connection;
use capsync_schema::capsync_capnp::op_result::Status;
use capsync_schema::capsync_capnp::EntityKind::{Message, Part, Session as SessionKind};
use capsync_schema::{Marker, Token};
use common::*;
use std::os::unix::fs::PermissionsExt as _;

on_both_stores! {
    #[test]
    fn a_token_redeems_after_restart_and_the_cursor_continues() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut server = Server::start(&data);
        let admin = server.admin_uri();
        let client = new_client_id();
        let owner = run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session_id, owner) = create_session(&conn, &admin.token, "restart").await;
            let (session, _) = conn.session(&owner);
            let ops = [put(SessionKind, &session_id, "", r#"{"title":"restart"}"#), put(Message, "m1", "", "{}")];
            let ack = append(&session, &client, 1, &ops).await.unwrap();
            assert_eq!(ack.cursor, 2);
            owner
        });
        assert!(server.stop().success(), "SIGTERM shuts the server down cleanly");

        // Same data dir, same address; after a graceful stop and again after a kill -9.
        let mut server = Server::start_at(&data, &server.addr.clone());
        for (round, batch_seq) in [(1u64, 2u64), (2, 3)] {
            run_local(async {
                let conn = Connection::open(&server.addr).await.unwrap();
                let (session, grant) = conn.session(&owner);
                assert_eq!(cursor(&session).await.unwrap(), 1 + round);
                let ack = append(&session, &client, batch_seq, &[put(Message, &format!("m{}", round + 1), "", "{}")]).await.unwrap();
                assert_eq!(ack.results[0].status, Status::Applied);
                assert_eq!(ack.results[0].seq, 2 + round, "seqs continue after the restart");
                assert_eq!(ack.cursor, 2 + round);
                assert_eq!(grant.await.unwrap().kind, "session");
            });
            server.kill();
            server = Server::start_at(&data, &server.addr.clone());
        }
        run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            let (at, entities) = snapshot(&session, 0).await.unwrap();
            assert_eq!(at, 4);
            assert_eq!(entities.len(), 4, "session, m1, m2, m3: {entities:?}");
        });
        assert_no_tokens(&server.log_text(), &[owner, admin.token], "the server log");
    }

    #[test]
    fn appends_are_applied_at_most_once_and_replays_answer_like_the_first_time() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let admin = server.admin_uri();
        run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (_, owner) = create_session(&conn, &admin.token, "dedupe").await;
            let (session, _) = conn.session(&owner);
            let client = new_client_id();
            let m1 = put(Message, "m1", "", r#"{"role":"user"}"#);
            let batch1 = [
                m1.clone(),
                put(Part, "p1", "m1", r#"{"text":"hi"}"#),
                put(Part, "p2", "no-such-message", "{}"),
                put(Message, "m2", "", "{}"),
            ];
            let first = append(&session, &client, 1, &batch1).await.unwrap();
            let statuses: Vec<_> = first.results.iter().map(|r| (r.status, r.seq)).collect();
            assert_eq!(statuses, [(Status::Applied, 1), (Status::Applied, 2), (Status::Rejected, 0), (Status::Applied, 3)]);
            assert!(first.results[2].reason.contains("parent"), "{}", first.results[2].reason);
            assert_eq!(first.cursor, 3);

            // The same batch again: nothing re-applied, same seqs, same cursor, same rejection.
            let again = append(&session, &client, 1, &batch1).await.unwrap();
            let statuses: Vec<_> = again.results.iter().map(|r| (r.status, r.seq)).collect();
            assert_eq!(statuses, [(Status::Duplicate, 1), (Status::Duplicate, 2), (Status::Rejected, 0), (Status::Duplicate, 3)]);
            assert_eq!(again.results[2].reason, first.results[2].reason);
            assert_eq!(again.cursor, first.cursor);
            assert_eq!(cursor(&session).await.unwrap(), 3);

            // A reused opId: same payload is a duplicate, a new payload a conflict; neither applies.
            let mut changed = m1.clone();
            changed.data = Some(br#"{"role":"assistant"}"#.to_vec());
            let second = append(&session, &client, 2, &[m1.clone(), changed]).await.unwrap();
            assert_eq!((second.results[0].status, second.results[0].seq), (Status::Duplicate, 1));
            assert_eq!(second.results[1].status, Status::Conflict);
            assert_eq!(second.cursor, 3);

            // A gap, then a replayed batchSeq carrying other opIds.
            assert_marker(append(&session, &client, 4, &[put(Message, "m9", "", "{}")]).await, Marker::Gap);
            assert_marker(append(&session, &client, 1, &[put(Message, "m1", "", "{}")]).await, Marker::Diverged);
            assert_eq!(cursor(&session).await.unwrap(), 3, "neither the gap nor the divergence changed anything");

            // Another client's batchSeq is its own.
            let other = append(&session, &new_client_id(), 1, &[put(Message, "m3", "", "{}")]).await.unwrap();
            assert_eq!((other.results[0].status, other.results[0].seq), (Status::Applied, 4));

            let (_, entities) = snapshot(&session, 1).await.unwrap();
            let ids: Vec<&str> = entities.iter().map(|e| e.1.as_str()).collect();
            assert_eq!(ids, ["m1", "m2", "m3", "p1"]);
            assert_eq!(entities[0].3, r#"{"role":"user"}"#, "the conflict did not overwrite m1");

            // Deleting a message takes its parts with it.
            append(&session, &client, 3, &[delete(Message, "m1")]).await.unwrap();
            let (_, entities) = snapshot(&session, 0).await.unwrap();
            let ids: Vec<&str> = entities.iter().map(|e| e.1.as_str()).collect();
            assert_eq!(ids, ["m2", "m3"]);
        });
    }

    #[test]
    fn invalid_ops_are_rejected_one_by_one_and_bad_batches_fail_whole() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let admin = server.admin_uri();
        run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (_, owner) = create_session(&conn, &admin.token, "bad input").await;
            let (session, _) = conn.session(&owner);
            let client = new_client_id();
            let mut short_id = put(Message, "m0", "", "{}");
            short_id.op_id = vec![1, 2, 3];
            let ops = [
                put(Message, "m1", "", "not json"),
                short_id,
                put(Message, "", "", "{}"),
                put(SessionKind, "not-the-session-id", "", "{}"),
                put(Message, "m2", "", &format!("\"{}\"", "x".repeat(2 * 1024 * 1024))),
                put(Message, "ok", "", "[1,2]"),
            ];
            let ack = append(&session, &client, 1, &ops).await.unwrap();
            let statuses: Vec<_> = ack.results.iter().map(|r| r.status).collect();
            assert_eq!(statuses, [Status::Rejected, Status::Rejected, Status::Rejected, Status::Rejected, Status::Rejected, Status::Applied]);
            assert!(ack.results[4].reason.contains("too large"), "{}", ack.results[4].reason);
            assert_eq!(ack.cursor, 1, "the valid op still applied");

            assert_marker(append(&session, &[0u8; 3], 1, &[]).await, Marker::Invalid);
            assert_marker(append(&session, &client, 0, &[]).await, Marker::Invalid);
            let too_many: Vec<_> = (0..10_001).map(|i| put(Message, &format!("n{i}"), "", "{}")).collect();
            assert_marker(append(&session, &client, 2, &too_many).await, Marker::TooLarge);
            assert_eq!(cursor(&session).await.unwrap(), 1);
        });
    }

    #[test]
    fn append_works_on_a_capability_pipelined_on_redeem() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let admin = server.admin_uri();
        run_local(async {
            let setup = Connection::open(&server.addr).await.unwrap();
            let (_, owner) = create_session(&setup, &admin.token, "pipelined").await;

            // redeem(token).grant.cap.session.append(...), sent before the redeem's answer: thirty
            // batches in a row, applied in batchSeq order (capnp-rpc may dispatch calls queued on
            // a promise in another order; the server must not).
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, grant) = conn.session(&owner);
            let client = new_client_id();
            // Large batches, so that some arrive before the redeem is answered and some after.
            let data = format!("\"{}\"", "x".repeat(1000));
            let batches: Vec<Vec<TestOp>> =
                (1..=30u64).map(|seq| (0..200).map(|k| put(Message, &format!("m{seq}-{k}"), "", &data)).collect()).collect();
            let pending: Vec<_> =
                batches.iter().enumerate().map(|(i, ops)| read_ack(append_request(&session, &client, i as u64 + 1, ops))).collect();
            let (grant, acks) = futures::join!(grant, futures::future::join_all(pending));
            for (i, ack) in acks.into_iter().enumerate() {
                let ack = ack.unwrap_or_else(|e| panic!("batch {}: {}", i + 1, e.extra));
                let first_seq = i as u64 * 200 + 1;
                assert_eq!((ack.results[0].status, ack.results[0].seq), (Status::Applied, first_seq), "batch {} in order", i + 1);
            }
            assert_eq!(grant.unwrap().kind, "session");

            // A pipelined call on a bad token fails with the redeem's marker.
            let bogus = Token::generate();
            let (session, grant) = conn.session(&bogus);
            let pending = append_request(&session, &new_client_id(), 1, &[put(Message, "m1", "", "{}")]);
            assert_marker(read_ack(pending).await, Marker::UnknownToken);
            assert!(grant.await.is_err());
        });
    }

    #[test]
    fn shares_are_limited_by_their_rights_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let admin = server.admin_uri();
        let tokens = run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (_, owner) = create_session(&conn, &admin.token, "rights").await;
            let (session, _) = conn.session(&owner);
            append(&session, &new_client_id(), 1, &[put(Message, "m1", "", "{}")]).await.unwrap();

            // A read share reads but cannot append or mint.
            let (read_token, _) = mint(&session, "read", "viewer", 0).await.unwrap();
            let (reader, grant) = conn.session(&read_token);
            assert_eq!(grant.await.unwrap().kind, "share");
            assert_eq!(snapshot(&reader, 0).await.unwrap().1.len(), 1);
            assert_marker(append(&reader, &new_client_id(), 1, &[put(Message, "m2", "", "{}")]).await, Marker::Denied);
            assert_marker(mint(&reader, "read", "x", 0).await, Marker::Denied);

            // A share minted from a share may only narrow rights and expiry.
            let (middle_token, _) = mint(&session, "read,mint", "middle", 3600).await.unwrap();
            let (middle, grant) = conn.session(&middle_token);
            let middle_expiry = grant.await.unwrap().expires_at;
            assert!(middle_expiry > 0);
            assert_marker(mint(&middle, "read,append", "wider", 0).await, Marker::Denied);
            assert_marker(mint(&middle, "read", "longer", 7200).await, Marker::Denied);
            let (short_token, _) = mint(&middle, "read", "shorter", 60).await.unwrap();
            let (inherit_token, _) = mint(&middle, "read", "inherits", 0).await.unwrap();
            let (_, grant) = conn.session(&inherit_token);
            assert_eq!(grant.await.unwrap().expires_at, middle_expiry, "ttl 0 means as long as the parent");
            let (_, grant) = conn.session(&short_token);
            assert!(grant.await.unwrap().expires_at < middle_expiry);

            // An expired token fails with capsync/expired, and so does a live capability of it.
            let (brief_token, _) = mint(&session, "read", "brief", 1).await.unwrap();
            let (brief, grant) = conn.session(&brief_token);
            let expires_at = grant.await.unwrap().expires_at;
            cursor(&brief).await.unwrap();
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
            tokio::time::sleep(std::time::Duration::from_millis(expires_at.saturating_sub(now) + 50)).await;
            assert_marker(cursor(&brief).await, Marker::Expired);
            let fresh = Connection::open(&server.addr).await.unwrap();
            let (_, grant) = fresh.session(&brief_token);
            match grant.await {
                Err(capsync_client::ClientError::Rpc(err)) => assert_eq!(marker_of(&err), Some(Marker::Expired)),
                other => panic!("expected capsync/expired, got {other:?}"),
            }
            vec![owner, read_token, middle_token, short_token, inherit_token, brief_token]
        });
        assert_no_tokens(&server.log_text(), &tokens, "the server log");
    }

    #[test]
    fn revoking_a_share_breaks_it_and_its_children_on_every_connection() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let server = Server::start(&data);
        let admin = server.admin_uri();
        let admin_file = data.join("admin.uri");
        let admin_file = admin_file.to_str().unwrap();
        let mut tokens = vec![admin.token.clone()];
        run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session_id, owner) = create_session(&conn, &admin.token, "revoke").await;
            let (session, _) = conn.session(&owner);
            let (parent_token, parent_id) = mint(&session, "read,append,mint", "parent", 0).await.unwrap();
            let (parent_on_conn1, _) = conn.session(&parent_token);
            let (child_token, _) = mint(&parent_on_conn1, "read", "child", 0).await.unwrap();
            let (sibling_token, _) = mint(&session, "read", "sibling", 0).await.unwrap();

            // Live capabilities on another connection.
            let other = Connection::open(&server.addr).await.unwrap();
            let (parent, _) = other.session(&parent_token);
            let (child, _) = other.session(&child_token);
            let (sibling, _) = other.session(&sibling_token);
            for cap in [&parent, &child, &sibling] {
                cursor(cap).await.unwrap();
            }

            let (ok, stdout, stderr) = cli(&["admin", "--admin-file", admin_file, "revoke-share", &parent_id]);
            assert!(ok, "revoke-share failed: {stderr}");
            assert!(stdout.contains("revoked share"), "{stdout}");

            assert_marker(cursor(&parent).await, Marker::Revoked);
            assert_marker(cursor(&child).await, Marker::Revoked);
            assert_marker(append(&parent, &new_client_id(), 1, &[put(Message, "x", "", "{}")]).await, Marker::Revoked);
            cursor(&sibling).await.expect("a sibling share is unaffected");
            append(&session, &new_client_id(), 1, &[put(Message, "m1", "", "{}")]).await.expect("the owner is unaffected");
            let fresh = Connection::open(&server.addr).await.unwrap();
            for token in [&parent_token, &child_token] {
                let (cap, _) = fresh.session(token);
                assert_marker(cursor(&cap).await, Marker::Revoked);
            }

            // revoke-session cuts the owner and every share of the session.
            let (ok, _, stderr) = cli(&["admin", "--admin-file", admin_file, "revoke-session", &session_id]);
            assert!(ok, "revoke-session failed: {stderr}");
            assert_marker(cursor(&sibling).await, Marker::Revoked);
            assert_marker(cursor(&session).await, Marker::Revoked);
            let fresh = Connection::open(&server.addr).await.unwrap();
            for token in [&owner, &sibling_token] {
                let (cap, _) = fresh.session(token);
                assert_marker(cursor(&cap).await, Marker::Revoked);
            }
            tokens.extend([owner, parent_token, child_token, sibling_token]);
        });

        let (ok, stdout, _) = cli(&["admin", "--admin-file", admin_file, "list-shares", "--json"]);
        assert!(ok);
        let shares: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let shares = shares.as_array().unwrap();
        assert_eq!(shares.len(), 3);
        assert!(shares.iter().all(|s| s["revoked"] == true), "all revoked after revoke-session: {stdout}");
        assert_no_tokens(&server.log_text(), &tokens, "the server log");
    }

    /// Issue 16 point 2, "calls in flight fail": an `info` already past its epoch check and
    /// waiting on the store (its read held by a failpoint) answers `capsync/revoked` once the
    /// revocation commits, while its read is still held, not after the read.
    #[test]
    fn a_call_waiting_on_the_store_fails_revoked_while_its_read_is_still_held() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let release = dir.path().join("release");
        // The first session read (the held `info`'s) waits until `release` exists.
        let server = Server::start_with(
            &data,
            &[("CAPSYNC_FAILPOINTS", "server-read-session=1:hold"), ("CAPSYNC_FAILPOINTS_RELEASE", release.to_str().unwrap())],
            &[],
        );
        let admin = server.admin_uri();
        let admin_file = data.join("admin.uri").to_str().unwrap().to_owned();
        let answer = run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (_, owner) = create_session(&conn, &admin.token, "in flight").await;
            let (session, _) = conn.session(&owner);
            let (reader_token, share_id) = mint(&session, "read", "reader", 0).await.unwrap();
            let (share, grant) = conn.session(&reader_token);
            grant.await.unwrap();
            let revoke = move || {
                let (ok, _, stderr) = cli(&["admin", "--admin-file", &admin_file, "revoke-share", &share_id]);
                assert!(ok, "{stderr}");
            };
            answer_before_release(&server, "server-read-session", &release, async move { cursor(&share).await }, revoke).await
        });
        assert_marker(answer, Marker::Revoked);
    }

    #[test]
    fn admin_uri_is_private_and_the_audit_table_records_without_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let server = Server::start(&data);
        let admin = server.admin_uri();
        let mode = std::fs::metadata(data.join("admin.uri")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let tokens = run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (_, owner) = create_session(&conn, &admin.token, "audit").await;
            let (session, _) = conn.session(&owner);
            let (share_token, share_id) = mint(&session, "read", "audited", 0).await.unwrap();
            let (_, grant) = conn.session(&share_token);
            grant.await.unwrap();
            let (bogus, _) = conn.session(&Token::generate());
            assert_marker(cursor(&bogus).await, Marker::UnknownToken);
            let admin_cap = admin_cap(&conn, &admin.token);
            let mut request = admin_cap.revoke_share_request();
            request.get().set_share_id(share_id.as_str());
            request.send().promise.await.unwrap();
            vec![admin.token.clone(), owner, share_token]
        });

        // Redeems are audited in the background (a revocation may overtake them): asked again
        // until every action is there, for a bounded time.
        let expected = ["create-session", "mint", "redeem", "redeem-failed", "revoke"];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (stdout, actions) = loop {
            let (ok, stdout, stderr) = cli(&["admin", "--admin-file", data.join("admin.uri").to_str().unwrap(), "audit", "--json"]);
            assert!(ok, "{stderr}");
            let actions: Vec<String> = stdout
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["action"].as_str().unwrap().to_owned())
                .collect();
            if expected.iter().all(|e| actions.iter().any(|a| a == e)) || std::time::Instant::now() > deadline {
                break (stdout, actions);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        for action in expected {
            assert!(actions.iter().any(|a| a == action), "no {action} in {actions:?}");
        }
        assert_no_tokens(&stdout, &tokens, "the audit output");

        // The database itself: the audit rows, and tokens only as SHA-256 hashes.
        let rows = query_store(
            &data,
            "SELECT action, target_kind, target_id, session_id, peer, detail FROM audit",
            "SELECT action, target_kind, target_id, session_id, peer, detail FROM audit",
        );
        let dump: Vec<String> = rows.into_iter().flatten().flatten().collect();
        assert!(dump.len() > 10);
        assert_no_tokens(&dump.join("\n"), &tokens, "the audit table");
        let hashes = query_store(&data, "SELECT lower(hex(hash)) FROM tokens", "SELECT encode(hash, 'hex') FROM tokens");
        let hashes: Vec<String> = hashes.into_iter().flatten().flatten().collect();
        for token in &tokens {
            let hex: String = token.hash().0.iter().map(|b| format!("{b:02x}")).collect();
            assert!(hashes.contains(&hex), "each token is stored as its hash");
        }
        if store() == StoreKind::Sqlite {
            let raw = std::fs::read(data.join("capsync.db")).unwrap();
            let wal = std::fs::read(data.join("capsync.db-wal")).unwrap_or_default();
            for token in &tokens {
                let secret = token.expose().as_bytes();
                assert!(!raw.windows(secret.len()).any(|w| w == secret) && !wal.windows(secret.len()).any(|w| w == secret));
            }
        }
        assert_no_tokens(&server.log_text(), &tokens, "the server log");
    }

    #[test]
    fn cli_errors_are_one_line_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let server = Server::start(&data);
        let admin_file = data.join("admin.uri");
        let (ok, owner_uri, _) = cli(&["admin", "--admin-file", admin_file.to_str().unwrap(), "create-session", "--title", "cli"]);
        assert!(ok);
        let (ok, read_uri, _) = cli(&["share", owner_uri.trim(), "--rights", "read", "--label", "ro"]);
        assert!(ok);
        let (ok, stdout, stderr) = cli(&["share", read_uri.trim(), "--rights", "read,append"]);
        assert!(!ok);
        assert!(stdout.is_empty());
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("capsync/denied"), "{stderr}");
        let (ok, _, stderr) = cli(&["share", "capsync://127.0.0.1:1/csy_nope", "--rights", "read"]);
        assert!(!ok && stderr.trim().lines().count() == 1, "{stderr}");
        let (ok, _, stderr) = cli(&["admin", "--admin-file", "/nonexistent/admin.uri", "stats"]);
        assert!(!ok && stderr.trim().lines().count() == 1, "{stderr}");
        let tokens: Vec<Token> = [owner_uri, read_uri]
            .iter()
            .map(|u| capsync_schema::SturdyUri::parse(u).unwrap().token)
            .collect();
        assert_no_tokens(&stderr, &tokens, "CLI errors");
        assert_no_tokens(&server.log_text(), &tokens, "the server log");
    }
}
