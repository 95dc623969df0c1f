//! The server's stored objects as plain data: sessions, shares, spaces, tokens (by hash), audit
//! rows.
//! Both server stores (SQLite in `capsync-persistence`, PostgreSQL in `capsync-store-postgres`)
//! read and write these, and the server works with them whichever store runs.

use crate::{Entity, Rights};

/// What a token refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    Admin,
    Session,
    Share,
    Space,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Admin => "admin",
            TargetKind::Session => "session",
            TargetKind::Share => "share",
            TargetKind::Space => "space",
        }
    }

    pub fn parse(text: &str) -> Option<TargetKind> {
        [TargetKind::Admin, TargetKind::Session, TargetKind::Share, TargetKind::Space].into_iter().find(|k| k.name() == text)
    }
}

/// The space a token or share descends from: its id and the space's epoch when it was minted.
/// The grant holds only while the space is still at that epoch (`revokeSpace` bumps it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpaceLink {
    pub space_id: String,
    pub epoch: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRow {
    /// Internal row id; never leaves the server.
    pub sid: i64,
    pub id: String,
    pub title: String,
    pub epoch: u64,
    pub cursor: u64,
    pub created_at: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareRow {
    pub id: String,
    pub sid: i64,
    pub session_id: String,
    pub parent_share_id: Option<String>,
    /// The parent's (share's or session's) epoch when this share was minted.
    pub parent_epoch: u64,
    pub rights: Rights,
    pub label: String,
    pub epoch: u64,
    pub created_at: u64,
    /// Unix ms; 0 = never.
    pub expires_at: u64,
    /// Latest redeem of the share's token; 0 = never (filled by reads only).
    pub last_used_at: u64,
    /// The space this share descends from, when it was minted (directly or below another share)
    /// from a session token that was minted through a space.
    pub space: Option<SpaceLink>,
}

/// A token as stored: the hash, never the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRow {
    pub hash: [u8; 32],
    pub target_kind: TargetKind,
    pub target_id: String,
    pub minted_epoch: u64,
    pub rights: Rights,
    pub parent: String,
    pub label: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub last_used_at: u64,
    /// The space this token descends from: set on an owner token minted by `openSession` and on
    /// the token of every share minted below one; `None` otherwise (and on a space's own token,
    /// whose target is the space).
    pub space: Option<SpaceLink>,
}

/// A space: lets its token holder open sessions (`openSession`) without the admin URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpaceRow {
    /// UUID text.
    pub id: String,
    pub label: String,
    /// Bumped by each revocation; the space's token is minted at 0.
    pub epoch: u64,
    pub created_at: u64,
}

/// A session opened through a space, with the key it was opened under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpaceSessionRow {
    pub key: String,
    pub session: SessionRow,
}

/// What `openSession` asks of a store, in one write transaction: the session of (`space_id`,
/// `key`), created if the key is new, and a new owner token for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenSession {
    pub space_id: String,
    pub key: String,
    /// The title of a new session (ignored when the key exists).
    pub title: String,
    /// The id a new session gets (ignored when the key exists).
    pub new_session_id: String,
    /// The owner token to store. The store sets its `target_id` and `minted_epoch` to the
    /// session's id and current epoch; its `created_at` is the time of the call.
    pub owner: TokenRow,
}

/// What `openSession` found or created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenedSession {
    pub session_id: String,
    /// Internal row id; never leaves the server.
    pub sid: i64,
    /// The session's epoch, which the new owner token was minted at.
    pub epoch: u64,
    /// Whether the key was new and the session was created now.
    pub created: bool,
}

impl OpenedSession {
    /// The audit row of an `openSession`: `template` (action, peer, the space...) about this
    /// session, noting whether it was created. Both stores write this row.
    pub fn audit_event(&self, template: &AuditEvent) -> AuditEvent {
        let mut event = template.clone();
        event.target_kind = TargetKind::Session.name().to_owned();
        event.target_id = self.session_id.clone();
        event.session_id = self.session_id.clone();
        event.detail = format!("{} {}", template.detail, if self.created { "created" } else { "existing" });
        event
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditEvent {
    pub action: String,
    pub target_kind: String,
    pub target_id: String,
    pub session_id: String,
    pub peer: String,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRow {
    pub id: u64,
    pub at: u64,
    pub event: AuditEvent,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub sessions: u64,
    pub shares: u64,
    pub ops: u64,
}

/// One page of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotPage {
    pub cursor: u64,
    pub entities: Vec<Entity>,
    pub more: bool,
}

/// A token with everything needed to judge it: the share chain from the target up (empty for
/// session, admin and space tokens), the session, the admin epoch, and the space (a space
/// token's target, or the space the token descends from; see [`TokenRow::space`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub token: TokenRow,
    pub shares: Vec<ShareRow>,
    pub session: Option<SessionRow>,
    pub admin_epoch: Option<u64>,
    pub space: Option<SpaceRow>,
}

impl TokenRow {
    /// The space whose row judging this token needs: a space token's target, or the space the
    /// token descends from.
    pub fn space_to_resolve(&self) -> Option<&str> {
        match self.target_kind {
            TargetKind::Space => Some(&self.target_id),
            _ => self.space.as_ref().map(|s| s.space_id.as_str()),
        }
    }
}
