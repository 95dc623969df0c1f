//! `Session.subscribe`: every op after a cursor, then live ops, in seq order, with no gap and
//! no duplicate, through `Listener.onOps` as a streaming call.
//!
//! Each subscription is a task holding only its cursor. It reads from the session's feed ring
//! when it can and from the op log when it has fallen behind, and awaits the stream's flow
//! control before sending more, so a slow listener costs the server one stream window
//! (64 KiB), not a growing queue. It ends with `onEnd("revoked")` the moment a revocation
//! reaches its chain, `onEnd("expired")` at expiry, `onEnd("shutdown")` when the server stops,
//! and silently when the client drops or cancels the `Subscription`.

use crate::access::Access;
use crate::convert;
use crate::error::ServerError;
use crate::connection::Connection;
use crate::feed::Feed;
use crate::store::now_ms;
use capsync_persistence::LoggedOp;
use capsync_schema::capsync_capnp::{listener, subscription};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// Ops and approximate bytes in one `onOps` call.
const MAX_OPS_PER_CALL: usize = 1000;
const MAX_BYTES_PER_CALL: usize = 1024 * 1024;

pub struct SubscriptionImpl {
    cancel: RefCell<Option<oneshot::Sender<()>>>,
}

impl subscription::Server for SubscriptionImpl {
    async fn cancel(self: Rc<Self>, _: subscription::CancelParams, _: subscription::CancelResults) -> Result<(), capnp::Error> {
        if let Some(cancel) = self.cancel.borrow_mut().take() {
            let _ = cancel.send(());
        }
        Ok(())
    }
}

/// Starts delivering to `listener` and returns the capability that keeps it alive.
pub fn start(access: Access, conn: Rc<Connection>, listener: listener::Client, after: u64) -> subscription::Client {
    let (cancel_tx, cancel_rx) = oneshot::channel();
    let tasks = conn.shared.subscription_tasks.clone();
    let membership = Membership::join(&conn, access.sid);
    let feed = membership.feed.clone();
    let closed = conn.closed.clone();
    tasks.spawn_local(async move {
        // The connection's end stops the task wherever it waits, so nothing it holds (the
        // listener, and through it the connection's socket) outlives the connection.
        tokio::select! {
            _ = run(access, conn, feed, listener, after, cancel_rx) => {}
            _ = closed.cancelled() => debug!("subscription ended with its connection"),
        }
        drop(membership);
    });
    capnp_rpc::new_client(SubscriptionImpl { cancel: RefCell::new(Some(cancel_tx)) })
}

/// Leaves the feed and the count however the task ends.
///
/// Joins the feed too, not `run`: the task may end (its connection already closed) or be
/// dropped before `run` is ever polled, and a leave without its join would take the feed
/// from the session's other subscribers, which then no longer hear of new ops.
struct Membership {
    conn: Rc<Connection>,
    sid: i64,
    feed: Arc<Feed>,
}

impl Membership {
    fn join(conn: &Rc<Connection>, sid: i64) -> Membership {
        let shared = &conn.shared;
        let feed = shared.feeds.join(sid);
        shared.subscriptions.set(shared.subscriptions.get() + 1);
        shared.metrics.subscription_started();
        conn.subscriptions.set(conn.subscriptions.get() + 1);
        Membership { conn: conn.clone(), sid, feed }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let shared = &self.conn.shared;
        shared.feeds.leave(self.sid);
        shared.subscriptions.set(shared.subscriptions.get().saturating_sub(1));
        shared.metrics.subscription_ended();
        self.conn.subscriptions.set(self.conn.subscriptions.get().saturating_sub(1));
    }
}

