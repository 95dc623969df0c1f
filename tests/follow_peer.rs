//! The follower (`capsync tail`, the client's `follow`) against a peer that misbehaves or is
//! slow to be acknowledged, which the real server cannot be made to do (issue 14, point 8): a
//! stream that skips ops must make the follower resubscribe from its replica's cursor, not give
//! up; and `onOps` must return to the server only once the ops are in the replica.
//!
//! The peer here is a small Cap'n Proto server of the real schema on real TCP; the follower is
//! the real `capsync tail` process.

mod common;

use capnp::traits::HasTypeId as _;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use capsync_schema::capsync_capnp::{gateway, listener, session, subscription, EntityKind};
use capsync_schema::{SturdyUri, Token};
use common::BIN;
use std::cell::Cell;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::Duration;
use tokio_util::compat::{TokioAsyncReadCompatExt as _, TokioAsyncWriteCompatExt as _};

#[derive(Clone, Copy)]
enum Script {
    /// First subscription: ops 1, then 3 (2 is skipped). Later ones: 2 and 3 in order.
    Gap,
    /// Op 1 as an ordinary call, then report the follower's replica cursor when it returns.
    ReportReplicaOnReturn,
}

#[derive(Debug, PartialEq)]
enum PeerEvent {
    Subscribed { after: u64 },
    OnOpsReturned { replica_cursor: Option<u64> },
}

struct Peer {
    script: Script,
    subscriptions: Cell<u32>,
    events: mpsc::Sender<PeerEvent>,
    outbox: PathBuf,
}

/// Starts the peer on its own thread; returns its address.
fn start_peer(script: Script, outbox: &Path) -> (String, mpsc::Receiver<PeerEvent>) {
    let (events, received) = mpsc::channel();
    let (addr_tx, addr_rx) = mpsc::channel();
    let outbox = outbox.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        tokio::task::LocalSet::new().block_on(&runtime, async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap().to_string()).unwrap();
            let peer = Rc::new(Peer { script, subscriptions: Cell::new(0), events, outbox });
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                stream.set_nodelay(true).unwrap();
                let (reader, writer) = stream.into_split();
                let network = twoparty::VatNetwork::new(reader.compat(), writer.compat_write(), Side::Server, Default::default());
                let gateway: gateway::Client = capnp_rpc::new_client(GatewayImpl(peer.clone()));
                tokio::task::spawn_local(RpcSystem::new(Box::new(network), Some(gateway.client)));
            }
        });
    });
    (addr_rx.recv().unwrap(), received)
}

struct GatewayImpl(Rc<Peer>);

impl gateway::Server for GatewayImpl {
    async fn redeem(self: Rc<Self>, _: gateway::RedeemParams, mut results: gateway::RedeemResults) -> Result<(), capnp::Error> {
        let session: session::Client = capnp_rpc::new_client(SessionImpl(self.0.clone()));
        let mut out = results.get();
        let mut grant = out.reborrow().init_grant();
        grant.set_kind("session");
        grant.set_id("s-1");
        grant.set_session_id("s-1");
        grant.reborrow().init_rights().set_read(true);
        grant.init_cap().set_session(session.clone());
        out.set_session(session);
        Ok(())
    }
}

struct SessionImpl(Rc<Peer>);

impl session::Server for SessionImpl {
    async fn snapshot(self: Rc<Self>, _: session::SnapshotParams, mut results: session::SnapshotResults) -> Result<(), capnp::Error> {
        results.get().init_entities(0);
        Ok(())
    }

    async fn changes(self: Rc<Self>, _: session::ChangesParams, mut results: session::ChangesResults) -> Result<(), capnp::Error> {
        results.get().init_ops(0);
        Ok(())
    }

    async fn subscribe(self: Rc<Self>, params: session::SubscribeParams, mut results: session::SubscribeResults) -> Result<(), capnp::Error> {
        let after = params.get()?.get_after();
        let listener = params.get()?.get_listener()?;
        let peer = self.0.clone();
        let nth = peer.subscriptions.get() + 1;
        peer.subscriptions.set(nth);
        let _ = peer.events.send(PeerEvent::Subscribed { after });
        tokio::task::spawn_local(async move {
            match (peer.script, nth) {
                (Script::Gap, 1) => {
                    let _ = send_ops(&listener, &[1]).await;
                    let _ = send_ops(&listener, &[3]).await;
                }
                (Script::Gap, _) => {
                    let _ = send_ops(&listener, &[2, 3]).await;
                }
                (Script::ReportReplicaOnReturn, _) => {
                    if send_ops(&listener, &[1]).await.is_ok() {
                        let _ = peer.events.send(PeerEvent::OnOpsReturned { replica_cursor: replica_cursor(&peer.outbox) });
                    }
                }
            }
            // Keep the listener (and with it the stream) until the follower goes away.
            std::future::pending::<()>().await;
        });
        results.get().set_subscription(capnp_rpc::new_client(SubscriptionImpl));
        Ok(())
    }
}

