//! The sync engine: delivers a ref's outbox to the server.
//!
//! One round: connect, send `redeem(token)` and, without waiting for its answer, the unacked
//! batches on the promised capability (up to `window` in flight), recording each ack as it
//! comes. Batches are formed once and stored, so a replay after any failure resends the same
//! batches with the same opIds in the same order, and the server answers `duplicate` for what
//! it had already applied. Disconnects and I/O errors retry with exponential backoff and
//! jitter; `revoked`, `expired` and `unknown-token` stop the ref for good (until re-attached).

use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::store::Db;
use crate::wire;
use capsync_persistence::client::{BatchLimits, FormedBatch};
use capsync_persistence::failpoint;
use capsync_schema::marker::Marker;
use capsync_schema::SturdyUri;
use futures::stream::{FuturesOrdered, StreamExt as _};
use rand::Rng as _;
use std::time::Duration;
use tracing::{debug, info, warn};

/// How the engine batches, pipelines and retries.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    /// Batches in flight per session without waiting for acks.
    pub window: usize,
    pub max_batch_ops: usize,
    pub max_batch_bytes: usize,
    /// Consecutive failed rounds before `sync_once` gives up (the ops stay queued).
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    /// With batches in flight, how long to wait for the next ack before taking the connection
    /// for dead (a stopped or wedged server), reconnecting and replaying.
    pub ack_timeout: Duration,
    /// CA certificates (PEM) to verify `capsyncs://` servers with; system roots when `None`.
    pub tls_ca: Option<std::path::PathBuf>,
    /// Counts acked ops as acks arrive (for progress displays); not persisted.
    pub acked_ops: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// How long acked ops are kept after their ack, to heal a server restored from an older
    /// backup (see [`ClientDb::heal`](capsync_persistence::client::ClientDb::heal)); older ones
    /// are pruned after each sync.
    pub keep_acked: Duration,
}

impl SyncOptions {
    pub fn batch_limits(&self) -> BatchLimits {
        BatchLimits { max_ops: self.max_batch_ops, max_bytes: self.max_batch_bytes }
    }

    /// How many unacked batches a round reads from the outbox at a time: enough to fill the
    /// window twice, so sending never waits for a read.
    fn read_chunk(&self) -> usize {
        (2 * self.window).max(32)
    }
}

impl Default for SyncOptions {
    fn default() -> SyncOptions {
        SyncOptions {
            window: 16,
            max_batch_ops: 1000,
            max_batch_bytes: 4 * 1024 * 1024,
            max_attempts: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(30),
            tls_ca: None,
            acked_ops: None,
            keep_acked: DEFAULT_KEEP_ACKED,
        }
    }
}

/// Acked ops are kept a week by default.
pub const DEFAULT_KEEP_ACKED: Duration = Duration::from_secs(7 * 24 * 3600);

/// What a sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub batches: u64,
    pub ops: u64,
    /// Ops the server had applied before (answered `duplicate`): the replays that found them.
    pub duplicates: u64,
    /// The server's cursor in the last ack (0 if nothing was sent).
    pub cursor: u64,
    /// Acked ops sent again because the server had lost them (its history changed, or it
    /// answered a gap below batches it had acknowledged).
    pub healed: u64,
}

/// States a ref is left in after a refusal no retry can fix.
pub fn terminal_state(marker: Marker) -> Option<&'static str> {
    match marker {
        Marker::Revoked => Some("revoked"),
        Marker::Expired => Some("expired"),
        Marker::UnknownToken => Some("unknown-token"),
        Marker::Denied => Some("denied"),
        Marker::Diverged => Some("diverged"),
        // A gap is healed by the next round, which resends every unacked batch in order.
        _ => None,
    }
}

pub fn backoff(options: &SyncOptions, attempt: u32) -> Duration {
    let exp = options.backoff_base.saturating_mul(1u32 << attempt.min(16));
    let capped = exp.min(options.backoff_max);
    capped.mul_f64(rand::rng().random_range(0.5..1.0))
}

