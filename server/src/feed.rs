//! Live op feeds for subscriptions, one per session that has subscribers.
//!
//! The writer thread publishes every applied op, in commit order, right after its commit; a
//! feed keeps the most recent ones in a bounded ring shared by all subscribers of the session
//! and bumps a watch with the newest seq. A subscriber reads from the ring while its cursor is
//! inside it and from the op log (a database read) when it has fallen behind, so the server's
//! memory never grows with a slow subscriber: a subscriber only ever holds its cursor.

use capsync_persistence::LoggedOp;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Ops and bytes a session's ring keeps at most.
const RING_OPS: usize = 8192;
const RING_BYTES: usize = 16 * 1024 * 1024;

pub struct Feed {
    ring: Mutex<Ring>,
    /// The newest published seq.
    head: watch::Sender<u64>,
}

#[derive(Default)]
struct Ring {
    ops: VecDeque<Arc<LoggedOp>>,
    bytes: usize,
}

fn op_bytes(op: &LoggedOp) -> usize {
    match &op.op.body {
        capsync_persistence::OpBody::Put(e) => e.data.len() + e.id.len() + e.parent_id.len() + 64,
        capsync_persistence::OpBody::Delete { id, .. } => id.len() + 64,
    }
}

impl Feed {
    fn new() -> Feed {
        Feed { ring: Mutex::new(Ring::default()), head: watch::channel(0).0 }
    }

    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    fn publish(&self, ops: Vec<LoggedOp>) {
        let Some(last) = ops.last().map(|o| o.seq) else { return };
        {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            // Ops published late, after ops that came later (PostgreSQL commits of one session
            // can finish their calls out of order): the ring is already past them, and a
            // subscriber behind it reads them from the store.
            if ring.ops.back().is_some_and(|b| last <= b.seq) {
                return;
            }
            let contiguous = ring.ops.back().is_none_or(|b| b.seq + 1 == ops[0].seq);
            if !contiguous {
                ring.ops.clear();
                ring.bytes = 0;
            }
            for op in ops {
                ring.bytes += op_bytes(&op);
                ring.ops.push_back(Arc::new(op));
            }
            while ring.ops.len() > RING_OPS || (ring.bytes > RING_BYTES && ring.ops.len() > 1) {
                if let Some(old) = ring.ops.pop_front() {
                    ring.bytes -= op_bytes(&old);
                }
            }
        }
        self.head.send_modify(|head| *head = (*head).max(last));
    }

    /// Another node's commit took the session to `cursor`: subscribers wake and read the
    /// missing ops from the store.
    fn advance(&self, cursor: u64) {
        self.head.send_if_modified(|head| {
            let moved = cursor > *head;
            *head = (*head).max(cursor);
            moved
        });
    }

    /// Ops after `cursor` from the ring, up to `max_ops` and about `max_bytes`. `None` when
    /// the ring cannot answer (the subscriber is behind it): read the log instead.
    pub fn read_after(&self, cursor: u64, max_ops: usize, max_bytes: usize) -> Option<Vec<Arc<LoggedOp>>> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let first = ring.ops.front()?.seq;
        let last = ring.ops.back()?.seq;
        if cursor >= last {
            // Another node committed past the ring: those ops are in the store only.
            return if *self.head.borrow() > cursor { None } else { Some(Vec::new()) };
        }
        if cursor + 1 < first {
            return None;
        }
        let start = (cursor + 1 - first) as usize;
        let mut out = Vec::new();
        let mut bytes = 0;
        for op in ring.ops.range(start..) {
            if out.len() >= max_ops || (bytes > max_bytes && !out.is_empty()) {
                break;
            }
            bytes += op_bytes(op);
            out.push(op.clone());
        }
        Some(out)
    }
}

/// The feeds of every session with subscribers. Shared with the writer thread.
#[derive(Default)]
pub struct Feeds {
    feeds: Mutex<HashMap<i64, (Arc<Feed>, usize)>>,
}

impl Feeds {
    /// The session's feed, counting one more subscriber.
    pub fn join(&self, sid: i64) -> Arc<Feed> {
        let mut feeds = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        let entry = feeds.entry(sid).or_insert_with(|| (Arc::new(Feed::new()), 0));
        entry.1 += 1;
        entry.0.clone()
    }

    /// One subscriber fewer; the feed goes when the last one leaves.
    pub fn leave(&self, sid: i64) {
        let mut feeds = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = feeds.get_mut(&sid) {
            entry.1 -= 1;
            if entry.1 == 0 {
                feeds.remove(&sid);
            }
        }
    }

    /// The sessions that have subscribers here.
    pub fn sids(&self) -> Vec<i64> {
        self.feeds.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect()
    }

    /// A commit elsewhere took session `sid` to `cursor`.
    pub fn advance(&self, sid: i64, cursor: u64) {
        let feed = self.feeds.lock().unwrap_or_else(|p| p.into_inner()).get(&sid).map(|(f, _)| f.clone());
        if let Some(feed) = feed {
            feed.advance(cursor);
        }
    }

    /// Called on the writer thread after a commit, in commit order.
    pub fn publish(&self, sid: i64, ops: Vec<LoggedOp>) {
        let feed = self.feeds.lock().unwrap_or_else(|p| p.into_inner()).get(&sid).map(|(f, _)| f.clone());
        if let Some(feed) = feed {
            feed.publish(ops);
        }
    }
}
