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
//!
//! # Pruning
//!
//! Every object redeemed or revoked (here, or on another node sharing the store) gets a cell,
//! so peers would grow the map without end. A sweep drops the cells that nothing but the map
//! holds, which bounds the map by the live capabilities (and the writes in flight, whose
//! guards hold their cells too).
//!
//! Dropping a cell must not reopen the race that `fetch_max` closes: a resolution reads epoch
//! e, a revocation commits e+1 and bumps the cell, the resolution asks for the cell with e. Had
//! the bumped cell been dropped in between, a fresh cell at e would make the new capability
//! live. So every store read whose epochs become cells takes a [`Ticket`] first, and cells are
//! made only through a ticket (or by a revocation). The registry keeps a clock that ticks each
//! time a cell is made or raised, and remembers each cell's last tick:
//! - a ticket taken after a cell's last raise was taken after the revocation behind it had
//!   committed (cells are bumped after the commit), so its read sees that epoch or a later one;
//! - a sweep drops a cell only if nothing holds it and no ticket still in flight was taken
//!   before its last raise.
//!
//! Making a cell from a read counts as a raise too: a newer resolution may have read an epoch
//! whose revocation this node has not heard of yet, and an older one in flight needs that cell.
//!
//! With several nodes, another node's revocation reaches this one only as a notification.
//! While those are lost, an object without a cell here has nothing to record one in, and the
//! re-read after (`fanout::resync`) covers only the cells kept. So a ticket taken while the
//! cells were not current, or before they last stopped being current, is not trusted:
//! [`Ticket::confirm`] refuses it as retryable, and the client redeems again.
//!
//! Sweeps are rare and off the hot path: one is due when the map has doubled since the last
//! one (from [`SWEEP_MIN`] cells), and one runs every [`SWEEP_EVERY`] anyway, both in the
//! [`EpochRegistry::sweeper`] task on the RPC thread's `LocalSet`. Making a cell stays O(1)
//! (it only wakes that task), and the SQLite writer thread, which bumps cells, never sweeps.
//! A resolution stuck in the store keeps the cells raised after it began until it ends: the
//! growth it allows is bounded by how long a store call can take.

use crate::error::ServerError;
use crate::metrics::Metrics;
use std::collections::hash_map::Entry;
use std::collections::{btree_map, BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// A sweep is never asked for below this many cells: a map this small costs nothing.
pub const SWEEP_MIN: usize = 64;
/// A sweep runs at least this often, so cells released after the last growth go too.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ObjectKey {
    Admin,
    Session(String),
    Share(String),
    Space(String),
}

pub struct EpochRegistry {
    cells: Mutex<Cells>,
    /// Wakes the sweeper when the map has outgrown its last sweep.
    sweep_due: Arc<tokio::sync::Notify>,
    /// Counts revocations, so long-lived work (subscriptions) wakes up and re-checks at once.
    revocations: tokio::sync::watch::Sender<u64>,
    /// Whether the cells are known to be current. With several nodes, cells learn of other
    /// nodes' revocations through the store's notifications: while that stream is down (and
    /// until the cells were re-read after it came back) they may be stale, and calls are
    /// answered `overloaded` instead of being judged on them.
    current: Arc<Currency>,
    /// Where the number of cells is shown (`capsync_epoch_cells`), if anywhere.
    metrics: Option<Arc<Metrics>>,
}

/// The map and what its sweeps go by, under one lock.
struct Cells {
    map: HashMap<ObjectKey, Slot>,
    /// Ticks when a cell is made or raised, and when the cells stop being current.
    clock: u64,
    /// The tickets in flight: the clock when each was taken, and how many were taken then.
    in_flight: BTreeMap<u64, usize>,
    /// The clock when the cells last stopped being current.
    lost_at: u64,
    /// The map's size at which the next sweep is due.
    sweep_at: usize,
}

struct Slot {
    cell: Arc<AtomicU64>,
    /// The clock when the cell was made or last raised.
    raised: u64,
}

