//! `Admin`: sessions, shares, spaces, revocation, audit and stats for the operator.

use crate::access::Access;
use crate::convert;
use crate::error::{Result, ServerError};
use crate::connection::{Connection, LiveGuard};
use crate::registry::ObjectKey;
use crate::session::{new_share, share_label, ShareParent};
use crate::store::now_ms;
use capsync_persistence::server::{SessionRow, ShareRow, SpaceRow, TargetKind, TokenRow};
use capsync_persistence::Rights;
use capsync_schema::capsync_capnp::admin;
use capsync_schema::Token;
use std::collections::HashMap;
use std::rc::Rc;
use tracing::{info, instrument};

pub struct AdminImpl {
    access: Access,
    conn: Rc<Connection>,
    _live: LiveGuard,
}

impl AdminImpl {
    pub fn new(access: Access, conn: Rc<Connection>) -> AdminImpl {
        AdminImpl { access, _live: conn.hold_capability(), conn }
    }

    fn check(&self) -> Result<()> {
        self.access.check()
    }
}

/// Whether a share (or one above it, or its session, or the space it descends from) was
/// revoked since it was minted.
fn revoked(share: &ShareRow, shares: &HashMap<&str, &ShareRow>, sessions: &HashMap<&str, &SessionRow>, spaces: &HashMap<&str, &SpaceRow>) -> bool {
    // Every share token is minted at the share's epoch 0, so any bump revokes it.
    if share.epoch != 0 {
        return true;
    }
    if let Some(link) = &share.space {
        if spaces.get(link.space_id.as_str()).is_none_or(|s| s.epoch != link.epoch) {
            return true;
        }
    }
    match share.parent_share_id.as_deref() {
        Some(parent) => match shares.get(parent) {
            Some(p) => p.epoch != share.parent_epoch || revoked(p, shares, sessions, spaces),
            None => true,
        },
        None => sessions.get(share.session_id.as_str()).is_none_or(|s| s.epoch != share.parent_epoch),
    }
}

fn text_param(text: capnp::Result<capnp::text::Reader<'_>>, what: &str) -> Result<String> {
    Ok(text?.to_str().map_err(|_| ServerError::Invalid(format!("{what} is not UTF-8")))?.trim().to_owned())
}

impl admin::Server for AdminImpl {
    #[instrument(skip_all, fields(peer = %self.conn.peer))]
    async fn create_session(self: Rc<Self>, params: admin::CreateSessionParams, mut results: admin::CreateSessionResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("createSession")?;
        call.observe(async move {
            self.check()?;
            let title = text_param(params.get()?.get_title(), "title")?;
            let session_id = uuid::Uuid::now_v7().to_string();
            let token = Token::generate();
            let now = now_ms();
            let owner = TokenRow {
                hash: token.hash().0,
                target_kind: TargetKind::Session,
                target_id: session_id.clone(),
                minted_epoch: 0,
                rights: Rights::ALL,
                parent: "admin".into(),
                label: "owner".into(),
                created_at: now,
                expires_at: 0,
                last_used_at: 0,
                space: None,
            };
            let mut event = self.conn.event("create-session", Some(&self.access), format!("title={title}"));
            event.target_kind = "session".into();
            event.target_id = session_id.clone();
            event.session_id = session_id.clone();
            self.conn.shared.store.create_session(session_id.clone(), title, owner, event).await?;
            info!(session = %session_id, "session created");
            let mut out = results.get();
            out.set_session_id(session_id.as_str());
            out.set_token(token.expose());
            Ok(())
        })
        .await
    }

    async fn list_sessions(self: Rc<Self>, _: admin::ListSessionsParams, mut results: admin::ListSessionsResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("listSessions")?;
        call.observe(async move {
            self.check()?;
            let sessions = self.conn.shared.store.list_sessions().await?;
            let mut list = results.get().init_sessions(sessions.len() as u32);
            for (i, (session, shares)) in sessions.iter().enumerate() {
                convert::set_session_summary(list.reborrow().get(i as u32), session, *shares);
            }
            Ok(())
        })
        .await
    }

    async fn list_shares(self: Rc<Self>, params: admin::ListSharesParams, mut results: admin::ListSharesResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("listShares")?;
        call.observe(async move {
            self.check()?;
            let session_id = text_param(params.get()?.get_session_id(), "sessionId")?;
            let store = &self.conn.shared.store;
            let filter = (!session_id.is_empty()).then_some(session_id);
            let (shares, sessions, spaces) = futures::try_join!(store.list_shares(filter), store.list_sessions(), store.list_spaces())?;
            let by_id: HashMap<&str, &ShareRow> = shares.iter().map(|s| (s.id.as_str(), s)).collect();
            let sessions: HashMap<&str, &SessionRow> = sessions.iter().map(|(s, _)| (s.id.as_str(), s)).collect();
            let spaces: HashMap<&str, &SpaceRow> = spaces.iter().map(|(s, _)| (s.id.as_str(), s)).collect();
            let mut list = results.get().init_shares(shares.len() as u32);
            for (i, share) in shares.iter().enumerate() {
                convert::set_share_summary(list.reborrow().get(i as u32), share, revoked(share, &by_id, &sessions, &spaces));
            }
            Ok(())
        })
        .await
    }

