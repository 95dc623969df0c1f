//! The same scenario against the SQLite server store and against `PgStore`: every answer is
//! written to a transcript (with what legitimately differs normalised away: internal row ids,
//! clock readings), and the two transcripts must be equal line for line.
//!
//! The SQLite side drives capsync-persistence's API as the server's `SqliteStore` does: writes
//! as `Txn` methods in one transaction each, reads through a `ServerReader`, and the admission
//! check (the capability's epoch chain, which the server keeps in memory cells) emulated by
//! reading the chain's epochs in the write transaction.

use crate::support;
use capsync_model::{BatchAck, Entity, EntityKind, IncomingBatch, IncomingOp, OpBody, Rights};
use capsync_persistence::server::AppendError;
use capsync_persistence::server::{self as lite, ServerReader};
use capsync_persistence::writer::Txn;
use capsync_persistence::StorageError;
use capsync_store_postgres::{
    AuditEvent, AuditRow, GuardLink, GuardTarget, OpenSession, OpenedSession, PgError, PgStore, Resolution,
    SessionRow, ShareRow, SnapshotPage, SpaceLink, SpaceRow, SpaceSessionRow, StoreStats, TargetKind, TokenRow,
};
use std::sync::Mutex;

/// An error as the transcript shows it: the kinds the two stores share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum E {
    Gap { got: u64, expected: u64 },
    Diverged { batch_seq: u64 },
    ZeroBatchSeq,
    Revoked,
    Other,
}

impl From<StorageError> for E {
    fn from(err: StorageError) -> E {
        eprintln!("sqlite error: {err}");
        E::Other
    }
}

impl From<AppendError> for E {
    fn from(err: AppendError) -> E {
        match err {
            AppendError::Gap { got, expected } => E::Gap { got, expected },
            AppendError::Diverged { batch_seq } => E::Diverged { batch_seq },
            AppendError::ZeroBatchSeq => E::ZeroBatchSeq,
            AppendError::Storage(err) => err.into(),
        }
    }
}

impl From<PgError> for E {
    fn from(err: PgError) -> E {
        match err {
            PgError::Gap { got, expected } => E::Gap { got, expected },
            PgError::Diverged { batch_seq } => E::Diverged { batch_seq },
            PgError::ZeroBatchSeq => E::ZeroBatchSeq,
            PgError::Revoked => E::Revoked,
            other => {
                eprintln!("postgres error: {other}");
                E::Other
            }
        }
    }
}

// ---- The SQLite side, converted to and from the PostgreSQL crate's row types ----------

pub struct Lite {
    _dir: tempfile::TempDir,
    conn: Mutex<rusqlite::Connection>,
    reader: ServerReader,
}

fn lite_kind(kind: TargetKind) -> lite::TargetKind {
    match kind {
        TargetKind::Admin => lite::TargetKind::Admin,
        TargetKind::Session => lite::TargetKind::Session,
        TargetKind::Share => lite::TargetKind::Share,
        TargetKind::Space => lite::TargetKind::Space,
    }
}

fn pg_kind(kind: lite::TargetKind) -> TargetKind {
    match kind {
        lite::TargetKind::Admin => TargetKind::Admin,
        lite::TargetKind::Session => TargetKind::Session,
        lite::TargetKind::Share => TargetKind::Share,
        lite::TargetKind::Space => TargetKind::Space,
    }
}

fn to_lite_token(t: &TokenRow) -> lite::TokenRow {
    lite::TokenRow {
        hash: t.hash,
        target_kind: lite_kind(t.target_kind),
        target_id: t.target_id.clone(),
        minted_epoch: t.minted_epoch,
        rights: t.rights,
        parent: t.parent.clone(),
        label: t.label.clone(),
        created_at: t.created_at,
        expires_at: t.expires_at,
        last_used_at: t.last_used_at,
        space: t.space.clone(),
    }
}

fn from_lite_token(t: lite::TokenRow) -> TokenRow {
    TokenRow {
        hash: t.hash,
        target_kind: pg_kind(t.target_kind),
        target_id: t.target_id,
        minted_epoch: t.minted_epoch,
        rights: t.rights,
        parent: t.parent,
        label: t.label,
        created_at: t.created_at,
        expires_at: t.expires_at,
        last_used_at: t.last_used_at,
        space: t.space,
    }
}

fn to_lite_share(s: &ShareRow) -> lite::ShareRow {
    lite::ShareRow {
        id: s.id.clone(),
        sid: s.sid,
        session_id: s.session_id.clone(),
        parent_share_id: s.parent_share_id.clone(),
        parent_epoch: s.parent_epoch,
        rights: s.rights,
        label: s.label.clone(),
        epoch: s.epoch,
        created_at: s.created_at,
        expires_at: s.expires_at,
        last_used_at: s.last_used_at,
        space: s.space.clone(),
    }
}

fn from_lite_share(s: lite::ShareRow) -> ShareRow {
    ShareRow {
        id: s.id,
        sid: s.sid,
        session_id: s.session_id,
        parent_share_id: s.parent_share_id,
        parent_epoch: s.parent_epoch,
        rights: s.rights,
        label: s.label,
        epoch: s.epoch,
        created_at: s.created_at,
        expires_at: s.expires_at,
        last_used_at: s.last_used_at,
        space: s.space,
    }
}

fn from_lite_session(s: lite::SessionRow) -> SessionRow {
    SessionRow { sid: s.sid, id: s.id, title: s.title, epoch: s.epoch, cursor: s.cursor, created_at: s.created_at }
}

fn to_lite_event(e: &AuditEvent) -> lite::AuditEvent {
    lite::AuditEvent {
        action: e.action.clone(),
        target_kind: e.target_kind.clone(),
        target_id: e.target_id.clone(),
        session_id: e.session_id.clone(),
        peer: e.peer.clone(),
        detail: e.detail.clone(),
    }
}