impl Cells {
    /// Raises `key`'s cell to `epoch`, making it if `make`; the cell, if there is one, and
    /// whether it was made or moved.
    fn raise(&mut self, key: ObjectKey, epoch: u64, make: bool) -> (Option<Arc<AtomicU64>>, bool) {
        let slot = match self.map.entry(key) {
            Entry::Occupied(slot) => {
                let slot = slot.into_mut();
                if slot.cell.fetch_max(epoch, Ordering::AcqRel) >= epoch {
                    return (Some(slot.cell.clone()), false);
                }
                slot
            }
            Entry::Vacant(_) if !make => return (None, false),
            Entry::Vacant(vacant) => vacant.insert(Slot { cell: Arc::new(AtomicU64::new(epoch)), raised: 0 }),
        };
        self.clock += 1;
        slot.raised = self.clock;
        (Some(slot.cell.clone()), true)
    }
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
            cells: Mutex::new(Cells { map: HashMap::new(), clock: 0, in_flight: BTreeMap::new(), lost_at: 0, sweep_at: SWEEP_MIN }),
            sweep_due: Arc::default(),
            revocations: tokio::sync::watch::channel(0).0,
            current: Arc::new(Currency { flag: AtomicBool::new(true), changed: tokio::sync::watch::channel(true).0 }),
            metrics: None,
        }
    }
}

impl Drop for EpochRegistry {
    /// Lets the sweeper see that the registry is gone and end.
    fn drop(&mut self) {
        self.sweep_due.notify_one();
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
    /// A registry that shows its number of cells in `metrics`.
    pub fn observed(metrics: Arc<Metrics>) -> EpochRegistry {
        let mut registry = EpochRegistry::default();
        registry.metrics = Some(metrics);
        registry
    }

    fn lock(&self) -> MutexGuard<'_, Cells> {
        self.cells.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Taken before a store read whose epochs will become cells (see the module docs); the
    /// cells are then made with [`Ticket::link`].
    pub fn ticket(&self) -> Ticket<'_> {
        let mut cells = self.lock();
        let start = cells.clock;
        *cells.in_flight.entry(start).or_default() += 1;
        Ticket { registry: self, start, current: self.current.holds() }
    }

    /// Raises `key`'s cell to `epoch`, making it if missing (under the lock, `cells`). A new
    /// cell is shown, and wakes the sweeper if the map has grown to the next sweep.
    fn make(&self, cells: &mut Cells, key: ObjectKey, epoch: u64) -> Arc<AtomicU64> {
        let before = cells.map.len();
        let (cell, _) = cells.raise(key, epoch, true);
        if cells.map.len() > before {
            if cells.map.len() >= cells.sweep_at {
                self.sweep_due.notify_one();
            }
            self.show(cells);
        }
        cell.expect("raise makes a missing cell")
    }

    fn show(&self, cells: &Cells) {
        if let Some(metrics) = &self.metrics {
            metrics.epoch_cells(cells.map.len());
        }
    }

    /// Records a committed revocation: every link expecting an older epoch stops holding.
    /// The cell is made if missing: a resolution in flight may have read the older epoch.
    pub fn bump(&self, key: ObjectKey, epoch: u64) {
        self.make(&mut self.lock(), key, epoch);
        self.revocations.send_modify(|n| *n += 1);
    }

    /// Raises `key`'s cell to `epoch` if it is behind (an epoch re-read from the store), waking
    /// long-lived work only if it moved. A missing cell stays missing: nothing holds one, and a
    /// resolution that could have read the older epoch is refused by [`Ticket::confirm`] (this
    /// is only called while the cells are not current).
    pub fn raise(&self, key: ObjectKey, epoch: u64) {
        let (_, moved) = self.lock().raise(key, epoch, false);
        if moved {
            self.revocations.send_modify(|n| *n += 1);
        }
    }

    /// Every object that has a cell (the cells a sweep kept, and those made since).
    pub fn keys(&self) -> Vec<ObjectKey> {
        self.lock().map.keys().cloned().collect()
    }

    /// How many cells there are.
    pub fn count(&self) -> usize {
        self.lock().map.len()
    }

