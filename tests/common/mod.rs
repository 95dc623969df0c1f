//! Shared harness for the end-to-end tests: a real `capsync serve` process on 127.0.0.1 with
//! its own data dir and a trace-level log, and a Cap'n Proto client in the test process.
#![allow(dead_code)]

pub mod checker;
pub mod proxy;

use capsync_client::Connection;
use capsync_schema::capsync_capnp::{admin, op_result, session, EntityKind};
use capsync_schema::marker::{self, Marker};
use capsync_schema::{SturdyUri, Token};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_capsync");

/// Which store the servers a test starts run on. The same test bodies run on both (see
/// [`on_both_stores!`]); a test thread picks its store once, before it starts a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

thread_local! {
    static STORE: std::cell::Cell<StoreKind> = const { std::cell::Cell::new(StoreKind::Sqlite) };
}

/// The PostgreSQL database of each data dir, so a restarted server finds its data again.
static DATABASES: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());

/// The store of this test thread's servers.
pub fn store() -> StoreKind {
    STORE.with(|s| s.get())
}

/// Runs `body` with this thread's servers on `kind`.
pub fn on_store(kind: StoreKind, body: impl FnOnce()) {
    STORE.with(|s| s.set(kind));
    body()
}

/// The `--store` URL of the server whose data dir is `data_dir`, if it runs on PostgreSQL:
/// a fresh database of the binary's throwaway cluster the first time.
pub fn database_of(data_dir: &Path) -> Option<String> {
    let mut databases = DATABASES.lock().unwrap();
    if let Some((_, url)) = databases.iter().find(|(dir, _)| dir == data_dir) {
        return Some(url.clone());
    }
    if store() == StoreKind::Sqlite {
        return None;
    }
    let url = capsync_store_postgres::testing::fresh_database();
    databases.push((data_dir.to_owned(), url.clone()));
    Some(url)
}

/// Makes the servers of `data_dir` use the PostgreSQL database `url` (several nodes on one
/// database: each its own data dir, all the same URL).
pub fn share_database(data_dir: &Path, url: &str) {
    DATABASES.lock().unwrap().push((data_dir.to_owned(), url.to_owned()));
}

