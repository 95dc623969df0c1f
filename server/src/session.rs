//! `Session` and `Share`: one implementation serves both, limited by the grant's rights.
//!
//! Every method first checks the capability's epoch chain and expiry (no database read), so a
//! revocation committed on any connection fails the next call here with `capsync/revoked`.
//! Calls still in flight when it lands fail at once: a read waiting on the store is dropped
//! the moment a revocation reaches its chain ([`Access::unless_refused`]), and every call is
//! checked again before it answers. An append's write is not dropped: it commits before the
//! revocation or is refused by the store's own check, and its answer says which.

use crate::access::Access;
use crate::convert;
use crate::error::{Result, ServerError};
use crate::connection::{Connection, LiveGuard};
use crate::store::now_ms;
use capsync_persistence::server::{ShareRow, SpaceLink, TargetKind, TokenRow};
use capsync_persistence::Rights;
use capsync_schema::capsync_capnp::{session, share};
use capsync_schema::Token;
use std::rc::Rc;
use tracing::{debug, warn};

pub struct SessionImpl {
    access: Access,
    conn: Rc<Connection>,
    _live: LiveGuard,
}

const READ: Rights = Rights { read: true, append: false, mint: false };
const APPEND: Rights = Rights { read: false, append: true, mint: false };
const MINT: Rights = Rights { read: false, append: false, mint: true };

impl SessionImpl {
    pub fn new(access: Access, conn: Rc<Connection>) -> SessionImpl {
        SessionImpl { access, _live: conn.hold_capability(), conn }
    }

    /// Checks rights; a refusal (not a revocation) is audited as `denied`.
    fn require(&self, needed: Rights, what: &str) -> Result<()> {
        let result = self.access.require(needed, what);
        if let Err(ServerError::Denied(reason)) = &result {
            warn!(peer = %self.conn.peer, share = %self.access.id, method = what, "denied");
            self.conn.audit("denied", Some(&self.access), reason.clone());
        }
        result
    }

    fn page_limit(&self, asked: u32) -> u32 {
        let max = self.conn.shared.limits.max_page_items;
        if asked == 0 { max } else { asked.min(max) }
    }

    /// Where a share minted here expires: never later than this capability.
    fn child_expiry(&self, ttl_seconds: u64) -> Result<u64> {
        let parent = self.access.expires_at;
        if ttl_seconds == 0 {
            return Ok(parent);
        }
        let wanted = now_ms().saturating_add(ttl_seconds.saturating_mul(1000));
        if parent != 0 && wanted > parent {
            return Err(ServerError::Denied(
                "a share cannot outlive the capability it is minted from; ask for a shorter ttl".into(),
            ));
        }
        Ok(wanted)
    }
}

impl share::Server for SessionImpl {}

impl session::Server for SessionImpl {
    /// Batches of one client reach the writer in batchSeq order whatever order their calls
    /// were dispatched in (see [`crate::sequencer`]).
    async fn append(self: Rc<Self>, params: session::AppendParams, mut results: session::AppendResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("append")?;
        call.observe(async move {
            self.require(APPEND, "append")?;
            let batch = convert::batch(params.get()?.get_batch()?, &self.conn.shared.limits)?;
            debug!(session = %self.access.session_id, batch_seq = batch.batch_seq, ops = batch.ops.len(), "append");
            let shared = &self.conn.shared;
            let (sid, client, seq) = (self.access.sid, batch.client_id, batch.batch_seq);
            let turn = shared.sequencer.turn(sid, client, seq, || shared.store.last_batch_seq(sid, client)).await?;
            self.access.check()?;
            let feeds = shared.feeds.clone();
            let publish = Box::new(move |ops| feeds.publish(sid, ops));
            let pending = shared.store.append(sid, self.access.session_id.clone(), batch, self.access.guard(), publish);
            // SQLite applies in call order: the successor may go as soon as this one is queued.
            // Elsewhere it waits for this commit (a failure drops the turn: see the sequencer).
            let turn = if shared.store.applies_in_call_order() {
                turn.submitted();
                None
            } else {
                Some(turn)
            };
            let ack = match pending.await {
                Ok(ack) => ack,
                Err(err) => {
                    if turn.is_none() {
                        shared.sequencer.forget(sid, client);
                    }
                    return Err(err.into());
                }
            };
            if let Some(turn) = turn {
                turn.submitted();
            }
            // No epoch check here: the writer ordered this batch against every revocation (its
            // admission check ran in the same transaction), so a batch that committed was admitted
            // before the revocation, and answering `revoked` now would hide an applied batch.
            shared.metrics.ack(&ack);
            convert::set_ack(results.get().init_ack(), &ack);
            Ok(())
        })
        .await
    }

