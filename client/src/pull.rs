//! Pulling a session into the local replica: a paged snapshot the first time, then the ops
//! logged after the replica's cursor.

use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::store::Db;
use crate::wire;
use capsync_persistence::EntityKind;
use capsync_schema::SturdyUri;

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
    let mut report = PullReport::default();
    let replica = db.call({
        let n = name.to_owned();
        move |db| db.replica_cursor(&n)
    })
    .await?;
    let mut cursor = match replica {
        Some((_, cursor)) => cursor,
        None => {
            let session_id = grant.await?.session_id;
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
                let (n, sid) = (name.to_owned(), session_id.clone());
                db.call(move |db| db.apply_snapshot_page(&n, &sid, first, &entities, (!more).then_some(at))).await?;
                if !more {
                    break at;
                }
                if after.is_none() {
                    return Err(ClientError::Invalid("the server sent an empty snapshot page with more to come".into()));
                }
            }
        }
    };
    loop {
        let mut request = session.changes_request();
        request.get().set_after(cursor);
        request.get().set_limit(PAGE);
        let response = request.send().promise.await?;
        let page = response.get()?;
        let ops = page.get_ops()?.iter().map(wire::read_applied_op).collect::<capnp::Result<Vec<_>>>()?;
        if ops.is_empty() {
            break;
        }
        report.ops_applied += ops.len() as u64;
        let n = name.to_owned();
        cursor = db.call(move |db| db.apply_changes(&n, &ops)).await?;
    }
    report.cursor = cursor;
    conn.close().await;
    Ok(report)
}
