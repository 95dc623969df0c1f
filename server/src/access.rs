//! What a live capability may do, and the check every call makes before it runs.

use crate::error::{Result, ServerError};
use crate::registry::{Currency, EpochLink, ObjectKey, Ticket};
use std::sync::Arc;
use crate::store::{now_ms, Resolution};
use capsync_persistence::server::{SpaceLink, TargetKind};
use capsync_persistence::Rights;

/// A granted capability's identity, rights, expiry and epoch chain.
#[derive(Clone, Debug)]
pub struct Access {
    pub kind: TargetKind,
    /// Session id, share id, space id, or "admin".
    pub id: String,
    /// Empty for admin and space.
    pub session_id: String,
    /// The session's internal row id (0 for admin and space).
    pub sid: i64,
    pub rights: Rights,
    /// Unix ms; 0 = never.
    pub expires_at: u64,
    /// The target's own link first, then its parents' up to the session, then the space the
    /// token descends from, if any.
    pub chain: Vec<EpochLink>,
    /// Whether this node's epoch cells are current (see [`EpochRegistry::currency`]).
    pub currency: Arc<Currency>,
    /// Changes after every revocation, so a call waiting on the store learns of one at once
    /// (see [`Access::until_refused`]).
    pub revocations: tokio::sync::watch::Receiver<u64>,
}

impl Access {
    /// Judges a resolved token: builds its chain from the registry's cells and checks it.
    /// `ticket` is the one taken before the store read that gave `res`. A chain whose stored
    /// rows disagree with the token is reported as revoked; a missing row as an unknown token.
    pub fn from_resolution(res: &Resolution, ticket: &Ticket<'_>) -> Result<Access> {
        let token = &res.token;
        let space_link = |expected: u64| -> Result<EpochLink> {
            let space = res.space.as_ref().ok_or(ServerError::UnknownToken)?;
            if Some(space.id.as_str()) != token.space_to_resolve() {
                return Err(ServerError::UnknownToken);
            }
            Ok(ticket.link(ObjectKey::Space(space.id.clone()), space.epoch, expected))
        };
        let (id, session, rights, mut chain) = match token.target_kind {
            TargetKind::Admin => {
                let epoch = res.admin_epoch.ok_or(ServerError::UnknownToken)?;
                let link = ticket.link(ObjectKey::Admin, epoch, token.minted_epoch);
                ("admin".to_owned(), None, Rights::default(), vec![link])
            }
            TargetKind::Session => {
                let session = res.session.as_ref().ok_or(ServerError::UnknownToken)?;
                let link = ticket.link(ObjectKey::Session(session.id.clone()), session.epoch, token.minted_epoch);
                (session.id.clone(), Some(session), token.rights, vec![link])
            }
            TargetKind::Share => {
                let session = res.session.as_ref().ok_or(ServerError::UnknownToken)?;
                let target = res.shares.first().ok_or(ServerError::UnknownToken)?;
                let mut chain = Vec::with_capacity(res.shares.len() + 1);
                let mut expected = token.minted_epoch;
                for share in &res.shares {
                    chain.push(ticket.link(ObjectKey::Share(share.id.clone()), share.epoch, expected));
                    expected = share.parent_epoch;
                }
                chain.push(ticket.link(ObjectKey::Session(session.id.clone()), session.epoch, expected));
                (target.id.clone(), Some(session), target.rights, chain)
            }
            TargetKind::Space => {
                let link = space_link(token.minted_epoch)?;
                (token.target_id.clone(), None, Rights::default(), vec![link])
            }
        };
        // A session or share token minted through a space holds only while the space does.
        if let (Some(through), TargetKind::Session | TargetKind::Share) = (&token.space, token.target_kind) {
            chain.push(space_link(through.epoch)?);
        }
        ticket.confirm()?;
        let registry = ticket.registry();
        let access = Access {
            kind: token.target_kind,
            id,
            session_id: session.map(|s| s.id.clone()).unwrap_or_default(),
            sid: session.map(|s| s.sid).unwrap_or(0),
            rights,
            expires_at: token.expires_at,
            chain,
            currency: registry.currency(),
            revocations: registry.watch_revocations(),
        };
        access.check()?;
        Ok(access)
    }

