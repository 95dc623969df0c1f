//! What the scenarios run against: a `capsync serve` child, a delay proxy, the baselines, and
//! small statistics helpers.

use anyhow::{bail, Context as _};
use capsync_client::Connection;
use capsync_persistence::server::{self, AppendError};
use capsync_persistence::writer::Txn;
use capsync_persistence::{EntityKind, Entity, IncomingBatch, IncomingOp, OpBody};
use capsync_schema::{SturdyUri, Token};
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// ~200 bytes of JSON, the size of a typical message part.
pub fn payload(i: u64) -> Vec<u8> {
    format!("{{\"role\":\"assistant\",\"i\":{i},\"text\":\"{}\"}}", "lorem ipsum dolor sit amet ".repeat(6)).into_bytes()
}

/// A `capsync serve` child process on 127.0.0.1 with its own data dir, on SQLite in that dir
/// or on the PostgreSQL database `store`. Killed on drop.
pub struct BenchServer {
    child: Option<Child>,
    pub addr: String,
    pub admin: SturdyUri,
}

impl BenchServer {
    pub fn start(data: &Path, store: Option<&str>) -> anyhow::Result<BenchServer> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--max-connections", "8192", "--max-connections-per-address", "0", "--data-dir"])
            .arg(data);
        if let Some(url) = store {
            command.arg("--store").arg(url);
        }
        let mut child = command
            .env_remove("CAPSYNC_STORE")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
        let addr = line.trim().strip_prefix("capsync listening on ").context("the server did not start")?.to_owned();
        let admin_file = data.join("admin.uri");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !admin_file.exists() {
            if Instant::now() > deadline {
                bail!("the server wrote no admin.uri");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let admin = SturdyUri::parse(&std::fs::read_to_string(admin_file)?)?;
        Ok(BenchServer { child: Some(child), addr, admin })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
            child.wait()?;
        }
        Ok(())
    }

    /// A new session: (session id, owner token).
    pub async fn session(&self) -> anyhow::Result<(String, Token)> {
        let conn = Connection::open(&self.addr).await?;
        let (admin, _) = conn.admin(&self.admin.token);
        let mut request = admin.create_session_request();
        request.get().set_title("bench");
        let response = request.send().promise.await?;
        let results = response.get()?;
        let id = results.get_session_id()?.to_string()?;
        let token = Token::parse(results.get_token()?.to_str()?)?;
        conn.close().await;
        Ok((id, token))
    }

    pub fn uri(&self, token: &Token) -> String {
        SturdyUri::new(self.addr.clone(), token.clone()).expose()
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Appends `ops` puts of ~200 bytes to a session's log directly in its database, in batches
/// of 10,000 (for S4's preloaded session; the server must be stopped).
pub fn preload(data: &Path, session_id: &str, ops: u64) -> anyhow::Result<()> {
    let mut conn = server::open(&data.join("capsync.db"))?;
    let sid: i64 = conn.query_row("SELECT sid FROM sessions WHERE id = ?1", [session_id], |r| r.get(0))?;
    let client = *uuid::Uuid::new_v4().as_bytes();
    for (i, start) in (0..ops).step_by(10_000).enumerate() {
        let batch = IncomingBatch { client_id: client, batch_seq: i as u64 + 1, ops: puts(start..(start + 10_000).min(ops), "pre") };
        Txn::run::<_, AppendError>(&mut conn, |txn| txn.append(sid, session_id, &batch))?;
    }
    Ok(())
}

/// `range`'s puts of ~200-byte messages with ids `{prefix}{i}`, each with a new opId.
pub(super) fn puts(range: std::ops::Range<u64>, prefix: &str) -> Vec<IncomingOp> {
    range
        .map(|i| IncomingOp {
            op_id: uuid::Uuid::now_v7().as_bytes().to_vec(),
            body: Ok(OpBody::Put(Entity { kind: EntityKind::Message, id: format!("{prefix}{i}"), parent_id: String::new(), data: payload(i) })),
        })
        .collect()
}

/// The raw rusqlite loop: the server's own inserts and commits for `ops` ops in batches of
/// `batch` (one transaction per batch, the server's pragmas), with no RPC at all. Ops/s.
pub fn raw_sqlite_loop(dir: &Path, ops: u64, batch: u64) -> anyhow::Result<f64> {
    let mut conn = server::open(&dir.join("raw.db"))?;
    let session_id = uuid::Uuid::now_v7().to_string();
    let sid = Txn::run::<_, capsync_persistence::StorageError>(&mut conn, |txn| txn.create_session(&session_id, "raw", 1))?;
    let client = *uuid::Uuid::new_v4().as_bytes();
    let batches: Vec<IncomingBatch> = (0..ops)
        .step_by(batch as usize)
        .enumerate()
        .map(|(i, start)| IncomingBatch { client_id: client, batch_seq: i as u64 + 1, ops: puts(start..(start + batch).min(ops), "raw") })
        .collect();
    let started = Instant::now();
    for b in &batches {
        Txn::run::<_, AppendError>(&mut conn, |txn| txn.append(sid, &session_id, b))?;
    }
    Ok(ops as f64 / started.elapsed().as_secs_f64())
}

/// A Redis XADD run through `scripts/redis-xadd.sh`: (ops/s, p50 ms, p99 ms).
pub fn redis_xadd(clients: u32, pipeline: u32, requests: u64) -> anyhow::Result<(f64, f64, f64)> {
    let script = std::env::var_os("CAPSYNC_REDIS_SCRIPT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis-xadd.sh")));
    let out = Command::new("bash")
        .arg(&script)
        .args([clients.to_string(), pipeline.to_string(), requests.to_string(), "200".into()])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let field = |name: &str| -> anyhow::Result<f64> {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in redis-xadd output {text:?}"))
    };
    Ok((field("ops_per_s")?, field("p50_ms")?, field("p99_ms")?))
}

/// A TCP proxy on 127.0.0.1 that delays each direction and can refuse connections. Runs on a
/// thread of its own.
pub struct DelayProxy {
    pub addr: String,
    refuse: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
}

impl DelayProxy {
    pub fn start(upstream: &str) -> anyhow::Result<DelayProxy> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?.to_string();
        let (refuse, delay_ms) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (r, d, upstream) = (refuse.clone(), delay_ms.clone(), upstream.to_owned());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                while let Ok((client, _)) = listener.accept().await {
                    if r.load(Ordering::SeqCst) {
                        continue;
                    }
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { continue };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, d.clone()));
                    tokio::spawn(pump(sr, cw, d.clone()));
                }
            });
        });
        Ok(DelayProxy { addr, refuse, delay_ms })
    }

    pub fn refuse(&self, on: bool) {
        self.refuse.store(on, Ordering::SeqCst);
    }

    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }
}

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let due = tokio::time::Instant::now() + Duration::from_millis(delay.load(Ordering::SeqCst));
        if tx.send((due, buf[..n].to_vec())).is_err() {
            break;
        }
    }
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    if values.is_empty() {
        return 0.0;
    }
    values[values.len() / 2]
}

pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// CPU time a process has used so far over all its live threads, from each thread's
/// `schedstat` (nanoseconds, unlike `stat`'s 10 ms ticks); zero where /proc has none.
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Duration::ZERO };
    let nanos = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
