//! Spaces: opening sessions for ingestion with a space's sturdy URI instead of the admin URI.
//!
//! An importer holds a space URI (from `capsync admin create-space`). For each agent session it
//! finds, it calls [`open_session`] with the agent's own session id as the key: the first call
//! creates a capsync session, every later one (a re-run, another machine) returns the same
//! session, and each returns a fresh owner URI of it to attach and push through.
//!
//! ```no_run
//! # async fn demo() -> capsync_client::Result<()> {
//! use capsync_schema::SturdyUri;
//! let space = SturdyUri::parse("capsync://127.0.0.1:7420/csy_...")?;
//! let opened = capsync_client::space::open_session(&space, "codex:0195...", "fix the parser", None).await?;
//! println!("session {} (new: {})", opened.session_id, opened.created);
//! // opened.owner is the owner's sturdy URI: attach it and push (see `Client::attach`).
//! # Ok(()) }
//! ```
//!
//! Many sessions at once: [`Space::connect`] once, then [`Space::open_session`] for each.

use crate::connection::{Connection, Redeemed};
use crate::error::{ClientError, Result};
use capsync_schema::capsync_capnp::space;
use capsync_schema::{SturdyUri, Token};
use std::path::Path;

/// A session opened through a space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenedSession {
    pub session_id: String,
    /// A new owner URI of the session (same server address and scheme as the space URI). It
    /// stops working when the space is revoked.
    pub owner: SturdyUri,
    /// Whether this call created the session (false: the key had been opened before).
    pub created: bool,
}

/// A session listed by [`Space::list_sessions`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpaceSession {
    pub key: String,
    pub session_id: String,
    pub title: String,
    pub cursor: u64,
    /// Unix ms.
    pub created_at: u64,
}

/// Redeems `space_uri` and opens the session of `key` in one round trip (the `openSession` call
/// is pipelined on the redeem), on a connection of its own that is closed before returning.
/// `tls_ca` verifies a `capsyncs://` server as [`Connection::connect`] does.
///
/// Fails with the server's marker: `capsync/revoked` once the space is revoked,
/// `capsync/unknown-token` for a token the server does not know, `capsync/invalid` for an empty
/// or over-long key.
pub async fn open_session(space_uri: &SturdyUri, key: &str, title: &str, tls_ca: Option<&Path>) -> Result<OpenedSession> {
    let space = Space::connect(space_uri, tls_ca).await?;
    let opened = space.open_session(key, title).await;
    space.close().await;
    opened
}

/// A live space capability on a connection of its own.
pub struct Space {
    conn: Connection,
    cap: space::Client,
    uri: SturdyUri,
    _grant: Redeemed,
}

impl Space {
    /// Connects and redeems the space token, pipelined: the first call goes out with the redeem.
    pub async fn connect(space_uri: &SturdyUri, tls_ca: Option<&Path>) -> Result<Space> {
        let conn = Connection::connect(space_uri, tls_ca).await?;
        let (cap, grant) = conn.space(&space_uri.token);
        Ok(Space { conn, cap, uri: space_uri.clone(), _grant: grant })
    }

    /// The session of `key` in this space, created with `title` if the key is new; with a
    /// fresh owner URI of it.
    pub async fn open_session(&self, key: &str, title: &str) -> Result<OpenedSession> {
        let mut request = self.cap.open_session_request();
        request.get().set_key(key);
        request.get().set_title(title);
        let response = request.send().promise.await?;
        let (session_id, token, created) = (|| -> capnp::Result<_> {
            let results = response.get()?;
            Ok((results.get_session_id()?.to_string()?, results.get_token()?.to_string()?, results.get_created()))
        })()?;
        let token = Token::parse(&token).map_err(|e| ClientError::Invalid(format!("the server sent a malformed token: {e}")))?;
        Ok(OpenedSession { session_id, owner: SturdyUri::new(self.uri.address.clone(), token).with_tls(self.uri.tls), created })
    }

    /// The sessions opened through this space, oldest first.
    pub async fn list_sessions(&self) -> Result<Vec<SpaceSession>> {
        let response = self.cap.list_sessions_request().send().promise.await?;
        let read = || -> capnp::Result<Vec<SpaceSession>> {
            let mut out = Vec::new();
            for s in response.get()?.get_sessions()?.iter() {
                out.push(SpaceSession {
                    key: s.get_key()?.to_string()?,
                    session_id: s.get_session_id()?.to_string()?,
                    title: s.get_title()?.to_string()?,
                    cursor: s.get_cursor(),
                    created_at: s.get_created_at(),
                });
            }
            Ok(out)
        };
        Ok(read()?)
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        drop(self.cap);
        self.conn.close().await;
    }
}
