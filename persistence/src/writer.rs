//! The single writer thread, with group commit.
//!
//! Every write of a database goes through one thread that owns its only write connection, so
//! writes are serialised in submission order and two writers never race on a session. The
//! thread takes every job waiting in its queue, runs each inside a `SAVEPOINT` of one
//! transaction, commits once, and only then completes the jobs: many connections' batches share
//! one fsync, and no completion (ack) ever precedes its commit.

use crate::StorageError;
use rusqlite::Connection;
use std::sync::mpsc;
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
    pub body: JobBody,
}

impl WriteJob {
    pub fn new(body: impl for<'a> FnOnce(&Txn<'a>) -> JobOutcome + Send + 'static) -> WriteJob {
        WriteJob { barrier: false, body: Box::new(body) }
    }

    pub fn barrier(body: impl for<'a> FnOnce(&Txn<'a>) -> JobOutcome + Send + 'static) -> WriteJob {
        WriteJob { barrier: true, body: Box::new(body) }
    }
}

/// Handle to the writer thread. Cloning the sender is cheap; the thread exits once every
/// sender is gone and its queue is drained.
pub struct Writer {
    sender: Option<mpsc::Sender<WriteJob>>,
    thread: Option<JoinHandle<()>>,
}

/// Most jobs one transaction takes; bounds the latency a long queue adds to its first job.
const MAX_GROUP: usize = 1024;

impl Writer {
    /// Starts the thread, which owns `conn` from now on.
    pub fn start(name: &str, mut conn: Connection) -> Writer {
        let (sender, receiver) = mpsc::channel::<WriteJob>();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-writer"))
            .spawn(move || {
                let mut carried: Option<WriteJob> = None;
                loop {
                    let first = match carried.take() {
                        Some(job) => job,
                        None => match receiver.recv() {
                            Ok(job) => job,
                            Err(_) => return,
                        },
                    };
                    let mut group = vec![first];
                    while !group.last().is_some_and(|j| j.barrier) && group.len() < MAX_GROUP {
                        match receiver.try_recv() {
                            Ok(job) if job.barrier => {
                                // A barrier starts its own group so that everything before it
                                // is committed and completed first.
                                carried = Some(job);
                                break;
                            }
                            Ok(job) => group.push(job),
                            Err(_) => break,
                        }
                    }
                    run_group(&mut conn, group);
                }
            })
            .expect("spawning the writer thread");
        Writer { sender: Some(sender), thread: Some(thread) }
    }

    pub fn submit(&self, job: WriteJob) -> Result<(), StorageError> {
        let sender = self.sender.as_ref().ok_or(StorageError::Stopped)?;
        sender.send(job).map_err(|_| StorageError::Stopped)
    }

    /// Stops taking jobs, lets the queue drain (every queued job commits and completes) and
    /// waits for the thread.
    pub fn shutdown(&mut self) {
        self.sender = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.sender = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run_group(conn: &mut Connection, group: Vec<WriteJob>) {
    let mut completions = Vec::with_capacity(group.len());
    let committed = (|| -> Result<(), StorageError> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // A job alone in its group needs no savepoint: the transaction is its savepoint.
        let alone = group.len() == 1;
        let mut keep_any = false;
        {
            let typed = Txn { conn: &tx };
            for job in group {
                if !alone {
                    tx.prepare_cached("SAVEPOINT job")?.execute([])?;
                }
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
    for completion in completions {
        completion(committed.clone());
    }
}