    async fn snapshot(self: Rc<Self>, params: session::SnapshotParams, mut results: session::SnapshotResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("snapshot")?;
        call.observe(async move {
            self.require(READ, "snapshot")?;
            let params = params.get()?;
            let after = if params.has_start_after() {
                let key = params.get_start_after()?;
                let kind = key.get_kind().map_err(|_| ServerError::Invalid("unknown entity kind in startAfter".into()))?;
                let id = key.get_id()?.to_str().map_err(|_| ServerError::Invalid("startAfter id is not UTF-8".into()))?;
                Some((convert::kind_from(kind), id.to_owned()))
            } else {
                None
            };
            let limit = self.page_limit(params.get_limit());
            let mut page = self.access.unless_refused(self.conn.shared.store.snapshot_page(self.access.sid, after, limit)).await?;
            self.access.check()?;
            let keep = within_bytes(page.entities.iter().map(|e| e.data.len()), self.conn.shared.limits.max_page_bytes);
            if keep < page.entities.len() {
                page.entities.truncate(keep);
                page.more = true;
            }
            let mut out = results.get();
            out.set_cursor(page.cursor);
            out.set_more(page.more);
            let mut list = out.init_entities(page.entities.len() as u32);
            for (i, e) in page.entities.iter().enumerate() {
                convert::set_entity(list.reborrow().get(i as u32), e);
            }
            Ok(())
        })
        .await
    }

    async fn changes(self: Rc<Self>, params: session::ChangesParams, mut results: session::ChangesResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("changes")?;
        call.observe(async move {
            self.require(READ, "changes")?;
            let params = params.get()?;
            let limit = self.page_limit(params.get_limit());
            let (mut ops, cursor) = self.access.unless_refused(self.conn.shared.store.changes(self.access.sid, params.get_after(), limit)).await?;
            self.access.check()?;
            let keep = within_bytes(ops.iter().map(|o| op_bytes(&o.op.body)), self.conn.shared.limits.max_page_bytes);
            ops.truncate(keep);
            let mut out = results.get();
            out.set_cursor(cursor);
            let mut list = out.init_ops(ops.len() as u32);
            for (i, op) in ops.iter().enumerate() {
                convert::set_applied_op(list.reborrow().get(i as u32), op);
            }
            Ok(())
        })
        .await
    }

    async fn subscribe(self: Rc<Self>, params: session::SubscribeParams, mut results: session::SubscribeResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("subscribe")?;
        call.observe(async move {
            self.require(READ, "subscribe")?;
            let params = params.get()?;
            let listener = params.get_listener()?;
            let cap = self.conn.shared.limits.max_subscriptions_per_connection;
            if self.conn.subscriptions.get() >= cap {
                return Err(ServerError::Overloaded(format!("more than {cap} subscriptions on one connection")).into());
            }
            let subscription = crate::subscription::start(self.access.clone(), self.conn.clone(), listener, params.get_after());
            results.get().set_subscription(subscription);
            Ok(())
        })
        .await
    }

    async fn mint(self: Rc<Self>, params: session::MintParams, mut results: session::MintResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("mint")?;
        call.observe(async move {
            self.require(MINT, "mint")?;
            let params = params.get()?;
            let rights = convert::rights_from(params.get_rights()?);
            if !rights.is_subset_of(self.access.rights) {
                let reason = format!("cannot mint [{}] from a capability with [{}]", rights.names(), self.access.rights.names());
                self.conn.audit("denied", Some(&self.access), reason.clone());
                return Err(ServerError::Denied(reason).into());
            }
            if rights == Rights::default() {
                return Err(ServerError::Invalid("a share needs at least one right".into()).into());
            }
            let label = share_label(params.get_label())?;
            let expires_at = match self.child_expiry(params.get_ttl_seconds()) {
                Ok(at) => at,
                Err(err) => {
                    self.conn.audit("denied", Some(&self.access), err.to_string());
                    return Err(err.into());
                }
            };
            let (parent_share_id, parent) = match self.access.kind {
                TargetKind::Share => (Some(self.access.id.clone()), format!("share:{}", self.access.id)),
                _ => (None, format!("session:{}", self.access.session_id)),
            };
            let (token, share, row) = new_share(
                ShareParent {
                    sid: self.access.sid,
                    session_id: self.access.session_id.clone(),
                    parent_share_id,
                    parent_epoch: self.access.epoch(),
                    minted_by: parent,
                    space: self.access.space(),
                },
                rights,
                label.clone(),
                expires_at,
            );
            let share_id = share.id.clone();
            let mut event = self.conn.event("mint", Some(&self.access), format!("rights={} label={label}", rights.names()));
            event.target_kind = "share".into();
            event.target_id = share_id.clone();
            self.conn.shared.store.mint_share(share, row, self.access.guard(), event).await?;
            self.access.check()?;
            debug!(session = %self.access.session_id, share = %share_id, "minted");
            let mut out = results.get();
            out.set_token(token.expose());
            out.set_share_id(share_id.as_str());
            Ok(())
        })
        .await
    }

