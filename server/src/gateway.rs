//! `Gateway`, the bootstrap capability of each connection: tokens in, live capabilities out.

use crate::access::Access;
use crate::admin::AdminImpl;
use crate::connection::Connection;
use crate::error::ServerError;
use crate::session::SessionImpl;
use crate::space::SpaceImpl;
use capsync_persistence::server::TargetKind;
use capsync_schema::capsync_capnp::{admin, gateway, grant, session, share, space};
use capsync_schema::TokenHash;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use tracing::{debug, info, instrument, warn};

#[derive(Clone)]
enum LiveCap {
    Session(session::Client),
    Share(share::Client),
    Admin(admin::Client),
    Space(space::Client),
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
        // Before the read: a revocation that commits during it must outlive any sweep.
        let ticket = shared.registry.ticket();
        let resolution = shared.store.resolve_token(hash.0).await?.ok_or(ServerError::UnknownToken)?;
        let access = Access::from_resolution(&resolution, &ticket)?;
        drop(ticket);
        if let Some(existing) = self.redeemed.borrow().get(&hash) {
            // A concurrent redeem of the same token on this connection won the race.
            return Ok(existing.clone());
        }
        let cap = match access.kind {
            TargetKind::Session => LiveCap::Session(capnp_rpc::new_client(SessionImpl::new(access.clone(), self.conn.clone()))),
            TargetKind::Share => LiveCap::Share(capnp_rpc::new_client(SessionImpl::new(access.clone(), self.conn.clone()))),
            TargetKind::Admin => LiveCap::Admin(capnp_rpc::new_client(AdminImpl::new(access.clone(), self.conn.clone()))),
            TargetKind::Space => LiveCap::Space(capnp_rpc::new_client(SpaceImpl::new(access.clone(), self.conn.clone()))),
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
        let call = self.conn.begin_call("redeem")?;
        call.observe(async move {
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
            fill_grant(grant.reborrow(), &access, &self.conn.shared.store.history());
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
                LiveCap::Space(c) => {
                    slot.set_space(c.clone());
                    out.set_space(c);
                }
            }
            Ok(())
        })
        .await
    }
}

fn fill_grant(mut grant: grant::Builder<'_>, access: &Access, history: &str) {
    grant.set_history(history);
    grant.set_kind(access.kind.name());
    grant.set_id(access.id.as_str());
    grant.set_session_id(access.session_id.as_str());
    crate::convert::set_rights(grant.reborrow().init_rights(), access.rights);
    grant.set_epoch(access.epoch());
    grant.set_expires_at(access.expires_at);
}