/// The rows of one query on the server's own database, each column as text: `sqlite` on the
/// SQLite file of `data_dir`, `postgres` on its PostgreSQL database. For tests that check
/// what the store holds (audit rows, hashes), not what the protocol says.
pub fn query_store(data_dir: &Path, sqlite: &str, postgres: &str) -> Vec<Vec<Option<String>>> {
    match database_of(data_dir) {
        Some(url) => capsync_store_postgres::testing::query(&url, postgres),
        None => {
            let db = rusqlite::Connection::open(data_dir.join("capsync.db")).unwrap();
            db.busy_timeout(Duration::from_secs(10)).unwrap();
            if !sqlite.trim_start().to_ascii_uppercase().starts_with("SELECT") {
                db.execute_batch(sqlite).unwrap();
                return Vec::new();
            }
            let mut statement = db.prepare(sqlite).unwrap();
            let columns = statement.column_count();
            statement
                .query_map([], |row| {
                    (0..columns)
                        .map(|i| {
                            Ok(match row.get_ref(i)? {
                                rusqlite::types::ValueRef::Null => None,
                                rusqlite::types::ValueRef::Integer(v) => Some(v.to_string()),
                                rusqlite::types::ValueRef::Real(v) => Some(v.to_string()),
                                rusqlite::types::ValueRef::Text(v) | rusqlite::types::ValueRef::Blob(v) => {
                                    Some(String::from_utf8_lossy(v).into_owned())
                                }
                            })
                        })
                        .collect()
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        }
    }
}

/// Declares each test twice: `sqlite::NAME` on the embedded store and `postgres::NAME` on a
/// fresh database of the binary's throwaway PostgreSQL cluster. Tests that only make sense on
/// one store stay outside and say why.
#[macro_export]
macro_rules! on_both_stores {
    ($($(#[$meta:meta])* fn $name:ident() $body:block)*) => {
        mod sqlite {
            #[allow(unused_imports)]
            use super::*;
            $($(#[$meta])* fn $name() { $crate::common::on_store($crate::common::StoreKind::Sqlite, || $body) })*
        }
        mod postgres {
            #[allow(unused_imports)]
            use super::*;
            $($(#[$meta])* fn $name() { $crate::common::on_store($crate::common::StoreKind::Postgres, || $body) })*
        }
    };
}

/// A `capsync serve` child process. Killed (SIGKILL) on drop.
pub struct Server {
    child: Option<Child>,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

impl Server {
    /// Starts a server on a free port; logs at `trace` to `<data_dir>/../server.log`.
    pub fn start(data_dir: &Path) -> Server {
        Server::start_at(data_dir, "127.0.0.1:0")
    }

    /// Starts a server listening on `listen` (e.g. the address of a server that just stopped).
    pub fn start_at(data_dir: &Path, listen: &str) -> Server {
        Server::start_with_env(data_dir, listen, &[])
    }

    /// Starts a server with extra `serve` arguments, on a free loopback port.
    pub fn start_with_args(data_dir: &Path, args: &[&str]) -> Server {
        Server::spawn(data_dir, "127.0.0.1:0", &[], args)
    }

    pub fn start_with(data_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Server {
        Server::spawn(data_dir, "127.0.0.1:0", env, args)
    }

    pub fn start_with_env(data_dir: &Path, listen: &str, env: &[(&str, &str)]) -> Server {
        Server::spawn(data_dir, listen, env, &[])
    }

    fn spawn(data_dir: &Path, listen: &str, env: &[(&str, &str)], args: &[&str]) -> Server {
        let log = data_dir.with_extension("log");
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let store: Vec<String> = match database_of(data_dir) {
            Some(url) if !args.contains(&"--store") => vec!["--store".into(), url],
            _ => Vec::new(),
        };
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(args)
            .args(&store)
            .env("RUST_LOG", "trace")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("spawning capsync serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("the server announces its address");
        let addr = line
            .trim()
            .strip_prefix("capsync listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}; log at {}", log.display()))
            .to_owned();
        wait_for_file(&data_dir.join("admin.uri"));
        Server { child: Some(child), addr, data_dir: data_dir.to_owned(), log }
    }

    pub fn admin_uri(&self) -> SturdyUri {
        SturdyUri::parse(&std::fs::read_to_string(self.data_dir.join("admin.uri")).unwrap()).unwrap()
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        child.wait().unwrap()
    }

    /// Waits for a server already told to stop.
    pub fn stop_wait(&mut self) -> std::process::ExitStatus {
        self.child.take().expect("running").wait().unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for_file(path: &Path) {
    for _ in 0..600 {
        if path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} never appeared", path.display());
}

/// Waits (without blocking the test's runtime) until the server's log contains `text`, such
/// as a failpoint's `reached: holding`.
pub async fn wait_for_log(server: &Server, text: &str) {
    for _ in 0..3000 {
        if server.log_text().contains(text) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{text:?} never appeared in {}", server.log.display());
}

/// Starts `call`, which the `hold` failpoint `point` of `server` stops; once the server logs
/// that it holds, runs `act` (a revocation, say) on a blocking thread; then waits for the
/// call's answer and only after it creates `release`, which lets the held work go on. Panics
/// unless the call answered while the hold was still in force. The wait is a deadline (20 s),
/// not a measurement: code that answers only after the release fails it.
pub async fn answer_before_release<T: 'static>(
    server: &Server,
    point: &str,
    release: &Path,
    call: impl Future<Output = T> + 'static,
    act: impl FnOnce() + Send + 'static,
) -> T {
    let call = tokio::task::spawn_local(call);
    wait_for_log(server, &format!("failpoint {point} reached: holding")).await;
    tokio::task::spawn_blocking(act).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(20), call).await;
    let released_first = server.log_text().contains(&format!("failpoint {point} released"));
    std::fs::write(release, b"").unwrap();
    let answer = answer.unwrap_or_else(|_| panic!("the call held at {point} did not answer while its work was held")).unwrap();
    assert!(!released_first, "the work held at {point} was still held when the call answered");
    answer
}

/// Runs `f` on a current-thread runtime inside a `LocalSet`, as capnp-rpc needs.
pub fn run_local<F: Future>(f: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, f)
}

/// Runs the `capsync` binary to completion; returns (exit success, stdout, stderr).
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).env("RUST_LOG", "trace").stdin(Stdio::null()).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Every secret a test handled must be absent from a text (a log, a CLI's output).
/// Fails if any 12-character run of a token's secret appears in `text`: a token cut short,
/// wrapped or prefixed is still a leak.
pub fn assert_no_tokens(text: &str, tokens: &[Token], what: &str) {
    for token in tokens {
        let secret = &token.expose()[4..];
        for start in 0..=secret.len().saturating_sub(12) {
            assert!(!text.contains(&secret[start..start + 12]), "part of a token appears in {what}");
        }
    }
}

pub fn marker_of(err: &capnp::Error) -> Option<Marker> {
    marker::of_error(err)
}

#[track_caller]
pub fn assert_marker<T>(result: Result<T, capnp::Error>, expected: Marker) {
    match result {
        Ok(_) => panic!("expected {expected}, the call succeeded"),
        Err(err) => assert_eq!(marker_of(&err), Some(expected), "got: {}", err.extra),
    }
}

/// An owner token for a new session, through the admin capability.
pub async fn create_session(conn: &Connection, admin_token: &Token, title: &str) -> (String, Token) {
    let (admin, _) = conn.admin(admin_token);
    let mut request = admin.create_session_request();
    request.get().set_title(title);
    let response = request.send().promise.await.unwrap();
    let results = response.get().unwrap();
    (
        results.get_session_id().unwrap().to_string().unwrap(),
        Token::parse(results.get_token().unwrap().to_str().unwrap()).unwrap(),
    )
}

pub fn admin_cap(conn: &Connection, admin_token: &Token) -> admin::Client {
    conn.admin(admin_token).0
}

/// An op to send: `put` when `data` is `Some`, `delete` otherwise.
#[derive(Clone, Debug)]
pub struct TestOp {
    pub op_id: Vec<u8>,
    pub kind: EntityKind,
    pub id: String,
    pub parent: String,
    pub data: Option<Vec<u8>>,
}

pub fn new_op_id() -> Vec<u8> {
    uuid::Uuid::now_v7().as_bytes().to_vec()
}

pub fn put(kind: EntityKind, id: &str, parent: &str, json: &str) -> TestOp {
    TestOp { op_id: new_op_id(), kind, id: id.into(), parent: parent.into(), data: Some(json.as_bytes().to_vec()) }
}

pub fn delete(kind: EntityKind, id: &str) -> TestOp {
    TestOp { op_id: new_op_id(), kind, id: id.into(), parent: String::new(), data: None }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: op_result::Status,
    pub seq: u64,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub cursor: u64,
    pub batch_seq: u64,
    pub results: Vec<Outcome>,
}

pub fn append_request(
    session: &session::Client,
    client_id: &[u8],
    batch_seq: u64,
    ops: &[TestOp],
) -> capnp::capability::RemotePromise<session::append_results::Owned> {
    let mut request = session.append_request();
    let mut batch = request.get().init_batch();
    batch.set_client_id(client_id);
    batch.set_batch_seq(batch_seq);
    let mut list = batch.init_ops(ops.len() as u32);
    for (i, op) in ops.iter().enumerate() {
        let mut out = list.reborrow().get(i as u32);
        out.set_op_id(&op.op_id);
        match &op.data {
            Some(data) => {
                let mut e = out.init_put();
                e.set_kind(op.kind);
                e.set_id(op.id.as_str());
                e.set_parent_id(op.parent.as_str());
                e.set_data(data);
            }
            None => {
                let mut k = out.init_delete();
                k.set_kind(op.kind);
                k.set_id(op.id.as_str());
            }
        }
    }
    request.send()
}

pub async fn read_ack(
    promise: capnp::capability::RemotePromise<session::append_results::Owned>,
) -> Result<Ack, capnp::Error> {
    let response = promise.promise.await?;
    let ack = response.get()?.get_ack()?;
    let mut results = Vec::new();
    for r in ack.get_results()?.iter() {
        results.push(Outcome { status: r.get_status()?, seq: r.get_seq(), reason: r.get_reason()?.to_string()? });
    }
    Ok(Ack { cursor: ack.get_cursor(), batch_seq: ack.get_batch_seq(), results })
}

pub async fn append(session: &session::Client, client_id: &[u8], batch_seq: u64, ops: &[TestOp]) -> Result<Ack, capnp::Error> {
    read_ack(append_request(session, client_id, batch_seq, ops)).await
}

/// Mints a share; `rights` like "read,append".
pub async fn mint(session: &session::Client, rights: &str, label: &str, ttl_seconds: u64) -> Result<(Token, String), capnp::Error> {
    let mut request = session.mint_request();
    {
        let mut p = request.get();
        let mut r = p.reborrow().init_rights();
        r.set_read(rights.contains("read"));
        r.set_append(rights.contains("append"));
        r.set_mint(rights.contains("mint"));
        p.set_label(label);
        p.set_ttl_seconds(ttl_seconds);
    }
    let response = request.send().promise.await?;
    let results = response.get()?;
    Ok((Token::parse(results.get_token()?.to_str()?).unwrap(), results.get_share_id()?.to_string()?))
}

/// The session's cursor, via `info`.
pub async fn cursor(session: &session::Client) -> Result<u64, capnp::Error> {
    let response = session.info_request().send().promise.await?;
    Ok(response.get()?.get_info()?.get_cursor())
}

/// Every entity of the session as (kind, id, parent, data), through paged `snapshot`.
pub async fn snapshot(session: &session::Client, page: u32) -> Result<(u64, Vec<(EntityKind, String, String, String)>), capnp::Error> {
    let mut out = Vec::new();
    let mut after: Option<(EntityKind, String)> = None;
    let mut first_cursor = None;
    loop {
        let mut request = session.snapshot_request();
        request.get().set_limit(page);
        if let Some((kind, id)) = &after {
            let mut key = request.get().init_start_after();
            key.set_kind(*kind);
            key.set_id(id.as_str());
        }
        let response = request.send().promise.await?;
        let r = response.get()?;
        first_cursor.get_or_insert(r.get_cursor());
        for e in r.get_entities()?.iter() {
            let row = (e.get_kind()?, e.get_id()?.to_string()?, e.get_parent_id()?.to_string()?, String::from_utf8(e.get_data()?.to_vec()).unwrap());
            after = Some((row.0, row.1.clone()));
            out.push(row);
        }
        if !r.get_more() {
            return Ok((first_cursor.unwrap_or(0), out));
        }
    }
}

pub fn new_client_id() -> Vec<u8> {
    uuid::Uuid::new_v4().as_bytes().to_vec()
}

/// `n` puts of messages `{prefix}{i}` as JSON Lines for `capsync push`, ~200 bytes of data each.
pub fn write_jsonl(path: &Path, n: usize, prefix: &str) {
    let mut out = String::with_capacity(n * 260);
    for i in 0..n {
        out.push_str(&format!(
            "{{\"op\":\"put\",\"kind\":\"message\",\"id\":\"{prefix}{i}\",\"data\":{{\"role\":\"assistant\",\"i\":{i},\"text\":\"{}\"}}}}\n",
            "lorem ipsum ".repeat(14)
        ));
    }
    std::fs::write(path, out).unwrap();
}

/// A new session on `server`: (session id, owner token).
pub fn new_session(server: &Server) -> (String, Token) {
    let admin = server.admin_uri();
    run_local(async {
        let conn = Connection::open(&server.addr).await.unwrap();
        create_session(&conn, &admin.token, "test").await
    })
}

/// The session's cursor as the owner sees it, or `None` if the server cannot be reached.
pub fn server_cursor(addr: &str, owner: &Token) -> Option<u64> {
    run_local(async {
        let conn = Connection::open(addr).await.ok()?;
        let (session, _) = conn.session(owner);
        cursor(&session).await.ok()
    })
}

/// A process's resident memory, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Runs `capsync` with an outbox and extra environment; waits for it.
pub fn capsync(outbox: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("CAPSYNC_OUTBOX", outbox)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `capsync status --json` of an outbox.
pub fn status_json(outbox: &Path) -> serde_json::Value {
    let out = capsync(outbox, &["status", "--json"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `Put` changes of messages `<prefix><i>` for each `i` in `range`.
pub fn messages(range: std::ops::Range<usize>, prefix: &str) -> Vec<capsync_client::Change> {
    use capsync_client::Change;
    range.map(|i| Change::Put { kind: capsync_persistence::EntityKind::Message, id: format!("{prefix}{i}"), parent: String::new(), data: b"{}".to_vec() }).collect()
}

/// The server's log as (seq, opId), read with the owner token.
pub fn server_log(addr: &str, owner: &capsync_schema::Token) -> Vec<(u64, Vec<u8>)> {
    run_local(async {
        let conn = Connection::open(addr).await.unwrap();
        let (session, _) = conn.session(owner);
        let mut log = Vec::new();
        loop {
            let mut request = session.changes_request();
            request.get().set_after(log.len() as u64);
            let response = request.send().promise.await.unwrap();
            let ops = response.get().unwrap().get_ops().unwrap();
            if ops.is_empty() {
                return log;
            }
            for op in ops.iter() {
                log.push((op.get_seq(), op.get_op().unwrap().get_op_id().unwrap().to_vec()));
            }
        }
    })
}

/// One HTTP/1.1 GET on a fresh connection: (status code, body).
pub fn get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: capsync\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// The metrics address the server logged.
pub fn metrics_addr(server: &Server) -> String {
    let log = server.log_text();
    let line = log.lines().find(|l| l.contains("serving /metrics")).expect("the server logs its metrics address");
    line.split("address=").nth(1).unwrap().split_whitespace().next().unwrap().to_owned()
}

/// A `capsync tail URI --json` child with its own outbox, once it follows (its log said so),
/// and its output lines as they come (read on a thread of their own).
pub fn follower(uri: &str, outbox: &Path) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut tail = Command::new(BIN)
        .args(["tail", uri, "--json"])
        .env("CAPSYNC_OUTBOX", outbox)
        .env("RUST_LOG", "capsync_client=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut logs = BufReader::new(tail.stderr.take().unwrap()).lines();
    assert!(logs.any(|l| l.unwrap().contains("following")), "tail never subscribed");
    std::thread::spawn(move || logs.for_each(drop));
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    (tail, lines)
}