struct SubscriptionImpl;

impl subscription::Server for SubscriptionImpl {}

/// `onOps` as an ordinary call, so its completion is the follower's return from it (a
/// streaming send completes when the flow-control window has room, which says nothing).
async fn send_ops(listener: &listener::Client, seqs: &[u64]) -> Result<(), capnp::Error> {
    let mut request = listener.client.new_call::<listener::on_ops_params::Owned, capnp::any_pointer::Owned>(listener::Client::TYPE_ID, 0, None);
    {
        let mut params = request.get();
        params.set_cursor(*seqs.last().unwrap());
        let mut list = params.init_ops(seqs.len() as u32);
        for (i, seq) in seqs.iter().enumerate() {
            let mut applied = list.reborrow().get(i as u32);
            applied.set_seq(*seq);
            let mut op = applied.init_op();
            op.set_op_id(&seq.to_be_bytes().repeat(2));
            let mut entity = op.init_put();
            entity.set_kind(EntityKind::Message);
            entity.set_id(format!("m{seq}").as_str());
            entity.set_data(format!("{{\"n\":{seq}}}").as_bytes());
        }
    }
    request.send().promise.await.map(drop)
}

fn replica_cursor(outbox: &Path) -> Option<u64> {
    let db = rusqlite::Connection::open_with_flags(outbox, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    db.query_row("SELECT cursor FROM replica_state", [], |r| r.get::<_, i64>(0)).ok().map(|c| c as u64)
}

fn tail(addr: &str, outbox: &Path, env: &[(&str, &str)]) -> Child {
    let uri = SturdyUri::new(addr, Token::generate()).expose();
    Command::new(BIN)
        .args(["tail", &uri, "--json", "--outbox"])
        .arg(outbox)
        .envs(env.iter().copied())
        .env("RUST_LOG", "capsync_client=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Forwards a child's output lines to a channel (ends when the child closes it).
fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next `OnOpsReturned` the peer reports within `wait`.
fn on_ops_returned(events: &mpsc::Receiver<PeerEvent>, wait: Duration) -> Option<PeerEvent> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let left = deadline.checked_duration_since(std::time::Instant::now())?;
        match events.recv_timeout(left).ok()? {
            event @ PeerEvent::OnOpsReturned { .. } => return Some(event),
            PeerEvent::Subscribed { .. } => {}
        }
    }
}

const PATIENCE: Duration = Duration::from_secs(60);

#[test]
fn a_gap_in_the_stream_makes_the_follower_resubscribe_from_its_replica() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    let (addr, events) = start_peer(Script::Gap, &outbox);
    let mut child = tail(&addr, &outbox, &[]);
    let printed = lines(child.stdout.take().unwrap());
    let _stderr = lines(child.stderr.take().unwrap());
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        let Ok(line) = printed.recv_timeout(PATIENCE) else { break };
        let op: serde_json::Value = serde_json::from_str(&line).unwrap();
        seqs.push(op["seq"].as_u64().unwrap());
    }
    let exited = child.try_wait().unwrap();
    child.kill().ok();
    child.wait().unwrap();
    assert_eq!(exited, None, "the follower gave up on a gap instead of resubscribing");
    assert_eq!(seqs, [1, 2, 3], "every op once, in seq order, none past the hole");
    let subscribed: Vec<PeerEvent> = events.try_iter().collect();
    assert_eq!(subscribed, [PeerEvent::Subscribed { after: 0 }, PeerEvent::Subscribed { after: 1 }]);
}

#[test]
fn on_ops_returns_only_once_the_ops_are_in_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    let release = dir.path().join("release");
    let (addr, events) = start_peer(Script::ReportReplicaOnReturn, &outbox);
    let release_text = release.to_str().unwrap();
    let mut child = tail(&addr, &outbox, &[("CAPSYNC_FAILPOINTS", "client-before-replica-commit:hold"), ("CAPSYNC_FAILPOINTS_RELEASE", release_text)]);
    let stderr = lines(child.stderr.take().unwrap());
    let _stdout = lines(child.stdout.take().unwrap());
    // The follower is now inside the replica write, held before its commit.
    let held = std::iter::from_fn(|| stderr.recv_timeout(PATIENCE).ok()).any(|l| l.contains("client-before-replica-commit reached: holding"));
    assert!(held, "the follower never wrote the replica");
    // A follower that returns from onOps before its write is done answers while it is held; give
    // it the time to, then let the write finish.
    let early = on_ops_returned(&events, Duration::from_secs(2));
    std::fs::write(&release, b"").unwrap();
    let returned = early.or_else(|| on_ops_returned(&events, PATIENCE)).expect("onOps never returned");
    child.kill().ok();
    child.wait().unwrap();
    assert_eq!(returned, PeerEvent::OnOpsReturned { replica_cursor: Some(1) }, "onOps returned before the replica held its ops");
}