    /// One comparison per link and a clock read: no database access. While this node may
    /// have missed another node's revocation, the call is refused as retryable.
    pub fn check(&self) -> Result<()> {
        if !self.currency.holds() {
            return Err(ServerError::Overloaded("this node is catching up with other nodes' revocations; retry".into()));
        }
        check(&self.chain, self.expires_at)
    }

    /// Resolves, with the error [`Access::check`] gives, once this capability no longer passes
    /// it: a link of its chain was revoked (on this node, or on another node and heard of
    /// here), or this node's cells stopped being current. Never resolves while it passes.
    /// Expiry alone does not wake it; the calls' own checks catch that.
    pub async fn until_refused(&self) -> ServerError {
        // Marked seen before the check: a bump after this point moves the watch, one before it
        // shows in the cells, so none falls between the check and the wait.
        let mut revocations = self.revocations.clone();
        revocations.borrow_and_update();
        let mut currency = self.currency.watch();
        loop {
            if let Err(err) = self.check() {
                return err;
            }
            tokio::select! {
                changed = revocations.changed() => {
                    if changed.is_err() {
                        // The registry is gone (the server is stopping): nothing more to hear.
                        return std::future::pending().await;
                    }
                }
                _ = currency.changed() => {}
            }
        }
    }

    /// Runs `work` (a store read) unless this capability is refused first: a call in flight
    /// fails the moment a revocation lands instead of after its query. The read itself is
    /// dropped, not undone; only reads go through here, never a write whose commit the
    /// client must learn of.
    pub async fn unless_refused<T>(&self, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        tokio::select! {
            biased;
            err = self.until_refused() => Err(err),
            done = work => done,
        }
    }

    pub fn require(&self, needed: Rights, what: &str) -> Result<()> {
        self.check()?;
        if needed.is_subset_of(self.rights) {
            Ok(())
        } else {
            Err(ServerError::Denied(format!("{what} needs the {} right; this capability has [{}]", needed.names(), self.rights.names())))
        }
    }

    /// What a write made through this capability must still match when it applies: the
    /// store checks it in the write's transaction (see [`Guard`]).
    pub fn guard(&self) -> Guard {
        Guard { chain: self.chain.clone(), expires_at: self.expires_at }
    }

    /// The epoch of the target object this capability was granted under.
    pub fn epoch(&self) -> u64 {
        self.chain.first().map(|l| l.expected).unwrap_or(0)
    }

    /// The space this capability descends from (or is), with the epoch it needs: what a token
    /// minted through it records, so that revoking the space cuts that token too.
    pub fn space(&self) -> Option<SpaceLink> {
        self.chain.iter().find_map(|link| match &link.key {
            ObjectKey::Space(id) => Some(SpaceLink { space_id: id.clone(), epoch: link.expected }),
            _ => None,
        })
    }
}

fn check(chain: &[EpochLink], expires_at: u64) -> Result<()> {
    if !chain.iter().all(EpochLink::holds) {
        return Err(ServerError::Revoked);
    }
    if expires_at != 0 && now_ms() >= expires_at {
        return Err(ServerError::Expired);
    }
    Ok(())
}

/// A capability's epoch chain and expiry, handed to the store with a write. The SQLite store
/// checks the in-memory cells on its single writer thread, where revocations are write
/// barriers; the PostgreSQL store compares the same links with the stored epochs inside the
/// write's transaction, under row locks, so no write commits after a revocation on any node.
#[derive(Clone, Debug)]
pub struct Guard {
    pub chain: Vec<EpochLink>,
    pub expires_at: u64,
}

impl Guard {
    /// Checks the in-memory cells and the expiry (no database access).
    pub fn check(&self) -> Result<()> {
        check(&self.chain, self.expires_at)
    }
}
