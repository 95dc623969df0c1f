//! The accept loop and the per-connection RPC system.

use crate::bootstrap;
use crate::config::ServerConfig;
use crate::error::Result;
use crate::frames::{FrameClock, FrameWatch};
use crate::gateway::{Connection, GatewayImpl, Shared};
use crate::registry::EpochRegistry;
use crate::store::{SqliteStore, Store};
use capnp::message::ReaderOptions;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use capsync_schema::capsync_capnp::gateway;
use std::cell::Cell;
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
pub async fn run(listener: TcpListener, config: ServerConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&config.data_dir)?;
    let store: Rc<dyn Store> = Rc::new(SqliteStore::open(&config.data_dir, config.reader_threads)?);
    let registry = Arc::new(EpochRegistry::default());
    let local = listener.local_addr()?;
    bootstrap::ensure_admin_uri(&*store, &registry, &config.data_dir, local, config.tls.is_some()).await?;
    let tls = config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let (closing_subscriptions, closing) = watch::channel(false);
    let shared = Rc::new(Shared {
        store: store.clone(),
        registry,
        limits: config.limits.clone(),
        feeds: Arc::default(),
        closing,
        subscription_tasks: TaskTracker::new(),
        sequencer: Default::default(),
        connections: Cell::new(0),
        live_capabilities: Cell::new(0),
        subscriptions: Cell::new(0),
        redeem_failures: Default::default(),
    });
    info!(address = %local, data_dir = %config.data_dir.display(), "capsync serving");

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
    store.shutdown();
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
    debug!("connection opened");
    let clock = FrameClock::new();
    let reader = FrameWatch::new(reader, clock.clone(), shared.limits.traversal_limit_words * 8);
    // capnp-futures writes a frame's segment table and its segments with separate writes,
    // then flushes after every message: unbuffered, that is two syscalls and (with
    // TCP_NODELAY) two packets per message. Coalesced, the messages ready at one moment (the
    // replies to a burst of pipelined calls) leave in one write. 8 KiB covers calls and acks;
    // a larger batch goes straight through. The flusher is polled in this task (see coalesce).
    let (writer, mut flusher) = capsync_schema::coalesce::coalescing(writer, WRITE_BUFFER);
    let network = twoparty::VatNetwork::new(reader, writer, Side::Server, options);
    let frame_timeout = shared.limits.frame_timeout;
    let conn = Rc::new(Connection::new(shared.clone(), peer));
    let gateway: gateway::Client = capnp_rpc::new_client(GatewayImpl::new(conn));
    let rpc = RpcSystem::new(Box::new(network), Some(gateway.client));
    tokio::select! {
        outcome = rpc => match outcome {
            Ok(()) => debug!("connection closed"),
            Err(err) => debug!(error = %err, "connection ended"),
        },
        _ = &mut flusher => debug!("connection ended: a write failed"),
        _ = closing.wait_for(|closing| *closing) => {
            // Replies already written (acks of the last commits) still go out.
            let _ = tokio::time::timeout(FINAL_FLUSH, flusher.finish()).await;
            debug!("connection closed for shutdown");
        }
        _ = stuck_in_frame(&clock, frame_timeout) => info!("connection closed: no complete frame within the frame timeout"),
    }
    shared.connections.set(shared.connections.get().saturating_sub(1));
}

/// Completes once the connection has been before or inside a frame for longer than `limit`.
async fn stuck_in_frame(clock: &FrameClock, limit: std::time::Duration) {
    let tick = (limit / 4).max(std::time::Duration::from_millis(50));
    loop {
        tokio::time::sleep(tick).await;
        if clock.pending_for().is_some_and(|d| d > limit) {
            return;
        }
    }
}

/// Runs [`run`] on a fresh single-threaded runtime and `LocalSet`; for the binary.
pub fn serve_blocking(listen: &str, config: ServerConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::bind(listen).await?;
        announce(&listener)?;
        run(listener, config, shutdown).await
    })
}

/// Prints the bound address on stdout, so scripts and tests using port 0 learn the port.
fn announce(listener: &TcpListener) -> Result<()> {
    use std::io::Write as _;
    let addr = listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "capsync listening on {addr}")?;
    out.flush()?;
    if addr.ip().is_unspecified() {
        error!("listening on every interface without TLS: tokens cross the network in clear text");
    }
    Ok(())
}
