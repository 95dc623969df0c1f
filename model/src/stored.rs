//! The server's stored objects as plain data: sessions, shares, tokens (by hash), audit rows.
//! Both server stores (SQLite in `capsync-persistence`, PostgreSQL in `capsync-store-postgres`)
//! read and write these, and the server works with them whichever store runs.

use crate::{Entity, Rights};

/// What a token refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    Admin,
    Session,
    Share,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Admin => "admin",
            TargetKind::Session => "session",
            TargetKind::Share => "share",
        }
    }

    pub fn parse(text: &str) -> Option<TargetKind> {
        [TargetKind::Admin, TargetKind::Session, TargetKind::Share].into_iter().find(|k| k.name() == text)
    }
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
/// session and admin tokens), the session, and the admin epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub token: TokenRow,
    pub shares: Vec<ShareRow>,
    pub session: Option<SessionRow>,
    pub admin_epoch: Option<u64>,
}