    /// Drops every cell that nothing but the map holds and that no ticket in flight may still
    /// need (see the module docs); returns how many went.
    pub fn sweep(&self) -> usize {
        let mut cells = self.lock();
        let before = cells.map.len();
        // A ticket taken at `oldest` or later read after every raise up to `oldest`.
        let oldest = cells.in_flight.keys().next().copied().unwrap_or(u64::MAX);
        cells.map.retain(|_, slot| Arc::strong_count(&slot.cell) > 1 || slot.raised > oldest);
        let kept = cells.map.len();
        // Memory too: a map that once held many cells keeps its table until told.
        if cells.map.capacity() > 4 * kept.max(SWEEP_MIN) {
            cells.map.shrink_to(2 * kept);
        }
        cells.sweep_at = SWEEP_MIN.max(2 * kept);
        self.show(&cells);
        before - kept
    }

    /// Sweeps whenever one is due, and every [`SWEEP_EVERY`]; ends once the registry is gone.
    /// Runs on the RPC thread's `LocalSet`.
    pub fn sweeper(self: &Arc<Self>) -> impl std::future::Future<Output = ()> + Send + 'static {
        let registry = Arc::downgrade(self);
        let due = self.sweep_due.clone();
        async move {
            loop {
                let _ = tokio::time::timeout(SWEEP_EVERY, due.notified()).await;
                let Some(registry) = registry.upgrade() else { return };
                registry.sweep();
            }
        }
    }

    /// Whether the cells are current (see the field's docs), shared with every live capability.
    pub fn currency(&self) -> Arc<Currency> {
        self.current.clone()
    }

    pub fn set_current(&self, current: bool) {
        {
            // Under the lock, so every ticket is known to be taken before or after the loss.
            let mut cells = self.lock();
            if !current {
                cells.clock += 1;
                cells.lost_at = cells.clock;
            }
            self.current.flag.store(current, Ordering::Release);
        }
        self.current.changed.send_replace(current);
    }

    /// Changes after every revocation.
    pub fn watch_revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revocations.subscribe()
    }
}

/// A store read in flight whose epochs will become cells: while it is held, no cell raised
/// after it was taken is dropped. Take it before the read, make the cells with
/// [`Ticket::link`], then [`Ticket::confirm`].
pub struct Ticket<'a> {
    registry: &'a EpochRegistry,
    /// The registry's clock when it was taken.
    start: u64,
    /// Whether the cells were current when it was taken.
    current: bool,
}

