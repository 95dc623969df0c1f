//! In-memory epoch cells, shared by every live capability and the revocation path.
//!
//! A live capability remembers, for each object up its chain (share → parent shares →
//! session, then the space it descends from if any; or the admin object; or a space), the cell
//! of that object and the epoch it was granted
//! under. Revocation bumps the cell after its transaction commits, so the next call on any
//! connection fails with one comparison per link, without a database read.
//!
//! Cells only grow (`fetch_max`): a redeem that read an older epoch from the database before a
//! revocation bumped the cell can never lower it again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ObjectKey {
    Admin,
    Session(String),
    Share(String),
    Space(String),
}

pub struct EpochRegistry {
    cells: Mutex<HashMap<ObjectKey, Arc<AtomicU64>>>,
    /// Counts revocations, so long-lived work (subscriptions) wakes up and re-checks at once.
    revocations: tokio::sync::watch::Sender<u64>,
    /// Whether the cells are known to be current. With several nodes, cells learn of other
    /// nodes' revocations through the store's notifications: while that stream is down (and
    /// until the cells were re-read after it came back) they may be stale, and calls are
    /// answered `overloaded` instead of being judged on them.
    current: Arc<Currency>,
}

/// See [`EpochRegistry::current`]: a flag for the calls' fast path and a watch to wait on.
#[derive(Debug)]
pub struct Currency {
    flag: AtomicBool,
    changed: tokio::sync::watch::Sender<bool>,
}

impl Currency {
    pub fn holds(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    pub fn watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.changed.subscribe()
    }
}

impl Default for EpochRegistry {
    fn default() -> EpochRegistry {
        EpochRegistry {
            cells: Mutex::default(),
            revocations: tokio::sync::watch::channel(0).0,
            current: Arc::new(Currency { flag: AtomicBool::new(true), changed: tokio::sync::watch::channel(true).0 }),
        }
    }
}

/// One link of a capability's chain: the object's cell and the epoch the grant needs.
#[derive(Clone, Debug)]
pub struct EpochLink {
    /// The object, so a store can check the same link against its own rows.
    pub key: ObjectKey,
    pub cell: Arc<AtomicU64>,
    pub expected: u64,
}

impl EpochLink {
    pub fn holds(&self) -> bool {
        self.cell.load(Ordering::Acquire) == self.expected
    }
}

impl EpochRegistry {
    /// The cell of `key`, raised to at least `observed` (an epoch just read from the database).
    pub fn cell(&self, key: ObjectKey, observed: u64) -> Arc<AtomicU64> {
        let mut cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        let cell = cells.entry(key).or_insert_with(|| Arc::new(AtomicU64::new(observed)));
        cell.fetch_max(observed, Ordering::AcqRel);
        Arc::clone(cell)
    }

    /// Records a committed revocation: every link expecting an older epoch stops holding.
    pub fn bump(&self, key: ObjectKey, epoch: u64) {
        self.cell(key, epoch);
        self.revocations.send_modify(|n| *n += 1);
    }

    /// Raises `key`'s cell to `epoch` if it is behind (an epoch re-read from the store), waking
    /// long-lived work only if it moved.
    pub fn raise(&self, key: ObjectKey, epoch: u64) {
        let cell = self.cell(key, 0);
        if cell.fetch_max(epoch, Ordering::AcqRel) < epoch {
            self.revocations.send_modify(|n| *n += 1);
        }
    }

    /// Every object that has a cell.
    pub fn keys(&self) -> Vec<ObjectKey> {
        self.cells.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// Whether the cells are current (see the field's docs), shared with every live capability.
    pub fn currency(&self) -> Arc<Currency> {
        self.current.clone()
    }

    pub fn set_current(&self, current: bool) {
        self.current.flag.store(current, Ordering::Release);
        self.current.changed.send_replace(current);
    }

    /// Changes after every revocation.
    pub fn watch_revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revocations.subscribe()
    }
}
