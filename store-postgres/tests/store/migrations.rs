//! The schema migrations: re-running them is a no-op, several migrators at once (servers
//! starting together) all succeed with the schema applied once, and a database from a newer
//! capsync is refused.

use crate::support;
use capsync_store_postgres::migrate::{self, LATEST};
use capsync_store_postgres::{PgError, PgOptions, PgStore};

/// Every table, column (type, nullability, default, collation), index, constraint, trigger and
/// function (by a hash of its definition) of the public schema, as text, for comparing two states.
async fn describe(client: &tokio_postgres::Client) -> Vec<String> {
    let mut out = Vec::new();
    for row in client
        .query(
            "SELECT table_name, column_name, data_type, is_nullable, coalesce(column_default, ''),
                    coalesce(collation_name, '')
             FROM information_schema.columns WHERE table_schema = 'public'
             ORDER BY table_name, ordinal_position",
            &[],
        )
        .await
        .unwrap()
    {
        let cols: Vec<String> = (0..6).map(|i| row.get::<_, String>(i)).collect();
        out.push(format!("column {}", cols.join(" ")));
    }
    for row in client
        .query("SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexname", &[])
        .await
        .unwrap()
    {
        out.push(format!("index {}", row.get::<_, String>(0)));
    }
    for row in client
        .query(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
             WHERE connamespace = 'public'::regnamespace ORDER BY conname",
            &[],
        )
        .await
        .unwrap()
    {
        out.push(format!("constraint {} {}", row.get::<_, String>(0), row.get::<_, String>(1)));
    }
    for row in client
        .query("SELECT tgname, tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal ORDER BY tgname", &[])
        .await
        .unwrap()
    {
        out.push(format!("trigger {} on {}", row.get::<_, String>(0), row.get::<_, String>(1)));
    }
    for row in client
        .query(
            "SELECT p.proname, pg_get_function_identity_arguments(p.oid), md5(pg_get_functiondef(p.oid))
             FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
    {
        let cols: Vec<String> = (0..3).map(|i| row.get::<_, String>(i)).collect();
        out.push(format!("function {}", cols.join(" ")));
    }
    out
}

async fn versions(client: &tokio_postgres::Client) -> Vec<i32> {
    client
        .query("SELECT version FROM capsync_schema_versions ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn rerunning_migrations_is_a_no_op() {
    let url = support::fresh_db().await;
    let mut client = support::connect(&url).await;
    assert_eq!(migrate::current_version(&client).await.unwrap(), 0);
    let applied = migrate::run(&mut client).await.unwrap();
    assert_eq!(applied, (1..=LATEST).collect::<Vec<_>>());
    assert_eq!(migrate::current_version(&client).await.unwrap(), LATEST);
    let schema = describe(&client).await;
    assert!(schema.iter().any(|l| l.starts_with("column ops payload_hash bytea")), "{schema:#?}");
    assert!(schema.iter().any(|l| l.starts_with("column entities id text NO  C")), "{schema:#?}");

    assert_eq!(migrate::run(&mut client).await.unwrap(), Vec::<i32>::new());
    // connect() migrates too, and finds nothing to do.
    PgStore::connect(&url).await.unwrap();
    assert_eq!(describe(&client).await, schema);
    assert_eq!(versions(&client).await, (1..=LATEST).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrators_all_succeed() {
    let url = support::fresh_db().await;
    let mut starts = Vec::new();
    for _ in 0..6 {
        let url = url.clone();
        starts.push(tokio::spawn(async move {
            PgStore::connect_with(&url, PgOptions { max_connections: 2, ..PgOptions::default() }).await
        }));
    }
    for start in starts {
        start.await.unwrap().expect("every concurrent migrator succeeds");
    }
    let client = support::connect(&url).await;
    assert_eq!(versions(&client).await, (1..=LATEST).collect::<Vec<_>>());

    // The same through the bare runner, on clients of their own.
    let url = support::fresh_db().await;
    let mut runs = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        runs.push(tokio::spawn(async move {
            let mut client = support::connect(&url).await;
            migrate::run(&mut client).await.unwrap()
        }));
    }
    let mut applied = Vec::new();
    for run in runs {
        applied.extend(run.await.unwrap());
    }
    applied.sort_unstable();
    assert_eq!(applied, (1..=LATEST).collect::<Vec<_>>(), "each version is applied exactly once");
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let url = support::fresh_db().await;
    let mut client = support::connect(&url).await;
    migrate::run(&mut client).await.unwrap();
    client
        .execute(
            "INSERT INTO capsync_schema_versions (version, description) VALUES ($1, 'from the future')",
            &[&(LATEST + 1)],
        )
        .await
        .unwrap();
    let err = PgStore::connect(&url).await.err().expect("a newer schema is refused");
    assert_eq!(err, PgError::NewerSchema { found: LATEST as u32 + 1, supported: LATEST as u32 });
    assert!(err.to_string().contains("schema version"));
}

/// Stopping at a version and resuming later applies only what is missing (with one version
/// today this checks the runner's bookkeeping; it upgrades for real once there are more).
#[tokio::test]
async fn migrating_in_steps_reaches_the_same_schema() {
    let fresh = support::fresh_db().await;
    let mut fresh_client = support::connect(&fresh).await;
    migrate::run(&mut fresh_client).await.unwrap();

    let stepped = support::fresh_db().await;
    let mut client = support::connect(&stepped).await;
    assert_eq!(migrate::run_to(&mut client, 0).await.unwrap(), Vec::<i32>::new());
    for version in 1..=LATEST {
        assert_eq!(migrate::run_to(&mut client, version).await.unwrap(), vec![version]);
    }
    assert_eq!(describe(&client).await, describe(&fresh_client).await);
}

/// A database at version 2 (before spaces) with a session, its owner token and a share is
/// upgraded in place: everything is kept, descends from no space, and resolves as before; the
/// new constraints hold (a second session for one key of a space is refused, space tokens are
/// allowed).
#[tokio::test]
async fn upgrading_from_v2_keeps_data_and_adds_spaces() {
    let url = support::fresh_db().await;
    let mut client = support::connect(&url).await;
    assert_eq!(migrate::run_to(&mut client, 2).await.unwrap(), vec![1, 2]);
    client
        .batch_execute(
            "INSERT INTO sessions (id, title, created_at) VALUES ('s1', 'kept', 1);
             INSERT INTO tokens (hash, target_kind, target_id, minted_epoch, rights, parent, label, created_at, expires_at)
                 VALUES (decode(repeat('01', 32), 'hex'), 'session', 's1', 0, 7, 'admin', 'owner', 1, 0);
             INSERT INTO shares (id, sid, parent_epoch, rights, label, created_at, expires_at)
                 SELECT 'sh1', sid, 0, 1, 'kept share', 2, 0 FROM sessions;",
        )
        .await
        .unwrap();
    let err = client
        .batch_execute("INSERT INTO tokens (hash, target_kind, target_id, minted_epoch, rights, parent, label, created_at, expires_at)
                        VALUES (decode(repeat('02', 32), 'hex'), 'space', 'x', 0, 0, 'admin', '', 1, 0)")
        .await;
    assert!(err.is_err(), "version 2 knows no space tokens");

    let store = PgStore::connect(&url).await.unwrap();
    assert_eq!(migrate::current_version(&client).await.unwrap(), LATEST);
    let res = store.resolve_token(&[1; 32]).await.unwrap().expect("the owner token survived");
    assert_eq!((res.token.target_id.as_str(), res.token.space.as_ref(), res.space.as_ref()), ("s1", None, None));
    assert_eq!(res.session.unwrap().title, "kept");
    let share = store.share("sh1").await.unwrap().unwrap();
    assert_eq!((share.label.as_str(), share.space), ("kept share", None));

    client
        .batch_execute(
            "INSERT INTO spaces (id, label, created_at) VALUES ('sp', '', 3);
             INSERT INTO tokens (hash, target_kind, target_id, minted_epoch, rights, parent, label, created_at, expires_at)
                 VALUES (decode(repeat('02', 32), 'hex'), 'space', 'sp', 0, 0, 'admin', '', 3, 0);
             INSERT INTO sessions (id, title, created_at) VALUES ('s2', '', 3);
             INSERT INTO space_sessions (space_id, key, sid, created_at) SELECT 'sp', 'k', sid, 3 FROM sessions WHERE id = 's1';",
        )
        .await
        .unwrap();
    let second = client
        .batch_execute("INSERT INTO space_sessions (space_id, key, sid, created_at) SELECT 'sp', 'k', sid, 3 FROM sessions WHERE id = 's2'")
        .await;
    assert!(second.is_err(), "the database refuses a second session for one key");
    assert_eq!(store.list_spaces().await.unwrap().len(), 1);
}

/// A batch stored at version 3, when the node's own statements applied it (its opIds and
/// results in `capsync_model::replay`'s encoding), is answered from what was stored once the
/// database is at version 4 and `capsync_append` applies batches: its replay gets the stored
/// results, and its opId sent again in a new batch is a duplicate with its first seq.
#[tokio::test]
async fn upgrading_from_v3_answers_replays_of_batches_stored_before() {
    use crate::conformance::{batch, put};
    use capsync_model::{EntityKind, OpOutcome, OpStatus};
    let url = support::fresh_db().await;
    let mut client = support::connect(&url).await;
    assert_eq!(migrate::run_to(&mut client, 3).await.unwrap(), vec![1, 2, 3]);
    let first = batch(7, 1, vec![put(1, EntityKind::Diff, "d1", "", "{}")]);
    let Ok(body) = &first.ops[0].body else { unreachable!() };
    let stored = [OpOutcome { op_id: Vec::new(), status: OpStatus::Applied, seq: 1, reason: String::new() }];
    let sid: i64 = client
        .query_one("INSERT INTO sessions (id, title, cursor, created_at) VALUES ('s1', '', 1, 1) RETURNING sid", &[])
        .await
        .unwrap()
        .get(0);
    client
        .execute(
            "INSERT INTO ops (sid, seq, op_id, payload_hash, is_delete, kind, entity_id, parent_id, data)
             VALUES ($1, 1, $2, $3, false, 3, 'd1', '', '{}')",
            &[&sid, &first.ops[0].op_id, &&body.payload_hash()[..]],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO client_batches (sid, client_id, batch_seq, op_ids, results) VALUES ($1, $2, 1, $3, $4)",
            &[
                &sid,
                &&first.client_id[..],
                &capsync_model::replay::encode_op_ids(&first),
                &capsync_model::replay::encode_results(&stored),
            ],
        )
        .await
        .unwrap();

    let store = PgStore::connect(&url).await.unwrap();
    assert_eq!(migrate::current_version(&client).await.unwrap(), LATEST);
    let replay = store.append(sid, "s1", &first, &[]).await.unwrap();
    assert_eq!((replay.ack.cursor, replay.ack.results[0].status, replay.ack.results[0].seq), (1, OpStatus::Duplicate, 1));
    assert!(replay.applied.is_empty());
    let second = batch(7, 2, vec![put(1, EntityKind::Diff, "d1", "", "{}"), put(2, EntityKind::Diff, "d2", "", "{}")]);
    let acked = store.append(sid, "s1", &second, &[]).await.unwrap();
    let got: Vec<(OpStatus, u64)> = acked.ack.results.iter().map(|r| (r.status, r.seq)).collect();
    assert_eq!(got, [(OpStatus::Duplicate, 1), (OpStatus::Applied, 2)]);
}
