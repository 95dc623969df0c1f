//! Byte budgets for what peers send: per connection and for the whole server.
//!
//! capnp holds a message in memory from the moment it is read until the call it carries has
//! been answered, so a peer pipelining many large calls could make the server hold all of
//! them. Every frame of at least [`LARGE_FRAME`] bytes is charged, when its header announces
//! its size and before its body is read, to its connection and to the server. A connection
//! whose charge would pass its budget, or the server's, stops reading (TCP flow control then
//! holds the peer back) until charges are released. A connection's charges are released when
//! it has no call in flight any more (everything it sent has been answered) and when it
//! closes. Small frames are not charged: they are bounded by the calls-in-flight limit.

use crate::metrics::{Metrics, Refusal};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;

/// Frames from this size on are charged.
pub const LARGE_FRAME: usize = 64 * 1024;

/// The server-wide budget, shared by every connection's [`ConnectionBudget`].
#[derive(Debug)]
pub struct ServerBudget {
    limit: usize,
    used: Cell<usize>,
    waiting: RefCell<Vec<Waker>>,
    /// Counts each time a connection is held back.
    metrics: Option<Arc<Metrics>>,
}

impl ServerBudget {
    pub fn new(limit: usize) -> Rc<ServerBudget> {
        Rc::new(ServerBudget { limit, used: Cell::new(0), waiting: RefCell::default(), metrics: None })
    }

    /// A budget that counts the connections it holds back in `metrics`.
    pub fn observed(limit: usize, metrics: Arc<Metrics>) -> Rc<ServerBudget> {
        Rc::new(ServerBudget { limit, used: Cell::new(0), waiting: RefCell::default(), metrics: Some(metrics) })
    }

    /// Bytes charged now, over all connections.
    pub fn used(&self) -> usize {
        self.used.get()
    }
}

/// One connection's charges.
#[derive(Debug)]
pub struct ConnectionBudget {
    server: Rc<ServerBudget>,
    limit: usize,
    charged: Cell<usize>,
}

impl ConnectionBudget {
    pub fn new(server: Rc<ServerBudget>, limit: usize) -> Rc<ConnectionBudget> {
        Rc::new(ConnectionBudget { server, limit, charged: Cell::new(0) })
    }

    /// Charges a frame of `bytes` if both budgets have room; otherwise registers `waker` to be
    /// woken when charges are released somewhere. A connection (or server) with nothing charged
    /// always takes one frame, so a single frame larger than a budget still goes through.
    pub fn try_charge(&self, bytes: usize, waker: Option<&Waker>) -> bool {
        let server = &self.server;
        let mine = self.charged.get();
        let fits_mine = mine == 0 || mine + bytes <= self.limit;
        let fits_server = server.used.get() == 0 || server.used.get() + bytes <= server.limit;
        if fits_mine && fits_server {
            self.charged.set(mine + bytes);
            server.used.set(server.used.get() + bytes);
            return true;
        }
        if let Some(waker) = waker {
            let mut waiting = server.waiting.borrow_mut();
            if !waiting.iter().any(|w| w.will_wake(waker)) {
                waiting.push(waker.clone());
                if let Some(metrics) = &server.metrics {
                    metrics.refused(Refusal::ByteBudget);
                }
            }
        }
        false
    }

    /// Releases everything this connection has charged and wakes the connections waiting.
    pub fn release_all(&self) {
        let mine = self.charged.replace(0);
        if mine == 0 {
            return;
        }
        self.server.used.set(self.server.used.get().saturating_sub(mine));
        let waiting = std::mem::take(&mut *self.server.waiting.borrow_mut());
        for waker in waiting {
            waker.wake();
        }
    }

    pub fn charged(&self) -> usize {
        self.charged.get()
    }
}

impl Drop for ConnectionBudget {
    fn drop(&mut self) {
        self.release_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_stop_at_either_budget_and_release_wakes_the_waiters() {
        let server = ServerBudget::new(300);
        let a = ConnectionBudget::new(server.clone(), 200);
        let b = ConnectionBudget::new(server.clone(), 200);
        assert!(a.try_charge(150, None));
        assert!(!a.try_charge(100, None), "over the connection's budget");
        assert!(b.try_charge(100, None));
        let waker = futures::task::noop_waker();
        assert!(!b.try_charge(100, Some(&waker)), "over the server's budget");
        assert_eq!(server.waiting.borrow().len(), 1);
        a.release_all();
        assert!(server.waiting.borrow().is_empty(), "woken");
        assert!(b.try_charge(100, None));
        assert_eq!(server.used(), 200);
        drop(b);
        assert_eq!(server.used(), 0, "a closed connection releases its charges");
        let big = ConnectionBudget::new(server.clone(), 10);
        assert!(big.try_charge(1000, None), "one frame always fits an empty budget");
    }
}
