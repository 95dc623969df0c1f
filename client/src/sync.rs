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
use capsync_persistence::client::FormedBatch;
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
        }
    }
}

/// What a sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub batches: u64,
    pub ops: u64,
    /// Ops the server had applied before (answered `duplicate`): the replays that found them.
    pub duplicates: u64,
    /// The server's cursor in the last ack (0 if nothing was sent).
    pub cursor: u64,
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
    loop {
        let batches = db
            .call({
                let (name, max_ops, max_bytes) = (name.to_owned(), options.max_batch_ops, options.max_batch_bytes);
                move |db| {
                    db.form_batches(&name, max_ops, max_bytes)?;
                    db.unacked_batches(&name)
                }
            })
            .await?;
        if batches.is_empty() {
            return Ok(report);
        }
        let before = report.batches;
        match round(db, name, &uri, &row.client_id, batches, options, &mut report).await {
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

/// One connection's worth of work: redeem and replay pipelined, then everything else queued.
async fn round(
    db: &Db,
    name: &str,
    uri: &SturdyUri,
    client_id: &[u8; 16],
    batches: Vec<FormedBatch>,
    options: &SyncOptions,
    report: &mut SyncReport,
) -> Result<()> {
    let conn = tokio::time::timeout(options.connect_timeout, Connection::connect(uri, options.tls_ca.as_deref()))
        .await
        .map_err(|_| ClientError::Connect {
            address: uri.address.clone(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        })??;
    let (session, grant) = conn.session(&uri.token);
    // Progress (batches sent, acks) is recorded by one task that commits whatever has
    // accumulated in one local transaction, so the send window refills at network speed
    // instead of at fsync speed.
    let (progress, recorder) = Recorder::start(db.clone(), name.to_owned());
    let mut in_flight = FuturesOrdered::new();
    let mut queue = batches.into_iter();
    let window = options.window.max(1);
    let outcome: Result<()> = async {
        loop {
            while in_flight.len() < window {
                let Some(batch) = queue.next() else { break };
                failpoint::hit("client-before-send");
                let promise = wire::append_request(&session, client_id, &batch).send().promise;
                let _ = progress.send(Progress::Sent(batch.batch_seq));
                in_flight.push_back(async move { (batch, promise.await) });
            }
            let next = tokio::time::timeout(options.ack_timeout, in_flight.next()).await.map_err(|_| {
                ClientError::Rpc(capnp::Error::disconnected(format!("no ack within {:?}", options.ack_timeout)))
            })?;
            let Some((batch, response)) = next else { return Ok(()) };
            let response = response?;
            let ack = wire::read_ack(response.get()?.get_ack()?)?;
            if ack.batch_seq != batch.batch_seq || ack.results.len() != batch.ops.len() {
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
    outcome?;
    if let Ok(grant) = grant.await {
        let (n, id) = (name.to_owned(), grant.session_id);
        db.call(move |db| db.set_session_id(&n, &id)).await?;
    }
    info!(ref_name = name, batches = report.batches, "sync round done");
    conn.close().await;
    Ok(())
}