    #[instrument(skip_all, fields(peer = %self.conn.peer))]
    async fn revoke_share(self: Rc<Self>, params: admin::RevokeShareParams, mut results: admin::RevokeShareResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("revokeShare")?;
        call.observe(async move {
            self.check()?;
            let share_id = text_param(params.get()?.get_share_id(), "shareId")?;
            let mut event = self.conn.event("revoke", Some(&self.access), "share");
            event.target_kind = "share".into();
            event.target_id = share_id.clone();
            let registry = self.conn.shared.registry.clone();
            let key = ObjectKey::Share(share_id.clone());
            let on_commit = Box::new(move |epoch| registry.bump(key, epoch));
            let epoch = self.conn.shared.store.revoke_share(share_id.clone(), event, on_commit).await?;
            let epoch = epoch.ok_or_else(|| ServerError::Invalid(format!("no share {share_id}")))?;
            self.conn.shared.metrics.revoked("share");
            info!(share = %share_id, epoch, "share revoked");
            results.get().set_epoch(epoch);
            Ok(())
        })
        .await
    }

    #[instrument(skip_all, fields(peer = %self.conn.peer))]
    async fn revoke_session(self: Rc<Self>, params: admin::RevokeSessionParams, mut results: admin::RevokeSessionResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("revokeSession")?;
        call.observe(async move {
            self.check()?;
            let session_id = text_param(params.get()?.get_session_id(), "sessionId")?;
            let mut event = self.conn.event("revoke", Some(&self.access), "session");
            event.target_kind = "session".into();
            event.target_id = session_id.clone();
            event.session_id = session_id.clone();
            let registry = self.conn.shared.registry.clone();
            let key = ObjectKey::Session(session_id.clone());
            let on_commit = Box::new(move |epoch| registry.bump(key, epoch));
            let epoch = self.conn.shared.store.revoke_session(session_id.clone(), event, on_commit).await?;
            let epoch = epoch.ok_or_else(|| ServerError::Invalid(format!("no session {session_id}")))?;
            self.conn.shared.metrics.revoked("session");
            info!(session = %session_id, epoch, "session revoked");
            results.get().set_epoch(epoch);
            Ok(())
        })
        .await
    }

    #[instrument(skip_all, fields(peer = %self.conn.peer))]
    async fn create_space(self: Rc<Self>, params: admin::CreateSpaceParams, mut results: admin::CreateSpaceResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("createSpace")?;
        call.observe(async move {
            self.check()?;
            let label = text_param(params.get()?.get_label(), "label")?;
            if label.len() > 256 || label.contains('\0') {
                return Err(ServerError::Invalid("a space's label is at most 256 bytes of text without U+0000".into()).into());
            }
            let space_id = uuid::Uuid::now_v7().to_string();
            let token = Token::generate();
            let now = now_ms();
            let space = SpaceRow { id: space_id.clone(), label: label.clone(), epoch: 0, created_at: now };
            let row = TokenRow {
                hash: token.hash().0,
                target_kind: TargetKind::Space,
                target_id: space_id.clone(),
                minted_epoch: 0,
                rights: Rights::default(),
                parent: "admin".into(),
                label: label.clone(),
                created_at: now,
                expires_at: 0,
                last_used_at: 0,
                space: None,
            };
            let mut event = self.conn.event("create-space", Some(&self.access), format!("label={label}"));
            event.target_kind = "space".into();
            event.target_id = space_id.clone();
            self.conn.shared.store.create_space(space, row, self.access.guard(), event).await?;
            self.check()?;
            info!(space = %space_id, "space created");
            let mut out = results.get();
            out.set_space_id(space_id.as_str());
            out.set_token(token.expose());
            Ok(())
        })
        .await
    }

    async fn list_spaces(self: Rc<Self>, _: admin::ListSpacesParams, mut results: admin::ListSpacesResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("listSpaces")?;
        call.observe(async move {
            self.check()?;
            let spaces = self.conn.shared.store.list_spaces().await?;
            let mut list = results.get().init_spaces(spaces.len() as u32);
            for (i, (space, sessions)) in spaces.iter().enumerate() {
                convert::set_space_summary(list.reborrow().get(i as u32), space, *sessions);
            }
            Ok(())
        })
        .await
    }