fn from_lite_audit(r: lite::AuditRow) -> AuditRow {
    AuditRow {
        id: r.id,
        at: r.at,
        event: AuditEvent {
            action: r.event.action,
            target_kind: r.event.target_kind,
            target_id: r.event.target_id,
            session_id: r.event.session_id,
            peer: r.event.peer,
            detail: r.event.detail,
        },
    }
}

impl Lite {
    pub fn open() -> Lite {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("capsync.db");
        let conn = lite::open(&path).unwrap();
        let reader = ServerReader::open(&path).unwrap();
        Lite { _dir: dir, conn: Mutex::new(conn), reader }
    }

    fn write<T>(&self, work: impl FnOnce(&Txn<'_>) -> Result<T, E>) -> Result<T, E> {
        Txn::run(&mut self.conn.lock().unwrap(), work)
    }

    /// The server's admission check, against the stored epochs, inside the transaction.
    fn admit(&self, txn: &Txn<'_>, guard: &[GuardLink]) -> Result<(), E> {
        for link in guard {
            let current = match &link.target {
                GuardTarget::Session(id) => txn.session(id)?.map(|s| s.epoch),
                GuardTarget::Share(id) => self.reader.share(id)?.map(|s| s.epoch),
                GuardTarget::Admin => txn.admin_epoch()?,
                GuardTarget::Space(id) => txn.space(id)?.map(|s| s.epoch),
            };
            if current != Some(link.expected) {
                return Err(E::Revoked);
            }
        }
        Ok(())
    }
}

/// Either store, behind one set of async methods shaped like `PgStore`'s.
pub enum Store {
    Lite(Box<Lite>),
    Pg(PgStore),
}

impl Store {
    pub async fn append(
        &self,
        sid: i64,
        session_id: &str,
        batch: &IncomingBatch,
        guard: &[GuardLink],
    ) -> Result<BatchAck, E> {
        match self {
            Store::Lite(l) => l.write(|txn| {
                l.admit(txn, guard)?;
                Ok(txn.append(sid, session_id, batch)?)
            }),
            Store::Pg(p) => {
                let appended = p.append(sid, session_id, batch, guard).await?;
                // The applied ops are exactly the ack's applied results, with the same seqs.
                let applied: Vec<u64> = appended.applied.iter().map(|o| o.seq).collect();
                let acked: Vec<u64> = appended
                    .ack
                    .results
                    .iter()
                    .filter(|r| r.status == capsync_model::OpStatus::Applied)
                    .map(|r| r.seq)
                    .collect();
                assert_eq!(applied, acked);
                Ok(appended.ack)
            }
        }
    }

    pub async fn create_session(&self, id: &str, title: &str, owner: &TokenRow, event: &AuditEvent) -> Result<i64, E> {
        match self {
            Store::Lite(l) => l.write(|txn| {
                let sid = txn.create_session(id, title, owner.created_at)?;
                txn.insert_token(&to_lite_token(owner))?;
                txn.audit(&to_lite_event(event), owner.created_at)?;
                Ok(sid)
            }),
            Store::Pg(p) => Ok(p.create_session(id, title, owner, &[], event).await?),
        }
    }

    pub async fn mint_share(
        &self,
        share: &ShareRow,
        token: &TokenRow,
        guard: &[GuardLink],
        event: &AuditEvent,
    ) -> Result<(), E> {
        match self {
            Store::Lite(l) => l.write(|txn| {
                l.admit(txn, guard)?;
                txn.insert_share(&to_lite_share(share))?;
                txn.insert_token(&to_lite_token(token))?;
                txn.audit(&to_lite_event(event), share.created_at)?;
                Ok(())
            }),
            Store::Pg(p) => Ok(p.mint_share(share, token, guard, event).await?),
        }
    }

    pub async fn revoke_share(&self, id: &str, event: &AuditEvent) -> Result<Option<u64>, E> {
        match self {
            Store::Lite(l) => l.write(|txn| {
                let epoch = txn.bump_share_epoch(id)?;
                if epoch.is_some() {
                    txn.audit(&to_lite_event(event), 1)?;
                }
                Ok(epoch)
            }),
            Store::Pg(p) => Ok(p.revoke_share(id, event).await?),
        }
    }

    pub async fn revoke_session(&self, id: &str, event: &AuditEvent) -> Result<Option<u64>, E> {
        match self {
            Store::Lite(l) => l.write(|txn| {
                let epoch = txn.bump_session_epoch(id)?;
                if epoch.is_some() {
                    txn.audit(&to_lite_event(event), 1)?;
                }
                Ok(epoch)
            }),
            Store::Pg(p) => Ok(p.revoke_session(id, event).await?),
        }
    }

    pub async fn create_space(
        &self,
        space: &SpaceRow,
        token: &TokenRow,
        guard: &[GuardLink],
        event: &AuditEvent,
    ) -> Result<(), E> {
        match self {
            // What SqliteStore::create_space does.
            Store::Lite(l) => l.write(|txn| {
                l.admit(txn, guard)?;
                txn.insert_space(space)?;
                txn.insert_token(token)?;
                txn.audit(event, space.created_at)?;
                Ok(())
            }),
            Store::Pg(p) => Ok(p.create_space(space, token, guard, event).await?),
        }
    }

    pub async fn open_space_session(
        &self,
        open: &OpenSession,
        guard: &[GuardLink],
        event: &AuditEvent,
    ) -> Result<OpenedSession, E> {
        match self {
            // What SqliteStore::open_space_session does.
            Store::Lite(l) => l.write(|txn| {
                l.admit(txn, guard)?;
                let opened = txn.open_space_session(open)?;
                txn.audit(&opened.audit_event(event), open.owner.created_at)?;
                Ok(opened)
            }),
            Store::Pg(p) => Ok(p.open_space_session(open, guard, event).await?),
        }
    }

