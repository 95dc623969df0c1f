//! Other nodes' commits, applied to this node's in-memory state (issue 16).
//!
//! A store that several servers share reports their revocations and appends as
//! [`StoreEvent`]s. A revocation raises this node's epoch cell, so live capabilities on every
//! connection fail their next call and subscriptions end with `onEnd("revoked")`; an append
//! advances the session's feed, so subscribers here read the new ops from the store.
//!
//! Events can be missed while the store's stream is down. So: when it breaks, the epoch cells
//! stop being trusted (calls are answered `overloaded`, subscriptions pause); when it is back,
//! every cell and every followed session's cursor is re-read, and only then are they trusted
//! again. A periodic catch-up read of the followed sessions' cursors bounds the delay of a
//! notification lost without the stream breaking.

use crate::feed::Feeds;
use crate::registry::EpochRegistry;
use crate::store::{Store, StoreEvent};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{debug, info, warn};

/// How often followed sessions' cursors are re-read even without notifications (and a failed
/// re-read of epochs is tried again).
const CATCH_UP: Duration = Duration::from_secs(1);

/// Applies `events` until the stream ends. The caller marks the cells not current before
/// starting it: nothing is known of other nodes until the first re-read.
pub async fn run(store: Rc<dyn Store>, registry: Arc<EpochRegistry>, feeds: Arc<Feeds>, mut events: UnboundedReceiver<StoreEvent>) {
    let mut resync_pending = false;
    let mut catch_up = tokio::time::interval(CATCH_UP);
    catch_up.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
            _ = catch_up.tick() => {
                if resync_pending {
                    resync_pending = !resync(&*store, &registry, &feeds).await;
                } else {
                    catch_up_cursors(&*store, &feeds).await;
                }
                continue;
            }
        };
        match event {
            StoreEvent::Revoked(key, epoch) => registry.bump(key, epoch),
            StoreEvent::Advanced { sid, cursor } => feeds.advance(sid, cursor),
            StoreEvent::Lost => {
                warn!("lost the store's notifications: refusing calls until epochs are re-read");
                registry.set_current(false);
                resync_pending = false;
            }
            StoreEvent::Listening => resync_pending = !resync(&*store, &registry, &feeds).await,
        }
    }
}

/// Re-reads every epoch this node holds a cell for and every followed session's cursor, then
/// trusts the cells again. `false` if the store could not answer.
async fn resync(store: &dyn Store, registry: &EpochRegistry, feeds: &Feeds) -> bool {
    let keys = registry.keys();
    let count = keys.len();
    let epochs = match store.epochs(keys).await {
        Ok(epochs) => epochs,
        Err(err) => {
            debug!(error = %err, "re-reading epochs failed; will retry");
            return false;
        }
    };
    for (key, epoch) in epochs {
        registry.raise(key, epoch);
    }
    if !catch_up_cursors(store, feeds).await {
        return false;
    }
    registry.set_current(true);
    info!(objects = count, "epochs re-read; serving calls on them again");
    true
}

async fn catch_up_cursors(store: &dyn Store, feeds: &Feeds) -> bool {
    let sids = feeds.sids();
    if sids.is_empty() {
        return true;
    }
    match store.cursors(sids).await {
        Ok(cursors) => {
            for (sid, cursor) in cursors {
                feeds.advance(sid, cursor);
            }
            true
        }
        Err(err) => {
            debug!(error = %err, "a catch-up read of followed sessions failed");
            false
        }
    }
}
