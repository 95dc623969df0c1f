//! One pass over an agent's root: every session found is opened through the space (once: the
//! outbox remembers it), and what is new in it is queued with the reader's position.

use super::deliver::Deliverer;
use super::progress::{Reporter, Totals};
use capsync_agents::codex::{self, CodexCursor, CodexReader};
use capsync_agents::opencode::OpencodeStore;
use capsync_agents::{Agent, AgentError, AgentSession, Limits, Record, SessionSource, Warning};
use capsync_client::space::Space;
use capsync_client::{Client, ClientError, ImportProgress, ImportRow};
use capsync_schema::marker::Marker;
use capsync_schema::SturdyUri;
use std::path::PathBuf;

/// Records queued per transaction (and bytes of entity data, roughly): the unit a crash can
/// make an import read again.
const CHUNK_RECORDS: usize = 2000;
const CHUNK_BYTES: usize = 8 * 1024 * 1024;

pub struct Importer {
    client: Client,
    agent: Agent,
    /// As the user gave it; never printed.
    root: PathBuf,
    space_uri: SturdyUri,
    /// The space token's tag, recorded with each import (not secret).
    space_tag: String,
    tls_ca: Option<PathBuf>,
    space: Option<Space>,
    /// Why the space could not be reached in this pass (sessions that need it wait).
    space_error: Option<String>,
    limits: Limits,
    pub totals: Totals,
    pub reporter: Reporter,
}

/// The capsync session an agent session goes into, if it can go anywhere now.
enum Target {
    Ready(String),
    /// The space cannot be reached: tried again on the next pass.
    Deferred,
    /// Imported through another space before: left alone.
    Elsewhere,
}

impl Importer {
    pub fn new(client: Client, agent: Agent, root: PathBuf, space_uri: SturdyUri, tls_ca: Option<PathBuf>, reporter: Reporter) -> Importer {
        let space_tag = space_uri.token.hash().tag();
        Importer {
            client,
            agent,
            root,
            space_uri,
            space_tag,
            tls_ca,
            space: None,
            space_error: None,
            limits: Limits::default(),
            totals: Totals::default(),
            reporter,
        }
    }

    pub fn space_error(&self) -> Option<&str> {
        self.space_error.as_deref()
    }

    /// One pass over the root. Errors only for what stops an import as a whole: an unusable
    /// root, the outbox failing, or the space refused (revoked...).
    pub async fn scan(&mut self, deliverer: &Deliverer) -> anyhow::Result<()> {
        self.space_error = None;
        // These describe the pass; records, new sessions and warnings add up over a watch.
        (self.totals.sessions, self.totals.unchanged, self.totals.deferred) = (0, 0, 0);
        let result = match self.agent {
            Agent::Codex => self.scan_codex(deliverer).await,
            Agent::Opencode => self.scan_opencode(deliverer).await,
        };
        // The space connection is only kept through one pass.
        if let Some(space) = self.space.take() {
            space.close().await;
        }
        self.reporter.tick(&self.totals, true);
        result
    }

    async fn scan_codex(&mut self, deliverer: &Deliverer) -> anyhow::Result<()> {
        let known = {
            let client = self.client.clone();
            move |rel: &str, size: u64, mtime_ns: i64| {
                let row = client.import_by_source(Agent::Codex.name(), rel).ok().flatten()?;
                (row.size > 0 && row.size == size && row.mtime_ns == mtime_ns).then_some(row.agent_session_id)
            }
        };
        let discovery = codex::discover(&self.root, self.limits).map_err(root_error)?.with_known(known);
        let root = discovery.root().clone();
        for found in discovery {
            let session = match found {
                Ok(session) => session,
                Err(warning) => {
                    self.warn(warning);
                    continue;
                }
            };
            self.totals.sessions += 1;
            let name = session.ref_name();
            let target = match self.target_of(&session).await? {
                Target::Ready(target) => target,
                Target::Deferred | Target::Elsewhere => continue,
            };
            let SessionSource::CodexRollout { size, mtime_ns, .. } = &session.source else { continue };
            let cursor = self
                .client
                .import_row(&name)?
                .filter(|row| row.session_id == target && !row.cursor.is_empty())
                .and_then(|row| CodexCursor::from_json(&row.cursor).ok())
                .filter(|c| c.agent_session_id == session.session_id);
            if cursor.as_ref().is_some_and(|c| c.is_current(*size, *mtime_ns)) {
                self.totals.unchanged += 1;
                self.reporter.tick(&self.totals, false);
                continue;
            }
            let mut reader = match CodexReader::for_session(&root, &session, &target, cursor, self.limits) {
                Ok(reader) => reader,
                Err(e) => {
                    self.warn(Warning::new(session.source.path(), reason_of(&e)));
                    continue;
                }
            };
            let source = session.source.path().to_owned();
            let queued = self
                .queue(&name, &source, &mut reader, |reader, _| {
                    let c = reader.cursor();
                    Some(ImportProgress { source: source.clone(), size: c.size, mtime_ns: c.mtime_ns, cursor: c.to_json() })
                })
                .await?;
            for warning in reader.take_warnings() {
                self.warn(warning);
            }
            if queued == 0 && self.client.unacked(&name)? == 0 {
                self.totals.unchanged += 1;
            } else {
                deliverer.push(&name);
            }
        }
        Ok(())
    }