    pub async fn revoke_space(&self, id: &str, event: &AuditEvent) -> Result<Option<u64>, E> {
        match self {
            Store::Lite(l) => l.write(|txn| {
                let epoch = txn.bump_space_epoch(id)?;
                if epoch.is_some() {
                    txn.audit(event, 1)?;
                }
                Ok(epoch)
            }),
            Store::Pg(p) => Ok(p.revoke_space(id, event).await?),
        }
    }

    pub async fn list_spaces(&self) -> Result<Vec<(SpaceRow, u32)>, E> {
        match self {
            Store::Lite(l) => Ok(l.reader.list_spaces()?),
            Store::Pg(p) => Ok(p.list_spaces().await?),
        }
    }

    pub async fn space_sessions(&self, space_id: &str) -> Result<Vec<SpaceSessionRow>, E> {
        match self {
            Store::Lite(l) => Ok(l.reader.space_sessions(space_id)?),
            Store::Pg(p) => Ok(p.space_sessions(space_id).await?),
        }
    }

    pub async fn renew_admin(&self, token: &TokenRow) -> Result<u64, E> {
        match self {
            Store::Lite(l) => l.write(|txn| {
                let epoch = txn.renew_admin()?;
                txn.insert_token(&lite::TokenRow { minted_epoch: epoch, ..to_lite_token(token) })?;
                Ok(epoch)
            }),
            Store::Pg(p) => Ok(p.renew_admin(token).await?),
        }
    }

    pub async fn record_redeem(&self, hash: &[u8; 32], event: &AuditEvent) -> Result<(), E> {
        match self {
            Store::Lite(l) => l.write(|txn| {
                txn.touch_token(hash, 1)?;
                txn.audit(&to_lite_event(event), 1)?;
                Ok(())
            }),
            Store::Pg(p) => Ok(p.record_redeem(hash, event).await?),
        }
    }

    pub async fn audit(&self, event: &AuditEvent) -> Result<(), E> {
        match self {
            Store::Lite(l) => l.write(|txn| Ok(txn.audit(&to_lite_event(event), 1)?)),
            Store::Pg(p) => Ok(p.audit(event).await?),
        }
    }

    pub async fn resolve_token(&self, hash: &[u8; 32]) -> Result<Option<Resolution>, E> {
        match self {
            // What SqliteStore::resolve_token does.
            Store::Lite(l) => {
                let r = &l.reader;
                let Some(token) = r.token(hash)? else { return Ok(None) };
                let mut shares = Vec::new();
                let mut session = None;
                match token.target_kind {
                    lite::TargetKind::Share => {
                        let mut next = Some(token.target_id.clone());
                        while let Some(id) = next.take() {
                            let Some(share) = r.share(&id)? else { return Ok(None) };
                            next = share.parent_share_id.clone();
                            shares.push(from_lite_share(share));
                        }
                        if let Some(last) = shares.last() {
                            session = r.session(&last.session_id)?.map(from_lite_session);
                        }
                    }
                    lite::TargetKind::Session => session = r.session(&token.target_id)?.map(from_lite_session),
                    lite::TargetKind::Admin | lite::TargetKind::Space => {}
                }
                let space = match token.space_to_resolve() {
                    Some(id) => r.space(id)?,
                    None => None,
                };
                Ok(Some(Resolution {
                    token: from_lite_token(token),
                    shares,
                    session,
                    admin_epoch: r.admin_epoch()?,
                    space,
                }))
            }
            Store::Pg(p) => Ok(p.resolve_token(hash).await?),
        }
    }

    pub async fn session(&self, id: &str) -> Result<Option<SessionRow>, E> {
        match self {
            Store::Lite(l) => Ok(l.reader.session(id)?.map(from_lite_session)),
            Store::Pg(p) => Ok(p.session(id).await?),
        }
    }

    pub async fn last_batch_seq(&self, sid: i64, client: &[u8; 16]) -> Result<u64, E> {
        match self {
            Store::Lite(l) => Ok(l.reader.last_batch_seq(sid, client)?),
            Store::Pg(p) => Ok(p.last_batch_seq(sid, client).await?),
        }
    }

    pub async fn snapshot_page(
        &self,
        sid: i64,
        after: Option<(EntityKind, &str)>,
        limit: u32,
    ) -> Result<SnapshotPage, E> {
        match self {
            Store::Lite(l) => {
                let page = l.reader.snapshot_page(sid, after, limit)?;
                Ok(SnapshotPage { cursor: page.cursor, entities: page.entities, more: page.more })
            }
            Store::Pg(p) => Ok(p.snapshot_page(sid, after, limit).await?),
        }
    }

    pub async fn changes(&self, sid: i64, after: u64, limit: u32) -> Result<(Vec<capsync_model::LoggedOp>, u64), E> {
        match self {
            Store::Lite(l) => Ok(l.reader.changes(sid, after, limit)?),
            Store::Pg(p) => Ok(p.changes(sid, after, limit).await?),
        }
    }

    pub async fn list_sessions(&self) -> Result<Vec<(SessionRow, u32)>, E> {
        match self {
            Store::Lite(l) => {
                Ok(l.reader.list_sessions()?.into_iter().map(|(s, n)| (from_lite_session(s), n)).collect())
            }
            Store::Pg(p) => Ok(p.list_sessions().await?),
        }
    }

    pub async fn list_shares(&self, session_id: Option<&str>) -> Result<Vec<ShareRow>, E> {
        match self {
            Store::Lite(l) => Ok(l.reader.list_shares(session_id)?.into_iter().map(from_lite_share).collect()),
            Store::Pg(p) => Ok(p.list_shares(session_id).await?),
        }
    }

    pub async fn audit_page(&self, since: u64, limit: u32) -> Result<Vec<AuditRow>, E> {
        match self {
            Store::Lite(l) => Ok(l.reader.audit(since, limit)?.into_iter().map(from_lite_audit).collect()),
            Store::Pg(p) => Ok(p.audit_page(since, limit).await?),
        }
    }

