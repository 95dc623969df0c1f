//! `Space`: a capability for ingestion. Its holder opens sessions by key and gets their owner
//! tokens without the admin URI, lists the sessions it opened, and can do nothing else.
//!
//! `openSession` is idempotent by key: the store looks the key up and creates the session in
//! one write transaction, and the database's primary key on (space, key) refuses a second
//! session for it (see `Store::open_space_session`). Every owner token it returns records the
//! space and its epoch, so `Admin.revokeSpace` cuts the space's token, those owner tokens and
//! every share minted below them, with their live capabilities (see [`Access::from_resolution`]).

use crate::access::Access;
use crate::connection::{Connection, LiveGuard};
use crate::convert;
use crate::error::{Result, ServerError};
use crate::store::now_ms;
use capsync_persistence::server::{OpenSession, TargetKind, TokenRow};
use capsync_persistence::Rights;
use capsync_schema::capsync_capnp::space;
use capsync_schema::Token;
use std::rc::Rc;
use tracing::{debug, instrument};

/// Keys are chosen by the space's holder (an agent's own session id, say).
pub const MAX_KEY_BYTES: usize = 256;
/// Longest title a session opened through a space may get.
pub const MAX_TITLE_BYTES: usize = 4096;

pub struct SpaceImpl {
    access: Access,
    conn: Rc<Connection>,
    _live: LiveGuard,
}

impl SpaceImpl {
    pub fn new(access: Access, conn: Rc<Connection>) -> SpaceImpl {
        SpaceImpl { access, _live: conn.hold_capability(), conn }
    }
}

/// A text parameter as given (not trimmed: a key is matched exactly), UTF-8, without U+0000
/// (which PostgreSQL text cannot hold, so both stores refuse it alike), at most `max` bytes.
fn exact_text(text: capnp::Result<capnp::text::Reader<'_>>, what: &str, max: usize) -> Result<String> {
    let text = text?.to_str().map_err(|_| ServerError::Invalid(format!("{what} is not UTF-8")))?;
    if text.len() > max {
        return Err(ServerError::Invalid(format!("{what} is longer than {max} bytes")));
    }
    if text.contains('\0') {
        return Err(ServerError::Invalid(format!("{what} contains U+0000")));
    }
    Ok(text.to_owned())
}

impl space::Server for SpaceImpl {
    #[instrument(skip_all, fields(peer = %self.conn.peer))]
    async fn open_session(self: Rc<Self>, params: space::OpenSessionParams, mut results: space::OpenSessionResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("openSession")?;
        call.observe(async move {
            self.access.check()?;
            let params = params.get()?;
            let key = exact_text(params.get_key(), "key", MAX_KEY_BYTES)?;
            if key.is_empty() {
                return Err(ServerError::Invalid("key must not be empty".into()).into());
            }
            let title = exact_text(params.get_title(), "title", MAX_TITLE_BYTES)?;
            let token = Token::generate();
            let owner = TokenRow {
                hash: token.hash().0,
                target_kind: TargetKind::Session,
                // Set by the store to the session's id and epoch.
                target_id: String::new(),
                minted_epoch: 0,
                rights: Rights::ALL,
                parent: format!("space:{}", self.access.id),
                label: "owner".into(),
                created_at: now_ms(),
                expires_at: 0,
                last_used_at: 0,
                space: self.access.space(),
            };
            let open = OpenSession {
                space_id: self.access.id.clone(),
                key: key.clone(),
                title,
                new_session_id: uuid::Uuid::now_v7().to_string(),
                owner,
            };
            let event = self.conn.event("open-session", Some(&self.access), format!("space={} key={key}", self.access.id));
            let opened = self.conn.shared.store.open_space_session(open, self.access.guard(), event).await?;
            // A revocation that landed while the call was in flight fails it rather than hand
            // out a token that is already dead.
            self.access.check()?;
            debug!(space = %self.access.id, session = %opened.session_id, created = opened.created, "session opened through a space");
            let mut out = results.get();
            out.set_session_id(opened.session_id.as_str());
            out.set_token(token.expose());
            out.set_created(opened.created);
            Ok(())
        })
        .await
    }

    async fn list_sessions(self: Rc<Self>, _: space::ListSessionsParams, mut results: space::ListSessionsResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("listSessions")?;
        call.observe(async move {
            self.access.check()?;
            let rows = self.access.unless_refused(self.conn.shared.store.space_sessions(self.access.id.clone())).await?;
            self.access.check()?;
            let mut list = results.get().init_sessions(rows.len() as u32);
            for (i, row) in rows.iter().enumerate() {
                let mut s = list.reborrow().get(i as u32);
                s.set_key(row.key.as_str());
                s.set_session_id(row.session.id.as_str());
                s.set_title(row.session.title.as_str());
                s.set_cursor(row.session.cursor);
                s.set_created_at(row.session.created_at);
            }
            Ok(())
        })
        .await
    }

    async fn info(self: Rc<Self>, _: space::InfoParams, mut results: space::InfoResults) -> Result<(), capnp::Error> {
        let call = self.conn.begin_call("info")?;
        call.observe(async move {
            self.access.check()?;
            let spaces = self.access.unless_refused(self.conn.shared.store.list_spaces()).await?;
            self.access.check()?;
            let (space, sessions) = spaces.iter().find(|(s, _)| s.id == self.access.id).ok_or(ServerError::Revoked)?;
            convert::set_space_summary(results.get().init_info(), space, *sessions);
            Ok(())
        })
        .await
    }
}
