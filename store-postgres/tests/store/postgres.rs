//! What only the PostgreSQL store has to show: concurrent writers on one session (several
//! tasks, two pools standing for two server nodes), revocation racing appends, concurrent
//! `openSession`s of one key, `ensure_admin`, and the error mapping.

use crate::conformance::{batch, event, put, token};
use crate::support;
use capsync_model::{EntityKind, OpStatus, Rights};
use capsync_store_postgres::{GuardLink, OpenSession, PgError, PgOptions, PgStore, ShareRow, SpaceLink, SpaceRow, TargetKind, TokenRow};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const S: &str = "0190b000-0000-7000-8000-00000000000a";

async fn store_with_session() -> (PgStore, i64, String) {
    let url = support::fresh_db().await;
    let store = PgStore::connect(&url).await.unwrap();
    let owner = token(TargetKind::Session, S, 0, 0x01, Rights::ALL, 1);
    let sid = store.create_session(S, "t", &owner, &[], &event("create-session", S)).await.unwrap();
    (store, sid, url)
}

/// Several tasks on two pools (two "nodes") append to one session at once while a reader
/// follows `changes`: seqs are 1..N with no gap, each batch's applied ops have consecutive
/// seqs, each client's batches are in its own order, and a reader never sees seq k+1 before
/// seq k (seq order is commit order).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_get_gapless_commit_ordered_seqs() {
    let (node_a, sid, url) = store_with_session().await;
    let node_b = PgStore::connect_with(&url, PgOptions { max_connections: 4, ..PgOptions::default() }).await.unwrap();
    const TASKS: u16 = 6;
    const BATCHES: u16 = 12;
    const OPS: u16 = 3;
    let total = (TASKS * BATCHES * OPS) as u64;

    let done = Arc::new(AtomicBool::new(false));
    let follower = {
        let store = node_b.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut seen = 0u64;
            let mut reads = 0u32;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let (ops, cursor) = store.changes(sid, seen, 1000).await.unwrap();
                reads += 1;
                for op in &ops {
                    assert_eq!(op.seq, seen + 1, "a reader saw seq {} right after {seen}", op.seq);
                    seen = op.seq;
                }
                assert!(cursor >= seen, "cursor {cursor} behind an op it reflects ({seen})");
                if ops.is_empty() {
                    assert_eq!(cursor, seen, "the cursor shows ops the reader cannot see");
                }
                if finished && seen == cursor {
                    return (seen, reads);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = if task % 2 == 0 { node_a.clone() } else { node_b.clone() };
        tasks.push(tokio::spawn(async move {
            let guard = [GuardLink::session(S, 0)];
            let mut seqs = Vec::new();
            for b in 0..BATCHES {
                let ops = (0..OPS)
                    .map(|o| {
                        let n = 1000 + task * 100 + b * OPS + o;
                        put(n, EntityKind::Diff, &format!("t{task}-{b}-{o}"), "", "{}")
                    })
                    .collect();
                let appended = store.append(sid, S, &batch(task as u8 + 1, b as u64 + 1, ops), &guard).await.unwrap();
                let batch_seqs: Vec<u64> = appended.ack.results.iter().map(|r| r.seq).collect();
                assert!(appended.ack.results.iter().all(|r| r.status == OpStatus::Applied));
                assert!(
                    batch_seqs.windows(2).all(|w| w[1] == w[0] + 1),
                    "a batch's seqs are consecutive: {batch_seqs:?}"
                );
                assert_eq!(appended.ack.cursor, *batch_seqs.last().unwrap());
                assert_eq!(appended.applied.iter().map(|o| o.seq).collect::<Vec<_>>(), batch_seqs);
                seqs.extend(batch_seqs);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        let seqs = task.await.unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "a client's batches apply in its order");
        all.extend(seqs);
    }
    done.store(true, Ordering::SeqCst);
    let (followed, reads) = follower.await.unwrap();
    all.sort_unstable();
    assert_eq!(all, (1..=total).collect::<Vec<_>>(), "seqs are exactly 1..{total}");
    assert_eq!(followed, total);
    assert!(reads > 1);
    let (ops, cursor) = node_a.changes(sid, 0, 10_000).await.unwrap();
    assert_eq!(cursor, total);
    assert_eq!(ops.iter().map(|o| o.seq).collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>());
    assert_eq!(node_a.snapshot_page(sid, None, 10_000).await.unwrap().entities.len() as u64, total);
}

/// The same batch sent by two nodes at once (a client that reconnected to another node while
/// its first send was in flight) is applied once; the other answer is the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_batch_from_two_nodes_applies_once() {
    let (node_a, sid, url) = store_with_session().await;
    let node_b = PgStore::connect(&url).await.unwrap();
    let guard = [GuardLink::session(S, 0)];
    for round in 1..=10u16 {
        let b = batch(3, round as u64, vec![put(round, EntityKind::Diff, &format!("d{round}"), "", "{}")]);
        let (a, b2) = tokio::join!(node_a.append(sid, S, &b, &guard), node_b.append(sid, S, &b, &guard));
        let (a, b2) = (a.unwrap(), b2.unwrap());
        let statuses = [a.ack.results[0].status, b2.ack.results[0].status];
        assert!(statuses.contains(&OpStatus::Applied) && statuses.contains(&OpStatus::Duplicate), "{statuses:?}");
        assert_eq!(a.ack.results[0].seq, b2.ack.results[0].seq);
        assert_eq!(a.applied.len() + b2.applied.len(), 1);
    }
    assert_eq!(node_a.session(S).await.unwrap().unwrap().cursor, 10);
}

async fn store_with_share() -> (PgStore, i64, String, Vec<GuardLink>) {
    let (store, sid, url) = store_with_session().await;
    let share = ShareRow {
        id: "sh1".into(),
        sid,
        session_id: S.into(),
        parent_share_id: None,
        parent_epoch: 0,
        rights: Rights::ALL,
        label: "l".into(),
        epoch: 0,
        created_at: 5,
        expires_at: 0,
        last_used_at: 0,
        space: None,
    };
    let guard = vec![GuardLink::session(S, 0)];
    store
        .mint_share(&share, &token(TargetKind::Share, "sh1", 0, 0x11, Rights::ALL, 5), &guard, &event("mint", "sh1"))
        .await
        .unwrap();
    (store, sid, url, vec![GuardLink::share("sh1", 0), GuardLink::session(S, 0)])
}

/// A revocation in flight (its UPDATE done, not yet committed) holds an append of that share
/// until it commits; the append then fails with Revoked and applies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_waits_for_a_revocation_in_flight_and_then_fails() {
    let (store, sid, url, guard) = store_with_share().await;
    let mut other = support::connect(&url).await;
    let revocation = other.transaction().await.unwrap();
    revocation.execute("UPDATE shares SET epoch = epoch + 1 WHERE id = 'sh1'", &[]).await.unwrap();

    let append = {
        let store = store.clone();
        let guard = guard.clone();
        tokio::spawn(async move {
            store.append(sid, S, &batch(1, 1, vec![put(1, EntityKind::Diff, "d", "", "{}")]), &guard).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!append.is_finished(), "the append must wait for the revocation's row lock");
    revocation.commit().await.unwrap();
    assert_eq!(append.await.unwrap(), Err(PgError::Revoked));
    assert_eq!(store.session(S).await.unwrap().unwrap().cursor, 0);
    assert_eq!(store.last_batch_seq(sid, &[1; 16]).await.unwrap(), 0);
    let (ops, _) = store.changes(sid, 0, 10).await.unwrap();
    assert!(ops.is_empty());
}

/// Appends through a share run in a loop while the share is revoked: every append that
/// succeeded committed before the revocation (the cursor read right after `revoke_share`
/// returned is final), and every one after it fails with Revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_append_commits_after_a_revocation_commits() {
    let (store, sid, _url, guard) = store_with_share().await;
    let mut appenders = Vec::new();
    for client in 1..=3u8 {
        let store = store.clone();
        let guard = guard.clone();
        appenders.push(tokio::spawn(async move {
            let mut max_seq = 0;
            for n in 1..=500u16 {
                let op = put(client as u16 * 1000 + n, EntityKind::Diff, &format!("c{client}-{n}"), "", "{}");
                match store.append(sid, S, &batch(client, n as u64, vec![op]), &guard).await {
                    Ok(appended) => max_seq = max_seq.max(appended.ack.cursor),
                    Err(PgError::Revoked) => return (max_seq, n),
                    Err(other) => panic!("unexpected: {other}"),
                }
            }
            panic!("the revocation never reached this appender");
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(store.revoke_share("sh1", &event("revoke-share", "sh1")).await.unwrap(), Some(1));
    let at_revocation = store.session(S).await.unwrap().unwrap().cursor;
    assert!(at_revocation > 0, "some appends ran before the revocation");
    for appender in appenders {
        let (max_seq, stopped_at) = appender.await.unwrap();
        assert!(max_seq <= at_revocation, "an append acked seq {max_seq} after the revocation at {at_revocation}");
        assert!(stopped_at > 1 || max_seq == 0);
    }
    assert_eq!(store.session(S).await.unwrap().unwrap().cursor, at_revocation);
    let (ops, cursor) = store.changes(sid, 0, 10_000).await.unwrap();
    assert_eq!((ops.len() as u64, cursor), (at_revocation, at_revocation));
}

/// Minting under a revoked share fails and stores nothing; the session's own guard still works.
#[tokio::test]
async fn mint_is_guarded() {
    let (store, sid, _url, guard) = store_with_share().await;
    store.revoke_share("sh1", &event("revoke-share", "sh1")).await.unwrap();
    let child = ShareRow {
        id: "sh2".into(),
        sid,
        session_id: S.into(),
        parent_share_id: Some("sh1".into()),
        parent_epoch: 0,
        rights: Rights::default(),
        label: String::new(),
        epoch: 0,
        created_at: 6,
        expires_at: 0,
        last_used_at: 0,
        space: None,
    };
    let t = token(TargetKind::Share, "sh2", 0, 0x12, Rights::default(), 6);
    assert_eq!(store.mint_share(&child, &t, &guard, &event("mint", "sh2")).await, Err(PgError::Revoked));
    assert_eq!(store.resolve_token(&[0x12; 32]).await.unwrap(), None);
    assert_eq!(store.share("sh2").await.unwrap(), None);
    assert_eq!(store.list_shares(Some(S)).await.unwrap().len(), 1);
}

/// Two nodes starting on an empty database: exactly one creates the admin object, each stores
/// a token of its own at the epoch in force; `renew_admin` bumps the epoch; `ensure_admin`
/// never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_admin_creates_once_and_never_bumps() {
    let url = support::fresh_db().await;
    let (a, b) = tokio::join!(PgStore::connect(&url), PgStore::connect(&url));
    let (a, b) = (a.unwrap(), b.unwrap());
    let ta = token(TargetKind::Admin, "admin", 9, 0xA1, Rights::default(), 1);
    let tb = token(TargetKind::Admin, "admin", 9, 0xA2, Rights::default(), 1);
    let (ra, rb) = tokio::join!(a.ensure_admin(&ta), b.ensure_admin(&tb));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!((ra.0, rb.0), (0, 0));
    assert!(ra.1 ^ rb.1, "exactly one node creates the admin object: {ra:?} {rb:?}");
    for hash in [[0xA1; 32], [0xA2; 32]] {
        let resolved = a.resolve_token(&hash).await.unwrap().unwrap();
        assert_eq!((resolved.token.minted_epoch, resolved.admin_epoch), (0, Some(0)), "each node's token is valid");
    }
    assert_eq!(a.renew_admin(&token(TargetKind::Admin, "admin", 0, 0xA3, Rights::default(), 2)).await.unwrap(), 1);
    let renewed = a.resolve_token(&[0xA3; 32]).await.unwrap().unwrap();
    assert_eq!((renewed.token.minted_epoch, renewed.admin_epoch), (1, Some(1)));
    assert_eq!(
        b.ensure_admin(&token(TargetKind::Admin, "admin", 0, 0xA4, Rights::default(), 3)).await.unwrap(),
        (1, false)
    );
    assert_eq!(a.resolve_token(&[0xA4; 32]).await.unwrap().unwrap().token.minted_epoch, 1, "joined at the epoch in force");
    assert_eq!(b.admin_epoch().await.unwrap(), Some(1));
}

/// PostgreSQL text cannot hold U+0000: such ids are rejected ops, never a failed batch; audit
/// text has it replaced.
#[tokio::test]
async fn nul_in_ids_is_a_rejected_op() {
    let (store, sid, _url) = store_with_session().await;
    let ops = vec![
        put(1, EntityKind::Diff, "a\0b", "", "{}"),
        put(2, EntityKind::Part, "p", "m\0", "{}"),
        put(3, EntityKind::Diff, "fine", "", "{}"),
    ];
    let appended = store.append(sid, S, &batch(1, 1, ops), &[]).await.unwrap();
    let statuses: Vec<OpStatus> = appended.ack.results.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [OpStatus::Rejected, OpStatus::Rejected, OpStatus::Applied]);
    assert_eq!(appended.ack.cursor, 1);
    store.audit(&event("denied", "x\0y")).await.unwrap();
    let rows = store.audit_page(0, 100).await.unwrap();
    assert_eq!(rows.last().unwrap().event.target_id, "x\u{FFFD}y");
}

/// The audit table refuses updates and deletes.
#[tokio::test]
async fn audit_is_append_only() {
    let (_store, _sid, url) = store_with_session().await;
    let client = support::connect(&url).await;
    let err = client.execute("UPDATE audit SET detail = 'x'", &[]).await.unwrap_err();
    assert!(err.as_db_error().unwrap().message().contains("append-only"));
    let err = client.execute("DELETE FROM audit", &[]).await.unwrap_err();
    assert!(err.as_db_error().unwrap().message().contains("append-only"));
}

/// An unreachable server is a clear, retryable error naming the address, never the password;
/// so is a connection the server cut.
#[tokio::test]
async fn unreachable_is_unavailable() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("postgres://someone:sekrit-password@127.0.0.1:{port}/db?connect_timeout=2");
    let started = std::time::Instant::now();
    let err = PgStore::connect(&url).await.err().expect("nothing listens there");
    let text = err.to_string();
    assert!(matches!(err, PgError::Unavailable(_)), "{err:?}");
    assert!(err.is_retryable());
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!text.contains("sekrit"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(matches!(PgStore::connect("not a url at all =").await, Err(PgError::Other(_))));

    // A backend terminated under a pooled connection.
    let (store, sid, url) = store_with_session().await;
    let admin = support::connect(&url).await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = 'capsync'",
            &[],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The first call on a dead pooled connection may fail retryably; a retry gets a new one.
    match store.changes(sid, 0, 10).await {
        Ok(_) => {}
        Err(err) => assert!(err.is_retryable(), "{err:?}"),
    }
    store.changes(sid, 0, 10).await.unwrap();
    store.probe().await.unwrap();
}

/// Many tasks on two pools (two "nodes") open the same new key of a space at once: they all get
/// one session, exactly one of them created it, each stored its own owner token of it, and no
/// orphan session is left behind. Meanwhile a revocation of the space lands: opens that commit
/// after it fail with `Revoked` and store nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_opens_of_one_key_get_one_session() {
    const SP: &str = "0190b000-0000-7000-8000-0000000000ff";
    let url = support::fresh_db().await;
    let node_a = PgStore::connect(&url).await.unwrap();
    let node_b = PgStore::connect_with(&url, PgOptions { max_connections: 4, ..PgOptions::default() }).await.unwrap();
    let space = SpaceRow { id: SP.into(), label: "l".into(), epoch: 0, created_at: 1 };
    node_a.create_space(&space, &token(TargetKind::Space, SP, 0, 0xB0, Rights::default(), 1), &[], &event("create-space", SP)).await.unwrap();
    let open = |n: u8| OpenSession {
        space_id: SP.into(),
        key: "the-key".into(),
        title: format!("try {n}"),
        new_session_id: format!("0190b000-0000-7000-8000-0000000001{n:02x}"),
        owner: TokenRow {
            space: Some(SpaceLink { space_id: SP.into(), epoch: 0 }),
            ..token(TargetKind::Session, "", 0, n, Rights::ALL, 2)
        },
    };
    const TASKS: u8 = 16;
    let mut tasks = Vec::new();
    for n in 1..=TASKS {
        let store = if n % 2 == 0 { node_a.clone() } else { node_b.clone() };
        let open = open(n);
        tasks.push(tokio::spawn(async move {
            store.open_space_session(&open, &[GuardLink::space(SP, 0)], &event("open-session", SP)).await.unwrap()
        }));
    }
    let mut opened = Vec::new();
    for task in tasks {
        opened.push(task.await.unwrap());
    }
    let first = &opened[0].session_id;
    assert!(opened.iter().all(|o| &o.session_id == first), "one session for one key: {opened:?}");
    assert_eq!(opened.iter().filter(|o| o.created).count(), 1, "exactly one open created it");
    assert_eq!(node_a.list_sessions().await.unwrap().len(), 1, "no orphan session");
    assert_eq!(node_a.space_sessions(SP).await.unwrap().len(), 1);
    for n in 1..=TASKS {
        let res = node_a.resolve_token(&[n; 32]).await.unwrap().expect("every open stored its owner token");
        assert_eq!(&res.token.target_id, first);
    }

    // Opens of new keys racing a revocation of the space: none commits after it.
    let mut tasks = Vec::new();
    for n in 0..12u8 {
        let store = if n % 2 == 0 { node_a.clone() } else { node_b.clone() };
        let mut open = open(0x40 + n);
        open.key = format!("key-{n}");
        tasks.push(tokio::spawn(async move {
            store.open_space_session(&open, &[GuardLink::space(SP, 0)], &event("open-session", SP)).await
        }));
        if n == 5 {
            assert_eq!(node_b.revoke_space(SP, &event("revoke", SP)).await, Ok(Some(1)));
        }
    }
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => {}
            Err(PgError::Revoked) => refused += 1,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    let sessions = node_a.space_sessions(SP).await.unwrap().len();
    assert_eq!(sessions + refused, 1 + 12, "every open either committed before the revocation or stored nothing");
    assert!(refused >= 6, "the opens started after the revocation were refused ({refused})");
    assert_eq!(node_a.list_sessions().await.unwrap().len(), sessions);
    assert_eq!(
        node_a.open_space_session(&open(0x7f), &[GuardLink::space(SP, 0)], &event("open-session", SP)).await,
        Err(PgError::Revoked)
    );
}

/// An append is one `capsync_append` call in autocommit, whose COMMIT runs at the protocol's
/// Sync: the call must not answer before that commit, and a commit that fails must fail the
/// append. A check deferred to the commit (a constraint trigger) refuses the batch record
/// only at COMMIT: the append fails, and nothing of it is stored.
#[tokio::test]
async fn append_waits_for_its_commit() {
    let (store, sid, url) = store_with_session().await;
    let client = support::connect(&url).await;
    client
        .batch_execute(
            "CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'refused at commit'; END; $$;
             CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON client_batches
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit();",
        )
        .await
        .unwrap();
    let err = store.append(sid, S, &batch(1, 1, vec![put(1, EntityKind::Diff, "d", "", "{}")]), &[]).await.unwrap_err();
    assert!(err.to_string().contains("refused at commit"), "{err}");
    assert_eq!(store.session(S).await.unwrap().unwrap().cursor, 0);
    assert!(store.changes(sid, 0, 10).await.unwrap().0.is_empty());

    client.batch_execute("DROP TRIGGER refuse_at_commit ON client_batches").await.unwrap();
    let appended = store.append(sid, S, &batch(1, 1, vec![put(1, EntityKind::Diff, "d", "", "{}")]), &[]).await.unwrap();
    assert_eq!(appended.ack.results[0].status, OpStatus::Applied);
}
