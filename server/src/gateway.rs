//! `Gateway`, the bootstrap capability of each connection: tokens in, live capabilities out.

use crate::access::Access;
use crate::admin::AdminImpl;
use crate::error::ServerError;
use crate::registry::EpochRegistry;
use crate::session::SessionImpl;
use crate::config::Limits;
use crate::store::Store;
use capsync_persistence::server::{AuditEvent, TargetKind};
use capsync_schema::capsync_capnp::{admin, gateway, grant, session, share};
use capsync_schema::TokenHash;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};
use crate::budget::{ConnectionBudget, ServerBudget};
use crate::throttle::RedeemFailures;

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
}

impl Shared {
    pub fn new(store: Rc<dyn Store>, registry: Arc<EpochRegistry>, limits: Limits, closing: tokio::sync::watch::Receiver<bool>) -> Shared {
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
            budget: ServerBudget::new(limits.max_server_bytes_in_flight),
            peers: RefCell::default(),
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

    /// Admits one more call, or refuses it past the connection's limit.
    pub fn begin_call(self: &Rc<Self>) -> Result<CallGuard, ServerError> {
        let limit = self.shared.limits.max_calls_in_flight;
        if self.in_flight.get() >= limit {
            return Err(ServerError::Overloaded(format!("more than {limit} calls in flight on one connection")));
        }
        self.in_flight.set(self.in_flight.get() + 1);
        Ok(CallGuard { conn: self.clone() })
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

#[derive(Clone)]
enum LiveCap {
    Session(session::Client),
    Share(share::Client),
    Admin(admin::Client),
}

pub struct GatewayImpl {
    conn: Rc<Connection>,
    /// Redeeming a token twice on one connection returns the same live object.
    redeemed: RefCell<HashMap<TokenHash, (Access, LiveCap)>>,
}

/// Tokens are 47 characters; anything much longer is refused before hashing or a lookup.
const MAX_TOKEN_TEXT: usize = 256;
/// How long a throttled address waits for each further failed redeem.
const THROTTLE_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

impl GatewayImpl {
    pub fn new(conn: Rc<Connection>) -> GatewayImpl {
        GatewayImpl { conn, redeemed: RefCell::new(HashMap::new()) }
    }

    /// Accounts for a failed redeem: audited (up to the server-wide cap), and past the
    /// address's budget answered `capsync/overloaded` after a delay instead of its marker.
    async fn failed(&self, err: ServerError) -> ServerError {
        let verdict = self.conn.shared.redeem_failures.borrow_mut().record(self.conn.peer_ip(), std::time::Instant::now());
        if let Some(count) = verdict.suppressed {
            self.conn.audit("redeem-failed-unrecorded", None, format!("{count} failed redeems in the last window were not recorded one by one"));
        }
        if verdict.newly_throttled {
            warn!(peer = %self.conn.peer, "too many failed redeems: this address's failures are now delayed");
            self.conn.audit("redeem-throttled", None, format!("more than {} failed redeems", self.conn.shared.limits.max_failed_redeems));
        }
        if verdict.audit {
            info!(peer = %self.conn.peer, reason = %err.marker(), "redeem failed");
            self.conn.audit("redeem-failed", None, err.marker().as_str());
        }
        if verdict.throttled {
            tokio::time::sleep(THROTTLE_DELAY).await;
            return ServerError::Overloaded("too many failed redeems from this address; try again later".into());
        }
        err
    }

    async fn resolve(&self, hash: TokenHash) -> Result<(Access, LiveCap), ServerError> {
        if let Some((access, cap)) = self.redeemed.borrow().get(&hash) {
            access.check()?;
            return Ok((access.clone(), cap.clone()));
        }
        let shared = &self.conn.shared;
        let resolution = shared.store.resolve_token(hash.0).await?.ok_or(ServerError::UnknownToken)?;
        let access = Access::from_resolution(&resolution, &shared.registry)?;
        if let Some(existing) = self.redeemed.borrow().get(&hash) {
            // A concurrent redeem of the same token on this connection won the race.
            return Ok(existing.clone());
        }
        let cap = match access.kind {
            TargetKind::Session => LiveCap::Session(capnp_rpc::new_client(SessionImpl::new(access.clone(), self.conn.clone()))),
            TargetKind::Share => LiveCap::Share(capnp_rpc::new_client(SessionImpl::new(access.clone(), self.conn.clone()))),
            TargetKind::Admin => LiveCap::Admin(capnp_rpc::new_client(AdminImpl::new(access.clone(), self.conn.clone()))),
        };
        crate::store::detach("redeem", shared.store.record_redeem(hash.0, self.conn.event("redeem", Some(&access), "")));
        if let Some(ip) = self.conn.peer_ip() {
            let mut peers = shared.peers.borrow_mut();
            if self.conn.authenticated.replace(true) { peers.redeemed(ip) } else { peers.authenticated(ip) }
        }
        self.redeemed.borrow_mut().insert(hash, (access.clone(), cap.clone()));
        Ok((access, cap))
    }
}

impl gateway::Server for GatewayImpl {
    #[instrument(skip_all, fields(peer = %self.conn.peer))]
    async fn redeem(self: Rc<Self>, params: gateway::RedeemParams, mut results: gateway::RedeemResults) -> Result<(), capnp::Error> {
        let _call = self.conn.begin_call()?;
        let text = params.get()?.get_token()?;
        let text = match text.to_str() {
            Ok(text) if text.len() <= MAX_TOKEN_TEXT => text,
            _ => return Err(self.failed(ServerError::UnknownToken).await.into()),
        };
        let hash = TokenHash::of(text);
        let (access, cap) = match self.resolve(hash).await {
            Ok(found) => found,
            Err(err) => return Err(self.failed(err).await.into()),
        };
        debug!(kind = access.kind.name(), id = %access.id, "redeemed");
        let mut out = results.get();
        let mut grant = out.reborrow().init_grant();
        fill_grant(grant.reborrow(), &access);
        let mut slot = grant.init_cap();
        // The same object again outside the union, where every implementation can pipeline.
        match cap {
            LiveCap::Session(c) => {
                slot.set_session(c.clone());
                out.set_session(c);
            }
            LiveCap::Share(c) => {
                slot.set_share(c.clone());
                out.set_session(capnp::capability::FromClientHook::new(c.client.hook));
            }
            LiveCap::Admin(c) => {
                slot.set_admin(c.clone());
                out.set_admin(c);
            }
        }
        Ok(())
    }
}

fn fill_grant(mut grant: grant::Builder<'_>, access: &Access) {
    grant.set_kind(access.kind.name());
    grant.set_id(access.id.as_str());
    grant.set_session_id(access.session_id.as_str());
    crate::convert::set_rights(grant.reborrow().init_rights(), access.rights);
    grant.set_epoch(access.epoch());
    grant.set_expires_at(access.expires_at);
}
