//! `Admin`: sessions, shares, revocation, audit and stats for the operator.

use crate::access::Access;
use crate::convert;
use crate::error::{Result, ServerError};
use crate::connection::{Connection, LiveGuard};
use crate::registry::ObjectKey;
use crate::store::now_ms;
use capsync_persistence::server::{SessionRow, ShareRow, TargetKind, TokenRow};
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

/// Whether a share (or one above it, or its session) was revoked since it was minted.
fn revoked(share: &ShareRow, shares: &HashMap<&str, &ShareRow>, sessions: &HashMap<&str, &SessionRow>) -> bool {
    // Every share token is minted at the share's epoch 0, so any bump revokes it.
    if share.epoch != 0 {
        return true;
    }
    match share.parent_share_id.as_deref() {
        Some(parent) => match shares.get(parent) {
            Some(p) => p.epoch != share.parent_epoch || revoked(p, shares, sessions),
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
            let (shares, sessions) = futures::try_join!(store.list_shares(filter), store.list_sessions())?;
            let by_id: HashMap<&str, &ShareRow> = shares.iter().map(|s| (s.id.as_str(), s)).collect();
            let sessions: HashMap<&str, &SessionRow> = sessions.iter().map(|(s, _)| (s.id.as_str(), s)).collect();
            let mut list = results.get().init_shares(shares.len() as u32);
            for (i, share) in shares.iter().enumerate() {
                convert::set_share_summary(list.reborrow().get(i as u32), share, revoked(share, &by_id, &sessions));
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
