//! What other nodes did, from PostgreSQL's LISTEN/NOTIFY (DESIGN §10, issue 16).
//!
//! Writes announce themselves in their own transaction, so a notification is delivered at
//! the commit, in commit order, and never for a write that rolled back:
//! - a revocation: `capsync_revoke` with `share:<id>:<epoch>`, `session:<id>:<epoch>` or
//!   `space:<id>:<epoch>`;
//! - an append that applied ops: `capsync_advance` with `<sid>:<cursor>` (one per commit, not
//!   per op: a transaction that notifies takes a database-wide lock while it commits).
//!
//! Payloads name objects and cursors only, never ops or tokens, and stay far below
//! PostgreSQL's 8,000-byte limit.
//!
//! [`listen`] keeps one connection of its own (never a pooled one: a pool's recycling runs
//! `UNLISTEN *`, and a transaction-mode pooler drops LISTEN altogether). On every (re)connect it
//! issues LISTEN first and only then reports [`Notice::Listening`], so a caller that re-reads
//! its state on that notice misses nothing committed after the re-read. A heartbeat query
//! notices a connection that went silent (a dead peer sends no FIN); a lost connection is
//! reported as [`Notice::Lost`] at once and retried with a capped backoff.

use crate::PgError;
use futures::StreamExt as _;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tracing::{debug, info, warn};

pub const REVOKE_CHANNEL: &str = "capsync_revoke";
pub const ADVANCE_CHANNEL: &str = "capsync_advance";

/// What a node learns from the database about the other nodes' writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// LISTEN is in force (after a start or a reconnect): re-read whatever a missed
    /// notification could have changed, then trust the notices that follow.
    Listening,
    /// The listening connection is gone: notices may be missed until the next `Listening`.
    Lost,
    /// An object's epoch was bumped to `epoch` (committed).
    Revoked { kind: RevokedKind, id: String, epoch: u64 },
    /// A session's log reached `cursor` (committed).
    Advanced { sid: i64, cursor: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokedKind {
    Session,
    Share,
    Space,
}

impl RevokedKind {
    pub fn name(self) -> &'static str {
        match self {
            RevokedKind::Session => "session",
            RevokedKind::Share => "share",
            RevokedKind::Space => "space",
        }
    }
}

/// The payload of a revocation notice.
pub(crate) fn revoke_payload(kind: RevokedKind, id: &str, epoch: u64) -> String {
    format!("{}:{id}:{epoch}", kind.name())
}

/// The payload of an advance notice (public for `capsync bench`'s raw baseline, which sends the
/// same notice as an append).
pub fn advance_payload(sid: i64, cursor: i64) -> String {
    format!("{sid}:{cursor}")
}

/// Parses one notification; `None` for a channel or payload this version does not know.
pub fn parse(channel: &str, payload: &str) -> Option<Notice> {
    match channel {
        REVOKE_CHANNEL => {
            let (kind, rest) = payload.split_once(':')?;
            let (id, epoch) = rest.rsplit_once(':')?;
            let kind = match kind {
                "session" => RevokedKind::Session,
                "share" => RevokedKind::Share,
                "space" => RevokedKind::Space,
                _ => return None,
            };
            Some(Notice::Revoked { kind, id: id.to_owned(), epoch: epoch.parse().ok()? })
        }
        ADVANCE_CHANNEL => {
            let (sid, cursor) = payload.split_once(':')?;
            Some(Notice::Advanced { sid: sid.parse().ok()?, cursor: cursor.parse().ok()? })
        }
        _ => None,
    }
}

/// How the listening connection is kept.
#[derive(Clone, Debug)]
pub struct ListenOptions {
    /// A query on the connection this often proves it alive.
    pub heartbeat: Duration,
    /// How long a heartbeat or connect may take before the connection counts as lost.
    pub timeout: Duration,
    /// The longest wait between reconnect attempts.
    pub backoff_max: Duration,
}

impl Default for ListenOptions {
    fn default() -> ListenOptions {
        ListenOptions { heartbeat: Duration::from_secs(2), timeout: Duration::from_secs(5), backoff_max: Duration::from_secs(2) }
    }
}

/// Starts the listening task (on the current tokio runtime) and returns its notices. The task
/// ends when the receiver is dropped.
pub fn listen(config: tokio_postgres::Config, tls: crate::tls::PgConnector, options: ListenOptions) -> mpsc::UnboundedReceiver<Notice> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(50);
        loop {
            match session(&config, &tls, &options, &tx).await {
                Ok(()) => return, // the receiver is gone
                Err(err) => {
                    warn!(error = %err, "the LISTEN connection to PostgreSQL was lost; reconnecting");
                    if tx.send(Notice::Lost).is_err() {
                        return;
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(options.backoff_max);
        }
    });
    rx
}

/// One listening connection, from connect to loss. `Ok` only when the receiver is gone.
async fn session(
    config: &tokio_postgres::Config,
    tls: &crate::tls::PgConnector,
    options: &ListenOptions,
    tx: &mpsc::UnboundedSender<Notice>,
) -> Result<(), PgError> {
    let (client, mut connection) = tokio::time::timeout(options.timeout, tls.open(config))
        .await
        .map_err(|_| PgError::Unavailable("connecting timed out".into()))??;
    // The connection's messages: notifications go to the caller, the end of the stream is
    // the connection's loss.
    let (lost_tx, mut lost) = tokio::sync::oneshot::channel::<String>();
    let forward = tx.clone();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        let why = loop {
            match messages.next().await {
                Some(Ok(AsyncMessage::Notification(n))) => match parse(n.channel(), n.payload()) {
                    Some(notice) => {
                        if forward.send(notice).is_err() {
                            break "the receiver is gone".to_owned();
                        }
                    }
                    None => debug!(channel = n.channel(), "an unknown notification was ignored"),
                },
                Some(Ok(_)) => {}
                Some(Err(err)) => break err.to_string(),
                None => break "the connection closed".to_owned(),
            }
        };
        let _ = lost_tx.send(why);
    });
    let _stop_driver = AbortOnDrop(driver);
    client.batch_execute(&format!("LISTEN {REVOKE_CHANNEL}; LISTEN {ADVANCE_CHANNEL}")).await?;
    if tx.send(Notice::Listening).is_err() {
        return Ok(());
    }
    info!("listening for other nodes' revocations and appends");
    loop {
        tokio::select! {
            why = &mut lost => {
                let why = why.unwrap_or_else(|_| "the connection task ended".into());
                return if tx.is_closed() { Ok(()) } else { Err(PgError::Unavailable(why)) };
            }
            _ = tokio::time::sleep(options.heartbeat) => {
                match tokio::time::timeout(options.timeout, client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => return Err(err.into()),
                    Err(_) => return Err(PgError::Unavailable("the heartbeat timed out".into())),
                }
                if tx.is_closed() {
                    return Ok(());
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