    pub async fn stats(&self) -> Result<StoreStats, E> {
        match self {
            Store::Lite(l) => {
                let s = l.reader.stats()?;
                Ok(StoreStats { sessions: s.sessions, shares: s.shares, ops: s.ops })
            }
            Store::Pg(p) => Ok(p.stats().await?),
        }
    }
}

// ---- Building blocks ---------------------------------------------------------------------

pub fn op_id(n: u16) -> Vec<u8> {
    let mut id = vec![0x01, 0x90, 0, 0, 0, 0, 0x70, 0, 0x80, 0, 0, 0, 0, 0, 0, 0];
    id[14..].copy_from_slice(&n.to_be_bytes());
    id
}

pub fn put(n: u16, kind: EntityKind, id: &str, parent: &str, data: &str) -> IncomingOp {
    IncomingOp {
        op_id: op_id(n),
        body: Ok(OpBody::Put(Entity { kind, id: id.into(), parent_id: parent.into(), data: data.as_bytes().to_vec() })),
    }
}

pub fn del(n: u16, kind: EntityKind, id: &str) -> IncomingOp {
    IncomingOp { op_id: op_id(n), body: Ok(OpBody::Delete { kind, id: id.into() }) }
}

pub fn bad(n: u16, reason: &str) -> IncomingOp {
    IncomingOp { op_id: op_id(n), body: Err(reason.into()) }
}

pub fn batch(client: u8, batch_seq: u64, ops: Vec<IncomingOp>) -> IncomingBatch {
    IncomingBatch { client_id: [client; 16], batch_seq, ops }
}

pub fn token(kind: TargetKind, target: &str, epoch: u64, hash: u8, rights: Rights, created_at: u64) -> TokenRow {
    TokenRow {
        hash: [hash; 32],
        target_kind: kind,
        target_id: target.into(),
        minted_epoch: epoch,
        rights,
        parent: "admin".into(),
        label: format!("token {hash}"),
        created_at,
        expires_at: 0,
        last_used_at: 0,
        space: None,
    }
}

pub fn event(action: &str, target: &str) -> AuditEvent {
    AuditEvent {
        action: action.into(),
        target_kind: "share".into(),
        target_id: target.into(),
        session_id: String::new(),
        peer: "127.0.0.1:9".into(),
        detail: format!("{action} {target}"),
    }
}

fn share(
    id: &str,
    sid: i64,
    session_id: &str,
    parent: Option<&str>,
    parent_epoch: u64,
    rights: Rights,
    created_at: u64,
) -> ShareRow {
    ShareRow {
        id: id.into(),
        sid,
        session_id: session_id.into(),
        parent_share_id: parent.map(Into::into),
        parent_epoch,
        rights,
        label: format!("share {id}"),
        epoch: 0,
        created_at,
        expires_at: 0,
        last_used_at: 0,
        space: None,
    }
}

// Normalising what may differ between the stores: internal row ids and clock readings.

fn n_session(s: &SessionRow) -> SessionRow {
    SessionRow { sid: 0, ..s.clone() }
}

fn n_share(s: &ShareRow) -> ShareRow {
    ShareRow { sid: 0, last_used_at: (s.last_used_at != 0) as u64, ..s.clone() }
}

fn n_resolution(r: &Option<Resolution>) -> Option<Resolution> {
    r.as_ref().map(|r| Resolution {
        token: TokenRow { last_used_at: (r.token.last_used_at != 0) as u64, ..r.token.clone() },
        shares: r.shares.iter().map(n_share).collect(),
        session: r.session.as_ref().map(n_session),
        admin_epoch: r.admin_epoch,
        space: r.space.clone(),
    })
}

const S1: &str = "0190a000-0000-7000-8000-000000000001";
const S2: &str = "0190a000-0000-7000-8000-000000000002";
const R: Rights = Rights { read: true, append: false, mint: false };
const RA: Rights = Rights { read: true, append: true, mint: false };

/// The scenario. Returns the transcript; panics only on answers that are wrong whatever the
/// backend (checked with `assert!` here so a failure names the step).
#[allow(unused_must_use)]
pub async fn scenario(store: &Store) -> Vec<String> {
    let mut t: Vec<String> = Vec::new();
    macro_rules! log {
        ($label:expr, $value:expr) => {{
            let value = $value;
            t.push(format!("{}: {:?}", $label, value));
            value
        }};
    }

    // Admin and sessions.
    let admin_token = token(TargetKind::Admin, "admin", 0, 0xA0, Rights::default(), 100);
    log!("renew admin", store.renew_admin(&admin_token).await);
    let admin_token2 = token(TargetKind::Admin, "admin", 0, 0xA1, Rights::default(), 101);
    log!("renew admin again", store.renew_admin(&admin_token2).await);
    let owner1 = token(TargetKind::Session, S1, 0, 0x01, Rights::ALL, 1000);
    let sid1 = store.create_session(S1, "first", &owner1, &event("create-session", S1)).await.unwrap();
    let owner2 = token(TargetKind::Session, S2, 0, 0x02, Rights::ALL, 2000);
    let sid2 = store.create_session(S2, "second", &owner2, &event("create-session", S2)).await.unwrap();
    log!("session 1", store.session(S1).await.map(|s| s.as_ref().map(n_session)));
    log!("no such session", store.session("nope").await);
    let g1 = vec![GuardLink::session(S1, 0)];

    // Batch 1 of client 7: every status but conflict.
    let b1 = batch(
        7,
        1,
        vec![
            put(1, EntityKind::Session, S1, "", r#"{"title":"first"}"#),
            put(2, EntityKind::Message, "m1", "", r#"{"role":"user"}"#),
            put(3, EntityKind::Part, "p1", "m1", r#"{"text":"hello"}"#),
            put(4, EntityKind::Part, "p2", "m-missing", r#"{"text":"orphan"}"#),
            bad(5, "data is not valid JSON"),
            put(6, EntityKind::Session, S2, "", r#"{"title":"wrong session"}"#),
            put(2, EntityKind::Message, "m1", "", r#"{"role":"user"}"#),
            put(7, EntityKind::Diff, "d1", "", r#"{"file":"a.rs"}"#),
            put(8, EntityKind::Model, "gpt", "", r#"{}"#),
            put(9, EntityKind::Part, "p5", "m1", r#"{"text":"second part"}"#),
        ],
    );
    let ack1 = log!("batch 1", store.append(sid1, S1, &b1, &g1).await);
    assert_eq!(ack1.as_ref().unwrap().cursor, 6, "six ops of batch 1 apply");

    // Batch 2: duplicate and conflict of batch 1's ops, a message delete taking its parts,
    // a part under the deleted message, a re-created message and a part under it.
    let b2 = batch(
        7,
        2,
        vec![
            put(3, EntityKind::Part, "p1", "m1", r#"{"text":"hello"}"#),
            put(7, EntityKind::Diff, "d1", "", r#"{"file":"CHANGED"}"#),
            del(10, EntityKind::Message, "m1"),
            put(11, EntityKind::Part, "p3", "m1", r#"{"text":"too late"}"#),
            put(12, EntityKind::Message, "m2", "", r#"{"role":"assistant"}"#),
            put(13, EntityKind::Part, "p4", "m2", r#"{"text":"answer"}"#),
            del(14, EntityKind::Model, "never-existed"),
            put(15, EntityKind::Message, "m1", "", r#"{"role":"user","again":true}"#),
            put(16, EntityKind::Part, "p6", "m1", r#"{"text":"new part of m1"}"#),
        ],
    );
    log!("batch 2", store.append(sid1, S1, &b2, &g1).await);
    log!("snapshot after batch 2", store.snapshot_page(sid1, None, 100).await);

    // Replays answer as the first time (applied -> duplicate with the original seq).
    let replay1 = log!("replay batch 1", store.append(sid1, S1, &b1, &g1).await);
    let (first, again) = (ack1.unwrap(), replay1.unwrap());
    assert_eq!(first.results.len(), again.results.len());
    for (a, b) in first.results.iter().zip(&again.results) {
        assert_eq!((&a.op_id, a.seq, &a.reason), (&b.op_id, b.seq, &b.reason));
    }
    log!("replay batch 2", store.append(sid1, S1, &b2, &g1).await);
    log!("gap", store.append(sid1, S1, &batch(7, 4, vec![put(20, EntityKind::Diff, "d9", "", "{}")]), &g1).await);
    let mut b2_other = b2.clone();
    b2_other.ops[0].op_id = op_id(99);
    log!("diverged", store.append(sid1, S1, &b2_other, &g1).await);
    let mut b2_fewer = b2.clone();
    b2_fewer.ops.pop();
    log!("diverged (fewer ops)", store.append(sid1, S1, &b2_fewer, &g1).await);
    log!("zero batchSeq", store.append(sid1, S1, &batch(7, 0, vec![]), &g1).await);
    log!("empty batch 3", store.append(sid1, S1, &batch(7, 3, vec![]), &g1).await);
    log!("cursor unchanged", store.session(S1).await.map(|s| s.map(|s| s.cursor)));

    // Another client and many entities for paging; ids that sort differently by locale.
    let ids = ["a", "B", "_x", "Z9", "é", "a-b", "a b", "10", "9", "ß", "A", "zz", "m1", "~", "0"];
    let mut ops = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        ops.push(put(100 + i as u16, EntityKind::Diff, id, "", &format!("{{\"n\":{i}}}")));
        ops.push(put(200 + i as u16, EntityKind::Message, id, "", "{}"));
    }
    log!("client 8 batch 1", store.append(sid1, S1, &batch(8, 1, ops), &g1).await);
    let mut after: Option<(EntityKind, String)> = None;
    let mut pages = 0;
    loop {
        let page = store.snapshot_page(sid1, after.as_ref().map(|(k, id)| (*k, id.as_str())), 7).await.unwrap();
        pages += 1;
        t.push(format!("snapshot page {pages}: {page:?}"));
        if !page.more {
            break;
        }
        let last = page.entities.last().unwrap();
        after = Some((last.kind, last.id.clone()));
    }
    assert!(pages > 3);
    log!("changes 0..5", store.changes(sid1, 0, 5).await);
    log!("changes 5..", store.changes(sid1, 5, 1000).await);
    log!("changes at the end", store.changes(sid1, 1000, 10).await);
    log!("changes of session 2", store.changes(sid2, 0, 10).await);
    log!("snapshot of session 2", store.snapshot_page(sid2, None, 10).await);
    log!("last batchSeq client 7", store.last_batch_seq(sid1, &[7; 16]).await);
    log!("last batchSeq client 8", store.last_batch_seq(sid1, &[8; 16]).await);
    log!("last batchSeq unknown", store.last_batch_seq(sid1, &[9; 16]).await);
    log!("last batchSeq client 7 on session 2", store.last_batch_seq(sid2, &[7; 16]).await);

    // Shares: sh1 under the session, sh2 under sh1, sh3 under sh2.
    let sh1 = share("sh1", sid1, S1, None, 0, RA, 3000);
    log!(
        "mint sh1",
        store.mint_share(&sh1, &token(TargetKind::Share, "sh1", 0, 0x11, RA, 3000), &g1, &event("mint", "sh1")).await
    );
    let g_sh1 = vec![GuardLink::share("sh1", 0), GuardLink::session(S1, 0)];
    let sh2 = share("sh2", sid1, S1, Some("sh1"), 0, RA, 3001);
    log!(
        "mint sh2",
        store
            .mint_share(&sh2, &token(TargetKind::Share, "sh2", 0, 0x12, RA, 3001), &g_sh1, &event("mint", "sh2"))
            .await
    );
    let g_sh2 = vec![GuardLink::share("sh2", 0), GuardLink::share("sh1", 0), GuardLink::session(S1, 0)];
    let sh3 = share("sh3", sid1, S1, Some("sh2"), 0, R, 3002);
    log!(
        "mint sh3",
        store.mint_share(&sh3, &token(TargetKind::Share, "sh3", 0, 0x13, R, 3002), &g_sh2, &event("mint", "sh3")).await
    );
    let g_sh3 = vec![
        GuardLink::share("sh3", 0),
        GuardLink::share("sh2", 0),
        GuardLink::share("sh1", 0),
        GuardLink::session(S1, 0),
    ];
    let sh4 = share("sh4", sid2, S2, None, 0, R, 3003);
    log!(
        "mint sh4",
        store
            .mint_share(
                &sh4,
                &token(TargetKind::Share, "sh4", 0, 0x14, R, 3003),
                &[GuardLink::session(S2, 0)],
                &event("mint", "sh4")
            )
            .await
    );

    log!("resolve owner", store.resolve_token(&[0x01; 32]).await.map(|r| n_resolution(&r)));
    log!("resolve admin", store.resolve_token(&[0xA1; 32]).await.map(|r| n_resolution(&r)));
    log!("resolve old admin", store.resolve_token(&[0xA0; 32]).await.map(|r| n_resolution(&r)));
    log!("resolve sh3", store.resolve_token(&[0x13; 32]).await.map(|r| n_resolution(&r)));
    log!("resolve sh1", store.resolve_token(&[0x11; 32]).await.map(|r| n_resolution(&r)));
    log!("resolve unknown", store.resolve_token(&[0x77; 32]).await);
    log!("redeem sh3", store.record_redeem(&[0x13; 32], &event("redeem", "sh3")).await);
    log!("redeem unknown", store.record_redeem(&[0x77; 32], &event("redeem-failed", "?")).await);
    log!("resolve sh3 after redeem", store.resolve_token(&[0x13; 32]).await.map(|r| n_resolution(&r)));

    // Revocation: sh2's epoch bump cuts sh2 and sh3 but not sh1.
    let b = batch(9, 1, vec![put(300, EntityKind::Diff, "via-sh3", "", "{}")]);
    log!("append via sh3", store.append(sid1, S1, &b, &g_sh3).await);
    log!("revoke sh2", store.revoke_share("sh2", &event("revoke-share", "sh2")).await);
    let before = store.session(S1).await.unwrap().unwrap().cursor;
    let b = batch(9, 2, vec![put(301, EntityKind::Diff, "after-revoke", "", "{}")]);
    log!("append via sh3 after revoke", store.append(sid1, S1, &b, &g_sh3).await);
    log!(
        "replay via sh3 after revoke",
        store.append(sid1, S1, &batch(9, 1, vec![put(300, EntityKind::Diff, "via-sh3", "", "{}")]), &g_sh3).await
    );
    assert_eq!(store.session(S1).await.unwrap().unwrap().cursor, before, "a revoked append applied something");
    log!("last batchSeq after revoked append", store.last_batch_seq(sid1, &[9; 16]).await);
    log!("append via sh1 after revoking sh2", store.append(sid1, S1, &b, &g_sh1).await);
    let sh5 = share("sh5", sid1, S1, Some("sh2"), 0, R, 3004);
    log!(
        "mint under revoked sh2",
        store.mint_share(&sh5, &token(TargetKind::Share, "sh5", 0, 0x15, R, 3004), &g_sh2, &event("mint", "sh5")).await
    );
    log!("resolve sh5 (never minted)", store.resolve_token(&[0x15; 32]).await);
    log!("revoke unknown share", store.revoke_share("nope", &event("revoke-share", "nope")).await);
    log!("revoke session 1", store.revoke_session(S1, &event("revoke-session", S1)).await);
    let b = batch(7, 4, vec![put(302, EntityKind::Diff, "d-after", "", "{}")]);
    log!("append with the old session epoch", store.append(sid1, S1, &b, &g1).await);
    log!("append with the new session epoch", store.append(sid1, S1, &b, &[GuardLink::session(S1, 1)]).await);
    log!("append via sh1 after session revoke", store.append(sid1, S1, &batch(7, 5, vec![]), &g_sh1).await);
    log!("append with the admin epoch", store.append(sid2, S2, &batch(7, 1, vec![]), &[GuardLink::admin(1)]).await);
    log!("append with an old admin epoch", store.append(sid2, S2, &batch(7, 2, vec![]), &[GuardLink::admin(0)]).await);
    log!("revoke unknown session", store.revoke_session("nope", &event("revoke-session", "nope")).await);
    log!("audit without a redeem", store.audit(&event("denied", "sh3")).await);

    // Listings.
    log!(
        "sessions",
        store.list_sessions().await.map(|v| v.iter().map(|(s, n)| (n_session(s), *n)).collect::<Vec<_>>())
    );
    log!("shares of S1", store.list_shares(Some(S1)).await.map(|v| v.iter().map(n_share).collect::<Vec<_>>()));
    log!("all shares", store.list_shares(None).await.map(|v| v.iter().map(n_share).collect::<Vec<_>>()));
    log!("shares of nothing", store.list_shares(Some("nope")).await);
    log!("stats", store.stats().await);
    let audit = store.audit_page(0, 1000).await.unwrap();
    assert!(audit.windows(2).all(|w| w[0].id < w[1].id));
    for row in &audit {
        t.push(format!("audit: {:?}", row.event));
    }
    let page = store.audit_page(audit[2].id, 2).await.unwrap();
    log!("audit page", page.iter().map(|r| r.event.clone()).collect::<Vec<_>>());
    t
}

#[tokio::test]
async fn sqlite_and_postgres_answer_the_same() {
    let lite = scenario(&Store::Lite(Box::new(Lite::open()))).await;
    let pg = PgStore::connect(&support::fresh_db().await).await.unwrap();
    let pg = scenario(&Store::Pg(pg)).await;
    if let Some(dir) = std::env::var_os("CAPSYNC_TRANSCRIPTS") {
        std::fs::write(std::path::Path::new(&dir).join("sqlite.txt"), lite.join("\n")).unwrap();
        std::fs::write(std::path::Path::new(&dir).join("postgres.txt"), pg.join("\n")).unwrap();
    }
    for (i, (a, b)) in lite.iter().zip(&pg).enumerate() {
        assert_eq!(a, b, "step {i} differs (left: SQLite, right: PostgreSQL)");
    }
    assert_eq!(lite.len(), pg.len());
}

// ---- Spaces ---------------------------------------------------------------------------------

const SP1: &str = "0190c000-0000-7000-8000-0000000000a1";
const SP2: &str = "0190c000-0000-7000-8000-0000000000a2";
const N1: &str = "0190c000-0000-7000-8000-0000000000b1";
const N2: &str = "0190c000-0000-7000-8000-0000000000b2";
const N3: &str = "0190c000-0000-7000-8000-0000000000b3";
const N4: &str = "0190c000-0000-7000-8000-0000000000b4";

fn space(id: &str, created_at: u64) -> SpaceRow {
    SpaceRow { id: id.into(), label: format!("space {id}"), epoch: 0, created_at }
}

/// An `openSession` of `key` in `space_id` at `now`, with owner token `hash`; `new_id` is the
/// id a new session would get.
fn open(space_id: &str, key: &str, new_id: &str, hash: u8, now: u64) -> OpenSession {
    OpenSession {
        space_id: space_id.into(),
        key: key.into(),
        title: format!("title of {key}"),
        new_session_id: new_id.into(),
        owner: TokenRow {
            parent: format!("space:{space_id}"),
            space: Some(SpaceLink { space_id: space_id.into(), epoch: 0 }),
            ..token(TargetKind::Session, "", 0, hash, Rights::ALL, now)
        },
    }
}

/// Whether a resolved token's stored epochs still match what it was minted at, as the server's
/// `Access::from_resolution` judges it (target, parents up to the session, and its space).
fn holds(res: &Resolution) -> bool {
    let t = &res.token;
    let target = match t.target_kind {
        TargetKind::Session => res.session.as_ref().is_some_and(|s| s.epoch == t.minted_epoch),
        TargetKind::Space => res.space.as_ref().is_some_and(|s| s.epoch == t.minted_epoch),
        TargetKind::Admin => res.admin_epoch == Some(t.minted_epoch),
        TargetKind::Share => {
            let mut expected = t.minted_epoch;
            let mut ok = true;
            for share in &res.shares {
                ok &= share.epoch == expected;
                expected = share.parent_epoch;
            }
            ok && res.session.as_ref().is_some_and(|s| s.epoch == expected)
        }
    };
    let space = match (&t.space, t.target_kind) {
        (Some(link), TargetKind::Session | TargetKind::Share) => {
            res.space.as_ref().is_some_and(|s| s.id == link.space_id && s.epoch == link.epoch)
        }
        _ => true,
    };
    target && space
}

fn n_space_sessions(rows: &[SpaceSessionRow]) -> Vec<(String, SessionRow)> {
    rows.iter().map(|r| (r.key.clone(), n_session(&r.session))).collect()
}

/// Spaces on either store: `openSession` is idempotent by key (per space), `revokeSpace` cuts
/// the space's token, the session tokens minted through it and the shares below those, while
/// an admin-minted share of the same session keeps working, and writes guarded by a revoked
/// space change nothing.
#[allow(unused_must_use)]
pub async fn spaces_scenario(store: &Store) -> Vec<String> {
    let mut t: Vec<String> = Vec::new();
    macro_rules! log {
        ($label:expr, $value:expr) => {{
            let value = $value;
            t.push(format!("{}: {:?}", $label, value));
            value
        }};
    }
    let admin = vec![GuardLink::admin(0)];
    log!("renew admin", store.renew_admin(&token(TargetKind::Admin, "admin", 0, 0xA0, Rights::default(), 10)).await);
    let space_token = |id: &str, hash: u8| TokenRow { label: format!("space {id}"), ..token(TargetKind::Space, id, 0, hash, Rights::default(), 20) };
    log!("create SP1", store.create_space(&space(SP1, 20), &space_token(SP1, 0xB1), &admin, &event("create-space", SP1)).await);
    log!("create SP2", store.create_space(&space(SP2, 21), &space_token(SP2, 0xB2), &admin, &event("create-space", SP2)).await);
    log!("resolve SP1's token", store.resolve_token(&[0xB1; 32]).await.map(|r| n_resolution(&r)));

    // Idempotent by key: the second open of k1 gets the first one's session (and ignores the
    // new id and title); k2 is another session; k1 in another space is another session too.
    let g_sp1 = vec![GuardLink::space(SP1, 0)];
    let first = log!("open k1", store.open_space_session(&open(SP1, "k1", N1, 0xC1, 100), &g_sp1, &event("open-session", SP1)).await);
    let again = log!("open k1 again", store.open_space_session(&open(SP1, "k1", N2, 0xC2, 101), &g_sp1, &event("open-session", SP1)).await);
    let (first, again) = (first.unwrap(), again.unwrap());
    assert!(first.created && !again.created);
    assert_eq!((first.session_id.as_str(), again.session_id.as_str(), first.sid), (N1, N1, again.sid), "same key, same session");
    log!("open k2", store.open_space_session(&open(SP1, "k2", N2, 0xC3, 102), &g_sp1, &event("open-session", SP1)).await.map(|o| (o.session_id, o.created)));
    let other = store.open_space_session(&open(SP2, "k1", N3, 0xC4, 103), &[GuardLink::space(SP2, 0)], &event("open-session", SP2)).await.unwrap();
    log!("open k1 in SP2", (&other.session_id, other.created));
    assert_eq!(other.session_id, N3, "keys are per space");
    log!("open through SP1 at a wrong epoch", store.open_space_session(&open(SP1, "k9", N4, 0xC5, 104), &[GuardLink::space(SP1, 7)], &event("open-session", SP1)).await);
    log!("sessions of SP1", store.space_sessions(SP1).await.map(|v| n_space_sessions(&v)));
    log!("sessions of SP2", store.space_sessions(SP2).await.map(|v| n_space_sessions(&v)));
    log!("spaces", store.list_spaces().await);
    let owner1 = log!("resolve the first owner token", store.resolve_token(&[0xC1; 32]).await.map(|r| n_resolution(&r)));
    let owner2 = log!("resolve the second owner token", store.resolve_token(&[0xC2; 32]).await.map(|r| n_resolution(&r)));
    assert_eq!(owner1.as_ref().unwrap().as_ref().unwrap().token.target_id, N1, "the store set the token's target");
    assert!(holds(owner1.unwrap().as_ref().unwrap()) && holds(owner2.unwrap().as_ref().unwrap()));

    // Writes through the space-derived owner, a share minted below it, and an admin-minted share.
    let sid = first.sid;
    let g_owner = vec![GuardLink::session(N1, 0), GuardLink::space(SP1, 0)];
    log!("append via the space's owner", store.append(sid, N1, &batch(1, 1, vec![put(400, EntityKind::Message, "m1", "", "{}")]), &g_owner).await);
    let below = ShareRow { space: Some(SpaceLink { space_id: SP1.into(), epoch: 0 }), ..share("sp-share", sid, N1, None, 0, R, 200) };
    let below_token = TokenRow { space: below.space.clone(), ..token(TargetKind::Share, "sp-share", 0, 0xD1, R, 200) };
    log!("mint below the space's owner", store.mint_share(&below, &below_token, &g_owner, &event("mint", "sp-share")).await);
    let by_admin = share("admin-share", sid, N1, None, 0, RA, 201);
    let by_admin_token = TokenRow { parent: "admin".into(), ..token(TargetKind::Share, "admin-share", 0, 0xD2, RA, 201) };
    log!("admin mints a share", store.mint_share(&by_admin, &by_admin_token, &[GuardLink::admin(0), GuardLink::session(N1, 0)], &event("mint", "admin-share")).await);
    log!("resolve the share below", store.resolve_token(&[0xD1; 32]).await.map(|r| n_resolution(&r)));
    log!("shares of N1", store.list_shares(Some(N1)).await.map(|v| v.iter().map(n_share).collect::<Vec<_>>()));

    // Revoking SP1.
    log!("revoke SP1", store.revoke_space(SP1, &event("revoke", SP1)).await);
    log!("revoke an unknown space", store.revoke_space("nope", &event("revoke", "nope")).await);
    for (what, hash, valid) in [
        ("SP1's token", 0xB1, false),
        ("the first owner token", 0xC1, false),
        ("the second owner token", 0xC2, false),
        ("the share below the owner", 0xD1, false),
        ("the admin-minted share", 0xD2, true),
        ("SP2's token", 0xB2, true),
        ("the owner token from SP2", 0xC4, true),
    ] {
        let res = log!(format!("resolve {what} after revoking SP1"), store.resolve_token(&[hash; 32]).await.map(|r| n_resolution(&r)));
        assert_eq!(holds(res.unwrap().as_ref().unwrap()), valid, "{what}");
    }
    let cursor = store.session(N1).await.unwrap().unwrap().cursor;
    log!("open through the revoked space", store.open_space_session(&open(SP1, "k3", N4, 0xC6, 300), &g_sp1, &event("open-session", SP1)).await);
    log!("reopen k1 through the revoked space", store.open_space_session(&open(SP1, "k1", N4, 0xC7, 301), &g_sp1, &event("open-session", SP1)).await);
    log!("resolve a token the revoked open never stored", store.resolve_token(&[0xC7; 32]).await);
    log!("append via the space's owner after revoke", store.append(sid, N1, &batch(1, 2, vec![put(401, EntityKind::Message, "m2", "", "{}")]), &g_owner).await);
    let g_below = vec![GuardLink::share("sp-share", 0), GuardLink::session(N1, 0), GuardLink::space(SP1, 0)];
    log!("mint below the revoked owner", store.mint_share(&share("late", sid, N1, Some("sp-share"), 0, R, 302), &token(TargetKind::Share, "late", 0, 0xD3, R, 302), &g_below, &event("mint", "late")).await);
    assert_eq!(store.session(N1).await.unwrap().unwrap().cursor, cursor, "a write through the revoked space applied");
    let g_admin_share = vec![GuardLink::share("admin-share", 0), GuardLink::session(N1, 0)];
    log!("append via the admin-minted share", store.append(sid, N1, &batch(2, 1, vec![put(402, EntityKind::Message, "m3", "", "{}")]), &g_admin_share).await);
    log!("sessions of SP1 after revoke", store.space_sessions(SP1).await.map(|v| n_space_sessions(&v)));
    log!("spaces after revoke", store.list_spaces().await);
    log!("session N1 stays", store.session(N1).await.map(|s| s.as_ref().map(n_session)));
    for row in store.audit_page(0, 1000).await.unwrap() {
        t.push(format!("audit: {:?}", row.event));
    }
    t
}

#[tokio::test]
async fn sqlite_and_postgres_answer_the_same_about_spaces() {
    let lite = spaces_scenario(&Store::Lite(Box::new(Lite::open()))).await;
    let pg = PgStore::connect(&support::fresh_db().await).await.unwrap();
    let pg = spaces_scenario(&Store::Pg(pg)).await;
    if let Some(dir) = std::env::var_os("CAPSYNC_TRANSCRIPTS") {
        std::fs::write(std::path::Path::new(&dir).join("spaces-sqlite.txt"), lite.join("\n")).unwrap();
        std::fs::write(std::path::Path::new(&dir).join("spaces-postgres.txt"), pg.join("\n")).unwrap();
    }
    for (i, (a, b)) in lite.iter().zip(&pg).enumerate() {
        assert_eq!(a, b, "step {i} differs (left: SQLite, right: PostgreSQL)");
    }
    assert_eq!(lite.len(), pg.len());
}