    async fn scan_opencode(&mut self, deliverer: &Deliverer) -> anyhow::Result<()> {
        let (store, warnings) = OpencodeStore::open(&self.root, self.limits).map_err(root_error)?;
        for warning in warnings {
            self.warn(warning);
        }
        for found in store.sessions() {
            let session = match found {
                Ok(session) => session,
                Err(warning) => {
                    self.warn(warning);
                    continue;
                }
            };
            self.totals.sessions += 1;
            let name = session.ref_name();
            let target = match self.target_of(&session).await? {
                Target::Ready(target) => target,
                Target::Deferred | Target::Elsewhere => continue,
            };
            let fingerprint = session.source.fingerprint().unwrap_or_default().to_owned();
            let current = self.client.import_row(&name)?.is_some_and(|row| row.session_id == target && row.cursor == fingerprint);
            if current && !fingerprint.is_empty() {
                self.totals.unchanged += 1;
                self.reporter.tick(&self.totals, false);
                continue;
            }
            let mut reader = match store.reader(&session, &target) {
                Ok(reader) => reader,
                Err(e) => {
                    self.warn(Warning::new(session.source.path(), reason_of(&e)));
                    continue;
                }
            };
            // The fingerprint is recorded with the last chunk only: a session read in part is
            // read again (whole; what the outbox holds is left out).
            let source = session.source.path().to_owned();
            let queued = self
                .queue(&name, &source, &mut reader, |_, done| {
                    done.then(|| ImportProgress { source: source.clone(), size: 0, mtime_ns: 0, cursor: fingerprint.clone() })
                })
                .await?;
            for warning in reader.take_warnings() {
                self.warn(warning);
            }
            if queued == 0 && self.client.unacked(&name)? == 0 {
                self.totals.unchanged += 1;
            } else {
                deliverer.push(&name);
            }
        }
        Ok(())
    }

    /// Queues a reader's records a chunk at a time, each chunk in one transaction with the
    /// position `progress` gives (called with whether the reader is done, i.e. ended without an
    /// error). A reader's error is a warning; what was read before it stays queued. Returns how
    /// many records were queued.
    async fn queue<R>(
        &mut self,
        name: &str,
        source: &str,
        reader: &mut R,
        progress: impl Fn(&R, bool) -> Option<ImportProgress>,
    ) -> anyhow::Result<u64>
    where
        R: Iterator<Item = Result<Record, AgentError>>,
    {
        let mut queued = 0u64;
        loop {
            let (mut ops, mut bytes, mut end, mut failed) = (Vec::new(), 0usize, false, None);
            while ops.len() < CHUNK_RECORDS && bytes < CHUNK_BYTES {
                match reader.next() {
                    Some(Ok(record)) => {
                        bytes += record.entity.data.len();
                        ops.push(record.into_op());
                    }
                    Some(Err(e)) => {
                        failed = Some(e);
                        end = true;
                        break;
                    }
                    None => {
                        end = true;
                        break;
                    }
                }
            }
            let position = progress(reader, end && failed.is_none());
            if !ops.is_empty() || position.is_some() {
                let n = self.client.enqueue_ops(name, ops, position.as_ref())? as u64;
                queued += n;
                self.totals.records_queued += n;
            }
            if let Some(e) = failed {
                let reason = reason_of(&e);
                let reason = reason.strip_prefix(&format!("{source}: ")).map(str::to_owned).unwrap_or(reason);
                self.warn(Warning::new(source, reason));
            }
            self.reporter.tick(&self.totals, false);
            // Lets delivery (and signals) run between chunks.
            tokio::task::yield_now().await;
            if end {
                return Ok(queued);
            }
        }
    }

