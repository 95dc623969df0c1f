//! Puts each client's batches in batchSeq order before they reach the writer.
//!
//! Cap'n Proto promises E-order, but capnp-rpc dispatches calls that were queued on a promised
//! capability (`redeem(token).grant.cap.session.append(...)`, pipelined) as separate tasks,
//! and those can start in any order. So the server does not trust dispatch order: for every
//! (session, client) it knows the next batchSeq it expects (read once from the database, then
//! tracked in memory), lets a batch through only when every lower batchSeq has been handed to
//! the writer, and parks a batch that arrives early until its predecessors do. A batch whose
//! predecessor never comes is let through after [`MAX_WAIT`] and the writer answers
//! `capsync/gap`; a predecessor that came and is still being written (a PostgreSQL commit
//! under load can take longer than that) is waited for as long as it lasts. Replays
//! (batchSeq below the next expected) pass at once.
//!
//! Each batch let through holds a [`Turn`] until it is handed to the writer
//! ([`Turn::submitted`]); a turn dropped without that (the call failed or was cancelled)
//! makes the next batchSeq unknown again, to be re-read from the store.

use crate::error::Result;
use crate::store::Fut;
use capsync_persistence::Id16;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::oneshot;

/// How long an early batch waits for its predecessors.
pub const MAX_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct ClientSeq {
    /// The next batchSeq to hand to the writer; `None` until read from the database.
    next: Option<u64>,
    loading: bool,
    waiters: BTreeMap<u64, Vec<oneshot::Sender<()>>>,
    /// Batches let through and not yet submitted or failed.
    in_flight: usize,
}

/// A batch's permission to go to the writer; see the module docs.
#[must_use = "a dropped turn counts as a failed batch"]
pub struct Turn<'a> {
    sequencer: &'a Sequencer,
    sid: i64,
    client: Id16,
    seq: u64,
    done: bool,
}

impl Turn<'_> {
    /// The batch was handed to the writer (SQLite) or committed (PostgreSQL): its successor
    /// may go.
    pub fn submitted(mut self) {
        self.done = true;
        self.sequencer.submitted(self.sid, self.client, self.seq);
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if !self.done {
            let entry = self.sequencer.entry(self.sid, self.client);
            let mut e = entry.borrow_mut();
            e.in_flight = e.in_flight.saturating_sub(1);
            drop(e);
            self.sequencer.forget(self.sid, self.client);
        }
    }
}

#[derive(Default)]
pub struct Sequencer {
    clients: RefCell<HashMap<(i64, Id16), Rc<RefCell<ClientSeq>>>>,
}

impl Sequencer {
    fn entry(&self, sid: i64, client: Id16) -> Rc<RefCell<ClientSeq>> {
        self.clients.borrow_mut().entry((sid, client)).or_default().clone()
    }

    /// Resolves when batch `seq` of `client` may be handed to the writer. `last_applied` reads
    /// the client's last applied batchSeq from storage; it runs once per (session, client).
    pub async fn turn(&self, sid: i64, client: Id16, seq: u64, last_applied: impl FnOnce() -> Fut<u64>) -> Result<Turn<'_>> {
        let mut last_applied = Some(last_applied);
        let entry = self.entry(sid, client);
        let mut deadline = tokio::time::Instant::now() + MAX_WAIT;
        let go = || {
            entry.borrow_mut().in_flight += 1;
            Ok(Turn { sequencer: self, sid, client, seq, done: false })
        };
        loop {
            let (next, loading) = {
                let e = entry.borrow();
                (e.next, e.loading)
            };
            match next {
                Some(next) if seq <= next => return go(),
                None if !loading && last_applied.is_some() => {
                    entry.borrow_mut().loading = true;
                    let load = last_applied.take().expect("checked above");
                    // If this call is dropped mid-load, another waiter must be able to load.
                    let guard = Loading { entry: &entry };
                    let last = load().await;
                    std::mem::forget(guard);
                    let mut e = entry.borrow_mut();
                    e.loading = false;
                    let last = last?;
                    e.next = Some(e.next.unwrap_or(0).max(last + 1));
                    wake_up_to(&mut e);
                    continue;
                }
                _ => {}
            }
            let (tx, rx) = oneshot::channel();
            entry.borrow_mut().waiters.entry(seq).or_default().push(tx);
            if tokio::time::timeout_at(deadline, rx).await.is_err() {
                if entry.borrow().in_flight > 0 {
                    deadline = tokio::time::Instant::now() + MAX_WAIT;
                    continue;
                }
                return go();
            }
        }
    }

    /// Batch `seq` was handed to the writer: its successor may go.
    fn submitted(&self, sid: i64, client: Id16, seq: u64) {
        let entry = self.entry(sid, client);
        let mut e = entry.borrow_mut();
        e.in_flight = e.in_flight.saturating_sub(1);
        if let Some(next) = e.next {
            e.next = Some(next.max(seq + 1));
        }
        wake_up_to(&mut e);
    }

    /// A batch handed to the writer failed: what the writer expects next is unknown again.
    pub fn forget(&self, sid: i64, client: Id16) {
        let entry = self.entry(sid, client);
        let mut e = entry.borrow_mut();
        e.next = None;
        for (_, waiters) in std::mem::take(&mut e.waiters) {
            for w in waiters {
                let _ = w.send(());
            }
        }
    }
}

