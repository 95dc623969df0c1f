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
use tracing::{debug, info, instrument, warn};

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
    /// Failed redeems per peer address in the current window: (window start, failures).
    pub redeem_failures: RefCell<HashMap<std::net::IpAddr, (std::time::Instant, u32)>>,
}

/// Per-connection context handed to every capability served on it.
pub struct Connection {
    pub shared: Rc<Shared>,
    pub peer: String,
    pub in_flight: Cell<usize>,
}

/// Counts one call in flight on a connection until dropped.
pub struct CallGuard {
    conn: Rc<Connection>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.conn.in_flight.set(self.conn.in_flight.get().saturating_sub(1));
    }
}

impl Connection {
    pub fn new(shared: Rc<Shared>, peer: String) -> Connection {
        Connection { shared, peer, in_flight: Cell::new(0) }
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

    fn peer_ip(&self) -> Option<std::net::IpAddr> {
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

impl GatewayImpl {
    pub fn new(conn: Rc<Connection>) -> GatewayImpl {
        GatewayImpl { conn, redeemed: RefCell::new(HashMap::new()) }
    }

    fn failed(&self, err: ServerError) -> ServerError {
        info!(peer = %self.conn.peer, reason = %err.marker(), "redeem failed");
        self.conn.shared.store.audit(self.conn.event("redeem-failed", None, err.marker().as_str()));
        if let Some(ip) = self.conn.peer_ip() {
            let limits = &self.conn.shared.limits;
            let mut failures = self.conn.shared.redeem_failures.borrow_mut();
            let now = std::time::Instant::now();
            let entry = failures.entry(ip).or_insert((now, 0));
            if now.duration_since(entry.0) > limits.redeem_window {
                *entry = (now, 0);
            }
            entry.1 += 1;
            if entry.1 == limits.max_failed_redeems {
                warn!(peer = %self.conn.peer, "too many failed redeems: refusing this address's redeems for a while");
                self.conn.shared.store.audit(self.conn.event("redeem-throttled", None, format!("{} failed redeems", entry.1)));
            }
        }
        err
    }

    /// Refuses redeems from an address that failed too often in the current window, before any
    /// lookup, so guessing tokens costs the guesser, not the server.
    fn throttled(&self) -> bool {
        let Some(ip) = self.conn.peer_ip() else { return false };
        let limits = &self.conn.shared.limits;
        let mut failures = self.conn.shared.redeem_failures.borrow_mut();
        match failures.get(&ip) {
            Some((start, _)) if start.elapsed() > limits.redeem_window => {
                failures.remove(&ip);
                false
            }
            Some((_, count)) => *count >= limits.max_failed_redeems,
            None => false,
        }
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
        shared.store.record_redeem(hash.0, self.conn.event("redeem", Some(&access), ""));
        self.redeemed.borrow_mut().insert(hash, (access.clone(), cap.clone()));
        Ok((access, cap))
    }
}

impl gateway::Server for GatewayImpl {
    #[instrument(skip_all, fields(peer = %self.conn.peer))]
    async fn redeem(self: Rc<Self>, params: gateway::RedeemParams, mut results: gateway::RedeemResults) -> Result<(), capnp::Error> {
        let _call = self.conn.begin_call()?;
        if self.throttled() {
            return Err(ServerError::Overloaded("too many failed redeems from this address; try again later".into()).into());
        }
        let text = params.get()?.get_token()?;
        let text = match text.to_str() {
            Ok(text) if text.len() <= MAX_TOKEN_TEXT => text,
            _ => return Err(self.failed(ServerError::UnknownToken).into()),
        };
        let hash = TokenHash::of(text);
        let (access, cap) = match self.resolve(hash).await {
            Ok(found) => found,
            Err(err) => return Err(self.failed(err).into()),
        };
        debug!(kind = access.kind.name(), id = %access.id, "redeemed");
        let mut grant = results.get().init_grant();
        fill_grant(grant.reborrow(), &access);
        let mut slot = grant.init_cap();
        match cap {
            LiveCap::Session(c) => slot.set_session(c),
            LiveCap::Share(c) => slot.set_share(c),
            LiveCap::Admin(c) => slot.set_admin(c),
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
