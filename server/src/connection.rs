//! What every capability served on a connection shares: the server-wide state ([`Shared`]) and
//! the connection's own ([`Connection`]), with the guards that count calls and capabilities.
//! `gateway`, `session`, `admin` and `subscription` all build on this module; it builds on none
//! of them.

use crate::access::Access;
use crate::budget::{ConnectionBudget, ServerBudget};
use crate::config::Limits;
use crate::error::ServerError;
use crate::metrics::Metrics;
use crate::registry::EpochRegistry;
use crate::store::Store;
use crate::throttle::RedeemFailures;
use capsync_persistence::server::AuditEvent;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Server-wide state every connection shares (all on the RPC thread).
pub struct Shared {
    pub store: Rc<dyn Store>,
    pub registry: Arc<EpochRegistry>,
    pub limits: Limits,
    /// Live op feeds of sessions with subscribers; the writer thread publishes into them.
    pub feeds: Arc<crate::feed::Feeds>,
    /// Becomes true when the server starts shutting down: subscriptions end with `onEnd`.
    pub closing: tokio::sync::watch::Receiver<bool>,
    pub subscription_tasks: tokio_util::task::TaskTracker,
    /// Orders each client's batches by batchSeq before they reach the writer.
    pub sequencer: crate::sequencer::Sequencer,
    pub connections: Cell<u64>,
    pub live_capabilities: Cell<u64>,
    pub subscriptions: Cell<u64>,
    pub redeem_failures: RefCell<RedeemFailures>,
    /// Bytes of large frames read and not yet answered, over all connections.
    pub budget: Rc<ServerBudget>,
    /// Who is connected, for the per-address and anonymous-connection limits.
    pub peers: RefCell<crate::peers::Peers>,
    pub metrics: Arc<Metrics>,
}

impl Shared {
    pub fn new(
        store: Rc<dyn Store>,
        registry: Arc<EpochRegistry>,
        limits: Limits,
        closing: tokio::sync::watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> Shared {
        Shared {
            store,
            registry,
            feeds: Arc::default(),
            closing,
            subscription_tasks: tokio_util::task::TaskTracker::new(),
            sequencer: Default::default(),
            connections: Cell::new(0),
            live_capabilities: Cell::new(0),
            subscriptions: Cell::new(0),
            redeem_failures: RefCell::new(RedeemFailures::new(limits.redeem_window, limits.max_failed_redeems, limits.max_failure_audits)),
            budget: ServerBudget::observed(limits.max_server_bytes_in_flight, metrics.clone()),
            peers: RefCell::default(),
            metrics,
            limits,
        }
    }
}

/// Per-connection context handed to every capability served on it.
pub struct Connection {
    pub shared: Rc<Shared>,
    pub peer: String,
    pub in_flight: Cell<usize>,
    /// Capabilities served on this connection and still held (sessions, shares, admin).
    pub live: Cell<usize>,
    pub subscriptions: Cell<usize>,
    /// Cancelled when the connection ends: whatever works for it (subscriptions) stops.
    pub closed: CancellationToken,
    pub budget: Rc<ConnectionBudget>,
    /// Has redeemed a token (no longer counts against the anonymous share of connections).
    pub authenticated: Cell<bool>,
}

/// Counts one call in flight on a connection until dropped.
pub struct CallGuard {
    conn: Rc<Connection>,
    method: &'static str,
    started: std::time::Instant,
}

impl CallGuard {
    /// Runs a call's body and counts its outcome (`ok` or its marker) and latency under the
    /// call's method name.
    pub async fn observe(self, body: impl std::future::Future<Output = Result<(), capnp::Error>>) -> Result<(), capnp::Error> {
        let outcome = body.await;
        let took = self.started.elapsed();
        self.conn.shared.metrics.call(self.method, outcome.as_ref().err(), took);
        // One line per call with the stable field names a log system indexes (see
        // docs/OPERATIONS.md): method, marker ("ok" or the capsync/... marker), duration_ms.
        let marker = match &outcome {
            Ok(()) => "ok",
            Err(err) => capsync_schema::marker::of_error(err).map_or("other", |m| m.as_str()),
        };
        tracing::debug!(peer = %self.conn.peer, method = self.method, marker, duration_ms = took.as_secs_f64() * 1000.0, "call");
        outcome
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let left = self.conn.in_flight.get().saturating_sub(1);
        self.conn.in_flight.set(left);
        if left == 0 {
            // Everything this connection sent has been answered: its frames are gone.
            self.conn.budget.release_all();
        }
    }
}

impl Connection {
    pub fn new(shared: Rc<Shared>, peer: String, budget: Rc<ConnectionBudget>) -> Connection {
        Connection {
            shared,
            peer,
            in_flight: Cell::new(0),
            live: Cell::new(0),
            subscriptions: Cell::new(0),
            closed: CancellationToken::new(),
            budget,
            authenticated: Cell::new(false),
        }
    }

    /// Admits one more call of `method`, or refuses it past the connection's limit.
    pub fn begin_call(self: &Rc<Self>, method: &'static str) -> Result<CallGuard, ServerError> {
        let limit = self.shared.limits.max_calls_in_flight;
        if self.in_flight.get() >= limit {
            let why = format!("more than {limit} calls in flight on one connection");
            self.shared.metrics.call(method, Some(&ServerError::Overloaded(why.clone()).into()), std::time::Duration::ZERO);
            return Err(ServerError::Overloaded(why));
        }
        self.in_flight.set(self.in_flight.get() + 1);
        Ok(CallGuard { conn: self.clone(), method, started: std::time::Instant::now() })
    }

    /// Counts a capability served on this connection (and server-wide) until the returned
    /// guard is dropped with the capability.
    pub fn hold_capability(self: &Rc<Self>) -> LiveGuard {
        self.live.set(self.live.get() + 1);
        let total = &self.shared.live_capabilities;
        total.set(total.get() + 1);
        LiveGuard { conn: self.clone() }
    }

    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        self.peer.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
    }

    pub fn event(&self, action: &str, access: Option<&Access>, detail: impl Into<String>) -> AuditEvent {
        AuditEvent {
            action: action.to_owned(),
            target_kind: access.map(|a| a.kind.name().to_owned()).unwrap_or_default(),
            target_id: access.map(|a| a.id.clone()).unwrap_or_default(),
            session_id: access.map(|a| a.session_id.clone()).unwrap_or_default(),
            peer: self.peer.clone(),
            detail: detail.into(),
        }
    }

    /// Writes an audit row in the background (a failure is logged).
    pub fn audit(&self, action: &str, access: Option<&Access>, detail: impl Into<String>) {
        crate::store::detach("audit", self.shared.store.audit(self.event(action, access, detail)));
    }
}

/// Keeps a capability counted on its connection; dropped with the capability.
pub struct LiveGuard {
    conn: Rc<Connection>,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let conn = &self.conn;
        conn.live.set(conn.live.get().saturating_sub(1));
        let total = &conn.shared.live_capabilities;
        total.set(total.get().saturating_sub(1));
    }
}
