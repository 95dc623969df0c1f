//! Delivery of what an import queues: the refs it queued ops for are synced a few at a time,
//! alongside the pass (which yields between chunks, so both make progress on one thread).
//!
//! [`Mode::Once`] (`capsync import`): each ref is synced once its ops are queued; when the server
//! cannot be reached, the rest stays queued for a later `capsync sync` or import. A ref the
//! server refuses (revoked...) is reported and the others go on.
//!
//! [`Mode::Forever`] (`capsync watch`): the same, but a server that is away is retried with
//! backoff until it is back, and a refused ref (capsync/revoked, expired...) stops delivery
//! with an error: the watcher stops, keeping its queue.

use capsync_agents::Agent;
use capsync_client::{Client, ClientError};
use futures::stream::{FuturesUnordered, StreamExt as _};
use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::rc::Rc;
use tokio::sync::Notify;

/// Refs synced at once.
const CONCURRENT: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Once,
    Forever,
}

#[derive(Clone)]
pub struct Deliverer {
    inner: Rc<Inner>,
}

struct Inner {
    client: Client,
    /// `codex:` or `opencode:`: the refs this deliverer looks after.
    prefix: String,
    mode: Mode,
    state: RefCell<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    queue: VecDeque<String>,
    queued: HashSet<String>,
    /// Refs being synced: never two syncs of one ref at once (a ref pushed meanwhile waits).
    running: HashSet<String>,
    closed: bool,
    /// Why the server could not be reached, while it cannot.
    away: Option<String>,
    /// Lines for the user (the server going away and coming back), taken by the watch loop.
    notes: Vec<String>,
}

impl Deliverer {
    pub fn new(client: Client, agent: Agent, mode: Mode) -> Deliverer {
        let inner = Inner { client, prefix: format!("{}:", agent.name()), mode, state: RefCell::default(), wake: Notify::new() };
        Deliverer { inner: Rc::new(inner) }
    }

    /// Asks for `name` to be synced (once, however often asked before its sync starts).
    pub fn push(&self, name: &str) {
        let mut state = self.inner.state.borrow_mut();
        if state.queued.insert(name.to_owned()) {
            state.queue.push_back(name.to_owned());
            drop(state);
            self.inner.wake.notify_one();
        }
    }

    /// Asks for every ref of this agent with unacknowledged ops to be synced (what an earlier
    /// run left queued, a crash included).
    pub fn push_unacked(&self) -> anyhow::Result<()> {
        for name in self.inner.client.refs_with_work()? {
            if name.starts_with(&self.inner.prefix) {
                self.push(&name);
            }
        }
        Ok(())
    }

    /// No more refs will be pushed: [`Deliverer::run`] ends once the queue is delivered.
    pub fn close(&self) {
        self.inner.state.borrow_mut().closed = true;
        self.inner.wake.notify_one();
    }

    pub fn take_notes(&self) -> Vec<String> {
        std::mem::take(&mut self.inner.state.borrow_mut().notes)
    }

    /// Ops of this agent's refs the server has not acknowledged.
    pub fn unacked(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for name in self.inner.client.refs_with_work()? {
            if name.starts_with(&self.inner.prefix) {
                total += self.inner.client.unacked(&name)?;
            }
        }
        Ok(total)
    }

    /// Syncs the refs pushed, [`CONCURRENT`] at a time. `Once`: ends when closed and drained,
    /// with an error naming what was left queued and why. `Forever`: ends only with the error
    /// of a ref the server refused.
    pub async fn run(self) -> Result<(), String> {
        let inner = &self.inner;
        let mut running = FuturesUnordered::new();
        let mut failures = 0u32;
        let mut gave_up: Option<String> = None;
        let mut refused: Vec<String> = Vec::new();
        loop {
            while running.len() < CONCURRENT && gave_up.is_none() {
                let Some(name) = ({
                    let mut state = inner.state.borrow_mut();
                    let at = state.queue.iter().position(|n| !state.running.contains(n));
                    let next = at.and_then(|at| state.queue.remove(at));
                    if let Some(name) = &next {
                        state.queued.remove(name);
                        state.running.insert(name.clone());
                    }
                    next
                }) else {
                    break;
                };
                let client = inner.client.clone();
                running.push(async move {
                    let result = client.sync(&name).await;
                    (name, result)
                });
            }
            if running.is_empty() {
                let drained = {
                    let state = inner.state.borrow();
                    state.closed && state.queue.is_empty()
                };
                if gave_up.is_some() || drained {
                    break;
                }
                inner.wake.notified().await;
                continue;
            }
            let next = tokio::select! {
                next = running.next() => next,
                _ = inner.wake.notified() => continue,
            };
            let Some((name, result)) = next else { continue };
            inner.state.borrow_mut().running.remove(&name);
            match result {
                Ok(_) => {
                    failures = 0;
                    let mut state = inner.state.borrow_mut();
                    if state.away.take().is_some() && inner.mode == Mode::Forever {
                        state.notes.push("the server is reachable again; delivering".into());
                    }
                }
                Err(err) if err.is_retryable() => {
                    let reason = err.to_string();
                    {
                        let mut state = inner.state.borrow_mut();
                        if state.away.is_none() && inner.mode == Mode::Forever {
                            state.notes.push(format!("{reason}: the server is away; ops stay queued and are retried"));
                        }
                        state.away = Some(reason.clone());
                    }
                    match inner.mode {
                        Mode::Once => gave_up = Some(reason),
                        Mode::Forever => {
                            self.push(&name);
                            failures += 1;
                            tokio::time::sleep(capsync_client::sync::backoff(inner.client.options(), failures)).await;
                        }
                    }
                }
                Err(err) => {
                    let line = refusal(&name, &err);
                    match inner.mode {
                        Mode::Once => refused.push(line),
                        Mode::Forever => return Err(line),
                    }
                }
            }
        }
        let mut problems = Vec::new();
        if let Some(reason) = gave_up {
            problems.push(format!("cannot deliver: {reason}; what is queued stays in the outbox (`capsync sync` delivers it later)"));
        }
        if !refused.is_empty() {
            problems.push(refused.join("; "));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// One line for a ref the server refused.
fn refusal(name: &str, err: &ClientError) -> String {
    match err {
        ClientError::RefStopped { .. } => format!("{err}; its ops stay queued"),
        _ => format!("ref {name}: {err}; its ops stay queued"),
    }
}