async fn run(access: Access, conn: Rc<Connection>, feed: Arc<Feed>, listener: listener::Client, after: u64, mut cancel: oneshot::Receiver<()>) {
    let shared = conn.shared.clone();
    let mut head = feed.watch_head();
    let mut revocations = shared.registry.watch_revocations();
    let mut closing = shared.closing.clone();
    let expiry = async {
        match access.expires_at {
            0 => std::future::pending::<()>().await,
            at => tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await,
        }
    };
    tokio::pin!(expiry);
    let mut cursor = after;
    debug!(peer = %conn.peer, session = %access.session_id, after, "subscription started");

    let end = loop {
        if *closing.borrow() {
            break Some("shutdown");
        }
        match access.check() {
            Err(ServerError::Revoked) => break Some("revoked"),
            Err(ServerError::Expired) => break Some("expired"),
            Err(ServerError::Overloaded(_)) => {
                // This node may have missed a revocation: deliver nothing until it knows.
                let mut current = access.currency.watch();
                tokio::select! {
                    _ = current.wait_for(|current| *current) => {}
                    _ = closing.changed() => {}
                    _ = &mut cancel => break None,
                }
                continue;
            }
            _ => {}
        }
        head.borrow_and_update();
        let ops: Vec<Arc<LoggedOp>> = match feed.read_after(cursor, MAX_OPS_PER_CALL, MAX_BYTES_PER_CALL) {
            Some(ops) => ops,
            // A revocation landing during the read ends the subscription at once (the loop's
            // check says how), not after the read.
            None => match access.unless_refused(shared.store.changes(access.sid, cursor, MAX_OPS_PER_CALL as u32)).await {
                Err(_) if access.check().is_err() => continue,
                Ok((mut ops, _)) => {
                    // The same byte cap as the feed: a run of large ops must not make one
                    // onOps message larger than a client will read.
                    ops.truncate(crate::session::within_bytes(ops.iter().map(|o| crate::session::op_bytes(&o.op.body)), MAX_BYTES_PER_CALL));
                    ops.into_iter().map(Arc::new).collect()
                }
                Err(err) => {
                    warn!(error = %err, "a subscription could not read the op log");
                    break Some("error");
                }
            },
        };
        if let Some(last) = ops.last().map(|o| o.seq) {
            shared.metrics.delivered((*head.borrow()).saturating_sub(last));
            let mut request = listener.on_ops_request();
            {
                let mut params = request.get();
                params.set_cursor(last);
                let mut list = params.init_ops(ops.len() as u32);
                for (i, op) in ops.iter().enumerate() {
                    convert::set_applied_op(list.reborrow().get(i as u32), op);
                }
            }
            // Sent now; the future completes when the stream's window has room again.
            let flow = request.send();
            tokio::select! {
                sent = flow => {
                    if sent.is_err() {
                        break None;
                    }
                }
                _ = &mut cancel => break None,
                _ = revocations.changed() => {}
                _ = closing.changed() => {}
            }
            cursor = last;
            continue;
        }
        tokio::select! {
            _ = head.changed() => {}
            _ = revocations.changed() => {}
            _ = closing.changed() => {}
            _ = &mut expiry => {}
            _ = &mut cancel => break None,
        }
    };
    if let Some(reason) = end {
        debug!(peer = %conn.peer, reason, "subscription ended");
        let mut request = listener.on_end_request();
        request.get().set_reason(reason);
        let _ = tokio::time::timeout(Duration::from_secs(2), request.send().promise).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::ConnectionBudget;
    use crate::config::Limits;
    use crate::connection::Shared;
    use crate::metrics::Metrics;
    use crate::registry::EpochRegistry;
    use crate::store::SqliteStore;
    use capsync_persistence::server::TargetKind;
    use capsync_persistence::Rights;

    /// A listener that is never called: these subscriptions end before they deliver.
    struct Silent;
    impl listener::Server for Silent {}

    fn access(registry: &EpochRegistry, sid: i64) -> Access {
        Access {
            kind: TargetKind::Session,
            id: "session".into(),
            session_id: "session".into(),
            sid,
            rights: Rights::default(),
            expires_at: 0,
            chain: Vec::new(),
            currency: registry.currency(),
            revocations: registry.watch_revocations(),
        }
    }

    /// A client that subscribes and disconnects at once must not take the session's feed away
    /// from a follower on another connection: the writer publishes only into registered feeds,
    /// so that follower would stop hearing of new ops.
    #[test]
    fn a_subscription_whose_connection_is_already_closed_leaves_other_followers_fed() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let dir = tempfile::tempdir().unwrap();
            let store = Rc::new(SqliteStore::open(dir.path(), 1, None).unwrap());
            let registry = Arc::new(EpochRegistry::default());
            let (_closing, closing) = tokio::sync::watch::channel(false);
            let shared = Rc::new(Shared::new(store, registry.clone(), Limits::default(), closing, Arc::new(Metrics::new())));
            let sid = 1;
            let follower = shared.feeds.join(sid);
            let mut head = follower.watch_head();

            // The task's select! picks its first branch at random, and the bug shows only when
            // it polls the connection's end before the subscription itself: twenty tries make
            // missing it (one chance in 2^20) practically impossible.
            for _ in 0..20 {
                let budget = ConnectionBudget::new(shared.budget.clone(), 1024);
                let conn = Rc::new(Connection::new(shared.clone(), "127.0.0.1:1".into(), budget));
                conn.closed.cancel();
                let listener: listener::Client = capnp_rpc::new_client(Silent);
                let _subscription = start(access(&registry, sid), conn, listener, 0);
                let tasks = &shared.subscription_tasks;
                tasks.close();
                tasks.wait().await;
                tasks.reopen();
                assert_eq!(shared.subscriptions.get(), 0, "the subscription has ended");
                assert!(shared.feeds.sids().contains(&sid), "the follower's feed is still registered");
            }

            head.borrow_and_update();
            shared.feeds.advance(sid, 1);
            assert!(head.has_changed().unwrap(), "a commit still wakes the follower");
        });
    }
}