    async fn info(self: Rc<Self>, _: session::InfoParams, mut results: session::InfoResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("info")?;
        call.observe(async move {
            self.access.check()?;
            let read = self.conn.shared.store.session(self.access.session_id.clone());
            let session = self.access.unless_refused(read).await?.ok_or(ServerError::Revoked)?;
            self.access.check()?;
            let mut info = results.get().init_info();
            info.set_session_id(session.id.as_str());
            info.set_title(session.title.as_str());
            info.set_kind(self.access.kind.name());
            info.set_share_id(if self.access.kind == TargetKind::Share { self.access.id.as_str() } else { "" });
            convert::set_rights(info.reborrow().init_rights(), self.access.rights);
            info.set_cursor(session.cursor);
            info.set_expires_at(self.access.expires_at);
            Ok(())
        })
        .await
    }
}

/// Where a new share hangs: its session, its parent share (none when minted from the session
/// itself or by the admin) and that parent's epoch, who minted it, and the space it descends
/// from (inherited from the minting capability, so revoking the space cuts the share too).
pub(crate) struct ShareParent {
    pub sid: i64,
    pub session_id: String,
    pub parent_share_id: Option<String>,
    pub parent_epoch: u64,
    /// `session:<id>`, `share:<id>` or `admin`, recorded on the token.
    pub minted_by: String,
    pub space: Option<SpaceLink>,
}

/// A new share's token, row and token row (the store keeps only the token's hash).
pub(crate) fn new_share(parent: ShareParent, rights: Rights, label: String, expires_at: u64) -> (Token, ShareRow, TokenRow) {
    let now = now_ms();
    let share_id = uuid::Uuid::now_v7().to_string();
    let token = Token::generate();
    let row = TokenRow {
        hash: token.hash().0,
        target_kind: TargetKind::Share,
        target_id: share_id.clone(),
        minted_epoch: 0,
        rights,
        parent: parent.minted_by,
        label: label.clone(),
        created_at: now,
        expires_at,
        last_used_at: 0,
        space: parent.space.clone(),
    };
    let share = ShareRow {
        id: share_id,
        sid: parent.sid,
        session_id: parent.session_id,
        parent_share_id: parent.parent_share_id,
        parent_epoch: parent.parent_epoch,
        rights,
        label,
        epoch: 0,
        created_at: now,
        expires_at,
        last_used_at: 0,
        space: parent.space,
    };
    (token, share, row)
}

/// A share's label: UTF-8, at most 256 bytes.
pub(crate) fn share_label(text: capnp::Result<capnp::text::Reader<'_>>) -> Result<String> {
    let label = text?.to_str().map_err(|_| ServerError::Invalid("label is not UTF-8".into()))?;
    if label.len() > 256 {
        return Err(ServerError::Invalid("label is longer than 256 bytes".into()));
    }
    Ok(label.to_owned())
}

pub(crate) fn op_bytes(body: &capsync_persistence::OpBody) -> usize {
    match body {
        capsync_persistence::OpBody::Put(e) => e.data.len() + e.id.len(),
        capsync_persistence::OpBody::Delete { id, .. } => id.len(),
    }
}

/// How many leading items fit in `budget` bytes; always at least one, so a page progresses.
pub(crate) fn within_bytes(sizes: impl Iterator<Item = usize>, budget: usize) -> usize {
    let mut total = 0usize;
    let mut count = 0usize;
    for size in sizes {
        total += size;
        if count > 0 && total > budget {
            break;
        }
        count += 1;
    }
    count
}
