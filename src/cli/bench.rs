//! `capsync bench`: measured figures, side by side, from one run on this machine.
//!
//! Every scenario runs against a real `capsync serve` child process on 127.0.0.1 with a fresh
//! temporary data dir, driven from this process over TCP.

use anyhow::{bail, Context as _};
use capsync_client::Connection;
use capsync_schema::capsync_capnp::{listener, session, EntityKind};
use capsync_schema::{SturdyUri, Token};
use clap::Args;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Print one JSON object with every figure instead of a table.
    #[arg(long)]
    json: bool,
    /// Smaller runs, for a quick look.
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (comma-separated, e.g. `s6`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// A `capsync serve` child with its own temporary data dir.
struct BenchServer {
    child: Child,
    addr: String,
    admin: SturdyUri,
    _dir: tempfile::TempDir,
}

impl BenchServer {
    fn start() -> anyhow::Result<BenchServer> {
        let dir = tempfile::tempdir()?;
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
        let addr = line.trim().strip_prefix("capsync listening on ").context("the server did not start")?.to_owned();
        let admin_file = dir.path().join("data/admin.uri");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !admin_file.exists() {
            if Instant::now() > deadline {
                bail!("the server wrote no admin.uri");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let admin = SturdyUri::parse(&std::fs::read_to_string(admin_file)?)?;
        Ok(BenchServer { child, addr, admin, _dir: dir })
    }

    /// A new session's owner token.
    async fn session(&self) -> anyhow::Result<Token> {
        let conn = Connection::open(&self.addr).await?;
        let (admin, _) = conn.admin(&self.admin.token);
        let mut request = admin.create_session_request();
        request.get().set_title("bench");
        let response = request.send().promise.await?;
        let token = Token::parse(response.get()?.get_token()?.to_str()?)?;
        conn.close().await;
        Ok(token)
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The q-quantile of sorted samples.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o.eq_ignore_ascii_case(name));
    let mut figures = serde_json::Map::new();
    let mut rows: Vec<(String, String, String)> = Vec::new();
    if wanted("s6") {
        let (value, row) = s6_fanout(&args).await?;
        figures.insert("s6_fanout".into(), value);
        rows.push(row);
    }
    if args.json {
        println!("{}", Value::Object(figures));
    } else {
        println!("{:<28}  {:<44}  TARGET", "SCENARIO", "RESULT");
        for (name, result, target) in rows {
            println!("{name:<28}  {result:<44}  {target}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

struct Stamp {
    sent: Rc<RefCell<Vec<Option<Instant>>>>,
    latencies: Rc<RefCell<Vec<Duration>>>,
    received: Rc<RefCell<u64>>,
}

impl listener::Server for Stamp {
    async fn on_ops(self: Rc<Self>, params: listener::OnOpsParams) -> Result<(), capnp::Error> {
        let now = Instant::now();
        let ops = params.get()?.get_ops()?;
        let sent = self.sent.borrow();
        let mut latencies = self.latencies.borrow_mut();
        for op in ops.iter() {
            if let Some(Some(at)) = sent.get(op.get_seq() as usize) {
                latencies.push(now - *at);
            }
        }
        *self.received.borrow_mut() += ops.len() as u64;
        Ok(())
    }
}

/// S6: 100 subscribers on one session, one writer appending one op at a time.
async fn s6_fanout(args: &BenchArgs) -> anyhow::Result<(Value, (String, String, String))> {
    let server = BenchServer::start()?;
    let owner = server.session().await?;
    let (subscribers, ops) = (100usize, if args.quick { 300 } else { 2000 });
    let sent = Rc::new(RefCell::new(vec![None; ops + 1]));
    let latencies = Rc::new(RefCell::new(Vec::with_capacity(subscribers * ops)));
    let received = Rc::new(RefCell::new(0u64));
    let mut conns = Vec::new();
    let mut subs = Vec::new();
    for i in 0..subscribers {
        if i % 10 == 0 {
            conns.push(Connection::open(&server.addr).await?);
        }
        let (session, _) = conns.last().expect("opened above").session(&owner);
        let stamp: listener::Client = capnp_rpc::new_client(Stamp { sent: sent.clone(), latencies: latencies.clone(), received: received.clone() });
        let mut request = session.subscribe_request();
        request.get().set_after(0);
        request.get().set_listener(stamp);
        subs.push(request.send().promise.await?);
    }
    let writer = Connection::open(&server.addr).await?;
    let (session, _) = writer.session(&owner);
    let client = *uuid::Uuid::new_v4().as_bytes();
    let payload = format!("{{\"role\":\"assistant\",\"text\":\"{}\"}}", "x".repeat(160));
    for seq in 1..=ops {
        sent.borrow_mut()[seq] = Some(Instant::now());
        append_one(&session, &client, seq as u64, &payload).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while *received.borrow() < (subscribers * ops) as u64 {
        if Instant::now() > deadline {
            bail!("s6: not every subscriber received every op");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut all = latencies.borrow().clone();
    all.sort();
    let (p50, p99) = (quantile(&all, 0.5), quantile(&all, 0.99));
    let value = json!({"subscribers": subscribers, "ops": ops, "deliveries": all.len(), "p50_ms": ms(p50), "p99_ms": ms(p99)});
    let row = (
        "S6 fan-out (100 subscribers)".to_owned(),
        format!("p50 {:.2} ms, p99 {:.2} ms ({} deliveries)", ms(p50), ms(p99), all.len()),
        "p99 <= 5 ms".to_owned(),
    );
    drop(subs);
    Ok((value, row))
}

/// Appends one put as batch `seq` and waits for its ack.
async fn append_one(session: &session::Client, client: &[u8; 16], seq: u64, payload: &str) -> anyhow::Result<()> {
    let mut request = session.append_request();
    let mut batch = request.get().init_batch();
    batch.set_client_id(client);
    batch.set_batch_seq(seq);
    let mut op = batch.init_ops(1).get(0);
    op.set_op_id(uuid::Uuid::now_v7().as_bytes());
    let mut entity = op.init_put();
    entity.set_kind(EntityKind::Message);
    entity.set_id(format!("m{seq}").as_str());
    entity.set_data(payload.as_bytes());
    request.send().promise.await?;
    Ok(())
}
