//! Agents' own sessions in and out (issue 17), end to end: a real server over TCP, the
//! `capsync` binary, the fixtures of tests/fixtures.
//!
//! - `capsync import codex` of the fixtures through a space, twice: the second run queues
//!   nothing and the server applies nothing new; the corrupt file and the symlink out of the
//!   root are skipped with warnings naming them relative to the root; no token and no
//!   absolute path in any output. `pull codex:<id> --json` shows messages and parts; a read
//!   share minted with `share codex:<id>` exports, on a second outbox, the rollout byte for
//!   byte. On SQLite and on PostgreSQL.
//! - Lines appended to a rollout: a re-import sends those only (the server's cursor moves by
//!   their number).
//! - `capsync import opencode` of the JSON tree and its database.
//! - `capsync watch` killed with SIGKILL while a rollout grows, then restarted: the server's
//!   log holds every expected opId exactly once.
//! - A revoked space stops the watcher with one line and a non-zero exit; the queue is kept.
//!
//! The first test runs on both stores (the server side of an import: spaces, openSession,
//! appends, shares, snapshots); the others test the client side (positions, crash points,
//! the watcher, delivery), which does not depend on the store, and run on SQLite only to keep
//! the file fast.

mod common;

use capsync_agents::codex::CodexReader;
use capsync_agents::safety::SafeRoot;
use capsync_agents::{codex, Limits};
use capsync_schema::{SturdyUri, Token};
use common::*;
use serde_json::Value;
use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const S1: &str = "0198799a-1c2b-7d3e-8f40-5a6b7c8d9e01";
const S1_PATH: &str = "2025/08/05/rollout-2025-08-05T10-15-02-0198799a-1c2b-7d3e-8f40-5a6b7c8d9e01.jsonl";
const S2: &str = "0198799b-4a5b-7c6d-9e7f-8a9b0c1d2e02";
const S2_PATH: &str = "2025/08/05/rollout-2025-08-05T16-40-11-0198799b-4a5b-7c6d-9e7f-8a9b0c1d2e02.jsonl";
const S3_PATH: &str = "2025/08/06/rollout-2025-08-06T08-05-00-0198799c-5b6c-7d8e-af01-9b0c1d2e3f03.jsonl.zst";
const S4_PATH: &str = "2025/04/20/rollout-2025-04-20T09-00-00-7b1c2d3e-4f50-4a61-b7c8-d9e0f1a2b304.jsonl";
const CORRUPT_PATH: &str = "2025/08/07/rollout-2025-08-07T08-00-00-0198799d-0000-7000-8000-000000000005.jsonl";
const LINK_PATH: &str = "2025/08/07/rollout-2025-08-07T09-30-00-0198799e-0000-7000-8000-000000000006.jsonl";
const OC_TREE_ONLY: &str = "ses_6a1f2b3c4002bLmNoPqRsTuV";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A server and a space on it.
struct Setup {
    server: Server,
    dir: tempfile::TempDir,
    space: SturdyUri,
    space_id: String,
}