impl Ticket<'_> {
    /// The link of `key` for a grant that needs `expected`, with the cell raised to at least
    /// `observed` (an epoch read from the store after this ticket was taken).
    pub fn link(&self, key: ObjectKey, observed: u64, expected: u64) -> EpochLink {
        let cell = self.registry.make(&mut self.registry.lock(), key.clone(), observed);
        EpochLink { key, cell, expected }
    }

    /// Whether the cells could have missed a revocation since this ticket was taken (another
    /// node's, while the notifications were lost): if so, what was read under it is not
    /// trusted and the call is refused as retryable. Call it after the links are made.
    pub fn confirm(&self) -> Result<(), ServerError> {
        if self.current && self.registry.lock().lost_at <= self.start {
            return Ok(());
        }
        Err(ServerError::Overloaded("this node lost other nodes' revocations while this was read; retry".into()))
    }

    pub fn registry(&self) -> &EpochRegistry {
        self.registry
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut cells = self.registry.lock();
        if let btree_map::Entry::Occupied(mut taken) = cells.in_flight.entry(self.start) {
            *taken.get_mut() -= 1;
            if *taken.get() == 0 {
                taken.remove();
            }
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    fn share(i: usize) -> ObjectKey {
        ObjectKey::Share(format!("share-{i}"))
    }

    #[test]
    fn cells_nothing_holds_are_pruned_and_held_ones_kept() {
        let registry = EpochRegistry::default();
        let ticket = registry.ticket();
        let links: Vec<EpochLink> = (0..10).map(|i| ticket.link(share(i), 1, 1)).collect();
        drop(ticket);
        assert_eq!(registry.sweep(), 0, "every cell is held");
        assert_eq!(registry.count(), 10);
        let kept = links[6..].to_vec();
        drop(links);
        assert_eq!(registry.sweep(), 6);
        assert_eq!(registry.count(), 4);
        let mut keys = registry.keys();
        keys.sort_by_key(|k| format!("{k:?}"));
        assert_eq!(keys, (6..10).map(share).collect::<Vec<_>>(), "keys() names only the cells kept");
        drop(kept);
        assert_eq!(registry.sweep(), 4);
        assert!(registry.keys().is_empty());
    }

    #[test]
    fn a_held_cell_survives_sweeps_and_still_sees_later_bumps() {
        let registry = EpochRegistry::default();
        let link = registry.ticket().link(share(1), 3, 3);
        // Other cells come and go around it.
        registry.bump(share(2), 1);
        for _ in 0..3 {
            registry.sweep();
        }
        assert_eq!(registry.keys(), vec![share(1)]);
        assert!(link.holds());
        registry.bump(share(1), 4);
        assert!(!link.holds(), "a bump after the sweeps reaches the link's cell");
        // And a later grant of the same object shares that cell.
        let again = registry.ticket().link(share(1), 4, 4);
        assert!(Arc::ptr_eq(&again.cell, &link.cell));
    }

    #[test]
    fn a_revocation_during_a_resolution_is_not_swept_away() {
        let registry = EpochRegistry::default();
        let ticket = registry.ticket();
        // The resolution reads epoch 3 from the store here; then a revocation commits 4 and
        // bumps the cell, which nothing holds; then a sweep.
        registry.bump(share(1), 4);
        registry.sweep();
        let link = ticket.link(share(1), 3, 3);
        assert!(!link.holds(), "the capability is born revoked");
        ticket.confirm().unwrap();
        drop((link, ticket));
        assert_eq!(registry.sweep(), 1, "the cell goes once no older resolution is in flight");
    }

    #[test]
    fn a_newer_read_protects_an_older_resolution_too() {
        let registry = EpochRegistry::default();
        let older = registry.ticket();
        // It reads 3; another node's revocation to 4 commits and is not heard of yet; a newer
        // resolution reads 4, makes the cell and is gone. The older one must find the cell.
        drop(registry.ticket().link(share(1), 4, 4));
        registry.sweep();
        assert!(!older.link(share(1), 3, 3).holds());
    }

    #[test]
    fn tickets_taken_after_a_revocation_do_not_hold_its_cell() {
        let registry = EpochRegistry::default();
        let before = registry.ticket();
        registry.bump(share(1), 4);
        let after = registry.ticket();
        assert_eq!(registry.sweep(), 0, "the older ticket may still need it");
        drop(before);
        assert_eq!(registry.sweep(), 1, "the newer one read epoch 4 or later");
        drop(after);
    }

    #[test]
    fn a_resolution_that_overlapped_lost_notifications_is_refused() {
        let registry = EpochRegistry::default();
        let before = registry.ticket();
        registry.set_current(false);
        let during = registry.ticket();
        registry.set_current(true);
        let after = registry.ticket();
        let overloaded = |t: &Ticket<'_>| matches!(t.confirm(), Err(ServerError::Overloaded(_)));
        assert!(overloaded(&before), "taken before the loss");
        assert!(overloaded(&during), "taken while the cells were not current");
        after.confirm().unwrap();
    }

    #[test]
    fn a_re_read_epoch_raises_kept_cells_only() {
        let registry = EpochRegistry::default();
        let link = registry.ticket().link(share(1), 1, 1);
        let woken = registry.watch_revocations();
        registry.raise(share(1), 2);
        registry.raise(share(2), 2);
        assert!(!link.holds());
        assert!(woken.has_changed().unwrap());
        assert_eq!(registry.keys(), vec![share(1)], "no cell is made for an object nothing holds");
    }

    #[tokio::test]
    async fn a_sweep_runs_once_the_map_has_doubled_and_the_sweeper_ends_with_the_registry() {
        let registry = Arc::new(EpochRegistry::observed(Arc::new(Metrics::new())));
        let sweeper = tokio::spawn(registry.sweeper());
        let settle = || async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        };
        for i in 1..SWEEP_MIN {
            registry.bump(share(i), 1);
        }
        settle().await;
        assert_eq!(registry.count(), SWEEP_MIN - 1, "not due yet");
        registry.bump(share(SWEEP_MIN), 1);
        settle().await;
        assert_eq!(registry.count(), 0, "due at {SWEEP_MIN} cells");
        assert!(registry.metrics.as_ref().unwrap().encode().contains("capsync_epoch_cells 0"));
        drop(registry);
        tokio::time::timeout(Duration::from_secs(5), sweeper).await.unwrap().unwrap();
    }
}
