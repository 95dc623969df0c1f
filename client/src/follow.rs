//! Following a session live into the local replica.
//!
//! The follower makes sure the replica exists (a first pull), subscribes after the replica's
//! cursor, and applies each `onOps` run to the replica in one transaction before handing it to
//! the application. The listener returns from `onOps` only then, so a slow consumer slows the
//! server's stream instead of filling memory. After a disconnect or a server shutdown it
//! resubscribes from the replica's cursor: nothing is missed, nothing is applied twice.

use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::store::Db;
use crate::sync::{backoff, SyncOptions};
use crate::{pull, wire};
use capnp::capability::FromClientHook as _;
use capsync_persistence::LoggedOp;
use capsync_schema::capsync_capnp::listener;
use capsync_schema::SturdyUri;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

enum Event {
    /// A run of ops; `done` is answered once they are in the replica and handed to the
    /// application, and only then does `onOps` return to the server.
    Ops(Vec<LoggedOp>, oneshot::Sender<()>),
    End(String),
}

struct ListenerImpl {
    events: mpsc::Sender<Event>,
}

impl listener::Server for ListenerImpl {
    async fn on_ops(self: Rc<Self>, params: listener::OnOpsParams) -> Result<(), capnp::Error> {
        let ops = params.get()?.get_ops()?.iter().map(wire::read_applied_op).collect::<capnp::Result<Vec<_>>>()?;
        let stopped = || capnp::Error::failed("the follower stopped".into());
        let (done, written) = oneshot::channel();
        self.events.send(Event::Ops(ops, done)).await.map_err(|_| stopped())?;
        written.await.map_err(|_| stopped())
    }

    async fn on_end(self: Rc<Self>, params: listener::OnEndParams, _: listener::OnEndResults) -> Result<(), capnp::Error> {
        let reason = params.get()?.get_reason()?.to_string()?;
        let _ = self.events.send(Event::End(reason)).await;
        Ok(())
    }
}

enum Round {
    /// The server ended the subscription with this reason.
    Ended(String),
    /// The stream skipped ops after this cursor: resubscribe from it (a server never does
    /// this, but a follower must not give up, nor apply past a hole, if one does).
    Gap { cursor: u64, got: u64 },
}

/// Follows `name` until `stop` completes or the server refuses the ref for good.
pub async fn follow(
    db: &Db,
    name: &str,
    uri: &SturdyUri,
    options: &SyncOptions,
    mut on_ops: impl FnMut(&[LoggedOp]),
    stop: impl Future<Output = ()>,
) -> Result<()> {
    tokio::pin!(stop);
    let mut failures = 0u32;
    loop {
        let outcome = tokio::select! {
            outcome = round(db, name, uri, options, &mut on_ops, &mut failures) => outcome,
            _ = &mut stop => return Ok(()),
        };
        match outcome {
            Ok(Round::Ended(reason)) if matches!(reason.as_str(), "revoked" | "expired") => {
                let detail = format!("capsync/{reason}: the server ended the subscription");
                let (n, state, r) = (name.to_owned(), reason.clone(), detail.clone());
                db.call(move |db| db.set_ref_state(&n, &state, &r)).await?;
                return Err(ClientError::RefStopped { name: name.to_owned(), state: reason, reason: detail });
            }
            Ok(Round::Ended(reason)) => debug!(ref_name = name, reason, "subscription ended; resubscribing"),
            Ok(Round::Gap { cursor, got }) => {
                warn!(ref_name = name, expected = cursor + 1, got, "a gap in the stream; resubscribing from the replica's cursor")
            }
            Err(err) if err.is_retryable() => debug!(ref_name = name, error = %err, "follow interrupted; resubscribing"),
            Err(err) => {
                if let Some(state) = err.marker().and_then(crate::sync::terminal_state) {
                    let (n, r) = (name.to_owned(), err.to_string());
                    db.call(move |db| db.set_ref_state(&n, state, &r)).await?;
                }
                return Err(err);
            }
        }
        failures += 1;
        let capped = SyncOptions { backoff_max: options.backoff_max.min(Duration::from_secs(2)), ..options.clone() };
        let pause = backoff(&capped, failures.min(8));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = &mut stop => return Ok(()),
        }
    }
}

async fn round(
    db: &Db,
    name: &str,
    uri: &SturdyUri,
    options: &SyncOptions,
    on_ops: &mut impl FnMut(&[LoggedOp]),
    failures: &mut u32,
) -> Result<Round> {
    let conn = Connection::connect(uri, options.tls_ca.as_deref()).await?;
    let (session, grant) = conn.session(&uri.token);
    let history = grant.await?.history;
    // A replica from another copy of the server's history (the server was restored from a
    // backup) is pulled again from a snapshot before following.
    let replica = {
        let n = name.to_owned();
        db.call(move |db| {
            let seen = db.replica_history(&n)?;
            if !seen.is_empty() && !history.is_empty() && seen != history {
                db.reset_replica(&n)?;
            } else if seen.is_empty() && !history.is_empty() {
                db.set_replica_history(&n, &history)?;
            }
            db.replica_cursor(&n)
        })
        .await?
    };
    let mut cursor = match replica {
        Some((_, cursor)) => cursor,
        None => pull::pull(db, name, uri, options.tls_ca.as_deref()).await?.cursor,
    };
    let (events_tx, mut events) = mpsc::channel(4);
    let listener: listener::Client = capnp_rpc::new_client(ListenerImpl { events: events_tx });
    let mut request = session.subscribe_request();
    request.get().set_after(cursor);
    request.get().set_listener(listener);
    let response = request.send().promise.await?;
    // Holding the Subscription keeps it alive; dropping it (on return) ends it.
    let _subscription = capsync_schema::capsync_capnp::subscription::Client::new(response.get()?.get_subscription()?.into_client_hook());
    debug!(ref_name = name, after = cursor, "following");
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Ops(ops, done)) => {
                    let fresh: Vec<LoggedOp> = ops.into_iter().filter(|o| o.seq > cursor).collect();
                    let Some(first) = fresh.first() else {
                        let _ = done.send(());
                        continue;
                    };
                    if !contiguous(cursor, &fresh) {
                        // Dropping `done` fails this onOps, so the server stops streaming too.
                        return Ok(Round::Gap { cursor, got: first.seq });
                    }
                    let n = name.to_owned();
                    let applied = fresh.clone();
                    cursor = db.call(move |db| db.apply_changes(&n, &applied)).await?;
                    *failures = 0;
                    on_ops(&fresh);
                    let _ = done.send(());
                }
                Some(Event::End(reason)) => return Ok(Round::Ended(reason)),
                // The RPC system dropped our listener: the connection is gone.
                None => return Err(ClientError::Rpc(capnp::Error::disconnected("the subscription's connection closed".into()))),
            },
            _ = conn.closed() => return Err(ClientError::Rpc(capnp::Error::disconnected("the connection closed".into()))),
        }
    }
}

/// Whether `ops` continue the replica at `cursor` with no hole: cursor+1, cursor+2, ...
fn contiguous(cursor: u64, ops: &[LoggedOp]) -> bool {
    ops.iter().zip(cursor + 1..).all(|(op, expected)| op.seq == expected)
}
