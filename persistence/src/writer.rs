//! The single writer thread, with group commit.
//!
//! Every write of a database goes through one thread that owns its only write connection, so
//! writes are serialised in submission order and two writers never race on a session. The
//! thread takes every job waiting in its queue, runs each inside a `SAVEPOINT` of one
//! transaction, commits once, and only then completes the jobs: many connections' batches share
//! one fsync, and no completion (ack) ever precedes its commit. Urgent jobs (revocations) are
//! taken ahead of everything still queued.

use crate::StorageError;
use rusqlite::Connection;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Called once the group a job belonged to has committed (`Ok`) or failed to (`Err`).
pub type Completion = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

/// What a job's body decided: keep its changes or roll them back, and what to run after commit.
pub struct JobOutcome {
    pub keep: bool,
    pub completion: Completion,
}

/// A write transaction on a capsync database. Its typed methods live beside the schema they
/// write ([`crate::server`]); jobs never see SQL.
pub struct Txn<'a> {
    pub(crate) conn: &'a Connection,
}

impl<'a> Txn<'a> {
    /// Runs `work` in one transaction on `conn`, committing if it returns `Ok`. For tests,
    /// tools and fuzzing; the server writes only through its [`Writer`].
    pub fn run<T, E: From<crate::StorageError>>(
        conn: &mut Connection,
        work: impl FnOnce(&Txn<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let tx = conn.transaction().map_err(|e| E::from(e.into()))?;
        let value = work(&Txn { conn: &tx })?;
        tx.commit().map_err(|e| E::from(e.into()))?;
        Ok(value)
    }
}

type JobBody = Box<dyn for<'a> FnOnce(&Txn<'a>) -> JobOutcome + Send>;

/// A unit of work for the writer.
pub struct WriteJob {
    /// A barrier ends its group: jobs after it run only once its completion has run. Used for
    /// revocations, whose completion updates in-memory state later jobs depend on.
    pub barrier: bool,
    /// An urgent job (a revocation, the emergency brake) is taken before every job still
    /// waiting in the queue; it never waits behind a flood of appends. It always runs as a
    /// barrier, in a group of its own.
    pub urgent: bool,
    /// How much the job writes (an append: its ops), summed per group for metrics.
    pub weight: u64,
    pub body: JobBody,
}

/// What one write group did, reported to the writer's observer (metrics) after it completes.
#[derive(Clone, Debug)]
pub struct GroupReport {
    /// Jobs that ran in the group (fewer than were taken if a revocation cut it short).
    pub jobs: usize,
    /// The sum of their weights.
    pub weight: u64,
    /// Running the jobs and committing them (the fsync).
    pub took: std::time::Duration,
    /// Jobs still waiting when the group finished.
    pub queued: usize,
    pub committed: bool,
}

/// Receives a [`GroupReport`] on the writer thread after each group; must be quick.
pub type GroupObserver = Arc<dyn Fn(&GroupReport) + Send + Sync>;

impl WriteJob {
    pub fn new(body: impl for<'a> FnOnce(&Txn<'a>) -> JobOutcome + Send + 'static) -> WriteJob {
        WriteJob { barrier: false, urgent: false, weight: 1, body: Box::new(body) }
    }

    /// Sets how much the job writes (see [`WriteJob::weight`]).
    pub fn with_weight(mut self, weight: u64) -> WriteJob {
        self.weight = weight;
        self
    }

    pub fn barrier(body: impl for<'a> FnOnce(&Txn<'a>) -> JobOutcome + Send + 'static) -> WriteJob {
        WriteJob { barrier: true, urgent: false, weight: 1, body: Box::new(body) }
    }

    /// A barrier that jumps the queue (see [`WriteJob::urgent`]).
    pub fn urgent(body: impl for<'a> FnOnce(&Txn<'a>) -> JobOutcome + Send + 'static) -> WriteJob {
        WriteJob { barrier: true, urgent: true, weight: 1, body: Box::new(body) }
    }
}

/// The writer's two queues: urgent jobs first, then the rest in submission order.
#[derive(Default)]
struct Queues {
    urgent: VecDeque<WriteJob>,
    normal: VecDeque<WriteJob>,
    closed: bool,
    panicked: bool,
}

#[derive(Default)]
struct Queue {
    jobs: Mutex<Queues>,
    ready: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn urgent_waiting(&self) -> bool {
        !self.lock().urgent.is_empty()
    }

    /// Puts `jobs` back at the head of the normal queue, keeping their order.
    fn requeue_front(&self, jobs: Vec<WriteJob>) {
        let mut queues = self.lock();
        for job in jobs.into_iter().rev() {
            queues.normal.push_front(job);
        }
    }

