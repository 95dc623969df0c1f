//! The server on PostgreSQL (`capsync serve --store postgres://...`, issue 15), end to end: the
//! README's quick start works unchanged, `admin stats` names the store, and a PostgreSQL that
//! cannot be reached at start is one clear line and a non-zero exit. The database is a fresh
//! one in a throwaway cluster this test binary starts (see `capsync_store_postgres::testing`).
//! With TLS (libpq's `sslmode`), on a second cluster that serves TLS only: verify-full serves,
//! every connection encrypted; a certificate it refuses, or a bad sslmode, is one clear line.

mod common;

use capsync_store_postgres::testing::{fresh_database, query, tls_cluster, SCRAM_PASSWORD, SCRAM_USER};
use common::*;
use std::process::{Command, Stdio};

#[test]
fn the_quick_start_works_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let url = fresh_database();
    let server = Server::start_with_args(&data, &["--store", &url]);
    let admin_file = data.join("admin.uri");
    let admin_file = admin_file.to_str().unwrap();
    let run = |args: &[&str]| -> String {
        let out = capsync(&dir.path().join("outbox.db"), args, &[]);
        assert!(out.status.success(), "capsync {}: {}", args[0], String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let owner = run(&["admin", "--admin-file", admin_file, "create-session", "--title", "on postgres"]);
    let reader = run(&["share", &owner, "--rights", "read", "--label", "teammate", "--ttl", "1d"]);
    run(&["put", &owner, "--kind", "message", "--id", "m1", "--data", "{\"role\":\"user\"}"]);
    let ops = dir.path().join("ops.jsonl");
    write_jsonl(&ops, 500, "p");
    assert!(run(&["push", &owner, "--file", ops.to_str().unwrap()]).contains("pushed 500 ops"));

    let pulled = capsync(&dir.path().join("reader.db"), &["pull", &reader, "--json"], &[]);
    assert!(pulled.status.success(), "{}", String::from_utf8_lossy(&pulled.stderr));
    let pulled: serde_json::Value = serde_json::from_slice(&pulled.stdout).unwrap();
    assert_eq!(pulled["entities"].as_array().unwrap().len(), 501);
    assert_eq!(pulled["cursor"], 501, "501 ops applied once each, seqs without a gap");

    // A follower sees what is written after it started.
    let (mut tail, lines) = follower(&reader, &dir.path().join("tail.db"));
    run(&["put", &owner, "--kind", "message", "--id", "live", "--data", "{}"]);
    let line = lines.recv_timeout(std::time::Duration::from_secs(60)).expect("the follower prints the new op");
    let op: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!((op["seq"].as_u64(), op["id"].as_str()), (Some(502), Some("live")));
    tail.kill().unwrap();
    tail.wait().unwrap();

    let shares = run(&["admin", "--admin-file", admin_file, "list-shares", "--json"]);
    let shares: serde_json::Value = serde_json::from_str(&shares).unwrap();
    let share_id = shares[0]["share_id"].as_str().unwrap().to_owned();
    run(&["admin", "--admin-file", admin_file, "revoke-share", &share_id]);
    let refused = capsync(&dir.path().join("reader2.db"), &["pull", &reader], &[]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("capsync/revoked"));

    let stats = run(&["admin", "--admin-file", admin_file, "stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["store"], "postgres");
    assert_eq!(stats["ops"], 502);
    drop(server);
}

#[test]
fn an_unreachable_postgres_at_start_is_one_clear_line_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://capsync:s3cret-password@127.0.0.1:{port}/nowhere?connect_timeout=5");
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", dir.path().join("data").to_str().unwrap(), "--store", &url])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("rror")).collect();
    assert_eq!(errors.len(), 1, "one line: {stderr}");
    assert!(errors[0].contains("unavailable") || errors[0].contains("connect"), "{stderr}");
    assert!(!stderr.contains("s3cret-password"), "the password is never printed");
    assert!(String::from_utf8_lossy(&out.stdout).is_empty(), "never said it listens");
}

#[test]
fn sqlite_stays_the_default_and_stats_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _server = Server::start(&data);
    let (ok, out, err) = cli(&["admin", "--admin-file", data.join("admin.uri").to_str().unwrap(), "stats", "--json"]);
    assert!(ok, "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["store"], "sqlite");
}

#[test]
fn serve_on_postgres_over_tls_with_sslmode_verify_full() {
    let cluster = tls_cluster();
    let ca = cluster.tls().unwrap().ca.display().to_string();
    let database = cluster.fresh_database();
    let url = format!("{database}?sslmode=verify-full&sslrootcert={ca}");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start_with_args(&data, &["--store", &url]);
    let admin_file = data.join("admin.uri");
    let run = |args: &[&str]| -> String {
        let out = capsync(&dir.path().join("outbox.db"), args, &[]);
        assert!(out.status.success(), "capsync {}: {}", args[0], String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let owner = run(&["admin", "--admin-file", admin_file.to_str().unwrap(), "create-session", "--title", "over TLS"]);
    run(&["put", &owner, "--kind", "message", "--id", "m1", "--data", "{}"]);
    let pulled = capsync(&dir.path().join("reader.db"), &["pull", &owner, "--json"], &[]);
    assert!(pulled.status.success(), "{}", String::from_utf8_lossy(&pulled.stderr));
    let pulled: serde_json::Value = serde_json::from_slice(&pulled.stdout).unwrap();
    assert_eq!(pulled["cursor"], 1);

    // Every connection the server holds to its database (the pool's and the LISTEN one) is
    // encrypted, as PostgreSQL sees it.
    let db = database.rsplit('/').next().unwrap();
    let counts = || {
        let rows = query(
            &cluster.socket_url(db),
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.datname = current_database() AND a.application_name = 'capsync'",
        );
        let count = |i: usize| rows[0][i].as_deref().unwrap().parse::<u64>().unwrap();
        (count(0), count(1))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (mut encrypted, mut all) = counts();
    while all < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        (encrypted, all) = counts();
    }
    assert!(all >= 2 && encrypted == all, "{encrypted} of {all} connections are encrypted");
    drop(server);
}

#[test]
fn a_refused_certificate_or_a_bad_sslmode_is_one_clear_line_without_the_password() {
    let cluster = tls_cluster();
    let other_ca = cluster.tls().unwrap().other_ca.display().to_string();
    let database = cluster.fresh_database();
    let (port, db) = (cluster.port, database.rsplit('/').next().unwrap());
    let base = format!("postgres://{SCRAM_USER}:{SCRAM_PASSWORD}@127.0.0.1:{port}/{db}");
    for (params, expected) in [
        (format!("sslmode=verify-full&sslrootcert={other_ca}"), "not signed by a trusted CA"),
        ("sslmode=verify_full".to_owned(), "sslmode \"verify_full\" is not one of"),
        ("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem".to_owned(), "/nonexistent/ca.pem"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", dir.path().join("data").to_str().unwrap()])
            .args(["--store", &format!("{base}?{params}")])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{params}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("rror")).collect();
        assert_eq!(errors.len(), 1, "{params}: one line: {stderr}");
        assert!(errors[0].contains(expected), "{params}: {stderr}");
        assert!(!stderr.contains(SCRAM_PASSWORD), "{params}: the password is never printed: {stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).is_empty(), "never said it listens");
    }
}
