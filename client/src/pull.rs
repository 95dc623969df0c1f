//! Pulling a session into the local replica: a paged snapshot the first time, then the ops
//! logged after the replica's cursor. A replica from another copy of the server's history (a
//! server restored from a backup), or one ahead of the server's cursor, is pulled again.

use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::store::Db;
use crate::wire;
use capsync_persistence::EntityKind;
use capsync_schema::capsync_capnp::session;
use capsync_schema::SturdyUri;
use tracing::warn;

/// What a pull did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PullReport {
    pub cursor: u64,
    /// Entities written by a snapshot (0 when the replica only caught up on changes).
    pub snapshot_entities: u64,
    pub ops_applied: u64,
}

/// Entities per snapshot page and ops per changes page that the client asks for.
const PAGE: u32 = 1000;

pub async fn pull(db: &Db, name: &str, uri: &SturdyUri, tls_ca: Option<&std::path::Path>) -> Result<PullReport> {
    let conn = Connection::connect(uri, tls_ca).await?;
    let (session, grant) = conn.session(&uri.token);
    let grant = grant.await?;
    let mut report = PullReport::default();
    // A replica pulled from another copy of the server's history (it was restored from a
    // backup) holds seqs that now mean other ops: start it over.
    let stale = {
        let (n, history) = (name.to_owned(), grant.history.clone());
        db.call(move |db| {
            let seen = db.replica_history(&n)?;
            Ok(!seen.is_empty() && !history.is_empty() && seen != history)
        })
        .await?
    };
    if stale {
        warn!(ref_name = name, "the server's history changed: pulling the replica again from a snapshot");
        reset(db, name).await?;
    }
    let mut restarted = stale;
    let cursor = loop {
        let replica = db.call({
            let n = name.to_owned();
            move |db| db.replica_cursor(&n)
        })
        .await?;
        let mut cursor = match replica {
            Some((_, cursor)) => cursor,
            None => snapshot(db, name, &session, &grant.session_id, &mut report).await?,
        };
        match catch_up(db, name, &session, &mut cursor, &mut report).await? {
            CaughtUp::Yes => break cursor,
            // The server's cursor is below the replica's: it lost ops the replica applied.
            CaughtUp::ServerBehind { server } if !restarted => {
                warn!(ref_name = name, replica = cursor, server, "the server is behind this replica: pulling it again from a snapshot");
                reset(db, name).await?;
                restarted = true;
            }
            CaughtUp::ServerBehind { server } => {
                return Err(ClientError::Invalid(format!("the server's cursor ({server}) is behind a fresh snapshot's ({cursor})")));
            }
        }
    };
    let (n, history) = (name.to_owned(), grant.history);
    db.call(move |db| db.set_replica_history(&n, &history)).await?;
    report.cursor = cursor;
    conn.close().await;
    Ok(report)
}

async fn reset(db: &Db, name: &str) -> Result<()> {
    let n = name.to_owned();
    Ok(db.call(move |db| db.reset_replica(&n)).await?)
}

/// A fresh replica from snapshot pages; returns the cursor it is at.
async fn snapshot(db: &Db, name: &str, session: &session::Client, session_id: &str, report: &mut PullReport) -> Result<u64> {
    let mut after: Option<(EntityKind, String)> = None;
    let mut first_cursor = None;
    loop {
        let mut request = session.snapshot_request();
        request.get().set_limit(PAGE);
        if let Some((kind, id)) = &after {
            let mut key = request.get().init_start_after();
            key.set_kind(wire::kind_to(*kind));
            key.set_id(id.as_str());
        }
        let response = request.send().promise.await?;
        let page = response.get()?;
        let entities = page.get_entities()?.iter().map(wire::read_entity).collect::<capnp::Result<Vec<_>>>()?;
        let more = page.get_more();
        let first = first_cursor.is_none();
        let at = *first_cursor.get_or_insert(page.get_cursor());
        after = entities.last().map(|e| (e.kind, e.id.clone()));
        report.snapshot_entities += entities.len() as u64;
        let (n, sid) = (name.to_owned(), session_id.to_owned());
        db.call(move |db| db.apply_snapshot_page(&n, &sid, first, &entities, (!more).then_some(at))).await?;
        if !more {
            return Ok(at);
        }
        if after.is_none() {
            return Err(ClientError::Invalid("the server sent an empty snapshot page with more to come".into()));
        }
    }
}

enum CaughtUp {
    Yes,
    ServerBehind { server: u64 },
}

/// Applies the ops logged after `cursor`, page by page, until there are none.
async fn catch_up(db: &Db, name: &str, session: &session::Client, cursor: &mut u64, report: &mut PullReport) -> Result<CaughtUp> {
    loop {
        let mut request = session.changes_request();
        request.get().set_after(*cursor);
        request.get().set_limit(PAGE);
        let response = request.send().promise.await?;
        let page = response.get()?;
        if page.get_cursor() < *cursor {
            return Ok(CaughtUp::ServerBehind { server: page.get_cursor() });
        }
        let ops = page.get_ops()?.iter().map(wire::read_applied_op).collect::<capnp::Result<Vec<_>>>()?;
        if ops.is_empty() {
            return Ok(CaughtUp::Yes);
        }
        report.ops_applied += ops.len() as u64;
        let n = name.to_owned();
        *cursor = db.call(move |db| db.apply_changes(&n, &ops)).await?;
    }
}
