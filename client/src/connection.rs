//! One Cap'n Proto connection to a capsync server.

use crate::error::{ClientError, Result};
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use capsync_schema::capsync_capnp::{admin, gateway, session, space};
use capsync_persistence::Rights;
use capsync_schema::capsync_capnp::grant;
use capsync_schema::{SturdyUri, Token};
use futures::future::LocalBoxFuture;

/// Resolves to what a redeem granted, once its answer arrives.
pub type Redeemed = LocalBoxFuture<'static, Result<GrantInfo>>;

/// The descriptive half of a `Grant`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantInfo {
    pub kind: String,
    pub id: String,
    pub session_id: String,
    pub rights: Rights,
    pub epoch: u64,
    pub expires_at: u64,
    /// The server's history id ('' from a server that predates it).
    pub history: String,
}

impl GrantInfo {
    fn read(grant: grant::Reader<'_>) -> capnp::Result<GrantInfo> {
        let rights = grant.get_rights()?;
        Ok(GrantInfo {
            kind: grant.get_kind()?.to_string()?,
            id: grant.get_id()?.to_string()?,
            session_id: grant.get_session_id()?.to_string()?,
            rights: Rights { read: rights.get_read(), append: rights.get_append(), mint: rights.get_mint() },
            epoch: grant.get_epoch(),
            expires_at: grant.get_expires_at(),
            history: grant.get_history()?.to_string()?,
        })
    }
}
use tokio_util::compat::{TokioAsyncReadCompatExt as _, TokioAsyncWriteCompatExt as _};

/// A live connection: the server's `Gateway` and the RPC system driving it on the current
/// `LocalSet`. Dropping it closes the connection.
pub struct Connection {
    pub gateway: gateway::Client,
    disconnector: Option<capnp_rpc::Disconnector<twoparty::VatId>>,
    closed: tokio::sync::watch::Receiver<bool>,
}

/// Longest a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest the RPC system of a connection whose write failed may take to shut down.
const WIND_DOWN: std::time::Duration = std::time::Duration::from_secs(1);

impl Connection {
    /// Dials `address` (`HOST:PORT`) over plain TCP. Must be called inside a tokio `LocalSet`.
    pub async fn open(address: &str) -> Result<Connection> {
        let stream = Self::tcp(address).await?;
        let (reader, writer) = stream.into_split();
        Ok(Self::start(reader.compat(), writer.compat_write()))
    }