    /// The next group to run: one urgent job alone, or normal jobs up to a barrier (a barrier
    /// starts its own group so that everything before it is committed and completed first).
    /// `None` once closed and drained.
    fn next_group(&self) -> Option<Vec<WriteJob>> {
        let mut queues = self.lock();
        loop {
            if let Some(job) = queues.urgent.pop_front() {
                return Some(vec![job]);
            }
            if let Some(first) = queues.normal.pop_front() {
                let mut group = vec![first];
                while !group[group.len() - 1].barrier && group.len() < MAX_GROUP {
                    match queues.normal.front() {
                        Some(next) if !next.barrier => group.push(queues.normal.pop_front().expect("front exists")),
                        _ => break,
                    }
                }
                return Some(group);
            }
            if queues.closed {
                return None;
            }
            queues = self.ready.wait(queues).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Handle to the writer thread. The thread exits once the writer is shut down (or dropped)
/// and its queue is drained.
pub struct Writer {
    queue: Arc<Queue>,
    thread: Option<JoinHandle<()>>,
}

/// Most jobs one transaction takes; bounds the latency a long queue adds to its first job.
const MAX_GROUP: usize = 1024;

impl Writer {
    /// Starts the thread, which owns `conn` from now on.
    pub fn start(name: &str, conn: Connection) -> Writer {
        Writer::start_observed(name, conn, None)
    }

    /// [`Writer::start`], reporting each group to `observer`.
    pub fn start_observed(name: &str, mut conn: Connection, observer: Option<GroupObserver>) -> Writer {
        let queue = Arc::new(Queue::default());
        let jobs = queue.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-writer"))
            .spawn(move || {
                while let Some(group) = jobs.next_group() {
                    let run = std::panic::AssertUnwindSafe(|| run_group(&mut conn, group, &jobs, observer.as_deref()));
                    if std::panic::catch_unwind(run).is_err() {
                        // A bug, not a storage failure: stop rather than write on after it.
                        // Dropping the queued jobs fails their futures with `Stopped`.
                        tracing::error!("a write job panicked: the writer stops and every queued write fails");
                        let mut queues = jobs.lock();
                        queues.closed = true;
                        queues.panicked = true;
                        queues.urgent.clear();
                        queues.normal.clear();
                        return;
                    }
                }
            })
            .expect("spawning the writer thread");
        Writer { queue, thread: Some(thread) }
    }

    /// A writer that takes no jobs (what remains after its thread was handed off to stop).
    pub fn stopped() -> Writer {
        let queue = Queue::default();
        queue.lock().closed = true;
        Writer { queue: Arc::new(queue), thread: None }
    }

    pub fn submit(&self, job: WriteJob) -> Result<(), StorageError> {
        let mut queues = self.queue.lock();
        if queues.closed {
            return Err(StorageError::Stopped);
        }
        let (barrier, urgent) = (job.barrier, job.urgent);
        if urgent {
            queues.urgent.push_back(job);
        } else {
            queues.normal.push_back(job);
        }
        tracing::trace!(barrier, urgent, waiting = queues.normal.len(), "write queued");
        drop(queues);
        self.queue.ready.notify_one();
        Ok(())
    }

    /// Jobs waiting to run (not counting the group being committed).
    pub fn queued(&self) -> usize {
        let queues = self.queue.lock();
        queues.urgent.len() + queues.normal.len()
    }

    /// Stops taking jobs, lets the queue drain (every queued job commits and completes) and
    /// waits for the thread. A writer thread that panicked is reported, not hidden.
    pub fn shutdown(&mut self) -> Result<(), StorageError> {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
        let joined = self.thread.take().map(JoinHandle::join);
        if matches!(joined, Some(Err(_))) || self.queue.lock().panicked {
            return Err(StorageError::Stopped);
        }
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn run_group(conn: &mut Connection, group: Vec<WriteJob>, queue: &Queue, observer: Option<&(dyn Fn(&GroupReport) + Send + Sync)>) {
    let started = std::time::Instant::now();
    let mut weight = 0;
    let mut completions = Vec::with_capacity(group.len());
    let committed = (|| -> Result<(), StorageError> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // A job alone in its group needs no savepoint: the transaction is its savepoint.
        let alone = group.len() == 1;
        let mut keep_any = false;
        {
            let typed = Txn { conn: &tx };
            let mut jobs = group.into_iter();
            while let Some(job) = jobs.next() {
                if !completions.is_empty() && queue.urgent_waiting() {
                    // A revocation arrived: commit what ran, let it go next, and put the rest
                    // of this group back at the head of the queue, in order.
                    let mut rest = vec![job];
                    rest.extend(jobs.by_ref());
                    queue.requeue_front(rest);
                    break;
                }
                if !alone {
                    tx.prepare_cached("SAVEPOINT job")?.execute([])?;
                }
                weight += job.weight;
                let outcome = (job.body)(&typed);
                keep_any |= outcome.keep;
                completions.push(outcome.completion);
                if tx.is_autocommit() {
                    // SQLite rolled the whole transaction back itself (it does on SQLITE_FULL
                    // and some I/O errors): every job of the group is undone, none may be acked.
                    return Err(StorageError::RolledBack);
                }
                if !alone {
                    if outcome.keep {
                        tx.prepare_cached("RELEASE job")?.execute([])?;
                    } else {
                        tx.prepare_cached("ROLLBACK TO job")?.execute([])?;
                        tx.prepare_cached("RELEASE job")?.execute([])?;
                    }
                }
            }
        }
        if alone && !keep_any {
            tx.rollback()?;
        } else {
            crate::failpoint::hit("writer-before-commit");
            tx.commit()?;
        }
        Ok(())
    })();
    if let Err(err) = &committed {
        tracing::error!(error = %err, jobs = completions.len(), "write group failed to commit");
    } else {
        tracing::trace!(jobs = completions.len(), "write group committed");
    }
    let report = GroupReport {
        jobs: completions.len(),
        weight,
        took: started.elapsed(),
        queued: { let q = queue.lock(); q.urgent.len() + q.normal.len() },
        committed: committed.is_ok(),
    };
    for completion in completions {
        completion(committed.clone());
    }
    if let Some(observe) = observer {
        observe(&report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(log: &Arc<Mutex<Vec<&'static str>>>, name: &'static str, urgent: bool) -> WriteJob {
        let log = log.clone();
        let body = move |_: &Txn<'_>| {
            log.lock().unwrap().push(name);
            JobOutcome { keep: true, completion: Box::new(|_| {}) }
        };
        if urgent { WriteJob::urgent(body) } else { WriteJob::new(body) }
    }

    #[test]
    fn an_urgent_job_runs_before_the_jobs_queued_ahead_of_it() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut writer = Writer::start("test", Connection::open_in_memory().unwrap());
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let hold_rx = Mutex::new(hold_rx);
        // The first job holds the writer, alone in its group, until every other job is queued.
        writer
            .submit(WriteJob::new(move |_| {
                started_tx.send(()).unwrap();
                let _ = hold_rx.lock().unwrap().recv();
                JobOutcome { keep: true, completion: Box::new(|_| {}) }
            }))
            .unwrap();
        started_rx.recv().unwrap();
        for name in ["a1", "a2", "a3"] {
            writer.submit(job(&log, name, false)).unwrap();
        }
        writer.submit(job(&log, "revoke", true)).unwrap();
        assert_eq!(writer.queued(), 4);
        hold_tx.send(()).unwrap();
        writer.shutdown().unwrap();
        assert_eq!(*log.lock().unwrap(), ["revoke", "a1", "a2", "a3"]);
    }

    #[test]
    fn an_urgent_job_cuts_the_group_in_progress_short_and_the_rest_keeps_its_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut writer = Writer::start("test", Connection::open_in_memory().unwrap());
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let hold_rx = Mutex::new(hold_rx);
        let queue = writer.queue.clone();
        // Hold the writer so the next jobs form one group, then let it start that group.
        writer
            .submit(WriteJob::new(move |_| {
                let _ = hold_rx.lock().unwrap().recv();
                JobOutcome { keep: true, completion: Box::new(|_| {}) }
            }))
            .unwrap();
        let first = log.clone();
        writer
            .submit(WriteJob::new(move |_| {
                first.lock().unwrap().push("g1");
                started_tx.send(()).unwrap();
                // The revocation arrives while this group runs.
                while queue.lock().urgent.is_empty() {
                    std::thread::yield_now();
                }
                JobOutcome { keep: true, completion: Box::new(|_| {}) }
            }))
            .unwrap();
        for name in ["g2", "g3"] {
            writer.submit(job(&log, name, false)).unwrap();
        }
        hold_tx.send(()).unwrap();
        started_rx.recv().unwrap();
        writer.submit(job(&log, "revoke", true)).unwrap();
        writer.shutdown().unwrap();
        assert_eq!(*log.lock().unwrap(), ["g1", "revoke", "g2", "g3"]);
    }

    #[test]
    fn a_panicking_writer_thread_is_reported_at_shutdown() {
        let mut writer = Writer::start("test", Connection::open_in_memory().unwrap());
        writer.submit(WriteJob::new(|_| panic!("a bug in a job"))).unwrap();
        assert!(matches!(writer.shutdown(), Err(StorageError::Stopped)));
        assert!(writer.submit(WriteJob::new(|_| unreachable!())).is_err(), "no job is taken after shutdown");
    }
}