    #[instrument(skip_all, fields(peer = %self.conn.peer))]
    async fn revoke_space(self: Rc<Self>, params: admin::RevokeSpaceParams, mut results: admin::RevokeSpaceResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("revokeSpace")?;
        call.observe(async move {
            self.check()?;
            let space_id = text_param(params.get()?.get_space_id(), "spaceId")?;
            let mut event = self.conn.event("revoke", Some(&self.access), "space");
            event.target_kind = "space".into();
            event.target_id = space_id.clone();
            let registry = self.conn.shared.registry.clone();
            let key = ObjectKey::Space(space_id.clone());
            let on_commit = Box::new(move |epoch| registry.bump(key, epoch));
            let epoch = self.conn.shared.store.revoke_space(space_id.clone(), event, on_commit).await?;
            let epoch = epoch.ok_or_else(|| ServerError::Invalid(format!("no space {space_id}")))?;
            self.conn.shared.metrics.revoked("space");
            info!(space = %space_id, epoch, "space revoked");
            results.get().set_epoch(epoch);
            Ok(())
        })
        .await
    }

    /// A share of any session, minted by the admin: its parent is the session (at its current
    /// epoch), it descends from no space, and it is listed and revoked like any other share.
    #[instrument(skip_all, fields(peer = %self.conn.peer))]
    async fn mint_share(self: Rc<Self>, params: admin::MintShareParams, mut results: admin::MintShareResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("mintShare")?;
        call.observe(async move {
            self.check()?;
            let params = params.get()?;
            let session_id = text_param(params.get_session_id(), "sessionId")?;
            let rights = convert::rights_from(params.get_rights()?);
            if rights == Rights::default() {
                return Err(ServerError::Invalid("a share needs at least one right".into()).into());
            }
            let label = share_label(params.get_label())?;
            let expires_at = match params.get_ttl_seconds() {
                0 => 0,
                ttl => now_ms().saturating_add(ttl.saturating_mul(1000)),
            };
            let shared = &self.conn.shared;
            // The session's epoch becomes a cell: taken before the read (see registry).
            let ticket = shared.registry.ticket();
            let session = shared
                .store
                .session(session_id.clone())
                .await?
                .ok_or_else(|| ServerError::Invalid(format!("no session {session_id}")))?;
            // The admin's chain and the session at the epoch just read: a revocation of either
            // that commits first fails the mint.
            let mut guard = self.access.guard();
            guard.chain.push(ticket.link(ObjectKey::Session(session.id.clone()), session.epoch, session.epoch));
            ticket.confirm()?;
            drop(ticket);
            let (token, share, row) = new_share(
                ShareParent {
                    sid: session.sid,
                    session_id: session.id.clone(),
                    parent_share_id: None,
                    parent_epoch: session.epoch,
                    minted_by: "admin".into(),
                    space: None,
                },
                rights,
                label.clone(),
                expires_at,
            );
            let share_id = share.id.clone();
            let mut event = self.conn.event("mint", Some(&self.access), format!("rights={} label={label}", rights.names()));
            event.target_kind = "share".into();
            event.target_id = share_id.clone();
            event.session_id = session.id.clone();
            shared.store.mint_share(share, row, guard, event).await?;
            self.check()?;
            info!(session = %session.id, share = %share_id, "share minted by the admin");
            let mut out = results.get();
            out.set_token(token.expose());
            out.set_share_id(share_id.as_str());
            Ok(())
        })
        .await
    }

    async fn audit(self: Rc<Self>, params: admin::AuditParams, mut results: admin::AuditResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("audit")?;
        call.observe(async move {
            self.check()?;
            let params = params.get()?;
            let limit = match params.get_limit() {
                0 => 100,
                n => n.min(10_000),
            };
            let rows = self.conn.shared.store.audit_page(params.get_since(), limit).await?;
            let mut list = results.get().init_entries(rows.len() as u32);
            for (i, row) in rows.iter().enumerate() {
                let mut e = list.reborrow().get(i as u32);
                e.set_id(row.id);
                e.set_at(row.at);
                e.set_action(row.event.action.as_str());
                e.set_target_kind(row.event.target_kind.as_str());
                e.set_target_id(row.event.target_id.as_str());
                e.set_session_id(row.event.session_id.as_str());
                e.set_peer(row.event.peer.as_str());
                e.set_detail(row.event.detail.as_str());
            }
            Ok(())
        })
        .await
    }

    async fn stats(self: Rc<Self>, _: admin::StatsParams, mut results: admin::StatsResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("stats")?;
        call.observe(async move {
            self.check()?;
            let stored = self.conn.shared.store.stats().await?;
            let shared = &self.conn.shared;
            let mut stats = results.get().init_stats();
            stats.set_sessions(stored.sessions);
            stats.set_shares(stored.shares);
            stats.set_ops(stored.ops);
            stats.set_connections(shared.connections.get());
            stats.set_live_capabilities(shared.live_capabilities.get());
            stats.set_subscriptions(shared.subscriptions.get());
            stats.set_store(shared.store.name());
            Ok(())
        })
        .await
    }
}