    /// Dials the server of a sturdy URI: TLS for `capsyncs://` (verified against `tls_ca`,
    /// or the system roots when `None`), plain TCP for `capsync://`.
    pub async fn connect(uri: &SturdyUri, tls_ca: Option<&std::path::Path>) -> Result<Connection> {
        if !uri.tls {
            return Self::open(&uri.address).await;
        }
        let config = crate::tls::client_config(tls_ca)?;
        let name = rustls::pki_types::ServerName::try_from(uri.host().to_owned())
            .map_err(|_| ClientError::Invalid(format!("`{}` is not a valid TLS server name", uri.host())))?;
        let stream = Self::tcp(&uri.address).await?;
        let tls = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tokio_rustls::TlsConnector::from(config).connect(name, stream))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))
            .and_then(|r| r)
            .map_err(|source| ClientError::Tls { address: uri.address.clone(), source })?;
        let (reader, writer) = tokio::io::split(tls);
        Ok(Self::start(reader.compat(), writer.compat_write()))
    }

    async fn tcp(address: &str) -> Result<tokio::net::TcpStream> {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|source| ClientError::Connect { address: address.to_owned(), source })?;
        stream.set_nodelay(true).map_err(|source| ClientError::Connect { address: address.to_owned(), source })?;
        Ok(stream)
    }

    fn start(
        reader: impl futures::AsyncRead + Unpin + 'static,
        writer: impl futures::AsyncWrite + Unpin + 'static,
    ) -> Connection {
        // Messages ready at one moment leave in one write (see the server's listener); the
        // flusher runs in the RPC system's task.
        let (writer, flusher) = capsync_schema::coalesce::coalescing(writer, 8 * 1024);
        // capnp-futures reads a frame's segment table and then its segments, each read a
        // syscall on a bare socket: two or more per reply even when a burst of replies arrived
        // together. Buffered, a burst is read in a few syscalls (reads larger than the buffer
        // still go straight through).
        let reader = futures::io::BufReader::with_capacity(8 * 1024, reader);
        let network = twoparty::VatNetwork::new(reader, writer, Side::Client, capnp::message::ReaderOptions::new());
        let mut rpc = RpcSystem::new(Box::new(network), None);
        let gateway: gateway::Client = rpc.bootstrap(Side::Server);
        let disconnector = rpc.get_disconnector();
        let on_failed_write = rpc.get_disconnector();
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        tokio::task::spawn_local(async move {
            tokio::select! {
                outcome = &mut rpc => if let Err(err) = outcome {
                    tracing::debug!(error = %err, "connection ended");
                },
                _ = flusher => {
                    tracing::debug!("connection ended: a write failed");
                    // The RPC system may not know yet: a cut connection often fails a write
                    // before its read side sees the end of the stream. Dropped unknowing, it
                    // would never answer the calls in flight, not even with an error
                    // (capnp-rpc fails them only when it disconnects), and their callers
                    // would wait forever. Disconnected, it fails them at once as
                    // `disconnected` (capnp-rpc's words: "client requested disconnect"),
                    // which callers retry; the rest of its shutdown is quick, as its writes
                    // now fail, and is bounded anyway.
                    let _ = tokio::time::timeout(WIND_DOWN, futures::future::join(on_failed_write, &mut rpc)).await;
                }
            }
            let _ = closed_tx.send(true);
        });
        Connection { gateway, disconnector: Some(disconnector), closed }
    }

    /// Completes when the connection has ended, for whatever reason.
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        let _ = closed.wait_for(|c| *c).await;
    }

    /// A session capability from `token`, pipelined: calls on it are sent without waiting
    /// for the redeem's answer. Works for session and share tokens alike (the redeem result's
    /// `session` field, outside any union). The returned future yields the grant (or the
    /// redeem's refusal).
    pub fn session(&self, token: &Token) -> (session::Client, Redeemed) {
        let (pipeline, grant) = self.redeem(token);
        (pipeline.get_session(), grant)
    }

    /// The admin capability from `token`, pipelined.
    pub fn admin(&self, token: &Token) -> (admin::Client, Redeemed) {
        let (pipeline, grant) = self.redeem(token);
        (pipeline.get_admin(), grant)
    }

    /// The space capability from `token`, pipelined (the redeem result's `space` field).
    pub fn space(&self, token: &Token) -> (space::Client, Redeemed) {
        let (pipeline, grant) = self.redeem(token);
        (pipeline.get_space(), grant)
    }

    fn redeem(&self, token: &Token) -> (gateway::redeem_results::Pipeline, Redeemed) {
        let mut request = self.gateway.redeem_request();
        request.get().set_token(token.expose());
        let capnp::capability::RemotePromise { promise, pipeline } = request.send();
        let grant = Box::pin(async move {
            let response = promise.await?;
            Ok(GrantInfo::read(response.get()?.get_grant()?)?)
        });
        (pipeline, grant)
    }

    /// Closes the connection politely and waits until it is closed.
    pub async fn close(mut self) {
        if let Some(disconnector) = self.disconnector.take() {
            let _ = disconnector.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    /// A socket whose read side has not seen the peer go: nothing to read, no end of file.
    struct Silent;

    impl futures::AsyncRead for Silent {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut [u8]) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
    }

    /// A socket whose write side already knows the peer is gone.
    struct Broken;

    impl futures::AsyncWrite for Broken {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the peer went away")))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A connection cut under a client often fails a write before its read sees the end of
    /// the stream (the proxy of tests/subscribe.rs does this). The call in flight then must
    /// fail as `disconnected`, which callers retry, and not wait forever: a follower's first
    /// pull waited so, and its replica never caught up.
    #[test]
    fn a_failed_write_fails_the_calls_in_flight_instead_of_leaving_them_waiting() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        tokio::task::LocalSet::new().block_on(&runtime, async {
            let conn = Connection::start(Silent, Broken);
            // The pipelined session keeps the redeem's question alive, as in a caller that
            // goes on using it.
            let (_session, grant) = conn.session(&Token::generate());
            let outcome = tokio::time::timeout(Duration::from_secs(5), grant).await;
            let err = outcome.expect("the redeem was never answered, not even with an error").unwrap_err();
            assert!(err.is_retryable(), "{err}");
            tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.expect("the connection says it is closed");
        });
    }
}