impl Setup {
    fn start() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let space = SturdyUri::parse(admin(&server, &["create-space", "--label", "agents"]).trim()).unwrap();
        let spaces: Value = serde_json::from_str(&admin(&server, &["list-spaces", "--json"])).unwrap();
        let space_id = spaces[0]["space_id"].as_str().unwrap().to_owned();
        Setup { server, dir, space, space_id }
    }

    fn outbox(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `capsync import AGENT ROOT --space … --json` on `outbox`: its JSON lines (the summary
    /// last) and its stderr.
    fn import(&self, outbox: &str, agent: &str, root: &Path) -> (Vec<Value>, String) {
        let out = capsync(&self.outbox(outbox), &["import", agent, root.to_str().unwrap(), "--json"], &[("CAPSYNC_SPACE", &self.space.expose())]);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
        assert!(out.status.success(), "import failed: {stderr}\n{stdout}");
        let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"))).collect();
        assert_eq!(lines.last().unwrap()["event"], "summary", "{stdout}");
        assert!(lines.iter().any(|l| l["event"] == "progress"), "progress lines: {stdout}");
        (lines, stderr)
    }

    /// Every token the outbox holds (the owner URIs the space opened).
    fn outbox_tokens(&self, outbox: &str) -> Vec<Token> {
        refs(&self.outbox(outbox)).into_iter().map(|(_, uri)| uri.token).collect()
    }
}

fn admin(server: &Server, args: &[&str]) -> String {
    let admin_file = server.data_dir.join("admin.uri");
    let mut all = vec!["admin", "--admin-file", admin_file.to_str().unwrap()];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = cli(&all);
    assert!(ok, "admin {args:?}: {stderr}");
    stdout
}

/// Runs `capsync` on an outbox and requires success; returns stdout.
fn ok(outbox: &Path, args: &[&str]) -> String {
    let out = capsync(outbox, args, &[]);
    assert!(out.status.success(), "capsync {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The refs of an outbox: (name, URI).
fn refs(outbox: &Path) -> Vec<(String, SturdyUri)> {
    let db = rusqlite::Connection::open(outbox).unwrap();
    let mut stmt = db.prepare("SELECT name, uri FROM refs ORDER BY name").unwrap();
    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .map(|(name, uri)| (name, SturdyUri::parse(&uri).unwrap()))
        .collect()
}

/// The owner token and capsync session id of an imported ref.
fn imported(outbox: &Path, name: &str) -> (Token, String) {
    let db = rusqlite::Connection::open(outbox).unwrap();
    let (uri, session): (String, String) = db
        .query_row("SELECT r.uri, i.session_id FROM refs r JOIN agent_imports i ON i.ref_name = r.name WHERE r.name = ?1", [name], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    (SturdyUri::parse(&uri).unwrap().token, session)
}

fn summary(lines: &[Value]) -> &Value {
    lines.last().unwrap()
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap();
}

/// Copies a directory tree (files and symlinks as they are).
fn copy_tree(from: &Path, to: &Path) {
    capsync_agents::fixtures::copy_tree(from, to).unwrap();
}

/// A rollout line: a function call output (a `part`) at second `i`.
fn part_line(i: usize) -> String {
    format!(
        "{{\"timestamp\":\"2025-08-05T11:{:02}:{:02}.000Z\",\"type\":\"response_item\",\"payload\":{{\"type\":\"function_call_output\",\"call_id\":\"call_{i}\",\"output\":\"line {i}\"}}}}\n",
        (i / 60) % 60,
        i % 60
    )
}

/// The opIds an import of the rollout at `rel` under `root` into `session` makes, read whole.
fn expected_op_ids(root: &Path, rel: &str, session: &str) -> HashSet<Vec<u8>> {
    let safe = SafeRoot::new(root).unwrap();
    let reader = CodexReader::open(&safe, rel, session, None, Limits::default()).unwrap();
    reader.map(|r| r.unwrap().op_id.to_vec()).collect()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

on_both_stores! {
    #[test]
    fn import_codex_twice_pull_share_and_export_byte_for_byte() {
        let setup = Setup::start();
        let root = fixtures().join("codex");
        let (lines, stderr) = setup.import("a.db", "codex", &root);
        let first = summary(&lines);
        assert_eq!((first["sessions"].as_u64(), first["new_sessions"].as_u64()), (Some(4), Some(4)), "{first}");
        let queued = first["records_queued"].as_u64().unwrap();
        assert!(queued > 20, "{first}");
        assert_eq!(first["ops_delivered"].as_u64(), Some(queued));
        assert_eq!(first["ops_kept"].as_u64(), Some(0));
        // The corrupt file and the symlink out of the root: skipped, named relative to the root.
        let warned: Vec<&str> = first["warned"].as_array().unwrap().iter().map(|w| w["path"].as_str().unwrap()).collect();
        assert!(warned.contains(&CORRUPT_PATH) && warned.contains(&LINK_PATH), "{first}");
        assert_eq!(first["warnings"].as_u64(), Some(warned.len() as u64));
        assert!(lines.iter().filter(|l| l["event"] == "warning").count() >= 2);
        let root_text = root.canonicalize().unwrap().to_string_lossy().into_owned();
        let all_output = format!("{}{stderr}", lines.iter().map(|l| l.to_string()).collect::<String>());
        assert!(!all_output.contains(&root_text) && !all_output.contains("fixtures/codex"), "no absolute path: {all_output}");
        let mut tokens = setup.outbox_tokens("a.db");
        tokens.push(setup.space.token.clone());
        assert_no_tokens(&all_output, &tokens, "the import's output");

        // The server holds each session once; a second run queues and applies nothing.
        let (owner, session_id) = imported(&setup.outbox("a.db"), &format!("codex:{S1}"));
        let cursor = server_cursor(&setup.server.addr, &owner).unwrap();
        assert!(cursor > 10);
        let (again, _) = setup.import("a.db", "codex", &root);
        let second = summary(&again);
        assert_eq!(
            (second["sessions"].as_u64(), second["new_sessions"].as_u64(), second["unchanged"].as_u64(), second["records_queued"].as_u64()),
            (Some(4), Some(0), Some(4), Some(0)),
            "{second}"
        );
        assert_eq!(server_cursor(&setup.server.addr, &owner), Some(cursor), "the server applied nothing new");
        assert_eq!(refs(&setup.outbox("a.db")).len(), 4, "no second ref");
        let spaces: Value = serde_json::from_str(&admin(&setup.server, &["list-spaces", "--json"])).unwrap();
        assert_eq!(spaces[0]["sessions"].as_u64(), Some(4), "no second session");

        // Plain output (no terminal, no --json): a summary naming the skipped files.
        let plain = capsync(&setup.outbox("a.db"), &["import", "codex", root.to_str().unwrap(), "--space", &setup.space.expose()], &[]);
        assert!(plain.status.success());
        let text = String::from_utf8_lossy(&plain.stdout);
        assert!(text.starts_with("codex: 4 session(s) (0 new, 4 unchanged), 0 record(s) queued"), "{text}");
        assert!(text.contains(&format!("  {CORRUPT_PATH}: not a Codex rollout")), "{text}");

        // The ref name works wherever a URI does: status, pull, share.
        let name = format!("codex:{S1}");
        let status: Value = serde_json::from_str(&ok(&setup.outbox("a.db"), &["status", &name, "--json"])).unwrap();
        let status = &status["refs"].as_array().unwrap()[0];
        assert_eq!((status["name"].as_str(), status["session_id"].as_str(), status["cursor"].as_u64()), (Some(name.as_str()), Some(session_id.as_str()), Some(cursor)));
        let pulled: Value = serde_json::from_str(&ok(&setup.outbox("a.db"), &["pull", &name, "--json"])).unwrap();
        let kinds: Vec<&str> = pulled["entities"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
        for kind in ["session", "message", "part", "model", "diff"] {
            assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
        }
        let refused = capsync(&setup.outbox("a.db"), &["pull", "codex:nope", "--json"], &[]);
        assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("no ref named codex:nope"));

        // A read share, handed to another machine: its export is the rollout, byte for byte.
        let share = ok(&setup.outbox("a.db"), &["share", &name, "--rights", "read", "--label", "laptop-2"]);
        let share = share.trim();
        let out = setup.dir.path().join("out/rollout.jsonl");
        ok(&setup.outbox("b.db"), &["export", share, "--format", "codex", "--to", out.to_str().unwrap()]);
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(root.join(S1_PATH)).unwrap(), "byte-identical rollout");
        // Into a sessions directory: at the rollout's own path; a truncated last line was never
        // imported, so it does not come back.
        let sessions_dir = setup.dir.path().join("codex-home/sessions");
        std::fs::create_dir_all(&sessions_dir).unwrap();
        ok(&setup.outbox("a.db"), &["export", &format!("codex:{S2}"), "--format", "codex", "--to", sessions_dir.to_str().unwrap()]);
        let original = std::fs::read(root.join(S2_PATH)).unwrap();
        let complete = &original[..original.iter().rposition(|&b| b == b'\n').unwrap() + 1];
        assert_eq!(std::fs::read(sessions_dir.join(S2_PATH)).unwrap(), complete);
        let again = capsync(&setup.outbox("a.db"), &["export", &format!("codex:{S2}"), "--format", "codex", "--to", sessions_dir.to_str().unwrap()], &[]);
        assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--force"), "an existing rollout is not replaced");
        assert_no_tokens(&setup.server.log_text(), &tokens, "the server log");
    }
}

#[test]
fn lines_appended_to_a_rollout_are_the_only_ones_sent_again() {
    let setup = Setup::start();
    let root = setup.dir.path().join("codex");
    let file = root.join(S1_PATH);
    copy(&fixtures().join("codex").join(S1_PATH), &file);
    let (lines, _) = setup.import("a.db", "codex", &root);
    assert_eq!(summary(&lines)["sessions"].as_u64(), Some(1));
    let (owner, _) = imported(&setup.outbox("a.db"), &format!("codex:{S1}"));
    let before = server_cursor(&setup.server.addr, &owner).unwrap();

    let mut out = std::fs::OpenOptions::new().append(true).open(&file).unwrap();
    for i in 0..3 {
        out.write_all(part_line(i).as_bytes()).unwrap();
    }
    // A line still being written: not read until complete.
    out.write_all(b"{\"timestamp\":\"2025-08-05T12:00:00.000Z\",\"type\":\"resp").unwrap();
    drop(out);
    let (lines, _) = setup.import("a.db", "codex", &root);
    assert_eq!(summary(&lines)["records_queued"].as_u64(), Some(3), "{}", summary(&lines));
    assert_eq!(server_cursor(&setup.server.addr, &owner), Some(before + 3), "only the appended lines");
    let mut out = std::fs::OpenOptions::new().append(true).open(&file).unwrap();
    out.write_all(b"onse_item\",\"payload\":{\"type\":\"reasoning\",\"summary\":[]}}\n").unwrap();
    drop(out);
    let (lines, _) = setup.import("a.db", "codex", &root);
    assert_eq!(summary(&lines)["records_queued"].as_u64(), Some(1));
    assert_eq!(server_cursor(&setup.server.addr, &owner), Some(before + 4));

    // A read from the start (its cursor forgotten) queues nothing: every opId is held.
    let db = rusqlite::Connection::open(setup.outbox("a.db")).unwrap();
    db.execute("UPDATE agent_imports SET cursor = '', size = 0, mtime_ns = 0", []).unwrap();
    drop(db);
    let (lines, _) = setup.import("a.db", "codex", &root);
    assert_eq!(summary(&lines)["records_queued"].as_u64(), Some(0));
    assert_eq!(server_cursor(&setup.server.addr, &owner), Some(before + 4));

    // The export is the grown file.
    let exported = setup.dir.path().join("grown.jsonl");
    ok(&setup.outbox("a.db"), &["export", &format!("codex:{S1}"), "--format", "codex", "--to", exported.to_str().unwrap()]);
    assert_eq!(std::fs::read(exported).unwrap(), std::fs::read(&file).unwrap());
}

#[test]
fn import_opencode_tree_and_database() {
    let setup = Setup::start();
    let root = setup.dir.path().join("opencode");
    copy_tree(&fixtures().join("opencode"), &root);
    let script = std::fs::read_to_string(root.join("opencode.sql")).unwrap();
    capsync_persistence::agents::create_opencode_fixture(&root.join("opencode.db"), &script).unwrap();
    let (lines, stderr) = setup.import("a.db", "opencode", &root);
    let first = summary(&lines);
    assert_eq!((first["sessions"].as_u64(), first["new_sessions"].as_u64()), (Some(3), Some(3)), "{first}");
    assert!(first["records_queued"].as_u64().unwrap() > 15, "{first}");
    assert_eq!(first["ops_kept"].as_u64(), Some(0));
    // The corrupt message file is named relative to the root.
    let warned: Vec<&str> = first["warned"].as_array().unwrap().iter().map(|w| w["path"].as_str().unwrap()).collect();
    assert!(warned.iter().any(|p| p.starts_with("storage/message/")), "{first}");
    let root_text = root.canonicalize().unwrap().to_string_lossy().into_owned();
    assert!(!stderr.contains(&root_text) && !lines.iter().any(|l| l.to_string().contains(&root_text)));

    let (again, _) = setup.import("a.db", "opencode", &root);
    assert_eq!((summary(&again)["records_queued"].as_u64(), summary(&again)["unchanged"].as_u64()), (Some(0), Some(3)), "{}", summary(&again));

    let name = format!("opencode:{OC_TREE_ONLY}");
    let pulled: Value = serde_json::from_str(&ok(&setup.outbox("a.db"), &["pull", &name, "--json"])).unwrap();
    let kinds: Vec<&str> = pulled["entities"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"message") && kinds.contains(&"part"), "{kinds:?}");
    // Exported, the session's tree files come back byte for byte.
    let out = setup.dir.path().join("export");
    ok(&setup.outbox("a.db"), &["export", &name, "--format", "opencode", "--to", out.to_str().unwrap()]);
    let exported = root.join("storage/session/4b0ea68d7af9a6031a7ffda7ad66e0cb83315750").join(format!("{OC_TREE_ONLY}.json"));
    let back = out.join("storage/session/4b0ea68d7af9a6031a7ffda7ad66e0cb83315750").join(format!("{OC_TREE_ONLY}.json"));
    assert_eq!(std::fs::read(back).unwrap(), std::fs::read(exported).unwrap());
    let message = "storage/message/ses_6a1f2b3c4002bLmNoPqRsTuV/msg_6a1f2b3c5001HhJjKkLlMmNn.json";
    assert_eq!(std::fs::read(out.join(message)).unwrap(), std::fs::read(root.join(message)).unwrap());
}

/// A `capsync watch` child with its stdout (JSON lines) collected.
struct Watcher {
    child: std::process::Child,
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: PathBuf,
}

impl Watcher {
    fn start(setup: &Setup, outbox: &str, root: &Path) -> Watcher {
        let stderr = setup.dir.path().join(format!("watch-{}.log", rand::random::<u32>()));
        let mut child = Command::new(BIN)
            .args(["watch", "codex", root.to_str().unwrap(), "--json", "--rescan", "1s", "--debounce-ms", "50"])
            .env("CAPSYNC_OUTBOX", setup.outbox(outbox))
            .env("CAPSYNC_SPACE", setup.space.expose())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stdout.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        Watcher { child, stdout, stderr }
    }

    /// Fails the test, with the watcher's output, if it exited.
    fn check_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the watcher exited ({status}): {}\n{}", self.stderr(), self.stdout.lock().unwrap());
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < timeout, "the watcher did not stop; stderr: {}", self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        let status = self.wait_exit(Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(100));
        let stdout = self.stdout.lock().unwrap().clone();
        (status, stdout)
    }
}

#[test]
fn watch_killed_mid_stream_and_restarted_loses_and_doubles_nothing() {
    let setup = Setup::start();
    let root = setup.dir.path().join("codex");
    let file = root.join(S1_PATH);
    copy(&fixtures().join("codex").join(S1_PATH), &file);
    let mut watcher = Some(Watcher::start(&setup, "w.db", &root));
    // The agent writes 300 lines, ten at a time; the watcher is killed with SIGKILL twice on
    // the way and started again.
    let mut out = std::fs::OpenOptions::new().append(true).open(&file).unwrap();
    let mut seen = 0;
    for batch in 0..30 {
        for i in batch * 10..batch * 10 + 10 {
            out.write_all(part_line(i).as_bytes()).unwrap();
        }
        out.flush().unwrap();
        if batch == 10 || batch == 20 {
            // Killed once it has queued more than before: mid-stream, not before it began.
            wait_until("the watcher queueing", Duration::from_secs(30), || queued(&setup.outbox("w.db")) > seen);
            seen = queued(&setup.outbox("w.db"));
            watcher.take().unwrap().kill();
            watcher = Some(Watcher::start(&setup, "w.db", &root));
        }
        std::thread::sleep(Duration::from_millis(40));
    }
    // A second session appears while it runs.
    let s2 = root.join(S2_PATH);
    copy(&fixtures().join("codex").join(S2_PATH), &s2);

    wait_until("both sessions attached", Duration::from_secs(30), || refs(&setup.outbox("w.db")).len() == 2);
    for (name, rel) in [(format!("codex:{S1}"), S1_PATH), (format!("codex:{S2}"), S2_PATH)] {
        let (owner, session) = imported(&setup.outbox("w.db"), &name);
        let expected = expected_op_ids(&root, rel, &session);
        let mut log = Vec::new();
        wait_until(&format!("{name} delivered"), Duration::from_secs(30), || {
            log = server_log(&setup.server.addr, &owner);
            log.len() >= expected.len()
        });
        let logged: HashSet<Vec<u8>> = log.iter().map(|(_, id)| id.clone()).collect();
        assert_eq!(logged.len(), log.len(), "{name}: an opId applied twice");
        assert_eq!(logged, expected, "{name}: the server holds exactly the rollout's ops");
    }
    let history = checker::history(&setup.outbox("w.db"));
    assert!(history.iter().all(|op| op.state == "acked"), "everything delivered");
    let (status, stdout) = watcher.take().unwrap().terminate();
    assert!(status.success(), "SIGTERM stops it cleanly");
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!((last["event"].as_str(), last["ops_kept"].as_u64()), (Some("summary"), Some(0)), "{stdout}");
}

/// Ops in an outbox, whatever their state.
fn queued(outbox: &Path) -> u64 {
    if !outbox.exists() {
        return 0;
    }
    let db = rusqlite::Connection::open(outbox).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db.query_row("SELECT count(*) FROM outbox", [], |r| r.get::<_, i64>(0)).unwrap_or(0) as u64
}

/// An import that crashes at a commit (before it, after it, before a send, after an ack) and
/// is run again, each time: in the end the server holds every session's ops exactly once.
#[test]
fn an_import_crashed_at_any_commit_resumes_with_nothing_lost_or_doubled() {
    let setup = Setup::start();
    let root = fixtures().join("codex");
    let space = setup.space.expose();
    for failpoint in ["client-before-import-commit=2", "client-after-enqueue=3", "client-before-send=2", "client-after-ack=1"] {
        let out = capsync(&setup.outbox("a.db"), &["import", "codex", root.to_str().unwrap(), "--json"], &[("CAPSYNC_SPACE", &space), ("CAPSYNC_FAILPOINTS", failpoint)]);
        assert!(!out.status.success(), "{failpoint}: the import was to crash");
        assert!(String::from_utf8_lossy(&out.stderr).contains("reached: aborting"), "{failpoint}");
    }
    let (lines, _) = setup.import("a.db", "codex", &root);
    assert_eq!(summary(&lines)["ops_kept"].as_u64(), Some(0));
    for (id, rel) in [(S1, S1_PATH), (S2, S2_PATH), ("0198799c-5b6c-7d8e-af01-9b0c1d2e3f03", S3_PATH), ("7b1c2d3e-4f50-4a61-b7c8-d9e0f1a2b304", S4_PATH)] {
        let (owner, session) = imported(&setup.outbox("a.db"), &format!("codex:{id}"));
        let log = server_log(&setup.server.addr, &owner);
        let logged: HashSet<Vec<u8>> = log.iter().map(|(_, op)| op.clone()).collect();
        assert_eq!(logged.len(), log.len(), "{id}: an opId applied twice");
        assert_eq!(logged, expected_op_ids(&root, rel, &session), "{id}: nothing lost");
    }
    let spaces: Value = serde_json::from_str(&admin(&setup.server, &["list-spaces", "--json"])).unwrap();
    assert_eq!(spaces[0]["sessions"].as_u64(), Some(4), "one session per agent session");
    assert!(checker::history(&setup.outbox("a.db")).iter().all(|op| op.state == "acked"), "all delivered");
}

/// The server goes away while the agent writes: the watcher keeps queueing, and delivers it
/// all once the server is back.
#[test]
fn watch_queues_while_the_server_is_away_and_delivers_when_it_is_back() {
    let mut setup = Setup::start();
    let root = setup.dir.path().join("codex");
    let file = root.join(S1_PATH);
    copy(&fixtures().join("codex").join(S1_PATH), &file);
    let mut watcher = Watcher::start(&setup, "w.db", &root);
    let name = format!("codex:{S1}");
    // (A pass queues a small rollout in one transaction: some acked and none unacked is all.)
    let delivered = |setup: &Setup| {
        status_json(&setup.outbox("w.db"))["refs"]
            .as_array()
            .is_some_and(|r| r.len() == 1 && r[0]["pending"] == 0 && r[0]["sent"] == 0 && r[0]["acked"].as_u64() > Some(0))
    };
    wait_until("the session delivered", Duration::from_secs(30), || {
        watcher.check_running();
        delivered(&setup)
    });
    let addr = setup.server.addr.clone();
    setup.server.kill();
    let mut out = std::fs::OpenOptions::new().append(true).open(&file).unwrap();
    for i in 0..20 {
        out.write_all(part_line(i).as_bytes()).unwrap();
    }
    drop(out);
    wait_until("the new lines queued", Duration::from_secs(30), || {
        let row = &status_json(&setup.outbox("w.db"))["refs"][0];
        row["pending"].as_u64().unwrap_or(0) + row["sent"].as_u64().unwrap_or(0) == 20
    });
    // Once its retries are spent, the watcher says the server is away, and goes on waiting.
    wait_until("the watcher noticing", Duration::from_secs(30), || watcher.stdout.lock().unwrap().contains("the server is away"));
    setup.server = Server::start_at(&setup.server.data_dir.clone(), &addr);
    let start = Instant::now();
    while !delivered(&setup) {
        watcher.check_running();
        if start.elapsed() > Duration::from_secs(60) {
            panic!("not delivered: {}\n{}\n{}", status_json(&setup.outbox("w.db")), watcher.stderr(), watcher.stdout.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (owner, session) = imported(&setup.outbox("w.db"), &name);
    let log = server_log(&setup.server.addr, &owner);
    let logged: HashSet<Vec<u8>> = log.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(logged.len(), log.len());
    assert_eq!(logged, expected_op_ids(&root, S1_PATH, &session));
    wait_until("the watcher noticing", Duration::from_secs(30), || watcher.stdout.lock().unwrap().contains("reachable again"));
    let (status, _) = watcher.terminate();
    assert!(status.success());
}

#[test]
fn a_revoked_space_stops_the_watcher_and_keeps_its_queue() {
    let setup = Setup::start();
    let root = setup.dir.path().join("codex");
    let file = root.join(S1_PATH);
    copy(&fixtures().join("codex").join(S1_PATH), &file);
    let mut watcher = Watcher::start(&setup, "w.db", &root);
    let name = format!("codex:{S1}");
    wait_until("the session delivered", Duration::from_secs(30), || {
        status_json(&setup.outbox("w.db"))["refs"].as_array().is_some_and(|r| r.len() == 1 && r[0]["pending"] == 0 && r[0]["acked"].as_u64() > Some(0))
    });
    admin(&setup.server, &["revoke-space", &setup.space_id]);
    let mut out = std::fs::OpenOptions::new().append(true).open(&file).unwrap();
    out.write_all(part_line(1).as_bytes()).unwrap();
    drop(out);
    let status = watcher.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let stderr = watcher.stderr();
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("capsync: error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("capsync/revoked") && errors[0].contains("the watcher stops (1 op(s) kept in the outbox)"), "{stderr}");
    let status = status_json(&setup.outbox("w.db"));
    let row = &status["refs"][0];
    // Sent on the pipelined redeem, refused: kept, unacknowledged.
    let unacked = row["pending"].as_u64().unwrap() + row["sent"].as_u64().unwrap();
    assert_eq!((row["name"].as_str(), row["state"].as_str(), unacked), (Some(name.as_str()), Some("revoked"), 1), "{status}");
    let mut tokens = setup.outbox_tokens("w.db");
    tokens.push(setup.space.token.clone());
    assert_no_tokens(&stderr, &tokens, "the watcher's stderr");
}

/// Discovery of the fixtures, for the record: what the tests above rely on.
#[test]
fn the_fixture_roots_hold_what_the_tests_expect() {
    let found: Vec<_> = codex::discover(&fixtures().join("codex"), Limits::default()).unwrap().collect();
    assert_eq!(found.iter().filter(|f| f.is_ok()).count(), 4);
}