    /// The capsync session of an agent session: the one recorded when this space opened it
    /// before, else one the space opens now (and the outbox records, attached).
    async fn target_of(&mut self, session: &AgentSession) -> anyhow::Result<Target> {
        let name = session.ref_name();
        if let Some(row) = self.client.import_row(&name)? {
            if row.space != self.space_tag {
                self.warn(Warning {
                    path: session.source.path().to_owned(),
                    reason: format!("{name} was imported through another space; left as it is"),
                });
                return Ok(Target::Elsewhere);
            }
            if self.client.has_ref(&name)? {
                return Ok(Target::Ready(row.session_id));
            }
        }
        if self.space_error.is_some() {
            self.totals.deferred += 1;
            return Ok(Target::Deferred);
        }
        let opened = match self.open(&name, &session.title).await {
            Ok(opened) => opened,
            Err(err) if err.is_retryable() => {
                if let Some(space) = self.space.take() {
                    space.close().await;
                }
                self.space_error = Some(err.to_string());
                self.totals.deferred += 1;
                return Ok(Target::Deferred);
            }
            Err(err) => {
                let refused = matches!(err.marker(), Some(Marker::Revoked | Marker::Expired | Marker::UnknownToken | Marker::Denied));
                if refused {
                    anyhow::bail!("the space refused to open {name}: {err} (the outbox keeps what it queued)");
                }
                anyhow::bail!("opening {name} through the space: {err}");
            }
        };
        let row = ImportRow {
            ref_name: name.clone(),
            agent: self.agent.name().to_owned(),
            agent_session_id: session.session_id.clone(),
            session_id: opened.session_id.clone(),
            space: self.space_tag.clone(),
            source: session.source.path().to_owned(),
            ..ImportRow::default()
        };
        self.client.attach_import(&row, &opened.owner.expose())?;
        if opened.created {
            self.totals.new_sessions += 1;
        }
        Ok(Target::Ready(opened.session_id))
    }

    async fn open(&mut self, key: &str, title: &str) -> Result<capsync_client::space::OpenedSession, ClientError> {
        if self.space.is_none() {
            let timeout = self.client.options().connect_timeout;
            let connect = Space::connect(&self.space_uri, self.tls_ca.as_deref());
            let space = tokio::time::timeout(timeout, connect).await.map_err(|_| ClientError::Connect {
                address: self.space_uri.address.clone(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            })??;
            self.space = Some(space);
        }
        let space = self.space.as_ref().expect("connected above");
        let timeout = self.client.options().ack_timeout;
        tokio::time::timeout(timeout, space.open_session(key, title))
            .await
            .map_err(|_| ClientError::Rpc(capnp::Error::disconnected("no answer to openSession".into())))?
    }

    fn warn(&mut self, warning: Warning) {
        if self.reporter.warning(warning) {
            self.totals.warnings += 1;
        }
    }

    /// The summary of a pass (`capsync import`).
    pub fn summary(&self, deliverer: &Deliverer) -> anyhow::Result<()> {
        let kept = deliverer.unacked()?;
        self.reporter.summary(self.agent.name(), &self.totals, kept);
        Ok(())
    }
}

/// The root cannot be used at all: one line, without its path.
fn root_error(e: AgentError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// An error's reason without the path it names (the warning names it, relative).
fn reason_of(e: &AgentError) -> String {
    match e {
        AgentError::Io { source, .. } => format!("cannot be read: {source}"),
        AgentError::Escape(_) => "the path leads outside the root; refused".into(),
        AgentError::Database { reason, .. } => reason.clone(),
        AgentError::Format(text) => text.clone(),
        AgentError::Root(text) => text.clone(),
    }
}

