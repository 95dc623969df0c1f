//! Issue 7, token hygiene: every flow of the CLI at `trace`, and no token anywhere in what the
//! processes logged or printed (except the sturdy URIs `create-session`, `create-space`,
//! `mint-share` and `share` print on purpose), nor in the audit table.

mod common;

use capsync_schema::SturdyUri;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

on_both_stores! {
    #[test]
    fn no_flow_logs_prints_or_audits_a_token() {
        flows("text");
    }

    /// The same with `--log-format json` (issue 18): the JSON logs hold no token either, and every
    /// line the server logged is one JSON object.
    #[test]
    fn no_flow_logs_a_token_in_json_logs_either() {
        let server_log = flows("json");
        let mut calls = 0;
        for line in server_log.lines().filter(|l| !l.trim().is_empty()) {
            let event: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            assert!(event["level"].is_string() && event["fields"].is_object(), "a tracing JSON event: {line}");
            let fields = &event["fields"];
            if fields["message"] == "call" {
                assert!(fields["method"].is_string() && fields["marker"].is_string() && fields["duration_ms"].is_number(), "{line}");
                calls += 1;
            }
        }
        assert!(calls > 10, "every call is logged with method, marker and duration_ms");
    }
}

/// Runs every flow with logs in `format`; returns the server's log.
fn flows(format: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start_with_env(&data, "127.0.0.1:0", &[("CAPSYNC_LOG_FORMAT", format)]);
    let admin_file = data.join("admin.uri");
    let admin_file = admin_file.to_str().unwrap();
    let outbox = dir.path().join("outbox.db");
    let mut printed = String::new();
    let mut run = |args: &[&str], secret_stdout: bool| -> (bool, String) {
        let out = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "trace")
            .env("CAPSYNC_LOG_FORMAT", format)
            .env("CAPSYNC_OUTBOX", &outbox)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        printed.push_str(&String::from_utf8_lossy(&out.stderr));
        if !secret_stdout {
            printed.push_str(&stdout);
        }
        (out.status.success(), stdout)
    };

    let (ok, owner) = run(&["admin", "--admin-file", admin_file, "create-session", "--title", "hygiene"], true);
    assert!(ok);
    let owner = owner.trim().to_owned();
    let (ok, writer) = run(&["share", &owner, "--rights", "read,append,mint", "--label", "w", "--ttl", "1h"], true);
    assert!(ok);
    let writer = writer.trim().to_owned();
    let (ok, reader) = run(&["share", &writer, "--rights", "read", "--label", "r"], true);
    assert!(ok);
    let reader = reader.trim().to_owned();
    assert!(run(&["put", &writer, "--kind", "message", "--id", "m1", "--data", "{\"role\":\"user\"}"], false).0);
    let ops = dir.path().join("ops.jsonl");
    std::fs::write(&ops, "{\"op\":\"put\",\"kind\":\"part\",\"id\":\"p1\",\"parent\":\"m1\",\"data\":\"hi\"}\n").unwrap();
    assert!(run(&["push", &writer, "--file", ops.to_str().unwrap()], false).0);
    assert!(run(&["sync"], false).0);
    assert!(run(&["pull", &reader, "--json"], false).0);
    assert!(run(&["status", "--json"], false).0);
    assert!(run(&["status"], false).0);
    let mut tail = Command::new(BIN)
        .args(["tail", &reader, "--json"])
        .env("RUST_LOG", "trace")
        .env("CAPSYNC_LOG_FORMAT", format)
        .env("CAPSYNC_OUTBOX", dir.path().join("tail.db"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(run(&["put", &writer, "--kind", "message", "--id", "m2", "--data", "2"], false).0);
    std::thread::sleep(Duration::from_millis(500));
    assert!(run(&["admin", "--admin-file", admin_file, "list-sessions", "--json"], false).0);
    let (ok, shares) = run(&["admin", "--admin-file", admin_file, "list-shares", "--json"], false);
    assert!(ok);
    let shares: serde_json::Value = serde_json::from_str(&shares).unwrap();
    let writer_id = shares.as_array().unwrap().iter().find(|s| s["label"] == "w").unwrap()["share_id"].as_str().unwrap().to_owned();
    assert!(run(&["admin", "--admin-file", admin_file, "revoke-share", &writer_id], false).0);
    // Error paths: a revoked ref, a forged token, a malformed URI.
    assert!(!run(&["put", &writer, "--kind", "message", "--id", "m3", "--data", "3"], false).0);
    assert!(!run(&["pull", &reader], false).0);
    let forged = SturdyUri::new(server.addr.clone(), capsync_schema::Token::generate()).expose();
    assert!(!run(&["pull", &forged], false).0);
    assert!(!run(&["share", &format!("{owner}x"), "--rights", "read"], false).0);
    // Spaces: the URIs `create-space` and `mint-share` print are the only secrets shown.
    let (ok, space) = run(&["admin", "--admin-file", admin_file, "create-space", "--label", "hygiene"], true);
    assert!(ok);
    let space = space.trim().to_owned();
    let (ok, spaces) = run(&["admin", "--admin-file", admin_file, "list-spaces", "--json"], false);
    assert!(ok);
    assert!(run(&["admin", "--admin-file", admin_file, "list-spaces"], false).0);
    let spaces: serde_json::Value = serde_json::from_str(&spaces).unwrap();
    let space_id = spaces[0]["space_id"].as_str().unwrap().to_owned();
    let sessions: serde_json::Value = serde_json::from_str(&run(&["admin", "--admin-file", admin_file, "list-sessions", "--json"], false).1).unwrap();
    let session_id = sessions[0]["session_id"].as_str().unwrap().to_owned();
    let (ok, minted) = run(&["admin", "--admin-file", admin_file, "mint-share", &session_id, "--rights", "read"], true);
    assert!(ok);
    let minted = minted.trim().to_owned();
    assert!(run(&["admin", "--admin-file", admin_file, "revoke-space", &space_id], false).0);
    assert!(!run(&["admin", "--admin", &space, "list-spaces"], false).0, "a space URI is no admin URI");
    assert!(run(&["admin", "--admin-file", admin_file, "audit", "--json"], false).0);
    assert!(run(&["admin", "--admin-file", admin_file, "stats"], false).0);
    tail.kill().unwrap();
    let tail = tail.wait_with_output().unwrap();
    printed.push_str(&String::from_utf8_lossy(&tail.stdout));
    printed.push_str(&String::from_utf8_lossy(&tail.stderr));

    let mut tokens: Vec<_> = [&owner, &writer, &reader, &forged, &space, &minted].iter().map(|u| SturdyUri::parse(u).unwrap().token).collect();
    tokens.push(server.admin_uri().token);
    assert!(printed.contains("DEBUG"), "the flows ran with verbose logs");
    assert!(printed.contains("capsync/revoked"), "the flows hit the revoked path");
    assert_no_tokens(&printed, &tokens, "the CLI's output and logs");
    assert_no_tokens(&server.log_text(), &tokens, "the server log");
    let audit = query_store(
        &data,
        "SELECT action, target_id, session_id, peer, detail FROM audit",
        "SELECT action, target_id, session_id, peer, detail FROM audit",
    );
    let audit: Vec<String> =
        audit.into_iter().map(|row| row.into_iter().map(Option::unwrap_or_default).collect::<Vec<_>>().join(" ")).collect();
    assert!(audit.len() > 10);
    assert_no_tokens(&audit.join("\n"), &tokens, "the audit table");
    server.log_text()
}
