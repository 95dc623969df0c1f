//! The accept loop and the per-connection RPC system.

use crate::bootstrap;
use crate::config::ServerConfig;
use crate::datadir::DataDirLock;
use crate::error::Result;
use crate::frames::{FrameClock, FrameWatch};
use crate::budget::ConnectionBudget;
use crate::connection::{Connection, Shared};
use crate::gateway::GatewayImpl;
use crate::registry::EpochRegistry;
use crate::store::{SqliteStore, Store};
use crate::health::Readiness;
use crate::metrics::{Metrics, Refusal};
use capsync_persistence::writer::GroupObserver;
use capnp::message::ReaderOptions;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use capsync_schema::capsync_capnp::gateway;
use std::future::Future;
use std::os::unix::fs::DirBuilderExt as _;
use std::rc::Rc;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::compat::{TokioAsyncReadCompatExt as _, TokioAsyncWriteCompatExt as _};
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, instrument, warn};

/// Serves capsync on `listener` until `shutdown` completes, then stops accepting, closes every
/// connection, and returns once every queued write has committed.
///
/// Must run inside a [`tokio::task::LocalSet`]: capnp-rpc objects are `!Send`.
/// `ready` is called with the bound address once the server owns its data dir, has opened its
/// database and written `admin.uri`: from then on a client can connect and redeem.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    ready: impl FnOnce(std::net::SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&config.data_dir)?;
    let _owner = DataDirLock::acquire(&config.data_dir)?;
    // Bound before the store opens, so a taken port is reported before anything else.
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    let observer: GroupObserver = {
        let metrics = metrics.clone();
        Arc::new(move |report| metrics.group(report))
    };
    let store: Rc<dyn Store> = match &config.store_url {
        None => Rc::new(SqliteStore::open(&config.data_dir, config.reader_threads, Some(observer))?),
        Some(url) => Rc::new(crate::postgres::PostgresStore::connect(url, Some(observer)).await?),
    };
    let registry = Arc::new(EpochRegistry::observed(metrics.clone()));
    tokio::task::spawn_local(registry.sweeper());
    let local = listener.local_addr()?;
    let advertised = config.advertise.clone().unwrap_or_else(|| bootstrap::dial_address(local));
    bootstrap::ensure_admin_uri(&*store, &registry, &config.data_dir, advertised, config.tls.is_some()).await?;
    if local.ip().is_unspecified() && config.tls.is_none() {
        error!("listening on every interface without TLS: tokens cross the network in clear text");
    }
    let (closing_subscriptions, closing) = watch::channel(false);
    // Up before the server says it listens, so whoever waits for that can scrape at once.
    if let Some(listener) = metrics_listener {
        info!(address = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
        let readiness = Rc::new(Readiness { store: store.clone(), closing: closing.clone(), currency: registry.currency() });
        tokio::task::spawn_local(crate::health::serve(listener, metrics.clone(), readiness));
    }
    let shared = Rc::new(Shared::new(store.clone(), registry.clone(), config.limits.clone(), closing, metrics.clone()));
    if let Some(events) = store.events() {
        // Other nodes' revocations must be heard before this node judges a capability.
        registry.set_current(false);
        tokio::task::spawn_local(crate::fanout::run(store.clone(), registry.clone(), shared.feeds.clone(), events));
        let mut current = registry.currency().watch();
        if tokio::time::timeout(std::time::Duration::from_secs(30), current.wait_for(|c| *c)).await.is_err() {
            warn!("not yet listening for other nodes' revocations; calls are refused as retryable until then");
        }
    }
    ready(local);
    let tls = config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    info!(address = %local, data_dir = %config.data_dir.display(), store = store.name(), "capsync serving");

    let permits = Arc::new(Semaphore::new(config.max_connections));
    let (closing_tx, closing) = watch::channel(false);
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let anonymous_limit = config.max_connections - config.max_connections / 4;
        let admitted = shared.peers.borrow_mut().admit(peer.ip(), config.limits.max_connections_per_address, anonymous_limit);
        if let Err(refusal) = admitted {
            debug!(peer = %peer, ?refusal, "connection refused");
            shared.metrics.refused(match refusal {
                crate::peers::Refusal::TooManyFromAddress => Refusal::PerAddress,
                crate::peers::Refusal::NoRoomForAnonymous => Refusal::AnonymousShare,
            });
            drop(stream);
            continue;
        }
        let shared = shared.clone();
        let closing = closing.clone();
        let options = reader_options(&config);
        let tls = tls.clone();
        tracker.spawn_local(async move {
            let peer = peer.to_string();
            if let Err(err) = stream.set_nodelay(true) {
                debug!(error = %err, "set_nodelay failed");
            }
            match tls {
                None => {
                    let (reader, writer) = stream.into_split();
                    serve_connection(reader.compat(), writer.compat_write(), peer, shared, options, closing).await;
                }
                Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let (reader, writer) = tokio::io::split(tls);
                        serve_connection(reader.compat(), writer.compat_write(), peer, shared, options, closing).await;
                    }
                    Ok(Err(err)) => debug!(peer = %peer, error = %err, "TLS handshake failed"),
                    Err(_) => debug!(peer = %peer, "TLS handshake timed out"),
                },
            }
            drop(permit);
        });
    }

    info!("shutting down: ending subscriptions, closing connections, finishing commits");
    drop(listener);
    let _ = closing_subscriptions.send(true);
    shared.subscription_tasks.close();
    if tokio::time::timeout(std::time::Duration::from_secs(3), shared.subscription_tasks.wait()).await.is_err() {
        warn!("some subscriptions did not end in time");
    }
    let _ = closing_tx.send(true);
    tracker.close();
    tracker.wait().await;
    if let Err(err) = store.shutdown().await {
        error!(error = %err, "the store did not shut down cleanly");
    }
    info!("shut down");
    Ok(())
}