/// Undoes `loading` when a load is abandoned, and wakes the waiters so one of them loads.
struct Loading<'a> {
    entry: &'a Rc<RefCell<ClientSeq>>,
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        let mut e = self.entry.borrow_mut();
        e.loading = false;
        for (_, waiters) in std::mem::take(&mut e.waiters) {
            for w in waiters {
                let _ = w.send(());
            }
        }
    }
}

/// Wakes every waiter whose batchSeq may now go.
fn wake_up_to(e: &mut ClientSeq) {
    let Some(next) = e.next else { return };
    let later = e.waiters.split_off(&(next + 1));
    for (_, waiters) in std::mem::replace(&mut e.waiters, later) {
        for w in waiters {
            let _ = w.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(test: impl std::future::Future<Output = ()>) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        tokio::task::LocalSet::new().block_on(&rt, test);
    }

    /// Batches dispatched as 5, 3, 1, 2, 4 reach the writer as 1, 2, 3, 4, 5.
    #[test]
    fn batches_go_through_in_batch_seq_order_whatever_their_dispatch_order() {
        run(async {
            let sequencer = Rc::new(Sequencer::default());
            let order = Rc::new(RefCell::new(Vec::new()));
            let mut tasks = Vec::new();
            for seq in [5u64, 3, 1, 2, 4] {
                let (sequencer, order) = (sequencer.clone(), order.clone());
                tasks.push(tokio::task::spawn_local(async move {
                    let turn = sequencer.turn(7, [1; 16], seq, || Box::pin(async { Ok(0) })).await.unwrap();
                    order.borrow_mut().push(seq);
                    turn.submitted();
                }));
                tokio::task::yield_now().await;
            }
            for task in tasks {
                task.await.unwrap();
            }
            assert_eq!(*order.borrow(), [1, 2, 3, 4, 5]);
        });
    }

    /// Replays pass at once; a batch whose predecessor never comes passes after MAX_WAIT (and
    /// the writer then answers capsync/gap).
    #[test]
    fn replays_pass_and_a_missing_predecessor_is_waited_for_a_bounded_time() {
        run(async {
            let sequencer = Sequencer::default();
            sequencer.turn(7, [2; 16], 3, || Box::pin(async { Ok(4) })).await.unwrap().submitted();
            let started = tokio::time::Instant::now();
            sequencer.turn(7, [2; 16], 9, || unreachable!("loaded once")).await.unwrap().submitted();
            assert_eq!(started.elapsed(), MAX_WAIT);
        });
    }

    /// A load abandoned midway (its call dropped) lets the next batch load instead of waiting.
    #[test]
    fn an_abandoned_load_does_not_stall_the_next_batch() {
        run(async {
            let sequencer = Sequencer::default();
            let stuck = sequencer.turn(7, [3; 16], 1, || Box::pin(std::future::pending()));
            assert!(tokio::time::timeout(Duration::from_millis(10), stuck).await.is_err());
            let started = tokio::time::Instant::now();
            sequencer.turn(7, [3; 16], 1, || Box::pin(async { Ok(0) })).await.unwrap().submitted();
            assert!(started.elapsed() < MAX_WAIT, "it loaded at once instead of waiting");
        });
    }

    /// A predecessor still being written (a slow commit) holds its successor back for as long
    /// as it takes, not only MAX_WAIT; once it is submitted the successor goes.
    #[test]
    fn a_batch_waits_for_a_predecessor_in_flight_longer_than_max_wait() {
        run(async {
            let sequencer = Rc::new(Sequencer::default());
            let first = sequencer.turn(7, [4; 16], 1, || Box::pin(async { Ok(0) })).await.unwrap();
            let second = {
                let sequencer = sequencer.clone();
                tokio::task::spawn_local(async move {
                    sequencer.turn(7, [4; 16], 2, || unreachable!("loaded once")).await.unwrap().submitted();
                    tokio::time::Instant::now()
                })
            };
            tokio::time::sleep(MAX_WAIT * 5).await;
            assert!(!second.is_finished(), "the successor waits while its predecessor is in flight");
            let released = tokio::time::Instant::now();
            first.submitted();
            assert_eq!(second.await.unwrap(), released);
        });
    }

    /// A turn dropped without being submitted (a failed call) lets the successor re-read the
    /// next batchSeq from the store instead of waiting.
    #[test]
    fn a_dropped_turn_makes_the_next_batch_seq_unknown_again() {
        run(async {
            let sequencer = Sequencer::default();
            drop(sequencer.turn(7, [5; 16], 1, || Box::pin(async { Ok(0) })).await.unwrap());
            let started = tokio::time::Instant::now();
            sequencer.turn(7, [5; 16], 1, || Box::pin(async { Ok(0) })).await.unwrap().submitted();
            assert!(started.elapsed() < MAX_WAIT);
        });
    }
}