/// Delivers every queued op of ref `name`, retrying up to `max_attempts` failed rounds.
pub async fn sync_once(db: &Db, name: &str, options: &SyncOptions) -> Result<SyncReport> {
    let row = db.call({
        let name = name.to_owned();
        move |db| db.ref_row(&name)
    })
    .await?
    .ok_or_else(|| ClientError::Invalid(format!("no ref named {name}")))?;
    if row.state != "ok" && row.state != "unreachable" {
        return Err(ClientError::RefStopped { name: name.to_owned(), state: row.state, reason: row.last_error });
    }
    let uri = SturdyUri::parse(&row.uri)?;
    let mut report = SyncReport::default();
    let mut failures = 0;
    let mut history_checked = false;
    let mut gap_before = false;
    loop {
        let (batches, client_id, kept) = db
            .call({
                let (name, limits, chunk) = (name.to_owned(), options.batch_limits(), options.read_chunk());
                move |db| {
                    db.form_batches(&name, limits)?;
                    // Read again each round: healing gives the ref a new client id.
                    let client_id = db.ref_row(&name)?.map(|r| r.client_id).unwrap_or_default();
                    Ok((db.unacked_batches(&name, 0, chunk)?, client_id, db.counts(&name)?.acked))
                }
            })
            .await?;
        if batches.is_empty() {
            // Nothing queued, but acked ops kept: a server restored meanwhile may lack them.
            if !history_checked && kept > 0 && report.batches == 0 {
                history_checked = true;
                match history_changed(db, name, &uri, options).await {
                    Ok(Some(history)) => {
                        heal(db, name, Some(history), "the server's history changed (restored from a backup)", &mut report).await?;
                        continue;
                    }
                    Ok(None) => {}
                    // Nothing is queued: an unreachable server is no failure of this sync.
                    Err(err) => debug!(ref_name = name, error = %err, "could not check the server's history"),
                }
            }
            prune(db, name, options).await?;
            return Ok(report);
        }
        let before = report.batches;
        let outcome = match round(db, name, &uri, &client_id, batches, options, &mut report).await {
            Ok(RoundEnd::Done) => Ok(()),
            Ok(RoundEnd::HistoryChanged(history)) => {
                heal(db, name, Some(history), "the server's history changed (restored from a backup)", &mut report).await?;
                continue;
            }
            // A gap in a round whose batches were in flight may be stale (acks of earlier
            // batches arrived after the server judged the later one); only a gap seen again in
            // the next round, which starts from the lowest unacked batch, means the server
            // lost batches it had acknowledged.
            Err(err) if err.marker() == Some(Marker::Gap) && gap_before && server_is_behind(db, name, &err).await? => {
                heal(db, name, None, "the server is behind batches it acknowledged", &mut report).await?;
                gap_before = false;
                continue;
            }
            Err(err) => Err(err),
        };
        gap_before = matches!(&outcome, Err(err) if err.marker() == Some(Marker::Gap));
        match outcome {
            Ok(()) => failures = 0,
            Err(err) => {
                if let Some(state) = err.marker().and_then(terminal_state) {
                    warn!(ref_name = name, state, "the server refused this ref; its ops stay queued");
                    let (n, reason) = (name.to_owned(), err.to_string());
                    db.call(move |db| db.set_ref_state(&n, state, &reason)).await?;
                    return Err(err);
                }
                if !err.is_retryable() {
                    return Err(err);
                }
                let (n, reason) = (name.to_owned(), err.to_string());
                db.call(move |db| db.set_ref_state(&n, "unreachable", &reason)).await?;
                if report.batches == before {
                    failures += 1;
                }
                if failures >= options.max_attempts {
                    return Err(err);
                }
                let pause = backoff(options, failures);
                debug!(ref_name = name, error = %err, ?pause, "sync round failed; retrying");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// How a round ended when it did not fail.
enum RoundEnd {
    Done,
    /// The grant named another history than the ref saw before: the server was restored.
    HistoryChanged(String),
}

/// Re-queues every op of `name` the client still holds under a new client id (see
/// [`ClientDb::heal`](capsync_persistence::client::ClientDb::heal)).
async fn heal(db: &Db, name: &str, history: Option<String>, why: &'static str, report: &mut SyncReport) -> Result<()> {
    let n = name.to_owned();
    let client_id: [u8; 16] = rand::random();
    let healed = db.call(move |db| db.heal(&n, client_id, history.as_deref())).await?;
    warn!(ref_name = name, ops = healed, why, "re-delivering the ops this client still holds");
    report.healed += healed;
    Ok(())
}

/// Dials the ref's server, giving up after the connect timeout.
async fn connect(uri: &SturdyUri, options: &SyncOptions) -> Result<Connection> {
    tokio::time::timeout(options.connect_timeout, Connection::connect(uri, options.tls_ca.as_deref()))
        .await
        .map_err(|_| ClientError::Connect {
            address: uri.address.clone(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        })?
}

/// Redeems the ref's token only to read the server's history id; `Some` if it changed.
async fn history_changed(db: &Db, name: &str, uri: &SturdyUri, options: &SyncOptions) -> Result<Option<String>> {
    let conn = connect(uri, options).await?;
    let (_session, grant) = conn.session(&uri.token);
    let grant = tokio::time::timeout(options.ack_timeout, grant)
        .await
        .map_err(|_| ClientError::Rpc(capnp::Error::disconnected("no answer to redeem".into())))??;
    conn.close().await;
    let (n, history) = (name.to_owned(), grant.history.clone());
    Ok(db.call(move |db| db.note_history(&n, &history)).await?.then_some(grant.history))
}

/// Whether a `capsync/gap` says the server expects a batchSeq at or below one it already
/// acknowledged: it lost acknowledged batches (an older copy of its database), and resending
/// the unacked ones can never close the gap.
async fn server_is_behind(db: &Db, name: &str, err: &ClientError) -> Result<bool> {
    let Some(expected) = expected_batch_seq(&err.to_string()) else { return Ok(false) };
    let n = name.to_owned();
    let acked = db.call(move |db| db.last_acked_batch(&n)).await?;
    Ok(expected <= acked)
}

/// The batchSeq a `capsync/gap` error says the server expects ("... the next expected is N").
fn expected_batch_seq(message: &str) -> Option<u64> {
    let rest = &message[message.find("next expected is ")? + "next expected is ".len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

async fn prune(db: &Db, name: &str, options: &SyncOptions) -> Result<()> {
    let cutoff = (std::time::SystemTime::now() - options.keep_acked)
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let n = name.to_owned();
    let pruned = db.call(move |db| db.prune_acked(&n, cutoff)).await?;
    if pruned > 0 {
        debug!(ref_name = name, pruned, "pruned acked ops past the keep time");
    }
    Ok(())
}

enum Progress {
    Sent(u64),
    Acked(capsync_persistence::BatchAck),
}

/// Records a round's progress in the outbox, many batches per local transaction.
struct Recorder;

impl Recorder {
    fn start(db: Db, name: String) -> (tokio::sync::mpsc::UnboundedSender<Progress>, tokio::task::JoinHandle<Result<()>>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
        let task = tokio::task::spawn_local(async move {
            while let Some(first) = rx.recv().await {
                let mut sent = Vec::new();
                let mut acks = Vec::new();
                let mut take = |p: Progress| match p {
                    Progress::Sent(seq) => sent.push(seq),
                    Progress::Acked(ack) => acks.push(ack),
                };
                take(first);
                while let Ok(more) = rx.try_recv() {
                    take(more);
                }
                let recorded = acks.len();
                let n = name.clone();
                db.call(move |db| db.record_progress(&n, &sent, &acks)).await?;
                for _ in 0..recorded {
                    failpoint::hit("client-after-ack");
                }
                failpoint::hit("client-after-send");
            }
            Ok(())
        });
        (tx, task)
    }
}

type ChunkRead = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<FormedBatch>>>>>;

/// The batches a round has yet to send: those read so far, and a read of the next chunk
/// running on the database thread while earlier batches are on the wire.
struct Unsent<'a> {
    db: &'a Db,
    name: &'a str,
    queue: std::collections::VecDeque<FormedBatch>,
    chunk: usize,
    /// The highest batchSeq read so far.
    read_up_to: u64,
    /// False once a read came back short: the outbox has nothing further.
    more: bool,
    reading: Option<ChunkRead>,
}

impl<'a> Unsent<'a> {
    fn new(db: &'a Db, name: &'a str, first: Vec<FormedBatch>, chunk: usize) -> Unsent<'a> {
        let more = first.len() >= chunk;
        let mut unsent = Unsent { db, name, queue: Default::default(), chunk, read_up_to: 0, more, reading: None };
        unsent.absorb(first);
        unsent
    }

    fn pop(&mut self) -> Option<FormedBatch> {
        self.queue.pop_front()
    }

    fn absorb(&mut self, batches: Vec<FormedBatch>) {
        self.more = batches.len() >= self.chunk;
        if let Some(last) = batches.last() {
            self.read_up_to = last.batch_seq;
        }
        self.queue.extend(batches);
    }

    /// Starts reading the next chunk once fewer than `window` batches are left to send.
    fn read_ahead(&mut self, window: usize) {
        if self.more && self.reading.is_none() && self.queue.len() < window {
            let (db, name, after, chunk) = (self.db.clone(), self.name.to_owned(), self.read_up_to, self.chunk);
            self.reading = Some(Box::pin(async move { Ok(db.call(move |db| db.unacked_batches(&name, after, chunk)).await?) }));
        }
    }

    /// Completes the running read, if any (never resolves when none is running); its batches
    /// join the queue.
    async fn read_done(&mut self) -> Result<()> {
        let Some(reading) = self.reading.as_mut() else { return std::future::pending().await };
        let batches = reading.await;
        self.reading = None;
        self.absorb(batches?);
        Ok(())
    }

    /// Waits for the running read; false if there was none (nothing is left to send).
    async fn wait_for_read(&mut self) -> Result<bool> {
        if self.reading.is_none() {
            return Ok(false);
        }
        self.read_done().await?;
        Ok(true)
    }
}

/// One connection's worth of work: redeem and replay pipelined, then everything else queued.
async fn round(
    db: &Db,
    name: &str,
    uri: &SturdyUri,
    client_id: &[u8; 16],
    batches: Vec<FormedBatch>,
    options: &SyncOptions,
    report: &mut SyncReport,
) -> Result<RoundEnd> {
    let conn = connect(uri, options).await?;
    let (session, grant) = conn.session(&uri.token);
    // Progress (batches sent, acks) is recorded by one task that commits whatever has
    // accumulated in one local transaction, so the send window refills at network speed
    // instead of at fsync speed.
    let (progress, recorder) = Recorder::start(db.clone(), name.to_owned());
    let mut in_flight = FuturesOrdered::new();
    let window = options.window.max(1);
    let mut queue = Unsent::new(db, name, batches, options.read_chunk());
    let outcome: Result<()> = async {
        loop {
            while in_flight.len() < window {
                let Some(batch) = queue.pop() else { break };
                failpoint::hit("client-before-send");
                let promise = wire::append_request(&session, client_id, &batch).send().promise;
                let _ = progress.send(Progress::Sent(batch.batch_seq));
                in_flight.push_back(async move { (batch, promise.await) });
            }
            queue.read_ahead(window);
            if in_flight.is_empty() {
                if queue.wait_for_read().await? {
                    continue;
                }
                return Ok(());
            }
            let next = tokio::select! {
                next = tokio::time::timeout(options.ack_timeout, in_flight.next()) => next.map_err(|_| {
                    ClientError::Rpc(capnp::Error::disconnected(format!("no ack within {:?}", options.ack_timeout)))
                })?,
                read = queue.read_done() => {
                    read?;
                    continue;
                }
            };
            let Some((batch, response)) = next else { continue };
            let response = response?;
            let ack = wire::read_ack(response.get()?.get_ack()?)?;
            if ack.batch_seq != batch.batch_seq
                || ack.results.len() != batch.ops.len()
                || ack.results.iter().zip(&batch.ops).any(|(r, op)| r.op_id != op.op_id)
            {
                return Err(ClientError::Invalid(format!("the server's ack does not match batch {}", batch.batch_seq)));
            }
            report.batches += 1;
            report.ops += batch.ops.len() as u64;
            report.duplicates +=
                ack.results.iter().filter(|r| r.status == capsync_persistence::OpStatus::Duplicate).count() as u64;
            report.cursor = ack.cursor;
            if let Some(counter) = &options.acked_ops {
                counter.fetch_add(batch.ops.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            let _ = progress.send(Progress::Acked(ack));
        }
    }
    .await;
    drop(progress);
    // Whatever happened on the wire, every ack received is recorded before the round ends.
    recorder.await.map_err(|_| capsync_persistence::StorageError::Stopped)??;
    // The grant is looked at whatever happened to the batches: on a restored server they may
    // well have failed (a gap), and the history tells why.
    if let Ok(Ok(grant)) = tokio::time::timeout(options.ack_timeout, grant).await {
        let (n, history) = (name.to_owned(), grant.history.clone());
        if db.call(move |db| db.note_history(&n, &history)).await? {
            conn.close().await;
            return Ok(RoundEnd::HistoryChanged(grant.history));
        }
        let (n, id) = (name.to_owned(), grant.session_id);
        db.call(move |db| db.set_session_id(&n, &id)).await?;
    }
    outcome?;
    info!(ref_name = name, batches = report.batches, "sync round done");
    conn.close().await;
    Ok(RoundEnd::Done)
}