fn reader_options(config: &ServerConfig) -> ReaderOptions {
    let mut options = ReaderOptions::new();
    options.traversal_limit_in_words(Some(config.limits.traversal_limit_words));
    options.nesting_limit(config.limits.nesting_limit);
    options
}

/// Longest a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Write buffer per connection (see `serve_connection`); 1,000 connections cost 8 MiB.
const WRITE_BUFFER: usize = 8 * 1024;
/// How long a connection closed for shutdown may take to send what it had buffered.
const FINAL_FLUSH: std::time::Duration = std::time::Duration::from_millis(500);

#[instrument(skip_all, fields(peer = %peer))]
async fn serve_connection(
    reader: impl futures::AsyncRead + Unpin + 'static,
    writer: impl futures::AsyncWrite + Unpin + 'static,
    peer: String,
    shared: Rc<Shared>,
    options: ReaderOptions,
    mut closing: watch::Receiver<bool>,
) {
    shared.connections.set(shared.connections.get() + 1);
    shared.metrics.connection_opened();
    debug!("connection opened");
    let clock = FrameClock::new();
    let budget = ConnectionBudget::new(shared.budget.clone(), shared.limits.max_connection_bytes_in_flight);
    let reader = FrameWatch::new(reader, clock.clone(), shared.limits.traversal_limit_words * 8).with_budget(budget.clone());
    // capnp-futures writes a frame's segment table and its segments with separate writes,
    // then flushes after every message: unbuffered, that is two syscalls and (with
    // TCP_NODELAY) two packets per message. Coalesced, the messages ready at one moment (the
    // replies to a burst of pipelined calls) leave in one write. 8 KiB covers calls and acks;
    // a larger batch goes straight through. The flusher is polled in this task (see coalesce).
    let (writer, mut flusher) = capsync_schema::coalesce::coalescing(writer, WRITE_BUFFER);
    let network = twoparty::VatNetwork::new(reader, writer, Side::Server, options);
    let conn = Rc::new(Connection::new(shared.clone(), peer, budget));
    let gateway: gateway::Client = capnp_rpc::new_client(GatewayImpl::new(conn.clone()));
    let rpc = RpcSystem::new(Box::new(network), Some(gateway.client));
    tokio::select! {
        outcome = rpc => {
            match outcome {
                Ok(()) => debug!("connection closed"),
                Err(err) => debug!(error = %err, "connection ended"),
            }
            // The RPC system's last words (an abort saying why, e.g. a message over the size
            // limit) may still sit in the coalescing buffer: send them before closing.
            let _ = tokio::time::timeout(FINAL_FLUSH, flusher.finish()).await;
        }
        _ = &mut flusher => debug!("connection ended: a write failed"),
        _ = closing.wait_for(|closing| *closing) => {
            // Replies already written (acks of the last commits) still go out.
            let _ = tokio::time::timeout(FINAL_FLUSH, flusher.finish()).await;
            debug!("connection closed for shutdown");
        }
        reason = watchdog(&clock, &conn) => {
            conn.shared.metrics.refused(reason);
            info!(reason = reason.name(), "connection closed");
        }
    }
    if clock.refused() {
        shared.metrics.refused(Refusal::FrameTooLarge);
    }
    // Whatever still works for this connection (subscriptions) stops now, so nothing keeps
    // its socket or its memory once it is gone.
    conn.closed.cancel();
    if let Some(ip) = conn.peer_ip() {
        shared.peers.borrow_mut().closed(ip, !conn.authenticated.get());
    }
    conn.budget.release_all();
    shared.connections.set(shared.connections.get().saturating_sub(1));
    shared.metrics.connection_closed();
}

/// Completes, saying why, once the connection should be closed: it has been before or inside
/// a frame for longer than the frame timeout, or it holds no live capability and has sent
/// nothing for the idle timeout. Also releases the byte charges of a connection with no call
/// in flight (frames that carried no call, such as returns, are never answered).
async fn watchdog(clock: &FrameClock, conn: &Connection) -> Refusal {
    let limits = &conn.shared.limits;
    let tick = (limits.frame_timeout.min(limits.idle_timeout) / 4).max(std::time::Duration::from_millis(50));
    loop {
        tokio::time::sleep(tick).await;
        if clock.pending_for().is_some_and(|d| d > limits.frame_timeout) {
            return Refusal::FrameTimeout;
        }
        let idle = conn.in_flight.get() == 0;
        if idle && conn.live.get() == 0 && conn.subscriptions.get() == 0 && clock.quiet_for() > limits.idle_timeout {
            return Refusal::Idle;
        }
        if idle {
            conn.budget.release_all();
        }
    }
}

/// Runs [`run`] on a fresh single-threaded runtime and `LocalSet`; for the binary.
pub fn serve_blocking(
    listen: &str,
    config: ServerConfig,
    ready: impl FnOnce(std::net::SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::bind(listen).await?;
        run(listener, config, ready, shutdown).await
    })
}
